"""Opt-ins on the real kernel: snoop (end to end, JSON lines), the probe API,
the start-up inventory and ``optins``, checked against what the workload did
and against perf counting the same tracepoint."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ksmtrace.errors import ProcessGone
from ksmtrace.kernel import features
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.model import inventory
from ksmtrace.model import optins as optin_report
from ksmtrace.model.inventory import Origin
from ksmtrace.probes.optins import OptinProbe, cgroup2_mount, resolve_cgroup
from ksmtrace.workload import PAGE
from tests.stray import STRAY

pytestmark = pytest.mark.system
KSMTRACE = [sys.executable, "-m", "ksmtrace"]
ROOT = Path(__file__).resolve().parents[2]


class Snoop:
    """`ksmtrace snoop -j ...` as a subprocess, started and stopped like a user would."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*KSMTRACE, "snoop", "-j", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        STRAY.append(self.proc)
        self.records: list[dict[str, Any]] = []
        self.stderr = ""
        self._wait_tracing()

    def _wait_tracing(self, timeout: float = 60.0) -> None:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.5)
            if ready:
                line = self.proc.stderr.readline()
                if not line:
                    break
                seen += line
                if line.startswith("Tracing... Ctrl-C to end."):
                    return
        self.proc.kill()
        out, err = self.proc.communicate()
        raise AssertionError(f"snoop did not start: rc={self.proc.returncode} {seen}{err}")

    def stop(self, sig: int = signal.SIGINT) -> list[dict[str, Any]]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=30)
        self.stderr = err
        # Ended by a signal: the summary is printed, and the status says which signal (128 + n).
        assert self.proc.returncode == 128 + sig, err
        assert "Traceback" not in err
        self.records = [json.loads(line) for line in out.splitlines() if line.strip()]
        return self.records

    def events(self, pid: int | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records if r["type"] == "event" and (pid is None or r["pid"] == pid)]

    def summary(self) -> dict[str, Any]:
        (s,) = [r for r in self.records if r["type"] == "summary"]
        return s


def _cgroup_id(pid: int) -> int:
    rel = ProcFS().cgroup(pid) or "/"
    return os.stat(cgroup2_mount() / rel.lstrip("/")).st_ino


def _call(syscall: str, op: int, **kw: Any) -> dict[str, Any]:
    return {"syscall": syscall, "op": op, **kw}


