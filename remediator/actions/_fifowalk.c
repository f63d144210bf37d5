/*
 * remediator.actions._fifowalk: the system-call loop of the fifo walk (fifo_walk.walk), in C.
 *
 * Why C: at the case report's scale (126,064 directories) the walk makes ~15 system calls per
 * directory; the same loop in Python spends more time building stat results and DirEntry
 * objects than the kernel spends in the calls (5.5 s against `find -delete`'s 3.0 s on one
 * tree; benchmarks/fifo_cleanup.py). Here the loop costs what its system calls cost.
 *
 * What this file does NOT decide: whether a directory is an orphan. For every directory it
 * calls the Python `judge(listed_ino, dir, entries, rule, overflow, marked)` (fifo_rule.judge)
 * and removes the directory only when that returns None. It never reads a directory whose
 * device or inode is not what the root's listing names (a mount point): then `judge` gets no
 * entries and says why it is kept.
 *
 * Removal, per directory judged an orphan, through the directory's fd:
 *   for each entry: fstatat(dfd, name) must give the judged (dev, ino), then unlinkat(dfd, name)
 *   fstatat(rootfd, dirname) must give the directory's (dev, ino), then unlinkat(AT_REMOVEDIR)
 * ENOENT is the one error read as "someone else removed it". Any other errno is counted for
 * that directory and the walk goes on.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

#define DIR_FLAGS (O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
#define MAX_FAILURES_LISTED 20

typedef struct {
    Py_ssize_t entries, orphans, removed_dirs, removed_fifos, marked;
    int stopped_at_max;
    PyObject *kept;     /* dict reason -> count */
    PyObject *failed;   /* dict errno name -> count */
    PyObject *failures; /* list of (dir, step, errno) */
} Tally;

static int bump(PyObject *dict, const char *key) {
    PyObject *k = PyUnicode_FromString(key);
    if (k == NULL) return -1;
    PyObject *old = PyDict_GetItemWithError(dict, k);
    long n = old ? PyLong_AsLong(old) : 0;
    if (PyErr_Occurred()) { Py_DECREF(k); return -1; }
    PyObject *v = PyLong_FromLong(n + 1);
    int rc = v ? PyDict_SetItem(dict, k, v) : -1;
    Py_XDECREF(v);
    Py_DECREF(k);
    return rc;
}

static int bump_obj(PyObject *dict, PyObject *k) {
    PyObject *old = PyDict_GetItemWithError(dict, k);
    long n = old ? PyLong_AsLong(old) : 0;
    if (PyErr_Occurred()) return -1;
    PyObject *v = PyLong_FromLong(n + 1);
    int rc = v ? PyDict_SetItem(dict, k, v) : -1;
    Py_XDECREF(v);
    return rc;
}

static int fail(Tally *t, const char *dir, const char *step, int err) {
    PyObject *code = PyLong_FromLong(err);
    if (code == NULL) return -1;
    int rc = bump_obj(t->failed, code);
    if (rc == 0 && PyList_GET_SIZE(t->failures) < MAX_FAILURES_LISTED) {
        PyObject *item = Py_BuildValue("(Nsi)", PyUnicode_DecodeFSDefault(dir), step, err);
        rc = item ? PyList_Append(t->failures, item) : -1;
        Py_XDECREF(item);
    }
    Py_DECREF(code);
    return rc;
}

static double seconds(const struct timespec *ts) { return (double)ts->tv_sec + (double)ts->tv_nsec * 1e-9; }

/* A tuple of n fresh references (stolen); NULL, with every item released, if one is NULL. */
static PyObject *tuple_of(int n, PyObject **items) {
    PyObject *t = NULL;
    for (int i = 0; i < n; i++)
        if (items[i] == NULL) goto fail;
    t = PyTuple_New(n);
    if (t == NULL) goto fail;
    for (int i = 0; i < n; i++) PyTuple_SET_ITEM(t, i, items[i]);
    return t;
fail:
    for (int i = 0; i < n; i++) Py_XDECREF(items[i]);
    return NULL;
}

/* (name, d_ino, mode, dev, ino, mtime): built by hand, Py_BuildValue's format parsing costs
 * more than the fstatat that produced it. */
static PyObject *entry_tuple(const char *name, ino_t d_ino, const struct stat *st) {
    PyObject *items[6] = {
        PyUnicode_DecodeFSDefault(name),
        PyLong_FromUnsignedLongLong((unsigned long long)d_ino),
        PyLong_FromUnsignedLong((unsigned long)st->st_mode),
        PyLong_FromUnsignedLongLong((unsigned long long)st->st_dev),
        PyLong_FromUnsignedLongLong((unsigned long long)st->st_ino),
        PyFloat_FromDouble(seconds(&st->st_mtim)),
    };
    return tuple_of(6, items);
}

