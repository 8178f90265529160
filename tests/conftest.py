"""Test tiers and the rules that keep system tests honest.

* ``@pytest.mark.system`` tests need root and the real kernel. Off root they
  skip; in CI (``CI=true``) or with ``--strict-system`` a skipped system test
  is turned into a failure, mechanically, so a green CI means they ran.
* ``ksm`` fixture: takes a machine-wide lock (system tests of several
  checkouts never overlap on the global /sys/kernel/mm/ksm), snapshots every
  knob, unmerges everything, and restores the snapshot afterwards.
* Kernel features: a test that needs something older kernels lack (Debian
  12's 6.1 lacks PR_SET_MEMORY_MERGE, the ksm tracepoints, smart_scan, the
  advisor...) says so, and is skipped only where the kernel really lacks it,
  as probed by ksmtrace.kernel.features (never by comparing versions). Such a
  skip is legitimate even under --strict-system / CI=true::

      @pytest.mark.requires_kernel_feature("ksm_tracepoints")
      def test_x(): ...

      def test_y(kernel_feature):
          kernel_feature("prctl_memory_merge")   # skips here if missing

  Names are the keys of ksmtrace.kernel.features.FEATURES; an unknown name is
  an error, not a skip.
* ``@pytest.mark.vm`` (tests/system/test_vm.py) boots a Debian 12 VM and runs
  the suite inside it: it runs with --vm or CI=true, and is deselected otherwise.
* Deselection cannot hide system tests from CI: the system tests collected
  are counted before any deselection (-k, -m, --deselect, --lf), and under
  --strict-system / CI=true the session fails if any of them did not run.
  A skip because the kernel lacks a feature counts as run (it reached the
  kernel check); the vm test never counts as missing, because it runs only
  where asked for (--vm, and not deselected: the VM's own run inside the
  guest deselects it with -m 'not vm').
* ``wait_for(cond, timeout, what)`` (a fixture too): poll a condition with a
  deadline instead of sleeping and hoping.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ksmtrace.kernel import features, ksm_sysfs, pagemap
from ksmtrace.workload import Workload
from tests import vmrun
from tests.stray import STRAY

LOCK = (
    Path("/run/lock/ksmtrace-tests.lock") if Path("/run/lock").is_dir() else Path("/tmp/ksmtrace-tests.lock")
)
FIXTURES = Path(__file__).parent / "fixtures"
_EMULATED = pytest.StashKey[list]()
_LACKS = pytest.StashKey[list]()
# System tests the session collected (nodeid -> vm-marked), before any deselection.
_HELD = pytest.StashKey[dict]()
# System tests whose setup began: they ran (or failed, or were skipped for a reason
# that --strict-system judges itself).
_STARTED = pytest.StashKey[set]()
_MISSING = pytest.StashKey[list]()
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--strict-system",
        action=argparse.BooleanOptionalAction,
        default=IN_CI,
        help="fail (not skip) system tests that cannot run; default on when CI=true",
    )
    parser.addoption(
        "--vm",
        action=argparse.BooleanOptionalAction,
        default=IN_CI,
        help="run the tests marked vm (the suite inside a Debian 12 VM); default on when CI=true",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires_kernel_feature(*names): skip, even in CI, where the kernel lacks one of "
        "these features (ksmtrace.kernel.features)",
    )
    config.addinivalue_line("markers", "vm: boots a VM (slow); runs with --vm or CI=true")
    config.addinivalue_line(
        "markers",
        "host_only(why): left out inside the CI's 6.1 VM (KSMTRACE_IN_VM=1), run everywhere else: "
        "timing that software emulation breaks, or ksmtrace's own logic whose kernel paths other "
        "tests already cover there (the VM's part of CI must stay within its time)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: before pytest's own -k/-m/--deselect hooks take items away, so
    # what the suite holds is counted, not what survived the command line.
    in_vm = os.environ.get("KSMTRACE_IN_VM") == "1"
    emulated = [i for i in items if in_vm and i.get_closest_marker("host_only")]
    config.stash[_HELD] = {
        i.nodeid: i.get_closest_marker("vm") is not None or i in emulated
        for i in items
        if i.get_closest_marker("system")
    }
    if emulated:
        # Inside the CI's VM (6.1 under software emulation, ~50x slower): these
        # tests' timing does not hold there, or they repeat, at the cost of a
        # BPF compile each (~30 s under emulation), kernel paths that the
        # VM's other tests cover; they run on the host.
        config.hook.pytest_deselected(items=emulated)
        items[:] = [i for i in items if i not in emulated]
        config.stash[_EMULATED] = [i.nodeid for i in emulated]
    if config.getoption("--vm"):
        return
    vm = [i for i in items if i.get_closest_marker("vm")]
    if vm:
        config.hook.pytest_deselected(items=vm)
        items[:] = [i for i in items if not i.get_closest_marker("vm")]


class KernelLacks(pytest.skip.Exception):
    """A skip because the running kernel lacks a feature: not a failure under --strict-system."""


def require_kernel_feature(*names: str) -> None:
    for name in names:
        if not features.available(name):
            # _use_item_location: the -ra summary points at the test, as for skip marks.
            raise KernelLacks(features.lacks(name), _use_item_location=True)


@pytest.fixture
def kernel_feature() -> Callable[..., None]:
    """``kernel_feature("name", ...)`` inside a test: skip it here if the kernel lacks one."""
    return require_kernel_feature


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("system") and os.geteuid() != 0:
        pytest.skip("system test: needs root")
    for mark in item.iter_markers("requires_kernel_feature"):
        require_kernel_feature(*mark.args)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "setup":
        item.config.stash.setdefault(_STARTED, set()).add(item.nodeid)
    if report.skipped and call.excinfo is not None and call.excinfo.errisinstance(KernelLacks):
        lacking = item.config.stash.setdefault(_LACKS, [])
        lacking.append((item.nodeid, str(call.excinfo.value)))
    elif report.skipped and item.get_closest_marker("system") and item.config.getoption("--strict-system"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"system test skipped under --strict-system (CI): {reason}"
    if item.get_closest_marker("system") and report.when == "call":
        item.config._ksmtrace_system_ran = getattr(item.config, "_ksmtrace_system_ran", 0) + 1


def missing_system_tests(config: pytest.Config) -> list[str]:
    """System tests collected but never started; the vm test is asked for
    explicitly (--vm, not deselected), so its absence is never a gap."""
    held = config.stash.get(_HELD, {})
    started = config.stash.get(_STARTED, set())
    return [nodeid for nodeid, vm in held.items() if not vm and nodeid not in started]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    missing = missing_system_tests(config)
    config.stash[_MISSING] = missing
    if missing and config.getoption("--strict-system"):
        # A green run must mean every system test ran: -k/-m/--deselect (or -x
        # stopping early) that left some out turns success into failure.
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    for nodeid in config.stash.get(_EMULATED, []):
        terminalreporter.write_line(f"ksmtrace: host_only, left out inside the VM: {nodeid}")
    ran = getattr(config, "_ksmtrace_system_ran", 0)
    held = [n for n, vm in config.stash.get(_HELD, {}).items() if not vm]
    terminalreporter.write_line(
        f"ksmtrace: {ran} system tests ran against the real kernel ({len(held)} collected, vm test aside)"
    )
    missing = config.stash.get(_MISSING, [])
    if missing:
        strict = config.getoption("--strict-system")
        terminalreporter.write_line(
            f"ksmtrace: {len(missing)} collected system tests did not run"
            + (" (--strict-system / CI: this fails the session):" if strict else " (deselected?):"),
            red=strict,
            yellow=not strict,
        )
        for nodeid in missing[:50]:
            terminalreporter.write_line(f"  not run: {nodeid}")
        if len(missing) > 50:
            terminalreporter.write_line(f"  ... and {len(missing) - 50} more")
    lacking = config.stash.get(_LACKS, [])
    if lacking:
        terminalreporter.write_line(
            f"ksmtrace: {len(lacking)} tests skipped because this kernel lacks what they test:"
        )
        for nodeid, why in lacking:
            terminalreporter.write_line(f"  {nodeid}: {why}")


def wait_for(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    """Poll ``cond`` until it returns something true (returned) or ``timeout``
    seconds pass (AssertionError naming ``what`` and the last value seen)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {got!r})")
        time.sleep(interval)


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., object]:
    return wait_for


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

    def merge_then_stop(self, *regions: tuple[int, dict[str, int], int]) -> None:
        """Start ksmd, wait until each (pid, region, pages) has that many KSM
        pages, then stop it: no merging or unmerging in what the test measures next."""
        self.start()
        for pid, region, want in regions:
            self.wait_merged(pid, region["addr"], region["len"], want)
        self.set(run=0)

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
            # A knob that does not come back would leak into every later test.
            now = ksm_sysfs.read().knobs
            want = {k: (0 if k == "run" and v == 2 else v) for k, v in ctl.saved.values.items()}
            wrong = {k: (want[k], now.get(k)) for k in want if now.get(k) != want[k]}
            assert not wrong, f"KSM knobs not restored (wanted, found): {wrong}"


@pytest.fixture(autouse=True)
def _no_stray_processes() -> Iterator[None]:
    yield
    while STRAY:
        p = STRAY.pop()
        if p.poll() is None:
            p.kill()
            p.communicate()


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


_VM_OWNER = pytest.StashKey[bool]()


def pytest_collection_finish(session: pytest.Session) -> None:
    # The VM run overlaps the host's suite (tests/vmrun.py): started now if
    # tests/system/test_vm.py will run. Only that file counts, and only the
    # session that started the run stops it: tests/system/test_strict_mode.py
    # runs inner sessions in this process, with vm-marked tests of their own,
    # whose end once stopped the real VM run halfway.
    if vmrun.RUN is None and any(
        i.get_closest_marker("vm") and i.path.name == "test_vm.py" for i in session.items
    ):
        vmrun.start()
        session.config.stash[_VM_OWNER] = True


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(_VM_OWNER, False):
        vmrun.stop()
