/*
 * cpu-spin: burn CPU for a while (CPU limit / epoch interruption tests).
 *
 * Contract:
 *   cpu-spin [SECONDS]   busy-loop for SECONDS of wall clock (float ok);
 *                        0 or absent: forever (until the host stops it).
 *   stdout at the end: "iterations=N\n". exit 0 (2 on a bad argument).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    double seconds = 0;
    if (argc > 1) {
        char *end;
        seconds = strtod(argv[1], &end);
        if (*argv[1] == '\0' || *end != '\0' || seconds < 0) {
            fprintf(stderr, "usage: cpu-spin [SECONDS]\n");
            return 2;
        }
    }
    volatile uint64_t counter = 0;
    double deadline = now() + seconds;
    for (;;) {
        /* Check the clock every 1M iterations: a clock read is a host call. */
        for (int i = 0; i < 1000000; i++)
            counter = counter + 1;
        if (seconds > 0 && now() >= deadline)
            break;
    }
    printf("iterations=%llu\n", (unsigned long long)counter);
    return 0;
}
