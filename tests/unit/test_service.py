"""packaging/ksmtrace.service stays a unit systemd accepts (``systemd-analyze verify``).

systemd-analyze ships with systemd itself (Debian's ``systemd`` package), so
every machine this suite runs on has it; where it is missing the test skips,
except under --strict-system / CI=true, where it fails: CI must verify the unit.
verify wants ExecStart's program to exist, so a copy whose ExecStart names
this virtualenv's ksmtrace is verified (the installed unit names
/usr/local/sbin/ksmtrace, which scripts/install.sh --with-service links there).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "ksmtrace.service"
INSTALLED_EXEC = "/usr/local/sbin/ksmtrace"


def _verify(unit_text: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        why = "systemd-analyze is not installed (Debian: the systemd package)"
        if request.config.getoption("--strict-system"):
            pytest.fail(f"{why}: under --strict-system / CI=true the unit must be verified")
        pytest.skip(why)
    program = Path(sys.executable).with_name("ksmtrace")
    assert program.is_file(), f"{program} is missing: run scripts/install.sh"
    copy = tmp_path / "ksmtrace.service"
    copy.write_text(unit_text.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={program} "))
    # --man=no: Documentation= lookups need man pages installed, which says nothing about the unit.
    out = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on warnings such as unknown keys; any line about our unit is a mistake.
    ours = [line for line in (out.stdout + out.stderr).splitlines() if copy.name in line]
    return "\n".join(ours) if ours or out.returncode == 0 else out.stdout + out.stderr


def test_unit_verifies(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    assert _verify(UNIT.read_text(), tmp_path, request) == ""


def test_verify_would_see_a_mistake(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The check can fail: a misspelt key is reported."""
    broken = UNIT.read_text().replace("KillMode=mixed", "KillMod=mixed")
    assert "KillMod" in _verify(broken, tmp_path, request)


def _settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        m = re.match(r"([A-Za-z]+)=(.*)", line)
        if m:
            found.setdefault(m.group(1), []).append(m.group(2))
    return found


def test_unit_runs_the_daemon_as_install_sh_links_it() -> None:
    s = _settings()
    assert s["ExecStart"] == [f"{INSTALLED_EXEC} daemon --policy /etc/ksmtrace/policy.toml"]
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert f'"$DEST{INSTALLED_EXEC}"' in install
    assert s["RuntimeDirectory"] == ["ksmtrace"]
    # The settings journal must outlive a crash, or nothing restores ksmd's knobs.
    assert s["RuntimeDirectoryPreserve"] == ["yes"]
    assert s["LimitMEMLOCK"] == ["infinity"]
    caps = set(s["CapabilityBoundingSet"][0].split())
    assert caps == {
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_SYS_ADMIN",
        "CAP_SYS_PTRACE",
        "CAP_DAC_READ_SEARCH",
        "CAP_NET_ADMIN",
    }
    # Read-only /sys would stop every write to ksmd's knobs.
    assert "ProtectKernelTunables" not in s
