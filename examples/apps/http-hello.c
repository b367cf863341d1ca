/*
 * http-hello: an HTTP handler using the WAGI ABI (CGI/1.1, RFC 3875, over
 * WASI stdio).
 *
 * Input:  request metadata in environment variables (REQUEST_METHOD,
 *         PATH_INFO, QUERY_STRING, CONTENT_LENGTH, CONTENT_TYPE, HTTP_*
 *         for request headers); the request body on stdin.
 * Output: on stdout, CGI header lines ("Content-Type: ...", optionally
 *         "Status: <code> <reason>"), each ended by "\n", then an empty
 *         line, then the body. No Status line means 200 OK.
 *
 * Routes (on PATH_INFO only; the method is not used for routing; an empty
 * PATH_INFO counts as "/"):
 *   /      200 text/plain "hello from nova\n" (exactly 16 bytes: the
 *          benchmark's plain aiohttp peer returns the same body).
 *   /echo  200, body = the first CONTENT_LENGTH bytes of stdin, with the
 *          request's CONTENT_TYPE (application/octet-stream if absent).
 *   /env   200 text/plain: "REQUEST_METHOD=...", "PATH_INFO=...",
 *          "QUERY_STRING=..." lines, then every HTTP_* variable as
 *          "NAME=value" lines in environment order.
 *   other  "Status: 404 Not Found", text/plain "not found\n".
 * exit 0 (1 if stdin cannot be read).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

static const char *env(const char *name) {
    const char *v = getenv(name);
    return v ? v : "";
}

static int echo(void) {
    const char *type = getenv("CONTENT_TYPE");
    long want = strtol(env("CONTENT_LENGTH"), NULL, 10);
    if (want < 0)
        want = 0;
    printf("Content-Type: %s\n\n", type && *type ? type : "application/octet-stream");
    char buf[16 * 1024];
    while (want > 0) {
        size_t n = fread(buf, 1, want < (long)sizeof buf ? (size_t)want : sizeof buf, stdin);
        if (n == 0) {
            if (ferror(stdin)) {
                fprintf(stderr, "http-hello: reading the body: %s\n", strerror(errno));
                return 1;
            }
            break; /* body shorter than CONTENT_LENGTH: echo what came */
        }
        fwrite(buf, 1, n, stdout);
        want -= (long)n;
    }
    return 0;
}

static void show_env(void) {
    printf("Content-Type: text/plain\n\n");
    printf("REQUEST_METHOD=%s\n", env("REQUEST_METHOD"));
    printf("PATH_INFO=%s\n", env("PATH_INFO"));
    printf("QUERY_STRING=%s\n", env("QUERY_STRING"));
    for (char **e = environ; *e; e++)
        if (strncmp(*e, "HTTP_", 5) == 0)
            printf("%s\n", *e);
}

int main(void) {
    const char *path = env("PATH_INFO");
    int rc = 0;
    if (*path == '\0' || strcmp(path, "/") == 0)
        fputs("Content-Type: text/plain\n\nhello from nova\n", stdout);
    else if (strcmp(path, "/echo") == 0)
        rc = echo();
    else if (strcmp(path, "/env") == 0)
        show_env();
    else
        fputs("Status: 404 Not Found\nContent-Type: text/plain\n\nnot found\n", stdout);
    if (fflush(stdout) != 0)
        return 1;
    return rc;
}
