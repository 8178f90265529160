"""ksmd's merge and unmerge rates over processes that come and go (KsmdState)."""

from __future__ import annotations

from dataclasses import fields

from ksmtrace.model.ksmd import KsmdSample, KsmdState
from ksmtrace.probes.ksmd import KsmdSnapshot, KsmProcCounts, ScanState

SCAN = ScanState(**{f.name: 0 for f in fields(ScanState)})


def _counts(merges: int, unmerges: int = 0) -> KsmProcCounts:
    return KsmProcCounts(merges=merges, merge_fails=0, zero_merges=0, unmerges=unmerges, enters=0, exits=0)


def _sample(t: float, procs: dict[int, KsmProcCounts]) -> KsmdSample:
    return KsmdSample(t, 0, 0, 0, 0, 0, KsmdSnapshot(t, procs, SCAN))


def test_an_exited_process_does_not_make_the_rate_negative() -> None:
    state = KsmdState(_sample(0.0, {10: _counts(5000, 100), 11: _counts(10)}))
    # 10 exited and was forgotten; 11 merged 30 more; 12 is new with 7.
    iv = state.update(_sample(1.0, {11: _counts(40), 12: _counts(7, 2)}))
    assert (iv.merges_per_s, iv.unmerges_per_s) == (37.0, 2.0)


def test_a_reused_pid_counts_from_zero() -> None:
    state = KsmdState(_sample(0.0, {10: _counts(5000)}))
    iv = state.update(_sample(2.0, {10: _counts(8)}))  # entry forgotten and made anew
    assert iv.merges_per_s == 4.0
