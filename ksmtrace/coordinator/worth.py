"""Which runs of duplicate pages are worth making mergeable: the one judgement.

Marking a whole mapping mergeable makes ksmd visit every page of it on every
pass, forever, merging or not; on a host the duplicates may be a tenth of the
memory, scattered in short runs among unique pages. So ranges are cut around
the runs the scanner found (``scan.estimate(..., runs_gap=)``), and each
becomes a VMA of its own: they are bounded per process and by what
vm.max_map_count leaves (mmap and madvise fail past it, in the target).

``merge --auto`` and the daemon both call :func:`choose`; every choice and
every range left out carries its numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ksmtrace.coordinator.policy import Runs
from ksmtrace.kernel import host
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.scan import Estimate, PageRun, RegionEstimate


@dataclass(frozen=True)
class Choice:
    """A range to make mergeable, and why (``reason``: the numbers in words)."""

    start: int
    end: int
    name: str  # the mapping it lies in
    dup_pages: int
    predicted_saving_pages: float
    reason: str

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Choices:
    """What :func:`choose` kept for one process, and what it left out (counts of ranges)."""

    pid: int
    ranges: tuple[Choice, ...]  # in address order
    short: int = 0  # runs of fewer than min_run_pages duplicate pages
    over_max_ranges: int = 0  # worth it, beyond max_ranges_per_process
    over_vma_headroom: int = 0  # worth it, but the VMAs they need would pass the max_map_count share
    vma_headroom: int = 0  # VMAs the process could still gain when choosing
    too_small: float = 0.0  # the total saving when under min_saving_pages (nothing kept then)

    @property
    def saving_pages(self) -> float:
        return sum(c.predicted_saving_pages for c in self.ranges)


def vma_headroom(pid: int, share: float, proc: ProcFS | None = None) -> int:
    """VMAs ``pid`` may still gain: ``share`` of vm.max_map_count minus what it has."""
    return max(0, int(host.max_map_count() * share) - (proc or ProcFS()).map_count(pid))


def _new_vmas(start: int, end: int, region: RegionEstimate) -> int:
    # madvise on part of a mapping splits it: one new VMA per edge inside it.
    return (start > region.start) + (end < region.end)


def _size(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def _reason(run: PageRun, saving: float, page: int) -> str:
    pages = run.pages
    ksm = f", {run.ksm_pages} KSM already" if run.ksm_pages else ""
    return (
        f"{run.dup_pages} duplicate pages of {pages} ({run.dup_pages / pages:.0%}){ksm}, "
        f"saves {saving:.0f} pages ({_size(saving * page)})"
    )


def choose(est: Estimate, pid: int, rules: Runs, headroom: int | None = None) -> Choices:
    """Ranges of ``pid`` worth making mergeable, from an estimate taken with
    ``runs_gap=rules.max_gap_pages`` (regions without runs give nothing).

    Regions already mergeable are left as they are. A run (runs closer than
    max_gap_pages already joined) with fewer than ``min_run_pages`` duplicate
    pages is dropped; the rest are ranked by duplicate pages per page of range,
    then by duplicate pages, and kept while there is room: at most
    ``max_ranges_per_process``, and the VMAs the splits create within
    ``headroom`` (default: ``max_map_count_share`` of vm.max_map_count minus
    the process's mappings now). If all kept together would save fewer than
    ``min_saving_pages``, nothing is (a ptrace stop per range and ksmd's
    bookkeeping are not worth a handful of pages).

    A run's saving is its share of its region's (the region's saving spread
    over the duplicate pages of its runs): the estimate counts savings per
    region, and a content's saving is shared equally by its pages there too.
    """
    if headroom is None:
        headroom = vma_headroom(pid, rules.max_map_count_share)
    cands: list[tuple[float, int, int, RegionEstimate, PageRun, float]] = []
    short = 0
    for p in est.processes:
        if p.pid != pid:
            continue
        for r in p.regions:
            if r.mergeable or not r.runs:
                continue
            dup_total = sum(run.dup_pages for run in r.runs)
            per_dup = r.saved_share / dup_total if dup_total else 0.0
            for run in r.runs:
                if run.dup_pages < rules.min_run_pages:
                    short += 1
                    continue
                density = run.dup_pages / run.pages
                cands.append((-density, -run.dup_pages, run.start, r, run, run.dup_pages * per_dup))
    cands.sort(key=lambda c: c[:3])
    kept: list[Choice] = []
    over_max = over_vma = 0
    left = headroom
    for *_, region, run, saving in cands:
        cost = _new_vmas(run.start, run.end, region)
        if len(kept) >= rules.max_ranges_per_process:
            over_max += 1
        elif cost > left:
            over_vma += 1
        else:
            left -= cost
            reason = _reason(run, saving, est.page_size)
            kept.append(Choice(run.start, run.end, region.name, run.dup_pages, saving, reason))
    total = sum(c.predicted_saving_pages for c in kept)
    too_small = 0.0
    if kept and total < rules.min_saving_pages:
        kept, too_small = [], total
    kept.sort(key=lambda c: c.start)
    return Choices(pid, tuple(kept), short, over_max, over_vma, headroom, too_small)
