"""The CI strictness rule itself: only a kernel-lacks-it skip may pass in CI.

Runs a small inner pytest session with this project's conftest and
--strict-system, with one feature made to look missing, and checks each
outcome. System test: the inner tests are system tests, which need root.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ksmtrace.kernel import features

pytestmark = pytest.mark.system
pytest_plugins = ["pytester"]

INNER = """
import pytest
from ksmtrace.kernel import features

pytestmark = pytest.mark.system
# At import, before any setup hook probes it (the outer test restores it).
features.FEATURES["smart_scan"] = features.Feature("smart_scan", "smart scanning", "6.7", lambda: False)
features.available.cache_clear()


@pytest.mark.requires_kernel_feature("smart_scan")
def test_marker_lacks():
    raise AssertionError("must not run")


def test_helper_lacks(kernel_feature):
    kernel_feature("ksm", "smart_scan")
    raise AssertionError("must not run")


@pytest.mark.requires_kernel_feature("ksm")
def test_marker_has():
    pass


def test_plain_skip():
    pytest.skip("no reason the kernel gives")


def test_unknown_feature(kernel_feature):
    kernel_feature("no_such_feature")
"""


def test_only_kernel_lacks_skips_pass_strict_mode(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((Path(__file__).parents[1] / "conftest.py").read_text())
    pytester.makepyfile(test_inner=INNER)
    real = features.FEATURES["smart_scan"]
    try:
        result = pytester.runpytest_inprocess("--strict-system", "-p", "no:cacheprovider", "-ra")
    finally:
        features.FEATURES["smart_scan"] = real
        features.available.cache_clear()
    result.assert_outcomes(passed=1, skipped=2, failed=2)
    out = result.stdout.str()
    assert "lacks smart scanning (smart_scan, Linux 6.7+)" in out
    assert "system test skipped under --strict-system (CI): " in out  # the plain skip
    assert "unknown kernel feature 'no_such_feature'" in out
    assert "2 tests skipped because this kernel lacks what they test" in out


COUNTED = """
import pytest

pytestmark = pytest.mark.system


def test_a():
    pass


def test_b():
    pass


@pytest.mark.requires_kernel_feature("smart_scan")
def test_lacking():
    raise AssertionError("must not run")


@pytest.mark.vm
def test_in_vm():
    pass
"""


@pytest.mark.parametrize(
    ("args", "rc", "missing"),
    [
        # CI: a system test deselected by -k, by --deselect, or every one by -m, fails the session.
        (["--strict-system", "--no-vm", "-k", "not test_b"], 1, ["test_b"]),
        (["--strict-system", "--no-vm", "--deselect", "test_counted.py::test_a"], 1, ["test_a"]),
        (["--strict-system", "--vm", "-m", "not system"], 1, ["test_a", "test_b", "test_lacking"]),
        # The VM's own run inside the guest: -m 'not vm' leaves out only the vm test.
        (["--strict-system", "--vm", "-m", "not vm"], 0, []),
        (["--strict-system", "--no-vm"], 0, []),
        # By hand (not CI): a deselected test is named, the run stays green.
        (["--no-strict-system", "--no-vm", "-k", "not test_b"], 0, ["test_b"]),
    ],
    ids=["k", "deselect", "m-all", "m-not-vm", "no-vm", "by-hand"],
)
def test_ci_fails_when_a_system_test_did_not_run(
    pytester: pytest.Pytester, args: list[str], rc: int, missing: list[str]
) -> None:
    pytester.makeconftest((Path(__file__).parents[1] / "conftest.py").read_text())
    pytester.makepyfile(test_counted=COUNTED)
    real = features.FEATURES["smart_scan"]
    features.FEATURES["smart_scan"] = features.Feature("smart_scan", "smart scanning", "6.7", lambda: False)
    features.available.cache_clear()
    try:
        result = pytester.runpytest_inprocess(*args, "-p", "no:cacheprovider")
    finally:
        features.FEATURES["smart_scan"] = real
        features.available.cache_clear()
    out = result.stdout.str()
    assert result.ret == rc, out
    not_run = sorted(line.split("::")[-1] for line in out.splitlines() if line.startswith("  not run: "))
    assert not_run == missing, out
    if missing:
        assert f"ksmtrace: {len(missing)} collected system tests did not run" in out
    else:
        assert "did not run" not in out
