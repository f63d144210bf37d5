"""drop-caches: plan, params, and recheck/apply/verify on fixture trees."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from remediator.actions.base import ApplyContext, PlanContext
from remediator.actions.drop_caches import DropCaches, DropCachesParams, parse_meminfo_kb
from remediator.clock import FakeClock
from remediator.host import HostRoot
from remediator.model import Outcome, Plan, Reading, TargetKind
from tests.helpers import make_host

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "proc" / "linux-6.18"
CONTROL = "proc/sys/vm/drop_caches"
STATE = "proc/sys/fs/dentry-state"
MEMINFO = "MemTotal:       24684544 kB\nCached:           246784 kB\nSlab:  1 kB\n"


def plan_for(what: str = "dentries-inodes") -> Plan:
    reading = Reading("dentries", 1000.0, values={"negative": 2_000_000})
    ctx = PlanContext(
        policy="negative-dentries",
        metric="negative",
        subject="host",
        reading=reading,
        params=DropCachesParams.model_validate({"what": what}),
        eligible=lambda c: True,
        now=1000.0,
    )
    plan = DropCaches().plan(ctx)
    assert isinstance(plan, Plan)
    return plan


def host_with(tmp_path: Path, dentry_state: str | None = None) -> HostRoot:
    return make_host(
        tmp_path,
        {
            CONTROL: "",  # write-only on a real kernel; a regular file stands in here
            STATE: dentry_state or (FIXTURES / "sys/fs/dentry-state").read_text(),
            "proc/meminfo": MEMINFO,
        },
    )


def ctx(host: HostRoot, dry_run: bool = False) -> ApplyContext:
    return ApplyContext(host=host, clock=FakeClock(), dry_run=dry_run)


@pytest.mark.parametrize(("what", "value"), [("dentries-inodes", 2), ("pagecache", 1), ("all", 3)])
def test_plan_writes_the_documented_value(what: str, value: int) -> None:
    plan = plan_for(what)
    assert plan.target.kind is TargetKind.HOST
    assert plan.summary.startswith(f"write {value} to vm.drop_caches")
    assert dict(plan.params) == {"what": what, "value": value}


def test_default_is_dentries_and_inodes() -> None:
    assert DropCachesParams().what == "dentries-inodes"
    assert plan_for().summary == "write 2 to vm.drop_caches (drop dentries and inodes host-wide)"


@pytest.mark.parametrize("raw", [{"what": "everything"}, {"what": 2}, {"sync": True}])
def test_params_reject(raw: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        DropCachesParams.model_validate(raw)


def test_is_disruptive() -> None:
    assert DropCaches.spec().disruptive is True


def test_apply_writes_and_saves_counts(tmp_path: Path) -> None:
    host = host_with(tmp_path, "2050186\t2048392\t45\t0\t2007232\t0\n")
    action, plan, c = DropCaches(), plan_for(), ctx(host)
    assert action.recheck(plan, c) is None
    applied = action.apply(plan, c)
    assert applied.outcome is Outcome.APPLIED
    assert (tmp_path / CONTROL).read_text() == "2\n"
    assert dict(applied.before) == {"nr_dentry": 2050186, "nr_unused": 2048392, "nr_negative": 2007232}
    # What the kernel does on the write; the fixture file has to be told.
    (tmp_path / STATE).write_text("50177\t48384\t45\t0\t7226\t0\n")
    verified = action.verify(plan, applied, c)
    assert verified.verified is True
    assert verified.after["nr_negative"] == 7226
    assert verified.message == "wrote 2 to vm.drop_caches; negative dentries 2007232 -> 7226"


def test_verify_fails_when_negatives_did_not_drop(tmp_path: Path) -> None:
    host = host_with(tmp_path)
    result = DropCaches().execute(plan_for(), ctx(host))
    assert result.outcome is Outcome.APPLIED
    assert result.verified is False  # the fixture file did not change: nothing was dropped


def test_verify_nothing_to_drop_is_fine(tmp_path: Path) -> None:
    host = host_with(tmp_path, "5090\t3242\t45\t0\t0\t0\n")
    assert DropCaches().execute(plan_for(), ctx(host)).verified is True


def test_pagecache_is_judged_by_cached(tmp_path: Path) -> None:
    host = host_with(tmp_path)
    action, plan, c = DropCaches(), plan_for("pagecache"), ctx(host)
    applied = action.apply(plan, c)
    assert applied.before["cached_kb"] == 246784
    (tmp_path / "proc/meminfo").write_text(MEMINFO.replace("246784", "1024"))
    verified = action.verify(plan, applied, c)
    assert verified.verified is True
    assert verified.after["cached_kb"] == 1024
    assert (tmp_path / CONTROL).read_text() == "1\n"


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    host = host_with(tmp_path)
    result = DropCaches().execute(plan_for("all"), ctx(host, dry_run=True))
    assert result.outcome is Outcome.WOULD_APPLY
    assert result.message == "would write 3 to vm.drop_caches (drop all host-wide)"
    assert (tmp_path / CONTROL).read_text() == ""


def test_recheck_without_the_knob(tmp_path: Path) -> None:
    host = make_host(tmp_path, {STATE: "1 0 45 0 0 0\n"})
    result = DropCaches().execute(plan_for(), ctx(host))
    assert (result.outcome, result.message) == (Outcome.SKIPPED, "no vm.drop_caches on this host")


def test_recheck_with_unreadable_dentry_state_fails(tmp_path: Path) -> None:
    host = make_host(tmp_path, {CONTROL: ""})
    result = DropCaches().execute(plan_for(), ctx(host))
    assert result.outcome is Outcome.FAILED
    assert (tmp_path / CONTROL).read_text() == ""


def test_parse_meminfo_kb() -> None:
    assert parse_meminfo_kb(MEMINFO, "Cached") == 246784
    assert parse_meminfo_kb(MEMINFO, "SwapCached") is None
