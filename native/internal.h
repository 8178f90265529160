/*
 * Shared between the scanner's C files; not part of the cffi interface.
 *
 * Memory layout, chosen to stay small next to the memory being scanned:
 *   - one uint32 per scanned present page (its content group),
 *   - one 32-byte group record per distinct content,
 *   - a 4-byte-per-slot open-addressing table (load <= 1/2) of group indexes,
 *   - one 4 KiB representative copy per content seen at least twice
 *     (the bytes every later candidate is compared with).
 * For a GiB of unique pages that is about 12 MiB.
 */
#ifndef KSMNATIVE_INTERNAL_H
#define KSMNATIVE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "ksmnative.h"

#define KN_NONE UINT32_MAX
#define KN_REP_ZERO (UINT32_MAX - 1)

struct kn_group {
	uint64_t hash;
	uint64_t first_addr; /* where it was first seen, to fetch it on the second sighting */
	int32_t first_pid;
	uint32_t count;
	uint32_t rep;        /* index into the representative store, or KN_NONE / KN_REP_ZERO */
	uint32_t batch_seq;  /* first seen in this batch ... */
	uint32_t batch_idx;  /* ... at this page of the batch buffer */
	uint32_t fetch_slot; /* its first page in the fetch buffer, if fetch_group[] says so */
};

struct kn_region {
	int32_t pid;
	uint32_t check_ksm;
	uint64_t start, end;
	uint64_t scanned_to;      /* chunks must be scanned in order */
	uint64_t first_item, nitems;
	uint64_t present, zero, zero_mapped, ksm, volatile_pages;
};

/* Workers that copy and hash batches in parallel, each its own: more than the
 * cores only adds switching, and the index, one batch at a time, is about a
 * fifth of the work: beyond four workers they would mostly wait for it. */
#define KN_MAX_WORKERS 4

/* One worker's batch: n pages copied contiguously into buf, and their hashes. */
struct kn_slot {
	unsigned char *buf;
	uint64_t *hash;
	uint64_t *pagemap;
	uint64_t *cand_addr, *cand_pfn;
	unsigned char *cand_ksm;
	uint64_t *addr, *pfn;
	unsigned char *ksm;
	uint32_t n;
	uint32_t volatile_pages, zero_mapped;
	uint64_t map_ns, read_ns, hash_ns;
};

struct kn_scanner {
	uint32_t page_size;
	uint32_t max_page_sharing;
	int use_zero_pages;
	uint64_t zero_pfn;
	uint64_t zero_hash;

	/* duplicate index */
	struct kn_group *groups;
	uint32_t ngroups, groups_cap;
	uint32_t *table;
	uint64_t table_mask;
	unsigned char **rep_chunks;
	uint32_t nreps, rep_chunks_cap;
	uint64_t rep_limit; /* beyond this many representatives, re-read instead of keeping copies */
	uint64_t hash_confirms, hash_collisions, rep_fetches;
	/* First pages fetched for the batch being indexed: all in one process_vm_readv per process */
	unsigned char *fetch_buf;
	uint32_t *fetch_group;
	uint64_t *fetch_addr;
	unsigned char *fetch_ok;
	uint32_t nfetch;

	/* per page: its group */
	uint32_t *items;
	uint64_t nitems, items_cap;

	struct kn_region *regions;
	uint32_t nregions, regions_cap;

	/* KSM frames seen, to tell mappings of one KSM page from distinct ones */
	uint64_t *ksm_pfns;
	uint64_t nksm_pfns, ksm_pfns_cap;

	/* batch buffers: one per worker (KN_MAX_WORKERS, the first nworkers allocated) */
	uint32_t batch_pages;
	uint32_t nworkers;
	uint32_t batch_seq;
	const unsigned char *buf; /* the batch being indexed (first sightings are fetched from it) */
	struct kn_slot *slots;
	int kpageflags_fd;
	int pagemap_fd;
	int pagemap_pid;
	int pagemap_scan; /* -1: the kernel has no PAGEMAP_SCAN (workers read it atomically) */

	uint64_t bytes_read;
	uint64_t read_ns, hash_ns, map_ns;
};

/* dupindex.c */
int kn_index_init(struct kn_scanner *s);
void kn_index_free(struct kn_scanner *s);
/* Group of one page (bytes p, hash h, at pid/addr, index idx of the current batch); KN_NONE on ENOMEM. */
uint32_t kn_index_add(struct kn_scanner *s, const unsigned char *p, uint64_t h, int pid, uint64_t addr,
		      uint32_t idx);
/* Fetch the first pages the n hashes of the batch being indexed will need. */
void kn_index_fetch_firsts(struct kn_scanner *s, const uint64_t *hash, uint32_t n);
void kn_index_prefetch_slot(const struct kn_scanner *s, uint64_t h);
void kn_index_prefetch_group(const struct kn_scanner *s, uint64_t h);
int kn_page_is_zero(const unsigned char *p, size_t n);

/* hash.c */
uint64_t kn_hash_page(const void *p, size_t n);
uint64_t kn_hash_page_avx2(const void *p, size_t n);

/* scan.c */
int kn_read_remote(int pid, uint64_t addr, void *dst, size_t len);
int64_t kn_read_pages(int pid, const uint64_t *addr, uint32_t n, unsigned char *dst, uint32_t page);

#endif
