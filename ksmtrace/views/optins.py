"""Text and JSON for opt-ins: snoop lines, the start-up inventory, the optins tables."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ksmtrace.model.inventory import Inventory, MergeableProcess
from ksmtrace.model.optins import Report
from ksmtrace.probes.optins import OptinEvent, ProbeStats
from ksmtrace.views.fmt import human_bytes, table

_SHORT = {
    "MADV_MERGEABLE": "MERGE",
    "MADV_UNMERGEABLE": "UNMERGE",
}


def _call(ev: OptinEvent) -> str:
    """Call and advice in at most 17 characters."""
    if ev.syscall == "prctl":
        return f"prctl SET_MERGE {ev.arg}" if ev.op == 67 else "prctl GET_MERGE"
    if ev.inherited:
        return f"{ev.syscall} {'merge_any' if 'merge_any' in ev.op_name else 'mergeable'}"
    call = "pmadvise" if ev.syscall == "process_madvise" else "madvise"
    return f"{call} {_SHORT.get(ev.op_name, ev.op_name)}"


def _result(ev: OptinEvent, exact: bool) -> str:
    """The return value, or the errno's name on failure (the value is then -1)."""
    if ev.syscall == "fork":
        return f"parent {ev.target_pid}"
    if ev.syscall == "exec":
        return f"old pid {ev.target_pid}" if ev.target_pid != ev.tid else "-"
    if ev.syscall == "process_madvise":
        # Success returns the bytes advised; a pidfd of another process is named.
        out = human_bytes(ev.ret, exact) if ev.ok else ev.error
        if ev.target_pid != ev.pid:
            out += f" >{ev.target_pid or '?'}"
        return out
    return str(ev.ret) if ev.ok else ev.error


SNOOP_COLUMNS = ("PID", "TID", "COMM", "CALL", "START", "LENGTH", "RESULT")
_WIDTHS = (7, 7, 15, 17, 14, 9)


def snoop_header(timestamps: bool) -> str:
    cols = [
        c.ljust(w) if i in (2, 3, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(SNOOP_COLUMNS, _WIDTHS))
    ]
    cols.append("RESULT")
    return ("TIME     " if timestamps else "") + " ".join(cols)


def snoop_line(ev: OptinEvent, timestamps: bool = False, exact: bool = False) -> str:
    has_range = ev.syscall in ("madvise", "process_madvise")
    vals = (
        str(ev.pid).rjust(7),
        str(ev.tid).rjust(7),
        ev.comm[:15].ljust(15),
        _call(ev).ljust(17),
        (f"{ev.start:#x}" if has_range else "-").ljust(14),
        (human_bytes(ev.length, exact) if has_range else "-").rjust(9),
        _result(ev, exact),
    )
    ts = time.strftime("%H:%M:%S ", time.localtime(ev.wall)) if timestamps else ""
    return ts + " ".join(vals)


def event_json(ev: OptinEvent) -> dict[str, Any]:
    return {"type": "event", **ev.as_dict()}


def inventory_json(p: MergeableProcess) -> dict[str, Any]:
    return {"type": "inventory", **p.as_dict(), "regions": p.region_dicts()}


def inventory_table(procs: Sequence[MergeableProcess], exact: bool = False) -> list[str]:
    rows = [
        (
            p.pid,
            p.comm[:15],
            p.how[:16],
            p.ppid,
            len(p.regions),
            human_bytes(p.mergeable_bytes, exact),
            p.merging_pages,
        )
        for p in procs
    ]
    return table(("PID", "COMM", "HOW", "PPID", "REGIONS", "MERGEABLE", "KSM_STAT(pg)"), rows)


def snoop_inventory(inv: Inventory, exact: bool = False) -> list[str]:
    """snoop's first lines: who had opted in before tracing started."""
    out = ["Opted in before tracing started (from /proc):"]
    out += inventory_table(inv.processes, exact) if inv.processes else ["(none)"]
    if inv.exited or inv.denied:
        out.append(f"({inv.exited} exited while read, {inv.denied} not readable: skipped)")
    out.append("")
    return out


