"""A small controllable workload: duplicate memory, opt-ins, writes on command.

Used by the built-in demo and by every system test. Run as a child process
(``python -m ksmtrace.workload``) it reads one command per line on stdin and
answers one JSON object per line on stdout, so a test can make it allocate,
opt in by any mechanism, and write to chosen pages at chosen moments.

Memory is always ``MAP_PRIVATE | MAP_ANONYMOUS``: Python's default
``mmap.mmap(-1, n)`` is MAP_SHARED, which KSM never merges.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import random
import signal
import subprocess
import sys
from typing import Any

from ksmtrace.kernel import abi
from ksmtrace.kernel.abi import (
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_UNMERGEABLE,
    PR_GET_MEMORY_MERGE,
    PR_SET_MEMORY_MERGE,
    SYS_PIDFD_OPEN,
    SYS_PROCESS_MADVISE,
)

PAGE = mmap.PAGESIZE
_libc = abi.libc()


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _result(rc: int) -> dict[str, Any]:
    if rc < 0:
        e = ctypes.get_errno()
        return {"ret": -1, "errno": e, "error": errno.errorcode.get(e, str(e))}
    return {"ret": rc, "errno": 0}


def page_content(content_id: int) -> bytes:
    """Deterministic page for a content id: same id, same bytes, in any process."""
    seed = hashlib.blake2b(content_id.to_bytes(8, "little"), digest_size=32).digest()
    return (seed * (PAGE // len(seed)))[:PAGE]


def plan_content(kind: str, pages: int, seed: int, fraction: float, run: int, pool: int) -> list[int | None]:
    """Content ids for each page; None means a unique (random) page.

    ``mix``: ``fraction`` of pages are copies from a pool of ``pool`` contents,
    laid out in runs of ``run`` pages, the rest unique. Processes given the same
    pool share duplicates across processes too.
    ``runs``: the same, in runs of random length (2 to ``run`` pages) scattered
    among unique pages, never touching: a host-like layout, where duplicates
    are a small part of a process's memory, in short runs.
    """
    if kind == "dup":
        return [seed] * pages
    if kind in ("unique", "zero"):
        return [None] * pages
    if kind == "mix":
        rng = random.Random(seed)
        ids: list[int | None] = [None] * pages
        want = int(round(fraction * pages))
        starts = list(range(0, pages, run))
        rng.shuffle(starts)
        got = 0
        for s in starts:
            if got >= want:
                break
            for p in range(s, min(s + run, pages)):
                if got >= want:
                    break
                ids[p] = 1_000_000 + rng.randrange(pool)
                got += 1
        return ids
    if kind == "runs":
        return _scattered_runs(pages, random.Random(seed), int(round(fraction * pages)), run, pool)
    raise ValueError(f"unknown content kind {kind!r}")


def _scattered_runs(pages: int, rng: random.Random, want: int, longest: int, pool: int) -> list[int | None]:
    lengths: list[int] = []
    while sum(lengths) < want:
        lengths.append(min(rng.randint(2, max(2, longest)), want - sum(lengths)))
    # Unique pages between and around the runs: one at least between two runs,
    # the rest spread at random over the k + 1 gaps.
    gaps = [0] + [1] * (len(lengths) - 1) + [0]
    spare = pages - want - (len(lengths) - 1)
    if spare < 0:
        raise ValueError(f"{want} duplicate pages in {len(lengths)} runs do not fit in {pages} pages apart")
    for _ in range(spare):
        gaps[rng.randrange(len(gaps))] += 1
    ids: list[int | None] = []
    for gap, n in zip(gaps, [*lengths, 0]):
        ids += [None] * gap
        ids += [1_000_000 + rng.randrange(pool) for _ in range(n)]
    return ids


class Region:
    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.mm = mmap.mmap(
            -1,
            pages * PAGE,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    def fill(self, ids: list[int | None], kind: str, untouched: int = 0) -> None:
        """Write each page's content; the last ``untouched`` pages are left
        unwritten (a later read maps the shared zero page there)."""
        cache: dict[int, bytes] = {}
        for i, cid in enumerate(ids[: len(ids) - untouched]):
            if kind == "zero":
                self.mm[i * PAGE] = 0  # touch: a private zero-filled page
                continue
            if cid is None:
                data = os.urandom(PAGE)
            else:
                data = cache.get(cid) or cache.setdefault(cid, page_content(cid))
            self.mm[i * PAGE : (i + 1) * PAGE] = data


class Server:
    """The workload process side: executes commands from stdin."""

    def __init__(self) -> None:
        self.regions: dict[str, Region] = {}
        self.children: list[int] = []

    def _region(self, name: str) -> Region:
        return self.regions[name]

    def cmd_alloc(
        self,
        name: str,
        pages: int,
        kind: str = "dup",
        seed: int = 1,
        fraction: float = 1.0,
        run: int = 16,
        pool: int = 64,
        untouched: int = 0,
    ) -> dict[str, Any]:
        r = Region(int(pages))
        if int(untouched):
            # With THP "always" (Debian's default) a write near the tail would
            # fault in a huge page and back the untouched pages with zero-filled
            # memory, not the shared zero page a later read is meant to map.
            _libc.madvise(ctypes.c_void_p(r.addr), r.pages * PAGE, MADV_NOHUGEPAGE)
        ids = plan_content(kind, int(pages), int(seed), float(fraction), int(run), int(pool))
        r.fill(ids, kind, int(untouched))
        self.regions[name] = r
        return {"addr": r.addr, "len": r.pages * PAGE}

    def cmd_madvise(
        self,
        name: str,
        advice: str = "mergeable",
        first: int = 0,
        count: int | None = None,
        addr: int | None = None,
        length: int | None = None,
    ) -> dict[str, Any]:
        adv = {"mergeable": MADV_MERGEABLE, "unmergeable": MADV_UNMERGEABLE}.get(advice)
        adv = int(advice) if adv is None else adv
        if addr is None:
            r = self._region(name)
            n = r.pages - int(first) if count is None else int(count)
            addr, length = r.addr + int(first) * PAGE, n * PAGE
        return _result(_libc.madvise(ctypes.c_void_p(int(addr)), int(length or 0), adv))

    def cmd_pmadvise(self, name: str, advice: str = "mergeable", pid: int | None = None) -> dict[str, Any]:
        """process_madvise on a pidfd of ``pid`` (default: our own) over region ``name``."""
        adv = {"mergeable": MADV_MERGEABLE, "unmergeable": MADV_UNMERGEABLE}[advice]
        r = self._region(name)
        pidfd = _libc.syscall(SYS_PIDFD_OPEN, os.getpid() if pid is None else int(pid), 0)
        if pidfd < 0:
            return _result(-1)
        try:
            iov = _IoVec(r.addr, r.pages * PAGE)
            rc = _libc.syscall(SYS_PROCESS_MADVISE, int(pidfd), ctypes.byref(iov), 1, adv, 0)
            return {**_result(rc), "pidfd": int(pidfd)}
        finally:
            os.close(pidfd)

    def cmd_prctl(self, mode: str) -> dict[str, Any]:
        if mode == "get":
            return _result(_libc.prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0))
        return _result(_libc.prctl(PR_SET_MEMORY_MERGE, 1 if mode == "on" else 0, 0, 0, 0))

    def cmd_write(
        self, name: str, first: int = 0, count: int | None = None, step: int = 1, value: int = 0xA5
    ) -> dict[str, Any]:
        """Write one byte to every ``step``-th page of [first, first+count)."""
        r = self._region(name)
        count = r.pages - int(first) if count is None else int(count)
        n = 0
        for p in range(int(first), int(first) + count, int(step)):
            r.mm[p * PAGE + 8] = int(value) & 0xFF
            n += 1
        return {"written": n}

    def cmd_write_pages(self, name: str, pages: list[int], value: int = 0xA5) -> dict[str, Any]:
        r = self._region(name)
        for p in pages:
            r.mm[int(p) * PAGE + 8] = int(value) & 0xFF
        return {"written": len(pages)}

    def cmd_read(self, name: str) -> dict[str, Any]:
        r = self._region(name)
        total = sum(r.mm[p * PAGE] for p in range(r.pages))
        return {"sum": total}

    def cmd_checksum(self, name: str) -> dict[str, Any]:
        return {"sha256": hashlib.sha256(self._region(name).mm[:]).hexdigest()}

    def cmd_free(self, name: str) -> dict[str, Any]:
        self.regions.pop(name).mm.close()
        return {}

    def cmd_fork(self, name: str | None = None, pages: list[int] | None = None) -> dict[str, Any]:
        """A child that holds the parent's pages (fork COW) and waits for SIGTERM;
        with ``name``/``pages`` it first writes those pages of that region itself
        (the reply comes once it has)."""
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
            if name is not None:
                r = self._region(name)
                for p in pages or []:
                    r.mm[int(p) * PAGE + 8] = 0x5A
            os.write(wfd, b"k")
            os.close(wfd)
            while True:
                signal.pause()
        os.close(wfd)
        os.read(rfd, 1)
        os.close(rfd)
        self.children.append(pid)
        return {"child": pid}

    def cmd_kill_children(self) -> dict[str, Any]:
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        n, self.children = len(self.children), []
        return {"killed": n}

    def cmd_info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "regions": {k: [r.addr, r.pages] for k, r in self.regions.items()}}

    def serve(self) -> None:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            req = json.loads(line)
            op = req.pop("op")
            if op == "exit":
                self.cmd_kill_children()
                print(json.dumps({"ok": True}), flush=True)
                return
            try:
                out = getattr(self, f"cmd_{op}")(**req)
                out["ok"] = True
            except Exception as exc:  # reported to the driver, which raises
                out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(out), flush=True)


class WorkloadError(Exception):
    """The workload process reported an error or died."""


class Workload:
    """Driver side: start a workload process and send it commands."""

    def __init__(
        self, prctl_before_exec: bool = False, comm: str | None = None, executable: str | None = None
    ) -> None:
        """``executable``: the Python interpreter to run the workload with,
        default this one. A copy of it under another name gives the process
        that name as its comm (cut to 15 bytes by the kernel), /proc/PID/exe
        and argv[0], as a real program of that name would have."""
        argv = [executable or sys.executable, "-m", "ksmtrace.workload"]
        if prctl_before_exec:
            argv.append("--prctl-exec")
        if comm:
            argv += ["--comm", comm]
        env = dict(os.environ)
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1
        )
        self.pid = self.call("info")["pid"]

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise WorkloadError(f"workload {self.proc.pid} died (rc={self.proc.poll()})")
        out = json.loads(line)
        if not out.pop("ok"):
            raise WorkloadError(out["error"])
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("exit")
            except (WorkloadError, BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str]) -> None:
    # The parent drives this process and ends it by closing stdin; a Ctrl-C
    # meant for the parent (the terminal signals the whole process group)
    # must not kill it with a traceback halfway through a command.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if "--comm" in argv:
        abi.set_comm(argv[argv.index("--comm") + 1])
    if "--prctl-exec" in argv:
        # Opt the whole process in, then exec: the flag must survive execve.
        if _libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0:
            e = ctypes.get_errno()
            why = " (PR_SET_MEMORY_MERGE needs Linux 6.4+)" if e == errno.EINVAL else ""
            print(json.dumps({"ok": False, "error": f"prctl errno {e}{why}"}), flush=True)
            sys.exit(1)
        rest = [a for a in argv if a != "--prctl-exec"]
        os.execv(sys.executable, [sys.executable, "-m", "ksmtrace.workload", *rest])
    try:
        Server().serve()
    except BrokenPipeError:
        # The driver went away (the demo interrupted while we answered): end
        # quietly; stdout goes to /dev/null so that the exit's flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
