"""ksmtrace status: the machine's KSM state and who is mergeable now."""

from __future__ import annotations

import argparse
from typing import Any

from ksmtrace.model import snapshot
from ksmtrace.views import console
from ksmtrace.views import status as view

EPILOG = """\
examples:
  ksmtrace status            # knobs, counters, cow_ksm, mergeable processes
  ksmtrace status --bytes    # sizes in exact bytes
  ksmtrace status -j | jq '.counters.pages_sharing'
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="machine-wide KSM knobs and counters, and the mergeable processes",
        description="Print every KSM knob and counter this kernel has, cow_ksm from "
        "/proc/vmstat, and the processes that are mergeable now with their "
        "merging pages and profit (from /proc/PID/ksm_stat).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-j", "--json", action="store_true", help="print JSON")
    p.add_argument("--bytes", action="store_true", help="exact byte counts instead of KiB/MiB")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    snap = snapshot.take()
    if args.json:
        console.json(view.as_json(snap))
    else:
        console.lines(view.text(snap, exact=args.bytes))
    return 0
