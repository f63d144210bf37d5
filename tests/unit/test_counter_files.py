"""Counter files held open (probes/counter_files.py) on ordinary files: a held file is read
afresh at offset 0, a missing one is an OSError in its place, what was not read since the last
sweep is closed, the number held is bounded, and the C batch read and its Python fallback give
the same answers. (The real tier does the same with real cgroups: rm, restart.)"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from remediator.probes import _batch
from remediator.probes.counter_files import CounterFiles, _pread_many_py


def test_a_held_file_is_read_afresh_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"12\n")
    files = CounterFiles()
    assert files.read(str(a)) == b"12\n" and files.held() == 1
    a.write_bytes(b"345\n")  # the same inode, rewritten: the held descriptor sees it
    got = files.read_many([str(a), str(b)])
    assert got[0] == b"345\n"
    assert isinstance(got[1], OSError) and got[1].errno == errno.ENOENT
    b.write_bytes(b"6\n")
    assert files.read_many([str(b)]) == [b"6\n"] and files.held() == 2
    files.close()
    assert files.held() == 0


def test_the_sweep_closes_what_was_not_read_since_and_the_count_is_bounded(tmp_path: Path) -> None:
    paths = []
    for i in range(5):
        p = tmp_path / str(i)
        p.write_bytes(f"{i}\n".encode())
        paths.append(str(p))
    files = CounterFiles()
    files.LIMIT = 3
    assert files.read_many(paths) == [f"{i}\n".encode() for i in range(5)]  # all read...
    assert files.held() == 3  # ...but no more than LIMIT kept open
    files.sweep()
    assert files.held() == 3  # each was read since the last sweep
    files.read_many(paths[:1])
    files.sweep()
    assert files.held() == 1
    fds_before = len(os.listdir("/proc/self/fd"))
    files.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before - 1


def test_the_c_batch_read_and_the_python_one_agree(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"x" * 100)
    fd = os.open(p, os.O_RDONLY)
    closed = os.open(p, os.O_RDONLY)
    os.close(closed)
    try:
        fds = [fd, -1, closed, fd]
        assert (
            _batch.pread_many(fds, 64)
            == _pread_many_py(fds, 64)
            == [b"x" * 64, errno.EBADF, errno.EBADF, b"x" * 64]
        )
    finally:
        os.close(fd)
