/*
 * Remote madvise: make one syscall inside a running process that never asked.
 *
 * PTRACE_SEIZE + PTRACE_INTERRUPT stop one thread (madvise acts on the whole
 * mm, so one is enough; the others keep running). Its registers are saved,
 * RIP is pointed at an existing `syscall` instruction (found in the vDSO by
 * reading it, never written: other threads execute that code), one
 * single-step runs the syscall, and the registers are put back exactly.
 *
 * Why exactly: a thread stopped while blocked in a syscall is stopped inside
 * get_signal(), with rax = -ERESTARTSYS/-ERESTART_RESTARTBLOCK/... and
 * orig_rax = the syscall number. The kernel's restart logic
 * (arch_do_signal_or_restart) runs *after* get_signal() returns, on whatever
 * registers the tracer left. Restoring rax and orig_rax exactly lets it
 * restart the call (or return EINTR to a handler, as it would have), so a
 * sleep is not cut short and a read still gets its data. The injected
 * registers carry orig_rax = -1 so that this logic leaves them alone.
 *
 * Signals that arrive while we hold the thread are held back: the first is
 * delivered by the detach with its original siginfo, any more are re-sent
 * with tgkill (no fixed limit: under load dozens arrive in one injection).
 *
 * Until the registers are changed, giving up is free: the ptrace work runs in
 * a short-lived thread whose exit detaches the target (exit_ptrace) even when
 * it never stopped. Once the syscall runs we wait for it: abandoning it would
 * leave the target on foreign registers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#ifdef __x86_64__
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>

#define USER64_CS 0x33
#define MAX_RESTARTS 16

/*
 * Foreign signals dequeued while we hold the thread: the first goes back with
 * the detach (original siginfo), the rest are re-sent with tgkill (the
 * siginfo then names us: the kernel lets no one forge another sender). None
 * may be lost: a busy target under load can see dozens in one injection.
 */
struct held {
	int sig;
	siginfo_t info;
	int extra, extra_cap;
	int *extra_sig;
};

struct job {
	int tid;
	uint64_t addr, len;
	int advice;
	int timeout_ms;
	struct kn_inject_result *res;
	int rc;
	int thread_tid;
	struct held held; /* its storage is freed by the thread on every path */
};

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int tgid_of(int tid)
{
	char path[64], line[256];
	int tgid = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/status", tid);
	f = fopen(path, "re");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "Tgid: %d", &tgid) == 1)
			break;
	fclose(f);
	return tgid;
}

/* Address of a 0f 05 (syscall) in mapping [lo, hi) of pid, or 0. */
static uint64_t scan_for_syscall(int pid, uint64_t lo, uint64_t hi)
{
	unsigned char buf[65536];

	for (uint64_t va = lo; va < hi; va += sizeof(buf) - 1) {
		size_t len = hi - va < sizeof(buf) ? (size_t)(hi - va) : sizeof(buf);

		if (kn_read_remote(pid, va, buf, len) != 0)
			return 0;
		for (size_t i = 0; i + 1 < len; i++)
			if (buf[i] == 0x0f && buf[i + 1] == 0x05)
				return va + i;
		if (len < sizeof(buf))
			break;
	}
	return 0;
}

/* A syscall instruction in the vDSO, else in any other executable mapping. */
static uint64_t find_syscall_insn(int pid)
{
	char path[64], line[512];
	uint64_t found = 0;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/maps", pid);
	for (int pass = 0; pass < 2 && !found; pass++) {
		f = fopen(path, "re");
		if (!f)
			return 0;
		while (!found && fgets(line, sizeof(line), f)) {
			unsigned long long lo, hi;
			char perms[8] = "", name[256] = "";

			if (sscanf(line, "%llx-%llx %7s %*s %*s %*s %255s", &lo, &hi, perms, name) < 3)
				continue;
			if (perms[2] != 'x' || strcmp(name, "[vsyscall]") == 0)
				continue;
			if ((pass == 0) != (strcmp(name, "[vdso]") == 0))
				continue;
			found = scan_for_syscall(pid, lo, hi);
		}
		fclose(f);
	}
	return found;
}

