/* Exhausts one shared kernel pool from inside a test container and holds it.
 *
 * Usage: pool_holder files <max>   open /dev/null until ENFILE/EMFILE or <max> fds
 *        pool_holder aio <max>     io_setup(128) until EAGAIN or <max> contexts
 *        pool_holder tcp <max> <ipv4> <port>
 *                                  hold TCP connections to ipv4:port until one does not complete
 *                                  within 1 s (ETIMEDOUT: e.g. a full conntrack table drops its
 *                                  SYN) or fails, or <max> are held
 * Prints "ready <count> <errno>" and sleeps until killed. Built static by tests/real/conftest.py
 * and bind-mounted read-only, like inotify_holder.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <linux/aio_abi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3 && !(argc == 5 && strcmp(argv[1], "tcp") == 0)) {
        fprintf(stderr, "usage: %s files|aio <max> | tcp <max> <ipv4> <port>\n", argv[0]);
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
    } else if (strcmp(argv[1], "tcp") == 0) {
        struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[4]))};
        if (inet_pton(AF_INET, argv[3], &to.sin_addr) != 1)
            return 2;
        while (count < max) {
            int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            if (s < 0) {
                err = errno;
                break;
            }
            if (connect(s, (struct sockaddr *)&to, sizeof to) < 0 && errno != EINPROGRESS) {
                err = errno;
                close(s);
                break;
            }
            struct pollfd p = {s, POLLOUT, 0};
            int soerr = 0;
            socklen_t len = sizeof soerr;
            if (poll(&p, 1, 1000) == 0)
                soerr = ETIMEDOUT;
            else if (getsockopt(s, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0)
                soerr = errno;
            if (soerr != 0) {
                err = soerr;
                close(s);
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
