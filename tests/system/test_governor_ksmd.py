"""The ksmd governor driving the real ksmd: CPU share within budget, off when nothing is left.

Run with -s to see the measured numbers and every decision.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ksmtrace.coordinator.actuator import KnobChange
from ksmtrace.coordinator.governor import GovernorDriver, KsmdGovernor, KsmdReader, KsmdSetting
from ksmtrace.coordinator.policy import Ksmd
from ksmtrace.kernel import features, ksm_sysfs
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.workload import PAGE, Workload

pytestmark = pytest.mark.system
MIB = 1 << 20


def mergeable_pages(*pids: int) -> int:
    """The caller's count of pages in VM_MERGEABLE areas (what the daemon passes)."""
    proc = ProcFS()
    return sum(v.length for pid in pids for v in proc.smaps(pid) if v.mergeable) // PAGE


class KsmdClock:
    """ksmd's CPU share between two reads, from two sources: schedstat (exact, what the
    governor reads) and stat's utime+stime ticks (sampled, independent of the governor)."""

    def __init__(self) -> None:
        self.reader = KsmdReader()
        assert self.reader.pid is not None, "no ksmd kernel thread"
        self.proc = ProcFS()
        self.mark()

    def _ticks_s(self) -> float:
        assert self.reader.pid is not None
        return self.proc.stat(self.reader.pid).cpu_ticks / self.reader.hz

    def mark(self) -> None:
        self.t, self.cpu, self.ticks = time.monotonic(), self.reader.cpu_s(), self._ticks_s()
        self.full_scans = int(ksm_sysfs.read().get("full_scans") or 0)

    def share(self) -> tuple[float, float, float, int]:
        """(schedstat %, ticks %, seconds, full scans) since mark()."""
        t, cpu, ticks = time.monotonic(), self.reader.cpu_s(), self._ticks_s()
        assert cpu is not None and self.cpu is not None
        dt = t - self.t
        scans = int(ksm_sysfs.read().get("full_scans") or 0) - self.full_scans
        return 100 * (cpu - self.cpu) / dt, 100 * (ticks - self.ticks) / dt, dt, scans


def run_steps(driver: GovernorDriver, steps: int, pids: tuple[int, ...], log: list[KsmdSetting]) -> None:
    for _ in range(steps):
        d = driver.step(mergeable_pages(*pids))
        log.append(d)
        print(f"  run={d.run} pages_to_scan={d.pages_to_scan} sleep={d.sleep_millisecs}: {d.reason}")
        time.sleep(1.0)


def knobs_restored(change: KnobChange) -> None:
    now = ksm_sysfs.read().knobs
    want = {k: (0 if k == "run" and v == 2 else v) for k, v in change.saved.values.items()}
    assert {k: now.get(k) for k in want} == want


def big_workload(workload, pages: int) -> Workload:  # noqa: ANN001
    wl = workload(comm="gov-wl")
    # Half the pages from a pool of contents both processes share, half unique:
    # ksmd merges the first half and keeps rescanning the unique half, at a cost.
    wl.call("alloc", name="a", pages=pages, kind="mix", fraction=0.5, seed=wl.pid, pool=256)
    assert wl.call("madvise", name="a")["ret"] == 0
    return wl


