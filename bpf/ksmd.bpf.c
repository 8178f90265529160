// SPDX-License-Identifier: GPL-2.0
/*
 * ksmd's side: scan rounds, merges and unmerges per process, advisor changes.
 *
 * The ksm:* tracepoints carry an mm, and merges fire in ksmd's context, so the
 * process is found through mm->owner (CONFIG_MEMCG) and the owner's tgid:
 * this also covers processes that opted in before tracing started, which an
 * mm -> pid map filled at ksm_enter would miss. Offsets come from BTF.
 * All events are rare next to page faults (ksmd merges at most
 * pages_to_scan pages per wake-up), so plain tracepoints are fine here.
 *
 * Per-page counts (key: tgid and rmap_item->address) let user space sum
 * merges per VMA; that map is allocated on demand and counts what it drops.
 *
 * Both maps are bounded. A drop counts one event that found no room (one
 * counter increment not made), not one process or page: a process that did
 * not fit loses every event of it, and each is counted in proc_drops; the
 * page events of such a process are not looked up in `pages` at all (user
 * space reads pages only of processes in `procs`), so page_drops counts only
 * page events of processes that are counted. Every event of a wanted process
 * lands in exactly one place: a counter, proc_drops or (its page half)
 * page_drops.
 *
 * Defines: MM_OWNER_OFF TASK_TGID_OFF RMAP_ITEM_ADDRESS_OFF MAX_PROCS
 *          MAX_PAGES [FILTER_TGID | FILTER_TGIDS {a,b,..} with FILTER_NTGIDS n]
 */
#include <uapi/linux/ptrace.h>
#include "ksmd.h"

BPF_HASH(procs, u32, struct ksm_proc_counts, MAX_PROCS);
BPF_ARRAY(scan, struct ksm_scan_state, 1);
BPF_F_TABLE("hash", struct page_key, struct page_merges, pages, MAX_PAGES, BPF_F_NO_PREALLOC);
/* The first half of a pair merge (kpage NULL): its pfn and process, so a
 * failing second half can be charged as an unmerge (break_cow). ksmd is one
 * thread, but it can migrate between CPUs between the two calls. */
struct pending_pair {
	u64 pfn;
	u64 page;
	u32 tgid;
	u32 valid;
};
BPF_ARRAY(pending, struct pending_pair, 1);

static __always_inline u32 mm_tgid(void *mm)
{
	u64 owner = 0;
	u32 tgid = 0;

	if (!mm || bpf_probe_read_kernel(&owner, sizeof(owner), mm + MM_OWNER_OFF) || !owner)
		return 0;
	bpf_probe_read_kernel(&tgid, sizeof(tgid), (void *)(owner + TASK_TGID_OFF));
	return tgid;
}

static __always_inline u64 rmap_page(void *rmap_item)
{
	u64 address = 0;

	/* The low bits of rmap_item->address are KSM flags (SEQNR, UNSTABLE, STABLE). */
	bpf_probe_read_kernel(&address, sizeof(address), rmap_item + RMAP_ITEM_ADDRESS_OFF);
	return address >> 12;
}

static __always_inline bool wanted(u32 tgid)
{
#ifdef FILTER_TGID
	return tgid == FILTER_TGID;
#elif defined(FILTER_TGIDS)
	const u32 tgids[] = FILTER_TGIDS;
	bool hit = false;
#pragma unroll
	for (int i = 0; i < FILTER_NTGIDS; i++)
		if (tgids[i] == tgid)
			hit = true;
	return hit;
#else
	return true;
#endif
}

/* Callers have the process's entry in `procs`: see the top of the file. */
static __always_inline void page_count(u32 tgid, u64 page, int unmerge)
{
	struct page_key key = {.tgid = tgid, .page = page};
	struct page_merges zero = {};
	int idx = 0;
	struct page_merges *v = pages.lookup_or_try_init(&key, &zero);
	if (!v) {
		struct ksm_scan_state *s = scan.lookup(&idx);
		if (s)
			__sync_fetch_and_add(&s->page_drops, 1);
		return;
	}
	if (unmerge)
		__sync_fetch_and_add(&v->unmerges, 1);
	else
		__sync_fetch_and_add(&v->merges, 1);
}

