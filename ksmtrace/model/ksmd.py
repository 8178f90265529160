"""ksmd's activity per interval: scan rounds, pages scanned, merges, CPU share.

Fed by the ksmd probe (ksm:* tracepoints, features.FEATURES["ksm_tracepoints"])
when there is one, and always by the /sys/kernel/mm/ksm counters and ksmd's
CPU times (its /proc/PID/stat, through ksmtrace.kernel.procfs), so the same
record comes out on kernels without the tracepoints (fields the tracepoints
alone give are None there).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from ksmtrace.errors import AccessDenied, ProcessGone
from ksmtrace.kernel import ksm_sysfs
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.probes.ksmd import KsmdProbe, KsmdSnapshot


@dataclass(frozen=True)
class KsmdSample:
    t: float
    full_scans: int  # sysfs
    pages_scanned: int | None  # sysfs; see features.FEATURES["pages_scanned"]
    pages_sharing: int
    pages_shared: int
    cpu_ticks: int | None
    probe: KsmdSnapshot | None


@dataclass(frozen=True)
class KsmdInterval:
    interval_s: float
    rounds: int  # completed full scans
    round_ms_avg: float | None  # probe only
    round_ms_max: float | None  # longest round since tracing started (probe only)
    rmap_entries: int | None  # at the last round's end (probe only)
    pages_scanned_per_s: float | None
    merges_per_s: float | None  # probe: pages merged; None without tracepoints
    unmerges_per_s: float | None
    sharing_delta: int  # change of pages_sharing (net effect, any kernel)
    cpu_pct: float | None  # of one CPU
    advisor_pages_to_scan: int | None
    advisor_cpu_pct: int | None
    advisor_events: int | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class KsmdSampler:
    """Takes KsmdSamples: sysfs counters, ksmd's CPU ticks, the probe's counts."""

    def __init__(self, probe: KsmdProbe | None, proc: ProcFS | None = None, pid: int | None = None) -> None:
        self.probe = probe
        self.proc = proc or ProcFS()
        self.pid = pid if pid is not None else self.proc.find_kthread("ksmd")

    def sample(self, probe: KsmdSnapshot | None = None) -> KsmdSample:
        """``probe``: the probe's snapshot when the caller took one this interval
        already (the live sampler's fault model reads it too: one read, not two)."""
        s = ksm_sysfs.read()
        ticks = None
        if self.pid is not None:
            try:
                ticks = self.proc.stat(self.pid).cpu_ticks
            except (ProcessGone, AccessDenied):
                ticks = None
        scanned = s.get("pages_scanned")
        return KsmdSample(
            t=time.monotonic(),
            full_scans=int(s.get("full_scans") or 0),
            pages_scanned=int(scanned) if isinstance(scanned, int) else None,
            pages_sharing=int(s.get("pages_sharing") or 0),
            pages_shared=int(s.get("pages_shared") or 0),
            cpu_ticks=ticks,
            probe=probe if probe is not None else (self.probe.snapshot(pages=False) if self.probe else None),
        )


def _grown(cur: KsmdSnapshot, prev: KsmdSnapshot, name: str) -> int:
    """How much ``name`` grew over the processes of ``cur``: per process, so
    that one that exited (its entry forgotten) does not make the sum go
    down, and one whose entry was made anew counts from zero."""
    if cur.procs is prev.procs:
        return 0  # the probe handed out the same records: nothing grew
    total = 0
    for tgid, c in cur.procs.items():
        now = getattr(c, name)
        before = getattr(prev.procs[tgid], name) if tgid in prev.procs else 0
        total += now - before if now >= before else now
    return total


class KsmdState:
    def __init__(self, first: KsmdSample) -> None:
        self.prev = first
        self.hz = os.sysconf("SC_CLK_TCK")

    def update(self, cur: KsmdSample) -> KsmdInterval:
        p, dt = self.prev, max(cur.t - self.prev.t, 1e-9)
        self.prev = cur
        cpu = None
        if cur.cpu_ticks is not None and p.cpu_ticks is not None:
            cpu = 100.0 * (cur.cpu_ticks - p.cpu_ticks) / self.hz / dt
        scanned = None
        if cur.pages_scanned is not None and p.pages_scanned is not None:
            scanned = (cur.pages_scanned - p.pages_scanned) / dt
        rounds = cur.full_scans - p.full_scans
        avg = mx = rmap = merges = unmerges = None
        adv_pages = adv_cpu = adv_events = None
        if cur.probe is not None and p.probe is not None:
            a, b = p.probe.scan, cur.probe.scan
            rounds = b.rounds - a.rounds
            avg = (b.total_ns - a.total_ns) / rounds / 1e6 if rounds else None
            mx = b.max_ns / 1e6 if b.rounds else None
            rmap = b.last_rmap_entries if b.rounds else None
            merges = _grown(cur.probe, p.probe, "merges") / dt
            unmerges = _grown(cur.probe, p.probe, "unmerges") / dt
            if b.advisor_events:
                adv_pages, adv_cpu = b.advisor_pages_to_scan, b.advisor_cpu_percent
            adv_events = b.advisor_events - a.advisor_events
        return KsmdInterval(
            interval_s=dt,
            rounds=rounds,
            round_ms_avg=avg,
            round_ms_max=mx,
            rmap_entries=rmap,
            pages_scanned_per_s=scanned,
            merges_per_s=merges,
            unmerges_per_s=unmerges,
            sharing_delta=cur.pages_sharing - p.pages_sharing,
            cpu_pct=cpu,
            advisor_pages_to_scan=adv_pages,
            advisor_cpu_pct=adv_cpu,
            advisor_events=adv_events,
        )
