"""Compile and load one of bpf/*.c with BCC, the way every probe module does.

Start-up checks run here, once: privileges, tracefs, headers. Kernel-side
filters and BTF offsets are passed as -D defines so the BPF program decides
in the kernel and never trusts a mismatched header's struct layout.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
from pathlib import Path
from typing import Any

from ksmtrace.errors import TracingUnavailable
from ksmtrace.kernel import bcc_env, checks
from ksmtrace.kernel.signals import critical
from ksmtrace.probes import progcache


def bpf_dir() -> Path:
    """bpf/ of a source checkout (editable install), or the copy in a wheel."""
    here = Path(__file__).resolve().parent.parent
    for cand in (here.parent / "bpf", here / "_bpf"):
        if cand.is_dir():
            return cand
    raise TracingUnavailable("ksmtrace's BPF sources are missing: reinstall ksmtrace")


def load(
    source: str,
    defines: dict[str, int | str] | None = None,
    kfuncs: dict[int, int] | None = None,
    cache: bool = False,
) -> Any:
    """BPF object for bpf/<source>, compiled with ``-DNAME=value`` for each define.

    ``kfuncs`` maps placeholder helper numbers to the BTF ids of kernel
    functions: see :func:`_kfunc_class`. ``cache``: the build is kept for
    the boot and later loads skip BCC's compiler (:mod:`progcache`; the
    object then offers only what the probes use of ``bcc.BPF``)."""
    checks.require_root("tracing")
    checks.ensure_tracefs()
    bcc, headers = bcc_env.prepare()
    path = bpf_dir() / source
    cflags = [*headers.cflags, f"-I{path.parent}"]
    for name, value in (defines or {}).items():
        cflags.append(f"-D{name}={value}")
    # BCC prints compiler warnings from the generic headers to stderr; they are
    # noise to users, so keep them unless KSMTRACE_DEBUG is set.
    if not os.environ.get("KSMTRACE_DEBUG"):
        cflags.append("-w")
    key = progcache.cache_key(path, cflags, kfuncs, bcc.__version__) if cache else ""
    if cache:
        kept = progcache.instantiate(key, kfuncs)
        if kept is not None:
            return kept
    cls = _kfunc_class(bcc, kfuncs) if kfuncs else bcc.BPF
    try:
        bpf = cls(src_file=str(path).encode(), cflags=cflags)
    except Exception as exc:  # BCC raises bare Exception on compile/load failure
        raise TracingUnavailable(f"could not load {source}: {exc}") from exc
    if cache:
        progcache.keep(bpf, key)
    return bpf


def dump(table: Any, key_fmt: str, leaf_fmt: str) -> list[tuple[tuple[Any, ...], tuple[Any, ...]]]:
    """Every entry of a BPF hash map as ``(key fields, value fields)`` tuples
    decoded with ``struct`` formats: BPF_MAP_LOOKUP_BATCH (Linux 5.6,
    cb4d03ab499d) into two flat buffers, a syscall per batch. BCC's own
    items_lookup_batch() hands out a ctypes pair per entry, about 10 us each:
    3 s of CPU for the ksmd probe's 262,144 pages (issue #14). Falls back to
    BCC's key-by-key walk where the kernel refuses batches."""
    lib = _bcc_lib()
    ks, vs = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
    if struct.calcsize(key_fmt) != ks or struct.calcsize(leaf_fmt) != vs:
        raise ValueError(f"formats {key_fmt!r}/{leaf_fmt!r} do not match {ks}/{vs}-byte entries")
    n = int(table.max_entries)
    keys, vals = ctypes.create_string_buffer(n * ks), ctypes.create_string_buffer(n * vs)
    token_in = ctypes.create_string_buffer(max(ks, 8))  # the batch position: opaque, at most a key
    token_out = ctypes.create_string_buffer(max(ks, 8))
    count = ctypes.c_uint32(0)
    total = 0
    while total < n:
        count.value = n - total
        res = lib.bpf_lookup_batch(
            table.map_fd,
            ctypes.cast(token_in, ctypes.POINTER(ctypes.c_uint32)) if total else None,
            ctypes.cast(token_out, ctypes.POINTER(ctypes.c_uint32)),
            ctypes.byref(keys, ks * total),
            ctypes.byref(vals, vs * total),
            ctypes.byref(count),
        )
        err = ctypes.get_errno()
        total += count.value
        if res != 0:
            if err == errno.ENOENT:  # the end of the map
                break
            if total == 0 and err in (errno.EINVAL, errno.ENOTSUPP, errno.EOPNOTSUPP):
                return [
                    (tuple(struct.unpack(key_fmt, bytes(k))), tuple(struct.unpack(leaf_fmt, bytes(v))))
                    for k, v in table.items()
                ]
            raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
        ctypes.memmove(token_in, token_out, len(token_out))
    return list(
        zip(
            struct.iter_unpack(key_fmt, keys.raw[: total * ks]),
            struct.iter_unpack(leaf_fmt, vals.raw[: total * vs]),
            strict=True,
        )
    )


