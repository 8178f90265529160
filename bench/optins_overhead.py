"""What the opt-in probe costs the calls it watches, against no probe, in one run.

    sudo .venv/bin/python bench/optins_overhead.py [--calls N]

Three call kinds, each timed without the probe (baseline) and with it:
  prctl(PR_GET_MEMORY_MERGE)   every call becomes an event (the probe's worst case);
                               timed in batches that fit the ring buffer, drained between
  prctl(PR_GET_MEMORY_MERGE)   with the probe filtered to another pid (rejected on entry)
  madvise(MADV_NORMAL)         not a KSM advice: rejected on entry by the advice test,
                               the cost every other madvise on the host pays
  getppid()                    not traced at all: what enabling any syscall tracepoint
                               costs every syscall (the kernel's slow syscall path)
Best of --repeat runs, in ns per call, and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import mmap
import time
from collections.abc import Callable

from ksmtrace.probes.optins import OptinProbe

PR_GET_MEMORY_MERGE = 68
MADV_NORMAL = 0
BATCH = 2000  # < the 64-page ring buffer's ~2,500 events

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def timed(calls: int, one: Callable[[], object], between: Callable[[], object] | None = None) -> float:
    """ns per call of ``one``, in batches; ``between`` runs untimed after each batch."""
    spent = 0
    done = 0
    while done < calls:
        n = min(BATCH, calls - done)
        t0 = time.perf_counter_ns()
        for _ in range(n):
            one()
        spent += time.perf_counter_ns() - t0
        done += n
        if between:
            between()
    return spent / calls


def best(repeat: int, f: Callable[[], float]) -> float:
    return min(f() for _ in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    page = mmap.PAGESIZE
    m = mmap.mmap(-1, page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))

    def prctl() -> object:
        return libc.prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0)

    def madvise() -> object:
        return libc.madvise(addr, page, MADV_NORMAL)

    def getppid() -> object:
        return libc.getppid()

    rows = []
    base_prctl = best(args.repeat, lambda: timed(args.calls, prctl))
    base_madv = best(args.repeat, lambda: timed(args.calls, madvise))
    base_getppid = best(args.repeat, lambda: timed(args.calls, getppid))

    with OptinProbe() as probe:
        got = [0]

        def drain() -> None:
            got[0] += len(probe.drain())

        ev = best(args.repeat, lambda: timed(args.calls, prctl, drain))
        madv = best(args.repeat, lambda: timed(args.calls, madvise))
        other = best(args.repeat, lambda: timed(args.calls, getppid))
        st = probe.stats()
    with OptinProbe(pids=[1]) as probe:
        filt = best(args.repeat, lambda: timed(args.calls, prctl))

    rows.append(("prctl(PR_GET_MEMORY_MERGE), event per call", base_prctl, ev))
    rows.append(("prctl(PR_GET_MEMORY_MERGE), filtered by pid", base_prctl, filt))
    rows.append(("madvise(MADV_NORMAL), not a KSM advice", base_madv, madv))
    rows.append(("getppid(), not traced", base_getppid, other))
    print(f"{'call':46} {'base ns':>8} {'probe ns':>9} {'ratio':>6}")
    for name, base, probed in rows:
        print(f"{name:46} {base:8.0f} {probed:9.0f} {probed / base:6.2f}")
    print(
        f"events received {got[0]} of {args.calls * args.repeat} calls; "
        f"lost {st.lost}, emitted {st.emitted} (other processes' opt-ins included)"
    )


if __name__ == "__main__":
    main()
