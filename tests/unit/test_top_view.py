"""``ksmtrace top`` rendered from snapshots recorded on the real kernel (no terminal, no root).

tests/fixtures/top/snapshots.json holds six snapshots that top's own sampler
took of three workloads breaking merges and one whose rmap items per merged
page pass 64 (tests/fixtures/capture_top.py). The screen widget is rendered
through urwid's canvas at 80x24 and other sizes; keys go through the same
handler the terminal's keys go through; ``--connect`` reads a stub daemon on
loopback, serving what ksmtrace.views.api makes of a Board of the same snapshots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import urwid

from ksmtrace.commands import top as command
from ksmtrace.errors import KsmtraceError
from ksmtrace.live.board import Board
from ksmtrace.model import codec
from ksmtrace.model.rates import Rate
from ksmtrace.model.snapshot import Snapshot
from ksmtrace.views import api, dash
from ksmtrace.views import top as view
from ksmtrace.views.top_ui import TopScreen

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "top" / "snapshots.json"
RAW = json.loads(FIXTURE.read_text())
SNAPS = [codec.load(Snapshot, d) for d in RAW]
COMMS = {"top-golden-0", "top-golden-1", "top-golden-2", "top-sparse"}


def _model() -> view.TopModel:
    m = view.TopModel()
    for s in SNAPS:
        m.update(s)
    return m


def _screen(cols: int = 80, rows: int = 24) -> tuple[TopScreen, list[str]]:
    w = TopScreen(_model())
    canvas = w.render((cols, rows))
    return w, [line.decode("utf-8") for line in canvas.text]


def _pid(comm: str) -> int:
    return next(r.pid for r in _model().rows if r.comm == comm)


def _table(lines: list[str]) -> list[str]:
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("PID COMM"))
    return [ln for ln in lines[start + 1 :] if ln.strip() and ln.split()[0].isdigit()]


def test_fixture_is_what_the_tests_need() -> None:
    rows = _model().rows
    assert {r.comm for r in rows} == COMMS
    assert any(r.ksm_cow_per_s > 0 for r in rows)
    assert [r.comm for r in rows if r.rmap_flag] == ["top-sparse"]
    assert all(r.regions for r in rows)


def test_80x24_fits_and_shows_everything() -> None:
    w, lines = _screen()
    assert len(lines) == 24
    assert all(len(ln) == 80 for ln in lines)  # one column per character here
    # Nothing urwid had to clip: every line the view made fits in 80 columns.
    made = [view.text(ln) for ln in w.lines(80, 24)]
    assert all(len(t) <= 80 for t in made), [t for t in made if len(t) > 80]
    head = "\n".join(lines[:4])
    words = ("saved", "general_profit", "ksmd CPU", "pages/s", "KSM COW", "cow_ksm", "merges", "unmerges")
    assert all(word in head for word in words), head
    assert "full scans" in head and "COW/s" in head and "ksmd running" in head and "advisor none" in head
    assert f"{len(COMMS)} procs" in lines[0]

    assert any(b in lines[3] for b in view.BLOCKS[1:]), lines[3]  # the sparklines drew something
    titles = [c.title for c in view.COLUMNS]
    assert any(ln.split() == titles for ln in lines), "table header"
    shown = _table(lines)
    assert {ln.split()[1] for ln in shown} == COMMS
    assert {ln.split()[2] for ln in shown} == {"madvise"}  # HOW
    # Sorted by KSM COW/s, largest first; the flagged row carries its mark.
    cow = [float(ln.split()[6]) for ln in shown]
    assert cow == sorted(cow, reverse=True) and cow[0] > 0
    sparse = next(ln for ln in shown if "top-sparse" in ln)
    assert sparse.rstrip().endswith("!")
    assert "q quit" in lines[-1]


def test_first_line_keeps_state_advisor_and_count() -> None:
    m = _model()
    m.source = "from 127.0.0.1:9477"
    line = view.text(view.header(m, 80)[0])
    # The source is the first to go, ksmd's knobs the next; state, advisor and count stay.
    assert line.endswith(f"ksmd running 5000 pages/10ms  advisor none  {len(COMMS)} procs"), line


@pytest.mark.parametrize(("cols", "rows"), [(80, 24), (120, 40), (100, 30), (60, 12), (20, 5)])
def test_other_sizes_render(cols: int, rows: int) -> None:
    _, lines = _screen(cols, rows)
    assert len(lines) == rows
    if cols >= 80:
        assert len(_table(lines)) == len(COMMS)


def test_wider_screen_widens_comm() -> None:
    assert view.comm_width(80) == 13 and view.comm_width(120) == 53


def test_sort_keys_filter_and_drill_down() -> None:
    w = TopScreen(_model())
    w.render((80, 24))

    def order() -> list[str]:
        lines = [ln.decode() for ln in w.render((80, 24)).text]
        return [ln.split()[1] for ln in _table(lines)]

    assert w.handle("n")
    pids = sorted(r.pid for r in _model().rows)
    assert order() == [r.comm for r in sorted(_model().rows, key=lambda r: r.pid)]
    assert w.handle("n")  # again: the other way
    assert [r.pid for r in view.visible(w.model, w.state)] == pids[::-1]
    assert w.handle("r") and order()[0] == "top-sparse"  # rmap ratio, largest first
    assert w.handle("p") and order()[-1] == "top-sparse"  # its profit is negative
    assert w.handle("c") and order()[0] == "top-golden-2"
    assert w.handle(">") and w.state.sort == "merges"
    assert w.handle("<") and w.state.sort == "ksm_cow"
    assert w.handle("i") and w.state.ascending
    # '/' filter: typed text, Enter keeps it, the first match is selected.
    for key in ["/", *"golden-1", "enter"]:
        assert w.handle(key)
    assert order() == ["top-golden-1"] and w.state.selected == _pid("top-golden-1")
    assert w.handle("enter")
    lines = [ln.decode() for ln in w.render((80, 24)).text]
    row = next(r for r in _model().rows if r.comm == "top-golden-1")
    reg = next(r for r in row.regions if r.start)
    assert any(f"{reg.start:x}-{reg.end:x}" in ln for ln in lines), lines
    assert any(ln.startswith(f"pid {row.pid} top-golden-1") for ln in lines)
    assert w.handle("esc") and w.state.drill is None
    assert w.handle("esc") and w.state.filter == ""  # Esc in the table clears the filter
    assert w.handle("h") and w.state.help
    assert any("this help" in ln.decode() for ln in w.render((80, 24)).text)
    assert w.handle("x") and not w.state.help
    with pytest.raises(urwid.ExitMainLoop):
        w.handle("q")


def test_arrows_move_the_selection_and_scroll() -> None:
    w = TopScreen(_model())
    w.render((80, 8))  # room for two rows of the table
    first = w.state.selected
    assert w.handle("down") and w.handle("down")
    w.render((80, 8))
    assert w.state.selected != first and w.state.offset == 1
    assert w.handle("end")
    w.render((80, 8))
    assert w.state.selected == view.visible(w.model, w.state)[-1].pid
    assert w.handle("home")
    w.render((80, 8))
    assert w.state.selected == first and w.state.offset == 0


def test_drill_into_a_process_that_left() -> None:
    w = TopScreen(_model(), view.TopState(drill=999999))
    lines = [ln.decode() for ln in w.render((80, 24)).text]
    assert any("pid 999999: no longer traced" in ln for ln in lines)


def test_sparkline() -> None:
    assert view.sparkline([0, 1, 2, 4], 4) == "▁▃▅█"
    assert view.sparkline([], 3) == "   "
    assert view.sparkline([5] * 10, 4) == "████"
    assert view.sparkline([0, 0], 2, ascii_only=True) == "__"


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 10 * 1024**2, -(5 * 1024**3), 1023 * 1024**4, 2**63])
def test_sizes_fit(n: int) -> None:
    assert len(view.size(n)) <= 7


@pytest.mark.parametrize("v", [0, 0.04, 9.96, 123.4, 99999.0, 1.5e6, 3e9])
def test_rates_fit(v: float) -> None:
    assert len(view.rate(v, 5)) <= 5 and len(view.rate(v)) <= 7


def test_header_fits_with_large_numbers() -> None:
    m = _model()
    assert m.machine is not None
    big = dash.MachineRow(
        **{
            **m.machine.as_dict(),
            "saved_bytes": 900 * 1024**3,
            "general_profit_bytes": -(900 * 1024**3),
            "ksmd_cpu_pct": 100.0,
            "pages_scanned_per_s": 9_999_999.0,
            "full_scans_per_min": 99999.0,
            "ksm_cow_per_s": 999_999.0,
            "cow_ksm_per_s": 999_999.0,
            "cow_ksm_total": 123_456_789_012,
            "merges_per_s": 999_999.0,
            "unmerges_per_s": 999_999.0,
            "advisor": "scan-time",
            "pages_to_scan": 100000,
            "sleep_millisecs": 1000,
            "run": 2,
        }
    )
    m.machine = big
    for line in view.header(m, 80):
        assert len(view.text(line)) <= 80, view.text(line)


GOLDEN = FIXTURE.parent / "batch.txt"


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The clock shown is local time: UTC here, whatever the machine's zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _golden_text() -> str:
    model = _model()
    return "".join(
        f"# -s {key}\n" + "\n".join(view.batch(model, view.TopState(sort=key))) + "\n"
        for key in ("ksm_cow", "rmap", "pid")
    )


def test_batch_golden(utc: None) -> None:
    """``top -b`` text for the recorded snapshots. A change meant: regenerate with
    ``KSMTRACE_REGEN=1 pytest tests/unit/test_top_view.py -k golden`` and read the diff."""
    if os.environ.get("KSMTRACE_REGEN") == "1":
        GOLDEN.write_text(_golden_text())
    assert _golden_text() == GOLDEN.read_text()


def test_batch_lines_fit() -> None:
    lines = view.batch(_model(), view.TopState(sort="pid"))
    assert all(len(ln) <= 80 for ln in lines)
    assert sum(1 for ln in lines if ln.split() and ln.split()[0].isdigit()) == len(COMMS)


# -- --connect: a stub daemon on loopback --------------------------------


def _board() -> Board:
    board = Board()
    for snap in SNAPS:
        board.record(snap)
    return board


class _Stub(BaseHTTPRequestHandler):
    """The daemon's JSON API as the daemon computes it (ksmtrace.views.api over a Board)."""

    state = _board().read()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        if url.path == "/api/state":
            out = api.state(self.state)
        elif url.path == "/api/process":
            out = api.process(self.state, int(parse_qs(url.query)["pid"][0]))
        else:
            self.send_error(404)
            return
        body = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_base_url() -> None:
    assert command.base_url("127.0.0.1:9477") == "http://127.0.0.1:9477"
    assert command.base_url("http://h:1/") == "http://h:1"


