"""Helpers of bench/bench_coordinator.py: the workload processes, the daemon, samples.

Kept apart so that the benchmark itself reads as the arms and their report.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ksmtrace.coordinator.governor import KsmdReader
from ksmtrace.kernel import ksm_sysfs, vmstat

ROOT = Path(__file__).resolve().parents[1]
HZ = os.sysconf("SC_CLK_TCK")
PAGE = 4096


def compile_helper(dest: Path) -> Path:
    """bench/coordwork.c built as ``dest``: its file name is the comm the daemon's policy names."""
    subprocess.run(
        ["gcc", "-O2", "-pthread", "-o", str(dest), str(ROOT / "bench" / "coordwork.c")], check=True
    )
    return dest


def cpu_s(pid: int) -> float:
    """User + system time of the whole process (every thread), from /proc/PID/stat."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / HZ


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def others_mergeable(ours: set[int]) -> list[str]:
    """Processes other than ours that are mergeable now: their merges would count in the
    machine-wide counters (said in the output, not hidden)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in ours:
            continue
        try:
            if "ksm_mergeable: yes" in (d / "ksm_stat").read_text():
                out.append(f"{d.name} ({(d / 'comm').read_text().strip()})")
        except OSError:
            continue
    return out


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the arm's start (the workload's spawn)
    saved: int  # pages KSM saves: pages_sharing (+ ksm_zero_pages under use_zero_pages)
    ksmd_s: float  # ksmd's CPU seconds (schedstat runtime)
    daemon_s: float  # the daemon's CPU seconds (0 without one)
    daemon_rss_kib: int
    cow: int  # /proc/vmstat cow_ksm


class Sampler:
    def __init__(self, t0: float, daemon_pid: int | None = None) -> None:
        self.t0, self.daemon_pid = t0, daemon_pid
        self.ksmd = KsmdReader()
        self.samples: list[Sample] = []

    def sample(self) -> Sample:
        k = ksm_sysfs.read().as_dict()
        saved = int(k.get("pages_sharing", 0))
        if k.get("use_zero_pages") == 1:
            saved += int(k.get("ksm_zero_pages", 0))
        d, rss = 0.0, 0
        if self.daemon_pid is not None:
            try:
                d, rss = cpu_s(self.daemon_pid), rss_kib(self.daemon_pid)
            except OSError:  # exited: the arm's report says so through its decisions
                pass
        s = Sample(
            time.monotonic() - self.t0,
            saved,
            self.ksmd.cpu_s() or 0.0,
            d,
            rss,
            vmstat.ksm_vmstat().get("cow_ksm", 0),
        )
        self.samples.append(s)
        return s


class Workload:
    """``n`` helper processes; ``optin`` makes each opt in whole by itself."""

    def __init__(self, exe: Path, n: int, mib: int, dup_pct: int, hot_kib: int, period_ms: int, optin: bool):
        self.procs: list[subprocess.Popen[str]] = []
        self.ranges: list[tuple[int, int, int]] = []  # (pid, start, end) of each main region
        for i in range(n):
            args = [
                str(exe),
                str(mib),
                str(i + 1),
                str(dup_pct),
                str(hot_kib),
                str(period_ms),
                str(int(optin)),
            ]
            self.procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, text=True))
        for p in self.procs:
            assert p.stdout is not None
            line = p.stdout.readline().split()
            if not line or line[0] != "ready":
                self.close()
                raise SystemExit(f"{exe.name} did not start")
            self.ranges.append((p.pid, int(line[1]), int(line[1]) + int(line[2])))

    @property
    def pids(self) -> set[int]:
        return {p.pid for p in self.procs}

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def policy(comm: str, budget: str) -> str:
    """An enforce policy naming the workload; the rest are the defaults (docs/examples/policy.toml),
    except that a 128 MiB process has ~190 duplicate runs and the default 256 ranges would cap a
    larger one: the cap is raised so that the benchmark measures merging, not the cap."""
    return f"""\
mode = "enforce"
self_opted = false

[[candidate]]
comm = "{comm}"

[runs]
max_ranges_per_process = 4096

[ksmd]
budget = "{budget}"
"""


class Daemon:
    """``python -m ksmtrace daemon -j --policy FILE``, its run directory in ``tmp``, decisions read
    as they come (a thread drains stdout so that the daemon never blocks on a full pipe)."""

    def __init__(self, tmp: Path, policy_text: str, name: str) -> None:
        path = tmp / f"{name}.toml"
        path.write_text(policy_text)
        env = {**os.environ, "KSMTRACE_RUN_DIR": str(tmp / f"run-{name}"), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ksmtrace", "daemon", "-j", "--policy", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.decisions: list[dict[str, Any]] = []
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                d = json.loads(line)
            except ValueError:
                d = {"action": "unparsed", "reason": line.strip()}
            d["_t"] = time.monotonic()
            self.decisions.append(d)
            self._q.put(d)
        self._q.put(None)

    def wait(self, action: str, timeout: float) -> dict[str, Any]:
        """The first decision with this action from now on (earlier ones included)."""
        for d in list(self.decisions):
            if d["action"] == action:
                return d
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                d = self._q.get(timeout=left)
            except queue.Empty:
                break
            if d is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise SystemExit(f"daemon exited (rc {self.proc.wait()}) before {action!r}: {err}")
            if d["action"] == action:
                return d
        raise SystemExit(f"daemon: no {action!r} decision within {timeout:.0f}s")

    def count(self, action: str, applied: bool = True) -> int:
        return sum(1 for d in self.decisions if d["action"] == action and d.get("applied") == applied)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
