/*
 * mem-grow: grow linear memory 1 MiB at a time (memory limit tests).
 *
 * Contract:
 *   mem-grow [MIB]   allocate and touch 1 MiB chunks up to MIB MiB
 *                    (absent: unbounded, until allocation fails).
 *   stdout: "allocated N MiB\n" every 16 MiB (flushed at once).
 *   If malloc fails: stderr "mem-grow: allocation failed after N MiB\n",
 *   exit 3. Otherwise (MIB reached) exit 0. Bad argument: exit 2.
 *   Nothing is freed: each chunk links to the previous one from a global,
 *   so the compiler cannot elide the allocations.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK (1024 * 1024)

static void *volatile chunks; /* head of the list of chunks */

int main(int argc, char **argv) {
    long limit = -1;
    if (argc > 1) {
        char *end;
        limit = strtol(argv[1], &end, 10);
        if (*argv[1] == '\0' || *end != '\0' || limit < 0) {
            fprintf(stderr, "usage: mem-grow [MIB]\n");
            return 2;
        }
    }
    long n = 0;
    while (limit < 0 || n < limit) {
        void **chunk = malloc(CHUNK);
        if (chunk == NULL) {
            fprintf(stderr, "mem-grow: allocation failed after %ld MiB\n", n);
            return 3;
        }
        memset(chunk, 0xa5, CHUNK); /* touch every page */
        chunk[0] = chunks;
        chunks = chunk;
        n++;
        if (n % 16 == 0) {
            printf("allocated %ld MiB\n", n);
            fflush(stdout);
        }
    }
    return 0;
}
