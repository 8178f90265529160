"""Machine-wide facts under /proc that are not about one process: the cgroup2
mount, pid_max, vm.max_map_count, the CPU's flags, the end of physical RAM."""

from __future__ import annotations

from pathlib import Path

from ksmtrace.errors import UsageError

PROC = Path("/proc")


def cgroup2_mount(mounts: Path = PROC / "self" / "mounts") -> Path:
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    raise UsageError("--cgroup needs the cgroup v2 hierarchy, and none is mounted")


def pid_max(path: Path = PROC / "sys" / "kernel" / "pid_max") -> int:
    return int(path.read_text())


def max_map_count(path: Path = PROC / "sys" / "vm" / "max_map_count") -> int:
    """Mappings a process may have (mmap, and a VMA split by madvise, fail past it)."""
    return int(path.read_text())


def cpu_flags(cpuinfo: Path = PROC / "cpuinfo") -> frozenset[str]:
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def max_ram_address(iomem: Path = PROC / "iomem") -> int:
    """End of the highest "System RAM" range (0 when /proc/iomem hides it)."""
    end = 0
    for line in iomem.read_text().splitlines():
        if "System RAM" in line:
            rng = line.split(":")[0].strip()
            end = max(end, int(rng.split("-")[1], 16))
    return end
