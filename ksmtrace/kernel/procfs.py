"""Parsers for /proc/PID/{stat,status,smaps,ksm_stat,ksm_merging_pages}, and -p/-n.

``ProcFS(root)`` takes the /proc root as a parameter so the parsers run on
fixture trees captured from a real machine (tests/fixtures/host1/proc). Errors are
mapped by :func:`ksmtrace.errors.proc_errors`: a pid that exits mid-read is a
:class:`ProcessGone`, one we may not read is an :class:`AccessDenied`.

About 400 lines on purpose: it is the one parser of every /proc/PID file
ksmtrace reads (stat, status, smaps, ksm_stat) and the one -p/-n resolver,
so that no other module parses them again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ksmtrace.errors import AccessDenied, ProcessGone, UsageError, wrap_proc_errors
from ksmtrace.kernel.abi import kernel_comm

PROC = Path("/proc")


@dataclass(frozen=True)
class Vma:
    """One mapping from smaps. Sizes in bytes (smaps says kB)."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str
    vmflags: frozenset[str] = frozenset()
    sizes: dict[str, int] = field(default_factory=dict, hash=False, compare=False)

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def mergeable(self) -> bool:
        """VM_MERGEABLE set: madvise(MADV_MERGEABLE) or PR_SET_MEMORY_MERGE."""
        return "mg" in self.vmflags

    @property
    def private(self) -> bool:
        return self.perms[3:4] == "p"

    @property
    def anonymous(self) -> bool:
        return self.inode == 0

    @property
    def ksm_bytes(self) -> int | None:
        """smaps ``KSM:`` (features.FEATURES["smaps_ksm"]): bytes of this VMA backed by KSM pages."""
        return self.sizes.get("KSM")

    @property
    def name(self) -> str:
        return self.path or "[anon]"

    def why_not_mergeable(self) -> str | None:
        """Why KSM would never merge pages of this mapping, or None if it can.

        The one "can this mapping merge" check: the VMA checks of mm/ksm.c
        (ksm_madvise / vma_ksm_compatible), plus what ksmtrace's estimate
        and targeting consider: anonymous private memory only (KSM merges
        anonymous pages; in a private file mapping only the COW'd ones).
        """
        if not self.private or "sh" in self.vmflags:
            return "shared mapping: KSM merges only private memory"
        for flag, why in (
            ("ht", "hugetlb mapping"),
            ("pf", "PFN mapping (device memory)"),
            ("io", "I/O mapping"),
            ("de", "non-expandable special mapping"),
            ("mm", "mixed map (driver memory)"),
        ):
            if flag in self.vmflags:
                return why
        if self.path == "[vsyscall]":
            return "vsyscall page"
        if not self.anonymous:
            return "file-backed: KSM merges anonymous pages only"
        name = self.path
        if name.startswith("[") and name not in ("[heap]", "[stack]") and not name.startswith("[anon"):
            return f"special mapping {name}"
        return None


