"""Load bpf/faults.bpf.c and read its maps into typed records.

The BPF side counts write-protect faults of mergeable processes and, exactly,
those whose PTE mapped a KSM page (see the comment in bpf/faults.bpf.c).
Counters are cumulative since load; ksmtrace/model/rates.py turns two
snapshots into rates.

Longer than most modules on purpose: the process slots, the merged-page set
and the preload share one memory layout with bpf/faults.h and update words
the BPF side updates at the same time; kept together, the protocol (who
writes which word, with which atomic) can be read in one place.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ksmtrace import native
from ksmtrace.errors import AccessDenied, ProcessGone, TracingUnavailable
from ksmtrace.kernel import btf, checks, host, ksm_sysfs, pagemap
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.kernel.signals import critical
from ksmtrace.probes import kaddr, loader

MAX_PROCS = 8192  # process slots (1088 bytes each; slot 0 means "none")
MAX_REGIONS = 32  # per process; must match bpf/faults.h
MAX_MERGED = 1 << 16  # 2 MiB chunks with merged pages (72 bytes each): 128 GiB of address space
MERGED_WAYS = 8  # chunks per bucket of the merged set (bpf/faults.h)
CHUNK_SHIFT = 21  # bpf/faults.h
TAG_CHUNK_BITS = 36  # bpf/faults.h
SLOT_SIZE = 64 + 32 * MAX_REGIONS  # struct proc_slot
_STATS = (
    "no_table",
    "proc_drops",
    "walk_failures",
    "kernel_mode_ksm_cow",
    "merged_drops",
    "stale_merged",
    "ksm_cow_fast",  # counted from a merged-set hit
    "ksm_cow_walked",  # counted by checking every fault of the process
    "untracked_ksm_cow",  # of pids beyond the table: not in any process
)
# struct proc_slot header (bpf/faults.h): tgid, state, pgd, walk_all,
# has_merged, other.wp, other.ksm_cow, exited; then per region start, end, wp, ksm_cow.
_HEADER = struct.Struct("<IIQIIQQI")
_REGION = struct.Struct("<QQQQ")
_OFF_WALK_ALL, _OFF_HAS_MERGED, _OFF_EXITED = 16, 20, 40
# walk_all = 2: set by user space until a process's earlier merges are preloaded
# (the BPF side sets 1, for a full bucket, and that one is never cleared).
PRELOAD_PENDING = 2
PRELOAD_BUDGET_S = 0.3  # at start-up; the rest a slice per interval (preload_pending)
KFUNC_PLACEHOLDER = 0x7FFE  # helper number the loader rewrites into bpf_rdonly_cast (bpf/faults.bpf.c)
_GOLDEN = 0x9E3779B97F4A7C15  # the multiplier of merged_bucket() in bpf/faults.bpf.c


def _map_shared(table: Any, value_size: int, entries: int) -> mmap.mmap:
    """Map a BPF_F_MMAPABLE array: element i at i * round_up(value_size, 8)."""
    size = -(-((value_size + 7) // 8 * 8 * entries) // mmap.PAGESIZE) * mmap.PAGESIZE
    return mmap.mmap(table.map_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


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
    # tgid -> which slot (and which use of it) holds procs[tgid]: a new value
    # for a tgid means another process with that pid, whose counts started at 0.
    idents: dict[int, int] = field(default_factory=dict)
    # (tgid, ident, last counts) of exited processes whose pid a newer process
    # (in procs) already has; their slots are freed by the next forget().
    exited: list[tuple[int, int, ProcFaults]] = field(default_factory=list)


def already_mergeable(proc: ProcFS | None = None) -> list[int]:
    """Processes whose mm joined KSM before tracing started (ksm_stat says so)."""
    proc = proc or ProcFS()
    out = []
    for pid in proc.pids():
        try:
            st = proc.ksm_stat(pid)
        except (ProcessGone, AccessDenied):
            continue
        if st is None:
            continue
        try:
            if proc.is_mergeable(pid, st):
                out.append(pid)
        except (ProcessGone, AccessDenied):
            continue
    return out


def available() -> bool:
    return checks.tracepoint_exists("exceptions", "page_fault_user")


class FaultProbe:
    def __init__(
        self, pid: int | None = None, max_procs: int = MAX_PROCS, max_merged: int = MAX_MERGED
    ) -> None:
        lay = kaddr.layout()
        self.pid_max = host.pid_max()
        self.max_procs = max(2, max_procs)
        entries = 1 << max(0, max_merged - 1).bit_length()  # a power of two
        self.ways = min(MERGED_WAYS, entries)
        self.bucket_bits = (entries // self.ways).bit_length() - 1
        self.merged_entries = entries
        defines: dict[str, int | str] = {
            **lay.defines(),
            "MAX_PROCS": self.max_procs,
            "MAX_REGIONS": MAX_REGIONS,
            "MERGED_BUCKET_BITS": self.bucket_bits,
            "MERGED_WAYS": self.ways,
            "PID_MAX": self.pid_max,
        }
        self.tables: dict[int, list[tuple[int, int]]] = {}  # slot -> its region table
        # slot -> (its bytes, tgid, decoded) at the last snapshot; slots whose region table grew since
        self._decoded: dict[int, tuple[bytes, int, ProcFaults]] = {}
        self._retabled: set[int] = set()
        # Times each slot was freed: (epoch, slot) names one process's counts.
        self._epoch = [0] * self.max_procs
        self._exited_seen: set[int] = set()  # slots exited at the last snapshot
        # The last snapshot, with what it was decoded from (used slots' bytes, their
        # pids' slots, slots freed so far) and the exited slots it saw (snapshot()).
        self._quiet: tuple[tuple[bytes, list[int], int], FaultSnapshot, frozenset[int]] | None = None
        self._frees = 0  # slots freed so far (forget)
        if pid is not None:
            defines["FILTER_TGID"] = pid
        # Without ksm:* tracepoints (features.FEATURES["ksm_tracepoints"]) every fault of a
        # mergeable process is checked against struct page (NO_KSM_TP).
        self.merge_events = checks.tracepoint_exists("ksm", "ksm_merge_with_ksm_page")
        if not self.merge_events:
            defines["NO_KSM_TP"] = 1
        if checks.tracepoint_has_field("sched", "sched_process_exit", "group_dead"):
            defines["EXIT_GROUP_DEAD"] = 1
        self.bpf: Any = self._load(defines)
        # BCC attached on load; detach until the free-slot queue is filled, or
        # the first opt-ins would find no slot.
        attached = loader.detach_all(self.bpf)
        self._slot_of = _map_shared(self.bpf["slot_of"], 8, self.pid_max)
        self._procs = _map_shared(self.bpf["procs"], SLOT_SIZE, self.max_procs)
        self._tags = _map_shared(self.bpf["merged_tags"], 8, entries)
        self._bits = _map_shared(self.bpf["merged_bits"], 64, entries)
        self._slot_words = native.SharedWords(self._slot_of)
        self._tag_words = native.SharedWords(self._tags)
        self._bit_words = native.SharedWords(self._bits)
        self._proc_words = native.SharedWords(self._procs)
        free = self.bpf["free_slots"]
        for s in range(1, self.max_procs):
            free.push(ctypes.c_uint32(s))
        loader.reattach(self.bpf, attached)
        # After attaching, so no opt-in or merge falls in between: processes
        # that opted in earlier, and their KSM pages.
        pids = already_mergeable()
        if pid is not None:
            pids = [p for p in pids if p == pid]
        self.mark(pids)
        self.initial = list(pids)
        # Their pages merged before we attached must enter the merged set
        # (preload: smaps + pagemap per process). On a host of a thousand
        # mergeable processes that takes seconds, so it runs within a time
        # budget now and the rest later (preload_pending, each interval);
        # until a process is preloaded, each of its write-protect faults is
        # checked against struct page instead (walk_all), which is exact.
        self.preloaded = 0
        self._pending: list[int] = []
        # Read after attaching: with no KSM page on the host now, every later
        # one comes through the merge tracepoint and there is nothing to preload.
        if self.merge_events and ksm_sysfs.read().get("pages_shared", 1) != 0:
            for tgid in pids:
                self._walk_all_until_preloaded(tgid)
            self._pending = list(pids)
            self.preload_pending(PRELOAD_BUDGET_S)

    def _load(self, defines: dict[str, int | str]) -> Any:
        """Build with helper-free kernel reads where the kernel takes them
        (bpf_rdonly_cast to void *, 6.11+), else with bpf_probe_read_kernel."""
        cast = btf.load().func_id("bpf_rdonly_cast")
        self.inline_reads = False
        if cast is not None:
            try:
                bpf = loader.load(
                    "faults.bpf.c",
                    {**defines, "KFUNC_RDONLY_CAST": KFUNC_PLACEHOLDER},
                    {KFUNC_PLACEHOLDER: cast},
                    cache=True,
                )
                self.inline_reads = True
                return bpf
            except TracingUnavailable:
                pass  # the verifier refused the cast: the helper it is
        return loader.load("faults.bpf.c", defines, cache=True)

    # ---- process slots ---------------------------------------------------

    def _slot(self, tgid: int) -> int:
        if not 0 < tgid < self.pid_max:
            return 0
        return int.from_bytes(self._slot_of[tgid * 8 : tgid * 8 + 8], "little")

    def _exited(self, slot: int) -> bool:
        return bool(struct.unpack_from("<I", self._procs, slot * SLOT_SIZE + _OFF_EXITED)[0])

    def _track(self, tgid: int) -> int:
        """The slot of ``tgid``, taken from the free queue if it has none or
        if its slot is an exited process's (the same protocol as proc_track()
        in bpf/faults.bpf.c); 0: none free."""
        if not 0 < tgid < self.pid_max:
            return 0
        cur = self._slot(tgid)
        if cur and not self._exited(cur):
            return cur
        free = self.bpf["free_slots"]
        try:
            fresh = int(free.pop().value)
        except KeyError:
            return 0
        struct.pack_into("<I", self._procs, fresh * SLOT_SIZE, tgid)
        seen = self._slot_words.cmpxchg(tgid * 8, cur, fresh)
        if seen == cur:
            return fresh
        struct.pack_into("<I", self._procs, fresh * SLOT_SIZE, 0)
        free.push(ctypes.c_uint32(fresh))
        return seen

    def _set_flag(self, tgid: int, offset: int) -> None:
        slot = self._track(tgid)
        if slot:
            struct.pack_into("<I", self._procs, slot * SLOT_SIZE + offset, 1)

    def walk_all(self, tgid: int) -> None:
        """This process's KSM pages are not all in the merged set: check every
        write-protect fault of it against struct page instead (exact, slower)."""
        slot = self._track(tgid)
        if slot:
            # Atomically: the BPF side and _preloaded() touch the same word.
            off = slot * SLOT_SIZE + _OFF_WALK_ALL
            word = struct.unpack_from("<Q", self._procs, off)[0]
            while True:
                seen = self._proc_words.cmpxchg(off, word, (word & ~0xFFFFFFFF) | 1)
                if seen == word:
                    return
                word = seen

    def mark(self, tgids: Iterable[int]) -> None:
        """Track these processes (they may be mergeable) from now on."""
        for tgid in tgids:
            self._track(tgid)

    # ---- merged-page set -------------------------------------------------

    def _bucket(self, tag: int) -> int:
        if self.bucket_bits == 0:
            return 0
        return ((tag * _GOLDEN) & (2**64 - 1)) >> (64 - self.bucket_bits) << (self.ways.bit_length() - 1)

    def _claim(self, tag: int) -> int:
        """Index of tag's chunk (claimed now if new), -1 if its bucket is full."""
        base = self._bucket(tag)
        for idx in range(base, base + self.ways):
            seen = self._tag_words.cmpxchg(idx * 8, 0, tag)
            if seen in (0, tag):
                return idx
        return -1

    def _walk_all_until_preloaded(self, tgid: int) -> None:
        """walk_all = PRELOAD_PENDING, unless the BPF side set it already (a full bucket)."""
        slot = self._track(tgid)
        if not slot:
            return
        off = slot * SLOT_SIZE + _OFF_WALK_ALL  # the 8-byte word of walk_all (low) and has_merged (high)
        word = struct.unpack_from("<Q", self._procs, off)[0]
        while word & 0xFFFFFFFF == 0:
            seen = self._proc_words.cmpxchg(off, word, word | PRELOAD_PENDING)
            if seen == word:
                return
            word = seen

    def _preloaded(self, tgid: int) -> None:
        """Back to the merged set for this process: clear walk_all if it is still ours."""
        slot = self._slot(tgid)
        if not slot:
            return
        off = slot * SLOT_SIZE + _OFF_WALK_ALL
        word = struct.unpack_from("<Q", self._procs, off)[0]
        while word & 0xFFFFFFFF == PRELOAD_PENDING:
            seen = self._proc_words.cmpxchg(off, word, word & ~0xFFFFFFFF)
            if seen == word:
                return
            word = seen

    def preload_pending(self, budget_s: float) -> int:
        """Preload processes still waiting, for at most ``budget_s``; returns how many still wait."""
        deadline = time.monotonic() + budget_s
        while self._pending and time.monotonic() < deadline:
            tgid = self._pending.pop(0)
            self.preloaded += self.preload_merged([tgid])
        return len(self._pending)

    def preload_merged(self, pids: Iterable[int]) -> int:
        """Enter pages that are KSM now (pagemap + kpageflags) into the merged set."""
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
            if not self._track(pid):
                continue
            complete = True
            for chunk, words in chunks.items():
                idx = self._claim(pid << TAG_CHUNK_BITS | chunk)
                if idx < 0:
                    self.walk_all(pid)
                    complete = False
                    continue
                for i, w in enumerate(words):
                    if w:
                        # ksmd may be setting bits of the same word right now.
                        self._bit_words.atomic_or(idx * 64 + i * 8, w)
            if chunks:
                self._set_flag(pid, _OFF_HAS_MERGED)
            if complete:
                # Pages merged since we attached come from the merge tracepoint.
                self._preloaded(pid)
        return n

    # ---- regions and counters --------------------------------------------

    def set_regions(self, tgid: int, ranges: Iterable[tuple[int, int]]) -> None:
        """Count faults in these ranges of ``tgid`` separately. Append-only: a
        range keeps its slot, new ones take free slots, the rest stay "other"."""
        slot = self._track(tgid)
        if not slot:
            return
        table = self.tables.setdefault(slot, [])
        new = [r for r in ranges if r not in table and r[0] > 0]
        room = MAX_REGIONS - len(table)
        if not new or room <= 0:
            return
        first = len(table)
        table.extend(sorted(new, key=lambda r: r[0] - r[1])[:room])  # largest first
        self._retabled.add(slot)  # its regions dict must be built again
        for i in range(first, len(table)):
            start, end = table[i]
            off = slot * SLOT_SIZE + 64 + i * _REGION.size
            # end before start: the BPF side takes start != 0 as "in use".
            struct.pack_into("<Q", self._procs, off + 8, end)
            struct.pack_into("<Q", self._procs, off, start)

    def snapshot(self) -> FaultSnapshot:
        """Every tracked process's counters. A slot whose bytes did not change
        since the last snapshot is not decoded again (a thousand quiet
        processes would cost milliseconds per interval otherwise)."""
        t = time.monotonic()
        procs: dict[int, ProcFaults] = {}
        idents: dict[int, int] = {}
        exited: list[tuple[int, int, ProcFaults]] = []
        self._exited_seen = set()
        buf = self._procs
        words = memoryview(buf).cast("I")
        cache: dict[int, tuple[bytes, int, ProcFaults]] = {}
        try:
            # Each slot's first word is its tgid: one strided read of them all
            # instead of a Python step per slot (8,192 of them, mostly free).
            tgids = words[:: SLOT_SIZE // 4].tolist()
            used = [s for s in range(1, len(tgids)) if tgids[s]]
            # A quiet interval: every used slot byte for byte as last time, and
            # every pid still pointing at the same slot (slot_of), with no
            # region table written since. The last snapshot's records are then
            # exactly what the walk below would decode; one compare of the
            # range (~1 MiB at 1,000 processes) instead of a Python step per slot.
            whole = bytes(buf[SLOT_SIZE : (used[-1] + 1) * SLOT_SIZE]) if used else b""
            owners = memoryview(self._slot_of).cast("Q")
            try:
                owner = [owners[tgids[s]] if 0 < tgids[s] < self.pid_max else 0 for s in used]
            finally:
                owners.release()
            seen = (whole, owner, self._frees)
            if self._quiet is not None and not self._retabled and self._quiet[0] == seen:
                _, snap, exited_seen = self._quiet
                self._exited_seen = set(exited_seen)
                return replace(snap, t=t, stats=self._stats())
            for slot, current in zip(used, owner):
                base = slot * SLOT_SIZE
                tgid = tgids[slot]
                gone = words[(base + _OFF_EXITED) // 4]
                if current != slot and not gone:
                    continue  # taken a moment ago by a claim that lost its race
                if gone:
                    self._exited_seen.add(slot)
                raw = bytes(buf[base : base + SLOT_SIZE])
                old = self._decoded.get(slot)
                if old is not None and old[0] == raw and old[1] == tgid and slot not in self._retabled:
                    pf = old[2]
                    cache[slot] = old
                else:
                    pf = self._decode(raw, slot)
                    cache[slot] = (raw, tgid, pf)
                ident = self._epoch[slot] * self.max_procs + slot
                if current == slot or (not current and tgid not in procs):
                    procs[tgid], idents[tgid] = pf, ident
                else:
                    exited.append((tgid, ident, pf))  # a newer process has its pid
        finally:
            words.release()
        self._decoded = cache
        self._retabled.clear()
        snap = FaultSnapshot(t, procs, self._stats(), idents, exited)
        self._quiet = (seen, snap, frozenset(self._exited_seen))
        return snap

    def _stats(self) -> dict[str, int]:
        st = self.bpf["stats"]
        return {name: int(sum(st[st.Key(i)])) for i, name in enumerate(_STATS)}

    def _decode(self, raw: bytes, slot: int) -> ProcFaults:
        _tgid, _state, _pgd, _walk, _has, owp, oksm, _exited = _HEADER.unpack_from(raw, 0)
        table = self.tables.get(slot, [])
        other = FaultCounts(owp, oksm)
        slots = []
        for i in range(MAX_REGIONS):
            start, _end, wp, ksm_cow = _REGION.unpack_from(raw, 64 + i * _REGION.size)
            if not start:
                break
            slots.append(FaultCounts(wp, ksm_cow))
        return ProcFaults(
            total=FaultCounts(
                other.wp + sum(r.wp for r in slots), other.ksm_cow + sum(r.ksm_cow for r in slots)
            ),
            other=other,
            regions={rng: slots[i] for i, rng in enumerate(table) if i < len(slots)},
        )

    def forget(self, tgids: set[int]) -> None:
        """Free exited processes' slots and merged chunks: their pids can be
        reused. Besides ``tgids`` (exits the caller saw), every slot that was
        already marked exited by the kernel at the last snapshot (its last
        counts have been read) is freed, also when its pid has a new owner."""
        free_slots: dict[int, int] = {}  # slot -> tgid
        for tgid in tgids:
            slot = self._slot(tgid)
            if slot:
                free_slots[slot] = tgid
        for slot in self._exited_seen:
            tgid = struct.unpack_from("<I", self._procs, slot * SLOT_SIZE)[0]
            if tgid:
                free_slots[slot] = tgid
        self._exited_seen = set()
        if not free_slots:
            return
        # Merged chunks are tagged by pid: keep them while a newer process has
        # that pid (a stale bit costs one check of the page, nothing more).
        untag = {tgid for slot, tgid in free_slots.items() if self._slot(tgid) in (slot, 0)}
        tags = memoryview(self._tags).cast("Q")
        for idx, tag in enumerate(tags):
            if tag and tag >> TAG_CHUNK_BITS in untag:
                # Bits first: a claim of the free tag must find them clear.
                self._bits[idx * 64 : idx * 64 + 64] = bytes(64)
                self._tag_words.cmpxchg(idx * 8, tag, 0)
        tags.release()
        free = self.bpf["free_slots"]
        for slot, tgid in free_slots.items():
            # Unlink it if still linked; if the kernel linked a new slot for
            # the pid meanwhile, ours is unlinked all the same.
            self._slot_words.cmpxchg(tgid * 8, slot, 0)
            self._procs[slot * SLOT_SIZE : (slot + 1) * SLOT_SIZE] = bytes(SLOT_SIZE)
            self._epoch[slot] += 1
            self._frees += 1  # a slot's next use is another process, even with the same bytes
            free.push(ctypes.c_uint32(slot))
            self.tables.pop(slot, None)

    def close(self) -> None:
        # Not cut in two by a signal: BCC would retry a half-done cleanup at exit and fail.
        with critical():
            for words in (self._slot_words, self._tag_words, self._bit_words, self._proc_words):
                words.release()
            for m in (self._slot_of, self._procs, self._tags, self._bits):
                m.close()
            self.bpf.cleanup()

    def __enter__(self) -> FaultProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
