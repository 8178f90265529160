"""``ksmtrace merge`` / ``unmerge``: the ranges chosen and each injected madvise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ksmtrace.kernel.abi import ADVICE_NAMES
from ksmtrace.remote import Injection
from ksmtrace.scan import RegionEstimate
from ksmtrace.views.fmt import human_bytes, table


def choice_json(pid: int, chosen: Sequence[RegionEstimate]) -> dict[str, Any]:
    ranges = [
        {"start": r.start, "end": r.end, "name": r.name, "saved_pages": round(r.saved_share, 1)}
        for r in chosen
    ]
    return {"pid": pid, "dry_run": True, "ranges": ranges}


def injections_json(pid: int, done: Sequence[Injection]) -> dict[str, Any]:
    return {"pid": pid, "injections": [d.as_dict() for d in done]}


def choice(chosen: Sequence[RegionEstimate], page: int, exact: bool) -> list[str]:
    if not chosen:
        return ["No region is worth merging at these thresholds."]
    rows = [
        (
            f"{r.start:x}-{r.end:x}",
            human_bytes(r.present * page, exact),
            human_bytes(r.saved_share * page, exact),
            f"{r.saving_ratio * 100:.1f}%",
            r.name[-24:],
        )
        for r in chosen
    ]
    return table(("RANGE", "PRESENT", "SAVE", "SAVE%", "NAME"), rows, right=(False, True, True, True, False))


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


def text(
    pid: int, chosen: Sequence[RegionEstimate], done: Sequence[Injection], page: int, exact: bool
) -> list[str]:
    out: list[str] = []
    if chosen:
        out += [*choice(chosen, page, exact), ""]
    return out + injections(pid, done, exact)
