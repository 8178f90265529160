"""The ranges the daemon made mergeable, written down before each change.

The file outlives the daemon on purpose: ranges it made mergeable stay
mergeable in the kernel after it ends (policy ``on_stop = "keep"``) or after
a SIGKILL, and the next daemon adopts them so that it can still unmerge them
on churn or at its stop. A range is written as ``pending`` before the
madvise and as ``done`` after it; at adoption a pending range is looked up
in the process's mappings, so whichever way the kill fell, the record ends
up matching the kernel. Records of processes gone (or pids reused: start
times differ) are dropped.

The name does not end in .json: journal files (journal.py) do, and other
ksmtrace commands repair those of dead owners.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from ksmtrace.coordinator.journal import RUN_DIR, write_atomic
from ksmtrace.errors import AccessDenied, ProcessGone
from ksmtrace.kernel.procfs import ProcFS


@dataclass(frozen=True)
class MadeRange:
    pid: int
    starttime: int
    start: int
    end: int
    dup_pages: int
    since: float
    state: str = "pending"  # "pending": about to be made mergeable; "done"

    @property
    def pages(self) -> int:
        return (self.end - self.start) // 4096


class RangeBook:
    """The daemon's ranges in memory and in ``RUN_DIR/daemon.ranges``."""

    def __init__(self, directory: Path = RUN_DIR) -> None:
        self.path = directory / "daemon.ranges"
        self.ranges: dict[tuple[int, int], MadeRange] = {}

    def load(self) -> list[MadeRange]:
        """What a previous daemon left, unchecked (see :meth:`adopt`)."""
        try:
            doc = json.loads(self.path.read_text())
            return [MadeRange(**r) for r in doc["ranges"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError):
            return []  # a torn or foreign file: nothing can be adopted from it

    def adopt(self, proc: ProcFS) -> tuple[list[MadeRange], int]:
        """Take over the left ranges that still exist as mergeable; (adopted, dropped)."""
        kept, dropped = [], 0
        for r in self.load():
            try:
                if proc.stat(r.pid).starttime != r.starttime:
                    dropped += 1
                    continue
                vmas = proc.smaps(r.pid)
            except (ProcessGone, AccessDenied):
                dropped += 1
                continue
            if any(v.mergeable and v.start <= r.start and r.end <= v.end for v in vmas):
                kept.append(replace(r, state="done"))
            else:
                dropped += 1  # the madvise never happened, or the process undid it
        self.ranges = {(r.pid, r.start): r for r in kept}
        self.save()
        return kept, dropped

    def made(self, proc: ProcFS) -> dict[int, list[tuple[int, int, int]]]:
        """pid -> (start, end, duplicate pages) of the ranges made mergeable, read
        from the file for other commands (optins, faults); records of processes
        gone or of reused pids left out."""
        out: dict[int, list[tuple[int, int, int]]] = {}
        for r in self.load():
            try:
                if r.state != "done" or proc.stat(r.pid).starttime != r.starttime:
                    continue
            except (ProcessGone, AccessDenied):
                continue
            out.setdefault(r.pid, []).append((r.start, r.end, r.dup_pages))
        return out

    def of(self, pid: int) -> list[MadeRange]:
        return [r for (p, _), r in sorted(self.ranges.items()) if p == pid]

    def pids(self) -> set[int]:
        return {p for p, _ in self.ranges}

    def add(self, r: MadeRange) -> None:
        self.add_many([r])

    def add_many(self, rs: list[MadeRange], drop: list[tuple[int, int]] | None = None) -> None:
        """``rs`` added (or replaced), the (pid, start) keys in ``drop`` removed: one write."""
        for r in rs:
            self.ranges[(r.pid, r.start)] = r
        for key in drop or ():
            self.ranges.pop(key, None)
        if rs or drop:
            self.save()

    def remove(self, pid: int, start: int) -> None:
        if self.ranges.pop((pid, start), None) is not None:
            self.save()

    def forget(self, pids: set[int]) -> None:
        """Processes that exited: their ranges went with them."""
        before = len(self.ranges)
        self.ranges = {k: r for k, r in self.ranges.items() if k[0] not in pids}
        if len(self.ranges) != before:
            self.save()

    def save(self) -> None:
        if not self.ranges:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        # vars(), not asdict(): asdict deep-copies every field, and the book is written whole.
        write_atomic(self.path, {"ranges": [dict(vars(r)) for r in self.ranges.values()]})
