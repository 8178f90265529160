"""BPF maps by file descriptor, for programs loaded from the boot's cache.

BCC's table classes read their shape from the compiled module, which a
program loaded from :mod:`ksmtrace.probes.progcache` does not have. These
give the probes the same operations on a map fd, with the key and value
types BCC described when it compiled the program: item lookup and delete
(an ``int`` index is taken for arrays), per-CPU values as a list, queue
push/pop, ``items()``, and ``map_fd``/``Key``/``Leaf``/``max_entries``.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

MAP_TYPE_PERCPU_HASH = 5
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_QUEUE = 22
MAP_TYPE_RINGBUF = 27


@dataclass(frozen=True)
class MapRef:
    fd: int
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    key: str  # BCC's JSON description of the key type ("" for a queue)
    leaf: str


def _ctype(desc: str) -> Any:
    from bcc import BPF  # BCC's own decoding: the same ctypes as a compiled run

    return BPF._decode_table_type(json.loads(desc))


def _lib() -> Any:
    from bcc.libbcc import lib

    return lib


def _ncpus() -> int:
    from bcc.utils import get_possible_cpus

    return len(get_possible_cpus())


def open_table(ref: MapRef, owner: Any = None) -> Any:
    """The table object for ``ref``; ``owner`` (the program's CachedBPF)
    holds the ring buffers' poller, one for all of them, as in BCC."""
    if ref.type == MAP_TYPE_RINGBUF:
        return RingBuf(ref, owner)
    if ref.type == MAP_TYPE_QUEUE:
        return Queue(ref)
    if ref.type in (MAP_TYPE_PERCPU_ARRAY, MAP_TYPE_PERCPU_HASH):
        return PerCpuTable(ref)
    return Table(ref)


class Table:
    def __init__(self, ref: MapRef) -> None:
        self.ref = ref
        self.map_fd = ref.fd
        self.max_entries = ref.max_entries
        self.Key: Any = _ctype(ref.key) if ref.key else None
        self.Leaf: Any = _ctype(ref.leaf)
        if self.Key is not None and ctypes.sizeof(self.Key) != ref.key_size:
            raise ValueError(f"{ref.name}: key type is {ctypes.sizeof(self.Key)} bytes, map {ref.key_size}")
        if ctypes.sizeof(self.Leaf) != ref.value_size:
            raise ValueError(
                f"{ref.name}: value type is {ctypes.sizeof(self.Leaf)} bytes, map {ref.value_size}"
            )

    def _key(self, key: Any) -> Any:
        return self.Key(key) if isinstance(key, int) else key

    def _value_buffer(self) -> Any:
        return self.Leaf()

    def _value(self, buf: Any) -> Any:
        return buf

    def __getitem__(self, key: Any) -> Any:
        k = self._key(key)
        buf = self._value_buffer()
        if _lib().bpf_lookup_elem(self.map_fd, ctypes.byref(k), ctypes.byref(buf)) < 0:
            raise KeyError(key)
        return self._value(buf)

    def __delitem__(self, key: Any) -> None:
        k = self._key(key)
        if _lib().bpf_delete_elem(self.map_fd, ctypes.byref(k)) < 0:
            raise KeyError(key)

    def keys(self) -> Iterator[Any]:
        lib = _lib()
        prev, nxt = None, self.Key()
        while (
            lib.bpf_get_next_key(
                self.map_fd, ctypes.byref(prev) if prev is not None else None, ctypes.byref(nxt)
            )
            == 0
        ):
            yield nxt
            prev, nxt = nxt, self.Key()

    def items(self) -> list[tuple[Any, Any]]:
        out = []
        for k in self.keys():
            try:
                out.append((k, self[k]))
            except KeyError:
                continue  # deleted meanwhile
        return out


class PerCpuTable(Table):
    """A value per possible CPU, each padded to 8 bytes by the kernel."""

    def __init__(self, ref: MapRef) -> None:
        super().__init__(ref)
        self._stride = (ref.value_size + 7) // 8 * 8
        self._n = _ncpus()

    def _value_buffer(self) -> Any:
        return ctypes.create_string_buffer(self._stride * self._n)

    def _value(self, buf: Any) -> list[Any]:
        vals = [self.Leaf.from_buffer_copy(buf, i * self._stride) for i in range(self._n)]
        return [v.value if isinstance(v, ctypes._SimpleCData) else v for v in vals]


class Queue(Table):
    def push(self, leaf: Any, flags: int = 0) -> None:
        if _lib().bpf_update_elem(self.map_fd, None, ctypes.byref(leaf), flags) < 0:
            raise Exception(f"Could not push to table: {os.strerror(ctypes.get_errno())}")

    def pop(self) -> Any:
        leaf = self.Leaf()
        if _lib().bpf_lookup_and_delete(self.map_fd, None, ctypes.byref(leaf)) < 0:
            raise KeyError("Could not pop from table")
        return leaf


class RingBuf:
    """A ring buffer map: only BCC's ``open_ring_buffer(callback)``; events
    are read through the owner's ``ring_buffer_poll``/``ring_buffer_consume``."""

    def __init__(self, ref: MapRef, owner: Any) -> None:
        self.map_fd = ref.fd
        self._owner = owner

    def open_ring_buffer(self, callback: Any, ctx: Any = None) -> None:
        from bcc.libbcc import _RINGBUF_CB_TYPE

        def call(cb_ctx: Any, data: Any, size: int) -> int:
            ret = callback(cb_ctx, data, size)
            return ret if isinstance(ret, int) else 0

        fn = _RINGBUF_CB_TYPE(call)
        self._owner._open_ring_buffer(self.map_fd, fn, ctx)
