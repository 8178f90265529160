"""The CI's VM run (vagrant/run-vm-tests.sh), started as soon as collection
shows tests/system/test_vm.py will run, so that booting the VM and installing
ksmtrace in it (about ten minutes of software emulation) overlap the host's
suite instead of following it. tests/system/test_vm.py waits for it and
reports. A module of its own for the reason tests/stray.py gives."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "build" / "vm"
STDERR = RESULTS / "run-vm-tests.stderr"

RUN: subprocess.Popen[bytes] | None = None


def start() -> subprocess.Popen[bytes]:
    """Start the VM run once; its stderr (the step lines) goes to a file, so a
    run nobody reads yet never blocks on a full pipe."""
    global RUN
    if RUN is None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "KSMTRACE_VM_RESULTS": str(RESULTS)}
        with open(STDERR, "wb") as err:
            RUN = subprocess.Popen(
                [str(ROOT / "vagrant" / "run-vm-tests.sh")],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                start_new_session=True,  # a Ctrl-C of pytest reaches it through stop(), once
            )
    return RUN


def stop(timeout: float = 300) -> None:
    """At the session's end: a run still going (the host suite was cut short)
    gets SIGTERM, whose traps destroy the VM and stop libvirtd."""
    if RUN is not None and RUN.poll() is None:
        RUN.terminate()
        try:
            RUN.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            RUN.kill()
