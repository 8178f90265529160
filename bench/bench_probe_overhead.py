#!/usr/bin/env python3
"""Cost of ksmtrace's probes on the page-fault path, in one run.

Runs small C fault loops (bench/faultloop.c, compiled here) with no probe
attached and with every probe of ksmtrace attached (bpf/faults.bpf.c and
bpf/ksmd.bpf.c), alternating rounds so drift on a shared machine hits both,
and prints ns per fault, the ratio and the slowdown:

  fresh      first-touch writes: not a write-protect fault, the probe returns
             after one mask test
  fork-cow   COW after fork in a process that is not mergeable (one array
             load, then return)
  fork-cow-mg  the same in a mergeable process with no merged page: process
             slot, region scan and counters, no page-table walk
  ksm-cow    writes to KSM-merged pages: every fault is a KSM COW (merged-set
             hit, page-table walk, counters); ns per fault is per KSM COW
             the kernel counted (cow_ksm), not per page written

Takes the KSM test lock (ksm-cow needs ksmd, the others run with ksmd
stopped) and restores KSM settings.
Usage: .venv/bin/python bench/bench_probe_overhead.py [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ksmtrace.kernel import bcc_env, ksm_sysfs  # noqa: E402
from ksmtrace.probes import loader  # noqa: E402
from ksmtrace.probes.faults import FaultProbe  # noqa: E402
from ksmtrace.probes.ksmd import KsmdProbe, available  # noqa: E402

LOCK = (
    Path("/run/lock/ksmtrace-tests.lock") if Path("/run/lock").is_dir() else Path("/tmp/ksmtrace-tests.lock")
)


def build(tmp: Path) -> Path:
    exe = tmp / "faultloop"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "bench" / "faultloop.c")], check=True)
    return exe


CPU = max(os.sched_getaffinity(0))


def _pin() -> None:
    # One CPU: no migrations in the middle of a loop on this shared machine.
    os.sched_setaffinity(0, {CPU})


def loop(exe: Path, *args: str) -> float:
    for attempt in range(3):
        out = subprocess.run([str(exe), *args], capture_output=True, text=True, preexec_fn=_pin)
        if out.returncode == 0:
            return float(out.stdout)
        # ksm-cow needs ksmd to merge its pages in time; a busy machine can delay it.
        print(f"faultloop {' '.join(args)}: {out.stderr.strip()} (attempt {attempt + 1})", file=sys.stderr)
    raise SystemExit(f"faultloop {' '.join(args)} failed 3 times")


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def _fault_prog_stats() -> tuple[int, int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True)
    ns = cnt = 0
    for p in json.loads(out.stdout):
        if p.get("name") == "raw_tracepoint__page_fault_user":
            ns += p.get("run_time_ns", 0)
            cnt += p.get("run_cnt", 0)
    return ns, cnt


def program_ns(exe: Path, args: tuple[str, ...]) -> float | None:
    """Average run time of the fault-path BPF program per fault during one
    loop, from the kernel's own BPF statistics (on only for this run: they
    add two clock reads per run, ~50 ns here, included in the figure)."""
    old = STATS.read_text()
    STATS.write_text("1")
    try:
        ns0, cnt0 = _fault_prog_stats()
        loop(exe, *args)
        ns1, cnt1 = _fault_prog_stats()
    finally:
        STATS.write_text(old)
    return (ns1 - ns0) / (cnt1 - cnt0) if cnt1 > cnt0 else None


class _Empty:
    """A program that returns at once, on the tracepoint ksmtrace uses: what
    any BPF program there costs (the floor under ksmtrace's own)."""

    def __init__(self) -> None:
        bcc, headers = bcc_env.prepare()
        self.bpf = bcc.BPF(text=b"RAW_TRACEPOINT_PROBE(page_fault_user) { return 0; }", cflags=headers.cflags)

    def close(self) -> None:
        self.bpf.cleanup()


def loop_cases(pages: int, reps: int) -> dict[str, tuple[str, ...]]:
    """The loops every fault-overhead bench runs: name -> faultloop arguments."""
    return {
        "fresh": ("fresh", str(pages), str(reps)),
        "fork-cow": ("forkcow", str(pages), str(reps)),
        "fork-cow-mg": ("forkcow", str(pages), str(reps), "mg"),
        "ksm-cow": ("ksmcow", str(pages // 4), str(max(reps // 2, 1))),
    }


@contextlib.contextmanager
def quiet_ksm() -> Iterator[None]:
    """The KSM test lock held and ksmd stopped, KSM settings restored after.

    ksmd stays stopped except while the ksm-cow loop waits for its merges
    (faultloop starts and stops it): a scanning ksmd competes with the loops
    for the CPU and for their page tables, and the ksmd probes change how long
    it runs, which is not the fault path."""
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = ksm_sysfs.SavedSettings()
        try:
            ksm_sysfs.write("pages_to_scan", 5000)
            ksm_sysfs.write("sleep_millisecs", 10)
            ksm_sysfs.write("run", 0)
            yield
        finally:
            ksm_sysfs.write("run", 2)
            saved.restore()


class Attachable:
    """Probes loaded once and attached only for the runs of their setting
    (compiling takes seconds, attaching does not)."""

    def __init__(self, probes: list[Any]) -> None:
        self.probes = probes
        self.detached = [loader.detach_all(p.bpf) for p in probes]

    def attach(self) -> None:
        for p, d in zip(self.probes, self.detached):
            loader.reattach(p.bpf, d)

    def detach(self) -> None:
        for p in self.probes:
            loader.detach_all(p.bpf)


def paired_rounds(
    exe: Path, cases: dict[str, tuple[str, ...]], settings: dict[str, Attachable], rounds: int
) -> dict[str, dict[str, list[float]]]:
    """ns per fault of every loop under every setting, ``rounds`` times.

    Each run with probes sits right before or after one without, and the order
    of the settings rotates from round to round, so drift on a shared machine
    hits all of them alike."""
    names = tuple(settings)
    res: dict[str, dict[str, list[float]]] = {c: {s: [] for s in names} for c in cases}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name, args in cases.items():
            for s in order if r % 2 == 0 else order[::-1]:
                settings[s].attach()
                try:
                    res[name][s].append(loop(exe, *args))
                finally:
                    settings[s].detach()
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller loops (a smoke run)")
    a = ap.parse_args()
    pages, reps = (4096, 2) if a.quick else (16384, 6)
    cases = loop_cases(pages, reps)
    prog_ns: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory() as td, quiet_ksm():
        exe = build(Path(td))
        probes = Attachable([FaultProbe()] + ([KsmdProbe()] if available() else []))
        floor = _Empty()
        try:
            settings = {"none": Attachable([]), "all": probes, "empty": Attachable([floor])}
            res = paired_rounds(exe, cases, settings, a.rounds)
            probes.attach()
            for name, args in cases.items():
                prog_ns[name] = program_ns(exe, args)
        finally:
            for p in [*probes.probes, floor]:
                p.close()
    jit = Path("/proc/sys/net/core/bpf_jit_enable").read_text().strip()
    print(
        f"\nprobe overhead on page faults ({a.rounds} paired runs per loop, ns per fault,"
        f" CPU {CPU}, bpf_jit_enable={jit}, bpf_stats off except for PROG)"
    )
    print(
        f"{'LOOP':<12} {'NONE(ns)':>9} {'ALL(ns)':>9} {'RATIO':>7} {'SLOWDOWN':>9}"
        f" {'PAIRED':>8} {'IQR':>15} {'PROG(ns)':>9} {'NET(ns)':>8} {'NET%':>6}"
    )
    base = prog_ns.get("fresh") or 0.0
    for name, d in res.items():
        off, on = statistics.median(d["none"]), statistics.median(d["all"])
        ratios = [b / a_ - 1 for a_, b in zip(d["none"], d["all"])]
        paired = statistics.median(ratios)
        lo, hi = quartiles(ratios)
        iqr = f"{100 * lo:+.1f}..{100 * hi:+.1f}%"
        prog = prog_ns.get(name) or 0.0
        net = max(prog - base, 0.0)
        print(
            f"{name:<12} {off:9.1f} {on:9.1f} {on / off:7.3f} {100 * (on / off - 1):+8.1f}%"
            f" {100 * paired:+7.1f}% {iqr:>15} {prog:9.1f} {net:8.1f} {100 * net / off:5.1f}%"
        )
    print("\nfloor: an empty program on the same tracepoint (exceptions:page_fault_user)")
    print(f"{'LOOP':<12} {'EMPTY(ns)':>9} {'PAIRED':>8} {'IQR':>15}  {'ALL-EMPTY':>9}")
    for name, d in res.items():
        ratios = [b / a_ - 1 for a_, b in zip(d["none"], d["empty"])]
        lo, hi = quartiles(ratios)
        rest = statistics.median(b / a_ - 1 for a_, b in zip(d["empty"], d["all"]))
        print(
            f"{name:<12} {statistics.median(d['empty']):9.1f} {100 * statistics.median(ratios):+7.1f}%"
            f" {f'{100 * lo:+.1f}..{100 * hi:+.1f}%':>15}  {100 * rest:+8.1f}%"
        )
    print(
        "NONE/ALL: median ns per fault (CPU time of the loop's thread) without/with every\n"
        "probe attached; PAIRED: median slowdown of back-to-back pairs, IQR its quartiles;\n"
        "PROG: the fault-path BPF program's own run time per fault (kernel bpf_stats, which\n"
        "adds two clock reads per run); NET: PROG minus the fresh loop's PROG (a mask test\n"
        "and return: the bpf_stats cost), as % of NONE. EMPTY: an empty program attached\n"
        "instead; ALL-EMPTY: median slowdown of ALL against EMPTY in the same round\n"
        "(ksmtrace's share above the floor)."
    )
    print("\ngoal: <= +5% (PAIRED), per loop")
    for name, d in res.items():
        paired = statistics.median(b / a_ - 1 for a_, b in zip(d["none"], d["all"]))
        floor = statistics.median(b / a_ - 1 for a_, b in zip(d["none"], d["empty"]))
        verdict = "met" if paired <= 0.05 else "NOT met"
        print(
            f"  {name:<12} {100 * paired:+6.2f}%  {verdict:<8} (an empty program alone: {100 * floor:+.1f}%;"
            f" ksmtrace above it: {100 * (paired - floor):+.1f} points)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
