/*
 * exit: exit with a chosen status.
 *
 * Contract:
 *   exit [CODE]   exit with CODE (decimal, default 0); no output.
 *   A CODE that is not an integer prints a usage line to stderr and exits 2.
 *   Note: WASI hosts accept 0..125 only; wasmtime turns a larger status
 *   into a trap rather than an exit.
 */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    if (argc < 2)
        return 0;
    char *end;
    long code = strtol(argv[1], &end, 10);
    if (*argv[1] == '\0' || *end != '\0') {
        fprintf(stderr, "usage: exit [CODE]\n");
        return 2;
    }
    exit((int)code);
}
