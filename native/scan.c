/*
 * The page scanner: reads other processes' memory without stopping them.
 *
 * Per batch: one pagemap read says which pages are present (and their
 * frames), one process_vm_readv copies the present pages (runs of them as
 * one iovec each) into a buffer, then every page is hashed and put in the
 * duplicate index. Pages mapped to the shared zero page cost no memory and
 * are only counted. KPF_KSM is looked up only where the caller says KSM
 * pages can exist (VM_MERGEABLE regions): kpageflags is the slow part.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define PM_PRESENT (1ULL << 63)
#define PM_PFN_MASK ((1ULL << 55) - 1)
#define KPF_KSM (1ULL << 21)
#define DEFAULT_BATCH_PAGES 256u
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

struct kn_scanner *kn_scanner_new(uint32_t max_page_sharing, int use_zero_pages, uint32_t batch_pages)
{
	struct kn_scanner *s = calloc(1, sizeof(*s));
	unsigned char *zero;

	if (!s)
		return NULL;
	s->page_size = (uint32_t)sysconf(_SC_PAGESIZE);
	s->max_page_sharing = max_page_sharing < 2 ? 2 : max_page_sharing;
	s->use_zero_pages = use_zero_pages;
	s->batch_pages = batch_pages ? batch_pages : DEFAULT_BATCH_PAGES;
	if (s->batch_pages > MAX_IOV)
		s->batch_pages = MAX_IOV; /* one iovec per page at worst */
	s->rep_limit = (512ull << 20) / s->page_size;
	s->kpageflags_fd = -1;
	s->pagemap_fd = -1;
	s->zero_pfn = find_zero_pfn(s->page_size);
	s->buf = aligned_alloc(4096, (size_t)s->batch_pages * s->page_size);
	s->pagemap = malloc(sizeof(uint64_t) * s->batch_pages);
	s->batch_addr = malloc(sizeof(uint64_t) * s->batch_pages);
	s->batch_pfn = malloc(sizeof(uint64_t) * s->batch_pages);
	zero = calloc(1, s->page_size);
	if (!s->buf || !s->pagemap || !s->batch_addr || !s->batch_pfn || !zero || kn_index_init(s) != 0) {
		free(zero);
		kn_scanner_free(s);
		return NULL;
	}
	s->zero_hash = kn_hash_page(zero, s->page_size);
	free(zero);
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
	free(s->items);
	free(s->regions);
	free(s->ksm_pfns);
	free(s->buf);
	free(s->pagemap);
	free(s->batch_addr);
	free(s->batch_pfn);
	free(s);
}

int kn_scanner_add_region(struct kn_scanner *s, int pid, uint64_t start, uint64_t end, int check_ksm)
{
	struct kn_region *r;

	if (start >= end || start % s->page_size || end % s->page_size)
		return -EINVAL;
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
	r->first_item = s->nitems;
	return (int)s->nregions++;
}

static int push_item(struct kn_scanner *s, uint32_t g)
{
	if (s->nitems == s->items_cap) {
		uint64_t ncap = s->items_cap ? s->items_cap * 2 : 65536;
		uint32_t *n = realloc(s->items, sizeof(uint32_t) * ncap);

		if (!n)
			return -ENOMEM;
		s->items = n;
		s->items_cap = ncap;
	}
	s->items[s->nitems++] = g;
	return 0;
}

