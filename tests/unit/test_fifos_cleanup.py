"""clean-fifos: params, the pure plan, and apply's re-checks (TOCTOU) on fixture trees."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from remediator.actions.base import ACTIONS, ApplyContext, PlanContext
from remediator.actions.fifo_cleanup import CleanFifos, CleanFifosParams
from remediator.clock import FakeClock, SystemClock
from remediator.errors import TemporaryError
from remediator.model import Outcome, Plan, Reading, TargetKind
from tests.unit.test_fifos import HOUR, FakeCtr, Tree


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    # File mtimes are real, so "now" starts at the real time; FakeClock from there on.
    return Tree(tmp_path, SystemClock().now())


def plan_ctx(reading: Reading, now: float, *, by_name: bool = True, **params: Any) -> PlanContext:
    other = Reading("limits", now)
    return PlanContext(
        policy="run-inodes",
        metric="run_inodes_used",
        subject="host",
        reading=other if by_name else reading,
        params=CleanFifosParams(**params),
        eligible=lambda c: True,
        now=now,
        readings={"fifos": reading, "limits": other} if by_name else {},
    )


def make_plan(tree: Tree, ctr: FakeCtr | None = None, **params: Any) -> Plan:
    p = CleanFifos(ctr=ctr or FakeCtr()).plan(plan_ctx(tree.read(ctr), tree.now, **params))
    assert isinstance(p, Plan), p
    return p


def run(tree: Tree, plan: Plan, ctr: FakeCtr | None = None, *, dry_run: bool = False) -> Any:
    ctx = ApplyContext(tree.host, FakeClock(tree.now), dry_run=dry_run)
    return CleanFifos(ctr=ctr or FakeCtr()).execute(plan, ctx)


def names(tree: Tree) -> list[str]:
    return sorted(os.listdir(tree.fifo_root))


# ---------------------------------------------------------------------------------------------
# Params and plan
# ---------------------------------------------------------------------------------------------


def test_action_is_registered_not_disruptive() -> None:
    spec = ACTIONS["clean-fifos"].spec()
    assert spec.disruptive is False
    assert spec.params is CleanFifosParams


def test_params_defaults_and_validation() -> None:
    p = CleanFifosParams()
    assert (p.minAge, p.min_age_seconds, p.maxDirs) == ("10m", 600.0, 1000)
    assert CleanFifosParams(minAge="1h", maxDirs=5).min_age_seconds == 3600.0
    for bad in ({"minAge": "10"}, {"minAge": 600}, {"maxDirs": 0}, {"maxDirs": "5"}, {"x": 1}):
        with pytest.raises(ValidationError):
            CleanFifosParams(**bad)


def test_plan_lists_oldest_orphans_up_to_max_dirs(tree: Tree) -> None:
    tree.leak("a", ids=["a"], age=2 * HOUR)
    tree.leak("b", ids=["b"], age=3 * HOUR)
    tree.leak("c", ids=["c"], streams=["stdout", "stderr"], age=4 * HOUR)
    p = make_plan(tree, maxDirs=2)
    assert p.action == "clean-fifos"
    assert p.target.kind is TargetKind.PATH
    assert p.target.id == str(tree.fifo_root)
    assert p.summary == f"remove 2 orphaned fifo dirs (7 inodes) under {tree.fifo_root}"
    assert [d["name"] for d in p.expect["dirs"]] == ["c", "b"]
    assert p.expect["dev"] == tree.fifo_root.stat().st_dev
    assert p.params == {"minAge": "10m", "maxDirs": 2}


def test_plan_uses_the_policys_own_reading_when_it_is_fifos(tree: Tree) -> None:
    tree.leak("a")
    ctx = plan_ctx(tree.read(), tree.now, by_name=False)
    p = CleanFifos(ctr=FakeCtr()).plan(ctx)
    assert isinstance(p, Plan)
    assert len(p.expect["dirs"]) == 1


def test_plan_min_age_can_only_be_stricter_than_the_probe(tree: Tree) -> None:
    tree.leak("a", age=HOUR)
    tree.leak("b", age=3 * HOUR)
    p = make_plan(tree, minAge="2h")
    assert [d["name"] for d in p.expect["dirs"]] == ["b"]
    assert p.expect["min_age"] == 7200.0
    assert CleanFifos().plan(plan_ctx(tree.read(), tree.now, minAge="1d")) == (
        "no orphaned fifo dirs older than 1d"
    )


def test_plan_says_why_there_is_nothing_to_do(tree: Tree) -> None:
    action = CleanFifos(ctr=FakeCtr())
    assert action.plan(plan_ctx(tree.read(), tree.now)) == ("no orphaned fifo dirs (orphan check complete)")
    tree.leak("a")
    r = tree.read(FakeCtr(fail=TemporaryError("down")))
    assert action.plan(plan_ctx(r, tree.now)) == "no orphaned fifo dirs (orphan check incomplete)"
    failed = Reading("fifos", tree.now, error="statvfs /run: No such file or directory")
    assert str(action.plan(plan_ctx(failed, tree.now))).startswith("the fifos probe failed")
    ctx = plan_ctx(Reading("limits", tree.now), tree.now, by_name=False)
    assert action.plan(ctx) == "no fifos reading this cycle"
    forged = Reading("fifos", tree.now, detail={"dev": 1, "root": "/x", "orphans": [{"a": 1}]})
    assert str(action.plan(plan_ctx(forged, tree.now))).startswith("unusable fifos reading")


# ---------------------------------------------------------------------------------------------
# Execute: dry run, apply, verify
# ---------------------------------------------------------------------------------------------


def test_dry_run_changes_nothing(tree: Tree) -> None:
    tree.leak("a")
    p = make_plan(tree)
    result = run(tree, p, dry_run=True)
    assert result.outcome is Outcome.WOULD_APPLY
    assert result.message == f"would remove 1 orphaned fifo dirs (4 inodes) under {tree.fifo_root}"
    assert names(tree) == ["a"]
    assert len(os.listdir(tree.fifo_root / "a")) == 3


def test_apply_removes_orphans_and_leaves_everything_else(tree: Tree) -> None:
    tree.leak("a", ids=["gone.1"])
    tree.leak("b", ids=["gone.2"], streams=["stdout", "stderr"])
    tree.leak("young", ids=["y"], age=10)
    tree.leak("known", ids=["alive"])
    ctr = FakeCtr(containers=["alive"])
    p = make_plan(tree, ctr)
    result = run(tree, p, ctr)
    assert result.outcome is Outcome.APPLIED
    assert names(tree) == ["known", "young"]
    assert result.after["removed_dirs"] == 2
    assert result.after["removed_fifos"] == 5
    assert result.after["skipped_dirs"] == 0
    assert result.before["planned_dirs"] == 2
    assert result.message.startswith(f"removed 2 orphaned fifo dirs (7 inodes) under {tree.fifo_root}")
    # Inode counts are read from a filesystem other tests share: only their presence is exact.
    assert {"inodes_used", "inodes_free", "inodes_freed"} <= set(result.after)
    assert result.verified is not None


def test_recheck_skips_when_the_root_became_a_symlink(tree: Tree, tmp_path: Path) -> None:
    tree.leak("a")
    p = make_plan(tree)
    moved = tmp_path / "moved"
    tree.fifo_root.rename(moved)
    tree.fifo_root.symlink_to(moved)
    result = run(tree, p)
    assert result.outcome is Outcome.SKIPPED
    assert result.message.endswith("is no longer a directory")
    assert sorted(os.listdir(moved / "a")) == ["test.1-stderr", "test.1-stdin", "test.1-stdout"]


def test_unreachable_containerd_at_apply_removes_nothing(tree: Tree) -> None:
    tree.leak("a")
    p = make_plan(tree)
    result = run(tree, p, FakeCtr(fail=TemporaryError("connection refused")))
    assert result.outcome is Outcome.SKIPPED
    assert "connection refused" in result.message
    assert names(tree) == ["a"]


# ---------------------------------------------------------------------------------------------
# TOCTOU: the directory changes between plan and apply
# ---------------------------------------------------------------------------------------------


def test_dir_swapped_for_a_symlink_after_planning_is_skipped(tree: Tree, tmp_path: Path) -> None:
    d = tree.leak("a")
    tree.leak("b", ids=["b"])
    p = make_plan(tree)
    # Someone replaces the planned dir with a symlink to a look-alike outside the root.
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    for s in ("stdin", "stdout", "stderr"):
        os.mkfifo(decoy / f"test.1-{s}")
    tree.age(decoy, HOUR)
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    d.symlink_to(decoy)
    result = run(tree, p)
    assert result.outcome is Outcome.APPLIED
    assert result.after["skipped"] == {"symlink": 1}
    assert names(tree) == ["a"]
    assert len(os.listdir(decoy)) == 3  # never followed


def test_dir_replaced_by_another_dir_is_skipped(tree: Tree) -> None:
    d = tree.leak("a")
    p = make_plan(tree)
    d.rename(tree.fifo_root.parent / "old")  # still allocated: the new dir gets another inode
    tree.leak("a")  # same name, same FIFO names, same mtimes
    result = run(tree, p)
    assert result.outcome is Outcome.SKIPPED
    assert result.after["skipped"] == {"changed": 1}
    assert len(os.listdir(d)) == 3


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("regular_file", "not_only_fifos"),
        ("new_fifo", "changed"),
        ("fresh_write", "too_young"),
        ("backdated", "changed"),  # what a reused inode number (ext4) looks like
        ("opened", "open"),
        ("known", "known_to_containerd"),
        ("gone", "gone"),
    ],
)
def test_dir_that_changed_after_planning_is_skipped(tree: Tree, change: str, reason: str) -> None:
    d = tree.leak("a", ids=["x.1"])
    p = make_plan(tree)
    ctr = FakeCtr()
    if change == "regular_file":
        (d / "x.1-stdout.log").write_text("")
        tree.age(d, HOUR)
    elif change == "new_fifo":
        os.mkfifo(d / "x.2-stdout")
        tree.age(d, HOUR)
    elif change == "fresh_write":
        os.utime(d / "x.1-stdout", (tree.now, tree.now))
    elif change == "backdated":
        tree.age(d, 2 * HOUR)
    elif change == "opened":
        tree.hold_open(d / "x.1-stdin")
    elif change == "known":
        ctr = FakeCtr(containers=["x.1"])
    elif change == "gone":
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    result = run(tree, p, ctr)
    assert result.outcome is Outcome.SKIPPED
    assert result.after["skipped"] == {reason: 1}
    assert result.after["removed_dirs"] == 0
    if change != "gone":
        assert names(tree) == ["a"]
        assert "x.1-stdout" in os.listdir(d)


def test_entry_appearing_before_rmdir_leaves_the_dir(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tree.leak("a", ids=["x.1"])
    p = make_plan(tree)
    real_unlink = os.unlink

    def unlink(path: Any, *, dir_fd: int | None = None) -> None:
        real_unlink(path, dir_fd=dir_fd)
        if path == "x.1-stdout":  # a newcomer arrives while we remove
            (d / "new-stdout").write_text("")

    monkeypatch.setattr(os, "unlink", unlink)
    result = run(tree, p)
    assert result.after["skipped"] == {"not_empty": 1}
    assert names(tree) == ["a"]
    assert "new-stdout" in os.listdir(d)


@pytest.mark.parametrize("name", ["../escape", "..", "a/b", ""])
def test_forged_plan_cannot_walk_out_of_the_root(tree: Tree, tmp_path: Path, name: str) -> None:
    tree.leak("a")
    p = make_plan(tree)
    dirs = [{**p.expect["dirs"][0], "name": name}]
    forged = Plan(p.action, p.target, p.summary, p.params, {**p.expect, "dirs": dirs})
    result = run(tree, forged)
    assert result.outcome is Outcome.SKIPPED
    assert result.after["skipped"] == {"changed": 1}
    assert names(tree) == ["a"]


def test_unexpected_rmdir_error_fails_the_action(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree.leak("a")
    p = make_plan(tree)

    def rmdir(path: Any, *, dir_fd: int | None = None) -> None:
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(os, "rmdir", rmdir)
    result = run(tree, p)
    assert result.outcome is Outcome.FAILED
    assert "Read-only file system" in result.message


def test_recheck_skips_when_the_root_is_gone(tree: Tree) -> None:
    d = tree.leak("a")
    p = make_plan(tree)
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    tree.fifo_root.rmdir()
    result = run(tree, p)
    assert result.outcome is Outcome.SKIPPED
    assert result.message.endswith("no longer exists")
