"""libc and the kernel ABI numbers ksmtrace uses, defined once.

Every module that calls madvise, prctl or a raw syscall takes the libc handle
and the constants from here (uapi values: include/uapi/asm-generic/mman-common.h,
include/uapi/linux/prctl.h, arch/x86/entry/syscalls/syscall_64.tbl). Which
kernel has which interface is ksmtrace.kernel.features' table, not this file's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13
MADV_NOHUGEPAGE = 15
ADVICE_NAMES = {MADV_MERGEABLE: "MADV_MERGEABLE", MADV_UNMERGEABLE: "MADV_UNMERGEABLE"}

PR_SET_NAME = 15
PR_SET_MEMORY_MERGE = 67
PR_GET_MEMORY_MERGE = 68

# x86_64 syscall numbers (the only ABI ksmtrace injects into or calls raw).
SYS_PIDFD_OPEN = 434
SYS_PROCESS_MADVISE = 440

# The kernel keeps TASK_COMM_LEN = 16 bytes of a task's name: 15 characters and a NUL.
COMM_LEN = 15


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, with errno kept for ctypes.get_errno()."""
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    lib.syscall.restype = ctypes.c_long
    lib.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    lib.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    return lib


def kernel_comm_bytes(name: str) -> bytes:
    """``name`` as the kernel keeps it in a task's comm: its first 15 bytes
    (cut byte-wise, as the kernel cuts an executable's basename)."""
    return name.encode(errors="surrogateescape")[:COMM_LEN]


def kernel_comm(name: str) -> str:
    """:func:`kernel_comm_bytes` as /proc/PID/comm reads back (ProcFS decodes with surrogateescape)."""
    return kernel_comm_bytes(name).decode(errors="surrogateescape")


def set_comm(name: str) -> None:
    """Rename the calling thread, as the kernel truncates it."""
    buf = ctypes.create_string_buffer(name.encode()[:COMM_LEN])
    libc().prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0)
