/*
 * clock-random: show what the host gives for clocks and entropy.
 *
 * Contract (stdout, one per line):
 *   realtime=<unix seconds, integer>      CLOCK_REALTIME
 *   monotonic_ok=<1|0>                    1 if two CLOCK_MONOTONIC reads
 *                                         are non-decreasing
 *   random=<32 lowercase hex chars>       16 bytes from getentropy()
 *   exit 0; 1 if a clock or getentropy fails (message on stderr).
 */
#include <stdio.h>
#include <time.h>
#include <unistd.h>

int main(void) {
    struct timespec rt, m1, m2;
    if (clock_gettime(CLOCK_REALTIME, &rt) != 0 || clock_gettime(CLOCK_MONOTONIC, &m1) != 0 ||
        clock_gettime(CLOCK_MONOTONIC, &m2) != 0) {
        perror("clock-random: clock_gettime");
        return 1;
    }
    int mono_ok = m2.tv_sec > m1.tv_sec || (m2.tv_sec == m1.tv_sec && m2.tv_nsec >= m1.tv_nsec);

    unsigned char rnd[16];
    if (getentropy(rnd, sizeof rnd) != 0) {
        perror("clock-random: getentropy");
        return 1;
    }
    printf("realtime=%lld\n", (long long)rt.tv_sec);
    printf("monotonic_ok=%d\n", mono_ok);
    printf("random=");
    for (size_t i = 0; i < sizeof rnd; i++)
        printf("%02x", rnd[i]);
    printf("\n");
    return 0;
}
