/*
 * A target for the ptrace injection stress test: it checks itself.
 *
 *   injtarget MODE SECONDS [DELAY_US]
 *
 * Prints "ready ADDR LEN" (a private anonymous buffer to madvise), runs for
 * SECONDS or until SIGTERM and prints one JSON line of what it saw; exits 0
 * iff no errors.
 *   busy:    recomputes the buffer's checksum and a register-heavy chain
 *   sleep:   nanosleep of random lengths; a sleep that ends early is an error
 *   pipe:    reads sequence-numbered records a child writes at random moments
 *   threads: two busy threads, a sleeping one and a pipe reader; main in join
 *   vfork:   the parent waits (killable, not interruptible) for a vfork child
 * Failure-path modes (the injection must fail in words, or succeed):
 *   churn:     the main thread exits at once; chains of threads living 0.2-3 ms
 *              each start their successor and exit, until SECONDS are up
 *   diekill:   sleeps like `sleep`; after DELAY_US a thread SIGKILLs the process
 *   dieexit:   the same, but a thread calls exit_group(0) (a normal exit)
 *   exec:      spins on the clock, and after DELAY_US execs itself as `sleep SECONDS`
 *   threadexec: sleeps like `sleep`; after DELAY_US another thread execs `sleep SECONDS`
 *              (both exec modes start counting DELAY_US once a line is read on stdin,
 *              so that the test can look at the old program first)
 *   dieafter:  sleeps; a thread watches /proc/self/ksm_stat and exits the process
 *              the moment the process has become mergeable (one madvise done)
 *   seccomp:   busy, under a seccomp filter that traps madvise (SIGSYS; its handler
 *              counts it as an error: this program never calls madvise)
 *   strict:    busy, in seccomp strict mode (only read/write/exit/sigreturn)
 * SIGRTMIN (queued, never merged) is counted, so a lost signal shows, and when it was
 * sent with sigqueue() its payload is checked; SIGUSR1 and SIGCHLD (standard, so they
 * coalesce) are counted too.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BUF_PAGES 512
#define REC 64

static unsigned char *buf;
static uint64_t expected;
static double deadline;
static volatile sig_atomic_t stopping; /* SIGTERM: finish and report */
static atomic_long errors, checks, sleeps, short_sleeps, records, signals_seen, usr1_seen, chld_seen;
static atomic_long threads_started;
static pid_t my_pid;
static char *self_exe_secs; /* SECONDS as given, for the exec modes */
static long delay_us;
static char first_error[160];
static pthread_mutex_t err_lock = PTHREAD_MUTEX_INITIALIZER;

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void error(const char *what, long a, long b)
{
	pthread_mutex_lock(&err_lock);
	if (!errors)
		snprintf(first_error, sizeof(first_error), "%s (%ld, %ld)", what, a, b);
	errors++;
	pthread_mutex_unlock(&err_lock);
}

/* Payload every sigqueue()d SIGRTMIN carries (the benchmark's sender): a signal held
 * back during an injection and sent again must arrive with it, not with zeros. */
#define PAYLOAD_MAGIC 0x5a5a0000
static atomic_long payloads_seen;

static void on_rt(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)uc;
	signals_seen++;
	if (si->si_code == SI_QUEUE) {
		payloads_seen++;
		if ((si->si_value.sival_int & 0xffff0000) != PAYLOAD_MAGIC)
			error("queued signal lost its payload (value, code)", si->si_value.sival_int, si->si_code);
	}
}

static void on_sig(int sig)
{
	if (sig == SIGUSR1)
		usr1_seen++;
	else if (sig == SIGCHLD)
		chld_seen++;
	else
		signals_seen++;
}

static volatile pid_t writer_pid;

static void on_term(int sig)
{
	(void)sig;
	stopping = 1;
	if (writer_pid > 0)
		kill(writer_pid, SIGTERM); /* it stops writing; the reader then sees EOF */
}

static int running(void)
{
	return !stopping && now() < deadline;
}

