"""The probes of a periodic view, loaded once, and one Snapshot per interval.

``faults``, ``top`` and the daemon's dashboards all need the same loop: the
fault probe (exact KSM COW per process and region), the ksmd probe (merges
and unmerges per process, scan rounds; Linux 6.4+), the proc connector
(exits and execs), the fault and ksmd model states, and the daemon's range
book. :class:`Sampler` owns that loop; callers only ask for the next
:class:`Snapshot`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from ksmtrace.coordinator.ranges import RangeBook
from ksmtrace.errors import AccessDenied, ProcessGone, TracingUnavailable
from ksmtrace.kernel import checks, vmstat
from ksmtrace.kernel.proc_events import ProcEvents
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.model import inventory, snapshot
from ksmtrace.model.faults import FaultsReport, FaultsState
from ksmtrace.model.inventory import MergeableProcess
from ksmtrace.model.ksmd import KsmdSampler, KsmdState
from ksmtrace.model.snapshot import Snapshot
from ksmtrace.probes import faults as faults_probe
from ksmtrace.probes import ksmd as ksmd_probe

# Start-up reads bounded in time, the rest spread over the intervals (issue #14:
# first report within 2 s whatever the number of mergeable processes).
INITIAL_REGIONS_BUDGET_S = 0.1  # ~70 smaps reads; the rest a few per interval (FaultsState)
PRELOAD_SLICE = 0.25  # of each interval, while processes still wait for their preload

NO_KSM_TRACEPOINTS = (
    "note: this kernel has no ksm:* tracepoints (Linux < 6.4): merges and unmerges per "
    "process are not available; KSM COW faults per process are still exact (page tables), "
    "and cow_ksm is shown machine-wide"
)

Keep = Callable[[int, str], bool]


def require_tracing() -> None:
    """Root, tracefs and the page-fault tracepoint, or a sentence why not."""
    checks.require_root("tracing")
    checks.ensure_tracefs()
    if not faults_probe.available():
        raise TracingUnavailable("the exceptions:page_fault_user tracepoint is missing (x86 only)")


class Sampler:
    """Use as a context manager; :meth:`sample` once per interval.

    ``keep``: which processes the report shows; ``kernel_pid``: a single pid
    filtered in the kernel already; ``initial``: processes whose mergeable
    regions are read at start-up (None: every process that was mergeable
    when the fault probe loaded); ``regions=False``: per process only;
    ``how``: name how each process opted in (``Snapshot.processes``, read
    once per process and again after an exec); ``fault_probe``: a probe the
    caller already loaded (the daemon's, shared with its churn judge)."""

    def __init__(
        self,
        *,
        keep: Keep | None = None,
        kernel_pid: int | None = None,
        initial: list[int] | None = None,
        regions: bool = True,
        how: bool = False,
        fault_probe: faults_probe.FaultProbe | None = None,
        proc: ProcFS | None = None,
    ) -> None:
        self.proc = proc or ProcFS()
        self.keep: Keep = keep or (lambda pid, comm: True)
        self.kernel_pid = kernel_pid
        self.initial = initial
        self.regions = regions
        self.how = how
        self.notes: list[str] = []  # what this kernel lacks, in words
        self.gone: set[int] = set()  # exited during the last interval
        self._given_fp = fault_probe
        self._stack = contextlib.ExitStack()
        self._known: dict[int, MergeableProcess] = {}
        self.fp: faults_probe.FaultProbe | None = None
        self.kp: ksmd_probe.KsmdProbe | None = None

    def __enter__(self) -> Sampler:
        stack = self._stack
        try:
            if self._given_fp is None:
                self.fp = stack.enter_context(faults_probe.FaultProbe(pid=self.kernel_pid))
            else:
                self.fp = self._given_fp
            if ksmd_probe.available():
                self.kp = stack.enter_context(ksmd_probe.KsmdProbe(pid=self.kernel_pid))
            else:
                self.notes.append(NO_KSM_TRACEPOINTS)
            self.events = stack.enter_context(ProcEvents())
            wanted = self.fp.initial
            if self.initial is not None:
                wanted = [p for p in wanted if p in set(self.initial)]
            for tgid, ranges in initial_regions(self.proc, wanted, INITIAL_REGIONS_BUDGET_S).items():
                self.fp.set_regions(tgid, ranges)
            self.state = FaultsState(time.monotonic(), proc=self.proc)
            self.ksmd = KsmdSampler(self.kp, self.proc)
            # Baseline: counts and cow_ksm read back to back, after every probe
            # is attached, so the first interval compares like with like.
            _, ksnap = self._faults()
            self._ksmd_state = KsmdState(self.ksmd.sample(ksnap))
        except BaseException:
            stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def fileno(self) -> int:
        """The proc connector's socket: readable when a process forked, exec'd or exited."""
        return self.events.fileno()

    def _faults(self) -> tuple[FaultsReport, ksmd_probe.KsmdSnapshot | None]:
        """The fault report, and the ksmd probe's snapshot it used (the ksmd
        model takes the same one: ~3 ms a read at 1,000 processes)."""
        assert self.fp is not None
        fsnap = self.fp.snapshot()
        cow = vmstat.ksm_vmstat().get("cow_ksm")  # right after the counts it is compared with
        ksnap = self.kp.snapshot(pages=self.regions) if self.kp else None
        return self.state.update(fsnap, ksnap, cow, keep=self.keep, regions=self.regions), ksnap

    def sample(self, interval: float) -> Snapshot:
        """The host over the interval since the last call (``interval``: its
        nominal length, which bounds the start-up preload done meanwhile)."""
        assert self.fp is not None
        # Earlier merges of processes not preloaded at start-up, a slice at a time.
        self.fp.preload_pending(PRELOAD_SLICE * interval)
        events = list(self.events.read())
        self.gone = self.state.apply_events(events)
        for ev in events:
            if ev.kind == "exec":
                self._known.pop(ev.tgid, None)  # it may have opted in anew
        self.state.made = RangeBook().made(self.proc)  # a small file: which regions the daemon made
        report, ksnap = self._faults()
        ksmd = self._ksmd_state.update(self.ksmd.sample(ksnap))
        snap = snapshot.take(self.proc, faults=report, ksmd=ksmd, processes=False)
        if self.how:
            snap = _with_processes(snap, self._processes(report))
        for tgid, ranges in self.state.wanted_regions.items():
            self.fp.set_regions(tgid, ranges)
        self.forget(self.gone)
        return snap

    def _processes(self, report: FaultsReport) -> list[MergeableProcess]:
        """Who opted in and how, for the report's processes: read once per
        process (an inventory reads every smaps), kept until exit or exec."""
        pids = [p.pid for p in report.processes if p.pid not in self._known and p.comm != "(exited)"]
        if pids:
            inv = inventory.take(self.proc, pids, RangeBook().made(self.proc))
            self._known.update((p.pid, p) for p in inv.processes)
        live = {p.pid for p in report.processes}
        return [p for pid, p in self._known.items() if pid in live]

    def forget(self, gone: Iterable[int]) -> None:
        gone = set(gone)
        if not gone:
            return
        assert self.fp is not None
        self.fp.forget(gone)
        if self.kp:
            self.kp.forget(gone)
        for pid in gone:
            self._known.pop(pid, None)


def _with_processes(snap: Snapshot, processes: list[MergeableProcess]) -> Snapshot:
    return replace(snap, processes=processes)


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
