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
from ksmtrace.views.fmt import emit_json, human_bytes, table
from ksmtrace.views.progress import ProgressBar


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "estimate",
        help="predict what KSM would save for chosen processes (exact duplicate scan)",
        description="Scan the private anonymous memory of processes without stopping them and "
        "predict, page for page, what KSM would save if it were merged: duplicates "
        "are confirmed by comparing bytes, and the kernel's max_page_sharing and "
        "use_zero_pages are applied.",
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
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    checks.require_root("pagemap")
    ksm_sysfs.require_ksm()
    proc = ProcFS()
    if args.all:
        if args.pid or args.name:
            raise UsageError("--all scans every process: do not combine it with -p/-n")
        pids = [p for p in proc.pids() if p != os.getpid()]
    else:
        chosen = resolve_pids(args, proc)
        if chosen is None:
            raise UsageError("choose processes: -p PID (repeatable), -n COMM or --all")
        pids = chosen
    if not 0 <= args.workers <= 64:
        raise UsageError("--workers takes 0 (one per CPU) to 64")
    bar = ProgressBar(enabled=True if args.progress else None)
    try:
        est = scan.estimate(
            pids, strict=not (args.all or args.name), progress=bar, proc=proc, workers=args.workers
        )
    finally:
        bar.close()
    if args.json:
        emit_json(est.as_dict())
    else:
        render(est, exact=args.bytes, nregions=args.regions)
    return 0


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def render(est: scan.Estimate, exact: bool = False, nregions: int = 10) -> None:
    pg = est.page_size

    def b(pages: float) -> str:
        return human_bytes(pages * pg, exact)

    t = est.totals
    nreg = sum(len(p.regions) for p in est.processes)
    rate = t["bytes_read"] / est.seconds if est.seconds else 0
    print(
        f"Scanned {len(est.processes)} processes, {nreg} regions, {b(t['present'])} present "
        f"in {est.seconds:.2f}s ({human_bytes(rate)}/s)"
    )
    print(f"KSM rules: max_page_sharing={est.max_page_sharing} use_zero_pages={int(est.use_zero_pages)}")
    print()
    rows = []
    for p in sorted(est.processes, key=lambda p: -p.saved_share):
        present = p.total("present")
        rows.append(
            (
                p.pid,
                p.comm[:15],
                b(present),
                b(p.total("zero")),
                b(p.total("ksm")),
                b(p.saved_alone),
                b(p.saved_share),
                _pct(p.saved_share, present),
            )
        )
    table(("PID", "COMM", "PRESENT", "ZERO", "KSM-NOW", "SAVE-ALONE", "SAVE-ALL", "SAVE%"), rows)
    print()
    print(
        f"If all scanned memory merged, KSM would save {b(t['saved'])} "
        f"({_pct(t['saved'], t['present'])} of present):"
    )
    print(f"  {b(t['saved_within'])} within processes, {b(est.saved_across)} only by merging across them.")
    print(f"KSM saves {b(t['saved_now'])} of it already ({b(t['ksm'])} in KSM pages).")
    print(f"{t['distinct']} distinct page contents, {t['dup_groups']} of them duplicated.")
    if t["volatile_pages"] or t["hash_collisions"]:
        print(
            f"{t['volatile_pages']} pages changed or vanished while read; "
            f"{t['hash_collisions']} 64-bit hash collisions resolved by comparing bytes."
        )
    regions = sorted((r for p in est.processes for r in p.regions), key=lambda r: -r.saved_share)
    regions = [r for r in regions if r.present]
    if nregions:
        regions = regions[:nregions]
    if regions:
        print()
        rrows = [
            (
                r.pid,
                f"{r.start:x}-{r.end:x}",
                b(r.present),
                b(r.dup_region),
                b(r.dup_process),
                b(r.dup_cross),
                b(r.saved_share),
                _pct(r.saved_share, r.present),
                ("*" if r.mergeable else "") + r.name[-14:],
            )
            for r in regions
        ]
        table(
            ("PID", "RANGE", "PRESENT", "DUP-REG", "DUP-PROC", "DUP-XPROC", "SAVE", "SAVE%", "NAME"),
            rrows,
            right=(True, False, True, True, True, True, True, True, False),
        )
        print("(* already mergeable; DUP-*: pages with a twin in the region / elsewhere in the process /")
        print(" only in other processes; SAVE: the region's share of the saving when everything merges)")
    skipped = sum(len(p.skipped) for p in est.processes)
    if skipped:
        print(f"\n{skipped} mappings skipped: KSM cannot merge them (shared, file-backed, special).")
    if est.gone or est.denied:
        print(f"Left out: {len(est.gone)} processes exited, {len(est.denied)} not readable.")
