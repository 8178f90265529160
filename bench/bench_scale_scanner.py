"""The estimator at scale: three memory layouts, 256 MiB to 8 GiB scanned.

Layouts, each in two processes holding half of the memory scanned:
  pool    today's bench_scanner layout: half the pages copies of 4096
          contents (runs of 16), the other half unique;
  guests  "guests of one image": every content once in each process, the
          second process's pages a random page-level shuffle of the first's
          (so confirming a duplicate re-reads scattered single pages);
  unique  every page distinct.
Per cell: throughput of ``scan.estimate`` (default workers: one per CPU) as a
ratio of plain single-threaded process_vm_readv copy bandwidth of the same
ranges, measured in the same run (median of interleaved rounds), and the
scanning process's peak RSS growth per scanned page, beyond a fixed part (the
growth of 16 MiB estimates in the same fresh process, less their index:
buffers, threads, Python).
Goals: ratio >= 0.8, <= 64 B/page; and linear cost, both within 20% from the
smallest size to the largest. Each cell's measurement runs in a fresh Python
process, so peaks are its own. CPU time is printed too: on a shared machine
(load average printed) the wall-clock ratios are depressed by others' work.

    .venv/bin/python bench/bench_scale_scanner.py [--sizes 256M,2G,8G] [--layouts pool,guests,unique]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import random
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")
RATIO_GOAL = 0.8
BYTES_PER_PAGE_GOAL = 64
LINEAR_TOLERANCE = 0.2
LAYOUTS = ("pool", "guests", "unique")


def _size(text: str) -> int:
    units = {"M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()]


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _human(n: int) -> str:
    return f"{n >> 30} GiB" if n >= 1 << 30 else f"{n >> 20} MiB"


# ---- the processes holding the memory ------------------------------------


def content_ids(layout: str, pages: int, index: int, seed: int) -> list[int]:
    """Content id of each page of process ``index``: equal ids, equal bytes."""
    own = (index + 1) << 40  # ids no other process uses
    if layout == "unique":
        return list(range(own, own + pages))
    if layout == "guests":
        ids = list(range(pages))
        if index:
            random.Random(seed + index).shuffle(ids)
        return ids
    if layout == "pool":
        rng = random.Random(seed + index)
        ids = list(range(own, own + pages))
        starts = list(range(0, pages, 16))
        rng.shuffle(starts)
        for s in starts[: len(starts) // 2]:
            for p in range(s, min(s + 16, pages)):
                ids[p] = (1 << 50) + rng.randrange(4096)
        return ids
    raise ValueError(layout)


def hold(layout: str, pages: int, index: int, seed: int) -> None:
    """Fill private anonymous memory with the layout, print its address, wait for EOF on stdin."""
    mm = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    template = random.Random(seed).randbytes(PAGE)  # the same in every process of a cell
    ids = content_ids(layout, pages, index, seed)
    chunk = 4096
    for a in range(0, pages, chunk):
        n = min(chunk, pages - a)
        buf = bytearray(template * n)
        for k in range(n):
            # 16 bytes make a page's content; the rest is a random template (never zero).
            struct.pack_into("<QQ", buf, k * PAGE, ids[a + k], ids[a + k] ^ 0x9E3779B97F4A7C15)
        mm[a * PAGE : (a + n) * PAGE] = buf
    print(ctypes.addressof(ctypes.c_char.from_buffer(mm)), flush=True)
    sys.stdin.read()


# ---- one cell's measurement, in a fresh process --------------------------


def _memory() -> tuple[int, int]:
    rss = hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


def measure(regions: list[tuple[int, int, int]], runs: int, confirm_bytes: bool) -> dict[str, Any]:
    from ksmtrace import native, scan

    pids = [pid for pid, _, _ in regions]
    ranges = {pid: [(s, e)] for pid, s, e in regions}
    total = sum(e - s for _, s, e in regions)
    native.copy_bandwidth(regions[0][0], regions[0][1], regions[0][1] + (1 << 20))  # its buffer
    rss0, _ = _memory()
    # The fixed part: the peak of three estimates of 16 MiB of each process (every
    # worker takes batches), less their own index, which is per page.
    small = {pid: [(s, s + (16 << 20))] for pid, s, _ in regions}
    index_small = max(
        scan.estimate(pids, ranges=small, confirm_bytes=confirm_bytes).totals["index_bytes"] for _ in range(3)
    )
    fixed = _memory()[1] - rss0 - index_small
    out: dict[str, Any] = {"copy": [], "copy_cpu": [], "scan": [], "scan_cpu": [], "fixed": fixed}
    est = None
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        got = sum(native.copy_bandwidth(pid, s, e) for pid, s, e in regions)
        out["copy"].append(time.perf_counter() - t0)
        out["copy_cpu"].append(time.process_time() - c0)
        assert got == total
        t0, c0 = time.perf_counter(), time.process_time()
        est = scan.estimate(pids, ranges=ranges, confirm_bytes=confirm_bytes)
        out["scan"].append(time.perf_counter() - t0)
        out["scan_cpu"].append(time.process_time() - c0)
    assert est is not None and est.cost is not None
    out["growth"] = _memory()[1] - rss0
    out["totals"] = est.totals
    out["cost"] = {k: v for k, v in est.cost.__dict__.items()}
    out["workers"] = min(len(os.sched_getaffinity(0)), 4)  # the scanner's default
    return out


# ---- the table -------------------------------------------------------------


def run_cell(layout: str, size: int, runs: int, seed: int, confirm_bytes: bool) -> dict[str, Any]:
    pages = size // PAGE // 2
    holders = [
        subprocess.Popen(
            [sys.executable, __file__, "--hold", layout, str(pages), str(i), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        regions = []
        for h in holders:
            assert h.stdout is not None
            addr = int(h.stdout.readline())
            regions.append((h.pid, addr, addr + pages * PAGE))
        m = subprocess.run(
            [sys.executable, __file__, "--measure", json.dumps(regions), str(runs), str(int(confirm_bytes))],
            capture_output=True,
            text=True,
            check=True,
        )
        res: dict[str, Any] = json.loads(m.stdout)
    finally:
        for h in holders:
            h.kill()
            h.wait()
    pages_scanned = size // PAGE
    res["ratio"] = statistics.median(res["copy"]) / statistics.median(res["scan"])
    res["ratio_best"] = min(res["copy"]) / min(res["scan"])
    # What the ratio would be if every worker had a core of its own: CPU time is
    # not taken by other work on a shared machine the way wall-clock time is.
    res["ratio_cpu"] = statistics.median(res["copy_cpu"]) / (
        statistics.median(res["scan_cpu"]) / res["workers"]
    )
    res["load"] = os.getloadavg()[0]
    res["bpp"] = (res["growth"] - res["fixed"]) / pages_scanned
    res["size"] = size
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--hold":
        hold(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        print(json.dumps(measure(json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256M,2G,8G", help="memory scanned per cell (both processes)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--runs", default="7,5,3", help="interleaved copy/scan rounds per size")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--confirm-bytes", action="store_true", help="confirm duplicates byte by byte (default: 128-bit hash)"
    )
    args = ap.parse_args()
    sizes = [_size(s) for s in args.sizes.split(",")]
    layouts = args.layouts.split(",")
    runs = [int(r) for r in args.runs.split(",")]
    runs += [runs[-1]] * (len(sizes) - len(runs))
    mode = "byte by byte (--confirm-bytes)" if args.confirm_bytes else "by 128-bit hash"
    print(f"duplicates confirmed {mode}; {os.cpu_count()} CPUs; load average at start {_load()}")
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for size, r in zip(sizes, runs):
        for layout in layouts:
            cells[layout, size] = c = run_cell(layout, size, r, args.seed, args.confirm_bytes)
            t = c["totals"]
            ms = {k: statistics.median(c[k]) * 1e3 for k in ("copy", "copy_cpu", "scan", "scan_cpu")}
            print(
                f"  {layout:>6} {_human(size):>7}: copy {ms['copy']:6.0f} ms (cpu {ms['copy_cpu']:5.0f}), "
                f"estimate {ms['scan']:6.0f} ms (cpu {ms['scan_cpu']:5.0f}; over all workers: "
                f"read {t['read_ns'] / 1e6:.0f}, hash {t['hash_ns'] / 1e6:.0f}, "
                f"index {t['index_ns'] / 1e6:.0f}, re-read+compare {t['refetch_ns'] / 1e6:.0f}, "
                f"pagemap {t['map_ns'] / 1e6:.0f})"
            )
            print(
                f"  {'':>15}  re-read {c['cost']['bytes_refetched'] >> 20} MiB, index "
                f"{t['index_bytes'] / 2**20:.1f} MiB, peak RSS growth {c['growth'] / 2**20:.1f} MiB "
                f"(fixed {c['fixed'] / 2**20:.1f}); {len(c['scan'])} rounds, load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    print()
    print("throughput as a ratio of copy bandwidth: wall clock, median (best) of the rounds, and from")
    print("CPU time as if each worker had a core (copy CPU / (estimate CPU / workers)); peak RSS growth")
    goals = f"wall ratio >= {RATIO_GOAL}, <= {BYTES_PER_PAGE_GOAL} B/page"
    print(f"per scanned page beyond the fixed part. Goals: {goals}")
    width = 36
    print(f"{'scanned':>9} | " + " | ".join(f"{lay:^{width}}" for lay in layouts))
    misses = []
    for size in sizes:
        row = []
        for layout in layouts:
            c = cells[layout, size]
            miss = []
            if c["ratio"] < RATIO_GOAL:
                miss.append("ratio")
            if c["bpp"] > BYTES_PER_PAGE_GOAL:
                miss.append("B/page")
            if miss:
                misses.append(
                    f"{layout} {_human(size)}: misses {' and '.join(miss)} (load {c['load']:.2f}; "
                    f"from CPU time {c['ratio_cpu']:.2f})"
                )
            cell = f"{c['ratio']:.2f} ({c['ratio_best']:.2f}) cpu {c['ratio_cpu']:.2f} {c['bpp']:4.1f} B/p"
            row.append(f"{cell}{' MISS' if miss else ''}".ljust(width))
        print(f"{_human(size):>9} | " + " | ".join(row))
    for m in misses:
        print(f"  {m}")
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        for layout in layouts:
            a, b = cells[layout, lo], cells[layout, hi]
            dr = b["ratio"] / a["ratio"] - 1
            dc = b["ratio_cpu"] / a["ratio_cpu"] - 1
            db = (b["bpp"] - a["bpp"]) / max(a["bpp"], 1.0)
            ok = abs(db) <= LINEAR_TOLERANCE and min(abs(dr), abs(dc)) <= LINEAR_TOLERANCE
            print(
                f"{layout:>6}: {_human(lo)} -> {_human(hi)}: throughput {dr:+.0%} wall, {dc:+.0%} from CPU "
                f"time; B/page {db:+.0%} (goal within {LINEAR_TOLERANCE:.0%}: {'linear' if ok else 'MISS'})"
            )
    print(f"load average at end {_load()}")


if __name__ == "__main__":
    main()
