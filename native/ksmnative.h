/*
 * ksmnative: the native half of ksmtrace's merge worker.
 *
 * This header is read twice: by the C compiler, and by native/ksmnative_build.py,
 * which hands everything between the CDEF markers to cffi's cdef(). Keep that
 * part to plain declarations (no macros, no includes) so cffi can parse it.
 * Functions return 0 or a negative errno; Python maps those to exceptions in
 * one place (ksmtrace/native.py).
 */
#ifndef KSMNATIVE_H
#define KSMNATIVE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* CDEF-BEGIN */
const char *kn_version(void);

/* 64-bit xxh3 of each page of buf (npages pages of page_size bytes). */
void kn_hash_pages(const void *buf, size_t npages, size_t page_size, uint64_t *out);

/* xxh3-64 of one buffer built for the baseline ISA (kn_hash_pages may use AVX2): same values. */
uint64_t kn_hash_page_portable(const void *p, size_t n);

/* xxh3-128 of one buffer, baseline ISA: returns the low 64 bits, the high ones in *high. */
uint64_t kn_hash_page128_portable(const void *p, size_t n, uint64_t *high);

/* Count pages of buf that are all zero bytes. */
size_t kn_count_zero_pages(const void *buf, size_t npages, size_t page_size);
/* ---- scanner (scan.c, dupindex.c, estimate.c) ---- */
struct kn_scanner;

/* Per region results of kn_scanner_finish. Page counts unless said otherwise. */
struct kn_region_stats {
	uint64_t present;        /* present pages with a frame of their own */
	uint64_t zero;           /* ... of which all bytes are zero */
	uint64_t zero_mapped;    /* mapped to the shared zero page: cost nothing now */
	uint64_t ksm;            /* ... already KSM pages (KPF_KSM) */
	uint64_t volatile_pages; /* vanished or changed while being read */
	uint64_t dup_region;     /* have an identical page in this region */
	uint64_t dup_process;    /* ... not in this region but elsewhere in this process */
	uint64_t dup_cross;      /* ... only in other processes */
	uint64_t saved_alone;    /* KSM would save this many if only this region merged */
	double saved_share;      /* this region's share of the saving when everything scanned merges */
};

struct kn_process_stats {
	int32_t pid;
	uint64_t saved_alone;    /* if only this process's scanned regions merged */
	double saved_share;
};

struct kn_total_stats {
	uint64_t present, zero, zero_mapped, ksm, volatile_pages;
	uint64_t distinct;       /* distinct contents */
	uint64_t dup_groups;     /* contents present more than once */
	uint64_t saved;          /* pages KSM would save if everything scanned merged */
	uint64_t saved_within;   /* ... counting only merges inside each process */
	uint64_t saved_now;      /* KSM pages minus distinct KSM frames: saved by KSM already */
	uint64_t hash_collisions;/* equal 64-bit hashes, different bytes */
	uint64_t refetched;      /* first pages re-read to confirm duplicates (depends on batch order) */
	uint64_t bytes_read;     /* pages scanned, in bytes (re-reads not included) */
	uint64_t index_bytes;    /* memory the duplicate index needed at its peak */
	uint64_t read_ns, hash_ns, map_ns;
	uint64_t index_ns;       /* index lookups and updates (under the index lock) */
	uint64_t refetch_ns;     /* re-reading first pages and comparing bytes (all workers) */
};

/* max_page_sharing and use_zero_pages as the kernel has them; batch_pages 0 = default. */
struct kn_scanner *kn_scanner_new(uint32_t max_page_sharing, int use_zero_pages, uint32_t batch_pages);
void kn_scanner_free(struct kn_scanner *s);
/* Copy-and-hash workers (threads, the caller's one of them): 0 = one per CPU we
 * may run on, at most 4. Returns the number set or -errno. */
int kn_scanner_set_workers(struct kn_scanner *s, uint32_t workers);
/* How duplicates are confirmed: 0 (the default) by their 128-bit xxh3, 1 by
 * comparing bytes with the content's first page, re-read from its process.
 * Only before the first region is added (-EBUSY after). */
int kn_scanner_set_confirm(struct kn_scanner *s, int bytes);
/* Test hook: every page's 64-bit hash (the low half of the 128-bit one) is
 * and-ed with mask (0: all collide), to show that equal hashes never make
 * different pages duplicates. Only before the first region is added. */
int kn_scanner_set_hash_mask(struct kn_scanner *s, uint64_t mask);
/* Add a region; returns its index or -errno. check_ksm: look up KPF_KSM (only
 * VM_MERGEABLE regions can hold KSM pages). */
