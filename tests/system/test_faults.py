"""ksmtrace faults / ksmd against the real kernel: exact KSM COW counts.

A workload region holds pages that KSM merges, unique pages and untouched
(zero-page) pages. After a fork, writes to all three kinds are write-protect
faults, but only the writes to merged pages are KSM copy-on-write: the count
for the process and region must be exactly the number of merged pages
written, and the sum over processes must equal the change of cow_ksm.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time

import pytest

from ksmtrace.kernel import features, pagemap, vmstat
from ksmtrace.kernel.proc_events import ProcEvents
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.kernel.taskstats import DelayAcct, TaskStats
from ksmtrace.model.faults import FaultsState
from ksmtrace.probes.faults import FaultCounts, FaultProbe
from ksmtrace.probes.ksmd import KsmdProbe
from ksmtrace.workload import plan_content

pytestmark = pytest.mark.system

PAGES = 768
UNTOUCHED = 128  # tail pages: zero page after a read
MIX = {"kind": "mix", "fraction": 0.6, "run": 8, "pool": 4, "seed": 11}


def _layout() -> tuple[list[int], list[int], list[int]]:
    ids = plan_content(MIX["kind"], PAGES, MIX["seed"], MIX["fraction"], MIX["run"], MIX["pool"])
    body = PAGES - UNTOUCHED
    dup = [i for i in range(body) if ids[i] is not None]
    unique = [i for i in range(body) if ids[i] is None]
    zero = list(range(body, PAGES))
    return dup, unique, zero


def _pair(fp: FaultProbe) -> tuple:  # type: ignore[type-arg]
    """A fault snapshot and cow_ksm read back to back: other processes on the
    machine (not under the test lock) may break merges at any time."""
    snap = fp.snapshot()
    return snap, vmstat.ksm_vmstat()["cow_ksm"]


def _merge_then_write(ksm, fp, w, r, pages: int, first: int, count: int, step: int):  # type: ignore[no-untyped-def]
    """Let ksmd merge region ``r`` of ``w``, stop it, write every step-th page:
    snapshots before and after the writes, and the cow_ksm change between."""
    ksm.merge_then_stop((w.pid, r, pages))
    s0, cow0 = _pair(fp)
    w.call("write", name="r", first=first, count=count, step=step)
    s1, cow1 = _pair(fp)
    return s0, s1, cow1 - cow0


def _traced(s0, s1, pids=None) -> int:  # type: ignore[no-untyped-def]
    """KSM COW faults traced between two snapshots, for pids (default: all)."""
    total = 0
    for tgid, pf in s1.procs.items():
        if pids is None or tgid in pids:
            total += pf.total.ksm_cow - (s0.procs[tgid].total.ksm_cow if tgid in s0.procs else 0)
    return total


def _assert_path(fp, s0, s1, fast: bool) -> None:  # type: ignore[no-untyped-def]
    """Which path counted the KSM COW faults between two snapshots (all processes).
    ``fast``: pages the merged-page set knows (merge events, preload) must be
    counted from set hits wherever the kernel has ksm:* tracepoints, not by
    checking every fault; otherwise (no tracepoints, walk_all processes) the
    check of every fault counts them all."""
    hits = s1.stats["ksm_cow_fast"] - s0.stats["ksm_cow_fast"]
    walked = s1.stats["ksm_cow_walked"] - s0.stats["ksm_cow_walked"]
    total = _traced(s0, s1)
    assert (hits, walked) == ((total, 0) if fast and fp.merge_events else (0, total)), (hits, walked, total)


def _region_row(report, pid: int, addr: int):  # type: ignore[no-untyped-def]
    proc = next(p for p in report.processes if p.pid == pid)
    return proc, next(r for r in proc.regions if r.start == addr)


def test_ksm_cow_exact_per_process_and_region(ksm, workload, wait_for) -> None:  # type: ignore[no-untyped-def]
    dup, unique, zero = _layout()
    # Merges per process and region come from the ksm:* tracepoints (6.4+);
    # without them the COW counts are checked all the same.
    has_ksm_tp = features.available("ksm_tracepoints")
    with (
        DelayAcct(),
        TaskStats() as ts,
        FaultProbe() as fp,
        KsmdProbe() if has_ksm_tp else contextlib.nullcontext() as kp,
    ):
        # The probe sees merge events exactly where the kernel has the tracepoints.
        assert fp.merge_events == has_ksm_tp
        t0 = time.monotonic()
        state = FaultsState(t0, vmstat.ksm_vmstat()["cow_ksm"])
        # Started after DelayAcct: the kernel gives a task its accounting record at fork.
        a = workload(comm="faults-a")
        b = workload(comm="faults-b")
        ra = a.call("alloc", name="r", pages=PAGES, untouched=UNTOUCHED, **MIX)
        rb = b.call("alloc", name="r", pages=PAGES, untouched=UNTOUCHED, **MIX)
        a.call("read", name="r")  # untouched pages now map the zero page
        for w in (a, b):
            assert w.call("madvise", name="r")["ret"] == 0
        ksm.merge_then_stop((a.pid, ra, len(dup)), (b.pid, rb, len(dup)))

        live_a = pagemap.range_pages(a.pid, ra["addr"], ra["addr"] + ra["len"])
        live_b = pagemap.range_pages(b.pid, rb["addr"], rb["addr"] + rb["len"])
        assert live_a.ksm == len(dup) and live_b.ksm == len(dup)
        if kp is not None:
            merged = kp.snapshot()
            for w, live in ((a, live_a), (b, live_b)):
                c = merged.procs[w.pid]
                assert c.merges - c.unmerges == live.ksm, (w.pid, c, live.ksm)

        child = a.call("fork")["child"]  # unique pages become fork-COW pages for a
        # The child's own faults after fork are over once it sleeps in pause().
        wait_for(lambda: ProcFS().stat(child).state == "S", 5, f"forked child {child} to sleep")
        ksm_written = dup[::3][:70]
        fork_written = unique[::2][:40]
        zero_written = zero[::4]
        b_written = dup[5::7][:33]

        fs0, cow0 = _pair(fp)
        before = state.update(fs0, kp.snapshot() if kp else None, cow0)
        for tgid, ranges in state.wanted_regions.items():  # as the command does
            fp.set_regions(tgid, ranges)
        tsa0, tsb0 = ts.tgid(a.pid), ts.tgid(b.pid)
        a.call("write_pages", name="r", pages=ksm_written)
        a.call("write_pages", name="r", pages=fork_written)
        a.call("write_pages", name="r", pages=zero_written)
        b.call("write_pages", name="r", pages=b_written)
        a.call("write_pages", name="r", pages=ksm_written)  # second writes: no fault at all
        tsa1, tsb1 = ts.tgid(a.pid), ts.tgid(b.pid)
        fs1, cow1 = _pair(fp)
        after = state.update(fs1, kp.snapshot() if kp else None, cow1)
        assert before.processes is not None

        pa, rega = _region_row(after, a.pid, ra["addr"])
        pb, regb = _region_row(after, b.pid, rb["addr"])
        assert pa.rates["ksm_cow"].delta == len(ksm_written)
        assert pb.rates["ksm_cow"].delta == len(b_written)
        assert rega.rates["ksm_cow"].delta == len(ksm_written)
        assert regb.rates["ksm_cow"].delta == len(b_written)
        # Every write-protect fault of the region: KSM, fork and zero-page COW.
        assert rega.rates["wp"].delta == len(ksm_written) + len(fork_written) + len(zero_written)
        assert regb.rates["wp"].delta == len(b_written)
        # The sum over all processes is the kernel's own machine-wide count.
        assert after.cow_ksm is not None
        assert after.ksm_cow_sum == cow1 - cow0 == after.cow_ksm.delta
        assert _traced(fs0, fs1) == cow1 - cow0
        _assert_path(fp, fs0, fs1, fast=True)
        assert after.drops["walk_failures"] == 0
        # Merges per region: the ranges ksmd merged are the same rows.
        if kp is not None:
            assert rega.rates["merges"].total - rega.rates["unmerges"].total == len(dup)
        # taskstats counts pages copied on write (any kind, any region): b only
        # broke merges; a's write-protect faults are copies or reuses (its
        # interpreter's own pages after the fork), so copies lie in between.
        assert tsb1.wpcopy_count - tsb0.wpcopy_count == len(b_written) == pb.rates["wp"].delta
        copies = tsa1.wpcopy_count - tsa0.wpcopy_count
        assert len(ksm_written) + len(fork_written) + len(zero_written) <= copies <= pa.rates["wp"].delta

        live_after = pagemap.range_pages(a.pid, ra["addr"], ra["addr"] + ra["len"])
        assert live_after.ksm == len(dup) - len(ksm_written)


def test_unmerged_pages_are_not_ksm_cow(ksm, workload) -> None:  # type: ignore[no-untyped-def]
    """MADV_UNMERGEABLE unshares merged pages (cow_ksm counts those copies, no
    fault is taken); later writes there are plain faults, not KSM COW."""
    with FaultProbe() as fp:
        w = workload()
        r = w.call("alloc", name="r", pages=256, kind="dup", seed=3)
        w.call("madvise", name="r")
        ksm.merge_then_stop((w.pid, r, 256))
        s0, cow0 = _pair(fp)
        assert w.call("madvise", name="r", advice="unmergeable", first=0, count=128)["ret"] == 0
        s1, cow1 = _pair(fp)
        w.call("write", name="r", first=0, count=128)  # unshared: read-only private copies
        w.call("write", name="r", first=128, count=10)  # still merged
        s2, cow2 = _pair(fp)
    # The kernel's unshare copies (no fault: not traced), beside what others broke.
    assert cow1 - cow0 - _traced(s0, s1) == 128
    assert _traced(s1, s2, {w.pid}) == 10
    assert _traced(s1, s2) == cow2 - cow1
    _assert_path(fp, s1, s2, fast=True)


def test_process_events_exec_and_exit(wait_for) -> None:
    with ProcEvents() as pe:
        child = subprocess.Popen(
            [sys.executable, "-c", "import os; os.execv('/bin/true', ['true'])"],
        )
        child.wait()
        seen: list[str] = []

        def exit_seen() -> bool:
            seen.extend(e.kind for e in pe.read() if e.tgid == child.pid)
            return "exit" in seen

        wait_for(exit_seen, 2, f"the exit event of pid {child.pid}")
    # In order: Popen's fork, its exec of Python, Python's exec of true, the exit.
    assert seen == ["fork", "exec", "exec", "exit"]
    state = FaultsState(time.monotonic())
    from ksmtrace.kernel.proc_events import ProcEvent

    assert state.apply_events([ProcEvent("exit", child.pid, child.pid)]) == {child.pid}
    # A thread's exit does not prune its process.
    assert state.apply_events([ProcEvent("exit", child.pid + 1, child.pid)]) == set()


def test_delayacct_restored() -> None:
    before = open("/proc/sys/kernel/task_delayacct").read()
    with DelayAcct():
        assert open("/proc/sys/kernel/task_delayacct").read().strip() == "1"
    assert open("/proc/sys/kernel/task_delayacct").read() == before


@pytest.mark.host_only("CLI text and JSON; the VM's exactness tests cover the probes")
def test_cli_faults_and_ksmd_json(ksm, workload) -> None:  # type: ignore[no-untyped-def]
    w = workload(comm="faults-cli")
    r = w.call("alloc", name="r", pages=128, kind="dup", seed=5)
    w.call("madvise", name="r")
    ksm.start()
    ksm.wait_merged(w.pid, r["addr"], r["len"], 128)
    cli = [sys.executable, "-m", "ksmtrace"]
    delayacct = open("/proc/sys/kernel/task_delayacct").read()
    proc = subprocess.Popen(
        [*cli, "faults", "-j", "-p", str(w.pid), "1", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()
    if not features.available("ksm_tracepoints"):
        # Said once, before tracing starts, on kernels without them.
        assert "no ksm:* tracepoints" in first and "KSM COW faults per process are still exact" in first
        first = proc.stderr.readline()
    assert "Tracing" in first  # probes attached
    w.call("write", name="r", first=0, count=17)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2
    rows = [p for line in lines for p in line["processes"] if p["pid"] == w.pid]
    assert rows and rows[-1]["ksm_cow_total"] == 17
    assert rows[-1]["regions"][0]["start"] == r["addr"]
    ks = subprocess.run([*cli, "ksmd", "-j", "0.5", "2"], capture_output=True, text=True, timeout=60)
    assert ks.returncode == 0, ks.stderr
    recs = [json.loads(line) for line in ks.stdout.splitlines()]
    assert len(recs) == 2 and recs[0]["cpu_pct"] is not None
    # faults turns on delay accounting for taskstats; it must leave it as found.
    assert open("/proc/sys/kernel/task_delayacct").read() == delayacct


def test_pages_merged_before_tracing_started(ksm, workload) -> None:  # type: ignore[no-untyped-def]
    """The common case on a live host: merges happened before ksmtrace ran."""
    w = workload()
    r = w.call("alloc", name="r", pages=300, kind="dup", seed=9)
    w.call("madvise", name="r")
    ksm.merge_then_stop((w.pid, r, 300))
    # -p: only this process is preloaded, so the count is its pages alone.
    with FaultProbe(pid=w.pid) as fp:
        # With merge events (6.4+) the pages merged so far are preloaded into
        # the merged set (within a time budget at start, the rest here);
        # without them every fault is checked by struct page.
        assert fp.preload_pending(60.0) == 0
        assert fp.preloaded == (300 if fp.merge_events else 0)
        s0, cow0 = _pair(fp)
        w.call("write", name="r", first=0, count=300, step=7)
        s1, cow1 = _pair(fp)
    assert _traced(s0, s1, {w.pid}) == len(range(0, 300, 7))
    assert _traced(s0, s1) == cow1 - cow0
    # The preloaded set, not a check of every fault, counted them.
    _assert_path(fp, s0, s1, fast=True)


def test_quiet_snapshot_is_the_last_one_and_a_fault_ends_it(ksm, workload) -> None:  # type: ignore[no-untyped-def]
    """A snapshot of unchanged slots hands out the last one's records (no walk
    of the slots); the first fault after it is counted, exactly."""
    w = workload()
    r = w.call("alloc", name="r", pages=200, kind="dup", seed=12)
    w.call("madvise", name="r")
    ksm.merge_then_stop((w.pid, r, 200))
    with FaultProbe(pid=w.pid) as fp:
        fp.preload_pending(60.0)
        s0, cow0 = _pair(fp)
        quiet = fp.snapshot()
        assert quiet.procs is s0.procs and quiet.t > s0.t  # the same records, a new time
        w.call("write", name="r", first=0, count=200, step=10)
        s1, cow1 = _pair(fp)
        assert s1.procs is not s0.procs
        fp.set_regions(w.pid, [(r["addr"], r["addr"] + r["len"])])  # a table written: walked again
        assert fp.snapshot().procs is not s1.procs
    assert _traced(s0, s1, {w.pid}) == 20
    assert _traced(s0, s1) == cow1 - cow0


@pytest.mark.host_only("the VM's exactness test covers fork COW")
def test_forked_child_breaking_inherited_merges(ksm, workload) -> None:  # type: ignore[no-untyped-def]
    """A child inherits its parent's KSM pages without any merge event naming
    it: its faults are checked one by one (walk_all), and still exact."""
    w = workload()
    r = w.call("alloc", name="r", pages=200, kind="dup", seed=4)
    w.call("madvise", name="r")
    ksm.start()
    with FaultProbe() as fp:
        ksm.wait_merged(w.pid, r["addr"], r["len"], 200)
        ksm.set(run=0)
        s0, cow0 = _pair(fp)
        child = w.call("fork", name="r", pages=list(range(0, 200, 5)))["child"]
        s1, cow1 = _pair(fp)
    assert _traced(s0, s1, {child}) == 40
    assert _traced(s0, s1, {w.pid}) == 0
    assert _traced(s0, s1) == cow1 - cow0
    _assert_path(fp, s0, s1, fast=False)  # the child's pages are in no merged set


def test_fallback_without_ksm_tracepoints_still_exact(ksm, workload, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Kernels before 6.4 have no ksm:* tracepoints: the probe is built without
    them (NO_KSM_TP) and checks every write-protect fault of mergeable
    processes against struct page instead."""
    from ksmtrace.kernel import checks

    real = checks.tracepoint_exists
    monkeypatch.setattr(checks, "tracepoint_exists", lambda cat, ev, *a: cat != "ksm" and real(cat, ev, *a))
    w = workload()
    r = w.call("alloc", name="r", pages=128, kind="dup", seed=6)
    w.call("madvise", name="r")
    with FaultProbe() as fp:
        assert not fp.merge_events
        # Started and faulting under the probe before it opts in: no ksm_enter
        # tells the probe, the successful madvise must.
        late = workload()
        rl = late.call("alloc", name="r", pages=64, kind="dup", seed=6)
        late.call("fork")  # write-protect faults of a not yet mergeable process
        late.call("write", name="r", first=0, count=64)
        late.call("madvise", name="r")
        ksm.merge_then_stop((w.pid, r, 128), (late.pid, rl, 64))
        s0, cow0 = _pair(fp)
        w.call("write", name="r", first=3, count=60, step=2)
        late.call("write", name="r", first=0, count=64, step=4)
        s1, cow1 = _pair(fp)
    assert _traced(s0, s1, {w.pid}) == 30
    assert _traced(s0, s1, {late.pid}) == 16
    assert _traced(s0, s1) == cow1 - cow0
    _assert_path(fp, s0, s1, fast=False)  # NO_KSM_TP: no merged set to hit


