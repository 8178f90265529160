// SPDX-License-Identifier: GPL-2.0
/*
 * Copy-on-write faults on KSM pages, per process and per region, exact.
 *
 * A write-protect fault ((error_code & 3) == 3) is a KSM COW exactly when the
 * PTE it hits maps a KSM page at that moment: do_wp_page() then counts
 * cow_ksm and copies (a KSM folio is never reused, wp_can_reuse_anon_folio()).
 *
 * Design, driven by cost (kernel reads by helper cost ~125 ns each on the
 * machines this was measured on, a fault 0.8-2 us):
 * - A bitmap of possibly-mergeable tgids: every other process pays a mask
 *   test and one inlined array lookup. Filled by ksm:ksm_enter (runs in the
 *   opting-in process), by fork of a marked process, by user space at start.
 * - A set of merged (tgid, page) pairs, filled in ksmd's context by
 *   ksm:ksm_merge_with_ksm_page (mm -> tgid through mm->owner, page from
 *   rmap_item->address) and by user space at start (pagemap + kpageflags),
 *   kept as one bit per page in 2 MiB chunks. A write-protect fault that
 *   misses it is not a KSM COW and costs no read; a process with no merged
 *   page skips the lookup. (It was a hash of one entry per page with 1M
 *   slots: a 16 MiB bucket array whose cold cache lines and TLB misses cost
 *   more than the rest of the program; see bench/bench_probe_overhead.py.)
 * - A hit is verified: walk the page tables (4-5 reads of entries that the
 *   fault handler reads right after) and read the mapping word of the PTE's
 *   struct page (which do_wp_page reads too). Bits go stale on paths without
 *   a tracepoint (break_ksm() of MADV_UNMERGEABLE, munmap, MADV_DONTNEED, a
 *   failed pair merge's break_cow()), and a stale bit must not count. The
 *   bit is cleared atomically either way: a KSM COW ends the merge, and of
 *   two threads faulting on one page only the first counts, as in cow_ksm.
 *   A later merge of that page sets it again.
 * - Processes whose pages are not all in the set (children forked from a
 *   mergeable process, a full set) have walk_all set: every write-protect
 *   fault is checked against struct page (exact, slower).
 * - Regions: user space pushes each process's mergeable ranges (smaps) into
 *   `regions`; a linear scan of those few ranges attributes each fault;
 *   outside them counts as "other". (A per-page counter hash was exact
 *   without a table but cost a cold insert per fault: +45% on fork COW.)
 *
 * Raw tracepoints on the fault path: a plain tracepoint costs ~4x more.
 *
 * Defines (ksmtrace/probes/faults.py; offsets from BTF, bases from
 * bpf/kaddr.bpf.c): TASK_MM_OFF TASK_TGID_OFF MM_FLAGS_OFF MM_PGD_OFF
 * MM_OWNER_OFF PAGE_MAPPING_OFF STRUCT_PAGE_SIZE RMAP_ITEM_ADDRESS_OFF
 * DIRECT_MAP_BASE VMEMMAP_BASE PGTABLE_L5 PID_MAX MAX_PROCS MAX_REGIONS
 * MAX_MERGED (2 MiB chunks) [FILTER_TGID] [NO_KSM_TP: before 6.4, no ksm:* tracepoints]
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
BPF_ARRAY(maybe_mergeable, u64, (PID_MAX + 63) / 64);
/* Allocated as merges come: a host may have millions of merged pages. */
BPF_F_TABLE("hash", struct merged_key, struct merged_chunk, merged, MAX_MERGED, BPF_F_NO_PREALLOC);

static __always_inline void stat_inc(int idx)
{
	u64 *v = stats.lookup(&idx);
	if (v)
		(*v)++;
}

static __always_inline void mark(u32 tgid)
{
	u32 word = tgid / 64;
	u64 *bits = maybe_mergeable.lookup(&word);
	if (bits)
		__sync_fetch_and_or(bits, 1ULL << (tgid % 64));
}

static __always_inline int marked(u32 tgid)
{
#ifdef NO_KSM_TP
	return 1;	/* no ksm_enter to keep the bitmap current */
#endif
	u32 word = tgid / 64;
	u64 *bits = maybe_mergeable.lookup(&word);
	/* Beyond the bitmap (pid_max raised since start): look closer. */
	return !bits || (*bits & (1ULL << (tgid % 64)));
}

