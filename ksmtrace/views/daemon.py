"""ksmtrace daemon: one line per decision (journald reads stdout), or one JSON line with -j."""

from __future__ import annotations

import time

from ksmtrace.coordinator.decisions import Decision
from ksmtrace.coordinator.policy import Policy

PAGE = 4096


def line(d: Decision) -> str:
    """``merge pid 1234 (qemu) 7f00..-7f01.. 512 pages: <reason>``; "would" in observe mode."""
    when = time.strftime("%H:%M:%S", time.localtime(d.t))
    verb = d.action if d.applied or d.action not in ("merge", "unmerge", "ksmd") else f"would {d.action}"
    who = f" pid {d.pid} ({d.comm})" if d.pid is not None and d.comm else (f" pid {d.pid}" if d.pid else "")
    where = ""
    if d.start is not None and d.end is not None:
        where = f" {d.start:#x}-{d.end:#x} ({(d.end - d.start) // PAGE} pages)"
    return f"{when} {verb}{who}{where}: {d.reason}"


def as_json(d: Decision) -> dict[str, object]:
    return d.as_dict()


def policy_summary(p: Policy) -> str:
    """One sentence: what a policy file makes the daemon do (for --check-policy and the start line)."""
    parts = [
        f"mode {p.mode}",
        f"{len(p.candidates)} candidate rules",
        f"{len(p.never)} never rules",
        f"{len(p.domains)} trust domains",
        "self-opted processes " + ("included" if p.self_opted else "left alone"),
        f"ksmd budget {p.ksmd.budget_pct:g}% of a core",
        f"a look every {p.interval_s:g} s",
    ]
    return f"{p.source}: " + ", ".join(parts)
