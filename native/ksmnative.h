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

/* Count pages of buf that are all zero bytes. */
size_t kn_count_zero_pages(const void *buf, size_t npages, size_t page_size);
/* CDEF-END */

#endif