@dataclass(frozen=True)
class KsmStat:
    """/proc/PID/ksm_stat; its fields grew release by release (the ksm_stat* rows of features.FEATURES)."""

    rmap_items: int = 0
    merging_pages: int = 0
    zero_pages: int = 0
    process_profit: int = 0
    merge_any: bool = False
    mergeable: bool = False
    raw: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def opted_in(self) -> bool | None:
        """Whether the process joined KSM, from ksm_stat alone; None when only smaps can tell.

        ``ksm_mergeable`` (features.FEATURES["ksm_mergeable_stat"]) answers it
        directly; older kernels only show processes ksmd has visited.
        """
        if self.merge_any or self.merging_pages or self.rmap_items:
            return True
        if "ksm_mergeable" in self.raw:
            return self.mergeable
        return None


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat ksmtrace uses (proc(5) numbering in comments)."""

    pid: int
    comm: str  # (2), as the kernel keeps it: 15 characters at most
    state: str  # (3) R, S, D, T, t, Z, X...
    ppid: int  # (4)
    flags: int  # (9) PF_* task flags (PF_KTHREAD: a kernel thread)
    utime: int  # (14) clock ticks
    stime: int  # (15) clock ticks
    num_threads: int  # (20)
    starttime: int  # (22) clock ticks after boot: with pid, names one process over pid reuse

    @property
    def cpu_ticks(self) -> int:
        return self.utime + self.stime

    @property
    def stopped(self) -> bool:
        return self.state in ("T", "t")


@dataclass(frozen=True)
class ProcStatus:
    pid: int
    comm: str
    ppid: int
    uid: int
    threads: int
    is_kernel_thread: bool


def parse_stat(text: str) -> ProcStat:
    # comm may hold spaces and parentheses: it ends at the last ')'.
    head, _, rest = text.rpartition(")")
    pid_s, _, comm = head.partition(" (")
    f = rest.split()
    return ProcStat(
        pid=int(pid_s),
        comm=comm,
        state=f[0],
        ppid=int(f[1]),
        flags=int(f[6]),
        utime=int(f[11]),
        stime=int(f[12]),
        num_threads=int(f[17]),
        starttime=int(f[19]),
    )


def parse_smaps(text: str) -> list[Vma]:
    vmas: list[Vma] = []
    header: list[str] | None = None
    sizes: dict[str, int] = {}
    flags: frozenset[str] = frozenset()

    def flush() -> None:
        if header is None:
            return
        lo, _, hi = header[0].partition("-")
        vmas.append(
            Vma(
                start=int(lo, 16),
                end=int(hi, 16),
                perms=header[1],
                offset=int(header[2], 16),
                inode=int(header[4]),
                path=header[5] if len(header) > 5 else "",
                vmflags=flags,
                sizes=dict(sizes),
            )
        )

    for line in text.splitlines():
        if not line:
            continue
        key, sep, rest = line.partition(":")
        if sep and " " not in key and "-" not in key:
            if key == "VmFlags":
                flags = frozenset(rest.split())
                continue
            parts = rest.split()
            if parts and parts[-1] == "kB":
                sizes[key] = int(parts[0]) * 1024
            elif parts:
                try:
                    sizes[key] = int(parts[0])
                except ValueError:
                    pass
            continue
        flush()
        # "start-end perms offset dev inode   path" (path may hold spaces)
        fields = line.split(None, 5)
        if len(fields) == 6:
            fields[5] = fields[5].strip()
        header, sizes, flags = fields, {}, frozenset()
    flush()
    return vmas


def parse_map_spans(text: str) -> tuple[tuple[int, int], ...]:
    """(start, end) of each line of /proc/PID/maps ("7f...-7f... rw-p ...")."""
    out = []
    for line in text.splitlines():
        lo, _, hi = line.partition(" ")[0].partition("-")
        if hi:
            out.append((int(lo, 16), int(hi, 16)))
    return tuple(out)


def parse_ksm_stat(text: str) -> KsmStat:
    raw: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.replace(":", " ").partition(" ")
        if key:
            raw[key] = value.strip()

    def num(key: str) -> int:
        try:
            return int(raw.get(key, "0"))
        except ValueError:
            return 0

    return KsmStat(
        rmap_items=num("ksm_rmap_items"),
        merging_pages=num("ksm_merging_pages"),
        zero_pages=num("ksm_zero_pages"),
        process_profit=num("ksm_process_profit"),
        merge_any=raw.get("ksm_merge_any") == "yes",
        mergeable=raw.get("ksm_mergeable") == "yes",
        raw=raw,
    )


def status_fields(text: str) -> dict[str, str]:
    """Every "Key: value" line of a status file."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def parse_status(pid: int, text: str) -> ProcStatus:
    fields = status_fields(text)
    return ProcStatus(
        pid=pid,
        comm=fields.get("Name", "?"),
        ppid=int(fields.get("PPid", "0") or 0),
        uid=int(fields.get("Uid", "0").split()[0]),
        threads=int(fields.get("Threads", "1") or 1),
        # Kernel threads have no mm: no VmSize line in status.
        is_kernel_thread="VmSize" not in fields,
    )


