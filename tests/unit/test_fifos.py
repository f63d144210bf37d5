"""The fifos probe (the cheap count) on fixture trees, and the builders the fifo tests share.

Fixture trees hold real FIFOs (os.mkfifo) under tmp_path/run/containerd/fifo; "open by some
process" is a symlink tmp_path/proc/<pid>/fd/<n> -> the FIFO (stat follows it exactly as it
follows the real magic link), or the real /proc with the FIFO held open by this test.
containerd is a `FakeCtr` answering canned `ctr` output.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from remediator.clock import FakeClock, SystemClock
from remediator.errors import TemporaryError
from remediator.host import HostRoot
from remediator.model import Reading
from remediator.probes.base import PROBES, ProbeContext
from remediator.probes.fifos import FifoRoot, FifosProbe, default_roots

HOUR = 3600.0
STREAMS = ("stdin", "stdout", "stderr")


# ---------------------------------------------------------------------------------------------
# Builders shared with test_fifos_cleanup.py
# ---------------------------------------------------------------------------------------------


class FakeCtr:
    """A CtrRunner answering from a table {(namespace or None, verb...): output or exception}.

    Default: one namespace "default" with no containers and no tasks. Records every call.
    """

    def __init__(
        self,
        containers: Iterable[str] = (),
        tasks: Iterable[str] = (),
        execs: Mapping[str, Sequence[str]] | None = None,
        fail: BaseException | None = None,
    ) -> None:
        self.containers = list(containers)
        self.tasks = list(tasks)
        self.execs = dict(execs or {})
        self.fail = fail
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def __call__(self, address: str, args: Sequence[str]) -> str:
        self.calls.append((address, tuple(args)))
        if self.fail is not None:
            raise self.fail
        match list(args):
            case ["namespaces", "ls", "-q"]:
                return "default\n"
            case ["-n", "default", "containers", "ls", "-q"]:
                return "".join(f"{c}\n" for c in self.containers)
            case ["-n", "default", "tasks", "ls", "-q"]:
                return "".join(f"{t}\n" for t in self.tasks)
            case ["-n", "default", "tasks", "ps", task]:
                lines = ["PID     INFO", "1    -"]
                lines += [
                    f"2    &ProcessDetails{{ExecID:{e},XXX_unrecognized:[],}}"
                    for e in self.execs.get(task, ())
                ]
                return "\n".join(lines) + "\n"
        raise AssertionError(f"unexpected ctr call {args}")


class Tree:
    """A fixture host: <root>/run/containerd/fifo with leaked dirs, a fake /proc, a socket."""

    def __init__(self, root: Path, now: float, *, socket: bool = True) -> None:
        self.root = root
        self.now = now
        self.host = HostRoot(root)
        self.fifo_root = root / "run" / "containerd" / "fifo"
        self.fifo_root.mkdir(parents=True)
        (root / "proc").mkdir()
        if socket:
            # mknod(2) makes a socket inode without binding (no 108-byte sun_path limit).
            os.mknod(root / "run" / "containerd" / "containerd.sock", 0o600 | stat.S_IFSOCK)

    def leak(
        self,
        name: str,
        ids: Iterable[str] = ("test.1",),
        streams: Iterable[str] = STREAMS,
        age: float = HOUR,
    ) -> Path:
        d = self.fifo_root / name
        d.mkdir()
        for i in ids:
            for s in streams:
                os.mkfifo(d / f"{i}-{s}", 0o700)
        self.age(d, age)
        return d

    def age(self, d: Path, age: float) -> None:
        """Backdate every entry, then the directory (creating entries touches its mtime)."""
        t = self.now - age
        for p in d.iterdir():
            os.utime(p, (t, t), follow_symlinks=False)
        os.utime(d, (t, t), follow_symlinks=False)

    def hold_open(self, fifo: Path, pid: int = 4242, fd: int = 7) -> None:
        """Make fake /proc say process `pid` has `fifo` open as fd `fd`."""
        fd_dir = self.root / "proc" / str(pid) / "fd"
        fd_dir.mkdir(parents=True, exist_ok=True)
        (fd_dir / str(fd)).symlink_to(fifo)

    def read(self, ctr: FakeCtr | None = None, **kwargs: Any) -> Reading:
        probe = FifosProbe(ctr=ctr or FakeCtr(), **kwargs)
        return probe.read(ProbeContext(self.host, FakeClock(self.now)))


@pytest.fixture
def now() -> float:
    # Real file mtimes are compared with it, so it starts at the real time; FakeClock after.
    return SystemClock().now()


@pytest.fixture
def tree(tmp_path: Path, now: float) -> Tree:
    return Tree(tmp_path, now)


@contextmanager
def real_proc(tree: Tree) -> Iterator[None]:
    """Point the fixture host's proc at the real /proc for the duration."""
    fake = tree.root / "proc"
    fake.rename(tree.root / "proc.fake")
    fake.symlink_to(HostRoot().proc)
    try:
        yield
    finally:
        fake.unlink()
        (tree.root / "proc.fake").rename(fake)


