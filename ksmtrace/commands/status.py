"""ksmtrace status: the machine's KSM state and who is mergeable now."""

from __future__ import annotations

import argparse
from typing import Any

from ksmtrace import inventory
from ksmtrace.kernel import features, ksm_sysfs, vmstat
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.views.fmt import emit_json, human_bytes, table

# Counters that count pages: shown in bytes too.
_PAGE_COUNTERS = {
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_skipped",
    "ksm_zero_pages",
    "pages_scanned",
}
_RUN = {0: "stopped", 1: "merging", 2: "unmerging all"}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="machine-wide KSM knobs and counters, and the mergeable processes",
        description="Print every KSM knob and counter this kernel has, cow_ksm from "
        "/proc/vmstat, and the processes that are mergeable now with their "
        "merging pages and profit (from /proc/PID/ksm_stat).",
    )
    p.add_argument("-j", "--json", action="store_true", help="print JSON")
    p.add_argument("--bytes", action="store_true", help="exact byte counts instead of KiB/MiB")
    p.set_defaults(run=run)


def collect(proc: ProcFS | None = None) -> dict[str, Any]:
    sysfs = ksm_sysfs.read()
    inv = inventory.take(proc)
    page = ksm_sysfs.page_size()
    return {
        "page_size": page,
        "knobs": sysfs.knobs,
        "counters": sysfs.counters,
        "vmstat": vmstat.ksm_vmstat(),
        "processes": [p.as_dict() for p in inv.processes],
        "skipped": {"exited": inv.exited, "denied": inv.denied},
        "features": features.report(),
    }


def run(args: argparse.Namespace) -> int:
    data = collect()
    if args.json:
        emit_json(data)
        return 0
    render(data, exact=args.bytes)
    return 0


def render(data: dict[str, Any], exact: bool = False) -> None:
    page = data["page_size"]
    knobs, counters = data["knobs"], data["counters"]
    run_state = _RUN.get(knobs.get("run"), str(knobs.get("run")))
    print(
        f"KSM: {run_state}  (ksmd scans {knobs.get('pages_to_scan')} pages every "
        f"{knobs.get('sleep_millisecs')} ms)"
    )
    print()
    rows = [(k, v) for k, v in knobs.items()]
    table(("KNOB", "VALUE"), rows, right=(False, True))
    missing = [f"{f['what']} ({f['since']}+)" for f in data["features"].values() if not f["available"]]
    if missing:
        print(f"\nUnavailable on this kernel: {'; '.join(missing)}")
    print()
    crow = []
    for k, v in counters.items():
        extra = human_bytes(v * page, exact) if k in _PAGE_COUNTERS and isinstance(v, int) else ""
        if k == "general_profit" and isinstance(v, int):
            extra = human_bytes(v, exact)
        crow.append((k, v, extra))
    for k, v in data["vmstat"].items():
        crow.append((f"vmstat {k}", v, "copies of KSM pages" if k == "cow_ksm" else ""))
    table(("COUNTER", "VALUE", "SIZE"), crow, right=(False, True, True))
    print()
    procs = data["processes"]
    if not procs:
        print(
            "No process is mergeable (none has called madvise(MADV_MERGEABLE) or prctl(PR_SET_MEMORY_MERGE))."
        )
    else:
        rows2 = [
            (
                p["pid"],
                p["comm"][:16],
                "prctl" if p["merge_any"] else "madvise",
                p["mergeable_regions"],
                human_bytes(p["mergeable_bytes"], exact),
                p["merging_pages"],
                human_bytes(p["merging_pages"] * page, exact),
                human_bytes(p["profit_bytes"], exact),
            )
            for p in sorted(procs, key=lambda p: -p["merging_pages"])
        ]
        table(
            ("PID", "COMM", "OPT-IN", "REGIONS", "MERGEABLE", "MERGING(pg)", "MERGING", "PROFIT"),
            rows2,
        )
    sk = data["skipped"]
    if sk["exited"] or sk["denied"]:
        print(f"\n({sk['exited']} processes exited while read, {sk['denied']} not readable)")
