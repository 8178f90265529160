"""ksmtrace ksmd: what ksmd does per interval and what it costs."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ksmtrace.commands._common import add_interval_args, intervals
from ksmtrace.errors import ProcessGone
from ksmtrace.kernel import checks, ksm_sysfs
from ksmtrace.ksmd_state import KsmdInterval, KsmdSample, KsmdState, cpu_ticks, find_ksmd
from ksmtrace.probes import ksmd as ksmd_probe
from ksmtrace.views.fmt import emit_json, table

NO_KSM_TRACEPOINTS = (
    "note: this kernel has no ksm:* tracepoints (Linux < 6.4): rounds come from "
    "full_scans, merges only as the net change of pages_sharing"
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ksmd",
        help="ksmd scan rounds, pages scanned, merges, and its CPU share",
        description="Per interval: completed scan rounds and their duration, rmap entries, "
        "pages scanned/s, merges and unmerges/s (ksm:* tracepoints), the ksm advisor's "
        "last decision, and ksmd's CPU share from /proc/PID/stat.",
    )
    p.add_argument("-j", "--json", action="store_true", help="JSON lines")
    add_interval_args(p)
    p.set_defaults(run=run)


def _sample(kp: ksmd_probe.KsmdProbe | None, ksmd_pid: int | None) -> KsmdSample:
    s = ksm_sysfs.read()
    ticks = None
    if ksmd_pid is not None:
        try:
            ticks = cpu_ticks(ksmd_pid)
        except OSError:
            ticks = None
    scanned = s.get("pages_scanned")
    return KsmdSample(
        t=time.monotonic(),
        full_scans=int(s.get("full_scans") or 0),
        pages_scanned=int(scanned) if isinstance(scanned, int) else None,
        pages_sharing=int(s.get("pages_sharing") or 0),
        pages_shared=int(s.get("pages_shared") or 0),
        cpu_ticks=ticks,
        probe=kp.snapshot(pages=False) if kp else None,
    )


def run(args: argparse.Namespace) -> int:
    checks.require_root("tracing")
    ksm_sysfs.require_ksm()
    ksmd_pid = find_ksmd()
    if ksmd_pid is None:
        raise ProcessGone(0, "no ksmd kernel thread found")
    kp = None
    if ksmd_probe.available():
        kp = ksmd_probe.KsmdProbe()
    else:
        print(NO_KSM_TRACEPOINTS, file=sys.stderr)
    state = KsmdState(_sample(kp, ksmd_pid))
    out = sys.stderr if args.json else sys.stdout
    print("Tracing... Ctrl-C to end.", file=out, flush=True)
    header_every = 20
    try:
        for n, _ in enumerate(intervals(args.interval, args.count)):
            iv = state.update(_sample(kp, ksmd_pid))
            if args.json:
                emit_json({"time": time.strftime("%H:%M:%S"), **iv.as_dict()}, lines=True)
            else:
                render(iv, header=n % header_every == 0)
    finally:
        if kp:
            kp.close()
    return 0


def _f(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(iv: KsmdInterval, header: bool = True) -> None:
    adv = "-"
    if iv.advisor_pages_to_scan is not None:
        adv = f"{iv.advisor_pages_to_scan}pg/{iv.advisor_cpu_pct}%"
    row = (
        time.strftime("%H:%M:%S"),
        iv.rounds,
        _f(iv.round_ms_avg, "{:.1f}"),
        _f(iv.round_ms_max, "{:.1f}"),
        _f(iv.rmap_entries),
        _f(iv.pages_scanned_per_s),
        _f(iv.merges_per_s),
        _f(iv.unmerges_per_s),
        f"{iv.sharing_delta:+d}",
        _f(iv.cpu_pct, "{:.1f}"),
        adv,
    )
    headers = (
        "TIME", "ROUNDS", "ROUND(ms)", "MAX(ms)", "RMAP", "SCAN/s", "MERGE/s", "UNMRG/s",
        "SHARING", "CPU%", "ADVISOR",
    )  # fmt: skip
    widths = (8, 6, 9, 9, 8, 9, 8, 8, 8, 5, 12)
    if header:
        print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    _ = table  # tables of this command are a time series: one line per interval
