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

from ksmtrace import remote, scan
from ksmtrace.coordinator import worth
from ksmtrace.coordinator.policy import Runs
from ksmtrace.errors import KsmtraceError, ProcessGone, UsageError
from ksmtrace.kernel import checks, ksm_sysfs
from ksmtrace.kernel.procfs import ProcFS, Vma
from ksmtrace.native import PAGE
from ksmtrace.views import console
from ksmtrace.views import merge as view
from ksmtrace.views.progress import ProgressBar

# --auto's defaults are the daemon's (coordinator/policy.py): one judgement, one set of numbers.
RUNS = Runs()

EPILOG = """\
examples:
  ksmtrace merge -p 1234 --auto --dry-run      # what --auto would choose, nothing changed
  ksmtrace merge -p 1234 --auto                # merge the runs of duplicates worth it
  ksmtrace merge -p 1234 --auto --max-gap 32   # fewer, longer ranges (gaps of up to 32 pages)
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
        help="estimate first and merge the runs of duplicate pages that are worth it",
    )
    p.add_argument(
        "--min-pages",
        type=int,
        default=RUNS.min_saving_pages,
        metavar="N",
        help=f"--auto: the ranges chosen must save N pages together (default {RUNS.min_saving_pages})",
    )
    p.add_argument(
        "--max-gap",
        type=int,
        default=RUNS.max_gap_pages,
        metavar="PAGES",
        help="--auto: runs of duplicate pages at most PAGES apart become one range "
        f"(default {RUNS.max_gap_pages})",
    )
    p.add_argument(
        "--min-run",
        type=int,
        default=RUNS.min_run_pages,
        metavar="PAGES",
        help=f"--auto: leave out ranges of fewer duplicate pages (default {RUNS.min_run_pages})",
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


def auto_ranges(pid: int, rules: Runs, progress: ProgressBar | None) -> worth.Choices:
    """Runs of duplicate pages of pid worth merging, judged together with memory
    already mergeable elsewhere (what KSM would merge them with).

    Only the runs are chosen, not the mappings around them: ksmd rescans
    mergeable pages that never merge on every pass, forever.
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

    def only(p: int, v: Vma) -> bool:
        return p == pid or v.mergeable

    est = scan.estimate(
        [pid, *peers], strict=False, progress=progress, only=only, proc=proc, runs_gap=rules.max_gap_pages
    )
    if pid in est.gone:
        raise ProcessGone(pid, "during the scan")
    return worth.choose(est, pid, rules)


def run(args: argparse.Namespace) -> int:
    merging = args.advice == remote.MADV_MERGEABLE
    auto = getattr(args, "auto", False)
    if args.pid <= 0:
        raise UsageError(f"-p takes a process id (1 or more), not {args.pid}")
    if args.timeout <= 0:
        raise UsageError("--timeout must be a positive number of milliseconds")
    if auto and args.range:
        raise UsageError("give either --range or --auto")
    if auto and (args.max_gap < 0 or args.min_run < 1 or args.min_pages < 0):
        raise UsageError("--max-gap and --min-pages take 0 or more pages, --min-run 1 or more")
    if merging and not auto and not args.range:
        raise UsageError("give --range START-END or --auto")
    given = [scan.parse_range(r) for r in args.range or []]
    checks.require_root("ptrace")
    ksm_sysfs.require_ksm()
    remote.require_x86_64()
    vmas = remote.check_target(args.pid)
    chosen: worth.Choices | None = None
    if auto:
        bar = ProgressBar(enabled=True if args.progress else None)
        rules = replace(
            RUNS, max_gap_pages=args.max_gap, min_run_pages=args.min_run, min_saving_pages=args.min_pages
        )
        try:
            chosen = auto_ranges(args.pid, rules, bar)
        finally:
            bar.close()
        ranges = [(c.start, c.end) for c in chosen.ranges]
        if getattr(args, "dry_run", False):
            if args.json:
                console.json(view.choice_json(chosen))
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
