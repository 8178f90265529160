// SPDX-License-Identifier: GPL-2.0
/*
 * Copy-on-write faults on KSM pages, per process and per region, exact.
 *
 * A write-protect fault ((error_code & 3) == 3) is a KSM COW exactly when the
 * PTE it hits maps a KSM page at that moment: do_wp_page() then counts
 * cow_ksm and copies (a KSM folio is never reused, wp_can_reuse_anon_folio()).
 * So instead of tracking merged (mm, page) pairs from the merge tracepoints,
 * which goes stale on every unmerge path that has no tracepoint (break_ksm()
 * of MADV_UNMERGEABLE, munmap, MADV_DONTNEED, a failed pair merge's
 * break_cow()) and misses pages merged before tracing started or inherited
 * by fork, the fault handler asks the page tables. The walk runs only for
 * write-protect faults of processes whose mm has MMF_VM_MERGEABLE. Reading
 * current->mm->flags costs two kernel reads per fault, so a bitmap of
 * possibly-mergeable tgids goes first: one inlined array lookup. It is filled
 * by ksm:ksm_enter (in the opting-in process), by fork of a marked process,
 * and by user space at start for processes that opted in earlier; a stale bit
 * only costs the two reads (mm->flags stays the truth). Without the ksm:*
 * tracepoints (before 6.4) the bitmap is compiled out (NO_PREFILTER).
 *
 * Regions: user space pushes each mergeable process's mergeable ranges (from
 * smaps) into `regions`; faults outside them count as "other". A per-page
 * hash (attributed at report time) was exact without a table but cost a
 * cold insert per fault: +45% on a fork-COW loop of a mergeable process.
 *
 * Raw tracepoints: a plain tracepoint costs ~4x more per fault here.
 *
 * Defines (from ksmtrace/probes/faults.py; offsets from BTF, bases found at
 * start-up by bpf/kaddr.bpf.c):
 *   TASK_MM_OFF MM_FLAGS_OFF MM_PGD_OFF PAGE_MAPPING_OFF STRUCT_PAGE_SIZE
 *   DIRECT_MAP_BASE VMEMMAP_BASE PGTABLE_L5 MAX_PROCS TASK_TGID_OFF PID_MAX  [FILTER_TGID] [NO_PREFILTER]
 */
#include <uapi/linux/ptrace.h>
#include "faults.h"

#define MMF_VM_MERGEABLE_BIT 16		/* include/linux/mm_types.h, 2.6.32 .. 6.18 */
#define X86_PF_PROT 1
#define X86_PF_WRITE 2
#define PTE_PRESENT 1ULL
#define PTE_PSE (1ULL << 7)		/* huge page at pud/pmd level */
#define PTE_PFN_MASK 0x000ffffffffff000ULL
#define FOLIO_MAPPING_FLAGS 3UL
#define FOLIO_MAPPING_KSM 3UL		/* ANON | ANON_KSM */
#define USER_ADDR_MAX 0x00ffffffffffffffULL

BPF_HASH(procs, u32, struct proc_faults, MAX_PROCS);
BPF_HASH(regions, u32, struct region_table, MAX_PROCS);
BPF_ARRAY(zeroes, struct proc_faults, 1);
BPF_PERCPU_ARRAY(stats, u64, FS_NSTATS);
#ifndef NO_PREFILTER
BPF_ARRAY(maybe_mergeable, u64, (PID_MAX + 63) / 64);

static __always_inline void mark(u32 tgid)
{
	u32 word = tgid / 64;
	u64 *bits = maybe_mergeable.lookup(&word);
	if (bits)
		__sync_fetch_and_or(bits, 1ULL << (tgid % 64));
}

/* TP_PROTO(void *mm): runs in the process that opts in. */
RAW_TRACEPOINT_PROBE(ksm_enter)
{
	mark(bpf_get_current_pid_tgid() >> 32);
	return 0;
}

/* TP_PROTO(struct task_struct *parent, struct task_struct *child): the child
 * inherits MMF_VM_MERGEABLE (ksm_fork()) before it first runs. */
RAW_TRACEPOINT_PROBE(sched_process_fork)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32, word = tgid / 64, child = 0;
	u64 *bits = maybe_mergeable.lookup(&word);
	if (!bits || !(*bits & (1ULL << (tgid % 64))))
		return 0;
	bpf_probe_read_kernel(&child, sizeof(child), (void *)(ctx->args[1] + TASK_TGID_OFF));
	mark(child);
	return 0;
}
#endif

static __always_inline void stat_inc(int idx)
{
	u64 *v = stats.lookup(&idx);
	if (v)
		(*v)++;
}

static __always_inline int read_entry(u64 table_va, u64 index, u64 *out)
{
	return bpf_probe_read_kernel(out, sizeof(*out), (void *)(table_va + index * 8));
}