static __always_inline struct ksm_proc_counts *proc(u32 tgid)
{
	struct ksm_proc_counts zero = {};
	int idx = 0;
	if (!wanted(tgid))
		return 0;
	struct ksm_proc_counts *c = procs.lookup_or_try_init(&tgid, &zero);
	if (!c) {
		struct ksm_scan_state *s = scan.lookup(&idx);
		if (s)
			__sync_fetch_and_add(&s->proc_drops, 1);
	}
	return c;
}

TRACEPOINT_PROBE(ksm, ksm_start_scan)
{
	int idx = 0;
	struct ksm_scan_state *s = scan.lookup(&idx);
	if (s) {
		s->start_ns = bpf_ktime_get_ns();
		s->starts++;
	}
	return 0;
}

TRACEPOINT_PROBE(ksm, ksm_stop_scan)
{
	int idx = 0;
	struct ksm_scan_state *s = scan.lookup(&idx);
	if (!s)
		return 0;
	if (s->start_ns) {
		u64 d = bpf_ktime_get_ns() - s->start_ns;
		s->rounds++;
		s->total_ns += d;
		s->last_ns = d;
		if (d > s->max_ns)
			s->max_ns = d;
	}
	s->start_ns = 0;
	s->last_seq = args->seq;
	s->last_rmap_entries = args->rmap_entries;
	return 0;
}

TRACEPOINT_PROBE(ksm, ksm_merge_with_ksm_page)
{
	int idx = 0;
	u32 tgid = mm_tgid(args->mm);
	struct pending_pair *p = pending.lookup(&idx);
	struct ksm_proc_counts *c;

	if (p && p->valid && args->ksm_page) {
		/* Second half of a pair: on failure ksmd breaks the first half. */
		if (args->err && args->pfn == p->pfn) {
			c = proc(p->tgid);
			if (c) {
				__sync_fetch_and_add(&c->unmerges, 1);
				page_count(p->tgid, p->page, 1);
			}
		}
		p->valid = 0;
	}
	c = proc(tgid);
	if (args->err) {
		if (c)
			__sync_fetch_and_add(&c->merge_fails, 1);
		return 0;
	}
	u64 page = rmap_page(args->rmap_item);
	if (c) {
		__sync_fetch_and_add(&c->merges, 1);
		page_count(tgid, page, 0);
	}
	/* Also for a process that did not fit: its break_cow is one more drop. */
	if (!args->ksm_page && p) {
		p->pfn = args->pfn;
		p->page = page;
		p->tgid = tgid;
		p->valid = 1;
	}
	return 0;
}

/* Fires only for merges with the zero page (use_zero_pages=1). */
TRACEPOINT_PROBE(ksm, ksm_merge_one_page)
{
	if (args->err)
		return 0;
	struct ksm_proc_counts *c = proc(mm_tgid(args->mm));
	if (c)
		__sync_fetch_and_add(&c->zero_merges, 1);
	return 0;
}

TRACEPOINT_PROBE(ksm, ksm_remove_rmap_item)
{
	u32 tgid = mm_tgid(args->mm);
	struct ksm_proc_counts *c = proc(tgid);
	if (!c)
		return 0;
	__sync_fetch_and_add(&c->unmerges, 1);
	page_count(tgid, rmap_page(args->rmap_item), 1);
	return 0;
}

TRACEPOINT_PROBE(ksm, ksm_remove_ksm_page)
{
	int idx = 0;
	struct ksm_scan_state *s = scan.lookup(&idx);
	if (s)
		__sync_fetch_and_add(&s->ksm_pages_freed, 1);
	return 0;
}

TRACEPOINT_PROBE(ksm, ksm_enter)
{
	/* current is the opting-in process. At fork (ksm_fork()) the child's mm
	 * is already owned by the child, but copy_process() assigns the child's
	 * tgid only later, so that enter is counted for the parent. */
	struct ksm_proc_counts *c = proc(mm_tgid(args->mm));
	if (c)
		__sync_fetch_and_add(&c->enters, 1);
	return 0;
}

TRACEPOINT_PROBE(ksm, ksm_exit)
{
	struct ksm_proc_counts *c = proc(mm_tgid(args->mm));
	if (c)
		__sync_fetch_and_add(&c->exits, 1);
	return 0;
}

TRACEPOINT_PROBE(ksm, ksm_advisor)
{
	int idx = 0;
	struct ksm_scan_state *s = scan.lookup(&idx);
	if (s) {
		s->advisor_events++;
		s->advisor_scan_time = args->scan_time;
		s->advisor_pages_to_scan = args->pages_to_scan;
		s->advisor_cpu_percent = args->cpu_percent;
	}
	return 0;
}
