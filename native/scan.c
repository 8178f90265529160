/*
 * The page scanner: reads other processes' memory without stopping them.
 *
 * Per batch: one pagemap read says which pages are present (and their
 * frames), one process_vm_readv copies the present pages (runs of them as
 * one iovec each) into a buffer, then every page is hashed and put in the
 * duplicate index (dupindex.c: by 128-bit hash, or in bytes mode by
 * re-reading the first page of their content). Pages mapped to the shared
 * zero page cost no memory and are only counted. KPF_KSM is looked up only
 * where the caller says KSM pages can exist (VM_MERGEABLE regions):
 * kpageflags is the slow part.
 *
 * Over 400 lines: reading a batch (pagemap or PAGEMAP_SCAN, kpageflags, the
 * copy) and the workers that drive it share the scanner's private state and
 * helpers; the index (dupindex.c, confirm.c) and the arithmetic (estimate.c)
 * are apart.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define PM_PRESENT (1ULL << 63)
#define PM_PFN_MASK ((1ULL << 55) - 1)
#define KPF_KSM (1ULL << 21)
#define KPF_ZERO_PAGE (1ULL << 24)
#define FLAG_KSM 1
#define FLAG_ZERO 2
#define DEFAULT_BATCH_PAGES 256u

/* PAGEMAP_SCAN (see features.FEATURES["pagemap_scan"]; Debian 12's uapi headers are 6.1, hence here):
 * present pages as address ranges, the zero page flagged, in one ioctl. */
#define KN_PAGEMAP_SCAN _IOWR('f', 16, struct kn_pm_scan_arg)
#define KN_PAGE_IS_PRESENT (1ULL << 3)
#define KN_PAGE_IS_PFNZERO (1ULL << 5)
struct kn_page_region {
	uint64_t start, end, categories;
};
struct kn_pm_scan_arg {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
	uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define MAX_IOV 1024
#define KPF_WINDOW 512u

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int64_t pread_full(int fd, void *buf, size_t len, off_t off)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = pread(fd, (char *)buf + done, len - done, off + (off_t)done);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			break;
		done += (size_t)n;
	}
	return (int64_t)done;
}

int kn_read_remote(int pid, uint64_t addr, void *dst, size_t len)
{
	struct iovec local = { dst, len };
	struct iovec remote = { (void *)(uintptr_t)addr, len };
	ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);

	if (n < 0)
		return -errno;
	return (size_t)n == len ? 0 : -EFAULT;
}

/* The frame of the shared zero page, learnt from our own pagemap. */
static uint64_t find_zero_pfn(uint32_t page)
{
	volatile unsigned char *p = mmap(NULL, page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t e = 0;
	int fd;

	if (p == MAP_FAILED)
		return UINT64_MAX;
	madvise((void *)p, page, MADV_NOHUGEPAGE); /* the small zero page, never the huge one */
	(void)p[0]; /* a read fault maps the zero page */
	fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		if (pread_full(fd, &e, sizeof(e), (off_t)((uintptr_t)p / page * 8)) != sizeof(e))
			e = 0;
		close(fd);
	}
	munmap((void *)p, page);
	/* Without CAP_SYS_ADMIN frames read as 0: then no page is taken for the zero page. */
	return (e & PM_PRESENT) && (e & PM_PFN_MASK) ? (e & PM_PFN_MASK) : UINT64_MAX;
}

/* Buffers of the first nworkers slots that have none yet. */
static int alloc_slots(struct kn_scanner *s)
{
	size_t n = s->batch_pages;

	for (uint32_t i = 0; i < s->nworkers; i++) {
		struct kn_slot *b = &s->slots[i];

		if (b->buf)
			continue;
		b->buf = aligned_alloc(4096, n * s->page_size);
		b->hash = malloc(n * 8);
		b->pagemap = malloc(n * sizeof(struct kn_page_region)); /* entries, or PAGEMAP_SCAN regions */
		b->cand_addr = malloc(n * 8);
		b->cand_pfn = malloc(n * 8);
		b->cand_ksm = malloc(n);
		b->addr = malloc(n * 8);
		b->pfn = malloc(n * 8);
		b->ksm = malloc(n);
		if (!b->buf || !b->hash || !b->pagemap || !b->cand_addr || !b->cand_pfn || !b->cand_ksm ||
		    !b->addr || !b->pfn || !b->ksm || kn_slot_index_alloc(s, b))
			return -ENOMEM;
	}
	return 0;
}

