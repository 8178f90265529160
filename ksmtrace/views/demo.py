"""``ksmtrace demo``: one line per step, as the kernel reports it."""

from __future__ import annotations

from typing import Any

from ksmtrace.probes.optins import OptinEvent
from ksmtrace.views.fmt import human_bytes


def workload(pid: int, addr: int, length: int) -> str:
    return f"workload pid {pid}: {human_bytes(length)} of identical private anonymous pages at {addr:#x}"


def loading() -> str:
    return "probes   loading opt-in, fault and ksmd probes for this pid..."


def probe_missing(name: str, why: str) -> str:
    return f"probe    {name}: unavailable ({why})"


def optin_seen(e: OptinEvent) -> str:
    return f"opt-in   pid {e.pid} {e.describe_call()} = {e.result()}  (seen by BPF)"


def optin_unseen(pid: int, addr: int, length: int, ret: int) -> str:
    return f"opt-in   pid {pid} madvise({addr:#x}, {length}, MADV_MERGEABLE) = {ret}"


def knobs(settings: tuple[tuple[str, int], ...]) -> str:
    return "ksmd     " + " ".join(f"{k}={v}" for k, v in settings) + " (restored on exit)"


def merging(t: float, merged: int, pages: int, traced: int | None, sharing: Any) -> str:
    extra = "" if traced is None else f"  merges traced: {traced}"
    return f"merging  t={t:4.1f}s  KSM pages in workload: {merged:6d}/{pages}{extra}  pages_sharing={sharing}"


def writes(pid: int, written: int, ksm_cow: int | None, cow: int | None, after: int) -> str:
    line = f"writes   pid {pid} wrote to {written} merged pages"
    if ksm_cow is not None:
        line += f": {ksm_cow} KSM copy-on-write faults traced for it"
    return f"{line}; machine-wide cow_ksm +{cow}; KSM pages left {after}"


def done() -> str:
    return "KSM settings restored. Next: 'ksmtrace snoop', 'ksmtrace faults', 'ksmtrace status'."
