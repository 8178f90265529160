/*
 * Shared between the scanner's C files; not part of the cffi interface.
 *
 * Memory is bounded per scanned page, whatever the contents: no page is ever
 * kept. A duplicate candidate (equal 64-bit hash) is confirmed by re-reading
 * the content's first page from its process and comparing bytes. So:
 *   - one uint32 per scanned present page (its content group),
 *   - per distinct content 20 bytes (hash, where its first page lives, count),
 *   - a 4-byte-per-slot open-addressing table of group indexes, load 1/4..1/2
 *     (8 to 16 bytes per content),
 *   - 8 bytes per KSM page seen (to count distinct KSM frames).
 * At most 40 bytes per scanned page while scanning, 48 while the table grows
 * (old and new table both live), 24 while finishing (the table, hashes and
 * first-page addresses are freed first). Plus a fixed part: per worker two
 * batch buffers (the batch, and the first pages it re-reads).
 */
#ifndef KSMNATIVE_INTERNAL_H
#define KSMNATIVE_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "ksmnative.h"

#define KN_NONE UINT32_MAX

/* A page's location in 8 bytes: the scanner's process index above the page
 * number. 44 bits of page number cover 5-level paging's 2^56 user space;
 * 20 bits of process index allow a million processes in one scan. */
#define KN_WHERE_PAGE_BITS 44
#define KN_WHERE(proc, addr, shift) (((uint64_t)(proc) << KN_WHERE_PAGE_BITS) | ((addr) >> (shift)))
#define KN_WHERE_PROC(w) ((uint32_t)((w) >> KN_WHERE_PAGE_BITS))
#define KN_WHERE_ADDR(w, shift) (((w) & ((1ull << KN_WHERE_PAGE_BITS) - 1)) << (shift))
#define KN_MAX_PROCS (1u << (64 - KN_WHERE_PAGE_BITS))

struct kn_region {
	int32_t pid;
	uint32_t check_ksm;
	uint32_t proc;             /* its process's index for KN_WHERE */
	uint64_t start, end;
	uint64_t scanned_to;      /* chunks must be scanned in order */
	uint64_t first_item, nitems;
	uint64_t present, zero, zero_mapped, ksm, volatile_pages;
};

/* Workers that copy and hash batches in parallel, each its own: more than the
 * cores only adds switching, and the index, one batch at a time, is about a
 * fifth of the work: beyond four workers they would mostly wait for it. */
#define KN_MAX_WORKERS 4

/* What comparing a candidate with its group's first page found. */
enum kn_verdict {
	KN_SAME,     /* identical bytes: a duplicate */
	KN_REPLACE,  /* the first page changed or went away: this page becomes the witness */
	KN_DIFFERENT /* same hash, other bytes: a hash collision (resolved under the lock) */
};

/* One worker's batch: n pages copied contiguously into buf, and their hashes. */
struct kn_slot {
	unsigned char *buf;
	uint64_t *hash;
	uint64_t *pagemap;
	uint64_t *cand_addr, *cand_pfn;
	unsigned char *cand_ksm;
	uint64_t *addr, *pfn;
	unsigned char *ksm;
	unsigned char *is_zero; /* all bytes zero (worked out before the lock) */
	uint32_t n;
	uint32_t volatile_pages, zero_mapped;
	uint64_t map_ns, read_ns, hash_ns;

	/* Pages of this batch whose hash is already known: candidates to confirm.
	 * Filled under the lock (a copy of what the comparison needs, so that it
	 * can run without the lock while other workers grow the index). */
	uint32_t ncand;
	uint32_t *cand_page;   /* page of this batch */
	uint32_t *cand_group;  /* group it may belong to */
	uint64_t *cand_where;  /* that group's first page */
	uint32_t *cand_local;  /* KN_NONE, or the page of this batch that is the group's first */
	uint32_t *cand_fetch;  /* its copy in fetch_buf, or KN_NONE when unreadable */
	unsigned char *verdict;
	unsigned char *fetch_buf; /* the candidates' first pages, re-read */
	uint64_t *fetch_where;
	unsigned char *fetch_ok;  /* ... read in full */
	uint32_t *order;
	uint32_t first_new_group, nnew; /* groups created by this batch's lookup: [first, first + nnew) */
	uint32_t *new_page;       /* ... and their first pages in this batch */
	uint64_t refetched, refetch_ns;
};

struct kn_scanner {
	uint32_t page_size;
	uint32_t page_shift;
	uint32_t max_page_sharing;
	int use_zero_pages;
	int finished;              /* finish ran: the lookup structures are gone */
	uint64_t finished_table_slots;
	uint64_t zero_pfn;
	uint64_t zero_hash;
	uint64_t hash_mask; /* test hook: hashes are and-ed with it, to force collisions */

	/* duplicate index: groups as parallel arrays (a lookup touches the hash only) */
	uint64_t *g_hash;
	uint64_t *g_where; /* KN_WHERE of the first page, to re-read it */
	uint32_t *g_count;
	uint32_t ngroups, groups_cap;
	uint32_t zero_group; /* the all-zero content, KN_NONE until seen; never in the table */
	uint32_t *table;
	uint64_t table_mask;
	uint64_t hash_collisions, refetched, refetch_ns;

	/* processes, by KN_WHERE index */
	int32_t *procs;
	uint32_t nprocs, procs_cap;

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
	struct kn_slot *slots;
	int kpageflags_fd;
	int pagemap_fd;
	int pagemap_pid;
	int pagemap_scan; /* -1: the kernel has no PAGEMAP_SCAN (workers read it atomically) */

	uint64_t bytes_read;
	uint64_t read_ns, hash_ns, map_ns, index_ns;
};

/* dupindex.c */
int kn_index_init(struct kn_scanner *s);
void kn_index_free(struct kn_scanner *s);
int kn_slot_index_alloc(struct kn_scanner *s, struct kn_slot *b);
void kn_slot_index_free(struct kn_slot *b);
/* Process index of pid for KN_WHERE (added if new); KN_NONE when out of room. */
uint32_t kn_proc_index(struct kn_scanner *s, int pid);
/* The three steps of indexing batch b of region r; a and c under the index lock, b without. */
int kn_index_lookup(struct kn_scanner *s, struct kn_region *r, struct kn_slot *b);
void kn_index_confirm(const struct kn_scanner *s, struct kn_slot *b);
int kn_index_commit(struct kn_scanner *s, struct kn_region *r, struct kn_slot *b);
int kn_page_is_zero(const unsigned char *p, size_t n);

/* hash.c */
uint64_t kn_hash_page(const void *p, size_t n);
uint64_t kn_hash_page_avx2(const void *p, size_t n);

/* scan.c */
int kn_read_remote(int pid, uint64_t addr, void *dst, size_t len);
int64_t kn_read_pages(int pid, const uint64_t *addr, uint32_t n, unsigned char *dst, uint32_t page);

#endif
