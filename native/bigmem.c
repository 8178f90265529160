/*
 * The index's large arrays come straight from mmap.
 *
 * Growing one never copies (mremap moves page tables), freeing one gives its
 * memory back at once, and capacity not yet used costs nothing. malloc would
 * serve arrays below its mmap threshold (which glibc raises, up to 32 MiB,
 * each time a large block is freed) from the heap, where a grown array's old
 * copy and a freed array stay resident: the scan's memory would depend on
 * what the process did before, not on the pages scanned.
 */
#define _GNU_SOURCE
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

static size_t round_up(size_t n)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);

	return (n + page - 1) / page * page;
}

void *kn_big_realloc(void *p, size_t old_bytes, size_t new_bytes)
{
	void *n;

	if (!p || !old_bytes)
		n = mmap(NULL, round_up(new_bytes), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
			 -1, 0);
	else
		n = mremap(p, round_up(old_bytes), round_up(new_bytes), MREMAP_MAYMOVE);
	return n == MAP_FAILED ? NULL : n;
}

void kn_big_free(void *p, size_t bytes)
{
	if (p && bytes)
		munmap(p, round_up(bytes));
}
