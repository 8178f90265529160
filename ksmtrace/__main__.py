"""``python -m ksmtrace`` and the ``ksmtrace`` script.

Until ksmtrace.cli has installed its handlers (ksmtrace.kernel.signals), an
ending signal should simply end the process, as it would any program that
has not started work: no KeyboardInterrupt traceback from the middle of an
import. So the defaults go back first, before the heavy imports.
"""

import signal

for _sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, signal.SIG_DFL)


def entry() -> int:
    from ksmtrace.cli import main  # noqa: PLC0415 (after the signal defaults above)

    return main()


if __name__ == "__main__":
    raise SystemExit(entry())
