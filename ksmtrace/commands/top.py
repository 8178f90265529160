"""ksmtrace top: a live full-screen view of KSM: savings, KSM COW faults, ksmd's cost, per process.

Data and drawing are apart: a source yields the rows of one refresh, a
Snapshot from probes of its own (ksmtrace.live.sampler, the same loop as
``faults``) or the rows a running daemon computed from its Snapshot (its
JSON API, ``--connect``); the views (ksmtrace.views.top, top_ui) turn them
into the screen. top only reads: nothing under /sys/kernel/mm/ksm is
written, whatever the source.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from ksmtrace.commands._common import add_filter_args, intervals, resolve_pids
from ksmtrace.commands.faults import _Keep
from ksmtrace.errors import KsmtraceError, UsageError
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.kernel.signals import Interrupted
from ksmtrace.live import sampler as sampler_mod
from ksmtrace.live.sampler import Sampler
from ksmtrace.model.faults import COUNTERS, RegionRow
from ksmtrace.model.rates import Rate
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


def base_url(url: str) -> str:
    """The daemon's address for what the user typed: host:port, or a URL."""
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


@functools.cache
def _fields(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``cls`` in ``d`` (changed in place): the JSON API adds derived
    ones (rmap_ratio), a newer daemon may know more. A thousand rows a second: cheap."""
    names = _fields(cls)
    if not d.keys() <= names:
        for k in [k for k in d if k not in names]:
            del d[k]
    return d


def region_row(d: dict[str, Any]) -> RegionRow:
    """A region as the daemon's JSON API gives it (RegionRow.as_dict) back into a record."""
    rates = {
        k: Rate(0, float(d[f"{k}_per_s"]), int(d.get(f"{k}_total") or 0))
        for k in COUNTERS
        if f"{k}_per_s" in d
    }
    return RegionRow(**_known(RegionRow, {**d, "rates": rates}))


@functools.cache
def _required(cls: type) -> frozenset[str]:
    return frozenset(
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )


def proc_row(d: dict[str, Any]) -> dash.ProcRow:
    """A process row of the daemon's JSON API (ProcRow.as_dict) back into a record.

    A thousand a second: a frozen dataclass's __init__ sets each of its 13
    fields through object.__setattr__, a fifth of top's CPU with --connect
    (whose goal is 2% of a core). With the fields checked here, the record
    gets the very __dict__ that __init__ would give it."""
    _known(dash.ProcRow, d)
    missing = _required(dash.ProcRow) - d.keys()
    if missing:
        raise KeyError(", ".join(sorted(missing)))
    d.setdefault("regions", ())
    row = object.__new__(dash.ProcRow)
    row.__dict__.update(d)
    return row


class DaemonSource:
    """A running daemon's rows, from its read-only JSON API: ``GET /api/state``
    (the machine row and every process row, computed by the daemon from its
    snapshot) each refresh, ``GET /api/process?pid=N`` for the regions of the
    process opened. The whole snapshot (``/api/snapshot``) would carry the same
    and more, but decoding it costs a quarter of a core at a thousand processes."""

    def __init__(self, url: str, timeout: float = HTTP_TIMEOUT_S) -> None:
        self.base = base_url(url)
        self.timeout = timeout
        self.page_size = os.sysconf("SC_PAGE_SIZE")  # the daemon's API reports pages in rows
        self._last: dict[int, tuple[dict[str, Any], dash.ProcRow]] = {}  # pid -> (JSON, record)

    def _unreachable(self, why: str) -> DaemonUnreachable:
        return DaemonUnreachable(
            f"no ksmtrace daemon answers at {self.base} ({why}): start one with 'ksmtrace daemon', "
            "or name its address with --connect URL"
        )

    def _get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(self.base + path, timeout=self.timeout) as resp:  # noqa: S310
                body = resp.read()
        except urllib.error.HTTPError as exc:
            raise DaemonUnreachable(
                f"{self.base} is not a ksmtrace daemon: GET {path} answered {exc.code} {exc.reason}"
            ) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            why = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
            raise self._unreachable(why.lower()) from None
        except (TimeoutError, socket.timeout):
            raise self._unreachable(f"no answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise self._unreachable(exc.strerror or str(exc)) from None
        try:
            return json.loads(body)
        except ValueError:
            raise DaemonUnreachable(f"{self.base} answered GET {path} with no JSON") from None

    def fetch(self) -> view.Frame:
        state = self._get("/api/state")
        try:
            if state["machine"] is None:
                raise KsmtraceError(f"the daemon at {self.base} has no sample yet (its first interval)")
            machine = dash.MachineRow(**_known(dash.MachineRow, state["machine"]))
            rows = self._rows(state["processes"])
        except (TypeError, KeyError) as exc:
            raise DaemonUnreachable(
                f"{self.base} answered GET /api/state with rows this top does not know ({exc})"
            ) from None
        return view.Frame(machine, rows, self.page_size)

    def _rows(self, got: list[dict[str, Any]]) -> list[dash.ProcRow]:
        """Records of the daemon's rows; a row the same as at the last refresh
        (a quiet process) keeps its record: most of a thousand, most of the time."""
        last, self._last = self._last, {}
        rows = []
        for d in got:
            seen = last.get(d["pid"])
            row = seen[1] if seen is not None and seen[0] == d else proc_row(dict(d))
            self._last[row.pid] = (d, row)
            rows.append(row)
        return rows

    def regions(self, pid: int) -> list[RegionRow]:
        got = self._get(f"/api/process?pid={pid}")
        if got is None:
            return []  # not in the daemon's last interval (exited, or nothing counted)
        try:
            return [region_row(d) for d in got.get("regions", [])]
        except (TypeError, KeyError, ValueError) as exc:
            raise DaemonUnreachable(
                f"{self.base} answered GET /api/process with a region this top does not know ({exc})"
            ) from None


class LocalSource:
    """top's own probes: the Sampler of ``faults``, naming how each process opted in."""

    def __init__(self, sampler: Sampler, keep: _Keep, interval: float) -> None:
        self.sampler, self.keep, self.interval = sampler, keep, interval

    def fetch(self) -> Snapshot:
        snap = self.sampler.sample(self.interval)
        self.keep.forget(self.sampler.gone)
        return snap

    def regions(self, pid: int) -> None:
        return None  # the rows carry them


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
        first: view.Frame | None = None
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
        _screen(model, src, args.delay)
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
        local = LocalSource(sampler, keep, args.delay)
        if args.batch:
            return _batch(model, state, local.fetch, args, None)
        _screen(model, local, args.delay)
    return 0


def _screen(model: view.TopModel, source: DaemonSource | LocalSource, delay: float) -> None:
    from ksmtrace.views import top_ui  # noqa: PLC0415 (urwid only for the screen)

    try:
        top_ui.run(model, source, delay, delay)
    except top_ui.TerminalGone:
        # The terminal hung up (the SIGHUP may come after the EOF): end as that signal ends it.
        raise Interrupted(signal.SIGHUP) from None


def _batch(
    model: view.TopModel,
    state: view.TopState,
    fetch: Callable[[], Snapshot | view.Frame],
    args: argparse.Namespace,
    first: view.Frame | None,
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
