"""The one Python interface to the native worker (ksmtrace._native, built by cffi).

C functions return 0 or -errno; :func:`check` turns those into Python
exceptions here and nowhere else.
"""

from __future__ import annotations

import os
from typing import Any

from ksmtrace.errors import KsmtraceError

try:
    from ksmtrace._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise KsmtraceError(f"ksmtrace's native module is not built ({exc}): run scripts/install.sh") from exc

PAGE = os.sysconf("SC_PAGE_SIZE")


def check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def version() -> str:
    return ffi.string(lib.kn_version()).decode()


def hash_pages(data: bytes | bytearray | memoryview, page: int = PAGE) -> list[int]:
    n = len(data) // page
    out = ffi.new("uint64_t[]", n)
    lib.kn_hash_pages(ffi.from_buffer(data), n, page, out)
    return list(out)


def count_zero_pages(data: bytes | bytearray | memoryview, page: int = PAGE) -> int:
    return int(lib.kn_count_zero_pages(ffi.from_buffer(data), len(data) // page, page))


# ---- scanner -------------------------------------------------------------

REGION_FIELDS = (
    "present",
    "zero",
    "zero_mapped",
    "ksm",
    "volatile_pages",
    "dup_region",
    "dup_process",
    "dup_cross",
    "saved_alone",
    "saved_share",
)
TOTAL_FIELDS = (
    "present",
    "zero",
    "zero_mapped",
    "ksm",
    "volatile_pages",
    "distinct",
    "dup_groups",
    "saved",
    "saved_within",
    "saved_now",
    "hash_collisions",
    "bytes_read",
    "index_bytes",
    "read_ns",
    "hash_ns",
    "map_ns",
    "index_ns",
    "refetch_ns",
)
# Counts that depend on the order the workers index batches in (which page of
# a content is seen first): kept apart from the totals, which must not.
ORDER_FIELDS = ("refetched",)


class Scanner:
    """One scan: add regions, scan them (in chunks, in order), then finish once."""

    def __init__(
        self,
        max_page_sharing: int,
        use_zero_pages: bool,
        batch_pages: int = 0,
        workers: int = 0,
        confirm_bytes: bool = False,
    ) -> None:
        """``workers``: threads that copy and hash (0: one per CPU we may run on, at most 4).
        ``confirm_bytes``: confirm duplicates by comparing bytes (re-reading the first
        copy) instead of by 128-bit hash; see native/internal.h for the odds and the cost."""
        ptr = lib.kn_scanner_new(max_page_sharing, int(use_zero_pages), batch_pages)
        if ptr == ffi.NULL:
            raise MemoryError("kn_scanner_new")
        self._s = ffi.gc(ptr, lib.kn_scanner_free)
        self.workers = check(lib.kn_scanner_set_workers(self._s, workers), "scanner workers")
        self.confirm_bytes = confirm_bytes
        check(lib.kn_scanner_set_confirm(self._s, int(confirm_bytes)), "scanner confirm mode")
        self.pids: list[int] = []
        self.order_counts: dict[str, int] = {}  # ORDER_FIELDS, set by finish()

    def set_hash_mask(self, mask: int) -> None:
        """Test hook: and every page's 64-bit hash (the 128-bit one's low half) with
        ``mask`` (0: all collide there). Before add_region."""
        check(lib.kn_scanner_set_hash_mask(self._s, mask), "hash mask")

    def add_region(self, pid: int, start: int, end: int, check_ksm: bool) -> int:
        if pid not in self.pids:
            self.pids.append(pid)
        return check(
            lib.kn_scanner_add_region(self._s, pid, start, end, int(check_ksm)), f"region of pid {pid}"
        )

    def scan(self, idx: int, start: int, end: int) -> None:
        """Raises OSError: ESRCH when the process is gone, EPERM/EACCES when refused."""
        check(lib.kn_scanner_scan(self._s, idx, start, end), f"scan {start:#x}-{end:#x}")

    def finish(
        self, nregions: int
    ) -> tuple[list[dict[str, float]], dict[int, dict[str, float]], dict[str, int]]:
        """Once, after the last scan: per region, per process and total counts."""
        rs = ffi.new("struct kn_region_stats[]", max(1, nregions))
        ps = ffi.new("struct kn_process_stats[]", max(1, len(self.pids)))
        tot = ffi.new("struct kn_total_stats *")
        n = check(lib.kn_scanner_finish(self._s, rs, nregions, ps, len(self.pids), tot), "finish")
        regions = [{f: getattr(rs[i], f) for f in REGION_FIELDS} for i in range(nregions)]
        procs = {
            ps[i].pid: {"saved_alone": ps[i].saved_alone, "saved_share": ps[i].saved_share} for i in range(n)
        }
        total = {f: int(getattr(tot, f)) for f in TOTAL_FIELDS}
        self.order_counts = {f: int(getattr(tot, f)) for f in ORDER_FIELDS}
        return regions, procs, total

    def runs(self, idx: int, max_gap_pages: int) -> list[tuple[int, int, int, int]]:
        """After finish: region ``idx``'s runs of duplicate pages as (start, end,
        dup_pages, ksm_pages), runs at most ``max_gap_pages`` apart joined.
        Raises OSError E2BIG for a region of 2^31 pages or more."""
        cap = 64
        while True:
            out = ffi.new("struct kn_run[]", cap)
            n = check(
                int(lib.kn_scanner_runs(self._s, idx, max_gap_pages, out, cap)), f"runs of region {idx}"
            )
            if n <= cap:
                return [(out[i].start, out[i].end, out[i].dup_pages, out[i].ksm_pages) for i in range(n)]
            cap = n  # told how many there are: once more with room for all


def self_memory(reset_peak: bool = False) -> tuple[int, int, bool]:
    """(RSS, peak RSS, peak was reset) of this process, in bytes. ``reset_peak``
    restarts the peak from the current RSS first, where the kernel allows it."""
    out = ffi.new("struct kn_self_memory *")
    check(lib.kn_self_memory(int(reset_peak), out), "own memory status")
    return int(out.rss_bytes), int(out.peak_rss_bytes), bool(out.peak_reset)


def copy_bandwidth(pid: int, start: int, end: int, batch_pages: int = 0) -> int:
    """Bytes copied by plain process_vm_readv of [start, end): the benchmark's baseline."""
    return check(int(lib.kn_copy_bandwidth(pid, start, end, batch_pages)), f"process_vm_readv pid {pid}")


# ---- remote madvise ------------------------------------------------------

INJECT_FIELDS = (
    "ret",
    "syscall_addr",
    "stop_kind",
    "restarts",
    "signals_kept",
    "interrupted_rax",
    "elapsed_ns",
    "stop_wait_ns",
    "held_ns",
    "seccomp_trapped",
    "syscall_ns",
)


def image_id(tid: int) -> int:
    """A number that changes when the process of ``tid`` executes a new program (0: unknown)."""
    return int(lib.kn_image_id(tid))


def inject_madvise(
    tid: int, addr: int, length: int, advice: int, timeout_ms: int = 1000, image: int = 0
) -> dict[str, int]:
    """madvise(addr, length, advice) inside thread ``tid`` by ptrace syscall injection.

    Raises OSError when the injection itself failed (the target is then
    untouched and not traced); the madvise result is ``ret`` (0 or -errno).
    ``image``: :func:`image_id` as seen when the range was checked; ESTALE if
    the process has executed a new program since (0: do not compare).
    """
    res = ffi.new("struct kn_inject_result *")
    check(lib.kn_inject_madvise(tid, addr, length, advice, timeout_ms, image, res), f"inject into {tid}")
    return {f: int(getattr(res, f)) for f in INJECT_FIELDS}


# ---- memory shared with BPF programs --------------------------------------


class SharedWords:
    """Atomic 64-bit updates of a writable buffer that BPF programs update too
    (a BPF_F_MMAPABLE map mapped by ksmtrace/probes/faults.py)."""

    def __init__(self, buf: Any) -> None:
        self._base = ffi.from_buffer(buf, require_writable=True)

    def atomic_or(self, offset: int, bits: int) -> int:
        return int(lib.kn_atomic_or64(self._base, offset, bits))

    def atomic_and(self, offset: int, mask: int) -> int:
        return int(lib.kn_atomic_and64(self._base, offset, mask))

    def cmpxchg(self, offset: int, expected: int, desired: int) -> int:
        """Store ``desired`` if the word holds ``expected``; returns what it held."""
        return int(lib.kn_cmpxchg64(self._base, offset, expected, desired))

    def release(self) -> None:
        ffi.release(self._base)
