"""clean-fifos: params, the pure plan, and the one-pass walk's judgement and removal on fixture trees.

Races are made deterministic by wrapping the rule's `judge`: the wrapper acts (renames, swaps)
right after a directory was judged, i.e. between the judgement and the removal, which is exactly
the window an attacker would use.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from remediator.actions import fifo_walk
from remediator.actions.base import ACTIONS, ApplyContext, PlanContext
from remediator.actions.fifo_cleanup import CleanFifos, CleanFifosParams
from remediator.clock import FakeClock, SystemClock
from remediator.errors import TemporaryError
from remediator.model import ActionResult, Outcome, Plan, Reading, TargetKind
from remediator.probes.fifo_rule import EMPTIED_XATTR, Keep
from tests.unit.test_fifos import HOUR, FakeCtr, Tree


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    # File mtimes are real, so "now" starts at the real time; FakeClock from there on.
    return Tree(tmp_path, SystemClock().now())


def plan_ctx(reading: Reading, now: float, *, by_name: bool = True, **params: Any) -> PlanContext:
    other = Reading("limits", now)
    return PlanContext(
        policy="fifo-inodes-full",
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


def run(tree: Tree, plan: Plan, ctr: FakeCtr | None = None, *, dry_run: bool = False) -> ActionResult:
    ctx = ApplyContext(tree.host, FakeClock(tree.now), dry_run=dry_run)
    return CleanFifos(ctr=ctr or FakeCtr()).execute(plan, ctx)


def names(tree: Tree) -> list[str]:
    return sorted(os.listdir(tree.fifo_root))


@contextmanager
def after_judging(tree: Tree, monkeypatch: pytest.MonkeyPatch, act: Callable[[str], None]) -> Iterator[None]:
    """Run `act(dir name)` right after each directory is judged an orphan, before its removal."""
    real = fifo_walk.judge
    by_ino = {e.inode(): e.name for e in os.scandir(tree.fifo_root)}

    def judge(listed_ino: int, d: Any, entries: Any, rule: Any, overflow: bool, mark: bool) -> Keep | None:
        verdict = real(listed_ino, d, entries, rule, overflow, mark)
        if verdict is None and listed_ino in by_ino:
            act(by_ino[listed_ino])
        return verdict

    monkeypatch.setattr(fifo_walk, "judge", judge)
    try:
        yield
    finally:
        monkeypatch.setattr(fifo_walk, "judge", real)


# ---------------------------------------------------------------------------------------------
# Params and plan
# ---------------------------------------------------------------------------------------------


def test_action_is_registered_not_disruptive_and_rechecks_each_target() -> None:
    spec = ACTIONS["clean-fifos"].spec()
    assert spec.disruptive is False
    assert spec.rechecks_target is True
    assert spec.params is CleanFifosParams


def test_params_defaults_and_validation() -> None:
    p = CleanFifosParams()
    assert (p.minAge, p.min_age_seconds, p.maxDirs) == ("10m", 600.0, 1_000_000)
    assert CleanFifosParams(minAge="1h", maxDirs=5).min_age_seconds == 3600.0
    for bad in ({"minAge": "10"}, {"minAge": 600}, {"maxDirs": 0}, {"maxDirs": "5"}, {"x": 1}):
        with pytest.raises(ValidationError):
            CleanFifosParams(**bad)


def test_plan_names_the_roots_device_and_mount_id_and_lists_no_dirs(tree: Tree) -> None:
    for n in ("a", "b", "c"):
        tree.leak(n, ids=[n])
    p = make_plan(tree, maxDirs=2)
    assert p.action == "clean-fifos"
    assert p.target.kind is TargetKind.PATH
    assert p.target.id == str(tree.fifo_root)
    root = p.expect["roots"][0]
    assert root["dev"] == tree.fifo_root.stat().st_dev
    assert isinstance(root["mount_id"], int)
    assert root["estimate"] == 3
    assert p.expect["max_dirs"] == 2
    assert "dirs" not in p.expect
    assert p.params == {"minAge": "10m", "maxDirs": 2}


def test_plan_uses_the_policys_own_reading_when_it_is_fifos(tree: Tree) -> None:
    tree.leak("a")
    p = CleanFifos(ctr=FakeCtr()).plan(plan_ctx(tree.read(), tree.now, by_name=False))
    assert isinstance(p, Plan)


def test_plan_says_why_there_is_nothing_to_do(tree: Tree) -> None:
    action = CleanFifos(ctr=FakeCtr())
    assert action.plan(plan_ctx(tree.read(), tree.now)) == "no orphaned fifo dirs (orphan check complete)"
    tree.leak("a")
    r = tree.read(FakeCtr(fail=TemporaryError("down")))
    assert action.plan(plan_ctx(r, tree.now)) == "no orphaned fifo dirs (orphan check incomplete)"
    failed = Reading("fifos", tree.now, error="statvfs /run: No such file or directory")
    assert str(action.plan(plan_ctx(failed, tree.now))).startswith("the fifos probe failed")
    ctx = plan_ctx(Reading("limits", tree.now), tree.now, by_name=False)
    assert action.plan(ctx) == "no fifos reading this cycle"
    forged = Reading("fifos", tree.now, detail={"roots": "x"})
    assert action.plan(plan_ctx(forged, tree.now)) == "unusable fifos reading: no roots"
    bad_root = Reading("fifos", tree.now, detail={"roots": [{"path": 1, "orphan_check": "complete"}]})
    assert str(action.plan(plan_ctx(bad_root, tree.now))).startswith("no orphaned fifo dirs")


# ---------------------------------------------------------------------------------------------
# Apply: the whole rule, once per directory, right before removal
# ---------------------------------------------------------------------------------------------


def test_dry_run_changes_nothing(tree: Tree) -> None:
    tree.leak("a")
    p = make_plan(tree)
    result = run(tree, p, dry_run=True)
    assert result.outcome is Outcome.WOULD_APPLY
    assert names(tree) == ["a"]


def test_apply_removes_orphans_and_keeps_everything_else_with_reasons(tree: Tree) -> None:
    tree.leak("orphan1", ids=["gone.1"])
    tree.leak("orphan2", ids=["gone.2"], streams=["stdout", "stderr"])
    tree.leak("known", ids=["live"])
    tree.leak("exec", ids=["ex1"])
    held = tree.leak("held", ids=["held.1"])
    tree.hold_open(held / "held.1-stdout")
    tree.leak("young", ids=["young.1"], age=60)
    junk = tree.leak("junk", ids=["j"])
    (junk / "notes.txt").write_text("mine")
    tree.age(junk, HOUR)
    (tree.fifo_root / "empty").mkdir()
    (tree.fifo_root / "link").symlink_to(held)
    (tree.fifo_root / "file").write_text("")
    ctr = FakeCtr(containers=["live"], tasks=["live"], execs={"live": ["ex1"]})
    result = run(tree, make_plan(tree, ctr), ctr)
    assert result.outcome is Outcome.APPLIED, result.message
    assert names(tree) == ["empty", "exec", "file", "held", "junk", "known", "link", "young"]
    assert result.after["removed_dirs"] == 2
    assert result.after["removed_fifos"] == 5
    assert result.after["kept"] == {
        "empty": 1,
        "known_to_containerd": 2,
        "not_a_directory": 1,
        "not_only_fifos": 1,
        "open": 1,
        "symlink": 1,
        "too_young": 1,
    }
    # inodes_freed and `verified` are not asserted here: tmp_path's filesystem is shared with
    # the rest of the host; the real tier checks them on a tmpfs of its own.
    assert (junk / "notes.txt").read_text() == "mine"


def test_one_run_clears_every_orphan_and_max_dirs_bounds_it(tree: Tree) -> None:
    for i in range(30):
        tree.leak(f"d{i:02d}", ids=[f"t{i}"])
    result = run(tree, make_plan(tree, maxDirs=12))
    assert result.after["removed_dirs"] == 12
    assert "stopped at maxDirs 12" in result.message
    assert len(names(tree)) == 18
    result = run(tree, make_plan(tree))
    assert result.after["removed_dirs"] == 18
    assert names(tree) == []


def test_containerd_unreachable_or_unparsable_at_apply_removes_nothing(tree: Tree) -> None:
    tree.leak("a")
    p = make_plan(tree)
    result = run(tree, p, FakeCtr(fail=TemporaryError("connection refused")))
    assert result.outcome is Outcome.SKIPPED
    sock = tree.root / "run" / "containerd" / "containerd.sock"
    assert f"{sock}: connection refused" in result.message

    class NewCtr(FakeCtr):
        def __call__(self, address: str, args: Any) -> str:
            if list(args)[-2:-1] == ["ps"]:
                return "PID  INFO\n1  -\n2  something-new\n"
            return super().__call__(address, args)

    result = run(tree, p, NewCtr(tasks=["t"]))
    assert result.outcome is Outcome.SKIPPED
    assert "exec details in no known format" in result.message
    assert names(tree) == ["a"]


def test_a_root_that_is_another_mount_than_planned_is_skipped(tree: Tree) -> None:
    tree.leak("a")
    p = make_plan(tree)
    p.expect["roots"][0]["mount_id"] += 1000
    result = run(tree, p)
    assert result.outcome is Outcome.SKIPPED
    assert "is another mount than planned" in result.message
    assert names(tree) == ["a"]


def test_a_plan_for_a_root_or_sockets_not_configured_removes_nothing(tree: Tree, tmp_path: Path) -> None:
    tree.leak("a")
    p = make_plan(tree)
    p.expect["roots"][0]["sockets"] = []  # judged against no containerd: everything would go
    result = run(tree, p)
    assert result.outcome is Outcome.SKIPPED
    assert "is not a configured fifo root with these sockets" in result.message
    assert names(tree) == ["a"]


def test_recheck_skips_when_the_root_became_a_symlink_or_is_gone(tree: Tree, tmp_path: Path) -> None:
    tree.leak("a")
    p = make_plan(tree)
    moved = tmp_path / "moved"
    tree.fifo_root.rename(moved)
    assert run(tree, p).message == f"{tree.fifo_root} no longer exists"
    tree.fifo_root.symlink_to(moved)
    assert run(tree, p).message == f"{tree.fifo_root} is no longer a directory"
    assert os.listdir(moved) == ["a"]


def test_a_dir_renamed_away_after_judging_is_emptied_marked_and_finished_next_walk(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree.leak("a", ids=["gone.a"])
    tree.leak("b", ids=["gone.b"])
    # The swap: right after "a" is judged, an empty directory takes its name, "a" becomes "a2".
    p = make_plan(tree)

    def swap(name: str) -> None:
        if name == "a":
            os.rename(tree.fifo_root / "a", tree.fifo_root / "a2")
            os.mkdir(tree.fifo_root / "a")

    with after_judging(tree, monkeypatch, swap):
        result = run(tree, p)
    assert result.after["kept"] == {"raced": 1}
    assert result.after["removed_dirs"] == 1  # "b"
    # The empty directory swapped in is not ours: it stays. Ours is empty and marked.
    assert names(tree) == ["a", "a2"]
    assert os.listdir(tree.fifo_root / "a2") == []
    assert os.getxattr(tree.fifo_root / "a2", EMPTIED_XATTR) == b"1"
    with pytest.raises(OSError):
        os.getxattr(tree.fifo_root / "a", EMPTIED_XATTR)
    # Next cycle: the marked one is finished, the other empty one is kept as empty.
    result = run(tree, make_plan(tree))
    assert result.after["removed_dirs"] == 1
    assert result.after["kept"] == {"empty": 1}
    assert names(tree) == ["a"]


def test_a_fifo_swapped_after_judging_is_left_alone(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tree.leak("a", ids=["gone.a"])
    p = make_plan(tree)

    def swap(name: str) -> None:
        os.rename(d / "gone.a-stdout", tree.root / "elsewhere")
        os.mkfifo(d / "gone.a-stdout")

    with after_judging(tree, monkeypatch, swap):
        result = run(tree, p)
    assert result.after["kept"] == {"changed": 1}
    assert result.after["removed_dirs"] == 0
    assert "gone.a-stdout" in os.listdir(d)


def test_an_entry_appearing_before_rmdir_leaves_the_dir(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tree.leak("a", ids=["gone.a"], streams=["stdout"])
    p = make_plan(tree)

    def add(name: str) -> None:
        os.mkfifo(d / "new-stdout")

    with after_judging(tree, monkeypatch, add):
        result = run(tree, p)
    assert result.after["kept"] == {"not_empty": 1}
    assert os.listdir(d) == ["new-stdout"]


def test_one_failing_dir_never_aborts_the_rest(tree: Tree) -> None:
    for i in range(5):
        tree.leak(f"d{i}", ids=[f"t{i}"])
    stuck = tree.fifo_root / "d2"
    # An immutable directory: unlinkat of its entries fails with EPERM (ext4, chattr(1)).
    subprocess.run(["chattr", "+i", str(stuck)], check=True)
    try:
        result = run(tree, make_plan(tree))
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    assert result.outcome is Outcome.APPLIED
    assert result.after["removed_dirs"] == 4
    assert result.after["failed"] == {"EPERM": 1}
    failures = result.after["roots"][str(tree.fifo_root)]["failures"]
    assert failures == [{"dir": "d2", "step": "unlinkat", "error": "EPERM: Operation not permitted"}]
    assert names(tree) == ["d2"]
    assert "failed EPERM: 1" in result.message


def test_only_failures_fail_the_action(tree: Tree) -> None:
    tree.leak("d0")
    stuck = tree.fifo_root / "d0"
    subprocess.run(["chattr", "+i", str(stuck)], check=True)
    try:
        result = run(tree, make_plan(tree))
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    assert result.outcome is Outcome.FAILED
