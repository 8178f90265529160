"""Every decision of the daemon as a record with its reason and the numbers behind it.

A decision is made whether or not it is carried out: in observe mode
(``applied`` False) the log says what enforce mode would have done. The
JSON-lines log is appended and flushed per decision, so that a crash loses
none that were made; the terminal line comes from ksmtrace.views.daemon.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Action = Literal[
    "start",  # the daemon began: policy, mode, what the kernel lacks
    "stop",  # the daemon ended and what it restored
    "adopt",  # ranges a killed daemon left mergeable, taken over
    "candidate",  # a process became a candidate (or stopped being one)
    "merge",  # runs of duplicate pages made mergeable
    "unmerge",  # a range made unmergeable again (churn, rmap cost, trust domain)
    "refuse",  # a candidate left alone (never rule, trust domain, VMA bound)
    "warn",  # something the daemon cannot fix (self-opted processes of two domains)
    "ksmd",  # ksmd's knobs changed to keep it in its CPU budget
    "error",  # an action that failed, and why
]


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str  # a sentence with the numbers
    pid: int | None = None
    comm: str = ""
    start: int | None = None
    end: int | None = None
    applied: bool = False  # carried out (False: observe mode, or it failed)
    numbers: dict[str, Any] = field(default_factory=dict)
    t: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("start", "end"):
            if d[key] is not None:
                d[key] = f"{d[key]:#x}"
        return d


class DecisionLog:
    """Appends decisions as JSON lines to a file (created 0640 with its directory)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._f = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._f = os.fdopen(fd, "a", buffering=1)

    def write(self, d: Decision) -> None:
        if self._f:
            self._f.write(json.dumps(d.as_dict(), sort_keys=True) + "\n")

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None


def read(path: str | Path) -> list[Decision]:
    """The decisions in a log (lines that do not parse, e.g. cut by a crash, skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            d = json.loads(line)
            for key in ("start", "end"):
                if d.get(key) is not None:
                    d[key] = int(d[key], 16)
            out.append(Decision(**d))
        except (ValueError, TypeError):
            continue
    return out
