"""The daemon's re-look gate (ksmtrace.coordinator.relook) on fake kernels: no root, no scan.

The kernel side (soft-dirty bits really set by writes, clear_refs really
clearing them) is tests/system/test_soft_dirty.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ksmtrace.coordinator import relook as relook_mod
from ksmtrace.coordinator.candidates import ProcFacts, Verdict
from ksmtrace.coordinator.daemon import Daemon, _Candidate
from ksmtrace.coordinator.policy import Policy, Runs
from ksmtrace.coordinator.relook import RelookGate
from ksmtrace.coordinator.worth import Choice
from ksmtrace.errors import ProcessGone

PAGE = 4096
A = 0x7F0000000000


class FakeKernel:
    """Mappings and soft-dirty counts per pid, and a log of the clears asked for."""

    def __init__(self) -> None:
        self.spans: dict[int, tuple[tuple[int, int], ...]] = {}
        self.dirty: dict[int, int] = {}
        self.cleared: list[int] = []
        self.asked: list[tuple[int, list[tuple[int, int]]]] = []

    def map_spans(self, pid: int) -> tuple[tuple[int, int], ...]:
        if pid not in self.spans:
            raise ProcessGone(pid)
        return self.spans[pid]

    def count(self, pid: int, ranges: list[tuple[int, int]]) -> int:
        self.asked.append((pid, ranges))
        return self.dirty.get(pid, 0)

    def clear(self, pid: int) -> None:
        if pid not in self.spans:
            raise ProcessGone(pid)
        self.cleared.append(pid)
        self.dirty[pid] = 0


def _est(pid: int, *regions: tuple[int, int]) -> Any:
    regs = [SimpleNamespace(pid=pid, start=s, end=e) for s, e in regions]
    return SimpleNamespace(processes=[SimpleNamespace(regions=regs)], gone=(), denied=())


def _choice(start: int, pages: int) -> Choice:
    return Choice(start, start + pages * PAGE, "[anon]", pages, pages / 2, f"{pages} duplicate pages")


def _gate(k: FakeKernel, mode: str = "soft-dirty", available: bool = True) -> RelookGate:
    return RelookGate(mode, k, dirty=k.count, clear=k.clear, available=lambda: available)  # type: ignore[arg-type]


def _look(g: RelookGate, pid: int, chosen: tuple[Choice, ...]) -> None:
    g.before_scan(pid)
    g.after_scan(pid, _est(pid, (A, A + 64 * PAGE)), chosen)


def test_unchanged_after_a_clean_interval_hands_back_the_last_choice() -> None:
    k = FakeKernel()
    k.spans[7] = ((A, A + 64 * PAGE),)
    g = _gate(k)
    assert g.unchanged(7) is None  # never looked at: scan it
    chosen = (_choice(A, 16),)
    _look(g, 7, chosen)
    assert k.cleared == [7]
    assert g.unchanged(7) == chosen
    # Only the pages the scanner read are asked about.
    assert k.asked[-1] == (7, [(A, A + 64 * PAGE)])
    assert g.skipped == 1 and g.last_dirty[7] == 0
    # A skipped look does not clear again: nothing was written, nothing to clear.
    assert k.cleared == [7]


def test_written_pages_or_new_mappings_mean_a_scan() -> None:
    k = FakeKernel()
    k.spans[7] = ((A, A + 64 * PAGE),)
    g = _gate(k)
    _look(g, 7, (_choice(A, 16),))
    k.dirty[7] = 3
    assert g.unchanged(7) is None and g.last_dirty[7] == 3
    _look(g, 7, ())  # the rescan clears again
    assert k.cleared == [7, 7] and g.unchanged(7) == ()
    k.spans[7] = ((A, A + 32 * PAGE),)  # shrunk: no soft-dirty bit shows an unmap
    assert g.unchanged(7) is None and g.last_dirty[7] == -1


def test_a_look_that_did_not_finish_is_no_baseline() -> None:
    k = FakeKernel()
    k.spans[7] = ((A, A + PAGE),)
    g = _gate(k)
    g.before_scan(7)  # cleared, but the scan never reported (it failed, the pid left)
    assert g.unchanged(7) is None


def test_gone_processes_are_scanned_and_forgotten() -> None:
    k = FakeKernel()
    k.spans[7] = ((A, A + PAGE),)
    g = _gate(k)
    _look(g, 7, ())
    del k.spans[7]
    assert g.unchanged(7) is None  # the scan says it is gone; the daemon forgets it
    g.before_scan(7)
    g.after_scan(7, _est(7), ())
    assert g.unchanged(7) is None
    g.forget([7])
    assert 7 not in g.last_dirty


@pytest.mark.parametrize(("mode", "available"), [("rescan", True), ("soft-dirty", False)])
def test_rescan_or_no_soft_dirty_touches_nothing(mode: str, available: bool) -> None:
    k = FakeKernel()
    k.spans[7] = ((A, A + PAGE),)
    g = _gate(k, mode, available)
    _look(g, 7, (_choice(A, 1),))
    assert g.unchanged(7) is None and k.cleared == [] and k.asked == []
    # The kernel lacking the bit is said once (the daemon's start line); rescan is a choice, not news.
    assert bool(g.notes) == (mode == "soft-dirty")


# --- the daemon's look with the gate --------------------------------------------------------------


def _daemon(tmp_path: Path, k: FakeKernel, scans: list[set[int]]) -> Any:
    policy = Policy(runs=Runs(stable_looks=2, min_run_pages=4))
    decisions: list[Any] = []
    d = Daemon(policy, decisions.append, proc=k, run_dir=tmp_path)  # type: ignore[arg-type]
    d.relook = _gate(k)
    d.decisions = decisions  # type: ignore[attr-defined]

    def fake_scan(targets: set[int], fresh: dict[int, Any], peers: list[int], gap: int) -> Any:
        scans.append(targets - fresh.keys())
        for pid in targets - fresh.keys():
            d.relook.before_scan(pid)
        est = SimpleNamespace(gone=(), denied=(), processes=[])
        for pid in targets:
            est.processes.append(
                SimpleNamespace(regions=[SimpleNamespace(pid=pid, start=A, end=A + 64 * PAGE)])
            )
        return est

    d.relook.scan = fake_scan  # type: ignore[method-assign]
    return d


def test_daemon_skips_the_scan_of_unchanged_candidates_and_still_merges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = FakeKernel()
    k.spans = {7: ((A, A + 64 * PAGE),), 8: ((A, A + 64 * PAGE),)}
    scans: list[set[int]] = []
    run = {7: (_choice(A, 16),), 8: (_choice(A + 32 * PAGE, 8),)}
    d = _daemon(tmp_path, k, scans)
    monkeypatch.setattr(
        relook_mod.scan, "estimate", lambda *a, **kw: pytest.fail("the real scanner must not run here")
    )
    monkeypatch.setattr(
        "ksmtrace.coordinator.worth.choose",
        lambda est, pid, rules: SimpleNamespace(ranges=run[pid], over_vma_headroom=0, vma_headroom=0),
    )
    cands = {
        pid: _Candidate(Verdict(ProcFacts(pid, 1, f"w{pid}", None, None, 0, False), "candidate", "", "rule"))
        for pid in (7, 8)
    }
    due = list(cands.values())
    verdicts = [c.verdict for c in due]

    d._look(due, verdicts, "", 0.0)  # first look: both scanned, both cleared
    assert scans == [{7, 8}] and sorted(k.cleared) == [7, 8]
    k.dirty[8] = 1  # pid 8 writes a page
    d._look(due, verdicts, "", 10.0)  # pid 7 skipped; pid 8 rescanned
    assert scans[-1] == {8} and d.relook.skipped == 1
    # Both saw their runs in two looks in a row: observe mode says "merge" for both,
    # pid 7 with the reason of the look whose choice stood.
    merged = {(x.pid, x.start, x.end): x for x in d.decisions if x.action == "merge"}
    assert (7, A, A + 16 * PAGE) in merged and (8, A + 32 * PAGE, A + 40 * PAGE) in merged
    assert merged[(7, A, A + 16 * PAGE)].reason == "16 duplicate pages"
    d._look(due, verdicts, "", 20.0)  # nothing changed anywhere: no scan at all
    assert len(scans) == 2 and d.relook.skipped == 3


def test_policy_key() -> None:
    from ksmtrace.coordinator import policy

    assert policy.DEFAULT.runs.relook == "soft-dirty"
    assert policy.parse('[runs]\nrelook = "rescan"\n').runs.relook == "rescan"
    with pytest.raises(policy.PolicyError) as err:
        policy.parse('[runs]\nstable_looks = 2\nrelook = "dirty"\n', "p.toml")
    assert (
        str(err.value)
        == "p.toml:3: [runs] relook: expected one of 'soft-dirty', 'rescan', got 'dirty' (a string)"
    )
