/* Shared between bpf/faults.bpf.c and ksmtrace/probes/faults.py (ctypes mirrors). */
#ifndef KSMTRACE_FAULTS_H
#define KSMTRACE_FAULTS_H

#ifndef MAX_REGIONS
#define MAX_REGIONS 32
#endif

/* Address ranges of one process that user space wants counted separately
 * (its mergeable VMAs, from smaps). Written by user space only, append-only:
 * slot i keeps meaning the same range, so counters never move between rows. */
struct region_table {
	__u64 start[MAX_REGIONS];	/* start == 0: unused slot (and all after it) */
	__u64 end[MAX_REGIONS];
};

struct fault_counts {
	__u64 wp;	/* write-protect faults (a copy or a reuse) */
	__u64 ksm_cow;	/* of which the faulting PTE mapped a KSM page */
};

/* Per process, written by BPF (user space reads it, sets walk_all and
 * has_merged at start-up, deletes it on exit). The process total is the sum
 * of other and region[]: one counter less to bump per fault. */
struct proc_faults {
	__u64 pgd;			/* cached mm->pgd (0: not read yet; reset on exec) */
	__u32 state;			/* PS_* */
	__u32 walk_all;			/* merged-page set incomplete: check every fault */
	__u32 has_merged;		/* some page entered the merged set */
	__u32 pad;
	struct fault_counts other;		/* outside every range of the table */
	struct fault_counts region[MAX_REGIONS];
};

enum proc_state {
	PS_UNKNOWN = 0,		/* MMF_VM_MERGEABLE not read yet (or ksm_enter since) */
	PS_MERGEABLE = 1,
	PS_NOT_MERGEABLE = 2,	/* stale prefilter bit: ignore its faults */
};

/* Pages of a process that ksmd merged (or that were KSM at start-up), one
 * bit per 4 KiB page of an aligned 2 MiB chunk: consecutive faults hit the
 * same small entry, and a bit costs nothing to clear. */
#define CHUNK_SHIFT 21
#define CHUNK_WORDS 8		/* 512 pages */
struct merged_key {
	__u32 tgid;
	__u32 pad;
	__u64 chunk;		/* address >> CHUNK_SHIFT */
};

struct merged_chunk {
	__u64 bits[CHUNK_WORDS];	/* bit (address >> 12) & 511 */
};

/* Indexes of the `stats` array. */
enum fault_stat {
	FS_NO_TABLE = 0,	/* faults of processes without a region table yet */
	FS_PROC_DROPS = 1,	/* process map full: not counted at all */
	FS_WALK_FAIL = 2,	/* page-table walk could not read an entry */
	FS_KERNEL_MODE = 3,	/* KSM COW taken in kernel mode (copy_to_user) */
	FS_MERGED_DROPS = 4,	/* merged-page set full (a chunk): that process checks every fault */
	FS_STALE = 5,		/* merged-page entries found stale at a fault */
	FS_NSTATS = 6,
};

#endif
