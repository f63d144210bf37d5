/*
 * remediator.probes._fdscan: the per-process system-call loop of the limits probe's fd scan
 * (limits_fdscan.scan_processes), in C.
 *
 * Why C: the scan readlinks every fd on the host (~212 k at 2,000 processes). In Python each
 * readlink builds a path string, a str result and a comparison; that overhead, not the kernel,
 * made the scan 1.3-2.9x a plain C loop (benchmarks/limits_scan.py). Here every readlink is a
 * readlinkat(2) on one open /proc/<pid>/fd directory fd (no path walk per fd, which is also why
 * it beats the path-based C baseline) and only the fds that matter come back to Python.
 *
 * What this file does NOT decide: what a count means, which process is whose, whether a record
 * can be reused. It reads and parses; limits_fdscan decides. Nothing here writes anything.
 *
 * Errors: a process or fd that vanished mid-read is reported as its errno (ENOENT/ESRCH), never
 * raised per fd; only failing to open the process's own directory raises OSError (the caller
 * counts it as vanished or denied, as the Python path does).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define DIR_FLAGS (O_RDONLY | O_DIRECTORY | O_CLOEXEC)
#define UNPARSABLE (-1)   /* an fdinfo line we do not know how to read */
#define NOT_THAT_KIND (-2) /* refresh: the fd no longer names an instance of that kind */

enum kind { K_OTHER, K_PIPE, K_INOTIFY, K_EPOLL };

static enum kind classify(const char *link, ssize_t n, long long *pipe_ino) {
    if (n == 18 && memcmp(link, "anon_inode:inotify", 18) == 0)
        return K_INOTIFY;
    if (n == 22 && memcmp(link, "anon_inode:[eventpoll]", 22) == 0)
        return K_EPOLL;
    if (n > 7 && memcmp(link, "pipe:[", 6) == 0 && link[n - 1] == ']') {
        long long v = 0;
        for (ssize_t i = 6; i < n - 1; i++) {
            if (link[i] < '0' || link[i] > '9')
                return K_OTHER;
            v = v * 10 + (link[i] - '0');
        }
        *pipe_ino = v;
        return K_PIPE;
    }
    return K_OTHER;
}

/* Read a whole /proc file relative to dirfd into a malloc'd NUL-terminated buffer. fdinfo of
 * a 100 k-watch inotify fd is ~12 MB, so the buffer grows. Returns NULL with errno set. */
static char *slurp(int dirfd, const char *name, size_t *len) {
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    size_t cap = 4096, used = 0;
    char *buf = malloc(cap);
    if (buf == NULL) {
        close(fd);
        errno = ENOMEM;
        return NULL;
    }
    for (;;) {
        if (cap - used < 2048) {
            char *bigger = realloc(buf, cap * 2);
            if (bigger == NULL) {
                free(buf);
                close(fd);
                errno = ENOMEM;
                return NULL;
            }
            buf = bigger;
            cap *= 2;
        }
        ssize_t got = read(fd, buf + used, cap - used - 1);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            int saved = errno;
            free(buf);
            close(fd);
            errno = saved;
            return NULL;
        }
        if (got == 0)
            break;
        used += (size_t)got;
    }
    close(fd);
    buf[used] = '\0';
    *len = used;
    return buf;
}

/* splitmix64's finaliser; limits_parse._mix is the same in Python. */
static uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* "key:hex" in [p, end), the key at p or after a blank: 0 and *out, *next past the number on
 * success; -1 when absent or not hex. The kernel prints the keys in a fixed order, so callers
 * search each key from where the previous one ended. */
static int hex_field(const char *p, const char *end, const char *key, size_t klen, unsigned long long *out,
                     const char **next) {
    const char *line = p;
    for (; p + klen < end; p++) {
        if ((p == line || p[-1] == ' ' || p[-1] == '\t') && memcmp(p, key, klen) == 0) {
            const char *q = p + klen;
            unsigned long long v = 0;
            int digits = 0;
            for (; q < end; q++, digits++) {
                char c = *q;
                int d = (c >= '0' && c <= '9') ? c - '0'
                      : (c >= 'a' && c <= 'f') ? c - 'a' + 10
                      : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
                if (d < 0)
                    break;
                v = v * 16 + (unsigned long long)d;
            }
            if (digits == 0)
                return -1;
            *out = v;
            *next = q;
            return 0;
        }
    }
    return -1;
}

