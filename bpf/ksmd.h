/* Shared between bpf/ksmd.bpf.c and ksmtrace/probes/ksmd.py (ctypes mirrors). */
#ifndef KSMTRACE_KSMD_H
#define KSMTRACE_KSMD_H

/* Per process (tgid of mm->owner; 0 when the mm has no owner left). */
struct ksm_proc_counts {
	__u64 merges;		/* pages of this mm that became KSM-mapped */
	__u64 merge_fails;	/* merge attempts that failed (page changed, busy) */
	__u64 zero_merges;	/* pages replaced by the zero page (use_zero_pages) */
	__u64 unmerges;		/* merges undone by ksmd: stable node removed, or
				 * a pair merge whose second half failed (break_cow) */
	__u64 enters;		/* ksm_enter: the mm joined KSM */
	__u64 exits;		/* ksm_exit: the mm left KSM */
};

/* Per process and page (rmap_item->address), for per-region rates. */
struct page_key {
	__u32 tgid;
	__u32 pad;
	__u64 page;	/* virtual page number: address >> 12 */
};

struct page_merges {
	__u64 merges;
	__u64 unmerges;
};

struct ksm_scan_state {
	__u64 rounds;		/* completed full scans seen */
	__u64 total_ns;		/* sum of their durations */
	__u64 max_ns;
	__u64 last_ns;
	__u64 start_ns;		/* start of the scan in progress (0: none seen) */
	__u32 last_seq;
	__u32 last_rmap_entries;
	__u64 starts;
	__u64 ksm_pages_freed;	/* ksm_remove_ksm_page: stable nodes gone */
	__u64 advisor_events;
	__s64 advisor_scan_time;
	__u64 advisor_pages_to_scan;
	__u32 advisor_cpu_percent;
	__u32 pad;
	__u64 proc_drops;	/* per-process map full */
	__u64 page_drops;	/* per-page map full: region rows incomplete */
};

#endif