class ProcFS:
    def __init__(self, root: Path | str = PROC) -> None:
        self.root = Path(root)

    def pids(self) -> list[int]:
        return sorted(int(p.name) for p in self.root.iterdir() if p.name.isdigit())

    def _read(self, pid: int, name: str) -> str:
        # surrogateescape: a comm cut inside a multi-byte character is not valid UTF-8.
        return (self.root / str(pid) / name).read_text(errors="surrogateescape")

    def exists(self, pid: int) -> bool:
        return (self.root / str(pid)).is_dir()

    @wrap_proc_errors
    def stat(self, pid: int) -> ProcStat:
        return parse_stat(self._read(pid, "stat"))

    @wrap_proc_errors
    def runtime_ns(self, pid: int) -> int | None:
        """CPU time the task has run, in nanoseconds (/proc/PID/schedstat, first
        field): exact, where stat's utime+stime are sampled at the clock tick
        (10 ms), too coarse for a 5% share measured over one second. None
        without CONFIG_SCHED_INFO (no schedstat file)."""
        try:
            return int(self._read(pid, "schedstat").split()[0])
        except FileNotFoundError:
            if not self.exists(pid):
                raise
            return None

    @wrap_proc_errors
    def thread_stat(self, pid: int, tid: int) -> ProcStat:
        return parse_stat(self._read(pid, f"task/{tid}/stat"))

    @wrap_proc_errors
    def task_status(self, pid: int, tid: int) -> dict[str, str]:
        """Every field of one thread's status (TracerPid, Seccomp... are per thread)."""
        return status_fields(self._read(pid, f"task/{tid}/status"))

    @wrap_proc_errors
    def map_count(self, pid: int) -> int:
        """Mappings (VMAs) of pid now: what vm.max_map_count bounds."""
        return self._read(pid, "maps").count("\n")

    @wrap_proc_errors
    def map_spans(self, pid: int) -> tuple[tuple[int, int], ...]:
        """(start, end) of every mapping: maps, not smaps, because this is asked
        at every look to see whether anything was mapped, unmapped or moved, and
        smaps walks every page table to count its sizes (maps does not)."""
        return parse_map_spans(self._read(pid, "maps"))

    @wrap_proc_errors
    def maps(self, pid: int) -> list[Vma]:
        """Every mapping from maps: no VmFlags and no sizes, and no page-table
        walk (smaps walks every mapping's: 8 ms for a process of 256 MiB)."""
        return parse_smaps(self._read(pid, "maps"))  # maps' lines are smaps' headers

    @wrap_proc_errors
    def tids(self, pid: int) -> list[int]:
        return sorted(int(t.name) for t in (self.root / str(pid) / "task").iterdir())

    @wrap_proc_errors
    def exe(self, pid: int) -> str | None:
        """The executable's path; None for kernel threads or when the link is unreadable."""
        try:
            return os.readlink(self.root / str(pid) / "exe")
        except FileNotFoundError:
            if not self.exists(pid):
                raise
            return None

    @wrap_proc_errors
    def status(self, pid: int) -> ProcStatus:
        return parse_status(pid, self._read(pid, "status"))

    @wrap_proc_errors
    def comm(self, pid: int) -> str:
        return self._read(pid, "comm").rstrip("\n")

    @wrap_proc_errors
    def cgroup(self, pid: int) -> str | None:
        """The cgroup v2 path ("0::/a/b" line of /proc/PID/cgroup), None without v2."""
        for line in self._read(pid, "cgroup").splitlines():
            if line.startswith("0::"):
                return line[3:]
        return None

    @wrap_proc_errors
    def smaps(self, pid: int) -> list[Vma]:
        return parse_smaps(self._read(pid, "smaps"))

    @wrap_proc_errors
    def ksm_stat(self, pid: int) -> KsmStat | None:
        """None on kernels without ksm_stat (features.FEATURES["ksm_stat"])."""
        path = self.root / str(pid) / "ksm_stat"
        try:  # one open, not a stat() first: read for every process at start-up (issue #14)
            text = path.read_text()
        except FileNotFoundError:
            if not self.exists(pid):
                raise ProcessGone(pid) from None
            return None
        stat = parse_ksm_stat(text)
        if "ksm_merging_pages" not in stat.raw:
            # ksm_stat before features.FEATURES["ksm_stat_merging_pages"] has only ksm_rmap_items;
            # the count is then in its own file (features.FEATURES["ksm_merging_pages"]).
            legacy = self.root / str(pid) / "ksm_merging_pages"
            # Both files read empty for a task without an mm (exiting, kernel thread).
            words = legacy.read_text().split() if legacy.exists() else []
            if words:
                stat = replace(stat, merging_pages=int(words[0]))
        return stat

    def matches_name(self, pid: int, name: str) -> bool:
        """Whether ``-n name`` names this process.

        The kernel keeps 15 characters of comm, so a longer name matches by
        its first 15; the executable's basename and full path match too
        (``qemu-system-x86_64`` runs as comm ``qemu-system-x86``). Raises
        ProcessGone/AccessDenied like the other readers.
        """
        if self.comm(pid) == kernel_comm(name):
            return True
        try:
            exe = self.exe(pid)
        except AccessDenied:
            return False
        if not exe:
            return False
        exe = exe.removesuffix(" (deleted)")
        return name in (exe, os.path.basename(exe))

    def find_by_name(self, name: str) -> list[int]:
        """Every pid that ``-n name`` names (several processes may share a name)."""
        out = []
        for pid in self.pids():
            try:
                if self.matches_name(pid, name):
                    out.append(pid)
            except (ProcessGone, AccessDenied):
                continue
        return out

    def find_kthread(self, name: str) -> int | None:
        """pid of a kernel thread named ``name`` (a child of kthreadd, pid 2)."""
        for pid in self.pids():
            try:
                st = self.stat(pid)
            except (ProcessGone, AccessDenied):
                continue
            if st.comm == name and st.ppid == 2:
                return pid
        return None

    def is_mergeable(self, pid: int, stat: KsmStat | None = None) -> bool:
        """The one "did this process opt in" check: ksm_stat, else its mappings."""
        stat = stat if stat is not None else self.ksm_stat(pid)
        decided = stat.opted_in if stat is not None else None
        if decided is not None:
            return decided
        return any(v.mergeable for v in self.smaps(pid))

    def resolve(self, pids: list[int] | None, name: str | None, strict: bool = True) -> list[int] | None:
        """The pids that -p/-n name, sorted; None when neither is given (every process).

        -p pids must exist; -n must name something unless ``strict`` is
        False (commands that also trace processes started later).
        """
        out: set[int] = set()
        for pid in pids or []:
            if not self.exists(pid):
                raise UsageError(f"pid {pid} does not exist")
            out.add(pid)
        if name:
            found = self.find_by_name(name)
            if not found and strict:
                raise UsageError(f"no process named {name!r}")
            out.update(found)
        if not pids and not name:
            return None
        return sorted(out)
