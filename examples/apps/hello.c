/*
 * hello: the startup-benchmark app. Keep it minimal.
 *
 * Contract:
 *   stdout: "hello from wasm, $NAME\n" (NAME from the environment, default
 *           "world"), then "arg[i]=<argv[i]>\n" for each argv[i], i >= 1.
 *   exit:   0.
 */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    const char *name = getenv("NAME");
    printf("hello from wasm, %s\n", name ? name : "world");
    for (int i = 1; i < argc; i++)
        printf("arg[%d]=%s\n", i, argv[i]);
    return 0;
}