def root_detail(r: Reading, i: int = 0) -> dict[str, Any]:
    roots: list[dict[str, Any]] = r.detail["roots"]
    return roots[i]


def test_probe_is_registered_with_its_metrics() -> None:
    spec = PROBES["fifos"].spec()
    names = {m.name for m in spec.metrics}
    assert {"run_inodes_used", "fifo_dirs", "orphan_fifo_dirs", "fifo_fs_inodes_used"} <= names


def test_probe_counts_dirs_and_estimates_orphans_as_the_dirs_nobody_holds(tree: Tree) -> None:
    for i in range(5):
        d = tree.leak(f"d{i}", ids=[f"t{i}"])
        if i < 2:
            tree.hold_open(d / f"t{i}-stdout", pid=100 + i)
    (tree.fifo_root / "a-file").write_text("")
    r = tree.read(FakeCtr(containers=["t2"], tasks=["t2"]))
    assert r.error is None
    assert r.values["fifo_dirs"] == 5
    # 5 directories, 2 held open: at most 3 orphans (t2's, known to containerd, is kept by the
    # walk; the estimate never counts fewer than the orphans).
    assert r.values["orphan_fifo_dirs"] == 3
    d = root_detail(r)
    assert (d["entries"], d["dirs"], d["dirs_held_open"], d["orphan_estimate"]) == (6, 5, 2, 3)
    assert d["path"] == str(tree.fifo_root)
    assert d["dev"] == tree.fifo_root.stat().st_dev
    assert d["orphan_check"] == "complete"
    assert r.detail["orphan_check"] == "complete"
    assert r.values["run_inodes_used"] > 0
    assert r.limits["fifo_fs_inodes_used"] >= r.values["fifo_fs_inodes_used"] > 0


def test_probe_reads_no_directory_and_asks_nobody_when_the_root_is_empty(tree: Tree) -> None:
    ctr = FakeCtr()
    r = tree.read(ctr)
    assert (r.values["fifo_dirs"], r.values["orphan_fifo_dirs"]) == (0, 0)
    assert ctr.calls == []
    assert root_detail(r)["containerd"] == {"queried": False}


def test_probe_gives_no_orphan_count_when_containerd_cannot_be_asked(tree: Tree) -> None:
    tree.leak("d0")
    r = tree.read(FakeCtr(fail=TemporaryError("connection refused")))
    assert "orphan_fifo_dirs" not in r.values
    assert r.values["fifo_dirs"] == 1
    d = root_detail(r)
    assert d["orphan_check"] == "incomplete"
    sock = tree.root / "run" / "containerd" / "containerd.sock"
    assert d["containerd"]["errors"] == [f"{sock}: connection refused"]


