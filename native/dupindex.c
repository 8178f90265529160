/*
 * The duplicate index: which pages hold identical bytes.
 *
 * A 64-bit hash finds candidates; bytes decide. The first page of a content
 * costs only a 32-byte group record (hash + where it lives). When a second
 * page hashes the same, the first is fetched (from the current batch buffer
 * or re-read from its process) and kept as the group's representative copy;
 * every later candidate is memcmp'd with it. Unique pages, the bulk of most
 * memory, never cost a copy. Equal hashes with different bytes become
 * separate groups (the table allows repeated keys; lookups probe past them).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define REP_CHUNK_PAGES 256u

static uint64_t mix(uint64_t h)
{
	/* xxh3 output is already uniform; fold the high bits in anyway so that
	 * the table index does not rest on the low bits alone. */
	return h ^ (h >> 29);
}

int kn_index_init(struct kn_scanner *s)
{
	s->groups_cap = 4096;
	s->groups = malloc(sizeof(*s->groups) * s->groups_cap);
	s->table_mask = 8192 - 1;
	s->table = malloc(sizeof(uint32_t) * (s->table_mask + 1));
	s->fetch_buf = aligned_alloc(4096, (size_t)s->batch_pages * s->page_size);
	s->fetch_group = malloc(sizeof(uint32_t) * s->batch_pages);
	s->fetch_addr = malloc(sizeof(uint64_t) * s->batch_pages);
	s->fetch_ok = malloc(s->batch_pages);
	if (!s->groups || !s->table || !s->fetch_buf || !s->fetch_group || !s->fetch_addr || !s->fetch_ok)
		return -ENOMEM;
	memset(s->table, 0xff, sizeof(uint32_t) * (s->table_mask + 1));
	return 0;
}

void kn_index_free(struct kn_scanner *s)
{
	for (uint32_t i = 0; i < (s->nreps + REP_CHUNK_PAGES - 1) / REP_CHUNK_PAGES; i++)
		free(s->rep_chunks[i]);
	free(s->rep_chunks);
	free(s->groups);
	free(s->table);
	free(s->fetch_buf);
	free(s->fetch_group);
	free(s->fetch_addr);
	free(s->fetch_ok);
}

static int grow_table(struct kn_scanner *s)
{
	uint64_t nsize = (s->table_mask + 1) * 2;
	uint32_t *t = malloc(sizeof(uint32_t) * nsize);

	if (!t)
		return -ENOMEM;
	memset(t, 0xff, sizeof(uint32_t) * nsize);
	for (uint32_t g = 0; g < s->ngroups; g++) {
		uint64_t slot = mix(s->groups[g].hash) & (nsize - 1);

		while (t[slot] != KN_NONE)
			slot = (slot + 1) & (nsize - 1);
		t[slot] = g;
	}
	free(s->table);
	s->table = t;
	s->table_mask = nsize - 1;
	return 0;
}

static unsigned char *rep_ptr(struct kn_scanner *s, uint32_t rep)
{
	return s->rep_chunks[rep / REP_CHUNK_PAGES] + (size_t)(rep % REP_CHUNK_PAGES) * s->page_size;
}

static uint32_t rep_store(struct kn_scanner *s, const unsigned char *p)
{
	uint32_t chunk = s->nreps / REP_CHUNK_PAGES;

	if ((uint64_t)s->nreps >= s->rep_limit)
		return KN_NONE;
	if (s->nreps % REP_CHUNK_PAGES == 0) {
		if (chunk >= s->rep_chunks_cap) {
			uint32_t ncap = s->rep_chunks_cap ? s->rep_chunks_cap * 2 : 64;
			unsigned char **n = realloc(s->rep_chunks, sizeof(*n) * ncap);

			if (!n)
				return KN_NONE;
			s->rep_chunks = n;
			s->rep_chunks_cap = ncap;
		}
		s->rep_chunks[chunk] = malloc((size_t)REP_CHUNK_PAGES * s->page_size);
		if (!s->rep_chunks[chunk])
			return KN_NONE;
	}
	memcpy(rep_ptr(s, s->nreps), p, s->page_size);
	return s->nreps++;
}

/*
 * Do the bytes p equal group g's content? On the group's second sighting
 * the first page is fetched and kept. If the first page changed or vanished
 * since it was hashed, it no longer witnesses the content: p takes its place
 * (the stale page stays counted, and is reported as volatile by the caller's
 * totals through rep_fetches; a target that writes while being scanned makes
 * any estimate approximate).
 */
static int same_content(struct kn_scanner *s, struct kn_group *g, const unsigned char *p, int *replaced)
{
	uint32_t gi = (uint32_t)(g - s->groups), f = g->fetch_slot;
	unsigned char tmp[65536];
	const unsigned char *rep;
	int ok;

	if (g->rep == KN_REP_ZERO)
		return kn_page_is_zero(p, s->page_size);
	if (g->rep != KN_NONE)
		return memcmp(rep_ptr(s, g->rep), p, s->page_size) == 0;

	if (g->batch_seq == s->batch_seq) {
		rep = s->buf + (size_t)g->batch_idx * s->page_size;
	} else {
		s->rep_fetches++;
		if (f < s->nfetch && s->fetch_group[f] == gi) {
			rep = s->fetch_buf + (size_t)f * s->page_size;
			ok = s->fetch_ok[f];
		} else { /* not foreseen by kn_index_fetch_firsts: never expected, but correct */
			rep = tmp;
			ok = kn_read_remote(g->first_pid, g->first_addr, tmp, s->page_size) == 0 &&
			     kn_hash_page(tmp, s->page_size) == g->hash;
		}
		if (!ok) {
			*replaced = 1;
			g->rep = rep_store(s, p);
			g->first_pid = -1;
			return 1;
		}
	}
	if (memcmp(rep, p, s->page_size) != 0)
		return 0;
	/* Over the memory limit: keep no copy, re-read the first page each time. */
	g->rep = rep_store(s, rep);
	return 1;
}

