"""The daemon governs ksmd as soon as it makes a range mergeable, not at the next interval.

ksmd is off while nothing is mergeable; found by bench/bench_coordinator.py: a matching
process exec'd with the daemon running got its ranges made mergeable 2 s after exec but
its first KSM page only at 9 s, because ksmd came on at the next survey (every 10 s).
And the ranges of one look are written down in one go: the book is rewritten whole
(and fsynced) on each write, and two writes per range took 700 ranges tens of seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ksmtrace.coordinator import daemon as daemon_mod
from ksmtrace.coordinator.candidates import ProcFacts, Verdict
from ksmtrace.coordinator.policy import Policy


class FakeGovernor:
    def __init__(self) -> None:
        self.steps: list[int | None] = []
        self.woken: list[str] = []

    def wake(self, reason: str) -> None:
        self.woken.append(reason)

    def step(self, mergeable_pages: int | None) -> None:
        self.steps.append(mergeable_pages)


def test_new_ranges_govern_ksmd_at_once_and_the_book_is_written_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gov = FakeGovernor()
    d = daemon_mod.Daemon(
        Policy(mode="enforce", interval_s=10.0), lambda _: None, run_dir=tmp_path, governor=gov
    )
    monkeypatch.setattr(d, "survey", lambda: None)
    monkeypatch.setattr(d, "_judge_churn", lambda _: None)  # pid 4242 does not exist
    monkeypatch.setattr(daemon_mod.remote, "madvise", lambda *_: None)
    d.cycle(now=100.0)  # the interval: survey and governor
    d.cycle(now=101.0)  # nothing new between intervals: no step
    assert gov.steps == [0]
    facts = ProcFacts(pid=4242, starttime=1, comm="w", exe=None, cgroup=None, uid=0, self_opted=False)
    saves = []
    monkeypatch.setattr(d.book, "save", lambda: saves.append(len(d.book.ranges)))
    d._merge(
        Verdict(facts, "candidate", "", "named"),
        [(0x10000, 0x20000, 16, "runs"), (0x30000, 0x31000, 1, "x")],
        101.5,
    )
    assert saves == [2, 2] and all(r.state == "done" for r in d.book.ranges.values())  # pending, then done
    d.cycle(now=102.0)
    assert gov.woken and gov.steps == [0, 17]
    d.cycle(now=103.0)  # woken once: back to the interval
    assert gov.steps == [0, 17]
    d.cycle(now=110.0)
    assert gov.steps == [0, 17, 17]