def snoop_summary_json(st: ProbeStats, events: int, inv: Inventory | None) -> dict[str, Any]:
    return {
        "type": "summary",
        "events": events,
        "lost": st.lost,
        "inflight_full": st.inflight_full,
        "madvise_calls": st.madvise_calls,
        "inventory": None
        if inv is None
        else {"processes": len(inv.processes), "exited": inv.exited, "denied": inv.denied},
    }


def snoop_summary(st: ProbeStats) -> list[str]:
    out = []
    if st.lost:
        out.append(f"{st.lost} events lost (ring buffer full)")
    if st.inflight_full:
        out.append(f"{st.inflight_full} calls not followed (per-thread table full)")
    if st.madvise_calls is not None:
        out.append(f"{st.madvise_calls} madvise calls of any advice passed the filters")
    return out


def optins_json(rep: Report) -> dict[str, Any]:
    return {
        "page_size": rep.page_size,
        "processes": [p.as_dict() for p in rep.processes],
        "skipped": {"exited": rep.exited, "denied": rep.denied},
    }


def optins_tables(
    rep: Report, exact: bool = False, max_regions: int | None = 10, asked: Sequence[int] = ()
) -> list[str]:
    """One table of processes, then each process's regions, largest first;
    then a line for each ``asked`` pid that has not opted in."""
    out: list[str] = []
    if not rep.processes:
        out.append("No process has opted in to KSM.")
    else:
        rows = [
            (
                lp.proc.pid,
                lp.proc.comm[:15],
                lp.proc.how[:16],
                len(lp.regions),
                human_bytes(lp.proc.mergeable_bytes, exact),
                lp.ksm_pages,
                lp.proc.merging_pages,
                human_bytes(lp.saving, exact),
            )
            for lp in sorted(rep.processes, key=lambda lp: (-lp.ksm_pages, lp.proc.pid))
        ]
        # MERGING(pg) is live (pagemap); STAT(pg) is ksm_stat's, as of ksmd's last visit.
        out += table(
            ("PID", "COMM", "HOW", "REGIONS", "MERGEABLE", "MERGING(pg)", "STAT(pg)", "SAVING"), rows
        )
        for lp in sorted(rep.processes, key=lambda lp: lp.proc.pid):
            regs = sorted(lp.regions, key=lambda r: -int(r.region["length"]))  # type: ignore[call-overload]
            shown = regs if max_regions is None else regs[:max_regions]
            plural = "" if len(regs) == 1 else "s"
            out += ["", f"pid {lp.proc.pid} ({lp.proc.comm}): {len(regs)} opted-in region{plural}"]
            if lp.proc.made_by_daemon:
                runs, dup = lp.proc.made_by_daemon
                out.append(f"made mergeable by ksmtrace daemon: {dup} duplicate pages in {runs} runs")
            out += table(
                ("START", "SIZE", "HOW", "KSM:(smaps)", "MERGING(pg)", "MAPPING"),
                [
                    (
                        f"{int(r.region['start']):#x}",  # type: ignore[call-overload]
                        human_bytes(int(r.region["length"]), exact),  # type: ignore[call-overload]
                        _how(r.region),
                        "-"
                        if r.region["ksm_bytes"] is None
                        else human_bytes(int(r.region["ksm_bytes"]), exact),  # type: ignore[call-overload]
                        r.ksm_pages,
                        str(r.region["name"])[-40:],
                    )
                    for r in shown
                ],
                right=(False, True, False, True, True, False),
            )
            if len(shown) < len(regs):
                out.append(f"... {len(regs) - len(shown)} smaller regions not shown (--all-regions)")
    if rep.exited or rep.denied:
        out += ["", f"({rep.exited} processes exited while read, {rep.denied} not readable: skipped)"]
    shown_pids = {lp.proc.pid for lp in rep.processes}
    for pid in asked:
        if pid not in shown_pids:
            out.append(f"pid {pid}: has not opted in (no mergeable region, no merge_any)")
    return out


def _how(region: dict[str, object]) -> str:
    if region["how"] == "fork":
        return f"fork:{region['inherited_from']}"
    return str(region["how"])
