"""``ksmtrace ksmd``: one line per interval (a time series, so fixed-width columns, not a table)."""

from __future__ import annotations

from typing import Any

from ksmtrace.model.ksmd import KsmdInterval

HEADERS = (
    "TIME", "ROUNDS", "ROUND(ms)", "MAX(ms)", "RMAP", "SCAN/s", "MERGE/s", "UNMRG/s",
    "SHARING", "CPU%", "ADVISOR",
)  # fmt: skip
WIDTHS = (8, 6, 9, 9, 8, 9, 8, 8, 8, 5, 12)
HEADER_EVERY = 20  # repeat the header like vmstat does


def as_json(iv: KsmdInterval, now: str) -> dict[str, Any]:
    return {"time": now, **iv.as_dict()}


def _f(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def text(iv: KsmdInterval, now: str, header: bool = True) -> list[str]:
    adv = "-"
    if iv.advisor_pages_to_scan is not None:
        adv = f"{iv.advisor_pages_to_scan}pg/{iv.advisor_cpu_pct}%"
    row = (
        now,
        iv.rounds,
        _f(iv.round_ms_avg, "{:.1f}"),
        _f(iv.round_ms_max, "{:.1f}"),
        _f(iv.rmap_entries),
        _f(iv.pages_scanned_per_s),
        _f(iv.merges_per_s),
        _f(iv.unmerges_per_s),
        f"{iv.sharing_delta:+d}",
        _f(iv.cpu_pct, "{:.1f}"),
        adv,
    )
    out = []
    if header:
        out.append(
            "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(HEADERS, WIDTHS)))
        )
    out.append(
        "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, WIDTHS)))
    )
    return out