static uint32_t default_workers(void)
{
	cpu_set_t set;
	int n;

	if (sched_getaffinity(0, sizeof(set), &set) != 0)
		return 1;
	n = CPU_COUNT(&set);
	return n < 1 ? 1 : n > KN_MAX_WORKERS ? KN_MAX_WORKERS : (uint32_t)n;
}

int kn_scanner_set_workers(struct kn_scanner *s, uint32_t workers)
{
	uint32_t old = s->nworkers;

	s->nworkers = workers ? (workers > KN_MAX_WORKERS ? KN_MAX_WORKERS : workers) : default_workers();
	if (alloc_slots(s) != 0) {
		s->nworkers = old;
		return -ENOMEM;
	}
	return (int)s->nworkers;
}

static int set_zero_hash(struct kn_scanner *s);

struct kn_scanner *kn_scanner_new(uint32_t max_page_sharing, int use_zero_pages, uint32_t batch_pages)
{
	struct kn_scanner *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	s->page_size = (uint32_t)sysconf(_SC_PAGESIZE);
	s->max_page_sharing = max_page_sharing < 2 ? 2 : max_page_sharing;
	s->use_zero_pages = use_zero_pages;
	s->batch_pages = batch_pages ? batch_pages : DEFAULT_BATCH_PAGES;
	if (s->batch_pages > MAX_IOV)
		s->batch_pages = MAX_IOV; /* one iovec per page at worst */
	s->page_shift = (uint32_t)__builtin_ctz(s->page_size);
	s->hash_mask = UINT64_MAX;
	s->kpageflags_fd = -1;
	s->pagemap_fd = -1;
	s->zero_pfn = find_zero_pfn(s->page_size);
	s->nworkers = default_workers();
	s->slots = calloc(KN_MAX_WORKERS, sizeof(*s->slots));
	if (!s->slots || alloc_slots(s) != 0 || kn_index_init(s) != 0 || set_zero_hash(s) != 0) {
		kn_scanner_free(s);
		return NULL;
	}
	return s;
}

void kn_scanner_free(struct kn_scanner *s)
{
	if (!s)
		return;
	kn_index_free(s);
	if (s->kpageflags_fd >= 0)
		close(s->kpageflags_fd);
	if (s->pagemap_fd >= 0)
		close(s->pagemap_fd);
	free(s->regions);
	for (int i = 0; s->slots && i < KN_MAX_WORKERS; i++) {
		struct kn_slot *b = &s->slots[i];

		free(b->buf);
		free(b->hash);
		free(b->pagemap);
		free(b->cand_addr);
		free(b->cand_pfn);
		free(b->cand_ksm);
		free(b->addr);
		free(b->pfn);
		free(b->ksm);
		kn_slot_index_free(b);
	}
	free(s->slots);
	free(s);
}

/* The zero page's hash as pages are hashed now (mode and mask). */
static int set_zero_hash(struct kn_scanner *s)
{
	unsigned char *zero = calloc(1, s->page_size);
	uint64_t high;

	if (!zero)
		return -ENOMEM;
	s->zero_hash = (s->confirm_bytes ? kn_hash_page(zero, s->page_size) : kn_hash_page128(zero, s->page_size, &high)) &
		       s->hash_mask;
	free(zero);
	return 0;
}

int kn_scanner_set_hash_mask(struct kn_scanner *s, uint64_t mask)
{
	if (s->nregions)
		return -EBUSY;
	s->hash_mask = mask;
	return set_zero_hash(s);
}

int kn_scanner_set_confirm(struct kn_scanner *s, int bytes)
{
	if (s->nregions)
		return -EBUSY;
	s->confirm_bytes = !!bytes;
	return set_zero_hash(s);
}

int kn_scanner_add_region(struct kn_scanner *s, int pid, uint64_t start, uint64_t end, int check_ksm)
{
	struct kn_region *r;
	uint32_t proc;

	if (s->finished || start >= end || start % s->page_size || end % s->page_size)
		return -EINVAL;
	proc = kn_proc_index(s, pid);
	if (proc == KN_NONE)
		return -ENOMEM;
	if (s->nregions == s->regions_cap) {
		uint32_t ncap = s->regions_cap ? s->regions_cap * 2 : 64;
		struct kn_region *n = realloc(s->regions, sizeof(*n) * ncap);

		if (!n)
			return -ENOMEM;
		s->regions = n;
		s->regions_cap = ncap;
	}
	r = &s->regions[s->nregions];
	memset(r, 0, sizeof(*r));
	r->pid = pid;
	r->start = start;
	r->end = end;
	r->scanned_to = start;
	r->check_ksm = !!check_ksm;
	r->proc = proc;
	r->first_item = s->nitems;
	r->too_big_for_runs = ((end - start) >> s->page_shift) > KN_OFF_MASK;
	return (int)s->nregions++;
}

