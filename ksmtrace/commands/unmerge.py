"""ksmtrace unmerge: take a running process's memory out of KSM (remote MADV_UNMERGEABLE).

Without --range every mergeable mapping of the process is unmerged. The
kernel copies each merged page back first, so this can take a while on large
merged ranges; the target thread is held for that long.
"""

from __future__ import annotations

from typing import Any

from ksmtrace import remote
from ksmtrace.commands import merge


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "unmerge",
        help="make ranges of a running process unmergeable again (remote madvise, x86_64)",
        description="madvise(MADV_UNMERGEABLE) injected into a running process: its merged "
        "pages are copied back and ksmd stops scanning the range.",
    )
    merge._common_args(p)
    p.set_defaults(run=merge.run, advice=remote.MADV_UNMERGEABLE)
