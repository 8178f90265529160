"""ksmtrace top on a real terminal (tmux) against a workload that breaks merges.

A shell in a tmux pane of 80x24 runs ``ksmtrace top``; the test sends keys
and reads the screen with ``capture-pane``, polling with a deadline. The
workload's pages are merged by ksmd and written over and over (KSM
copy-on-write faults): its row must show a non-zero KSMCOW/s, ``/`` and
Enter open its regions (its address range), ``q`` ends top with status 0
and leaves the terminal as it found it (normal screen, same stty modes,
cursor shown). SIGTERM ends it the same way with 143. ``--connect`` reads a
real ``ksmtrace daemon``'s snapshots.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ksmtrace.kernel import ksm_sysfs

pytestmark = [
    pytest.mark.system,
    pytest.mark.host_only(
        "tmux is not in the offline VM box; top draws the sampler the VM's faults tests cover"
    ),
]

ROOT = Path(__file__).resolve().parents[2]
COMM = "top-tmux-wl"
DEADLINE = 60.0  # BCC compiles the probes at start-up: several seconds on a busy host


class Pane:
    """A tmux server of its own (-L), one 80x24 pane running a plain shell."""

    def __init__(self, tmp: Path) -> None:
        self.sock = f"ksmtrace-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.tmp = tmp
        env = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        self._tmux(
            "-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "80", "-y", "24",
            "bash --norc --noprofile", env=env,
        )  # fmt: skip
        self.wait(lambda: self.text().strip(), 10, "the shell's prompt")

    def _tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        r = subprocess.run(
            ["tmux", "-L", self.sock, *args], capture_output=True, text=True, env=env, timeout=10, check=True
        )
        return r.stdout

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", "t", "-l", text)

    def lines(self) -> list[str]:
        return self._tmux("capture-pane", "-p", "-t", "t").splitlines()

    def text(self) -> str:
        return "\n".join(self.lines())

    def fmt(self, what: str) -> str:
        return self._tmux("display-message", "-p", "-t", "t", what).strip()

    def wait(
        self, cond: Callable[[], object], timeout: float, what: str, tick: Callable[[], None] | None = None
    ) -> object:
        """Poll ``cond`` (``tick`` first each time: the workload's writes) until true or the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            if tick:
                tick()
            got = cond()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; screen:\n{self.text()}")
            time.sleep(0.2)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def pane(tmp_path: Path) -> Iterator[Pane]:
    p = Pane(tmp_path)
    try:
        yield p
    finally:
        p.kill()


def _run_top(pane: Pane, *args: str) -> None:
    """top in the pane's shell, between two reads of the terminal's modes, then its exit status."""
    top = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "ksmtrace", "top", *args])
    t = shlex.quote(str(pane.tmp))
    pane.type(
        f"cd {shlex.quote(str(ROOT))}; stty -g > {t}/before; {top}; echo top-exit=$?; stty -g > {t}/after"
    )
    pane.send("Enter")


def _on_screen(pane: Pane) -> bool:
    return pane.fmt("#{alternate_on}") == "1" and any(ln.startswith("ksmtrace top") for ln in pane.lines())


def _cell(lines: list[str], pid: int, title: str) -> str | None:
    """The text under a column title in the row of ``pid`` (numbers are right-aligned to the title)."""
    head = next((ln for ln in lines if ln.split()[:2] == ["PID", "COMM"]), None)
    row = next((ln for ln in lines if ln.split()[:1] == [str(pid)]), None)
    if head is None or row is None:
        return None
    end = head.index(title) + len(title)
    start = head.rindex(" ", 0, head.index(title)) if " " in head[: head.index(title)] else 0
    return row[start:end].strip()


def _status(pane: Pane) -> int | None:
    """top's exit status as the shell echoed it (the command line itself shows ``top-exit=$?``)."""
    for ln in pane.lines():
        m = re.fullmatch(r"top-exit=(\d+)\s*", ln)
        if m:
            return int(m.group(1))
    return None


def _terminal_restored(pane: Pane) -> None:
    assert pane.fmt("#{alternate_on}") == "0"  # back on the normal screen
    assert pane.fmt("#{cursor_flag}") == "1"  # cursor shown
    before, after = (pane.tmp / "before").read_text(), (pane.tmp / "after").read_text()
    assert before == after, "stty modes differ after top"