static uint64_t checksum(void)
{
	const uint64_t *w = (const uint64_t *)buf;
	uint64_t h = 1469598103934665603ull;

	for (size_t i = 0; i < BUF_PAGES * 4096 / 8; i++)
		h = (h ^ w[i]) * 1099511628211ull;
	return h;
}

static uint64_t chain(uint64_t x)
{
	/* Long dependency chain kept in registers: a clobbered register shows. */
	for (int i = 0; i < 200000; i++)
		x = x * 6364136223846793005ull + 1442695040888963407ull;
	return x;
}

static void *busy(void *arg)
{
	uint64_t want = chain(42);

	(void)arg;
	while (running()) {
		uint64_t c = checksum();

		if (c != expected)
			error("buffer checksum changed", (long)c, (long)expected);
		if (chain(42) != want)
			error("register chain differs", 0, 0);
		/* Real syscalls whose answers are known: an injection landing on one must not
		 * change what it returns (a wrong restart would show as -1/EINTR or garbage). */
		if (syscall(SYS_getpid) != my_pid)
			error("getpid returned another pid", (long)syscall(SYS_getpid), my_pid);
		{
			struct timespec a, b;

			if (syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &a) != 0 ||
			    syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &b) != 0)
				error("clock_gettime failed", errno, 0);
			else if (b.tv_sec < a.tv_sec || (b.tv_sec == a.tv_sec && b.tv_nsec < a.tv_nsec))
				error("clock went backwards", 0, 0);
		}
		checks++;
	}
	return NULL;
}

static void *sleeper(void *arg)
{
	unsigned seed = (unsigned)(uintptr_t)arg;

	while (running()) {
		long ns = 500000 + rand_r(&seed) % 5000000;
		struct timespec req = { 0, ns }, rem;
		double t0 = now(), el;

		while (nanosleep(&req, &rem) != 0) {
			if (errno != EINTR) {
				error("nanosleep failed", errno, ns);
				break;
			}
			req = rem; /* a handled signal: sleep the rest */
		}
		el = now() - t0;
		if (el * 1e9 < ns) {
			short_sleeps++;
			error("sleep cut short (ns asked, ns slept)", ns, (long)(el * 1e9));
		}
		sleeps++;
	}
	return NULL;
}

static void fill_record(unsigned char *r, uint64_t seq)
{
	for (int i = 0; i < REC; i++)
		r[i] = (unsigned char)(seq * 31 + i * 7);
	memcpy(r, &seq, sizeof(seq));
}

