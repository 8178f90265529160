"""Start-up checks: each one raises a KsmtraceError that says what to do."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ksmtrace.errors import NeedsPrivilege, TracingUnavailable

# Capability bit numbers from include/uapi/linux/capability.h.
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

TRACEFS = Path("/sys/kernel/tracing")
BTF_VMLINUX = Path("/sys/kernel/btf/vmlinux")


def effective_caps(status: Path = Path("/proc/self/status")) -> int:
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def has_caps(*caps: int) -> bool:
    eff = effective_caps()
    return all(eff >> c & 1 for c in caps)


def require_root(purpose: str = "tracing") -> None:
    """BPF tracing needs CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN before 5.8)."""
    needed = {
        "tracing": (CAP_BPF, CAP_PERFMON),
        "ptrace": (CAP_SYS_PTRACE,),
        "pagemap": (CAP_SYS_ADMIN,),
        "sysfs": (CAP_SYS_ADMIN,),
    }[purpose]
    if os.geteuid() == 0 and has_caps(*needed):
        return
    if has_caps(*needed):
        return
    raise NeedsPrivilege(
        "ksmtrace needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_SYS_ADMIN) "
        f"for {purpose}: run it with sudo"
    )


def ensure_tracefs(root: Path = TRACEFS, mount: bool = True) -> Path:
    """BCC attaches tracepoints through tracefs; many hosts do not mount it at boot."""
    if (root / "events").is_dir():
        return root
    debug = Path("/sys/kernel/debug/tracing")
    if (debug / "events").is_dir():
        return debug
    if mount and os.geteuid() == 0:
        subprocess.run(
            ["mount", "-t", "tracefs", "tracefs", str(root)],
            capture_output=True,
            check=False,
        )
        if (root / "events").is_dir():
            return root
    raise TracingUnavailable(f"tracefs is not mounted: run 'mount -t tracefs tracefs {root}' as root")


def require_btf(path: Path = BTF_VMLINUX) -> Path:
    if not path.exists():
        raise TracingUnavailable(
            f"kernel BTF is missing ({path}): ksmtrace needs CONFIG_DEBUG_INFO_BTF=y "
            "to find kernel struct offsets"
        )
    return path


def tracepoint_exists(category: str, event: str, root: Path = TRACEFS) -> bool:
    return (root / "events" / category / event).is_dir()


def tracepoint_has_field(category: str, event: str, field: str, root: Path = TRACEFS) -> bool:
    """Whether the event's format names ``field`` (tracepoints grow arguments)."""
    try:
        text = (root / "events" / category / event / "format").read_text()
    except OSError:
        return False
    return any(line.strip().startswith("field:") and f" {field};" in line for line in text.splitlines())