def test_probe_without_a_containerd_socket_is_incomplete(tmp_path: Path, now: float) -> None:
    t = Tree(tmp_path, now, socket=False)
    t.leak("d0")
    r = t.read()
    assert "orphan_fifo_dirs" not in r.values
    assert "No such file or directory" in root_detail(r)["containerd"]["errors"][0]


def test_probe_when_the_root_is_missing_or_a_symlink(tree: Tree, tmp_path: Path) -> None:
    tree.fifo_root.rmdir()
    r = tree.read()
    assert root_detail(r)["present"] is False
    assert r.values["orphan_fifo_dirs"] == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tree.fifo_root.symlink_to(elsewhere)
    r = tree.read()
    d = root_detail(r)
    assert d["problem"] == f"{tree.fifo_root} is not a directory"
    assert "fifo_dirs" not in r.values
    assert "orphan_fifo_dirs" not in r.values


def test_probe_judges_each_configured_root_against_its_own_sockets(tree: Tree, tmp_path: Path) -> None:
    other = tmp_path / "private" / "fifo"
    other.mkdir(parents=True)
    sock = tmp_path / "private" / "containerd.sock"
    os.mknod(sock, 0o600 | stat.S_IFSOCK)
    (other / "x").mkdir()
    ctr = FakeCtr()
    roots = [*default_roots(tree.host), FifoRoot(other, (sock,))]
    r = tree.read(ctr, roots=roots)
    assert [d["path"] for d in r.detail["roots"]] == [str(tree.fifo_root), str(other)]
    assert root_detail(r, 1)["sockets"] == [str(sock)]
    assert r.values["orphan_fifo_dirs"] == 1
    assert {a for a, _ in ctr.calls} == {str(sock)}  # the default root is empty: nobody asked


def test_probe_counts_dockers_fifo_dirs_for_people(tree: Tree) -> None:
    d = tree.root / "run" / "docker" / "containerd" / "abc"
    d.mkdir(parents=True)
    os.mkfifo(d / "init-stdout")
    r = tree.read()
    assert r.detail["docker"]["dirs"] == 1
    assert r.detail["docker"]["fifos"] == 1


def test_probe_fails_with_an_error_when_run_is_unreadable(tmp_path: Path, now: float) -> None:
    r = FifosProbe(ctr=FakeCtr()).read(ProbeContext(HostRoot(tmp_path / "nope"), FakeClock(now)))
    assert r.error is not None and r.error.startswith("statvfs")


def test_probe_stays_cheap_it_opens_no_directory(tree: Tree) -> None:
    # A directory we may not read is still counted: the probe never opens one.
    d = tree.leak("locked")
    d.chmod(0)
    try:
        r = tree.read()
    finally:
        d.chmod(0o700)
    assert r.values["fifo_dirs"] == 1


def test_probe_reads_the_leak_rate_and_forecast_from_the_dirs_own_mtimes(tree: Tree) -> None:
    for i in range(3):
        tree.leak(f"old{i}", ids=[f"o{i}"], age=2 * HOUR)
    for i in range(5):
        tree.leak(f"new{i}", ids=[f"n{i}"], age=600 + i)
    r = tree.read()
    assert r.values["fifo_dirs_per_hour"] == 5
    assert root_detail(r)["dirs_last_hour"] == 5
    free = r.limits["fifo_inodes_needed_next_hour"]
    assert r.values["fifo_inodes_needed_next_hour"] == 20  # 4 inodes a directory
    assert free == r.limits["fifo_fs_inodes_used"] - r.values["fifo_fs_inodes_used"]
    assert r.values["fifo_inodes_exhausted_in_seconds"] == pytest.approx(3600 * free / 20)


def test_probe_gives_no_exhaustion_time_when_nothing_new_appears(tree: Tree) -> None:
    tree.leak("old", age=2 * HOUR)
    r = tree.read()
    assert r.values["fifo_dirs_per_hour"] == 0
    assert r.values["fifo_inodes_needed_next_hour"] == 0
    assert "fifo_inodes_exhausted_in_seconds" not in r.values


