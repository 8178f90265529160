/* One host-like process for bench/bench_coordinator.py.
 *
 * A private anonymous region of MIB MiB where ~DUP_PCT% of the pages are
 * duplicates, in runs of random length (2-32 pages) among unique pages; the
 * duplicate contents come from a pool shared by every process (so pages repeat
 * within a process and across processes). A second, hot region of HOT_KIB KiB
 * is rewritten by a writer thread every PERIOD_MS: its first half always with
 * the same duplicate contents (merging it only buys copy-on-write faults: the
 * churn a coordinator must unmerge), its second half with new bytes each pass
 * (never mergeable). The writer is a real thread doing real writes, so the
 * fault and cache costs land where they would on a host.
 *
 * OPTIN 1: the whole process opts in (PR_SET_MEMORY_MERGE before anything is
 * mapped; madvise(MADV_MERGEABLE) of both regions where prctl is refused).
 * OPTIN 0: it never opts in (a coordinator must do it from outside).
 *
 * Prints "ready ADDR LEN HOTADDR HOTLEN" once filled, then runs until SIGTERM.
 *
 * usage: coordwork MIB SEED DUP_PCT HOT_KIB PERIOD_MS OPTIN
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#endif
#define PAGE 4096
#define POOL 512 /* distinct duplicate contents: each repeats ~25x over 4 x 128 MiB */

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static uint64_t next(uint64_t *s) /* xorshift64*: cheap, so filling 128 MiB takes ~0.1 s */
{
	*s ^= *s >> 12;
	*s ^= *s << 25;
	*s ^= *s >> 27;
	return *s * 0x2545F4914F6CDD1DULL;
}

static void fill(char *p, uint64_t seed)
{
	uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 1, *w = (uint64_t *)p;
	for (int i = 0; i < PAGE / 8; i++)
		w[i] = next(&s);
}

static char *hot;
static long hot_pages;
static long period_ms;

static void *writer(void *arg)
{
	(void)arg;
	char *tmpl = malloc((size_t)hot_pages / 2 * PAGE);
	for (long i = 0; i < hot_pages / 2; i++) /* contents every process shares */
		fill(tmpl + i * PAGE, 1000000 + (uint64_t)i);
	struct timespec ts = {period_ms / 1000, (period_ms % 1000) * 1000000L};
	for (uint64_t pass = 1; !stop; pass++) {
		memcpy(hot, tmpl, (size_t)hot_pages / 2 * PAGE);
		for (long i = hot_pages / 2; i < hot_pages; i++)
			fill(hot + i * PAGE, pass * 1000003 + (uint64_t)i + ((uint64_t)getpid() << 32));
		if (period_ms)
			nanosleep(&ts, NULL);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 7) {
		fprintf(stderr, "usage: coordwork MIB SEED DUP_PCT HOT_KIB PERIOD_MS OPTIN\n");
		return 2;
	}
	long pages = atol(argv[1]) * 256, seed = atol(argv[2]), pct = atol(argv[3]);
	hot_pages = atol(argv[4]) / 4;
	period_ms = atol(argv[5]);
	int optin = atoi(argv[6]), madv = 0;
	signal(SIGTERM, on_term);
	if (optin && prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0)
		madv = 1; /* kernel before 6.4: madvise each region below */
	char *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	hot = mmap(NULL, hot_pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED || hot == MAP_FAILED)
		return 1;
	if (madv && (madvise(mem, pages * PAGE, MADV_MERGEABLE) || madvise(hot, hot_pages * PAGE, MADV_MERGEABLE)))
		return 1;
	/* Runs of 2-32 pages (mean 17); unique gaps uniform in [1, 2g-1], mean g,
	 * so duplicates are 17 / (17 + g) of the pages. */
	uint64_t rng = (uint64_t)seed * 7919 + 17;
	long gap = pct > 0 ? 17 * (100 - pct) / pct : pages, p = 0;
	while (p < pages) {
		long g = 1 + (long)(next(&rng) % (uint64_t)(2 * gap - 1));
		for (long i = 0; i < g && p < pages; i++, p++) /* unique: seeded by process and page */
			fill(mem + p * PAGE, ((uint64_t)seed << 40) + (uint64_t)p + 1);
		long run = 2 + (long)(next(&rng) % 31);
		for (long i = 0; i < run && p < pages; i++, p++)
			fill(mem + p * PAGE, 1 + next(&rng) % POOL);
	}
	pthread_t t;
	if (hot_pages >= 2 && pthread_create(&t, NULL, writer, NULL) != 0)
		return 1;
	printf("ready %lu %ld %lu %ld\n", (unsigned long)mem, pages * PAGE, (unsigned long)hot, hot_pages * PAGE);
	fflush(stdout);
	while (!stop)
		pause();
	return 0;
}
