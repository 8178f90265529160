/* KSM opt-in syscalls: madvise(MADV_[UN]MERGEABLE), prctl(PR_[SG]ET_MEMORY_MERGE)
 * and process_madvise with those advices.
 *
 * Entry stashes the arguments per thread (only calls that concern KSM, and
 * only callers passing the pid/comm/cgroup filters); exit joins them with the
 * result and writes ONE event per call to a ring buffer. Every field comes
 * from the tracepoints' own `args` or BPF helpers; the pidfd -> pid walk of
 * process_madvise uses offsets from the running kernel's BTF (-DOFF_*).
 * Forks and execs that carry an opt-in into a new mm are events too (end of
 * file): the only opt-ins a process gets without calling anything.
 *
 * Defines (all optional):
 *   FILTER_PIDS {a,b,..} with FILTER_NPIDS n   only these tgids
 *   FILTER_COMM, FILTER_COMM_LO, FILTER_COMM_HI  only this comm: its 16 bytes (at most
 *                                              15 and NUL padding) as two native u64
 *   FILTER_CGROUP id, FILTER_CGROUP_LEVEL l    only callers in cgroup v2 `id` or below it
 *   COUNT_ALL_MADVISE                          count every madvise entry passing the filters
 *   MAX_INFLIGHT n                             size of the per-tid hash
 *   RINGBUF_PAGES n                            ring buffer size in pages (power of two)
 *   OFF_*                                      BTF offsets: pidfd walk, task -> mm flags
 */
#include <uapi/linux/ptrace.h>
#include "optins.h"

#define MADV_MERGEABLE 12
#define MADV_UNMERGEABLE 13
#define PR_SET_MEMORY_MERGE 67
#define PR_GET_MEMORY_MERGE 68
/* include/uapi/linux/magic.h: pidfs superblock (6.9+); before 6.9 a pidfd
 * is an anonymous inode file named "[pidfd]" (anon_inode_getfile). */
#define PID_FS_MAGIC 0x50494446
#define ANON_INODE_FS_MAGIC 0x09041934
#define IOV_MAX_READ 8
/* What a tracepoint program returns decides whether the kernel still writes
 * the event to perf buffers and counters of the same tracepoint: 0 would
 * blind `perf stat -e syscalls:sys_enter_madvise` and every other perf user
 * of these events while ksmtrace runs. */
#define KEEP 1

#ifndef MAX_INFLIGHT
#define MAX_INFLIGHT 10240
#endif
/* Ring buffer size in pages (a power of two); 64 pages hold about 2,500 events. */
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 64
#endif

struct inflight {
	u64 ts_ns;
	u64 start;
	u64 length;
	u64 arg;
	u32 syscall;
	s32 op;
	s32 pidfd;
	u32 target_pid;
	u32 vlen;
};

struct iov {
	u64 base;
	u64 len;
};

BPF_HASH(inflight, u32, struct inflight, MAX_INFLIGHT);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_ARRAY(stats, u64, STAT_SLOTS);

static __always_inline void stat_add(int slot)
{
	u64 *v = stats.lookup(&slot);
	if (v)
		__sync_fetch_and_add(v, 1);
}

/* Keep a call's arguments, keyed by thread, until its sys_exit joins them. */
static __always_inline void stash(struct inflight *in)
{
	u32 tid = bpf_get_current_pid_tgid();

	in->ts_ns = bpf_ktime_get_ns();
	if (inflight.update(&tid, in))
		stat_add(STAT_INFLIGHT_FULL);
}

static __always_inline bool caller_wanted(void)
{
#ifdef FILTER_PIDS
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	const u32 pids[] = FILTER_PIDS;
	bool hit = false;
#pragma unroll
	for (int i = 0; i < FILTER_NPIDS; i++)
		if (pids[i] == tgid)
			hit = true;
	if (!hit)
		return false;
#endif
#ifdef FILTER_COMM
	{
		/* Two word compares, not a byte loop: clang turned the unrolled
		 * 16-byte loop into 16 independent branches, and the verifier walked
		 * every combination of them (2^16 paths) until it hit its 1M
		 * instruction limit (E2BIG) for any name of 15 characters. The
		 * helper NUL-pads the buffer, so the whole 16 bytes are defined. */
		u64 comm[OPTIN_COMM_LEN / 8] = {};
		bpf_get_current_comm(comm, sizeof(comm));
		if (comm[0] != FILTER_COMM_LO || comm[1] != FILTER_COMM_HI)
			return false;
	}
#endif
#ifdef FILTER_CGROUP
	if (bpf_get_current_ancestor_cgroup_id(FILTER_CGROUP_LEVEL) != FILTER_CGROUP)
		return false;
#endif
	return true;
}

/* The pid a pidfd of the calling task refers to, or 0 when it cannot be told
 * exactly: the fd is out of range or not a pidfd (a pidfs file, or before
 * 6.9 an anonymous inode file named "[pidfd]"). */
