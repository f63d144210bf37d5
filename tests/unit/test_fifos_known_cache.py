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
    sock.unlink()  # containerd removes its socket and binds a new one when it starts
    keep = tree.root / "keep"
    keep.write_text("")  # holds the old inode number so the new socket cannot reuse it
    os.mknod(sock, 0o600 | stat.S_IFSOCK)
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
