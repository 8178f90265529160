"""BPF programs compiled once a boot: later commands load them without BCC's compiler.

BCC compiles a program's C at every start: clang and LLVM, plus a read of the
whole of /proc/kallsyms on every compile (BCC checks whether the kernel has
bpf_probe_read_kernel). On the test machines that is 0.8-1.0 s for
faults.bpf.c and 0.5-0.7 s for ksmd.bpf.c, most of a command's start-up
(issue #14: first report within 2 s). BCC itself cannot load an object
compiled earlier (iovisor/bcc #534, #3120).

What BCC hands the kernel is plain BPF instructions, tied to its run only by
the file descriptors of the maps it created for them: each map access is an
``ld_imm64`` with ``src_reg = BPF_PSEUDO_MAP_FD`` and the fd as immediate. So
after BCC loads a program, :func:`keep` records each loaded function's
instructions, the shape of each map as the kernel reports it
(``bpf_obj_get_info``), BCC's type descriptions of keys and values, and where
each map's fd sits in the instructions. :func:`instantiate` creates the maps
anew, writes their fds in, and gives the instructions to the kernel's
verifier, which checks them as it checked BCC's. Anything else in an
instruction stream that names this run (another kind of pseudo load, an fd
that is no map of the program) makes :func:`keep` give up: that program is
compiled every time, as before.

Entries live beside the kernel facts (:mod:`ksmtrace.kernel.bootcache`):
root's alone, stamped with the boot, the kernel and ksmtrace's version, and
named by a hash of the source, its headers, the defines, the compile flags
and BCC's version, so an edit of bpf/ or another define is a miss. Any
failure here costs only a compile.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from ksmtrace.kernel import bootcache
from ksmtrace.kernel.signals import critical
from ksmtrace.probes.maps import MapRef, open_table

FORMAT = 1  # bump when what is kept, or how it is used, changes
KEEP = 16  # entries kept per boot (tests build variants); the oldest go first

BPF_LD_IMM64 = 0x18
BPF_PSEUDO_MAP_FD = 1
PROG_TYPE_TRACEPOINT = 5
PROG_TYPE_RAW_TRACEPOINT = 17
_MAP_INFO = struct.Struct("<IIIIII16s")  # type id key_size value_size max_entries map_flags name
_PROG_TYPE = struct.Struct("<I")  # bpf_prog_info starts with its type


def cache_key(source: Path, cflags: list[str], kfuncs: dict[int, int] | None, bcc_version: str) -> str:
    """Names one build: the source and every header beside it, the compile
    flags (defines and include paths), the kfunc ids, BCC's version."""
    h = hashlib.sha256(f"{FORMAT}\0{bcc_version}\0".encode())
    h.update(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):
        h.update(header.name.encode() + b"\0" + header.read_bytes())
    h.update(json.dumps([cflags, sorted((kfuncs or {}).items())]).encode())
    h.update(os.environ.get("BCC_KERNEL_SOURCE", "").encode())
    return h.hexdigest()[:32]


