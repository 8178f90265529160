"""What a second look costs the daemon, and what the soft-dirty check costs the target.

A target (bench/relook_target.c, compiled here) holds MIB of private
anonymous memory, a tenth duplicate pages in runs, the rest unique. The
daemon's own code path (ksmtrace.coordinator.relook.RelookGate, as
Daemon._look calls it) is run in this process and timed by this process's
CPU clock (all threads: the scanner's workers and the kernel's work on our
behalf):

(a) first look: clear soft-dirty bits, scan and hash every page, choose runs;
    second look on unchanged memory: the gate's check (maps + 8 bytes of
    pagemap per page read). Goal: the second at most a tenth of the first.
(b) second look after 1% of the pages were written: check, then rescan.
(c) the target's side: its time to write every page once, after clear_refs
    (each first write is a write-protect minor fault) and without, measured
    by the target itself (its CPU clock, wall clock and minor faults).

Where the kernel lacks soft-dirty bits (features.FEATURES["soft_dirty"],
CONFIG_MEM_SOFT_DIRTY) the gate is off and every look rescans: (a) then
times the check's reads alone (what a skipped look would cost) and says the
daemon cannot skip here; (c) shows no extra faults (clear_refs 4 is a no-op).

    .venv/bin/python bench/bench_relook.py [--mib 256] [--rounds 5]

Takes /run/lock/ksmtrace-tests.lock like the tests' ksm fixture: another
checkout's system tests must not share the CPUs with the timed part.
"""

from __future__ import annotations

import argparse
import fcntl
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ksmtrace.coordinator import worth
from ksmtrace.coordinator.policy import Runs
from ksmtrace.coordinator.relook import RelookGate
from ksmtrace.kernel import features, pagemap
from ksmtrace.kernel.procfs import ProcFS

ROOT = Path(__file__).resolve().parents[1]
LOCK = (
    Path("/run/lock/ksmtrace-tests.lock") if Path("/run/lock").is_dir() else Path("/tmp/ksmtrace-tests.lock")
)
GOAL = 0.1


class Target:
    def __init__(self, exe: Path, mib: int) -> None:
        self.proc = subprocess.Popen(
            [str(exe), str(mib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout
        addr, length = self.proc.stdout.readline().split()
        self.pid = self.proc.pid
        self.range = (int(addr), int(addr) + int(length))

    def write(self, step: int) -> tuple[int, int, int, int]:
        """Pages written, wall ns, CPU ns, minor faults: the target's own numbers."""
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"w {step}\n")
        self.proc.stdin.flush()
        n, wall, cpu, flt = (int(x) for x in self.proc.stdout.readline().split())
        return n, wall, cpu, flt

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.write("q\n")
        self.proc.stdin.close()
        self.proc.wait()


def cpu(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp, LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        exe = Path(tmp) / "relook_target"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "bench" / "relook_target.c")], check=True)
        t = Target(exe, args.mib)
        try:
            run(t, args)
        finally:
            t.close()


def run(t: Target, args: argparse.Namespace) -> None:
    proc = ProcFS()
    rules = Runs()
    have = features.available("soft_dirty")
    gate = RelookGate("soft-dirty", proc)
    pages = (t.range[1] - t.range[0]) // 4096
    print(f"target: {args.mib} MiB ({pages} pages), a tenth duplicate in runs of 16; pid {t.pid}")
    print(f"soft-dirty bits: {'yes' if have else 'NO: ' + features.lacks('soft_dirty')}")
    scanned: list[tuple[int, int]] = []

    def first_look() -> object:
        # Daemon._look for one due candidate: gate.scan clears and scans, then choose and note.
        est = gate.scan({t.pid}, {}, [], rules.max_gap_pages)
        chosen = worth.choose(est, t.pid, rules)
        gate.after_scan(t.pid, est, chosen.ranges)
        scanned[:] = [(r.start, r.end) for p in est.processes for r in p.regions if r.pid == t.pid]
        return chosen

    def check() -> object:
        # With soft-dirty: the gate's own check. Without: the same reads (the gate is off).
        if gate.on:
            return gate.unchanged(t.pid)
        proc.map_spans(t.pid)
        return pagemap.soft_dirty_pages(t.pid, scanned)

    firsts, seconds, skips, dirtied, clears = [], [], [], [], []
    for _ in range(args.rounds):
        c1, chosen = cpu(first_look)
        c2, got = cpu(check)
        firsts.append(c1)
        seconds.append(c2)
        skips.append(gate.on and got is not None)
        # (b) 1% of pages written: the check finds them and the look rescans.
        t.write(100)
        cb, _ = cpu(lambda: (check(), first_look()))
        dirtied.append((cb, gate.last_dirty.get(t.pid, 0)))
        cc, _ = cpu(lambda: pagemap.clear_soft_dirty(t.pid))
        clears.append(cc)
    f, s = statistics.median(firsts), statistics.median(seconds)
    ratio = s / f
    n_ranges = len(chosen.ranges)  # type: ignore[attr-defined]
    print(
        f"\n(a) first look (clear + scan + choose, {n_ranges} ranges chosen): {f * 1000:8.1f} ms CPU "
        f"(median of {args.rounds})"
    )
    print(f"    second look, memory unchanged:                  {s * 1000:8.1f} ms CPU")
    print(f"    ratio second/first: {ratio:.3f} (goal <= {GOAL}): {'PASS' if ratio <= GOAL else 'MISS'}")
    if have:
        print(
            f"    the gate said unchanged (scan skipped) in {sum(skips)} of {args.rounds} rounds: "
            f"{'PASS' if all(skips) else 'MISS'}"
        )
    else:
        print("    the ratio is the check's reads alone: without soft-dirty bits the daemon cannot skip")
        print("    and rescans every look (second look = first look here): MISS on this kernel")
    b = statistics.median(c for c, _ in dirtied)
    print(
        f"\n(b) second look after 1% of pages written ({pages // 100} pages): {b * 1000:8.1f} ms CPU, "
        f"{b / f:.2f} of the first look (it rescans everything; soft-dirty pages seen: {dirtied[-1][1]})"
    )
    print(f"    clear_refs alone (part of every scanned look): {statistics.median(clears) * 1000:.2f} ms CPU")

    # (c) the target's side, rounds interleaved: all pages written once, without and after a clear.
    plain, cleared = [], []
    for _ in range(args.rounds):
        plain.append(t.write(1))
        pagemap.clear_soft_dirty(t.pid)
        cleared.append(t.write(1))

    def per_page(rows: list[tuple[int, int, int, int]], i: int) -> float:
        return statistics.median(r[i] / r[0] for r in rows)

    print(f"\n(c) target writes every page once ({pages} pages, median of {args.rounds}):")
    print(f"    {'':18s} {'wall ns/page':>13s} {'CPU ns/page':>12s} {'minflt/page':>12s}")
    for name, rows in (("no clear_refs", plain), ("after clear_refs", cleared)):
        print(f"    {name:18s} {per_page(rows, 1):13.1f} {per_page(rows, 2):12.1f} {per_page(rows, 3):12.3f}")
    extra = per_page(cleared, 2) - per_page(plain, 2)
    print(
        f"    cost to the target: {extra:+.1f} ns CPU per page written first after a look "
        f"({extra * pages / 1e6:+.1f} ms if it rewrites all {args.mib} MiB each interval)"
    )


if __name__ == "__main__":
    main()
