"""Arguments and loops shared by the bcc-style commands."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

from ksmtrace.errors import UsageError
from ksmtrace.kernel.procfs import ProcFS


def add_filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-p", "--pid", type=int, action="append", metavar="PID", help="only this process (repeatable)"
    )
    p.add_argument("-n", "--name", metavar="COMM", help="only processes whose comm is COMM")


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


def resolve_pids(args: argparse.Namespace, proc: ProcFS | None = None) -> list[int] | None:
    """The pids named by -p/-n, checked to exist; None means every process."""
    proc = proc or ProcFS()
    pids: list[int] = []
    for pid in args.pid or []:
        if not proc.exists(pid):
            raise UsageError(f"pid {pid} does not exist")
        pids.append(pid)
    if getattr(args, "name", None):
        found = proc.find_by_comm(args.name)
        if not found and not args.pid:
            raise UsageError(f"no process named {args.name!r}")
        pids.extend(found)
    return pids or None


def intervals(interval: float, count: int | None) -> Iterator[float]:
    """Sleep ``interval`` between yields, ``count`` times (or forever); yields elapsed seconds."""
    if interval <= 0:
        raise UsageError("interval must be positive")
    start = last = time.monotonic()
    n = 0
    while count is None or n < count:
        next_t = last + interval
        time.sleep(max(0.0, next_t - time.monotonic()))
        now = time.monotonic()
        yield now - last
        last = now
        n += 1
    _ = start
