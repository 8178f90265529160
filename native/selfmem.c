/*
 * This process's resident memory and its peak, for the cost an estimate
 * reports. Here rather than in Python: only ksmtrace/kernel names /proc files
 * on the Python side, and the scanner's own memory is the native worker's
 * business (it already reads /proc for pagemap and kpageflags).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "ksmnative.h"

int kn_self_memory(int reset_peak, struct kn_self_memory *out)
{
	char line[256];
	FILE *f;

	memset(out, 0, sizeof(*out));
	if (reset_peak) {
		/* "5" restarts VmHWM from the current RSS (Linux 4.0+), so a peak read
		 * later is that of what ran in between, not of the process's past. */
		int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);

		if (fd >= 0) {
			out->peak_reset = write(fd, "5", 1) == 1;
			close(fd);
		}
	}
	f = fopen("/proc/self/status", "re");
	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		unsigned long long kib;

		if (sscanf(line, "VmRSS: %llu kB", &kib) == 1)
			out->rss_bytes = kib * 1024;
		else if (sscanf(line, "VmHWM: %llu kB", &kib) == 1)
			out->peak_rss_bytes = kib * 1024;
	}
	fclose(f);
	return 0;
}