/* getdents64(2) records; glibc's DIR* would cost an fstat and two fcntls per directory. */
struct dirent64_rec {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* Read the open directory dfd: a list of entry tuples, at most max_entries (then *overflow).
 * *err: the errno of a failed getdents64/fstatat (the list is then incomplete). */
static PyObject *read_entries(int dfd, int max_entries, int *overflow, int *err) {
    PyObject *list = PyList_New(0);
    if (list == NULL) return NULL;
    char buf[8192] __attribute__((aligned(8)));
    *overflow = 0;
    *err = 0;
    for (;;) {
        long n = syscall(SYS_getdents64, dfd, buf, sizeof buf);
        if (n < 0) {
            *err = errno;
            return list;
        }
        if (n == 0) return list;
        for (long off = 0; off < n;) {
            struct dirent64_rec *de = (struct dirent64_rec *)(buf + off);
            off += de->d_reclen;
            if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
            if (PyList_GET_SIZE(list) >= max_entries) {
                *overflow = 1;
                return list;
            }
            struct stat st;
            if (fstatat(dfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
                if (errno == ENOENT) continue; /* removed since the listing */
                *err = errno;
                return list;
            }
            PyObject *e = entry_tuple(de->d_name, (ino_t)de->d_ino, &st);
            if (e == NULL || PyList_Append(list, e) != 0) {
                Py_XDECREF(e);
                Py_DECREF(list);
                return NULL;
            }
            Py_DECREF(e);
        }
    }
}

static int mark(int dfd, const char *xattr) {
    return fsetxattr(dfd, xattr, "1", 1, 0) == 0 ? 1 : 0;
}

/* Remove the judged directory `name` (open as dfd). Returns -1 on a Python error. */
static int remove_dir(Tally *t, int rootfd, const char *name, int dfd, const struct stat *dir_st,
                      PyObject *entries, const char *xattr) {
    Py_ssize_t n = PyList_GET_SIZE(entries);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PyList_GET_ITEM(entries, i);
        PyObject *bytes = PyUnicode_EncodeFSDefault(PyTuple_GET_ITEM(e, 0));
        if (bytes == NULL) return -1;
        const char *ename = PyBytes_AS_STRING(bytes);
        unsigned long long dev = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(e, 3));
        unsigned long long ino = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(e, 4));
        struct stat now;
        int rc = 0;
        if (fstatat(dfd, ename, &now, AT_SYMLINK_NOFOLLOW) != 0) {
            if (errno != ENOENT) rc = fail(t, name, "fstatat", errno) == 0 ? 1 : -1;
            /* ENOENT: removed by someone else */
        } else if ((unsigned long long)now.st_dev != dev || (unsigned long long)now.st_ino != ino) {
            rc = bump(t->kept, "changed") == 0 ? 1 : -1;
        } else if (unlinkat(dfd, ename, 0) != 0) {
            if (errno != ENOENT) rc = fail(t, name, "unlinkat", errno) == 0 ? 1 : -1;
        } else {
            t->removed_fifos++;
        }
        Py_DECREF(bytes);
        if (rc != 0) return rc < 0 ? -1 : 0; /* 1: this directory stops here */
    }
    struct stat now;
    if (fstatat(rootfd, name, &now, AT_SYMLINK_NOFOLLOW) != 0) {
        if (errno != ENOENT) return fail(t, name, "fstatat", errno);
        t->marked += mark(dfd, xattr);
        return bump(t->kept, "raced");
    }
    if (now.st_dev != dir_st->st_dev || now.st_ino != dir_st->st_ino) {
        t->marked += mark(dfd, xattr);
        return bump(t->kept, "raced");
    }
    if (unlinkat(rootfd, name, AT_REMOVEDIR) != 0) {
        if (errno == ENOENT) {
            t->marked += mark(dfd, xattr);
            return bump(t->kept, "raced");
        }
        if (errno == ENOTEMPTY || errno == EEXIST) return bump(t->kept, "not_empty");
        return fail(t, name, "rmdir", errno);
    }
    t->removed_dirs++;
    return 0;
}

