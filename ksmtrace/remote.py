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
import time
from dataclasses import dataclass

from ksmtrace import native
from ksmtrace.errors import AccessDenied, KsmtraceError, ProcessGone, UsageError
from ksmtrace.kernel.abi import ADVICE_NAMES, MADV_MERGEABLE, MADV_UNMERGEABLE
from ksmtrace.kernel.procfs import ProcFS, Vma
from ksmtrace.kernel.tasks import (
    comm_or_unknown,
    exe_elf_kind,
    is_kernel_thread,
    live_threads,
    seccomp_mode,
    tracer_of,
)

__all__ = ["MADV_MERGEABLE", "MADV_UNMERGEABLE", "live_threads", "tracer_of", "madvise", "check_target"]
ADVICE = ADVICE_NAMES


class AttachRefused(KsmtraceError):
    exit_code = 77


class TargetTraced(AttachRefused):
    """Another tracer (a debugger, strace) holds the target: a thread has one tracer."""


class TargetNot64Bit(KsmtraceError):
    exit_code = 2


class TargetExecuted(KsmtraceError):
    """The process runs another program than the one whose ranges were checked."""


# A thread chosen for the injection may exit before it stops; the madvise acts on
# the whole process, so another thread serves as well. Bounded: a process whose
# threads all live shorter than an attach is refused in words, not chased forever.
THREAD_ATTEMPTS = 16
# How long a process with no live thread is watched before it counts as gone
# (an exec in progress; software emulation stretches it to many milliseconds).
EXEC_SETTLE_S = 0.5

# image_id() of each pid as check_target() saw it: an exec (or a reused pid) between
# the checks and the injection is then refused instead of advising a stranger's memory.
_checked_image: dict[int, int] = {}


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
    attempts: int = 1  # threads tried: more than one when a chosen thread exited first

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
            "attempts": self.attempts,
        }


def require_x86_64() -> None:
    if platform.machine() != "x86_64":
        raise KsmtraceError(
            f"remote opt-in works on x86_64 only (this machine is {platform.machine()}); "
            "use 'ksmtrace run -- CMD' to start a program opted in instead"
        )


def pick_thread(pid: int, proc: ProcFS | None = None) -> int:
    """The main thread, unless it already exited (a zombie leader): then the newest live
    thread (the highest tid: of threads that come and go, the likeliest to last)."""
    live = live_threads(pid, proc)
    deadline = time.monotonic() + EXEC_SETTLE_S
    while not live and time.monotonic() < deadline:
        # An exec from a non-leader thread briefly leaves only the zombie leader
        # listed (de_thread: the other threads die, then the execing one takes the
        # leader's pid); an exited process looks the same, but stays so.
        time.sleep(0.005)
        live = live_threads(pid, proc)
    if not live:
        raise ProcessGone(pid, "no live thread")
    return live[0] if live[0] == pid else max(live)


def refuse_unsupported(pid: int, tid: int | None = None) -> None:
    """Refuse, in words, targets the injection cannot serve: another ABI, another tracer,
    strict seccomp (where the injected madvise would kill it)."""
    kind = exe_elf_kind(pid)
    if kind is not None and kind != "x86_64":
        raise TargetNot64Bit(_not_64bit(pid, kind))
    seccomp = seccomp_mode(pid, tid)
    if seccomp == "1":
        raise AttachRefused(
            f"pid {pid} ({comm_or_unknown(pid)}) runs in seccomp strict mode: any syscall but read, write, "
            "exit and sigreturn kills it, so an injected madvise would; leaving it alone"
        )
    for who in dict.fromkeys([pid, tid or pid]):
        tracer = tracer_of(pid, who)
        if tracer:
            raise TargetTraced(_traced(pid, who, tracer))


def _not_64bit(pid: int, kind: str) -> str:
    what = {"i386": "a 32-bit (i386)", "x32": "an x32 (32-bit pointers)"}.get(kind, f"a {kind}")
    return (
        f"pid {pid} ({comm_or_unknown(pid)}) runs {what} program, not x86_64: ksmtrace injects madvise with "
        "the x86_64 syscall ABI, and a compat task's registers and syscall numbers differ; "
        "start it with 'ksmtrace run -- CMD' to opt it in instead"
    )


def _traced(pid: int, tid: int, tracer: int) -> str:
    who = f"pid {pid}" if tid == pid else f"pid {pid} (thread {tid})"
    return (
        f"{who} is being traced by pid {tracer} ({comm_or_unknown(tracer)}): a thread can have only "
        "one tracer, so ksmtrace cannot attach; detach the debugger (or stop strace) and run again"
    )


def check_target(pid: int, proc: ProcFS | None = None) -> list[Vma]:
    """Refuse what must be refused; return the target's mappings."""
    proc = proc or ProcFS()
    if pid in (os.getpid(), os.getppid()) or pid <= 0:
        raise UsageError(f"pid {pid} is ksmtrace itself (or its parent): refusing to inject into it")
    if not proc.exists(pid):
        raise UsageError(f"pid {pid} does not exist")
    status = proc.status(pid)
    # A zombie (or a process whose main thread exited) has no VmSize in its status, as a
    # kernel thread has not: ask the kernel's own flag, then whether any thread lives.
    if is_kernel_thread(pid):
        raise UsageError(f"pid {pid} ({status.comm}) is a kernel thread: it has no user memory to merge")
    live = live_threads(pid)
    if not live:
        raise ProcessGone(pid)  # a zombie's (empty) maps would read as "not mapped"
    refuse_unsupported(pid)
    # Read before the mappings, so any exec after it shows as a different image.
    image = native.image_id(live[0])
    try:
        vmas = proc.smaps(pid)
        if image:
            _checked_image[pid] = image
        return vmas
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
        if not live_threads(pid):
            raise ProcessGone(pid)  # its maps were read empty because it was exiting
        raise UsageError(f"range {start:#x}-{end:#x} is not mapped in pid {pid} (hole at {at:#x})")
    if merging:
        for v in covering:
            why = v.why_not_mergeable()
            if why:
                raise UsageError(
                    f"pid {pid}: {v.start:#x}-{v.end:#x} {v.name} cannot be merged by KSM: {why}"
                )
    return covering


