"""The daemon's side of churn: which mergeable ranges to judge, and unmerging them.

Judged each interval (:class:`ksmtrace.coordinator.churn.ChurnJudge` decides):

- every range the daemon made mergeable (its :class:`RangeBook`);
- with ``narrow_self_opted = true`` in the policy, also the mergeable
  mappings of processes that opted in themselves: the daemon never makes
  their memory mergeable (they did), but may narrow it by unmerging what
  churns. Without that setting their choices are theirs.

Each judged range has its region in the fault probe's table, so its KSM
copy-on-write count is exact; its merged and present pages come from
pagemap. In observe mode an unmerge is said once and not done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ksmtrace import remote
from ksmtrace.coordinator.churn import ChurnJudge
from ksmtrace.coordinator.decisions import Decision
from ksmtrace.coordinator.ranges import RangeBook
from ksmtrace.errors import AccessDenied, KsmtraceError, ProcessGone
from ksmtrace.kernel import pagemap
from ksmtrace.kernel.procfs import ProcFS


@dataclass(frozen=True)
class Judged:
    pid: int
    comm: str
    start: int
    end: int
    ours: bool  # the daemon made it mergeable (else: the process did, and narrowing is allowed)


class Unmerger:
    def __init__(
        self,
        churn: ChurnJudge,
        book: RangeBook,
        emit: Callable[[Decision], None],
        forget: Callable[[set[int]], None],
        enforce: bool,
        proc: ProcFS,
    ) -> None:
        self.churn, self.book, self.emit, self.forget = churn, book, emit, forget
        self.enforce = enforce
        self.proc = proc
        self.faults: Any = None  # a FaultProbe, set by the caller when it has one
        self._since: dict[tuple[int, int], float] = {}  # (pid, start) -> first judged
        self._said: set[tuple[int, int, int]] = set()  # observe mode: unmerges already said

    def self_opted(self, pids: Iterable[tuple[int, str]]) -> list[Judged]:
        """Mergeable mappings of self-opted processes (pid, comm), to narrow."""
        out = []
        for pid, comm in pids:
            try:
                vmas = [v for v in self.proc.smaps(pid) if v.mergeable]
            except (ProcessGone, AccessDenied):
                continue
            out += [Judged(pid, comm, v.start, v.end, False) for v in vmas]
        return out

    def judge(self, now: float, ranges: list[Judged]) -> None:
        if not ranges:
            return
        if self.faults is not None:
            for pid in {j.pid for j in ranges}:
                self.faults.set_regions(pid, [(j.start, j.end) for j in ranges if j.pid == pid])
        snap = self.faults.snapshot() if self.faults is not None else None
        for j in ranges:
            since = self._since.setdefault((j.pid, j.start), now)
            cow = None
            if snap is not None and j.pid in snap.procs:
                counts = snap.procs[j.pid].regions.get((j.start, j.end))
                cow = counts.ksm_cow if counts else None
            try:
                pages = pagemap.range_pages(j.pid, j.start, j.end)
            except (ProcessGone, AccessDenied):
                self.forget({j.pid})
                continue
            verdict = self.churn.judge((j.pid, j.start), now, since, cow, pages.ksm, pages.present)
            if verdict is None:
                continue
            why = (
                verdict.reason
                if j.ours
                else f"{verdict.reason} (it opted in itself; the policy allows narrowing)"
            )
            if self.enforce:
                if self.unmerge(j, why, verdict.numbers):
                    self.churn.cool(j.pid, j.start, j.end, now)
            elif (j.pid, j.start, j.end) not in self._said:
                self._said.add((j.pid, j.start, j.end))
                self.emit(Decision("unmerge", why, j.pid, j.comm, j.start, j.end, False, verdict.numbers))

    def unmerge(self, j: Judged, why: str, numbers: dict[str, Any] | None = None) -> bool:
        try:
            remote.madvise(j.pid, j.start, j.end, remote.MADV_UNMERGEABLE)
        except ProcessGone:
            self.forget({j.pid})
            return False
        except KsmtraceError as exc:
            self.emit(Decision("error", f"could not unmerge it: {exc}", j.pid, j.comm, j.start, j.end))
            return False
        if j.ours:
            self.book.remove(j.pid, j.start)
        self._since.pop((j.pid, j.start), None)
        self.emit(Decision("unmerge", why, j.pid, j.comm, j.start, j.end, True, dict(numbers or {})))
        return True

    def made(self, pid: int, start: int, now: float) -> None:
        """A range just made mergeable: its age for the churn window starts now."""
        self._since[(pid, start)] = now

    def forget_pids(self, pids: set[int]) -> None:
        self._since = {k: v for k, v in self._since.items() if k[0] not in pids}