static int open_pagemap(struct kn_scanner *s, int pid)
{
	char path[64];

	if (s->pagemap_fd >= 0 && s->pagemap_pid == pid)
		return 0;
	if (s->pagemap_fd >= 0)
		close(s->pagemap_fd);
	snprintf(path, sizeof(path), "/proc/%d/pagemap", pid);
	s->pagemap_fd = open(path, O_RDONLY | O_CLOEXEC);
	if (s->pagemap_fd < 0)
		return errno == ENOENT ? -ESRCH : -errno;
	s->pagemap_pid = pid;
	return 0;
}

struct pfn_idx {
	uint64_t pfn;
	uint32_t idx;
};

static int cmp_pfn(const void *a, const void *b)
{
	uint64_t x = ((const struct pfn_idx *)a)->pfn, y = ((const struct pfn_idx *)b)->pfn;

	return x < y ? -1 : x > y;
}

/* KPF_KSM (FLAG_KSM) and KPF_ZERO_PAGE (FLAG_ZERO, the huge zero page too) of n frames. Sorted first: neighbouring virtual pages often sit on
 * frames close together but in descending order, and one pread then serves many. */
static int ksm_flags(struct kn_scanner *s, const uint64_t *pfn, uint32_t n, unsigned char *is_ksm)
{
	static __thread struct pfn_idx sorted[MAX_IOV];
	uint64_t win[KPF_WINDOW];

	int fd = __atomic_load_n(&s->kpageflags_fd, __ATOMIC_ACQUIRE);

	if (fd < 0) {
		int expect = -1;

		fd = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			return -errno;
		/* Another worker may have opened it first: keep one. */
		if (!__atomic_compare_exchange_n(&s->kpageflags_fd, &expect, fd, 0, __ATOMIC_ACQ_REL,
						 __ATOMIC_ACQUIRE)) {
			close(fd);
			fd = expect;
		}
	}
	for (uint32_t i = 0; i < n; i++) {
		sorted[i].pfn = pfn[i];
		sorted[i].idx = i;
		is_ksm[i] = 0;
	}
	qsort(sorted, n, sizeof(sorted[0]), cmp_pfn);
	/* kpageflags costs per frame read, not per call: read each cluster's exact span. */
	for (uint32_t k = 0; k < n;) {
		uint64_t f = sorted[k].pfn;
		uint32_t e = k;
		int64_t got;

		if (!f) {
			k++;
			continue; /* frames hidden (no CAP_SYS_ADMIN) */
		}
		while (e + 1 < n && sorted[e + 1].pfn - f < KPF_WINDOW && sorted[e + 1].pfn - sorted[e].pfn <= 4)
			e++;
		got = pread_full(fd, win, (sorted[e].pfn - f + 1) * 8, (off_t)(f * 8));
		if (got < 0)
			return (int)got;
		for (; k <= e; k++)
			if ((sorted[k].pfn - f) * 8 < (uint64_t)got)
				is_ksm[sorted[k].idx] = ((win[sorted[k].pfn - f] & KPF_KSM) ? FLAG_KSM : 0) |
							((win[sorted[k].pfn - f] & KPF_ZERO_PAGE) ? FLAG_ZERO : 0);
	}
	return 0;
}

/* Copy the n pages at addr[] into dst; returns pages copied (a prefix) or -errno. */
int64_t kn_read_pages(int pid, const uint64_t *addr, uint32_t n, unsigned char *dst, uint32_t page)
{
	struct iovec local = { dst, (size_t)n * page };
	struct iovec remote[MAX_IOV];
	uint32_t nr = 0;
	ssize_t got;

	for (uint32_t i = 0; i < n; i++) {
		if (nr && (uint64_t)(uintptr_t)remote[nr - 1].iov_base + remote[nr - 1].iov_len == addr[i]) {
			remote[nr - 1].iov_len += page;
			continue;
		}
		remote[nr].iov_base = (void *)(uintptr_t)addr[i];
		remote[nr].iov_len = page;
		nr++;
	}
	got = process_vm_readv(pid, &local, 1, remote, nr, 0);
	if (got < 0)
		return errno == EFAULT ? 0 : -errno; /* EFAULT on the first page: it went away */
	return got / page;
}

