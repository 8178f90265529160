"""Parsers against /proc and /sys trees captured from a real machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from ksmtrace.errors import AccessDenied, ProcessGone
from ksmtrace.kernel import ksm_sysfs, vmstat
from ksmtrace.kernel.procfs import ProcFS, parse_ksm_stat, parse_smaps
from ksmtrace.model import inventory

HOST1 = Path(__file__).parent.parent / "fixtures" / "host1"
PID_MADVISE, PID_PRCTL = (int(p) for p in (HOST1 / "pids").read_text().split())


def test_smaps_mergeable_region_and_ksm_field() -> None:
    vmas = ProcFS(HOST1 / "proc").smaps(PID_MADVISE)
    mg = [v for v in vmas if v.mergeable]
    assert len(mg) == 1
    (region,) = mg
    assert region.anonymous and region.private
    # 512 dup + 256 unique pages, adjacent mmaps merged into one VMA.
    assert region.length >= 768 * 4096
    # smaps KSM: is live-ish (504 pages after 8 writes), ksm_stat lags at 512.
    assert region.ksm_bytes == 2016 * 1024
    assert region.why_not_mergeable() is None


def test_smaps_paths_with_spaces_and_specials() -> None:
    text = (
        "7f0000000000-7f0000001000 rw-s 00000000 00:01 1234   /dev/shm/a file (deleted)\n"
        "Size:                  4 kB\nVmFlags: rd wr sh mr mw me ms \n"
        "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]\n"
        "Size:                  4 kB\nVmFlags: ex \n"
    )
    a, b = parse_smaps(text)
    assert a.path == "/dev/shm/a file (deleted)"
    assert a.why_not_mergeable() and "shared" in a.why_not_mergeable()
    assert b.path == "[vsyscall]" and b.why_not_mergeable() == "vsyscall page"


def test_ksm_stat_fields() -> None:
    st = ProcFS(HOST1 / "proc").ksm_stat(PID_PRCTL)
    assert st is not None
    assert st.merge_any and st.mergeable
    assert st.merging_pages == 141 and st.rmap_items == 2052
    old = parse_ksm_stat("ksm_rmap_items 3\n")  # a 6.1 kernel prints only this
    assert old.rmap_items == 3 and not old.merge_any and old.merging_pages == 0


def test_inventory_on_fixture_tree() -> None:
    inv = inventory.take(ProcFS(HOST1 / "proc"))
    by_pid = {p.pid: p for p in inv.processes}
    assert set(by_pid) == {PID_MADVISE, PID_PRCTL}
    assert not by_pid[PID_MADVISE].merge_any and by_pid[PID_PRCTL].merge_any
    assert by_pid[PID_MADVISE].merging_pages == 512
    assert by_pid[PID_PRCTL].as_dict()["mergeable_regions"] > 1


def test_missing_pid_is_process_gone(tmp_path: Path) -> None:
    with pytest.raises(ProcessGone, match="pid 999999 has exited"):
        ProcFS(HOST1 / "proc").smaps(999999)


def test_errno_mapping() -> None:
    import errno

    from ksmtrace.errors import proc_errors

    with pytest.raises(AccessDenied, match="pid 5"):
        with proc_errors(5):
            raise PermissionError(errno.EACCES, "denied")
    with pytest.raises(ProcessGone):
        with proc_errors(5):
            raise OSError(errno.ESRCH, "gone")


def test_sysfs_knobs_and_counters_by_mode() -> None:
    s = ksm_sysfs.read(HOST1 / "sys_kernel_mm_ksm")
    assert s.knobs["advisor_mode"] == "none"
    assert "pages_to_scan" in s.knobs and "pages_sharing" in s.counters
    assert "pages_sharing" not in s.knobs


def test_sysfs_missing_is_clear(tmp_path: Path) -> None:
    from ksmtrace.errors import KsmUnavailable

    with pytest.raises(KsmUnavailable, match="CONFIG_KSM"):
        ksm_sysfs.read(tmp_path)


def test_vmstat_ksm_entries() -> None:
    v = vmstat.ksm_vmstat(HOST1 / "proc")
    assert set(v) == {"cow_ksm", "ksm_swpin_copy"}


def test_ksm_stat_of_a_6_1_kernel_takes_merging_pages_from_its_own_file(tmp_path: Path) -> None:
    # Linux 6.1 (Debian 12): ksm_stat has only ksm_rmap_items, ksm_merging_pages is a file.
    pid = tmp_path / "4242"
    pid.mkdir()
    (pid / "ksm_stat").write_text("ksm_rmap_items 2050\n")
    (pid / "ksm_merging_pages").write_text("2048\n")
    stat = ProcFS(tmp_path).ksm_stat(4242)
    assert stat is not None
    assert (stat.rmap_items, stat.merging_pages, stat.merge_any) == (2050, 2048, False)
    (pid / "ksm_stat").write_text("ksm_rmap_items 2050\nksm_merging_pages 7\nksm_merge_any: yes\n")
    newer = ProcFS(tmp_path).ksm_stat(4242)
    assert newer is not None and (newer.merging_pages, newer.merge_any) == (7, True)


def test_ksm_stat_of_a_task_without_mm_reads_empty(tmp_path: Path) -> None:
    d = tmp_path / "7"
    d.mkdir()
    (d / "ksm_stat").write_text("")
    (d / "ksm_merging_pages").write_text("")
    st = ProcFS(tmp_path).ksm_stat(7)
    assert st is not None and st.merging_pages == 0
