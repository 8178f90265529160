// SPDX-License-Identifier: GPL-2.0
/*
 * Copy-on-write faults on KSM pages, per process and per region, exact.
 *
 * A write-protect fault ((error_code & 3) == 3) is a KSM COW exactly when the
 * PTE it hits maps a KSM page at that moment: do_wp_page() then counts
 * cow_ksm and copies (a KSM folio is never reused, wp_can_reuse_anon_folio()).
 *
 * Design, driven by cost (a fault is 0.8-2 us; an empty BPF program on this
 * tracepoint alone costs ~4% of one; bench/bench_probe_overhead.py):
 * - Processes are found through arrays only: `slot_of[tgid]` (0: not
 *   tracked; every other process pays this one inlined load) names a slot of
 *   `procs`. A hash lookup here cost ~8% of a COW fault, an array ~1%. Slots
 *   come from the queue `free_slots` (filled and refilled by user space,
 *   which frees the slots of exited processes); they are taken by
 *   ksm:ksm_enter (runs in the opting-in process), by fork of a tracked
 *   process, by merges, and by user space at start.
 * - A set of merged (tgid, page) pairs, filled in ksmd's context by
 *   ksm:ksm_merge_with_ksm_page (mm -> tgid through mm->owner, page from
 *   rmap_item->address) and by user space at start (pagemap + kpageflags),
 *   kept as one bit per page in 2 MiB chunks (faults.h). A write-protect
 *   fault that misses it is not a KSM COW and costs no read; a process with
 *   no merged page skips the lookup.
 * - A hit is verified: walk the page tables (4-5 reads of entries that the
 *   fault handler reads right after) and read the mapping word of the PTE's
 *   struct page (which do_wp_page reads too). Bits go stale on paths without
 *   a tracepoint (break_ksm() of MADV_UNMERGEABLE, munmap, MADV_DONTNEED, a
 *   failed pair merge's break_cow()), and a stale bit must not count. The
 *   bit is cleared atomically either way: a KSM COW ends the merge, and of
 *   two threads faulting on one page only the first counts, as in cow_ksm.
 *   A later merge of that page sets it again.
 * - Processes whose pages are not all in the set (children forked from a
 *   mergeable process, a full bucket) have walk_all set: every
 *   write-protect fault is checked against struct page (exact, slower).
 * - Regions: user space writes each process's mergeable ranges (smaps) into
 *   its slot; a linear scan of those few ranges attributes each fault and
 *   bumps the counters beside the bounds; outside them counts as "other".
 *
 * Raw tracepoints on the fault path: a plain tracepoint costs ~4x more.
 *
 * Defines (ksmtrace/probes/faults.py; offsets from BTF, bases from
 * bpf/kaddr.bpf.c): TASK_MM_OFF TASK_TGID_OFF MM_FLAGS_OFF MM_PGD_OFF
 * MM_OWNER_OFF PAGE_MAPPING_OFF STRUCT_PAGE_SIZE RMAP_ITEM_ADDRESS_OFF
 * DIRECT_MAP_BASE VMEMMAP_BASE PGTABLE_L5 PID_MAX MAX_PROCS MAX_REGIONS
 * MERGED_BUCKET_BITS MERGED_WAYS [FILTER_TGID] [EXIT_GROUP_DEAD: 6.16+]
 * [KFUNC_RDONLY_CAST: placeholder helper number, see read_u64()]
 * [NO_KSM_TP: no ksm:* tracepoints, see features.FEATURES["ksm_tracepoints"]]
 */
#include <uapi/linux/ptrace.h>
#include "faults.h"

#define MMF_VM_MERGEABLE_BIT 16		/* include/linux/mm_types.h, 2.6.32 .. 6.18 */
#define MADV_MERGEABLE 12
#define X86_PF_PROT 1
#define X86_PF_WRITE 2
#define PTE_PRESENT 1ULL
#define PTE_PSE (1ULL << 7)		/* huge page at pud/pmd level */
#define PTE_PFN_MASK 0x000ffffffffff000ULL
#define FOLIO_MAPPING_FLAGS 3UL
#define FOLIO_MAPPING_KSM 3UL		/* ANON | ANON_KSM */
#define USER_ADDR_MAX 0x00ffffffffffffffULL
#define MERGED_ENTRIES ((1 << MERGED_BUCKET_BITS) * MERGED_WAYS)

