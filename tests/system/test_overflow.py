"""Every bounded map of the probes, overflowed for real on the running kernel.

Each test makes more processes, pages or calls than a map has entries (the
probes take their sizes as constructor arguments, compiled in as -D
defines), then checks that the drop count is exactly what did not fit, that
what did fit is still exact, and that the commands report the drops.
Ground truth is the kernel's own (pagemap, /proc/vmstat cow_ksm) or the same
tracepoints counted again by a second, large enough probe loaded beside the
small one: both see the same events, so the small one's counts plus its
drops must add up to the large one's, event for event.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ksmtrace.kernel import pagemap, vmstat
from ksmtrace.kernel.abi import MADV_MERGEABLE, SYS_PIDFD_OPEN, SYS_PROCESS_MADVISE
from ksmtrace.model.faults import FaultsState
from ksmtrace.probes.faults import FaultProbe, FaultSnapshot
from ksmtrace.probes.ksmd import KsmdProbe, KsmProcCounts
from ksmtrace.probes.optins import OptinProbe
from ksmtrace.workload import PAGE, Workload, page_content

pytestmark = [pytest.mark.system, pytest.mark.requires_kernel_feature("ksm_tracepoints")]
ROOT = Path(__file__).resolve().parents[2]
PID_MAX = Path("/proc/sys/kernel/pid_max")
NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


# ---- helpers ---------------------------------------------------------------


def _events(c: KsmProcCounts) -> int:
    """Counter increments of one process: each is one event of the ksmd probe."""
    return c.merges + c.merge_fails + c.zero_merges + c.unmerges + c.enters + c.exits


class Cli:
    """A ksmtrace command as a subprocess, with module-level sizes of the
    probes shrunk first (``sizes``: {"ksmtrace.probes.ksmd": {"MAX_PAGES": 8}}):
    the same code path as a user's command, with a bound small enough to hit."""

    def __init__(self, *args: str, sizes: dict[str, dict[str, int]] | None = None) -> None:
        lines = ["import sys"]
        for mod, values in (sizes or {}).items():
            lines.append(f"import {mod} as m")
            lines += [f"m.{k} = {v!r}" for k, v in values.items()]
        lines += ["from ksmtrace.cli import main", "sys.exit(main(sys.argv[1:]))"]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "; ".join(lines), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.lines: list[dict[str, Any]] = []
        self.err = ""
        self._wait_tracing()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _wait_tracing(self, timeout: float = 60.0) -> None:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.5)
            if ready:
                line = self.proc.stderr.readline()
                if not line:
                    break
                self.err += line
                if line.startswith("Tracing"):
                    return
        self.proc.kill()
        _out, err = self.proc.communicate()
        raise AssertionError(f"command did not start: {self.err}{err}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.lines.append(json.loads(line))

    def wait_for(self, cond: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        """The first line (read from now on) for which ``cond`` holds."""
        seen = len(self.lines)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                line = self.lines[seen]
                seen += 1
                if cond(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no such line in {timeout}s; last: {self.lines[-1:] or None}")

    def stop(self) -> list[dict[str, Any]]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        # stdout is the reader thread's alone: it gets every line up to EOF.
        self._reader.join(10)
        assert self.proc.stderr is not None
        self.err += self.proc.stderr.read()
        assert "Traceback" not in self.err, self.err
        return self.lines


@pytest.fixture
def cli() -> Iterator[Callable[..., Cli]]:
    started: list[Cli] = []

    def make(*args: str, sizes: dict[str, dict[str, int]] | None = None) -> Cli:
        c = Cli(*args, sizes=sizes)
        started.append(c)
        return c

    yield make
    for c in started:  # a failed test must not leave BPF programs behind
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.communicate()


# ---- 1. ksmd probe: per-process and per-page maps ---------------------------


def test_ksmd_process_map_overflow(ksm, workload, cli) -> None:  # type: ignore[no-untyped-def]
    """Five merging processes, room for two: the two that opted in first are
    counted exactly; every event of the other three is one drop."""
    n, fit, pages = 5, 2, 48
    ws: list[Workload] = [workload() for _ in range(n)]
    regions = [w.call("alloc", name="r", pages=pages, kind="dup", seed=70 + i) for i, w in enumerate(ws)]
    pids = [w.pid for w in ws]
    # The command as users run it (no pid filter in its kernel map: -p with
    # several pids filters rows only), with room for two processes.
    faults = cli("faults", "-j", "0.3", "200", sizes={"ksmtrace.probes.ksmd": {"MAX_PROCS": fit}})
    with (
        KsmdProbe() as everyone,  # unfiltered: tells whether anything else merged meanwhile
        KsmdProbe(pids=pids) as big,
        KsmdProbe(pids=pids, max_procs=fit) as small,
    ):
        for w in ws:  # in this order: ksm_enter gives the first two the two entries
            assert w.call("madvise", name="r")["ret"] == 0
        ksm.merge_then_stop(*[(w.pid, r, pages) for w, r in zip(ws, regions)])
        b, s, e = big.snapshot(), small.snapshot(), everyone.snapshot()

    assert set(s.procs) == set(pids[:fit])
    for pid in pids[:fit]:
        assert s.procs[pid] == b.procs[pid]  # what fit is exact
    expected = sum(_events(b.procs[p]) for p in pids[fit:])
    assert s.scan.proc_drops == expected
    # What the events were: one ksm_enter, then merges that are the KSM pages now.
    for w, r in zip(ws, regions):
        c = b.procs[w.pid]
        assert c.enters == 1 and c.exits == 0
        live = pagemap.range_pages(w.pid, r["addr"], r["addr"] + r["len"]).ksm
        assert c.merges - c.unmerges == live == pages
    assert expected >= (n - fit) * (1 + pages)
    # Page events of processes that did not fit are not looked up at all.
    assert s.scan.page_drops == 0
    assert {t for t, _ in s.pages} == set(pids[:fit])

    # The command's map took the same first two (its probes attached before
    # the opt-ins), unless some other process on the machine had KSM events
    # meanwhile and took an entry: then only bounds hold.
    line = faults.wait_for(lambda ln: ln["drops"]["ksmd_proc_drops"] >= expected)
    faults.stop()
    others = {t: _events(c) for t, c in e.procs.items() if t not in pids}
    if not others:
        assert line["drops"]["ksmd_proc_drops"] == expected
    else:
        assert (
            expected
            <= line["drops"]["ksmd_proc_drops"]
            <= expected + sum(others.values()) + sum(_events(b.procs[p]) for p in pids[:fit])
        )


def test_ksmd_page_map_overflow(ksm, workload, cli) -> None:  # type: ignore[no-untyped-def]
    """One process merging 96 pages into a page map of 16 entries: the first
    16 pages merged are counted exactly, every later page event is a drop."""
    pages, room = 96, 16
    w = workload()
    r = w.call("alloc", name="r", pages=pages, kind="dup", seed=77)
    faults = cli(
        "faults", "-j", "-p", str(w.pid), "0.3", "200", sizes={"ksmtrace.probes.ksmd": {"MAX_PAGES": room}}
    )
    with KsmdProbe(pid=w.pid) as big, KsmdProbe(pid=w.pid, max_pages=room) as small:
        assert w.call("madvise", name="r")["ret"] == 0
        ksm.merge_then_stop((w.pid, r, pages))
        b, s = big.snapshot(), small.snapshot()
    assert s.procs == b.procs  # the process map did not overflow
    assert s.scan.proc_drops == 0
    assert len(s.pages) == room
    for key, v in s.pages.items():
        assert b.pages[key] == v  # what fit is exact
    lost = sum(m + u for key, (m, u) in b.pages.items() if key not in s.pages)
    assert s.scan.page_drops == lost
    c = b.procs[w.pid]
    assert sum(m + u for m, u in b.pages.values()) == c.merges + c.unmerges  # every page event
    assert len(b.pages) == pages and c.merges - c.unmerges == pages
    assert lost >= pages - room
    # The command: same pid filter, same events in the same order, same bound.
    line = faults.wait_for(lambda ln: ln["drops"]["ksmd_page_drops"] >= lost)
    w.call("info")  # nothing more happens: the next report must say the same
    later = faults.wait_for(lambda ln: True)
    faults.stop()
    assert line["drops"]["ksmd_page_drops"] == later["drops"]["ksmd_page_drops"] == lost
    assert line["drops"]["ksmd_proc_drops"] == 0
    (row,) = [p for p in later["processes"] if p["pid"] == w.pid]
    assert row["merges_total"] == c.merges


# ---- 2. opt-in probe: calls in flight -------------------------------------

# A process whose threads each stay inside process_madvise(MADV_MERGEABLE)
# until told to go on: each passes an iovec on its own page of a userfaultfd
# range, so the kernel's copy of the iovec (import_iovec, after sys_enter)
# sleeps in the fault until the page is supplied with UFFDIO_COPY. The
# userfaultfd's fault messages say when every thread is in. madvise and prctl
# take no user memory, so nothing can hold them in the kernel like this.
_HOLDER = r"""
import ctypes, json, mmap, os, struct, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
n = int(sys.argv[1]); nr_uffd, nr_pidfd_open, nr_pmadvise, madv = map(int, sys.argv[2:6])
def iowr(nr, size):
    return (3 << 30) | (size << 16) | (0xAA << 8) | nr
uffd = libc.syscall(nr_uffd, os.O_CLOEXEC)
assert uffd >= 0, ctypes.get_errno()
api = ctypes.create_string_buffer(struct.pack("QQQ", 0xAA, 0, 0))
assert libc.ioctl(uffd, iowr(0x3F, 24), api) == 0, ctypes.get_errno()
page = mmap.PAGESIZE
area = mmap.mmap(-1, n * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
base = ctypes.addressof(ctypes.c_char.from_buffer(area))
reg = ctypes.create_string_buffer(struct.pack("QQQQ", base, n * page, 1, 0))  # MODE_MISSING
assert libc.ioctl(uffd, iowr(0x00, 32), reg) == 0, ctypes.get_errno()
target = mmap.mmap(-1, 4 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
tbase = ctypes.addressof(ctypes.c_char.from_buffer(target))
pidfd = libc.syscall(nr_pidfd_open, os.getpid(), 0)
rets = [None] * n
def call(i):
    rets[i] = libc.syscall(nr_pmadvise, pidfd, ctypes.c_void_p(base + i * page), 1, madv, 0)
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()  # "start": the probes are attached
threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
waiting = set()
while len(waiting) < n:  # one fault message per sleeping thread
    msg = os.read(uffd, 32)
    assert msg[0] == 0x12, msg  # UFFD_EVENT_PAGEFAULT
    waiting.add(struct.unpack_from("Q", msg, 16)[0] & ~(page - 1))
print(json.dumps({"blocked": len(waiting)}), flush=True)
sys.stdin.readline()  # "go"
src = ctypes.create_string_buffer(struct.pack("QQ", tbase, 4 * page).ljust(page, b"\0"))
for addr in sorted(waiting):
    copy = ctypes.create_string_buffer(struct.pack("QQQQq", addr, ctypes.addressof(src), page, 0, 0))
    assert libc.ioctl(uffd, iowr(0x03, 40), copy) == 0, ctypes.get_errno()
for t in threads:
    t.join()
print(json.dumps({"rets": rets}), flush=True)
sys.stdin.readline()
"""


class Holder:
    """The process of _HOLDER, driven line by line."""

    def __init__(self, threads: int) -> None:
        nrs = [str(x) for x in (323, SYS_PIDFD_OPEN, SYS_PROCESS_MADVISE, MADV_MERGEABLE)]  # 323: userfaultfd
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(threads), *nrs],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        assert self.read() == {"ready": True}

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"holder died: rc={self.proc.wait()}"
        return dict(json.loads(line))

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send("exit")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_inflight_table_overflow(cli) -> None:  # type: ignore[no-untyped-def]
    """Twelve threads inside process_madvise at once, room for four: eight
    calls are not followed (inflight_full), the four are reported exactly,
    by the probe and by snoop's summary."""
    threads, room = 12, 4
    holder = Holder(threads)
    try:
        snoop = cli(
            "snoop",
            "-j",
            "-p",
            str(holder.pid),
            "--no-inventory",
            sizes={"ksmtrace.probes.optins": {"MAX_INFLIGHT": room}},
        )
        with OptinProbe(pids=[holder.pid], max_inflight=room) as probe:
            holder.send("start")
            assert holder.read() == {"blocked": threads}
            # Every thread is past sys_enter and asleep: the table is full now.
            held = probe.stats()
            assert (held.inflight_full, held.emitted) == (threads - room, 0)
            holder.send("go")
            rets = holder.read()["rets"]
            assert all(r == 4 * PAGE for r in rets), rets  # own pidfd: the whole range advised
            events: list[Any] = []
            deadline = time.monotonic() + 10
            while len(events) < room and time.monotonic() < deadline:
                events += probe.poll(100)
            events += probe.drain()
            st = probe.stats()
        assert (st.inflight_full, st.emitted, st.lost) == (threads - room, room, 0)
        assert len(events) == room
        assert {(e.syscall, e.op, e.ret, e.pid) for e in events} == {
            ("process_madvise", MADV_MERGEABLE, 4 * PAGE, holder.pid)
        }
        assert len({e.tid for e in events}) == room
        records = snoop.stop()
        (summary,) = [r for r in records if r["type"] == "summary"]
        assert (summary["inflight_full"], summary["events"], summary["lost"]) == (threads - room, room, 0)
        assert len([r for r in records if r["type"] == "event"]) == room
    finally:
        holder.close()


# ---- fault probe helpers -----------------------------------------------------


def _pair(fp: FaultProbe) -> tuple[FaultSnapshot, int]:
    """A fault snapshot and cow_ksm read back to back."""
    snap = fp.snapshot()
    return snap, vmstat.ksm_vmstat()["cow_ksm"]


def _traced(s0: FaultSnapshot, s1: FaultSnapshot, pids: set[int] | None = None) -> int:
    """KSM COW faults counted per process between two snapshots (exited
    processes whose pid was reused included)."""
    total = 0
    for tgid, pf in s1.procs.items():
        if pids is None or tgid in pids:
            before = s0.procs.get(tgid) if s0.idents.get(tgid) == s1.idents.get(tgid) else None
            total += pf.total.ksm_cow - (before.total.ksm_cow if before else 0)
    for tgid, ident, pf in s1.exited:
        if pids is None or tgid in pids:
            before = s0.procs.get(tgid) if s0.idents.get(tgid) == ident else None
            total += pf.total.ksm_cow - (before.total.ksm_cow if before else 0)
    return total


def _stat(s0: FaultSnapshot, s1: FaultSnapshot, name: str) -> int:
    return s1.stats[name] - s0.stats[name]


class OwnRegion:
    """Mergeable memory of this (the test) process: the only way to make the
    kernel write into a merged page from a syscall of a process under test
    without changing the workload program."""

    def __init__(self, pages: int, content: int) -> None:
        self.len = pages * PAGE
        self.mm = mmap.mmap(-1, self.len, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        data = page_content(content)
        for i in range(pages):
            self.mm[i * PAGE : (i + 1) * PAGE] = data
        buf = (ctypes.c_char * self.len).from_buffer(self.mm)
        self.addr = ctypes.addressof(buf)
        del buf  # the address stays; the export would keep mm from closing

    def madvise(self) -> None:
        rc = _libc.madvise(ctypes.c_void_p(self.addr), ctypes.c_size_t(self.len), MADV_MERGEABLE)
        assert rc == 0, os.strerror(ctypes.get_errno())

    def region(self) -> dict[str, int]:
        return {"addr": self.addr, "len": self.len}

    def close(self) -> None:
        # Unmerge first: the test process lives on, and its merged pages
        # would stay in ksmd's lists for later tests.
        _libc.madvise(ctypes.c_void_p(self.addr), ctypes.c_size_t(self.len), 13)  # MADV_UNMERGEABLE
        self.mm.close()


# ---- 5. KSM COW taken in kernel mode ------------------------------------------


def test_kernel_mode_ksm_cow(ksm, cli) -> None:  # type: ignore[no-untyped-def]
    """pread(2) into merged pages: copy_to_user takes the write fault in
    kernel mode and breaks the merge (cow_ksm counts it). The probe counts
    it for the process like a user-mode one, and once more as kernel-mode."""
    pages, by_read, by_write = 64, 24, 9
    me = os.getpid()
    own = OwnRegion(pages, content=91)
    try:
        with FaultProbe() as fp:
            own.madvise()
            faults = cli("faults", "-j", "-p", str(me), "0.3", "200")
            ksm.merge_then_stop((me, own.region(), pages))
            s0, cow0 = _pair(fp)
            with tempfile.TemporaryFile() as f:
                f.write(b"r" * (by_read * PAGE))
                f.flush()
                got = os.preadv(f.fileno(), [memoryview(own.mm)[: by_read * PAGE]], 0)
            assert got == by_read * PAGE
            for i in range(by_read, by_read + by_write):
                own.mm[i * PAGE + 8] = 1  # user-mode writes beside them
            s1, cow1 = _pair(fp)
        assert own.mm[: by_read * PAGE] == b"r" * (by_read * PAGE)
        live = pagemap.range_pages(me, own.addr, own.addr + own.len).ksm
    finally:
        own.close()
    assert live == pages - by_read - by_write
    assert _stat(s0, s1, "kernel_mode_ksm_cow") == by_read
    assert _traced(s0, s1, {me}) == by_read + by_write
    # Kernel-mode ones are in the per-process counts already (the counter
    # says how many of them were), so the per-process sum alone is cow_ksm.
    assert _traced(s0, s1) + _stat(s0, s1, "untracked_ksm_cow") == cow1 - cow0
    assert _stat(s0, s1, "walk_failures") == 0
    # The command (pid filter in the kernel: only this process's faults).
    # (a report may fall between the read and the writes: wait for one after both)
    line = faults.wait_for(lambda ln: sum(p["ksm_cow_total"] for p in _rows(ln, me)) >= by_read + by_write)
    faults.stop()
    assert line["drops"]["kernel_mode_ksm_cow"] == by_read
    (row,) = _rows(line, me)
    assert row["ksm_cow_total"] == by_read + by_write


# ---- 3. pids beyond the fault probe's table -----------------------------------


@pytest.fixture
def pid_max(ksm) -> Iterator[int]:  # type: ignore[no-untyped-def]
    """kernel.pid_max as it was, put back after the test; under the ksm
    fixture's lock, so the tests that count faults never see it changed."""
    saved = PID_MAX.read_text()
    try:
        yield int(saved)
    finally:
        PID_MAX.write_text(saved)
        assert PID_MAX.read_text() == saved


def _spawn_above(limit: int, high: int) -> Workload:
    """A workload whose pid is above ``limit``: pid_max raised to ``high``, the
    pid cursor moved past ``limit``, the fork done, pid_max put back at once
    (a pid above pid_max lives on). Another fork on the machine can take the
    pid meanwhile: then try again."""
    saved = PID_MAX.read_text()
    for _ in range(5):
        PID_MAX.write_text(str(high))
        try:
            NS_LAST_PID.write_text(str(high - 1000))
            w = Workload()
        finally:
            PID_MAX.write_text(saved)
        if w.pid > limit:
            return w
        w.close()
    raise AssertionError(f"no pid above {limit} in 5 tries")


def test_pid_beyond_table_after_pid_max_raised(ksm, pid_max, workload) -> None:  # type: ignore[no-untyped-def]
    """The fault probe sizes its pid table from pid_max at start. A process
    whose pid is beyond it (pid_max raised later) gets no slot: each of its
    events that needed one is a counted drop, and its KSM COW faults are
    still counted, machine-wide (untracked_ksm_cow), so the sum stays exact;
    the report says both."""
    from ksmtrace.views import faults as view

    pages, written = 64, 21
    with FaultProbe() as fp:
        assert fp.pid_max == pid_max
        t0 = time.monotonic()
        state = FaultsState(t0, vmstat.ksm_vmstat()["cow_ksm"])
        w = _spawn_above(fp.pid_max, min(4 * pid_max, 4194304))
        try:
            r = w.call("alloc", name="r", pages=pages, kind="dup", seed=93)
            with KsmdProbe(pid=w.pid) as kp:
                s0, _ = _pair(fp)
                assert w.call("madvise", name="r")["ret"] == 0
                ksm.merge_then_stop((w.pid, r, pages))
                s1, cow1 = _pair(fp)
                k = kp.snapshot()
            w.call("write", name="r", first=0, count=written, step=1)
            s2, cow2 = _pair(fp)
            report = state.update(s2, None, cow2)
        finally:
            w.close()
    c = k.procs[w.pid]
    assert w.pid not in s2.procs
    # ksm_enter, then every merge event of it asked for a slot: each a drop.
    assert _stat(s0, s1, "proc_drops") == c.enters + c.merges == 1 + c.merges
    assert c.merges >= pages
    assert _stat(s1, s2, "untracked_ksm_cow") == written
    assert _stat(s1, s2, "proc_drops") == 0  # faults need no slot
    assert _traced(s1, s2) + _stat(s1, s2, "untracked_ksm_cow") == cow2 - cow1
    assert _stat(s0, s2, "walk_failures") == 0
    # The report: the drops, and the faults counted outside any process.
    assert report.drops["proc_drops"] >= 1 + c.merges
    assert report.drops["untracked_ksm_cow"] == written
    text = "\n".join(view.text(report, "12:00:00"))
    assert f"proc_drops={report.drops['proc_drops']}" in text
    assert f"{written} KSM COW faults of pids beyond the table" in text
    assert view.as_json(report, "12:00:00")["drops"]["untracked_ksm_cow"] == written


# ---- 6. a pid reused within one interval ------------------------------------


def _rows(report_or_line: Any, pid: int) -> list[Any]:
    if isinstance(report_or_line, dict):
        return [p for p in report_or_line["processes"] if p["pid"] == pid]
    return [p for p in report_or_line.processes if p.pid == pid]


def test_pid_reused_within_one_interval_starts_at_zero(ksm, workload, cli) -> None:  # type: ignore[no-untyped-def]
    """A forked child A breaks 10 merges and exits; the next child of the
    same parent is given A's (global) pid before anyone frees A's slot, and
    breaks 7. B's counts start at zero, A's last counts stay in that
    interval's report, and the sum is still cow_ksm."""
    pages, a_pages, b_pages = 128, list(range(0, 10)), list(range(10, 17))
    p = workload()
    r = p.call("alloc", name="r", pages=pages, kind="dup", seed=95)
    assert p.call("madvise", name="r")["ret"] == 0
    with FaultProbe() as fp:
        faults = cli("faults", "-j", "2", "200")
        ksm.merge_then_stop((p.pid, r, pages))
        s0, cow0 = _pair(fp)
        state = FaultsState(s0.t, cow0)
        state.update(s0, None, cow0)
        a = p.call("fork", name="r", pages=a_pages)["child"]  # inherits the KSM pages
        s1, cow1 = _pair(fp)
        rep1 = state.update(s1, None, cow1)
        (row_a,) = _rows(rep1, a)
        assert row_a.rates["ksm_cow"].total == len(a_pages)
        # The command reported A. It is stopped while A exits and B takes the
        # pid (its probes keep counting, its proc connector socket keeps the
        # events): both fall in one of its intervals, however slow this is.
        faults.wait_for(lambda ln: [x["ksm_cow_total"] for x in _rows(ln, a)] == [len(a_pages)])
        os.kill(faults.proc.pid, signal.SIGSTOP)
        try:
            p.call("kill_children")  # A exits and is reaped: its pid is free
            b = 0
            for _ in range(10):
                NS_LAST_PID.write_text(str(a - 1))  # the next pid handed out is A's
                b = p.call("fork", name="r", pages=b_pages)["child"]
                if b == a:
                    break
                p.call("kill_children")  # another fork took it first: again
        finally:
            os.kill(faults.proc.pid, signal.SIGCONT)
        assert b == a, "could not get the pid back"
        s2, cow2 = _pair(fp)
        rep2 = state.update(s2, None, cow2)
        fp.forget(state.apply_events([]))
        s3, cow3 = _pair(fp)
        rep3 = state.update(s3, None, cow3)
    # The probe: B has its own slot, from zero; A's slot is reported once more.
    # (write-protect faults: also the forked interpreter's own fork copies)
    assert s2.procs[a].total.ksm_cow == len(b_pages)
    assert [(t, pf.total.ksm_cow) for t, _i, pf in s2.exited] == [(a, len(a_pages))]
    assert s2.idents[a] != s1.idents[a]
    assert _traced(s1, s2, {a}) == len(b_pages)
    assert _traced(s1, s2) + _stat(s1, s2, "untracked_ksm_cow") == cow2 - cow1
    # The report of that interval: A's last row and B's first, as two rows.
    rows = {x.comm == "(exited)": x for x in _rows(rep2, a)}
    assert set(rows) == {True, False}
    assert (rows[True].rates["ksm_cow"].delta, rows[True].rates["ksm_cow"].total) == (0, len(a_pages))
    assert (rows[False].rates["ksm_cow"].delta, rows[False].rates["ksm_cow"].total) == (
        len(b_pages),
        len(b_pages),
    )
    assert rows[False].rates["wp"].total == s2.procs[a].total.wp  # B's own, nothing of A's
    assert rep2.ksm_cow_sum == cow2 - cow1
    # After forget: A's slot is free, B goes on where it was.
    assert not s3.exited
    (row_b,) = _rows(rep3, a)
    assert (row_b.rates["ksm_cow"].delta, row_b.rates["ksm_cow"].total) == (0, len(b_pages))
    assert rep3.ksm_cow_sum == cow3 - cow2
    # The command: B's row starts at zero, beside A's last one in the same report.
    line = faults.wait_for(
        lambda ln: len(_rows(ln, a)) != 1 or _rows(ln, a)[0]["ksm_cow_total"] != len(a_pages)
    )
    faults.stop()
    got = sorted((x["comm"] == "(exited)", x["ksm_cow_total"]) for x in _rows(line, a))
    assert got == [(False, len(b_pages)), (True, len(a_pages))]
    p.call("kill_children")


# ---- 4. page-table walk ------------------------------------------------------

HUGE = 2 << 20  # a PMD-mapped transparent huge page


def _anon_huge_kib(pid: int, start: int, end: int) -> int:
    """AnonHugePages of the mappings inside [start, end) (smaps)."""
    kib, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < end and hi > start
        elif inside and head == "AnonHugePages:":
            kib += int(line.split()[1])
    return kib


@pytest.mark.parametrize("reads", ["inline", "helper"])
def test_walk_over_huge_pages_neither_fails_nor_counts(ksm, workload, monkeypatch, reads: str) -> None:  # type: ignore[no-untyped-def]
    """Nothing here makes the walk fail for real (see the report of this
    branch: with inlined loads a failed read is a 0 entry, and with helper
    reads it takes a present PTE of a frame without struct page, which needs
    /dev/mem or a PCI BAR: absent or locked down). What the walk does not
    follow for real is a huge page: write-protect faults of a forked child
    on PMD-mapped THPs (walk_all: every fault checked) stop at the PMD,
    count as write-protect faults, never as KSM COW, and fail nothing."""
    if reads == "helper":
        from ksmtrace.kernel import btf

        func_id = type(btf.load()).func_id
        monkeypatch.setattr(
            type(btf.load()),
            "func_id",
            lambda self, name: None if name == "bpf_rdonly_cast" else func_id(self, name),
        )
    p = workload()
    r = p.call("alloc", name="r", pages=2 * HUGE // PAGE, kind="unique", seed=97)
    if r["addr"] % HUGE:
        pytest.fail(f"region at {r['addr']:#x} is not 2 MiB aligned: no THP to test")
    # MADV_COLLAPSE (6.1+): make both 2 MiB halves huge pages now, whatever THP's mode.
    assert p.call("madvise", name="r", advice="25")["ret"] == 0
    assert _anon_huge_kib(p.pid, r["addr"], r["addr"] + r["len"]) == 2 * HUGE // 1024
    with FaultProbe() as fp:
        assert fp.inline_reads == (reads == "inline")
        assert p.call("madvise", name="r")["ret"] == 0  # mergeable: tracked; ksmd stays off
        s0, cow0 = _pair(fp)
        # The child writes one page in each huge page: the first write to each
        # is a write-protect fault on a read-only PMD (then split and copied).
        child = p.call("fork", name="r", pages=[3, HUGE // PAGE + 5])["child"]
        s1, cow1 = _pair(fp)
    p.call("kill_children")
    assert child in s1.procs
    assert s1.procs[child].total.wp >= 2
    assert s1.procs[child].total.ksm_cow == 0
    assert _stat(s0, s1, "walk_failures") == 0
    assert _traced(s0, s1) + _stat(s0, s1, "untracked_ksm_cow") == cow1 - cow0
