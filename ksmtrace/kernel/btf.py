"""Struct member offsets of the running kernel, from its BTF.

BCC compiles against whatever headers are installed, which may belong to
another kernel (6.1 headers on a 6.18 kernel here: task_struct.tgid is 2420
bytes in there, 1268 in reality). Programs that must read kernel structs take
offsets from here and get them as -D defines instead.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ksmtrace.errors import TracingUnavailable
from ksmtrace.kernel import bootcache
from ksmtrace.kernel.checks import BTF_VMLINUX, require_btf


class Btf:
    def __init__(self, types: list[dict[str, Any]]) -> None:
        self.by_id = {t["id"]: t for t in types}
        self.structs: dict[str, dict[str, Any]] = {}
        for t in types:
            if t["kind"] in ("STRUCT", "UNION") and t.get("name") not in (None, "(anon)"):
                # First complete definition wins (forward decls have no members).
                self.structs.setdefault(t["name"], t)

    def _resolve(self, type_id: int) -> dict[str, Any]:
        t = self.by_id[type_id]
        while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            t = self.by_id[t["type_id"]]
        return t

    def _find(self, struct: dict[str, Any], name: str) -> tuple[int, dict[str, Any]] | None:
        """Offset in bits and member of ``name``, looking into anonymous members."""
        for m in struct.get("members", []):
            if m["name"] == name:
                return m["bits_offset"], m
            if m["name"] == "(anon)":
                inner = self._resolve(m["type_id"])
                if inner["kind"] in ("STRUCT", "UNION"):
                    hit = self._find(inner, name)
                    if hit:
                        return m["bits_offset"] + hit[0], hit[1]
        return None

    def offset(self, struct: str, path: str) -> int:
        """Byte offset of ``path`` ("a.b.c") inside ``struct``."""
        if struct not in self.structs:
            raise KeyError(f"struct {struct} not in BTF")
        t = self.structs[struct]
        bits = 0
        for part in path.split("."):
            hit = self._find(t, part)
            if hit is None:
                raise KeyError(f"{struct}.{path}: no member {part!r}")
            bits += hit[0]
            t = self._resolve(hit[1]["type_id"])
        if bits % 8:
            raise KeyError(f"{struct}.{path} is a bitfield")
        return bits // 8

    def size(self, struct: str) -> int:
        return int(self.structs[struct]["size"])

    def has(self, struct: str, path: str | None = None) -> bool:
        try:
            if path is None:
                return struct in self.structs
            self.offset(struct, path)
            return True
        except KeyError:
            return False

    def func_id(self, name: str) -> int | None:
        """BTF id of function ``name`` (what a kfunc call instruction names)."""
        for t in self.by_id.values():
            if t["kind"] == "FUNC" and t.get("name") == name:
                return int(t["id"])
        return None


class KernelBtf:
    """The questions ksmtrace asks of the running kernel's BTF, each answered
    once per boot: answers (and "no such member") are kept in the boot cache
    (ksmtrace/kernel/bootcache.py), and bpftool runs only on a miss."""

    SECTION = "btf"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._known: dict[str, Any] = bootcache.load(self.SECTION) if path == BTF_VMLINUX else {}
        self._new: dict[str, Any] = {}

    def _ask(self, key: str, question: Callable[[Btf], Any]) -> Any:
        if key not in self._known:
            try:
                answer: Any = {"value": question(_parse(self.path))}
            except KeyError as exc:
                answer = {"missing": exc.args[0] if exc.args else key}
            self._known[key] = answer
            if self.path == BTF_VMLINUX:
                bootcache.save(self.SECTION, {key: answer})
        answer = self._known[key]
        if "missing" in answer:
            raise KeyError(answer["missing"])
        return answer["value"]

    def offset(self, struct: str, path: str) -> int:
        """Byte offset of ``path`` ("a.b.c") inside ``struct``."""
        return int(self._ask(f"offset {struct} {path}", lambda b: b.offset(struct, path)))

    def size(self, struct: str) -> int:
        return int(self._ask(f"size {struct}", lambda b: b.size(struct)))

    def has(self, struct: str, path: str | None = None) -> bool:
        try:
            if path is None:
                return bool(self._ask(f"has {struct}", lambda b: b.has(struct)))
            self.offset(struct, path)
            return True
        except KeyError:
            return False

    def func_id(self, name: str) -> int | None:
        """BTF id of function ``name`` (what a kfunc call instruction names)."""
        got = self._ask(f"func_id {name}", lambda b: b.func_id(name))
        return None if got is None else int(got)


@functools.lru_cache(maxsize=1)
def load(path: Path = BTF_VMLINUX) -> KernelBtf:
    require_btf(path)
    return KernelBtf(path)


@functools.lru_cache(maxsize=1)
def _parse(path: Path) -> Btf:
    tool = shutil.which("bpftool")
    if tool is None:
        raise TracingUnavailable("bpftool is missing (apt-get install bpftool): needed to read kernel BTF")
    out = subprocess.run([tool, "-j", "btf", "dump", "file", str(path)], capture_output=True, check=False)
    if out.returncode != 0:
        raise TracingUnavailable(f"bpftool could not read {path}: {out.stderr.decode().strip()}")
    return Btf(json.loads(out.stdout)["types"])
