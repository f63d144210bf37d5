/*
 * remediator.probes._batch: two loops a cycle runs over every process or every container, in C
 * so that no Python object is made per item that is not handed back:
 *
 * - list_pids: the listing of /proc with each entry's inode (probes/base.py list_processes), the
 *   key by which the fd scan and the shim scan know a process;
 * - pread_many: one pread(2) at offset 0 of each of a list of held descriptors (the containers'
 *   cgroup counters, probes/counter_files.py).
 *
 * Both only read. Optional like _fdscan: without it the same loops run in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <unistd.h>

PyDoc_STRVAR(list_pids_doc,
"list_pids(proc, /) -> {pid: inode}\n\n"
"The numeric entries of `proc` with the inode number each comes with (d_ino): probes/base.py's\n"
"list_processes without a DirEntry object per process. Raises OSError when `proc` cannot be\n"
"listed.");

static PyObject *list_pids(PyObject *self, PyObject *args) {
    const char *proc;
    if (!PyArg_ParseTuple(args, "s:list_pids", &proc))
        return NULL;
    DIR *d = opendir(proc);
    if (d == NULL)
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, proc);
    PyObject *out = PyDict_New();
    if (out == NULL) {
        closedir(d);
        return NULL;
    }
    for (;;) {
        errno = 0;
        struct dirent *e = readdir(d);
        if (e == NULL) {
            if (errno != 0) {
                PyErr_SetFromErrnoWithFilename(PyExc_OSError, proc);
                goto fail;
            }
            break;
        }
        const char *n = e->d_name;
        if (*n < '0' || *n > '9')
            continue;
        long long pid = 0;
        int digits = 1;
        for (const char *c = n; *c; c++) {
            if (*c < '0' || *c > '9' || pid > (1LL << 40)) {
                digits = 0;
                break;
            }
            pid = pid * 10 + (*c - '0');
        }
        if (!digits)
            continue;
        PyObject *k = PyLong_FromLongLong(pid);
        PyObject *v = PyLong_FromUnsignedLongLong((unsigned long long)e->d_ino);
        int bad = k == NULL || v == NULL || PyDict_SetItem(out, k, v) < 0;
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (bad)
            goto fail;
    }
    closedir(d);
    return out;
fail:
    closedir(d);
    Py_DECREF(out);
    return NULL;
}

PyDoc_STRVAR(pread_many_doc,
"pread_many(fds, size, /) -> [bytes | int]\n\n"
"pread(fd, size, 0) of every fd in the list, in one call: the bytes read, or the errno of a\n"
"failed read (EBADF for a negative fd). For counter files held open (counter_files.py): 100\n"
"containers' cgroup counters a cycle, where a Python frame per read cost more than the read.");

static PyObject *pread_many(PyObject *self, PyObject *args) {
    PyObject *fds;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "O!n:pread_many", &PyList_Type, &fds, &size))
        return NULL;
    if (size <= 0 || size > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "pread_many: size out of range");
        return NULL;
    }
    char *buf = PyMem_Malloc((size_t)size);
    if (buf == NULL)
        return PyErr_NoMemory();
    Py_ssize_t n = PyList_GET_SIZE(fds);
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        PyMem_Free(buf);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PyList_GET_ITEM(fds, i));
        if (fd == -1 && PyErr_Occurred()) {
            Py_DECREF(out);
            PyMem_Free(buf);
            return NULL;
        }
        PyObject *item;
        ssize_t got = fd < 0 ? (errno = EBADF, -1) : pread((int)fd, buf, (size_t)size, 0);
        item = got < 0 ? PyLong_FromLong(errno) : PyBytes_FromStringAndSize(buf, got);
        if (item == NULL) {
            Py_DECREF(out);
            PyMem_Free(buf);
            return NULL;
        }
        PyList_SET_ITEM(out, i, item);
    }
    PyMem_Free(buf);
    return out;
}

static PyMethodDef methods[] = {
    {"list_pids", list_pids, METH_VARARGS, list_pids_doc},
    {"pread_many", pread_many, METH_VARARGS, pread_many_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_batch", "Batch reads of a cycle (see _batch.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__batch(void) { return PyModule_Create(&module); }
