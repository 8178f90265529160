#!/usr/bin/env python3
"""The fault-path probes of another git revision against this tree's, in one run.

Wall-clock or CPU-time figures of runs minutes apart on a shared machine
differ by more than the change being measured; this loads both versions of
bpf/faults.bpf.c (with the matching ksmtrace/probes/faults.py) and alternates
none / REF / this tree in every round, on the loops of bench_probe_overhead.py.
Only the fault probes (every program of bpf/faults.bpf.c) are attached.

Usage: .venv/bin/python bench/ab_fault_probes.py [--ref e7ffb13] [--rounds N]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_probe_overhead as bench  # noqa: E402

from ksmtrace.probes import faults as this_faults  # noqa: E402
from ksmtrace.probes import loader  # noqa: E402


def _show(ref: str, path: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{ref}:{path}"], capture_output=True, text=True, check=True
    ).stdout


def load_ref(ref: str, tmp: Path) -> object:
    """A FaultProbe built from REF's faults.py and bpf/ sources."""
    bpf = tmp / "bpf"
    bpf.mkdir()
    for name in ("faults.bpf.c", "faults.h", "kaddr.bpf.c", "kaddr.h"):
        (bpf / name).write_text(_show(ref, f"bpf/{name}"))
    mod_path = tmp / "ref_faults.py"
    mod_path.write_text(_show(ref, "ksmtrace/probes/faults.py"))
    spec = importlib.util.spec_from_file_location("ref_faults", mod_path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ref_faults"] = mod
    spec.loader.exec_module(mod)
    orig = loader.bpf_dir
    loader.bpf_dir = lambda: bpf  # type: ignore[assignment]
    try:
        return mod.FaultProbe()
    finally:
        loader.bpf_dir = orig  # type: ignore[assignment]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="e7ffb13", help="git revision to compare with (default e7ffb13)")
    ap.add_argument("--rounds", type=int, default=8)
    a = ap.parse_args()
    pages, reps = 16384, 6
    cases = bench.loop_cases(pages, reps)
    prog: dict[tuple[str, str], float | None] = {}
    with tempfile.TemporaryDirectory() as td:
        probes = {
            "ref": bench.Attachable([load_ref(a.ref, Path(td))]),
            "this": bench.Attachable([this_faults.FaultProbe()]),
        }
        exe = bench.build(Path(td))
        try:
            with bench.quiet_ksm():
                res = bench.paired_rounds(exe, cases, {"none": bench.Attachable([]), **probes}, a.rounds)
                for s, group in probes.items():
                    group.attach()
                    for name, args in cases.items():
                        prog[(s, name)] = bench.program_ns(exe, args)
                    group.detach()
        finally:
            for group in probes.values():
                for p in group.probes:
                    p.close()
    print(f"\nfault probes of {a.ref} (REF) and of this tree (THIS), {a.rounds} rounds, CPU {bench.CPU}")
    print(
        f"{'LOOP':<12} {'NONE(ns)':>9} {'REF':>8} {'IQR':>15} {'THIS':>8} {'IQR':>15}"
        f" {'PROG REF':>9} {'THIS':>6}"
    )
    for name, d in res.items():
        row = f"{name:<12} {statistics.median(d['none']):9.1f}"
        for s in ("ref", "this"):
            rt = [b / a_ - 1 for a_, b in zip(d["none"], d[s])]
            lo, hi = bench.quartiles(rt)
            row += f" {100 * statistics.median(rt):+7.1f}% {f'{100 * lo:+.1f}..{100 * hi:+.1f}%':>15}"
        row += f" {prog[('ref', name)] or 0:9.1f} {prog[('this', name)] or 0:6.1f}"
        print(row)
    print(
        "NONE: median ns per fault (CPU time of the loop's thread) with no probe; REF, THIS:\n"
        "median slowdown of paired runs, IQR its quartiles; PROG: the fault program's run\n"
        "time per fault from bpf_stats (which adds ~50 ns of clock reads)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
