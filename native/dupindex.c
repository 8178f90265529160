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
	if (!s->groups || !s->table)
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
	unsigned char tmp[65536];
	const unsigned char *rep;

	if (g->rep == KN_REP_ZERO)
		return kn_page_is_zero(p, s->page_size);
	if (g->rep != KN_NONE)
		return memcmp(rep_ptr(s, g->rep), p, s->page_size) == 0;

	if (g->batch_seq == s->batch_seq) {
		rep = s->buf + (size_t)g->batch_idx * s->page_size;
	} else {
		s->rep_fetches++;
		if (kn_read_remote(g->first_pid, g->first_addr, tmp, s->page_size) != 0 ||
		    kn_hash_page(tmp, s->page_size) != g->hash) {
			*replaced = 1;
			g->rep = rep_store(s, p);
			g->first_pid = -1;
			return 1;
		}
		rep = tmp;
	}
	if (memcmp(rep, p, s->page_size) != 0)
		return 0;
	/* Over the memory limit: keep no copy, re-read the first page each time. */
	g->rep = rep_store(s, rep);
	return 1;
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
