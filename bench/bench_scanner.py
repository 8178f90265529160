"""Scanner throughput against plain process_vm_readv copying, in the same run.

Two workload processes hold private anonymous memory (half duplicate pages,
in runs, shared across the two). The baseline copies exactly those ranges
with process_vm_readv in the scanner's batch size and does nothing else, on
one thread; the scanner reads pagemap, copies, hashes, tells duplicates apart
(by 128-bit hash, or byte by byte with --confirm-bytes) and computes the
estimate, with its default workers (one per CPU, at most 4) and with one.
N runs of each, interleaved; best and median. bench_scale_scanner.py compares
layouts and sizes.

    .venv/bin/python bench/bench_scanner.py [--mib 256] [--runs 9] [--batch PAGES] [--workers N]
                                            [--confirm-bytes]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from ksmtrace import native, scan
from ksmtrace.workload import PAGE, Workload

GOAL = 0.8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="MiB per process (default 256)")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=0, help="pages per batch (0: scanner default)")
    ap.add_argument("--workers", type=int, default=0, help="scanner threads (0: scanner default)")
    ap.add_argument("--confirm-bytes", action="store_true", help="confirm duplicates byte by byte")
    args = ap.parse_args()

    pages = args.mib * 1024 * 1024 // PAGE
    wls = [Workload(comm=f"bench-{i}") for i in range(args.procs)]
    try:
        regions = []
        for i, wl in enumerate(wls):
            r = wl.call(
                "alloc", name="m", pages=pages, kind="mix", fraction=args.fraction, run=16, pool=4096, seed=i
            )
            regions.append((wl.pid, r["addr"], r["addr"] + r["len"]))
        total = sum(e - s for _, s, e in regions)
        mps, uzp = scan.kernel_rules()
        last: dict[str, int] = {}
        workers = 0

        def timed(fn: Callable[[], None]) -> tuple[float, float]:
            # process_time: CPU of every thread of this process, in ns resolution.
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            return time.perf_counter() - t0, time.process_time() - c0

        def copy() -> None:
            n = sum(native.copy_bandwidth(pid, s, e, args.batch) for pid, s, e in regions)
            assert n == total

        def scanner(nworkers: int) -> Callable[[], None]:
            def run() -> None:
                nonlocal last, workers
                sc = native.Scanner(mps, uzp, args.batch, nworkers, args.confirm_bytes)
                for pid, s, e in regions:
                    idx = sc.add_region(pid, s, e, check_ksm=False)
                    sc.scan(idx, s, e)
                _, _, last = sc.finish(len(regions))
                workers = max(workers, sc.workers)

            return run

        def whole() -> None:
            scan.estimate(
                [w.pid for w in wls],
                ranges={pid: [(s, e)] for pid, s, e in regions},
                confirm_bytes=args.confirm_bytes,
            )

        # The default scanner last of the two: its totals are the ones printed.
        kinds = {"copy": copy, "scan1": scanner(1), "scan": scanner(args.workers), "whole": whole}
        wall: dict[str, list[float]] = {k: [] for k in kinds}
        cpu: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.runs):
            for k, fn in kinds.items():
                el, c = timed(fn)
                wall[k].append(el)
                cpu[k].append(c)
        best = {k: min(v) for k, v in wall.items()}
        med = {k: statistics.median(v) for k, v in wall.items()}
        gb = total / 1e9

        def row(label: str, k: str) -> str:
            return (
                f"{label:<24}: {gb / best[k]:6.2f} GB/s {best[k] * 1000:6.1f} ms"
                f"   {gb / med[k]:6.2f} GB/s {med[k] * 1000:6.1f} ms"
            )

        r_best, r_med = best["copy"] / best["scan"], med["copy"] / med["scan"]
        verdict = (
            "met" if r_med >= GOAL else "met by the best run, not the median" if r_best >= GOAL else "not met"
        )
        ccopy, cscan, cscan1 = (statistics.median(cpu[k]) for k in ("copy", "scan", "scan1"))
        print(
            f"memory scanned: {args.procs} processes x {args.mib} MiB, {args.fraction:.0%} duplicates; "
            f"{args.runs} interleaved runs; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
        )
        print(f"{'':<24}  {'best':>20}   {'median':>20}")
        print(row("process_vm_readv copy", "copy"))
        print(row(f"scanner, {workers} worker{'s' if workers > 1 else ''}", "scan"))
        print(row("scanner, 1 worker", "scan1"))
        print(row("scan.estimate (+smaps)", "whole"))
        print(
            f"ratio scanner / copy    : {r_best:.2f} best, {r_med:.2f} median "
            f"(wall clock; goal >= {GOAL}: {verdict})"
        )
        print(
            f"CPU time copy / scan    : {ccopy * 1000:.0f} ms / {cscan * 1000:.0f} ms, median, ratio "
            f"{ccopy / cscan:.2f} ({cscan1 * 1000:.0f} ms, ratio {ccopy / cscan1:.2f} with 1 worker)"
        )
        print(
            f"last scan               : saved {last['saved']} pages of {last['present']}, "
            f"index {last['index_bytes'] / 2**20:.1f} MiB"
        )
        print(
            f"  its time, all workers : read {last['read_ns'] / 1e6:.0f} ms, "
            f"hash {last['hash_ns'] / 1e6:.0f} ms, "
            f"index {last['index_ns'] / 1e6:.0f} ms, re-read+compare {last['refetch_ns'] / 1e6:.0f} ms, "
            f"pagemap {last['map_ns'] / 1e6:.0f} ms"
        )
    finally:
        for wl in wls:
            wl.close()


if __name__ == "__main__":
    main()
