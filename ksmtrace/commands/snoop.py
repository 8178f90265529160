"""ksmtrace snoop: one line per KSM opt-in call, live, after the opt-ins made before.

madvise(MADV_[UN]MERGEABLE), prctl(PR_[SG]ET_MEMORY_MERGE), process_madvise
with those advices, each with its result; forks that copy a mergeable mm and
execs that keep whole-process merging. The inventory of processes that opted
in before tracing started comes first (--no-inventory to skip it).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from typing import Any

from ksmtrace.commands._common import add_filter_args, check_pids
from ksmtrace.errors import AccessDenied, ProcessGone, UsageError
from ksmtrace.kernel import checks
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.kernel.signals import ENDING
from ksmtrace.model import inventory
from ksmtrace.probes.optins import CgroupFilter, OptinProbe, resolve_cgroup
from ksmtrace.views import console
from ksmtrace.views import optins as view

EPILOG = """\
examples:
  ksmtrace snoop                 # every opt-in on the host
  ksmtrace snoop -T -p 1234      # pid 1234 only, with timestamps
  ksmtrace snoop -n qemu-system-x86_64  # QEMU (comm qemu-system-x86), also ones started later
  ksmtrace snoop --cgroup /system.slice/libvirtd.service
  ksmtrace snoop -j --duration 10 --no-inventory
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "snoop",
        help="trace KSM opt-ins live: madvise, prctl, process_madvise, fork, exec",
        description="Print one line per madvise(MADV_MERGEABLE/UNMERGEABLE), "
        "prctl(PR_SET/GET_MEMORY_MERGE) and process_madvise call with its result, and "
        "one per fork or exec that inherits an opt-in. Processes that opted in before "
        "tracing started are listed first, from /proc. Filters run in the kernel.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_filter_args(p)
    p.add_argument("--cgroup", metavar="PATH", help="only callers in this cgroup v2 (or below it)")
    p.add_argument("-T", "--timestamp", action="store_true", help="include a time column (HH:MM:SS)")
    p.add_argument("-j", "--json", action="store_true", help="JSON lines (type: inventory, event, summary)")
    p.add_argument("--bytes", action="store_true", help="exact byte lengths instead of KiB/MiB")
    p.add_argument("--no-inventory", action="store_true", help="do not list opt-ins made before tracing")
    p.add_argument("--duration", type=float, metavar="SEC", help="stop after SEC seconds")
    p.add_argument(
        "--count-all-madvise",
        action="store_true",
        help="debug: also count every madvise call (any advice) passing the filters, "
        "reported at the end; to check ksmtrace against perf",
    )
    p.set_defaults(run=run)


def _inventory(
    pids: list[int] | None, comm: str | None, cgroup: CgroupFilter | None, proc: ProcFS
) -> inventory.Inventory:
    """The start-up inventory under the same filters as the probe."""
    inv = inventory.take(proc, pids)
    keep = []

    def wanted(p: inventory.MergeableProcess) -> bool:
        if comm is not None and not proc.matches_name(p.pid, comm):
            return False
        return cgroup is None or cgroup.contains(proc.cgroup(p.pid) or "")

    for p in inv.processes:
        try:
            if wanted(p):
                keep.append(p)
        except ProcessGone:
            inv.exited += 1
        except AccessDenied:
            inv.denied += 1
    inv.processes = keep
    return inv


def run(args: argparse.Namespace) -> int:
    check_pids(args)
    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be positive")
    checks.require_root("tracing")
    proc = ProcFS()
    pids = proc.resolve(args.pid, None) if args.pid else None
    if args.name and not proc.find_by_name(args.name) and not args.json:
        console.note(f"(no process named {args.name!r} yet: tracing for new ones)")
    cgroup = resolve_cgroup(args.cgroup) if args.cgroup else None

    # Attach first, then read /proc: an opt-in made meanwhile shows up in the
    # stream, possibly in both, never in neither.
    # The kernel filters on comm: an exec'd program's comm is its file's basename
    # (cut to 15 bytes), so a path given to -n filters on that.
    comm = os.path.basename(args.name) if args.name else None
    probe = OptinProbe(pids=pids, comm=comm, cgroup=cgroup, count_all_madvise=args.count_all_madvise)
    events = 0
    inv = None
    # From here on Ctrl-C and SIGTERM only set a flag, so a signal that comes
    # during the inventory or right after "Tracing..." still ends with the
    # ring buffer drained and the summary printed.
    try:
        stop = _StopFlag()
        with stop:
            if not args.no_inventory:
                inv = _inventory(pids, args.name, cgroup, proc)
                if args.json:
                    for p in inv.processes:
                        console.json(view.inventory_json(p), stream=True)
                else:
                    console.lines(view.snoop_inventory(inv, exact=args.bytes))
            # In JSON mode stdout holds only JSON lines.
            if args.json:
                console.note("Tracing... Ctrl-C to end.")
            else:
                console.lines(["Tracing... Ctrl-C to end.", view.snoop_header(args.timestamp)])
            deadline = None if args.duration is None else time.monotonic() + args.duration
            while not stop.set and (deadline is None or time.monotonic() < deadline):
                for ev in probe.poll(100):
                    events += 1
                    _print(ev, args)
        for ev in probe.drain():
            events += 1
            _print(ev, args)
        st = probe.stats()
        if args.json:
            console.json(view.snoop_summary_json(st, events, inv), stream=True)
        else:
            console.lines(view.snoop_summary(st))
    finally:
        probe.close()
    return 0 if stop.signum is None else 128 + stop.signum


class _StopFlag:
    """Ctrl-C, SIGTERM and SIGHUP end the loop by a flag, not an exception.

    The trace is meant to end this way: what is in the ring buffer is still
    drained and the summary printed; the exit status then says which signal
    ended it (128 + signal, as ksmtrace.kernel.signals does).
    """

    def __init__(self) -> None:
        self.set = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: object) -> None:
        self.set = True
        self.signum = signum

    def __enter__(self) -> _StopFlag:
        for sig in ENDING:
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _print(ev: Any, args: argparse.Namespace) -> None:
    if args.json:
        console.json(view.event_json(ev), stream=True)
    else:
        console.lines(view.snoop_line(ev, args.timestamp, args.bytes))
