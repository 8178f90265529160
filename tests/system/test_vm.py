"""The whole suite inside a Debian 12 VM: a second kernel (6.1), through Vagrant.

vagrant/run-vm-tests.sh builds (or reuses) the offline box, boots it under
QEMU, provisions it with scripts/install.sh and runs the suite inside with
CI=true. This test runs that script, reads the guest's JUnit XML and fails
unless every guest test passed or was skipped because the 6.1 kernel lacks
what it tests. The guest's results go to the terminal either way, so the CI
log shows them. Slow (TCG): marked ``vm``, runs with --vm or CI=true.
"""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests import vmrun

pytestmark = [pytest.mark.system, pytest.mark.vm]

ROOT = Path(__file__).resolve().parents[2]
RESULTS = vmrun.RESULTS
# Box build ~2 min (once per machine), boot ~3, install ~2, suite ~5-10 under TCG.
TIMEOUT = 45 * 60
# The guest's strict-mode hook lets only these skips through (tests/conftest.py KernelLacks).
LACKS = "this kernel ("


def _write(request: pytest.FixtureRequest, lines: list[str]) -> None:
    """To the terminal even under output capture: the CI log must show the guest."""
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    cap = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None:
        return
    with cap.global_and_fixture_disabled() if cap else _null():
        tr.write_line("")
        for line in lines:
            tr.write_line(line)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _cases(junit: Path) -> list[tuple[str, str, str]]:
    """(nodeid, outcome, message) of every guest test case."""
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        nodeid = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome, msg = tag, (el.get("message") or "").strip()
                break
        out.append((nodeid, outcome, msg))
    return out


def test_suite_passes_inside_debian12_vm(request: pytest.FixtureRequest) -> None:
    # Started at collection's end (tests/conftest.py): it ran beside the host's suite.
    proc = vmrun.start()
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the script's traps destroy the VM and stop libvirtd.
        proc.terminate()
        proc.wait(timeout=300)
    stderr = vmrun.STDERR.read_text(errors="replace") if vmrun.STDERR.exists() else ""
    steps = [line for line in stderr.splitlines() if line.startswith(("vm-test:", "build-box:"))]
    lines = ["==== ksmtrace test suite inside the Debian 12 VM (vagrant/run-vm-tests.sh) ====", *steps]
    console = RESULTS / "console.log"
    if console.exists():
        booted = [
            ln.strip() for ln in console.read_text(errors="replace").splitlines() if "Linux version" in ln
        ]
        lines += [f"  guest console: {ln[:150]}" for ln in booted[:1]]
    guest_log = RESULTS / "guest-pytest.log"
    junit = RESULTS / "junit.xml"
    cases: list[tuple[str, str, str]] = []
    if junit.exists() and junit.stat().st_size:
        cases = _cases(junit)
        for nodeid, outcome, msg in cases:
            lines.append(f"  guest {outcome.upper():8} {nodeid}" + (f"  -- {msg}" if msg else ""))
    if guest_log.exists():
        tail = [ln.removeprefix("    default: ") for ln in guest_log.read_text().splitlines()[-6:]]
        lines += ["  guest pytest summary:", *(f"    {ln}" for ln in tail)]
    status = RESULTS / "guest-status.json"
    if status.exists() and status.stat().st_size:
        feats = json.loads(status.read_text())["features"]
        gone = ", ".join(n for n, f in feats.items() if not f["available"])
        lines.append(f"  guest ksmtrace status: unavailable on this kernel: {gone or 'nothing'}")
    timings = RESULTS / "timings.json"
    if timings.exists():
        lines.append(f"  timings: {timings.read_text().strip()}")
    _write(request, lines)

    # The failing guest tests go into the message itself: CI logs keep the
    # assertion when they cut the terminal output around it.
    bad = [f"guest {o.upper()} {n}  -- {m[:300]}" for n, o, m in cases if o in ("failure", "error")]
    assert proc.returncode == 0, (
        f"run-vm-tests.sh exited {proc.returncode}:\n" + "\n".join(bad) + f"\n{stderr[-3000:]}"
    )
    kernel = (RESULTS / "guest-kernel").read_text().strip()
    assert kernel.startswith("6.1."), f"guest kernel is {kernel}, expected Debian 12's 6.1"
    assert cases, "the guest produced no JUnit results"
    bad = [c for c in cases if c[1] in ("failure", "error")]
    assert not bad, f"guest failures: {bad}"
    # A skipped system test in the guest is legitimate only when its kernel lacks the feature.
    other_skips = [
        c for c in cases if c[0].startswith("tests/system/") and c[1] == "skipped" and LACKS not in c[2]
    ]
    assert not other_skips, f"guest skips not explained by the kernel: {other_skips}"
    system_ran = [c for c in cases if c[0].startswith("tests/system/") and c[1] == "passed"]
    assert system_ran, "no system test passed in the guest"
    assert json.loads(timings.read_text())["exit_status"] == 0
    # ksmtrace in the guest names what 6.1 lacks, and finds what it has.
    feats = json.loads((RESULTS / "guest-status.json").read_text())["features"]
    for name in ("prctl_memory_merge", "ksm_tracepoints", "smart_scan", "ksm_advisor"):
        assert feats[name]["available"] is False, name
    for name in ("ksm", "ksm_stat", "cow_ksm"):
        assert feats[name]["available"] is True, name