/* waitpid with a deadline (0: none). Returns tid, -ETIMEDOUT or -ESRCH. */
static int wait_stop(int tid, int *status, uint64_t deadline)
{
	long nap = 10000; /* ns */

	for (;;) {
		int r = waitpid(tid, status, __WALL | (deadline ? WNOHANG : 0));

		if (r == tid) {
			if (WIFEXITED(*status) || WIFSIGNALED(*status))
				return -ESRCH;
			return r;
		}
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -ESRCH;
		if (mono_ns() >= deadline)
			return -ETIMEDOUT;
		{
			struct timespec ts = { 0, nap };

			nanosleep(&ts, NULL);
		}
		if (nap < 1000000)
			nap *= 2;
	}
}

static void hold_signal(int tid, int sig, struct held *h)
{
	if (!h->sig && ptrace(PTRACE_GETSIGINFO, tid, 0, &h->info) == 0) {
		h->sig = sig;
		return;
	}
	if (h->extra == h->extra_cap) {
		int ncap = h->extra_cap ? h->extra_cap * 2 : 16;
		int *n = realloc(h->extra_sig, sizeof(int) * (size_t)ncap);

		if (!n) {
			syscall(SYS_tgkill, tgid_of(tid), tid, sig); /* queued now: better early than lost */
			return;
		}
		h->extra_sig = n;
		h->extra_cap = ncap;
	}
	h->extra_sig[h->extra++] = sig;
}

/* Re-send what is still held (tgkill); the target gets it once it runs. */
static void release_held(int tid, struct held *h)
{
	int tgid = (h->sig || h->extra) ? tgid_of(tid) : -1;

	if (h->sig)
		syscall(SYS_tgkill, tgid, tid, h->sig);
	for (int i = 0; i < h->extra; i++)
		syscall(SYS_tgkill, tgid, tid, h->extra_sig[i]);
	h->sig = 0;
	h->extra = 0;
}

/* Detach; in a signal-delivery-stop the first held signal goes with it (original siginfo). */
static void detach(int tid, struct held *h, int in_signal_stop)
{
	int sig = 0;

	if (h->sig && in_signal_stop && ptrace(PTRACE_SETSIGINFO, tid, 0, &h->info) == 0) {
		sig = h->sig;
		h->sig = 0;
	}
	ptrace(PTRACE_DETACH, tid, 0, (void *)(long)sig);
	release_held(tid, h);
}