/*
 * A group's second sighting needs its first page, which sits in the target
 * process unless it was in the same batch. One process_vm_readv per batch
 * and process reads all the batch will need (instead of one call per page:
 * a syscall and a page pin each, a tenth of the scan when duplicates are
 * spread far apart). Fetched pages are checked against their hash here; one
 * that changed or went away is marked, and same_content replaces it.
 */
void kn_index_fetch_firsts(struct kn_scanner *s, const uint64_t *hash, uint32_t n)
{
	s->nfetch = 0;
	for (uint32_t i = 0; i < n; i++) {
		uint64_t slot = mix(hash[i]) & s->table_mask;
		uint32_t gi;

		for (; (gi = s->table[slot]) != KN_NONE; slot = (slot + 1) & s->table_mask) {
			struct kn_group *g = &s->groups[gi];

			if (g->hash != hash[i] || g->rep != KN_NONE || g->batch_seq == s->batch_seq ||
			    (g->fetch_slot < s->nfetch && s->fetch_group[g->fetch_slot] == gi))
				continue;
			if (s->nfetch == s->batch_pages)
				goto read; /* more groups than pages (equal hashes): same_content reads the rest */
			g->fetch_slot = s->nfetch;
			s->fetch_group[s->nfetch++] = gi;
		}
	}
read:
	/* Per process, in the order they were found: kn_read_pages merges neighbours into one iovec. */
	for (uint32_t a = 0; a < s->nfetch;) {
		int32_t pid = s->groups[s->fetch_group[a]].first_pid;
		uint32_t m = 0, done = 0;

		for (uint32_t k = a; k < s->nfetch; k++)
			if (s->groups[s->fetch_group[k]].first_pid == pid)
				m++;
		/* Gather this pid's entries at a..a+m (stable: keeps address order within the pid). */
		for (uint32_t k = a, w = a; k < s->nfetch && w < a + m; k++) {
			uint32_t gk = s->fetch_group[k];

			if (s->groups[gk].first_pid != pid)
				continue;
			memmove(&s->fetch_group[w + 1], &s->fetch_group[w], sizeof(uint32_t) * (k - w));
			s->fetch_group[w++] = gk;
		}
		for (uint32_t k = a; k < a + m; k++) {
			s->groups[s->fetch_group[k]].fetch_slot = k;
			s->fetch_addr[k] = s->groups[s->fetch_group[k]].first_addr;
			s->fetch_ok[k] = 0;
		}
		while (done < m) {
			int64_t got = kn_read_pages(pid, s->fetch_addr + a + done, m - done,
						    s->fetch_buf + (size_t)(a + done) * s->page_size, s->page_size);

			if (got < 0)
				break; /* process gone or not readable: none of its first pages witness */
			for (int64_t k = 0; k < got; k++, done++) {
				uint32_t f = a + done;

				s->fetch_ok[f] = kn_hash_page(s->fetch_buf + (size_t)f * s->page_size, s->page_size) ==
						 s->groups[s->fetch_group[f]].hash;
			}
			if (done < m)
				done++; /* this one went away (fetch_ok stays 0); read on after it */
		}
		a += m;
	}
}

void kn_index_prefetch_slot(const struct kn_scanner *s, uint64_t h)
{
	__builtin_prefetch(&s->table[mix(h) & s->table_mask]);
}

void kn_index_prefetch_group(const struct kn_scanner *s, uint64_t h)
{
	uint32_t g = s->table[mix(h) & s->table_mask]; /* in cache: its slot was prefetched earlier */

	if (g != KN_NONE)
		__builtin_prefetch(&s->groups[g]);
}

uint32_t kn_index_add(struct kn_scanner *s, const unsigned char *p, uint64_t h, int pid, uint64_t addr,
		      uint32_t idx)
{
	uint64_t slot = mix(h) & s->table_mask;
	int replaced = 0;
	uint32_t gi;

	for (; (gi = s->table[slot]) != KN_NONE; slot = (slot + 1) & s->table_mask) {
		struct kn_group *g = &s->groups[gi];

		if (g->hash != h)
			continue;
		s->hash_confirms++;
		if (same_content(s, g, p, &replaced)) {
			g->count++;
			if (replaced) {
				g->first_pid = pid;
				g->first_addr = addr;
				g->batch_seq = s->batch_seq;
				g->batch_idx = idx;
			}
			return gi;
		}
		s->hash_collisions++;
	}

	if (s->ngroups == s->groups_cap) {
		uint32_t ncap = s->groups_cap * 2;
		struct kn_group *n = realloc(s->groups, sizeof(*n) * ncap);

		if (!n)
			return KN_NONE;
		s->groups = n;
		s->groups_cap = ncap;
	}
	gi = s->ngroups++;
	s->groups[gi] = (struct kn_group){
		.hash = h,
		.first_addr = addr,
		.first_pid = pid,
		.count = 1,
		.rep = (h == s->zero_hash && kn_page_is_zero(p, s->page_size)) ? KN_REP_ZERO : KN_NONE,
		.batch_seq = s->batch_seq,
		.batch_idx = idx,
	};
	s->table[slot] = gi;
	if ((uint64_t)s->ngroups * 2 > s->table_mask + 1 && grow_table(s) != 0)
		return KN_NONE;
	return gi;
}
