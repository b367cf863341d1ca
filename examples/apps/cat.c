/*
 * cat: read files from a preopened directory, or write one.
 *
 * Contract:
 *   cat                    copy stdin to stdout.
 *   cat PATH...            print each file in order. A file that cannot be
 *                          read prints "cat: PATH: <strerror>" to stderr;
 *                          the rest are still printed; exit 1 at the end.
 *   cat --write PATH TEXT  write TEXT (no newline added) to PATH, creating
 *                          or truncating it. Used to prove that a read-only
 *                          preopen refuses writes: on failure prints
 *                          "cat: PATH: <strerror>" to stderr and exits 1.
 *   exit: 0 on success, 1 on an I/O error, 2 on a usage error.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int fail(const char *path) {
    fprintf(stderr, "cat: %s: %s\n", path, strerror(errno));
    return 1;
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Copy fd to stdout; name is used in error messages. */
static int copy(int fd, const char *name) {
    static char buf[64 * 1024];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n == 0)
            return 0;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail(name);
        }
        if (write_all(STDOUT_FILENO, buf, (size_t)n) < 0)
            return fail("stdout");
    }
}

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return fail(path);
    if (write_all(fd, text, strlen(text)) < 0) {
        int rc = fail(path);
        close(fd);
        return rc;
    }
    if (close(fd) < 0)
        return fail(path);
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--write") == 0) {
        if (argc != 4) {
            fprintf(stderr, "usage: cat --write PATH TEXT\n");
            return 2;
        }
        return write_file(argv[2], argv[3]);
    }
    if (argc == 1)
        return copy(STDIN_FILENO, "stdin");
    int rc = 0;
    for (int i = 1; i < argc; i++) {
        int fd = open(argv[i], O_RDONLY);
        if (fd < 0) {
            rc = fail(argv[i]);
            continue;
        }
        if (copy(fd, argv[i]) != 0)
            rc = 1;
        close(fd);
    }
    return rc;
}
