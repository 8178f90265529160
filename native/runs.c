/*
 * Runs of duplicate pages: where in a region merging would pay.
 *
 * Making a whole mapping mergeable costs ksmd a visit to each of its pages on
 * every pass, forever, whether they merge or not; on a host a tenth of the
 * memory may repeat, in short runs among unique pages. So the coordinator
 * marks ranges around the runs instead, and this says where they are: from
 * what the scan kept per page (its group and its offset in the region, see
 * internal.h), after kn_scanner_finish has the final counts.
 *
 * A page counts as a duplicate by the rules the estimate saves by
 * (kn_group_saves: a content present twice or more in everything scanned,
 * zero pages alone with use_zero_pages), or when it is a KSM page already.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>

#include "internal.h"

static int cmp_off(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a & KN_OFF_MASK, y = *(const uint32_t *)b & KN_OFF_MASK;

	return x < y ? -1 : x > y;
}

int64_t kn_scanner_runs(struct kn_scanner *s, int region_idx, uint32_t max_gap_pages, struct kn_run *out,
			size_t cap)
{
	const struct kn_region *r;
	uint32_t *dup;
	uint64_t ndup = 0, nruns = 0;
	size_t bytes;

	if (!s->finished)
		return -EBUSY; /* counts are final only then */
	if (region_idx < 0 || (uint32_t)region_idx >= s->nregions)
		return -EINVAL;
	r = &s->regions[region_idx];
	if (r->too_big_for_runs)
		return -E2BIG;
	if (!r->nitems)
		return 0;
	/* Workers index batches in any order: the region's duplicate pages are
	 * gathered, then sorted by offset (4 bytes each, for this call only). */
	bytes = sizeof(uint32_t) * r->nitems;
	dup = kn_big_realloc(NULL, 0, bytes);
	if (!dup)
		return -ENOMEM;
	for (uint64_t k = 0; k < r->nitems; k++) {
		uint32_t off = s->offs[r->first_item + k];

		if ((off & KN_OFF_KSM) || kn_group_saves(s, s->items[r->first_item + k]))
			dup[ndup++] = off;
	}
	qsort(dup, ndup, sizeof(uint32_t), cmp_off);
	for (uint64_t k = 0; k < ndup;) {
		uint64_t first = dup[k] & KN_OFF_MASK, last = first, pages = 0, ksm = 0;

		/* Extend while the next duplicate is at most max_gap_pages past the last. */
		for (; k < ndup; k++) {
			uint64_t at = dup[k] & KN_OFF_MASK;

			if (pages && at - last - 1 > max_gap_pages)
				break;
			last = at;
			pages++;
			ksm += !!(dup[k] & KN_OFF_KSM);
		}
		if (nruns < cap) {
			out[nruns].start = r->start + (first << s->page_shift);
			out[nruns].end = r->start + ((last + 1) << s->page_shift);
			out[nruns].dup_pages = pages;
			out[nruns].ksm_pages = ksm;
		}
		nruns++;
	}
	kn_big_free(dup, bytes);
	return (int64_t)nruns;
}
