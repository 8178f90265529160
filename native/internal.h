/*
 * Shared between the scanner's C files; not part of the cffi interface.
 *
 * Memory is bounded per scanned page, whatever the contents: no page is ever
 * kept. Contents are told apart one of two ways (kn_scanner_set_confirm):
 *   - by their 128-bit xxh3 (the default): equal 128-bit hashes are one
 *     content. Over n pages the odds that any two different pages share a
 *     128-bit hash are at most n^2 / 2^129: about 2^-87 for 8 GiB of pages
 *     (n = 2^21), 2^-65 for 16 TiB (n = 2^32); far below the odds of a
 *     memory error flipping a bit of the scan. (KSM itself compares bytes
 *     before it merges: a false duplicate could only skew the estimate.)
 *   - byte by byte: a page whose 64-bit hash is known is compared with the
 *     content's first page, re-read from its process. Exact, at the cost of
 *     one more page read per duplicate, scattered: about 2.3 times the cost
 *     of a page read in a run here (1.45 against 0.63 us), which with
 *     duplicates mostly distinct contents ("guests of one image") holds the
 *     scan well below the copy bandwidth.
 * Either way:
 *   - one uint32 per scanned present page (its content group),
 *   - one more uint32 per scanned present page: its page offset within its
 *     region, the top bit set for a KSM page (kn_scanner_runs needs where
 *     each page lies: workers index batches in any order),
 *   - per distinct content 20 bytes: the hash's low 64 bits, a count, and
 *     the high 64 bits (128-bit mode) or where the first page lives (bytes),
 *   - a 4-byte-per-slot open-addressing table of group indexes, load 1/4..1/2
 *     (8 to 16 bytes per content),
 *   - 8 bytes per KSM page seen (to count distinct KSM frames).
 * At most 44 bytes per scanned page while scanning, 52 while the table grows
 * (old and new table both live), 28 while finishing (the table and the
 * group's 64-bit fields are freed first). Groups, offsets and counts outlive
 * finish (kn_scanner_runs reads them); runs of a region add, for the call's
 * length, 4 bytes per duplicate page of that region (16 per page at most).
 * Plus a fixed part: per worker two batch buffers (the batch, and the first
 * pages it re-reads).
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

/* A page's offset in its region (pages) in 31 bits, and whether it is a KSM
 * page in the top one: 8 TiB regions at 4 KiB pages. Larger regions scan as
 * before; only their runs are refused (-E2BIG). */
#define KN_OFF_KSM (1u << 31)
#define KN_OFF_MASK (KN_OFF_KSM - 1)

struct kn_region {
	int32_t pid;
	uint32_t check_ksm;
	uint32_t proc;             /* its process's index for KN_WHERE */
	uint64_t start, end;
	uint64_t scanned_to;      /* chunks must be scanned in order */
	uint64_t first_item, nitems;
	uint32_t too_big_for_runs; /* more pages than KN_OFF_MASK: offsets would not fit */
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
	uint64_t *hash_hi; /* 128-bit mode: the high halves */
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
	int confirm_bytes;  /* 1: duplicates confirmed by comparing bytes; 0: by 128-bit hash */
	uint64_t hash_mask; /* test hook: the 64-bit hash (the 128-bit one's low half) is and-ed with it */

	/* duplicate index: groups as parallel arrays (a lookup touches the hash only) */
	uint64_t *g_hash;
	uint64_t *g_hash_hi; /* 128-bit mode: the high 64 bits */
	uint64_t *g_where;   /* bytes mode: KN_WHERE of the first page, to re-read it */
	uint32_t *g_count;
	uint32_t ngroups, groups_cap;
	uint32_t zero_group; /* the all-zero content, KN_NONE until seen; never in the table */
	uint32_t *table;
	uint64_t table_mask;
	uint64_t hash_collisions, refetched, refetch_ns;

	/* processes, by KN_WHERE index */
	int32_t *procs;
	uint32_t nprocs, procs_cap;

	/* per page: its group, and its offset in its region (KN_OFF_*); both items_cap long */
	uint32_t *items;
	uint32_t *offs;
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

/* estimate.c: merging group g's pages would save some (KSM's rules, as the estimate counts). */
int kn_group_saves(const struct kn_scanner *s, uint32_t g);

/* bigmem.c: zero-filled arrays from mmap; p NULL (or old_bytes 0) allocates. NULL on ENOMEM, p intact. */
void *kn_big_realloc(void *p, size_t old_bytes, size_t new_bytes);
void kn_big_free(void *p, size_t bytes);

/* hash.c */
uint64_t kn_hash_page(const void *p, size_t n);
uint64_t kn_hash_page_avx2(const void *p, size_t n);
/* xxh3-128: the low 64 bits returned, the high ones in *high. */
uint64_t kn_hash_page128(const void *p, size_t n, uint64_t *high);
uint64_t kn_hash_page128_avx2(const void *p, size_t n, uint64_t *high);

/* scan.c */
int kn_read_remote(int pid, uint64_t addr, void *dst, size_t len);
int64_t kn_read_pages(int pid, const uint64_t *addr, uint32_t n, unsigned char *dst, uint32_t page);
/* The same through /proc/PID/mem (*memfd opened on first use): no pin, so KSM pages stay merged. */
int64_t kn_read_pages_mem(int pid, int *memfd, const uint64_t *addr, uint32_t n, unsigned char *dst,
			  uint32_t page);

#endif
