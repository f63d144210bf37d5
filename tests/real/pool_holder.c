/* Exhausts one shared kernel pool from inside a test container and holds it.
 *
 * Usage: pool_holder files <max>   open /dev/null until ENFILE/EMFILE or <max> fds
 *        pool_holder aio <max>     io_setup(128) until EAGAIN or <max> contexts
 * Prints "ready <count> <errno>" and sleeps until killed. Built static by tests/real/conftest.py
 * and bind-mounted read-only, like inotify_holder.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s files|aio <max>\n", argv[0]);
        return 2;
    }
    long max = atol(argv[2]), count = 0;
    int err = 0;
    if (strcmp(argv[1], "files") == 0) {
        struct rlimit rl = {(rlim_t)max + 64, (rlim_t)max + 64};
        setrlimit(RLIMIT_NOFILE, &rl); /* best effort: the hard limit may be lower */
        while (count < max) {
            if (open("/dev/null", O_RDONLY) < 0) {
                err = errno;
                break;
            }
            count++;
        }
    } else if (strcmp(argv[1], "aio") == 0) {
        while (count < max) {
            aio_context_t ctx = 0;
            if (syscall(SYS_io_setup, 128, &ctx) < 0) {
                err = errno;
                break;
            }
            count++;
        }
    } else {
        return 2;
    }
    printf("ready %ld %d\n", count, err);
    fflush(stdout);
    for (;;)
        pause();
}
