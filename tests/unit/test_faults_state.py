"""FaultsState, taskstats and proc-connector decoding on recorded inputs (no root)."""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

from ksmtrace.kernel.proc_events import decode
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.kernel.taskstats import TaskstatsLayout, decode_stats
from ksmtrace.model.faults import FaultsState
from ksmtrace.probes.faults import FaultCounts, FaultSnapshot, ProcFaults
from ksmtrace.probes.ksmd import KsmdSnapshot, KsmProcCounts, ScanState

FIX = Path(__file__).parent.parent / "fixtures" / "host1" / "proc"
PID = 2761
MG = (0x7FD2A7800000, 0x7FD2A7B00000)  # the mergeable VMA of pid 2761's smaps


def _faults(t: float, ksm: int, wp: int, other_wp: int) -> FaultSnapshot:
    region = FaultCounts(wp, ksm)
    return FaultSnapshot(
        t,
        {PID: ProcFaults(FaultCounts(wp + other_wp, ksm), FaultCounts(other_wp, 0), {MG: region})},
        {"walk_failures": 0},
    )


def _ksmd(t: float, merges: int) -> KsmdSnapshot:
    scan = ScanState(*([0] * 14))
    pages = {(PID, MG[0] + i * 4096): (1, 0) for i in range(merges)}
    return KsmdSnapshot(t, {PID: KsmProcCounts(merges, 0, 0, 0, 1, 0)}, scan, pages)


