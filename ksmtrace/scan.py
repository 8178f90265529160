"""What KSM would save: the duplicate estimate, as typed records.

Candidate regions come from smaps (only private anonymous memory can merge;
every other mapping is listed with the reason). The native scanner reads them
without stopping the processes, tells contents apart by 128-bit hash (false
duplicate odds at most n^2/2^129 for n pages) or, with ``confirm_bytes``, byte
by byte, and applies the kernel's own rules (``max_page_sharing``, ``use_zero_pages``); this module
turns its numbers into :class:`Estimate` records for the views and commands,
with what the scan itself cost (:class:`ScanCost`).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace

from ksmtrace import native
from ksmtrace.errors import AccessDenied, KsmtraceError, ProcessGone, UsageError
from ksmtrace.kernel import ksm_sysfs
from ksmtrace.kernel.procfs import ProcFS, Vma

# Progress is reported, and Ctrl-C noticed, after every chunk of this size.
CHUNK = 64 << 20

Progress = Callable[[int, int, int], None]  # (done_bytes, total_bytes, pid)


@dataclass(frozen=True)
class SkippedRegion:
    start: int
    end: int
    name: str
    reason: str


@dataclass(frozen=True)
class PageRun:
    """Duplicate pages of a region close together (gaps of at most the gap asked
    for joined in); [start, end) page aligned. ``dup_pages`` counts KSM pages too."""

    start: int
    end: int
    dup_pages: int
    ksm_pages: int

    @property
    def pages(self) -> int:
        return (self.end - self.start) // native.PAGE


@dataclass(frozen=True)
class RegionEstimate:
    """One scanned mapping. Page counts; ``saved_share`` is fractional."""

    pid: int
    start: int
    end: int
    name: str
    mergeable: bool  # VM_MERGEABLE already
    present: int
    zero: int
    zero_mapped: int
    ksm: int
    volatile_pages: int
    dup_region: int
    dup_process: int
    dup_cross: int
    saved_alone: int
    saved_share: float
    runs: tuple[PageRun, ...] = ()  # only when estimate() was given runs_gap

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def duplicates(self) -> int:
        return self.dup_region + self.dup_process + self.dup_cross

    @property
    def saving_ratio(self) -> float:
        return self.saved_share / self.present if self.present else 0.0


@dataclass(frozen=True)
class ProcessEstimate:
    pid: int
    comm: str
    regions: tuple[RegionEstimate, ...]
    skipped: tuple[SkippedRegion, ...]
    saved_alone: int  # if only this process's memory merged
    saved_share: float  # its share when every scanned process merges

    def total(self, name: str) -> int:
        return sum(getattr(r, name) for r in self.regions)


@dataclass(frozen=True)
class ScanCost:
    """What one estimate cost this process: time, bytes read, memory.

    ``bytes_read`` is the memory scanned; ``bytes_refetched`` the first pages
    of contents read again to confirm duplicates byte by byte (it depends on
    which copy of a content the workers happened to index first).
    ``index_bytes`` is the duplicate index's peak (bounded per scanned page,
    see native/internal.h); ``peak_rss_bytes`` this process's peak resident
    memory during the scan (``peak_rss_reset``), or over its whole life where
    the kernel did not let the peak be reset; ``rss_before_bytes`` its resident
    memory when the scan began, so the growth is the difference.
    """

    seconds: float
    cpu_seconds: float  # every thread of this process: the workers run in parallel
    bytes_read: int
    bytes_refetched: int
    index_bytes: int
    peak_rss_bytes: int
    rss_before_bytes: int
    peak_rss_reset: bool


@dataclass(frozen=True)
class Estimate:
    page_size: int
    max_page_sharing: int
    use_zero_pages: bool
    processes: tuple[ProcessEstimate, ...]
    totals: dict[str, int]
    seconds: float
    gone: tuple[int, ...] = ()  # exited before or during the scan, left out
    denied: tuple[int, ...] = ()
    cost: ScanCost | None = None  # None only for records not made by estimate()
    runs_gap: int | None = None  # regions' runs found with this gap; None: not looked for

    @property
    def saved(self) -> int:
        return self.totals["saved"]

    @property
    def saved_across(self) -> int:
        """Pages saved only because processes merge with each other."""
        return self.totals["saved"] - self.totals["saved_within"]

    def region(self, pid: int, start: int) -> RegionEstimate | None:
        for p in self.processes:
            for r in p.regions:
                if r.pid == pid and r.start == start:
                    return r
        return None

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["saved_across"] = self.saved_across
        if self.runs_gap is None:  # not looked for: no empty lists that would say "none found"
            del out["runs_gap"]
            for p in out["processes"]:  # type: ignore[attr-defined]
                for r in p["regions"]:
                    del r["runs"]
        return out


@dataclass
class _Target:
    pid: int
    comm: str
    scan: list[Vma] = field(default_factory=list)
    skipped: list[SkippedRegion] = field(default_factory=list)


def kernel_rules() -> tuple[int, bool]:
    """max_page_sharing and use_zero_pages as this kernel has them now."""
    sysfs = ksm_sysfs.read()
    mps = sysfs.get("max_page_sharing", 256)
    uzp = sysfs.get("use_zero_pages", 0)
    return int(mps) if isinstance(mps, int) else 256, bool(uzp)


def _clip(v: Vma, ranges: list[tuple[int, int]]) -> list[Vma]:
    """The parts of v inside ranges, with Rss scaled (it only steers the progress bar)."""
    out = []
    for lo, hi in ranges:
        a, b = max(lo, v.start), min(hi, v.end)
        if a < b:
            sizes = dict(v.sizes)
            sizes["Rss"] = v.sizes.get("Rss", v.length) * (b - a) // v.length
            out.append(replace(v, start=a, end=b, sizes=sizes))
    return out


def _mappings_for_ranges(proc: ProcFS, pid: int) -> list[Vma]:
    """The mappings of a process scanned in given ranges (the coordinator's
    re-estimates of candidates): from maps when KSM has none of the process
    (ksm_stat: not in KSM), else from smaps.

    smaps walks the page tables of every mapping to count its sizes, a fixed
    2 ms plus 12 ms per GiB mapped, a sixth of scanning 256 MiB; maps does
    not. What maps lacks are VmFlags, and of those the scan needs only
    ``mg``, which a process out of KSM cannot use: a mapping that keeps it
    after ``run=2`` took the process out of KSM is never scanned by ksmd
    again, and has no KSM page. The other flags that rule a mapping out
    (hugetlb, PFN, I/O, mixed, special) belong to mappings of files or
    named specials, which maps shows and ``why_not_mergeable`` refuses. Sizes
    only steer the progress bar: the lengths stand in.
    """
    stat = proc.ksm_stat(pid)
    if stat is not None and stat.opted_in is False:
        return proc.maps(pid)
    return proc.smaps(pid)


def _targets(
    pids: Iterable[int],
    proc: ProcFS,
    only: Callable[[int, Vma], bool] | None,
    ranges: dict[int, list[tuple[int, int]]] | None,
    strict: bool = False,
) -> tuple[list[_Target], list[int], list[int]]:
    targets, gone, denied = [], [], []
    for pid in pids:
        try:
            status = proc.status(pid)
            if status.is_kernel_thread:
                if strict:
                    raise UsageError(f"pid {pid} ({status.comm}) is a kernel thread: it has no user memory")
                continue
            t = _Target(pid, status.comm)
            if ranges is not None and pid in ranges:
                vmas = [piece for v in _mappings_for_ranges(proc, pid) for piece in _clip(v, ranges[pid])]
            else:
                vmas = proc.smaps(pid)
            for v in vmas:
                if only is not None and not only(pid, v):
                    continue
                why = v.why_not_mergeable()
                if why:
                    t.skipped.append(SkippedRegion(v.start, v.end, v.name, why))
                elif v.sizes.get("Rss", 1) or v.mergeable:
                    # Rss 0: nothing to merge (pages on the zero page are not in Rss);
                    # mergeable ones still are, for the pages KSM put on the zero page.
                    t.scan.append(v)
            targets.append(t)
        except ProcessGone:
            gone.append(pid)
        except AccessDenied:
            denied.append(pid)
    return targets, gone, denied


def estimate(
    pids: Iterable[int],
    *,
    strict: bool = True,
    progress: Progress | None = None,
    only: Callable[[int, Vma], bool] | None = None,
    ranges: dict[int, list[tuple[int, int]]] | None = None,
    proc: ProcFS | None = None,
    rules: tuple[int, bool] | None = None,
    batch_pages: int = 0,
    workers: int = 0,
    confirm_bytes: bool = False,
    runs_gap: int | None = None,
) -> Estimate:
    """Scan ``pids`` and predict what KSM would save if their candidate memory merged.

    ``strict``: a pid that exits (or refuses us) is an error; otherwise it is
    left out, the scan restarts without it (its pages would skew the
    duplicate counts) and it is listed in ``gone``/``denied``.
    ``only(pid, vma)`` selects mappings (default: all); ``ranges`` (pid ->
    [(start, end)]) limits the scan of those pids to those address ranges, cut
    at mapping edges: each piece is a region of its own. ``workers``: threads
    that copy and hash (0: one per CPU this process may run on, at most 4).
    ``confirm_bytes``: tell contents apart by comparing bytes (each duplicate's
    first copy re-read from its process: exact, slower when duplicates are
    mostly distinct contents) instead of by 128-bit hash (odds of a false
    duplicate at most n^2/2^129 for n pages: see native/internal.h).
    ``runs_gap``: also find each region's runs of duplicate pages, joining
    runs at most that many pages apart (``RegionEstimate.runs``; None: not).
    """
    proc = proc or ProcFS()
    mps, uzp = rules or kernel_rules()
    todo = list(dict.fromkeys(pids))
    gone: list[int] = []
    denied: list[int] = []
    while True:
        targets, g, d = _targets(todo, proc, only, ranges, strict)
        if strict and (g or d):
            raise ProcessGone(g[0]) if g else AccessDenied(d[0])
        gone += g
        denied += d
        try:
            how = (batch_pages, workers, confirm_bytes, runs_gap)
            return _scan(targets, mps, uzp, progress, how, tuple(gone), tuple(denied))
        except _TargetFailed as exc:
            if strict:
                raise exc.error from None
            (gone if isinstance(exc.error, ProcessGone) else denied).append(exc.pid)
            todo = [t.pid for t in targets if t.pid != exc.pid]


class _TargetFailed(Exception):
    def __init__(self, pid: int, error: KsmtraceError) -> None:
        self.pid, self.error = pid, error


def _scan(
    targets: list[_Target],
    mps: int,
    uzp: bool,
    progress: Progress | None,
    how: tuple[int, int, bool, int | None],  # batch_pages, workers, confirm_bytes, runs_gap
    gone: tuple[int, ...],
    denied: tuple[int, ...],
) -> Estimate:
    batch_pages, workers, confirm_bytes, runs_gap = how
    # The peak restarts here, so the one read at the end is this scan's.
    rss0, _, reset = native.self_memory(reset_peak=True)
    t0, cpu0 = time.monotonic(), time.process_time()
    sc = native.Scanner(mps, uzp, batch_pages, workers, confirm_bytes)
    order: list[tuple[_Target, Vma]] = []
    total = sum(v.sizes.get("Rss", v.length) for t in targets for v in t.scan)
    done = 0
    for t in targets:
        for v in t.scan:
            idx = sc.add_region(t.pid, v.start, v.end, check_ksm=v.mergeable)
            order.append((t, v))
            rss = v.sizes.get("Rss", v.length)
            at = v.start
            while at < v.end:
                nxt = min(v.end, at + CHUNK)
                try:
                    sc.scan(idx, at, nxt)
                except OSError as exc:
                    if exc.errno in (errno.ESRCH, errno.ENOENT):
                        raise _TargetFailed(t.pid, ProcessGone(t.pid, "during the scan")) from None
                    if exc.errno in (errno.EPERM, errno.EACCES):
                        raise _TargetFailed(t.pid, AccessDenied(t.pid)) from None
                    raise KsmtraceError(f"scanning pid {t.pid}: {exc.strerror}") from None
                if progress:
                    progress(done + rss * (nxt - v.start) // v.length, total, t.pid)
                at = nxt
            done += rss
    rstats, pstats, totals = sc.finish(len(order))
    by_pid: dict[int, list[RegionEstimate]] = {t.pid: [] for t in targets}
    for idx, ((t, v), s) in enumerate(zip(order, rstats)):
        ints = {k: int(val) for k, val in s.items() if k != "saved_share"}
        by_pid[t.pid].append(
            RegionEstimate(
                pid=t.pid,
                start=v.start,
                end=v.end,
                name=v.name,
                mergeable=v.mergeable,
                saved_share=float(s["saved_share"]),
                runs=_runs(sc, idx, runs_gap),
                **ints,
            )
        )
    procs = tuple(
        ProcessEstimate(
            pid=t.pid,
            comm=t.comm,
            regions=tuple(by_pid[t.pid]),
            skipped=tuple(t.skipped),
            saved_alone=int(pstats.get(t.pid, {}).get("saved_alone", 0)),
            saved_share=float(pstats.get(t.pid, {}).get("saved_share", 0.0)),
        )
        for t in targets
    )
    seconds = time.monotonic() - t0
    cost = ScanCost(
        seconds=seconds,
        cpu_seconds=time.process_time() - cpu0,
        bytes_read=totals["bytes_read"],
        bytes_refetched=sc.order_counts.get("refetched", 0) * native.PAGE,
        index_bytes=totals["index_bytes"],
        peak_rss_bytes=native.self_memory()[1],
        rss_before_bytes=rss0,
        peak_rss_reset=reset,
    )
    return Estimate(
        page_size=native.PAGE,
        max_page_sharing=mps,
        use_zero_pages=uzp,
        processes=procs,
        totals=totals,
        seconds=seconds,
        gone=gone,
        denied=denied,
        cost=cost,
        runs_gap=runs_gap,
    )


def _runs(sc: native.Scanner, idx: int, gap: int | None) -> tuple[PageRun, ...]:
    if gap is None:
        return ()
    try:
        return tuple(PageRun(*r) for r in sc.runs(idx, gap))
    except OSError as exc:
        if exc.errno == errno.E2BIG:
            return ()  # a region of 8 TiB or more (at 4 KiB pages): no offsets kept for it
        raise KsmtraceError(f"runs of duplicate pages: {exc.strerror}") from None


def parse_range(text: str) -> tuple[int, int]:
    """START-END in hex (0x optional) or decimal with 0x; page aligned by the caller."""
    lo, sep, hi = text.partition("-")
    if not sep:
        raise UsageError(f"bad range {text!r}: expected START-END, e.g. 7f0000000000-7f0000100000")
    try:
        start, end = int(lo, 16), int(hi, 16)
    except ValueError:
        raise UsageError(f"bad range {text!r}: START and END are hexadecimal addresses") from None
    if start >= end:
        raise UsageError(f"bad range {text!r}: END must be above START")
    if start % native.PAGE or end % native.PAGE:
        raise UsageError(f"bad range {text!r}: START and END must be multiples of the page size")
    return start, end