static __always_inline u32 pidfd_target(int fd)
{
#ifdef OFF_TASK_FILES
	char *task = (char *)bpf_get_current_task();
	char *files = 0, *fdt = 0, *file = 0, *inode = 0, *sb = 0, *pid = 0;
	char **fds = 0;
	u32 max_fds = 0;
	unsigned long magic = 0;
	int nr = 0;

	if (fd < 0)
		return 0;
	bpf_probe_read_kernel(&files, sizeof(files), task + OFF_TASK_FILES);
	if (!files)
		return 0;
	bpf_probe_read_kernel(&fdt, sizeof(fdt), files + OFF_FILES_FDT);
	if (!fdt)
		return 0;
	bpf_probe_read_kernel(&max_fds, sizeof(max_fds), fdt + OFF_FDT_MAX_FDS);
	if ((u32)fd >= max_fds)
		return 0;
	bpf_probe_read_kernel(&fds, sizeof(fds), fdt + OFF_FDT_FD);
	bpf_probe_read_kernel(&file, sizeof(file), fds + fd);
	if (!file)
		return 0;
	bpf_probe_read_kernel(&inode, sizeof(inode), file + OFF_FILE_INODE);
	if (!inode)
		return 0;
	bpf_probe_read_kernel(&sb, sizeof(sb), inode + OFF_INODE_SB);
	if (!sb)
		return 0;
	bpf_probe_read_kernel(&magic, sizeof(magic), sb + OFF_SB_MAGIC);
	if (magic == PID_FS_MAGIC) {
		/* pidfs keeps the struct pid in the inode (file_inode(file)->i_private) */
		bpf_probe_read_kernel(&pid, sizeof(pid), inode + OFF_INODE_PRIVATE);
	} else if (magic == ANON_INODE_FS_MAGIC) {
		/* Linux < 6.9: all anon files share one inode; the dentry name
		 * tells a pidfd, whose file->private_data is the struct pid. */
		const char want[8] = "[pidfd]";
		char name[8] = {}, *dentry = 0, *np = 0;
		bpf_probe_read_kernel(&dentry, sizeof(dentry), file + OFF_FILE_DENTRY);
		if (!dentry)
			return 0;
		bpf_probe_read_kernel(&np, sizeof(np), dentry + OFF_DENTRY_NAME);
		if (!np || bpf_probe_read_kernel(name, sizeof(name), np))
			return 0;
#pragma unroll
		for (int i = 0; i < sizeof(name); i++)
			if (name[i] != want[i])
				return 0;
		bpf_probe_read_kernel(&pid, sizeof(pid), file + OFF_FILE_PRIVATE);
	} else {
		return 0;
	}
	if (!pid)
		return 0;
	bpf_probe_read_kernel(&nr, sizeof(nr), pid + OFF_PID_NUMBERS + OFF_UPID_NR);
	return nr > 0 ? nr : 0;
#else
	return 0;
#endif
}

TRACEPOINT_PROBE(syscalls, sys_enter_madvise)
{
	int advice = args->behavior;
#ifdef COUNT_ALL_MADVISE
	if (caller_wanted())
		stat_add(STAT_MADVISE_ALL);
#endif
	if (advice != MADV_MERGEABLE && advice != MADV_UNMERGEABLE)
		return KEEP;
	if (!caller_wanted())
		return KEEP;
	struct inflight in = {};
	in.syscall = OPTIN_MADVISE;
	in.start = args->start;
	in.length = args->len_in;
	in.op = advice;
	in.pidfd = -1;
	stash(&in);
	return KEEP;
}

TRACEPOINT_PROBE(syscalls, sys_enter_prctl)
{
	int option = args->option;
	if (option != PR_SET_MEMORY_MERGE && option != PR_GET_MEMORY_MERGE)
		return KEEP;
	if (!caller_wanted())
		return KEEP;
	struct inflight in = {};
	in.syscall = OPTIN_PRCTL;
	in.op = option;
	in.arg = args->arg2;
	in.pidfd = -1;
	stash(&in);
	return KEEP;
}

TRACEPOINT_PROBE(syscalls, sys_enter_process_madvise)
{
	int advice = args->behavior;
	if (advice != MADV_MERGEABLE && advice != MADV_UNMERGEABLE)
		return KEEP;
	if (!caller_wanted())
		return KEEP;
	struct inflight in = {};
	in.syscall = OPTIN_PROCESS_MADVISE;
	in.op = advice;
	in.pidfd = args->pidfd;
	in.vlen = args->vlen;
	in.arg = args->flags;
	in.target_pid = pidfd_target(in.pidfd);
	/* The range: the first iovec's base, and the total length of the first
	 * IOV_MAX_READ iovecs (vlen says whether there were more). */
	const struct iov *vec = (const struct iov *)args->vec;
#pragma unroll
	for (int i = 0; i < IOV_MAX_READ; i++) {
		struct iov v = {};
		if (i >= in.vlen)
			break;
		if (bpf_probe_read_user(&v, sizeof(v), &vec[i]))
			break;
		if (i == 0)
			in.start = v.base;
		in.length += v.len;
	}
	stash(&in);
	return KEEP;
}

