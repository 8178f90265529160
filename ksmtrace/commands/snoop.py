"""ksmtrace snoop: one line per KSM opt-in call, live, after the opt-ins made before.

madvise(MADV_[UN]MERGEABLE), prctl(PR_[SG]ET_MEMORY_MERGE), process_madvise
with those advices, each with its result; forks that copy a mergeable mm and
execs that keep whole-process merging. The inventory of processes that opted
in before tracing started comes first (--no-inventory to skip it).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ksmtrace import inventory
from ksmtrace.commands._common import add_filter_args
from ksmtrace.errors import AccessDenied, ProcessGone, UsageError
from ksmtrace.kernel import checks
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.probes.optins import CgroupFilter, OptinProbe, ProbeStats, resolve_cgroup
from ksmtrace.views import optins as view
from ksmtrace.views.fmt import emit_json

EPILOG = """\
examples:
  ksmtrace snoop                 # every opt-in on the host
  ksmtrace snoop -T -p 1234      # pid 1234 only, with timestamps
  ksmtrace snoop -n qemu-system  # processes named qemu-system (also ones started later)
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
    for p in inv.processes:
        if comm is not None and p.comm != comm[:15]:
            continue
        if cgroup is not None:
            try:
                if not cgroup.contains(proc.cgroup(p.pid) or ""):
                    continue
            except ProcessGone:
                inv.exited += 1
                continue
            except AccessDenied:
                inv.denied += 1
                continue
        keep.append(p)
    inv.processes = keep
    return inv


def run(args: argparse.Namespace) -> int:
    checks.require_root("tracing")
    proc = ProcFS()
    pids = None
    if args.pid:
        for pid in args.pid:
            if not proc.exists(pid):
                raise UsageError(f"pid {pid} does not exist")
        pids = list(args.pid)
    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be positive")
    if args.name and not proc.find_by_comm(args.name[:15]) and not args.json:
        print(f"(no process named {args.name!r} yet: tracing for new ones)", file=sys.stderr)
    cgroup = resolve_cgroup(args.cgroup) if args.cgroup else None

    # Attach first, then read /proc: an opt-in made meanwhile shows up in the
    # stream, possibly in both, never in neither.
    probe = OptinProbe(pids=pids, comm=args.name, cgroup=cgroup, count_all_madvise=args.count_all_madvise)
    events = 0
    try:
        if not args.no_inventory:
            inv = _inventory(pids, args.name, cgroup, proc)
            if args.json:
                for p in inv.processes:
                    emit_json(view.inventory_json(p), lines=True)
            else:
                print("Opted in before tracing started (from /proc):")
                if inv.processes:
                    view.inventory_table(inv.processes, exact=args.bytes)
                else:
                    print("(none)")
                if inv.exited or inv.denied:
                    print(f"({inv.exited} exited while read, {inv.denied} not readable: skipped)")
                print()
        # In JSON mode stdout holds only JSON lines.
        print("Tracing... Ctrl-C to end.", file=sys.stderr if args.json else sys.stdout, flush=True)
        if not args.json:
            print(view.snoop_header(args.timestamp), flush=True)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        try:
            while deadline is None or time.monotonic() < deadline:
                for ev in probe.poll(100):
                    events += 1
                    _print(ev, args)
        except KeyboardInterrupt:
            pass
        for ev in probe.drain():
            events += 1
            _print(ev, args)
        _summary(probe.stats(), events, args)
    finally:
        probe.close()
    return 0


def _print(ev: Any, args: argparse.Namespace) -> None:
    if args.json:
        emit_json(view.event_json(ev), lines=True)
    else:
        print(view.snoop_line(ev, args.timestamp, args.bytes), flush=True)


def _summary(st: ProbeStats, events: int, args: argparse.Namespace) -> None:
    if args.json:
        emit_json(
            {
                "type": "summary",
                "events": events,
                "lost": st.lost,
                "inflight_full": st.inflight_full,
                "madvise_calls": st.madvise_calls,
            },
            lines=True,
        )
        return
    if st.lost:
        print(f"{st.lost} events lost (ring buffer full)")
    if st.inflight_full:
        print(f"{st.inflight_full} calls not followed (per-thread table full)")
    if st.madvise_calls is not None:
        print(f"{st.madvise_calls} madvise calls of any advice passed the filters")
