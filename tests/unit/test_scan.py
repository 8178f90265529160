"""The estimator's arithmetic on this process's own memory, and the pure helpers.

The scanner reads any process with process_vm_readv; pointed at the test
process itself it needs no other process and no root, and every page's
content is chosen here, so the expected counts are worked out by hand.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
from collections import Counter

import pytest

from ksmtrace import native, scan
from ksmtrace.errors import UsageError
from ksmtrace.kernel.procfs import Vma

PAGE = native.PAGE


def _region(contents: list[bytes]) -> tuple[mmap.mmap, int]:
    m = mmap.mmap(-1, len(contents) * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i, c in enumerate(contents):
        m[i * PAGE : (i + 1) * PAGE] = c  # writing zeros too: a real page, not the zero page
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def _page(tag: int) -> bytes:
    return bytes([tag]) * 16 + bytes(range(256)) * (PAGE // 256 - 1) + bytes(240)


@pytest.mark.parametrize("confirm_bytes", [False, True], ids=["hash128", "bytes"])
@pytest.mark.parametrize(("use_zero_pages", "saved"), [(False, 7 + 3 + 2 + 1), (True, 7 + 3 + 3 + 1)])
def test_estimate_arithmetic_on_own_memory(use_zero_pages: bool, saved: int, confirm_bytes: bool) -> None:
    a, b, c, zero = _page(1), _page(2), _page(3), bytes(PAGE)
    assert len(a) == PAGE and a != b
    # region 1: 10 x A, 3 x B, 3 zero, 4 unique; region 2: 2 x B, 1 x C, 4 unique; C once more in region 1
    r1 = [a] * 10 + [b] * 3 + [zero] * 3 + [os.urandom(PAGE) for _ in range(4)] + [c]
    r2 = [b] * 2 + [c] + [os.urandom(PAGE) for _ in range(4)]
    m1, addr1 = _region(r1)
    m2, addr2 = _region(r2)
    try:
        sc = native.Scanner(max_page_sharing=4, use_zero_pages=use_zero_pages, confirm_bytes=confirm_bytes)
        for addr, n in ((addr1, len(r1)), (addr2, len(r2))):
            idx = sc.add_region(os.getpid(), addr, addr + n * PAGE, check_ksm=False)
            sc.scan(idx, addr, addr + n * PAGE)
        regions, procs, total = sc.finish(2)
    finally:
        m1.close()
        m2.close()
    # A: 10 -> ceil(10/4)=3 kept, 7 saved; B: 5 -> 2 kept, 3 saved; C: 2 -> 1 saved;
    # zero: 3 -> 1 kept (2 saved) or all 3 saved with use_zero_pages.
    assert total["saved"] == saved
    assert total["present"] == len(r1) + len(r2)
    assert total["zero"] == 3
    assert total["distinct"] == 4 + 8  # A, B, C, zero + 8 unique
    assert total["dup_groups"] == 4
    assert total["hash_collisions"] == 0
    one, two = regions
    assert one["dup_region"] == 10 + 3 + 3  # A, B and zero pages have a twin in region 1
    assert one["dup_process"] == 1  # C's twin is in region 2
    assert two["dup_region"] == 2 and two["dup_process"] == 1 and two["dup_cross"] == 0
    # Alone, region 2 only merges its two B pages (mps 4: one kept).
    assert two["saved_alone"] == 1
    assert one["saved_share"] + two["saved_share"] == pytest.approx(saved)
    assert procs[os.getpid()]["saved_alone"] == saved
    assert total["saved_within"] == saved  # one process: nothing needs merging across


@pytest.mark.parametrize("confirm_bytes", [False, True], ids=["hash128", "bytes"])
def test_workers_agree_with_a_count_by_hand(confirm_bytes: bool) -> None:
    # Many small batches taken by 1 and by 4 workers in whatever order they race to:
    # duplicates first seen in the same batch, in an earlier one and in the other
    # region, zero pages, and pages one byte apart from a duplicate (same first bytes).
    rng = random.Random(5)
    pool = [_page(t) for t in range(1, 40)] + [bytes(PAGE)]
    near = bytearray(pool[0])
    near[PAGE // 2] ^= 1
    pool.append(bytes(near))
    regions = [
        [rng.choice(pool) if rng.random() < 0.6 else rng.randbytes(PAGE) for _ in range(n)]
        for n in (300, 157)
    ]
    maps = [_region(r) for r in regions]
    mps = 8
    counts = Counter(c for r in regions for c in r)
    want_saved = sum(n - -(-n // mps) for n in counts.values())
    got = []
    try:
        for workers in (1, 4):
            sc = native.Scanner(mps, False, batch_pages=3, workers=workers, confirm_bytes=confirm_bytes)
            assert sc.workers == workers
            for (_, addr), r in zip(maps, regions):
                idx = sc.add_region(os.getpid(), addr, addr + len(r) * PAGE, check_ksm=False)
                sc.scan(idx, addr, addr + len(r) * PAGE)
            per_region, _, total = sc.finish(2)
            # Timings, and fetches of first sightings (which page is first depends on the order)
            # differ; every count must not.
            skip = ("read_ns", "hash_ns", "map_ns", "index_ns", "refetch_ns")
            got.append((per_region, {k: v for k, v in total.items() if k not in skip}))
    finally:
        for m, _ in maps:
            m.close()
    (one, total), (four, total4) = got
    assert total == total4
    for a, b in zip(one, four):
        # Shares are sums of fractions, added up in the order the pages were indexed.
        assert a.pop("saved_share") == pytest.approx(b.pop("saved_share"))
        assert a == b
    assert total["present"] == sum(len(r) for r in regions)
    assert total["distinct"] == len(counts)
    assert total["dup_groups"] == sum(n > 1 for n in counts.values())
    assert total["zero"] == counts[bytes(PAGE)]
    assert total["saved"] == want_saved
    assert total["hash_collisions"] == 0


def test_first_pages_changed_or_gone_before_their_second_sighting() -> None:
    # Bytes mode: the first page of a content is re-read when another sighting comes in a
    # later batch. Between the two scans here one first page is rewritten and another
    # unmapped: they no longer witness their content, and the later page takes over.
    a, b, c = _page(1), _page(2), _page(3)
    m1, addr1 = _region([a, b])
    mc, addrc = _region([c])
    m2, addr2 = _region([c, a, b, a])
    try:
        sc = native.Scanner(max_page_sharing=256, use_zero_pages=False, confirm_bytes=True)
        for addr, n in ((addr1, 2), (addrc, 1)):
            idx = sc.add_region(os.getpid(), addr, addr + n * PAGE, check_ksm=False)
            sc.scan(idx, addr, addr + n * PAGE)
        m1[PAGE + 7] ^= 0xFF  # b's first page changes
        mc.close()  # c's first page goes away
        idx = sc.add_region(os.getpid(), addr2, addr2 + 4 * PAGE, check_ksm=False)
        sc.scan(idx, addr2, addr2 + 4 * PAGE)
        _, _, total = sc.finish(3)
    finally:
        m1.close()
        m2.close()
    # One re-read per content, all in one batch (c missing, a and b read after it, b
    # changed); both a pages are compared with the one re-read of a's first page.
    assert sc.order_counts["refetched"] == 3
    assert total["distinct"] == 3 and total["dup_groups"] == 3
    assert total["present"] == 7
    assert total["saved"] == 2 + 1 + 1  # the stale pages stay counted with their old content
    assert total["hash_collisions"] == 0


def test_avx2_and_portable_hashes_agree() -> None:
    data = os.urandom(PAGE * 8) + bytes(PAGE)
    fast = native.hash_pages(data)
    slow = [native.lib.kn_hash_page_portable(data[i * PAGE :], PAGE) for i in range(9)]
    assert fast == slow


def test_scan_rejects_out_of_order_and_unaligned() -> None:
    sc = native.Scanner(256, False)
    with pytest.raises(OSError):
        sc.add_region(os.getpid(), 1, PAGE * 2, check_ksm=False)
    m, addr = _region([bytes(PAGE)] * 2)
    try:
        idx = sc.add_region(os.getpid(), addr, addr + 2 * PAGE, check_ksm=False)
        with pytest.raises(OSError):
            sc.scan(idx, addr + PAGE, addr + 2 * PAGE)  # must start where the last chunk ended
        sc.scan(idx, addr, addr + PAGE)
        sc.scan(idx, addr + PAGE, addr + 2 * PAGE)
    finally:
        m.close()


def _vma(perms: str = "rw-p", inode: int = 0, path: str = "", flags: str = "rd wr mr mw me ac") -> Vma:
    return Vma(0x1000, 0x3000, perms, 0, inode, path, frozenset(flags.split()))


def test_skip_reasons() -> None:
    assert _vma().why_not_mergeable() is None
    assert _vma(path="[heap]").why_not_mergeable() is None
    assert "shared" in (_vma(perms="rw-s", flags="rd wr sh").why_not_mergeable() or "")
    assert "file-backed" in (_vma(inode=42, path="/usr/lib/libc.so.6").why_not_mergeable() or "")
    assert "hugetlb" in (_vma(flags="rd wr ht").why_not_mergeable() or "")
    assert "special" in (_vma(path="[vvar]").why_not_mergeable() or "")


def test_parse_range() -> None:
    assert scan.parse_range("7f0000000000-7f0000002000") == (0x7F0000000000, 0x7F0000002000)
    assert scan.parse_range("0x1000-0x3000") == (0x1000, 0x3000)
    for bad in ("1000", "3000-1000", "zz-1000", "1001-3000"):
        with pytest.raises(UsageError):
            scan.parse_range(bad)


def test_untouched_and_zero_page_mappings_cost_nothing() -> None:
    m = mmap.mmap(-1, 64 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    try:
        assert sum(m[i * PAGE] for i in range(0, 32)) == 0  # read faults: the shared zero page
        m[40 * PAGE] = 1  # one real page
        sc = native.Scanner(256, False)
        idx = sc.add_region(os.getpid(), addr, addr + 64 * PAGE, check_ksm=False)
        sc.scan(idx, addr, addr + 64 * PAGE)
        (r,), _, total = sc.finish(1)
    finally:
        m.close()
    assert r["zero_mapped"] == 32
    assert r["present"] == 1 and total["present"] == 1
    assert total["saved"] == 0


@pytest.mark.parametrize("confirm_bytes", [False, True], ids=["hash128", "bytes"])
def test_index_growth_keeps_every_count(confirm_bytes: bool) -> None:
    # More contents than the index's first allocation (4096 groups, 8192 table slots):
    # its arrays and table grow several times during the scan.
    n = 3 * 4096
    uniq = os.urandom(n * PAGE)
    first = [uniq[i * PAGE : (i + 1) * PAGE] for i in range(n)]
    second = first[: n // 2][::-1] + [bytes(PAGE)] * 5  # half again, in another order, and zeros
    maps = [_region(first), _region(second)]
    try:
        sc = native.Scanner(256, False, workers=2, confirm_bytes=confirm_bytes)
        for m, addr in maps:
            idx = sc.add_region(os.getpid(), addr, addr + len(m), check_ksm=False)
            sc.scan(idx, addr, addr + len(m))
        (one, two), _, total = sc.finish(2)
    finally:
        for m, _ in maps:
            m.close()
    assert total["present"] == n + n // 2 + 5
    assert total["distinct"] == n + 1
    assert total["dup_groups"] == n // 2 + 1
    assert total["saved"] == n // 2 + 4
    assert one["dup_process"] == n // 2 and two["dup_process"] == n // 2 and two["dup_region"] == 5


def test_estimate_reports_what_the_scan_cost() -> None:
    pages = [_page(1)] * 8 + [os.urandom(PAGE) for _ in range(24)]
    m, addr = _region(pages)
    try:
        # The kernel's rules are machine-wide (another checkout's test may be changing them).
        est = scan.estimate(
            [os.getpid()], ranges={os.getpid(): [(addr, addr + len(pages) * PAGE)]}, rules=(256, False)
        )
    finally:
        m.close()
    cost = est.cost
    assert cost is not None
    assert est.totals["present"] == len(pages) and est.saved == 7
    assert cost.bytes_read == len(pages) * PAGE == est.totals["bytes_read"]
    assert cost.bytes_refetched == 0  # 128-bit hash mode reads nothing twice
    assert cost.index_bytes == est.totals["index_bytes"] > 0
    assert cost.seconds == est.seconds > 0 and cost.cpu_seconds > 0
    assert cost.peak_rss_bytes >= cost.rss_before_bytes > 0
    d = est.as_dict()["cost"]
    assert isinstance(d, dict) and set(d) == {
        "seconds",
        "cpu_seconds",
        "bytes_read",
        "bytes_refetched",
        "index_bytes",
        "peak_rss_bytes",
        "rss_before_bytes",
        "peak_rss_reset",
    }


def _proc_root(tmp_path, ksm_mergeable: str):  # type: ignore[no-untyped-def]
    """host1's pid 2761 with a maps file, and KSM's view of it as given."""
    import shutil
    from pathlib import Path

    from ksmtrace.kernel.procfs import ProcFS

    src = Path(__file__).resolve().parents[1] / "fixtures" / "host1" / "proc" / "2761"
    d = tmp_path / "proc" / "2761"
    shutil.copytree(src, d)
    heads = [ln for ln in (d / "smaps").read_text().splitlines() if ln[:1].isalnum() and "-" in ln.split()[0]]
    (d / "maps").write_text("\n".join(heads) + "\n")
    (d / "ksm_stat").write_text(
        f"ksm_rmap_items 0\nksm_zero_pages 0\nksm_merging_pages 0\nksm_process_profit 0\n"
        f"ksm_merge_any: no\nksm_mergeable: {ksm_mergeable}\n"
    )
    return ProcFS(tmp_path / "proc"), d


def test_ranges_of_a_process_out_of_ksm_are_judged_from_maps(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """smaps walks every page table (12 ms per GiB mapped); a process KSM has
    none of needs only maps. The same pieces come out either way, but for
    VM_MERGEABLE, which such a process cannot use."""
    proc, d = _proc_root(tmp_path, "yes")
    want = {2761: [(0x7FD2A7800000, 0x7FD2A7B80000), (0x00400000, 0x00420000)]}
    (whole,), _, _ = scan._targets([2761], proc, None, want)
    proc, d = _proc_root(tmp_path / "out", "no")
    (d / "smaps").unlink()  # read it and the target is gone
    (cheap,), gone, denied = scan._targets([2761], proc, None, want)
    assert (gone, denied) == ([], [])
    assert [(v.start, v.end, v.perms, v.path) for v in cheap.scan] == [
        (v.start, v.end, v.perms, v.path) for v in whole.scan
    ]
    assert [(v.start, v.end) for v in cheap.scan] == [
        (0x7FD2A7800000, 0x7FD2A7B00000),
        (0x7FD2A7B00000, 0x7FD2A7B80000),
    ]
    assert [s.reason for s in cheap.skipped] == [s.reason for s in whole.skipped]
    assert [s.reason for s in cheap.skipped] == ["file-backed: KSM merges anonymous pages only"] * 2
    assert not any(v.mergeable for v in cheap.scan)