def test_daemon_source_gives_the_daemons_rows(stub: str) -> None:
    src = command.DaemonSource(stub)
    got = src.fetch()
    want = view.frame(SNAPS[-1])
    assert got.machine == want.machine
    assert [r.pid for r in got.rows] == [r.pid for r in want.rows]
    no_regions = [dataclasses.replace(r, regions=()) for r in want.rows]
    assert got.rows == no_regions
    # Regions come apart, for the process opened.
    row = next(r for r in want.rows if r.comm == "top-golden-1")
    assert src.regions(row.pid) == [
        dataclasses.replace(r, rates={k: Rate(0, round(v.per_s, 3), v.total) for k, v in r.rates.items()})
        for r in row.regions
    ]
    assert src.regions(999999) == []
    again = src.fetch()  # the same rows: the same records, not rebuilt
    assert all(a is b for a, b in zip(again.rows, got.rows)) and again.rows == got.rows


def test_connect_drill_down_draws_the_fetched_regions(stub: str) -> None:
    src = command.DaemonSource(stub)
    model = view.TopModel(source="from stub")
    model.update(src.fetch())
    w = TopScreen(model)
    w.on_drill = lambda: model.regions.update({w.state.drill: src.regions(w.state.drill)})
    for key in ["/", *"golden-2", "enter", "enter"]:
        assert w.handle(key)
    row = next(r for r in view.frame(SNAPS[-1]).rows if r.comm == "top-golden-2")
    reg = next(r for r in row.regions if r.start)
    lines = [ln.decode() for ln in w.render((80, 24)).text]
    assert any(ln.startswith(f"{reg.start:x}-{reg.end:x}") for ln in lines), lines