/* 1: the PTE for addr maps a KSM page; 0: it does not; -1: unreadable. */
static __always_inline int pte_is_ksm(u64 mm, u64 addr)
{
	u64 pgd = 0, e = 0, mapping = 0;

	if (bpf_probe_read_kernel(&pgd, sizeof(pgd), (void *)(mm + MM_PGD_OFF)) || !pgd)
		return -1;
	if (read_entry(pgd, (addr >> (PGTABLE_L5 ? 48 : 39)) & 511, &e))
		return -1;
#if PGTABLE_L5
	if (!(e & PTE_PRESENT))
		return 0;
	if (read_entry(DIRECT_MAP_BASE + (e & PTE_PFN_MASK), (addr >> 39) & 511, &e))
		return -1;
#endif
	if (!(e & PTE_PRESENT))
		return 0;
	if (read_entry(DIRECT_MAP_BASE + (e & PTE_PFN_MASK), (addr >> 30) & 511, &e))
		return -1;
	if (!(e & PTE_PRESENT) || (e & PTE_PSE))
		return 0;
	if (read_entry(DIRECT_MAP_BASE + (e & PTE_PFN_MASK), (addr >> 21) & 511, &e))
		return -1;
	if (!(e & PTE_PRESENT) || (e & PTE_PSE))
		return 0;	/* THP: KSM pages are always order 0 */
	if (read_entry(DIRECT_MAP_BASE + (e & PTE_PFN_MASK), (addr >> 12) & 511, &e))
		return -1;
	if (!(e & PTE_PRESENT))
		return 0;
	if (bpf_probe_read_kernel(&mapping, sizeof(mapping),
				  (void *)(VMEMMAP_BASE + ((e & PTE_PFN_MASK) >> 12) * STRUCT_PAGE_SIZE +
					   PAGE_MAPPING_OFF)))
		return -1;
	return (mapping & FOLIO_MAPPING_FLAGS) == FOLIO_MAPPING_KSM;
}

static __always_inline void add(struct fault_counts *c, int ksm)
{
	__sync_fetch_and_add(&c->wp, 1);
	if (ksm)
		__sync_fetch_and_add(&c->ksm_cow, 1);
}

static __always_inline int on_fault(u64 addr, u64 error_code, int kernel_mode)
{
	u64 mm = 0, flags = 0;

	if ((error_code & (X86_PF_PROT | X86_PF_WRITE)) != (X86_PF_PROT | X86_PF_WRITE))
		return 0;
	if (addr > USER_ADDR_MAX)
		return 0;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
#ifdef FILTER_TGID
	if (tgid != FILTER_TGID)
		return 0;
#endif
#ifndef NO_PREFILTER
	u32 word = tgid / 64;
	u64 *bits = maybe_mergeable.lookup(&word);
	/* Beyond the bitmap (pid_max raised since start): check the mm. */
	if (bits && !(*bits & (1ULL << (tgid % 64))))
		return 0;
#endif
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	if (bpf_probe_read_kernel(&mm, sizeof(mm), (void *)((u64)task + TASK_MM_OFF)) || !mm)
		return 0;
	if (bpf_probe_read_kernel(&flags, sizeof(flags), (void *)(mm + MM_FLAGS_OFF)))
		return 0;
	if (!(flags & (1ULL << MMF_VM_MERGEABLE_BIT)))
		return 0;
	int ksm = pte_is_ksm(mm, addr);
	if (ksm < 0) {
		stat_inc(FS_WALK_FAIL);
		ksm = 0;
	}
	if (ksm && kernel_mode)
		stat_inc(FS_KERNEL_MODE);

	struct proc_faults *c = procs.lookup(&tgid);
	if (!c) {
		int idx = 0;
		/* The value is larger than the BPF stack: initialise from a map. */
		struct proc_faults *zero = zeroes.lookup(&idx);
		if (!zero)
			return 0;
		c = procs.lookup_or_try_init(&tgid, zero);
		if (!c) {
			stat_inc(FS_PROC_DROPS);
			return 0;
		}
	}
	add(&c->total, ksm);

	/* Per region: a linear scan of a few ranges beats a per-page hash
	 * insert (cold cache lines) by far on this path. */
	struct region_table *t = regions.lookup(&tgid);
	if (!t) {
		stat_inc(FS_NO_TABLE);
		add(&c->other, ksm);
		return 0;
	}
#pragma unroll
	for (int i = 0; i < MAX_REGIONS; i++) {
		if (!t->start[i])
			break;
		if (addr >= t->start[i] && addr < t->end[i]) {
			add(&c->region[i], ksm);
			return 0;
		}
	}
	add(&c->other, ksm);
	return 0;
}

/* TP_PROTO(unsigned long address, struct pt_regs *regs, unsigned long error_code) */
RAW_TRACEPOINT_PROBE(page_fault_user)
{
	return on_fault(ctx->args[0], ctx->args[2], 0);
}

/* Kernel-mode writes to user memory (read(2) into a merged buffer) break
 * merges too and count in cow_ksm. */
RAW_TRACEPOINT_PROBE(page_fault_kernel)
{
	return on_fault(ctx->args[0], ctx->args[2], 1);
}