def test_configured_fifo_roots_are_judged_against_their_own_sockets(tree: Tree, tmp_path: Path) -> None:
    # --fifo-root /srv/fifo=/srv/ctrd.sock: host paths, under the host root.
    (tree.root / "srv" / "fifo").mkdir(parents=True)
    os.mknod(tree.root / "srv" / "ctrd.sock", 0o600 | stat.S_IFSOCK)
    tree.leak("default-dir")
    (tree.root / "srv" / "fifo" / "x").mkdir()
    host = HostRoot(tree.root, (("/srv/fifo", ("/srv/ctrd.sock",)),))
    ctr = FakeCtr()
    r = FifosProbe(ctr=ctr).read(ProbeContext(host, FakeClock(tree.now)))
    paths = [d["path"] for d in r.detail["roots"]]
    assert paths == [str(tree.fifo_root), str(tree.root / "srv" / "fifo")]
    assert root_detail(r, 1)["sockets"] == [str(tree.root / "srv" / "ctrd.sock")]
    assert r.values["fifo_dirs"] == 2
    assert {a for a, _ in ctr.calls} == {
        str(tree.root / "run" / "containerd" / "containerd.sock"),
        str(tree.root / "srv" / "ctrd.sock"),
    }


def test_the_leak_rate_is_exact_on_small_roots_and_sampled_on_big_ones(tree: Tree) -> None:
    from remediator.probes.fifo_scan import count

    for i in range(40):
        d = tree.fifo_root / f"d{i:03d}"
        d.mkdir()
        if i % 4:  # 30 of 40 made more than an hour ago
            os.utime(d, (tree.now - 2 * HOUR, tree.now - 2 * HOUR))
    fd = os.open(tree.fifo_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert count(fd, tree.now).recent == 10
        # Sampled (strides 1, 2, 4, 8 over 40 directories: 17 fstatat calls), each sample
        # standing for its stride: an hour later none is recent, an hour earlier all are.
        later, earlier = count(fd, tree.now + 3 * HOUR, exact=8), count(fd, tree.now - 3 * HOUR, exact=8)
    finally:
        os.close(fd)
    assert (later.dirs, later.recent) == (40, 0)
    assert (earlier.dirs, earlier.recent) == (40, 40)


def test_probe_reuses_a_containerd_answer_while_the_root_and_its_shims_are_unchanged(tree: Tree) -> None:
    from remediator.probes.fifos import KNOWN_IDS, KNOWN_IDS_TTL

    tree.leak("d0", ids=["t0"])
    ctr = FakeCtr(containers=["t0"], tasks=["t0"])
    first = tree.read(ctr)
    asked = len(ctr.calls)
    assert asked > 0
    again = tree.read(ctr)
    # Nothing the probe can see changed: the same answer, no new question.
    assert len(ctr.calls) == asked
    assert again.values == first.values
    assert root_detail(again)["containerd"] == root_detail(first)["containerd"]
    # A new directory changes the listing: containerd is asked again.
    tree.leak("d1", ids=["t1"])
    tree.read(ctr)
    assert len(ctr.calls) == 2 * asked
    # The answer expires: asked again even though nothing changed.
    tree.now += KNOWN_IDS_TTL
    tree.read(ctr)
    assert len(ctr.calls) == 3 * asked
    # A probe made without the cache asks every time.
    tree.read(ctr, cache=None)
    assert len(ctr.calls) == 4 * asked
    KNOWN_IDS.clear()


def test_probe_never_reuses_an_incomplete_containerd_answer(tree: Tree) -> None:
    tree.leak("d0")
    failing = FakeCtr(fail=TemporaryError("connection refused"))
    tree.read(failing)
    tree.read(failing)
    assert len(failing.calls) == 2
    # Once containerd answers, the orphan count is back at the very next read.
    r = tree.read(FakeCtr())
    assert r.values["orphan_fifo_dirs"] == 1
