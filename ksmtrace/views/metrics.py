"""The daemon's Prometheus metrics: one table of (name, type, help, getter).

Every series comes from :data:`METRICS`, read over one :class:`BoardState`
(what the daemon's last interval saw), so /metrics and the dashboards say
the same as ``top`` and the web page (ksmtrace.views.dash). Conventions
(node_exporter's ``ksmd`` collector is the model, and these sit beside its
``node_ksmd_*`` without clashing): every name starts ``ksmtrace_``, names
are made in one place (:func:`fqname`: prefix, base unit, ``_total`` for
counters), sizes are bytes, times seconds (sleep_millisecs / 1000), CPU a
ratio of one CPU. The saving is pages_sharing (KSM's own definition);
``general_profit`` is the kernel's net figure.

Bounded label sets. Per-process series exist for the top ``top_n``
processes by saving (``BoardState.top_n``, the policy's ``[dashboard]
top_n``) plus, so that a process whose merges are all broken is not hidden
in the sum, up to ``top_n`` more by KSM COW faults/s; everything else sums
into one ``comm="other"`` series (its ``pid`` label empty). So a family
has at most ``2 x top_n + 1`` series whatever the number of processes
(:func:`max_series`). A process that exited is not in the next state, so
its series end with it.

Types, and why. A process's ``*_total`` (KSM COW faults, merges,
unmerges) is a counter: the daemon's probes count since they loaded, per
process, and a reused pid starts again from zero (a counter reset, which
rate() handles). The ``other`` bucket has no totals: its membership changes
every interval, so its sum goes down as well as up and would read as resets
to rate(). Rates over the daemon's own interval (``*_per_second``) are
gauges, for every series including ``other``: they are exact per interval
(the probes' counts, not sampled), and they are the only way to show the
``other`` bucket and the machine's traced sum. Machine-wide counters come
from the kernel's own cumulative files (full_scans, pages_scanned, cow_ksm)
or from the Board's running totals (ksmd CPU seconds, traced KSM COW
faults, merges, unmerges: they include processes that have since exited).
Decisions are counters by action and whether they were carried out; every
action is always present (at 0), so that rate() sees the first one.

Per-cgroup series are not served: the process rows carry no cgroup.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric as Family

from ksmtrace.coordinator.decisions import Action
from ksmtrace.live.board import BoardState
from ksmtrace.views import dash

PREFIX = "ksmtrace_"
# generate_latest writes the classic text format (0.0.4), whatever the
# library's newest content type is.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ADVISOR_MODES = ("none", "scan-time")  # advisor_mode's choices (Linux 6.8+)
DAEMON_MODES = ("observe", "enforce")
ACTIONS: tuple[str, ...] = typing.get_args(Action)
PROCESS_LABELS = ("pid", "comm")

Kind = Literal["gauge", "counter"]
Scope = Literal["machine", "process", "labelled"]
Labelled = Iterable[tuple[tuple[str, ...], float]]


@dataclass(frozen=True)
class Metric:
    name: str  # without prefix, unit and _total
    kind: Kind
    help: str
    get: Callable[[Any], Any]  # machine: state -> value; process: ProcRow -> value; labelled: state -> pairs
    scope: Scope = "machine"
    unit: str = ""  # base unit: bytes, seconds, ratio ("" for counts)
    labels: tuple[str, ...] = ()
    other: bool = True  # process scope: whether the "other" bucket has this series
    bound: int = 1  # labelled scope: most series it can have


def fqname(m: Metric) -> str:
    """The exposed name (counters get their ``_total`` from the library)."""
    return PREFIX + m.name + (f"_{m.unit}" if m.unit else "")


def _machine(get: Callable[[dash.MachineRow], float | None]) -> Callable[[BoardState], float | None]:
    return lambda s: get(s.machine) if s.machine is not None else None


def _counter(name: str) -> Callable[[BoardState], int | None]:
    """A cumulative /sys/kernel/mm/ksm counter of the last snapshot."""

    def get(s: BoardState) -> int | None:
        v = s.snapshot.counters.get(name) if s.snapshot is not None else None
        return v if isinstance(v, int) else None

    return get


def _total(name: str) -> Callable[[BoardState], float | None]:
    """The Board's running total since the daemon started (BoardState.totals)."""
    return lambda s: s.totals.get(name)


def _div(v: float | None, by: float) -> float | None:
    return None if v is None else v / by


def _advisor(s: BoardState) -> Labelled:
    now = s.machine.advisor if s.machine is not None else None
    if now is None:
        return []
    modes = ADVISOR_MODES if now in ADVISOR_MODES else (*ADVISOR_MODES, now)
    return [((m,), 1.0 if m == now else 0.0) for m in modes]


def _mode(s: BoardState) -> Labelled:
    if not s.mode:
        return []
    modes = DAEMON_MODES if s.mode in DAEMON_MODES else (*DAEMON_MODES, s.mode)
    return [((m,), 1.0 if m == s.mode else 0.0) for m in modes]


