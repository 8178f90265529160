"""ksmtrace faults: copy-on-write faults on merged pages, per process and region."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ksmtrace import inventory
from ksmtrace.commands._common import (
    add_filter_args,
    add_interval_args,
    add_output_args,
    intervals,
    resolve_pids,
)
from ksmtrace.errors import TracingUnavailable
from ksmtrace.kernel import checks, vmstat
from ksmtrace.kernel.proc_events import ProcEvents
from ksmtrace.probes import faults as faults_probe
from ksmtrace.probes import ksmd as ksmd_probe
from ksmtrace.state import FaultsReport, FaultsState
from ksmtrace.views.fmt import emit_json, human_bytes, table

NO_KSM_TRACEPOINTS = (
    "note: this kernel has no ksm:* tracepoints (Linux < 6.4): merges and unmerges per "
    "process are not available; KSM COW faults per process are still exact (page tables), "
    "and cow_ksm is shown machine-wide"
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "faults",
        help="copy-on-write faults on KSM pages, merges and unmerges, per process and region",
        description="Count, per process and per region, the write faults that break a KSM merge "
        "(exactly: the faulting PTE mapped a KSM page), all write-protect faults of mergeable "
        "regions, and ksmd's merges and unmerges. The sum over processes is checked against "
        "/proc/vmstat cow_ksm.",
    )
    add_filter_args(p)
    add_output_args(p)
    p.add_argument("--no-regions", action="store_true", help="per process only (no smaps reads)")
    add_interval_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    checks.require_root("tracing")
    checks.ensure_tracefs()
    if not faults_probe.available():
        raise TracingUnavailable("the exceptions:page_fault_user tracepoint is missing (x86 only)")
    resolve_pids(args)  # checks that -p pids exist and -n names something
    # -n matches comm at every interval: processes started later count too.
    only = set(args.pid) if args.pid else None
    kernel_pid = args.pid[0] if args.pid and len(args.pid) == 1 and not args.name else None
    have_ksmd = ksmd_probe.available()
    if not have_ksmd:
        print(NO_KSM_TRACEPOINTS, file=sys.stderr)

    fp = faults_probe.FaultProbe(pid=kernel_pid)
    kp = ksmd_probe.KsmdProbe(pid=kernel_pid) if have_ksmd else None
    events = ProcEvents()
    try:
        for tgid, ranges in initial_regions(only).items():
            fp.set_regions(tgid, ranges)
        state = FaultsState(time.monotonic())
        # Baseline: counts and cow_ksm read back to back, after every probe is
        # attached, so the first interval compares like with like.
        _update(state, fp, kp, args, only)
        print("Tracing... Ctrl-C to end.", file=sys.stderr if args.json else sys.stdout, flush=True)
        for _ in intervals(args.interval, args.count):
            gone = state.apply_events(events.read())
            rep = _update(state, fp, kp, args, only)
            for tgid, ranges in state.wanted_regions.items():
                fp.set_regions(tgid, ranges)
            if args.json:
                emit_json({"time": time.strftime("%H:%M:%S"), **rep.as_dict()}, lines=True)
            else:
                render(rep, exact=args.bytes, filtered=bool(args.pid or args.name))
            fp.forget(gone)
            if kp:
                kp.forget(gone)
    finally:
        events.close()
        fp.close()
        if kp:
            kp.close()
    return 0


def _update(
    state: FaultsState,
    fp: faults_probe.FaultProbe,
    kp: ksmd_probe.KsmdProbe | None,
    args: argparse.Namespace,
    only: set[int] | None,
) -> FaultsReport:
    fsnap = fp.snapshot()
    cow = vmstat.ksm_vmstat().get("cow_ksm")  # right after the counts it is compared with
    ksnap = kp.snapshot(pages=not args.no_regions) if kp else None
    return state.update(
        fsnap,
        ksnap,
        cow,
        keep=lambda pid, comm: (
            (only is None or pid in only) and (not args.name or comm == args.name or pid in (args.pid or []))
        ),
        regions=not args.no_regions,
    )


def initial_regions(only: set[int] | None) -> dict[int, list[tuple[int, int]]]:
    """Mergeable ranges of processes that opted in before tracing started."""
    out: dict[int, list[tuple[int, int]]] = {}
    for p in inventory.take().processes:
        if only is None or p.pid in only:
            out[p.pid] = [(v.start, v.end) for v in p.regions]
    return out


def _rate(v: float) -> str:
    return f"{v:.0f}" if v >= 10 or v == 0 else f"{v:.1f}"


def _region(start: int, end: int, name: str, mergeable: bool, exact: bool) -> str:
    if not start:
        return name
    size = human_bytes(end - start, exact)
    short = name if len(name) <= 10 else "…" + name[-9:]
    return f"{start:x}+{size} {short}{' mg' if mergeable else ''}"


# Counters that mean something was not counted (or not per region).
_LOSSES = ("proc_drops", "walk_failures", "ksmd_proc_drops", "ksmd_page_drops")


def render(rep: FaultsReport, exact: bool = False, filtered: bool = False) -> None:
    cow = "-" if rep.cow_ksm is None else str(rep.cow_ksm.delta)
    who = "in the processes shown" if filtered else "traced"
    print(
        f"\n{time.strftime('%H:%M:%S')}  KSM COW faults: {rep.ksm_cow_sum} {who}, "
        f"{cow} in /proc/vmstat cow_ksm ({rep.interval:.1f}s)"
    )
    lost = {k: v for k, v in rep.drops.items() if v and k in _LOSSES}
    if lost:
        print("  not counted (maps full or unreadable): " + ", ".join(f"{k}={v}" for k, v in lost.items()))
    if rep.drops.get("merged_drops"):
        print(
            f"  merged-page set full ({rep.drops['merged_drops']} pages): "
            "those processes are checked fault by fault"
        )
    if not rep.processes:
        print("  no mergeable process faulted or merged yet")
        return
    m = rep.merges_available
    rows = []
    for p in rep.processes:
        r = p.rates
        saved = "-" if p.profit_bytes is None else human_bytes(p.profit_bytes, exact)
        rows.append(
            (
                p.pid,
                p.comm[:12],
                "(all)",
                _rate(r["ksm_cow"].per_s),
                _rate(p.wp_mergeable.per_s),
                _rate(r["merges"].per_s) if m else "-",
                _rate(r["unmerges"].per_s) if m else "-",
                r["ksm_cow"].total,
                saved,
            )
        )
        for g in p.regions:
            rr = g.rates
            rows.append(
                (
                    "",
                    "",
                    _region(g.start, g.end, g.name, g.mergeable, exact),
                    _rate(rr["ksm_cow"].per_s),
                    _rate(rr["wp"].per_s) if g.mergeable else "-",
                    _rate(rr["merges"].per_s) if m else "-",
                    _rate(rr["unmerges"].per_s) if m else "-",
                    rr["ksm_cow"].total,
                    "-" if g.ksm_bytes is None else human_bytes(g.ksm_bytes, exact),
                )
            )
    table(
        ("PID", "COMM", "REGION", "KSMCOW/s", "WPMG/s", "MERGE/s", "UNMRG/s", "KSMCOW", "SAVED"),
        rows,
        right=(True, False, False, True, True, True, True, True, True),
    )
