"""Test tiers and the rules that keep system tests honest.

* ``@pytest.mark.system`` tests need root and the real kernel. Off root they
  skip; in CI (``CI=true``) or with ``--strict-system`` a skipped system test
  is turned into a failure, mechanically, so a green CI means they ran.
* ``ksm`` fixture: takes a machine-wide lock (system tests of several
  checkouts never overlap on the global /sys/kernel/mm/ksm), snapshots every
  knob, unmerges everything, and restores the snapshot afterwards.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ksmtrace.kernel import ksm_sysfs, pagemap
from ksmtrace.workload import Workload

LOCK = (
    Path("/run/lock/ksmtrace-tests.lock") if Path("/run/lock").is_dir() else Path("/tmp/ksmtrace-tests.lock")
)
FIXTURES = Path(__file__).parent / "fixtures"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--strict-system",
        action="store_true",
        default=os.environ.get("CI", "").lower() in ("1", "true", "yes"),
        help="fail (not skip) system tests that cannot run; default on when CI=true",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("system") and os.geteuid() != 0:
        pytest.skip("system test: needs root")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("system") and item.config.getoption("--strict-system"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"system test skipped under --strict-system (CI): {reason}"
    if item.get_closest_marker("system") and report.when == "call":
        item.config._ksmtrace_system_ran = getattr(item.config, "_ksmtrace_system_ran", 0) + 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    ran = getattr(config, "_ksmtrace_system_ran", 0)
    terminalreporter.write_line(f"ksmtrace: {ran} system tests ran against the real kernel")


class KsmControl:
    """Brisk ksmd settings for tests, and waits on the kernel's own state."""

    def __init__(self) -> None:
        self.saved = ksm_sysfs.SavedSettings()

    def set(self, **knobs: int | str) -> None:
        for k, v in knobs.items():
            ksm_sysfs.write(k, v)

    def start(self, pages_to_scan: int = 5000, sleep_millisecs: int = 10) -> None:
        self.set(pages_to_scan=pages_to_scan, sleep_millisecs=sleep_millisecs, run=1)

    def unmerge_all(self) -> None:
        ksm_sysfs.write("run", 2)
        ksm_sysfs.write("run", 0)

    def wait_merged(self, pid: int, addr: int, length: int, want: int, timeout: float = 20.0) -> int:
        """Wait until ``want`` pages of the range are KSM pages (live, kpageflags)."""
        deadline = time.monotonic() + timeout
        got = 0
        while time.monotonic() < deadline:
            got = pagemap.range_pages(pid, addr, addr + length).ksm
            if got >= want:
                return got
            time.sleep(0.1)
        raise AssertionError(f"ksmd merged {got} of {want} pages of pid {pid} within {timeout}s")

    def wait_full_scans(self, n: int = 2, timeout: float = 20.0) -> None:
        """Wait for n more full scans (ksm_stat is refreshed only by rescans)."""
        start = int(ksm_sysfs.read().get("full_scans") or 0)
        deadline = time.monotonic() + timeout
        while int(ksm_sysfs.read().get("full_scans") or 0) < start + n:
            if time.monotonic() > deadline:
                raise AssertionError(f"ksmd did not finish {n} full scans in {timeout}s")
            time.sleep(0.05)


@pytest.fixture
def ksm() -> Iterator[KsmControl]:
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ctl = KsmControl()
        try:
            ctl.unmerge_all()
            yield ctl
        finally:
            ctl.unmerge_all()
            ctl.saved.restore()


@pytest.fixture
def workload() -> Iterator[Callable[..., Workload]]:
    """Factory: ``workload(prctl_before_exec=..., comm=...)``; all closed at teardown."""
    started: list[Workload] = []

    def make(**kw: object) -> Workload:
        wl = Workload(**kw)  # type: ignore[arg-type]
        started.append(wl)
        return wl

    yield make
    for wl in started:
        wl.close()