static void *pipe_reader(void *arg)
{
	int p[2];
	pid_t child;
	uint64_t seq = 0;

	(void)arg;
	if (pipe(p) != 0)
		return error("pipe", errno, 0), NULL;
	child = fork();
	if (child == 0) {
		unsigned seed = (unsigned)getpid();
		unsigned char r[REC];

		close(p[0]);
		for (uint64_t s = 0; running(); s++) {
			struct timespec d = { 0, rand_r(&seed) % 2000000 };

			fill_record(r, s);
			if (write(p[1], r, REC) != REC)
				_exit(3);
			nanosleep(&d, NULL);
		}
		_exit(0);
	}
	writer_pid = child;
	close(p[1]);
	for (;;) {
		unsigned char r[REC], want[REC];
		size_t got = 0;

		while (got < REC) {
			ssize_t n = read(p[0], r + got, REC - got);

			if (n == 0)
				goto eof;
			if (n < 0) {
				error("pipe read failed", errno, (long)seq);
				if (errno != EINTR)
					goto eof;
				continue;
			}
			got += (size_t)n;
		}
		fill_record(want, seq);
		if (memcmp(r, want, REC) != 0)
			error("pipe record wrong", (long)seq, 0);
		seq++;
		records++;
	}
eof:
	close(p[0]);
	{
		int st;

		if (waitpid(child, &st, 0) != child || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
			error("pipe writer failed", st, 0);
	}
	return NULL;
}

static void report(const char *mode);

/* One link of a chain: a little work, a successor, then exit. The last link of the
 * last chain reports (the main thread is long gone). */
static atomic_int chains_left;
static void *churn_link(void *arg)
{
	unsigned seed = (unsigned)(uintptr_t)arg;
	double until = now() + (200 + rand_r(&seed) % 2800) / 1e6;
	uint64_t want = chain(seed), got;
	pthread_t next;

	threads_started++;
	while (now() < until) {
		got = chain(seed);
		if (got != want)
			error("register chain differs in a churning thread", 0, 0);
		checks++;
	}
	if (running()) {
		pthread_attr_t at;

		pthread_attr_init(&at);
		pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
		if (pthread_create(&next, &at, churn_link, (void *)(uintptr_t)rand_r(&seed)) != 0)
			error("pthread_create", errno, 0);
		pthread_attr_destroy(&at);
	} else if (--chains_left == 0) {
		report("churn");
		exit(errors ? 1 : 0);
	}
	return NULL;
}

static void sleep_us(long us)
{
	struct timespec d = { us / 1000000, (us % 1000000) * 1000 };

	while (nanosleep(&d, &d) != 0 && errno == EINTR)
		;
}

static void *killer(void *arg)
{
	sleep_us(delay_us);
	if (arg)
		syscall(SYS_exit_group, 0); /* a normal exit of the whole process */
	kill(my_pid, SIGKILL);
	return NULL;
}

static void exec_self(void)
{
	char *args[] = { "injtarget", "sleep", self_exe_secs, NULL };

	execv("/proc/self/exe", args);
	error("execv", errno, 0);
}

static void *exec_thread(void *arg)
{
	(void)arg;
	sleep_us(delay_us);
	exec_self();
	return NULL;
}

static int mergeable_now(void)
{
	char line[128];
	int yes = 0;
	FILE *f = fopen("/proc/self/ksm_stat", "re");

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, "ksm_mergeable: yes", 18))
			yes = 1;
	fclose(f);
	return yes;
}

static void *watch_mergeable(void *arg)
{
	(void)arg;
	while (!mergeable_now())
		;
	/* Said before dying, so the test knows the first madvise had completed. */
	printf("mergeable seen\n");
	fflush(stdout);
	_exit(0);
	return NULL;
}

static void on_sigsys(int sig)
{
	(void)sig;
	error("SIGSYS: a madvise it never made was trapped", 0, 0);
}

/* madvise -> SECCOMP_RET_TRAP, everything else allowed (x86_64 only: a test target). */
static int trap_madvise(void)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_madvise, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRAP),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { sizeof(f) / sizeof(f[0]), f };

	signal(SIGSYS, on_sigsys);
	return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
}

