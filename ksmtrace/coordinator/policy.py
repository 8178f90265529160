"""The daemon's policy: what it may merge, what it must never merge, and its budgets.

A TOML file (read with tomllib) becomes one frozen :class:`Policy`. With no
file the daemon runs the default policy, which only observes.

This module holds the records, their defaults and :class:`PolicyError`;
``load()``/``parse()`` (implemented in :mod:`.policy_file`) validate a file
and refuse every mistake with its line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from os import PathLike
from typing import Literal

from ksmtrace.errors import UsageError

Mode = Literal["observe", "enforce"]


@dataclass(frozen=True)
class Match:
    """Which processes a rule names. Every field that is given must match
    (AND); inside a field any listed value may match (OR). A rule with no
    field matches nothing.

    comm: the kernel's comm (compared as the kernel truncates it, 15 bytes);
    exe: an executable's full path or basename; cgroup: a cgroup v2 path
    (``/machine.slice``) that names the group or one of its ancestors;
    uid: real uids.
    """

    comm: tuple[str, ...] = ()
    exe: tuple[str, ...] = ()
    cgroup: tuple[str, ...] = ()
    uid: tuple[int, ...] = ()
    line: int = 0  # where the rule starts in the policy file, for messages

    def empty(self) -> bool:
        return not (self.comm or self.exe or self.cgroup or self.uid)


@dataclass(frozen=True)
class Domain:
    """A trust domain: processes of two domains are never mergeable at once."""

    name: str
    match: Match


@dataclass(frozen=True)
class Runs:
    """Which runs of duplicate pages are worth making mergeable."""

    min_run_pages: int = 4  # a run of fewer duplicate pages is left alone (a VMA per run is not free)
    max_gap_pages: int = 8  # runs closer than this are joined into one range
    # A process's chosen ranges must save at least this many pages together (per
    # range it would drop most short runs: duplicates in runs of 2-32 pages lose a fifth).
    min_saving_pages: int = 16
    stable_looks: int = 2  # looks in a row a run must be seen duplicate in
    max_ranges_per_process: int = 256  # VMAs the daemon may create by splitting, per process
    max_map_count_share: float = 0.5  # ... and never past this share of vm.max_map_count
    # How a candidate is looked at again (ksmtrace.coordinator.relook). "soft-dirty":
    # skip the scan when none of its pages was written and its mappings are the
    # same; the price is paid by the target (its PTEs are write-protected at each
    # clear, so its next write to each page takes a minor fault) and by any other
    # soft-dirty user of the process (CRIU's pre-dump), whose bits the clear erases:
    # "rescan" reads and hashes every page at every look and touches nothing.
    relook: Literal["soft-dirty", "rescan"] = "soft-dirty"


@dataclass(frozen=True)
class Churn:
    """When a merged range costs more than it saves, and how long before it may come back."""

    max_cow_per_page_min: float = 1.0  # KSM COW faults per saved page per minute
    max_rmap_per_merged: float = 64.0  # ksm_rmap_items / ksm_merging_pages (KSM docs' rule)
    window_s: float = 60.0  # the rate is measured over this long
    cooldown_s: float = 600.0  # an unmerged range stays out this long


@dataclass(frozen=True)
class Ksmd:
    """ksmd's knobs, governed to a CPU budget."""

    budget_pct: float = 5.0  # percent of one core, measured from ksmd's CPU time
    full_scan_s: float = 60.0  # wish: the mergeable set scanned this often
    advisor: Literal["off", "kernel"] = "off"  # kernel: advisor_mode=scan-time with our budget
    min_pages_to_scan: int = 16
    max_pages_to_scan: int = 16384
    sleep_millisecs: int = 20


@dataclass(frozen=True)
class Dashboard:
    """What the daemon serves over HTTP: metrics, the web page, its JSON API (read-only)."""

    listen: str = "127.0.0.1:9477"  # HOST:PORT, or "off"; not loopback: anyone who reaches it reads it
    top_n: int = 10  # processes with their own metric series (by saving); the rest sum into "other"


@dataclass(frozen=True)
class Policy:
    mode: Mode = "observe"
    interval_s: float = 10.0  # a look at candidates' memory this often
    candidates: tuple[Match, ...] = ()  # [[candidate]]
    self_opted: bool = True  # processes that opt in themselves are candidates too
    narrow_self_opted: bool = False  # may the daemon unmerge parts of self-opted processes
    never: tuple[Match, ...] = ()  # [[never]]: always wins
    domains: tuple[Domain, ...] = ()  # [[domain]]
    runs: Runs = field(default_factory=Runs)
    churn: Churn = field(default_factory=Churn)
    ksmd: Ksmd = field(default_factory=Ksmd)
    dashboard: Dashboard = field(default_factory=Dashboard)
    on_stop: Literal["keep", "unmerge"] = "keep"  # ranges the daemon made mergeable, at stop
    log: str = ""  # JSON-lines decision log file ("" = stdout only)
    source: str = "<default>"  # the file it came from


DEFAULT = Policy()


class PolicyError(UsageError):
    """A policy with mistakes (a usage error: exit 2).

    ``problems`` holds ``(line, sentence)`` pairs sorted by line, every mistake
    found (not only the first), so one edit fixes them all; ``str(err)`` is one
    ``FILE:LINE: what is wrong; what is expected`` line each. Line 0 means the
    file as a whole (it could not be read): ``FILE: sentence``.
    """

    def __init__(self, source: str, problems: Iterable[tuple[int, str]]) -> None:
        self.source = source
        # dict.fromkeys: drop repeats, keep the order of discovery within a line.
        self.problems = tuple(sorted(dict.fromkeys(problems), key=lambda p: p[0]))
        super().__init__(
            "\n".join(
                f"{source}:{line}: {msg}" if line else f"{source}: {msg}" for line, msg in self.problems
            )
        )


def parse(text: str, source: str = "<policy>") -> Policy:
    """TOML text -> a validated :class:`Policy`; raises :class:`PolicyError`."""
    from ksmtrace.coordinator import policy_file  # it imports this module's records

    return policy_file.parse(text, source)


def load(path: str | PathLike[str]) -> Policy:
    """Read and validate a policy file; raises :class:`PolicyError` (also when unreadable)."""
    from ksmtrace.coordinator import policy_file

    return policy_file.load(path)
