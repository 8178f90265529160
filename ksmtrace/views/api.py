"""The web page's JSON API: a BoardState as plain JSON trees.

Read-only views of what the daemon already holds; the web page polls them,
``top --connect`` reads ``snapshot`` (the whole Snapshot, decoded back into
records by ksmtrace.model.codec).
"""

from __future__ import annotations

from typing import Any

from ksmtrace.live.board import BoardState
from ksmtrace.model import codec

RECENT = 50  # decisions the page lists


def state(s: BoardState) -> dict[str, Any]:
    """The machine row, every process row (sorted by KSM COW faults/s) and the decision counts."""
    return {
        "mode": s.mode,
        "top_n": s.top_n,
        "notes": s.notes,
        "machine": s.machine.as_dict() if s.machine else None,
        "processes": [r.as_dict() for r in s.processes],
        "decisions": s.decisions,
        "applied": s.applied,
    }


def process(s: BoardState, pid: int) -> dict[str, Any] | None:
    """One process with its regions (None: not in the last interval's report)."""
    row = next((r for r in s.processes if r.pid == pid), None)
    return row.as_dict(regions=True) if row else None


def history(s: BoardState, since: float | None = None) -> dict[str, Any]:
    """Every point (after wall time ``since``, so that a page polling it gets
    only what is new): time, machine row, and the top processes of that moment."""
    return {
        "points": [
            {
                "wall": p.wall,
                "machine": p.machine.as_dict(),
                "procs": {str(pid): vars(pp) for pid, pp in p.procs.items()},
            }
            for p in s.history
            if since is None or p.wall > since
        ]
    }


def decisions(s: BoardState, limit: int = RECENT) -> dict[str, Any]:
    """The latest decisions, newest first."""
    return {"decisions": [d.as_dict() for d in reversed(s.recent[-limit:])], "counts": s.decisions}


def snapshot(s: BoardState) -> Any:
    """The last Snapshot, whole (None before the first interval)."""
    return codec.encode(s.snapshot) if s.snapshot is not None else None
