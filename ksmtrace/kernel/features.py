"""Which KSM features the running kernel has: probed, never guessed from the version.

Many hosts run kernels older than the one ksmtrace is developed on (Debian 12:
6.1, which has KSM but none of the 6.4+ additions). Each feature is probed the
way the kernel exposes it (a prctl answering, a tracefs directory, a sysfs
file); ``since`` is the mainline release that added it, for messages only.
``ksmtrace status`` reports the unavailable ones, and the test suite skips a
test only when the probe says the kernel lacks what it needs (tests/conftest.py).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ksmtrace.errors import KsmtraceError
from ksmtrace.kernel import checks
from ksmtrace.kernel.abi import MADV_MERGEABLE, PR_GET_MEMORY_MERGE, SYS_PIDFD_OPEN, SYS_PROCESS_MADVISE, libc
from ksmtrace.kernel.ksm_sysfs import KSM_SYSFS


@dataclass(frozen=True)
class Feature:
    name: str
    what: str
    since: str
    probe: Callable[[], bool]


def _prctl_memory_merge() -> bool:
    # PR_GET_MEMORY_MERGE came with PR_SET_MEMORY_MERGE (6.4); older kernels say EINVAL.
    ret = libc().prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0)
    return ret >= 0 or ctypes.get_errno() != errno.EINVAL


def _process_madvise_self() -> bool:
    # process_madvise() took only COLD/PAGEOUT/WILLNEED (and COLLAPSE) until
    # 6.13 let a process give itself any advice; before, MADV_MERGEABLE is
    # EINVAL even on one's own pidfd. An empty vector changes nothing.
    pidfd = libc().syscall(SYS_PIDFD_OPEN, os.getpid(), 0)
    if pidfd < 0:
        return False
    try:
        vec = (ctypes.c_uint64 * 2)()
        ret = libc().syscall(SYS_PROCESS_MADVISE, pidfd, vec, 0, MADV_MERGEABLE, 0)
        return ret >= 0
    finally:
        os.close(pidfd)


def _ksm_tracepoints() -> bool:
    try:
        root = checks.ensure_tracefs()
    except KsmtraceError:
        # No tracefs to look at (not root): the kernel's BTF names every
        # tracepoint's type as btf_trace_<event>.
        try:
            return b"btf_trace_ksm_enter" in checks.BTF_VMLINUX.read_bytes()
        except OSError:
            return False
    return (root / "events" / "ksm" / "ksm_enter").is_dir()


def _sysfs(name: str) -> Callable[[], bool]:
    return (KSM_SYSFS / name).exists


def _ksm_stat_field(name: str) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            text = Path(f"/proc/{os.getpid()}/ksm_stat").read_text()
        except OSError:
            return False
        return any(line.split(":")[0].split()[0] == name for line in text.splitlines() if line.strip())

    return probe


def _smaps_ksm() -> bool:
    with open(f"/proc/{os.getpid()}/smaps") as f:
        return any(line.startswith("KSM:") for line in f)


def _vmstat(name: str) -> Callable[[], bool]:
    def probe() -> bool:
        with open("/proc/vmstat") as f:
            return any(line.split()[0] == name for line in f if line.strip())

    return probe


FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature("ksm", "KSM (CONFIG_KSM)", "2.6.32", _sysfs("run")),
        Feature("ksm_stat", "/proc/PID/ksm_stat", "6.1", lambda: Path("/proc/self/ksm_stat").exists()),
        Feature(
            "prctl_memory_merge",
            "whole-process opt-in prctl(PR_SET_MEMORY_MERGE)",
            "6.4",
            _prctl_memory_merge,
        ),
        Feature("ksm_tracepoints", "the ksm:* tracepoints", "6.4", _ksm_tracepoints),
        Feature(
            "process_madvise_self",
            "MADV_MERGEABLE through process_madvise() on one's own pidfd",
            "6.13",
            _process_madvise_self,
        ),
        Feature("general_profit", "/sys/kernel/mm/ksm/general_profit", "6.4", _sysfs("general_profit")),
        Feature("ksm_merge_any_stat", "ksm_merge_any in ksm_stat", "6.4", _ksm_stat_field("ksm_merge_any")),
        Feature("smaps_ksm", "the KSM: line of /proc/PID/smaps", "6.6", _smaps_ksm),
        Feature("smart_scan", "/sys/kernel/mm/ksm/smart_scan", "6.7", _sysfs("smart_scan")),
        Feature("ksm_advisor", "the KSM advisor (advisor_mode)", "6.8", _sysfs("advisor_mode")),
        Feature("ksm_zero_pages", "/sys/kernel/mm/ksm/ksm_zero_pages", "6.10", _sysfs("ksm_zero_pages")),
        Feature("cow_ksm", "cow_ksm in /proc/vmstat", "6.1", _vmstat("cow_ksm")),
    )
}


@functools.cache
def available(name: str) -> bool:
    """Whether the running kernel has feature ``name`` (a key of FEATURES)."""
    if name not in FEATURES:
        raise KeyError(f"unknown kernel feature {name!r}; known: {', '.join(sorted(FEATURES))}")
    try:
        return FEATURES[name].probe()
    except OSError:
        return False


def lacks(name: str) -> str:
    """A sentence for people: what this kernel lacks and which release added it."""
    f = FEATURES[name]
    return f"this kernel ({platform.release()}) lacks {f.what} ({f.name}, Linux {f.since}+)"


def report() -> dict[str, dict[str, object]]:
    return {
        name: {"available": available(name), "what": f.what, "since": f.since} for name, f in FEATURES.items()
    }
