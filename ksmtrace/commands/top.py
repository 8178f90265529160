"""ksmtrace top: a live full-screen view of KSM: savings, KSM COW faults, ksmd's cost, per process.

Data and drawing are apart: a source yields one Snapshot per refresh, from
probes of its own (ksmtrace.live.sampler, the same loop as ``faults``) or
from a running daemon's ``GET /api/snapshot`` (``--connect``); the views
(ksmtrace.views.top, top_ui) turn its rows into the screen. top only reads:
nothing under /sys/kernel/mm/ksm is written, whatever the source.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from ksmtrace.commands._common import add_filter_args, intervals, resolve_pids
from ksmtrace.commands.faults import _Keep
from ksmtrace.errors import KsmtraceError, UsageError
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.live import sampler as sampler_mod
from ksmtrace.live.sampler import Sampler
from ksmtrace.model import codec
from ksmtrace.model.snapshot import Snapshot
from ksmtrace.probes import ksmd as ksmd_probe
from ksmtrace.views import console, dash
from ksmtrace.views import top as view

DEFAULT_URL = "http://127.0.0.1:9477"
HTTP_TIMEOUT_S = 2.0

EPILOG = """\
examples:
  ksmtrace top                       # its own probes, a refresh each second; q quits
  ksmtrace top -d 2 -n qemu-system-x86_64
  ksmtrace top --connect             # what a running 'ksmtrace daemon' sees (127.0.0.1:9477)
  ksmtrace top --connect http://127.0.0.1:9000
  ksmtrace top -b 3 -s profit        # three refreshes as plain text, for scripts
keys: c p g m u r n o sort (again: invert), < > sort column, / filter, Enter regions,
  Esc back, b pages/bytes, h help, q quit
"""


class DaemonUnreachable(KsmtraceError):
    exit_code = 69  # EX_UNAVAILABLE, as for tracing that is not available


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "top",
        help="live full-screen view: savings, KSM COW faults, merges and ksmd's cost per process",
        description="A live view like top(1): the machine's KSM state with sparklines, and a "
        "table of processes (merging pages, profit, KSM COW faults/s, merges/s, unmerges/s, how "
        "they opted in, rmap items per merged page) to sort, filter and open into regions. "
        "It loads its own probes, or shows what a running ksmtrace daemon sees (--connect).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_filter_args(p)
    p.add_argument(
        "-d",
        "--delay",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between refreshes (default 1)",
    )
    p.add_argument(
        "--connect",
        nargs="?",
        const=DEFAULT_URL,
        metavar="URL",
        help=f"read a running daemon's snapshots instead of loading probes (default {DEFAULT_URL})",
    )
    p.add_argument(
        "-s",
        "--sort",
        choices=view.SORT_ORDER,
        default="ksm_cow",
        metavar="KEY",
        help="sort column: " + ", ".join(view.SORT_ORDER) + " (default ksm_cow)",
    )
    p.add_argument(
        "-b", "--batch", type=int, metavar="N", help="no screen: print the table as text N times, then exit"
    )
    p.add_argument("--once", action="store_const", const=1, dest="batch", help="the same as -b 1")
    p.set_defaults(run=run)


def snapshot_url(url: str) -> str:
    """The daemon's snapshot endpoint for what the user typed (host:port, a base URL or the endpoint)."""
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    return url if url.endswith("/api/snapshot") else url + "/api/snapshot"


