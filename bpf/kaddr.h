/* Shared between bpf/kaddr.bpf.c and ksmtrace/probes/kaddr.py. */
#ifndef KSMTRACE_KADDR_H
#define KSMTRACE_KADDR_H

struct kaddr_result {
	__u64 vmemmap_base;	/* struct page of pfn 0 */
	__u64 direct_map_base;	/* virtual address of physical 0 */
	__u64 walk_pfn;		/* pfn of the marker page, found by walking our page tables */
	__u32 tries;
	__u32 done;
};

#endif
