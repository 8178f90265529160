"""/sys/kernel/mm/ksm: the machine-wide KSM knobs and counters.

The set of files differs between kernels (features.FEATURES says which
release added which file), so nothing here lists them: every
file present is read, and a file is a *knob* when its mode lets root write it.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ksmtrace.errors import KsmUnavailable, NeedsPrivilege

KSM_SYSFS = Path("/sys/kernel/mm/ksm")

# advisor_mode reads "[none] scan-time": the bracketed word is the setting.
_CHOICE = re.compile(r"\[([^\]]+)\]")


def parse_value(text: str) -> int | str:
    text = text.strip()
    m = _CHOICE.search(text)
    if m:
        return m.group(1)
    try:
        return int(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class KsmSysfs:
    """One reading of every file under the KSM sysfs directory."""

    knobs: dict[str, int | str] = field(default_factory=dict)
    counters: dict[str, int | str] = field(default_factory=dict)

    def get(self, name: str, default: int | str | None = None) -> int | str | None:
        if name in self.knobs:
            return self.knobs[name]
        return self.counters.get(name, default)

    def as_dict(self) -> dict[str, int | str]:
        return {**self.knobs, **self.counters}


# A captured fixture tree records sysfs modes here: git keeps no file modes.
MODES_FILE = ".modes"


def _fixture_modes(root: Path) -> dict[str, int]:
    path = root / MODES_FILE
    if not path.exists():
        return {}
    pairs = (line.split() for line in path.read_text().splitlines() if line.strip())
    return {name: int(mode, 8) for name, mode in pairs}


def require_ksm(root: Path = KSM_SYSFS) -> None:
    if not (root / "run").exists():
        raise KsmUnavailable(
            f"KSM is not available: {root} is missing (the kernel is built without CONFIG_KSM)"
        )


# name -> whether it is writable, for the real directory: its files and modes
# are the kernel's and do not change while it runs, and the samplers read
# the directory every interval (issue #14: two stat() calls per file each
# time were a tenth of an idle interval's cost).
_REAL_WRITABLE: dict[str, bool] = {}


def read(root: Path = KSM_SYSFS) -> KsmSysfs:
    require_ksm(root)
    knobs: dict[str, int | str] = {}
    counters: dict[str, int | str] = {}
    real = root == KSM_SYSFS
    modes = {} if real else _fixture_modes(root)
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        # sysfs reports its files' type in the directory entry: no stat.
        if not entry.is_file() or entry.name == MODES_FILE:
            continue
        try:
            with open(entry.path) as f:
                value = parse_value(f.read())
        except OSError:
            continue
        writable = _REAL_WRITABLE.get(entry.name) if real else None
        if writable is None:
            writable = bool(modes.get(entry.name, entry.stat().st_mode) & 0o200)
            if real:
                _REAL_WRITABLE[entry.name] = writable
        (knobs if writable else counters)[entry.name] = value
    return KsmSysfs(knobs=knobs, counters=counters)


def write(name: str, value: int | str, root: Path = KSM_SYSFS) -> None:
    path = root / name
    if not path.exists():
        raise KsmUnavailable(f"this kernel has no KSM setting '{name}' ({path} is missing)")
    try:
        path.write_text(f"{value}\n")
    except PermissionError as exc:
        raise NeedsPrivilege(f"changing {path} needs root") from exc


class SavedSettings:
    """Snapshot of every KSM knob, restorable in a safe order.

    ``run`` is restored last: writing pages_to_scan while ksmd runs is fine,
    but restoring ``run=0`` first would leave a half-restored state visible to
    ksmd for no reason. A ``run=2`` snapshot (unmerge all) is restored as 0 so
    that restoring never triggers a mass unmerge by surprise.
    """

    def __init__(self, root: Path = KSM_SYSFS) -> None:
        self.root = root
        self.values = read(root).knobs

    def restore(self) -> None:
        order = sorted(self.values, key=lambda k: (k == "run", k))
        for name in order:
            value = self.values[name]
            if name == "run" and value == 2:
                value = 0
            with contextlib.suppress(OSError, KsmUnavailable):
                current = parse_value((self.root / name).read_text())
                if current != value:
                    # max_page_sharing and merge_across_nodes refuse changes
                    # (EBUSY) while pages are merged; that is the kernel's rule.
                    write(name, value, self.root)


def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")
