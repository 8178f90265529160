"""KSM opt-in syscalls as typed events: load bpf/optins.bpf.c, attach, decode.

One :class:`OptinEvent` per madvise(MADV_[UN]MERGEABLE),
prctl(PR_[SG]ET_MEMORY_MERGE) or process_madvise with those advices, with
its result. Filters (pids, comm, cgroup) are compiled into the program, so
calls of other processes never leave the kernel. The ring buffer can fill
when nobody drains it: such drops are counted in the kernel and reported by
:meth:`OptinProbe.stats`.

    with OptinProbe(pids=[1234]) as probe:
        for ev in probe.events(duration=5):
            print(ev.describe())

Over 400 lines because the event layout, its decoding and the filters'
compile-time defines must agree with bpf/optins.bpf.c field for field; one
file keeps them side by side.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ksmtrace.errors import UsageError
from ksmtrace.kernel import btf as btf_mod
from ksmtrace.kernel.abi import kernel_comm_bytes
from ksmtrace.kernel.host import cgroup2_mount
from ksmtrace.kernel.signals import critical
from ksmtrace.probes import loader

SOURCE = "optins.bpf.c"

# bpf/optins.h
OPTIN_MADVISE = 1
OPTIN_PRCTL = 2
OPTIN_PROCESS_MADVISE = 3
OPTIN_FORK = 4
OPTIN_EXEC = 5
INHERIT_MERGEABLE = 1
INHERIT_MERGE_ANY = 2
STAT_LOST, STAT_INFLIGHT_FULL, STAT_MADVISE_ALL, STAT_EMITTED = 0, 1, 2, 3
COMM_LEN = 16
MAX_FILTER_PIDS = 64
MAX_INFLIGHT = 10240  # calls in flight at once (per-thread table); OptinProbe's default

SYSCALLS = {
    OPTIN_MADVISE: "madvise",
    OPTIN_PRCTL: "prctl",
    OPTIN_PROCESS_MADVISE: "process_madvise",
    OPTIN_FORK: "fork",
    OPTIN_EXEC: "exec",
}
OPS = {
    12: "MADV_MERGEABLE",
    13: "MADV_UNMERGEABLE",
    67: "PR_SET_MEMORY_MERGE",
    68: "PR_GET_MEMORY_MERGE",
}


class _RawEvent(ctypes.Structure):
    """struct optin_event of bpf/optins.h, byte for byte."""

    _fields_ = [
        ("ts_ns", ctypes.c_uint64),  # 0
        ("lat_ns", ctypes.c_uint64),  # 8
        ("cgroup_id", ctypes.c_uint64),  # 16
        ("start", ctypes.c_uint64),  # 24
        ("length", ctypes.c_uint64),  # 32
        ("ret", ctypes.c_int64),  # 40
        ("arg", ctypes.c_uint64),  # 48
        ("pid", ctypes.c_uint32),  # 56
        ("tid", ctypes.c_uint32),  # 60
        ("uid", ctypes.c_uint32),  # 64
        ("syscall", ctypes.c_uint32),  # 68
        ("op", ctypes.c_int32),  # 72
        ("pidfd", ctypes.c_int32),  # 76
        ("target_pid", ctypes.c_uint32),  # 80
        ("vlen", ctypes.c_uint32),  # 84
        ("comm", ctypes.c_char * COMM_LEN),  # 88
    ]


assert ctypes.sizeof(_RawEvent) == 104, "keep _RawEvent in step with bpf/optins.h"


def _mono_to_wall() -> float:
    """Offset that turns bpf_ktime_get_ns() (CLOCK_MONOTONIC) into epoch seconds."""
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


@dataclass(frozen=True)
class OptinEvent:
    """One opt-in syscall and its result, as the kernel saw it.

    ``syscall`` "fork" and "exec" are inherited opt-ins, not calls: a new
    process got a copy of a mergeable mm (``target_pid`` is the parent), or
    an exec kept whole-process merging (``target_pid`` is the old pid);
    ``arg`` holds INHERIT_* bits.
    """

    ts_ns: int  # CLOCK_MONOTONIC at syscall entry
    wall: float  # the same instant in epoch seconds
    lat_ns: int
    pid: int
    tid: int
    uid: int
    comm: str
    cgroup_id: int
    syscall: str  # "madvise", "prctl", "process_madvise"; "fork", "exec" (inherited)
    op: int  # advice (12, 13) or prctl option (67, 68)
    start: int
    length: int
    arg: int  # prctl arg2; process_madvise flags
    ret: int  # the syscall's return value; -errno on failure
    pidfd: int = -1
    target_pid: int = 0  # 0: not a process_madvise, or the pidfd could not be resolved
    vlen: int = 0

    @property
    def op_name(self) -> str:
        if self.inherited:
            return "merge_any" if self.arg & INHERIT_MERGE_ANY else "mergeable VMAs"
        return OPS.get(self.op, str(self.op))

    @property
    def inherited(self) -> bool:
        return self.syscall in ("fork", "exec")

    @property
    def errno(self) -> int:
        return -self.ret if self.ret < 0 else 0

    @property
    def error(self) -> str:
        return errno_mod.errorcode.get(self.errno, str(self.errno)) if self.errno else ""

    @property
    def ok(self) -> bool:
        return self.ret >= 0

    def describe_call(self) -> str:
        """The call as it would be written in C."""
        if self.syscall == "madvise":
            return f"madvise({self.start:#x}, {self.length}, {self.op_name})"
        if self.syscall == "process_madvise":
            target = f" [pid {self.target_pid}]" if self.target_pid else ""
            return (
                f"process_madvise({self.pidfd}{target}, {{{self.start:#x}, {self.length}}}"
                f"{'+' if self.vlen > 1 else ''}, {self.op_name})"
            )
        if self.syscall == "fork":
            return f"fork from {self.target_pid}: inherits {self.op_name}"
        if self.syscall == "exec":
            return "exec: keeps merge_any"
        if self.op == 67:
            return f"prctl(PR_SET_MEMORY_MERGE, {self.arg})"
        return f"prctl({self.op_name})"

    def result(self) -> str:
        return str(self.ret) if self.ok else f"-1 {self.error}"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(op_name=self.op_name, errno=self.errno, error=self.error)
        return d


def decode(raw: _RawEvent, wall_offset: float) -> OptinEvent:
    return OptinEvent(
        ts_ns=raw.ts_ns,
        wall=raw.ts_ns / 1e9 + wall_offset,
        lat_ns=raw.lat_ns,
        pid=raw.pid,
        tid=raw.tid,
        uid=raw.uid,
        comm=raw.comm.decode(errors="replace"),
        cgroup_id=raw.cgroup_id,
        syscall=SYSCALLS.get(raw.syscall, str(raw.syscall)),
        op=raw.op,
        start=raw.start,
        length=raw.length,
        arg=raw.arg,
        ret=raw.ret,
        pidfd=raw.pidfd,
        target_pid=raw.target_pid,
        vlen=raw.vlen,
    )


@dataclass(frozen=True)
class ProbeStats:
    lost: int  # ring buffer was full: events dropped in the kernel
    inflight_full: int  # per-thread hash was full: calls not followed
    emitted: int
    madvise_calls: int | None  # every madvise passing the filters (count_all_madvise)


@dataclass(frozen=True)
class CgroupFilter:
    path: str  # directory under the cgroup2 mount
    cgroup_id: int
    level: int  # depth below the root (0: root)
    rel: str  # as /proc/PID/cgroup prints it: "/", "/a/b"

    def contains(self, proc_cgroup: str) -> bool:
        return self.rel in ("/", proc_cgroup) or proc_cgroup.startswith(self.rel + "/")


def resolve_cgroup(path: str, mount: Path | None = None) -> CgroupFilter:
    """cgroup v2 id (the directory's inode) and depth of PATH.

    PATH is a directory under the cgroup2 mount or a path relative to it
    ("/system.slice"), as /proc/PID/cgroup prints it.
    """
    mount = mount or cgroup2_mount()
    p = Path(path)
    if not (p.is_absolute() and str(p).startswith(str(mount)) and p.is_dir()):
        p = mount / str(path).lstrip("/")
    if not p.is_dir():
        raise UsageError(f"no cgroup {path!r} (looked for {p})")
    rel = p.resolve().relative_to(mount.resolve())
    return CgroupFilter(
        path=str(p), cgroup_id=os.stat(p).st_ino, level=len(rel.parts), rel="/" + "/".join(rel.parts)
    )


def task_offsets(btf: btf_mod.Btf | None = None) -> dict[str, int]:
    """BTF offsets for the task -> mm flags reads of the fork/exec probes.

    Empty when BTF lacks one: the inherited opt-in events are then not traced.
    """
    btf = btf or btf_mod.load()
    want = {
        "OFF_TASK_MM": ("task_struct", "mm"),
        "OFF_TASK_PID": ("task_struct", "pid"),
        "OFF_TASK_TGID": ("task_struct", "tgid"),
        "OFF_MM_FLAGS": ("mm_struct", "flags"),
    }
    try:
        return {name: btf.offset(s, m) for name, (s, m) in want.items()}
    except KeyError:
        return {}


def pidfd_offsets(btf: btf_mod.Btf | None = None) -> dict[str, int]:
    """BTF offsets for the pidfd -> pid walk of process_madvise.

    pidfs (6.9+) keeps the struct pid in the inode (``inode->i_private``);
    verified on 6.18. Before 6.9 a pidfd is an anonymous inode file named
    "[pidfd]" holding the struct pid in ``file->private_data`` (verified on
    Debian 12's 6.1). Empty when BTF lacks a member: target pids are then
    reported as 0 (unknown) rather than guessed.
    """
    btf = btf or btf_mod.load()
    want = {
        "OFF_TASK_FILES": ("task_struct", "files"),
        "OFF_FILES_FDT": ("files_struct", "fdt"),
        "OFF_FDT_FD": ("fdtable", "fd"),
        "OFF_FDT_MAX_FDS": ("fdtable", "max_fds"),
        "OFF_FILE_INODE": ("file", "f_inode"),
        "OFF_INODE_SB": ("inode", "i_sb"),
        "OFF_SB_MAGIC": ("super_block", "s_magic"),
        "OFF_INODE_PRIVATE": ("inode", "i_private"),
        "OFF_FILE_PRIVATE": ("file", "private_data"),
        "OFF_FILE_DENTRY": ("file", "f_path.dentry"),
        "OFF_DENTRY_NAME": ("dentry", "d_name.name"),
        "OFF_PID_NUMBERS": ("pid", "numbers"),
        "OFF_UPID_NR": ("upid", "nr"),
    }
    try:
        return {name: btf.offset(s, m) for name, (s, m) in want.items()}
    except KeyError:
        return {}


def filter_comm(name: str) -> bytes:
    """NAME as the comm filter compares it (abi.kernel_comm_bytes: a longer
    name could never match otherwise); refused when the kernel could not hold it."""
    raw = kernel_comm_bytes(name)
    if not raw or b"\0" in raw:
        raise UsageError(f"cannot filter on comm {name!r}")
    return raw


def comm_words(name: str) -> tuple[int, int]:
    """The 16 bytes bpf_get_current_comm() gives for a task named NAME (NUL
    padded), read as the two u64 the BPF filter compares. Native byte order:
    the program reads them on this machine."""
    lo, hi = struct.unpack("=QQ", filter_comm(name).ljust(COMM_LEN, b"\0"))
    return lo, hi


def build_defines(
    pids: list[int] | None = None,
    comm: str | None = None,
    cgroup: CgroupFilter | None = None,
    count_all_madvise: bool = False,
    max_inflight: int = 10240,
    btf: btf_mod.Btf | None = None,
    ringbuf_pages: int = 64,
) -> dict[str, int | str]:
    if ringbuf_pages < 1 or ringbuf_pages & (ringbuf_pages - 1):
        raise UsageError("the ring buffer size must be a power of two pages")
    d: dict[str, int | str] = {"MAX_INFLIGHT": int(max_inflight), "RINGBUF_PAGES": int(ringbuf_pages)}
    if pids:
        uniq = sorted(set(int(p) for p in pids))
        if len(uniq) > MAX_FILTER_PIDS:
            raise UsageError(f"at most {MAX_FILTER_PIDS} pids can be filtered on")
        d["FILTER_PIDS"] = "{" + ",".join(str(p) for p in uniq) + "}"
        d["FILTER_NPIDS"] = len(uniq)
    if comm is not None:
        lo, hi = comm_words(comm)
        d["FILTER_COMM"] = 1
        d["FILTER_COMM_LO"] = f"{lo:#x}ULL"
        d["FILTER_COMM_HI"] = f"{hi:#x}ULL"
    if cgroup is not None:
        d["FILTER_CGROUP"] = cgroup.cgroup_id
        d["FILTER_CGROUP_LEVEL"] = cgroup.level
    if count_all_madvise:
        d["COUNT_ALL_MADVISE"] = 1
    btf = btf or btf_mod.load()
    d.update(pidfd_offsets(btf))
    d.update(task_offsets(btf))
    return d


@dataclass
class OptinProbe:
    """The loaded and attached program; poll it for events, read its counters."""

    pids: list[int] | None = None
    comm: str | None = None
    cgroup: CgroupFilter | None = None
    count_all_madvise: bool = False
    # None: MAX_INFLIGHT as it is when the probe loads (a test can shrink it for a whole command)
    max_inflight: int | None = None
    ringbuf_pages: int = 64
    _bpf: Any = field(default=None, init=False, repr=False)
    _pending: list[OptinEvent] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        defines = build_defines(
            self.pids,
            self.comm,
            self.cgroup,
            self.count_all_madvise,
            MAX_INFLIGHT if self.max_inflight is None else self.max_inflight,
            ringbuf_pages=self.ringbuf_pages,
        )
        # TRACEPOINT_PROBE programs are attached by BCC at load time.
        self._bpf = loader.load(SOURCE, defines, cache=True)
        self._wall = _mono_to_wall()
        self._bpf[b"events"].open_ring_buffer(self._on_event)

    def _on_event(self, _ctx: Any, data: Any, size: int) -> int:
        raw = _RawEvent.from_buffer_copy(ctypes.string_at(data, min(size, ctypes.sizeof(_RawEvent))))
        self._pending.append(decode(raw, self._wall))
        return 0

    def poll(self, timeout_ms: int = 100) -> list[OptinEvent]:
        """Events that arrived within ``timeout_ms`` (all of them that are ready).

        The ending signals wait until the poll returns: raised inside the
        ring-buffer callback, ctypes would print and swallow them."""
        with critical():
            self._bpf.ring_buffer_poll(timeout_ms)
        out, self._pending = self._pending, []
        return out

    def drain(self) -> list[OptinEvent]:
        """Whatever is in the ring buffer now, without waiting."""
        with critical():
            self._bpf.ring_buffer_consume()
        out, self._pending = self._pending, []
        return out

    def events(
        self,
        duration: float | None = None,
        stop: Callable[[], bool] | None = None,
        timeout_ms: int = 100,
    ) -> Iterator[OptinEvent]:
        """Yield events until ``duration`` seconds passed or ``stop()`` is true; drains at the end."""
        deadline = None if duration is None else time.monotonic() + duration
        while True:
            if stop is not None and stop():
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            yield from self.poll(timeout_ms)
        yield from self.drain()

    def stats(self) -> ProbeStats:
        table = self._bpf[b"stats"]
        vals = [int(table[ctypes.c_int(i)].value) for i in range(4)]
        return ProbeStats(
            lost=vals[STAT_LOST],
            inflight_full=vals[STAT_INFLIGHT_FULL],
            emitted=vals[STAT_EMITTED],
            madvise_calls=vals[STAT_MADVISE_ALL] if self.count_all_madvise else None,
        )

    def close(self) -> None:
        with critical():
            if self._bpf is not None:
                self._bpf.cleanup()
                self._bpf = None

    def __enter__(self) -> OptinProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
