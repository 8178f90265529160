/* Shared between bpf/faults.bpf.c and ksmtrace/probes/faults.py (ctypes mirrors). */
#ifndef KSMTRACE_FAULTS_H
#define KSMTRACE_FAULTS_H

/* Per process: write-protect faults of mergeable processes, and the subset
 * that hit a page that was a KSM page when the fault was taken. */
struct fault_counts {
	__u64 wp;	/* write-protect faults in an MMF_VM_MERGEABLE mm */
	__u64 ksm_cow;	/* of which the faulting PTE mapped a KSM page */
};

/* Per process and page bucket (address >> BUCKET_SHIFT). */
struct bucket_key {
	__u32 tgid;
	__u32 pad;
	__u64 bucket;
};

/* Indexes of the `stats` array. */
enum fault_stat {
	FS_BUCKET_DROPS = 0,	/* bucket map full: counted per process only */
	FS_PROC_DROPS = 1,	/* process map full: not counted at all */
	FS_WALK_FAIL = 2,	/* page-table walk could not read an entry */
	FS_KERNEL_MODE = 3,	/* KSM COW taken in kernel mode (copy_to_user) */
	FS_NSTATS = 4,
};

#endif
