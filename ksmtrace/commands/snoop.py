"""ksmtrace snoop: one line per KSM opt-in call, live, after the opt-ins made before.

madvise(MADV_[UN]MERGEABLE), prctl(PR_[SG]ET_MEMORY_MERGE), process_madvise
with those advices, each with its result; forks that copy a mergeable mm and
execs that keep whole-process merging. The inventory of processes that opted
in before tracing started comes first (--no-inventory to skip it).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

from ksmtrace import inventory
from ksmtrace.commands._common import add_filter_args
from ksmtrace.errors import AccessDenied, ProcessGone, UsageError
from ksmtrace.kernel import checks
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.probes.optins import CgroupFilter, OptinProbe, ProbeStats, resolve_cgroup
from ksmtrace.views import optins as view
from ksmtrace.views.fmt import emit_json

EPILOG = """\
examples:
  ksmtrace snoop                 # every opt-in on the host
  ksmtrace snoop -T -p 1234      # pid 1234 only, with timestamps
  ksmtrace snoop -n qemu-system  # processes named qemu-system (also ones started later)
  ksmtrace snoop --cgroup /system.slice/libvirtd.service
  ksmtrace snoop -j --duration 10 --no-inventory
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "snoop",
        help="trace KSM opt-ins live: madvise, prctl, process_madvise, fork, exec",
        description="Print one line per madvise(MADV_MERGEABLE/UNMERGEABLE), "
        "prctl(PR_SET/GET_MEMORY_MERGE) and process_madvise call with its result, and "
        "one per fork or exec that inherits an opt-in. Processes that opted in before "
        "tracing started are listed first, from /proc. Filters run in the kernel.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_filter_args(p)
    p.add_argument("--cgroup", metavar="PATH", help="only callers in this cgroup v2 (or below it)")
    p.add_argument("-T", "--timestamp", action="store_true", help="include a time column (HH:MM:SS)")
    p.add_argument("-j", "--json", action="store_true", help="JSON lines (type: inventory, event, summary)")
    p.add_argument("--bytes", action="store_true", help="exact byte lengths instead of KiB/MiB")
    p.add_argument("--no-inventory", action="store_true", help="do not list opt-ins made before tracing")
    p.add_argument("--duration", type=float, metavar="SEC", help="stop after SEC seconds")
    p.add_argument(
        "--count-all-madvise",
        action="store_true",
        help="debug: also count every madvise call (any advice) passing the filters, "
        "reported at the end; to check ksmtrace against perf",
    )
    p.set_defaults(run=run)


def _inventory(
    pids: list[int] | None, comm: str | None, cgroup: CgroupFilter | None, proc: ProcFS
) -> inventory.Inventory:
    """The start-up inventory under the same filters as the probe."""
    inv = inventory.take(proc, pids)
    keep = []
    for p in inv.processes:
        if comm is not None and p.comm != comm[:15]:
            continue
        if cgroup is not None:
            try:
                if not cgroup.contains(proc.cgroup(p.pid) or ""):
                    continue
            except ProcessGone:
                inv.exited += 1
                continue
            except AccessDenied:
                inv.denied += 1
                continue
        keep.append(p)
    inv.processes = keep
    return inv


def run(args: argparse.Namespace) -> int:
    checks.require_root("tracing")
    proc = ProcFS()
    pids = None
    if args.pid:
        for pid in args.pid:
            if not proc.exists(pid):
                raise UsageError(f"pid {pid} does not exist")
        pids = list(args.pid)
    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be positive")
    if args.name and not proc.find_by_comm(args.name[:15]) and not args.json:
        print(f"(no process named {args.name!r} yet: tracing for new ones)", file=sys.stderr)
    cgroup = resolve_cgroup(args.cgroup) if args.cgroup else None

    # Attach first, then read /proc: an opt-in made meanwhile shows up in the
    # stream, possibly in both, never in neither.
    probe = OptinProbe(pids=pids, comm=args.name, cgroup=cgroup, count_all_madvise=args.count_all_madvise)
    events = 0
    inv = None
    # From here on Ctrl-C and SIGTERM only set a flag, so a signal that comes
    # during the inventory or right after "Tracing..." still ends with the
    # ring buffer drained and the summary printed.
    try:
        with _StopFlag() as stop:
            if not args.no_inventory:
                inv = _inventory(pids, args.name, cgroup, proc)
                if args.json:
                    for p in inv.processes:
                        emit_json(view.inventory_json(p), lines=True)
                else:
                    print("Opted in before tracing started (from /proc):")
                    if inv.processes:
                        view.inventory_table(inv.processes, exact=args.bytes)
                    else:
                        print("(none)")
                    if inv.exited or inv.denied:
                        print(f"({inv.exited} exited while read, {inv.denied} not readable: skipped)")
                    print()
            # In JSON mode stdout holds only JSON lines.
            print("Tracing... Ctrl-C to end.", file=sys.stderr if args.json else sys.stdout, flush=True)
            if not args.json:
                print(view.snoop_header(args.timestamp), flush=True)
            deadline = None if args.duration is None else time.monotonic() + args.duration
            while not stop.set and (deadline is None or time.monotonic() < deadline):
                for ev in probe.poll(100):
                    events += 1
                    _print(ev, args)
        for ev in probe.drain():
            events += 1
            _print(ev, args)
        _summary(probe.stats(), events, inv, args)
    finally:
        probe.close()
    return 0


class _StopFlag:
    """Ctrl-C and SIGTERM end the loop by a flag, not an exception.

    An exception raised by a signal handler while BCC runs our ring-buffer
    callback would be swallowed by ctypes ("Exception ignored ...") and lose
    the signal; a flag is seen at the next poll (every 100 ms).
    """

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def _handler(self, *_: object) -> None:
        self.set = True

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _print(ev: Any, args: argparse.Namespace) -> None:
    if args.json:
        emit_json(view.event_json(ev), lines=True)
    else:
        print(view.snoop_line(ev, args.timestamp, args.bytes), flush=True)


def _summary(st: ProbeStats, events: int, inv: inventory.Inventory | None, args: argparse.Namespace) -> None:
    if args.json:
        emit_json(
            {
                "type": "summary",
                "events": events,
                "lost": st.lost,
                "inflight_full": st.inflight_full,
                "madvise_calls": st.madvise_calls,
                "inventory": None
                if inv is None
                else {"processes": len(inv.processes), "exited": inv.exited, "denied": inv.denied},
            },
            lines=True,
        )
        return
    if st.lost:
        print(f"{st.lost} events lost (ring buffer full)")
    if st.inflight_full:
        print(f"{st.inflight_full} calls not followed (per-thread table full)")
    if st.madvise_calls is not None:
        print(f"{st.madvise_calls} madvise calls of any advice passed the filters")
