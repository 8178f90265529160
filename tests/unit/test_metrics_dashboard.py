"""packaging/grafana/ksmtrace.json: a standard Grafana dashboard built only on the metrics served.

Whether its queries return data is tests/system/test_metrics.py's job (a
real Prometheus scraping the real daemon); here: its shape, and that every
series it names is one views/metrics.py serves.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ksmtrace.views import metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "packaging" / "grafana" / "ksmtrace.json"
WANTED = ("Saved memory", "KSM COW faults/s per process", "Merges/s", "ksmd CPU vs budget", "Decisions")
# A series selector: a name followed by a label matcher or a range.
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=\{|\[)")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def doc() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def served() -> set[str]:
    return {metrics.fqname(m) + ("_total" if m.kind == "counter" else "") for m in metrics.METRICS}


def test_a_standard_dashboard_with_a_datasource_variable() -> None:
    d = doc()
    assert isinstance(d["schemaVersion"], int) and d["uid"] and d["title"]
    var = {v["name"]: v for v in d["templating"]["list"]}
    assert var["datasource"]["type"] == "datasource" and var["datasource"]["query"] == "prometheus"
    for p in d["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]


def test_the_panels_the_issue_asks_for() -> None:
    titles = [p["title"] for p in doc()["panels"]]
    for want in WANTED:
        assert want in titles, want


def test_only_ksmtrace_series_that_are_served() -> None:
    names = served()
    for p in doc()["panels"]:
        for t in p["targets"]:
            used = {n for n in SELECTOR.findall(t["expr"]) if n not in PROMQL_WORDS}
            assert used, t["expr"]
            assert used <= names, f"{p['title']}: {used - names} not served by views/metrics.py"


def test_panels_do_not_overlap() -> None:
    cells: set[tuple[int, int]] = set()
    for p in doc()["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, p["title"]
        cells |= mine