/* Strict mode allows write and exit only: spin, then say so and leave. */
static void strict_spin(double secs)
{
	static const char msg[] = "{\"mode\": \"strict\", \"errors\": 0}\n";
	/* No clock (its vDSO may fall back to a syscall): ~0.5 ns per round, counted. */
	volatile uint64_t n = (uint64_t)(secs * 4e8);

	if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT) != 0)
		_exit(2);
	while (n)
		n = n - 1;
	if (write(1, msg, sizeof(msg) - 1) < 0)
		syscall(SYS_exit, 3);
	syscall(SYS_exit, 0); /* exit_group is not allowed in strict mode */
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "busy";
	double secs = argc > 2 ? atof(argv[2]) : 5;
	struct sigaction sa;

	my_pid = getpid();
	self_exe_secs = argc > 2 ? argv[2] : "5";
	delay_us = argc > 3 ? atol(argv[3]) : 0;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_rt;
	sa.sa_flags = SA_RESTART | SA_SIGINFO;
	sigaction(SIGRTMIN, &sa, NULL);
	sa.sa_handler = on_sig;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
	sigaction(SIGCHLD, &sa, NULL);
	sa.sa_flags = SA_RESTART;
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);

	buf = mmap(NULL, BUF_PAGES * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED)
		return 2;
	/* Half the pages identical, so MADV_MERGEABLE has something to merge. */
	for (size_t i = 0; i < BUF_PAGES * 4096; i++)
		buf[i] = (i / 4096) % 2 ? (unsigned char)(i * 13 + i / 4096) : (unsigned char)(i % 251);
	expected = checksum();
	deadline = now() + secs;
	printf("ready %lu %d\n", (unsigned long)(uintptr_t)buf, BUF_PAGES * 4096);
	fflush(stdout);

	if (!strcmp(mode, "busy")) {
		busy(NULL);
	} else if (!strcmp(mode, "sleep")) {
		sleeper((void *)1);
	} else if (!strcmp(mode, "pipe")) {
		pipe_reader(NULL);
	} else if (!strcmp(mode, "threads")) {
		pthread_t t[4];

		pthread_create(&t[0], NULL, busy, NULL);
		pthread_create(&t[1], NULL, busy, NULL);
		pthread_create(&t[2], NULL, sleeper, (void *)2);
		pthread_create(&t[3], NULL, pipe_reader, NULL);
		for (int i = 0; i < 4; i++)
			pthread_join(t[i], NULL);
	} else if (!strcmp(mode, "churn")) {
		pthread_attr_t at;
		pthread_t t;

		pthread_attr_init(&at);
		pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
		chains_left = 3;
		for (uintptr_t i = 1; i <= 3; i++)
			pthread_create(&t, &at, churn_link, (void *)i);
		pthread_exit(NULL); /* a zombie leader: every live thread is short-lived */
	} else if (!strcmp(mode, "diekill") || !strcmp(mode, "dieexit")) {
		pthread_t t;

		pthread_create(&t, NULL, killer, mode[3] == 'e' ? (void *)1 : NULL);
		sleeper((void *)3);
	} else if (!strcmp(mode, "exec")) {
		double until;
		char go[8];

		if (!fgets(go, sizeof(go), stdin))
			return 2;
		until = now() + delay_us / 1e6;

		while (now() < until)
			checks++;
		exec_self();
	} else if (!strcmp(mode, "threadexec")) {
		pthread_t t;
		char go[8];

		if (!fgets(go, sizeof(go), stdin))
			return 2;
		pthread_create(&t, NULL, exec_thread, NULL);
		sleeper((void *)4);
	} else if (!strcmp(mode, "dieafter")) {
		pthread_t t;

		pthread_create(&t, NULL, watch_mergeable, NULL);
		sleeper((void *)5);
	} else if (!strcmp(mode, "seccomp")) {
		if (trap_madvise() != 0)
			return 2;
		busy(NULL);
	} else if (!strcmp(mode, "strict")) {
		strict_spin(secs);
	} else if (!strcmp(mode, "vfork")) {
		pid_t c = vfork();

		if (c == 0) {
			struct timespec d = { (time_t)secs, 0 };

			nanosleep(&d, NULL);
			_exit(0);
		}
		waitpid(c, NULL, 0);
		checks++;
	} else {
		return 2;
	}
	report(mode);
	return errors ? 1 : 0;
}

static void report(const char *mode)
{
	if (checksum() != expected)
		error("buffer checksum changed at exit", 0, 0);
	printf("{\"mode\": \"%s\", \"errors\": %ld, \"checks\": %ld, \"sleeps\": %ld, \"short_sleeps\": %ld, "
	       "\"records\": %ld, \"signals\": %ld, \"payloads\": %ld, \"usr1\": %ld, \"chld\": %ld, \"threads\": %ld, "
	       "\"first_error\": \"%s\"}\n",
	       mode, (long)errors, (long)checks, (long)sleeps, (long)short_sleeps, (long)records,
	       (long)signals_seen, (long)payloads_seen, (long)usr1_seen, (long)chld_seen, (long)threads_started, first_error);
	fflush(stdout);
}
