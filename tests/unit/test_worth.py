"""coordinator/worth.choose on estimates made by hand: ranking, bounds, what is left out and why."""

from __future__ import annotations

from ksmtrace.coordinator.policy import Runs
from ksmtrace.coordinator.worth import choose
from ksmtrace.scan import Estimate, PageRun, ProcessEstimate, RegionEstimate

PAGE = 4096
BASE = 0x7F0000000000


def _run(first: int, end: int, dup: int, ksm: int = 0) -> PageRun:
    return PageRun(BASE + first * PAGE, BASE + end * PAGE, dup, ksm)


def _est(
    runs: list[PageRun], pages: int = 1000, saved: float | None = None, mergeable: bool = False
) -> Estimate:
    dup = sum(r.dup_pages for r in runs)
    region = RegionEstimate(
        pid=42,
        start=BASE,
        end=BASE + pages * PAGE,
        name="[anon]",
        mergeable=mergeable,
        present=pages,
        zero=0,
        zero_mapped=0,
        ksm=0,
        volatile_pages=0,
        dup_region=dup,
        dup_process=0,
        dup_cross=0,
        saved_alone=dup,
        saved_share=float(dup if saved is None else saved),
        runs=tuple(runs),
    )
    proc = ProcessEstimate(42, "t", (region,), (), dup, float(dup))
    return Estimate(PAGE, 256, False, (proc,), {"saved": dup}, 0.1, runs_gap=8)


RUNS = [_run(0, 10, 10), _run(100, 140, 20), _run(300, 302, 2), _run(500, 530, 30), _run(990, 1000, 5)]


def test_short_runs_dropped_and_the_rest_in_address_order() -> None:
    got = choose(_est(RUNS), 42, Runs(min_run_pages=4, min_saving_pages=0), headroom=100)
    assert [(c.start - BASE) // PAGE for c in got.ranges] == [0, 100, 500, 990]
    assert got.short == 1  # the 2-page run
    assert got.saving_pages == 10 + 20 + 30 + 5
    first = got.ranges[0]
    assert first.dup_pages == 10 and first.predicted_saving_pages == 10
    assert first.reason == "10 duplicate pages of 10 (100%), saves 10 pages (40 KiB)"


def test_saving_is_the_regions_spread_over_its_duplicate_pages() -> None:
    # The region saves 67 of its 67 duplicate pages' worth... at half: 33.5.
    got = choose(_est(RUNS, saved=33.5), 42, Runs(min_saving_pages=0), headroom=100)
    assert sum(c.predicted_saving_pages for c in got.ranges) == 33.5 * 65 / 67
    assert got.ranges[1].predicted_saving_pages == 33.5 * 20 / 67


def test_densest_ranges_kept_when_ranges_are_bounded() -> None:
    # Densities: 100%, 50%, 100% (30 dup), 50%: the two full ones, larger first.
    got = choose(_est(RUNS), 42, Runs(max_ranges_per_process=2, min_saving_pages=0), headroom=100)
    assert [(c.start - BASE) // PAGE for c in got.ranges] == [0, 500]
    assert got.over_max_ranges == 2 and got.over_vma_headroom == 0


def test_vma_headroom_counts_the_splits_each_range_makes() -> None:
    # Ranked: 500-530 (2 new VMAs), 0-10 (1: at the mapping's start), 990-1000 (1: at its end), 100-140 (2).
    got = choose(_est(RUNS), 42, Runs(min_saving_pages=0), headroom=3)
    assert [(c.start - BASE) // PAGE for c in got.ranges] == [0, 500]
    assert got.over_vma_headroom == 2 and got.vma_headroom == 3
    whole = choose(_est([_run(0, 1000, 900)]), 42, Runs(min_saving_pages=0), headroom=0)
    assert len(whole.ranges) == 1  # the whole mapping: no split, no new VMA


def test_too_small_a_total_chooses_nothing() -> None:
    got = choose(_est([_run(0, 10, 10)]), 42, Runs(min_saving_pages=16), headroom=100)
    assert got.ranges == () and got.too_small == 10
    assert choose(
        _est([_run(0, 10, 10), _run(20, 30, 10)]), 42, Runs(min_saving_pages=16), headroom=100
    ).ranges


def test_mergeable_regions_and_other_processes_are_left_alone() -> None:
    assert choose(_est(RUNS, mergeable=True), 42, Runs(min_saving_pages=0), headroom=100).ranges == ()
    assert choose(_est(RUNS), 43, Runs(min_saving_pages=0), headroom=100).ranges == ()