/* One entry of the root. Returns -1 on a Python error. */
static int one(Tally *t, int rootfd, struct dirent *de, unsigned long long root_dev, int max_entries,
               int remove, PyObject *judge, PyObject *rule, const char *xattr) {
    const char *name = de->d_name;
    unsigned char type = de->d_type;
    if (type == DT_UNKNOWN) {
        struct stat st;
        if (fstatat(rootfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0)
            return bump(t->kept, errno == ENOENT ? "gone" : "unreadable");
        type = S_ISDIR(st.st_mode) ? DT_DIR : S_ISLNK(st.st_mode) ? DT_LNK : DT_REG;
    }
    if (type == DT_LNK) return bump(t->kept, "symlink");
    if (type != DT_DIR) return bump(t->kept, "not_a_directory");
    int dfd = openat(rootfd, name, DIR_FLAGS);
    if (dfd < 0) {
        if (errno == ENOENT) return bump(t->kept, "gone");
        return bump(t->kept, (errno == ENOTDIR || errno == ELOOP) ? "changed" : "unreadable");
    }
    struct stat dir_st;
    if (fstat(dfd, &dir_st) != 0) {
        close(dfd);
        return bump(t->kept, "unreadable");
    }
    PyObject *items[3] = {
        PyLong_FromUnsignedLongLong((unsigned long long)dir_st.st_dev),
        PyLong_FromUnsignedLongLong((unsigned long long)dir_st.st_ino),
        PyFloat_FromDouble(seconds(&dir_st.st_mtim)),
    };
    PyObject *dir = tuple_of(3, items);
    if (dir == NULL) { close(dfd); return -1; }
    PyObject *entries = NULL;
    int overflow = 0, marked = 0, rc = 0, readable = 0;
    if ((unsigned long long)dir_st.st_dev != root_dev || dir_st.st_ino != de->d_ino) {
        /* another device or a mount point: never read; judge says which */
        entries = PyList_New(0);
        if (entries == NULL) { close(dfd); Py_DECREF(dir); return -1; }
    } else {
        int err = 0;
        entries = read_entries(dfd, max_entries, &overflow, &err);
        if (entries == NULL) { close(dfd); Py_DECREF(dir); return -1; }
        if (err != 0) {
            close(dfd);
            Py_DECREF(dir);
            Py_DECREF(entries);
            return bump(t->kept, "unreadable");
        }
        readable = 1;
        if (PyList_GET_SIZE(entries) == 0 && !overflow) {
            char buf[4];
            marked = fgetxattr(dfd, xattr, buf, sizeof buf) >= 0;
        }
    }
    PyObject *listed = PyLong_FromUnsignedLongLong((unsigned long long)de->d_ino);
    PyObject *verdict = NULL;
    if (listed != NULL) {
        PyObject *argv[6] = {listed, dir, entries, rule, overflow ? Py_True : Py_False, marked ? Py_True : Py_False};
        verdict = PyObject_Vectorcall(judge, argv, 6, NULL);
        Py_DECREF(listed);
    }
    if (verdict == NULL) {
        rc = -1;
    } else if (verdict != Py_None) {
        rc = bump_obj(t->kept, verdict);
    } else {
        t->orphans++;
        if (remove && readable) rc = remove_dir(t, rootfd, name, dfd, &dir_st, entries, xattr);
    }
    Py_XDECREF(verdict);
    Py_DECREF(entries);
    Py_DECREF(dir);
    close(dfd);
    return rc;
}

static PyObject *walk(PyObject *self, PyObject *args) {
    int rootfd, max_entries, remove;
    unsigned long long root_dev;
    Py_ssize_t max_dirs;
    PyObject *judge, *rule;
    const char *xattr;
    if (!PyArg_ParseTuple(args, "iKinpOOs", &rootfd, &root_dev, &max_entries, &max_dirs, &remove, &judge, &rule,
                          &xattr))
        return NULL;
    int fd = fcntl(rootfd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) return PyErr_SetFromErrno(PyExc_OSError);
    /* fdopendir's fd shares the file offset with rootfd: start the listing from the top */
    if (lseek(fd, 0, SEEK_SET) < 0) { close(fd); return PyErr_SetFromErrno(PyExc_OSError); }
    DIR *root = fdopendir(fd);
    if (root == NULL) { close(fd); return PyErr_SetFromErrno(PyExc_OSError); }
    Tally t = {0};
    t.kept = PyDict_New();
    t.failed = PyDict_New();
    t.failures = PyList_New(0);
    PyObject *result = NULL;
    if (t.kept == NULL || t.failed == NULL || t.failures == NULL) goto done;
    struct dirent *de;
    int list_err = 0;
    for (;;) {
        errno = 0;
        de = readdir(root);
        if (de == NULL) { list_err = errno; break; }
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
        if (t.orphans >= max_dirs) { t.stopped_at_max = 1; break; }
        t.entries++;
        if (one(&t, rootfd, de, root_dev, max_entries, remove, judge, rule, xattr) != 0) goto done;
    }
    if (list_err != 0) {
        errno = list_err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = Py_BuildValue("{s:n,s:n,s:n,s:n,s:n,s:O,s:O,s:O,s:O}", "entries", t.entries, "orphans",
                           t.orphans, "removed_dirs", t.removed_dirs, "removed_fifos", t.removed_fifos,
                           "marked", t.marked, "stopped_at_max", t.stopped_at_max ? Py_True : Py_False,
                           "kept", t.kept, "failed", t.failed, "failures", t.failures);
done:
    closedir(root);
    Py_XDECREF(t.kept);
    Py_XDECREF(t.failed);
    Py_XDECREF(t.failures);
    return result;
}

static PyMethodDef methods[] = {
    {"walk", walk, METH_VARARGS,
     "walk(rootfd, root_dev, max_entries, max_dirs, remove, judge, rule, xattr) -> dict of counts"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fifowalk", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fifowalk(void) { return PyModule_Create(&module); }
