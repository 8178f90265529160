"""Arguments and loops shared by the bcc-style commands."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

from ksmtrace.errors import UsageError
from ksmtrace.kernel.procfs import ProcFS

NAME_HELP = (
    "only processes named COMM: the kernel's comm (its first 15 bytes), or the "
    "executable's basename or full path"
)


def add_filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-p", "--pid", type=int, action="append", metavar="PID", help="only this process (repeatable)"
    )
    p.add_argument("-n", "--name", metavar="COMM", help=NAME_HELP)


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-j", "--json", action="store_true", help="JSON output (JSON lines for streams)")
    p.add_argument("--bytes", action="store_true", help="exact byte counts instead of KiB/MiB")


def add_interval_args(p: argparse.ArgumentParser, default: float = 1.0) -> None:
    p.add_argument(
        "interval",
        nargs="?",
        type=float,
        default=default,
        help=f"seconds between reports (default {default:g})",
    )
    p.add_argument(
        "count", nargs="?", type=int, default=None, help="number of reports (default: until Ctrl-C)"
    )


def check_interval(args: argparse.Namespace) -> None:
    """Refuse a bad interval or count before anything is loaded."""
    if not args.interval > 0:
        raise UsageError(f"interval must be a positive number of seconds, not {args.interval:g}")
    if args.count is not None and args.count < 1:
        raise UsageError(f"count must be 1 or more, not {args.count}")


def check_pids(args: argparse.Namespace) -> None:
    for pid in args.pid or []:
        if pid <= 0:
            raise UsageError(f"-p takes a process id (1 or more), not {pid}")


def resolve_pids(
    args: argparse.Namespace, proc: ProcFS | None = None, strict: bool = True
) -> list[int] | None:
    """The pids named by -p/-n (ProcFS.resolve), checked to exist; None means every process."""
    check_pids(args)
    return (proc or ProcFS()).resolve(args.pid, getattr(args, "name", None), strict=strict)


def intervals(interval: float, count: int | None) -> Iterator[float]:
    """Sleep ``interval`` between yields, ``count`` times (or forever); yields elapsed seconds."""
    if interval <= 0:
        raise UsageError("interval must be positive")
    last = time.monotonic()
    n = 0
    while count is None or n < count:
        next_t = last + interval
        time.sleep(max(0.0, next_t - time.monotonic()))
        now = time.monotonic()
        yield now - last
        last = now
        n += 1


def clock() -> str:
    """The wall-clock time shown on periodic reports."""
    return time.strftime("%H:%M:%S")
