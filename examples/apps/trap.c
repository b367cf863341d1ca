/*
 * trap: die with a wasm trap.
 *
 * Contract:
 *   stdout: "trap: about to abort\n" (flushed), then abort(), which in
 *   wasi-libc is the wasm `unreachable` instruction: the host sees a trap,
 *   not an exit status.
 */
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    puts("trap: about to abort");
    fflush(stdout);
    abort();
}
