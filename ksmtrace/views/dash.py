"""The rows every dashboard shows: one machine row and a row per process.

``top``, the Prometheus metrics and the web page all start here, so that a
number means the same wherever it is shown: saved memory is pages_sharing
pages (what KSM's docs call the saving), ``general_profit`` is the kernel's
own net figure (savings less ksmd's rmap bookkeeping), rates are per second
over the last interval, KSM COW faults are the fault probe's exact counts.
The rmap ratio is ksm_rmap_items per merged page: above 64 (a 64-byte
rmap_item per 4 KiB page) ksmd spends more memory tracking the process
than merging saves it (KSM's admin guide, "Monitoring KSM profit").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ksmtrace.model.faults import RegionRow
from ksmtrace.model.inventory import MergeableProcess
from ksmtrace.model.snapshot import Snapshot

RMAP_RATIO_FLAG = 64.0

SORT_KEYS: dict[str, Callable[[ProcRow], float]] = {}  # filled below the class


@dataclass(frozen=True)
class MachineRow:
    wall: float
    saved_bytes: int  # pages_sharing x page size
    general_profit_bytes: int | None  # features: general_profit (6.1+)
    pages_shared: int
    pages_sharing: int
    pages_unshared: int
    pages_volatile: int
    full_scans_total: int
    full_scans_per_min: float | None
    pages_scanned_per_s: float | None
    ksmd_cpu_pct: float | None  # of one CPU
    ksm_cow_per_s: float  # the fault probe's sum over processes
    cow_ksm_per_s: float | None  # /proc/vmstat cow_ksm (6.1+), the kernel's own count
    cow_ksm_total: int | None
    merges_per_s: float | None  # ksm:* tracepoints (6.4+)
    unmerges_per_s: float | None
    run: int  # 0 stopped, 1 running, 2 unmerging
    advisor: str | None  # advisor_mode (6.8+): none or scan-time
    pages_to_scan: int | None
    sleep_millisecs: int | None
    processes: int  # mergeable processes in the report
    interval_s: float | None

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ProcRow:
    pid: int
    comm: str
    how: str  # madvise, prctl, exec, fork:PPID, daemon, or "" when not known
    merging_pages: int | None
    profit_bytes: int | None
    ksm_cow_per_s: float
    merges_per_s: float
    unmerges_per_s: float
    ksm_cow_total: int
    merges_total: int
    unmerges_total: int
    rmap_items: int | None
    regions: Sequence[RegionRow] = field(default_factory=tuple)

    @property
    def rmap_ratio(self) -> float | None:
        """rmap items per merged page (None when nothing is merged)."""
        if self.rmap_items is None or not self.merging_pages:
            return None
        return self.rmap_items / self.merging_pages

    @property
    def rmap_flag(self) -> bool:
        r = self.rmap_ratio
        return r is not None and r > RMAP_RATIO_FLAG

    def as_dict(self, regions: bool = False) -> dict[str, object]:
        d: dict[str, object] = {k: v for k, v in self.__dict__.items() if k != "regions"}
        d["rmap_ratio"] = None if self.rmap_ratio is None else round(self.rmap_ratio, 3)
        d["rmap_flag"] = self.rmap_flag
        if regions:
            d["regions"] = [r.as_dict() for r in self.regions]
        return d


SORT_KEYS.update(
    {
        "ksm_cow": lambda r: r.ksm_cow_per_s,
        "profit": lambda r: r.profit_bytes or 0,
        "merging": lambda r: r.merging_pages or 0,
        "merges": lambda r: r.merges_per_s,
        "unmerges": lambda r: r.unmerges_per_s,
        "rmap": lambda r: r.rmap_ratio or 0.0,
        "pid": lambda r: -r.pid,  # ascending pids, like top's
        "comm": lambda r: 0.0,  # stable sort below keeps comm order
    }
)


def _int(d: dict[str, int | str], key: str) -> int | None:
    v = d.get(key)
    return v if isinstance(v, int) else None


def how(p: MergeableProcess) -> str:
    """The whole process's opt-in (prctl, exec, fork of one), else its regions'
    (madvise, daemon, fork:PPID), distinct ones joined by "+"."""
    if p.origin is not None:
        return str(p.origin)
    return "+".join(dict.fromkeys(str(o) for o in p.region_origins))


def machine(snap: Snapshot) -> MachineRow:
    c, k = snap.counters, snap.knobs
    page = snap.page_size
    f, kd = snap.faults, snap.ksmd
    cow = f.cow_ksm if f else None
    sharing = _int(c, "pages_sharing") or 0
    mode = k.get("advisor_mode")
    return MachineRow(
        wall=snap.wall,
        saved_bytes=sharing * page,
        general_profit_bytes=_int(c, "general_profit"),
        pages_shared=_int(c, "pages_shared") or 0,
        pages_sharing=sharing,
        pages_unshared=_int(c, "pages_unshared") or 0,
        pages_volatile=_int(c, "pages_volatile") or 0,
        full_scans_total=_int(c, "full_scans") or 0,
        full_scans_per_min=(kd.rounds * 60.0 / kd.interval_s) if kd and kd.interval_s > 0 else None,
        pages_scanned_per_s=kd.pages_scanned_per_s if kd else None,
        ksmd_cpu_pct=kd.cpu_pct if kd else None,
        ksm_cow_per_s=sum(p.rates["ksm_cow"].per_s for p in f.processes) if f else 0.0,
        cow_ksm_per_s=cow.per_s if cow else None,
        cow_ksm_total=cow.total if cow else snap.vmstat.get("cow_ksm"),
        merges_per_s=kd.merges_per_s if kd else None,
        unmerges_per_s=kd.unmerges_per_s if kd else None,
        run=_int(k, "run") or 0,
        advisor=mode if isinstance(mode, str) else None,
        pages_to_scan=_int(k, "pages_to_scan"),
        sleep_millisecs=_int(k, "sleep_millisecs"),
        processes=len(f.processes) if f else len(snap.processes),
        interval_s=f.interval if f else (kd.interval_s if kd else None),
    )


def processes(snap: Snapshot, reuse: Rows | None = None) -> list[ProcRow]:
    """A row per process of the fault report (or of the inventory without one),
    live processes only, sorted by KSM COW faults per second. ``reuse``: rows
    of an earlier call kept for records that are still the same objects."""
    rows: list[ProcRow] = []
    if snap.faults is not None:
        reuse = reuse if reuse is not None else Rows()  # a fresh one: every row built
        hows = reuse.hows(snap.processes)
        for p in snap.faults.processes:
            if p.comm == "(exited)":
                continue
            h = hows.get(p.pid, "")
            row = reuse.row(p, h)
            if row is None:
                r = p.rates
                row = reuse.keep(
                    p,
                    h,
                    ProcRow(
                        pid=p.pid,
                        comm=p.comm,
                        how=h,
                        merging_pages=p.merging_pages,
                        profit_bytes=p.profit_bytes,
                        ksm_cow_per_s=r["ksm_cow"].per_s,
                        merges_per_s=r["merges"].per_s,
                        unmerges_per_s=r["unmerges"].per_s,
                        ksm_cow_total=r["ksm_cow"].total,
                        merges_total=r["merges"].total,
                        unmerges_total=r["unmerges"].total,
                        rmap_items=p.rmap_items,
                        regions=tuple(p.regions),
                    ),
                )
            rows.append(row)
        reuse.done()
    else:
        hows = {p.pid: how(p) for p in snap.processes}
        for m in snap.processes:
            st = m.stat
            rows.append(
                ProcRow(
                    pid=m.pid,
                    comm=m.comm,
                    how=hows.get(m.pid, ""),
                    merging_pages=st.merging_pages if st else None,
                    profit_bytes=st.process_profit if st else None,
                    ksm_cow_per_s=0.0,
                    merges_per_s=0.0,
                    unmerges_per_s=0.0,
                    ksm_cow_total=0,
                    merges_total=0,
                    unmerges_total=0,
                    rmap_items=st.rmap_items if st else None,
                )
            )
    return sort(rows, "ksm_cow")


class Rows:
    """Rows reused from one interval to the next, for a view that redraws for
    a living (top, the daemon's board). The fault model carries a quiet
    process's record over as the very same object (issue #14), and the live
    sampler keeps each process's opt-in record until exit or exec: a row built
    from the same objects is the same row. At 1,000 quiet processes that is
    ~5 ms of CPU a refresh not spent (bench/bench_top.py).

    Entries are held with their objects, so an id is never mistaken for a
    new object's; those not seen in a call are dropped at its end."""

    def __init__(self) -> None:
        self._rows: dict[int, tuple[object, str, ProcRow]] = {}
        self._hows: dict[int, tuple[MergeableProcess, str]] = {}
        self._seen: dict[int, tuple[object, str, ProcRow]] = {}

    def __call__(self, snap: Snapshot) -> list[ProcRow]:
        return processes(snap, self)

    def hows(self, procs: Sequence[MergeableProcess]) -> dict[int, str]:
        kept: dict[int, tuple[MergeableProcess, str]] = {}
        for p in procs:
            got = self._hows.get(id(p))
            kept[id(p)] = got if got is not None and got[0] is p else (p, how(p))
        self._hows = kept
        return {p.pid: h for p, h in kept.values()}

    def row(self, record: object, how: str) -> ProcRow | None:
        got = self._rows.get(id(record))
        if got is None or got[0] is not record or got[1] != how:
            return None
        self._seen[id(record)] = got
        return got[2]

    def keep(self, record: object, how: str, row: ProcRow) -> ProcRow:
        self._seen[id(record)] = (record, how, row)
        return row

    def done(self) -> None:
        self._rows, self._seen = self._seen, {}


def sort(rows: list[ProcRow], key: str, reverse: bool = True) -> list[ProcRow]:
    """Rows by one of SORT_KEYS, largest first, ties by pid."""
    by_pid = sorted(rows, key=lambda r: r.comm if key == "comm" else r.pid)
    if key == "comm":
        return by_pid
    return sorted(by_pid, key=SORT_KEYS[key], reverse=reverse)


def matching(rows: list[ProcRow], text: str) -> list[ProcRow]:
    """Rows whose comm or pid contains ``text`` (top's filter)."""
    if not text:
        return rows
    return [r for r in rows if text in r.comm or text in str(r.pid)]


def top(rows: list[ProcRow], n: int, key: str = "profit") -> tuple[list[ProcRow], ProcRow | None]:
    """The first ``n`` rows by ``key`` and one ``other`` row summing the rest
    (None when nothing is left over): the bounded label set of the metrics."""
    ranked = sort(rows, key)
    kept, rest = ranked[:n], ranked[n:]
    if not rest:
        return kept, None

    def total(get: Callable[[ProcRow], float | int | None]) -> float:
        return sum(get(r) or 0 for r in rest)

    other = ProcRow(
        pid=0,
        comm="other",
        how="",
        merging_pages=int(total(lambda r: r.merging_pages)),
        profit_bytes=int(total(lambda r: r.profit_bytes)),
        ksm_cow_per_s=total(lambda r: r.ksm_cow_per_s),
        merges_per_s=total(lambda r: r.merges_per_s),
        unmerges_per_s=total(lambda r: r.unmerges_per_s),
        ksm_cow_total=int(total(lambda r: r.ksm_cow_total)),
        merges_total=int(total(lambda r: r.merges_total)),
        unmerges_total=int(total(lambda r: r.unmerges_total)),
        rmap_items=int(total(lambda r: r.rmap_items)),
    )
    return kept, other
