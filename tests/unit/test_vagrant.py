"""vagrant/Vagrantfile stays valid for users (``vagrant validate``), in every mode.

CI must validate it: scripts/install.sh installs vagrant under CI=true (or
--with-vagrant), and under --strict-system / CI=true a missing vagrant fails
here instead of skipping. The one exception is the suite's own run inside the
offline test VM (KSMTRACE_IN_VM=1, set by the Vagrantfile): the host's run of
the same checkout validates the file, and the guest cannot install vagrant.
"""

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
def test_vagrantfile_validates(env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    vagrant = shutil.which("vagrant")
    if vagrant is None:
        why = "vagrant is not installed (scripts/install.sh --with-vagrant, or CI=true, installs it)"
        if os.environ.get("KSMTRACE_IN_VM") == "1":
            pytest.skip(f"{why}; inside the test VM: the host's run validates the Vagrantfile")
        if request.config.getoption("--strict-system"):
            pytest.fail(f"{why}: under --strict-system / CI=true the Vagrantfile must be validated")
        pytest.skip(why)
    out = subprocess.run(
        [vagrant, "validate"],
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
