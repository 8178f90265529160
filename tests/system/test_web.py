"""The daemon's web page in a real browser against a real workload.

``ksmtrace daemon`` (observe only) serves the page on loopback; two
workload processes keep breaking their merged pages (a write to every page,
ksmd merges them again, the next write breaks them again), so their KSM COW
faults and merges are non-zero all the time. Debian's Chromium, headless
and driven over the DevTools protocol (tests/chromium.py), loads the page;
the test reads back from the page's DOM what each chart drew (the series
names and maxima the page puts on every chart's container) and checks the
workload's own non-zero series are there, that its row is in the process
table, and that neither the page nor the browser asked anything of a host
other than loopback: the page's requests as the protocol reports them, and
every host in the browser's own net log. The screenshot is kept in
build/test-artifacts/web.png.
"""

from __future__ import annotations

import json
import secrets
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from ksmtrace.kernel import features
from tests.chromium import Chromium, NetLog, executable, is_loopback
from tests.webscene import Churn, Daemon

pytestmark = [
    pytest.mark.system,
    pytest.mark.host_only(
        "Chromium is one of the test tools install.sh leaves out of the offline VM box, and a page "
        "load with its renderer under software emulation takes minutes"
    ),
]

ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = ROOT / "build" / "test-artifacts"
PAGES = 512
SEEN = 60.0  # upper bound, reached only on failure
# Merges per process come from the ksm:* tracepoints (6.4+); without them the
# merges chart has only the machine-wide line, and the COW chart is checked alone.
MERGE_EVENTS = features.available("ksm_tracepoints")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


@pytest.fixture
def scene(ksm, workload, wait_for, tmp_path: Path) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """A daemon serving the page, and two workloads whose merges keep breaking."""
    tag = "web" + secrets.token_hex(3)  # other checkouts' tests run on this host too
    ksm.start(pages_to_scan=2000, sleep_millisecs=20)
    ws = [workload(comm=f"{tag}{i}") for i in range(2)]
    for w in ws:
        w.call("alloc", name="r", pages=PAGES, kind="dup", seed=7)
        assert w.call("madvise", name="r")["ret"] == 0
    daemon = Daemon(tmp_path)
    churn = None
    try:
        url = daemon.url()
        churn = Churn(ws)
        pids = {w.pid for w in ws}

        def breaking() -> list[dict[str, Any]]:
            rows = get_json(url + "api/state")["processes"]
            return [
                r
                for r in rows
                if r["pid"] in pids and r["ksm_cow_per_s"] > 0 and (r["merges_per_s"] > 0 or not MERGE_EVENTS)
            ]

        wait_for(breaking, SEEN, "the daemon to report the workloads' KSM COW faults and merges", 0.5)
        yield {"url": url, "workloads": ws, "tag": tag, "daemon": daemon}
    finally:
        if churn:
            churn.stop()
        rc, err = daemon.stop()
        assert rc in (0, 128 + signal.SIGTERM), err


def chart(page: Chromium, name: str) -> dict[str, Any]:
    """What the page says chart ``name`` drew: its series (label, pid, max, last) and points."""
    return page.evaluate(
        f"(() => {{ const f = document.getElementById('chart-{name}');"
        " return {points: Number(f.dataset.points || 0), series: JSON.parse(f.dataset.series || '[]'),"
        " canvas: !!f.querySelector('canvas')}; })()"
    )


def test_page_draws_the_workloads_series_and_stays_on_loopback(scene, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if executable() is None:
        pytest.fail("chromium is not installed: scripts/install.sh installs Debian's chromium")
    url, ws = scene["url"], scene["workloads"]
    pids = {w.pid for w in ws}
    net_log = tmp_path / "netlog.json"
    with Chromium(tmp_path / "profile", width=1400, height=1000, net_log=net_log) as page:
        page.navigate(url)
        page.wait("window.ksmtrace && window.ksmtrace.updates >= 1", 30, "the page's first update")

        def drawn(name: str) -> bool:
            c = chart(page, name)
            return c["canvas"] and any(s["pid"] in pids and (s["max"] or 0) > 0 for s in c["series"])

        deadline = time.monotonic() + SEEN
        while not (drawn("cow") and (drawn("merges") or not MERGE_EVENTS)):
            assert time.monotonic() < deadline, (chart(page, "cow"), chart(page, "merges"))
            time.sleep(0.5)
        # A few more points, so the screenshot shows lines rather than dots.
        page.wait("window.ksmtrace.points >= 6", 30, "six points of history")
        cow, merges = chart(page, "cow"), chart(page, "merges")
        saved, cpu = chart(page, "saved"), chart(page, "cpu")
        table = page.evaluate(
            "[...document.querySelectorAll('#procs tbody tr')].map(tr =>"
            " ({pid: Number(tr.dataset.pid), cells: [...tr.cells].map(td => td.textContent)}))"
        )
        decisions = page.evaluate(
            "[...document.querySelectorAll('#decisions tbody tr')].map(tr => tr.cells[1].textContent)"
        )
        title = page.evaluate("document.title")
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTEFACTS / "web.png"
        page.screenshot(shot)
        urls = page.requested_urls()
        statuses = {
            e["params"]["response"]["url"]: e["params"]["response"]["status"]
            for e in page.events_named("Network.responseReceived")
        }
        problems = page.problems()

    assert title == "ksmtrace"
    for c, what in ((cow, "KSM COW faults/s"), (merges, "merges/s"))[: 2 if MERGE_EVENTS else 1]:
        mine = [s for s in c["series"] if s["pid"] in pids]
        assert mine and all(s["max"] > 0 for s in mine), (what, c)
        for s in mine:  # labelled by comm and pid
            w = next(w for w in ws if w.pid == s["pid"])
            assert s["label"].startswith(scene["tag"]) and str(w.pid) in s["label"], s
        assert c["points"] >= 6, c
    assert saved["series"][0]["label"] == "saved" and saved["series"][0]["max"] > 0, saved
    assert cpu["series"][0]["max"] > 0, cpu  # ksmd keeps remerging: its CPU shows
    rows = {r["pid"]: r["cells"] for r in table}
    for pid in pids:
        assert pid in rows, table
        assert rows[pid][1].startswith(scene["tag"]) and rows[pid][5] != "0", rows[pid]

    assert "start" in decisions, decisions  # the daemon's first decision, in the log

    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not problems, problems
    # Everything the page asked for, it got from the daemon.
    assert any(u.endswith("/static/vendor/uplot/uPlot.iife.min.js") for u in urls), urls
    assert all(s == 200 for s in statuses.values()), statuses
    assert all(is_loopback(urlsplit(u).hostname or "") for u in urls if "://" in u), urls
    # The browser's own record: the page's requests (its network isolation key
    # names the page's site) all went to loopback, and nothing, page or
    # browser, connected to another host or sent a DNS query.
    net = NetLog(net_log, site="http://127.0.0.1")
    assert any(u.endswith("/api/history") or "/api/history?" in u for u in net.page), net.page
    off = net.off_host()
    assert off == {"page": [], "connects": [], "lookups": []}, (off, "browser's own:", net.browser)
