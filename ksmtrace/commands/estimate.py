"""ksmtrace estimate: what KSM would save, exactly, before anything is merged.

Reads the candidate memory of the chosen processes (private anonymous
mappings) without stopping them, confirms duplicate pages byte by byte and
applies the kernel's max_page_sharing and use_zero_pages. Prints the saving
per process and per region and how much of it needs merging across processes.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ksmtrace import scan
from ksmtrace.commands._common import add_filter_args, add_output_args, resolve_pids
from ksmtrace.errors import UsageError
from ksmtrace.kernel import checks, ksm_sysfs
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.views import console
from ksmtrace.views import estimate as view
from ksmtrace.views.progress import ProgressBar

EPILOG = """\
examples:
  ksmtrace estimate -n qemu-system-x86_64     # every QEMU, together
  ksmtrace estimate -p 1234 -p 5678 --regions 0
  ksmtrace estimate --all --workers 1 -j       # the whole host, on one core
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "estimate",
        help="predict what KSM would save for chosen processes (exact duplicate scan)",
        description="Scan the private anonymous memory of processes without stopping them and "
        "predict, page for page, what KSM would save if it were merged: duplicates "
        "are confirmed by comparing bytes, and the kernel's max_page_sharing and "
        "use_zero_pages are applied.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_filter_args(p)
    p.add_argument("--all", action="store_true", help="every process (kernel threads excepted)")
    add_output_args(p)
    p.add_argument("--progress", action="store_true", help="progress bar on stderr even when not a tty")
    p.add_argument(
        "--regions",
        type=int,
        default=10,
        metavar="N",
        help="show the N regions with the largest saving (default 10; 0: all)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="threads that copy and hash memory (default 0: one per CPU it may run on, at most 4; "
        "1 keeps the scan on one core of a busy host)",
    )
    p.add_argument(
        "--confirm-bytes",
        action="store_true",
        help="compare the bytes of every duplicate instead of trusting 128-bit hashes "
        "(false-duplicate odds at most n^2/2^129 for n pages); slower where pages repeat",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.workers <= 64:
        raise UsageError("--workers takes 0 (one per CPU) to 64")
    if args.regions < 0:
        raise UsageError("--regions takes 0 (all) or more")
    if args.all and (args.pid or args.name):
        raise UsageError("--all scans every process: do not combine it with -p/-n")
    if not (args.all or args.pid or args.name):
        raise UsageError("choose processes: -p PID (repeatable), -n COMM or --all")
    checks.require_root("pagemap")
    ksm_sysfs.require_ksm()
    proc = ProcFS()
    if args.all:
        pids = [p for p in proc.pids() if p != os.getpid()]
    else:
        pids = resolve_pids(args, proc) or []
    bar = ProgressBar(enabled=True if args.progress else None)
    try:
        est = scan.estimate(
            pids,
            strict=not (args.all or args.name),
            progress=bar,
            proc=proc,
            workers=args.workers,
            confirm_bytes=args.confirm_bytes,
        )
    finally:
        bar.close()
    if args.json:
        console.json(view.as_json(est))
    else:
        console.lines(view.text(est, exact=args.bytes, nregions=args.regions))
    return 0
