"""Load bpf/faults.bpf.c and read its maps into typed records.

The BPF side counts write-protect faults of mergeable processes and, exactly,
those whose PTE mapped a KSM page (see the comment in bpf/faults.bpf.c).
Counters are cumulative since load; ksmtrace/rates.py turns two snapshots
into rates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ksmtrace.kernel import checks
from ksmtrace.probes import kaddr, loader

DEFAULT_BUCKET_SHIFT = 12  # one page: exact region attribution
MAX_PROCS = 8192
MAX_BUCKETS = 131072
_STATS = ("bucket_drops", "proc_drops", "walk_failures", "kernel_mode_ksm_cow")


@dataclass(frozen=True)
class FaultCounts:
    wp: int  # write-protect faults (a copy or a reuse) in a mergeable process
    ksm_cow: int  # of which on a page that was a KSM page: copy-on-write of a merge


@dataclass(frozen=True)
class FaultSnapshot:
    t: float  # time.monotonic() of the read
    procs: dict[int, FaultCounts]
    buckets: dict[tuple[int, int], FaultCounts]  # (tgid, first address of the bucket)
    bucket_size: int
    stats: dict[str, int] = field(default_factory=dict)


def available() -> bool:
    return checks.tracepoint_exists("exceptions", "page_fault_user")


class FaultProbe:
    def __init__(
        self,
        pid: int | None = None,
        bucket_shift: int = DEFAULT_BUCKET_SHIFT,
        max_procs: int = MAX_PROCS,
        max_buckets: int = MAX_BUCKETS,
    ) -> None:
        lay = kaddr.layout()
        defines: dict[str, int | str] = {
            **lay.defines(),
            "BUCKET_SHIFT": bucket_shift,
            "MAX_PROCS": max_procs,
            "MAX_BUCKETS": max_buckets,
        }
        if pid is not None:
            defines["FILTER_TGID"] = pid
        self.bucket_shift = bucket_shift
        self.bpf: Any = loader.load("faults.bpf.c", defines)

    def snapshot(self) -> FaultSnapshot:
        t = time.monotonic()
        procs = {int(k.value): FaultCounts(int(v.wp), int(v.ksm_cow)) for k, v in self.bpf["procs"].items()}
        buckets = {
            (int(k.tgid), int(k.bucket) << self.bucket_shift): FaultCounts(int(v.wp), int(v.ksm_cow))
            for k, v in self.bpf["buckets"].items()
        }
        st = self.bpf["stats"]
        stats = {name: int(sum(st[st.Key(i)])) for i, name in enumerate(_STATS)}
        return FaultSnapshot(t, procs, buckets, 1 << self.bucket_shift, stats)

    def forget(self, tgids: set[int]) -> None:
        """Drop exited processes' entries: their pids can be reused."""
        if not tgids:
            return
        procs, buckets = self.bpf["procs"], self.bpf["buckets"]
        for tgid in tgids:
            try:
                del procs[procs.Key(tgid)]
            except KeyError:
                pass
        for k in [k for k in buckets.keys() if int(k.tgid) in tgids]:
            try:
                del buckets[k]
            except KeyError:
                pass

    def close(self) -> None:
        self.bpf.cleanup()

    def __enter__(self) -> FaultProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