static int push_ksm_pfn(struct kn_scanner *s, uint64_t pfn)
{
	if (s->nksm_pfns == s->ksm_pfns_cap) {
		uint64_t ncap = s->ksm_pfns_cap ? s->ksm_pfns_cap * 2 : 4096;
		uint64_t *n = realloc(s->ksm_pfns, sizeof(uint64_t) * ncap);

		if (!n)
			return -ENOMEM;
		s->ksm_pfns = n;
		s->ksm_pfns_cap = ncap;
	}
	s->ksm_pfns[s->nksm_pfns++] = pfn;
	return 0;
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

/* KPF_KSM of n frames. Sorted first: neighbouring virtual pages often sit on
 * frames close together but in descending order, and one pread then serves many. */
static int ksm_flags(struct kn_scanner *s, const uint64_t *pfn, uint32_t n, unsigned char *is_ksm)
{
	static __thread struct pfn_idx sorted[MAX_IOV];
	uint64_t win[KPF_WINDOW];

	if (s->kpageflags_fd < 0) {
		s->kpageflags_fd = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
		if (s->kpageflags_fd < 0)
			return -errno;
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
		got = pread_full(s->kpageflags_fd, win, (sorted[e].pfn - f + 1) * 8, (off_t)(f * 8));
		if (got < 0)
			return (int)got;
		for (; k <= e; k++)
			if ((sorted[k].pfn - f) * 8 < (uint64_t)got)
				is_ksm[sorted[k].idx] = (win[sorted[k].pfn - f] & KPF_KSM) != 0;
	}
	return 0;
}

/* Copy the n pages at s->batch_addr into s->buf; returns pages copied (a prefix). */
static int64_t read_batch(int pid, struct kn_scanner *s, uint32_t n)
{
	struct iovec local = { s->buf, (size_t)n * s->page_size };
	struct iovec remote[MAX_IOV];
	uint32_t nr = 0;
	ssize_t got;

	for (uint32_t i = 0; i < n; i++) {
		if (nr && (uint64_t)(uintptr_t)remote[nr - 1].iov_base + remote[nr - 1].iov_len == s->batch_addr[i]) {
			remote[nr - 1].iov_len += s->page_size;
			continue;
		}
		if (nr == MAX_IOV) {
			n = i; /* caller keeps batches below this; be safe anyway */
			local.iov_len = (size_t)n * s->page_size;
			break;
		}
		remote[nr].iov_base = (void *)(uintptr_t)s->batch_addr[i];
		remote[nr].iov_len = s->page_size;
		nr++;
	}
	got = process_vm_readv(pid, &local, 1, remote, nr, 0);
	if (got < 0) {
		/* EFAULT on the very first page: it went away; the rest may not have. */
		return errno == EFAULT ? 0 : -errno;
	}
	return got / s->page_size;
}

int kn_scanner_scan(struct kn_scanner *s, int idx, uint64_t start, uint64_t end)
{
	struct kn_region *r;
	unsigned char is_ksm[MAX_IOV];
	int rc;

	if (idx < 0 || (uint32_t)idx != s->nregions - 1)
		return -EINVAL; /* regions in order: their pages are one contiguous run of items */
	r = &s->regions[idx];
	if (start != r->scanned_to || end > r->end || start > end)
		return -EINVAL;
	rc = open_pagemap(s, r->pid);
	if (rc)
		return rc;

	for (uint64_t va = start; va < end;) {
		uint32_t want = (uint32_t)((end - va) / s->page_size);
		uint32_t n = 0, copied, done;
		uint64_t t0, t1, t2;
		int64_t got;

		if (want > s->batch_pages)
			want = s->batch_pages;
		t0 = now_ns();
		got = pread_full(s->pagemap_fd, s->pagemap, (size_t)want * 8, (off_t)(va / s->page_size * 8));
		if (got < 0)
			return got == -ENOENT ? -ESRCH : (int)got;
		if ((uint64_t)got < (uint64_t)want * 8) {
			/* pagemap of an exited process reads empty */
			if (kill(r->pid, 0) != 0 && errno == ESRCH)
				return -ESRCH;
			want = (uint32_t)(got / 8);
			if (!want)
				return -ESRCH;
		}
		for (uint32_t i = 0; i < want; i++) {
			uint64_t e = s->pagemap[i];
			uint64_t pfn = e & PM_PFN_MASK;

			if (!(e & PM_PRESENT))
				continue;
			if (pfn && pfn == s->zero_pfn) {
				r->zero_mapped++;
				continue;
			}
			s->batch_addr[n] = va + (uint64_t)i * s->page_size;
			s->batch_pfn[n] = pfn;
			n++;
		}
		va += (uint64_t)want * s->page_size;
		if (!n)
			continue;
		if (r->check_ksm) {
			rc = ksm_flags(s, s->batch_pfn, n, is_ksm);
			if (rc)
				return rc;
		}
		t1 = now_ns();
		s->map_ns += t1 - t0;

		/* A short read means a page vanished (unmapped meanwhile): count it and go on after it. */
		for (done = 0; done < n;) {
			uint32_t rest = n - done;

			memmove(s->batch_addr, s->batch_addr + done, sizeof(uint64_t) * rest);
			memmove(s->batch_pfn, s->batch_pfn + done, sizeof(uint64_t) * rest);
			if (r->check_ksm)
				memmove(is_ksm, is_ksm + done, rest);
			n = rest;
			done = 0;
			t1 = now_ns();
			got = read_batch(r->pid, s, n);
			if (got < 0)
				return (int)got;
			copied = (uint32_t)got;
			t2 = now_ns();
			s->read_ns += t2 - t1;
			s->bytes_read += (uint64_t)copied * s->page_size;
			s->batch_seq++;
			for (uint32_t i = 0; i < copied; i++) {
				const unsigned char *p = s->buf + (size_t)i * s->page_size;
				uint64_t h = kn_hash_page(p, s->page_size);
				uint32_t g = kn_index_add(s, p, h, r->pid, s->batch_addr[i], i);

				if (g == KN_NONE || push_item(s, g))
					return -ENOMEM;
				r->present++;
				if (s->groups[g].rep == KN_REP_ZERO)
					r->zero++;
				if (r->check_ksm && is_ksm[i]) {
					r->ksm++;
					if (push_ksm_pfn(s, s->batch_pfn[i]))
						return -ENOMEM;
				}
			}
			s->hash_ns += now_ns() - t2;
			done = copied;
			if (done < n) {
				r->volatile_pages++;
				done++;
			}
		}
	}
	r->scanned_to = end;
	r->nitems = s->nitems - r->first_item;
	return 0;
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
