#!/usr/bin/env python3
"""The daemon's memory and CPU with the web page open, and its JSON API's response times (issue #12).

``ksmtrace daemon`` (observe mode, as ``ksmtrace daemon`` alone runs) serves
the page on loopback while workload processes keep breaking merges (a write
to their merged pages every 0.3 s, ksmd merging them again), so that every
chart and the table have live data. Three phases of ``--seconds`` each:

  idle        no page open
  page open   headless Chromium (tests/chromium.py) shows the page, which
              polls /api/state, /api/history and /api/decisions every 1.5 s
  idle again  page closed: what stays of it

Sampled every second: the daemon's VmRSS; at each phase's end its VmHWM, its
CPU time over the phase, and the history's length (the daemon keeps 600
points, one a second: RSS grows with it over the first ten minutes whatever
the page does, which the "idle again" phase tells apart). Then, page closed,
50 sequential GETs of each endpoint (median, p95, max) and, in-process, the
cost of /api/history at its bound (600 points x 20 processes). The page's own
view of its fetches comes from the browser's Resource Timing entries.

Run as root: ``.venv/bin/python bench/bench_web.py [--seconds 60]
[--out docs/examples/bench_web.txt] [--screenshot docs/examples/web.png]``.
Holds /run/lock/ksmtrace-tests.lock (the tests' ``ksm`` fixture lock) throughout
and restores the KSM knobs at the end.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ksmtrace.kernel import ksm_sysfs  # noqa: E402
from ksmtrace.live.board import BoardState, Point, ProcPoint  # noqa: E402
from ksmtrace.views import api, dash  # noqa: E402
from ksmtrace.workload import Workload  # noqa: E402
from tests.chromium import Chromium  # noqa: E402
from tests.webscene import Churn, Daemon  # noqa: E402

LOCK = (
    Path("/run/lock/ksmtrace-tests.lock") if Path("/run/lock").is_dir() else Path("/tmp/ksmtrace-tests.lock")
)
PAGES = 1024
# Names that say what each workload does: it writes every page, every other page, every fourth.
WORKLOADS = (("churn-all", 1), ("churn-half", 2), ("churn-quarter", 4))
ENDPOINTS = ("api/state", "api/history", "api/decisions", "metrics", "", "static/app.js")


def status_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def phase(name: str, seconds: float, pid: int, url: str) -> dict[str, Any]:
    """Sample the daemon's RSS each second for ``seconds``; its CPU over the phase."""
    c0, t0 = cpu_s(pid), time.monotonic()
    rss = []
    while time.monotonic() - t0 < seconds:
        rss.append(status_kib(pid)["VmRSS"])
        time.sleep(1.0)
    cpu = (cpu_s(pid) - c0) / (time.monotonic() - t0) * 100
    hwm = status_kib(pid)["VmHWM"]
    # Read after the phase's numbers: rendering the history is not free (see history_at_bound).
    points = len(json.loads(get(url + "api/history"))["points"])
    return {"name": name, "seconds": seconds, "rss": rss, "hwm": hwm, "cpu_pct": cpu, "points": points}


def api_times(url: str, n: int = 50) -> list[tuple[str, int, float, float, float]]:
    rows = []
    for ep in ENDPOINTS:
        times, size = [], 0
        try:
            for _ in range(n):
                t = time.perf_counter()
                size = len(get(url + ep))
                times.append((time.perf_counter() - t) * 1000)
        except urllib.error.HTTPError as exc:  # e.g. /metrics before views/metrics.py exists
            rows.append((f"/{ep} (HTTP {exc.code})", 0, float("nan"), float("nan"), float("nan")))
            continue
        rows.append(("/" + ep, size, statistics.median(times), pct(times, 0.95), max(times)))
    return rows


def history_at_bound(url: str, points: int = 600, procs: int = 20) -> tuple[int, float]:
    """Bytes and render time (median of 20) of /api/history holding ``points``
    points of ``procs`` processes each, built from the daemon's last point."""
    last = json.loads(get(url + "api/history"))["points"][-1]
    machine = dash.MachineRow(**last["machine"])
    sample = next(iter(last["procs"].values()), None) or {
        "comm": "x",
        "ksm_cow_per_s": 1.0,
        "merges_per_s": 1.0,
        "unmerges_per_s": 1.0,
        "profit_bytes": 4096,
    }
    history = [
        Point(machine.wall - points + i, machine, {10_000 + j: ProcPoint(**sample) for j in range(procs)})
        for i in range(points)
    ]
    state = BoardState(None, machine, [], history, {}, {}, [], procs, "observe")
    times = []
    body = b""
    for _ in range(20):
        t = time.perf_counter()
        body = json.dumps(api.history(state), separators=(",", ":")).encode()
        times.append((time.perf_counter() - t) * 1000)
    return len(body), statistics.median(times)


def page_phase(
    tmp: Path, url: str, seconds: float, pid: int, shot: Path | None
) -> tuple[dict[str, Any], list[Any]]:
    with Chromium(tmp / "profile", width=1400, height=1000) as page:
        page.navigate(url)
        page.wait("window.ksmtrace && window.ksmtrace.updates >= 1", 60, "the page's first update")
        page.evaluate("performance.setResourceTimingBufferSize(100000), true")
        result = phase("page open", seconds, pid, url)
        if shot is not None:
            page.screenshot(shot)
        fetches = page.evaluate(
            "performance.getEntriesByType('resource').filter(e => e.name.includes('/api/'))"
            ".map(e => [e.name.split('/api/')[1].split('?')[0], e.duration, e.encodedBodySize])"
        )
        result["updates"] = page.evaluate("window.ksmtrace.updates")
        result["problems"] = page.problems()
    return result, fetches


