"""Live KSM state of pages, from /proc/PID/pagemap and /proc/kpageflags.

``ksm_stat`` is refreshed only when ksmd rescans a page, so after
copy-on-write broke a merge it still counts it (smaps ``KSM:`` is computed
when read, but per VMA and only where features.FEATURES["smaps_ksm"]). pagemap gives each
virtual page's frame and kpageflags says whether that frame is a KSM page
(KPF_KSM): that is the state right now. Both need root (frames are hidden
from others).
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass
from pathlib import Path

from ksmtrace.errors import proc_errors

PAGEMAP_PRESENT = 1 << 63
# Set when the page was written since the process's last clear_refs "4"
# (see features.FEATURES["soft_dirty"]); always 0 without CONFIG_MEM_SOFT_DIRTY.
PAGEMAP_SOFT_DIRTY = 1 << 55
PAGEMAP_PFN_MASK = (1 << 55) - 1
KPF_KSM = 1 << 21
KPF_ZERO_PAGE = 1 << 24
# 2 MiB of pagemap entries per read: large reads are ~10x faster than small.
_CHUNK_PAGES = 262144
# kpageflags windows: at most this many entries per pread, and a new window
# where the next frame is more than _GAP away (reading the flags of frames
# between costs more than another pread: the kernel computes every entry).
_WINDOW = 4096
_GAP = 16


@dataclass(frozen=True)
class RangePages:
    """Pages of one virtual range: present ones, and those backed by KSM."""

    pages: int
    present: int
    ksm: int
    ksm_frames: frozenset[int]
    zero_page: int = 0  # mapped to the shared zero page (never written, or merged with use_zero_pages)


def present_pages(
    pid: int, start: int, end: int, proc: Path = Path("/proc"), page: int | None = None
) -> list[tuple[int, int]]:
    """(virtual address, frame) of every present page of [start, end)."""
    page = page or os.sysconf("SC_PAGE_SIZE")
    out: list[tuple[int, int]] = []
    with proc_errors(pid):
        fd = os.open(proc / str(pid) / "pagemap", os.O_RDONLY)
    try:
        idx, last = start // page, (end + page - 1) // page
        while idx < last:
            n = min(_CHUNK_PAGES, last - idx)
            with proc_errors(pid):
                raw = os.pread(fd, n * 8, idx * 8)
            entries = array("Q")
            entries.frombytes(raw[: len(raw) // 8 * 8])
            out.extend(
                ((idx + i) * page, e & PAGEMAP_PFN_MASK) for i, e in enumerate(entries) if e & PAGEMAP_PRESENT
            )
            if len(entries) < n:
                break
            idx += n
    finally:
        os.close(fd)
    return out


def frame_flags(frames: list[int], proc: Path = Path("/proc")) -> dict[int, int]:
    """kpageflags of each frame, read in windows of nearby frames."""
    out: dict[int, int] = {}
    if not frames:
        return out
    fd = os.open(proc / "kpageflags", os.O_RDONLY)
    try:
        ordered = sorted(set(frames))
        i = 0
        while i < len(ordered):
            lo = ordered[i]
            j = i
            while (
                j + 1 < len(ordered) and ordered[j + 1] - lo < _WINDOW and ordered[j + 1] - ordered[j] <= _GAP
            ):
                j += 1
            hi = ordered[j]
            raw = os.pread(fd, (hi - lo + 1) * 8, lo * 8)
            flags = array("Q")
            flags.frombytes(raw[: len(raw) // 8 * 8])
            for pfn in ordered[i : j + 1]:
                k = pfn - lo
                if k < len(flags):
                    out[pfn] = flags[k]
            i = j + 1
    finally:
        os.close(fd)
    return out


def range_pages(
    pid: int, start: int, end: int, proc: Path = Path("/proc"), page: int | None = None
) -> RangePages:
    page = page or os.sysconf("SC_PAGE_SIZE")
    frames = [pfn for _, pfn in present_pages(pid, start, end, proc, page)]
    # Without CAP_SYS_ADMIN pagemap reports pfn 0 for every page.
    flags = frame_flags([f for f in frames if f], proc)
    ksm = [f for f in frames if flags.get(f, 0) & KPF_KSM]
    return RangePages(
        pages=(end - start + page - 1) // page,
        present=len(frames),
        ksm=len(ksm),
        ksm_frames=frozenset(ksm),
        zero_page=sum(1 for f in frames if flags.get(f, 0) & KPF_ZERO_PAGE),
    )


def ksm_pages(pid: int, start: int, end: int, proc: Path = Path("/proc")) -> list[tuple[int, int]]:
    """(virtual address, frame) of every page of [start, end) mapped to a KSM page now."""
    # Without CAP_SYS_ADMIN pagemap reports pfn 0 for every page.
    present = [(va, pfn) for va, pfn in present_pages(pid, start, end, proc) if pfn]
    flags = frame_flags([pfn for _, pfn in present], proc)
    return [(va, pfn) for va, pfn in present if flags.get(pfn, 0) & KPF_KSM]


# Bit 55 is bit 7 of byte 6 of each little-endian 8-byte entry: bytes.translate
# maps those bytes to 0/1 and count() adds them up in C, no Python loop per page.
_SOFT_DIRTY_BYTE = bytes(1 if b & 0x80 else 0 for b in range(256))


def soft_dirty_pages(
    pid: int, ranges: list[tuple[int, int]], proc: Path = Path("/proc"), page: int | None = None
) -> int:
    """Pages of ``ranges`` written since the last :func:`clear_soft_dirty` of ``pid``.

    Counts pagemap entries with bit 55, present or not: the kernel also marks
    every page of a mapping created or grown since the clear (VM_SOFTDIRTY),
    and swapped-out pages keep the bit in their swap entry. Reading 8 bytes a
    page is cheap (pagemap at ~29 M pages/s here: 256 MiB in about 2 ms), so
    no PAGEMAP_SCAN ioctl (PAGE_IS_SOFT_DIRTY) is needed for the sizes the
    daemon looks at.
    """
    page = page or os.sysconf("SC_PAGE_SIZE")
    dirty = 0
    with proc_errors(pid):
        fd = os.open(proc / str(pid) / "pagemap", os.O_RDONLY)
    try:
        for start, end in ranges:
            idx, last = start // page, (end + page - 1) // page
            while idx < last:
                n = min(_CHUNK_PAGES, last - idx)
                with proc_errors(pid):
                    raw = os.pread(fd, n * 8, idx * 8)
                dirty += raw[6::8].translate(_SOFT_DIRTY_BYTE).count(1)
                if len(raw) < n * 8:
                    break
                idx += n
    finally:
        os.close(fd)
    return dirty


def clear_soft_dirty(pid: int, proc: Path = Path("/proc")) -> None:
    """Clear every soft-dirty bit of ``pid`` (``echo 4 > /proc/PID/clear_refs``).

    Not free for the target: the kernel write-protects each of its PTEs, so
    its next write to each page takes a minor fault (bench/bench_relook.py
    measures it). And soft-dirty bits are one per PTE for all users: a
    checkpointer (CRIU's pre-dump) tracking the same process loses the writes
    it had not read yet.
    """
    with proc_errors(pid, "clear_refs"):
        fd = os.open(proc / str(pid) / "clear_refs", os.O_WRONLY)
        try:
            os.write(fd, b"4")
        finally:
            os.close(fd)


def self_entry(addr: int, proc: Path = Path("/proc")) -> int:
    """The raw pagemap entry of one virtual page of the calling process."""
    page = os.sysconf("SC_PAGE_SIZE")
    with open(proc / "self" / "pagemap", "rb") as f:
        f.seek(addr // page * 8)
        return int.from_bytes(f.read(8), "little")
