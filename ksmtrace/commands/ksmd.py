"""ksmtrace ksmd: what ksmd does per interval and what it costs."""

from __future__ import annotations

import argparse
from typing import Any

from ksmtrace.commands._common import add_interval_args, check_interval, clock, intervals
from ksmtrace.errors import ProcessGone
from ksmtrace.kernel import checks, ksm_sysfs
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.model import snapshot
from ksmtrace.model.ksmd import KsmdSampler, KsmdState
from ksmtrace.probes import ksmd as ksmd_probe
from ksmtrace.views import console
from ksmtrace.views import ksmd as view

NO_KSM_TRACEPOINTS = (
    "note: this kernel has no ksm:* tracepoints (Linux < 6.4): rounds come from "
    "full_scans, merges only as the net change of pages_sharing"
)

EPILOG = """\
examples:
  ksmtrace ksmd           # one line a second until Ctrl-C
  ksmtrace ksmd 10 6      # a minute in six lines
  ksmtrace ksmd -j 1 5    # five JSON lines
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ksmd",
        help="ksmd scan rounds, pages scanned, merges, and its CPU share",
        description="Per interval: completed scan rounds and their duration, rmap entries, "
        "pages scanned/s, merges and unmerges/s (ksm:* tracepoints), the ksm advisor's "
        "last decision, and ksmd's CPU share from /proc/PID/stat.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-j", "--json", action="store_true", help="JSON lines")
    add_interval_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_interval(args)
    checks.require_root("tracing")
    ksm_sysfs.require_ksm()
    proc = ProcFS()
    ksmd_pid = proc.find_kthread("ksmd")
    if ksmd_pid is None:
        raise ProcessGone(0, "no ksmd kernel thread found")
    kp = None
    if ksmd_probe.available():
        kp = ksmd_probe.KsmdProbe()
    else:
        console.note(NO_KSM_TRACEPOINTS)
    try:
        sampler = KsmdSampler(kp, proc, ksmd_pid)
        state = KsmdState(sampler.sample())
        started = "Tracing... Ctrl-C to end."
        if args.json:
            console.note(started)
        else:
            console.lines(started)
        for n, _ in enumerate(intervals(args.interval, args.count)):
            snap = snapshot.take(proc, ksmd=state.update(sampler.sample()), processes=False)
            assert snap.ksmd is not None
            if args.json:
                console.json(view.as_json(snap.ksmd, clock()), stream=True)
            else:
                console.lines(view.text(snap.ksmd, clock(), header=n % view.HEADER_EVERY == 0))
    finally:
        if kp:
            kp.close()
    return 0
