"""vagrant/Vagrantfile stays valid for users (``vagrant validate``), in every mode."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"KSMTRACE_VM_DRIVER": "qemu", "KSMTRACE_WHEELHOUSE": "/tmp", "KSMTRACE_VM_CONSOLE_LOG": "/tmp/c"},
        {"KSMTRACE_VM_SHAREPAGES": "1"},
    ],
    ids=["workstation", "offline-tcg", "sharepages"],
)
def test_vagrantfile_validates(env: dict[str, str], tmp_path: Path) -> None:
    if shutil.which("vagrant") is None:
        pytest.skip("vagrant is not installed (vagrant/run-vm-tests.sh installs it)")
    out = subprocess.run(
        ["vagrant", "validate"],
        cwd=VAGRANT_DIR,
        capture_output=True,
        text=True,
        # A machine of a running vagrant/run-vm-tests.sh lives in vagrant/.vagrant,
        # its libvirtd in that run's namespace: validate without looking at it.
        env={**os.environ, **env, "VAGRANT_DOTFILE_PATH": str(tmp_path / ".vagrant")},
        timeout=120,
        check=False,
    )
    assert out.returncode == 0 and "validated successfully" in out.stdout, out.stdout + out.stderr
