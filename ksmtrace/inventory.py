"""Who is mergeable right now: processes and regions, from /proc.

This is the start-up inventory (a process that opted in before ksmtrace
started is not invisible) and the source of ``status`` and ``optins``.
A process that exits or refuses us while being read is skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ksmtrace.errors import AccessDenied, ProcessGone
from ksmtrace.kernel.procfs import KsmStat, ProcFS, Vma


@dataclass(frozen=True)
class MergeableProcess:
    pid: int
    comm: str
    ppid: int
    uid: int
    stat: KsmStat | None
    regions: tuple[Vma, ...]

    @property
    def merge_any(self) -> bool:
        return bool(self.stat and self.stat.merge_any)

    @property
    def mergeable_bytes(self) -> int:
        return sum(v.length for v in self.regions)

    @property
    def merging_pages(self) -> int:
        return self.stat.merging_pages if self.stat else 0

    @property
    def profit(self) -> int:
        return self.stat.process_profit if self.stat else 0

    def as_dict(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "comm": self.comm,
            "ppid": self.ppid,
            "uid": self.uid,
            "merge_any": self.merge_any,
            "mergeable_regions": len(self.regions),
            "mergeable_bytes": self.mergeable_bytes,
            "merging_pages": self.merging_pages,
            "rmap_items": self.stat.rmap_items if self.stat else 0,
            "zero_pages": self.stat.zero_pages if self.stat else 0,
            "profit_bytes": self.profit,
        }


@dataclass
class Inventory:
    processes: list[MergeableProcess] = field(default_factory=list)
    exited: int = 0
    denied: int = 0


def _candidate(stat: KsmStat | None) -> bool | None:
    """True/False from ksm_stat alone; None when smaps must decide."""
    if stat is None:
        return None
    if stat.merge_any or stat.merging_pages or stat.rmap_items:
        return True
    if "ksm_mergeable" in stat.raw:  # 6.8+: says whether any VMA is mergeable
        return stat.mergeable
    return None


def take(proc: ProcFS | None = None, pids: list[int] | None = None) -> Inventory:
    proc = proc or ProcFS()
    inv = Inventory()
    for pid in proc.pids() if pids is None else pids:
        try:
            status = proc.status(pid)
            if status.is_kernel_thread:
                continue
            stat = proc.ksm_stat(pid)
            decided = _candidate(stat)
            if decided is False:
                continue
            regions = tuple(v for v in proc.smaps(pid) if v.mergeable)
            if not regions and not (stat and (stat.merge_any or stat.merging_pages)):
                continue
            inv.processes.append(
                MergeableProcess(
                    pid=pid,
                    comm=status.comm,
                    ppid=status.ppid,
                    uid=status.uid,
                    stat=stat,
                    regions=regions,
                )
            )
        except ProcessGone:
            inv.exited += 1
        except AccessDenied:
            inv.denied += 1
    return inv