/*
 * KSM pages are read through /proc/PID/mem, never process_vm_readv: the
 * latter pins the pages it reads (FOLL_PIN), and since Linux 5.19 a
 * read-only pin of an anonymous page that is not exclusive to one mapping
 * unshares it first (gup_must_unshare(): a copy, as on a write). A KSM page
 * is never exclusive, so reading it that way broke the very merge being
 * measured (cow_ksm went up by every KSM page scanned). /proc/PID/mem reads
 * with a plain reference (access_remote_vm), which shares nothing.
 * Returns the pages read (fewer: the next one went away) or -errno.
 */
int64_t kn_read_pages_mem(int pid, int *memfd, const uint64_t *addr, uint32_t n, unsigned char *dst,
			      uint32_t page)
{
	if (*memfd < 0) {
		char path[32];

		snprintf(path, sizeof(path), "/proc/%d/mem", pid);
		*memfd = open(path, O_RDONLY | O_CLOEXEC);
		if (*memfd < 0)
			return errno == ENOENT || errno == ESRCH ? 0 : -errno;
	}
	for (uint32_t k = 0; k < n; k++) {
		ssize_t got = pread(*memfd, dst + (size_t)k * page, page, (off_t)addr[k]);

		if (got != (ssize_t)page)
			return k; /* unmapped or the process exited meanwhile */
	}
	return n;
}

/*
 * Fill one slot with the batch at va: which pages are present (pagemap),
 * which are KSM pages, and their bytes. A page unmapped while we read it
 * makes process_vm_readv stop short: it is counted as volatile and the
 * rest is read after it.
 */
static int fill_slot(struct kn_scanner *s, const struct kn_region *r, uint64_t va, uint32_t want,
		     struct kn_slot *b)
{
	uint64_t t0 = now_ns(), t1;
	uint32_t m = 0, i = 0;
	int64_t got;
	int memfd = -1;

