"""merge --auto on a host-like layout (issue #11): runs of duplicates, not windows.

Three processes whose duplicate pages, a tenth of their memory, lie in short
runs (2 to 32 pages) scattered among unique ones. First each is given to
``ksmtrace merge -p PID --auto`` (the real CLI, at its defaults) and KSM
merges what it chose; then every region is made mergeable whole and KSM
merges the rest. The chosen runs must reach 90% of the whole saving, and the
mappings made mergeable must hold little more than the duplicates (smaps
VmFlags ``mg``). With everything merged, the scanner's runs must see the KSM
pages even where their twins were not scanned.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from ksmtrace import scan
from ksmtrace.coordinator.policy import Runs
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.native import PAGE
from ksmtrace.workload import plan_content
from tests.system.test_estimate import _settle

pytestmark = pytest.mark.system

PAGES = 8192  # 32 MiB per process
NPROC = 3
LAYOUT = {"kind": "runs", "fraction": 0.1, "run": 32, "pool": 64}


def _covered(ids: list[int | None], gap: int) -> int:
    """Pages of the ranges the layout's runs make when runs at most ``gap`` apart join."""
    dup = [i for i, c in enumerate(ids) if c is not None]
    total, first, last = 0, dup[0], dup[0]
    for at in dup[1:]:
        if at - last - 1 > gap:
            total += last - first + 1
            first = at
        last = at
    return total + last - first + 1


def _mergeable_pages(pid: int, start: int, end: int) -> int:
    """Pages of [start, end) in mappings with VM_MERGEABLE (smaps VmFlags mg)."""
    return sum(
        max(0, min(end, v.end) - max(start, v.start)) // PAGE
        for v in ProcFS().smaps(pid)
        if "mg" in v.vmflags
    )


@pytest.mark.host_only(
    "96 MiB written page by page and merged twice: many minutes under emulation; "
    "the VM's merge --auto and daemon tests take the same runs path"
)
@pytest.mark.ksm
def test_merge_auto_chooses_runs_that_save_what_whole_regions_do(ksm, workload) -> None:
    rules = Runs()
    wls, regions, layouts = [], [], []
    for i in range(NPROC):
        wl = workload(comm=f"runs-{i}")
        r = wl.call("alloc", name="m", pages=PAGES, seed=31 + i, **LAYOUT)
        wls.append(wl)
        regions.append((wl.pid, r["addr"], r["addr"] + r["len"]))
        layouts.append(plan_content("runs", PAGES, 31 + i, 0.1, 32, 64))
    dup = [sum(c is not None for c in ids) for ids in layouts]
    nruns = [sum(1 for k, _ in itertools.groupby(ids, key=lambda c: c is not None) if k) for ids in layouts]

    # 1. merge --auto on each, one after the other (each judged with what is mergeable by then).
    cmd = [sys.executable, "-m", "ksmtrace", "merge"]
    chosen_ranges = []
    for wl in wls:
        out = subprocess.run([*cmd, "-p", str(wl.pid), "--auto", "-j"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        inj = json.loads(out.stdout)["injections"]
        assert inj and all(i["ret"] == 0 for i in inj)
        chosen_ranges.append(len(inj))
    ksm.start()
    runs_saved = _settle(ksm, regions, timeout=120.0)
    mg = [_mergeable_pages(pid, s, e) for pid, s, e in regions]
    joined = [_covered(ids, rules.max_gap_pages) for ids in layouts]

    # 2. every region mergeable whole: what KSM saves when nothing is left out.
    for wl in wls:
        assert wl.call("madvise", name="m")["ret"] == 0
    whole_saved = _settle(ksm, regions, timeout=120.0)

    print(
        f"\n{NPROC} processes x {PAGES} pages, duplicates {dup} in {nruns} runs of 2-32 pages; "
        f"merge --auto chose {chosen_ranges} ranges (ranges anywhere in the process)\n"
        f"  KSM saved: whole regions {whole_saved} pages, chosen runs {runs_saved} pages "
        f"({100 * runs_saved / whole_saved:.1f}%)\n"
        f"  mergeable pages in the regions after --auto: {mg} (duplicates {dup}, "
        f"runs joined at gap {rules.max_gap_pages} cover {joined})"
    )
    assert runs_saved >= 0.9 * whole_saved
    for made, d, cover in zip(mg, dup, joined):
        # Unique pages were not made mergeable: only the duplicates and the short gaps joined in.
        assert d * 0.9 <= made <= min(cover, 1.5 * d)

    # 3. Merged, the scanner's runs count KSM pages as duplicates even alone:
    # one process scanned, its twins elsewhere unseen.
    ksm.set(run=0)
    pid, s, e = regions[0]
    est = scan.estimate([pid], ranges={pid: [(s, e)]}, runs_gap=0)
    (region,) = [r for p in est.processes for r in p.regions]
    ksm_in_runs = sum(r.ksm_pages for r in region.runs)
    print(f"  after merging, pid {pid}: {region.ksm} KSM pages, {ksm_in_runs} of them in runs")
    assert region.ksm > 0.9 * dup[0]
    assert ksm_in_runs == region.ksm
    assert sum(r.dup_pages for r in region.runs) >= region.ksm
