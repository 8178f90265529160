"""One record of the whole host at one moment, built by one function.

Every command, and the daemon after them, asks :func:`take` for a
:class:`Snapshot` and hands it to a view: the KSM knobs and counters,
``cow_ksm``, the mergeable processes with their regions, and whatever the
caller measured over an interval (fault and merge rates, ksmd's activity, an
estimate). Readers come in through ``proc`` and ``sysfs`` (a fixture tree in
the tests); the probes' interval records come in as arguments, already
turned into rates by the caller's FaultsState/KsmdState. Nothing here prints
or changes the machine.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ksmtrace.kernel import features as features_mod
from ksmtrace.kernel import ksm_sysfs, vmstat
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.model import inventory
from ksmtrace.model import optins as optins_model
from ksmtrace.model.faults import FaultsReport
from ksmtrace.model.inventory import MergeableProcess
from ksmtrace.model.ksmd import KsmdInterval
from ksmtrace.scan import Estimate


@dataclass(frozen=True)
class Skipped:
    """Processes left out because they exited or refused us while being read."""

    exited: int = 0
    denied: int = 0


@dataclass(frozen=True)
class Snapshot:
    wall: float  # time.time() when taken
    page_size: int
    knobs: dict[str, int | str]
    counters: dict[str, int | str]
    vmstat: dict[str, int]  # cow_ksm, ksm_swpin_copy where the kernel has them
    features: dict[str, dict[str, Any]]  # features.report(): what this kernel has
    processes: list[MergeableProcess]  # who is mergeable now (status, optins, snoop)
    skipped: Skipped = field(default_factory=Skipped)
    optins: optins_model.Report | None = None  # live pagemap state of opted-in regions
    faults: FaultsReport | None = None  # KSM COW, write-protect faults, merges per process/region
    ksmd: KsmdInterval | None = None
    estimate: Estimate | None = None

    def process(self, pid: int) -> MergeableProcess | None:
        return next((p for p in self.processes if p.pid == pid), None)


def take(
    proc: ProcFS | None = None,
    sysfs: Path = ksm_sysfs.KSM_SYSFS,
    pids: list[int] | None = None,
    live: bool = False,
    faults: FaultsReport | None = None,
    ksmd: KsmdInterval | None = None,
    estimate: Estimate | None = None,
    kernel_features: dict[str, dict[str, Any]] | None = None,
    processes: bool = True,
    made: inventory.Made | None = None,
) -> Snapshot:
    """The host now: ``pids`` limits the process part (None: every process);
    ``live`` adds each opted-in region's KSM pages from pagemap (root);
    ``processes=False`` leaves the process inventory out (a periodic view
    whose probes already name the processes that matter: it costs a read of
    every process's ksm_stat); ``made``: ranges ksmtrace daemon made mergeable."""
    proc = proc or ProcFS()
    sys_state = ksm_sysfs.read(sysfs)
    inv = inventory.take(proc, pids, made) if processes else inventory.Inventory()
    exited, denied = inv.exited, inv.denied
    live_rep = None
    if live:
        live_rep = optins_model.from_inventory(inv, proc)
        exited, denied = live_rep.exited, live_rep.denied
    return Snapshot(
        wall=time.time(),
        page_size=os.sysconf("SC_PAGE_SIZE"),
        knobs=dict(sys_state.knobs),
        counters=dict(sys_state.counters),
        vmstat=vmstat.ksm_vmstat(proc.root),
        features=features_mod.report() if kernel_features is None else kernel_features,
        processes=list(inv.processes),
        skipped=Skipped(exited, denied),
        optins=live_rep,
        faults=faults,
        ksmd=ksmd,
        estimate=estimate,
    )
