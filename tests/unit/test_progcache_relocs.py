"""What a kept BPF build records: where map fds sit in the instructions,
and a key that changes with anything the compile depended on."""

from __future__ import annotations

import struct
from pathlib import Path

from ksmtrace.probes import progcache


def _insn(op: int, src: int = 0, dst: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", op, (src << 4) | dst, off, imm)


LD_MAP = _insn(0x18, src=1, dst=1, imm=7) + _insn(0)  # r1 = map fd 7 (two slots)
LD_CONST = _insn(0x18, dst=2, imm=-1) + _insn(0, imm=0x7FFFFFFF)  # a 64-bit constant
CALL = _insn(0x85, imm=1)  # bpf_map_lookup_elem
EXIT = _insn(0x95)


def test_map_fds_are_found_in_every_load_and_nowhere_else() -> None:
    code = LD_CONST + LD_MAP + CALL + LD_MAP + EXIT
    # 7 also appears as the immediate of the constant's second half: not a map load
    assert progcache.map_fd_slots(code, {7: 0}) == [(16, 0), (40, 0)]
    assert progcache.map_fd_slots(CALL + EXIT, {7: 0}) == []


def test_a_load_that_cannot_be_redone_refuses_the_build() -> None:
    assert progcache.map_fd_slots(LD_MAP, {8: 0}) is None  # an fd of no map of the program
    map_value = _insn(0x18, src=2, dst=1, imm=7) + _insn(0)  # BPF_PSEUDO_MAP_VALUE
    assert progcache.map_fd_slots(map_value + EXIT, {7: 0}) is None


def test_key_follows_source_headers_flags_and_kfuncs(tmp_path: Path) -> None:
    src, header = tmp_path / "p.bpf.c", tmp_path / "p.h"
    src.write_text("int x;")
    header.write_text("#define A 1")
    key = progcache.cache_key(src, ["-DN=1"], None, "0.26.0")
    assert key == progcache.cache_key(src, ["-DN=1"], None, "0.26.0")
    assert key != progcache.cache_key(src, ["-DN=2"], None, "0.26.0")
    assert key != progcache.cache_key(src, ["-DN=1"], {0x7FFE: 123}, "0.26.0")
    assert key != progcache.cache_key(src, ["-DN=1"], None, "0.27.0")
    header.write_text("#define A 2")
    assert key != progcache.cache_key(src, ["-DN=1"], None, "0.26.0")
