"""``ksmtrace status``: the machine's KSM knobs and counters and who is mergeable."""

from __future__ import annotations

from typing import Any

from ksmtrace.model.snapshot import Snapshot
from ksmtrace.views.fmt import human_bytes, table

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
RUN_STATES = {0: "stopped", 1: "merging", 2: "unmerging all"}


def as_json(snap: Snapshot) -> dict[str, Any]:
    return {
        "page_size": snap.page_size,
        "knobs": snap.knobs,
        "counters": snap.counters,
        "vmstat": snap.vmstat,
        "processes": [p.as_dict() for p in snap.processes],
        "skipped": {"exited": snap.skipped.exited, "denied": snap.skipped.denied},
        "features": snap.features,
    }


def text(snap: Snapshot, exact: bool = False) -> list[str]:
    page = snap.page_size
    knobs, counters = snap.knobs, snap.counters
    run_state = RUN_STATES.get(knobs.get("run"), str(knobs.get("run")))  # type: ignore[arg-type]
    out = [
        f"KSM: {run_state}  (ksmd scans {knobs.get('pages_to_scan')} pages every "
        f"{knobs.get('sleep_millisecs')} ms)",
        "",
    ]
    out += table(("KNOB", "VALUE"), list(knobs.items()), right=(False, True))
    missing = [f"{f['what']} ({f['since']}+)" for f in snap.features.values() if not f["available"]]
    if missing:
        out += ["", f"Unavailable on this kernel: {'; '.join(missing)}"]
    out.append("")
    crow = []
    for k, v in counters.items():
        extra = human_bytes(v * page, exact) if k in _PAGE_COUNTERS and isinstance(v, int) else ""
        if k == "general_profit" and isinstance(v, int):
            extra = human_bytes(v, exact)
        crow.append((k, v, extra))
    for k, v in snap.vmstat.items():
        crow.append((f"vmstat {k}", v, "copies of KSM pages" if k == "cow_ksm" else ""))
    out += table(("COUNTER", "VALUE", "SIZE"), crow, right=(False, True, True))
    out.append("")
    if not snap.processes:
        out.append(
            "No process is mergeable (none has called madvise(MADV_MERGEABLE) or prctl(PR_SET_MEMORY_MERGE))."
        )
    else:
        rows = [
            (
                p.pid,
                p.comm[:16],
                "prctl" if p.merge_any else "madvise",
                len(p.regions),
                human_bytes(p.mergeable_bytes, exact),
                p.merging_pages,
                human_bytes(p.merging_pages * page, exact),
                human_bytes(p.profit, exact),
            )
            for p in sorted(snap.processes, key=lambda p: -p.merging_pages)
        ]
        out += table(
            ("PID", "COMM", "OPT-IN", "REGIONS", "MERGEABLE", "MERGING(pg)", "MERGING", "PROFIT"), rows
        )
    sk = snap.skipped
    if sk.exited or sk.denied:
        out += ["", f"({sk.exited} processes exited while read, {sk.denied} not readable)"]
    return out
