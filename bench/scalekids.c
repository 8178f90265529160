/* N mergeable processes for bench/bench_scale.py: a parent maps PAGES private
 * anonymous pages, fills them with the same byte (duplicates), madvises them
 * MERGEABLE and forks N children; each child writes one page of its own copy
 * (so every child has a private, faulted page in a mergeable region) and
 * sleeps until SIGTERM. The parent prints "ready" when all children have
 * written, then waits for SIGTERM and takes its children down with it.
 *
 * usage: scalekids N PAGES
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	int n = atoi(argv[1]);
	long pages = atol(argv[2]), psz = sysconf(_SC_PAGESIZE);
	char *mem = mmap(NULL, pages * psz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		return 1;
	memset(mem, 0x5a, pages * psz);
	if (madvise(mem, pages * psz, MADV_MERGEABLE))
		return 1;
	int ready[2];
	if (pipe(ready))
		return 1;
	pid_t *kids = calloc(n, sizeof(*kids));
	for (int i = 0; i < n; i++) {
		kids[i] = fork();
		if (kids[i] == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			mem[(i % pages) * psz + 8] = (char)i;
			(void)!write(ready[1], "k", 1);
			for (;;)
				pause();
		}
	}
	for (int i = 0; i < n; i++) {
		char c;
		(void)!read(ready[0], &c, 1);
	}
	signal(SIGTERM, on_term);
	printf("ready\n");
	fflush(stdout);
	while (!stop)
		pause();
	for (int i = 0; i < n; i++)
		kill(kids[i], SIGKILL);
	while (wait(NULL) > 0)
		;
	return 0;
}
