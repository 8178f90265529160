"""What a ksmtrace process changed on the machine, written down before it changes it.

A command that changes machine-wide KSM state (the demo's brisk ksmd knobs,
later the daemon's knobs and ranges) first writes a journal file under
``/run/ksmtrace/`` naming itself (pid and start time, so a reused pid is not
taken for the owner) and what it is about to change, and removes the file
once everything is restored. A SIGKILL leaves the file behind; the next
ksmtrace command finds it, sees the owner is gone, and undoes exactly what
the journal says (:func:`ksmtrace.coordinator.actuator.repair`).

Files are replaced atomically (write, fsync, rename), so a reader never sees
half a journal, even when the writer is killed mid-write.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ksmtrace.errors import AccessDenied, ProcessGone
from ksmtrace.kernel.procfs import ProcFS

# tmpfs: gone at reboot, as are the settings it records.
RUN_DIR = Path(os.environ.get("KSMTRACE_RUN_DIR", "/run/ksmtrace"))


@dataclass(frozen=True)
class Owner:
    pid: int
    starttime: int  # /proc/PID/stat field 22: with pid, names one process across pid reuse
    command: str

    def alive(self, proc: ProcFS) -> bool:
        try:
            return proc.stat(self.pid).starttime == self.starttime
        except (ProcessGone, AccessDenied):
            return False


@dataclass
class Entry:
    owner: Owner
    # knob -> value before ksmtrace changed it, and the value it set
    knobs_before: dict[str, int | str] = field(default_factory=dict)
    knobs_set: dict[str, int | str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _path(directory: Path, pid: int) -> Path:
    return directory / f"{pid}.json"


class Journal:
    """The calling process's own journal file."""

    def __init__(self, command: str, directory: Path = RUN_DIR, proc: ProcFS | None = None) -> None:
        proc = proc or ProcFS()
        pid = os.getpid()
        self.entry = Entry(Owner(pid, proc.stat(pid).starttime, command))
        self.directory = directory
        self.path = _path(directory, pid)

    def write(self) -> None:
        write_atomic(self.path, self.entry.as_dict())

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def write_atomic(path: Path, doc: Any) -> None:
    """``doc`` as JSON at ``path``: written aside, synced, then renamed over it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        # dumps, not dump: dump streams through the pure-Python encoder, many times slower.
        f.write(json.dumps(doc))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def entries(directory: Path = RUN_DIR) -> list[tuple[Path, Entry | None]]:
    """Every journal file, parsed (None for one that cannot be read)."""
    out: list[tuple[Path, Entry | None]] = []
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.json")):
        try:
            d = json.loads(path.read_text())
            entry = Entry(Owner(**d["owner"]), dict(d["knobs_before"]), dict(d["knobs_set"]))
        except (OSError, ValueError, KeyError, TypeError):
            entry = None
        out.append((path, entry))
    return out
