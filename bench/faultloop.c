/* Fault loops for bench_probe_overhead.py: prints nanoseconds (of CPU time) per fault.
 *
 *   faultloop fresh   PAGES REPS        first-touch writes (zero-fill faults)
 *   faultloop forkcow PAGES REPS [mg]   writes after fork (COW copies); mg: the
 *                                      process is mergeable (no page merged)
 *   faultloop ksmcow  PAGES REPS        writes to KSM-merged pages (starts ksmd for
 *                                      the merge, stops it before the timed writes
 *                                      and leaves it stopped)
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long page;

static double clock_ns(clockid_t id)
{
	struct timespec ts;
	clock_gettime(id, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static double now_ns(void)
{
	return clock_ns(CLOCK_MONOTONIC);
}

/* The writes are timed in this thread's CPU time (user + kernel, the faults
 * included): time other tasks take on this CPU does not count, which on a
 * shared 2-CPU machine is most of the noise of a wall-clock figure. */
static double cpu_ns(void)
{
	return clock_ns(CLOCK_THREAD_CPUTIME_ID);
}

static char *region(long pages)
{
	char *p = mmap(NULL, pages * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	madvise(p, pages * page, MADV_NOHUGEPAGE); /* one fault per 4 KiB page */
	return p;
}

static double touch(char *p, long pages, char v)
{
	double t = cpu_ns();
	for (long i = 0; i < pages; i++)
		p[i * page + 64] = v;
	return cpu_ns() - t;
}

/* Distinct content per page, so ksmd (running for the ksmcow loop) never
 * merges these pages behind the writer's back. */
static void fill_unique(char *p, long pages)
{
	for (long i = 0; i < pages; i++)
		*(long *)(p + i * page) = i + 1;
}

static void ksm_run(const char *v)
{
	FILE *f = fopen("/sys/kernel/mm/ksm/run", "w");
	if (f) {
		fputs(v, f);
		fclose(f);
	}
}

/* Machine-wide KSM COW copies so far: the exact number of faults the ksmcow
 * loop takes (some pages may not have merged; ksm_merging_pages can lag). */
static long cow_ksm(void)
{
	FILE *f = fopen("/proc/vmstat", "r");
	char name[64];
	long v, n = -1;
	while (f && fscanf(f, "%63s %ld", name, &v) == 2)
		if (!strcmp(name, "cow_ksm"))
			n = v;
	if (f)
		fclose(f);
	return n;
}

static long merging_pages(void)
{
	FILE *f = fopen("/proc/self/ksm_merging_pages", "r");
	long n = 0;
	if (f) {
		if (fscanf(f, "%ld", &n) != 1)
			n = 0;
		fclose(f);
	}
	return n;
}

int main(int argc, char **argv)
{
	if (argc < 4)
		return 2;
	page = sysconf(_SC_PAGESIZE);
	const char *mode = argv[1];
	long pages = atol(argv[2]), reps = atol(argv[3]);
	int mg = argc > 4 && !strcmp(argv[4], "mg");
	double total = 0;
	long faults = 0; /* ksmcow: merged pages written */

	for (long r = 0; r < reps; r++) {
		char *p = region(pages);
		if (!strcmp(mode, "fresh")) {
			total += touch(p, pages, 1);
		} else if (!strcmp(mode, "forkcow")) {
			fill_unique(p, pages);
			if (mg)
				madvise(p, pages * page, MADV_MERGEABLE);
			pid_t c = fork();
			if (c == 0) {
				pause();
				_exit(0);
			}
			total += touch(p, pages, 2);
			kill(c, SIGKILL);
			waitpid(c, NULL, 0);
		} else if (!strcmp(mode, "ksmcow")) {
			touch(p, pages, 1);
			ksm_run("1");
			madvise(p, pages * page, MADV_MERGEABLE);
			double deadline = now_ns() + 30e9, moved = now_ns();
			long seen = 0, m;
			/* Until all merged, or 90% and no progress for a second. */
			while ((m = merging_pages()) < pages && now_ns() < deadline &&
			       !(m >= pages * 9 / 10 && now_ns() - moved > 1e9)) {
				if (m != seen) {
					seen = m;
					moved = now_ns();
				}
				usleep(2000);
			}
			ksm_run("0"); /* ksmd must not rescan while we time the writes */
			/* run=0 stops ksmd after its current batch: let it finish, or
			 * its page-table walks of this mm race with the timed writes. */
			usleep(50000);
			long merged = merging_pages(), c0 = cow_ksm();
			if (merged < pages * 9 / 10 || c0 < 0) {
				fprintf(stderr, "ksmd merged %ld of %ld pages\n", merged, pages);
				return 1;
			}
			/* Writes to pages that did not merge take no fault: divide by
			 * the KSM COW faults the kernel counted, not by the pages. */
			total += touch(p, pages, 2);
			faults += cow_ksm() - c0;
		} else {
			return 2;
		}
		munmap(p, pages * page);
	}
	printf("%.1f\n", total / (faults ? faults : pages * reps));
	return 0;
}