class DaemonSource:
    """Snapshots from a daemon's HTTP API: read-only GETs on its address."""

    def __init__(self, url: str, timeout: float = HTTP_TIMEOUT_S) -> None:
        self.url = snapshot_url(url)
        self.base = self.url[: -len("/api/snapshot")]
        self.timeout = timeout

    def _unreachable(self, why: str) -> DaemonUnreachable:
        return DaemonUnreachable(
            f"no ksmtrace daemon answers at {self.base} ({why}): start one with 'ksmtrace daemon', "
            "or name its address with --connect URL"
        )

    def fetch(self) -> Snapshot:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout) as resp:  # noqa: S310 (http(s) only)
                body = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 503:
                raise KsmtraceError(
                    f"the daemon at {self.base} has no snapshot yet (first interval)"
                ) from None
            raise DaemonUnreachable(
                f"{self.base} is not a ksmtrace daemon: GET /api/snapshot answered {exc.code} {exc.reason}"
            ) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            why = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
            raise self._unreachable(why.lower()) from None
        except (TimeoutError, socket.timeout):
            raise self._unreachable(f"no answer within {self.timeout:g} s") from None
        except (ConnectionError, OSError) as exc:
            raise self._unreachable(exc.strerror or str(exc)) from None
        try:
            data = json.loads(body)
            if data is None:
                raise KsmtraceError(f"the daemon at {self.base} has no snapshot yet (first interval)")
            return codec.load(Snapshot, data)
        except (ValueError, TypeError, KeyError) as exc:
            raise DaemonUnreachable(
                f"{self.base} answered GET /api/snapshot with no ksmtrace snapshot ({exc})"
            ) from None


def _daemon_keep(args: argparse.Namespace) -> Callable[[dash.ProcRow], bool] | None:
    """-p/-n over a daemon's rows: pids, or the comm (the kernel's first 15 bytes of the name)."""
    if not args.pid and not args.name:
        return None
    pids = set(args.pid or ())
    name = os.path.basename(args.name)[:15] if args.name else None
    return lambda r: r.pid in pids or (name is not None and r.comm == name)


def run(args: argparse.Namespace) -> int:
    if not args.delay > 0:
        raise UsageError(f"-d takes a positive number of seconds, not {args.delay:g}")
    if args.batch is not None and args.batch < 1:
        raise UsageError(f"-b takes a number of refreshes (1 or more), not {args.batch}")
    state = view.TopState(sort=args.sort)
    if args.connect:
        src = DaemonSource(args.connect)
        model = view.TopModel(source=f"from {src.base.split('://', 1)[-1]}", keep=_daemon_keep(args))
        first: Snapshot | None = None
        try:
            first = src.fetch()  # a daemon that is not there: a sentence before any screen
        except DaemonUnreachable:
            raise
        except KsmtraceError as exc:  # there, but without a snapshot yet: said on the screen
            model.message = str(exc)
        if args.batch:
            return _batch(model, state, src.fetch, args, first)
        if first is not None:
            model.update(first)
        from ksmtrace.views import top_ui  # noqa: PLC0415 (urwid only for the screen)

        top_ui.run(model, src.fetch, args.delay, args.delay)
        return 0
    sampler_mod.require_tracing()
    proc = ProcFS()
    pids = resolve_pids(args, proc)  # -p pids exist and -n names something now
    keep = _Keep(args.pid, args.name, proc)
    kernel_pid = args.pid[0] if args.pid and len(args.pid) == 1 and not args.name else None
    initial = None if not args.pid else list(pids or ())
    if not ksmd_probe.available():
        console.note(sampler_mod.NO_KSM_TRACEPOINTS)
    model = view.TopModel()
    if not args.batch:
        console.note("ksmtrace top: loading the probes...")
    # The sampler detaches every probe when the stack unwinds: after q, and
    # after a signal, also one that lands while a later probe still loads.
    with Sampler(keep=keep, kernel_pid=kernel_pid, initial=initial, how=True, proc=proc) as sampler:

        def fetch() -> Snapshot:
            snap = sampler.sample(args.delay)
            keep.forget(sampler.gone)
            return snap

        model.notes = list(sampler.notes)
        if args.batch:
            return _batch(model, state, fetch, args, None)
        from ksmtrace.views import top_ui  # noqa: PLC0415

        top_ui.run(model, fetch, args.delay, args.delay)
    return 0


def _batch(
    model: view.TopModel,
    state: view.TopState,
    fetch: Callable[[], Snapshot],
    args: argparse.Namespace,
    first: Snapshot | None,
) -> int:
    """``-b N``: N refreshes as plain lines (the first at once when a daemon gave one already)."""
    n = args.batch
    if first is not None:
        model.update(first)
        console.lines(view.batch(model, state))
        n -= 1
    for i, _ in enumerate(intervals(args.delay, n) if n > 0 else ()):
        model.update(fetch())
        if first is not None or i:
            console.lines("")
        console.lines(view.batch(model, state))
    return 0
