"""Per-process and per-region KSM fault and merge state, from probe snapshots.

Pure Python over typed records (ksmtrace/probes/*, ksmtrace/kernel/*): the
commands, and later a coordinator or a dashboard, feed it snapshots and get
report records back. Regions: the fault probe counts per address range
from a small per-process table that the command pushes (the mergeable VMAs
this module saw in smaps: :attr:`FaultsState.wanted_regions`); ksmd's merges
come per page and are attributed here to the same ranges, or to the VMA that
holds the page now.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ksmtrace.errors import AccessDenied, ProcessGone
from ksmtrace.kernel.proc_events import ProcEvent
from ksmtrace.kernel.procfs import KsmStat, ProcFS, Vma
from ksmtrace.model.rates import Rate, Rates
from ksmtrace.probes.faults import FaultSnapshot
from ksmtrace.probes.ksmd import KsmdSnapshot

COUNTERS = ("ksm_cow", "wp", "merges", "unmerges")
_ZERO = Rate(0, 0.0, 0)


@dataclass(frozen=True)
class RegionRow:
    start: int
    end: int
    name: str
    mergeable: bool
    rates: dict[str, Rate]
    ksm_bytes: int | None  # smaps "KSM:" (features.FEATURES["smaps_ksm"]): merged as of ksmd's last visit

    def as_dict(self) -> dict[str, object]:
        return {
            "start": self.start,
            "end": self.end,
            "name": self.name,
            "mergeable": self.mergeable,
            "ksm_bytes": self.ksm_bytes,
            **{f"{k}_per_s": round(r.per_s, 3) for k, r in self.rates.items()},
            **{f"{k}_total": r.total for k, r in self.rates.items()},
        }


@dataclass(frozen=True)
class ProcessRow:
    pid: int
    comm: str
    rates: dict[str, Rate]
    wp_mergeable: Rate  # write-protect faults inside VM_MERGEABLE regions
    profit_bytes: int | None  # ksm_stat ksm_process_profit: what KSM saves it now
    merging_pages: int | None
    regions: list[RegionRow] = field(default_factory=list)
    unattributed: int = 0  # merged pages no longer inside any VMA (unmapped since)

    def as_dict(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "comm": self.comm,
            **{f"{k}_per_s": round(r.per_s, 3) for k, r in self.rates.items()},
            **{f"{k}_total": r.total for k, r in self.rates.items()},
            "wp_mergeable_per_s": round(self.wp_mergeable.per_s, 3),
            "wp_mergeable_total": self.wp_mergeable.total,
            "profit_bytes": self.profit_bytes,
            "merging_pages": self.merging_pages,
            "unattributed_pages": self.unattributed,
            "regions": [r.as_dict() for r in self.regions],
        }


@dataclass(frozen=True)
class FaultsReport:
    interval: float
    processes: list[ProcessRow]
    cow_ksm: Rate | None  # /proc/vmstat, machine-wide ground truth
    merges_available: bool
    drops: dict[str, int]

    @property
    def ksm_cow_sum(self) -> int:
        return sum(p.rates["ksm_cow"].delta for p in self.processes)

    def as_dict(self) -> dict[str, object]:
        return {
            "interval_s": round(self.interval, 3),
            "cow_ksm_vmstat": None if self.cow_ksm is None else self.cow_ksm.delta,
            "ksm_cow_sum": self.ksm_cow_sum,
            "merges_available": self.merges_available,
            "drops": self.drops,
            "processes": [p.as_dict() for p in self.processes],
        }


class FaultsState:
    def __init__(self, t0: float, cow_ksm0: int | None = None, proc: ProcFS | None = None) -> None:
        """``t0``: when the probes were loaded (their counters were zero then);
        ``cow_ksm0``: /proc/vmstat cow_ksm read at that moment."""
        self.proc = proc or ProcFS()
        self.rates = Rates()
        self.region_rates = Rates()
        self.wp_mg_rates = Rates()
        self.cow_rates = Rates()
        self.comms: dict[int, str] = {}
        self._last_t = t0
        # Mergeable ranges per process seen at the last update: the command
        # pushes them into the fault probe's region table.
        self.wanted_regions: dict[int, list[tuple[int, int]]] = {}
        for r in (self.rates, self.region_rates, self.wp_mg_rates):
            r.start(t0)
        if cow_ksm0 is not None:
            self.cow_rates.update(t0, {"m": {"cow_ksm": cow_ksm0}})

    def apply_events(self, events: Iterable[ProcEvent]) -> set[int]:
        """Exec renames, exit of a process forgets it; returns tgids to prune."""
        gone: set[int] = set()
        for ev in events:
            if ev.kind == "exec":
                self.comms.pop(ev.tgid, None)  # re-read on next use
            elif ev.kind == "exit" and ev.pid == ev.tgid:
                self.comms.pop(ev.tgid, None)
                gone.add(ev.tgid)
            elif ev.kind == "fork" and ev.tgid in gone:
                gone.discard(ev.tgid)  # pid reused within one interval
        return gone

    def _comm(self, pid: int) -> str:
        if pid not in self.comms:
            try:
                self.comms[pid] = self.proc.comm(pid)
            except (ProcessGone, AccessDenied):
                return "?"
        return self.comms[pid]

    def update(
        self,
        faults: FaultSnapshot,
        ksmd: KsmdSnapshot | None,
        cow_ksm: int | None,
        keep: Callable[[int, str], bool] = lambda pid, comm: True,
        regions: bool = True,
    ) -> FaultsReport:
        t = faults.t
        per: dict[int, dict[str, int]] = {}
        for tgid, c in faults.procs.items():
            per.setdefault(tgid, dict.fromkeys(COUNTERS, 0)).update(ksm_cow=c.total.ksm_cow, wp=c.total.wp)
        if ksmd is not None:
            for tgid, k in ksmd.procs.items():
                if tgid == 0:
                    continue
                per.setdefault(tgid, dict.fromkeys(COUNTERS, 0)).update(merges=k.merges, unmerges=k.unmerges)
        rates = self.rates.update(t, per)

        region_counts: dict[tuple[int, int, int], dict[str, int]] = {}
        wp_mg: dict[int, dict[str, int]] = {}
        vmas_of: dict[int, list[Vma]] = {}
        stats: dict[int, KsmStat | None] = {}
        unattributed: dict[int, int] = {}
        self.wanted_regions = {}
        merged_pages: dict[int, list[tuple[int, int, int]]] = {}
        if ksmd is not None:
            for (tgid, addr), (m, u) in ksmd.pages.items():
                merged_pages.setdefault(tgid, []).append((addr, m, u))
        for tgid in per:
            comm = self._comm(tgid)
            if not keep(tgid, comm):
                continue
            try:
                vmas = self.proc.smaps(tgid) if regions else []
                stats[tgid] = self.proc.ksm_stat(tgid)
            except (ProcessGone, AccessDenied):
                # Exited during the interval: its counts still belong in this
                # report (they are part of cow_ksm), only its regions are gone.
                vmas, stats[tgid] = [], None
            vmas_of[tgid] = vmas
            self.wanted_regions[tgid] = [(v.start, v.end) for v in vmas if v.mergeable]
            pf = faults.procs.get(tgid)
            ranges = sorted(pf.regions) if pf else []
            mg_wp = 0
            if pf:
                for (a, b), fc in pf.regions.items():
                    row = region_counts.setdefault((tgid, a, b), dict.fromkeys(COUNTERS, 0))
                    row["ksm_cow"] += fc.ksm_cow
                    row["wp"] += fc.wp
                    mg_wp += fc.wp
                if pf.other.wp:
                    row = region_counts.setdefault((tgid, 0, 0), dict.fromkeys(COUNTERS, 0))
                    row["ksm_cow"] += pf.other.ksm_cow
                    row["wp"] += pf.other.wp
            starts = [r[0] for r in ranges]
            vstarts = [v.start for v in vmas]
            for addr, m, u in merged_pages.get(tgid, []):
                i = bisect.bisect_right(starts, addr) - 1
                if i >= 0 and addr < ranges[i][1]:
                    key = (tgid, *ranges[i])
                else:
                    j = bisect.bisect_right(vstarts, addr) - 1
                    if j < 0 or addr >= vmas[j].end:
                        unattributed[tgid] = unattributed.get(tgid, 0) + 1
                        continue
                    key = (tgid, vmas[j].start, vmas[j].end)
                row = region_counts.setdefault(key, dict.fromkeys(COUNTERS, 0))
                row["merges"] += m
                row["unmerges"] += u
            wp_mg[tgid] = {"wp": mg_wp}
        rrates = self.region_rates.update(t, region_counts)
        mrates = self.wp_mg_rates.update(t, wp_mg)

        rows: list[ProcessRow] = []
        for tgid, vmas in vmas_of.items():
            by_start = {v.start: v for v in vmas}
            vstarts = [v.start for v in vmas]
            regs = []
            for (rt, a, b), rr in rrates.items():
                if rt != tgid:
                    continue
                if (a, b) == (0, 0):
                    regs.append(RegionRow(0, 0, "(other)", False, rr, None))
                    continue
                j = bisect.bisect_right(vstarts, a) - 1
                v = by_start.get(a) or (vmas[j] if j >= 0 and a < vmas[j].end else None)
                name = v.name if v else "(unmapped)"
                mergeable = bool(v and v.mergeable)
                ksm_bytes = v.ksm_bytes if v and (v.start, v.end) == (a, b) else None
                regs.append(RegionRow(a, b, name, mergeable, rr, ksm_bytes))
            regs.sort(key=lambda r: (r.start == 0, r.start))
            st = stats.get(tgid)
            rows.append(
                ProcessRow(
                    pid=tgid,
                    comm=self._comm(tgid),
                    rates=rates[tgid],
                    wp_mergeable=mrates.get(tgid, {}).get("wp", _ZERO),
                    profit_bytes=st.process_profit if st else None,
                    merging_pages=st.merging_pages if st else None,
                    regions=regs,
                    unattributed=unattributed.get(tgid, 0),
                )
            )
        rows.sort(key=lambda r: (-r.rates["ksm_cow"].per_s, -r.rates["ksm_cow"].total, r.pid))
        cow = None
        if cow_ksm is not None:
            cow = self.cow_rates.update(t, {"m": {"cow_ksm": cow_ksm}})["m"]["cow_ksm"]
        # Which path counted (ksm_cow_fast/_walked) is for tests, not a drop.
        drops = {k: v for k, v in faults.stats.items() if not k.startswith("ksm_cow_")}
        if ksmd is not None:
            drops["ksmd_proc_drops"] = ksmd.scan.proc_drops
            drops["ksmd_page_drops"] = ksmd.scan.page_drops
        interval, self._last_t = t - self._last_t, t
        return FaultsReport(interval, rows, cow, ksmd is not None, drops)