static int inject(struct job *j)
{
	struct kn_inject_result *res = j->res;
	struct user_regs_struct saved, regs;
	struct held *held = &j->held;
	uint64_t t0 = mono_ns(), sysaddr;
	int status, r, sig;

	/* Attach first: it is what refuses kernel threads and already-traced targets. */
	if (ptrace(PTRACE_SEIZE, j->tid, 0, 0) != 0)
		return -errno;
	sysaddr = find_syscall_insn(j->tid);
	if (!sysaddr)
		return tgid_of(j->tid) < 0 ? -ESRCH : -ENOENT; /* thread exit detaches */
	res->syscall_addr = sysaddr;
	if (ptrace(PTRACE_INTERRUPT, j->tid, 0, 0) != 0)
		return -errno; /* thread exit detaches */

	/* Until the stop: signals that come first are held, not lost. */
	for (;;) {
		r = wait_stop(j->tid, &status, t0 + (uint64_t)j->timeout_ms * 1000000ull);
		if (r < 0)
			return r; /* -ETIMEDOUT: nothing changed yet; our thread's exit detaches */
		if (!WIFSTOPPED(status))
			continue;
		if (status >> 16 == PTRACE_EVENT_STOP)
			break;
		hold_signal(j->tid, WSTOPSIG(status), held);
		if (ptrace(PTRACE_CONT, j->tid, 0, 0) != 0)
			return -ESRCH;
	}

	if (ptrace(PTRACE_GETREGS, j->tid, 0, &saved) != 0) {
		detach(j->tid, held, 0);
		return -ESRCH;
	}
	res->interrupted_rax = (int64_t)saved.rax;
	res->stop_kind = (int64_t)saved.orig_rax != -1;
	if (saved.cs != USER64_CS) {
		detach(j->tid, held, 0);
		return -ENOEXEC; /* a 32-bit process: other syscall numbers and ABI */
	}

	regs = saved;
	regs.rip = sysaddr;
	regs.rax = SYS_madvise;
	regs.orig_rax = (unsigned long long)-1; /* no restart logic on our registers */
	regs.rdi = j->addr;
	regs.rsi = j->len;
	regs.rdx = (unsigned long long)j->advice;

	for (int attempt = 0;; attempt++) {
		if (ptrace(PTRACE_SETREGS, j->tid, 0, &regs) != 0 ||
		    ptrace(PTRACE_SINGLESTEP, j->tid, 0, 0) != 0)
			return -ESRCH; /* only when it died: nothing left to restore */
		for (;;) {
			r = wait_stop(j->tid, &status, 0);
			if (r < 0)
				return r;
			sig = WSTOPSIG(status);
			if (status >> 16 == 0 && sig == SIGTRAP) {
				struct user_regs_struct now;
				siginfo_t si;

				if (ptrace(PTRACE_GETSIGINFO, j->tid, 0, &si) == 0 && si.si_code > 0 &&
				    ptrace(PTRACE_GETREGS, j->tid, 0, &now) == 0 && now.rip == sysaddr + 2) {
					res->ret = (int64_t)now.rax;
					break;
				}
			}
			if (status >> 16 == 0)
				hold_signal(j->tid, sig, held);
			/* A late interrupt or group stop, or a held signal: step on. */
			if (ptrace(PTRACE_SINGLESTEP, j->tid, 0, 0) != 0)
				return -ESRCH;
		}
		/* -ERESTART* (512..516): a signal cut the injected call short: run it again. */
		if (res->ret <= -512 && res->ret >= -516 && attempt < MAX_RESTARTS) {
			res->restarts++;
			continue;
		}
		break;
	}

	if (ptrace(PTRACE_SETREGS, j->tid, 0, &saved) != 0)
		return -ESRCH;
	res->signals_kept = (held->sig != 0) + held->extra;
	detach(j->tid, held, 1);
	res->elapsed_ns = (int64_t)(mono_ns() - t0);
	return 0;
}

static void *inject_thread(void *arg)
{
	struct job *j = arg;

	j->thread_tid = (int)syscall(SYS_gettid);
	j->rc = inject(j);
	/* Paths that gave up (timeout, target died) may still hold signals: queue them again
	 * (a tracee that never stopped is detached when this thread exits, and then gets them). */
	release_held(j->tid, &j->held);
	free(j->held.extra_sig);
	return NULL;
}

/* pthread_join() returns once the thread has left its memory (exit_mm), before
 * exit_ptrace() detaches a tracee it never stopped; seen under QEMU emulation.
 * Wait (1 s at most) until the thread is reaped, its /proc entry then gone. */
static void wait_reaped(int thread_tid)
{
	char path[64];

	snprintf(path, sizeof(path), "/proc/self/task/%d", thread_tid);
	for (int i = 0; i < 2000 && access(path, F_OK) == 0; i++)
		usleep(500);
}

int kn_inject_madvise(int tid, uint64_t addr, uint64_t len, int advice, int timeout_ms,
		      struct kn_inject_result *res)
{
	struct job j = { tid, addr, len, advice, timeout_ms > 0 ? timeout_ms : 1000, res, 0, { 0 } };
	pthread_t th;
	int err;

	memset(res, 0, sizeof(*res));
	if (tid <= 0)
		return -EINVAL;
	if (tid == getpid() || tgid_of(tid) == getpid())
		return -EDEADLK;
	err = pthread_create(&th, NULL, inject_thread, &j);
	if (err)
		return -err;
	pthread_join(th, NULL);
	if (j.rc < 0 && j.thread_tid > 0)
		wait_reaped(j.thread_tid); /* a failed injection may have left it attached */
	return j.rc;
}

#else /* !__x86_64__ */

int kn_inject_madvise(int tid, uint64_t addr, uint64_t len, int advice, int timeout_ms,
		      struct kn_inject_result *res)
{
	(void)tid, (void)addr, (void)len, (void)advice, (void)timeout_ms;
	memset(res, 0, sizeof(*res));
	return -ENOSYS;
}

#endif