def _decisions(s: BoardState) -> Labelled:
    out = []
    for a in ACTIONS:
        done = s.applied.get(a, 0)
        out.append(((a, "true"), float(done)))
        out.append(((a, "false"), float(s.decisions.get(a, 0) - done)))
    return out


def _budget(s: BoardState) -> float | None:
    pct = s.ksmd_budget_pct  # None: no budget known (top's own probes)
    return None if pct is None else pct / 100.0


# fmt: off
METRICS: tuple[Metric, ...] = (
    # Machine-wide: what KSM saves and what it costs.
    Metric("ksm_saved", "gauge", "Memory KSM saves now: pages_sharing x page size.",
           _machine(lambda m: m.saved_bytes), unit="bytes"),
    Metric("ksm_general_profit", "gauge",
           "The kernel's net KSM saving (general_profit): savings less rmap bookkeeping.",
           _machine(lambda m: m.general_profit_bytes), unit="bytes"),
    Metric("ksm_pages_shared", "gauge", "KSM pages in use (pages_shared).",
           _machine(lambda m: m.pages_shared)),
    Metric("ksm_pages_sharing", "gauge", "Sites sharing KSM pages, the saving in pages (pages_sharing).",
           _machine(lambda m: m.pages_sharing)),
    Metric("ksm_pages_unshared", "gauge", "Pages unique but repeatedly checked for merging (pages_unshared).",
           _machine(lambda m: m.pages_unshared)),
    Metric("ksm_pages_volatile", "gauge", "Pages changing too fast to be merged (pages_volatile).",
           _machine(lambda m: m.pages_volatile)),
    Metric("ksm_zero_pages", "gauge", "Empty pages merged with the kernel zero page (ksm_zero_pages).",
           _counter("ksm_zero_pages")),
    Metric("ksm_mergeable_processes", "gauge", "Mergeable processes in the last interval's report.",
           _machine(lambda m: m.processes)),
    Metric("cow_ksm", "counter", "Copy-on-write copies of KSM pages, machine-wide (/proc/vmstat cow_ksm).",
           _machine(lambda m: m.cow_ksm_total)),
    Metric("ksm_cow_faults_per_second", "gauge",
           "KSM copy-on-write faults per second over the last interval, traced, summed over processes.",
           _machine(lambda m: m.ksm_cow_per_s)),
    Metric("ksm_cow_faults", "counter",
           "KSM copy-on-write faults traced since the daemon started, exited processes included.",
           _total("ksm_cow")),
    # ksmd: its work, its knobs, its cost.
    Metric("ksmd_full_scans", "counter", "Full scans of the mergeable memory completed (full_scans).",
           _counter("full_scans")),
    Metric("ksmd_pages_scanned", "counter", "Pages ksmd has scanned (pages_scanned).",
           _counter("pages_scanned")),
    Metric("ksmd_merges_per_second", "gauge",
           "Pages merged per second over the last interval (ksm:* tracepoints).",
           _machine(lambda m: m.merges_per_s)),
    Metric("ksmd_unmerges_per_second", "gauge", "Pages unmerged per second over the last interval.",
           _machine(lambda m: m.unmerges_per_s)),
    Metric("ksmd_merges", "counter", "Pages merged since the daemon started (ksm:* tracepoints).",
           _total("merges")),
    Metric("ksmd_unmerges", "counter", "Pages unmerged since the daemon started (ksm:* tracepoints).",
           _total("unmerges")),
    Metric("ksmd_cpu", "gauge", "ksmd's CPU time over the last interval, as a ratio of one CPU.",
           _machine(lambda m: _div(m.ksmd_cpu_pct, 100.0)), unit="ratio"),
    Metric("ksmd_cpu", "counter", "ksmd's CPU time since the daemon started.",
           _total("ksmd_cpu_seconds"), unit="seconds"),
    Metric("ksmd_cpu_budget", "gauge", "The policy's ksmd CPU budget, as a ratio of one CPU.",
           _budget, unit="ratio"),
    Metric("ksmd_run", "gauge", "ksmd's run knob: 0 stopped, 1 running, 2 unmerging everything.",
           _machine(lambda m: m.run)),
    Metric("ksmd_advisor_mode", "gauge", "ksmd's advisor_mode: 1 for the one set.",
           _advisor, scope="labelled", labels=("mode",), bound=len(ADVISOR_MODES) + 1),
    Metric("ksmd_pages_to_scan", "gauge", "Pages ksmd scans per batch (pages_to_scan).",
           _machine(lambda m: m.pages_to_scan)),
    Metric("ksmd_sleep", "gauge", "ksmd's sleep between batches (sleep_millisecs).",
           _machine(lambda m: _div(m.sleep_millisecs, 1000.0)), unit="seconds"),
    Metric("sample_interval", "gauge", "Length of the daemon's last measured interval.",
           _machine(lambda m: m.interval_s), unit="seconds"),
    Metric("last_sample_timestamp", "gauge", "When the daemon took its last snapshot (Unix time).",
           _machine(lambda m: m.wall), unit="seconds"),
    # The coordinator.
    Metric("daemon_mode", "gauge", "The daemon's policy mode: 1 for the one it runs in.",
           _mode, scope="labelled", labels=("mode",), bound=len(DAEMON_MODES) + 1),
    Metric("decisions", "counter",
           "Decisions of the coordinator by action; applied=false: observe mode, or it failed.",
           _decisions, scope="labelled", labels=("action", "applied"), bound=2 * len(ACTIONS)),
    # Per process: the top by saving and by KSM COW, and "other".
    Metric("process_profit", "gauge", "What KSM saves the process now (ksm_stat ksm_process_profit).",
           lambda r: r.profit_bytes, scope="process", unit="bytes"),
    Metric("process_merging_pages", "gauge", "The process's pages merged by KSM (ksm_merging_pages).",
           lambda r: r.merging_pages, scope="process"),
    Metric("process_rmap_items", "gauge", "ksmd's rmap items for the process (ksm_rmap_items).",
           lambda r: r.rmap_items, scope="process"),
    Metric("process_ksm_cow_faults_per_second", "gauge",
           "KSM copy-on-write faults per second over the last interval (traced, exact).",
           lambda r: r.ksm_cow_per_s, scope="process"),
    Metric("process_merges_per_second", "gauge",
           "The process's pages merged per second over the last interval.",
           lambda r: r.merges_per_s, scope="process"),
    Metric("process_unmerges_per_second", "gauge",
           "The process's pages unmerged per second over the last interval.",
           lambda r: r.unmerges_per_s, scope="process"),
    Metric("process_ksm_cow_faults", "counter",
           "KSM copy-on-write faults of the process since tracing started.",
           lambda r: r.ksm_cow_total, scope="process", other=False),
    Metric("process_merges", "counter", "The process's pages merged since tracing started.",
           lambda r: r.merges_total, scope="process", other=False),
    Metric("process_unmerges", "counter", "The process's pages unmerged since tracing started.",
           lambda r: r.unmerges_total, scope="process", other=False),
)
# fmt: on


