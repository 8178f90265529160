"""Per-process and per-region KSM fault and merge state, from probe snapshots.

Pure Python over typed records (ksmtrace/probes/*, ksmtrace/kernel/*): the
commands, and later a coordinator or a dashboard, feed it snapshots and get
report records back. Regions: the fault probe counts per address range
from a small per-process table that the command pushes (the mergeable VMAs
this module saw in smaps: :attr:`FaultsState.wanted_regions`); ksmd's merges
come per page and are attributed here to the same ranges, or to the VMA that
holds the page now.

Over 400 lines: the interval's state and the reads it decides (look, relook,
recheck, and when the last report can be carried over: what each costs and
when it is enough) are one cost model (issue #14) and stay together.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ksmtrace.errors import AccessDenied, ProcessGone
from ksmtrace.kernel.proc_events import ProcEvent
from ksmtrace.kernel.procfs import KsmStat, ProcFS, Vma
from ksmtrace.model.rates import Rate, Rates
from ksmtrace.probes.faults import FaultSnapshot, ProcFaults
from ksmtrace.probes.ksmd import KsmdSnapshot

COUNTERS = ("ksm_cow", "wp", "merges", "unmerges")
# Quiet processes read again per update, round-robin (see FaultsState.update).
REFRESH_PER_UPDATE = 8
# Processes with nothing counted yet read for the first time per update.
QUIET_LOOKS_PER_UPDATE = 32
# A moving process's smaps is read at least this often (see FaultsState._relook).
FULL_LOOK_EVERY = 10
_ZERO = Rate(0, 0.0, 0)


@dataclass(frozen=True)
class RegionRow:
    start: int
    end: int
    name: str
    mergeable: bool
    rates: dict[str, Rate]
    ksm_bytes: int | None  # smaps "KSM:" (features.FEATURES["smaps_ksm"]): merged as of ksmd's last visit
    made_by_daemon: bool = False  # ksmtrace daemon made it mergeable (its range book)

    def as_dict(self) -> dict[str, object]:
        return {
            "start": self.start,
            "end": self.end,
            "name": self.name,
            "mergeable": self.mergeable,
            "ksm_bytes": self.ksm_bytes,
            "made_by_daemon": self.made_by_daemon,
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
    rmap_items: int | None = None  # ksm_stat ksm_rmap_items: ksmd's bookkeeping for it

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
            "rmap_items": self.rmap_items,
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


@dataclass
class _Seen:
    """One process as the last look at it found it."""

    counts: dict[str, int]  # its cumulative counters then: unchanged means nothing to re-read
    regions: bool  # whether smaps was read
    vmas: list[Vma]
    stat: KsmStat | None
    region_counts: dict[tuple[int, int, int], dict[str, int]]
    wp_mergeable: int
    unattributed: int
    spans: tuple[tuple[int, int], ...] = ()  # every mapping's bounds then (smaps == maps)
    light: int = 0  # cheap reads (FaultsState._relook) since its smaps was last read
    # region_counts and wp_mergeable keyed for the rate state, with the ident they were keyed with
    keyed: dict[tuple[int, int, int, int], dict[str, int]] = field(default_factory=dict)
    wp_keyed: dict[str, int] = field(default_factory=dict)
    keyed_ident: int | None = None


@dataclass
class _Inputs:
    """What an update is computed from, to tell an update that moved nothing."""

    procs: dict[int, ProcFaults]
    idents: dict[int, int]
    ksmd: dict[int, tuple[int, int]] | None
    pages: object  # the ksmd probe's page map: the same object until it is read again
    cow_ksm: int | None
    drops: dict[str, int]
    keep: object
    regions: bool
    made: object

    @staticmethod
    def of(
        faults: FaultSnapshot,
        ksmd: KsmdSnapshot | None,
        cow_ksm: int | None,
        keep: object,
        regions: bool,
        made: object,
    ) -> _Inputs:
        return _Inputs(
            dict(faults.procs),
            dict(faults.idents),
            None if ksmd is None else {tg: (k.merges, k.unmerges) for tg, k in ksmd.procs.items()},
            None if ksmd is None else ksmd.pages,
            cow_ksm,
            {
                **faults.stats,
                **({} if ksmd is None else {"p": ksmd.scan.proc_drops, "g": ksmd.scan.page_drops}),
            },
            keep,
            regions,
            made,
        )

    def same(self, other: _Inputs) -> bool:
        return (
            len(self.procs) == len(other.procs)
            and all(other.procs.get(tg) is pf for tg, pf in self.procs.items())
            and self.idents == other.idents
            and self.ksmd == other.ksmd
            and self.pages is other.pages
            and self.cow_ksm == other.cow_ksm
            and self.drops == other.drops
            and self.keep is other.keep
            and self.regions == other.regions
            and self.made == other.made
        )


class FaultsState:
    def __init__(self, t0: float, cow_ksm0: int | None = None, proc: ProcFS | None = None) -> None:
        """``t0``: when the probes were loaded (their counters were zero then);
        ``cow_ksm0``: /proc/vmstat cow_ksm read at that moment."""
        self.proc = proc or ProcFS()
        # pid -> (start, end, dup pages) ksmtrace daemon made mergeable; the caller sets it
        self.made: Mapping[int, Sequence[tuple[int, int, int]]] = {}
        self.rates = Rates()
        self.region_rates = Rates()
        self.wp_mg_rates = Rates()
        self.cow_rates = Rates()
        self.comms: dict[int, str] = {}
        self._last_t = t0
        # Mergeable ranges per process seen at the last update: the command
        # pushes them into the fault probe's region table.
        self.wanted_regions: dict[int, list[tuple[int, int]]] = {}
        # What the last look at each process found (see update()).
        self._seen: dict[int, _Seen] = {}
        # tgid -> the fault probe's ident of its counts (FaultSnapshot.idents)
        self._idents: dict[int, int] = {}
        self._refresh_after = 0
        self._pages_src: Mapping[tuple[int, int], tuple[int, int]] | None = None  # see _pages_by_tgid
        # see _carry: the inputs, the report, and whether that report moved nothing
        self._last: tuple[_Inputs, FaultsReport, bool] | None = None
        self._renamed = False  # an exec or exit since the last update
        self._pages_grouped: dict[int, list[tuple[int, int, int]]] = {}
        for r in (self.rates, self.region_rates, self.wp_mg_rates):
            r.start(t0)
        if cow_ksm0 is not None:
            self.cow_rates.update(t0, {"m": {"cow_ksm": cow_ksm0}})

    def apply_events(self, events: Iterable[ProcEvent]) -> set[int]:
        """Exec renames, exit of a process forgets it; returns tgids to prune."""
        gone: set[int] = set()
        for ev in events:
            if ev.kind in ("exec", "exit"):
                self._renamed = True  # a row's name or life changed: no carried report (_carry)
            if ev.kind == "exec":
                self.comms.pop(ev.tgid, None)  # re-read on next use
            elif ev.kind == "exit" and ev.pid == ev.tgid:
                self.comms.pop(ev.tgid, None)
                self._seen.pop(ev.tgid, None)
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

    def _refresh_order(self, stale: list[int]) -> list[int]:
        """The next few quiet processes, round-robin, to read again (ksm_stat's
        profit moves when ksmd rescans; new VMAs appear without faults)."""
        if not stale:
            return []
        stale.sort()
        i = bisect.bisect_right(stale, self._refresh_after)
        pick = (stale[i:] + stale[:i])[:REFRESH_PER_UPDATE]
        self._refresh_after = pick[-1]
        return pick

    def _look(
        self,
        tgid: int,
        counts: dict[str, int],
        pf: ProcFaults | None,
        pages: list[tuple[int, int, int]],
        regions: bool,
    ) -> _Seen:
        """Read one process's mappings and ksm_stat and attribute its counts to regions."""
        try:
            vmas = self.proc.smaps(tgid) if regions else []
            stat = self.proc.ksm_stat(tgid)
        except (ProcessGone, AccessDenied):
            # Exited during the interval: its counts still belong in this
            # report (they are part of cow_ksm), only its regions are gone.
            vmas, stat = [], None
        spans = tuple((v.start, v.end) for v in vmas)
        return self._attribute(tgid, counts, pf, pages, regions, vmas, stat, spans, 0)

    def _relook(
        self,
        tgid: int,
        counts: dict[str, int],
        pf: ProcFaults | None,
        pages: list[tuple[int, int, int]],
        seen: _Seen,
    ) -> _Seen | None:
        """A process whose counts moved, read cheaply: with merges traced, while
        its mappings are the same (maps: no page-table walk), its counts are
        attributed to the regions kept from its last whole read and only
        ksm_stat is read again; every FULL_LOOK_EVERY-th read of a moving
        process is whole. While ksmd merges a thousand processes every one of them moves
        each interval: their smaps are then read a tenth as often (issue #14).
        The cost: regions' KSM sizes (smaps) up to that many moves old (a
        quiet process's do not move: with merges traced, they change only
        with counts).
        None: read it whole."""
        if seen.light >= FULL_LOOK_EVERY - 1:
            return None
        got = self._stat_if_unmoved(tgid, seen)
        if got is None:
            return None
        return self._attribute(tgid, counts, pf, pages, True, seen.vmas, got[0], seen.spans, seen.light + 1)

    def _attribute(
        self,
        tgid: int,
        counts: dict[str, int],
        pf: ProcFaults | None,
        pages: list[tuple[int, int, int]],
        regions: bool,
        vmas: list[Vma],
        stat: KsmStat | None,
        spans: tuple[tuple[int, int], ...],
        light: int,
    ) -> _Seen:
        region_counts: dict[tuple[int, int, int], dict[str, int]] = {}
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
        unattributed = 0
        for addr, m, u in pages:
            i = bisect.bisect_right(starts, addr) - 1
            if i >= 0 and addr < ranges[i][1]:
                key = (tgid, *ranges[i])
            else:
                j = bisect.bisect_right(vstarts, addr) - 1
                if j < 0 or addr >= vmas[j].end:
                    unattributed += 1
                    continue
                key = (tgid, vmas[j].start, vmas[j].end)
            row = region_counts.setdefault(key, dict.fromkeys(COUNTERS, 0))
            row["merges"] += m
            row["unmerges"] += u
        # Kept until the next look: only the mappings rows can name (mergeable,
        # or holding counted regions), without smaps' other sizes. A thousand
        # processes' full smaps held ~80 KiB each.
        keys = [(a, b) for (_, a, b) in region_counts if a]
        kept = [
            replace(v, sizes={"KSM": v.sizes["KSM"]} if "KSM" in v.sizes else {})
            for v in vmas
            if v.mergeable or any(a < v.end and b > v.start for a, b in keys)
        ]
        return _Seen(dict(counts), regions, kept, stat, region_counts, mg_wp, unattributed, spans, light)

    def _recheck(self, tgid: int, seen: _Seen) -> bool:
        """A quiet process's turn to be read again, cheaply: with merges traced,
        its regions' KSM sizes move only with counts that would have moved, so
        while its mappings are the same (maps, which walks no page table,
        unlike smaps) only its ksm_stat is read (profit moves as ksmd scans).
        False: read it whole."""
        got = self._stat_if_unmoved(tgid, seen)
        if got is None:
            return False
        seen.stat = got[0]
        return True

    def _stat_if_unmoved(self, tgid: int, seen: _Seen) -> tuple[KsmStat | None] | None:
        """ksm_stat read again, in a 1-tuple, when the process's mappings are
        those of its last smaps read (maps, which walks no page table); None
        when they moved, were never read, or the process is gone: read it whole."""
        if not seen.regions or not seen.spans:
            return None
        try:
            if self.proc.map_spans(tgid) != seen.spans:
                return None
            return (self.proc.ksm_stat(tgid),)
        except (ProcessGone, AccessDenied):
            return None

    def _pages_by_tgid(self, ksmd: KsmdSnapshot | None) -> dict[int, list[tuple[int, int, int]]]:
        """ksmd's per-page merges grouped by process, grouped again only when
        the probe read its page map again (it hands out the same mapping
        until a merge or unmerge happened): a quarter of a million merged
        pages took ~0.1 s to group, every interval (issue #14)."""
        if ksmd is None:
            return {}
        if ksmd.pages is not self._pages_src:
            grouped: dict[int, list[tuple[int, int, int]]] = {}
            for (tgid, addr), (m, u) in ksmd.pages.items():
                grouped.setdefault(tgid, []).append((addr, m, u))
            self._pages_src, self._pages_grouped = ksmd.pages, grouped
        return self._pages_grouped

    def update(
        self,
        faults: FaultSnapshot,
        ksmd: KsmdSnapshot | None,
        cow_ksm: int | None,
        keep: Callable[[int, str], bool] = lambda pid, comm: True,
        regions: bool = True,
    ) -> FaultsReport:
        """One interval's report. Work is proportional to what happened: only
        processes whose counters moved (or that are new) have their smaps and
        ksm_stat read again; the others keep what was read before, and a few
        of them are refreshed per update (REFRESH_PER_UPDATE), so that a
        host of a thousand quiet mergeable processes costs little. When
        nothing moved at all, not even in the last interval, the report is
        the last one carried over (:meth:`_carry`)."""
        t = faults.t
        inputs = _Inputs.of(faults, ksmd, cow_ksm, keep, regions, self.made)
        carried, refresh = self._carry(t, faults, ksmd, inputs)
        self._renamed = False
        if carried is not None:
            return carried
        # Rates are keyed by (tgid, ident): a pid reused by a new process has
        # a new ident (its own probe slot), so its counts start at zero.
        ident = faults.idents
        for tgid, i in ident.items():
            if self._idents.get(tgid, i) != i:
                self._seen.pop(tgid, None)  # another process: read its mappings again
        self._idents = dict(ident)
        per: dict[int, dict[str, int]] = {
            tgid: {"ksm_cow": c.total.ksm_cow, "wp": c.total.wp, "merges": 0, "unmerges": 0}
            for tgid, c in faults.procs.items()
        }
        if ksmd is not None:
            for tgid, k in ksmd.procs.items():
                if tgid == 0:
                    continue
                row = per.get(tgid)
                if row is None:
                    per[tgid] = row = dict.fromkeys(COUNTERS, 0)
                row["merges"], row["unmerges"] = k.merges, k.unmerges
        keyed: dict[tuple[int, int], dict[str, int]] = {(tg, ident.get(tg, 0)): v for tg, v in per.items()}
        # Exited processes whose pid a new one took within the interval: their last counts.
        for tgid, old, pf in faults.exited:
            last = {**dict.fromkeys(COUNTERS, 0), "ksm_cow": pf.total.ksm_cow, "wp": pf.total.wp}
            keyed[(tgid, old)] = last
        by_key = self.rates.update(t, keyed)
        rates = {tg: by_key[(tg, ident.get(tg, 0))] for tg in per}

        self.wanted_regions = {}
        merged_pages = self._pages_by_tgid(ksmd)
        stale = [tgid for tgid in self._seen if tgid in per and self._seen[tgid].counts == per[tgid]]
        if refresh is None:
            refresh = set(self._refresh_order(stale))
        shown: list[int] = []
        quiet_looks = 0
        for tgid, counts in per.items():
            seen = self._seen.get(tgid)
            if seen is None and not any(counts.values()):
                # Nothing counted since tracing started: not in the report, and
                # reading its smaps now only readies its region rows. A thousand
                # such processes at start cost seconds before the first report
                # (issue #14): a few per update, the rest when they first move.
                if quiet_looks >= QUIET_LOOKS_PER_UPDATE:
                    continue
                quiet_looks += 1
            if (
                seen is not None
                and seen.counts != counts
                and seen.regions == regions
                and ksmd is not None
                and (
                    light := self._relook(
                        tgid, counts, faults.procs.get(tgid), merged_pages.get(tgid, []), seen
                    )
                )
            ):
                self._seen[tgid] = seen = light
            elif (
                seen is None
                or seen.counts != counts
                or seen.regions != regions
                or (tgid in refresh and not (ksmd is not None and self._recheck(tgid, seen)))
            ):
                comm = self._comm(tgid)
                if not keep(tgid, comm):
                    continue
                seen = self._look(tgid, counts, faults.procs.get(tgid), merged_pages.get(tgid, []), regions)
                self._seen[tgid] = seen
                self.wanted_regions[tgid] = [(v.start, v.end) for v in seen.vmas if v.mergeable]
            if any(counts.values()):
                shown.append(tgid)
        # Region and in-mergeable counters of every process read so far, keyed
        # for the rate state once per look (not rebuilt every update: a
        # thousand quiet processes, issue #14); rows are made for shown ones only.
        region_keyed: dict[tuple[int, int, int, int], dict[str, int]] = {}
        wp_mg: dict[tuple[int, int], dict[str, int]] = {}
        for tgid, seen in self._seen.items():
            if tgid in per:
                i = ident.get(tgid, 0)
                if seen.keyed_ident != i:
                    seen.keyed = {(tgid, i, a, b): v for (_, a, b), v in seen.region_counts.items()}
                    seen.wp_keyed = {"wp": seen.wp_mergeable}
                    seen.keyed_ident = i
                region_keyed.update(seen.keyed)
                wp_mg[(tgid, i)] = seen.wp_keyed
        rrates = self.region_rates.update(t, region_keyed)
        mrates = self.wp_mg_rates.update(t, wp_mg)

        rows: list[ProcessRow] = []
        for tgid in shown:
            seen = self._seen[tgid]
            vmas = seen.vmas
            by_start = {v.start: v for v in vmas}
            vstarts = [v.start for v in vmas]
            regs = []
            for key in seen.keyed:
                _, _, a, b = key
                rr = rrates[key]
                if (a, b) == (0, 0):
                    regs.append(RegionRow(0, 0, "(other)", False, rr, None))
                    continue
                j = bisect.bisect_right(vstarts, a) - 1
                v = by_start.get(a) or (vmas[j] if j >= 0 and a < vmas[j].end else None)
                name = v.name if v else "(unmapped)"
                mergeable = bool(v and v.mergeable)
                ksm_bytes = v.ksm_bytes if v and (v.start, v.end) == (a, b) else None
                ours = any(s <= a and b <= e for s, e, _ in self.made.get(tgid, ()))
                regs.append(RegionRow(a, b, name, mergeable, rr, ksm_bytes, ours))
            regs.sort(key=lambda r: (r.start == 0, r.start))
            st = seen.stat
            rows.append(
                ProcessRow(
                    pid=tgid,
                    comm=self._comm(tgid),
                    rates=rates[tgid],
                    wp_mergeable=mrates.get((tgid, ident.get(tgid, 0)), {}).get("wp", _ZERO),
                    profit_bytes=st.process_profit if st else None,
                    merging_pages=st.merging_pages if st else None,
                    regions=regs,
                    unattributed=seen.unattributed,
                    rmap_items=st.rmap_items if st else None,
                )
            )
        for tgid, old, _pf in faults.exited:
            if tgid not in self._seen:
                continue  # its pid is filtered out
            # Its regions went with it; the row keeps its last interval in the sums.
            rows.append(ProcessRow(tgid, "(exited)", by_key[(tgid, old)], _ZERO, None, None))
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
        report = FaultsReport(interval, rows, cow, ksmd is not None, drops)
        quiet = not any(r.comm == "(exited)" or any(v.delta for v in r.rates.values()) for r in rows)
        self._last = (inputs, report, quiet)
        return report

    def _carry(
        self, t: float, faults: FaultSnapshot, ksmd: KsmdSnapshot | None, inputs: _Inputs
    ) -> tuple[FaultsReport | None, set[int] | None]:
        """The last report again, when neither this interval nor the last one
        moved anything: the same processes with the same counts (the probe
        hands out the very records it decoded before), no exit, no pending
        first read, every rate zero. Only the quiet processes' turn to be
        read again is taken (their ksm_stat profit moves as ksmd scans); one
        whose mappings moved sends the update the whole way, with the same
        turn (returned). On a host of a thousand quiet processes this is
        most intervals (issue #14: 2% of a core per interval)."""
        last = self._last
        if last is None or ksmd is None or self._renamed or faults.exited or not last[0].same(inputs):
            return None, None
        report = last[1]
        if not last[2]:  # an exit or a delta in the last report (judged once, when it was made)
            return None, None
        if (report.cow_ksm is not None and report.cow_ksm.delta) or not all(
            r.still() for r in (self.rates, self.region_rates, self.wp_mg_rates, self.cow_rates)
        ):
            return None, None
        present = [tg for tg in (*faults.procs, *(tg for tg in ksmd.procs if tg not in faults.procs)) if tg]
        if any(tg not in self._seen for tg in present):
            return None, None  # first reads still pending (QUIET_LOOKS_PER_UPDATE)
        refresh = set(self._refresh_order(present))
        stats = {}
        for tgid in refresh:
            seen = self._seen[tgid]
            before = seen.stat
            if not self._recheck(tgid, seen):
                return None, refresh
            stats[tgid] = (before, seen.stat)
        rows = [
            replace(
                r,
                profit_bytes=st.process_profit if st else None,
                merging_pages=st.merging_pages if st else None,
                rmap_items=st.rmap_items if st else None,
            )
            if r.pid in stats and (st := stats[r.pid][1]) != stats[r.pid][0]
            else r
            for r in report.processes
        ]
        for r in (self.rates, self.region_rates, self.wp_mg_rates, self.cow_rates):
            r.carry(t)
        self.wanted_regions = {}
        interval, self._last_t = t - self._last_t, t
        carried = replace(report, interval=interval, processes=rows)
        self._last = (inputs, carried, True)
        return carried, None
