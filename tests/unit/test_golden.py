"""Every view rendered from snapshots recorded on the real kernel, against golden files.

The snapshots (tests/fixtures/snapshots/*.json) were captured by
tests/fixtures/capture_snapshots.py from real workloads, probes and ksmd; the
golden files (tests/golden/) were rendered from them by the commands' code
before the views moved into ksmtrace/views, so a failure here means a
command's output changed for the same input. When a change is meant,
regenerate with ``python -m tests.unit.test_golden`` and read the diff.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ksmtrace.coordinator.worth import Choices
from ksmtrace.model import codec
from ksmtrace.model.faults import FaultsReport
from ksmtrace.model.ksmd import KsmdInterval
from ksmtrace.model.optins import Report
from ksmtrace.model.snapshot import Snapshot
from ksmtrace.probes.optins import OptinEvent
from ksmtrace.remote import Injection
from ksmtrace.scan import Estimate, ScanCost
from ksmtrace.views import estimate, faults, ksmd, merge, optins, status
from ksmtrace.views.fmt import json_text

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = ROOT / "fixtures" / "snapshots"
GOLDEN = ROOT / "golden"
NOW = "12:34:56"
PAGE = 4096


def _load(name: str, tp: Any) -> Any:
    return codec.decode(tp, json.loads((SNAPSHOTS / f"{name}.json").read_text()))


def _text(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _snoop(events: list[OptinEvent], ts: bool, exact: bool = False) -> str:
    return _text([optins.snoop_header(ts), *(optins.snoop_line(e, ts, exact) for e in events)])


# golden file -> how to render it from the recorded snapshot
CASES: dict[str, Callable[[], str]] = {
    "status.txt": lambda: _text(status.text(_load("status", Snapshot))),
    "status.bytes.txt": lambda: _text(status.text(_load("status", Snapshot), exact=True)),
    "status.json": lambda: json_text(status.as_json(_load("status", Snapshot))) + "\n",
    "optins.txt": lambda: _text(optins.optins_tables(_load("optins", Report))),
    "optins.bytes.txt": lambda: _text(optins.optins_tables(_load("optins", Report), exact=True)),
    "optins.json": lambda: json_text(optins.optins_json(_load("optins", Report))) + "\n",
    "faults.txt": lambda: _text(faults.text(_load("faults", FaultsReport), NOW)),
    "faults.bytes.txt": lambda: _text(
        faults.text(_load("faults", FaultsReport), NOW, exact=True, filtered=True)
    ),
    "faults.json": lambda: json_text(faults.as_json(_load("faults", FaultsReport), NOW), lines=True) + "\n",
    "ksmd.txt": lambda: _text(ksmd.text(_load("ksmd", KsmdInterval), NOW)),
    "ksmd.json": lambda: json_text(ksmd.as_json(_load("ksmd", KsmdInterval), NOW), lines=True) + "\n",
    "snoop.txt": lambda: _snoop(_load("snoop", list[OptinEvent]), ts=False),
    "snoop.T.txt": lambda: _snoop(_load("snoop", list[OptinEvent]), ts=True, exact=True),
    "snoop.json": lambda: "".join(
        json_text(optins.event_json(e), lines=True) + "\n" for e in _load("snoop", list[OptinEvent])
    ),
    "estimate.txt": lambda: _text(estimate.text(_load("estimate", Estimate))),
    "estimate.all.txt": lambda: _text(estimate.text(_load("estimate", Estimate), exact=True, nregions=0)),
    "estimate.cost.txt": lambda: _text(
        estimate.text(
            replace(
                _load("estimate", Estimate),
                cost=ScanCost(1.5, 2.25, 3 << 30, 0, 45 << 20, 60 << 20, 8 << 20, True),
            )
        )
    ),
    "estimate.json": lambda: json_text(estimate.as_json(_load("estimate", Estimate))) + "\n",
    "merge.txt": lambda: _text(
        merge.text(
            _load("merge", list[Injection])[0].pid,
            _load("merge_choice", Choices),
            _load("merge", list[Injection]),
            PAGE,
            False,
        )
    ),
    "merge.dry.json": lambda: json_text(merge.choice_json(_load("merge_choice", Choices))) + "\n",
    "merge.json": lambda: (
        json_text(
            merge.injections_json(_load("merge", list[Injection])[0].pid, _load("merge", list[Injection]))
        )
        + "\n"
    ),
}


@pytest.fixture(autouse=True)
def _utc() -> Iterator[None]:
    """snoop -T prints local time: pin the zone so the golden file holds anywhere."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    assert CASES[name]() == (GOLDEN / name).read_text()


def test_every_snapshot_has_a_golden_view() -> None:
    used = {p.stem for p in SNAPSHOTS.glob("*.json")}
    rendered = {n.split(".")[0] for n in CASES}
    assert used <= rendered | {"merge_choice"}, used - rendered


def test_snapshot_round_trip() -> None:
    """Decoding and encoding a recorded snapshot gives back the same JSON (nothing lost)."""
    for name, tp in (("status", Snapshot), ("faults", FaultsReport), ("estimate", Estimate)):
        data = json.loads((SNAPSHOTS / f"{name}.json").read_text())
        assert codec.encode(codec.decode(tp, data)) == data


def write_golden() -> None:
    os.environ["TZ"] = "UTC"
    time.tzset()
    GOLDEN.mkdir(exist_ok=True)
    for name, render in CASES.items():
        (GOLDEN / name).write_text(render())
        print(f"wrote {GOLDEN / name}")


if __name__ == "__main__":
    write_golden()