/* u64, not u32: array elements are 8 bytes apart either way. */
BPF_F_TABLE("array", u32, u64, slot_of, PID_MAX, BPF_F_MMAPABLE);
BPF_F_TABLE("array", u32, struct proc_slot, procs, MAX_PROCS, BPF_F_MMAPABLE);
BPF_QUEUE(free_slots, u32, MAX_PROCS);
BPF_F_TABLE("array", u32, u64, merged_tags, MERGED_ENTRIES, BPF_F_MMAPABLE);
BPF_F_TABLE("array", u32, struct merged_chunk, merged_bits, MERGED_ENTRIES, BPF_F_MMAPABLE);
BPF_PERCPU_ARRAY(stats, u64, FS_NSTATS);

static __always_inline void stat_inc(int idx)
{
	u64 *v = stats.lookup(&idx);
	if (v)
		(*v)++;
}

static __always_inline struct proc_slot *proc_of(u32 tgid)
{
	u64 *s = slot_of.lookup(&tgid);
	if (!s || !*s)
		return 0;
	u32 idx = *s;
	return procs.lookup(&idx);
}

/* The slot of tgid, taken from the free queue if it has none, or if its
 * slot is that of an exited process whose pid was reused before user space
 * freed it (the old slot keeps its tgid and counts until user space reports
 * and frees it). Another CPU may take one for the same tgid at the same
 * moment (two threads opting in): the compare-and-swap on slot_of picks one,
 * the loser gives its slot back. */
static __always_inline struct proc_slot *proc_track(u32 tgid)
{
	u64 *s = slot_of.lookup(&tgid);
	if (!s) {
		stat_inc(FS_PROC_DROPS);	/* pid beyond the table (pid_max raised) */
		return 0;
	}
	u32 cur = *s;
	if (cur) {
		struct proc_slot *old = procs.lookup(&cur);
		if (!old || !old->exited)
			return old;
	}
	u32 fresh = 0;
	if (free_slots.pop(&fresh) || !fresh || fresh >= MAX_PROCS) {
		stat_inc(FS_PROC_DROPS);
		return 0;
	}
	struct proc_slot *p = procs.lookup(&fresh);
	if (!p)
		return 0;
	/* User space zeroed the slot before queueing it. */
	p->tgid = tgid;
	u32 seen = __sync_val_compare_and_swap(s, (u64)cur, (u64)fresh);
	/* seen 0: user space freed the exited slot meanwhile; the pid is free. */
	if (seen == cur || (!seen && !__sync_val_compare_and_swap(s, 0, (u64)fresh)))
		return p;
	p->tgid = 0;
	free_slots.push(&fresh, 0);
	if (!seen)
		return 0;
	return procs.lookup(&seen);
}

static __always_inline u64 merged_tag(u32 tgid, u64 addr)
{
	return ((u64)tgid << TAG_CHUNK_BITS) | (addr >> CHUNK_SHIFT);
}

static __always_inline u32 merged_bucket(u64 tag)
{
#if MERGED_BUCKET_BITS == 0
	return 0;
#endif
	return (u32)((tag * 0x9E3779B97F4A7C15ULL) >> (64 - MERGED_BUCKET_BITS)) * MERGED_WAYS;
}

/* Index of tag's chunk in merged_bits, or -1. */
static __always_inline int merged_find(u64 tag)
{
	u32 base = merged_bucket(tag);
#pragma unroll
	for (int i = 0; i < MERGED_WAYS; i++) {
		u32 idx = base + i;
		u64 *t = merged_tags.lookup(&idx);
		if (t && *t == tag)
			return idx;
	}
	return -1;
}