	b->n = b->volatile_pages = b->zero_mapped = 0;
	if (!r->check_ksm && __atomic_load_n(&s->pagemap_scan, __ATOMIC_RELAXED) >= 0) {
		/* No frame numbers needed (no KSM pages outside VM_MERGEABLE): ask for ranges. */
		struct kn_page_region *vec = (struct kn_page_region *)b->pagemap;
		struct kn_pm_scan_arg a = {
			.size = sizeof(a),
			.start = va,
			.end = va + (uint64_t)want * s->page_size,
			.vec = (uint64_t)(uintptr_t)vec,
			.vec_len = want, /* b->pagemap has room for one region per page */
			.category_mask = KN_PAGE_IS_PRESENT,
			.return_mask = KN_PAGE_IS_PRESENT | KN_PAGE_IS_PFNZERO,
		};
		int nr = ioctl(s->pagemap_fd, KN_PAGEMAP_SCAN, &a);

		if (nr >= 0 && a.walk_end == a.end) {
			for (int k = 0; k < nr; k++) {
				uint64_t pages = (vec[k].end - vec[k].start) / s->page_size;

				if (vec[k].categories & KN_PAGE_IS_PFNZERO) {
					b->zero_mapped += (uint32_t)pages;
					continue;
				}
				for (uint64_t q = 0; q < pages; q++) {
					b->cand_addr[m] = vec[k].start + q * s->page_size;
					b->cand_pfn[m] = 0;
					m++;
				}
			}
			goto read;
		}
		if (nr < 0 && errno == ENOTTY)
			__atomic_store_n(&s->pagemap_scan, -1, __ATOMIC_RELAXED); /* before 6.7: entries from now on */
		else if (nr < 0 && (errno == ESRCH || errno == ENOENT))
			return -ESRCH;
		/* anything else: this batch from pagemap entries */
		b->zero_mapped = 0;
		m = 0;
	}
	got = pread_full(s->pagemap_fd, b->pagemap, (size_t)want * 8, (off_t)(va / s->page_size * 8));
	if (got < 0)
		return got == -ENOENT ? -ESRCH : (int)got;
	if ((uint64_t)got < (uint64_t)want * 8)
		return -ESRCH; /* pagemap of an exited process reads short */
	for (uint32_t k = 0; k < want; k++) {
		uint64_t e = b->pagemap[k], pfn = e & PM_PFN_MASK;

		if (!(e & PM_PRESENT))
			continue;
		if (pfn && pfn == s->zero_pfn) {
			b->zero_mapped++;
			continue;
		}
		b->cand_addr[m] = va + (uint64_t)k * s->page_size;
		b->cand_pfn[m] = pfn;
		m++;
	}
	if (r->check_ksm && m) {
		int rc = ksm_flags(s, b->cand_pfn, m, b->cand_ksm);
		uint32_t kept = 0;

		if (rc)
			return rc;
		/* Where frames are looked up anyway, KPF_ZERO_PAGE also catches the huge zero page. */
		for (uint32_t k = 0; k < m; k++) {
			if (b->cand_ksm[k] & FLAG_ZERO) {
				b->zero_mapped++;
				continue;
			}
			b->cand_addr[kept] = b->cand_addr[k];
			b->cand_pfn[kept] = b->cand_pfn[k];
			b->cand_ksm[kept] = b->cand_ksm[k] & FLAG_KSM;
			kept++;
		}
		m = kept;
	}
read:
	t1 = now_ns();
	b->map_ns = t1 - t0;
	while (i < m) {
		/* A run of KSM pages, or of other pages: see kn_read_pages_mem() for why they differ. */
		int ksm = r->check_ksm && (b->cand_ksm[i] & FLAG_KSM);
		uint32_t run = 1;
		unsigned char *dst = b->buf + (size_t)b->n * s->page_size;

		while (i + run < m && (r->check_ksm && (b->cand_ksm[i + run] & FLAG_KSM)) == ksm)
			run++;
		got = ksm ? kn_read_pages_mem(r->pid, &memfd, b->cand_addr + i, run, dst, s->page_size)
			  : kn_read_pages(r->pid, b->cand_addr + i, run, dst, s->page_size);
		if (got < 0) {
			if (memfd >= 0)
				close(memfd);
			return (int)got;
		}
		for (uint32_t k = 0; k < (uint32_t)got; k++, i++, b->n++) {
			b->addr[b->n] = b->cand_addr[i];
			b->pfn[b->n] = b->cand_pfn[i];
			b->ksm[b->n] = r->check_ksm ? b->cand_ksm[i] : 0;
		}
		if ((uint32_t)got < run) {
			b->volatile_pages++;
			i++;
		}
	}
	if (memfd >= 0)
		close(memfd);
	b->read_ns = now_ns() - t1;
	return 0;
}

/*
 * The workers of one kn_scanner_scan call. Each takes the next batch, reads
 * its pagemap, copies its pages and hashes them at once, while they are still
 * in this core's cache, then looks them up in the index under the lock (in
 * bytes mode, confirms candidates without it, and takes the lock again to
 * commit them). The copy is most of the work and runs on every worker at the
 * same time; the index is one structure and takes a batch at a time. Hashing
 * right after the copy matters: a page hashed on another core than the one
 * that copied it (a reader thread and a hashing one, as this was before) is
 * read again from L3 or memory.
 */
struct crew {
	struct kn_scanner *s;
	struct kn_region *r;
	uint64_t start, end;
	uint32_t total; /* batches in [start, end) */
	uint32_t next;  /* next batch to take */
	int err;        /* first -errno; every worker stops at it */
	pthread_mutex_t index_lock;
};

struct worker {
	struct crew *c;
	struct kn_slot *b;
};

