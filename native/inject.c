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
 * delivered by the detach with its original siginfo, any more are queued again
 * with their siginfo where the kernel allows it (see resend), else by tgkill
 * (no fixed limit: under load dozens arrive in one injection).
 *
 * A compat (32-bit) task is recognised by its regset once stopped, and let go.
 *
 * The target may die, exit the chosen thread or exec at any moment. Exec and
 * exit are traced (PTRACE_O_TRACEEXEC/TRACEEXIT), so neither can happen
 * unseen while we are attached: an exec stop means the addresses we were given
 * belong to a program that no longer exists (-ESTALE, nothing done); an exit
 * stop means the thread is going (-ESRCH: the caller may pick another one).
 * The caller's view of the target (its image id, see kn_image_id) is compared
 * after the attach, which closes the window between its checks and our attach.
 *
 * Until the registers are changed, giving up is free: the ptrace work runs in
 * a short-lived thread whose exit detaches the target (exit_ptrace) even when
 * it never stopped. Once the syscall runs we wait for it: abandoning it would
 * leave the target on foreign registers.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#ifdef __x86_64__
#include <sys/auxv.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>

#define USER64_CS 0x33
#define MAX_RESTARTS 16

/*
 * Foreign signals dequeued while we hold the thread: the first goes back with
 * the detach (original siginfo), the rest are queued again (see resend). None
 * may be lost: a busy target under load can see dozens in one injection.
 */
struct held {
	int sig;
	siginfo_t info;
	int extra, extra_cap;
	siginfo_t *extra_info; /* si_signo says which */
};

