// SPDX-License-Identifier: GPL-2.0
/*
 * Find two kernel bases that KASLR (CONFIG_RANDOMIZE_MEMORY) moves at boot and
 * that kallsyms does not show without CONFIG_KALLSYMS_ALL: the direct map
 * (page_offset_base) and the struct page array (vmemmap_base). bpf/faults.bpf.c
 * needs both to walk page tables. Run once at start-up, then unloaded.
 *
 * vmemmap: pagemap:mm_lru_insertion carries a folio pointer and its pfn.
 * Direct map: our own mm->pgd is a direct-map address, so the base lies within
 * physical-memory-size below it, 1 GiB aligned (kernel_randomize_memory()).
 * User space wrote MARKER into a locked page at physical MARKER_PHYS; the one
 * candidate base under which that physical address reads back MARKER is it.
 * As a check, the program then walks our page tables for the marker page's
 * virtual address and reports the pfn it finds.
 *
 * Defines: SELF_TGID MARKER MARKER_PHYS MARKER_VA MAX_GIB TASK_MM_OFF
 *          MM_PGD_OFF STRUCT_PAGE_SIZE PGTABLE_L5
 */
#include <uapi/linux/ptrace.h>
#include <linux/mmzone.h> /* enum lru_list, a field of mm_lru_insertion */
#include "kaddr.h"

#define GIB (1ULL << 30)
#define PTE_PRESENT 1ULL
#define PTE_PFN_MASK 0x000ffffffffff000ULL

BPF_ARRAY(result, struct kaddr_result, 1);

TRACEPOINT_PROBE(pagemap, mm_lru_insertion)
{
	int zero = 0;
	struct kaddr_result *r = result.lookup(&zero);
	if (r && !r->vmemmap_base)
		r->vmemmap_base = (u64)args->folio - args->pfn * STRUCT_PAGE_SIZE;
	return 0;
}

static __always_inline int entry(u64 base, u64 phys_table, u64 index, u64 *out)
{
	return bpf_probe_read_kernel(out, 8, (void *)(base + (phys_table & PTE_PFN_MASK) + index * 8));
}

RAW_TRACEPOINT_PROBE(sys_enter)
{
	int zero = 0;
	u64 mm = 0, pgd = 0, word = 0, e = 0;

	if ((bpf_get_current_pid_tgid() >> 32) != SELF_TGID)
		return 0;
	struct kaddr_result *r = result.lookup(&zero);
	if (!r || r->done)
		return 0;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	if (bpf_probe_read_kernel(&mm, 8, (void *)((u64)task + TASK_MM_OFF)) || !mm)
		return 0;
	if (bpf_probe_read_kernel(&pgd, 8, (void *)(mm + MM_PGD_OFF)) || !pgd)
		return 0;
	u64 top = pgd & ~(GIB - 1);
	for (int k = 0; k < MAX_GIB; k++) {
		u64 cand = top - (u64)k * GIB;
		r->tries = k + 1;
		if (bpf_probe_read_kernel(&word, 8, (void *)(cand + MARKER_PHYS)))
			continue;
		if (word == MARKER) {
			r->direct_map_base = cand;
			break;
		}
	}
	r->done = 1;
	u64 base = r->direct_map_base;
	if (!base)
		return 0;
	u64 va = MARKER_VA;
	if (bpf_probe_read_kernel(&e, 8, (void *)(pgd + ((va >> (PGTABLE_L5 ? 48 : 39)) & 511) * 8)))
		return 0;
#if PGTABLE_L5
	if (!(e & PTE_PRESENT) || entry(base, e, (va >> 39) & 511, &e))
		return 0;
#endif
	if (!(e & PTE_PRESENT) || entry(base, e, (va >> 30) & 511, &e))
		return 0;
	if (!(e & PTE_PRESENT) || entry(base, e, (va >> 21) & 511, &e))
		return 0;
	if (!(e & PTE_PRESENT) || entry(base, e, (va >> 12) & 511, &e))
		return 0;
	if (e & PTE_PRESENT)
		r->walk_pfn = (e & PTE_PFN_MASK) >> 12;
	return 0;
}
