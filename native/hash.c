/* Page hashing: xxh3-64, inlined so the module needs no libxxhash at run time. */
#define XXH_INLINE_ALL
#include <xxhash.h>
#include <string.h>

#include "internal.h"

const char *kn_version(void)
{
	return "ksmnative 2";
}

uint64_t kn_hash_page_portable(const void *p, size_t n)
{
	return XXH3_64bits(p, n);
}

uint64_t kn_hash_page128_portable(const void *p, size_t n, uint64_t *high)
{
	XXH128_hash_t h = XXH3_128bits(p, n);

	*high = h.high64;
	return h.low64;
}

static uint64_t hash_pick(const void *p, size_t n);
static uint64_t hash128_pick(const void *p, size_t n, uint64_t *high);
static uint64_t (*hash_fn)(const void *, size_t) = hash_pick;
static uint64_t (*hash128_fn)(const void *, size_t, uint64_t *) = hash128_pick;

static void pick(void)
{
#if defined(__x86_64__)
	__builtin_cpu_init();
	if (__builtin_cpu_supports("avx2")) {
		hash_fn = kn_hash_page_avx2;
		hash128_fn = kn_hash_page128_avx2;
		return;
	}
#endif
	hash_fn = kn_hash_page_portable;
	hash128_fn = kn_hash_page128_portable;
}

static uint64_t hash_pick(const void *p, size_t n)
{
	pick();
	return hash_fn(p, n);
}

static uint64_t hash128_pick(const void *p, size_t n, uint64_t *high)
{
	pick();
	return hash128_fn(p, n, high);
}

uint64_t kn_hash_page128(const void *p, size_t n, uint64_t *high)
{
	return hash128_fn(p, n, high);
}

uint64_t kn_hash_page(const void *p, size_t n)
{
	return hash_fn(p, n);
}

void kn_hash_pages(const void *buf, size_t npages, size_t page_size, uint64_t *out)
{
	const unsigned char *p = buf;

	for (size_t i = 0; i < npages; i++)
		out[i] = kn_hash_page(p + i * page_size, page_size);
}

int kn_page_is_zero(const unsigned char *p, size_t n)
{
	/* Compare the page with itself shifted by one word: zero iff first word is. */
	const uint64_t *w = (const uint64_t *)p;

	if (w[0] != 0)
		return 0;
	return memcmp(p, p + sizeof(uint64_t), n - sizeof(uint64_t)) == 0;
}

size_t kn_count_zero_pages(const void *buf, size_t npages, size_t page_size)
{
	const unsigned char *p = buf;
	size_t n = 0;

	for (size_t i = 0; i < npages; i++)
		n += kn_page_is_zero(p + i * page_size, page_size);
	return n;
}
