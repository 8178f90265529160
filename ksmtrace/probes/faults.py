"""Load bpf/faults.bpf.c and read its maps into typed records.

The BPF side counts write-protect faults of mergeable processes and, exactly,
those whose PTE mapped a KSM page (see the comment in bpf/faults.bpf.c).
Counters are cumulative since load; ksmtrace/rates.py turns two snapshots
into rates.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ksmtrace.errors import AccessDenied, ProcessGone
from ksmtrace.kernel import checks, pagemap
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.probes import kaddr, loader

MAX_PROCS = 8192
MAX_REGIONS = 32  # per process; must match bpf/faults.h
MAX_MERGED = 1 << 14  # 2 MiB chunks with merged pages (allocated as used, ~150 bytes each)
CHUNK_SHIFT = 21  # bpf/faults.h
_STATS = (
    "no_table",
    "proc_drops",
    "walk_failures",
    "kernel_mode_ksm_cow",
    "merged_drops",
    "stale_merged",
)


@dataclass(frozen=True)
class FaultCounts:
    wp: int  # write-protect faults (a copy or a reuse) in a mergeable process
    ksm_cow: int  # of which on a page that was a KSM page: copy-on-write of a merge


@dataclass(frozen=True)
class ProcFaults:
    total: FaultCounts
    other: FaultCounts  # outside every range of the process's region table
    regions: dict[tuple[int, int], FaultCounts]  # (start, end) -> counts


@dataclass(frozen=True)
class FaultSnapshot:
    t: float  # time.monotonic() of the read
    procs: dict[int, ProcFaults]
    stats: dict[str, int] = field(default_factory=dict)


def _pid_max(path: Path = Path("/proc/sys/kernel/pid_max")) -> int:
    return int(path.read_text())


def already_mergeable(proc: ProcFS | None = None) -> list[int]:
    """Processes whose mm joined KSM before tracing started (ksm_stat says so)."""
    proc = proc or ProcFS()
    out = []
    for pid in proc.pids():
        try:
            st = proc.ksm_stat(pid)
        except (ProcessGone, AccessDenied):
            continue
        if st is not None and (st.mergeable or st.merge_any or st.rmap_items):
            out.append(pid)
    return out


def available() -> bool:
    return checks.tracepoint_exists("exceptions", "page_fault_user")


class FaultProbe:
    def __init__(
        self, pid: int | None = None, max_procs: int = MAX_PROCS, max_merged: int = MAX_MERGED
    ) -> None:
        lay = kaddr.layout()
        self.pid_max = _pid_max()
        defines: dict[str, int | str] = {
            **lay.defines(),
            "MAX_PROCS": max_procs,
            "MAX_REGIONS": MAX_REGIONS,
            "MAX_MERGED": max_merged,
            "PID_MAX": self.pid_max,
        }
        self.tables: dict[int, list[tuple[int, int]]] = {}
        if pid is not None:
            defines["FILTER_TGID"] = pid
        # ksm:* tracepoints appeared in 6.4; without them every fault of a
        # mergeable process is checked against struct page (NO_KSM_TP).
        self.merge_events = checks.tracepoint_exists("ksm", "ksm_merge_with_ksm_page")
        if not self.merge_events:
            defines["NO_KSM_TP"] = 1
        self.bpf: Any = loader.load("faults.bpf.c", defines)
        # After attaching (BCC attached on load), so no opt-in or merge falls
        # in between: processes that opted in earlier, and their KSM pages.
        self.preloaded = 0
        if self.merge_events:
            pids = already_mergeable()
            if pid is not None:
                pids = [p for p in pids if p == pid]
            self.mark(pids)
            self.preloaded = self.preload_merged(pids)

    def preload_merged(self, pids: Iterable[int]) -> int:
        """Enter pages that are KSM now (pagemap + kpageflags) into the merged set."""
        merged = self.bpf["merged"]
        n = 0
        for pid in pids:
            chunks: dict[int, list[int]] = {}
            try:
                for v in ProcFS().smaps(pid):
                    if not v.mergeable:
                        continue
                    for va, _pfn in pagemap.ksm_pages(pid, v.start, v.end):
                        words = chunks.setdefault(va >> CHUNK_SHIFT, [0] * 8)
                        words[(va >> 18) & 7] |= 1 << ((va >> 12) & 63)
                        n += 1
            except (ProcessGone, AccessDenied):
                continue
            try:
                for chunk, words in chunks.items():
                    k = merged.Key()
                    k.tgid, k.chunk = pid, chunk
                    leaf = merged.Leaf()
                    for i, w in enumerate(words):
                        leaf.bits[i] = w
                    merged[k] = leaf
                if chunks:
                    self._set_flag(pid, "has_merged")
            except Exception:  # BCC: the set is full (E2BIG)
                self.walk_all(pid)
        return n

    def _set_flag(self, tgid: int, name: str) -> None:
        procs = self.bpf["procs"]
        k = procs.Key(tgid)
        try:
            leaf = procs[k]
        except KeyError:
            leaf = procs.Leaf()
        setattr(leaf, name, 1)
        procs[k] = leaf

    def walk_all(self, tgid: int) -> None:
        """This process's KSM pages are not all in the merged set: check every
        write-protect fault of it against struct page instead (exact, slower)."""
        self._set_flag(tgid, "walk_all")

    def mark(self, tgids: Iterable[int]) -> None:
        """Tell the fault path these processes may be mergeable."""
        bits = self.bpf["maybe_mergeable"]
        words: dict[int, int] = {}
        for tgid in tgids:
            if 0 < tgid < self.pid_max:
                words[tgid // 64] = words.get(tgid // 64, 0) | 1 << (tgid % 64)
        for w, v in words.items():
            k = bits.Key(w)
            bits[k] = bits.Leaf(bits[k].value | v)

    def unmark(self, tgids: Iterable[int]) -> None:
        """Exited processes: their pids will be reused by others."""
        bits = self.bpf["maybe_mergeable"]
        for tgid in tgids:
            if bits is not None and 0 < tgid < self.pid_max:
                k = bits.Key(tgid // 64)
                bits[k] = bits.Leaf(bits[k].value & ~(1 << (tgid % 64)))

    def set_regions(self, tgid: int, ranges: Iterable[tuple[int, int]]) -> None:
        """Count faults in these ranges of ``tgid`` separately. Append-only: a
        range keeps its slot, new ones take free slots, the rest stay "other"."""
        table = self.tables.setdefault(tgid, [])
        new = [r for r in ranges if r not in table and r[0] > 0]
        room = MAX_REGIONS - len(table)
        if not new or room <= 0:
            return
        table.extend(sorted(new, key=lambda r: r[0] - r[1])[:room])  # largest first
        m = self.bpf["regions"]
        leaf = m.Leaf()
        for i, (start, end) in enumerate(table):
            leaf.start[i], leaf.end[i] = start, end
        m[m.Key(tgid)] = leaf

    def snapshot(self) -> FaultSnapshot:
        t = time.monotonic()
        procs = {}
        for k, v in self.bpf["procs"].items():
            tgid = int(k.value)
            table = self.tables.get(tgid, [])
            other = FaultCounts(int(v.other.wp), int(v.other.ksm_cow))
            slots = [FaultCounts(int(r.wp), int(r.ksm_cow)) for r in v.region]
            procs[tgid] = ProcFaults(
                total=FaultCounts(
                    other.wp + sum(r.wp for r in slots), other.ksm_cow + sum(r.ksm_cow for r in slots)
                ),
                other=other,
                regions={rng: slots[i] for i, rng in enumerate(table)},
            )
        st = self.bpf["stats"]
        stats = {name: int(sum(st[st.Key(i)])) for i, name in enumerate(_STATS)}
        return FaultSnapshot(t, procs, stats)

    def forget(self, tgids: set[int]) -> None:
        """Drop exited processes' entries: their pids can be reused."""
        if not tgids:
            return
        self.unmark(tgids)
        for name in ("procs", "regions"):
            m = self.bpf[name]
            for tgid in tgids:
                try:
                    del m[m.Key(tgid)]
                except KeyError:
                    pass
        for tgid in tgids:
            self.tables.pop(tgid, None)
        merged = self.bpf["merged"]
        for k in [k for k in merged.keys() if int(k.tgid) in tgids]:
            try:
                del merged[k]
            except KeyError:
                pass

    def close(self) -> None:
        self.bpf.cleanup()

    def __enter__(self) -> FaultProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
