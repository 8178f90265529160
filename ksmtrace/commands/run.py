"""ksmtrace run -- CMD ARGS...: start a program with whole-process KSM opt-in.

PR_SET_MEMORY_MERGE (6.4+) marks every present and future anonymous mapping
of the calling process mergeable and survives fork and execve, so setting it
and then exec'ing opts in a program that was never written for KSM.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import shutil
from typing import Any

from ksmtrace.errors import KsmtraceError, UsageError
from ksmtrace.kernel import ksm_sysfs
from ksmtrace.kernel.abi import PR_SET_MEMORY_MERGE, libc


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run a command with all its memory mergeable (PR_SET_MEMORY_MERGE)",
        description="Opt a whole program and its children into KSM: set "
        "PR_SET_MEMORY_MERGE, then exec CMD. Needs Linux 6.4+ and root (CAP_SYS_RESOURCE).",
    )
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the program to run")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("usage: ksmtrace run -- CMD [ARGS...]")
    ksm_sysfs.require_ksm()
    exe = shutil.which(argv[0])
    if exe is None:
        raise UsageError(f"command not found: {argv[0]}")
    if libc().prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        if e == errno.EINVAL:
            raise KsmtraceError("this kernel has no PR_SET_MEMORY_MERGE (needs Linux 6.4+)")
        if e == errno.EPERM:
            raise KsmtraceError("PR_SET_MEMORY_MERGE needs root (CAP_SYS_RESOURCE)")
        raise KsmtraceError(f"prctl(PR_SET_MEMORY_MERGE) failed: {os.strerror(e)}")
    os.execv(exe, argv)
    return 127  # not reached
