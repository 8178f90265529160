"""/metrics with 1,000 processes: time to render, through the daemon's HTTP server, and the series bound.

The processes are a real recorded Snapshot (tests/fixtures/snapshots/
board/board2.json: the Sampler's record of workloads breaking merges) multiplied
to 1,000 processes with their own pids, names and numbers, recorded into a
real Board as the daemon's loop does. For each board, ``exposition()`` runs
``--calls`` times (median, p99), then /metrics is fetched as many times
from ksmtrace.live.server on loopback (Board.read, rendering and HTTP
included). The baseline, measured in the same run, is an empty board.

Goal (issue #12): /metrics with 1,000 processes answers in under 50 ms and
never has more series than views.metrics.max_series(top_n). No root needed:
``.venv/bin/python bench/bench_metrics.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ksmtrace.live.board import Board  # noqa: E402
from ksmtrace.live.server import Server  # noqa: E402
from ksmtrace.model import codec  # noqa: E402
from ksmtrace.model.faults import ProcessRow  # noqa: E402
from ksmtrace.model.rates import Rate  # noqa: E402
from ksmtrace.model.snapshot import Snapshot  # noqa: E402
from ksmtrace.views import metrics  # noqa: E402

RECORDED = ROOT / "tests" / "fixtures" / "snapshots" / "board" / "board2.json"
GOAL_MS = 50.0


def recorded() -> Snapshot:
    return codec.decode(Snapshot, json.loads(RECORDED.read_text()))


def multiplied(snap: Snapshot, n: int, seed: int = 1) -> Snapshot:
    """The recorded snapshot with ``n`` processes made from its own rows."""
    assert snap.faults is not None
    rng = random.Random(seed)
    base = snap.faults.processes
    rows: list[ProcessRow] = []
    for i in range(n):
        p = base[i % len(base)]
        cow = rng.choice([0, 0, rng.randrange(1, 5000)])
        rates = dict(p.rates)
        rates["ksm_cow"] = Rate(cow, cow / snap.faults.interval, rng.randrange(cow, cow + 1_000_000))
        rows.append(
            replace(
                p,
                pid=100_000 + i,
                comm=f"{p.comm}-{i}",
                rates=rates,
                profit_bytes=rng.randrange(-4096, 64 << 20),
                merging_pages=rng.randrange(0, 16384),
            )
        )
    return replace(snap, faults=replace(snap.faults, processes=rows))


def board(snap: Snapshot | None, top_n: int) -> Board:
    b = Board(top_n=top_n, mode="observe")
    if snap is not None:
        b.record(snap)
    return b


def timed(fn: Callable[[], object], calls: int) -> list[float]:
    fn()  # the first call pays for imports
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def p99(ms: list[float]) -> float:
    return sorted(ms)[max(0, int(len(ms) * 0.99) - 1)]


def series(body: bytes) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--processes", type=int, default=1000)
    ap.add_argument(
        "--url", help="also time a running daemon's /metrics (e.g. http://127.0.0.1:9477/metrics)"
    )
    args = ap.parse_args()
    n = args.processes
    snap = recorded()
    cases = [
        ("empty board (baseline)", None, 10),
        (f"recorded ({len(snap.faults.processes) if snap.faults else 0} processes)", snap, 10),
        (f"{n} processes, top_n 10", multiplied(snap, n), 10),
        (f"{n} processes, top_n 100", multiplied(snap, n), 100),
        (f"{n} processes, top_n 1000", multiplied(snap, n), 1000),
    ]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# {time.strftime('%Y-%m-%d')}, Linux {platform.release()}, {os.cpu_count()} cores, load {load}")
    print(f"# {args.calls} calls each; goal: {n} processes under {GOAL_MS:.0f} ms, series <= the bound")
    print()
    print(f"{'BOARD':<28} {'PATH':<9} {'MEDIAN ms':>9} {'P99 ms':>8} {'SERIES':>6} {'BOUND':>6} {'BYTES':>7}")
    base_ms = None
    verdicts = []
    for name, s, top_n in cases:
        b = board(s, top_n)
        state = b.read()
        body = metrics.exposition(state)[0]
        count, bound = series(body), metrics.max_series(top_n)
        gen = timed(lambda st=state: metrics.exposition(st), args.calls)
        srv = Server(b, "127.0.0.1", 0)
        try:
            url = f"{srv.url}metrics"
            assert http_get(url) == metrics.exposition(b.read())[0]
            web = timed(lambda u=url: http_get(u), args.calls)
        finally:
            srv.close()
        for path, ms in (("generate", gen), ("http", web)):
            med = statistics.median(ms)
            print(
                f"{name:<28} {path:<9} {med:9.2f} {p99(ms):8.2f} {count:6d} {bound:6d} {len(body):7d}",
                flush=True,
            )
        if base_ms is None:
            base_ms = (statistics.median(gen), statistics.median(web))
        if name.endswith("top_n 10") and s is not None and s.faults and len(s.faults.processes) == n:
            verdicts.append((gen, web, count, bound, base_ms))
        assert count <= bound, f"{name}: {count} series > bound {bound}"
    if args.url:
        body = http_get(args.url)
        live = timed(lambda: http_get(args.url), args.calls)
        print(
            f"{'running daemon':<28} {'http':<9} {statistics.median(live):9.2f} {p99(live):8.2f} "
            f"{series(body):6d} {'':>6} {len(body):7d}"
        )
    print()
    for gen, web, count, bound, (bgen, bweb) in verdicts:
        ok = "met" if p99(web) < GOAL_MS and count <= bound else "NOT met"
        for path, ms, base in (("generate", gen, bgen), ("through HTTP", web, bweb)):
            med = statistics.median(ms)
            print(
                f"{n} processes (top_n 10), {path}: median {med:.2f} ms, p99 {p99(ms):.2f} ms "
                f"({med / base:.1f}x the empty board's {base:.2f} ms)"
            )
        print(f"{count} series, bound {bound}; goal (p99 through HTTP < {GOAL_MS:.0f} ms, bound kept): {ok}")


if __name__ == "__main__":
    main()
