/* Atomic updates of memory shared with BPF programs.
 *
 * ksmtrace maps some BPF arrays into its own address space (BPF_F_MMAPABLE).
 * The BPF side updates them with atomic instructions while user space
 * updates them too (start-up preload, freeing the slots of exited
 * processes): a plain read-modify-write from Python could drop a bit or a
 * claim the kernel made in between, so those go through here.
 */
#include "ksmnative.h"

static uint64_t *word(void *base, size_t offset)
{
	return (uint64_t *)((char *)base + offset);
}

uint64_t kn_atomic_or64(void *base, size_t offset, uint64_t bits)
{
	return __atomic_fetch_or(word(base, offset), bits, __ATOMIC_SEQ_CST);
}

uint64_t kn_atomic_and64(void *base, size_t offset, uint64_t mask)
{
	return __atomic_fetch_and(word(base, offset), mask, __ATOMIC_SEQ_CST);
}

uint64_t kn_cmpxchg64(void *base, size_t offset, uint64_t expected, uint64_t desired)
{
	__atomic_compare_exchange_n(word(base, offset), &expected, desired, 0, __ATOMIC_SEQ_CST,
				    __ATOMIC_SEQ_CST);
	return expected; /* the value seen: == expected on success */
}
