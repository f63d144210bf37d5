/* The C baseline for benchmarks/limits_scan.py: what the limits probe's attribution scan does
 * at its core, with no attribution. For every /proc/<pid>/fd/<n>: readlink; for inotify fds,
 * read /proc/<pid>/fdinfo/<n> and count its "inotify wd:" lines. Prints "pids fds inotify_fds
 * watches". No dedup, no uids, no containers: the floor a scan in any language pays.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static long count_watches(const char *path) {
    static char buf[1 << 20];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    long n = 0, got;
    char prev = '\n';
    while ((got = read(fd, buf, sizeof buf)) > 0) {
        for (long i = 0; i < got; i++) {
            if (prev == '\n' && buf[i] == 'i' && i + 8 <= got && memcmp(buf + i, "inotify ", 8) == 0)
                n++;
            prev = buf[i];
        }
    }
    close(fd);
    return n;
}

int main(void) {
    DIR *proc = opendir("/proc");
    struct dirent *p;
    long pids = 0, fds = 0, inotify = 0, watches = 0;
    char path[512], link[256];
    while ((p = readdir(proc)) != NULL) {
        if (p->d_name[0] < '0' || p->d_name[0] > '9')
            continue;
        snprintf(path, sizeof path, "/proc/%s/fd", p->d_name);
        DIR *d = opendir(path);
        if (d == NULL)
            continue;
        pids++;
        struct dirent *f;
        while ((f = readdir(d)) != NULL) {
            if (f->d_name[0] == '.')
                continue;
            fds++;
            snprintf(path, sizeof path, "/proc/%s/fd/%s", p->d_name, f->d_name);
            ssize_t n = readlink(path, link, sizeof link - 1);
            if (n < 0)
                continue;
            link[n] = 0;
            if (strcmp(link, "anon_inode:inotify") == 0) {
                inotify++;
                snprintf(path, sizeof path, "/proc/%s/fdinfo/%s", p->d_name, f->d_name);
                watches += count_watches(path);
            }
        }
        closedir(d);
    }
    closedir(proc);
    printf("%ld %ld %ld %ld\n", pids, fds, inotify, watches);
    return 0;
}