def tracked(state: BoardState) -> tuple[list[dash.ProcRow], dash.ProcRow | None]:
    """The processes with series of their own (top ``top_n`` by saving, then
    up to ``top_n`` more of the rest by KSM COW faults/s) and the ``other``
    row summing the rest (None when nothing is left over)."""
    n = max(state.top_n, 0)
    # dash.top's ranking, and its "other" sum once, over what is left at the end.
    ranked = dash.sort(state.processes, "profit")
    kept, rest = ranked[:n], ranked[n:]
    if not rest:
        return kept, None
    faulting = dash.sort([r for r in rest if r.ksm_cow_per_s > 0], "ksm_cow")[:n]
    chosen = {r.pid for r in faulting}
    left = [r for r in rest if r.pid not in chosen]
    if not left:
        return kept + faulting, None
    return kept + faulting, dash.top(left, 0)[1]


def max_series(top_n: int) -> int:
    """Most series /metrics can have for this ``top_n``, whatever the host."""
    total = 0
    for m in METRICS:
        if m.scope == "process":
            total += 2 * top_n + (1 if m.other else 0)
        elif m.scope == "labelled":
            total += m.bound
        else:
            total += 1
    return total


def _family(m: Metric) -> Family:
    labels = list(PROCESS_LABELS if m.scope == "process" else m.labels)
    cls = CounterMetricFamily if m.kind == "counter" else GaugeMetricFamily
    return cls(fqname(m), m.help, labels=labels)


class BoardCollector:
    """A prometheus_client collector over one BoardState (a scrape's worth)."""

    def __init__(self, state: BoardState) -> None:
        self.state = state
        self.rows, self.other = tracked(state)

    def collect(self) -> Iterator[Family]:
        for m in METRICS:
            fam = _family(m)
            for labels, value in self._values(m):
                fam.add_metric(list(labels), value)
            if fam.samples:
                yield fam

    def _values(self, m: Metric) -> Iterator[tuple[tuple[str, ...], float]]:
        if m.scope == "machine":
            v = m.get(self.state)
            if v is not None:
                yield (), float(v)
        elif m.scope == "labelled":
            yield from m.get(self.state)
        else:
            for r in self.rows:
                v = m.get(r)
                if v is not None:
                    yield (str(r.pid), r.comm), float(v)
            if self.other is not None and m.other:
                v = m.get(self.other)
                if v is not None:
                    yield ("", "other"), float(v)


def exposition(state: BoardState) -> tuple[bytes, str]:
    """/metrics for ``state``: the body and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BoardCollector(state))
    return generate_latest(registry), CONTENT_TYPE