#ifdef KFUNC_RDONLY_CAST
/* Kernel reads on the KSM COW path without a helper call. BCC 0.26 cannot
 * call kfuncs: this calls a helper number that does not exist, and
 * ksmtrace/probes/loader.py rewrites the call into one of bpf_rdonly_cast()
 * (6.2+; to void * since 6.11), which the verifier then replaces by a
 * register move. A load through its result is inlined (BPF_PROBE_MEM: a
 * faulting address reads as 0), where each bpf_probe_read_kernel() is a call:
 * the five of a page-table walk made the KSM COW check cost ~10% of the fault.
 * ksmtrace/probes/faults.py falls back to the helper if the kernel refuses. */
static void *(*rdonly_cast)(const void *obj, u32 btf_id) = (void *)KFUNC_RDONLY_CAST;

static __always_inline int read_u64(u64 addr, u64 *out)
{
	*out = *(u64 *)rdonly_cast((void *)addr, 0);
	return 0;
}
#else
static __always_inline int read_u64(u64 addr, u64 *out)
{
	return bpf_probe_read_kernel(out, sizeof(*out), (void *)addr);
}
#endif

static __always_inline int read_entry(u64 table_va, u64 index, u64 *out)
{
	return read_u64(table_va + index * 8, out);
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

	if (read_u64(VMEMMAP_BASE + pfn * STRUCT_PAGE_SIZE + PAGE_MAPPING_OFF, &mapping))
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
static __always_inline int settle(struct proc_slot *c)
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

/* A write-protect fault of a process whose pid has no entry in slot_of
 * (pid_max was raised after start): rare, so checked the slow way, from
 * current's mm, and counted machine-wide, so that the per-process sum plus
 * this still equals cow_ksm. */
static __always_inline void untracked_fault(u64 addr, int kernel_mode)
{
	u64 mm = 0, flags = 0, pgd = 0, pte = 0;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();

	if (bpf_probe_read_kernel(&mm, sizeof(mm), (void *)((u64)task + TASK_MM_OFF)) || !mm)
		return;
	if (bpf_probe_read_kernel(&flags, sizeof(flags), (void *)(mm + MM_FLAGS_OFF)) ||
	    !(flags & (1ULL << MMF_VM_MERGEABLE_BIT)))
		return;
	if (bpf_probe_read_kernel(&pgd, sizeof(pgd), (void *)(mm + MM_PGD_OFF)) || !pgd)
		return;
	if (pte_of(pgd, addr, &pte) < 0) {
		stat_inc(FS_WALK_FAIL);
		return;
	}
	if (!pte)
		return;
	int ksm = frame_is_ksm((pte & PTE_PFN_MASK) >> 12);
	if (ksm < 0) {
		stat_inc(FS_WALK_FAIL);
		return;
	}
	if (ksm) {
		stat_inc(FS_UNTRACKED);
		if (kernel_mode)
			stat_inc(FS_KERNEL_MODE);
	}
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
	u64 *s = slot_of.lookup(&tgid);
	if (!s) {
		untracked_fault(addr, kernel_mode);
		return 0;
	}
	if (!*s)
		return 0;
	u32 idx = *s;
	struct proc_slot *c = procs.lookup(&idx);
	if (!c || c->state == PS_NOT_MERGEABLE)
		return 0;
	if (c->state == PS_UNKNOWN && !settle(c))
		return 0;

	int ksm = 0, hit = 0, check = c->walk_all;
#ifdef NO_KSM_TP
	check = 1;	/* no merge events: the set stays empty */
#endif
	if (!check && c->has_merged) {
		int idx = merged_find(merged_tag(tgid, addr));
		u32 key = idx;
		struct merged_chunk *m = idx < 0 ? 0 : merged_bits.lookup(&key);
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
	/* Which path counted it (tests check the fast one is in use): only on
	 * KSM COW faults, which are rare, so no cost on ordinary ones. */
	if (ksm)
		stat_inc(hit ? FS_COW_FAST : FS_COW_WALKED);

	if (!c->region[0].start) {
		stat_inc(FS_NO_TABLE);
		add(&c->other, ksm);
		return 0;
	}
#pragma unroll
	for (int i = 0; i < MAX_REGIONS; i++) {
		struct region_counts *r = &c->region[i];
		if (!r->start)
			break;
		if (addr >= r->start && addr < r->end) {
			add(&r->n, ksm);
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
	if (!proc_of(tgid))
		return 0;
	bpf_probe_read_kernel(&child, sizeof(child), (void *)(ctx->args[1] + TASK_TGID_OFF));
	bpf_probe_read_kernel(&parent_tgid, sizeof(parent_tgid), (void *)(ctx->args[0] + TASK_TGID_OFF));
	if (!child || child == parent_tgid)
		return 0;	/* a new thread: same process */
	struct proc_slot *c = proc_track(child);
	if (c)
		c->walk_all = 1;
	return 0;
}

/* TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm):
 * a new mm (and pgd); MMF_VM_MERGE_ANY may carry over, so look again. */
RAW_TRACEPOINT_PROBE(sched_process_exec)
{
	struct proc_slot *c = proc_of(bpf_get_current_pid_tgid() >> 32);
	/* An exited slot is a dead process's: this one reused its pid. */
	if (c && !c->exited) {
		c->state = PS_UNKNOWN;
		c->pgd = 0;
	}
	return 0;
}

/* TP_PROTO(struct task_struct *p, bool group_dead) (group_dead since 6.16;
 * before, the thread-group leader's exit stands for the process's). Stop
 * using the slot's cached pgd: until user space frees the slot, a new
 * process with the same pid must not walk the dead one's page tables, nor
 * count in its slot (`exited`: proc_track gives the new one its own). */
RAW_TRACEPOINT_PROBE(sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
#ifdef EXIT_GROUP_DEAD
	if (!(u8)ctx->args[1])
		return 0;
#else
	if ((u32)id != id >> 32)
		return 0;
#endif
	struct proc_slot *c = proc_of(id >> 32);
	if (c) {
		c->state = PS_NOT_MERGEABLE;
		c->pgd = 0;
		c->exited = 1;
	}
	return 0;
}

#ifdef NO_KSM_TP
/* Linux < 6.4: no ksm_enter, and madvise(MADV_MERGEABLE) is the only way in
 * (prctl came with 6.4): track the caller from its request on; if the call
 * fails, the first fault finds the mm not mergeable. Returns 1: perf keeps
 * seeing the event. */
TRACEPOINT_PROBE(syscalls, sys_enter_madvise)
{
	if (args->behavior != MADV_MERGEABLE)
		return 1;
	struct proc_slot *c = proc_track(bpf_get_current_pid_tgid() >> 32);
	if (c && c->state == PS_NOT_MERGEABLE)
		c->state = PS_UNKNOWN;
	return 1;
}
#else
/* TP_PROTO(void *mm): runs in the process that opts in. */
RAW_TRACEPOINT_PROBE(ksm_enter)
{
	struct proc_slot *c = proc_track(bpf_get_current_pid_tgid() >> 32);
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

/* The chunk of tag, claimed from a free way of its bucket if new; -1: full. */
static __always_inline int merged_claim(u64 tag)
{
	u32 base = merged_bucket(tag);
	int free_idx = -1;
#pragma unroll
	for (int i = 0; i < MERGED_WAYS; i++) {
		u32 idx = base + i;
		u64 *t = merged_tags.lookup(&idx);
		if (!t)
			continue;
		if (*t == tag)
			return idx;
		if (!*t && free_idx < 0)
			free_idx = idx;
	}
	if (free_idx < 0)
		return -1;
	u32 key = free_idx;
	u64 *t = merged_tags.lookup(&key);
	/* ksmd is one thread, but user space preloads at start: claim atomically. */
	if (!t)
		return -1;
	u64 old = __sync_val_compare_and_swap(t, 0, tag);
	if (!old || old == tag)
		return free_idx;
	return merged_find(tag);
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
	struct proc_slot *c = proc_track(tgid);
	if (!c)
		return 0;
	int idx = merged_claim(merged_tag(tgid, address));
	u32 key = idx;
	struct merged_chunk *m = idx < 0 ? 0 : merged_bits.lookup(&key);
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
