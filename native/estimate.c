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

static uint64_t saved_of(const struct kn_scanner *s, const struct kn_group *g, uint64_t n)
{
	if (n == 0)
		return 0;
	if (g->rep == KN_REP_ZERO && s->use_zero_pages)
		return n;
	return n - (n + s->max_page_sharing - 1) / s->max_page_sharing;
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

int kn_scanner_finish(struct kn_scanner *s, struct kn_region_stats *rs, size_t nregions,
		      struct kn_process_stats *ps, size_t nprocs, struct kn_total_stats *t)
{
	uint32_t *creg = calloc(s->ngroups + 1, sizeof(uint32_t));
	uint32_t *cproc = calloc(s->ngroups + 1, sizeof(uint32_t));
	uint32_t *treg = malloc(sizeof(uint32_t) * (s->ngroups + 1));
	uint32_t *tproc = malloc(sizeof(uint32_t) * (s->ngroups + 1));
	uint32_t *order = malloc(sizeof(uint32_t) * (s->nregions + 1));
	size_t np = 0;
	int rc = 0;

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
		const struct kn_group *gr = &s->groups[g];

		t->saved += saved_of(s, gr, gr->count);
		t->dup_groups += gr->count > 1;
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
			p->saved_alone += saved_of(s, &s->groups[tproc[k]], cproc[tproc[k]]);
		t->saved_within += p->saved_alone;

		for (uint32_t k = a; k < b; k++) {
			const struct kn_region *r = &s->regions[order[k]];
			struct kn_region_stats *o = &rs[order[k]];
			uint64_t ntr = 0;

			count_region(s, r, creg, treg, &ntr);
			for (uint64_t q = 0; q < r->nitems; q++) {
				uint32_t g = s->items[r->first_item + q];
				const struct kn_group *gr = &s->groups[g];

				if (creg[g] > 1)
					o->dup_region++;
				else if (cproc[g] > 1)
					o->dup_process++;
				else if (gr->count > 1)
					o->dup_cross++;
				o->saved_share += (double)saved_of(s, gr, gr->count) / gr->count;
			}
			for (uint64_t q = 0; q < ntr; q++) {
				o->saved_alone += saved_of(s, &s->groups[treg[q]], creg[treg[q]]);
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
	t->rep_fetches = s->rep_fetches;
	t->bytes_read = s->bytes_read;
	t->index_bytes = (uint64_t)s->groups_cap * sizeof(struct kn_group) + (s->table_mask + 1) * 4 +
			 s->items_cap * 4 + (uint64_t)s->nreps * s->page_size + s->ksm_pfns_cap * 8;
	t->read_ns = s->read_ns;
	t->hash_ns = s->hash_ns;
	t->map_ns = s->map_ns;
out:
	free(creg);
	free(cproc);
	free(treg);
	free(tproc);
	free(order);
	return rc < 0 ? rc : (int)np;
}
