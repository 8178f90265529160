/*
 * The duplicate index: which pages hold identical bytes.
 *
 * A content costs a 20-byte group record and nothing else: no copy of any
 * page is kept, so memory grows with the pages scanned and not with how many
 * contents repeat (keeping one 4 KiB copy per repeated content cost up to
 * half the memory scanned when most duplicates are distinct contents, as
 * with guests of one image). Contents are told apart by their 128-bit hash
 * (the default; the odds are in internal.h), or byte by byte:
 *
 * In bytes mode a 64-bit hash finds candidates and bytes decide: a page whose
 * hash is already known is compared with the group's first page, re-read
 * from its process, in one process_vm_readv per batch and process, by the
 * worker that copied the batch, without the index lock, so the re-reads run
 * on every core like the copies do. Indexing a batch is then three steps:
 *   lookup  (lock held)  new hashes become groups; known ones become
 *                        candidates, with a copy of what comparing needs;
 *   confirm (no lock)    candidates compared with first pages (this batch's
 *                        own, or re-read; confirm.c);
 *   commit  (lock held)  confirmed pages join their groups; equal hashes with
 *                        other bytes go through the rest of the hash's groups
 *                        (or found a new one): rare, so done simply, there.
 * In 128-bit mode lookup does it all: equal 128-bit hashes are one group.
 * Equal 64-bit hashes with different contents are separate groups (the table
 * allows repeated keys; lookups probe past them).
 *
 * Over 400 lines because lookup and commit share the table's private helpers
 * (probing, growth, group records); split, those would become interface.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

static uint64_t mix(uint64_t h)
{
	/* xxh3 output is already uniform; fold the high bits in anyway so that
	 * the table index does not rest on the low bits alone (and a test's hash
	 * mask that keeps only high bits still spreads). */
	return h ^ (h >> 29) ^ (h >> 47);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int kn_index_init(struct kn_scanner *s)
{
	s->groups_cap = 4096;
	s->g_hash = kn_big_realloc(NULL, 0, sizeof(uint64_t) * s->groups_cap);
	/* g_hash_hi or g_where: only the one the mode needs, with the first group. */
	s->g_count = kn_big_realloc(NULL, 0, sizeof(uint32_t) * s->groups_cap);
	s->table_mask = 8192 - 1;
	s->table = kn_big_realloc(NULL, 0, sizeof(uint32_t) * (s->table_mask + 1));
	s->zero_group = KN_NONE;
	if (!s->g_hash || !s->g_count || !s->table)
		return -ENOMEM;
	memset(s->table, 0xff, sizeof(uint32_t) * (s->table_mask + 1));
	return 0;
}

void kn_index_free(struct kn_scanner *s)
{
	kn_big_free(s->g_hash, sizeof(uint64_t) * s->groups_cap);
	kn_big_free(s->g_hash_hi, sizeof(uint64_t) * s->groups_cap);
	kn_big_free(s->g_where, sizeof(uint64_t) * s->groups_cap);
	kn_big_free(s->g_count, sizeof(uint32_t) * s->groups_cap);
	if (s->table)
		kn_big_free(s->table, sizeof(uint32_t) * (s->table_mask + 1));
	kn_big_free(s->items, sizeof(uint32_t) * s->items_cap);
	kn_big_free(s->offs, sizeof(uint32_t) * s->items_cap);
	kn_big_free(s->ksm_pfns, sizeof(uint64_t) * s->ksm_pfns_cap);
	free(s->procs);
	s->g_hash = s->g_hash_hi = s->g_where = NULL;
	s->g_count = s->table = s->items = s->offs = NULL;
	s->ksm_pfns = NULL;
	s->procs = NULL;
}

int kn_slot_index_alloc(struct kn_scanner *s, struct kn_slot *b)
{
	size_t n = s->batch_pages;

	b->cand_page = malloc(n * 4);
	b->cand_group = malloc(n * 4);
	b->cand_where = malloc(n * 8);
	b->cand_local = malloc(n * 4);
	b->cand_fetch = malloc(n * 4);
	b->verdict = malloc(n);
	b->fetch_buf = aligned_alloc(4096, n * s->page_size);
	b->fetch_where = malloc(n * 8);
	b->fetch_ok = malloc(n);
	b->order = malloc(n * 4);
	b->new_page = malloc(n * 4);
	b->is_zero = malloc(n);
	b->hash_hi = malloc(n * 8);
	if (!b->hash_hi || !b->cand_page || !b->cand_group || !b->cand_where || !b->cand_local || !b->cand_fetch || !b->verdict ||
	    !b->fetch_buf || !b->fetch_where || !b->fetch_ok || !b->order || !b->new_page || !b->is_zero)
		return -ENOMEM;
	return 0;
}

