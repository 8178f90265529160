"""Regenerate snoop_example.txt and optins_example.txt on a real machine (root).

    .venv/bin/python docs/examples/capture_optins.py

Workloads run in a cgroup of their own so that `snoop --cgroup` shows them
and nothing else of a busy host; ksmd is run briskly under the test lock and
its settings restored afterwards.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import LOCK, KsmControl  # noqa: E402

from ksmtrace.probes.optins import cgroup2_mount  # noqa: E402
from ksmtrace.workload import Workload  # noqa: E402

KSMTRACE = [sys.executable, "-m", "ksmtrace"]
OUT = Path(__file__).resolve().parent


def run(*args: str) -> str:
    out = subprocess.run([*KSMTRACE, *args], capture_output=True, text=True, cwd=ROOT, check=True)
    return f"# ksmtrace {' '.join(args)}\n{out.stdout}"


def main() -> None:
    cg = cgroup2_mount() / "ksmtrace-example"
    cg.mkdir(exist_ok=True)
    (cg / "cgroup.procs").write_text(str(os.getpid()))  # our workloads inherit it
    started: list[Workload] = []
    try:
        # Opted in before tracing: a VM-like process and its fork, a launched program.
        guest = Workload(comm="kvm-guest-ram")
        started.append(guest)
        ram = guest.call("alloc", name="ram", pages=4096, kind="dup")
        guest.call("madvise", name="ram")
        child = guest.call("fork")["child"]
        started.append(Workload(prctl_before_exec=True, comm="redis-server"))

        snoop = subprocess.Popen(
            [*KSMTRACE, "snoop", "-T", "--cgroup", "/ksmtrace-example"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert snoop.stdout is not None
        head = ""
        while "Tracing..." not in head:
            head += snoop.stdout.readline()
        # While tracing: every kind of call, failures included.
        java = Workload(comm="java")
        started.append(java)
        heap = java.call("alloc", name="heap", pages=2048, kind="mix", fraction=0.5)
        java.call("madvise", name="heap")
        java.call("madvise", name="heap", advice="unmergeable", first=1024, count=512)
        java.call("madvise", name="heap", addr=heap["addr"] + 1, length=4096)
        gone = java.call("alloc", name="gone", pages=4)
        java.call("free", name="gone")
        java.call("madvise", name="gone", addr=gone["addr"], length=gone["len"])
        for mode in ("on", "get", "off"):
            java.call("prctl", mode=mode)
        java.call("pmadvise", name="heap")
        java.call("pmadvise", name="heap", pid=guest.pid)
        java.call("prctl", mode="on")
        java.call("fork")
        with Workload(prctl_before_exec=True, comm="postgres") as pg:
            pg.call("info")
        time.sleep(0.5)
        snoop.send_signal(signal.SIGINT)
        rest = snoop.stdout.read()  # through the buffer readline() filled
        snoop.wait(timeout=30)
        (OUT / "snoop_example.txt").write_text(
            "# ksmtrace snoop -T --cgroup /ksmtrace-example\n" + head + rest + "^C\n"
        )

        with LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            ctl = KsmControl()
            try:
                ctl.start()
                ctl.wait_merged(guest.pid, ram["addr"], ram["len"], 4096)
                ctl.wait_full_scans(2)
                # Stop scanning (merges stay) and break a quarter of the guest's
                # merges: ksm_stat keeps the old count until ksmd rescans.
                ctl.set(run=0)
                guest.call("write", name="ram", step=4)
                text = run("optins", "-n", "kvm-guest-ram")
                text += "\n" + run("optins", "-n", "java")
                text += "\n" + run("optins", "-j", "-p", str(child))
            finally:
                ctl.unmerge_all()
                ctl.saved.restore()
        (OUT / "optins_example.txt").write_text(text)
    finally:
        for w in reversed(started):
            w.close()
        (cgroup2_mount() / "cgroup.procs").write_text(str(os.getpid()))
        cg.rmdir()


if __name__ == "__main__":
    main()