#define HEX(p, end, key, out, next) hex_field((p), (end), key, sizeof key - 1, (out), (next))

struct summary {
    unsigned long long count;
    uint64_t digest; /* sum of mix(...) per watch: independent of the order of the lines */
};

/* One fdinfo line into the summary: inotify "inotify wd:%x ino:%lx sdev:%x mask:%x ..."
 * (fs/notify/fdinfo.c), epoll "tfd: %8d events: %8x data: %16llx  pos:%lli ino:%lx sdev:%x"
 * (fs/eventpoll.c ep_show_fdinfo); other lines are not watches. -1: a watch line we cannot read. */
static int summarize_line(const char *line, const char *le, enum kind k, struct summary *s) {
    const char *p;
    if (k == K_INOTIFY) {
        if (le - line <= 8 || memcmp(line, "inotify ", 8) != 0)
            return 0;
        unsigned long long wd, ino, sdev, mask;
        if (HEX(line + 8, le, "wd:", &wd, &p) || HEX(p, le, "ino:", &ino, &p) || HEX(p, le, "sdev:", &sdev, &p) ||
            HEX(p, le, "mask:", &mask, &p))
            return -1;
        s->digest += mix(mix(mix(mix(wd) ^ ino) ^ sdev) ^ mask);
    } else {
        if (le - line <= 4 || memcmp(line, "tfd:", 4) != 0)
            return 0;
        char *q;
        long tfd = strtol(line + 4, &q, 10); /* stops at the blank after the number */
        unsigned long long ino;
        if (q == line + 4 || q >= le || HEX(q, le, "ino:", &ino, &p))
            return -1;
        s->digest += mix(mix((uint64_t)tfd) ^ ino);
    }
    s->count++;
    return 0;
}

/* Count and digest the watches of one fd's fdinfo, streaming it through a fixed buffer: a
 * 100 k-watch inotify fdinfo is ~12 MB, and no Python object is built per watch. Returns 0,
 * READ_FAILED with errno set (open/read failed), or UNPARSED. */
#define CHUNK (64 * 1024)
#define READ_FAILED 1
#define UNPARSED 2
static int summarize_fdinfo(int dirfd, const char *name, enum kind k, struct summary *s) {
    static __thread char buf[CHUNK + 1];
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return READ_FAILED;
    size_t kept = 0; /* bytes of an unfinished line at the start of buf */
    int rc = 0;
    s->count = 0;
    s->digest = 0;
    for (;;) {
        if (kept == CHUNK) { /* a 64 KiB line: no watch line is that long */
            rc = UNPARSED;
            break;
        }
        ssize_t got = read(fd, buf + kept, CHUNK - kept);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            rc = READ_FAILED;
            break;
        }
        size_t have = kept + (size_t)got;
        const char *end = buf + have, *line = buf;
        for (;;) {
            const char *nl = memchr(line, '\n', (size_t)(end - line));
            if (nl == NULL)
                break;
            if (summarize_line(line, nl, k, s) < 0) {
                rc = UNPARSED;
                goto done;
            }
            line = nl + 1;
        }
        kept = (size_t)(end - line);
        if (got == 0) { /* the last line may lack its newline */
            if (kept && summarize_line(line, end, k, s) < 0)
                rc = UNPARSED;
            break;
        }
        memmove(buf, line, kept);
    }
done:;
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

/* The watches of one fd as (count, digest), or an int: its errno (gone, denied) or UNPARSABLE. */
static PyObject *watches_of(int infofd, const char *name, enum kind k) {
    struct summary s;
    int rc = summarize_fdinfo(infofd, name, k, &s);
    if (rc == READ_FAILED)
        return PyLong_FromLong(errno);
    if (rc == UNPARSED)
        return PyLong_FromLong(UNPARSABLE);
    return Py_BuildValue("(KK)", s.count, (unsigned long long)s.digest);
}

