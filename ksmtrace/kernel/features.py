"""Which KSM features the running kernel has: probed, never guessed from the version.

Many hosts run kernels older than the one ksmtrace is developed on (Debian 12:
6.1, which has KSM but none of the 6.4+ additions). Each feature is probed the
way the kernel exposes it (a prctl answering, a tracefs directory, a sysfs
file); ``since`` (the mainline release) and ``commit`` (the commit that added
the interface) are for messages and for people checking a backport only.
``ksmtrace status`` reports the unavailable ones, and the test suite skips a
test only when the probe says the kernel lacks what it needs (tests/conftest.py).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
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
    """One kernel fact: what it is, the mainline release and commit that added it, and its probe.

    ``commit`` is the 12-hex abbreviated hash and subject of the mainline commit
    that introduced the interface, as in a Fixes: tag, or None where no source
    could confirm the hash (then only ``since`` is known). It is the one place
    the rest of ksmtrace points at instead of restating a version.
    """

    name: str
    what: str
    since: str
    probe: Callable[[], bool]
    # Last and defaulted so that a test can still build Feature(name, what, since, probe).
    commit: str | None = None


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


def _proc_self(name: str) -> Callable[[], bool]:
    return Path(f"/proc/{os.getpid()}/{name}").exists


def _soft_dirty() -> bool:
    # Asked of a child, not of ksmtrace itself: clear_refs write-protects every
    # PTE of the process it clears. The child maps a page, writes it, clears,
    # checks bit 55 is off, writes again, checks it is on. Without
    # CONFIG_MEM_SOFT_DIRTY the write of "4" is accepted and bit 55 stays 0.
    pid = os.fork()
    if pid == 0:
        ok = 1
        try:
            m = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
            m[0] = 1
            with open(f"/proc/{os.getpid()}/clear_refs", "wb", buffering=0) as f:
                f.write(b"4")
            with open(f"/proc/{os.getpid()}/pagemap", "rb", buffering=0) as f:
                before = int.from_bytes(os.pread(f.fileno(), 8, addr // mmap.PAGESIZE * 8), "little")
                m[0] = 2
                after = int.from_bytes(os.pread(f.fileno(), 8, addr // mmap.PAGESIZE * 8), "little")
            ok = 0 if not before & (1 << 55) and after & (1 << 55) else 1
        finally:
            os._exit(ok)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


# _IOWR('f', 16, struct pm_scan_arg): struct pm_scan_arg is 12 u64s (96 bytes).
PAGEMAP_SCAN = (3 << 30) | (96 << 16) | (ord("f") << 8) | 16


def _pagemap_scan() -> bool:
    # A pagemap without the ioctl says ENOTTY; one with it rejects the zeroed
    # argument (size 0) with EINVAL before looking at any memory.
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    arg = (ctypes.c_uint64 * 12)()
    fd = os.open(f"/proc/{os.getpid()}/pagemap", os.O_RDONLY)
    try:
        ret = libc.ioctl(fd, ctypes.c_ulong(PAGEMAP_SCAN), arg)
        return ret >= 0 or ctypes.get_errno() != errno.ENOTTY
    finally:
        os.close(fd)


# The one table of kernel facts: other modules point here ("see
# features.FEATURES[...]") rather than restate a version, so a correction is
# made once. since = first mainline release with the interface; commit = the
# commit that added it, as a Fixes: tag names it (the evidence for each is in
# the message of the commit that added the column to this file).
FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature(
            "ksm",
            "KSM (CONFIG_KSM)",
            "2.6.32",
            _sysfs("run"),
            commit='31dbd01f3143 ("ksm: Kernel SamePage Merging")',
        ),
        Feature(
            "ksm_swpin_copy",
            "ksm_swpin_copy in /proc/vmstat",
            "5.18",
            _vmstat("ksm_swpin_copy"),
            commit='4d45c3aff5eb ("mm/vmstat: add event for ksm swapping in copy")',
        ),
        Feature(
            "ksm_merging_pages",
            "/proc/PID/ksm_merging_pages",
            "5.19",
            _proc_self("ksm_merging_pages"),
            commit='7609385337a4 ("ksm: count ksm merging pages for each process")',
        ),
        Feature(
            "cow_ksm",
            "cow_ksm in /proc/vmstat",
            "5.19",
            _vmstat("cow_ksm"),
            commit='94bfe85bde18 ("mm/vmstat: add events for ksm cow")',
        ),
        Feature(
            "ksm_stat",
            "/proc/PID/ksm_stat",
            "6.1",
            _proc_self("ksm_stat"),
            commit='cb4df4cae4f2 ("ksm: count allocated ksm rmap_items for each process")',
        ),
        Feature(
            "prctl_memory_merge",
            "whole-process opt-in prctl(PR_SET_MEMORY_MERGE)",
            "6.4",
            _prctl_memory_merge,
            commit='d7597f59d1d3 ("mm: add new api to enable ksm per process")',
        ),
        Feature(
            "ksm_tracepoints",
            "the ksm:* tracepoints",
            "6.4",
            _ksm_tracepoints,
            commit='739100c88f49 ("mm: add tracepoints to ksm")',
        ),
        Feature(
            "general_profit",
            "/sys/kernel/mm/ksm/general_profit",
            "6.4",
            _sysfs("general_profit"),
            commit='d21077fbc2fc ("mm: add new KSM process and sysfs knobs")',
        ),
        # The same commit moved the merging-page count into ksm_stat: before
        # 6.4 it is only in /proc/PID/ksm_merging_pages.
        Feature(
            "ksm_stat_merging_pages",
            "ksm_merging_pages in ksm_stat",
            "6.4",
            _ksm_stat_field("ksm_merging_pages"),
            commit='d21077fbc2fc ("mm: add new KSM process and sysfs knobs")',
        ),
        Feature(
            "ksm_process_profit",
            "ksm_process_profit in ksm_stat",
            "6.4",
            _ksm_stat_field("ksm_process_profit"),
            commit='d21077fbc2fc ("mm: add new KSM process and sysfs knobs")',
        ),
        Feature(
            "smaps_ksm",
            "the KSM: line of /proc/PID/smaps",
            "6.6",
            _smaps_ksm,
            commit='8b47933544a6 ("proc/ksm: add ksm stats to /proc/pid/smaps")',
        ),
        Feature(
            "ksm_zero_pages",
            "/sys/kernel/mm/ksm/ksm_zero_pages",
            "6.6",
            _sysfs("ksm_zero_pages"),
            commit='e2942062e01d ("ksm: count all zero pages placed by KSM")',
        ),
        Feature(
            "ksm_zero_pages_stat",
            "ksm_zero_pages in ksm_stat",
            "6.6",
            _ksm_stat_field("ksm_zero_pages"),
            commit='6080d19f0704 ("ksm: add ksm zero pages for each process")',
        ),
        Feature(
            "pages_scanned",
            "/sys/kernel/mm/ksm/pages_scanned",
            "6.6",
            _sysfs("pages_scanned"),
            commit='b348b5fe2b5f ("mm/ksm: add pages scanned metric")',
        ),
        Feature(
            "smart_scan",
            "/sys/kernel/mm/ksm/smart_scan",
            "6.7",
            _sysfs("smart_scan"),
            commit='5e924ff54d08 ("mm/ksm: add "smart" page scanning mode")',
        ),
        Feature(
            "pages_skipped",
            "/sys/kernel/mm/ksm/pages_skipped",
            "6.7",
            _sysfs("pages_skipped"),
            commit='e5a689912689 ("mm/ksm: add pages_skipped metric")',
        ),
        Feature(
            "pagemap_scan",
            "the PAGEMAP_SCAN ioctl of /proc/PID/pagemap",
            "6.7",
            _pagemap_scan,
            commit=(
                '52526ca7fdb9 ("fs/proc/task_mmu: implement IOCTL to get and optionally clear'
                ' info about PTEs")'
            ),
        ),
        # Soft-dirty is older than most of this table, but a build option
        # (CONFIG_MEM_SOFT_DIRTY) many kernels leave out: the daemon's cheap
        # re-look (policy [runs] relook = "soft-dirty") needs it.
        Feature(
            "soft_dirty",
            "soft-dirty bits (CONFIG_MEM_SOFT_DIRTY: pagemap bit 55 set by a write after clear_refs 4)",
            "3.11",
            _soft_dirty,
            commit='0f8975ec4db2 ("mm: soft-dirty bits for user memory changes tracking")',
        ),
        # The advisor itself is 4e5fa4f5eff6 ("mm/ksm: add ksm advisor"); the
        # advisor_mode file probed here came with the next commit.
        Feature(
            "ksm_advisor",
            "the KSM advisor (advisor_mode)",
            "6.8",
            _sysfs("advisor_mode"),
            commit='66790e9a735b ("mm/ksm: add sysfs knobs for advisor")',
        ),
        Feature(
            "process_madvise_self",
            "MADV_MERGEABLE through process_madvise() on one's own pidfd",
            "6.13",
            _process_madvise_self,
            # "mm/madvise: unrestrict process_madvise() for current process":
            # only linux-next hashes were found, none confirmed as mainline's.
            commit=None,
        ),
        Feature(
            "ksm_merge_any_stat",
            "ksm_merge_any in ksm_stat",
            "6.14",
            _ksm_stat_field("ksm_merge_any"),
            commit='3ab76c767bc7 ("ksm: add ksm involvement information for each process")',
        ),
        Feature(
            "ksm_mergeable_stat",
            "ksm_mergeable in ksm_stat",
            "6.14",
            _ksm_stat_field("ksm_mergeable"),
            commit='3ab76c767bc7 ("ksm: add ksm involvement information for each process")',
        ),
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
        name: {"available": available(name), "what": f.what, "since": f.since, "commit": f.commit}
        for name, f in FEATURES.items()
    }
