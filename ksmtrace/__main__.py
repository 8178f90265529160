"""``python -m ksmtrace`` and the ``ksmtrace`` script.

Until ksmtrace.cli has installed its handlers (ksmtrace.kernel.signals), an
ending signal should simply end the process, as it would any program that
has not started work: no KeyboardInterrupt traceback from the middle of an
import. So the defaults go back first, before the heavy imports.
"""

# _signal, not signal: the interpreter has imported it already, so this runs
# without another import (a Ctrl-C inside one of the import system's callbacks
# is reported and dropped by CPython: the shorter that window, the better).
import _signal

for _sig in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
    _signal.signal(_sig, _signal.SIG_DFL)


def entry() -> int:
    from ksmtrace.cli import main  # noqa: PLC0415 (after the signal defaults above)

    return main()


if __name__ == "__main__":
    raise SystemExit(entry())
