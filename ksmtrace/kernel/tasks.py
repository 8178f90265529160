"""Threads and task state for remote injection: which threads live, who traces
them, which ABI the program is, its seccomp mode. Readers of /proc only; the
decisions are ksmtrace/remote.py's."""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def live_threads(pid: int, proc: Path = PROC) -> list[int]:
    """Threads of ``pid`` that are neither dead nor zombies, the main thread first; [] if none.

    A process whose threads come and go can have every listed thread gone by the time
    its state is read while a newer one, not listed, runs: then it is listed again.
    """
    for _ in range(20):
        try:
            tids = sorted(int(t) for t in os.listdir(proc / str(pid) / "task"))
        except OSError:
            return []  # gone (and reaped) already
        live = []
        for tid in [pid] + [t for t in tids if t != pid]:
            try:
                state = (
                    (proc / str(pid) / "task" / str(tid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
                )
            except (OSError, IndexError):
                continue
            if state not in ("Z", "X", "x"):
                live.append(tid)
        if live or tids == [pid]:
            return live  # someone lives, or only the (dead) main thread is left
    return []


PF_KTHREAD = 0x00200000


def is_kernel_thread(pid: int) -> bool:
    """The kernel's own flag (/proc/PID/stat field 9), true of kernel threads only."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return bool(int(fields[6]) & PF_KTHREAD)
    except (OSError, IndexError, ValueError):
        return False


def status_fields(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def comm_or_unknown(pid: int) -> str:
    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return "?"


def tracer_of(pid: int, tid: int | None = None) -> int:
    """The pid tracing thread ``tid`` of ``pid`` (its main thread by default), 0 if none."""
    fields = status_fields(PROC / str(pid) / "task" / str(tid or pid) / "status")
    try:
        return int(fields.get("TracerPid", "0").strip())
    except ValueError:
        return 0


def exe_elf_kind(pid: int) -> str | None:
    """'x86_64', 'i386', 'x32' or another ELF description of /proc/PID/exe; None if unreadable."""
    try:
        with open(PROC / str(pid) / "exe", "rb") as f:
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




def seccomp_mode(pid: int, tid: int | None = None) -> str:
    """/proc/PID/task/TID/status Seccomp: "0" none, "1" strict, "2" filter ("" unknown)."""
    return status_fields(PROC / str(pid) / "task" / str(tid or pid) / "status").get("Seccomp", "").strip()
