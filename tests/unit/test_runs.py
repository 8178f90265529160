"""Runs of duplicate pages (kn_scanner_runs) on this process's own memory.

Every page's content is chosen here, so where the runs lie is known by hand:
gaps joined or not, runs at the region's edges, absent pages in a gap, pages
indexed out of order by several workers in small batches. KSM pages (which
need ksmd) are covered by tests/system/test_merge_runs.py.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import pytest

from ksmtrace import native, scan

PAGE = native.PAGE


def _page(tag: int) -> bytes:
    return bytes([tag]) * 16 + bytes(range(256)) * (PAGE // 256 - 1) + bytes(240)


A, B, ZERO = _page(1), _page(2), bytes(PAGE)
U = None  # a unique page
GONE = "gone"  # an absent page (MADV_DONTNEED after writing)

# 0-2 A (at the region's start), 3-5 unique, 6-7 B, 8-9 unique, 10 A,
# 11-20 unique, 21-23 absent, 24 unique, 25 zero (once), 26-27 B (at the end).
LAYOUT: list[bytes | str | None] = (
    [A] * 3 + [U] * 3 + [B] * 2 + [U] * 2 + [A] + [U] * 10 + [GONE] * 3 + [U] + [ZERO] + [B] * 2
)


def _mapped(layout: list[bytes | str | None]) -> tuple[mmap.mmap, int]:
    m = mmap.mmap(-1, len(layout) * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i, c in enumerate(layout):
        m[i * PAGE : (i + 1) * PAGE] = c if isinstance(c, bytes) else os.urandom(PAGE)
    for i, c in enumerate(layout):
        if c == GONE:
            m.madvise(mmap.MADV_DONTNEED, i * PAGE, PAGE)
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def _runs(
    layout: list[bytes | str | None],
    gap: int,
    use_zero_pages: bool = False,
    batch: int = 0,
    workers: int = 1,
    confirm_bytes: bool = False,
) -> list[tuple[int, int, int, int]]:
    """Runs of one region holding ``layout``, as page offsets (first, end, dup, ksm)."""
    m, addr = _mapped(layout)
    try:
        sc = native.Scanner(256, use_zero_pages, batch, workers, confirm_bytes)
        end = addr + len(layout) * PAGE
        idx = sc.add_region(os.getpid(), addr, end, check_ksm=False)
        half = addr + len(layout) // 2 * PAGE
        sc.scan(idx, addr, half)  # in two chunks, as scan.estimate does for large mappings
        sc.scan(idx, half, end)
        sc.finish(1)
        got = sc.runs(idx, gap)
    finally:
        m.close()
    return [((s - addr) // PAGE, (e - addr) // PAGE, d, k) for s, e, d, k in got]


@pytest.mark.parametrize("confirm_bytes", [False, True], ids=["hash128", "bytes"])
@pytest.mark.parametrize(
    ("gap", "want"),
    [
        (0, [(0, 3, 3, 0), (6, 8, 2, 0), (10, 11, 1, 0), (26, 28, 2, 0)]),
        (2, [(0, 3, 3, 0), (6, 11, 3, 0), (26, 28, 2, 0)]),
        (3, [(0, 11, 6, 0), (26, 28, 2, 0)]),
        # 11-25: ten unique, three absent, one unique, one lone zero page: a gap of 15
        (14, [(0, 11, 6, 0), (26, 28, 2, 0)]),
        (15, [(0, 28, 8, 0)]),
    ],
)
def test_runs_join_gaps_of_unique_and_absent_pages(
    gap: int, want: list[tuple[int, int, int, int]], confirm_bytes: bool
) -> None:
    assert _runs(LAYOUT, gap, confirm_bytes=confirm_bytes) == want


def test_zero_pages_are_duplicates_alone_only_with_use_zero_pages() -> None:
    assert (25, 28, 3, 0) in _runs(LAYOUT, 0, use_zero_pages=True)
    assert (26, 28, 2, 0) in _runs(LAYOUT, 0, use_zero_pages=False)


def test_workers_in_small_batches_give_the_same_runs() -> None:
    # Batches of 4 pages indexed by 4 workers in whatever order they finish.
    layout = LAYOUT * 8
    one = _runs(layout, 2, batch=0, workers=1)
    assert _runs(layout, 2, batch=4, workers=4) == one
    assert len(one) == 2 * 8 + 1  # the last run of one copy joins the first of the next


def test_more_runs_than_the_first_buffer_holds() -> None:
    layout: list[bytes | str | None] = ([A, U] * 150)[:-1]
    got = _runs(layout, 0)
    assert len(got) == 150
    assert got[0] == (0, 1, 1, 0) and got[-1] == (298, 299, 1, 0)
    assert _runs(layout, 1) == [(0, 299, 150, 0)]


def test_duplicates_across_regions_count() -> None:
    # A once in each of two regions: both pages are duplicates of each other.
    m1, a1 = _mapped([U, A, U])
    m2, a2 = _mapped([U, U, A])
    try:
        sc = native.Scanner(256, False)
        for a in (a1, a2):
            idx = sc.add_region(os.getpid(), a, a + 3 * PAGE, check_ksm=False)
            sc.scan(idx, a, a + 3 * PAGE)
        with pytest.raises(OSError) as exc:
            sc.runs(0, 0)
        assert exc.value.errno == errno.EBUSY  # not before finish: counts are not final
        sc.finish(2)
        assert sc.runs(0, 0) == [(a1 + PAGE, a1 + 2 * PAGE, 1, 0)]
        assert sc.runs(1, 0) == [(a2 + 2 * PAGE, a2 + 3 * PAGE, 1, 0)]
        with pytest.raises(OSError):
            sc.runs(2, 0)
    finally:
        m1.close()
        m2.close()


def test_estimate_fills_runs_only_when_asked() -> None:
    m, addr = _mapped(LAYOUT)
    try:
        pid, ranges = os.getpid(), {os.getpid(): [(addr, addr + len(LAYOUT) * PAGE)]}
        plain = scan.estimate([pid], ranges=ranges, only=lambda p, v: True)
        with_runs = scan.estimate([pid], ranges=ranges, only=lambda p, v: True, runs_gap=2)
    finally:
        m.close()
    assert all(r.runs == () for p in plain.processes for r in p.regions)
    (region,) = [r for p in with_runs.processes for r in p.regions]
    assert region.runs == (
        scan.PageRun(addr, addr + 3 * PAGE, 3, 0),
        scan.PageRun(addr + 6 * PAGE, addr + 11 * PAGE, 3, 0),
        scan.PageRun(addr + 26 * PAGE, addr + 28 * PAGE, 2, 0),
    )
    assert region.runs[1].pages == 5