@pytest.mark.host_only(
    "512 MiB filled page by page, ksmd timed: minutes under emulation; the VM's off/on test drives the knobs"
)
@pytest.mark.ksm
def test_governor_holds_ksmd_to_its_budget(ksm, workload, tmp_path: Path) -> None:
    budget = 5.0
    pages = 256 * MIB // PAGE
    wls = [big_workload(workload, pages) for _ in range(2)]
    pids = tuple(w.pid for w in wls)
    assert mergeable_pages(*pids) == 2 * pages
    # Aggressive: 5000 pages a batch with no sleep keeps ksmd busy most of a core.
    ksm.set(pages_to_scan=5000, sleep_millisecs=0, run=1)
    clock = KsmdClock()
    time.sleep(3.0)
    before, before_ticks, before_dt, _ = clock.share()
    print(f"\nbefore: ksmd {before:.1f}% of a core (ticks {before_ticks:.1f}%) over {before_dt:.1f} s")
    assert before > 3 * budget, "the aggressive start should be far over budget"
    # A full scan of 131072 pages wished every 5 s needs ~26k pages/s, more than 5%
    # buys (~6-12k pages/s at 4-8 us a page): the budget binds, not the wish.
    # quiet_scans: this test is about the budget; the off rule has its own test,
    # and ksmd switched off would meet any budget trivially.
    policy = Ksmd(budget_pct=budget, full_scan_s=5.0, advisor="off", sleep_millisecs=20)
    with KnobChange("test-governor", journal_dir=tmp_path) as change:
        gov = KsmdGovernor(policy, features.available("ksm_advisor"), quiet_scans=10_000)
        driver = GovernorDriver(gov, change)
        log: list[KsmdSetting] = []
        run_steps(driver, 25, pids, log)
        assert log[-1].pages_to_scan < 5000
        sharing0 = int(ksm_sysfs.read().get("pages_sharing") or 0)
        clock.mark()
        run_steps(driver, 10, pids, log)
        share, ticks, dt, scans = clock.share()
        sharing = int(ksm_sysfs.read().get("pages_sharing") or 0)
        knobs = ksm_sysfs.read().knobs
        print(
            f"after: ksmd {share:.2f}% of a core (ticks {ticks:.1f}%) over {dt:.1f} s, budget {budget}%; "
            f"{scans} full scans, pages_sharing {sharing0} -> {sharing}, "
            f"pages_to_scan {knobs['pages_to_scan']}, sleep {knobs['sleep_millisecs']} ms"
        )
        assert knobs["run"] == 1 and all(d.run == 1 for d in log)
        # Tolerance 1.5x: the governor aims at 90% of the budget with one cost per
        # page, but the real cost changes as merging goes on (about 4 us a first
        # visit, 8 us a rescan of a unique page, 0.3 us a merged one), it reacts
        # only past the budget (the deadband) and by at most x0.5 a step, and ksmd
        # shares 2 CPUs with a CI run: a window can run over before it is corrected.
        assert share <= 1.5 * budget, f"ksmd used {share:.2f}% of a core, budget {budget}%"
        assert share > 0.1 * budget, "ksmd should still be working, not starved to nothing"
        assert scans >= 1 or sharing > 0, "ksmd made no progress"
    knobs_restored(change)
    assert ksm_sysfs.read().knobs["pages_to_scan"] == 5000  # as the governor found it


@pytest.mark.ksm
def test_governor_turns_ksmd_off_when_nothing_is_left(ksm, workload, tmp_path: Path) -> None:
    policy = Ksmd(budget_pct=20.0, full_scan_s=1.0, sleep_millisecs=20)
    with KnobChange("test-governor", journal_dir=tmp_path) as change:
        driver = GovernorDriver(KsmdGovernor(policy, features.available("ksm_advisor")), change)
        # Nothing is mergeable anywhere: off at once, and the decision says why.
        d = driver.step(0)
        print(f"\nempty: {d.reason}")
        assert d.run == 0 and "no memory is mergeable" in d.reason
        assert ksm_sysfs.read().knobs["run"] == 0
        # New mergeable memory: woken, ksmd merges it, then two full scans find
        # nothing new and it goes off again.
        wl = workload(comm="gov-quiet")
        reg = wl.call("alloc", name="a", pages=4096, kind="dup")
        assert wl.call("madvise", name="a")["ret"] == 0
        driver.wake(f"pid {wl.pid} made 16 MiB mergeable")
        d = driver.step(mergeable_pages(wl.pid))
        print(f"woken: {d.reason}")
        assert d.run == 1 and f"pid {wl.pid}" in d.reason and ksm_sysfs.read().knobs["run"] == 1
        # Upper bounds for the CI VM's software emulation; seconds here.
        ksm.wait_merged(wl.pid, reg["addr"], reg["len"], 4096, timeout=240)
        deadline = time.monotonic() + 240
        while d.run == 1 and time.monotonic() < deadline:
            time.sleep(0.5)
            d = driver.step(mergeable_pages(wl.pid))
        print(f"quiet: {d.reason}")
        assert d.run == 0 and "full scans merged nothing new" in d.reason
        knobs = ksm_sysfs.read()
        # max_page_sharing (256) splits 4096 copies over several KSM pages: shared + sharing.
        merged = int(knobs.get("pages_sharing") or 0) + int(knobs.get("pages_shared") or 0)
        assert knobs.knobs["run"] == 0 and merged == 4096
    knobs_restored(change)


