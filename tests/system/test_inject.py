"""ptrace syscall injection under stress, and its refusals, on the real kernel.

Self-checking C targets (tests/targets/injtarget.c, built here with cc) run
busy, sleeping, pipe-reading and multi-threaded; hundreds of madvise calls
are injected at random moments while queued real-time signals fly. The
targets report any memory checksum change, clobbered register, short sleep,
failed or wrong read, lost signal; every one must end with zero errors and
none may be left stopped or traced.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ksmtrace import native, remote
from ksmtrace.errors import KsmtraceError, UsageError

pytestmark = pytest.mark.system

SRC = Path(__file__).resolve().parent.parent / "targets" / "injtarget.c"
MODES = ("busy", "sleep", "pipe", "threads")
RUN_SECONDS = 30.0  # ended by SIGTERM once the signals stopped
INJECT_SECONDS = 10.0


@pytest.fixture(scope="module")
def target_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to build the test targets"
    out = tmp_path_factory.mktemp("targets") / "injtarget"
    subprocess.run([cc, "-O2", "-Wall", "-pthread", str(SRC), "-o", str(out)], check=True)
    return out


class Target:
    def __init__(self, binary: Path, mode: str, seconds: float) -> None:
        self.mode = mode
        self.proc = subprocess.Popen([str(binary), mode, str(seconds)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout
        _, addr, length = self.proc.stdout.readline().split()
        self.pid = self.proc.pid
        self.addr, self.len = int(addr), int(length)
        self.sent = 0

    def pending_signals(self) -> bool:
        """Any signal queued to the process or one of its threads, not yet delivered."""
        for tid in self.tids():
            text = Path(f"/proc/{self.pid}/task/{tid}/status").read_text()
            fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
            if int(fields["SigPnd"], 16) or int(fields["ShdPnd"], 16):
                return True
        return False

    def tids(self) -> list[int]:
        return [int(t) for t in os.listdir(f"/proc/{self.pid}/task")]

    def status(self) -> dict[str, str]:
        out = {}
        for tid in self.tids():
            text = Path(f"/proc/{self.pid}/task/{tid}/status").read_text()
            fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
            out[f"{tid} State"] = fields["State"]
            out[f"{tid} TracerPid"] = fields["TracerPid"]
        return out

    def finish(self, terminate: bool = False) -> dict[str, object]:
        assert self.proc.stdout
        if terminate:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        report = json.loads(out.strip().splitlines()[-1])
        report["rc"] = self.proc.returncode
        return report


def _not_stopped_or_traced(t: Target) -> None:
    for key, value in t.status().items():
        if key.endswith("TracerPid"):
            assert value == "0", f"{t.mode} target {key}={value}: left traced"
        else:
            assert not value.startswith(("t", "T")), f"{t.mode} target {key}={value}: left stopped"


@pytest.mark.host_only("counts injections done in a fixed time")
@pytest.mark.ksm
def test_injection_stress(ksm, target_bin: Path, wait_for) -> None:
    # The lock (ksmd stopped) keeps thousands of MADV_MERGEABLE/UNMERGEABLE calls from
    # disturbing other checkouts' KSM tests; nothing here depends on ksmd.
    targets = [Target(target_bin, m, RUN_SECONDS) for m in MODES]
    rng = random.Random(5)
    stop = threading.Event()
    sig_lock = threading.Lock()

    def send_signals() -> None:
        # Queued real-time signals, so that one held back and lost would show in the count.
        r = random.Random(9)
        while not stop.is_set():
            t = r.choice(targets)
            with sig_lock:
                os.kill(t.pid, signal.SIGRTMIN)
                t.sent += 1
            time.sleep(r.uniform(0.0002, 0.002))  # often several per injection

    sender = threading.Thread(target=send_signals)
    sender.start()
    results: list[dict[str, int]] = []
    try:
        end = time.monotonic() + INJECT_SECONDS
        advice = remote.MADV_MERGEABLE
        while time.monotonic() < end:
            t = rng.choice(targets)
            tid = rng.choice(t.tids())  # any thread, not only the leader
            time.sleep(rng.uniform(0, 0.004))
            res = native.inject_madvise(tid, t.addr, t.len, advice, timeout_ms=2000)
            assert res["ret"] == 0, (t.mode, res)
            results.append(res)
            advice = remote.MADV_UNMERGEABLE if advice == remote.MADV_MERGEABLE else remote.MADV_MERGEABLE
            if len(results) % 50 == 0:
                for tt in targets:
                    _not_stopped_or_traced(tt)
    finally:
        stop.set()
        sender.join()
    for t in targets:
        _not_stopped_or_traced(t)
    # The last queued signals land before the targets count them.
    for t in targets:
        wait_for(lambda t=t: not t.pending_signals(), 5, f"{t.mode} target's queued signals")
    reports = {t.mode: (t.finish(terminate=True), t.sent) for t in targets}
    in_syscall = sum(1 for r in results if r["stop_kind"])
    print(
        f"\n{len(results)} injections ({in_syscall} into a thread blocked in a syscall), "
        f"median {sorted(r['elapsed_ns'] for r in results)[len(results) // 2] / 1000:.0f} us, "
        f"{sum(r['signals_kept'] for r in results)} signals held and re-delivered "
        f"(at most {max(r['signals_kept'] for r in results)} in one injection)"
    )
    for mode, (rep, sent) in reports.items():
        print(f"  {mode}: {rep}  sent={sent}")
    assert len(results) >= 300
    assert 0 < in_syscall < len(results)  # both kinds of stop happened
    for mode, (rep, sent) in reports.items():
        assert rep["errors"] == 0 and rep["rc"] == 0, (mode, rep)
        assert rep["signals"] == sent, (mode, rep, sent)
    assert reports["busy"][0]["checks"] > 0
    assert reports["sleep"][0]["sleeps"] > 100 and reports["sleep"][0]["short_sleeps"] == 0
    assert reports["pipe"][0]["records"] > 100
    assert reports["threads"][0]["records"] > 100 and reports["threads"][0]["sleeps"] > 100


@pytest.mark.ksm
def test_injected_madvise_really_marks_the_range(ksm, target_bin: Path) -> None:
    t = Target(target_bin, "sleep", 5)
    try:
        inj = remote.madvise(t.pid, t.addr, t.addr + t.len, remote.MADV_MERGEABLE)
        assert inj.ret == 0
        smaps = Path(f"/proc/{t.pid}/smaps").read_text()
        assert any(line.startswith(f"{t.addr:x}-") for line in smaps.splitlines()), (
            "the madvised range is its own VMA"
        )
        flags = smaps.split(f"{t.addr:x}-", 1)[1].split("VmFlags:", 1)[1].splitlines()[0]
        assert " mg" in flags
        remote.madvise(t.pid, t.addr, t.addr + t.len, remote.MADV_UNMERGEABLE)
        flags = Path(f"/proc/{t.pid}/smaps").read_text().split(f"{t.addr:x}-", 1)[1]
        assert " mg" not in flags.split("VmFlags:", 1)[1].splitlines()[0]
        # A range that is not mapped: madvise says ENOMEM, we say so in words.
        with pytest.raises(KsmtraceError, match="not mapped"):
            remote.madvise(t.pid, 4096, 8192, remote.MADV_MERGEABLE)
        _not_stopped_or_traced(t)
    finally:
        rep = t.finish()
    assert rep["errors"] == 0


def test_refusals() -> None:
    with pytest.raises(OSError) as e:
        native.inject_madvise(os.getpid(), 0, 4096, remote.MADV_MERGEABLE)
    assert e.value.errno == errno.EDEADLK
    with pytest.raises(UsageError, match="itself"):
        remote.check_target(os.getpid())
    with pytest.raises(UsageError, match="kernel thread"):
        remote.check_target(2)  # kthreadd
    with pytest.raises(OSError) as e:
        native.inject_madvise(2, 0, 4096, remote.MADV_MERGEABLE)
    assert e.value.errno == errno.EPERM


def test_already_traced_target_is_refused_and_left_alone(target_bin: Path) -> None:
    t = Target(target_bin, "busy", 4)
    # Another tracer holds it (as a debugger would).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import ctypes, sys, time; libc = ctypes.CDLL(None, use_errno=True); "
            f"assert libc.ptrace(0x4206, {t.pid}, 0, 0) == 0; print('held', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout and holder.stdout.readline().strip() == "held"
        with pytest.raises(KsmtraceError, match=rf"pid {t.pid} is being traced by pid {holder.pid} \(python"):
            remote.madvise(t.pid, t.addr, t.addr + t.len, remote.MADV_MERGEABLE)
    finally:
        holder.kill()
        holder.wait()
    _not_stopped_or_traced(t)
    assert t.finish()["errors"] == 0


def test_timeout_leaves_target_untouched(target_bin: Path, wait_for) -> None:
    # A vfork parent waits killably: PTRACE_INTERRUPT cannot stop it until the child exits.
    t = Target(target_bin, "vfork", 2.5)
    # "ready" comes before vfork(): wait until the parent has its vfork child.
    children = Path(f"/proc/{t.pid}/task/{t.pid}/children")
    wait_for(lambda: children.read_text().split(), 5, "the vfork child")
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        native.inject_madvise(t.pid, t.addr, t.len, remote.MADV_MERGEABLE, timeout_ms=300)
    assert e.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - t0 < 2.0
    _not_stopped_or_traced(t)
    rep = t.finish()
    assert rep["errors"] == 0 and rep["checks"] == 1


def test_only_x86_64_is_claimed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The injector rewrites x86_64 registers: the check must refuse any other
    # machine, with a sentence naming it, and pass here only where that is true.
    here = os.uname().machine
    if here == "x86_64":
        remote.require_x86_64()
    else:
        with pytest.raises(KsmtraceError, match="x86_64 only"):
            remote.require_x86_64()
    for other in ("aarch64", "i686", "riscv64"):
        monkeypatch.setattr(remote.platform, "machine", lambda other=other: other)
        with pytest.raises(KsmtraceError, match=f"x86_64 only \\(this machine is {other}\\)"):
            remote.require_x86_64()
