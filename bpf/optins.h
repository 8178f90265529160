/* Event of bpf/optins.bpf.c: one per KSM opt-in syscall, written on syscall exit.
 *
 * Shared with ksmtrace/probes/optins.py, which declares the same layout once
 * as a ctypes structure: keep the two in step (offsets are in the comments).
 */
#ifndef KSMTRACE_OPTINS_H
#define KSMTRACE_OPTINS_H

#define OPTIN_MADVISE 1
#define OPTIN_PRCTL 2
#define OPTIN_PROCESS_MADVISE 3
/* Inherited, not called: a fork copied a mergeable mm; an exec kept merge_any. */
#define OPTIN_FORK 4
#define OPTIN_EXEC 5

/* Slots of the `stats` array map. */
#define STAT_LOST 0          /* ring buffer full: event dropped */
#define STAT_INFLIGHT_FULL 1 /* per-tid hash full: call not followed */
#define STAT_MADVISE_ALL 2   /* every madvise entry passing pid/comm/cgroup filters (COUNT_ALL_MADVISE) */
#define STAT_EMITTED 3       /* events written to the ring buffer */
#define STAT_SLOTS 4

#define OPTIN_COMM_LEN 16

/* arg bits of OPTIN_FORK / OPTIN_EXEC events */
#define INHERIT_MERGEABLE 1 /* the mm has mergeable VMAs (MMF_VM_MERGEABLE) */
#define INHERIT_MERGE_ANY 2 /* whole process (MMF_VM_MERGE_ANY) */

struct optin_event {
	u64 ts_ns;       /*  0: bpf_ktime_get_ns() at syscall entry (CLOCK_MONOTONIC) */
	u64 lat_ns;      /*  8: entry to exit */
	u64 cgroup_id;   /* 16: cgroup v2 id of the caller */
	u64 start;       /* 24: madvise start, or the first iovec's base */
	u64 length;      /* 32: madvise length, or the sum of the first iovecs' lengths */
	s64 ret;         /* 40: syscall return value (-errno on failure); 0 for fork/exec */
	u64 arg;         /* 48: prctl arg2 (PR_SET_MEMORY_MERGE: 1 on, 0 off); fork/exec: INHERIT_* bits */
	u32 pid;         /* 56: tgid */
	u32 tid;         /* 60 */
	u32 uid;         /* 64 */
	u32 syscall;     /* 68: OPTIN_* */
	s32 op;          /* 72: madvise advice or prctl option */
	s32 pidfd;       /* 76: process_madvise target pidfd, else -1 */
	u32 target_pid;  /* 80: pid the pidfd refers to (0: unknown); fork: parent; exec: old pid */
	u32 vlen;        /* 84: process_madvise iovec count */
	char comm[OPTIN_COMM_LEN]; /* 88 */
};                   /* 104 bytes */

#endif
