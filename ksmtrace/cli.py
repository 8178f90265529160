"""Command-line entry point: dispatch to ksmtrace.commands.*, errors for people."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ksmtrace import __version__
from ksmtrace.commands import COMMANDS
from ksmtrace.errors import KsmtraceError
from ksmtrace.kernel import signals
from ksmtrace.views import console

DESCRIPTION = """\
Trace and steer Linux KSM (Kernel Samepage Merging): who opts in, which
regions share pages, what copy-on-write faults on merged pages cost, and
where merging would pay.

With no command, ksmtrace runs 'demo' when nothing on the host uses KSM
yet (a built-in workload opts in, ksmd merges it, writes break merges) and
'status' otherwise.
"""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``only`` one command's: each command module
    imports what it runs on (BCC, pyroute2, urwid...), and importing all of
    them cost 0.6 s of every start (issue #14: first report within 2 s)."""
    parser = argparse.ArgumentParser(
        prog="ksmtrace",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ksmtrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (only,) if only in COMMANDS else COMMANDS:
        importlib.import_module(f"ksmtrace.commands.{name}").add_parser(sub)
    return parser


def _default_command() -> list[str]:
    from ksmtrace.model.inventory import take  # noqa: PLC0415

    return ["status"] if take().processes else ["demo"]


def _repair() -> None:
    """Undo what a killed ksmtrace left changed (its journal under /run/ksmtrace), and say so."""
    if os.geteuid() != 0:
        return  # only root changes KSM settings, and only root can put them back
    from ksmtrace.coordinator import actuator  # noqa: PLC0415

    for line in actuator.repair():
        console.note(f"ksmtrace: {line}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # SIGINT, SIGTERM and SIGHUP end a command cleanly (ksmtrace.kernel.signals).
    old_handlers = signals.install()
    try:
        if not argv:
            argv = _default_command()
        # The command is the first argument (ksmtrace has no options before
        # it but --help and --version, which need every command's parser).
        parser = build_parser(argv[0])
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        _repair()
        return int(args.run(args) or 0)
    except KsmtraceError as exc:
        console.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt as exc:
        return signals.exit_code(exc)
    except RuntimeError as exc:
        # Python 3.11 wraps an exception raised inside a class body's
        # __set_name__ (a dataclass field being set up while a module is
        # imported) in a RuntimeError: a signal that landed there is still a signal.
        if isinstance(exc.__cause__, KeyboardInterrupt):
            return signals.exit_code(exc.__cause__)
        raise
    except BrokenPipeError:
        # `ksmtrace ... | head`: the reader left; not an error.
        console.reader_left()
        return 0
    finally:
        # main() is also called in-process (tests): leave the caller's handlers as they were.
        signals.uninstall(old_handlers)
