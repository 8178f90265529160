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
