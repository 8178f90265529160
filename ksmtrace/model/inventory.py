"""Who is mergeable right now: processes and regions, from /proc.

This is the start-up inventory (a process that opted in before ksmtrace
started is not invisible) and the source of ``status``, ``optins`` and
``snoop``'s first lines. A process that exits or refuses us while being read
is skipped and counted.

How a process opted in, as far as the kernel lets one tell afterwards (it
keeps VM_MERGEABLE per VMA and MMF_VM_MERGE_ANY per mm, not who set them):

* ``madvise``: a mergeable VMA the parent does not have at the same
  addresses. process_madvise on one's own pidfd sets the same flag and
  cannot be told apart.
* ``fork``: the parent (``ppid``) has a mergeable VMA at exactly the same
  addresses (fork copies VMAs with their flags), or, for merge_any, the
  parent has merge_any too. Wrong when both called madvise on the same range
  themselves; unknown once the parent has exited (the child is reparented).
* ``prctl``: merge_any, and the ``[stack]`` VMA is mergeable:
  PR_SET_MEMORY_MERGE marks every VMA present at the call, the stack
  included, so this program called prctl after its last exec.
* ``exec``: merge_any, but ``[stack]`` is not mergeable: the flag was in the
  mm before this program's stack was set up, so it came through execve
  (prctl before exec, e.g. ``ksmtrace run``, by this process's earlier image
  or by an ancestor). Checked on 6.18. A program that madvises its stack
  itself reads as ``prctl``; one that calls PR_SET_MEMORY_MERGE again after
  inheriting it reads as ``exec`` (the kernel ignores the second call).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from ksmtrace.errors import AccessDenied, ProcessGone
from ksmtrace.kernel.procfs import KsmStat, ProcFS, Vma

HOWS = ("madvise", "prctl", "exec", "fork", "daemon")  # daemon: made mergeable by ksmtrace daemon


@dataclass(frozen=True)
class Origin:
    """How a process or region opted in: one of HOWS, and from which pid for fork."""

    how: str
    parent: int | None = None

    def __str__(self) -> str:
        return f"fork:{self.parent}" if self.how == "fork" else self.how


@dataclass(frozen=True)
class MergeableProcess:
    pid: int
    comm: str
    ppid: int
    uid: int
    stat: KsmStat | None
    regions: tuple[Vma, ...]
    # [stack] carries VM_MERGEABLE (None: no [stack] VMA seen)
    stack_mergeable: bool | None = None
    # whole-process opt-in (merge_any) and per-region opt-ins, aligned with regions
    origin: Origin | None = None
    region_origins: tuple[Origin, ...] = ()
    # what ksmtrace daemon made mergeable here: (runs, duplicate pages), None if nothing
    made_by_daemon: tuple[int, int] | None = None

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

    @property
    def how(self) -> str:
        """The process's opt-in in one word: its merge_any origin, or its regions' ones."""
        if self.origin is not None:
            return str(self.origin)
        kinds = sorted({str(o) for o in self.region_origins})
        return "+".join(kinds) if kinds else ("madvise" if self.regions else "-")

    @property
    def inherited_from(self) -> int | None:
        """The parent this process's opt-in came from through fork, if it all did."""
        if self.origin is not None:
            return self.origin.parent
        parents = {o.parent for o in self.region_origins}
        if len(parents) == 1 and all(o.how == "fork" for o in self.region_origins):
            return parents.pop()
        return None

    def region_dicts(self) -> list[dict[str, object]]:
        out = []
        for i, v in enumerate(self.regions):
            o = self.region_origins[i] if i < len(self.region_origins) else None
            out.append(
                {
                    "start": v.start,
                    "end": v.end,
                    "length": v.length,
                    "perms": v.perms,
                    "name": v.name,
                    "how": o.how if o else None,
                    "inherited_from": o.parent if o else None,
                    "ksm_bytes": v.ksm_bytes,
                    "rss_bytes": v.sizes.get("Rss"),
                }
            )
        return out

    def as_dict(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "comm": self.comm,
            "ppid": self.ppid,
            "uid": self.uid,
            "merge_any": self.merge_any,
            "how": self.how,
            "inherited_from": self.inherited_from,
            "stack_mergeable": self.stack_mergeable,
            "mergeable_regions": len(self.regions),
            "mergeable_bytes": self.mergeable_bytes,
            "merging_pages": self.merging_pages,
            "rmap_items": self.stat.rmap_items if self.stat else 0,
            "made_by_daemon": (
                None
                if self.made_by_daemon is None
                else {"runs": self.made_by_daemon[0], "dup_pages": self.made_by_daemon[1]}
            ),
            "zero_pages": self.stat.zero_pages if self.stat else 0,
            "profit_bytes": self.profit,
        }


