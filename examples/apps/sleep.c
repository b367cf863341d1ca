/*
 * sleep: sleep, then report (timeouts, graceful stop, concurrency tests).
 *
 * Contract:
 *   sleep [SECONDS]   sleep SECONDS (float ok, default 1) with nanosleep.
 *   stdout: "slept S\n" where S is SECONDS as given (printed with %g).
 *   exit 0 (2 on a bad argument).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    double seconds = 1;
    if (argc > 1) {
        char *end;
        seconds = strtod(argv[1], &end);
        if (*argv[1] == '\0' || *end != '\0' || seconds < 0) {
            fprintf(stderr, "usage: sleep [SECONDS]\n");
            return 2;
        }
    }
    struct timespec ts;
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0) {
        if (errno != EINTR) {
            perror("sleep: nanosleep");
            return 1;
        }
    }
    printf("slept %g\n", seconds);
    return 0;
}
