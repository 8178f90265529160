"""Facts about the running kernel that take seconds to learn and hold until reboot.

Every tracing command needs struct offsets from the kernel's BTF (bpftool's
JSON dump of vmlinux: about 1.2 s to produce and parse) and the KASLR bases
of the direct map and of the struct page array (a BPF search and a page-table
walk check: about 2.8 s, most of it compiling bpf/kaddr.bpf.c). Neither can
change before the next boot, so the first command of a boot learns them and
later ones read them here (issue #14: first report within 2 s).

The file lives under ksmtrace's run directory (tmpfs: gone at reboot) and is
also keyed by the boot id, the kernel release and ksmtrace's version, so a
stale one is never used. It holds kernel addresses that KASLR hides from
users, so it is root's alone (0600 in a 0700 directory), and a file that is
not root's, or that others could have written, is ignored, as is a corrupt
one. Every failure here only costs the seconds the cache would have saved.
``KSMTRACE_NO_BOOT_CACHE=1`` turns it off (tests of the slow paths).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from ksmtrace import __version__

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
FILE_NAME = "kernel-facts.json"


def _dir() -> Path:
    # Beside the coordinator's journals (KSMTRACE_RUN_DIR in tests), in a
    # directory of its own: every *.json there is a journal to repair.
    return Path(os.environ.get("KSMTRACE_RUN_DIR", "/run/ksmtrace")) / "cache"


def enabled() -> bool:
    return os.geteuid() == 0 and not os.environ.get("KSMTRACE_NO_BOOT_CACHE")


def _stamp() -> dict[str, str]:
    return {
        "boot_id": BOOT_ID.read_text().strip(),
        "release": os.uname().release,
        "ksmtrace": __version__,
    }


def _trusted(path: Path) -> bool:
    st = path.stat()
    return stat.S_ISREG(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o077


def load(section: str) -> dict[str, Any]:
    """What was remembered under ``section`` this boot ({} when nothing, or off)."""
    if not enabled():
        return {}
    path = _dir() / FILE_NAME
    try:
        if not _trusted(path) or not _trusted_dir(path.parent):
            return {}
        data = json.loads(path.read_text())
        if data.get("stamp") != _stamp():
            return {}
        got = data.get("sections", {}).get(section, {})
        return got if isinstance(got, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def _trusted_dir(path: Path) -> bool:
    st = path.stat()
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022


def save(section: str, values: dict[str, Any]) -> None:
    """Remember ``values`` under ``section`` (merged with what is there) until reboot."""
    if not enabled():
        return
    d = _dir()
    path = d / FILE_NAME
    tmp = d / f".{FILE_NAME}.{os.getpid()}"
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _trusted_dir(d):
            return
        stamp = _stamp()
        sections: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if _trusted(path):
                data = json.loads(path.read_text())
                if data.get("stamp") == stamp and isinstance(data.get("sections"), dict):
                    sections = data["sections"]
        sections[section] = {**sections.get(section, {}), **values}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"stamp": stamp, "sections": sections}, f)
        os.replace(tmp, path)  # readers see the old file or the new one, never half
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def load_entry(name: str) -> dict[str, Any] | None:
    """A payload kept whole in a file of its own (``save_entry``) this boot."""
    if not enabled():
        return None
    path = _dir() / name
    try:
        if not _trusted(path) or not _trusted_dir(path.parent):
            return None
        data = json.loads(path.read_text())
        if data.get("stamp") != _stamp() or not isinstance(data.get("payload"), dict):
            return None
        payload: dict[str, Any] = data["payload"]
        return payload
    except (OSError, ValueError, AttributeError):
        return None


def save_entry(name: str, payload: dict[str, Any], keep: int) -> None:
    """Keep ``payload`` until reboot in a file of its own; of the files named
    with the same prefix (up to the first '-'), the ``keep`` newest stay."""
    if not enabled():
        return
    d = _dir()
    tmp = d / f".{name}.{os.getpid()}"
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _trusted_dir(d):
            return
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"stamp": _stamp(), "payload": payload}, f)
        os.replace(tmp, d / name)
        prefix = name.split("-", 1)[0] + "-"
        kin = sorted(d.glob(f"{prefix}*"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kin[keep:]:
            with contextlib.suppress(OSError):
                old.unlink()
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def drop_entry(name: str) -> None:
    with contextlib.suppress(OSError):
        (_dir() / name).unlink()