def report(
    args: argparse.Namespace, phases: list[dict[str, Any]], fetches: list[Any], api_rows, bound
) -> str:  # type: ignore[no-untyped-def]
    mib = 1024.0
    lines = [
        f"ksmtrace daemon with the web page open (bench/bench_web.py, {time.strftime('%Y-%m-%d')}, "
        f"Linux {platform.release()}, {os.cpu_count()} CPUs)",
        f"workload: {len(WORKLOADS)} processes x {PAGES} pages of duplicates, writing every 1st/2nd/4th page "
        "every 0.3 s (KSM COW faults and merges never stop); ksmd pages_to_scan 2000, sleep 20 ms; "
        "daemon in observe mode, one sample a second",
        "",
        f"{'phase':<12} {'s':>4} {'VmRSS MiB start/median/end':>28} {'VmHWM MiB':>10} "
        f"{'daemon CPU %':>13} {'history points':>15}",
    ]
    for p in phases:
        r = p["rss"]
        rss = f"{r[0] / mib:.1f} / {statistics.median(r) / mib:.1f} / {r[-1] / mib:.1f}"
        lines.append(
            f"{p['name']:<12} {p['seconds']:>4.0f} {rss:>28} {p['hwm'] / mib:>10.1f} "
            f"{p['cpu_pct']:>13.2f} {p['points']:>15}"
        )
    idle, page, again = phases

    def med(p: dict[str, Any]) -> float:
        return statistics.median(p["rss"])

    lines += [
        "",
        f"page open vs idle: VmRSS median {med(page) - med(idle):+.0f} KiB, "
        f"daemon CPU {page['cpu_pct'] - idle['cpu_pct']:+.2f} points of a core; "
        f"page closed again vs page open: VmRSS median {med(again) - med(page):+.0f} KiB",
        f"page: {page['updates']} updates in {page['seconds']:.0f} s (every 1.5 s: 3 fetches each), "
        f"JavaScript problems: {len(page['problems'])}",
        "",
        "the page's fetches as the browser timed them (Resource Timing):",
        f"{'endpoint':<16} {'n':>5} {'bytes (last)':>13} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}",
    ]
    by: dict[str, list[Any]] = {}
    for name, dur, size in fetches:
        by.setdefault(name, []).append((dur, size))
    for name in sorted(by):
        ds = [d for d, _ in by[name]]
        lines.append(
            f"{'/api/' + name:<16} {len(ds):>5} {by[name][-1][1]:>13} {statistics.median(ds):>10.2f} "
            f"{pct(ds, 0.95):>8.2f} {max(ds):>8.2f}"
        )
    lines += [
        "",
        f"API response times, page closed ({args.requests} sequential GETs each over loopback, "
        f"history of {again['points']} points):",
        f"{'endpoint':<16} {'bytes':>9} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}",
    ]
    for ep, size, med, p95, mx in api_rows:
        lines.append(f"{ep:<16} {size:>9} {med:>10.2f} {p95:>8.2f} {mx:>8.2f}")
    size, ms = bound
    lines += [
        "",
        f"/api/history at its bound (600 points x 20 processes), rendered in-process: "
        f"{size / 1024:.0f} KiB, {ms:.1f} ms (median of 20)",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each phase (default 60)")
    ap.add_argument("--requests", type=int, default=50, help="GETs per endpoint for the response times")
    ap.add_argument("--out", type=Path, help="also write the report here")
    ap.add_argument("--screenshot", type=Path, help="save the page as PNG at the end of the page phase")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_web: run as root (the daemon loads BPF programs)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmpdir, LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # no test or bench moves ksmd meanwhile
        tmp = Path(tmpdir)
        saved = ksm_sysfs.SavedSettings()
        workloads: list[Workload] = []
        churn = daemon = None
        try:
            for k, v in {"pages_to_scan": 2000, "sleep_millisecs": 20, "run": 1}.items():
                ksm_sysfs.write(k, v)
            # The daemon first: it sees the workloads opt in (the table's HOW column).
            daemon = Daemon(tmp)
            url = daemon.url()
            for comm, _ in WORKLOADS:
                w = Workload(comm=comm)
                workloads.append(w)
                w.call("alloc", name="r", pages=PAGES, kind="dup", seed=3)
                w.call("madvise", name="r")
            churn = Churn(workloads, steps=[s for _, s in WORKLOADS])
            time.sleep(3)  # a few points of history before the first phase
            phases = [phase("idle", args.seconds, daemon.pid, url)]
            page, fetches = page_phase(tmp, url, args.seconds, daemon.pid, args.screenshot)
            phases.append(page)
            phases.append(phase("idle again", args.seconds, daemon.pid, url))
            rows = api_times(url, args.requests)
            bound = history_at_bound(url)
        finally:
            if churn:
                churn.stop()
            if daemon:
                daemon.stop()
            for w in workloads:
                w.close()
            ksm_sysfs.write("run", 2)
            ksm_sysfs.write("run", 0)
            saved.restore()
    text = report(args, phases, fetches, rows, bound)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