void kn_slot_index_free(struct kn_slot *b)
{
	free(b->cand_page);
	free(b->cand_group);
	free(b->cand_where);
	free(b->cand_local);
	free(b->cand_fetch);
	free(b->verdict);
	free(b->fetch_buf);
	free(b->fetch_where);
	free(b->fetch_ok);
	free(b->order);
	free(b->new_page);
	free(b->is_zero);
	free(b->hash_hi);
}

uint32_t kn_proc_index(struct kn_scanner *s, int pid)
{
	for (uint32_t i = s->nprocs; i-- > 0;)
		if (s->procs[i] == pid)
			return i;
	if (s->nprocs >= KN_MAX_PROCS)
		return KN_NONE;
	if (s->nprocs == s->procs_cap) {
		uint32_t ncap = s->procs_cap ? s->procs_cap * 2 : 16;
		int32_t *n = realloc(s->procs, sizeof(*n) * ncap);

		if (!n)
			return KN_NONE;
		s->procs = n;
		s->procs_cap = ncap;
	}
	s->procs[s->nprocs] = pid;
	return s->nprocs++;
}

static int grow_table(struct kn_scanner *s)
{
	uint64_t nsize = (s->table_mask + 1) * 2;
	uint32_t *t = kn_big_realloc(NULL, 0, sizeof(uint32_t) * nsize);

	if (!t)
		return -ENOMEM;
	memset(t, 0xff, sizeof(uint32_t) * nsize);
	for (uint32_t g = 0; g < s->ngroups; g++) {
		uint64_t slot;

		if (g == s->zero_group)
			continue;
		slot = mix(s->g_hash[g]) & (nsize - 1);
		while (t[slot] != KN_NONE)
			slot = (slot + 1) & (nsize - 1);
		t[slot] = g;
	}
	kn_big_free(s->table, sizeof(uint32_t) * (s->table_mask + 1));
	s->table = t;
	s->table_mask = nsize - 1;
	return 0;
}

/* Page i of batch b (region r) belongs to group g: its group and where it lies. */
static int push_item(struct kn_scanner *s, const struct kn_region *r, const struct kn_slot *b, uint32_t i,
		     uint32_t g)
{
	uint64_t off = (b->addr[i] - r->start) >> s->page_shift;

	if (s->nitems == s->items_cap) {
		uint64_t ncap = s->items_cap ? s->items_cap * 2 : 65536;
		size_t old = sizeof(uint32_t) * s->items_cap, nbytes = sizeof(uint32_t) * ncap;
		uint32_t *n = kn_big_realloc(s->items, old, nbytes);
		uint32_t *o;

		if (!n)
			return -ENOMEM;
		s->items = n;
		o = kn_big_realloc(s->offs, old, nbytes);
		if (!o) {
			/* Both arrays share items_cap: give the grown one its old size back. */
			n = kn_big_realloc(s->items, nbytes, old);
			if (n)
				s->items = n;
			return -ENOMEM;
		}
		s->offs = o;
		s->items_cap = ncap;
	}
	s->offs[s->nitems] = ((uint32_t)off & KN_OFF_MASK) | (b->ksm[i] ? KN_OFF_KSM : 0);
	s->items[s->nitems++] = g;
	return 0;
}

/* A new group of hash h; extra is the hash's high half (128-bit mode) or the
 * first page's KN_WHERE (bytes mode). KN_NONE on ENOMEM. Not put in the table. */