def _bcc_lib() -> Any:
    from bcc.libbcc import lib  # loaded with the probes, never before

    return lib


def detach_all(bpf: Any) -> list[tuple[str, bytes]]:
    """Detach every tracepoint and raw tracepoint of ``bpf`` (programs stay
    loaded, maps keep their counts); returns what :func:`reattach` needs.
    Benchmarks toggle probes this way instead of recompiling."""
    done: list[tuple[str, bytes]] = []
    # Whole, or BCC's exit-time cleanup finds a closed fd it still lists.
    with critical():
        for tp in list(bpf.raw_tracepoint_fds):
            bpf.detach_raw_tracepoint(tp=tp)
            done.append(("raw", tp))
        for tp in list(bpf.tracepoint_fds):
            bpf.detach_tracepoint(tp=tp)
            done.append(("tp", tp))
    return done


def reattach(bpf: Any, detached: list[tuple[str, bytes]]) -> None:
    """Undo :func:`detach_all` (BCC's auto-attach names: raw_tracepoint__TP,
    tracepoint__CAT__EVENT)."""
    with critical():
        _reattach(bpf, detached)


def _reattach(bpf: Any, detached: list[tuple[str, bytes]]) -> None:
    for kind, tp in detached:
        if kind == "raw":
            bpf.attach_raw_tracepoint(tp=tp, fn_name=b"raw_tracepoint__" + tp)
        else:
            bpf.attach_tracepoint(tp=tp, fn_name=b"tracepoint__" + tp.replace(b":", b"__"))


BPF_CALL = 0x85  # BPF_JMP | BPF_CALL
BPF_LD_IMM64 = 0x18  # two instruction slots
BPF_PSEUDO_KFUNC_CALL = 2


def patch_kfunc_calls(code: bytearray, kfuncs: dict[int, int]) -> int:
    """Rewrite helper calls numbered like a key of ``kfuncs`` into calls of
    the kernel function with that BTF id (vmlinux); returns how many."""
    n, i = 0, 0
    while i + 8 <= len(code):
        op, _regs, _off, imm = struct.unpack_from("<BBhi", code, i)
        if op == BPF_CALL and imm in kfuncs:
            struct.pack_into("<BBhi", code, i, BPF_CALL, BPF_PSEUDO_KFUNC_CALL << 4, 0, kfuncs[imm])
            n += 1
        i += 16 if op == BPF_LD_IMM64 else 8
    return n


def _kfunc_class(bcc: Any, kfuncs: dict[int, int]) -> Any:
    """A BPF class whose programs may call kernel functions (kfuncs).

    BCC 0.26 cannot emit a kfunc call, so the C calls a helper number that
    does not exist (declared like BCC declares helpers) and each program's
    instructions are rewritten before they are loaded. BCC loads (and
    auto-attaches) programs through ``load_func``, so the rewrite sits there.
    """
    lib = bcc.libbcc.lib

    class KfuncBPF(bcc.BPF):  # type: ignore[misc, name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # BCC attaches programs one by one as it loads them: if a later one
            # is refused, the caller falls back to another build, and the
            # programs attached so far must not stay behind.
            try:
                super().__init__(*args, **kwargs)
            except Exception:
                with critical(), contextlib.suppress(Exception):
                    self.cleanup()
                raise

        def load_func(self, func_name: Any, prog_type: int, device: Any = None, attach_type: int = -1) -> Any:
            name = func_name.encode() if isinstance(func_name, str) else func_name
            if name in self.funcs:
                return self.funcs[name]
            start = lib.bpf_function_start(self.module, name)
            if not start:
                return super().load_func(name, prog_type, device, attach_type)
            code = bytearray(ctypes.string_at(start, lib.bpf_function_size(self.module, name)))
            if not patch_kfunc_calls(code, kfuncs):
                return super().load_func(name, prog_type, device, attach_type)
            buf = ctypes.create_string_buffer(bytes(code), len(code))
            fd = lib.bcc_func_load(
                self.module,
                prog_type,
                name,
                buf,
                len(code),
                lib.bpf_module_license(self.module),
                lib.bpf_module_kern_version(self.module),
                0,
                None,
                0,
                device,
                attach_type,
            )
            if fd < 0:
                err = ctypes.get_errno()
                raise Exception(f"Failed to load BPF program {name.decode()}: {os.strerror(err)}")
            fn = bcc.BPF.Function(self, name, fd)
            self.funcs[name] = fn
            return fn

    return KfuncBPF
