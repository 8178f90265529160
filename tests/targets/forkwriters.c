/* A mergeable parent and N forked children that each break one KSM merge,
 * for tests/system/test_scale.py.
 *
 * The parent maps PAGES private anonymous pages of one content, madvises
 * them MERGEABLE and prints "mapped ADDR LEN"; the test lets ksmd merge them.
 * On "fork" (a line on stdin) it forks N children, which share the KSM pages
 * through fork and wait on a pipe; it prints "forked" once all wait. On
 * "write" each child writes one page (one KSM COW fault in that child) and
 * acknowledges; the parent prints "written" after N acknowledgements.
 * EOF on stdin, or SIGTERM, ends it and its children (PR_SET_PDEATHSIG).
 *
 * usage: forkwriters N PAGES
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	int n = atoi(argv[1]);
	long pages = atol(argv[2]), psz = sysconf(_SC_PAGESIZE);
	char *mem = mmap(NULL, pages * psz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED || n < 1 || pages < 2)
		return 1;
	memset(mem, 0x5a, pages * psz);
	if (madvise(mem, pages * psz, MADV_MERGEABLE))
		return 1;
	printf("mapped %lu %ld\n", (unsigned long)mem, pages * psz);
	fflush(stdout);

	int go[2], ack[2];
	if (pipe(go) || pipe(ack))
		return 1;
	char line[64];
	if (!fgets(line, sizeof(line), stdin) || strncmp(line, "fork", 4))
		return 0;
	pid_t *kids = calloc(n, sizeof(*kids));
	for (int i = 0; i < n; i++) {
		kids[i] = fork();
		if (kids[i] < 0)
			return 1;
		if (kids[i] == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			char c;
			(void)!write(ack[1], "r", 1);
			if (read(go[0], &c, 1) == 1) {
				mem[(i % pages) * psz + 8] = (char)(i | 1);  /* one KSM COW */
				(void)!write(ack[1], "w", 1);
			}
			for (;;)
				pause();
		}
	}
	char c;
	for (int i = 0; i < n; i++)
		(void)!read(ack[0], &c, 1);
	printf("forked\n");
	fflush(stdout);
	if (fgets(line, sizeof(line), stdin) && !strncmp(line, "write", 5)) {
		for (int i = 0; i < n; i++)
			(void)!write(go[1], "g", 1);
		for (int i = 0; i < n; i++)
			(void)!read(ack[0], &c, 1);
		printf("written\n");
		fflush(stdout);
		while (fgets(line, sizeof(line), stdin))
			;
	}
	for (int i = 0; i < n; i++)
		kill(kids[i], SIGKILL);
	while (wait(NULL) > 0)
		;
	return 0;
}