static __always_inline int emit(long ret)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = id;
	struct inflight *in = inflight.lookup(&tid);
	if (!in)
		return 0;
	struct optin_event *e = events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		stat_add(STAT_LOST);
		inflight.delete(&tid);
		return 0;
	}
	u64 now = bpf_ktime_get_ns();
	e->ts_ns = in->ts_ns;
	e->lat_ns = now - in->ts_ns;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->start = in->start;
	e->length = in->length;
	e->ret = ret;
	e->arg = in->arg;
	e->pid = id >> 32;
	e->tid = tid;
	e->uid = bpf_get_current_uid_gid();
	e->syscall = in->syscall;
	e->op = in->op;
	e->pidfd = in->pidfd;
	e->target_pid = in->target_pid;
	e->vlen = in->vlen;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	events.ringbuf_submit(e, 0);
	inflight.delete(&tid);
	stat_add(STAT_EMITTED);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_madvise)
{
	emit(args->ret);
	return KEEP;
}

TRACEPOINT_PROBE(syscalls, sys_exit_prctl)
{
	emit(args->ret);
	return KEEP;
}

TRACEPOINT_PROBE(syscalls, sys_exit_process_madvise)
{
	emit(args->ret);
	return KEEP;
}

/* Inherited opt-ins. MMF_* bit numbers of include/linux/mm_types.h (6.4..6.18,
 * where mm->flags became a bitmap whose first word keeps them): they are
 * #defines, absent from BTF, so a system test checks them against a real
 * prctl'd process. */
#define MMF_VM_MERGEABLE 16
#define MMF_VM_MERGE_ANY 30

#ifdef OFF_TASK_MM
static __always_inline u64 mm_inherit_bits(char *task)
{
	char *mm = 0;
	u64 flags = 0, bits = 0;
	bpf_probe_read_kernel(&mm, sizeof(mm), task + OFF_TASK_MM);
	if (!mm)
		return 0;
	bpf_probe_read_kernel(&flags, sizeof(flags), mm + OFF_MM_FLAGS);
	if (flags & (1ULL << MMF_VM_MERGEABLE))
		bits |= INHERIT_MERGEABLE;
	if (flags & (1ULL << MMF_VM_MERGE_ANY))
		bits |= INHERIT_MERGE_ANY;
	return bits;
}

static __always_inline void emit_inherit(u32 kind, u32 pid, u32 tid, u32 from, u64 bits)
{
	struct optin_event *e = events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		stat_add(STAT_LOST);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->arg = bits;
	e->pid = pid;
	e->tid = tid;
	e->uid = bpf_get_current_uid_gid();
	e->syscall = kind;
	e->pidfd = -1;
	e->target_pid = from;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	events.ringbuf_submit(e, 0);
	stat_add(STAT_EMITTED);
}

/* Raw tracepoint for the task pointers: only a new process (not a thread, not
 * a CLONE_VM child sharing the parent's mm) inherits anything. Runs in the
 * parent; the child's mm is complete (dup_mmap ran ksm_fork). */
RAW_TRACEPOINT_PROBE(sched_process_fork)
{
	char *parent = (char *)ctx->args[0];
	char *child = (char *)ctx->args[1];
	u32 pid = 0, tgid = 0;
	char *pmm = 0, *cmm = 0;
	bpf_probe_read_kernel(&pid, sizeof(pid), child + OFF_TASK_PID);
	bpf_probe_read_kernel(&tgid, sizeof(tgid), child + OFF_TASK_TGID);
	if (pid != tgid)
		return KEEP;
	bpf_probe_read_kernel(&pmm, sizeof(pmm), parent + OFF_TASK_MM);
	bpf_probe_read_kernel(&cmm, sizeof(cmm), child + OFF_TASK_MM);
	if (!cmm || cmm == pmm)
		return KEEP;
	u64 bits = mm_inherit_bits(child);
	if (!bits || !caller_wanted())
		return KEEP;
	emit_inherit(OPTIN_FORK, tgid, pid, bpf_get_current_pid_tgid() >> 32, bits);
	return KEEP;
}

/* After exec the task runs on a new mm: only merge_any survives (ksm_execve). */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
	u64 bits = mm_inherit_bits((char *)bpf_get_current_task());
	if (!(bits & INHERIT_MERGE_ANY) || !caller_wanted())
		return KEEP;
	u64 id = bpf_get_current_pid_tgid();
	emit_inherit(OPTIN_EXEC, id >> 32, (u32)id, args->old_pid, bits);
	return KEEP;
}
#endif
