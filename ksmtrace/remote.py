"""Opt a running process in or out of KSM from outside: remote madvise.

The kernel refuses MADV_MERGEABLE through process_madvise for another
process, so the native worker makes the target call madvise itself (ptrace
syscall injection, see native/inject.c). This module checks everything that
can be checked first, so that failures read as sentences: the pid, the
range, the mapping and why KSM cannot merge it.
"""

from __future__ import annotations

import errno
import os
import platform
from dataclasses import dataclass

from ksmtrace import native
from ksmtrace.errors import AccessDenied, KsmtraceError, ProcessGone, UsageError
from ksmtrace.kernel.abi import ADVICE_NAMES, MADV_MERGEABLE, MADV_UNMERGEABLE
from ksmtrace.kernel.procfs import ProcFS, Vma

__all__ = ["MADV_MERGEABLE", "MADV_UNMERGEABLE", "madvise", "check_target", "check_range"]

ADVICE = ADVICE_NAMES


class AttachRefused(KsmtraceError):
    exit_code = 77


@dataclass(frozen=True)
class Injection:
    pid: int
    tid: int
    start: int
    end: int
    advice: int
    ret: int  # madvise's return: 0 or -errno
    in_syscall: bool  # the thread was stopped inside a syscall (restarted afterwards)
    restarts: int
    signals_kept: int
    micros: float

    def as_dict(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "tid": self.tid,
            "start": self.start,
            "end": self.end,
            "advice": ADVICE.get(self.advice, str(self.advice)),
            "ret": self.ret,
            "in_syscall": self.in_syscall,
            "restarts": self.restarts,
            "signals_kept": self.signals_kept,
            "micros": round(self.micros, 1),
        }


def require_x86_64() -> None:
    if platform.machine() != "x86_64":
        raise KsmtraceError(
            f"remote opt-in works on x86_64 only (this machine is {platform.machine()}); "
            "use 'ksmtrace run -- CMD' to start a program opted in instead"
        )


def pick_thread(pid: int, proc: ProcFS | None = None) -> int:
    """The main thread, unless it already exited (a zombie leader): then any live thread."""
    proc = proc or ProcFS()
    tids = proc.tids(pid)
    for tid in [pid] + [t for t in tids if t != pid]:
        try:
            state = proc.thread_stat(pid, tid).state
        except (ProcessGone, AccessDenied):
            continue
        if state not in ("Z", "X"):
            return tid
    raise ProcessGone(pid, "no live thread")


def check_target(pid: int, proc: ProcFS | None = None) -> list[Vma]:
    """Refuse what must be refused; return the target's mappings."""
    proc = proc or ProcFS()
    if pid in (os.getpid(), os.getppid()) or pid <= 0:
        raise UsageError(f"pid {pid} is ksmtrace itself (or its parent): refusing to inject into it")
    if not proc.exists(pid):
        raise UsageError(f"pid {pid} does not exist")
    status = proc.status(pid)
    if status.is_kernel_thread:
        raise UsageError(f"pid {pid} ({status.comm}) is a kernel thread: it has no user memory to merge")
    try:
        return proc.smaps(pid)
    except AccessDenied:
        if os.geteuid() != 0:
            raise
        raise AttachRefused(
            f"pid {pid} ({status.comm}) refuses even root access to its mappings "
            "(/proc/PID/smaps: not dumpable, or in another user namespace): leaving it alone"
        ) from None


def check_range(pid: int, vmas: list[Vma], start: int, end: int, merging: bool) -> list[Vma]:
    """The mappings covering [start, end); every byte must be mapped (madvise says ENOMEM otherwise)."""
    covering = [v for v in vmas if v.start < end and v.end > start]
    at = start
    for v in covering:
        if v.start > at:
            break
        at = max(at, v.end)
    if at < end:
        raise UsageError(f"range {start:#x}-{end:#x} is not mapped in pid {pid} (hole at {at:#x})")
    if merging:
        for v in covering:
            why = v.why_not_mergeable()
            if why:
                raise UsageError(
                    f"pid {pid}: {v.start:#x}-{v.end:#x} {v.name} cannot be merged by KSM: {why}"
                )
    return covering


def madvise(pid: int, start: int, end: int, advice: int, timeout_ms: int = 2000) -> Injection:
    """Run madvise(start, end - start, advice) inside ``pid``; raise KsmtraceError on any failure."""
    require_x86_64()
    tid = pick_thread(pid)
    try:
        res = native.inject_madvise(tid, start, end - start, advice, timeout_ms)
    except OSError as exc:
        e = exc.errno
        if e == errno.ESRCH:
            raise ProcessGone(pid) from None
        if e == errno.EPERM:
            raise AttachRefused(
                f"cannot attach to pid {pid}: already traced (a debugger, strace?) or not "
                "permitted (needs root / CAP_SYS_PTRACE)"
            ) from None
        if e == errno.ETIMEDOUT:
            raise KsmtraceError(
                f"pid {pid} did not stop within {timeout_ms} ms (uninterruptible sleep?); "
                "it was left untouched and is not traced"
            ) from None
        if e == errno.ENOEXEC:
            raise KsmtraceError(
                f"pid {pid} is a 32-bit process: remote opt-in supports 64-bit only"
            ) from None
        if e == errno.ENOENT:
            raise KsmtraceError(f"pid {pid} has no syscall instruction to borrow (no vDSO?)") from None
        if e == errno.EDEADLK:
            raise UsageError(f"pid {pid} is ksmtrace itself: refusing to inject into it") from None
        if e == errno.ENOSYS:
            require_x86_64()
        raise KsmtraceError(f"injecting into pid {pid} failed: {exc.strerror}") from None
    ret = res["ret"]
    if ret < 0:
        why = {
            errno.ENOMEM: "part of the range is not mapped",
            errno.EINVAL: "the kernel refused this advice for the range (mapping KSM cannot merge?)",
            errno.EAGAIN: "the kernel ran out of resources for KSM",
            errno.EPERM: "the process may not use KSM (PR_SET_MEMORY_MERGE policy / seccomp?)",
        }.get(-ret, os.strerror(-ret))
        raise KsmtraceError(
            f"madvise({start:#x}, {end - start}, {ADVICE.get(advice, advice)}) in pid {pid} failed: {why}"
        )
    return Injection(
        pid=pid,
        tid=tid,
        start=start,
        end=end,
        advice=advice,
        ret=ret,
        in_syscall=bool(res["stop_kind"]),
        restarts=res["restarts"],
        signals_kept=res["signals_kept"],
        micros=res["elapsed_ns"] / 1000,
    )
