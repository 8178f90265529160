"""ksmtrace optins: who opted in to KSM, which regions, how, and what merges now."""

from __future__ import annotations

import argparse
from typing import Any

from ksmtrace import optin_report
from ksmtrace.commands._common import add_filter_args, add_output_args
from ksmtrace.errors import UsageError
from ksmtrace.kernel import checks
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.views import optins as view

EPILOG = """\
HOW is how the opt-in came, as far as /proc can tell (ksmtrace-optins(8)):
  madvise   madvise(MADV_MERGEABLE) or process_madvise on the region
  prctl     PR_SET_MEMORY_MERGE called by this program (whole process)
  exec      PR_SET_MEMORY_MERGE set before this program was exec'd (whole process)
  fork:PID  inherited from parent PID through fork
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


def resolve(args: argparse.Namespace, proc: ProcFS) -> list[int] | None:
    pids: list[int] = []
    for pid in args.pid or []:
        if not proc.exists(pid):
            raise UsageError(f"pid {pid} does not exist")
        pids.append(pid)
    if args.name:
        found = proc.find_by_comm(args.name[:15])
        if not found:
            raise UsageError(f"no process named {args.name!r}")
        pids.extend(found)
    return sorted(set(pids)) or None


def run(args: argparse.Namespace) -> int:
    # Frame numbers in pagemap are hidden from anyone without CAP_SYS_ADMIN.
    checks.require_root("pagemap")
    proc = ProcFS()
    pids = resolve(args, proc)
    rep = optin_report.take(pids, proc)
    if args.json:
        view.optins_json(rep)
        return 0
    view.optins_tables(rep, exact=args.bytes, max_regions=None if args.all_regions else 10)
    if pids:
        shown = {lp.proc.pid for lp in rep.processes}
        for pid in pids:
            if pid not in shown:
                print(f"pid {pid}: has not opted in (no mergeable region, no merge_any)")
    return 0
