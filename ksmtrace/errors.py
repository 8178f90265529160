"""Errors meant for people.

Every failure a user can cause or meet (no root, no KSM, a pid that exited, a
bad argument) is raised as a :class:`KsmtraceError` subclass carrying a
sentence that says what happened and what to do. The CLI prints that sentence
and exits with the class's exit code; only genuine bugs produce a traceback.

OS errors from /proc and /sys are mapped to these classes in one place,
:func:`proc_errors`, so readers do not each reinvent the errno table.
"""

from __future__ import annotations

import contextlib
import errno
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class KsmtraceError(Exception):
    """Base class: ``str(err)`` is the message shown to the user."""

    exit_code = 1


class UsageError(KsmtraceError):
    exit_code = 2


class NeedsPrivilege(KsmtraceError):
    exit_code = 77


class KsmUnavailable(KsmtraceError):
    exit_code = 69


class TracingUnavailable(KsmtraceError):
    """tracefs, BTF or BCC (or its kernel headers) is missing."""

    exit_code = 69


class ProcessGone(KsmtraceError):
    def __init__(self, pid: int, what: str = "") -> None:
        self.pid = pid
        super().__init__(f"pid {pid} has exited" + (f" ({what})" if what else ""))


class AccessDenied(KsmtraceError):
    exit_code = 77

    def __init__(self, pid: int | None, path: str = "") -> None:
        self.pid = pid
        who = f"pid {pid}" if pid is not None else path
        super().__init__(f"permission denied reading {who}: run ksmtrace as root")


@contextlib.contextmanager
def proc_errors(pid: int | None, path: str = "") -> Iterator[None]:
    """Map the errnos that /proc/PID/* raises to typed errors.

    ENOENT/ESRCH mean the process exited (or never existed) between listing
    and reading; EACCES/EPERM mean we lack ptrace-read rights on it.
    """
    try:
        yield
    except (FileNotFoundError, ProcessLookupError) as exc:
        if pid is None:
            raise
        raise ProcessGone(pid) from exc
    except PermissionError as exc:
        raise AccessDenied(pid, path) from exc
    except OSError as exc:
        # ESRCH can surface as a bare OSError from reads of a dying task.
        if pid is not None and exc.errno == errno.ESRCH:
            raise ProcessGone(pid) from exc
        raise


def wrap_proc_errors(func: F) -> F:
    """Decorator form of :func:`proc_errors` for methods taking ``pid`` first."""

    @functools.wraps(func)
    def wrapper(self: Any, pid: int, *args: Any, **kwargs: Any) -> Any:
        with proc_errors(pid):
            return func(self, pid, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