def test_daemon_not_there_is_a_sentence() -> None:
    port = _free_port()
    with pytest.raises(command.DaemonUnreachable) as exc:
        command.DaemonSource(f"127.0.0.1:{port}").fetch()
    assert str(exc.value).startswith(f"no ksmtrace daemon answers at http://127.0.0.1:{port}")
    assert "ksmtrace daemon" in str(exc.value)


def test_not_a_daemon_is_a_sentence(stub: str) -> None:
    with pytest.raises(command.DaemonUnreachable, match="is not a ksmtrace daemon"):
        command.DaemonSource(stub + "/elsewhere").fetch()


def test_proc_row_is_the_record_init_makes() -> None:
    for row in view.frame(SNAPS[-1]).rows:
        d = json.loads(json.dumps(row.as_dict()))
        assert command.proc_row(d) == dataclasses.replace(row, regions=())
        assert command.proc_row(json.loads(json.dumps(row.as_dict()))).rmap_flag == row.rmap_flag
    with pytest.raises(KeyError, match="comm"):
        command.proc_row({"pid": 1})


def test_daemon_without_a_sample_yet_is_said_on_the_screen(
    stub: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_Stub, "state", Board().read())
    with pytest.raises(KsmtraceError, match="has no sample yet") as exc:
        command.DaemonSource(stub).fetch()
    assert not isinstance(exc.value, command.DaemonUnreachable)  # top starts, and says so


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ksmtrace", "top", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_batch_from_a_daemon(stub: str) -> None:
    r = _cli("--connect", stub, "-b", "2", "-d", "0.1", "-s", "pid", "-n", "top-golden-1")
    assert r.returncode == 0, r.stderr
    tables = [ln for ln in r.stdout.splitlines() if ln.split() and ln.split()[0].isdigit()]
    assert [ln.split()[1] for ln in tables] == ["top-golden-1"] * 2
    assert r.stdout.count("ksmtrace top") == 2


