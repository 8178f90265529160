"""The cffi-built native module: hashing, zero-page detection, collisions forced by a hash mask."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
from collections import Counter

import pytest

from ksmtrace import native

PAGE = native.PAGE


def test_identical_pages_hash_equal_and_distinct_differ() -> None:
    a = os.urandom(PAGE)
    b = bytearray(a)
    b[PAGE - 1] ^= 1
    h = native.hash_pages(a + a + bytes(b))
    assert h[0] == h[1] != h[2]


def test_zero_pages_counted() -> None:
    data = bytearray(PAGE * 4)
    data[PAGE * 2 + PAGE - 1] = 1  # last byte only: the tail compare must catch it
    assert native.count_zero_pages(data) == 3
    data[0] = 1
    assert native.count_zero_pages(data) == 2


def test_version() -> None:
    assert native.version().startswith("ksmnative")


# ---- forced hash collisions: bytes decide, never the hash alone ----------------


def _mapped(contents: list[bytes]) -> tuple[mmap.mmap, int]:
    m = mmap.mmap(-1, len(contents) * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i, c in enumerate(contents):
        m[i * PAGE : (i + 1) * PAGE] = c
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def _scan_own(
    regions: list[list[bytes]], mask: int | None, batch: int, workers: int, confirm_bytes: bool
) -> dict[str, int]:
    maps = [_mapped(r) for r in regions]
    try:
        sc = native.Scanner(
            max_page_sharing=256,
            use_zero_pages=False,
            batch_pages=batch,
            workers=workers,
            confirm_bytes=confirm_bytes,
        )
        if mask is not None:
            sc.set_hash_mask(mask)
        for (_, addr), r in zip(maps, regions):
            idx = sc.add_region(os.getpid(), addr, addr + len(r) * PAGE, check_ksm=False)
            sc.scan(idx, addr, addr + len(r) * PAGE)
        _, _, total = sc.finish(len(regions))
    finally:
        for m, _ in maps:
            m.close()
    return total


# Bytes mode: the mask forces every hash to 0, and the second page is compared with the
# first (re-read from this process, or in the same batch buffer). 128-bit mode: the mask
# forces the 64-bit hash the index is keyed on to 0; the other 64 bits tell them apart.
MODES = pytest.mark.parametrize("confirm_bytes", [True, False], ids=["bytes", "hash128"])


@MODES
@pytest.mark.parametrize("batch", [1, 256], ids=["pages-in-other-batches", "pages-in-one-batch"])
def test_two_different_pages_with_one_hash_are_not_duplicates(batch: int, confirm_bytes: bool) -> None:
    x, y = os.urandom(PAGE), os.urandom(PAGE)
    total = _scan_own([[x, y]], mask=0, batch=batch, workers=1, confirm_bytes=confirm_bytes)
    assert total["present"] == 2
    assert total["distinct"] == 2 and total["dup_groups"] == 0 and total["saved"] == 0
    assert total["hash_collisions"] >= 1  # the hook did force the collision


@MODES
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("mask", [0, 0xF << 60], ids=["all-collide", "16-hashes"])
def test_forced_collisions_give_the_counts_of_real_hashes(
    mask: int, workers: int, confirm_bytes: bool
) -> None:
    rng = random.Random(7)
    pool = [os.urandom(PAGE) for _ in range(6)] + [bytes(PAGE)]
    near = bytearray(pool[0])
    near[PAGE - 1] ^= 1  # one byte from a duplicate
    pool.append(bytes(near))
    regions = [
        [rng.choice(pool) if rng.random() < 0.6 else os.urandom(PAGE) for _ in range(n)] for n in (40, 23)
    ]
    counts = Counter(c for r in regions for c in r)
    skip = ("hash_collisions", "read_ns", "hash_ns", "map_ns", "index_ns", "refetch_ns")
    real = _scan_own(regions, mask=None, batch=4, workers=workers, confirm_bytes=confirm_bytes)
    forced = _scan_own(regions, mask=mask, batch=4, workers=workers, confirm_bytes=confirm_bytes)
    same = {k: v for k, v in forced.items() if k not in skip}
    assert same == {k: v for k, v in real.items() if k not in skip}
    assert real["hash_collisions"] == 0 and forced["hash_collisions"] > 0
    assert forced["distinct"] == len(counts)
    assert forced["dup_groups"] == sum(n > 1 for n in counts.values())
    assert forced["saved"] == sum(n - 1 for n in counts.values())
    assert forced["zero"] == counts[bytes(PAGE)]


def test_own_peak_memory_restarts_when_asked() -> None:
    rss0, _, reset = native.self_memory(reset_peak=True)
    assert reset and rss0 > 0
    size = 64 << 20
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for off in range(0, size, PAGE):
        m[off] = 1  # resident
    m.close()
    rss1, peak1, _ = native.self_memory()
    assert peak1 >= rss0 + size * 15 // 16 > rss1  # the 64 MiB came and went
    _, peak2, _ = native.self_memory(reset_peak=True)
    assert peak2 < peak1 - size // 2  # the peak starts again from now
