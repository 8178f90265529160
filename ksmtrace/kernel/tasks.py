"""Threads and task state for remote injection: which threads live, who traces
them, which ABI the program is, its seccomp mode. Read through ProcFS (the one
/proc/PID/stat and status parser); the decisions are ksmtrace/remote.py's."""

from __future__ import annotations

from ksmtrace.errors import AccessDenied, ProcessGone
from ksmtrace.kernel.procfs import ProcFS

PF_KTHREAD = 0x00200000


def live_threads(pid: int, proc: ProcFS | None = None) -> list[int]:
    """Threads of ``pid`` that are neither dead nor zombies, the main thread first; [] if none.

    A process whose threads come and go can have every listed thread gone by the time
    its state is read while a newer one, not listed, runs: then it is listed again.
    """
    proc = proc or ProcFS()
    for _ in range(20):
        try:
            tids = proc.tids(pid)
        except (ProcessGone, AccessDenied):
            return []  # gone (and reaped) already
        live = []
        for tid in [pid] + [t for t in tids if t != pid]:
            try:
                state = proc.thread_stat(pid, tid).state
            except (ProcessGone, AccessDenied):
                continue
            if state not in ("Z", "X", "x"):
                live.append(tid)
        if live or tids == [pid]:
            return live  # someone lives, or only the (dead) main thread is left
    return []


def is_kernel_thread(pid: int, proc: ProcFS | None = None) -> bool:
    """The kernel's own flag (PF_KTHREAD in /proc/PID/stat), true of kernel threads only."""
    try:
        return bool((proc or ProcFS()).stat(pid).flags & PF_KTHREAD)
    except (ProcessGone, AccessDenied):
        return False


def _task_status(pid: int, tid: int | None) -> dict[str, str]:
    try:
        return ProcFS().task_status(pid, tid or pid)
    except (ProcessGone, AccessDenied):
        return {}


def comm_or_unknown(pid: int) -> str:
    try:
        return ProcFS().comm(pid)
    except (ProcessGone, AccessDenied):
        return "?"


def tracer_of(pid: int, tid: int | None = None) -> int:
    """The pid tracing thread ``tid`` of ``pid`` (its main thread by default), 0 if none."""
    try:
        return int(_task_status(pid, tid).get("TracerPid", "0"))
    except ValueError:
        return 0


def seccomp_mode(pid: int, tid: int | None = None) -> str:
    """/proc/PID/task/TID/status Seccomp: "0" none, "1" strict, "2" filter ("" unknown)."""
    return _task_status(pid, tid).get("Seccomp", "")


def exe_elf_kind(pid: int, proc: ProcFS | None = None) -> str | None:
    """'x86_64', 'i386', 'x32' or another ELF description of /proc/PID/exe; None if unreadable."""
    try:
        with open((proc or ProcFS()).root / str(pid) / "exe", "rb") as f:
            hdr = f.read(20)
    except OSError:
        return None  # exited, a kernel thread, or refused: the attach will tell
    if len(hdr) < 20 or hdr[:4] != b"\x7fELF":
        return None
    machine = int.from_bytes(hdr[18:20], "little")
    klass = {1: 32, 2: 64}.get(hdr[4], 0)
    if machine == 62:
        return "x86_64" if klass == 64 else "x32"
    if machine == 3:
        return "i386"
    return f"ELF{klass} machine {machine}"
