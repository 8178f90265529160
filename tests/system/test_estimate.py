"""The estimate against what KSM then really saves, on the real kernel.

Three processes hold private anonymous memory with duplicate pages scattered
in runs (within each process and across them). The estimate is taken first;
then exactly the estimated ranges are made mergeable (one process by its own
madvise, the others by ksmtrace's remote injection), ksmd runs until merging
settles, and the pages saved are read back two ways: live from pagemap +
kpageflags (virtual pages on KSM frames minus distinct KSM frames, plus pages
now on the zero page) and from the kernel's pages_sharing + ksm_zero_pages.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import pytest

from ksmtrace import remote, scan
from ksmtrace.errors import KsmtraceError, ProcessGone
from ksmtrace.kernel import features, ksm_sysfs, pagemap, vmstat
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.workload import plan_content

pytestmark = pytest.mark.system

PAGES = 6144  # 24 MiB per process
NPROC = 3


def _kept(n: int, mps: int) -> int:
    """KSM's rule: a content on n pages keeps one page per max_page_sharing sharers."""
    return -(-n // mps)


def _expected(procs: list[list[list[int | None]]], mps: int, use_zero_pages: bool) -> dict[str, int]:
    """What KSM can save at most from the workload's known layout: ``procs`` holds,
    per process, each region's content ids (plan_content; 0 stands for a zero
    page, None for a unique random page). Returns saved (all processes),
    saved_within (each process alone) and dup_cross (pages whose only twins are
    in other processes)."""

    def saved_of(counts: Counter[int]) -> int:
        return sum(n if cid == 0 and use_zero_pages else n - _kept(n, mps) for cid, n in counts.items())

    every = Counter(c for regions in procs for ids in regions for c in ids if c is not None)
    mine = [Counter(c for ids in regions for c in ids if c is not None) for regions in procs]
    cross = sum(
        1
        for regions, own in zip(procs, mine)
        for ids in regions
        for c in ids
        if c is not None and own[c] == 1 and every[c] > 1
    )
    return {"saved": saved_of(every), "saved_within": sum(map(saved_of, mine)), "dup_cross": cross}


def _counters() -> tuple[int, int]:
    s = ksm_sysfs.read()
    return int(s.get("pages_sharing") or 0), int(s.get("ksm_zero_pages") or 0)


def _actual_saved(regions: list[tuple[int, int, int]]) -> int:
    mapped, frames, zero = 0, set(), 0
    for pid, start, end in regions:
        rp = pagemap.range_pages(pid, start, end)
        mapped += rp.ksm
        frames |= rp.ksm_frames
        zero += rp.zero_page
    return mapped - len(frames) + zero


def _foreign_mergeable(ours: set[int]) -> list[int]:
    """Other processes KSM may merge: they move the machine-wide counters too."""
    out = []
    proc = ProcFS()
    for pid in proc.pids():
        if pid in ours:
            continue
        try:
            st = proc.ksm_stat(pid)
        except KsmtraceError:
            continue
        if st and (st.mergeable or st.merge_any or st.rmap_items or st.merging_pages):
            out.append(pid)
    return out


def _zero_mapped(regions: list[tuple[int, int, int]]) -> int:
    return sum(pagemap.range_pages(pid, s, e).zero_page for pid, s, e in regions)


def _settle(ksm, regions: list[tuple[int, int, int]], timeout: float = 60.0) -> int:
    """ksmd merges a page on its second visit: wait until the saving stops growing."""
    deadline = time.monotonic() + timeout
    last, stable = -1, 0
    while time.monotonic() < deadline:
        ksm.wait_full_scans(2, timeout=timeout)
        now = _actual_saved(regions)
        stable = stable + 1 if now == last else 0
        if stable >= 2:
            return now
        last = now
    raise AssertionError(f"KSM merging did not settle within {timeout}s (last {last} pages saved)")


@pytest.mark.host_only(
    "in the 6.1 VM the scan after merging counted 693 of 772 merged pages "
    "(seen once, not investigated yet); exact on 6.18"
)
@pytest.mark.ksm
@pytest.mark.parametrize(
    ("fraction", "max_page_sharing", "use_zero_pages", "zero_pages"),
    [(0.1, None, 0, 0), (0.5, 4, 0, 256), (0.9, None, 1, 512)],
    ids=["10pct", "50pct-mps4", "90pct-zeropages"],
)
def test_estimate_matches_what_ksm_saves(
    ksm, workload, fraction: float, max_page_sharing: int | None, use_zero_pages: int, zero_pages: int
) -> None:
    # Knobs that may only change while nothing is merged: the fixture unmerged everything.
    ksm.set(use_zero_pages=use_zero_pages)
    if max_page_sharing:
        ksm.set(max_page_sharing=max_page_sharing)
    wls, regions = [], []
    layout: list[list[list[int | None]]] = []
    for i in range(NPROC):
        wl = workload(comm=f"est-{i}")
        mix = {"kind": "mix", "fraction": fraction, "run": 8, "pool": 1500, "seed": 11 + i}
        r = wl.call("alloc", name="m", pages=PAGES, **mix)
        regions.append((wl.pid, r["addr"], r["addr"] + r["len"]))
        layout.append([plan_content(str(mix["kind"]), PAGES, 11 + i, fraction, 8, 1500)])
        if zero_pages and i == 0:
            z = wl.call("alloc", name="z", pages=zero_pages, kind="zero")
            regions.append((wl.pid, z["addr"], z["addr"] + z["len"]))
            layout[0].append([0] * zero_pages)  # touched pages, all zeros
        wls.append(wl)
    ranges: dict[int, list[tuple[int, int]]] = {}
    for pid, s, e in regions:
        ranges.setdefault(pid, []).append((s, e))

    est = scan.estimate([w.pid for w in wls], ranges=ranges)
    assert est.max_page_sharing == (max_page_sharing or 256)
    assert est.use_zero_pages == bool(use_zero_pages)
    assert est.totals["present"] == NPROC * PAGES + zero_pages
    assert est.totals["zero"] == zero_pages
    assert est.totals["hash_collisions"] == 0
    assert est.totals["ksm"] == 0  # nothing merged yet
    # The estimate is exact arithmetic on the known layout (unique pages are
    # random: no twins), under the kernel's max_page_sharing and use_zero_pages.
    want = _expected(layout, est.max_page_sharing, bool(use_zero_pages))
    assert est.saved == want["saved"]
    assert est.totals["saved_within"] == want["saved_within"]
    assert est.saved_across == want["saved"] - want["saved_within"] > 0  # duplicates span processes
    assert sum(r.dup_cross for p in est.processes for r in p.regions) == want["dup_cross"] > 0

    ours = {w.pid for w in wls}
    foreign = _foreign_mergeable(ours)
    sharing0, zero0 = _counters()
    for k, (pid, s, e) in enumerate(regions):
        if pid == wls[0].pid:
            name = "m" if k == 0 else "z"
            assert wls[0].call("madvise", name=name)["ret"] == 0
        else:
            assert remote.madvise(pid, s, e, remote.MADV_MERGEABLE).ret == 0
    ksm.start()
    actual = _settle(ksm, regions)
    sharing1, zero1 = _counters()
    kernel_saved = (sharing1 - sharing0) + (zero1 - zero0)

    print(
        f"\nfraction={fraction} mps={est.max_page_sharing} use_zero_pages={use_zero_pages}: "
        f"estimated {est.saved} pages, saved (pagemap) {actual}, "
        f"pages_sharing+ksm_zero_pages delta {kernel_saved}"
    )
    # KSM cannot save more than the layout allows (upper bound), and once merging
    # settled it saves all of it (lower bound): the kernel meets the estimate exactly.
    assert actual == est.saved == want["saved"]
    # pages_sharing and ksm_zero_pages are machine-wide: they measure our processes
    # only when nothing else on the machine is mergeable (other checkouts' tests may be).
    foreign += _foreign_mergeable(ours)
    if not foreign and features.available("ksm_zero_pages"):
        assert kernel_saved == est.saved
    elif not foreign:
        # Before 6.10 no counter tells pages merged into the zero page:
        # pages_sharing, plus what pagemap shows on the zero page now.
        sharing_only = (sharing1 - sharing0) + _zero_mapped(regions)
        assert sharing_only == est.saved
    else:
        print(f"  (other mergeable processes {sorted(set(foreign))}: kernel counters not ours alone)")

    # And after merging, the estimate sees the KSM pages and what they save already.
    # After merging, the scanner sees what KSM did: KSM pages and what they save
    # now, pages on the zero page. ksmd is stopped first, so nothing merges our
    # idle pages while the scan reads them; its view must be the live one
    # (pagemap+kpageflags just before). That the scan leaves merges alone is
    # test_estimate_leaves_merged_pages_merged.
    ksm.set(run=0)
    live = _actual_saved(regions), _zero_mapped(regions)
    assert live[0] == actual
    after = scan.estimate([w.pid for w in wls], ranges=ranges)
    assert after.totals["zero_mapped"] == live[1] == (zero_pages if use_zero_pages else 0)
    assert after.totals["saved_now"] + after.totals["zero_mapped"] == live[0]
    # Pages merged into the zero page cost nothing any more: no longer "present".
    assert after.saved + after.totals["zero_mapped"] == est.saved


@pytest.mark.ksm
def test_estimate_leaves_merged_pages_merged(ksm, workload) -> None:
    """The estimate reads memory and nothing else: a merged process must stay
    merged. (process_vm_readv pins pages read-only, and the kernel unshares a
    page it pins that way when it is not exclusive, a KSM page included: a
    scanner that reads KSM pages through it breaks every merge it reads.)"""
    wl = workload(comm="est-keep")
    r = wl.call("alloc", name="r", pages=64, kind="dup", seed=2)
    assert wl.call("madvise", name="r")["ret"] == 0
    ksm.merge_then_stop((wl.pid, r, 64))  # ksmd stopped: nothing re-merges behind the scan
    span = (r["addr"], r["addr"] + r["len"])
    cow0 = vmstat.ksm_vmstat()["cow_ksm"]
    est = scan.estimate([wl.pid], ranges={wl.pid: [span]})
    cow1 = vmstat.ksm_vmstat()["cow_ksm"]
    assert est.totals["ksm"] == 64 and est.totals["saved_now"] == 63  # it saw them merged
    still = pagemap.range_pages(wl.pid, *span)
    assert (still.ksm, len(still.ksm_frames)) == (64, 1), (
        f"the estimate broke merges: {64 - still.ksm} of 64 pages no longer KSM, "
        f"cow_ksm +{cow1 - cow0} during the scan"
    )


@pytest.mark.host_only("CLI text and errors are ksmtrace's; the VM's other estimate tests cover the scan")
def test_estimate_command_json_and_errors(workload) -> None:
    wl = workload(comm="est-cli")
    wl.call("alloc", name="m", pages=1024, kind="mix", fraction=0.5, run=4, pool=8, seed=3)
    layout = [[plan_content("mix", 1024, 3, 0.5, 4, 8)]]
    cmd = [sys.executable, "-m", "ksmtrace", "estimate"]
    out = subprocess.run([*cmd, "-p", str(wl.pid), "-j"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    (proc,) = data["processes"]
    assert proc["pid"] == wl.pid and proc["comm"] == "est-cli"
    # The whole process is scanned: the region's saving exactly (512 pages of at
    # most 8 contents), plus at most every other present page of the interpreter.
    want = _expected(layout, data["max_page_sharing"], data["use_zero_pages"])["saved"]
    assert 512 - 8 <= want < 512
    assert want <= data["totals"]["saved"] <= want + data["totals"]["present"] - 1024
    assert any("file-backed" in s["reason"] for s in proc["skipped"])
    one = subprocess.run([*cmd, "-p", str(wl.pid), "-j", "--workers", "1"], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr

    def counts(totals: dict) -> dict:  # type: ignore[type-arg]
        return {k: v for k, v in totals.items() if not k.endswith("_ns")}  # timings differ

    assert counts(json.loads(one.stdout)["totals"]) == counts(data["totals"])  # one core or several
    bad = subprocess.run([*cmd, "-p", str(wl.pid), "--workers", "-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--workers" in bad.stderr and "Traceback" not in bad.stderr
    text = subprocess.run([*cmd, "-n", "est-cli"], capture_output=True, text=True, timeout=60)
    assert text.returncode == 0 and "KSM would save" in text.stdout
    wl.close()
    gone = subprocess.run([*cmd, "-p", str(wl.pid)], capture_output=True, text=True, timeout=60)
    assert gone.returncode != 0 and "does not exist" in gone.stderr and "Traceback" not in gone.stderr
    kthread = subprocess.run([*cmd, "-p", "2"], capture_output=True, text=True, timeout=60)
    assert kthread.returncode == 2 and "kernel thread" in kthread.stderr
    none = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert none.returncode == 2 and "-p PID" in none.stderr


def test_pid_gone_mid_scan_is_reported(workload) -> None:
    wl = workload(comm="est-gone")
    wl.call("alloc", name="m", pages=4096, kind="unique")
    other = workload(comm="est-stay")
    other.call("alloc", name="m", pages=256, kind="dup")

    def kill_during(done: int, total: int, pid: int) -> None:
        if pid == wl.pid and wl.proc.poll() is None:
            wl.proc.kill()
            wl.proc.wait()

    with pytest.raises(ProcessGone, match=str(wl.pid)):
        scan.estimate([wl.pid, other.pid], progress=kill_during)
    wl2 = workload(comm="est-gone2")
    wl2.call("alloc", name="m", pages=4096, kind="unique")
    victim = wl2

    def kill2(done: int, total: int, pid: int) -> None:
        if pid == victim.pid and victim.proc.poll() is None:
            victim.proc.kill()
            victim.proc.wait()

    est = scan.estimate([victim.pid, other.pid], strict=False, progress=kill2)
    assert est.gone == (victim.pid,)
    assert [p.pid for p in est.processes] == [other.pid]
    # 256 copies of one page (KSM keeps one per max_page_sharing), and at most
    # every other present page of the interpreter; nothing of the victim.
    want = 256 - _kept(256, est.max_page_sharing)
    assert want <= est.totals["saved"] <= want + est.totals["present"] - 256


def _vmflags(pid: int, addr: int) -> frozenset[str]:
    (vma,) = [v for v in ProcFS().smaps(pid) if v.start <= addr < v.end]
    return vma.vmflags


@pytest.mark.ksm
def test_merge_auto_picks_only_regions_worth_it(ksm, workload) -> None:
    # ksm: not for our assertions (ksmd stays stopped) but so that no other checkout's
    # KSM test runs meanwhile: unmerging counts in the machine-wide cow_ksm.
    wl = workload(comm="merge-auto")
    dup = wl.call("alloc", name="d", pages=2048, kind="mix", fraction=0.8, run=8, pool=32, seed=4)
    # Allocated back to back: the kernel makes one mapping of the two, and --auto
    # must still choose the duplicate-rich half only (it chooses runs of duplicates).
    uniq = wl.call("alloc", name="u", pages=2048, kind="unique")
    before = wl.call("checksum", name="d")["sha256"]
    cmd = [sys.executable, "-m", "ksmtrace"]
    dry = subprocess.run(
        [*cmd, "merge", "-p", str(wl.pid), "--auto", "--dry-run", "-j"], capture_output=True, text=True
    )
    assert dry.returncode == 0, dry.stderr
    chosen = json.loads(dry.stdout)["ranges"]
    # Runs closer than --max-gap (8) pages join: the 8-page unique blocks between
    # runs are taken in, never the unique half (a whole 2 MiB at most, as before).
    mid = dup["addr"] + dup["len"] // 2

    def covered(lo: int, hi: int) -> int:
        return sum(max(0, min(hi, r["end"]) - max(lo, r["start"])) for r in chosen)

    assert covered(dup["addr"], dup["addr"] + dup["len"]) >= dup["len"] * 3 // 4, dry.stdout
    assert covered(uniq["addr"], uniq["addr"] + uniq["len"]) <= 2 << 20, dry.stdout
    assert "mg" not in _vmflags(wl.pid, mid)  # a dry run changes nothing
    out = subprocess.run([*cmd, "merge", "-p", str(wl.pid), "--auto", "-j"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    inj = json.loads(out.stdout)["injections"]
    assert inj and all(i["ret"] == 0 and i["advice"] == "MADV_MERGEABLE" for i in inj)
    assert "mg" in _vmflags(wl.pid, mid)
    assert "mg" not in _vmflags(wl.pid, uniq["addr"] + uniq["len"] // 2)
    # The workload still answers and its memory is intact after the injection.
    assert wl.call("checksum", name="d")["sha256"] == before
    un = subprocess.run([*cmd, "unmerge", "-p", str(wl.pid)], capture_output=True, text=True)
    assert un.returncode == 0, un.stderr
    assert "mg" not in _vmflags(wl.pid, mid)
    bad = subprocess.run(
        [*cmd, "merge", "-p", str(wl.pid), "--range", "1000-3000"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "not mapped" in bad.stderr and "Traceback" not in bad.stderr