def test_cli_daemon_not_there() -> None:
    r = _cli("--connect", f"http://127.0.0.1:{_free_port()}")
    assert r.returncode == 69
    assert r.stderr.startswith("ksmtrace: no ksmtrace daemon answers at") and "Traceback" not in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize(("args", "words"), [(["-d", "0"], "-d takes"), (["-b", "0"], "-b takes")])
def test_cli_usage_errors(args: list[str], words: str) -> None:
    r = _cli(*args)
    assert r.returncode == 2 and words in r.stderr


def test_rows_reused_only_for_the_same_records() -> None:
    snap = SNAPS[-1]
    assert snap.faults is not None and snap.processes
    reuse = dash.Rows()
    first = reuse(snap)
    assert first == dash.processes(snap)  # the same rows as without reuse
    # The same records (a carried report): the very same row objects.
    again = reuse(snap)
    assert [id(r) for r in again] == [id(r) for r in first]
    # One record replaced (its profit re-read): that row anew, the others kept.
    target = next(p for p in snap.faults.processes if p.comm != "(exited)")
    moved = dataclasses.replace(target, profit_bytes=(target.profit_bytes or 0) + 4096)
    procs = [moved if p is target else p for p in snap.faults.processes]
    snap2 = dataclasses.replace(snap, faults=dataclasses.replace(snap.faults, processes=procs))
    third = {r.pid: r for r in reuse(snap2)}
    assert third[target.pid].profit_bytes == (target.profit_bytes or 0) + 4096
    assert all(third[r.pid] is r for r in first if r.pid != target.pid)
    # An opt-in record replaced (after an exec): its how is read again.
    m = next(p for p in snap2.processes if p.pid == target.pid)
    renamed = dataclasses.replace(m, origin="prctl")
    snap3 = dataclasses.replace(snap2, processes=[renamed if p is m else p for p in snap2.processes])
    assert {r.pid: r for r in reuse(snap3)}[target.pid].how == "prctl"
    assert {r.pid: r for r in dash.processes(snap3)}[target.pid].how == "prctl"