def madvise(
    pid: int, start: int, end: int, advice: int, timeout_ms: int = 2000, image: int | None = None
) -> Injection:
    """Run madvise(start, end - start, advice) inside ``pid``; raise KsmtraceError on any failure.

    ``image``: the process's :func:`ksmtrace.native.image_id` when its ranges were
    checked (default: as :func:`check_target` saw it, else as it is now). A process
    that has executed another program since is refused (:class:`TargetExecuted`).
    If the chosen thread exits first, another thread is chosen.
    """
    require_x86_64()
    if image is None:
        image = _checked_image.get(pid) or 0
    attempts = 0
    while attempts < THREAD_ATTEMPTS:
        attempts += 1
        tid = pick_thread(pid)
        refuse_unsupported(pid, tid)
        if not image:
            image = native.image_id(tid)
        try:
            res = native.inject_madvise(tid, start, end - start, advice, timeout_ms, image)
        except OSError as exc:
            err = _failure(exc, pid, tid, image, timeout_ms)
            if err is None:
                _await_thread_end(pid, tid)
                continue  # that thread exited, the process lives on: another one
            raise err from None
        break
    else:
        raise KsmtraceError(
            f"pid {pid}: {THREAD_ATTEMPTS} threads in a row exited before they could be stopped; "
            "the injection did not complete (the process is running and untraced): run again"
        )
    ret = res["ret"]
    if res["seccomp_trapped"]:
        raise KsmtraceError(
            f"pid {pid}: its seccomp filter traps madvise (SIGSYS), so it cannot be opted in from "
            "outside; the trap was kept from it and it runs on untouched"
        )
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
        attempts=attempts,
    )


def _await_thread_end(pid: int, tid: int, timeout: float = 1.0) -> None:
    """Let a thread that the injection saw leaving finish leaving (an exiting thread is
    listed as running until its memory is torn down), so that the next attempt picks
    another thread, or finds the process gone, instead of the same dying one."""
    end = time.monotonic() + timeout
    while tid in live_threads(pid) and time.monotonic() < end:
        time.sleep(0.0002)


# What a process that died during the attempt may have made the attempt fail with.
_GONE_ERRNOS = frozenset(
    (errno.ESRCH, errno.EPERM, errno.ETIMEDOUT, errno.ENOENT, errno.ESTALE, errno.EFAULT, errno.ENOEXEC)
)


def _failure(exc: OSError, pid: int, tid: int, image: int, timeout_ms: int) -> KsmtraceError | None:
    """The sentence for a failed injection, read from what /proc says now; None: retry
    with another thread (only that thread went away)."""
    e = exc.errno
    live = live_threads(pid)
    if not live and e in _GONE_ERRNOS:
        # It died at some point of the attempt; whatever the attempt saw, that is the news.
        return ProcessGone(pid)
    now = native.image_id(live[0]) if live else 0
    # ESRCH: another thread's exec killed ours; EPERM: the attach met the exec half done.
    changed = bool(image and now and now != image)
    if e == errno.ESTALE or (e in (errno.ESRCH, errno.EPERM) and changed):
        return TargetExecuted(
            f"pid {pid} executed a new program ({comm_or_unknown(pid)}) since its ranges were checked "
            "(or the pid now belongs to another process): its memory is not the memory that was "
            "checked, so nothing was done; check the ranges again and rerun"
        )
    if e == errno.ESRCH:
        return None
    if e == errno.EPERM:
        for who in dict.fromkeys([tid, pid]):
            tracer = tracer_of(pid, who)
            if tracer:
                return TargetTraced(_traced(pid, who, tracer))
        if tid not in live or not now:
            return None  # the thread was exiting, or the exec half done: attach refuses both
        return AttachRefused(
            f"cannot attach to pid {pid} ({comm_or_unknown(pid)}): not permitted (ksmtrace needs root or "
            "CAP_SYS_PTRACE, and a security module may refuse)"
        )
    if e == errno.ETIMEDOUT:
        return KsmtraceError(
            f"pid {pid} did not stop within {timeout_ms} ms (uninterruptible sleep?); "
            "it was left untouched and is not traced"
        )
    if e == errno.ENOEXEC:
        return TargetNot64Bit(_not_64bit(pid, exe_elf_kind(pid) or "32-bit"))
    if e == errno.ENOENT:
        return KsmtraceError(f"pid {pid} has no syscall instruction to borrow (no vDSO?)")
    if e == errno.EFAULT:
        return KsmtraceError(
            f"pid {pid}: the borrowed syscall instruction faulted (its mappings changed during the "
            "injection); its registers were put back and it runs on untraced: run again"
        )
    if e == errno.EDEADLK:
        return UsageError(f"pid {pid} is ksmtrace itself: refusing to inject into it")
    if e == errno.ENOSYS:
        require_x86_64()
    return KsmtraceError(f"injecting into pid {pid} failed: {exc.strerror}")
