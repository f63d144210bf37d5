"""The fifos probe reuses a containerd answer only while everything it can see is unchanged:
the root's listing, the shims serving its containerds, and their sockets. Any of them changing
asks again before the next reading; and clean-fifos never judges on the probe's cached answer:
it asks containerd afresh right before its walk."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from remediator.actions.base import ApplyContext
from remediator.actions.fifo_cleanup import CleanFifos
from remediator.clock import FakeClock, SystemClock
from remediator.model import Outcome
from remediator.probes.fifos import KNOWN_IDS, KNOWN_IDS_TTL
from tests.unit.test_fifos import FakeCtr, Tree
from tests.unit.test_fifos_cleanup import make_plan, names


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    KNOWN_IDS.clear()
    yield Tree(tmp_path, SystemClock().now())
    KNOWN_IDS.clear()


def shim(tree: Tree, pid: int, cid: str) -> Path:
    """A fake /proc/<pid> of a runc shim serving the tree's containerd socket."""
    d = tree.root / "proc" / str(pid)
    d.mkdir(parents=True)
    sock = tree.root / "run" / "containerd" / "containerd.sock"
    argv = ["containerd-shim-runc-v2", "-namespace", "default", "-id", cid, "-address", str(sock)]
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return d


def test_shims_coming_and_going_ask_again_and_nothing_else_does(tree: Tree) -> None:
    shim(tree, 100, "c1")
    ctr = FakeCtr(containers=["c1"], tasks=["c1"])
    first = tree.read(ctr)
    per_query = len(ctr.calls)
    assert per_query > 0 and first.values["leaked_shims"] == 0
    for _ in range(3):
        tree.read(ctr)
    assert len(ctr.calls) == per_query  # unchanged: no question
    # A new container's shim: asked again before this reading, which judges it with the answer.
    shim(tree, 101, "c2")
    r = tree.read(ctr)
    assert len(ctr.calls) == 2 * per_query
    assert r.values["leaked_shims"] == 1  # containerd (FakeCtr) does not know c2
    ctr.containers.append("c2")
    ctr.tasks.append("c2")
    shim(tree, 102, "c3")  # another new shim: the fresh answer knows c2 now
    ctr.containers.append("c3")
    ctr.tasks.append("c3")
    assert tree.read(ctr).values["leaked_shims"] == 0
    assert len(ctr.calls) == 3 * per_query
    # A shim gone: asked again too.
    for f in (tree.root / "proc" / "101").iterdir():
        f.unlink()
    (tree.root / "proc" / "101").rmdir()
    tree.read(ctr)
    assert len(ctr.calls) == 4 * per_query


def test_a_restarted_containerd_is_asked_again(tree: Tree) -> None:
    shim(tree, 100, "c1")
    ctr = FakeCtr(containers=["c1"], tasks=["c1"])
    tree.read(ctr)
    per_query = len(ctr.calls)
    sock = tree.root / "run" / "containerd" / "containerd.sock"
    # containerd binds a new socket when it starts (made here before the old one goes, so the
    # two cannot share an inode number).
    os.mknod(sock.with_name("new.sock"), 0o600 | stat.S_IFSOCK)
    sock.with_name("new.sock").replace(sock)
    tree.read(ctr)
    assert len(ctr.calls) == 2 * per_query


def test_the_answer_expires_after_the_ttl_even_when_nothing_changed(tree: Tree) -> None:
    shim(tree, 100, "c1")
    ctr = FakeCtr(containers=["c1"], tasks=["c1"])
    tree.read(ctr)
    per_query = len(ctr.calls)
    tree.now += KNOWN_IDS_TTL - 1
    tree.read(ctr)
    assert len(ctr.calls) == per_query
    tree.now += 1
    tree.read(ctr)
    assert len(ctr.calls) == 2 * per_query


def test_clean_fifos_judges_on_a_fresh_answer_not_the_probes_cached_one(tree: Tree) -> None:
    tree.leak("d-live", ids=["live"])
    ctr = FakeCtr(containers=["live"], tasks=["live"])
    plan = make_plan(tree, ctr)  # the probe's reading (cached answer: containerd knows "live")
    tree.read(ctr)
    asked = len(ctr.calls)
    # containerd forgets "live" (its task was deleted): the walk must see that, and it may now
    # remove the directory; with the cached answer it would have kept it.
    ctr.containers.clear()
    ctr.tasks.clear()
    result = CleanFifos(ctr=ctr).execute(plan, ApplyContext(tree.host, FakeClock(tree.now), dry_run=False))
    assert len(ctr.calls) > asked  # asked again, right before judging
    assert result.outcome is Outcome.APPLIED, result.message
    assert names(tree) == []
    # And the other way: a task containerd learnt of after the cached answer keeps its dir.
    tree.leak("d-new", ids=["new"])
    plan = make_plan(tree, ctr)
    ctr.containers.append("new")
    ctr.tasks.append("new")
    result = CleanFifos(ctr=ctr).execute(plan, ApplyContext(tree.host, FakeClock(tree.now), dry_run=False))
    assert names(tree) == ["d-new"] and result.after["kept"] == {"known_to_containerd": 1}