int kn_scanner_add_region(struct kn_scanner *s, int pid, uint64_t start, uint64_t end, int check_ksm);
/* Scan [start, end) of region idx; chunks of one region in order, regions in order. */
int kn_scanner_scan(struct kn_scanner *s, int idx, uint64_t start, uint64_t end);
/* Compute the statistics; procs needs room for one entry per distinct pid. */
int kn_scanner_finish(struct kn_scanner *s, struct kn_region_stats *regions, size_t nregions,
		      struct kn_process_stats *procs, size_t nprocs, struct kn_total_stats *total);

/* A run of duplicate pages of one region (kn_scanner_runs): addresses page
 * aligned, end exclusive; gaps up to max_gap_pages joined in. */
struct kn_run {
	uint64_t start, end;
	uint64_t dup_pages;      /* pages inside that merging would save on (or KSM pages already) */
	uint64_t ksm_pages;      /* ... of which KSM pages already (KPF_KSM) */
};
/* After kn_scanner_finish: region idx's runs of duplicate pages, in address
 * order. A page is a duplicate when its content is present twice or more in
 * everything scanned, when it is a KSM page, or when it is all zeros and
 * use_zero_pages would merge it alone. Runs whose gap (pages absent or not
 * duplicates) is at most max_gap_pages are joined. Fills out[] up to cap and
 * returns how many runs there are (more than cap: call again with room for
 * them all), or -EINVAL (bad idx), -EBUSY (not finished), -E2BIG (a region
 * over 2^31 pages), -ENOMEM. */
int64_t kn_scanner_runs(struct kn_scanner *s, int region_idx, uint32_t max_gap_pages, struct kn_run *out,
			size_t cap);

/* Baseline for the benchmark: copy [start, end) with process_vm_readv in
 * batch_pages batches and nothing else; returns bytes copied or -errno. */
int64_t kn_copy_bandwidth(int pid, uint64_t start, uint64_t end, uint32_t batch_pages);

/* This process's memory (selfmem.c): VmRSS and VmHWM in bytes; reset_peak
 * first restarts VmHWM from VmRSS (peak_reset says whether the kernel let it). */
struct kn_self_memory {
	uint64_t rss_bytes;
	uint64_t peak_rss_bytes;
	int32_t peak_reset;
};
int kn_self_memory(int reset_peak, struct kn_self_memory *out);

/* ---- remote madvise by ptrace syscall injection (inject.c) ---- */
struct kn_inject_result {
	int64_t ret;             /* the syscall's return value (-errno on failure) */
	uint64_t syscall_addr;   /* the syscall instruction used */
	int32_t stop_kind;       /* 0 running/userspace, 1 stopped inside a syscall */
	int32_t restarts;        /* injected syscall restarted after a signal */
	int32_t signals_kept;    /* foreign signals held back and re-delivered */
	int64_t interrupted_rax; /* rax of the target when it stopped */
	int64_t elapsed_ns;
	int64_t stop_wait_ns;    /* of which: from PTRACE_INTERRUPT to the stop */
	int64_t held_ns;         /* of which: from the stop to the detach (the target's pause) */
	int32_t seccomp_trapped; /* a seccomp filter trapped the madvise (its SIGSYS dropped) */
	int64_t syscall_ns;      /* of held_ns: from the single step to its trap (madvise itself) */
};

/* A number that changes when the process of thread tid executes a new program
 * (its memory layout; ASLR moves it on every exec); 0 when unknown (no mm). */
uint64_t kn_image_id(int tid);

/* madvise(addr, len, advice) inside thread tid. Returns 0 (see res->ret) or
 * -errno when the injection itself failed: -EPERM attach refused, -ESRCH the
 * thread is gone or exiting (the process may live on), -ETIMEDOUT no stop
 * within timeout_ms, -ENOEXEC not a 64-bit x86 process, -ESTALE the process
 * executed a new program (image differs from `image`, or it exec'd while we
 * were attached), -EFAULT the borrowed syscall instruction faulted (mapping
 * changed under us), -ENOSYS not x86_64, -EDEADLK the caller itself, -ENOENT
 * no syscall instruction. image 0: do not compare. In every failure the target
 * is left running on its own registers and untraced. */
int kn_inject_madvise(int tid, uint64_t addr, uint64_t len, int advice, int timeout_ms, uint64_t image,
		      struct kn_inject_result *res);
/* Atomics on BPF_F_MMAPABLE maps shared with BPF programs (shared.c);
 * offset in bytes, 8-byte aligned. cmpxchg returns the value it saw. */
uint64_t kn_atomic_or64(void *base, size_t offset, uint64_t bits);
uint64_t kn_atomic_and64(void *base, size_t offset, uint64_t mask);
uint64_t kn_cmpxchg64(void *base, size_t offset, uint64_t expected, uint64_t desired);
/* CDEF-END */

#endif
