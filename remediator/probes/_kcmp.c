/*
 * remediator.probes._kcmp: which fds are the same open file, by kcmp(2) KCMP_FILE, for the
 * instance dedup of the limits probe (limits_dedup.py): one comparison, and the whole
 * sort-and-merge of a group of fds in one call (2,000 fds of one watch list take ~22,000
 * comparisons: ~1 us each here, 3-4 us through a Python frame). It only compares; kcmp needs
 * PTRACE_MODE_READ on both processes, the right reading their /proc/<pid>/fd needs.
 * Optional: without it, limits_dedup calls kcmp through ctypes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

PyDoc_STRVAR(kcmp_file_doc,
"kcmp_file(pid1, pid2, fd1, fd2, /) -> int\n\n"
"kcmp(2) KCMP_FILE: 0 the same open file, 1 pid1's is lower, 2 higher, -1 error (a process\n"
"exited), 3 unordered. The ordering limits_dedup sorts instances by; a ctypes call costs 8x.");

static PyObject *kcmp_file(PyObject *self, PyObject *args) {
    int pid1, pid2, fd1, fd2;
    if (!PyArg_ParseTuple(args, "iiii:kcmp_file", &pid1, &pid2, &fd1, &fd2))
        return NULL;
#ifdef SYS_kcmp
    long r = syscall(SYS_kcmp, (long)pid1, (long)pid2, 0L /* KCMP_FILE */, (long)fd1, (long)fd2);
    return PyLong_FromLong(r < 0 ? -1 : r);
#else
    return PyLong_FromLong(-1);
#endif
}

#ifdef SYS_kcmp
/* kcmp(2) KCMP_FILE of two (pid, fd): 0 same file, 1 / 2 ordered, -1 error (a process exited
 * or may not be inspected), 3 unordered. */
static long kcmp_pf(const int *a, const int *b) {
    return syscall(SYS_kcmp, (long)a[0], (long)b[0], 0L /* KCMP_FILE */, (long)a[1], (long)b[1]);
}

struct sorting {
    const int *pf; /* pid, fd pairs */
    int failed;    /* a comparison failed: the order may be wrong, the caller re-checks */
};

static int compare_idx(struct sorting *st, Py_ssize_t i, Py_ssize_t j) {
    long r = kcmp_pf(st->pf + 2 * i, st->pf + 2 * j);
    if (r == 0)
        return 0;
    if (r == 1)
        return -1;
    if (r == 2)
        return 1;
    st->failed = 1;
    return i < j ? -1 : 1;
}

/* A merge sort of our own: glibc's qsort may misbehave with a comparator that stops being
 * consistent (a process exiting mid-sort); this one only ends up in a wrong order, which the
 * caller detects (st->failed) and redoes. */
static void merge_sort(struct sorting *st, Py_ssize_t *a, Py_ssize_t *tmp, Py_ssize_t n) {
    if (n < 2)
        return;
    Py_ssize_t h = n / 2;
    merge_sort(st, a, tmp, h);
    merge_sort(st, a + h, tmp, n - h);
    Py_ssize_t i = 0, j = h, k = 0;
    while (i < h && j < n)
        tmp[k++] = compare_idx(st, a[j], a[i]) < 0 ? a[j++] : a[i++];
    while (i < h)
        tmp[k++] = a[i++];
    while (j < n)
        tmp[k++] = a[j++];
    memcpy(a, tmp, (size_t)n * sizeof *a);
}
#endif

PyDoc_STRVAR(kcmp_groups_doc,
"kcmp_groups(pairs, /) -> (groups, unknown) | None\n\n"
"Sort (pid, fd) pairs by their open file with kcmp(2) KCMP_FILE and group those that are the\n"
"same file: groups is a list of lists of indices into pairs, in kcmp order; unknown lists the\n"
"indices that could not be compared (their process exited, or may not be inspected). None\n"
"when this kernel has no kcmp. The loop of limits_dedup.group_instances, without a Python\n"
"call per comparison.");

static PyObject *kcmp_groups(PyObject *self, PyObject *arg) {
#ifndef SYS_kcmp
    Py_RETURN_NONE;
#else
    PyObject *seq = PySequence_Fast(arg, "kcmp_groups: expected a sequence of (pid, fd)");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int *pf = PyMem_Malloc(sizeof(int) * 2 * (size_t)(n ? n : 1));
    Py_ssize_t *live = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n ? n : 1));
    Py_ssize_t *tmp = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n ? n : 1));
    char *gone = PyMem_Calloc((size_t)(n ? n : 1), 1);
    PyObject *groups = NULL, *unknown = NULL, *result = NULL;
    if (pf == NULL || live == NULL || tmp == NULL || gone == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "ii", &pf[2 * i], &pf[2 * i + 1]))
            goto out;
    }
    Py_ssize_t m = 0;
    Py_BEGIN_ALLOW_THREADS
    struct sorting st = {pf, 0};
    /* An fd compares equal to itself while its process lives and may be inspected. */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (kcmp_pf(pf + 2 * i, pf + 2 * i) == 0)
            live[m++] = i;
        else
            gone[i] = 1;
    }
    /* A failed comparison mid-sort means a process went meanwhile: drop it and sort again. At
     * most three rounds; after that the order stands, and a run split by it only counts an
     * instance twice (a high count, never a low one). */
    for (int round = 0; round < 3; round++) {
        st.failed = 0;
        merge_sort(&st, live, tmp, m);
        if (!st.failed)
            break;
        Py_ssize_t kept = 0;
        for (Py_ssize_t i = 0; i < m; i++) {
            if (kcmp_pf(pf + 2 * live[i], pf + 2 * live[i]) == 0)
                live[kept++] = live[i];
            else
                gone[live[i]] = 1;
        }
        if (kept == m)
            break; /* nobody went: nothing better to do */
        m = kept;
    }
    Py_END_ALLOW_THREADS
    groups = PyList_New(0);
    unknown = PyList_New(0);
    if (groups == NULL || unknown == NULL)
        goto out;
    PyObject *current = NULL;
    Py_ssize_t head = -1;
    for (Py_ssize_t i = 0; i < m; i++) {
        Py_ssize_t x = live[i];
        if (current == NULL || kcmp_pf(pf + 2 * head, pf + 2 * x) != 0) {
            current = PyList_New(0);
            if (current == NULL || PyList_Append(groups, current) < 0) {
                Py_XDECREF(current);
                goto out;
            }
            Py_DECREF(current); /* groups holds it */
            head = x;
        }
        PyObject *v = PyLong_FromSsize_t(x);
        if (v == NULL || PyList_Append(current, v) < 0) {
            Py_XDECREF(v);
            goto out;
        }
        Py_DECREF(v);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (gone[i]) {
            PyObject *v = PyLong_FromSsize_t(i);
            if (v == NULL || PyList_Append(unknown, v) < 0) {
                Py_XDECREF(v);
                goto out;
            }
            Py_DECREF(v);
        }
    }
    result = PyTuple_Pack(2, groups, unknown);
out:
    Py_XDECREF(groups);
    Py_XDECREF(unknown);
    PyMem_Free(pf);
    PyMem_Free(live);
    PyMem_Free(tmp);
    PyMem_Free(gone);
    Py_DECREF(seq);
    return result;
#endif
}

static PyMethodDef methods[] = {
    {"kcmp_file", kcmp_file, METH_VARARGS, kcmp_file_doc},
    {"kcmp_groups", kcmp_groups, METH_O, kcmp_groups_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kcmp", "kcmp(2) of open files, one and in bulk (see _kcmp.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kcmp(void) { return PyModule_Create(&module); }
