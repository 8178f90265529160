"""Command-line entry point: dispatch to ksmtrace.commands.*, errors for people."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from ksmtrace import __version__
from ksmtrace.commands import COMMANDS
from ksmtrace.errors import KsmtraceError
from ksmtrace.views import console

DESCRIPTION = """\
Trace and steer Linux KSM (Kernel Samepage Merging): who opts in, which
regions share pages, what copy-on-write faults on merged pages cost, and
where merging would pay.

With no command, ksmtrace runs 'demo' when nothing on the host uses KSM
yet (a built-in workload opts in, ksmd merges it, writes break merges) and
'status' otherwise.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ksmtrace",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ksmtrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"ksmtrace.commands.{name}").add_parser(sub)
    return parser


def _default_command() -> list[str]:
    from ksmtrace.model.inventory import take  # noqa: PLC0415

    return ["status"] if take().processes else ["demo"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # SIGTERM ends long-running commands the way Ctrl-C does: cleanly.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    parser = build_parser()
    try:
        if not argv:
            argv = _default_command()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return int(args.run(args) or 0)
    except KsmtraceError as exc:
        console.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # `ksmtrace ... | head`: the reader left; not an error.
        console.reader_left()
        return 0