@functools.cache  # the signatures are declared once, not at every poll or attach
def _lib() -> Any:
    from bcc.libbcc import lib  # loaded with the probes, never before

    for name, res, args in (
        ("bcc_create_map", ctypes.c_int, [ctypes.c_int, ctypes.c_char_p] + [ctypes.c_int] * 4),
        (
            "bcc_prog_load",
            ctypes.c_int,
            [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
            + [ctypes.c_uint, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint],
        ),
        ("bpf_obj_get_info", ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]),
        ("bpf_num_tables", ctypes.c_size_t, [ctypes.c_void_p]),
        ("bpf_table_name", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_size_t]),
        ("bpf_table_fd_id", ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]),
        ("bpf_table_key_desc_id", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_size_t]),
        ("bpf_table_leaf_desc_id", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_size_t]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def _info(lib: Any, fd: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    n = ctypes.c_uint32(size)
    if lib.bpf_obj_get_info(fd, buf, ctypes.byref(n)) != 0:
        raise OSError(ctypes.get_errno(), "bpf_obj_get_info")
    return buf.raw


def map_fd_slots(code: bytes, fds: dict[int, int]) -> list[tuple[int, int]] | None:
    """``(byte offset, map index)`` of every map fd in ``code``, given
    ``fds`` (fd -> map index); None when an instruction names this run in a
    way that cannot be redone (another pseudo load, an fd of no map)."""
    slots = []
    i = 0
    while i + 8 <= len(code):
        op, regs, _off, imm = struct.unpack_from("<BBhi", code, i)
        if op == BPF_LD_IMM64:
            src = regs >> 4
            if src == BPF_PSEUDO_MAP_FD and imm in fds:
                slots.append((i, fds[imm]))
            elif src != 0:
                return None
            i += 16
        else:
            i += 8
    return slots


def enabled() -> bool:
    """Off with the boot cache, or alone with ``KSMTRACE_NO_PROG_CACHE=1``
    (every start compiles: benchmarks' baseline, or a suspected bad build)."""
    return bootcache.enabled() and not os.environ.get("KSMTRACE_NO_PROG_CACHE")


def keep(bpf: Any, key: str) -> None:
    """Record what ``bpf`` (just compiled and loaded by BCC) loaded."""
    if not enabled():
        return
    with contextlib.suppress(Exception):  # a cache: never the reason a command fails
        entry = _describe(bpf)
        if entry is not None:
            bootcache.save_entry(_entry_name(key), entry, KEEP)


def _entry_name(key: str) -> str:
    return f"prog-{key}.json"


def _describe(bpf: Any) -> dict[str, Any] | None:
    lib = _lib()
    module = bpf.module
    maps, fds = [], {}
    for i in range(lib.bpf_num_tables(module)):
        fd = lib.bpf_table_fd_id(module, i)
        mtype, _id, ksize, vsize, entries, flags, _name = _MAP_INFO.unpack_from(_info(lib, fd, 64))
        fds[fd] = len(maps)
        maps.append(
            {
                "name": lib.bpf_table_name(module, i).decode(),
                "type": mtype,
                "key_size": ksize,
                "value_size": vsize,
                "max_entries": entries,
                "flags": flags,
                "key": (lib.bpf_table_key_desc_id(module, i) or b"").decode(),
                "leaf": (lib.bpf_table_leaf_desc_id(module, i) or b"").decode(),
            }
        )
    progs = []
    for name, fn in bpf.funcs.items():  # in the order BCC loaded (and attached) them
        code = ctypes.string_at(lib.bpf_function_start(module, name), lib.bpf_function_size(module, name))
        slots = map_fd_slots(code, fds)
        if slots is None:
            return None
        (ptype,) = _PROG_TYPE.unpack_from(_info(lib, fn.fd, 8))
        progs.append(
            {"name": name.decode(), "type": ptype, "code": base64.b64encode(code).decode(), "maps": slots}
        )
    attached = {
        "raw": [tp.decode() for tp in bpf.raw_tracepoint_fds],
        "tp": [tp.decode() for tp in bpf.tracepoint_fds],
    }
    # Only what instantiate() can redo: every program attached to a raw
    # tracepoint or a tracepoint by BCC's names (no kprobe, no other kind).
    redone = {"raw_tracepoint__" + tp for tp in attached["raw"]}
    redone |= {"tracepoint__" + tp.replace(":", "__") for tp in attached["tp"]}
    if {p["name"] for p in progs} != redone:
        return None
    return {
        "license": lib.bpf_module_license(module).decode(),
        "kern_version": int(lib.bpf_module_kern_version(module)),
        "maps": maps,
        "progs": progs,
        "attached": attached,
    }


def instantiate(key: str, kfuncs: dict[int, int] | None = None) -> CachedBPF | None:
    """The programs kept under ``key``, loaded and attached as BCC did; None
    when there is no entry or the kernel refuses it (the entry is dropped)."""
    entry = bootcache.load_entry(_entry_name(key)) if enabled() else None
    if entry is None:
        return None
    bpf = CachedBPF()
    try:
        bpf._build(entry, kfuncs or {})
    except BaseException as exc:
        with critical():  # nothing half-attached left behind, also on a signal
            bpf.cleanup()
        if not isinstance(exc, Exception):
            raise
        bootcache.drop_entry(_entry_name(key))
        return None
    return bpf


class CachedBPF:
    """What the probes use of ``bcc.BPF``: tables by name, the attachments
    (``raw_tracepoint_fds``, ``tracepoint_fds``), attach/detach by BCC's
    auto-attach names, ``cleanup()``."""

    def __init__(self) -> None:
        self.from_cache = True
        self.raw_tracepoint_fds: dict[bytes, int] = {}
        self.tracepoint_fds: dict[bytes, int] = {}
        self._maps: dict[str, MapRef] = {}
        self._progs: dict[bytes, int] = {}
        self._tables: dict[str, Any] = {}
        self._closed = False
        self._ringbuf: Any = None  # libbcc's poller of every ring buffer opened
        self._callbacks: list[Any] = []  # ctypes callbacks: alive while the poller may call them

    def _build(self, entry: dict[str, Any], kfuncs: dict[int, int]) -> None:
        from ksmtrace.probes.loader import patch_kfunc_calls

        lib = _lib()
        fds: list[int] = []
        for m in entry["maps"]:
            fd = lib.bcc_create_map(
                m["type"],
                m["name"].encode()[:15],
                m["key_size"],
                m["value_size"],
                m["max_entries"],
                m["flags"],
            )
            if fd < 0:
                raise OSError(ctypes.get_errno(), f"map {m['name']}")
            fds.append(fd)
            self._maps[m["name"]] = MapRef(
                fd=fd,
                **{k: m[k] for k in ("name", "type", "key_size", "value_size", "max_entries", "key", "leaf")},
            )
        license = entry["license"].encode()
        for p in entry["progs"]:
            code = bytearray(base64.b64decode(p["code"]))
            for off, idx in p["maps"]:
                struct.pack_into("<i", code, off + 4, fds[idx])
            if kfuncs:
                patch_kfunc_calls(code, kfuncs)
            buf = ctypes.create_string_buffer(bytes(code), len(code))
            fd = lib.bcc_prog_load(
                p["type"], p["name"].encode(), buf, len(code), license, entry["kern_version"], 0, None, 0
            )
            if fd < 0:
                raise OSError(ctypes.get_errno(), f"program {p['name']}")
            self._progs[p["name"].encode()] = fd
        for tp in entry["attached"]["raw"]:
            self.attach_raw_tracepoint(tp=tp.encode(), fn_name=b"raw_tracepoint__" + tp.encode())
        for tp in entry["attached"]["tp"]:
            self.attach_tracepoint(tp=tp.encode(), fn_name=b"tracepoint__" + tp.encode().replace(b":", b"__"))

    def __getitem__(self, name: str | bytes) -> Any:
        key = name.decode() if isinstance(name, bytes) else name
        if key not in self._tables:
            self._tables[key] = open_table(self._maps[key], self)
        return self._tables[key]

    def _open_ring_buffer(self, map_fd: int, fn: Any, ctx: Any = None) -> None:
        lib = _lib()
        self._callbacks.append(fn)
        if self._ringbuf is None:
            self._ringbuf = lib.bpf_new_ringbuf(map_fd, fn, ctx)
            if not self._ringbuf:
                raise OSError(ctypes.get_errno(), "ring buffer")
        elif lib.bpf_add_ringbuf(self._ringbuf, map_fd, fn, ctx) < 0:
            raise OSError(ctypes.get_errno(), "ring buffer")

    def ring_buffer_poll(self, timeout: int = -1) -> None:
        _lib().bpf_poll_ringbuf(self._ringbuf, timeout)

    def ring_buffer_consume(self) -> None:
        _lib().bpf_consume_ringbuf(self._ringbuf)

    def attach_raw_tracepoint(self, tp: bytes, fn_name: bytes) -> None:
        fd = _lib().bpf_attach_raw_tracepoint(self._progs[fn_name], tp)
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"attach {tp.decode()}")
        self.raw_tracepoint_fds[tp] = fd

    def detach_raw_tracepoint(self, tp: bytes) -> None:
        os.close(self.raw_tracepoint_fds.pop(tp))

    def attach_tracepoint(self, tp: bytes, fn_name: bytes) -> None:
        cat, event = tp.split(b":")
        fd = _lib().bpf_attach_tracepoint(self._progs[fn_name], cat, event)
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"attach {tp.decode()}")
        self.tracepoint_fds[tp] = fd

    def detach_tracepoint(self, tp: bytes) -> None:
        _lib().bpf_close_perf_event_fd(self.tracepoint_fds.pop(tp))

    def cleanup(self) -> None:
        """Detach and close everything (again: a no-op)."""
        if self._closed:
            return
        self._closed = True
        if self._ringbuf is not None:
            _lib().bpf_free_ringbuf(self._ringbuf)
            self._ringbuf = None
        for tp in list(self.raw_tracepoint_fds):
            self.detach_raw_tracepoint(tp)
        # Closing a tracepoint's perf event waits for an RCU grace period
        # (~70 ms here): nine of them one after the other made every exit
        # 0.65 s long. Closed side by side, the waits overlap.
        fds = list(self.tracepoint_fds.values())
        self.tracepoint_fds.clear()
        if fds:
            close = _lib().bpf_close_perf_event_fd
            with concurrent.futures.ThreadPoolExecutor(len(fds)) as pool:
                list(pool.map(close, fds))
        for fd in [*self._progs.values(), *(m.fd for m in self._maps.values())]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._progs.clear()
