/* Target for bench/bench_relook.py: MiB of private anonymous memory, a tenth
 * duplicate pages in runs of 16 (copies of a pool of 64 pages), the rest
 * unique; then one command per line on stdin:
 *
 *   w STEP   write one byte to every STEP-th page; answers
 *            "PAGES WALL_NS CPU_NS MINFLT" (this process's own clock and
 *            rusage, so the cost the target pays is measured by the target)
 *   q        exit
 *
 * It prints "ADDR LEN" once the memory is filled. 4 KiB pages only
 * (MADV_NOHUGEPAGE): soft-dirty and write faults are then per page.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>

#define PAGE 4096

static uint64_t ns(clockid_t c)
{
	struct timespec t;
	clock_gettime(c, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static long minflt(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_minflt;
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 256;
	size_t pages = mib * 256, len = pages * PAGE;
	unsigned char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		return 1;
	madvise(m, len, MADV_NOHUGEPAGE);
	uint64_t x = 88172645463325252ull;
	for (size_t p = 0; p < pages; p++) {
		uint64_t *w = (uint64_t *)(m + p * PAGE);
		/* runs of 16 duplicate pages at every tenth run start: 10% of pages */
		if ((p / 16) % 10 == 0) {
			uint64_t seed = (p % 64) + 1;
			for (size_t i = 0; i < PAGE / 8; i++)
				w[i] = seed * 0x9E3779B97F4A7C15ull + i;
		} else {
			for (size_t i = 0; i < PAGE / 8; i++) {
				x ^= x << 13, x ^= x >> 7, x ^= x << 17;
				w[i] = x;
			}
		}
	}
	printf("%lu %zu\n", (unsigned long)(uintptr_t)m, len);
	fflush(stdout);
	char line[64];
	while (fgets(line, sizeof line, stdin)) {
		if (line[0] == 'q')
			break;
		if (line[0] != 'w')
			continue;
		size_t step = strtoul(line + 1, NULL, 10);
		if (!step)
			step = 1;
		long f0 = minflt();
		uint64_t c0 = ns(CLOCK_PROCESS_CPUTIME_ID), t0 = ns(CLOCK_MONOTONIC);
		size_t n = 0;
		for (size_t p = 0; p < pages; p += step, n++)
			((volatile unsigned char *)m)[p * PAGE + 8]++;
		uint64_t t1 = ns(CLOCK_MONOTONIC), c1 = ns(CLOCK_PROCESS_CPUTIME_ID);
		printf("%zu %lu %lu %ld\n", n, (unsigned long)(t1 - t0), (unsigned long)(c1 - c0), minflt() - f0);
		fflush(stdout);
	}
	return 0;
}
