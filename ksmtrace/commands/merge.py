"""ksmtrace merge: opt a running process's memory into KSM from outside.

madvise(MADV_MERGEABLE) is made inside the target by ptrace syscall injection
(x86_64): on a given range, or with --auto on the regions the estimate says
are worth it (scanning the target together with memory that is already
mergeable elsewhere, which is what KSM would merge it with).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from ksmtrace import native, remote, scan
from ksmtrace.errors import KsmtraceError, ProcessGone, UsageError
from ksmtrace.kernel import checks, ksm_sysfs
from ksmtrace.kernel.procfs import ProcFS, Vma
from ksmtrace.native import PAGE
from ksmtrace.views import console
from ksmtrace.views import merge as view
from ksmtrace.views.progress import ProgressBar

EPILOG = """\
examples:
  ksmtrace merge -p 1234 --auto --dry-run      # what --auto would choose, nothing changed
  ksmtrace merge -p 1234 --auto                # merge the ranges worth it
  ksmtrace merge -p 1234 --range 7f0000000000-7f0040000000
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "merge",
        help="make a range of a running process mergeable (remote madvise, x86_64)",
        description="Opt a running, unmodified process into KSM: madvise(MADV_MERGEABLE) "
        "is injected into it with ptrace. The target is stopped for about 200 us per "
        "range and never left stopped or traced.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_args(p)
    p.add_argument(
        "--auto",
        action="store_true",
        help="estimate first and merge the regions that are worth it",
    )
    p.add_argument(
        "--min-saving",
        type=float,
        default=10.0,
        metavar="PCT",
        help="--auto: minimum predicted saving, percent of the region's present pages (default 10)",
    )
    p.add_argument(
        "--min-pages",
        type=int,
        default=16,
        metavar="N",
        help="--auto: minimum predicted saving in pages (default 16)",
    )
    p.add_argument(
        "--granularity",
        type=int,
        default=2048,
        metavar="KIB",
        help="--auto: judge mappings in windows of this size (default 2048 KiB)",
    )
    p.add_argument("--dry-run", action="store_true", help="--auto: show the choice, change nothing")
    p.add_argument("--progress", action="store_true", help="progress bar on stderr even when not a tty")
    p.set_defaults(run=run, advice=remote.MADV_MERGEABLE)


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--pid", type=int, required=True, metavar="PID", help="the target process")
    p.add_argument(
        "--range",
        action="append",
        metavar="START-END",
        help="hex addresses, page aligned (repeatable)",
    )
    p.add_argument(
        "--timeout",
        type=int,
        default=2000,
        metavar="MS",
        help="give up if the target does not stop within MS (default 2000)",
    )
    p.add_argument("-j", "--json", action="store_true", help="JSON output")
    p.add_argument("--bytes", action="store_true", help="exact byte counts instead of KiB/MiB")


def auto_ranges(
    pid: int, min_pct: float, min_pages: int, progress: ProgressBar | None, granularity: int = 2 << 20
) -> list[scan.RegionEstimate]:
    """Ranges of pid worth merging, judged together with memory already mergeable elsewhere.

    The target's mappings are judged in windows of ``granularity`` bytes, so
    that the duplicate-rich part of a large mapping is chosen without its
    unique rest: ksmd rescans mergeable pages that never merge forever.
    """
    proc = ProcFS()
    peers = []
    for other in proc.pids():
        if other == pid:
            continue
        try:
            stat = proc.ksm_stat(other)
        except KsmtraceError:
            continue  # gone or unreadable peers simply do not count
        if stat and stat.opted_in:
            peers.append(other)
    windows = []
    for v in proc.smaps(pid):
        if v.mergeable or v.why_not_mergeable():
            continue
        at = v.start
        while at < v.end:
            nxt = min(v.end, (at // granularity + 1) * granularity)
            windows.append((at, nxt))
            at = nxt

    def only(p: int, v: Vma) -> bool:
        return p == pid or v.mergeable

    est = scan.estimate(
        [pid, *peers], strict=False, progress=progress, only=only, ranges={pid: windows}, proc=proc
    )
    if pid in est.gone:
        raise ProcessGone(pid, "during the scan")
    good = [
        r
        for p in est.processes
        if p.pid == pid
        for r in p.regions
        if r.saved_share >= 1 and r.saving_ratio * 100 >= min_pct
    ]
    # Neighbouring windows become one range (one madvise, one VMA).
    merged: list[scan.RegionEstimate] = []
    for r in sorted(good, key=lambda r: r.start):
        last = merged[-1] if merged else None
        if last and last.end == r.start:
            merged[-1] = replace(
                last,
                end=r.end,
                **{f: getattr(last, f) + getattr(r, f) for f in _SUMMED},
            )
        else:
            merged.append(r)
    return [r for r in merged if r.saved_share >= min_pages]


# Every per-region counter of the scanner adds up when windows are joined.
_SUMMED = native.REGION_FIELDS


def run(args: argparse.Namespace) -> int:
    merging = args.advice == remote.MADV_MERGEABLE
    auto = getattr(args, "auto", False)
    if args.pid <= 0:
        raise UsageError(f"-p takes a process id (1 or more), not {args.pid}")
    if args.timeout <= 0:
        raise UsageError("--timeout must be a positive number of milliseconds")
    if auto and args.range:
        raise UsageError("give either --range or --auto")
    if auto and (args.granularity < 4 or args.granularity * 1024 % PAGE):
        raise UsageError("--granularity must be a multiple of the page size, in KiB")
    if merging and not auto and not args.range:
        raise UsageError("give --range START-END or --auto")
    given = [scan.parse_range(r) for r in args.range or []]
    checks.require_root("ptrace")
    ksm_sysfs.require_ksm()
    remote.require_x86_64()
    vmas = remote.check_target(args.pid)
    chosen: list[scan.RegionEstimate] = []
    if auto:
        bar = ProgressBar(enabled=True if args.progress else None)
        try:
            chosen = auto_ranges(args.pid, args.min_saving, args.min_pages, bar, args.granularity * 1024)
        finally:
            bar.close()
        ranges = [(r.start, r.end) for r in chosen]
        if getattr(args, "dry_run", False):
            if args.json:
                console.json(view.choice_json(args.pid, chosen))
            else:
                console.lines(view.choice(chosen, PAGE, args.bytes))
            return 0
    elif given:
        ranges = given
    else:
        # unmerge without a range: every mergeable mapping of the process
        ranges = [(v.start, v.end) for v in vmas if v.mergeable]
    for start, end in ranges:
        remote.check_range(args.pid, vmas, start, end, merging)
    done = [remote.madvise(args.pid, s, e, args.advice, args.timeout) for s, e in ranges]
    if args.json:
        console.json(view.injections_json(args.pid, done))
    else:
        console.lines(view.text(args.pid, chosen, done, PAGE, args.bytes))
    return 0
