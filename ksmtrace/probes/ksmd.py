"""Load bpf/ksmd.bpf.c (the ksm:* tracepoints, Linux 6.4+) and decode its maps."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from ksmtrace.errors import TracingUnavailable, UsageError
from ksmtrace.kernel import btf, checks, features
from ksmtrace.kernel.signals import critical
from ksmtrace.probes import loader

MAX_PROCS = 8192
MAX_PAGES = 262144
# struct page_key {u32 tgid; u32 pad; u64 page} and struct page_merges {u64 merges, unmerges} (bpf/ksmd.h)
PAGE_KEY, PAGE_MERGES = "=IIQ", "=QQ"
PROC_KEY, PROC_COUNTS = "=I", "=6Q"  # u32 tgid; struct ksm_proc_counts (bpf/ksmd.h)
PAGE_SHIFT = 12


@dataclass(frozen=True)
class KsmProcCounts:
    merges: int
    merge_fails: int
    zero_merges: int
    unmerges: int
    enters: int
    exits: int


@dataclass(frozen=True)
class ScanState:
    rounds: int
    total_ns: int
    max_ns: int
    last_ns: int
    last_seq: int
    last_rmap_entries: int
    starts: int
    ksm_pages_freed: int
    advisor_events: int
    advisor_scan_time: int
    advisor_pages_to_scan: int
    advisor_cpu_percent: int
    proc_drops: int
    page_drops: int


@dataclass(frozen=True)
class KsmdSnapshot:
    t: float
    procs: dict[int, KsmProcCounts]  # tgid 0: mm without an owner (exiting)
    scan: ScanState
    pages: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    """(tgid, page address) -> (merges, unmerges)"""


def available() -> bool:
    """Whether the ksm:* tracepoints exist (features.FEATURES["ksm_tracepoints"]): detected, not versioned."""
    return checks.tracepoint_exists("ksm", "ksm_start_scan") and checks.tracepoint_exists(
        "ksm", "ksm_merge_with_ksm_page"
    )


MAX_FILTER_PIDS = 64  # FILTER_TGIDS is an unrolled compare per event


class KsmdProbe:
    def __init__(
        self,
        pid: int | None = None,
        max_procs: int | None = None,
        max_pages: int | None = None,
        pids: Iterable[int] | None = None,
    ) -> None:
        """``pid``/``pids``: count only these processes (in the kernel).
        ``max_procs``/``max_pages``: sizes of the two maps, default the module's
        MAX_PROCS/MAX_PAGES (read at construction, so a test can shrink them for
        a whole command); events that find a full map are counted as drops."""
        checks.ensure_tracefs()
        if not available():
            raise TracingUnavailable(features.lacks("ksm_tracepoints"))
        b = btf.load()
        defines: dict[str, int | str] = {
            "MM_OWNER_OFF": b.offset("mm_struct", "owner"),
            "TASK_TGID_OFF": b.offset("task_struct", "tgid"),
            "RMAP_ITEM_ADDRESS_OFF": b.offset("ksm_rmap_item", "address"),
            "MAX_PROCS": MAX_PROCS if max_procs is None else max_procs,
            "MAX_PAGES": MAX_PAGES if max_pages is None else max_pages,
        }
        if pid is not None:
            defines["FILTER_TGID"] = pid
        elif pids is not None:
            uniq = sorted({int(p) for p in pids})
            if not 0 < len(uniq) <= MAX_FILTER_PIDS:
                raise UsageError(f"1 to {MAX_FILTER_PIDS} pids can be filtered on")
            defines["FILTER_TGIDS"] = "{" + ",".join(map(str, uniq)) + "}"
            defines["FILTER_NTGIDS"] = len(uniq)
        self.bpf: Any = loader.load("ksmd.bpf.c", defines, cache=True)
        self._pages_key: tuple[int, int, int] | None = None
        self._procs_raw: list[tuple[tuple[int, ...], tuple[int, ...]]] | None = None
        self._procs: dict[int, KsmProcCounts] = {}
        self._page_counts: dict[tuple[int, int], tuple[int, int]] = {}

    def snapshot(self, pages: bool = True) -> KsmdSnapshot:
        t = time.monotonic()
        # One batched read (loader.dump): BCC's items() costs a ctypes round
        # trip per entry, ~25 ms for 1,000 processes, twice per interval.
        raw = loader.dump(self.bpf["procs"], PROC_KEY, PROC_COUNTS)
        if raw == self._procs_raw:
            procs = self._procs  # nothing merged, unmerged, entered or left: the same records
        else:
            procs = {tgid: KsmProcCounts(*counts) for (tgid,), counts in raw}
            self._procs_raw, self._procs = raw, procs
        s = self.bpf["scan"][0]
        scan = ScanState(**{f.name: int(getattr(s, f.name)) for f in fields(ScanState)})
        return KsmdSnapshot(t, procs, scan, self._pages(procs, scan) if pages else {})

    def _pages(
        self, procs: dict[int, KsmProcCounts], scan: ScanState
    ) -> dict[tuple[int, int], tuple[int, int]]:
        """The per-page map, read again only when a merge or unmerge happened
        since the last read (every page event also counts in its process):
        reading tens of thousands of entries key by key costs a core-second."""
        key = (
            sum(c.merges for c in procs.values()),
            sum(c.unmerges for c in procs.values()),
            scan.page_drops,
        )
        if key != self._pages_key:
            self._page_counts = {
                (tgid, page << PAGE_SHIFT): counts
                for (tgid, _, page), counts in loader.dump(self.bpf["pages"], PAGE_KEY, PAGE_MERGES)
            }
            self._pages_key = key
        return self._page_counts

    def forget(self, tgids: set[int]) -> None:
        if not tgids:
            return
        procs, pages = self.bpf["procs"], self.bpf["pages"]
        for tgid in tgids:
            try:
                del procs[procs.Key(tgid)]
            except KeyError:
                pass
        self._pages_key = None  # entries go: read the map again next time
        for (tgid, _, page), _counts in loader.dump(pages, PAGE_KEY, PAGE_MERGES):
            if tgid in tgids:
                with contextlib.suppress(KeyError):
                    del pages[pages.Key(tgid, 0, page)]

    def close(self) -> None:
        # Not cut in two by a signal: BCC would retry a half-done cleanup at exit and fail.
        with critical():
            self.bpf.cleanup()

    def __enter__(self) -> KsmdProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
