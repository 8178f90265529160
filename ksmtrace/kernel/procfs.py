"""Parsers for /proc/PID/{status,smaps,ksm_stat,ksm_merging_pages}.

``ProcFS(root)`` takes the /proc root as a parameter so the parsers run on
fixture trees captured from a real machine (tests/fixtures/proc). Errors are
mapped by :func:`ksmtrace.errors.proc_errors`: a pid that exits mid-read is a
:class:`ProcessGone`, one we may not read is an :class:`AccessDenied`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from ksmtrace.errors import AccessDenied, ProcessGone, proc_errors, wrap_proc_errors

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
        """Why KSM would refuse this mapping, or None if it can merge it.

        Mirrors the VMA checks of mm/ksm.c (ksm_madvise / vma_ksm_compatible).
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


@dataclass(frozen=True)
class ProcStatus:
    pid: int
    comm: str
    ppid: int
    uid: int
    threads: int
    is_kernel_thread: bool


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


def parse_status(pid: int, text: str) -> ProcStatus:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
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
        return (self.root / str(pid) / name).read_text()

    def exists(self, pid: int) -> bool:
        return (self.root / str(pid)).is_dir()

    @wrap_proc_errors
    def status(self, pid: int) -> ProcStatus:
        return parse_status(pid, self._read(pid, "status"))

    @wrap_proc_errors
    def comm(self, pid: int) -> str:
        return self._read(pid, "comm").rstrip("\n")

    @wrap_proc_errors
    def cmdline(self, pid: int) -> list[str]:
        return [a for a in self._read(pid, "cmdline").split("\0") if a]

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
        if not path.exists():
            if not self.exists(pid):
                raise ProcessGone(pid)
            return None
        stat = parse_ksm_stat(path.read_text())
        if "ksm_merging_pages" not in stat.raw:
            # ksm_stat before features.FEATURES["ksm_stat_merging_pages"] has only ksm_rmap_items;
            # the count is then in its own file (features.FEATURES["ksm_merging_pages"]).
            legacy = self.root / str(pid) / "ksm_merging_pages"
            # Both files read empty for a task without an mm (exiting, kernel thread).
            words = legacy.read_text().split() if legacy.exists() else []
            if words:
                stat = replace(stat, merging_pages=int(words[0]))
        return stat

    def find_by_comm(self, comm: str) -> list[int]:
        out = []
        for pid in self.pids():
            try:
                if self.comm(pid) == comm:
                    out.append(pid)
            except (ProcessGone, AccessDenied):
                continue
        return out

    def walk(self, pids: list[int] | None = None) -> Iterator[tuple[int, Exception | None]]:
        """Yield (pid, None) for readable pids, (pid, err) for ones that failed."""
        for pid in self.pids() if pids is None else pids:
            try:
                with proc_errors(pid):
                    self.status(pid)
                yield pid, None
            except (ProcessGone, AccessDenied) as exc:
                yield pid, exc
