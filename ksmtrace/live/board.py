"""What the dashboards read: the latest snapshot, a bounded history, the decisions.

The daemon's loop writes (:meth:`Board.record`, :meth:`Board.decided`), the
HTTP server's threads read (:meth:`Board.read`): one lock, and readers get
an immutable :class:`BoardState`, so that a scrape never sees half an
interval. The history keeps the machine row of every interval and, per
interval, the top processes only (``top_n`` by saving plus those with KSM
COW faults), so its size is bounded by ``points x (top_n + faulting)`` rows
whatever the number of processes.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field

from ksmtrace.coordinator.decisions import Decision
from ksmtrace.model.snapshot import Snapshot
from ksmtrace.views import dash

HISTORY_POINTS = 600  # ten minutes at one sample a second
RECENT_DECISIONS = 200
MAX_FAULTING_IN_HISTORY = 10  # processes kept per point for their KSM COW, beyond the top by saving


@dataclass(frozen=True)
class ProcPoint:
    comm: str
    ksm_cow_per_s: float
    merges_per_s: float
    unmerges_per_s: float
    profit_bytes: int | None


@dataclass(frozen=True)
class Point:
    wall: float
    machine: dash.MachineRow
    procs: dict[int, ProcPoint]


@dataclass(frozen=True)
class BoardState:
    snapshot: Snapshot | None
    machine: dash.MachineRow | None
    processes: list[dash.ProcRow]
    history: list[Point]
    decisions: dict[str, int]  # by action, carried out or not
    applied: dict[str, int]  # by action, carried out
    recent: list[Decision]
    top_n: int
    mode: str  # the daemon's policy mode: observe or enforce ("" for top's own probes)
    notes: list[str] = field(default_factory=list)
    # Running totals since the Board started, exited processes included (the
    # metrics' machine-wide counters): ksm_cow, merges, unmerges, ksmd_cpu_seconds.
    totals: dict[str, float] = field(default_factory=dict)
    ksmd_budget_pct: float | None = None  # the policy's ksmd CPU budget, % of one CPU


class Board:
    def __init__(
        self,
        top_n: int = 10,
        points: int = HISTORY_POINTS,
        mode: str = "",
        ksmd_budget_pct: float | None = None,
    ) -> None:
        self.top_n = top_n
        self.mode = mode
        self.ksmd_budget_pct = ksmd_budget_pct
        self._totals: Counter[str] = Counter()
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._snap: Snapshot | None = None
        self._machine: dash.MachineRow | None = None
        self._rows: list[dash.ProcRow] = []
        self._reuse = dash.Rows()  # record() is called from the sampling thread alone
        self._history: deque[Point] = deque(maxlen=points)
        self._decisions: Counter[str] = Counter()
        self._applied: Counter[str] = Counter()
        self._recent: deque[Decision] = deque(maxlen=RECENT_DECISIONS)

    def record(self, snap: Snapshot) -> None:
        """One interval's snapshot: the rows are computed here, once, outside the lock."""
        machine = dash.machine(snap)
        rows = self._reuse(snap)
        kept, _ = dash.top(rows, self.top_n, "profit")
        faulting = [r for r in rows[:MAX_FAULTING_IN_HISTORY] if r.ksm_cow_per_s > 0]  # rows: by KSM COW
        point = Point(
            snap.wall,
            machine,
            {
                r.pid: ProcPoint(r.comm, r.ksm_cow_per_s, r.merges_per_s, r.unmerges_per_s, r.profit_bytes)
                for r in kept + faulting
            },
        )
        add = _deltas(snap)
        with self._lock:
            self._snap, self._machine, self._rows = snap, machine, rows
            self._history.append(point)
            self._totals.update(add)

    def decided(self, d: Decision) -> None:
        with self._lock:
            self._decisions[d.action] += 1
            if d.applied:
                self._applied[d.action] += 1
            self._recent.append(d)

    def read(self) -> BoardState:
        with self._lock:
            return BoardState(
                snapshot=self._snap,
                machine=self._machine,
                processes=list(self._rows),
                history=list(self._history),
                decisions=dict(self._decisions),
                applied=dict(self._applied),
                recent=list(self._recent),
                top_n=self.top_n,
                mode=self.mode,
                notes=list(self.notes),
                totals=dict(self._totals),
                ksmd_budget_pct=self.ksmd_budget_pct,
            )


def _deltas(snap: Snapshot) -> dict[str, float]:
    """What one interval adds to the running totals. KSM COW from the fault
    report's per-process deltas (its "(exited)" rows keep the last interval of
    processes that exited in it); merges, unmerges and CPU from ksmd's interval
    (rate x length gives back the exact count)."""
    out: dict[str, float] = {}
    f, kd = snap.faults, snap.ksmd
    if f is not None:
        out["ksm_cow"] = float(sum(p.rates["ksm_cow"].delta for p in f.processes))
    if kd is not None:
        if kd.merges_per_s is not None:
            out["merges"] = float(round(kd.merges_per_s * kd.interval_s))
        if kd.unmerges_per_s is not None:
            out["unmerges"] = float(round(kd.unmerges_per_s * kd.interval_s))
        if kd.cpu_pct is not None:
            out["ksmd_cpu_seconds"] = kd.cpu_pct / 100.0 * kd.interval_s
    return out
