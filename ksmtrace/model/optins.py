"""Opted-in processes with what merges in them right now.

The inventory (ksmtrace/inventory.py) says who opted in, where and how;
this adds the live state of each region from pagemap + kpageflags, because
``ksm_stat``'s ``ksm_merging_pages`` is refreshed only when ksmd rescans a
page (platform.md): after copy-on-write broke a merge it still counts it.
(smaps ``KSM:`` is computed from the pages when smaps is read, so it is live
too, per VMA; pagemap gives the same count and, later, which pages.)

Saving follows the kernel's own ``ksm_process_profit`` (mm/ksm.c):
merging pages x page size - rmap_items x sizeof(struct ksm_rmap_item),
with the live count of KSM pages in place of ``ksm_merging_pages``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ksmtrace.errors import AccessDenied, ProcessGone, TracingUnavailable
from ksmtrace.kernel import pagemap
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.model import inventory
from ksmtrace.model.inventory import MergeableProcess

# sizeof(struct ksm_rmap_item) on x86_64 from 5.x to 6.18, used only when BTF
# cannot be read (the kernel's own value is taken from BTF otherwise).
_RMAP_ITEM_FALLBACK = 64


def rmap_item_size() -> int:
    try:
        from ksmtrace.kernel import btf  # noqa: PLC0415

        return btf.load().size("ksm_rmap_item")
    except (TracingUnavailable, KeyError):
        return _RMAP_ITEM_FALLBACK


@dataclass(frozen=True)
class LiveRegion:
    region: dict[str, object]  # MergeableProcess.region_dicts() entry
    present_pages: int
    ksm_pages: int


@dataclass
class LiveProcess:
    proc: MergeableProcess
    regions: list[LiveRegion]
    page_size: int
    rmap_item_size: int

    @property
    def ksm_pages(self) -> int:
        return sum(r.ksm_pages for r in self.regions)

    @property
    def saving(self) -> int:
        rmap_items = self.proc.stat.rmap_items if self.proc.stat else 0
        return self.ksm_pages * self.page_size - rmap_items * self.rmap_item_size

    def as_dict(self) -> dict[str, object]:
        d = self.proc.as_dict()
        d.update(
            merging_pages_now=self.ksm_pages,
            merging_bytes_now=self.ksm_pages * self.page_size,
            saving_bytes_now=self.saving,
            merging_pages_ksm_stat=self.proc.merging_pages,
            regions=[
                {**r.region, "present_pages": r.present_pages, "merging_pages_now": r.ksm_pages}
                for r in self.regions
            ],
        )
        return d


@dataclass
class Report:
    processes: list[LiveProcess] = field(default_factory=list)
    exited: int = 0
    denied: int = 0
    page_size: int = 4096


def measure(p: MergeableProcess, page: int, rmap_size: int, proc: ProcFS | None = None) -> LiveProcess:
    """Live KSM pages of each opted-in region; raises ProcessGone if p exits meanwhile."""
    root = (proc or ProcFS()).root
    live = []
    for reg in p.region_dicts():
        rp = pagemap.range_pages(p.pid, int(reg["start"]), int(reg["end"]), root, page)  # type: ignore[call-overload]
        live.append(LiveRegion(region=reg, present_pages=rp.present, ksm_pages=rp.ksm))
    return LiveProcess(proc=p, regions=live, page_size=page, rmap_item_size=rmap_size)


def take(pids: list[int] | None = None, proc: ProcFS | None = None) -> Report:
    proc = proc or ProcFS()
    return from_inventory(inventory.take(proc, pids), proc)


def from_inventory(inv: inventory.Inventory, proc: ProcFS) -> Report:
    """Each process of the inventory with its regions' live KSM pages."""
    page = os.sysconf("SC_PAGE_SIZE")
    rep = Report(exited=inv.exited, denied=inv.denied, page_size=page)
    size = rmap_item_size()
    # Frames first, for every process; then the flags of all of them in one
    # pass: forked processes map the same frames, and reading kpageflags
    # once per process cost most of a thousand-process optins.
    frames_of: list[tuple[MergeableProcess, list[tuple[dict[str, object], list[int]]]]] = []
    for p in inv.processes:
        try:
            regs = []
            for reg in p.region_dicts():
                present = pagemap.present_pages(p.pid, int(reg["start"]), int(reg["end"]), proc.root, page)  # type: ignore[call-overload]
                regs.append((reg, [pfn for _, pfn in present]))
            frames_of.append((p, regs))
        except ProcessGone:
            rep.exited += 1
        except AccessDenied:
            rep.denied += 1
    # Without CAP_SYS_ADMIN pagemap reports pfn 0 for every page.
    flags = pagemap.frame_flags([f for _, regs in frames_of for _, fr in regs for f in fr if f], proc.root)
    for p, regs in frames_of:
        live = [
            LiveRegion(
                region=reg,
                present_pages=len(fr),
                ksm_pages=sum(1 for f in fr if flags.get(f, 0) & pagemap.KPF_KSM),
            )
            for reg, fr in regs
        ]
        rep.processes.append(LiveProcess(proc=p, regions=live, page_size=page, rmap_item_size=size))
    return rep