def _breaking(ksm, workload):  # type: ignore[no-untyped-def]
    w = workload(comm=COMM)
    r = w.call("alloc", name="r", pages=256, kind="dup", seed=5)
    assert w.call("madvise", name="r")["ret"] == 0
    return w, r


def test_top_in_tmux_rows_drill_down_and_quit(ksm, workload, pane: Pane) -> None:  # type: ignore[no-untyped-def]
    w, r = _breaking(ksm, workload)
    _run_top(pane)
    pane.wait(lambda: _on_screen(pane), DEADLINE, "top's screen")
    ksm.start()  # ksmd merges, the writes below break merges again and again
    knobs = ksm_sysfs.read().knobs

    def write() -> None:
        w.call("write", name="r", first=0, count=64)

    def cow() -> float:
        v = _cell(pane.lines(), w.pid, "KSMCOW/s")
        return float(v) if v and v.replace(".", "").isdigit() else 0.0

    pane.wait(lambda: cow() > 0, DEADLINE, f"pid {w.pid}'s row with KSM COW/s above 0", tick=write)
    row = next(ln for ln in pane.lines() if ln.split()[:1] == [str(w.pid)])
    assert row.split()[1:3] == [COMM, "madvise"]

    # '/' then the comm selects exactly that row; Enter opens its regions.
    pane.send("/")
    pane.type(COMM)
    pane.send("Enter")
    pane.wait(lambda: "filter '" + COMM in pane.text(), 10, "the filter kept")
    pane.send("Enter")
    rng = f"{r['addr']:x}-{r['addr'] + r['len']:x}"
    pane.wait(lambda: rng in pane.text(), 15, f"the region {rng} in the drill-down", tick=write)
    assert f"pid {w.pid} {COMM}" in pane.text()
    pane.send("Escape")
    pane.wait(lambda: rng not in pane.text() and "PID COMM" in pane.text(), 10, "the table again")

    pane.send("q")
    pane.wait(lambda: _status(pane) is not None, 30, "top to exit")
    assert _status(pane) == 0, pane.text()
    _terminal_restored(pane)
    assert "Traceback" not in pane.text()
    assert ksm_sysfs.read().knobs == knobs  # top wrote nothing under /sys/kernel/mm/ksm


def _child_of(pid: int) -> int | None:
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(kids[0]) if kids else None


def test_sigterm_ends_top_with_the_terminal_restored(ksm, pane: Pane) -> None:  # type: ignore[no-untyped-def]
    _run_top(pane, "-d", "0.5")
    pane.wait(lambda: _on_screen(pane), DEADLINE, "top's screen")
    top = _child_of(int(pane.fmt("#{pane_pid}")))
    assert top is not None
    os.kill(top, signal.SIGTERM)
    pane.wait(lambda: _status(pane) is not None, 30, "top to exit")
    assert _status(pane) == 128 + signal.SIGTERM, pane.text()
    _terminal_restored(pane)
    assert "Traceback" not in pane.text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connect_reads_a_running_daemon(ksm, workload, wait_for) -> None:  # type: ignore[no-untyped-def]
    w, _ = _breaking(ksm, workload)
    port = _free_port()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ksmtrace", "daemon", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def top_once() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "ksmtrace", "top", "--connect", url, "--once", "-d", "0.2"],
                capture_output=True,
                text=True,
                timeout=30,
            )

        def answering() -> bool:
            return top_once().returncode == 0 or daemon.poll() is not None

        wait_for(answering, DEADLINE, "the daemon's HTTP server", interval=0.5)
        assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
        ksm.start()
        seen: list[str] = []

        def row_with_cow() -> bool:
            w.call("write", name="r", first=0, count=64)
            out = top_once()
            assert out.returncode == 0, out.stderr
            seen[:] = out.stdout.splitlines()
            v = _cell(seen, w.pid, "KSMCOW/s")
            return bool(v) and v != "0" and v.replace(".", "").isdigit()

        wait_for(row_with_cow, DEADLINE, f"pid {w.pid}'s row with KSM COW/s from the daemon", interval=0.3)
        assert any(ln.startswith("ksmtrace top ") for ln in seen), seen
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    # Without the daemon: a sentence, not a traceback.
    gone = subprocess.run(
        [sys.executable, "-m", "ksmtrace", "top", "--connect", url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert gone.returncode == 69 and "no ksmtrace daemon answers" in gone.stderr
    assert "Traceback" not in gone.stderr
