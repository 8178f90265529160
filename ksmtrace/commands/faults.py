"""ksmtrace faults: copy-on-write faults on merged pages, per process and region."""

from __future__ import annotations

import argparse
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
from ksmtrace.errors import AccessDenied, ProcessGone
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.live import sampler as sampler_mod
from ksmtrace.live.sampler import Sampler
from ksmtrace.probes import ksmd as ksmd_probe
from ksmtrace.views import console
from ksmtrace.views import faults as view

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
    sampler_mod.require_tracing()
    proc = ProcFS()
    pids = resolve_pids(args, proc)  # -p pids exist and -n names something now
    only = set(args.pid) if args.pid else None
    keep = _Keep(args.pid, args.name, proc)
    kernel_pid = args.pid[0] if args.pid and len(args.pid) == 1 and not args.name else None
    if not ksmd_probe.available():
        console.note(sampler_mod.NO_KSM_TRACEPOINTS)
    initial = None if only is None else list(pids or ())
    # The sampler detaches every probe when the stack unwinds, also when a
    # signal lands while a later one is still loading.
    sampler = Sampler(
        keep=keep, kernel_pid=kernel_pid, initial=initial, regions=not args.no_regions, proc=proc
    )
    with sampler:
        started = "Tracing... Ctrl-C to end."
        if args.json:
            console.note(started)
        else:
            console.lines(started)
        for _ in intervals(args.interval, args.count):
            snap = sampler.sample(args.interval)
            assert snap.faults is not None
            if args.json:
                console.json(view.as_json(snap.faults, clock()), stream=True)
            else:
                filtered = bool(args.pid or args.name)
                console.lines(view.text(snap.faults, clock(), exact=args.bytes, filtered=filtered))
            keep.forget(sampler.gone)
    return 0
