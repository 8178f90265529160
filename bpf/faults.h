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

/* Per process, written by BPF only. */
struct proc_faults {
	struct fault_counts total;
	struct fault_counts other;		/* outside every range of the table */
	struct fault_counts region[MAX_REGIONS];
};

/* Indexes of the `stats` array. */
enum fault_stat {
	FS_NO_TABLE = 0,	/* faults of processes without a region table yet */
	FS_PROC_DROPS = 1,	/* process map full: not counted at all */
	FS_WALK_FAIL = 2,	/* page-table walk could not read an entry */
	FS_KERNEL_MODE = 3,	/* KSM COW taken in kernel mode (copy_to_user) */
	FS_NSTATS = 4,
};

#endif
