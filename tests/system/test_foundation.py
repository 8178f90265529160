"""Foundation, end to end on the real kernel: status, demo, run, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ksmtrace.kernel import bcc_env, checks, features
from ksmtrace.model import inventory

pytestmark = pytest.mark.system
KSMTRACE = [sys.executable, "-m", "ksmtrace"]


def ksmtrace(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*KSMTRACE, *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


@pytest.mark.ksm
def test_status_json_lists_merged_workload(ksm, workload) -> None:
    wl = workload(comm="status-wl")
    reg = wl.call("alloc", name="a", pages=2048, kind="dup")
    assert wl.call("madvise", name="a")["ret"] == 0
    ksm.start()
    ksm.wait_merged(wl.pid, reg["addr"], reg["len"], 2048)
    ksm.wait_full_scans(2)  # ksm_stat is refreshed by rescans only
    out = ksmtrace("status", "-j")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    procs = {p["pid"]: p for p in data["processes"]}
    assert wl.pid in procs
    # ksm_stat after two rescans: all 2048 pages; only region a is mergeable.
    assert procs[wl.pid]["merging_pages"] == 2048
    assert procs[wl.pid]["comm"] == "status-wl"
    assert procs[wl.pid]["mergeable_bytes"] == reg["len"]
    # Only the knobs this kernel has, read from sysfs itself.
    assert set(data["knobs"]) | set(data["counters"]) == set(os.listdir("/sys/kernel/mm/ksm"))
    assert "cow_ksm" in data["vmstat"]
    table = ksmtrace("status")
    assert table.returncode == 0 and str(wl.pid) in table.stdout


@pytest.mark.ksm
def test_demo_shows_optin_merge_and_cow(ksm) -> None:
    before = open("/sys/kernel/mm/ksm/pages_to_scan").read()
    out = ksmtrace("demo", "-j", "--size", "16", "--writes", "0.5")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    # Every probe loads; before 6.4 there are no ksm:* tracepoints for the
    # ksmd probe, and the demo says so and shows merges from /proc alone.
    has_ksm_tp = features.available("ksm_tracepoints")
    assert data["probes_missing"] == ([] if has_ksm_tp else ["ksmd"])
    if not has_ksm_tp:
        assert "lacks the ksm:* tracepoints" in data["probes_unavailable"]["ksmd"]
    assert data["madvise_ret"] == 0
    # The opt-in, as the syscall tracepoints saw it: exactly one event.
    (ev,) = data["optin_events"]
    assert ev["pid"] == data["pid"] and ev["syscall"] == "madvise" and ev["ret"] == 0
    assert ev["op_name"] == "MADV_MERGEABLE"
    assert data["merged_pages"] == data["pages"] == 4096
    if has_ksm_tp:
        assert data["ksmd_merges"] >= 4096
    else:
        assert "ksmd_merges" not in data
    assert data["written"] == 2048
    # Exact per-process count from the fault probe; cow_ksm is machine-wide, and
    # a KSM user outside the test lock (a VM on the host) can only add to it.
    assert data["ksm_cow_faults"] == 2048
    assert data["cow_ksm_delta"] >= 2048
    assert data["merged_after_writes"] == 2048
    assert open("/sys/kernel/mm/ksm/pages_to_scan").read() == before


@pytest.mark.ksm
def test_demo_without_probes_runs_on_proc_alone(ksm) -> None:
    out = ksmtrace("demo", "-j", "--size", "4", "--no-probes")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["merged_pages"] == 1024 and "ksm_cow_faults" not in data


def test_unprivileged_user_gets_clear_error() -> None:
    out = ksmtrace("demo", user=65534)
    assert out.returncode == 77
    assert "ksmtrace needs root" in out.stderr
    assert "Traceback" not in out.stderr


def test_inventory_counts_unreadable_processes(workload, monkeypatch) -> None:
    # The inventory finishes and accounts for every pid it could not read: one
    # that exited before it was read, and one whose smaps are refused (as PID 1's
    # may be, even to root; made so here for one pid, since root reads any other).
    from ksmtrace.errors import AccessDenied
    from ksmtrace.kernel.procfs import ProcFS

    live, gone, shut = workload(comm="inv-live"), workload(comm="inv-gone"), workload(comm="inv-shut")
    for w in (live, gone, shut):
        w.call("alloc", name="a", pages=4)
        assert w.call("madvise", name="a")["ret"] == 0
    dead = gone.pid
    gone.close()
    real = ProcFS.smaps

    def smaps(self, pid):  # type: ignore[no-untyped-def]
        if pid == shut.pid:
            raise AccessDenied(f"pid {pid}: smaps refused")
        return real(self, pid)

    monkeypatch.setattr(ProcFS, "smaps", smaps)
    inv = inventory.take(pids=[live.pid, dead, shut.pid])
    assert [p.pid for p in inv.processes] == [live.pid]
    assert (inv.exited, inv.denied) == (1, 1)


def test_bcc_compiles_a_tracepoint_program_with_discovered_headers() -> None:
    checks.ensure_tracefs()
    bcc, headers = bcc_env.prepare()
    # Only this process's calls count: the tracepoint fires for every process.
    prog = bcc.BPF(
        text=b"BPF_ARRAY(n, u64, 1);"
        b"TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {"
        b" if ((bpf_get_current_pid_tgid() >> 32) != SELF) return 0;"
        b" int k = 0; u64 *v = n.lookup(&k); if (v) __sync_fetch_and_add(v, 1); return 0; }",
        cflags=[*headers.cflags, f"-DSELF={os.getpid()}"],
    )
    try:
        for _ in range(5):
            os.getppid()
        assert prog[b"n"][0].value == 5
    finally:
        prog.cleanup()


@pytest.mark.ksm
@pytest.mark.requires_kernel_feature("prctl_memory_merge", "ksm_merge_any_stat")
def test_run_launcher_opts_in_whole_process(ksm) -> None:
    out = subprocess.run(
        [
            *KSMTRACE,
            "run",
            "--",
            sys.executable,
            "-c",
            "import os; print(open(f'/proc/{os.getpid()}/ksm_stat').read())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "ksm_merge_any: yes" in out.stdout


def test_tracefs_is_mounted_or_mountable() -> None:
    assert (checks.ensure_tracefs() / "events" / "syscalls").is_dir()


def test_btf_offsets_match_the_running_kernel() -> None:
    from ksmtrace.kernel import btf

    b = btf.load()
    # platform.md: ksm_rmap_item.mm at 16, .address at 24 on this kernel family;
    # the check that matters is that the values come from the kernel's own BTF.
    assert b.offset("ksm_rmap_item", "mm") == 16
    assert b.offset("ksm_rmap_item", "address") == 24
    assert b.size("task_struct") > b.offset("task_struct", "tgid") > 0
    # The offset is right for this kernel: a BPF program reading task_struct.tgid
    # there finds this process's pid (6.1 headers' offset would read garbage).
    checks.ensure_tracefs()
    bcc, headers = bcc_env.prepare()
    prog = bcc.BPF(
        text=b"BPF_ARRAY(seen, u32, 1);"
        b"TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {"
        b" if ((bpf_get_current_pid_tgid() >> 32) != SELF) return 0;"
        b" u32 tgid = 0; int k = 0;"
        b" bpf_probe_read_kernel(&tgid, sizeof(tgid), (void *)bpf_get_current_task() + TGID_OFF);"
        b" seen.update(&k, &tgid); return 0; }",
        cflags=[*headers.cflags, f"-DSELF={os.getpid()}", f"-DTGID_OFF={b.offset('task_struct', 'tgid')}"],
    )
    try:
        os.getppid()
        assert prog[b"seen"][0].value == os.getpid()
    finally:
        prog.cleanup()
