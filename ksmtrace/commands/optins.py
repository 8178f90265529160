"""ksmtrace optins: who opted in to KSM, which regions, how, and what merges now."""

from __future__ import annotations

import argparse
from typing import Any

from ksmtrace.commands._common import add_filter_args, add_output_args, resolve_pids
from ksmtrace.coordinator.ranges import RangeBook
from ksmtrace.kernel import checks
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.model import snapshot
from ksmtrace.views import console
from ksmtrace.views import optins as view

EPILOG = """\
HOW is how the opt-in came, as far as /proc can tell (ksmtrace-optins(8)):
  madvise   madvise(MADV_MERGEABLE) or process_madvise on the region
  prctl     PR_SET_MEMORY_MERGE called by this program (whole process)
  exec      PR_SET_MEMORY_MERGE set before this program was exec'd (whole process)
  fork:PID  inherited from parent PID through fork

examples:
  ksmtrace optins                      # every opted-in process and its 10 largest regions
  ksmtrace optins -n qemu-system-x86_64 --all-regions
  ksmtrace optins -p 1234 -j
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "optins",
        help="processes that opted in to KSM, their regions, and what merges now",
        description="List every process that opted in to KSM with its mergeable regions: "
        "size, mapping, how it opted in, pages merging right now (pagemap + kpageflags; "
        "ksm_stat lags until ksmd rescans) and what that saves now.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_filter_args(p)
    add_output_args(p)
    p.add_argument("--all-regions", action="store_true", help="list every region (default: 10 largest)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Frame numbers in pagemap are hidden from anyone without CAP_SYS_ADMIN.
    checks.require_root("pagemap")
    pids = resolve_pids(args)
    proc = ProcFS()
    rep = snapshot.take(proc, pids=pids, live=True, made=RangeBook().made(proc)).optins
    assert rep is not None  # live=True always measures
    if args.json:
        console.json(view.optins_json(rep))
    else:
        max_regions = None if args.all_regions else 10
        console.lines(view.optins_tables(rep, exact=args.bytes, max_regions=max_regions, asked=pids or ()))
    return 0
