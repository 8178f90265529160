#define _GNU_SOURCE
/*
 * From the duplicate index to what KSM would save.
 *
 * KSM keeps one page per stable node and each stable node serves at most
 * max_page_sharing mappings (then a chain of duplicates starts), so a content
 * present n times costs ceil(n / max_page_sharing) pages after merging. With
 * use_zero_pages=1 zero pages are mapped to the shared zero page instead:
 * all n are saved. The saving of a content is shared out over its pages
 * equally, which makes region and process shares add up to the total.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static uint64_t saved_of(const struct kn_scanner *s, uint32_t g, uint64_t n)
{
	if (n == 0)
		return 0;
	if (g == s->zero_group && s->use_zero_pages)
		return n;
	return n - (n + s->max_page_sharing - 1) / s->max_page_sharing;
}

int kn_group_saves(const struct kn_scanner *s, uint32_t g)
{
	return saved_of(s, g, s->g_count[g]) > 0;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static int cmp_region_pid(const void *a, const void *b, void *ctx)
{
	const struct kn_region *r = ctx;
	uint32_t i = *(const uint32_t *)a, j = *(const uint32_t *)b;

	if (r[i].pid != r[j].pid)
		return r[i].pid < r[j].pid ? -1 : 1;
	return i < j ? -1 : i > j;
}

/* Add region r's pages to cnt[]; remember touched groups to sum and reset them. */
static void count_region(const struct kn_scanner *s, const struct kn_region *r, uint32_t *cnt, uint32_t *touched,
			 uint64_t *ntouched)
{
	for (uint64_t k = 0; k < r->nitems; k++) {
		uint32_t g = s->items[r->first_item + k];

		if (cnt[g]++ == 0)
			touched[(*ntouched)++] = g;
	}
}

/*
 * Bytes the index needed at its peak, from the final sizes (so the same for
 * any number of workers and any order of batches): while scanning, items,
 * groups, KSM frames and the table, one and a half times (the old table
 * lives while the new one fills); while finishing, the table, hashes and
 * first pages are freed and four counters per group are allocated.
 */
static uint64_t index_peak(const struct kn_scanner *s, uint64_t table_slots)
{
	uint64_t common = s->nitems * 8 + s->nksm_pfns * 8 + (uint64_t)s->ngroups * 4; /* group + offset */
	uint64_t scanning = common + (uint64_t)s->ngroups * 16 + table_slots * 4 * 3 / 2;
	uint64_t finishing = common + ((uint64_t)s->ngroups + 1) * 16;

	return scanning > finishing ? scanning : finishing;
}

int kn_scanner_finish(struct kn_scanner *s, struct kn_region_stats *rs, size_t nregions,
		      struct kn_process_stats *ps, size_t nprocs, struct kn_total_stats *t)
{
	uint64_t table_slots = s->table ? s->table_mask + 1 : s->finished_table_slots;
	size_t counters = sizeof(uint32_t) * ((size_t)s->ngroups + 1);
	uint32_t *creg;
	uint32_t *cproc;
	uint32_t *treg;
	uint32_t *tproc;
	uint32_t *order;
	size_t np = 0;
	int rc = 0;

	/* What only scanning needs goes before the counters below are allocated:
	 * they would otherwise add to the peak. No scan may follow. */
	s->finished = 1;
	s->finished_table_slots = table_slots;
	if (s->table)
		kn_big_free(s->table, sizeof(uint32_t) * (s->table_mask + 1));
	kn_big_free(s->g_hash, sizeof(uint64_t) * s->groups_cap);
	kn_big_free(s->g_hash_hi, sizeof(uint64_t) * s->groups_cap);
	kn_big_free(s->g_where, sizeof(uint64_t) * s->groups_cap);
	s->table = NULL;
	s->g_hash = s->g_hash_hi = s->g_where = NULL;
	creg = kn_big_realloc(NULL, 0, counters);
	cproc = kn_big_realloc(NULL, 0, counters);
	treg = kn_big_realloc(NULL, 0, counters);
	tproc = kn_big_realloc(NULL, 0, counters);
	order = malloc(sizeof(uint32_t) * (s->nregions + 1));