def _assert_matches(events: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Same calls in the same order, each field as expected."""
    got = [{k: e[k] for k in exp} for e, exp in zip(events, expected)]
    assert got == expected and len(events) == len(expected), json.dumps(events, indent=1)


@pytest.mark.host_only("snoop's lines and JSON; the VM's probe API test covers the events")
def test_snoop_reports_each_optin_once_with_its_fields(workload) -> None:
    wl = workload(comm="optin-wl")
    other = workload(comm="optin-other")
    reg = wl.call("alloc", name="a", pages=64)
    gone = wl.call("alloc", name="gone", pages=4)
    wl.call("free", name="gone")  # an unmapped range: madvise fails with ENOMEM
    a, n = reg["addr"], reg["len"]

    mine = Snoop("-p", str(wl.pid), "--no-inventory")
    by_comm = Snoop("-n", "optin-wl", "--no-inventory")
    not_mine = Snoop("-p", str(other.pid), "--no-inventory")
    wrong_comm = Snoop("-n", "optin-nobody", "--no-inventory")

    # What the workload does, in order, and what each call must show up as.
    expected = []
    r = wl.call("madvise", name="a", first=8, count=16)
    expected.append(_call("madvise", 12, start=a + 8 * PAGE, length=16 * PAGE, ret=r["ret"], errno=0))
    r = wl.call("madvise", name="a", advice="unmergeable", first=8, count=4)
    expected.append(_call("madvise", 13, start=a + 8 * PAGE, length=4 * PAGE, ret=0, errno=0))
    r = wl.call("madvise", name="a", addr=a + 1, length=PAGE)
    assert r["errno"] == errno.EINVAL
    expected.append(_call("madvise", 12, start=a + 1, length=PAGE, ret=-errno.EINVAL, errno=errno.EINVAL))
    r = wl.call("madvise", name="gone", addr=gone["addr"], length=gone["len"])
    assert r["errno"] == errno.ENOMEM
    expected.append(
        _call("madvise", 12, start=gone["addr"], length=gone["len"], ret=-errno.ENOMEM, error="ENOMEM")
    )
    # Before 6.4 the kernel refuses PR_[SG]ET_MEMORY_MERGE (EINVAL), and before
    # 6.13 KSM advice through process_madvise even on one's own pidfd: snoop
    # must then report those refusals, each with its arguments.
    einval = {"ret": -errno.EINVAL, "error": "EINVAL"}
    has_prctl = features.available("prctl_memory_merge")
    for mode, op, arg, ok_ret in (("on", 67, 1, 0), ("get", 68, 0, 1), ("off", 67, 0, 0), ("get", 68, 0, 0)):
        r = wl.call("prctl", mode=mode)
        assert r["ret"] == ok_ret if has_prctl else r["errno"] == errno.EINVAL
        expected.append(_call("prctl", op, arg=arg, **({"ret": ok_ret} if has_prctl else einval)))
    r = wl.call("pmadvise", name="a")
    got = {"ret": n} if features.available("process_madvise_self") else einval
    assert r["ret"] == n if "error" not in got else r["errno"] == errno.EINVAL
    expected.append(
        _call("process_madvise", 12, start=a, length=n, pidfd=r["pidfd"], target_pid=wl.pid, vlen=1, **got)
    )
    child = wl.call("fork")["child"]
    # A fork is not a call: the child inherits the registered mm (arg bit 1),
    # not merge_any (switched off above).
    expected.append(_call("fork", 0, pid=child, tid=child, target_pid=wl.pid, arg=1, ret=0))

    for s in (mine, by_comm, not_mine, wrong_comm):
        s.stop()
    cgroup = _cgroup_id(wl.pid)
    for s in (mine, by_comm):
        evs = s.events()
        _assert_matches(evs, expected)
        for e in evs:
            assert e["comm"] == "optin-wl" and e["uid"] == os.getuid()
            assert e["cgroup_id"] == cgroup
            if e["syscall"] != "fork":
                assert e["pid"] == e["tid"] == wl.pid
                assert e["wall"] == pytest.approx(time.time(), abs=120)
        assert s.summary() == {
            "type": "summary",
            "events": len(expected),
            "lost": 0,
            "inflight_full": 0,
            "madvise_calls": None,
            "inventory": None,
        }
    # Filtered out in the kernel: not one event.
    assert not_mine.events() == [] and not_mine.summary()["events"] == 0
    assert wrong_comm.events() == []


@pytest.mark.requires_kernel_feature("prctl_memory_merge")
def test_prctl_then_exec_is_reported_once_each(workload) -> None:
    snoop = Snoop("--no-inventory")
    wl = workload(prctl_before_exec=True, comm="optin-exec")
    wl.call("info")
    snoop.stop(signal.SIGTERM)  # SIGTERM ends it as cleanly as Ctrl-C
    evs = snoop.events(pid=wl.pid)
    _assert_matches(
        evs,
        [
            _call("prctl", 67, arg=1, ret=0, comm="optin-exec", tid=wl.pid),
            # After execve the mm is new; merge_any (arg bit 2) came along.
            _call("exec", 0, target_pid=wl.pid, tid=wl.pid, ret=0),
        ],
    )
    assert evs[1]["arg"] & 2
    assert evs[1]["comm"] != "optin-exec"  # the new program's name, before it renames itself
    # The inventory tells the same story afterwards from /proc alone.
    (p,) = inventory.take(pids=[wl.pid]).processes
    assert p.merge_any and p.origin == Origin("exec") and p.stack_mergeable is False


def test_probe_api_decodes_events_and_remote_pidfd(workload) -> None:
    wl = workload(comm="optin-api")
    other = workload(comm="optin-api2")
    reg = wl.call("alloc", name="a", pages=8)
    with OptinProbe(pids=[wl.pid]) as probe:
        assert wl.call("madvise", name="a")["ret"] == 0
        # Another process's pidfd: the kernel refuses KSM advice remotely, and
        # the event still names the process the pidfd points at.
        r = wl.call("pmadvise", name="a", pid=other.pid)
        assert r["ret"] == -1
        evs = list(probe.events(duration=0.5))
        st = probe.stats()
    assert [e.syscall for e in evs] == ["madvise", "process_madvise"]
    m, pm = evs
    assert (m.pid, m.tid, m.comm, m.op_name, m.start, m.length, m.ret, m.ok) == (
        wl.pid,
        wl.pid,
        "optin-api",
        "MADV_MERGEABLE",
        reg["addr"],
        reg["len"],
        0,
        True,
    )
    assert m.lat_ns > 0 and m.describe_call().startswith("madvise(0x")
    assert pm.target_pid == other.pid and pm.pidfd == r["pidfd"]
    assert pm.errno == r["errno"] and pm.error == errno.errorcode[r["errno"]] and not pm.ok
    assert (st.emitted, st.lost, st.inflight_full, st.madvise_calls) == (2, 0, 0, None)


def test_lost_events_are_counted(workload) -> None:
    """A full ring buffer drops events in the kernel and says how many."""
    wl = workload(comm="optin-lost")
    calls = 200
    # One page holds about 36 events; nobody drains it while the calls run.
    with OptinProbe(pids=[wl.pid], ringbuf_pages=1) as probe:
        for _ in range(calls):
            wl.call("prctl", mode="get")
        got = probe.drain()
        st = probe.stats()
    assert 0 < len(got) < calls
    assert st.lost > 0 and st.emitted == len(got)
    assert st.emitted + st.lost == calls
    assert all(e.op_name == "PR_GET_MEMORY_MERGE" and e.pid == wl.pid for e in got)


@pytest.mark.host_only("the filter's logic; the VM's probe API test covers the probe")
def test_cgroup_filter(workload) -> None:
    mount = cgroup2_mount()
    path = mount / f"ksmtrace-test-{os.getpid()}"
    path.mkdir()
    wl = workload(comm="optin-cg")
    outside = workload(comm="optin-cg")
    try:
        (path / "cgroup.procs").write_text(str(wl.pid))
        cg = resolve_cgroup("/" + path.name)
        assert cg.cgroup_id == _cgroup_id(wl.pid) and cg.level == 1
        snoop = Snoop("--cgroup", "/" + path.name)
        for w in (wl, outside):
            w.call("prctl", mode="get")
        snoop.stop()
        where = ProcFS().cgroup(wl.pid)
        assert [(e["pid"], e["op"]) for e in snoop.events()] == [(wl.pid, 68)], (snoop.records, where)
    finally:
        wl.close()
        path.rmdir()


@contextmanager
def perf_counting(pid: int, filt: str | None = None) -> Iterator[dict[str, int]]:
    """perf stat on syscalls:sys_enter_madvise of ``pid``, enabled/disabled with acks."""
    with tempfile.TemporaryDirectory() as tmp:
        ctl, ack = Path(tmp, "ctl"), Path(tmp, "ack")
        os.mkfifo(ctl)
        os.mkfifo(ack)
        argv = ["perf", "stat", "-x,", "-e", "syscalls:sys_enter_madvise"]
        if filt:
            argv += ["--filter", filt]
        argv += ["-D", "-1", f"--control=fifo:{ctl},{ack}", "-p", str(pid)]
        perf = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        ctl_f = open(ctl, "w")  # noqa: SIM115 (held open across the yield)
        ack_f = open(ack)  # noqa: SIM115

        def command(c: str) -> None:
            ctl_f.write(c + "\n")
            ctl_f.flush()
            assert ack_f.readline().strip("\x00\n ") == "ack"

        out: dict[str, int] = {}
        command("enable")
        try:
            yield out
            command("disable")
        finally:
            perf.send_signal(signal.SIGINT)
            _, err = perf.communicate(timeout=30)
            ctl_f.close()
            ack_f.close()
        for line in err.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2] == "syscalls:sys_enter_madvise":
                out["count"] = int(fields[0])
        assert "count" in out, err


def _other_madvise_tracers(mine: int) -> list[str]:
    out = subprocess.run(["bpftool", "-j", "perf", "list"], capture_output=True, text=True)
    found = []
    for rec in json.loads(out.stdout or "[]"):
        if rec.get("tracepoint") == "sys_enter_madvise" and rec["pid"] != mine:
            try:
                comm = ProcFS().comm(rec["pid"])
            except ProcessGone:
                comm = "?"
            found.append(f"pid {rec['pid']} ({comm}) prog {rec['prog_id']}")
    return found


def test_madvise_counts_agree_with_perf(workload) -> None:
    """Over one window, ksmtrace and perf count the same madvise calls of one pid."""
    wl = workload(comm="optin-perf")
    wl.call("alloc", name="a", pages=16)
    snoop = Snoop("-p", str(wl.pid), "--no-inventory", "--count-all-madvise")
    with (
        perf_counting(wl.pid) as all_calls,
        perf_counting(wl.pid, "behavior == 12 || behavior == 13") as ksm_calls,
    ):
        for advice in ("mergeable", "4", "unmergeable", "3", "mergeable", "3", "4"):
            wl.call("madvise", name="a", advice=advice)
        wl.call("madvise", name="a", addr=1, length=PAGE)  # EINVAL, still a call
        wl.call("prctl", mode="get")  # not a madvise: counted by neither
    others = _other_madvise_tracers(snoop.proc.pid)
    snoop.stop()
    # A BPF program that returns 0 on this tracepoint hides its events from
    # perf (ksmtrace's return 1): name any such program if the counts differ.
    why = f"other BPF programs on sys_enter_madvise: {others}" if others else ""
    madvise_events = [e for e in snoop.events() if e["syscall"] == "madvise"]
    assert len(madvise_events) == ksm_calls["count"] == 4, why
    assert snoop.summary()["madvise_calls"] == all_calls["count"] >= 8, why
    assert snoop.summary()["lost"] == 0


@pytest.mark.host_only("the inventory's logic; the VM's optins tests cover its kernel readers")
@pytest.mark.ksm
def test_opted_in_before_start_shows_in_optins_and_snoop(ksm, workload) -> None:
    pre = workload(comm="optin-pre")
    reg = pre.call("alloc", name="a", pages=256, kind="dup")
    assert pre.call("madvise", name="a")["ret"] == 0
    child = pre.call("fork")["child"]
    # Whole-process opt-ins exist from 6.4 on: elsewhere only the madvise ones.
    has_prctl = features.available("prctl_memory_merge")
    selfp = ex = None
    if has_prctl:
        selfp = workload(comm="optin-self")
        selfp.call("prctl", mode="on")
        ex = workload(prctl_before_exec=True, comm="optin-ex")
    ksm.start()
    ksm.wait_merged(pre.pid, reg["addr"], reg["len"], 256)

    whole = ["-p", str(selfp.pid), "-n", "optin-ex"] if selfp else []
    out = subprocess.run(
        [*KSMTRACE, "optins", "-j", "-p", str(pre.pid), "-p", str(child), *whole],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    procs = {p["pid"]: p for p in json.loads(out.stdout)["processes"]}
    assert set(procs) == {pre.pid, child} | ({selfp.pid, ex.pid} if selfp and ex else set())
    (region,) = [r for r in procs[pre.pid]["regions"] if r["start"] == reg["addr"]]
    assert region["length"] == reg["len"] and region["name"] == "[anon]" and region["how"] == "madvise"
    # Live, from kpageflags: every page of the region is a KSM page now. The
    # child shares the same frames (fork), so its copy of the range is KSM too.
    assert region["merging_pages_now"] == 256
    if features.available("smaps_ksm"):
        assert region["ksm_bytes"] == 256 * PAGE  # smaps KSM: is computed at read: live too
    else:
        assert region["ksm_bytes"] is None  # unknown, not 0: the kernel has no KSM: line
    # Only region a is mergeable: every one of its pages, and nothing else, is KSM.
    assert procs[pre.pid]["merging_bytes_now"] == 256 * PAGE
    # The KSM pages less the kernel's bookkeeping (one rmap_item per page scanned).
    assert 0 < procs[pre.pid]["saving_bytes_now"] < 256 * PAGE
    assert procs[child]["how"] == f"fork:{pre.pid}" and procs[child]["inherited_from"] == pre.pid
    (creg,) = [r for r in procs[child]["regions"] if r["start"] == reg["addr"]]
    assert creg["how"] == "fork" and creg["inherited_from"] == pre.pid
    if selfp and ex:
        assert procs[selfp.pid]["how"] == "prctl" and procs[selfp.pid]["merge_any"]
        assert procs[ex.pid]["how"] == "exec" and procs[ex.pid]["merge_any"]

    table = subprocess.run(
        [*KSMTRACE, "optins", "-p", str(pre.pid)], capture_output=True, text=True, cwd=ROOT
    )
    assert table.returncode == 0 and f"{reg['addr']:#x}" in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 100

    # snoop lists them first; --duration ends it on its own.
    out = subprocess.run(
        [*KSMTRACE, "snoop", "-j", "-n", "optin-pre", "--duration", "0.5"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    inv = {r["pid"]: r for r in records if r["type"] == "inventory"}
    assert set(inv) == {pre.pid, child}
    assert inv[child]["how"] == f"fork:{pre.pid}"
    assert any(r["start"] == reg["addr"] and r["length"] == reg["len"] for r in inv[pre.pid]["regions"])
    assert [r["type"] for r in records] == ["inventory", "inventory", "summary"]
    assert records[-1]["inventory"]["processes"] == 2


@pytest.mark.host_only("messages are ksmtrace's; one BPF compile per case under emulation")
def test_errors_for_people(workload) -> None:
    for args, rc, msg in (
        (["optins", "-p", "999999"], 2, "pid 999999 does not exist"),
        (["optins", "-n", "no-such-comm-x"], 2, "no process named 'no-such-comm-x'"),
        (["snoop", "-p", "999999"], 2, "pid 999999 does not exist"),
        (["snoop", "--cgroup", "/no/such/cgroup"], 2, "no cgroup '/no/such/cgroup'"),
    ):
        out = subprocess.run([*KSMTRACE, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert (out.returncode, out.stdout) == (rc, ""), out.stderr
        assert msg in out.stderr and "Traceback" not in out.stderr
    idle = workload(comm="optin-idle")
    out = subprocess.run([*KSMTRACE, "optins", "-p", str(idle.pid)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and f"pid {idle.pid}: has not opted in" in out.stdout
    for cmd in ("optins", "snoop"):
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *KSMTRACE, cmd],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert out.returncode == 77 and "ksmtrace needs root" in out.stderr


def test_process_exiting_mid_inventory_is_skipped_and_counted(workload) -> None:
    wl = workload(comm="optin-gone")
    reg = wl.call("alloc", name="a", pages=8)
    wl.call("madvise", name="a")
    live = workload(comm="optin-live")
    if features.available("prctl_memory_merge"):
        live.call("prctl", mode="on")
    else:  # Linux < 6.4: opted in by region
        live.call("alloc", name="a", pages=8)
        assert live.call("madvise", name="a")["ret"] == 0
    (p,) = inventory.take(pids=[wl.pid]).processes
    pid = wl.pid
    wl.close()
    # Listed while alive, gone when measured: optin_report skips and counts it.
    with pytest.raises(ProcessGone):
        optin_report.measure(p, PAGE, 64)
    inv = inventory.take(pids=[pid, live.pid])
    assert [q.pid for q in inv.processes] == [live.pid] and inv.exited == 1
    rep = optin_report.take([pid, live.pid])
    assert [q.proc.pid for q in rep.processes] == [live.pid] and rep.exited == 1
    # What was listed while alive was the region it opted in, exactly.
    assert [(v.start, v.end) for v in p.regions] == [(reg["addr"], reg["addr"] + reg["len"])]