struct job {
	int tid;
	uint64_t addr, len;
	int advice;
	int timeout_ms;
	uint64_t image;
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

/* /proc/TID/stat read into line; returns the ')' that ends the comm (the
 * fields follow it), or NULL when the task is gone. */
static char *read_stat(int tid, char *line, size_t size)
{
	char path[64], *p;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/stat", tid);
	f = fopen(path, "re");
	if (!f)
		return NULL;
	p = fgets(line, (int)size, f) ? strrchr(line, ')') : NULL;
	fclose(f);
	return p;
}

/* The state letter of /proc/TID/stat ('R', 'S', 'Z', ...), or 0 when it is gone. */
static char task_state(int tid)
{
	char line[512], *p = read_stat(tid, line, sizeof(line));

	return p && p[1] == ' ' ? p[2] : 0;
}

/* Dead, a zombie, or exiting (its memory already gone): nothing to inject into. */
static int task_gone(int tid)
{
	char st = task_state(tid);

	return st == 0 || st == 'Z' || st == 'X' || st == 'x';
}

/*
 * A number that changes when the process behind tid executes a new program
 * (or the pid is reused): the layout fields of /proc/TID/stat (code, stack,
 * argument and environment addresses) are those of the mm, and ASLR moves
 * them on every exec. 0 when the task has no mm (exiting) or is gone.
 */
static uint64_t image_id(int tid)
{
	/* 1-based field numbers of /proc/PID/stat (proc(5)) */
	static const int fields[] = { 26, 27, 28, 45, 46, 47, 48, 49, 50, 51 };
	char line[1024], *save = NULL, *p = read_stat(tid, line, sizeof(line));
	uint64_t h = 1469598103934665603ull, any = 0;
	size_t k = 0;

	if (!p)
		return 0;
	/* after ") " comes field 3 */
	p = strtok_r(p + 1, " \n", &save);
	for (int field = 3; p && k < sizeof(fields) / sizeof(fields[0]); field++) {
		if (field == fields[k]) {
			uint64_t v = strtoull(p, NULL, 10);

			any |= v;
			h = (h ^ v) * 1099511628211ull;
			k++;
		}
		p = strtok_r(NULL, " \n", &save);
	}
	return any && k == sizeof(fields) / sizeof(fields[0]) ? (h ? h : 1) : 0;
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

/*
 * The vDSO's syscall instruction, found through the aux vector (AT_SYSINFO_EHDR) and
 * the vDSO's own ELF program headers, or 0. Much cheaper than /proc/PID/maps, which
 * the kernel writes out mapping by mapping (~80 us of the target's time otherwise).
 */
static uint64_t vdso_syscall_insn(int pid)
{
	unsigned char page[4096];
	uint64_t aux[2], base = 0;
	char path[64];
	Elf64_Ehdr eh;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/auxv", pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	while (read(fd, aux, sizeof(aux)) == (ssize_t)sizeof(aux) && aux[0] != AT_NULL)
		if (aux[0] == AT_SYSINFO_EHDR)
			base = aux[1];
	close(fd);
	if (!base || kn_read_remote(pid, base, page, sizeof(page)) != 0)
		return 0;
	memcpy(&eh, page, sizeof(eh));
	if (memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0 || eh.e_ident[EI_CLASS] != ELFCLASS64 ||
	    eh.e_phentsize != sizeof(Elf64_Phdr) || eh.e_phoff + (uint64_t)eh.e_phnum * sizeof(Elf64_Phdr) > sizeof(page))
		return 0;
	for (int i = 0; i < eh.e_phnum; i++) {
		Elf64_Phdr ph;

		memcpy(&ph, page + eh.e_phoff + (size_t)i * sizeof(ph), sizeof(ph));
		/* The vDSO is linked at 0: its executable segment is at base + p_vaddr. */
		if (ph.p_type == PT_LOAD && (ph.p_flags & PF_X) && ph.p_memsz && ph.p_memsz < (1u << 20))
			return scan_for_syscall(pid, base + ph.p_vaddr, base + ph.p_vaddr + ph.p_filesz);
	}
	return 0;
}

/* A syscall instruction in the vDSO, else in any other executable mapping. */
static uint64_t find_syscall_insn(int pid)
{
	char path[64], line[512];
	uint64_t found = vdso_syscall_insn(pid);
	FILE *f;

	if (found)
		return found;

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

/*
 * The next stop of tid, as a waitpid status, with a deadline (0: none). Returns tid,
 * -ETIMEDOUT, or -ESRCH when it died (or is no longer ours: an exec by another thread
 * releases a traced leader silently).
 *
 * A death is only looked at (WNOWAIT), never reaped: reaping a traced zombie whose
 * parent is the process calling us (a test, a benchmark, a launcher that injects into
 * its own child) takes its exit status away from that parent, whose wait() then gets
 * ECHILD (Python's subprocess reports exit code 0 for a SIGKILLed child). Left alone,
 * the zombie goes back to its parent when our thread exits (exit_ptrace).
 */
static int wait_stop(int tid, int *status, uint64_t deadline)
{
	/* Polled with naps (a blocking wait cannot time out): 10 us ones for the first
	 * 2 ms, since every nap past the stop is time the target spends stopped, then
	 * longer ones for a target that does not stop soon (those rarely stop at all). */
	long nap = 10000; /* ns */
	uint64_t relax = mono_ns() + 2000000;

	for (;;) {
		siginfo_t si;
		int r;

		/* A stop is taken at once (WSTOPPED without WEXITED cannot reap). */
		si.si_pid = 0;
		r = waitid(P_PID, (id_t)tid, &si, WSTOPPED | __WALL | WNOHANG);
		if (r == 0 && si.si_pid == tid) {
			/* si_status is the stop's exit_code: signal | event << 8, as in waitpid */
			*status = (si.si_status << 8) | 0x7f;
			return tid;
		}
		if (r < 0 && errno != EINTR)
			return -ESRCH;
		/* Nothing yet: wait for a stop or a death without consuming either. */
		si.si_pid = 0;
		r = waitid(P_PID, (id_t)tid, &si, WEXITED | WSTOPPED | WNOWAIT | __WALL | (deadline ? WNOHANG : 0));
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -ESRCH;
		if (si.si_pid == tid) {
			if (si.si_code == CLD_EXITED || si.si_code == CLD_KILLED || si.si_code == CLD_DUMPED)
				return -ESRCH;
			continue; /* a stop: taken above */
		}
		if (mono_ns() >= deadline)
			return -ETIMEDOUT;
		{
			struct timespec ts = { 0, nap };

			nanosleep(&ts, NULL);
		}
		if (nap < 500000 && mono_ns() > relax)
			nap *= 2;
	}
}

static void hold_signal(int tid, int sig, struct held *h)
{
	siginfo_t info;

	if (ptrace(PTRACE_GETSIGINFO, tid, 0, &info) != 0) {
		memset(&info, 0, sizeof(info)); /* si_code 0: re-sent by plain tgkill */
		info.si_signo = sig;
	}
	if (!h->sig) {
		h->sig = sig;
		h->info = info;
		return;
	}
	if (h->extra == h->extra_cap) {
		int ncap = h->extra_cap ? h->extra_cap * 2 : 16;
		siginfo_t *n = realloc(h->extra_info, sizeof(siginfo_t) * (size_t)ncap);

		if (!n) {
			syscall(SYS_tgkill, tgid_of(tid), tid, sig); /* queued now: better early than lost */
			return;
		}
		h->extra_info = n;
		h->extra_cap = ncap;
	}
	info.si_signo = sig;
	h->extra_info[h->extra++] = info;
}

/*
 * Queue a held signal again. Where the kernel lets us queue the original siginfo
 * (si_code < 0 but not SI_TKILL: sigqueue(), POSIX timers, mq_notify) it is kept, so
 * an RT signal's payload (si_value) and sender survive; seen lost under load before,
 * when every extra went by tgkill. Signals from kill() and the kernel (si_code >= 0)
 * may not be forged by anyone: those go by tgkill, which keeps the signal but names
 * us as its sender.
 */
static void resend(int tgid, int tid, int to_process, int sig, siginfo_t *info)
{
	if (info->si_code < 0 && info->si_code != SI_TKILL) {
		long r = to_process ? syscall(SYS_rt_sigqueueinfo, tgid, sig, info)
				    : syscall(SYS_rt_tgsigqueueinfo, tgid, tid, sig, info);

		if (r == 0)
			return;
	}
	if (to_process)
		kill(tgid, sig);
	else
		syscall(SYS_tgkill, tgid, tid, sig);
}

/* Re-send what is still held; the target gets it once it runs. A thread that is
 * exiting would take them with it: then they go to the process (any thread takes
 * them), which is all a process-directed signal asked for. */
static void release_held(int tid, struct held *h, int to_process)
{
	int tgid = (h->sig || h->extra) ? tgid_of(tid) : -1;

	if (tgid >= 0) {
		if (h->sig)
			resend(tgid, tid, to_process, h->sig, &h->info);
		for (int i = 0; i < h->extra; i++)
			resend(tgid, tid, to_process, h->extra_info[i].si_signo, &h->extra_info[i]);
	} /* else gone: nobody left to deliver to */
	h->sig = 0;
	h->extra = 0;
}

/* Detach; in a signal-delivery-stop the first held signal goes with it (original siginfo). */
static void detach(int tid, struct held *h, int in_signal_stop, int exiting)
{
	int sig = 0;

	if (h->sig && in_signal_stop && ptrace(PTRACE_SETSIGINFO, tid, 0, &h->info) == 0) {
		sig = h->sig;
		h->sig = 0;
	}
	ptrace(PTRACE_DETACH, tid, 0, (void *)(long)sig);
	release_held(tid, h, exiting);
}

/*
 * The stopped thread is a 64-bit task running 64-bit code. The general regset the
 * kernel keeps for it is 32-bit (68 bytes, not 216) for a compat task (an i386
 * program): its syscalls take other numbers and registers. A 64-bit program running
 * 32-bit code at the moment has a compat code segment.
 */
static int is_64bit_task(int tid, const struct user_regs_struct *regs)
{
	struct user_regs_struct r;
	struct iovec iov = { &r, sizeof(r) };

	if (ptrace(PTRACE_GETREGSET, tid, (void *)NT_PRSTATUS, &iov) != 0)
		return -1; /* died since the stop: not a statement about its ABI */
	return iov.iov_len == sizeof(r) && regs->cs == USER64_CS;
}

/* Two bytes at addr of tid are a syscall instruction (read, never written). */
static int is_syscall_insn(int tid, uint64_t addr)
{
	unsigned char b[2];

	return kn_read_remote(tid, addr, b, 2) == 0 && b[0] == 0x0f && b[1] == 0x05;
}

/* Our single step faulted on the borrowed instruction (a synchronous, kernel-made signal
 * at its address): the mapping changed under us. Any other signal is the target's. */
static int step_faulted(int tid, int sig, uint64_t sysaddr)
{
	struct user_regs_struct now;
	siginfo_t si;

	if (sig != SIGSEGV && sig != SIGBUS && sig != SIGILL)
		return 0;
	return ptrace(PTRACE_GETSIGINFO, tid, 0, &si) == 0 && si.si_code > 0 &&
	       ptrace(PTRACE_GETREGS, tid, 0, &now) == 0 && now.rip == sysaddr;
}

/* A SIGSYS that seccomp raised for the syscall at sysaddr, i.e. for our madvise. */
static int our_seccomp_trap(int tid, int sig, uint64_t sysaddr)
{
	siginfo_t si;

	if (sig != SIGSYS || ptrace(PTRACE_GETSIGINFO, tid, 0, &si) != 0)
		return 0;
	return si.si_code == 1 /* SYS_SECCOMP */ && si.si_syscall == SYS_madvise &&
	       (uint64_t)(uintptr_t)si.si_call_addr == sysaddr + 2;
}

static int inject(struct job *j)
{
	struct kn_inject_result *res = j->res;
	struct user_regs_struct saved, regs;
	struct held *held = &j->held;
	uint64_t t0 = mono_ns(), t_int = 0, t_stop = 0, t_step, sysaddr;
	int status, r, sig, event;

	/* Attach first: it is what refuses kernel threads and already-traced targets. Exec and
	 * exit stop the thread from now on, so neither can slip by unseen. */
	if (ptrace(PTRACE_SEIZE, j->tid, 0, (void *)(long)(PTRACE_O_TRACEEXEC | PTRACE_O_TRACEEXIT)) != 0)
		return -errno;
	/* An exec from now on stops this thread (or kills it, when another thread execs):
	 * comparing the image once here covers the caller's checks up to the syscall. */
	if (j->image) {
		uint64_t now = image_id(j->tid);

		if (!now)
			return -ESRCH; /* no mm: exiting; our thread's exit detaches */
		if (now != j->image)
			return -ESTALE;
	}
	/* Looked for while the target runs, to keep the stop short. None found may only mean
	 * that it is dying (SIGKILLed: memory already going, /proc still says running): the
	 * stop below tells, and the search is made again on the stopped thread. */
	sysaddr = find_syscall_insn(j->tid);
	res->syscall_addr = sysaddr;
	t_int = mono_ns();
	if (ptrace(PTRACE_INTERRUPT, j->tid, 0, 0) != 0)
		return -errno; /* thread exit detaches */

	/* Until the stop: signals that come first are held, not lost. */
	for (;;) {
		r = wait_stop(j->tid, &status, t0 + (uint64_t)j->timeout_ms * 1000000ull);
		if (r < 0)
			return r; /* -ETIMEDOUT: nothing changed yet; our thread's exit detaches */
		if (!WIFSTOPPED(status))
			continue;
		event = status >> 16;
		if (event == PTRACE_EVENT_STOP)
			break;
		if (event == PTRACE_EVENT_EXEC || event == PTRACE_EVENT_EXIT) {
			/* A new program (our addresses mean nothing there) or a leaving thread:
			 * let it go on untouched. */
			detach(j->tid, held, 0, event == PTRACE_EVENT_EXIT);
			return event == PTRACE_EVENT_EXEC ? -ESTALE : -ESRCH;
		}
		if (event == 0)
			hold_signal(j->tid, WSTOPSIG(status), held);
		if (ptrace(PTRACE_CONT, j->tid, 0, 0) != 0)
			return -ESRCH;
	}

	t_stop = mono_ns();
	res->stop_wait_ns = (int64_t)(t_stop - t_int);
	if (ptrace(PTRACE_GETREGS, j->tid, 0, &saved) != 0) {
		detach(j->tid, held, 0, 0);
		return -ESRCH;
	}
	res->interrupted_rax = (int64_t)saved.rax;
	res->stop_kind = (int64_t)saved.orig_rax != -1;
	r = is_64bit_task(j->tid, &saved);
	if (r <= 0) {
		detach(j->tid, held, 0, 0);
		return r < 0 ? -ESRCH : -ENOEXEC; /* a compat task: other registers, syscall numbers */
	}
	/* Found before the stop, while the target ran: still there? (A remapped vDSO, say.) */
	if (!sysaddr || !is_syscall_insn(j->tid, sysaddr)) {
		sysaddr = find_syscall_insn(j->tid);
		res->syscall_addr = sysaddr;
		if (!sysaddr) {
			int gone = task_gone(j->tid);

			detach(j->tid, held, 0, 0);
			return gone ? -ESRCH : -ENOENT;
		}
	}

	regs = saved;
	regs.rip = sysaddr;
	regs.rax = SYS_madvise;
	regs.orig_rax = (unsigned long long)-1; /* no restart logic on our registers */
	regs.rdi = j->addr;
	regs.rsi = j->len;
	regs.rdx = (unsigned long long)j->advice;

	t_step = mono_ns();
	for (int attempt = 0;; attempt++) {
		if (ptrace(PTRACE_SETREGS, j->tid, 0, &regs) != 0 ||
		    ptrace(PTRACE_SINGLESTEP, j->tid, 0, 0) != 0)
			return -ESRCH; /* only when it died: nothing left to restore */
		for (;;) {
			r = wait_stop(j->tid, &status, 0);
			if (r < 0)
				return r;
			sig = WSTOPSIG(status);
			event = status >> 16;
			if (event == 0 && sig == SIGTRAP) {
				struct user_regs_struct now;
				siginfo_t si;

				if (ptrace(PTRACE_GETSIGINFO, j->tid, 0, &si) == 0 && si.si_code > 0 &&
				    ptrace(PTRACE_GETREGS, j->tid, 0, &now) == 0 && now.rip == sysaddr + 2) {
					res->ret = (int64_t)now.rax;
					break;
				}
			}
			if (event == PTRACE_EVENT_EXIT || event == PTRACE_EVENT_EXEC) {
				/* Cannot come from madvise; whatever made it, the old registers
				 * mean nothing to a leaving thread or a new program. */
				detach(j->tid, held, 0, event == PTRACE_EVENT_EXIT);
				return event == PTRACE_EVENT_EXEC ? -ESTALE : -ESRCH;
			}
			if (event == 0 && step_faulted(j->tid, sig, sysaddr)) {
				/* Stepping again would fault again, forever: put everything back,
				 * drop our own fault, and say so. */
				if (ptrace(PTRACE_SETREGS, j->tid, 0, &saved) != 0)
					return -ESRCH;
				detach(j->tid, held, 0, 0);
				return -EFAULT;
			}
			if (event == 0 && our_seccomp_trap(j->tid, sig, sysaddr)) {
				/* A seccomp filter trapped our madvise: the SIGSYS is ours, not the
				 * target's (its handler would meet a syscall it never made). Drop it;
				 * the step trap follows. */
				res->seccomp_trapped = 1;
				if (ptrace(PTRACE_SINGLESTEP, j->tid, 0, 0) != 0)
					return -ESRCH;
				continue;
			}
			if (event == 0)
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

	res->syscall_ns = (int64_t)(mono_ns() - t_step);
	if (res->seccomp_trapped)
		res->ret = -ENOSYS; /* it never ran: rax still holds the number we put there */
	if (ptrace(PTRACE_SETREGS, j->tid, 0, &saved) != 0)
		return -ESRCH;
	res->signals_kept = (held->sig != 0) + held->extra;
	detach(j->tid, held, 1, 0);
	res->elapsed_ns = (int64_t)(mono_ns() - t0);
	res->held_ns = (int64_t)(mono_ns() - t_stop);
	return 0;
}

static void *inject_thread(void *arg)
{
	struct job *j = arg;

	j->thread_tid = (int)syscall(SYS_gettid);
	/* wait_stop naps a few microseconds at a time; the default 50 us timer slack would
	 * stretch every nap (and the target's stop) by that much. This thread only. */
	prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
	j->rc = inject(j);
	/* Paths that gave up (timeout, target died) may still hold signals: queue them again
	 * (a tracee that never stopped is detached when this thread exits, and then gets them). */
	release_held(j->tid, &j->held, task_gone(j->tid));
	free(j->held.extra_info);
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

uint64_t kn_image_id(int tid)
{
	return image_id(tid);
}

int kn_inject_madvise(int tid, uint64_t addr, uint64_t len, int advice, int timeout_ms, uint64_t image,
		      struct kn_inject_result *res)
{
	struct job j = { tid, addr, len, advice, timeout_ms > 0 ? timeout_ms : 1000, image, res, 0, 0, { 0 } };
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

uint64_t kn_image_id(int tid)
{
	(void)tid;
	return 0;
}

int kn_inject_madvise(int tid, uint64_t addr, uint64_t len, int advice, int timeout_ms, uint64_t image,
		      struct kn_inject_result *res)
{
	(void)tid, (void)addr, (void)len, (void)advice, (void)timeout_ms, (void)image;
	memset(res, 0, sizeof(*res));
	return -ENOSYS;
}

#endif
