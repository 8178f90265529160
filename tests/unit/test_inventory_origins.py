"""How opt-ins are told apart after the fact: synthetic /proc trees.

The rules (ksmtrace/inventory.py) were checked on the real kernel by the
system tests; here each rule and its fall-backs are pinned on small trees.
"""

from __future__ import annotations

from pathlib import Path

from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.model import inventory

ANON = 0x7F0000000000


def _vma(start: int, end: int, path: str, flags: str) -> str:
    return (
        f"{start:x}-{end:x} rw-p 00000000 00:00 0          {path}\n"
        f"Size:               {(end - start) >> 10} kB\nKSM:                   0 kB\n"
        f"VmFlags: rd wr mr mw me ac {flags}\n"
    )


def _proc(root: Path, pid: int, ppid: int, merge_any: bool, vmas: list[tuple[int, int, str, bool]]) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "status").write_text(f"Name:\tp{pid}\nPid:\t{pid}\nPPid:\t{ppid}\nUid:\t0 0 0 0\nVmSize:\t1 kB\n")
    (d / "comm").write_text(f"p{pid}\n")
    mergeable = any(m for *_, m in vmas)
    (d / "ksm_stat").write_text(
        "ksm_rmap_items 0\nksm_zero_pages 0\nksm_merging_pages 0\nksm_process_profit 0\n"
        f"ksm_merge_any: {'yes' if merge_any else 'no'}\nksm_mergeable: {'yes' if mergeable else 'no'}\n"
    )
    (d / "smaps").write_text("".join(_vma(s, e, p, "mg" if m else "") for s, e, p, m in vmas))


STACK = (0x7FFF0000, 0x7FFF1000, "[stack]")


def _take(root: Path) -> dict[int, inventory.MergeableProcess]:
    return {p.pid: p for p in inventory.take(ProcFS(root)).processes}


def test_madvise_and_fork_inherited_region(tmp_path: Path) -> None:
    a, b = (ANON, ANON + 0x10000), (ANON + 0x20000, ANON + 0x30000)
    _proc(tmp_path, 10, 1, False, [(*a, "", True), (*STACK, False)])
    # The child has the parent's range (copied by fork) and one of its own.
    _proc(tmp_path, 11, 10, False, [(*a, "", True), (*b, "", True), (*STACK, False)])
    got = _take(tmp_path)
    assert [str(o) for o in got[10].region_origins] == ["madvise"]
    assert [str(o) for o in got[11].region_origins] == ["fork:10", "madvise"]
    assert got[11].how == "fork:10+madvise"
    assert got[11].inherited_from is None  # it has a region of its own
    regs = got[11].region_dicts()
    assert regs[0]["how"] == "fork" and regs[0]["inherited_from"] == 10
    assert regs[1]["name"] == "[anon]" and regs[1]["ksm_bytes"] == 0


def test_merge_any_prctl_exec_and_fork(tmp_path: Path) -> None:
    heap = (0x1000000, 0x1100000, "[heap]")
    # prctl after exec: every VMA present at the call was marked, the stack too.
    _proc(tmp_path, 20, 1, True, [(*heap, True), (*STACK, True)])
    # merge_any through execve: the new stack was set up before KSM saw the mm.
    _proc(tmp_path, 30, 5, True, [(*heap, True), (*STACK, False)])
    _proc(tmp_path, 5, 1, False, [(*STACK, False)])
    # A child of a merge_any process.
    _proc(tmp_path, 21, 20, True, [(*heap, True), (*STACK, True)])
    got = _take(tmp_path)
    assert got[20].how == "prctl" and got[20].stack_mergeable is True
    assert got[30].how == "exec" and got[30].stack_mergeable is False
    assert got[21].how == "fork:20" and got[21].inherited_from == 20
    assert 5 not in got
    assert all(o.how == "prctl" for o in got[20].region_origins)


def test_parent_gone_is_not_fork(tmp_path: Path) -> None:
    a = (ANON, ANON + 0x10000)
    _proc(tmp_path, 40, 39, False, [(*a, "", True)])  # 39 does not exist
    got = _take(tmp_path)
    assert got[40].how == "madvise"


def test_fixture_prctl_before_exec_reads_as_exec() -> None:
    host1 = Path(__file__).parent.parent / "fixtures" / "host1" / "proc"
    got = _take(host1)
    # tests/fixtures/capture.py started 2763 with Workload(prctl_before_exec=True).
    assert got[2763].how == "exec"
    assert got[2761].how == "madvise"