static uint32_t new_group(struct kn_scanner *s, uint64_t h, uint64_t extra)
{
	uint64_t **extras = s->confirm_bytes ? &s->g_where : &s->g_hash_hi;
	uint32_t g;

	if (!*extras) {
		*extras = kn_big_realloc(NULL, 0, sizeof(uint64_t) * s->groups_cap);
		if (!*extras)
			return KN_NONE;
	}
	if (s->ngroups == s->groups_cap) {
		uint32_t ncap = s->groups_cap * 2;
		uint64_t *nh = kn_big_realloc(s->g_hash, sizeof(uint64_t) * s->groups_cap, sizeof(uint64_t) * ncap);
		uint64_t *nw;
		uint32_t *nc;

		if (!nh)
			return KN_NONE;
		s->g_hash = nh;
		nw = kn_big_realloc(*extras, sizeof(uint64_t) * s->groups_cap, sizeof(uint64_t) * ncap);
		if (!nw)
			return KN_NONE;
		*extras = nw;
		nc = kn_big_realloc(s->g_count, sizeof(uint32_t) * s->groups_cap, sizeof(uint32_t) * ncap);
		if (!nc)
			return KN_NONE;
		s->g_count = nc;
		s->groups_cap = ncap;
	}
	g = s->ngroups++;
	s->g_hash[g] = h;
	(*extras)[g] = extra;
	s->g_count[g] = 1;
	return g;
}

/* Put group g (hash h) in the table at its probe chain's first free slot. */
static int table_insert(struct kn_scanner *s, uint32_t g, uint64_t h)
{
	uint64_t slot = mix(h) & s->table_mask;

	while (s->table[slot] != KN_NONE)
		slot = (slot + 1) & s->table_mask;
	s->table[slot] = g;
	if ((uint64_t)s->ngroups * 2 > s->table_mask + 1)
		return grow_table(s);
	return 0;
}

static int push_ksm_pfn(struct kn_scanner *s, uint64_t pfn)
{
	if (s->nksm_pfns == s->ksm_pfns_cap) {
		uint64_t ncap = s->ksm_pfns_cap ? s->ksm_pfns_cap * 2 : 4096;
		uint64_t *n = kn_big_realloc(s->ksm_pfns, sizeof(uint64_t) * s->ksm_pfns_cap, sizeof(uint64_t) * ncap);

		if (!n)
			return -ENOMEM;
		s->ksm_pfns = n;
		s->ksm_pfns_cap = ncap;
	}
	s->ksm_pfns[s->nksm_pfns++] = pfn;
	return 0;
}

int kn_index_lookup(struct kn_scanner *s, struct kn_region *r, struct kn_slot *b)
{
	uint64_t t0 = now_ns();
	uint32_t shift = s->page_shift;

	b->ncand = 0;
	b->nnew = 0;
	b->first_new_group = s->ngroups;
	r->zero_mapped += b->zero_mapped;
	r->volatile_pages += b->volatile_pages;
	s->map_ns += b->map_ns;
	s->read_ns += b->read_ns;
	s->hash_ns += b->hash_ns;
	s->bytes_read += (uint64_t)b->n * s->page_size;
	/* The lookups are random accesses and would otherwise wait on memory one by one:
	 * table slots prefetched 16 pages ahead, and 8 ahead the hashes those slots name. */
	for (uint32_t i = 0; i < b->n && i < 16; i++)
		__builtin_prefetch(&s->table[mix(b->hash[i]) & s->table_mask]);
	for (uint32_t i = 0; i < b->n; i++) {
		uint64_t h = b->hash[i], where = KN_WHERE(r->proc, b->addr[i], shift);
		uint64_t extra = s->confirm_bytes ? where : b->hash_hi[i];
		uint64_t slot;
		uint32_t g;

		if (i + 16 < b->n)
			__builtin_prefetch(&s->table[mix(b->hash[i + 16]) & s->table_mask]);
		if (i + 8 < b->n) {
			uint32_t ahead = s->table[mix(b->hash[i + 8]) & s->table_mask];

			if (ahead != KN_NONE) {
				/* A duplicate also reads the high half and bumps the count: two
				 * more misses per page when most pages repeat, unless fetched now. */
				__builtin_prefetch(&s->g_hash[ahead]);
				__builtin_prefetch(&s->g_count[ahead], 1);
				if (!s->confirm_bytes)
					__builtin_prefetch(&s->g_hash_hi[ahead]);
			}
		}
		r->present++;
		if (b->ksm[i]) {
			r->ksm++;
			if (push_ksm_pfn(s, b->pfn[i]))
				return -ENOMEM;
		}
		if (b->is_zero[i]) {
			/* The bytes were checked: no confirmation needed. */
			r->zero++;
			if (s->zero_group == KN_NONE) {
				g = new_group(s, h, extra);
				if (g == KN_NONE)
					return -ENOMEM;
				s->zero_group = g;
				b->new_page[b->nnew++] = i;
			} else {
				g = s->zero_group;
				s->g_count[g]++;
			}
			if (push_item(s, r, b, i, g))
				return -ENOMEM;
			continue;
		}
		for (slot = mix(h) & s->table_mask; (g = s->table[slot]) != KN_NONE; slot = (slot + 1) & s->table_mask) {
			if (s->g_hash[g] != h)
				continue;
			if (s->confirm_bytes || s->g_hash_hi[g] == extra)
				break;
			s->hash_collisions++; /* 64 bits equal, 128 not: another content */
		}
		if (g != KN_NONE && !s->confirm_bytes) {
			s->g_count[g]++;
			if (push_item(s, r, b, i, g))
				return -ENOMEM;
			continue;
		}
		if (g != KN_NONE) {
			uint32_t k = b->ncand++;

			b->cand_page[k] = i;
			b->cand_group[k] = g;
			b->cand_where[k] = s->g_where[g];
			b->cand_local[k] = g - b->first_new_group < b->nnew ? b->new_page[g - b->first_new_group]
									     : KN_NONE;
			continue;
		}
		g = new_group(s, h, extra);
		if (g == KN_NONE)
			return -ENOMEM;
		b->new_page[b->nnew++] = i;
		s->table[slot] = g; /* the free slot the probe ended on */
		if ((uint64_t)s->ngroups * 2 > s->table_mask + 1 && grow_table(s))
			return -ENOMEM;
		if (push_item(s, r, b, i, g))
			return -ENOMEM;
	}
	s->index_ns += now_ns() - t0;
	return 0;
}

