"""-n NAME against real processes whose names reach the kernel's comm limit.

The kernel keeps 15 bytes of a name (TASK_COMM_LEN 16 with the NUL): QEMU's
``qemu-system-x86_64`` runs as ``qemu-system-x86``. Each command that takes
-n must find such a process, whether it is named by its comm of exactly 15
characters, by its executable's longer basename (cut to 15 as the kernel
cuts it) or, for the commands that resolve names to pids from /proc, by the
executable's full path. Every process here opts in with
madvise(MADV_MERGEABLE), and every test also starts a decoy whose comm
differs from the target's in the last byte that counts, which -n must not
catch.

Names carry a random tag: other checkouts run their tests on this machine at
the same time, so a fixed name could match their processes too.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.workload import Workload
from tests.stray import STRAY

pytestmark = [
    pytest.mark.system,
    pytest.mark.host_only(
        "name matching is ksmtrace's logic over /proc; the VM's optins/faults tests cover -n"
    ),
]
KSMTRACE = [sys.executable, "-m", "ksmtrace"]
ROOT = Path(__file__).resolve().parents[2]
COMM_MAX = 15  # TASK_COMM_LEN - 1
PAGES = 64


@dataclass
class Named:
    """A workload, the string given to -n for it, and a decoy it must not match."""

    wl: Workload
    arg: str  # what the user types after -n
    comm: str  # what the kernel keeps as the workload's comm
    decoy: Workload
    regions: dict[str, dict[str, int]]  # region name -> {"addr", "len"} in wl
    decoy_regions: dict[str, dict[str, int]]


def _python_named(directory: Path, name: str) -> Path:
    """A copy of this Python under NAME: exec'ing it gives the process that
    comm (cut to 15 bytes), /proc/PID/exe and argv[0]. A symlink would not do
    for exe (it resolves to the real interpreter), and `exec -a` changes
    only argv[0]."""
    path = directory / name
    shutil.copy2(os.path.realpath(sys.executable), path)
    return path


# How the target is named on the command line:
#   comm15    its comm set to exactly 15 characters, -n that comm
#   basename  started from an executable named longer than 15, -n that basename
#   comm      the same process, -n its comm (the basename cut to 15)
#   path      the same process, -n the executable's full path
#   qemu      an executable named qemu-system-x86_64 (QEMU's own case), -n that


@pytest.fixture
def named(workload: Callable[..., Workload], tmp_path: Path) -> Callable[[str], Named]:
    def make(form: str) -> Named:
        tag = secrets.token_hex(3)
        if form == "comm15":
            comm = f"kt{tag}-comm15"
            assert len(comm) == COMM_MAX
            wl = workload(comm=comm)
            arg = comm
            # Same length, last byte differs: that byte is in the second
            # word of the comm the BPF filter compares.
            decoy_comm = comm[:-1] + "X"
        else:
            exe_name = "qemu-system-x86_64" if form == "qemu" else f"kt{tag}-long-executable"
            exe = _python_named(tmp_path, exe_name)
            wl = workload(executable=str(exe))
            comm = exe_name[:COMM_MAX]
            arg = {"basename": exe_name, "qemu": exe_name, "comm": comm, "path": str(exe)}[form]
            # A 14-byte prefix: equal to the target up to its last byte.
            decoy_comm = comm[:-1]
        # What the test is about, checked before anything relies on it.
        assert ProcFS().comm(wl.pid) == comm
        decoy = workload(comm=decoy_comm)
        assert ProcFS().comm(decoy.pid) == decoy_comm
        regions, decoy_regions = (
            {
                name: w.call("alloc", name=name, pages=PAGES, kind="dup", seed=7)
                for name in ("before", "after")
            }
            for w in (wl, decoy)
        )
        return Named(wl, arg, comm, decoy, regions, decoy_regions)

    return make


def _start_tracing(*args: str, timeout: float = 60.0) -> subprocess.Popen[str]:
    """ksmtrace ARGS as a subprocess, returned once it says its probes are attached."""
    proc = subprocess.Popen(
        [*KSMTRACE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    STRAY.append(proc)
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if not ready:
            continue
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
        if line.startswith("Tracing..."):
            return proc
    proc.kill()
    _, err = proc.communicate()
    raise AssertionError(f"ksmtrace {' '.join(args)} did not start: rc={proc.returncode}\n{seen}{err}")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*KSMTRACE, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, f"ksmtrace {' '.join(args)}: rc={out.returncode}\n{out.stderr}"
    assert "Traceback" not in out.stderr
    return out


def _madvise_both(t: Named, region: str) -> None:
    for w in (t.wl, t.decoy):
        assert w.call("madvise", name=region)["ret"] == 0


@pytest.mark.parametrize("form", ["comm15", "basename", "comm", "qemu"])
def test_snoop_n_sees_the_optin(named: Callable[[str], Named], form: str) -> None:
    """The comm filter runs in BPF, so only names the kernel could hold apply
    there: 15 characters, or a longer basename cut like the kernel cuts it."""
    t = named(form)
    _madvise_both(t, "before")  # listed by the start-up inventory
    snoop = _start_tracing("snoop", "-j", "-n", t.arg)
    _madvise_both(t, "after")  # traced live
    # The madvise calls returned: their events are in the ring buffer, which
    # snoop drains when it stops.
    snoop.send_signal(signal.SIGINT)
    out, err = snoop.communicate(timeout=30)
    assert snoop.returncode == 128 + signal.SIGINT and "Traceback" not in err, err
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    inv = [r for r in records if r["type"] == "inventory"]
    evs = [r for r in records if r["type"] == "event"]
    # A real QEMU of another test may opt in under the same comm: only
    # processes of that comm may show, and the target exactly as it acted.
    assert {r["comm"] for r in inv + evs} <= {t.comm}, records
    assert t.decoy.pid not in {r["pid"] for r in inv + evs}
    (mine,) = [r for r in inv if r["pid"] == t.wl.pid]
    before, after = t.regions["before"], t.regions["after"]
    assert [(r["start"], r["length"]) for r in mine["regions"]] == [(before["addr"], before["len"])]
    got = [
        (e["pid"], e["tid"], e["syscall"], e["op"], e["start"], e["length"], e["ret"])
        for e in evs
        if e["pid"] == t.wl.pid
    ]
    assert got == [(t.wl.pid, t.wl.pid, "madvise", 12, after["addr"], after["len"], 0)]


@pytest.mark.parametrize("form", ["comm15", "basename", "path"])
def test_optins_n_lists_the_process(named: Callable[[str], Named], form: str) -> None:
    t = named(form)
    _madvise_both(t, "before")
    data = json.loads(_run("optins", "-j", "-n", t.arg).stdout)
    procs = {p["pid"]: p for p in data["processes"]}
    assert set(procs) == {t.wl.pid}
    before = t.regions["before"]
    assert [(r["start"], r["length"], r["how"]) for r in procs[t.wl.pid]["regions"]] == [
        (before["addr"], before["len"], "madvise")
    ]


@pytest.mark.parametrize("form", ["comm15", "basename", "path"])
def test_faults_n_counts_the_process(ksm: Any, named: Callable[[str], Named], form: str) -> None:
    t = named(form)
    _madvise_both(t, "before")
    ksm.merge_then_stop(
        (t.wl.pid, t.regions["before"], PAGES), (t.decoy.pid, t.decoy_regions["before"], PAGES)
    )
    faults = _start_tracing("faults", "-j", "-n", t.arg, "1", "1")
    # Both break merges within the one interval: only the target may be reported.
    assert t.wl.call("write", name="before", first=0, count=17)["written"] == 17
    assert t.decoy.call("write", name="before", first=0, count=5)["written"] == 5
    out, err = faults.communicate(timeout=60)
    assert faults.returncode == 0 and "Traceback" not in err, err
    (report,) = [json.loads(line) for line in out.splitlines() if line.strip()]
    rows = {p["pid"]: p for p in report["processes"]}
    assert set(rows) == {t.wl.pid}, report
    assert rows[t.wl.pid]["comm"] == t.comm
    assert rows[t.wl.pid]["ksm_cow_total"] == 17


@pytest.mark.parametrize("form", ["comm15", "basename", "path"])
def test_estimate_n_scans_the_process(named: Callable[[str], Named], form: str) -> None:
    t = named(form)
    _madvise_both(t, "before")
    data = json.loads(_run("estimate", "-j", "-n", t.arg).stdout)
    assert [(p["pid"], p["comm"]) for p in data["processes"]] == [(t.wl.pid, t.comm)]
    # The target's own memory was scanned: the region it opted in, whole.
    before = t.regions["before"]
    (region,) = [r for r in data["processes"][0]["regions"] if r["start"] == before["addr"]]
    assert (region["end"] - region["start"], region["present"], region["mergeable"]) == (
        before["len"],
        PAGES,
        True,
    )