static int open_pid(const char *pid_dir, const char *sub) {
    char path[4096];
    if (snprintf(path, sizeof path, "%s/%s", pid_dir, sub) >= (int)sizeof path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    return open(path, DIR_FLAGS);
}

static int append_pair(PyObject *list, long fd, PyObject *w) {
    if (w == NULL)
        return -1;
    PyObject *pair = Py_BuildValue("(lN)", fd, w);
    if (pair == NULL)
        return -1;
    int rc = PyList_Append(list, pair);
    Py_DECREF(pair);
    return rc;
}

PyDoc_STRVAR(examine_doc,
"examine(pid_dir, /) -> (nfds, denied_fds, pipes, inotify, epoll)\n\n"
"Readlink every fd of one process. pipes: list of pipe inodes; inotify and epoll: lists of\n"
"(fd, watches) where watches is a tuple of tuples, or an int (errno, or -1: unparsable).\n"
"Raises OSError when pid_dir/fd cannot be opened.");

/* examine() on an open /proc/<pid> directory fd. */
static PyObject *examine_at(int pfd) {
    int dfd = openat(pfd, "fd", DIR_FLAGS);
    if (dfd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    DIR *d = fdopendir(dfd);
    if (d == NULL) {
        close(dfd);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    int infofd = -1; /* opened at the first inotify/epoll fd: most processes have none */
    long nfds = 0, denied = 0;
    PyObject *pipes = PyList_New(0), *inotify = PyList_New(0), *epoll = PyList_New(0);
    PyObject *result = NULL;
    if (pipes == NULL || inotify == NULL || epoll == NULL)
        goto out;
    struct dirent *e;
    char link[256];
    for (;;) {
        errno = 0;
        e = readdir(d);
        if (e == NULL) {
            if (errno != 0 && errno != ENOENT && errno != ESRCH) {
                PyErr_SetFromErrno(PyExc_OSError);
                goto out;
            }
            break; /* a process that exits mid-listing ends its listing */
        }
        if (e->d_name[0] == '.')
            continue;
        nfds++;
        ssize_t n = readlinkat(dfd, e->d_name, link, sizeof link - 1);
        if (n < 0) {
            if (errno != ENOENT && errno != ESRCH)
                denied++;
            continue;
        }
        long long ino = 0;
        enum kind k = classify(link, n, &ino);
        if (k == K_PIPE) {
            PyObject *v = PyLong_FromLongLong(ino);
            if (v == NULL || PyList_Append(pipes, v) < 0) {
                Py_XDECREF(v);
                goto out;
            }
            Py_DECREF(v);
        } else if (k == K_INOTIFY || k == K_EPOLL) {
            if (infofd < 0 && (infofd = openat(pfd, "fdinfo", DIR_FLAGS)) < 0) {
                if (errno != ENOENT && errno != ESRCH)
                    denied++;
                continue;
            }
            long fdnum = strtol(e->d_name, NULL, 10);
            if (append_pair(k == K_INOTIFY ? inotify : epoll, fdnum, watches_of(infofd, e->d_name, k)) < 0)
                goto out;
        }
    }
    result = Py_BuildValue("(llOOO)", nfds, denied, pipes, inotify, epoll);
out:
    if (infofd >= 0)
        close(infofd);
    closedir(d);
    Py_XDECREF(pipes);
    Py_XDECREF(inotify);
    Py_XDECREF(epoll);
    return result;
}

static PyObject *examine(PyObject *self, PyObject *args) {
    const char *pid_dir;
    if (!PyArg_ParseTuple(args, "s:examine", &pid_dir))
        return NULL;
    int pfd = open(pid_dir, DIR_FLAGS);
    if (pfd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *r = examine_at(pfd);
    close(pfd);
    return r;
}

PyDoc_STRVAR(refresh_doc,
"refresh(pid_dir, fd, kind, /) -> watches tuple | int\n\n"
"Re-read one known fd (kind 'inotify' or 'epoll'): its watches, or an int: errno (gone,\n"
"denied), -1 unparsable, -2 the fd no longer names an instance of that kind.");

static PyObject *refresh(PyObject *self, PyObject *args) {
    const char *pid_dir, *kind_s;
    int fd;
    if (!PyArg_ParseTuple(args, "sis:refresh", &pid_dir, &fd, &kind_s))
        return NULL;
    enum kind want = strcmp(kind_s, "inotify") == 0 ? K_INOTIFY : strcmp(kind_s, "epoll") == 0 ? K_EPOLL : K_OTHER;
    if (want == K_OTHER) {
        PyErr_SetString(PyExc_ValueError, "kind: expected 'inotify' or 'epoll'");
        return NULL;
    }
    char path[4096], link[256];
    if (snprintf(path, sizeof path, "%s/fd/%d", pid_dir, fd) >= (int)sizeof path)
        return PyLong_FromLong(ENAMETOOLONG);
    ssize_t n = readlink(path, link, sizeof link - 1);
    if (n < 0)
        return PyLong_FromLong(errno);
    long long ino;
    if (classify(link, n, &ino) != want)
        return PyLong_FromLong(NOT_THAT_KIND);
    int infofd = open_pid(pid_dir, "fdinfo");
    if (infofd < 0)
        return PyLong_FromLong(errno);
    char name[32];
    snprintf(name, sizeof name, "%d", fd);
    PyObject *w = watches_of(infofd, name, want);
    close(infofd);
    return w;
}

/* Fields 9 (flags), 20 (num_threads) and 22 (starttime) of /proc/<pid>/stat (proc(5)
 * numbering), counted after the last ')' since the command may hold spaces and parentheses. */
static int stat_fields(const char *buf, long long *starttime, long long *threads, unsigned long long *flags) {
    const char *p = strrchr(buf, ')');
    if (p == NULL)
        return -1;
    p++;
    int field = 2;
    int got = 0;
    while (*p) {
        while (*p == ' ')
            p++;
        if (!*p || *p == '\n')
            break;
        field++;
        if (field == 9 || field == 20 || field == 22) {
            char *q;
            if (field == 9) {
                *flags = strtoull(p, &q, 10);
            } else {
                long long v = strtoll(p, &q, 10);
                if (field == 20)
                    *threads = v;
                else
                    *starttime = v;
            }
            if (q == p)
                return -1;
            if (++got == 3)
                return 0;
        }
        while (*p && *p != ' ' && *p != '\n')
            p++;
    }
    return -1;
}

/* A file of a process, relative to `pfd`: `name` itself when `path` is NULL (pfd is its open
 * /proc/<pid> directory), else `path` (holding the pid dir's `base` bytes: its whole path with
 * AT_FDCWD, "<pid>" under an open /proc) with "/name" written after them; the caller checked
 * the longest name fits. */
static const char *at_name(int pfd, const char *name, char *path, size_t base) {
    if (path == NULL)
        return name;
    path[base] = '/';
    strcpy(path + base + 1, name);
    return path;
}

/* The thread count from st_nlink of <pid>/task (2 + threads), or -1. */
static long long task_threads(int pfd, char *path, size_t base) {
    struct stat st;
    if (fstatat(pfd, at_name(pfd, "task", path, base), &st, 0) < 0 || st.st_nlink < 3)
        return -1;
    return (long long)st.st_nlink - 2;
}

/* The leader's CPU time in ns (first field of <pid>/schedstat), or -1. */
static long long leader_runtime(int pfd, char *path, size_t base) {
    size_t len;
    char *buf = slurp(pfd, at_name(pfd, "schedstat", path, base), &len);
    if (buf == NULL)
        return -1;
    char *q;
    long long v = strtoll(buf, &q, 10);
    free(buf);
    return q != buf ? v : -1;
}

/* PF_KTHREAD in include/linux/sched.h: a kernel thread. Since Linux 5.19 a task that will exec
 * a user program (a usermode helper) is made without it (user_mode_thread), so a task that has
 * it never runs user code: no fds, no inotify, no container. */
#define PF_KTHREAD 0x00200000ULL

/* What whole() tells of a process it reads for the first time (or in a full scan), through an
 * open /proc/<pid> directory fd: (fd_count, starttime, threads, runtime_ns, kthread). starttime,
 * the thread count and the flags come from stat (fields 22, 20 and 9): with the pid, the start
 * time names the process for the boot (a restart re-checks it). Raises ValueError on an
 * unreadable stat. */
static PyObject *quick_at(int pfd) {
    struct stat st;
    if (fstatat(pfd, "fd", &st, 0) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    size_t len;
    char *buf = slurp(pfd, "stat", &len);
    if (buf == NULL)
        return PyErr_SetFromErrno(PyExc_OSError);
    long long starttime = 0, threads = 0;
    unsigned long long flags = 0;
    int bad = stat_fields(buf, &starttime, &threads, &flags);
    free(buf);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "stat: unexpected format");
        return NULL;
    }
    return Py_BuildValue("(LLLLO)", (long long)st.st_size, starttime, threads, leader_runtime(pfd, NULL, 0),
                         (flags & PF_KTHREAD) ? Py_True : Py_False);
}

PyDoc_STRVAR(glance_doc,
"glance(pid_dir, threads, runtime, /) -> (fd_count, threads, runtime_ns)\n\n"
"What a steady-state scan needs of a process it already knows: st_size of pid_dir/fd (exact\n"
"since Linux 6.2, 0 before); when `threads`, the thread count from st_nlink of pid_dir/task\n"
"(2 + threads), else -1; when `runtime`, the leader's CPU time from schedstat, else -1.\n"
"One path-based call each (a stat, a stat, an open and read): opening pid_dir to reach them\n"
"through it cost an open and a close more than the calls saved. Who it is comes from the\n"
"caller (the inode of pid_dir in its listing of /proc); a pid is not reused between two\n"
"system calls of one glance. Raises OSError (ENOENT/ESRCH when the process is gone).");

static PyObject *glance(PyObject *self, PyObject *args) {
    const char *pid_dir;
    int want_threads, want_runtime;
    if (!PyArg_ParseTuple(args, "spp:glance", &pid_dir, &want_threads, &want_runtime))
        return NULL;
    struct stat st;
    long long threads = -1, runtime = -1;
    char path[PATH_MAX];
    size_t base = strlen(pid_dir);
    if (base + sizeof "/schedstat" > sizeof path) {
        errno = ENAMETOOLONG;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    memcpy(path, pid_dir, base);
    memcpy(path + base, "/fd", sizeof "/fd");
    if (stat(path, &st) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (want_threads)
        threads = task_threads(AT_FDCWD, path, base);
    if (want_runtime)
        runtime = leader_runtime(AT_FDCWD, path, base);
    return Py_BuildValue("(LLL)", (long long)st.st_size, threads, runtime);
}

/* survey()'s flags per expected process (limits_fdread.S_*). */
#define S_KTHREAD 1
#define S_THREADS 2
#define S_RUNTIME 4
#define S_HAD_FDS 8

PyDoc_STRVAR(survey_doc,
"survey(proc, listing, expect, always, /) -> {pid: None | int | (fd_count, threads, runtime_ns)}\n\n"
"The steady-state scan's glances in one call: for every pid of `listing` ({pid: inode of\n"
"proc/<pid>}) compare what the process shows now with `expect` ({pid: (inode, fd_count, flags,\n"
"threads, runtime_ns)}, what its record says) and return only the processes the caller must\n"
"look at: None for one with no expectation or another inode (new, or a reused pid), an errno\n"
"for one that could not be glanced, and the glance (fd_count, threads, runtime_ns; -1 where\n"
"not asked or unknown) for one whose glance differs where it matters: its fd count (or 0 where\n"
"it had fds: unknown before Linux 6.2), its thread count (flag S_THREADS), its CPU time or a\n"
"second thread (S_RUNTIME: it may have added a watch), or any of the `always` flags. A kernel\n"
"thread (S_KTHREAD) is not looked at. Exactly limits_fdread.survey_py, without a Python frame\n"
"per process: at 280 processes that loop, not the system calls, was most of the steady scan.\n"
"Each glance goes through one open `proc` directory (fstatat on '<pid>/fd'). Raises OSError\n"
"when `proc` cannot be opened, TypeError/ValueError on a malformed expectation.");

static PyObject *survey(PyObject *self, PyObject *args) {
    const char *proc;
    PyObject *listing, *expect;
    long always;
    if (!PyArg_ParseTuple(args, "sO!O!l:survey", &proc, &PyDict_Type, &listing, &PyDict_Type, &expect, &always))
        return NULL;
    int procfd = open(proc, DIR_FLAGS);
    if (procfd < 0)
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, proc);
    PyObject *out = PyDict_New();
    if (out == NULL) {
        close(procfd);
        return NULL;
    }
    Py_ssize_t pos = 0;
    PyObject *key, *ident_obj;
    char rel[64];
    while (PyDict_Next(listing, &pos, &key, &ident_obj)) {
        PyObject *report = NULL; /* new reference, or NULL: nothing to report */
        PyObject *exp = PyDict_GetItemWithError(expect, key);
        if (exp == NULL && PyErr_Occurred())
            goto fail;
        long long ident = PyLong_AsLongLong(ident_obj);
        long long pid = PyLong_AsLongLong(key);
        if ((ident == -1 || pid == -1) && PyErr_Occurred())
            goto fail;
        long long e[5];
        if (exp != NULL) {
            if (!PyTuple_Check(exp) || PyTuple_GET_SIZE(exp) != 5) {
                PyErr_SetString(PyExc_TypeError, "survey: an expectation is a 5-tuple");
                goto fail;
            }
            for (int i = 0; i < 5; i++) {
                e[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(exp, i));
                if (e[i] == -1 && PyErr_Occurred())
                    goto fail;
            }
        }
        if (exp == NULL || e[0] != ident) {
            report = Py_NewRef(Py_None);
        } else if (!(e[2] & S_KTHREAD)) {
            int n = snprintf(rel, sizeof rel, "%lld/fd", pid);
            if (n < 0 || (size_t)n >= sizeof rel - sizeof "schedstat") {
                PyErr_SetString(PyExc_ValueError, "survey: pid out of range");
                goto fail;
            }
            struct stat st;
            if (fstatat(procfd, rel, &st, 0) < 0) {
                report = PyLong_FromLong(errno);
            } else {
                long long fd_count = (long long)st.st_size, threads = -1, runtime = -1;
                size_t base = (size_t)n - 3; /* "<pid>" */
                if (e[2] & (S_THREADS | S_RUNTIME))
                    threads = task_threads(procfd, rel, base);
                if (e[2] & S_RUNTIME)
                    runtime = leader_runtime(procfd, rel, base);
                int moved = fd_count != e[1] || (fd_count == 0 && (e[2] & S_HAD_FDS)) || (e[2] & always);
                if ((e[2] & S_THREADS) && threads != e[3])
                    moved = 1;
                if ((e[2] & S_RUNTIME) && (e[4] < 0 || runtime != e[4] || threads != 1))
                    moved = 1;
                if (moved)
                    report = Py_BuildValue("(LLL)", fd_count, threads, runtime);
                else
                    continue;
            }
        } else {
            continue;
        }
        if (report == NULL || PyDict_SetItem(out, key, report) < 0) {
            Py_XDECREF(report);
            goto fail;
        }
        Py_DECREF(report);
    }
    close(procfd);
    return out;
fail:
    close(procfd);
    Py_DECREF(out);
    return NULL;
}

/* The value of the "Key:" line of a status text: [*v, *end) with blanks trimmed; -1 absent. */
static int status_line(const char *buf, size_t len, const char *key, const char **v, const char **end) {
    size_t klen = strlen(key);
    const char *p = buf, *stop = buf + len;
    while (p < stop) {
        const char *nl = memchr(p, '\n', (size_t)(stop - p));
        const char *le = nl ? nl : stop;
        if ((size_t)(le - p) >= klen && memcmp(p, key, klen) == 0) {
            p += klen;
            while (p < le && (*p == ' ' || *p == '\t'))
                p++;
            while (le > p && (le[-1] == ' ' || le[-1] == '\t' || le[-1] == '\r'))
                le--;
            *v = p;
            *end = le;
            return 0;
        }
        p = le + 1;
    }
    return -1;
}

/* status() on an open /proc/<pid> directory fd: (name, (ruid, euid, suid, fsuid), threads),
 * the lines limits_parse.parse_proc_status reads, with its errors (ValueError). */
static PyObject *status_at(int pfd) {
    size_t len;
    char *buf = slurp(pfd, "status", &len);
    if (buf == NULL)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *result = NULL;
    const char *v, *e;
    long long uids[4];
    if (status_line(buf, len, "Uid:", &v, &e) < 0) {
        PyErr_SetString(PyExc_ValueError, "status: no Uid line");
        goto out;
    }
    for (int i = 0; i < 4; i++) {
        char *q;
        while (v < e && (*v == ' ' || *v == '\t'))
            v++;
        uids[i] = strtoll(v, &q, 10);
        if (q == v || q > e) {
            PyErr_SetString(PyExc_ValueError, "status: expected 4 uids");
            goto out;
        }
        v = q;
    }
    while (v < e && (*v == ' ' || *v == '\t'))
        v++;
    if (v != e) {
        PyErr_SetString(PyExc_ValueError, "status: expected 4 uids");
        goto out;
    }
    long long threads = 1;
    if (status_line(buf, len, "Threads:", &v, &e) == 0) {
        char *q;
        threads = strtoll(v, &q, 10);
        if (q == v) {
            PyErr_SetString(PyExc_ValueError, "status: Threads is not a number");
            goto out;
        }
    }
    PyObject *name;
    if (status_line(buf, len, "Name:", &v, &e) == 0)
        name = PyUnicode_DecodeASCII(v, e - v, "replace");
    else
        name = PyUnicode_FromString("");
    if (name == NULL)
        goto out;
    result = Py_BuildValue("(N(LLLL)L)", name, uids[0], uids[1], uids[2], uids[3], threads);
out:
    free(buf);
    return result;
}

PyDoc_STRVAR(status_doc,
"status(pid_dir, /) -> (name, (ruid, euid, suid, fsuid), threads)\n\n"
"The Name, Uid and Threads lines of pid_dir/status. Raises OSError, or ValueError (no Uid line).");

static PyObject *status(PyObject *self, PyObject *args) {
    const char *pid_dir;
    if (!PyArg_ParseTuple(args, "s:status", &pid_dir))
        return NULL;
    int pfd = open(pid_dir, DIR_FLAGS);
    if (pfd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *r = status_at(pfd);
    close(pfd);
    return r;
}

PyDoc_STRVAR(whole_doc,
"whole(pid_dir, /) -> ((fd_count, starttime, threads, runtime_ns), status, examine)\n\n"
"The process's fd count, stat and schedstat, status() and examine() through one open\n"
"/proc/<pid> directory: what a process with no reusable record needs, with one path walk\n"
"instead of four. Raises as they do (ValueError for an unreadable stat).");

static PyObject *whole(PyObject *self, PyObject *args) {
    const char *pid_dir;
    if (!PyArg_ParseTuple(args, "s:whole", &pid_dir))
        return NULL;
    int pfd = open(pid_dir, DIR_FLAGS);
    if (pfd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *q = NULL, *st = NULL, *ex = NULL, *r = NULL;
    if ((q = quick_at(pfd)) != NULL && (st = status_at(pfd)) != NULL && (ex = examine_at(pfd)) != NULL)
        r = PyTuple_Pack(3, q, st, ex);
    Py_XDECREF(q);
    Py_XDECREF(st);
    Py_XDECREF(ex);
    close(pfd);
    return r;
}

static PyMethodDef methods[] = {
    {"examine", examine, METH_VARARGS, examine_doc},
    {"refresh", refresh, METH_VARARGS, refresh_doc},
    {"glance", glance, METH_VARARGS, glance_doc},
    {"survey", survey, METH_VARARGS, survey_doc},
    {"status", status, METH_VARARGS, status_doc},
    {"whole", whole, METH_VARARGS, whole_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fdscan", "The fd scan's system-call loop (see _fdscan.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fdscan(void) { return PyModule_Create(&module); }
