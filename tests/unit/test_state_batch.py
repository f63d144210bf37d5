"""One transaction per cycle: conditions and verdicts of every policy share one commit, an
action's `started` row (and the cycle's writes before it) is on disk before the action acts, and
an unchanged condition is not written again."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remediator.actions.base import ACTIONS, ApplyContext
from remediator.clock import FakeClock
from remediator.engine import Engine
from remediator.model import ActionResult, Outcome, Plan
from remediator.policy.rules import Controller, PolicySet, Step
from remediator.probes.base import PROBES
from remediator.quantity import Amount
from remediator.state import StateStore
from tests.helpers import NoParams, make_host, make_policy
from tests.unit.test_engine import FakeAction, FakeProbe


@pytest.fixture(autouse=True)
def fakes() -> Iterator[None]:
    PROBES["fake"] = FakeProbe
    ACTIONS["fake-act"] = FakeAction
    FakeProbe.fail = False
    FakeAction.raise_in_apply = False
    yield
    del PROBES["fake"], ACTIONS["fake-act"]


def commits(store: StateStore) -> list[str]:
    """Every COMMIT the store's connection runs from now on."""
    seen: list[str] = []
    store._db.set_trace_callback(lambda sql: seen.append(sql) if sql.strip().upper() == "COMMIT" else None)
    return seen


def quiet_set(n: int, **kw: Any) -> PolicySet:
    """n policies on one probe whose value (200) is under their trigger (1000): nothing acts."""
    steps = (Step("fake-act", None, 60.0, NoParams()),)
    policies = tuple(
        make_policy(
            name=f"p{i}", probe="fake", hold=0.0, steps=steps, cooldown=0.0, trigger=Amount(1000), **kw
        )
        for i in range(n)
    )
    return PolicySet("/policies", policies, Controller())


def test_a_cycle_of_many_policies_commits_once(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host", {"value": "200"})
    store = StateStore(tmp_path / "state.db")
    clock = FakeClock(1000.0)
    engine = Engine(quiet_set(12), host=host, clock=clock, store=store)
    seen = commits(store)
    engine.cycle()
    assert len(seen) == 1  # was one per policy
    assert len(store.conditions()) == 12
    # Nothing changed: the next cycle writes nothing at all.
    clock.advance(30)
    seen.clear()
    engine.cycle()
    assert seen == []
    # The value moved: every condition changes (its `value`), in one commit.
    (host.root / "value").write_text("300")
    clock.advance(30)
    engine.cycle()
    assert len(seen) == 1
    assert {c.value for c in store.conditions().values()} == {300.0}


def test_unchanged_conditions_keep_their_row_and_a_gone_subject_is_pruned(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host", {"value": "200"})
    store = StateStore(tmp_path / "state.db")
    clock = FakeClock(1000.0)
    ps = quiet_set(1)
    Engine(ps, host=host, clock=clock, store=store).cycle()
    store._db.execute(
        "INSERT INTO conditions VALUES (?,?,?,?,?)",
        (store.ns, "p0", "gone", '{"policy":"p0","subject":"gone"}', 1.0),
    )
    clock.advance(30)
    Engine(ps, host=host, clock=clock, store=store).cycle()
    assert list(store.conditions()) == [("p0", "host")]
    updated = store._db.execute("SELECT updated FROM conditions").fetchone()[0]
    assert updated == 1000.0  # the host's condition did not change, so it was not rewritten


def test_the_started_row_and_earlier_writes_are_on_disk_before_the_action_acts(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host", {"value": "200"})
    store = StateStore(tmp_path / "state.db")
    clock = FakeClock(1000.0)
    steps = (Step("fake-act", None, 60.0, NoParams()),)
    # p0 does not act (trigger 1000) and is evaluated first; p1 acts (trigger 100).
    ps = PolicySet(
        "/policies",
        (
            make_policy(name="p0", probe="fake", hold=0.0, steps=steps, cooldown=0.0, trigger=Amount(1000)),
            make_policy(name="p1", probe="fake", hold=0.0, steps=steps, cooldown=0.0),
        ),
        Controller(),
    )
    seen_from_outside: dict[str, Any] = {}
    original = FakeAction.apply

    def apply(self: FakeAction, plan: Plan, ctx: ApplyContext) -> ActionResult:
        other = sqlite3.connect(tmp_path / "state.db")
        try:
            seen_from_outside["actions"] = other.execute("SELECT policy, status FROM actions").fetchall()
            seen_from_outside["conditions"] = sorted(
                r[0] for r in other.execute("SELECT policy FROM conditions").fetchall()
            )
        finally:
            other.close()
        return original(self, plan, ctx)

    FakeAction.apply = apply  # type: ignore[method-assign]
    try:
        report = Engine(ps, host=host, clock=clock, store=store).cycle()
    finally:
        FakeAction.apply = original  # type: ignore[method-assign]
    assert [a.result.outcome for p in report.policies for a in p.actions] == [Outcome.APPLIED]
    assert seen_from_outside == {"actions": [("p1", "started")], "conditions": ["p0", "p1"]}
    (row,) = store.actions()
    assert row.status == "done"


def test_outside_a_batch_each_write_commits_at_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    seen = commits(store)
    from remediator.model import Condition

    store.save_conditions("p", {"host": Condition("p", "host")}, 1.0)
    assert len(seen) == 1
    with store.batch():
        store.save_conditions("p", {"host": Condition("p", "host", value=2.0)}, 2.0)
        store.save_conditions("q", {"host": Condition("q", "host", value=2.0)}, 2.0)
        assert len(seen) == 1
        store.open_breaker(2.0, "test")  # durable: commits the batch first, then itself
        assert len(seen) == 2
        assert store.breaker().open
    assert len(seen) == 2  # nothing left to commit
