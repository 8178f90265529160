"""Soft-dirty change detection against the real kernel: clear_refs, pagemap bit 55, the daemon's gate.

The soft-dirty tests need CONFIG_MEM_SOFT_DIRTY (features.FEATURES["soft_dirty"]):
where the kernel is built without it they are skipped as lacking it, and the
test that runs everywhere checks that ksmtrace then falls back to scanning.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ksmtrace import scan
from ksmtrace.coordinator.relook import RelookGate
from ksmtrace.kernel import features, pagemap
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.workload import Workload

pytestmark = pytest.mark.system

PAGE = 4096
PAGES = 1024  # 4 MiB


def _region(wl: Workload) -> tuple[int, int]:
    r = wl.call("alloc", name="a", pages=PAGES, kind="unique")
    return r["addr"], r["addr"] + r["len"]


@pytest.mark.requires_kernel_feature("soft_dirty")
def test_clear_then_writes_make_exactly_those_pages_dirty(workload: Callable[..., Workload]) -> None:
    wl = workload()
    start, end = _region(wl)
    pagemap.clear_soft_dirty(wl.pid)
    assert pagemap.soft_dirty_pages(wl.pid, [(start, end)]) == 0, "an untouched process after clear_refs 4"
    wl.call("write", name="a", first=0, count=37)
    dirty = pagemap.soft_dirty_pages(wl.pid, [(start, end)])
    # 37 exactly with 4 KiB pages; a transparent huge page is dirty as a whole (up to 512).
    assert 37 <= dirty <= 512, dirty
    pagemap.clear_soft_dirty(wl.pid)
    assert pagemap.soft_dirty_pages(wl.pid, [(start, end)]) == 0


@pytest.mark.requires_kernel_feature("soft_dirty")
def test_gate_says_unchanged_then_changed(workload: Callable[..., Workload]) -> None:
    wl = workload()
    start, end = _region(wl)
    proc = ProcFS()
    gate = RelookGate("soft-dirty", proc)
    assert gate.on and not gate.notes
    # A look as the daemon makes it: clear, scan every mapping of the process, note the choice.
    gate.before_scan(wl.pid)
    est = scan.estimate([wl.pid], strict=True, proc=proc, runs_gap=8)
    gate.after_scan(wl.pid, est, ())
    # The workload waits for its next command: nothing written, nothing mapped.
    assert gate.unchanged(wl.pid) == (), f"{gate.last_dirty.get(wl.pid)} soft-dirty pages"
    assert gate.last_dirty[wl.pid] == 0
    wl.call("write", name="a", first=100, count=5)
    assert gate.unchanged(wl.pid) is None
    assert gate.last_dirty[wl.pid] >= 5
    # Rescanned: clean again; then a new mapping changes the list of mappings.
    gate.before_scan(wl.pid)
    gate.after_scan(wl.pid, scan.estimate([wl.pid], strict=True, proc=proc), ())
    assert gate.unchanged(wl.pid) == ()
    wl.call("alloc", name="b", pages=16, kind="unique")
    assert gate.unchanged(wl.pid) is None and gate.last_dirty[wl.pid] == -1


def test_without_soft_dirty_every_look_scans(workload: Callable[..., Workload]) -> None:
    """Runs on every kernel: the readers work, and the bits agree with the probe."""
    wl = workload()
    start, end = _region(wl)
    proc = ProcFS()
    spans = proc.map_spans(wl.pid)
    assert [(v.start, v.end) for v in proc.smaps(wl.pid)] == list(spans)
    pagemap.clear_soft_dirty(wl.pid)  # accepted with or without CONFIG_MEM_SOFT_DIRTY
    wl.call("write", name="a", first=0, count=8)
    dirty = pagemap.soft_dirty_pages(wl.pid, [(start, end)])
    assert (dirty >= 8) == features.available("soft_dirty"), dirty
    gate = RelookGate("soft-dirty", proc)
    gate.before_scan(wl.pid)
    gate.after_scan(wl.pid, scan.estimate([wl.pid], strict=True, proc=proc), ())
    if not features.available("soft_dirty"):
        assert gate.unchanged(wl.pid) is None and "soft_dirty" in gate.notes[0]
    assert RelookGate("rescan", proc).unchanged(wl.pid) is None
