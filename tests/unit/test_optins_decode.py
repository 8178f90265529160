"""The event layout, its decoding, the -D filters and the snoop line format (no root)."""

from __future__ import annotations

import ctypes
import re
import struct
from pathlib import Path

import pytest

from ksmtrace.errors import UsageError
from ksmtrace.kernel.btf import Btf
from ksmtrace.probes import optins
from ksmtrace.probes.optins import OptinEvent, _RawEvent, build_defines, decode
from ksmtrace.views import optins as view

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "optins.h"


def test_ctypes_layout_matches_the_bpf_header() -> None:
    text = HEADER.read_text()
    body = text[text.index("struct optin_event {") : text.index("};")]
    fields = re.findall(r"^\s*\w+ (\w+)(?:\[\w+\])?;\s*/\*\s*(\d+)\b", body, re.M)
    assert [name for name, _ in fields] == [name for name, _ in _RawEvent._fields_]
    for name, off in fields:
        assert getattr(_RawEvent, name).offset == int(off), name
    size = int(re.search(r"\};\s*/\*\s*(\d+) bytes", text[text.index("struct optin_event {") :]).group(1))
    assert ctypes.sizeof(_RawEvent) == size
    for const in ("OPTIN_MADVISE", "OPTIN_PRCTL", "OPTIN_PROCESS_MADVISE", "OPTIN_FORK", "OPTIN_EXEC"):
        assert f"#define {const} {getattr(optins, const)}" in text


def _raw(**kw: object) -> _RawEvent:
    r = _RawEvent()
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_decode_failed_madvise() -> None:
    ev = decode(
        _raw(
            ts_ns=2_000_000_000, pid=7, tid=8, syscall=1, op=12, start=0x1001, length=4096, ret=-22, pidfd=-1
        ),
        wall_offset=100.0,
    )
    assert ev.wall == pytest.approx(102.0)
    assert (ev.syscall, ev.op_name, ev.errno, ev.error, ev.ok) == (
        "madvise",
        "MADV_MERGEABLE",
        22,
        "EINVAL",
        False,
    )
    assert ev.describe_call() == "madvise(0x1001, 4096, MADV_MERGEABLE)"
    assert ev.result() == "-1 EINVAL"
    assert ev.as_dict()["error"] == "EINVAL"


def test_decode_inherited() -> None:
    fork = decode(_raw(syscall=4, pid=9, tid=9, target_pid=3, arg=3, comm=b"qemu"), 0.0)
    assert fork.inherited and fork.op_name == "merge_any"
    assert fork.describe_call() == "fork from 3: inherits merge_any"
    assert view.snoop_line(fork).split()[-2:] == ["parent", "3"]


def test_defines() -> None:
    empty = Btf([])  # no BTF members: the pidfd walk and fork/exec reads are left out
    d = build_defines(pids=[5, 3, 5], comm="a-very-long-process-name", btf=empty)
    assert d["FILTER_PIDS"] == "{3,5}" and d["FILTER_NPIDS"] == 2
    assert "OFF_TASK_FILES" not in d and "OFF_TASK_MM" not in d
    with pytest.raises(UsageError):
        build_defines(comm="", btf=empty)
    with pytest.raises(UsageError):
        build_defines(comm="a\0b", btf=empty)


def _words(d: dict[str, int | str]) -> bytes:
    lo, hi = (int(str(d[k]).removesuffix("ULL"), 16) for k in ("FILTER_COMM_LO", "FILTER_COMM_HI"))
    return struct.pack("=QQ", lo, hi)


def test_comm_filter_is_the_kernels_16_bytes() -> None:
    empty = Btf([])
    # The kernel keeps 15 bytes and a NUL: a longer name is cut the same way.
    assert _words(build_defines(comm="qemu-system-x86_64", btf=empty)) == b"qemu-system-x86\0"
    assert _words(build_defines(comm="qemu-system-x86", btf=empty)) == b"qemu-system-x86\0"
    assert _words(build_defines(comm="qemu", btf=empty)) == b"qemu" + b"\0" * 12
    # Nothing is spliced into C source any more: quotes and backslashes are just bytes.
    assert _words(build_defines(comm='a"b\\', btf=empty)) == b'a"b\\' + b"\0" * 12
    # Cut byte-wise like the kernel, even inside a multi-byte character.
    assert _words(build_defines(comm="é" * 8, btf=empty)) == "é".encode() * 7 + b"\xc3\0"
    with pytest.raises(UsageError):
        build_defines(pids=list(range(1, 100)), btf=empty)
    with pytest.raises(UsageError):
        build_defines(ringbuf_pages=3, btf=empty)


def test_snoop_lines_fit_100_columns() -> None:
    worst = [
        OptinEvent(
            ts_ns=0,
            wall=0.0,
            lat_ns=0,
            pid=4194304,
            tid=4194304,
            uid=0,
            comm="c" * 15,
            cgroup_id=1,
            syscall=sc,
            op=op,
            start=0x7FFFFFFFF000,
            length=1 << 40,
            arg=1,
            ret=ret,
            pidfd=1023,
            target_pid=target,
            vlen=1,
        )
        for sc, op, ret, target in (
            ("madvise", 13, -12, 0),
            ("process_madvise", 13, -22, 4194303),  # another process's pidfd: refused
            ("process_madvise", 12, 1 << 40, 4194304),  # one's own
            ("prctl", 67, -1, 0),
            ("fork", 0, 0, 4194303),
            ("exec", 0, 0, 4194303),
        )
    ]
    assert len(view.snoop_header(True)) <= 100
    for ev in worst:
        line = view.snoop_line(ev, timestamps=True)
        assert len(line) <= 100, line


def test_cgroup_paths(tmp_path: Path) -> None:
    (tmp_path / "system.slice" / "app.service").mkdir(parents=True)
    cg = optins.resolve_cgroup("/system.slice", mount=tmp_path)
    assert (cg.level, cg.rel) == (1, "/system.slice")
    assert cg.cgroup_id == (tmp_path / "system.slice").stat().st_ino
    # The same cgroup named by its full path under the mount.
    assert optins.resolve_cgroup(str(tmp_path / "system.slice"), mount=tmp_path) == cg
    assert cg.contains("/system.slice") and cg.contains("/system.slice/app.service")
    assert not cg.contains("/system.slice2") and not cg.contains("/")
    root = optins.resolve_cgroup("/", mount=tmp_path)
    assert root.level == 0 and root.contains("/anything")
    with pytest.raises(UsageError, match="no cgroup"):
        optins.resolve_cgroup("/nope", mount=tmp_path)