@dataclass
class Inventory:
    processes: list[MergeableProcess] = field(default_factory=list)
    exited: int = 0
    denied: int = 0


# pid -> (start, end, duplicate pages) of each range ksmtrace daemon made mergeable
Made = Mapping[int, Sequence[tuple[int, int, int]]]


def take(proc: ProcFS | None = None, pids: list[int] | None = None, made: Made | None = None) -> Inventory:
    """Opted-in processes; ``made``: the ranges ksmtrace daemon made mergeable
    (its range book, read by the caller), whose regions then say "daemon"."""
    proc = proc or ProcFS()
    inv = Inventory()
    for pid in proc.pids() if pids is None else pids:
        try:
            status = proc.status(pid)
            if status.is_kernel_thread:
                continue
            stat = proc.ksm_stat(pid)
            if stat is not None and stat.opted_in is False:
                continue
            vmas = proc.smaps(pid)
            regions = tuple(v for v in vmas if v.mergeable)
            if not regions and not (stat and (stat.merge_any or stat.merging_pages)):
                continue
            stack = [v.mergeable for v in vmas if v.path == "[stack]"]
            inv.processes.append(
                MergeableProcess(
                    pid=pid,
                    comm=status.comm,
                    ppid=status.ppid,
                    uid=status.uid,
                    stat=stat,
                    regions=regions,
                    stack_mergeable=stack[0] if stack else None,
                )
            )
        except ProcessGone:
            inv.exited += 1
        except AccessDenied:
            inv.denied += 1
    parents = _ParentView(proc, inv.processes)  # one view for all: per process it was O(n^2)
    inv.processes = [_with_origins(p, parents, (made or {}).get(p.pid, ())) for p in inv.processes]
    return inv


class _ParentView:
    """Parents' merge_any and mergeable ranges, from the inventory or read on demand."""

    def __init__(self, proc: ProcFS, known: list[MergeableProcess]) -> None:
        self.proc = proc
        self.cache: dict[int, tuple[bool, frozenset[tuple[int, int]]] | None] = {
            p.pid: (p.merge_any, frozenset((v.start, v.end) for v in p.regions)) for p in known
        }

    def get(self, pid: int) -> tuple[bool, frozenset[tuple[int, int]]] | None:
        if pid not in self.cache:
            try:
                stat = self.proc.ksm_stat(pid)
                if stat is not None and stat.opted_in is False:
                    self.cache[pid] = (False, frozenset())
                else:
                    ranges = frozenset((v.start, v.end) for v in self.proc.smaps(pid) if v.mergeable)
                    self.cache[pid] = (bool(stat and stat.merge_any), ranges)
            except (ProcessGone, AccessDenied):
                self.cache[pid] = None
        return self.cache[pid]


def _with_origins(
    p: MergeableProcess, parents: _ParentView, made: Sequence[tuple[int, int, int]] = ()
) -> MergeableProcess:
    parent = parents.get(p.ppid) if p.ppid > 1 else None
    origin: Origin | None = None
    if p.merge_any:
        if parent is not None and parent[0]:
            origin = Origin("fork", p.ppid)
        elif p.stack_mergeable is False:
            origin = Origin("exec")
        else:
            origin = Origin("prctl")
    regions: list[Origin] = []
    for v in p.regions:
        if any(s <= v.start and v.end <= e for s, e, _ in made):
            regions.append(Origin("daemon"))
        elif origin is not None:
            regions.append(origin)
        elif parent is not None and (v.start, v.end) in parent[1]:
            regions.append(Origin("fork", p.ppid))
        else:
            regions.append(Origin("madvise"))
    runs = [m for m in made if any(m[0] <= v.start and v.end <= m[1] for v in p.regions)]
    by_daemon = (len(runs), sum(m[2] for m in runs)) if runs else None
    return replace(p, origin=origin, region_origins=tuple(regions), made_by_daemon=by_daemon)