def test_shim_scan_reads_each_process_once_and_a_reused_pid_again(tmp_path: Path) -> None:
    from remediator.probes.shims import ShimScan

    proc = tmp_path / "proc"
    proc.mkdir()
    tree = Tree(tmp_path / "t", SystemClock().now())
    d = shim(tree, 100, "c1")
    (tree.root / "proc" / "7").mkdir()
    (tree.root / "proc" / "7" / "cmdline").write_bytes(b"sleep\x00100\x00")
    scan = ShimScan()
    assert [s.id for s in scan(tree.root / "proc")] == ["c1"]
    # Read once: an unreadable cmdline now does not matter, the process is known.
    (d / "cmdline").chmod(0)
    os.rename(d / "cmdline", d / "gone")
    assert [s.id for s in scan(tree.root / "proc")] == ["c1"]
    # The pid reused by another process (a new /proc/<pid> inode): read again.
    (d / "gone").unlink()
    held = os.open(d, os.O_RDONLY | os.O_DIRECTORY)  # keeps the old inode number taken, as procfs
    try:  # never reuses one
        d.rmdir()
        shim(tree, 100, "c9")
        assert [s.id for s in scan(tree.root / "proc")] == ["c9"]
    finally:
        os.close(held)
    # Every REFRESH_EVERY-th scan reads everything again.
    (tree.root / "proc" / "100" / "cmdline").write_bytes(b"sleep\x00")
    seen = [[s.id for s in scan(tree.root / "proc")] for _ in range(ShimScan.REFRESH_EVERY)]
    assert ["c9"] in seen and [] in seen


def test_shim_scan_reads_an_empty_cmdline_twice_then_keeps_it(tmp_path: Path) -> None:
    """A kernel thread (empty cmdline at two reads) is not read again until the refresh; one
    seen empty once (maybe mid-exec) is, and becomes a shim when its exec is done."""
    from remediator.probes.shims import ShimScan

    tree = Tree(tmp_path / "t", SystemClock().now())
    proc = tree.root / "proc"
    (proc / "2").mkdir(parents=True)
    (proc / "2" / "cmdline").write_bytes(b"")  # kthreadd
    d = shim(tree, 100, "c1")
    argv = (d / "cmdline").read_bytes()
    (d / "cmdline").write_bytes(b"")  # mid-exec
    scan = ShimScan()
    assert scan(proc) == []
    (d / "cmdline").write_bytes(argv)  # the exec is done
    assert [s.id for s in scan(proc)] == ["c1"]
    # kthreadd was empty twice: known now, so even an unreadable cmdline does not matter.
    os.rename(proc / "2" / "cmdline", proc / "2" / "gone")
    assert [s.id for s in scan(proc)] == ["c1"]
    assert scan._known[(str(proc), 2, os.stat(proc / "2").st_ino)] is None


def test_docker_fifo_counts_follow_every_change(tmp_path: Path) -> None:
    from remediator.host import HostRoot
    from remediator.probes.fifos import count_docker_fifos

    host = HostRoot(tmp_path)
    c1 = tmp_path / "run/docker/containerd/c1"
    c1.mkdir(parents=True)
    for s in ("init-stdout", "init-stderr"):
        os.mkfifo(c1 / s)
    assert count_docker_fifos(host) == {"root": str(c1.parent), "dirs": 1, "fifos": 2}
    assert count_docker_fifos(host) == {"root": str(c1.parent), "dirs": 1, "fifos": 2}  # from the cache
    os.mkfifo(c1 / "exec-stdout")  # an entry added moves the directory's mtime
    os.utime(c1, ns=(0, os.stat(c1).st_mtime_ns + 1))  # (the test's changes may share a tick)
    (c1.parent / "c2").mkdir()
    assert count_docker_fifos(host) == {"root": str(c1.parent), "dirs": 2, "fifos": 3}


def test_docker_fifo_count_is_redone_when_the_root_moves_or_once_a_minute(tmp_path: Path) -> None:
    from remediator.host import HostRoot
    from remediator.probes.fifos import DOCKER_RECOUNT_SECONDS, count_docker_fifos

    host = HostRoot(tmp_path)
    c1 = tmp_path / "run/docker/containerd/c1"
    c1.mkdir(parents=True)
    os.mkfifo(c1 / "init-stdout")
    assert count_docker_fifos(host, 100.0) == {"root": str(c1.parent), "dirs": 1, "fifos": 1}
    os.mkfifo(c1 / "exec-stdout")  # inside a container's directory: the root does not move
    os.utime(c1, ns=(0, os.stat(c1).st_mtime_ns + 1))
    again = count_docker_fifos(host, 110.0)
    assert again == {"root": str(c1.parent), "dirs": 1, "fifos": 1, "counted_seconds_ago": 10.0}
    later = count_docker_fifos(host, 100.0 + DOCKER_RECOUNT_SECONDS)  # a minute on: counted
    assert later == {"root": str(c1.parent), "dirs": 1, "fifos": 2}
    (c1.parent / "c2").mkdir()  # a container came: the root moved, counted at once
    os.utime(c1.parent, ns=(0, os.stat(c1.parent).st_mtime_ns + 1))
    assert count_docker_fifos(host, 161.0) == {"root": str(c1.parent), "dirs": 2, "fifos": 2}
