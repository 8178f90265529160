"""``ksmtrace merge`` / ``unmerge``: the ranges chosen and each injected madvise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ksmtrace.coordinator.worth import Choices
from ksmtrace.kernel.abi import ADVICE_NAMES
from ksmtrace.remote import Injection
from ksmtrace.views.fmt import human_bytes, table


def choice_json(chosen: Choices) -> dict[str, Any]:
    ranges = [
        {
            "start": c.start,
            "end": c.end,
            "name": c.name,
            "dup_pages": c.dup_pages,
            "saved_pages": round(c.predicted_saving_pages, 1),
            "reason": c.reason,
        }
        for c in chosen.ranges
    ]
    left_out = {
        "short_runs": chosen.short,
        "max_ranges": chosen.over_max_ranges,
        "vma_headroom": chosen.over_vma_headroom,
    }
    return {"pid": chosen.pid, "dry_run": True, "ranges": ranges, "left_out": left_out}


def injections_json(pid: int, done: Sequence[Injection]) -> dict[str, Any]:
    return {"pid": pid, "injections": [d.as_dict() for d in done]}


def _notes(chosen: Choices, page: int, exact: bool) -> list[str]:
    out = []
    if chosen.too_small:
        out.append(
            f"Left alone: together the runs would save {human_bytes(chosen.too_small * page, exact)}, "
            "under --min-pages."
        )
    if chosen.over_vma_headroom:
        out.append(
            f"{chosen.over_vma_headroom} more ranges worth it were left out: their VMAs would pass "
            f"the share of vm.max_map_count allowed (room for {chosen.vma_headroom})."
        )
    if chosen.over_max_ranges:
        out.append(
            f"{chosen.over_max_ranges} more ranges worth it were left out: at most so many per process."
        )
    return out


def choice(chosen: Choices, page: int, exact: bool) -> list[str]:
    if not chosen.ranges:
        return [
            "No run of duplicate pages is worth merging at these thresholds.",
            *_notes(chosen, page, exact),
        ]
    rows = [
        (
            f"{c.start:x}-{c.end:x}",
            human_bytes(c.length, exact),
            str(c.dup_pages),
            f"{c.dup_pages * page * 100 / c.length:.0f}%",
            human_bytes(c.predicted_saving_pages * page, exact),
            c.name[-24:],
        )
        for c in chosen.ranges
    ]
    total = human_bytes(chosen.saving_pages * page, exact)
    return [
        *table(
            ("RANGE", "SIZE", "DUP", "DENSE", "SAVE", "NAME"),
            rows,
            right=(False, True, True, True, True, False),
        ),
        f"{len(rows)} range{'s' if len(rows) > 1 else ''}, "
        f"{sum(c.dup_pages for c in chosen.ranges)} duplicate pages, save {total}",
        *_notes(chosen, page, exact),
    ]


def injections(pid: int, done: Sequence[Injection], exact: bool) -> list[str]:
    if not done:
        return [f"pid {pid}: nothing to do"]
    out = []
    for d in done:
        who = f"pid {d.pid}" if d.tid == d.pid else f"pid {d.pid} tid {d.tid}"
        out.append(
            f"{who}: madvise({d.start:#x}, {human_bytes(d.end - d.start, exact)}, "
            f"{ADVICE_NAMES.get(d.advice, str(d.advice))}) = {d.ret} in {d.micros:.0f} us"
            f"{' (was in a syscall: restarted)' if d.in_syscall else ''}"
        )
    return out


def text(pid: int, chosen: Choices | None, done: Sequence[Injection], page: int, exact: bool) -> list[str]:
    out: list[str] = []
    if chosen is not None:
        out += [*choice(chosen, page, exact), ""]
    return out + injections(pid, done, exact)