/* Is page p (of batch b) the content of group g? The slow path of a hash collision. */
static int same_as_group(struct kn_scanner *s, const struct kn_slot *b, uint32_t g, const unsigned char *p)
{
	unsigned char *tmp;
	uint64_t w = s->g_where[g];
	int same;

	if (g == s->zero_group)
		return kn_page_is_zero(p, s->page_size);
	if (g - b->first_new_group < b->nnew)
		return memcmp(b->buf + (size_t)b->new_page[g - b->first_new_group] * s->page_size, p, s->page_size) == 0;
	tmp = malloc(s->page_size);
	if (!tmp)
		return -ENOMEM;
	s->refetched++;
	same = kn_read_remote(s->procs[KN_WHERE_PROC(w)], KN_WHERE_ADDR(w, s->page_shift), tmp, s->page_size) == 0 &&
	       memcmp(tmp, p, s->page_size) == 0;
	free(tmp);
	return same;
}

/* Page i of batch b has hash h but not group g's bytes: find its group among the others with h, or found one. */
static uint32_t resolve_collision(struct kn_scanner *s, struct kn_region *r, const struct kn_slot *b, uint32_t i,
				  uint32_t g_seen)
{
	const unsigned char *p = b->buf + (size_t)i * s->page_size;
	uint64_t h = b->hash[i];
	uint32_t g;

	for (uint64_t slot = mix(h) & s->table_mask; (g = s->table[slot]) != KN_NONE;
	     slot = (slot + 1) & s->table_mask) {
		int same;

		if (g == g_seen || s->g_hash[g] != h)
			continue;
		same = same_as_group(s, b, g, p);
		if (same < 0)
			return KN_NONE;
		if (same) {
			s->g_count[g]++;
			return g;
		}
		s->hash_collisions++;
	}
	g = new_group(s, h, KN_WHERE(r->proc, b->addr[i], s->page_shift));
	if (g == KN_NONE || table_insert(s, g, h))
		return KN_NONE;
	return g;
}

int kn_index_commit(struct kn_scanner *s, struct kn_region *r, struct kn_slot *b)
{
	uint64_t t0 = now_ns();

	s->refetched += b->refetched;
	s->refetch_ns += b->refetch_ns;
	b->refetched = b->refetch_ns = 0;
	for (uint32_t k = 0; k < b->ncand; k++) {
		uint32_t g = b->cand_group[k], i = b->cand_page[k];

		switch (b->verdict[k]) {
		case KN_SAME:
			s->g_count[g]++;
			break;
		case KN_REPLACE:
			s->g_count[g]++;
			s->g_where[g] = KN_WHERE(r->proc, b->addr[i], s->page_shift);
			break;
		default:
			s->hash_collisions++;
			g = resolve_collision(s, r, b, i, g);
			if (g == KN_NONE)
				return -ENOMEM;
		}
		if (push_item(s, r, b, i, g))
			return -ENOMEM;
	}
	s->index_ns += now_ns() - t0;
	return 0;
}
