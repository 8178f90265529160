"""The one Python interface to the native worker (ksmtrace._native, built by cffi).

C functions return 0 or -errno; :func:`check` turns those into Python
exceptions here and nowhere else.
"""

from __future__ import annotations

import os

from ksmtrace.errors import KsmtraceError

try:
    from ksmtrace._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise KsmtraceError(f"ksmtrace's native module is not built ({exc}): run scripts/install.sh") from exc

PAGE = os.sysconf("SC_PAGE_SIZE")


def check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def version() -> str:
    return ffi.string(lib.kn_version()).decode()


def hash_pages(data: bytes | bytearray | memoryview, page: int = PAGE) -> list[int]:
    n = len(data) // page
    out = ffi.new("uint64_t[]", n)
    lib.kn_hash_pages(ffi.from_buffer(data), n, page, out)
    return list(out)


def count_zero_pages(data: bytes | bytearray | memoryview, page: int = PAGE) -> int:
    return int(lib.kn_count_zero_pages(ffi.from_buffer(data), len(data) // page, page))
