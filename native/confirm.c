/*
 * Bytes mode's middle step (see dupindex.c): compare a batch's candidates
 * with their groups' first pages, without the index lock.
 */
#define _GNU_SOURCE
#include <string.h>
#include <time.h>

#include <unistd.h>

#include "internal.h"

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Sort idx[0..n) by key[idx[]]: a shell sort, in place. n is at most a batch;
 * qsort_r would malloc a buffer that large, and a worker thread's first malloc
 * makes it a malloc arena of its own (memory that stays). */
static void sort_by_key(uint32_t *idx, uint32_t n, const uint64_t *key)
{
	static const uint32_t gaps[] = { 132, 57, 23, 10, 4, 1 };

	for (size_t q = 0; q < sizeof(gaps) / sizeof(gaps[0]); q++) {
		uint32_t gap = gaps[q];

		for (uint32_t i = gap; i < n; i++) {
			uint32_t v = idx[i], j = i;

			for (; j >= gap && key[idx[j - gap]] > key[v]; j -= gap)
				idx[j] = idx[j - gap];
			idx[j] = v;
		}
	}
}

/*
 * Compare every candidate of batch b with its group's first page, without
 * the index lock: only the slot's own arrays and the process table (which
 * does not change during a scan) are read. First pages are re-read sorted
 * by process and address, each once, so neighbours share one iovec and each
 * process takes one process_vm_readv.
 */
void kn_index_confirm(const struct kn_scanner *s, struct kn_slot *b)
{
	uint64_t t0 = now_ns();
	uint32_t ps = s->page_size, shift = s->page_shift, nremote = 0, nfetch = 0;

	for (uint32_t k = 0; k < b->ncand; k++) {
		b->cand_fetch[k] = KN_NONE;
		if (b->cand_local[k] == KN_NONE) {
			b->order[nremote++] = k;
			continue;
		}
		b->verdict[k] = memcmp(b->buf + (size_t)b->cand_local[k] * ps, b->buf + (size_t)b->cand_page[k] * ps,
				       ps) == 0
					? KN_SAME
					: KN_DIFFERENT; /* both read just now: not a change, a collision */
	}
	sort_by_key(b->order, nremote, b->cand_where);
	for (uint32_t j = 0; j < nremote; j++) {
		uint32_t k = b->order[j];

		if (nfetch == 0 || b->fetch_where[nfetch - 1] != b->cand_where[k])
			b->fetch_where[nfetch++] = b->cand_where[k];
		b->cand_fetch[k] = nfetch - 1;
	}
	/* One run per process (sorted: a process's pages are together, in address order). */
	for (uint32_t a = 0; a < nfetch;) {
		uint32_t proc = KN_WHERE_PROC(b->fetch_where[a]), m = 0, done = 0;
		uint64_t *addr = (uint64_t *)b->fetch_where + a; /* converted in place: no longer needed as where */

		while (a + m < nfetch && KN_WHERE_PROC(b->fetch_where[a + m]) == proc)
			m++;
		for (uint32_t q = 0; q < m; q++) {
			addr[q] = KN_WHERE_ADDR(addr[q], shift);
			b->fetch_ok[a + q] = 0;
		}
		/* A first page may be a KSM page: read through /proc/PID/mem, which does not
		 * unshare it as process_vm_readv's pin would (see kn_read_pages_mem()). */
		int memfd = -1;

		while (done < m) {
			int64_t got = kn_read_pages_mem(s->procs[proc], &memfd, addr + done, m - done,
							b->fetch_buf + (size_t)(a + done) * ps, ps);

			if (got < 0)
				break; /* process gone or not readable: none of its first pages witness */
			for (int64_t q = 0; q < got; q++)
				b->fetch_ok[a + done++] = 1;
			if (done < m)
				done++; /* this one went away (fetch_ok stays 0); read on after it */
		}
		if (memfd >= 0)
			close(memfd);
		b->refetched += m;
		a += m;
	}
	for (uint32_t j = 0; j < nremote; j++) {
		uint32_t k = b->order[j], f = b->cand_fetch[k];
		const unsigned char *first = b->fetch_buf + (size_t)f * ps, *p = b->buf + (size_t)b->cand_page[k] * ps;

		if (!b->fetch_ok[f])
			b->verdict[k] = KN_REPLACE;
		else if (memcmp(first, p, ps) == 0)
			b->verdict[k] = KN_SAME;
		else if ((kn_hash_page(first, ps) & s->hash_mask) != b->hash[b->cand_page[k]])
			/* The first page changed since it was hashed: it no longer witnesses
			 * its content, this page takes its place. The stale page stays counted
			 * (a target writing while scanned makes any estimate approximate). */
			b->verdict[k] = KN_REPLACE;
		else
			b->verdict[k] = KN_DIFFERENT;
	}
	b->refetch_ns += now_ns() - t0;
}

