"""Rates from cumulative counters: the small state both commands and later a
coordinator or dashboard share.

Probes hand over cumulative counters keyed by anything hashable (a tgid, a
(tgid, region) pair); :class:`Rates` keeps the previous reading and returns
per-second rates and interval deltas. Keys that disappear (a pruned, exited
process) are dropped, so a reused pid starts from zero instead of producing a
negative rate.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Rate:
    delta: int  # increase over the interval
    per_s: float
    total: int  # cumulative since tracing started


class Rates:
    def __init__(self) -> None:
        self._prev: dict[Hashable, Mapping[str, int]] = {}
        self._still: dict[Hashable, dict[str, Rate]] = {}  # zero-rate rows of unchanged keys
        self._t: float | None = None

    def update(
        self, t: float, counters: Mapping[Hashable, Mapping[str, int]]
    ) -> dict[Hashable, dict[str, Rate]]:
        """Rates since the previous update; on the first one, since the probes
        were loaded at ``start`` (all counters start at zero there)."""
        dt = (t - self._t) if self._t is not None else 0.0
        out: dict[Hashable, dict[str, Rate]] = {}
        prev_all, still = self._prev, self._still
        now: dict[Hashable, Mapping[str, int]] = {}
        now_still: dict[Hashable, dict[str, Rate]] = {}
        for key, vals in counters.items():
            prev = prev_all.get(key)
            if prev is not None and prev == vals:
                # Unchanged since the last update: the common case on a host of
                # many quiet processes (issue #14), so no new Rate objects.
                row = still.get(key)
                if row is None:
                    row = {name: Rate(0, 0.0, int(total)) for name, total in vals.items()}
                out[key] = now_still[key] = row
                now[key] = prev
                continue
            prev = prev or {}
            row = {}
            for name, total in vals.items():
                d = int(total) - int(prev.get(name, 0))
                if d < 0:  # counter reset (entry pruned and re-created)
                    d = int(total)
                row[name] = Rate(d, d / dt if dt > 0 else 0.0, int(total))
            out[key] = row
            now[key] = dict(vals)  # a copy: callers may reuse their mappings
        self._prev, self._still = now, now_still
        self._t = t
        return out

    def still(self) -> bool:
        """Whether the last update moved nothing (every row a zero-rate one)."""
        return len(self._still) == len(self._prev)

    def carry(self, t: float) -> None:
        """An update at ``t`` with every counter as it was, when :meth:`still`:
        the rows stay those of the last update, only the time moves."""
        if not self.still():
            raise ValueError("carry() after an update that moved something")
        self._t = t

    def start(self, t: float) -> None:
        """Mark the moment counters were zero (probe load)."""
        self._t = t
