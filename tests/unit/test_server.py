"""The daemon's HTTP side over a Board fed recorded snapshots: read-only, bounded to its files, and
its JSON what the records hold. (The daemon serving it on the real kernel: tests/system/test_metrics.py,
test_web.py.)"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from ksmtrace.coordinator.decisions import Decision
from ksmtrace.errors import UsageError
from ksmtrace.live.board import Board
from ksmtrace.live.server import CSP, Server, is_loopback, parse_listen
from ksmtrace.model import codec
from ksmtrace.model.faults import FaultsReport
from ksmtrace.model.snapshot import Snapshot

SNAPSHOTS = Path(__file__).resolve().parents[1] / "fixtures" / "snapshots"


def _snapshot() -> Snapshot:
    snap = codec.load(Snapshot, json.loads((SNAPSHOTS / "status.json").read_text()))
    faults = codec.load(FaultsReport, json.loads((SNAPSHOTS / "faults.json").read_text()))
    return replace(snap, faults=faults)


@pytest.fixture
def served() -> Iterator[tuple[Server, Board, Snapshot]]:
    board = Board(top_n=3, mode="observe")
    snap = _snapshot()
    board.record(snap)
    board.decided(Decision("merge", "2 runs of 40 duplicate pages", pid=11567, applied=False))
    srv = Server(board, "127.0.0.1", 0)
    try:
        yield srv, board, snap
    finally:
        srv.close()


def _ask(srv: Server, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_state_holds_the_recorded_rows(served: tuple[Server, Board, Snapshot]) -> None:
    srv, _, snap = served
    status, headers, body = _ask(srv, "GET", "/api/state")
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["content-security-policy"] == CSP
    state = json.loads(body)
    assert state["mode"] == "observe" and state["top_n"] == 3
    assert state["machine"]["pages_sharing"] == snap.counters["pages_sharing"] == 1020
    assert state["machine"]["saved_bytes"] == 1020 * 4096
    assert state["machine"]["cow_ksm_total"] == 262754
    (row,) = state["processes"]
    got = (row["pid"], row["comm"], row["ksm_cow_total"], row["merges_total"])
    assert got == (11567, "golden-a", 64, 1024)
    assert state["decisions"] == {"merge": 1} and state["applied"] == {}


def test_snapshot_round_trips_for_top_connect(served: tuple[Server, Board, Snapshot]) -> None:
    srv, _, snap = served
    _, _, body = _ask(srv, "GET", "/api/snapshot")
    assert codec.load(Snapshot, json.loads(body)) == snap


def test_process_and_history_and_decisions(served: tuple[Server, Board, Snapshot]) -> None:
    srv, board, _ = served
    proc = json.loads(_ask(srv, "GET", "/api/process?pid=11567")[2])
    assert [r["name"] for r in proc["regions"]] == ["[anon]"]
    assert _ask(srv, "GET", "/api/process?pid=x")[0] == 400
    assert json.loads(_ask(srv, "GET", "/api/process?pid=1")[2]) is None
    hist = json.loads(_ask(srv, "GET", "/api/history")[2])
    assert len(hist["points"]) == 1 and list(hist["points"][0]["procs"]) == ["11567"]
    wall = hist["points"][0]["wall"]
    assert json.loads(_ask(srv, "GET", f"/api/history?since={wall}")[2]) == {"points": []}
    assert len(json.loads(_ask(srv, "GET", f"/api/history?since={wall - 1}")[2])["points"]) == 1
    assert _ask(srv, "GET", "/api/history?since=yesterday")[0] == 400
    dec = json.loads(_ask(srv, "GET", "/api/decisions")[2])
    assert [d["action"] for d in dec["decisions"]] == ["merge"]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_read_only(served: tuple[Server, Board, Snapshot], method: str) -> None:
    srv, board, _ = served
    before = board.read()
    status, headers, _ = _ask(srv, method, "/api/state")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert board.read() == before


@pytest.mark.parametrize(
    "path", ["/static/../server.py", "/static/..%2f..%2fcli.py", "/static/.hidden", "/static/", "/nope"]
)
def test_nothing_outside_the_web_directory(served: tuple[Server, Board, Snapshot], path: str) -> None:
    srv, _, _ = served
    assert _ask(srv, "GET", path)[0] == 404


def test_listen_parsing() -> None:
    assert parse_listen("127.0.0.1:9477") == ("127.0.0.1", 9477)
    assert parse_listen("9000") == ("127.0.0.1", 9000)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    assert parse_listen("off") is None
    for bad in ("127.0.0.1:x", "1:70000"):
        with pytest.raises(UsageError):
            parse_listen(bad)
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")


def test_a_port_in_use_is_a_sentence() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UsageError, match=rf"cannot listen on 127.0.0.1:{port}: Address already in use"):
            Server(Board(), "127.0.0.1", port)
