/* Holds inotify watches inside a test container (the busybox test image has no inotifyd).
 *
 * Usage: inotify_holder <instances> <path>...
 * Creates <instances> inotify instances, each watching every <path>, prints "ready" and sleeps
 * until killed. Built static by tests/real/test_probes_real.py and bind-mounted read-only.
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/inotify.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s <instances> <path>...\n", argv[0]);
        return 2;
    }
    int instances = atoi(argv[1]);
    for (int i = 0; i < instances; i++) {
        int fd = inotify_init1(IN_CLOEXEC);
        if (fd < 0) {
            perror("inotify_init1");
            return 1;
        }
        for (int j = 2; j < argc; j++) {
            if (inotify_add_watch(fd, argv[j], IN_CREATE | IN_DELETE | IN_MODIFY) < 0) {
                perror(argv[j]);
                return 1;
            }
        }
    }
    puts("ready");
    fflush(stdout);
    for (;;)
        pause();
}
