/* Leak maker for the negative-dentry case (seed "dentry-cache-isolation-story").
 *
 *   dcache_load trash DIR COUNT RATE [TRICKLE]
 *                                      failed stat() of COUNT fresh names under DIR (COUNT 0:
 *                                      forever) at RATE per second (0: as fast as possible);
 *                                      prints "ready", then "done N failed F", then goes on at
 *                                      TRICKLE per second (default 0: sleeps; -1: exits).
 *   dcache_load work DIR FILES         makes FILES files under DIR, then lstat()s all of them in
 *                                      a loop and prints "loop_ns N" (mean of the last second).
 *   dcache_load idle                   prints "ready" and sleeps (the bystander).
 *
 * Static, so it runs in the busybox test image. Names are pid + counter, so every lookup is a
 * fresh name: a dcache miss that leaves a negative dentry behind.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_forever(void) {
    for (;;) pause();
}

static void paced(const char *dir, long from, long count, long rate, long *failed) {
    char path[4096];
    struct stat st;
    double start = now_s();
    for (long i = 0; count == 0 || i < count; i++) {
        snprintf(path, sizeof path, "%s/n%d-%ld", dir, (int)getpid(), from + i);
        if (stat(path, &st) != 0 && errno == ENOENT) (*failed)++;
        if (rate > 0 && (i % 100) == 99) {
            double due = start + (double)(i + 1) / rate, t = now_s();
            if (due > t) usleep((useconds_t)((due - t) * 1e6));
        }
    }
}

static int trash(const char *dir, long count, long rate, long trickle) {
    char path[4096];
    struct stat st;
    long i, failed = 0;
    double start = now_s();
    printf("ready\n");
    fflush(stdout);
    for (i = 0; count == 0 || i < count; i++) {
        snprintf(path, sizeof path, "%s/n%d-%ld", dir, (int)getpid(), i);
        if (stat(path, &st) != 0 && errno == ENOENT) failed++;
        if (rate > 0 && (i % 1000) == 999) {
            double due = start + (double)(i + 1) / rate, t = now_s();
            if (due > t) usleep((useconds_t)((due - t) * 1e6));
        }
    }
    printf("done %ld failed %ld\n", i, failed);
    fflush(stdout);
    if (trickle < 0) return 0;
    if (trickle > 0) paced(dir, i, 0, trickle, &failed);
    sleep_forever();
    return 0;
}

static int work(const char *dir, long files) {
    char path[4096];
    struct stat st;
    long i, loops = 0;
    double window = now_s(), spent = 0;
    mkdir(dir, 0755);
    for (i = 0; i < files; i++) {
        snprintf(path, sizeof path, "%s/f%ld", dir, i);
        int fd = open(path, O_CREAT | O_WRONLY, 0644);
        if (fd >= 0) close(fd);
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        double t0 = now_s();
        for (i = 0; i < files; i++) {
            snprintf(path, sizeof path, "%s/f%ld", dir, i);
            lstat(path, &st);
        }
        spent += now_s() - t0;
        loops++;
        if (now_s() - window >= 1.0) {
            printf("loop_ns %.0f\n", spent / loops * 1e9);
            fflush(stdout);
            window = now_s();
            spent = 0;
            loops = 0;
        }
        usleep(10000); /* a worker, not a benchmark: ~1% of a core */
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 5 && strcmp(argv[1], "trash") == 0)
        return trash(argv[2], atol(argv[3]), atol(argv[4]), argc >= 6 ? atol(argv[5]) : 0);
    if (argc >= 4 && strcmp(argv[1], "work") == 0) return work(argv[2], atol(argv[3]));
    if (argc >= 2 && strcmp(argv[1], "idle") == 0) {
        printf("ready\n");
        fflush(stdout);
        sleep_forever();
    }
    fprintf(stderr, "usage: dcache_load trash DIR COUNT RATE | work DIR FILES | idle\n");
    return 2;
}
