"""ksmtrace demo: see an opt-in, ksmd merging and copy-on-write within seconds.

Starts the built-in workload (identical private anonymous pages), opts it in
with madvise(MADV_MERGEABLE), lets ksmd merge it with brisk settings, then
writes to some merged pages so that each write breaks a merge. The KSM
settings are restored on exit, whatever happens.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ksmtrace.errors import KsmtraceError
from ksmtrace.kernel import checks, ksm_sysfs, pagemap, vmstat
from ksmtrace.views.fmt import emit_json, human_bytes
from ksmtrace.workload import PAGE, Workload, WorkloadError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run a built-in workload that opts in, gets merged, and breaks merges",
        description="Start a small workload, opt it into KSM, let ksmd merge it, write to "
        "some merged pages, and show each step as the kernel reports it. KSM settings "
        "are changed for the demo and restored afterwards.",
    )
    p.add_argument("--size", type=int, default=64, metavar="MIB", help="workload size (default 64)")
    p.add_argument(
        "--writes",
        type=float,
        default=0.25,
        metavar="FRACTION",
        help="fraction of merged pages to write to (default 0.25)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SEC",
        help="give up waiting for ksmd after this long (default 30)",
    )
    p.add_argument("-j", "--json", action="store_true", help="print one JSON summary at the end")
    p.set_defaults(run=run)


def _say(args: argparse.Namespace, msg: str) -> None:
    if not args.json:
        print(msg, flush=True)


def run(args: argparse.Namespace) -> int:
    checks.require_root("pagemap")
    ksm_sysfs.require_ksm()
    pages = args.size * 1024 * 1024 // PAGE
    saved = ksm_sysfs.SavedSettings()
    summary: dict[str, Any] = {}
    try:
        with Workload(comm="ksmtrace-demo") as wl:
            reg = wl.call("alloc", name="demo", pages=pages, kind="dup", seed=7)
            addr, length = reg["addr"], reg["len"]
            _say(
                args,
                f"demo workload pid {wl.pid}: {human_bytes(length)} of identical "
                f"private anonymous pages at {addr:#x}",
            )
            res = wl.call("madvise", name="demo", advice="mergeable")
            _say(args, f"opt-in   pid {wl.pid} madvise({addr:#x}, {length}, MADV_MERGEABLE) = {res['ret']}")
            summary.update(pid=wl.pid, pages=pages, madvise_ret=res["ret"])

            for k, v in (("pages_to_scan", 5000), ("sleep_millisecs", 10), ("run", 1)):
                ksm_sysfs.write(k, v)
            _say(args, "ksmd     run=1 pages_to_scan=5000 sleep_millisecs=10 (restored on exit)")
            t0 = time.monotonic()
            merged = 0
            while time.monotonic() - t0 < args.timeout:
                merged = pagemap.range_pages(wl.pid, addr, addr + length).ksm
                sysfs = ksm_sysfs.read()
                _say(
                    args,
                    f"merging  t={time.monotonic() - t0:4.1f}s  KSM pages in demo: {merged:6d}/{pages}"
                    f"  pages_sharing={sysfs.get('pages_sharing')}",
                )
                if merged >= pages:
                    break
                time.sleep(0.5)
            summary.update(merged_pages=merged, merge_seconds=round(time.monotonic() - t0, 2))
            if merged == 0:
                raise KsmtraceError(
                    "ksmd merged nothing within the timeout: is another tool "
                    "holding /sys/kernel/mm/ksm/run at 0?"
                )

            # Pause ksmd (run=0 keeps merged pages merged): the written pages are
            # identical to each other, and a running ksmd re-merges some of them
            # before they are counted (seen: 2051 of 2048 on Linux 6.1).
            ksm_sysfs.write("run", 0)
            cow0 = vmstat.ksm_vmstat().get("cow_ksm")
            step = max(1, int(round(1 / args.writes))) if args.writes > 0 else 0
            written = wl.call("write", name="demo", step=step)["written"] if step else 0
            cow1 = vmstat.ksm_vmstat().get("cow_ksm")
            after = pagemap.range_pages(wl.pid, addr, addr + length).ksm
            cow = None if cow0 is None else cow1 - cow0
            _say(
                args,
                f"writes   pid {wl.pid} wrote to {written} merged pages: "
                f"cow_ksm +{cow}, KSM pages in demo now {after}",
            )
            summary.update(written=written, cow_ksm_delta=cow, merged_after_writes=after)
    except WorkloadError as exc:
        raise KsmtraceError(f"demo workload failed: {exc}") from exc
    finally:
        saved.restore()
    if args.json:
        emit_json(summary)
    else:
        print("KSM settings restored.", file=sys.stdout)
    return 0
