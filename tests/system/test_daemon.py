"""ksmtrace daemon against the real kernel: real processes, real ksmd, real remote madvise.

Each test starts the daemon as a user would (``python -m ksmtrace daemon -j
--policy FILE``) with its run directory (journal, ranges, lock) in the
test's temporary directory, reads its decisions (JSON lines) as they come,
and checks the kernel's side: which mappings are VM_MERGEABLE (smaps
``mg``), which pages are KSM pages, the KSM knobs.

Workload processes are told apart from every other process on the host by
a random comm tag: other checkouts run their tests here at the same time.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ksmtrace.kernel import ksm_sysfs
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.workload import plan_content
from tests.stray import STRAY

pytestmark = pytest.mark.system

PAGE = 4096
# Upper bounds, reached only on failure: the daemon compiles its fault probe at
# start (seconds here, minutes under the CI VM's software emulation) and needs
# two looks before it merges.
LONG = 600.0
ROOT = Path(__file__).resolve().parents[2]


class DaemonRun:
    """A daemon process and the decisions it printed so far."""

    def __init__(self, tmp: Path, policy: str | None, name: str = "d") -> None:
        self.run_dir = tmp / "run"
        args = [sys.executable, "-m", "ksmtrace", "daemon", "-j"]
        if policy is not None:
            path = tmp / f"{name}.toml"
            path.write_text(policy)
            args += ["--policy", str(path)]
        env = {**os.environ, "KSMTRACE_RUN_DIR": str(self.run_dir), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        STRAY.append(self.proc)
        self.decisions: list[dict[str, Any]] = []
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            try:
                self._q.put(json.loads(line))
            except ValueError:
                self._q.put({"action": "unparsed", "reason": line})
        self._q.put(None)

    def wait(self, pred: Any, timeout: float, what: str) -> dict[str, Any]:
        """The first decision (seen so far or to come) for which ``pred`` holds."""
        for d in self.decisions:
            if pred(d):
                return d
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                d = self._q.get(timeout=left)
            except queue.Empty:
                break
            if d is None:
                raise AssertionError(
                    f"daemon exited (rc {self.proc.wait()}) before {what}; decisions: "
                    f"{self.decisions}; stderr: {self.proc.stderr.read() if self.proc.stderr else ''}"
                )
            self.decisions.append(d)
            if pred(d):
                return d
        raise AssertionError(f"no decision: {what} within {timeout}s; decisions: {self.decisions}")

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                d = self._q.get(timeout=left)
            except queue.Empty:
                return
            if d is None:
                return
            self.decisions.append(d)

    def book_ranges(self, pid: int) -> list[dict[str, Any]]:
        """The daemon's range book (run_dir/daemon.ranges): what it says it made mergeable."""
        doc = json.loads((self.run_dir / "daemon.ranges").read_text())
        return [r for r in doc["ranges"] if r["pid"] == pid and r["state"] == "done"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> tuple[int, str]:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        self.drain(0.5)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        return rc, err


def mergeable_pages(pid: int) -> list[tuple[int, int]]:
    return [(v.start, v.end) for v in ProcFS().smaps(pid) if v.mergeable]


def _policy(tag: str, mode: str = "enforce", extra: str = "", narrow: bool = False) -> str:
    return f"""\
mode = "{mode}"
interval = "2s"
self_opted = {"true" if narrow else "false"}
narrow_self_opted = {"true" if narrow else "false"}

[[candidate]]
comm = ["{tag}a", "{tag}b"]

[runs]
min_run_pages = 4
max_gap_pages = 4
min_saving_pages = 8
stable_looks = 2

[churn]
window = "4s"
cooldown = "10m"
{extra}
"""


def _scattered(wl: Any, seed: int) -> tuple[int, list[int | None]]:
    """4 MiB: a tenth in runs of 8 duplicate pages (16 contents, also across processes)."""
    pages = 1024
    got = wl.call("alloc", name="m", pages=pages, kind="mix", fraction=0.1, run=8, pool=16, seed=seed)
    return got["addr"], plan_content("mix", pages, seed, 0.1, 8, 16)


def test_candidates_duplicate_runs_merge_and_unique_pages_stay_out(ksm, workload, tmp_path) -> None:
    tag = secrets.token_hex(3)
    a, b = workload(comm=f"{tag}a"), workload(comm=f"{tag}b")
    addr_a, ids_a = _scattered(a, 11)
    _scattered(b, 12)
    d = DaemonRun(tmp_path, _policy(tag))
    try:
        d.wait(lambda x: x["action"] == "start", LONG, "start")
        merged = d.wait(
            lambda x: x["action"] == "merge" and x["pid"] == a.pid and x["applied"], LONG, "merge of a"
        )
        assert "duplicate" in merged["reason"]
        d.drain(3)
        # The workload's region only: the interpreter's own heap has duplicates too
        # (zeroed and repeated pages), which the daemon rightly merges as well.
        end_a = addr_a + 1024 * PAGE
        ranges = [(s, e) for s, e in mergeable_pages(a.pid) if addr_a <= s < end_a]
        assert ranges, "nothing of a's region was made mergeable"
        dup = {addr_a + i * PAGE for i, c in enumerate(ids_a) if c is not None}
        covered = {p for s, e in ranges for p in range(s, e, PAGE)}
        unique_in = covered - dup
        print(
            f"\nmergeable: {len(covered)} pages in {len(ranges)} ranges; duplicates {len(dup)}, "
            f"covered {len(dup & covered)}; unique pages made mergeable {len(unique_in)}"
        )
        assert len(dup & covered) >= 0.9 * len(dup)
        # Only the gaps the policy lets runs join across (max_gap_pages = 4) may hold unique pages.
        assert len(unique_in) <= 4 * len(ranges)
        # ksmtrace optins says which regions the daemon made mergeable, and how much they hold.
        env = {**os.environ, "KSMTRACE_RUN_DIR": str(d.run_dir), "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "ksmtrace", "optins", "-p", str(a.pid)]
        text = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        assert "made mergeable by ksmtrace daemon:" in text and "daemon" in text, text
        doc = json.loads(
            subprocess.run([*cmd, "-j"], capture_output=True, text=True, env=env, check=True).stdout
        )
        made = doc["processes"][0]["made_by_daemon"]
        assert made["runs"] == len(d.book_ranges(a.pid)) and made["dup_pages"] > 0, made
        ksm.start()
        ksm.wait_merged(a.pid, addr_a, 1024 * PAGE, want=int(0.8 * len(dup)), timeout=180)
    finally:
        rc, err = d.stop()
    assert rc in (0, 128 + signal.SIGTERM), err


@pytest.mark.host_only(
    "the daemon's own decisions; the VM's daemon tests cover its kernel paths (scan, madvise, knobs)"
)
def test_never_rule_wins_and_observe_mode_changes_nothing(ksm, workload, tmp_path) -> None:
    tag = secrets.token_hex(3)
    a, b = workload(comm=f"{tag}a"), workload(comm=f"{tag}b")
    _scattered(a, 21)
    _scattered(b, 22)
    never = f'[[never]]\ncomm = "{tag}b"\n'
    before = ksm_sysfs.read().knobs
    d = DaemonRun(tmp_path, _policy(tag, extra=never))
    try:
        d.wait(lambda x: x["action"] == "merge" and x["pid"] == a.pid and x["applied"], LONG, "merge of a")
        refused = d.wait(lambda x: x["action"] == "refuse" and x["pid"] == b.pid, 10, "b refused")
        assert "[[never]]" in refused["reason"] and "wins over" in refused["reason"]
        d.drain(6)  # more looks: b must stay out whatever they find
        assert mergeable_pages(b.pid) == []
        assert not [x for x in d.decisions if x["action"] == "merge" and x["pid"] == b.pid]
    finally:
        d.stop()
    # Observe: the same choices are made and said, nothing is changed.
    c = workload(comm=f"{tag}a")
    _scattered(c, 23)
    o = DaemonRun(tmp_path, _policy(tag, mode="observe"), name="o")
    try:
        would = o.wait(lambda x: x["action"] == "merge" and x["pid"] == c.pid, LONG, "would merge c")
        assert would["applied"] is False
        o.drain(3)
        assert mergeable_pages(c.pid) == []
    finally:
        rc, err = o.stop()
    assert rc in (0, 128 + signal.SIGTERM), err
    assert ksm_sysfs.read().knobs == before  # observe mode proposed ksmd settings, wrote none


@pytest.mark.host_only(
    "the daemon's own decisions; the VM's daemon tests cover its kernel paths (scan, madvise, knobs)"
)
def test_trust_domains_are_never_mergeable_at_once(ksm, workload, tmp_path) -> None:
    tag = secrets.token_hex(3)
    a, b = workload(comm=f"{tag}a"), workload(comm=f"{tag}b")
    _scattered(a, 31)
    _scattered(b, 32)
    domains = f'[[domain]]\nname = "red"\ncomm = "{tag}a"\n\n[[domain]]\nname = "blue"\ncomm = "{tag}b"\n'
    d = DaemonRun(tmp_path, _policy(tag, extra=domains))
    try:
        first = d.wait(lambda x: x["action"] == "merge" and x["applied"], LONG, "a first merge")
        other = b.pid if first["pid"] == a.pid else a.pid
        refused = d.wait(lambda x: x["action"] == "refuse" and x["pid"] == other, 15, "other domain refused")
        assert "domain" in refused["reason"]
        d.drain(6)
        assert mergeable_pages(other) == []
    finally:
        d.stop()


@pytest.mark.host_only(
    "the daemon's own decisions; the VM's daemon tests cover its kernel paths (scan, madvise, knobs)"
)
def test_write_storm_is_unmerged_with_its_reason(ksm, workload, tmp_path) -> None:
    """A range the daemon made, and (narrowing allowed) a self-opted process's region."""
    tag = secrets.token_hex(3)
    a = workload(comm=f"{tag}a")
    c = workload(comm=f"{tag}c")  # not a candidate: opts in itself
    addr, _ = _scattered(a, 41)
    _scattered(c, 41)  # the same contents: a's duplicates merge with c's too
    assert c.call("madvise", name="m")["ret"] == 0
    d = DaemonRun(tmp_path, _policy(tag, narrow=True))
    try:
        # The first merge inside the workload's region (the interpreter's own heap has duplicates too).
        m = d.wait(
            lambda x: (
                x["action"] == "merge"
                and x["pid"] == a.pid
                and x["applied"]
                and addr <= int(x["start"], 16) < addr + 1024 * PAGE
            ),
            LONG,
            "merge of a's region",
        )
        ksm.start()
        start = int(m["start"], 16)
        first, count = (start - addr) // PAGE, (int(m["end"], 16) - start) // PAGE
        ksm.wait_merged(a.pid, start, count * PAGE, want=1, timeout=180)
        # A write storm: every page written again and again, so each merge ksmd
        # makes is broken at once.
        deadline = time.monotonic() + 90
        got: dict[int, dict[str, Any]] = {}
        while time.monotonic() < deadline and len(got) < 2:
            v = int(time.monotonic() * 10) & 0xFF
            if a.pid not in got:
                a.call("write", name="m", first=first, count=count, value=v)
            if c.pid not in got:
                c.call("write", name="m", value=v)
            d.drain(0.2)
            got = {
                x["pid"]: x for x in d.decisions if x["action"] == "unmerge" and x["pid"] in (a.pid, c.pid)
            }
        assert a.pid in got and c.pid in got, f"unmerges within 90 s: {got}; decisions: {d.decisions}"
        for x in got.values():
            assert x["applied"] and "copy-on-write" in x["reason"], x
        assert "opted in itself" in got[c.pid]["reason"]
        assert not any(s <= start < e for s, e in mergeable_pages(a.pid))
        assert not mergeable_pages(c.pid)
        # Never made mergeable again while it cools down (policy cooldown: 10 minutes).
        d.drain(5)
        assert not any(s <= start < e for s, e in mergeable_pages(a.pid))
    finally:
        d.stop()


def test_sigterm_restores_and_sigkill_leaves_what_the_next_daemon_takes_over(ksm, workload, tmp_path) -> None:
    tag = secrets.token_hex(3)
    a, b = workload(comm=f"{tag}a"), workload(comm=f"{tag}b")
    _scattered(a, 51)
    _scattered(b, 52)
    ksm.set(pages_to_scan=123, sleep_millisecs=77)
    before = ksm_sysfs.read().knobs
    d = DaemonRun(tmp_path, _policy(tag))
    d.wait(lambda x: x["action"] == "merge" and x["applied"], LONG, "a merge")
    rc, err = d.stop(signal.SIGKILL)
    assert rc == -signal.SIGKILL
    left = mergeable_pages(a.pid) + mergeable_pages(b.pid)
    assert left and (d.run_dir / "daemon.ranges").exists()
    # The next daemon repairs the knobs (through the journal) and takes the ranges over.
    d2 = DaemonRun(tmp_path, _policy(tag), name="d2")
    try:
        adopted = d2.wait(lambda x: x["action"] == "adopt", LONG, "adopt")
        assert adopted["numbers"]["ranges"] >= 1
    finally:
        rc, err = d2.stop()
    assert rc in (0, 128 + signal.SIGTERM), err
    assert ksm_sysfs.read().knobs == before


def test_one_daemon_per_host_and_a_bad_policy_is_refused_with_its_line(ksm, tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('mode = "enforce"\n\n[ksmd]\nbudget = "150%"\n')
    p = subprocess.run(
        [sys.executable, "-m", "ksmtrace", "daemon", "--check-policy", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert p.returncode == 2, p
    assert f"{bad}:4:" in p.stderr and "Traceback" not in p.stderr, p.stderr
    d = DaemonRun(tmp_path, None)
    try:
        start = d.wait(lambda x: x["action"] == "start", LONG, "start")
        assert "observe" in start["reason"]
        second = subprocess.run(
            [sys.executable, "-m", "ksmtrace", "daemon"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "KSMTRACE_RUN_DIR": str(d.run_dir)},
            timeout=LONG,
        )
        assert second.returncode == 1 and "another ksmtrace daemon" in second.stderr, second
    finally:
        d.stop()