	if (nregions < s->nregions) {
		rc = -EINVAL;
		goto out;
	}
	if (!creg || !cproc || !treg || !tproc || !order) {
		rc = -ENOMEM;
		goto out;
	}
	memset(t, 0, sizeof(*t));
	memset(rs, 0, sizeof(*rs) * nregions);

	for (uint32_t g = 0; g < s->ngroups; g++) {
		t->saved += saved_of(s, g, s->g_count[g]);
		t->dup_groups += s->g_count[g] > 1;
	}
	t->distinct = s->ngroups;

	for (uint32_t i = 0; i < s->nregions; i++)
		order[i] = i;
	qsort_r(order, s->nregions, sizeof(uint32_t), cmp_region_pid, s->regions);

	for (uint32_t a = 0; a < s->nregions;) {
		uint32_t b = a;
		uint64_t ntp = 0;
		struct kn_process_stats *p;

		while (b < s->nregions && s->regions[order[b]].pid == s->regions[order[a]].pid)
			b++;
		if (np >= nprocs) {
			rc = -EINVAL;
			goto out;
		}
		p = &ps[np++];
		memset(p, 0, sizeof(*p));
		p->pid = s->regions[order[a]].pid;
		for (uint32_t k = a; k < b; k++)
			count_region(s, &s->regions[order[k]], cproc, tproc, &ntp);
		for (uint64_t k = 0; k < ntp; k++)
			p->saved_alone += saved_of(s, tproc[k], cproc[tproc[k]]);
		t->saved_within += p->saved_alone;

		for (uint32_t k = a; k < b; k++) {
			const struct kn_region *r = &s->regions[order[k]];
			struct kn_region_stats *o = &rs[order[k]];
			uint64_t ntr = 0;

			count_region(s, r, creg, treg, &ntr);
			for (uint64_t q = 0; q < r->nitems; q++) {
				uint32_t g = s->items[r->first_item + q], n = s->g_count[g];

				if (creg[g] > 1)
					o->dup_region++;
				else if (cproc[g] > 1)
					o->dup_process++;
				else if (n > 1)
					o->dup_cross++;
				o->saved_share += (double)saved_of(s, g, n) / n;
			}
			for (uint64_t q = 0; q < ntr; q++) {
				o->saved_alone += saved_of(s, treg[q], creg[treg[q]]);
				creg[treg[q]] = 0;
			}
			o->present = r->present;
			o->zero = r->zero;
			o->zero_mapped = r->zero_mapped;
			o->ksm = r->ksm;
			o->volatile_pages = r->volatile_pages;
			p->saved_share += o->saved_share;
			t->present += r->present;
			t->zero += r->zero;
			t->zero_mapped += r->zero_mapped;
			t->ksm += r->ksm;
			t->volatile_pages += r->volatile_pages;
		}
		for (uint64_t k = 0; k < ntp; k++)
			cproc[tproc[k]] = 0;
		a = b;
	}

	if (s->nksm_pfns) /* none seen: the array was never allocated */
		qsort(s->ksm_pfns, s->nksm_pfns, sizeof(uint64_t), cmp_u64);
	{
		uint64_t distinct = 0;

		for (uint64_t i = 0; i < s->nksm_pfns; i++)
			distinct += i == 0 || s->ksm_pfns[i] != s->ksm_pfns[i - 1];
		t->saved_now = s->nksm_pfns - distinct;
	}
	t->hash_collisions = s->hash_collisions;
	t->refetched = s->refetched;
	t->bytes_read = s->bytes_read;
	t->index_bytes = index_peak(s, table_slots);
	t->read_ns = s->read_ns;
	t->hash_ns = s->hash_ns;
	t->map_ns = s->map_ns;
	t->index_ns = s->index_ns;
	t->refetch_ns = s->refetch_ns;
out:
	kn_big_free(creg, counters);
	kn_big_free(cproc, counters);
	kn_big_free(treg, counters);
	kn_big_free(tproc, counters);
	free(order);
	return rc < 0 ? rc : (int)np;
}
