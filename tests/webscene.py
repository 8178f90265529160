"""A daemon serving the dashboards and workloads that keep breaking merges.

Shared by tests/system/test_web.py and bench/bench_web.py: ``ksmtrace
daemon`` started as a user would (observe mode, ``--listen 127.0.0.1:0``,
its address read from its start decision), and a :class:`Churn` thread that
keeps writing to workload regions whose pages ksmd merges again and again,
so that KSM COW faults and merges never stop while a page looks at them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tests.stray import STRAY

ROOT = Path(__file__).resolve().parents[1]
START = 180.0  # upper bound, reached only on failure: the daemon compiles its probes at start


class Daemon:
    """``ksmtrace daemon -j --listen 127.0.0.1:0``: observe mode, a kernel-chosen port.
    Both its outputs are drained by threads, so that it never blocks on a full pipe."""

    def __init__(self, tmp: Path, *args: str) -> None:
        env = {**os.environ, "KSMTRACE_RUN_DIR": str(tmp / "run"), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ksmtrace", "daemon", "-j", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        STRAY.append(self.proc)
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._started = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_errors, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self.lines.append(line)
            if "dashboards at" in line:
                self._started.set()
        self._started.set()

    def _read_errors(self) -> None:
        assert self.proc.stderr
        for line in self.proc.stderr:
            self.errors.append(line)

    def url(self) -> str:
        """The page's address, from the daemon's start decision."""
        self._started.wait(START)
        for line in self.lines:
            m = re.search(r"dashboards at (http://127\.0\.0\.1:\d+/)", line)
            if m:
                return m.group(1)
        raise AssertionError(f"daemon gave no dashboard address: {self.lines} {self.errors}")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=120)
        return rc, "".join(self.errors)


class Churn:
    """Writes to each workload's region ``name`` every ``period`` s (every
    ``steps[i]``-th page of workload i, default all): each write breaks the
    merged pages it lands on (KSM COW faults), and since every written page
    gets the same byte the pages stay duplicates that ksmd merges again."""

    def __init__(self, workloads: list[Any], period: float = 0.3, steps: list[int] | None = None) -> None:
        self.workloads, self.period = workloads, period
        self.steps = steps or [1] * len(workloads)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        value = 1
        while not self._stop.wait(self.period):
            value = value % 250 + 1
            for w, step in zip(self.workloads, self.steps):
                w.call("write", name="r", value=value, step=step)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
