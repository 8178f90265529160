"""/metrics stays bounded: a thousand processes, a changing set, exits.

The processes are the recorded snapshot's rows (tests/fixtures/snapshots/
board/board2.json) multiplied with new pids, names and numbers, so every field a
real row has is set the way the Sampler sets it.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ksmtrace.live.board import BoardState
from ksmtrace.views import dash, metrics
from tests.unit.test_metrics_golden import board


def many(n: int, seed: int = 1, top_n: int = 10) -> BoardState:
    """A BoardState with ``n`` processes made from the recorded ones."""
    base = board(top_n).read()
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        r = base.processes[i % len(base.processes)]
        rows.append(
            replace(
                r,
                pid=10_000 + i,
                comm=f"{r.comm}-{i}",
                profit_bytes=rng.randrange(-4096, 64 << 20),
                merging_pages=rng.randrange(0, 16384),
                ksm_cow_per_s=rng.choice([0.0, 0.0, rng.uniform(0, 5000)]),
                merges_per_s=rng.uniform(0, 100),
                ksm_cow_total=rng.randrange(0, 1 << 30),
            )
        )
    return replace(base, processes=dash.sort(rows, "ksm_cow"))


def series(state: BoardState) -> dict[str, list[dict[str, str]]]:
    text = metrics.exposition(state)[0].decode()
    return {f.name: [s.labels for s in f.samples] for f in text_string_to_metric_families(text)}


@pytest.mark.parametrize("top_n", [0, 1, 10, 50])
def test_a_thousand_processes_stay_within_the_bound(top_n: int) -> None:
    state = replace(many(1000), top_n=top_n)
    got = series(state)
    assert sum(len(v) for v in got.values()) <= metrics.max_series(top_n)
    pids = {lab["pid"] for name, labs in got.items() if name.startswith("ksmtrace_process_") for lab in labs}
    assert len(pids - {""}) <= 2 * top_n
    for name, labs in got.items():
        if name.startswith("ksmtrace_process_"):
            assert len(labs) <= 2 * top_n + 1, name
            assert sum(1 for lab in labs if lab["comm"] == "other") <= 1, name


def test_the_bound_is_reached_and_not_passed() -> None:
    """With every process faulting, both halves of the selection fill up."""
    state = many(1000, seed=2)
    rows = [replace(r, ksm_cow_per_s=1.0 + i) for i, r in enumerate(state.processes)]
    state = replace(state, processes=rows)
    got = series(state)
    top = got["ksmtrace_process_ksm_cow_faults_per_second"]
    assert len(top) == 2 * state.top_n + 1
    assert len(got["ksmtrace_process_ksm_cow_faults"]) == 2 * state.top_n


def test_top_by_saving_then_by_ksm_cow() -> None:
    state = many(200, seed=3, top_n=5)
    by_profit = {r.pid for r in dash.top(state.processes, 5, "profit")[0]}
    got = {int(lab["pid"]) for lab in series(state)["ksmtrace_process_profit_bytes"] if lab["pid"]}
    assert by_profit <= got
    rest = [r for r in state.processes if r.pid not in by_profit]
    hot = {r.pid for r in dash.sort(rest, "ksm_cow")[:5] if r.ksm_cow_per_s > 0}
    assert got == by_profit | hot


def test_other_sums_the_rest() -> None:
    state = many(300, seed=4, top_n=3)
    rows, other = metrics.tracked(state)
    assert other is not None
    named = {r.pid for r in rows}
    rest = [r for r in state.processes if r.pid not in named]
    assert other.ksm_cow_per_s == pytest.approx(sum(r.ksm_cow_per_s for r in rest))
    assert other.profit_bytes == sum(r.profit_bytes or 0 for r in rest)


def test_exited_processes_drop_out() -> None:
    state = many(5, seed=5, top_n=10)
    before = {lab["pid"] for lab in series(state)["ksmtrace_process_profit_bytes"]}
    gone = state.processes[0].pid
    after_state = replace(state, processes=state.processes[1:])
    after = {lab["pid"] for lab in series(after_state)["ksmtrace_process_profit_bytes"]}
    assert str(gone) in before and str(gone) not in after
    assert after == before - {str(gone)}


def test_no_other_when_everything_fits() -> None:
    state = many(4, seed=6, top_n=10)
    assert metrics.tracked(state)[1] is None
    assert all(lab["comm"] != "other" for lab in series(state)["ksmtrace_process_profit_bytes"])