@pytest.mark.host_only("the governor's bound is its own logic (unit tests too)")
@pytest.mark.ksm
def test_tiny_cpu_never_cranks_past_max(ksm, workload, tmp_path: Path) -> None:
    wl = workload(comm="gov-tiny")
    reg = wl.call("alloc", name="a", pages=4096, kind="dup")
    assert wl.call("madvise", name="a")["ret"] == 0
    ksm.start()
    ksm.wait_merged(wl.pid, reg["addr"], reg["len"], 4096)
    ksm.set(pages_to_scan=16, sleep_millisecs=20)
    # 4096 merged pages cost ksmd almost nothing; a scan wished every 0.1 s would
    # need ~820 pages a batch, past the policy's 400.
    policy = Ksmd(budget_pct=50.0, full_scan_s=0.1, max_pages_to_scan=400, sleep_millisecs=20)
    clock = KsmdClock()
    seen = []
    with KnobChange("test-governor", journal_dir=tmp_path) as change:
        gov = KsmdGovernor(policy, features.available("ksm_advisor"), quiet_scans=10_000)
        driver = GovernorDriver(gov, change)
        log: list[KsmdSetting] = []
        print()
        for _ in range(12):
            run_steps(driver, 1, (wl.pid,), log)
            seen.append(int(ksm_sysfs.read().knobs["pages_to_scan"]))
        share, ticks, dt, scans = clock.share()
        print(f"tiny: ksmd {share:.2f}% of a core (ticks {ticks:.1f}%) over {dt:.1f} s; pages_to_scan {seen}")
        assert max(seen) == 400 and seen[-1] == 400
        assert share < policy.budget_pct
    knobs_restored(change)


@pytest.mark.ksm
@pytest.mark.requires_kernel_feature("ksm_advisor")
def test_kernel_advisor_is_set_up_and_left_alone(ksm, workload, tmp_path: Path) -> None:
    wl = workload(comm="gov-advisor")
    wl.call("alloc", name="a", pages=8192, kind="mix", fraction=0.5, seed=3)
    assert wl.call("madvise", name="a")["ret"] == 0
    ksm.set(pages_to_scan=5000, sleep_millisecs=0)
    policy = Ksmd(budget_pct=5.0, full_scan_s=30.0, advisor="kernel", sleep_millisecs=20)
    with KnobChange("test-governor", journal_dir=tmp_path) as change:
        driver = GovernorDriver(KsmdGovernor(policy, True, quiet_scans=10_000), change)
        log: list[KsmdSetting] = []
        print()
        run_steps(driver, 5, (wl.pid,), log)
        knobs = ksm_sysfs.read().knobs
        assert knobs["advisor_mode"] == "scan-time" and knobs["run"] == 1
        assert (knobs["advisor_max_cpu"], knobs["advisor_target_scan_time"]) == (5, 30)
        assert knobs["sleep_millisecs"] == 20
        # The advisor owns pages_to_scan: the governor never wrote it (the journal
        # lists every knob it set), whatever the advisor chose.
        assert "pages_to_scan" not in change.journal.entry.knobs_set
        assert "advisor owns pages_to_scan" in log[-1].reason
    knobs_restored(change)
    assert ksm_sysfs.read().knobs["advisor_mode"] == "none"
