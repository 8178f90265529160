"""Which processes the daemon may merge, which it must never touch, and their trust domains.

Everything here is decided from a :class:`ProcFacts` record (comm, exe,
cgroup, uid, whether the process opted in itself), read once per process
and look through :class:`ksmtrace.kernel.procfs.ProcFS`; the policy's rules
(:mod:`ksmtrace.coordinator.policy`) are matched against it. ``never``
always wins, whatever else matches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from ksmtrace.coordinator.policy import Match, Policy
from ksmtrace.errors import AccessDenied, ProcessGone
from ksmtrace.kernel.abi import kernel_comm
from ksmtrace.kernel.procfs import ProcFS

Role = Literal["candidate", "self", "never", "other"]

# Processes without a [[domain]] rule share this one: KSM then merges them
# only with each other.
UNDECLARED = ""


@dataclass(frozen=True)
class ProcFacts:
    pid: int
    starttime: int  # with pid, names one process across pid reuse
    comm: str
    exe: str | None
    cgroup: str | None
    uid: int
    self_opted: bool  # opted in itself (madvise or prctl), not by ksmtrace
    kernel_thread: bool = False


def read_facts(proc: ProcFS, pid: int, ours: bool = False) -> ProcFacts:
    """One process's facts; ``ours``: its mergeable areas are the daemon's doing.

    Raises ProcessGone or AccessDenied as ProcFS does.
    """
    stat = proc.stat(pid)
    status = proc.status(pid)
    return ProcFacts(
        pid=pid,
        starttime=stat.starttime,
        comm=stat.comm,
        exe=proc.exe(pid),
        cgroup=proc.cgroup(pid),
        uid=status.uid,
        self_opted=not ours and proc.is_mergeable(pid),
        kernel_thread=status.is_kernel_thread,
    )


def matches(rule: Match, f: ProcFacts) -> bool:
    if rule.empty():
        return False
    if rule.comm and kernel_comm(f.comm) not in {kernel_comm(c) for c in rule.comm}:
        return False
    if rule.exe and not (f.exe and (f.exe in rule.exe or os.path.basename(f.exe) in rule.exe)):
        return False
    if rule.cgroup and not (f.cgroup and any(_under(f.cgroup, c) for c in rule.cgroup)):
        return False
    return not (rule.uid and f.uid not in rule.uid)


def _under(path: str, top: str) -> bool:
    top = top.rstrip("/") or "/"
    return path == top or path.startswith(top if top.endswith("/") else top + "/")


def _where(rule: Match) -> str:
    return f" (line {rule.line})" if rule.line else ""


@dataclass(frozen=True)
class Verdict:
    facts: ProcFacts
    role: Role
    domain: str
    reason: str
    overruled: bool = False  # a never rule won over a candidate rule


def classify(policy: Policy, f: ProcFacts) -> Verdict:
    """What the policy says of one process, with the rule that said it."""
    domain = next((d.name for d in policy.domains if matches(d.match, f)), UNDECLARED)
    if f.kernel_thread:
        return Verdict(f, "other", domain, "a kernel thread")
    for rule in policy.never:
        if matches(rule, f):
            won = next((c for c in policy.candidates if matches(c, f)), None)
            if won is not None:
                why = f"a [[never]] rule{_where(rule)} wins over the [[candidate]] rule{_where(won)}"
                return Verdict(f, "never", domain, why, overruled=True)
            return Verdict(f, "never", domain, f"matches a [[never]] rule{_where(rule)}")
    for rule in policy.candidates:
        if matches(rule, f):
            return Verdict(f, "candidate", domain, f"matches a [[candidate]] rule{_where(rule)}")
    if f.self_opted and policy.self_opted:
        return Verdict(f, "self", domain, "opted in itself")
    return Verdict(f, "other", domain, "matches no rule")


def survey(policy: Policy, proc: ProcFS, ours: set[int]) -> list[Verdict]:
    """Every user process's verdict; processes that vanish or hide are left out."""
    out = []
    me = os.getpid()
    for pid in proc.pids():
        if pid == me:
            continue
        try:
            out.append(classify(policy, read_facts(proc, pid, ours=pid in ours)))
        except (ProcessGone, AccessDenied):
            continue
    return out


def domain_label(name: str) -> str:
    return f"domain {name!r}" if name else "no declared domain"