def test_ksmd_command_without_ksm_tracepoints(ksm, workload, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from ksmtrace import cli
    from ksmtrace.kernel import ksm_sysfs
    from ksmtrace.probes import ksmd as ksmd_probe

    monkeypatch.setattr(ksmd_probe, "available", lambda: False)

    def full_scans() -> int:
        return int(ksm_sysfs.read().get("full_scans") or 0)

    # ksmd stopped: not one round, exactly.
    scans0 = full_scans()
    assert cli.main(["ksmd", "-j", "0.3", "2"]) == 0
    out = capsys.readouterr()
    assert "no ksm:* tracepoints" in out.err  # said once
    recs = [json.loads(line) for line in out.out.splitlines()]
    assert len(recs) == 2
    assert full_scans() == scans0
    assert [(r["merges_per_s"], r["rounds"]) for r in recs] == [(None, 0), (None, 0)]
    # ksmd scanning a small region (a full scan every wake-up): rounds come from
    # full_scans alone, some were counted, and no more than ksmd completed. (Not
    # every 0.3 s interval has one: on a loaded 2-core machine ksmd may not run.)
    w = workload()
    w.call("alloc", name="r", pages=64, kind="dup", seed=2)
    w.call("madvise", name="r")
    ksm.start()
    scans0 = full_scans()
    assert cli.main(["ksmd", "-j", "0.3", "2"]) == 0
    scans1 = full_scans()
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(recs) == 2, recs
    assert 0 < sum(r["rounds"] for r in recs) <= scans1 - scans0, (recs, scans1 - scans0)


@pytest.mark.host_only("a capacity fallback of ksmtrace's")
def test_merged_set_full_falls_back_to_checking_every_fault(ksm, workload) -> None:  # type: ignore[no-untyped-def]
    """The merged-page set holds 2 MiB chunks; with room for one, the merges of
    a 3 MiB region overflow it: the drop is counted, the process is checked
    fault by fault instead, and the count stays exact."""
    w = workload()
    r = w.call("alloc", name="r", pages=768, kind="dup", seed=9)
    w.call("madvise", name="r")
    with FaultProbe(max_merged=1) as fp:
        s0, s1, cow = _merge_then_write(ksm, fp, w, r, 768, first=1, count=768, step=3)
    # The set is filled by ksm:* merge events (6.4+); without them there is
    # nothing to overflow and every fault is checked anyway.
    assert s1.stats["merged_drops"] > 0 if fp.merge_events else s1.stats["merged_drops"] == 0
    assert _traced(s0, s1, {w.pid}) == len(range(1, 768, 3))
    assert _traced(s0, s1) == cow
    # Once its set overflowed, the process is checked fault by fault: all walked.
    _assert_path(fp, s0, s1, fast=False)


@pytest.mark.host_only("bitmap bookkeeping is ksmtrace's")
def test_stale_merged_bits_do_not_count(ksm, workload) -> None:  # type: ignore[no-untyped-def]
    """MADV_UNMERGEABLE undoes merges without a fault or an event per page: the
    merged-page bits go stale. Fork copy-on-write on those pages then hits the
    bits; the check of the page itself rejects them, and nothing counts."""
    w = workload()
    r = w.call("alloc", name="r", pages=200, kind="dup", seed=12)
    w.call("madvise", name="r")
    with FaultProbe() as fp:
        ksm.merge_then_stop((w.pid, r, 200))
        w.call("madvise", name="r", advice="unmergeable")
        assert pagemap.range_pages(w.pid, r["addr"], r["addr"] + r["len"]).ksm == 0
        w.call("fork")
        # Its own row: the region's write-protect faults are exactly the writes.
        fp.set_regions(w.pid, [(r["addr"], r["addr"] + r["len"])])
        s0, cow0 = _pair(fp)
        w.call("write", name="r", first=0, count=200, step=3)
        s1, cow1 = _pair(fp)
    w.call("kill_children")
    stale = s1.stats["stale_merged"] - s0.stats["stale_merged"]
    # No merge events before 6.4: no bits to go stale, every fault checks its page.
    assert stale == (len(range(0, 200, 3)) if fp.merge_events else 0)
    span = (r["addr"], r["addr"] + r["len"])
    # Every write was a fork COW fault: all seen, none counted as KSM COW.
    assert s1.procs[w.pid].regions[span].wp - s0.procs[w.pid].regions[span].wp == len(range(0, 200, 3))
    assert _traced(s0, s1, {w.pid}) == 0
    assert _traced(s0, s1) == cow1 - cow0


@pytest.mark.host_only("slot bookkeeping is ksmtrace's; one BPF compile per cycle under emulation")
def test_process_slots_are_recycled_after_exit(ksm, workload) -> None:  # type: ignore[no-untyped-def]
    """Processes live in a fixed number of slots: when they run out, a new
    opt-in is counted as a drop, and the slot of a process that exited (as
    the proc connector reports it) serves the next one, with counts that
    start from zero and stay exact."""
    from ksmtrace.probes.faults import already_mergeable

    others = len(already_mergeable())  # they take slots at start too
    with FaultProbe(max_procs=others + 3) as fp:  # slot 0 means "none": two free
        first, second = workload(), workload()
        for w in (first, second):
            w.call("alloc", name="r", pages=64, kind="dup", seed=21)
            w.call("madvise", name="r")
        third = workload()
        third.call("alloc", name="r", pages=64, kind="dup", seed=21)
        drops0 = fp.snapshot().stats["proc_drops"]
        third.call("madvise", name="r")  # its ksm_enter finds no slot
        snap = fp.snapshot()
        assert {first.pid, second.pid} <= set(snap.procs)
        assert third.pid not in snap.procs
        assert snap.stats["proc_drops"] > drops0
        second.call("fork")
        second.call("write", name="r", first=0, count=8)  # fork COW: write-protect faults
        assert fp.snapshot().procs[second.pid].total.wp >= 8
        gone = second.pid
        second.call("kill_children")
        second.close()
        fp.forget({gone})
        assert gone not in fp.snapshot().procs
        late = workload()
        r = late.call("alloc", name="r", pages=64, kind="dup", seed=22)
        late.call("madvise", name="r")
        fp.mark([late.pid])  # a no-op: its opt-in took the freed slot
        ksm.merge_then_stop((late.pid, r, 64))
        s0, cow0 = _pair(fp)
        assert s0.procs[late.pid].total == FaultCounts(0, 0)  # nothing left of the slot's last owner
        late.call("write", name="r", first=0, count=64, step=2)
        s1, cow1 = _pair(fp)
    assert _traced(s0, s1, {late.pid}) == 32
    assert _traced(s0, s1) == cow1 - cow0
    _assert_path(fp, s0, s1, fast=True)  # late's merges filled the set of its new slot


def _own_attachments() -> list[str]:
    """Tracepoints of the raw tracepoint links this process holds."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:bpf_link":
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    names += [
                        ln.split("\t", 1)[1] for ln in f.read().splitlines() if ln.startswith("tp_name:")
                    ]
    return sorted(names)


@pytest.mark.host_only(
    "forces fallbacks that are the natural path on the VM's 6.1, which the exactness test takes"
)
@pytest.mark.parametrize("why", ["no kfunc", "refused"])
def test_helper_reads_without_rdonly_cast(ksm, workload, monkeypatch, why: str) -> None:  # type: ignore[no-untyped-def]
    """The KSM check reads page tables with inlined loads through
    bpf_rdonly_cast() where the kernel has it (6.11+ for void *), else with
    bpf_probe_read_kernel(): both count exactly. A kernel that refuses the
    cast (here: a call of a function that is no kfunc) leaves no program of
    the refused build behind."""
    from ksmtrace.kernel import btf

    real = btf.load()
    inline = FaultProbe()
    inline.close()
    # bpf_rdonly_cast() to void * is taken since 6.11: there the inlined loads must be in use.
    if tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2]) >= (6, 11):
        assert inline.inline_reads
    if real.func_id("bpf_rdonly_cast") is None:
        assert not inline.inline_reads
    func_id = type(real).func_id
    stand_in = None if why == "no kfunc" else func_id(real, "do_exit")
    monkeypatch.setattr(
        type(real),
        "func_id",
        lambda self, name: stand_in if name == "bpf_rdonly_cast" else func_id(self, name),
    )
    w = workload()
    r = w.call("alloc", name="r", pages=96, kind="dup", seed=31)
    w.call("madvise", name="r")
    with FaultProbe() as fp:
        assert not fp.inline_reads
        assert _own_attachments() == sorted(tp.decode() for tp in fp.bpf.raw_tracepoint_fds)
        s0, s1, cow = _merge_then_write(ksm, fp, w, r, 96, first=1, count=95, step=5)
    assert _traced(s0, s1, {w.pid}) == len(range(1, 96, 5))
    assert _traced(s0, s1) == cow
    _assert_path(fp, s0, s1, fast=True)


@pytest.mark.requires_kernel_feature("ksm_tracepoints")
def test_ksmd_probe_quiet_snapshot_keeps_its_records(ksm, workload) -> None:  # type: ignore[no-untyped-def]
    """The ksmd probe hands out the last records while nothing moved, and new
    ones (with the merges) once ksmd merged."""
    w = workload()
    r = w.call("alloc", name="r", pages=64, kind="dup", seed=13)
    with KsmdProbe(pid=w.pid) as kp:
        w.call("madvise", name="r")
        a, b = kp.snapshot(pages=False), kp.snapshot(pages=False)
        assert b.procs is a.procs
        ksm.merge_then_stop((w.pid, r, 64))
        c = kp.snapshot(pages=False)
        assert c.procs is not a.procs
        assert c.procs[w.pid].merges - (a.procs[w.pid].merges if w.pid in a.procs else 0) >= 63
