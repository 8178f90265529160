"""``ksmtrace faults``: KSM COW faults, write-protect faults and merges per process and region."""

from __future__ import annotations

from typing import Any

from ksmtrace.model.faults import FaultsReport
from ksmtrace.views.fmt import human_bytes, table

# Counters that mean something was not counted (or not per region).
_LOSSES = ("proc_drops", "walk_failures", "ksmd_proc_drops", "ksmd_page_drops")


def as_json(rep: FaultsReport, now: str) -> dict[str, Any]:
    """One JSON line per interval; ``now`` is the wall-clock time shown (HH:MM:SS)."""
    return {"time": now, **rep.as_dict()}


def _rate(v: float) -> str:
    return f"{v:.0f}" if v >= 10 or v == 0 else f"{v:.1f}"


def _region(start: int, end: int, name: str, mergeable: bool, exact: bool, daemon: bool = False) -> str:
    if not start:
        return name
    size = human_bytes(end - start, exact)
    short = name if len(name) <= 10 else "…" + name[-9:]
    # "daemon": made mergeable by ksmtrace daemon (so mergeable too)
    return f"{start:x}+{size} {short}{' daemon' if daemon else ' mg' if mergeable else ''}"


def text(rep: FaultsReport, now: str, exact: bool = False, filtered: bool = False) -> list[str]:
    cow = "-" if rep.cow_ksm is None else str(rep.cow_ksm.delta)
    who = "in the processes shown" if filtered else "traced"
    out = [
        "",
        f"{now}  KSM COW faults: {rep.ksm_cow_sum} {who}, "
        f"{cow} in /proc/vmstat cow_ksm ({rep.interval:.1f}s)",
    ]
    lost = {k: v for k, v in rep.drops.items() if v and k in _LOSSES}
    if lost:
        out.append(
            "  not counted (maps full or unreadable): " + ", ".join(f"{k}={v}" for k, v in lost.items())
        )
    if rep.drops.get("merged_drops"):
        out.append(
            f"  merged-page set full ({rep.drops['merged_drops']} pages): "
            "those processes are checked fault by fault"
        )
    # Counted, but not per process (cumulative since start, like the drops).
    if rep.drops.get("untracked_ksm_cow"):
        out.append(
            f"  {rep.drops['untracked_ksm_cow']} KSM COW faults of pids beyond the table "
            "(pid_max raised since start): in cow_ksm, not in any process"
        )
    if rep.drops.get("kernel_mode_ksm_cow"):
        out.append(
            f"  {rep.drops['kernel_mode_ksm_cow']} KSM COW faults taken in kernel mode "
            "(read(2) and the like writing into merged pages)"
        )
    if not rep.processes:
        out.append("  no mergeable process faulted or merged yet")
        return out
    m = rep.merges_available
    rows: list[tuple[object, ...]] = []
    for p in rep.processes:
        r = p.rates
        saved = "-" if p.profit_bytes is None else human_bytes(p.profit_bytes, exact)
        rows.append(
            (
                p.pid,
                p.comm[:12],
                "(all)",
                _rate(r["ksm_cow"].per_s),
                _rate(p.wp_mergeable.per_s),
                _rate(r["merges"].per_s) if m else "-",
                _rate(r["unmerges"].per_s) if m else "-",
                r["ksm_cow"].total,
                saved,
            )
        )
        for g in p.regions:
            rr = g.rates
            rows.append(
                (
                    "",
                    "",
                    _region(g.start, g.end, g.name, g.mergeable, exact, g.made_by_daemon),
                    _rate(rr["ksm_cow"].per_s),
                    _rate(rr["wp"].per_s) if g.mergeable else "-",
                    _rate(rr["merges"].per_s) if m else "-",
                    _rate(rr["unmerges"].per_s) if m else "-",
                    rr["ksm_cow"].total,
                    "-" if g.ksm_bytes is None else human_bytes(g.ksm_bytes, exact),
                )
            )
    out += table(
        ("PID", "COMM", "REGION", "KSMCOW/s", "WPMG/s", "MERGE/s", "UNMRG/s", "KSMCOW", "SAVED"),
        rows,
        right=(True, False, False, True, True, True, True, True, True),
    )
    return out