static void *work(void *arg)
{
	struct worker *w = arg;
	struct crew *c = w->c;
	struct kn_scanner *s = c->s;
	struct kn_slot *b = w->b;

	while (!__atomic_load_n(&c->err, __ATOMIC_RELAXED)) {
		uint32_t k = __atomic_fetch_add(&c->next, 1, __ATOMIC_RELAXED);
		uint64_t va = c->start + (uint64_t)k * s->batch_pages * s->page_size;
		uint32_t want;
		int rc;

		if (k >= c->total)
			break;
		want = (uint32_t)((c->end - va) / s->page_size);
		if (want > s->batch_pages)
			want = s->batch_pages;
		rc = fill_slot(s, c->r, va, want, b);
		if (rc == 0) {
			uint64_t t0 = now_ns();

			for (uint32_t i = 0; i < b->n; i++) {
				const unsigned char *p = b->buf + (size_t)i * s->page_size;

				b->hash[i] = s->confirm_bytes ? kn_hash_page(p, s->page_size)
							      : kn_hash_page128(p, s->page_size, &b->hash_hi[i]);
				b->hash[i] &= s->hash_mask;
				/* Zero pages need no confirmation: their bytes are checked here, in cache. */
				b->is_zero[i] = b->hash[i] == s->zero_hash && kn_page_is_zero(p, s->page_size);
			}
			b->hash_ns = now_ns() - t0;
		}
		pthread_mutex_lock(&c->index_lock);
		if (rc == 0 && !c->err)
			rc = kn_index_lookup(s, c->r, b);
		if (rc && !c->err)
			__atomic_store_n(&c->err, rc, __ATOMIC_RELAXED);
		pthread_mutex_unlock(&c->index_lock);
		if (rc)
			break;
		if (!b->ncand)
			continue; /* 128-bit mode always; bytes mode when every hash was new */
		/* Re-reading first pages and comparing bytes is most of the index's work
		 * when duplicates abound: outside the lock, every worker does its own. */
		kn_index_confirm(s, b);
		pthread_mutex_lock(&c->index_lock);
		if (!c->err)
			rc = kn_index_commit(s, c->r, b);
		if (rc && !c->err)
			__atomic_store_n(&c->err, rc, __ATOMIC_RELAXED);
		pthread_mutex_unlock(&c->index_lock);
		if (rc)
			break;
	}
	return NULL;
}

int kn_scanner_scan(struct kn_scanner *s, int idx, uint64_t start, uint64_t end)
{
	struct crew c = { .s = s, .start = start, .end = end };
	struct worker w[KN_MAX_WORKERS];
	pthread_t th[KN_MAX_WORKERS];
	uint64_t batch_bytes = (uint64_t)s->batch_pages * s->page_size;
	uint32_t nw, started = 0;
	sigset_t all, old;
	struct kn_region *r;
	int rc;

	if (s->finished || idx < 0 || (uint32_t)idx != s->nregions - 1)
		return -EINVAL; /* regions in order: their pages are one contiguous run of items */
	r = &s->regions[idx];
	if (start != r->scanned_to || end > r->end || start > end || start % s->page_size || end % s->page_size)
		return -EINVAL;
	rc = open_pagemap(s, r->pid);
	if (rc)
		return rc;
	c.r = r;
	c.total = (uint32_t)((end - start + batch_bytes - 1) / batch_bytes);
	nw = s->nworkers < c.total ? s->nworkers : c.total;
	if (nw == 0)
		nw = 1; /* an empty range: the caller's worker finds nothing to take */
	pthread_mutex_init(&c.index_lock, NULL);
	/* Signals stay with the caller's thread (Python handles them there). */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	for (uint32_t i = 0; i < nw; i++) {
		w[i] = (struct worker){ .c = &c, .b = &s->slots[i] };
		/* Worker 0 is the caller; a thread that cannot start leaves its share to the others. */
		if (i > 0 && pthread_create(&th[started + 1], NULL, work, &w[i]) == 0)
			started++;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	work(&w[0]);
	for (uint32_t i = 1; i <= started; i++)
		pthread_join(th[i], NULL);
	pthread_mutex_destroy(&c.index_lock);
	rc = c.err;
	if (rc == 0) {
		r->scanned_to = end;
		r->nitems = s->nitems - r->first_item;
	}
	return rc;
}

int64_t kn_copy_bandwidth(int pid, uint64_t start, uint64_t end, uint32_t batch_pages)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t chunk = (size_t)(batch_pages ? batch_pages : DEFAULT_BATCH_PAGES) * page;
	unsigned char *buf = aligned_alloc(4096, chunk);
	int64_t total = 0;

	if (!buf)
		return -ENOMEM;
	for (uint64_t va = start; va < end;) {
		size_t len = end - va < chunk ? (size_t)(end - va) : chunk;
		struct iovec local = { buf, len };
		struct iovec remote = { (void *)(uintptr_t)va, len };
		ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);

		if (n <= 0) {
			int e = n < 0 ? errno : EFAULT;

			free(buf);
			return -e;
		}
		total += n;
		va += (uint64_t)n;
	}
	free(buf);
	return total;
}
