"""ksmtrace faults: copy-on-write faults on merged pages, per process and region."""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

from ksmtrace.commands._common import (
    add_filter_args,
    add_interval_args,
    add_output_args,
    check_interval,
    clock,
    intervals,
    resolve_pids,
)
from ksmtrace.coordinator.ranges import RangeBook
from ksmtrace.errors import AccessDenied, ProcessGone, TracingUnavailable
from ksmtrace.kernel import checks, vmstat
from ksmtrace.kernel.proc_events import ProcEvents
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.model import snapshot
from ksmtrace.model.faults import FaultsReport, FaultsState
from ksmtrace.probes import faults as faults_probe
from ksmtrace.probes import ksmd as ksmd_probe
from ksmtrace.views import console
from ksmtrace.views import faults as view

# Start-up reads bounded in time, the rest spread over the intervals (issue #14:
# first report within 2 s whatever the number of mergeable processes).
INITIAL_REGIONS_BUDGET_S = 0.3
PRELOAD_SLICE = 0.25  # of each interval, while processes still wait for their preload

NO_KSM_TRACEPOINTS = (
    "note: this kernel has no ksm:* tracepoints (Linux < 6.4): merges and unmerges per "
    "process are not available; KSM COW faults per process are still exact (page tables), "
    "and cow_ksm is shown machine-wide"
)

EPILOG = """\
examples:
  ksmtrace faults                 # every mergeable process, each second, until Ctrl-C
  ksmtrace faults 5 3             # three reports, five seconds apart
  ksmtrace faults -n qemu-system-x86_64 --no-regions
  ksmtrace faults -p 1234 -j 1 10 # ten JSON lines
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "faults",
        help="copy-on-write faults on KSM pages, merges and unmerges, per process and region",
        description="Count, per process and per region, the write faults that break a KSM merge "
        "(exactly: the faulting PTE mapped a KSM page), all write-protect faults of mergeable "
        "regions, and ksmd's merges and unmerges. The sum over processes is checked against "
        "/proc/vmstat cow_ksm.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_filter_args(p)
    add_output_args(p)
    p.add_argument("--no-regions", action="store_true", help="per process only (no smaps reads)")
    add_interval_args(p)
    p.set_defaults(run=run)


class _Keep:
    """-p/-n as a filter applied at every interval: -n also names processes started later."""

    def __init__(self, pids: list[int] | None, name: str | None, proc: ProcFS) -> None:
        self.pids = set(pids or ())
        self.name = name
        self.proc = proc
        self.named: dict[int, bool] = {}

    def __call__(self, pid: int, comm: str) -> bool:
        if not self.pids and not self.name:
            return True
        if pid in self.pids and not self.name:
            return True
        if self.name:
            if pid not in self.named:
                try:
                    self.named[pid] = self.proc.matches_name(pid, self.name)
                except (ProcessGone, AccessDenied):
                    return False
            return self.named[pid] or pid in self.pids
        return False

    def forget(self, gone: set[int]) -> None:
        for pid in gone:
            self.named.pop(pid, None)


def run(args: argparse.Namespace) -> int:
    check_interval(args)
    checks.require_root("tracing")
    checks.ensure_tracefs()
    if not faults_probe.available():
        raise TracingUnavailable("the exceptions:page_fault_user tracepoint is missing (x86 only)")
    proc = ProcFS()
    pids = resolve_pids(args, proc)  # -p pids exist and -n names something now
    only = set(args.pid) if args.pid else None
    keep = _Keep(args.pid, args.name, proc)
    kernel_pid = args.pid[0] if args.pid and len(args.pid) == 1 and not args.name else None
    have_ksmd = ksmd_probe.available()
    if not have_ksmd:
        console.note(NO_KSM_TRACEPOINTS)

    # Each probe detaches itself when the stack unwinds, also when a signal
    # lands while a later one is still loading.
    with contextlib.ExitStack() as stack:
        fp = stack.enter_context(faults_probe.FaultProbe(pid=kernel_pid))
        kp = stack.enter_context(ksmd_probe.KsmdProbe(pid=kernel_pid)) if have_ksmd else None
        events = stack.enter_context(ProcEvents())
        wanted = fp.initial if only is None else [p for p in fp.initial if p in set(pids or ())]
        for tgid, ranges in initial_regions(proc, wanted, INITIAL_REGIONS_BUDGET_S).items():
            fp.set_regions(tgid, ranges)
        state = FaultsState(time.monotonic(), proc=proc)
        # Baseline: counts and cow_ksm read back to back, after every probe is
        # attached, so the first interval compares like with like.
        _update(state, fp, kp, args, keep)
        started = "Tracing... Ctrl-C to end."
        if args.json:
            console.note(started)
        else:
            console.lines(started)
        for _ in intervals(args.interval, args.count):
            # Earlier merges of processes not preloaded at start-up, a slice at a time.
            fp.preload_pending(PRELOAD_SLICE * args.interval)
            gone = state.apply_events(events.read())
            state.made = RangeBook().made(proc)  # a small file: which regions the daemon made
            snap = snapshot.take(proc, faults=_update(state, fp, kp, args, keep), processes=False)
            for tgid, ranges in state.wanted_regions.items():
                fp.set_regions(tgid, ranges)
            assert snap.faults is not None
            if args.json:
                console.json(view.as_json(snap.faults, clock()), stream=True)
            else:
                filtered = bool(args.pid or args.name)
                console.lines(view.text(snap.faults, clock(), exact=args.bytes, filtered=filtered))
            fp.forget(gone)
            keep.forget(gone)
            if kp:
                kp.forget(gone)
    return 0


def _update(
    state: FaultsState,
    fp: faults_probe.FaultProbe,
    kp: ksmd_probe.KsmdProbe | None,
    args: argparse.Namespace,
    keep: _Keep,
) -> FaultsReport:
    fsnap = fp.snapshot()
    cow = vmstat.ksm_vmstat().get("cow_ksm")  # right after the counts it is compared with
    ksnap = kp.snapshot(pages=not args.no_regions) if kp else None
    return state.update(fsnap, ksnap, cow, keep=keep, regions=not args.no_regions)


def initial_regions(proc: ProcFS, pids: list[int], budget_s: float) -> dict[int, list[tuple[int, int]]]:
    """Mergeable ranges of processes that opted in before tracing started, read
    for at most ``budget_s``: the rest get theirs when they first fault or
    merge (FaultsState reads their smaps then), so a host of a thousand
    mergeable processes does not delay the first report by seconds."""
    deadline = time.monotonic() + budget_s
    out: dict[int, list[tuple[int, int]]] = {}
    for pid in pids:
        if time.monotonic() > deadline:
            break
        try:
            out[pid] = [(v.start, v.end) for v in proc.smaps(pid) if v.mergeable]
        except (ProcessGone, AccessDenied):
            continue
    return out