def _proc_with_maps(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """host1's /proc copied, with pid 2761's maps (its smaps' header lines):
    the proc root, the pid's directory, and those lines."""
    root = tmp_path / "proc"
    shutil.copytree(FIX, root)
    d = root / str(PID)
    heads = [ln for ln in (d / "smaps").read_text().splitlines() if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", ln)]
    (d / "maps").write_text("\n".join(heads) + "\n")
    return root, d, heads


def test_rates_regions_and_cow_ksm_check() -> None:
    st = FaultsState(0.0, proc=ProcFS(FIX))
    st.update(_faults(0.0, 0, 0, 0), _ksmd(0.0, 0), 1000)
    rep = st.update(_faults(2.0, 30, 50, 7), _ksmd(2.0, 512), 1030)
    (p,) = rep.processes
    assert p.comm == (FIX / str(PID) / "comm").read_text().strip()
    assert p.rates["ksm_cow"].delta == 30 and p.rates["ksm_cow"].per_s == 15.0
    assert p.rates["merges"].delta == 512
    assert p.wp_mergeable.delta == 50  # "other" faults are not in mergeable regions
    assert p.profit_bytes == 2048000 and p.merging_pages == 512
    mg = next(r for r in p.regions if r.start == MG[0])
    assert mg.mergeable and mg.rates["merges"].delta == 512 and mg.rates["ksm_cow"].delta == 30
    other = next(r for r in p.regions if r.name == "(other)")
    assert other.rates["wp"].delta == 7
    assert rep.cow_ksm is not None and rep.cow_ksm.delta == rep.ksm_cow_sum == 30
    assert st.wanted_regions[PID] == [MG]
    assert rep.as_dict()["processes"][0]["regions"][0]["start"] == MG[0]


def test_filtered_out_process_is_not_reported() -> None:
    st = FaultsState(0.0, proc=ProcFS(FIX))
    rep = st.update(_faults(1.0, 1, 1, 0), None, None, keep=lambda pid, comm: pid != PID)
    assert rep.processes == [] and not rep.merges_available


def test_taskstats_v16_layout_decoded_by_offsets() -> None:
    lay = TaskstatsLayout(version=0, wpcopy_count=400, wpcopy_delay_total=408, ac_minflt=184)
    raw = bytearray(560)
    struct.pack_into("=H", raw, 0, 16)
    struct.pack_into("=Q", raw, 400, 5015)
    struct.pack_into("=Q", raw, 408, 6_500_000)
    struct.pack_into("=Q", raw, 184, 77)
    cow = decode_stats(bytes(raw), lay, 42)
    assert (cow.version, cow.wpcopy_count, cow.wpcopy_delay_ns, cow.minflt) == (16, 5015, 6_500_000, 77)


def _cn(what: int, payload: bytes) -> bytes:
    body = struct.pack("=IIQ", what, 0, 123) + payload
    cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(body), 0)
    return struct.pack("=IHHII", 16 + len(cn) + len(body), 3, 0, 0, 0) + cn + body


def test_proc_connector_decoding() -> None:
    fork = decode(_cn(0x1, struct.pack("=IIII", 10, 10, 11, 11)))
    assert fork is not None and (fork.kind, fork.tgid, fork.parent_tgid) == ("fork", 11, 10)
    ex = decode(_cn(0x2, struct.pack("=II", 11, 11)))
    assert ex is not None and (ex.kind, ex.pid, ex.tgid) == ("exec", 11, 11)
    gone = decode(_cn(0x80000000, struct.pack("=IIIIII", 12, 11, 9, 0, 10, 10)))
    assert gone is not None and (gone.kind, gone.pid, gone.tgid, gone.exit_code) == ("exit", 12, 11, 9)
    assert decode(_cn(0x4, struct.pack("=IIII", 1, 1, 0, 0))) is None  # uid change: ignored


def test_quiet_process_turn_reads_ksm_stat_and_smaps_only_when_its_mappings_moved(tmp_path: Path) -> None:
    """Issue #14: with merges traced, a quiet process's refresh reads maps (no
    page-table walk) and ksm_stat; smaps only when a mapping came, went or moved."""
    root, d, heads = _proc_with_maps(tmp_path)
    st = FaultsState(0.0, proc=ProcFS(root))
    st.update(_faults(0.0, 0, 0, 0), _ksmd(0.0, 0), 1000)
    st.update(_faults(1.0, 3, 5, 0), _ksmd(1.0, 4), 1003)  # it moved: read whole
    stat = (d / "ksm_stat").read_text()
    (d / "ksm_stat").write_text(stat.replace("2048000", "4096000"))
    (d / "smaps").write_text("")  # a re-read of smaps would lose every region

    def quiet(t: float):  # type: ignore[no-untyped-def]
        return st.update(_faults(t, 3, 5, 0), _ksmd(t, 4), 1003)

    (p,) = quiet(2.0).processes
    assert p.profit_bytes == 4096000  # ksm_stat read again
    assert any(r.start == MG[0] and r.mergeable for r in p.regions)  # smaps was not
    (d / "maps").write_text("\n".join(heads[:-1]) + "\n")  # a mapping went away
    (p,) = quiet(3.0).processes
    assert not any(r.mergeable for r in p.regions)  # so smaps was read again (empty now)


def test_moving_process_attributed_on_kept_regions_and_read_whole_every_few_updates(tmp_path: Path) -> None:
    """Issue #14: while ksmd merges, every process moves every interval; its
    counts are attributed to the regions of its last whole read while its
    mappings stay the same, and smaps is read again every FULL_LOOK_EVERY."""
    from ksmtrace.model import faults as model

    root, d, heads = _proc_with_maps(tmp_path)
    reads: list[int] = []

    class Counting(ProcFS):
        def smaps(self, pid: int):  # type: ignore[no-untyped-def]
            reads.append(pid)
            return super().smaps(pid)

    st = FaultsState(0.0, proc=Counting(root))
    st.update(_faults(0.0, 0, 0, 0), _ksmd(0.0, 0), 1000)  # read whole
    updates = 2 * model.FULL_LOOK_EVERY
    for n in range(1, updates + 1):
        (p,) = st.update(_faults(float(n), n, n, 0), _ksmd(float(n), n), 1000 + n).processes
        (mg,) = [r for r in p.regions if r.start == MG[0]]
        assert mg.mergeable and mg.rates["merges"].total == n and mg.rates["ksm_cow"].total == n
    assert len(reads) == 1 + updates // model.FULL_LOOK_EVERY
    (d / "maps").write_text("\n".join(heads[:-1]) + "\n")  # a mapping went away: read whole now
    st.update(_faults(99.0, 99, 99, 0), _ksmd(99.0, 99), 1099)
    assert len(reads) == 2 + updates // model.FULL_LOOK_EVERY


def test_quiet_update_carries_the_last_report_and_the_next_move_counts_exactly(tmp_path: Path) -> None:
    """Issue #14: when neither this interval nor the last one moved anything
    (the probe hands out the records it decoded before), the last report is
    carried over without building the rate state again; the first move after
    it counts from the last reading, exactly."""
    root, d, heads = _proc_with_maps(tmp_path)
    st = FaultsState(0.0, proc=ProcFS(root))
    calls: list[int] = []
    real = st.rates.update

    def counting(t, counters):  # type: ignore[no-untyped-def]
        calls.append(len(counters))
        return real(t, counters)

    st.rates.update = counting  # type: ignore[method-assign]
    scan = ScanState(*([0] * 14))
    pages = {(PID, MG[0]): (1, 0)}
    still = _faults(0.0, 2, 3, 0).procs[PID]  # one record, handed out again while nothing moves

    def snap(t: float, pf: ProcFaults = still) -> tuple[FaultSnapshot, KsmdSnapshot]:
        return (
            FaultSnapshot(t, {PID: pf}, {"walk_failures": 0}),
            KsmdSnapshot(t, {PID: KsmProcCounts(1, 0, 0, 0, 1, 0)}, scan, pages),
        )

    st.update(*snap(1.0), 1002)  # moved: ksm_cow 2 since tracing started
    second = st.update(*snap(2.0), 1002)  # unmoved, but the last one moved: built
    assert len(calls) == 2
    third = st.update(*snap(3.5), 1002)
    assert len(calls) == 2  # carried over
    assert third.interval == 1.5
    assert [p.as_dict() for p in third.processes] == [p.as_dict() for p in second.processes]
    (p,) = third.processes
    assert p.rates["ksm_cow"].delta == 0 and p.rates["ksm_cow"].total == 2
    fourth = st.update(*snap(4.0, _faults(4.0, 5, 6, 0).procs[PID]), 1005)
    assert len(calls) == 3
    (p,) = fourth.processes
    assert (p.rates["ksm_cow"].delta, p.rates["ksm_cow"].per_s, p.rates["ksm_cow"].total) == (3, 6.0, 5)
    assert fourth.cow_ksm is not None and fourth.cow_ksm.delta == 3
    (mg,) = [r for r in p.regions if r.start == MG[0]]
    assert mg.rates["ksm_cow"].delta == 3


def test_exec_or_mapping_change_ends_the_carried_reports(tmp_path: Path) -> None:
    from ksmtrace.kernel.proc_events import ProcEvent

    root, d, heads = _proc_with_maps(tmp_path)
    st = FaultsState(0.0, proc=ProcFS(root))
    scan = ScanState(*([0] * 14))
    pages: dict[tuple[int, int], tuple[int, int]] = {}
    still = _faults(0.0, 2, 3, 0).procs[PID]

    def update(t: float):  # type: ignore[no-untyped-def]
        ks = KsmdSnapshot(t, {PID: KsmProcCounts(0, 0, 0, 0, 1, 0)}, scan, pages)
        return st.update(FaultSnapshot(t, {PID: still}, {"walk_failures": 0}), ks, 1002)

    for t in (1.0, 2.0, 3.0):
        update(t)
    (d / "comm").write_text("renamed\n")
    assert update(4.0).processes[0].comm != "renamed"  # carried: no exec seen
    st.apply_events([ProcEvent(kind="exec", pid=PID, tgid=PID)])
    assert update(5.0).processes[0].comm == "renamed"
    update(6.0)
    seen = st._seen[PID]
    (d / "maps").write_text("\n".join(heads[:-1]) + "\n")  # a mapping went: its turn reads it whole
    update(7.0)
    assert st._seen[PID] is not seen
