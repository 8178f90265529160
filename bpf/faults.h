/* Shared between bpf/faults.bpf.c and ksmtrace/probes/faults.py (ctypes mirrors).
 *
 * Every map the fault path reads is an array, and user space maps the arrays
 * (BPF_F_MMAPABLE) instead of copying them through syscalls. Arrays because a
 * hash lookup on the fault path cost ~8% of a copy-on-write fault in the
 * loops of bench/bench_probe_overhead.py, an array lookup (inlined by the
 * verifier) ~1%.
 */
#ifndef KSMTRACE_FAULTS_H
#define KSMTRACE_FAULTS_H

#ifndef MAX_REGIONS
#define MAX_REGIONS 32
#endif

struct fault_counts {
	__u64 wp;	/* write-protect faults (a copy or a reuse) */
	__u64 ksm_cow;	/* of which the faulting PTE mapped a KSM page */
};

/* One address range of a process that user space wants counted separately
 * (its mergeable VMAs, from smaps), with its counters beside the bounds: the
 * fault that finds its range bumps the same cache line. User space writes end
 * then start (start == 0: unused slot, and all after it); a slot keeps its
 * range until the process slot is freed, so counters never move between rows. */
struct region_counts {
	__u64 start;
	__u64 end;
	struct fault_counts n;
};

/* Per tracked process, in array `procs` at the slot that `slot_of[tgid]`
 * names. Header = one cache line (offsets for the mirror in faults.py):
 *   0 tgid  4 state  8 pgd  16 walk_all  20 has_merged  24 other (16)
 *   40 exited  44 pad */
struct proc_slot {
	__u32 tgid;			/* owner; 0: slot free */
	__u32 state;			/* PS_* */
	__u64 pgd;			/* cached mm->pgd (0: not read yet; reset on exec) */
	__u32 walk_all;			/* merged-page set incomplete: check every fault */
	__u32 has_merged;		/* some page of it entered the merged set */
	struct fault_counts other;	/* outside every range of the table */
	/* The process exited; user space frees the slot after reporting its
	 * last counts. A new process that gets the same pid before then takes
	 * a fresh slot (proc_track): counts never carry over to it. */
	__u32 exited;
	__u32 pad32;
	__u64 pad[2];
	struct region_counts region[MAX_REGIONS];
};

enum proc_state {
	PS_UNKNOWN = 0,		/* MMF_VM_MERGEABLE not read yet (or ksm_enter since) */
	PS_MERGEABLE = 1,
	PS_NOT_MERGEABLE = 2,	/* opted in and failed, or opted out: ignore its faults */
};

/* Pages of a process that ksmd merged (or that were KSM at start-up), one
 * bit per 4 KiB page of an aligned 2 MiB chunk, in a set-associative table:
 * `merged_tags[i]` names the chunk whose bits are `merged_bits[i]`; a chunk
 * lives in one bucket of MERGED_WAYS consecutive tags (one cache line),
 * chosen by a hash of its tag. A full bucket drops the chunk (counted) and
 * its process checks every fault instead: exact, slower. */
#define CHUNK_SHIFT 21
#define CHUNK_WORDS 8		/* 512 pages */
#define TAG_CHUNK_BITS 36	/* user addresses < 2^57 (5-level paging) */
/* tag = tgid << 36 | chunk; never 0 because tgid 0 is never tracked */

struct merged_chunk {
	__u64 bits[CHUNK_WORDS];	/* bit (address >> 12) & 511 */
};

/* Indexes of the `stats` array. */
enum fault_stat {
	FS_NO_TABLE = 0,	/* faults of processes without a region table yet */
	FS_PROC_DROPS = 1,	/* no free process slot (or pid beyond the table): not counted */
	FS_WALK_FAIL = 2,	/* page-table walk could not read an entry */
	FS_KERNEL_MODE = 3,	/* KSM COW taken in kernel mode (copy_to_user) */
	FS_MERGED_DROPS = 4,	/* merged-page set full (a chunk): that process checks every fault */
	FS_STALE = 5,		/* merged-page entries found stale at a fault */
	FS_COW_FAST = 6,	/* KSM COW counted from a merged-set hit (the fast path) */
	FS_COW_WALKED = 7,	/* KSM COW counted by checking every fault (walk_all, NO_KSM_TP) */
	FS_UNTRACKED = 8,	/* KSM COW of a process whose pid is beyond the table
				 * (pid_max raised after start): exact, not per process */
	FS_NSTATS = 9,
};

#endif
