"""Re-looks that cost what changed: skip the scan of a candidate whose memory did not change.

The daemon looks at each candidate again and again (``stable_looks`` in a
row before a merge, then every interval), and an exact look reads and hashes
every present page. With ``[runs] relook = "soft-dirty"`` (the default) a
look goes like this:

1. before a candidate is scanned, its soft-dirty bits are cleared
   (``clear_refs`` 4) and its mappings' (start, end) list is noted. Clearing
   *before* the scan, not after, means a write while the scanner reads shows
   up at the next look, never falls between the read and the clear;
2. at its next look, if its mappings are the same (an unmap or a move leaves
   no soft-dirty bit behind: the list catches those) and none of the pages
   the scanner read last time is soft-dirty (a new or grown mapping is
   soft-dirty as a whole), the memory is what the last scan saw: the scan is
   skipped and the last look's chosen ranges count as seen again, so
   ``stable_looks`` still advances. Otherwise it is scanned as before.

What the check costs: one read of /proc/PID/maps and 8 bytes of pagemap per
page the scanner read (bench/bench_relook.py: a few percent of a scan).
What it costs others, and why it is a policy switch:

* the target: clearing write-protects all its PTEs, so its first write to
  each page after a look takes a minor fault (about a microsecond; measured
  by the benchmark);
* other soft-dirty users of the same process (CRIU's iterative pre-dump,
  live-migration helpers) lose the writes they had not collected yet: the
  bits are one per PTE, shared by every reader. ``relook = "rescan"`` then.

Without CONFIG_MEM_SOFT_DIRTY (features.FEATURES["soft_dirty"]) nothing is
cleared and every look rescans; ``notes`` says so once, in the start line.
Only whole skips: a candidate with one written page is rescanned whole
(rescanning only the written regions is left for later).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

from ksmtrace import scan
from ksmtrace.errors import AccessDenied, ProcessGone
from ksmtrace.kernel import features, pagemap
from ksmtrace.scan import Estimate

Mode = Literal["soft-dirty", "rescan"]
Span = tuple[int, int]


class _Ranged(Protocol):
    start: int
    end: int


class _Spans(Protocol):
    def map_spans(self, pid: int) -> tuple[Span, ...]: ...


@dataclass
class _Seen:
    spans: tuple[Span, ...]  # every mapping when its bits were cleared
    scanned: list[Span]  # what the scanner read at that look
    chosen: tuple[object, ...] = ()  # what the look chose (worth.Choice), handed back on a skip
    complete: bool = False  # the look finished (scanned and chosen are set)


class RelookGate:
    """Per candidate: cleared before its scan; unchanged (scan skipped) or not at its next look.

    ``dirty``/``clear``/``available`` default to the kernel's (pagemap
    soft-dirty bits, features probe); tests hand in fakes.
    """

    def __init__(
        self,
        mode: Mode,
        proc: _Spans,
        dirty: Callable[[int, list[Span]], int] = pagemap.soft_dirty_pages,
        clear: Callable[[int], None] = pagemap.clear_soft_dirty,
        available: Callable[[], bool] = lambda: features.available("soft_dirty"),
    ) -> None:
        self.proc = proc
        self._dirty = dirty
        self._clear = clear
        self.on = mode == "soft-dirty" and available()
        self.notes: list[str] = []
        if mode == "soft-dirty" and not self.on:
            self.notes.append(f'{features.lacks("soft_dirty")}: relook = "soft-dirty" rescans every look')
        self._seen: dict[int, _Seen] = {}
        self.skipped = 0  # looks that read no page (counters only: a skip is no decision)
        self.scanned = 0
        self.last_dirty: dict[int, int] = {}  # pid -> soft-dirty pages found at its last check

    def unchanged(self, pid: int) -> tuple[object, ...] | None:
        """The chosen ranges of ``pid``'s last look if nothing changed since, else None (scan it)."""
        seen = self._seen.get(pid)
        if not self.on or seen is None or not seen.complete:
            return None
        try:
            if self.proc.map_spans(pid) != seen.spans:
                self.last_dirty[pid] = -1  # mappings changed; pages not counted
                return None
            dirty = self._dirty(pid, seen.scanned)
        except (ProcessGone, AccessDenied):
            return None  # the scan finds it gone and the daemon forgets it
        self.last_dirty[pid] = dirty
        if dirty:
            return None
        self.skipped += 1
        return seen.chosen

    def unchanged_of(self, pids: Iterable[int]) -> dict[int, tuple[object, ...]]:
        """pid -> its last look's chosen ranges, for each of ``pids`` unchanged since."""
        return {p: ch for p in sorted(pids) if (ch := self.unchanged(p)) is not None}

    def scan(
        self, targets: set[int], fresh: dict[int, tuple[object, ...]], peers: list[int], gap: int
    ) -> Estimate:
        """The daemon's look: targets not in ``fresh`` cleared, then scanned whole with
        ``peers``' mergeable mappings; targets in ``fresh`` only within their chosen
        runs, so that the others' duplicates across processes count as before."""
        for pid in targets - fresh.keys():
            self.before_scan(pid)

        def only(pid: int, vma: object) -> bool:
            return pid in targets or getattr(vma, "mergeable", False)

        return scan.estimate(
            [*sorted(targets), *peers],
            strict=False,
            only=only,
            proc=self.proc,  # type: ignore[arg-type]
            runs_gap=gap,
            ranges={p: [(c.start, c.end) for c in chosen] for p, chosen in fresh.items()},  # type: ignore[attr-defined]
        )

    def before_scan(self, pid: int) -> None:
        """Clear ``pid``'s soft-dirty bits and note its mappings, just before its scan."""
        if not self.on:
            return
        self.scanned += 1
        try:
            # Spans first: a mapping made between the two reads is soft-dirty
            # as a whole and a removed one is missing from the next list, so
            # either order change is seen at the next look.
            spans = self.proc.map_spans(pid)
            self._clear(pid)
        except (ProcessGone, AccessDenied):
            self._seen.pop(pid, None)
            return
        self._seen[pid] = _Seen(spans, [])

    def after_scan(self, pid: int, est: Estimate, chosen: Iterable[_Ranged]) -> None:
        """What the scan of ``pid`` read and chose: the next look checks and hands back these."""
        seen = self._seen.get(pid)
        if seen is None:
            return
        seen.scanned = [(r.start, r.end) for p in est.processes for r in p.regions if r.pid == pid]
        seen.chosen = tuple(chosen)
        seen.complete = True

    def forget(self, pids: Iterable[int]) -> None:
        for pid in pids:
            self._seen.pop(pid, None)
            self.last_dirty.pop(pid, None)
