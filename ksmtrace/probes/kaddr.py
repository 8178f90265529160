"""Kernel layout a page-table walk in BPF needs: BTF offsets and KASLR bases.

Struct offsets come from BTF. The direct-map and vmemmap bases are moved at
boot by CONFIG_RANDOMIZE_MEMORY and are not in kallsyms unless
CONFIG_KALLSYMS_ALL; bpf/kaddr.bpf.c finds them once (see its comment), and
this module checks the answer by walking our own page tables in BPF and
comparing with /proc/self/pagemap before anything trusts it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import secrets
import time
from dataclasses import dataclass

from ksmtrace.errors import TracingUnavailable
from ksmtrace.kernel import abi, bootcache, btf, host, pagemap
from ksmtrace.kernel.signals import critical
from ksmtrace.probes import loader

PAGEMAP_PRESENT = 1 << 63
PAGEMAP_PFN_MASK = (1 << 55) - 1
GIB = 1 << 30
CACHE_SECTION = "kaddr"


@dataclass(frozen=True)
class KernelLayout:
    task_mm: int
    mm_flags: int
    mm_pgd: int
    mm_owner: int
    task_tgid: int
    page_mapping: int
    struct_page_size: int
    rmap_item_mm: int
    rmap_item_address: int
    pgtable_l5: bool
    direct_map_base: int
    vmemmap_base: int

    def defines(self) -> dict[str, int | str]:
        return {
            "TASK_MM_OFF": self.task_mm,
            "TASK_TGID_OFF": self.task_tgid,
            "MM_FLAGS_OFF": self.mm_flags,
            "MM_PGD_OFF": self.mm_pgd,
            "MM_OWNER_OFF": self.mm_owner,
            "PAGE_MAPPING_OFF": self.page_mapping,
            "STRUCT_PAGE_SIZE": self.struct_page_size,
            "RMAP_ITEM_MM_OFF": self.rmap_item_mm,
            "RMAP_ITEM_ADDRESS_OFF": self.rmap_item_address,
            "PGTABLE_L5": int(self.pgtable_l5),
            "DIRECT_MAP_BASE": f"{self.direct_map_base:#x}ULL",
            "VMEMMAP_BASE": f"{self.vmemmap_base:#x}ULL",
        }


def pgtable_l5() -> bool:
    """x86 runs 5-level paging only on CPUs with la57 (and a kernel built for it)."""
    return "la57" in host.cpu_flags()


def max_phys_gib() -> int:
    end = host.max_ram_address()
    return end // GIB + 2 if end else 1024


def _pfn_of(addr: int) -> int:
    e = pagemap.self_entry(addr)
    if not e & PAGEMAP_PRESENT or not e & PAGEMAP_PFN_MASK:
        raise TracingUnavailable("cannot read page frames from /proc/self/pagemap (needs CAP_SYS_ADMIN)")
    return e & PAGEMAP_PFN_MASK


def _touch_fresh_pages(n: int = 128) -> None:
    """New anonymous pages go to the LRU in per-CPU batches; fill a few batches."""
    m = mmap.mmap(-1, n * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(n):
        m[i * mmap.PAGESIZE] = 1
    m.close()


@functools.lru_cache(maxsize=1)
def layout(timeout: float = 3.0) -> KernelLayout:
    b = btf.load()
    try:
        offsets = {
            "task_mm": b.offset("task_struct", "mm"),
            "task_tgid": b.offset("task_struct", "tgid"),
            "mm_flags": b.offset("mm_struct", "flags"),
            "mm_pgd": b.offset("mm_struct", "pgd"),
            "mm_owner": b.offset("mm_struct", "owner"),
            "page_mapping": b.offset("page", "mapping"),
            "struct_page_size": b.size("page"),
            "rmap_item_mm": b.offset("ksm_rmap_item", "mm") if b.has("ksm_rmap_item") else 0,
            "rmap_item_address": b.offset("ksm_rmap_item", "address") if b.has("ksm_rmap_item") else 0,
        }
    except KeyError as exc:
        raise TracingUnavailable(f"kernel BTF lacks a member ksmtrace needs: {exc}") from exc
    l5 = pgtable_l5()
    # Found and checked by an earlier command of this boot: KASLR placed the
    # bases at boot and they stay there until the next (kernel/bootcache.py).
    known = bootcache.load(CACHE_SECTION)
    if known.get("pgtable_l5") == l5 and known.get("direct_map_base") and known.get("vmemmap_base"):
        return KernelLayout(
            pgtable_l5=l5,
            direct_map_base=int(known["direct_map_base"]),
            vmemmap_base=int(known["vmemmap_base"]),
            **offsets,
        )
    dmap, vmemmap = _search(offsets, l5, timeout)
    bootcache.save(CACHE_SECTION, {"pgtable_l5": l5, "direct_map_base": dmap, "vmemmap_base": vmemmap})
    return KernelLayout(pgtable_l5=l5, direct_map_base=dmap, vmemmap_base=vmemmap, **offsets)


def _search(offsets: dict[str, int], l5: bool, timeout: float) -> tuple[int, int]:
    """The direct map's and the struct page array's bases, found by
    bpf/kaddr.bpf.c and checked against our own page tables."""
    libc = abi.libc()
    page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(page)
    va = ctypes.addressof(anchor)
    marker = secrets.randbits(63) | 1
    page[0:8] = marker.to_bytes(8, "little")
    libc.mlock(ctypes.c_void_p(va), ctypes.c_size_t(mmap.PAGESIZE))
    pfn = _pfn_of(va)
    bpf = loader.load(
        "kaddr.bpf.c",
        {
            "SELF_TGID": os.getpid(),
            "MARKER": f"{marker:#x}ULL",
            "MARKER_PHYS": f"{pfn * mmap.PAGESIZE:#x}ULL",
            "MARKER_VA": f"{va:#x}ULL",
            "MAX_GIB": max_phys_gib(),
            "TASK_MM_OFF": offsets["task_mm"],
            "MM_PGD_OFF": offsets["mm_pgd"],
            "STRUCT_PAGE_SIZE": offsets["struct_page_size"],
            "PGTABLE_L5": int(l5),
        },
    )
    try:
        deadline = time.monotonic() + timeout
        res = bpf["result"][0]
        while time.monotonic() < deadline:
            _touch_fresh_pages()
            os.stat("/")  # any syscall of ours runs the direct-map search
            res = bpf["result"][0]
            if res.done and res.vmemmap_base:
                break
            time.sleep(0.01)
        dmap, vmemmap, walk_pfn = int(res.direct_map_base), int(res.vmemmap_base), int(res.walk_pfn)
    finally:
        with critical():  # BCC retries a cleanup cut in two at exit, and fails
            bpf.cleanup()
        libc.munlock(ctypes.c_void_p(va), ctypes.c_size_t(mmap.PAGESIZE))
        del anchor
        page.close()
    if not dmap or not vmemmap:
        raise TracingUnavailable(
            "could not locate the kernel's direct map / struct page array "
            f"(direct map {dmap:#x}, vmemmap {vmemmap:#x}): KSM COW faults cannot be told apart"
        )
    if walk_pfn != pfn:
        raise TracingUnavailable(
            f"page-table walk check failed (pfn {walk_pfn:#x}, pagemap says {pfn:#x}): "
            "this kernel's paging layout is not understood"
        )
    return dmap, vmemmap
