"""The only code that changes machine-wide KSM settings, always journaled first.

:class:`KnobChange` is how a command (the demo today, the daemon next)
changes ksmd's knobs: the journal is written before each write, the
settings are restored and the journal removed on close, both with the
ending signals held off (ksmtrace.kernel.signals.critical) so that an
interruption cannot cut a restore in two. :func:`repair` undoes what a
killed ksmtrace process left changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ksmtrace.coordinator.journal import RUN_DIR, Entry, Journal, entries
from ksmtrace.errors import KsmUnavailable
from ksmtrace.kernel import ksm_sysfs
from ksmtrace.kernel.ksm_sysfs import KSM_SYSFS, SavedSettings
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.kernel.signals import critical


class KnobChange:
    """ksmd knobs changed for the life of one command, then put back as found."""

    def __init__(self, command: str, sysfs: Path = KSM_SYSFS, journal_dir: Path = RUN_DIR) -> None:
        self.sysfs = sysfs
        with critical():
            self.saved = SavedSettings(sysfs)
            self.journal = Journal(command, journal_dir)
        self.closed = False

    def set(self, knobs: Iterable[tuple[str, int | str]]) -> None:
        """Write knobs in the order given (``run`` usually last)."""
        knobs = list(knobs)
        with critical():
            e = self.journal.entry
            for name, value in knobs:
                e.knobs_before.setdefault(name, self.saved.values.get(name, value))
                e.knobs_set[name] = value
            self.journal.write()
            for name, value in knobs:
                ksm_sysfs.write(name, value, self.sysfs)

    def restore(self) -> None:
        with critical():
            if self.closed:
                return
            self.saved.restore()
            self.journal.remove()
            self.closed = True

    def __enter__(self) -> KnobChange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _undo(entry: Entry, sysfs: Path) -> list[str]:
    """Put back each knob the dead owner set, unless someone changed it since."""
    done = []
    for name in sorted(entry.knobs_set, key=lambda k: (k == "run", k)):
        before, set_to = entry.knobs_before.get(name), entry.knobs_set[name]
        if before is None:
            continue
        try:
            now = ksm_sysfs.read(sysfs).get(name)
        except KsmUnavailable:
            return done
        if now != set_to:
            done.append(f"{name} left at {now} (changed since)")
            continue
        if now != before:
            ksm_sysfs.write(name, 0 if name == "run" and before == 2 else before, sysfs)
            done.append(f"{name} {set_to} -> {before}")
    return done


def repair(journal_dir: Path = RUN_DIR, sysfs: Path = KSM_SYSFS, proc: ProcFS | None = None) -> list[str]:
    """Undo what ksmtrace processes that are gone left changed; one sentence each."""
    proc = proc or ProcFS()
    said = []
    for path, entry in entries(journal_dir):
        if entry is None:
            said.append(f"unreadable journal {path} removed")
            path.unlink(missing_ok=True)
            continue
        if entry.owner.alive(proc):
            continue
        with critical():
            done = _undo(entry, sysfs)
            path.unlink(missing_ok=True)
        what = ", ".join(done) if done else "nothing left to restore"
        said.append(
            f"ksmtrace {entry.owner.command} (pid {entry.owner.pid}) ended without restoring KSM "
            f"settings; restored: {what}"
        )
    return said