static __always_inline struct proc_faults *proc_entry(u32 tgid)
{
	struct proc_faults *c = procs.lookup(&tgid);
	if (c)
		return c;
	int idx = 0;
	/* The value is larger than the BPF stack: initialise it from a map. */
	struct proc_faults *zero = zeroes.lookup(&idx);
	if (!zero)
		return 0;
	c = procs.lookup_or_try_init(&tgid, zero);
	if (!c)
		stat_inc(FS_PROC_DROPS);
	return c;
}

static __always_inline int read_entry(u64 table_va, u64 index, u64 *out)
{
	return bpf_probe_read_kernel(out, sizeof(*out), (void *)(table_va + index * 8));
}

/* The PTE of addr, 0 if not mapped by a present 4 KiB PTE; -1: unreadable. */
static __always_inline int pte_of(u64 pgd, u64 addr, u64 *pte)
{
	u64 e = 0;

	*pte = 0;
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
	if (e & PTE_PRESENT)
		*pte = e;
	return 0;
}

static __always_inline int frame_is_ksm(u64 pfn)
{
	u64 mapping = 0;

	if (bpf_probe_read_kernel(&mapping, sizeof(mapping),
				  (void *)(VMEMMAP_BASE + pfn * STRUCT_PAGE_SIZE + PAGE_MAPPING_OFF)))
		return -1;
	return (mapping & FOLIO_MAPPING_FLAGS) == FOLIO_MAPPING_KSM;
}

static __always_inline void add(struct fault_counts *c, int ksm)
{
	__sync_fetch_and_add(&c->wp, 1);
	if (ksm)
		__sync_fetch_and_add(&c->ksm_cow, 1);
}

/* Read (once per exec) whether current's mm is mergeable, and its pgd. */
static __always_inline int settle(struct proc_faults *c)
{
	u64 mm = 0, flags = 0, pgd = 0;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();

	if (bpf_probe_read_kernel(&mm, sizeof(mm), (void *)((u64)task + TASK_MM_OFF)) || !mm)
		return 0;
	if (bpf_probe_read_kernel(&flags, sizeof(flags), (void *)(mm + MM_FLAGS_OFF)))
		return 0;
	if (!(flags & (1ULL << MMF_VM_MERGEABLE_BIT))) {
		c->state = PS_NOT_MERGEABLE;
		return 0;
	}
	if (bpf_probe_read_kernel(&pgd, sizeof(pgd), (void *)(mm + MM_PGD_OFF)) || !pgd)
		return 0;
	c->pgd = pgd;
	c->state = PS_MERGEABLE;
	return 1;
}

static __always_inline int on_fault(u64 addr, u64 error_code, int kernel_mode)
{
	if ((error_code & (X86_PF_PROT | X86_PF_WRITE)) != (X86_PF_PROT | X86_PF_WRITE))
		return 0;
	if (addr > USER_ADDR_MAX)
		return 0;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
#ifdef FILTER_TGID
	if (tgid != FILTER_TGID)
		return 0;
#endif
	if (!marked(tgid))
		return 0;
	struct proc_faults *c = proc_entry(tgid);
	if (!c)
		return 0;
	if (c->state == PS_NOT_MERGEABLE)
		return 0;
	if (c->state == PS_UNKNOWN && !settle(c))
		return 0;

	int ksm = 0, hit = 0, check = c->walk_all;
#ifdef NO_KSM_TP
	check = 1;	/* no merge events: the set stays empty */
#endif
	if (!check && c->has_merged) {
		struct merged_key key = {.tgid = tgid, .chunk = addr >> CHUNK_SHIFT};
		struct merged_chunk *m = merged.lookup(&key);
		if (m) {
			u64 *w = &m->bits[(addr >> 18) & (CHUNK_WORDS - 1)];
			u64 bit = 1ULL << ((addr >> 12) & 63);
			/* Only the thread that clears the bit checks the page. */
			if (*w & bit)
				hit = !!(__sync_fetch_and_and(w, ~bit) & bit);
		}
	}
	if (check || hit) {
		u64 pte = 0;
		if (pte_of(c->pgd, addr, &pte) < 0) {
			stat_inc(FS_WALK_FAIL);
		} else if (pte) {
			ksm = frame_is_ksm((pte & PTE_PFN_MASK) >> 12);
			if (ksm < 0) {
				stat_inc(FS_WALK_FAIL);
				ksm = 0;
			}
		}
		if (hit && !ksm)
			stat_inc(FS_STALE);
	}
	if (ksm && kernel_mode)
		stat_inc(FS_KERNEL_MODE);

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

/* TP_PROTO(struct task_struct *parent, struct task_struct *child): the child
 * inherits MMF_VM_MERGEABLE and the KSM pages (ksm_fork()), but no merge
 * event names them: it checks every fault. */
RAW_TRACEPOINT_PROBE(sched_process_fork)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32, child = 0, parent_tgid = 0;
	if (!marked(tgid))
		return 0;
	bpf_probe_read_kernel(&child, sizeof(child), (void *)(ctx->args[1] + TASK_TGID_OFF));
	bpf_probe_read_kernel(&parent_tgid, sizeof(parent_tgid), (void *)(ctx->args[0] + TASK_TGID_OFF));
	if (!child || child == parent_tgid)
		return 0;	/* a new thread: same process */
	mark(child);
	struct proc_faults *c = proc_entry(child);
	if (c)
		c->walk_all = 1;
	return 0;
}

/* TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm):
 * a new mm (and pgd); MMF_VM_MERGE_ANY may carry over, so look again. */
RAW_TRACEPOINT_PROBE(sched_process_exec)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct proc_faults *c = procs.lookup(&tgid);
	if (c) {
		c->state = PS_UNKNOWN;
		c->pgd = 0;
	}
	return 0;
}

#ifdef NO_KSM_TP
/* Linux < 6.4: no ksm_enter, and madvise(MADV_MERGEABLE) is the only way in
 * (prctl came with 6.4): after a successful madvise look at the mm again, or
 * a process that faulted before opting in stays "not mergeable". Returns 1:
 * perf keeps seeing the event. */
TRACEPOINT_PROBE(syscalls, sys_exit_madvise)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct proc_faults *c = args->ret ? 0 : procs.lookup(&tgid);
	if (c && c->state == PS_NOT_MERGEABLE)
		c->state = PS_UNKNOWN;
	return 1;
}
#else
/* TP_PROTO(void *mm): runs in the process that opts in. */
RAW_TRACEPOINT_PROBE(ksm_enter)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	mark(tgid);
	struct proc_faults *c = procs.lookup(&tgid);
	if (c && c->state == PS_NOT_MERGEABLE)
		c->state = PS_UNKNOWN;
	return 0;
}

static __always_inline u32 mm_tgid(u64 mm)
{
	u64 owner = 0;
	u32 tgid = 0;

	if (!mm || bpf_probe_read_kernel(&owner, sizeof(owner), (void *)(mm + MM_OWNER_OFF)) || !owner)
		return 0;
	bpf_probe_read_kernel(&tgid, sizeof(tgid), (void *)(owner + TASK_TGID_OFF));
	return tgid;
}

/* TP_PROTO(void *ksm_page, unsigned long pfn, void *rmap_item, void *mm, int err)
 * A failed second half of a pair merge (break_cow of the first) leaves a
 * stale bit: the check at the fault rejects it. */
RAW_TRACEPOINT_PROBE(ksm_merge_with_ksm_page)
{
	u64 rmap_item = ctx->args[2];

	if ((int)ctx->args[4])
		return 0;
	u32 tgid = mm_tgid(ctx->args[3]);
	u64 address = 0;
	if (!tgid || bpf_probe_read_kernel(&address, sizeof(address),
					   (void *)(rmap_item + RMAP_ITEM_ADDRESS_OFF)))
		return 0;
#ifdef FILTER_TGID
	if (tgid != FILTER_TGID)
		return 0;
#endif
	mark(tgid);
	struct proc_faults *c = proc_entry(tgid);
	if (!c)
		return 0;
	struct merged_key key = {.tgid = tgid, .chunk = address >> CHUNK_SHIFT};
	struct merged_chunk zero = {};
	struct merged_chunk *m = merged.lookup_or_try_init(&key, &zero);
	if (!m) {
		stat_inc(FS_MERGED_DROPS);
		c->walk_all = 1;
		return 0;
	}
	__sync_fetch_and_or(&m->bits[(address >> 18) & (CHUNK_WORDS - 1)], 1ULL << ((address >> 12) & 63));
	c->has_merged = 1;
	return 0;
}
#endif
