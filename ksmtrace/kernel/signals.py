"""SIGINT, SIGTERM and SIGHUP end a command cleanly, never in the middle of a restore.

Each of the three raises :class:`Interrupted` (a KeyboardInterrupt, so every
``finally`` and ``except KeyboardInterrupt`` sees it) in the main thread.
Code that must not be cut in two (restoring KSM settings, detaching probes,
a ring-buffer poll whose callbacks would swallow the exception) runs inside
:func:`critical`: the signals are blocked there and delivered the moment it
ends. The command then exits with 128 + the signal number, as shells expect.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


def install() -> dict[int, object]:
    """Route the ending signals to :class:`Interrupted` (main thread only);
    returns the handlers they had, for :func:`uninstall`."""
    old = {}
    for sig in ENDING:
        old[sig] = signal.signal(sig, _raise)
    return old


def uninstall(old: dict[int, object]) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Hold the ending signals off for the duration; a pending one arrives at the end."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers run in the main thread only; nothing to hold off here
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ENDING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + signal for an Interrupted; 130 for a plain KeyboardInterrupt (Ctrl-C)."""
    return exc.exit_code if isinstance(exc, Interrupted) else 128 + signal.SIGINT
