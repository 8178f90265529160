"""/proc/vmstat: the kernel's own machine-wide counters (cow_ksm, ksm_swpin_copy)."""

from __future__ import annotations

from pathlib import Path


def read_vmstat(proc: Path = Path("/proc")) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (proc / "vmstat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if value:
            out[name] = int(value)
    return out


def ksm_vmstat(proc: Path = Path("/proc")) -> dict[str, int]:
    """The KSM entries of vmstat; absent ones are left out (see features.FEATURES["cow_ksm"])."""
    return {k: v for k, v in read_vmstat(proc).items() if k in ("cow_ksm", "ksm_swpin_copy")}
