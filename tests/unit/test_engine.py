"""The engine with a fake probe and a fake action on a fixture host: execution, audit mode,
breaker, crash safety, restarts. Events are asserted with structlog's capture_logs()."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from structlog.testing import capture_logs

from remediator.actions.base import ACTIONS, Action, ApplyContext, PlanContext
from remediator.clock import FakeClock
from remediator.engine import Engine
from remediator.host import HostRoot
from remediator.model import (
    ActionResult,
    DecisionKind,
    Mode,
    Outcome,
    Phase,
    Plan,
    Reading,
    Target,
    TargetKind,
)
from remediator.policy.catalog import MetricSpec
from remediator.policy.rules import Controller, PolicySet, Step
from remediator.probes.base import PROBES, Probe, ProbeContext
from remediator.state import LIVE, StateStore
from tests.helpers import NoParams, make_host, make_policy


class FakeProbe(Probe):
    """Reads the value from a file in the fixture host, like a /proc file."""

    name = "fake"
    help = "test probe"
    metrics = (MetricSpec("m", "test metric"),)
    fail = False

    def read(self, ctx: ProbeContext) -> Reading:
        if FakeProbe.fail:
            raise RuntimeError("probe exploded")
        value = float((ctx.host.root / "value").read_text())
        return Reading("fake", ctx.clock.now(), {"m": value})


class FakeAction(Action):
    """Appends to <host>/effects: the side effect that audit mode must never cause."""

    name = "fake-act"
    help = "test action"
    rechecks: ClassVar[list[str]] = []
    raise_in_apply = False

    def plan(self, ctx: PlanContext) -> Plan | str:
        return Plan(
            self.name,
            Target(TargetKind.HOST, "host"),
            "append a line to effects",
            expect={"value": ctx.reading.values.get("m")},
        )

    def recheck(self, plan: Plan, ctx: ApplyContext) -> str | None:
        FakeAction.rechecks.append(plan.summary)
        return None

    def apply(self, plan: Plan, ctx: ApplyContext) -> ActionResult:
        if FakeAction.raise_in_apply:
            raise OSError(5, "Input/output error")
        with open(ctx.host.root / "effects", "a") as f:
            f.write("acted\n")
        return ActionResult(Outcome.APPLIED, "appended", before={"lines": 0})


@pytest.fixture(autouse=True)
def fakes() -> Iterator[None]:
    PROBES["fake"] = FakeProbe
    ACTIONS["fake-act"] = FakeAction
    FakeProbe.fail = False
    FakeAction.raise_in_apply = False
    FakeAction.rechecks.clear()
    yield
    del PROBES["fake"], ACTIONS["fake-act"]


@pytest.fixture
def host(tmp_path: Path) -> HostRoot:
    return make_host(tmp_path / "host", {"value": "200"})


def policy_set(**kw: Any) -> PolicySet:
    controller = kw.pop("controller", Controller())
    steps = kw.pop("steps", (Step("fake-act", None, 60.0, NoParams()),))
    defaults: dict[str, Any] = {"probe": "fake", "hold": 0.0, "steps": steps, "cooldown": 0.0}
    defaults.update(kw)
    return PolicySet("/policies", (make_policy(**defaults),), controller)


def engine(ps: PolicySet, host: HostRoot, store: StateStore, clock: FakeClock, **kw: Any) -> Engine:
    return Engine(ps, host=host, clock=clock, store=store, **kw)


def effects(host: HostRoot) -> int:
    p = host.root / "effects"
    return len(p.read_text().splitlines()) if p.exists() else 0


def test_enforce_applies_records_and_logs(host: HostRoot, tmp_path: Path) -> None:
    clock = FakeClock()
    store = StateStore(tmp_path / "state.db")
    with capture_logs() as logs:
        report = engine(policy_set(), host, store, clock).cycle()
    (pr,) = report.policies
    assert [a.result.outcome for a in pr.actions] == [Outcome.APPLIED]
    assert effects(host) == 1
    (row,) = store.actions()
    assert (row.status, row.outcome, row.mode, row.value) == ("done", "applied", "enforce", 200.0)
    assert row.plan is not None and row.plan["summary"] == "append a line to effects"
    events = [e["event"] for e in logs]
    assert events == ["probe_read", "condition_changed", "policy_evaluated", "probe_read", "action_applied"]
    applied = logs[-1]
    assert applied["policy"] == "p" and applied["mode"] == "enforce" and applied["target"]["kind"] == "host"
    assert store.conditions()[("p", "host")].phase is Phase.FIRING


def test_audit_mode_plans_and_rechecks_but_changes_nothing(host: HostRoot, tmp_path: Path) -> None:
    clock = FakeClock()
    store = StateStore(tmp_path / "state.db")
    report = engine(policy_set(mode=Mode.AUDIT), host, store, clock).cycle()
    (a,) = report.policies[0].actions
    assert a.result.outcome is Outcome.WOULD_APPLY and a.mode_reason == "policy mode is audit"
    assert a.result.message == "would append a line to effects"
    assert FakeAction.rechecks == ["append a line to effects"]  # audit exercises the re-check
    assert effects(host) == 0


def test_dry_run_overrides_enforce(host: HostRoot, tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    report = engine(policy_set(), host, store, FakeClock(), dry_run=True).cycle()
    assert report.policies[0].actions[0].result.outcome is Outcome.WOULD_APPLY
    assert effects(host) == 0


def test_recovered_before_acting_is_skipped(host: HostRoot, tmp_path: Path) -> None:
    class Dropping(FakeProbe):
        reads = 0

        def read(self, ctx: ProbeContext) -> Reading:
            Dropping.reads += 1
            if Dropping.reads > 1:  # the re-read right before acting sees it recovered
                (ctx.host.root / "value").write_text("90")
            return super().read(ctx)

    PROBES["fake"] = Dropping
    store = StateStore(tmp_path / "state.db")
    report = engine(policy_set(), host, store, FakeClock()).cycle()
    (a,) = report.policies[0].actions
    assert a.result.outcome is Outcome.SKIPPED
    assert a.result.message == "recovered before acting: 90 <= 100"
    assert effects(host) == 0


def test_an_action_that_rechecks_each_target_gets_no_whole_probe_reread(
    host: HostRoot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Counting(FakeProbe):
        reads = 0

        def read(self, ctx: ProbeContext) -> Reading:
            Counting.reads += 1
            return super().read(ctx)

    PROBES["fake"] = Counting
    monkeypatch.setattr(FakeAction, "rechecks_target", True)
    store = StateStore(tmp_path / "state.db")
    report = engine(policy_set(), host, store, FakeClock()).cycle()
    (a,) = report.policies[0].actions
    assert a.result.outcome is Outcome.APPLIED
    assert Counting.reads == 1  # the cycle's one read; the action re-checks its own targets
    assert effects(host) == 1


def test_failing_probe_is_no_data_not_a_crash(host: HostRoot, tmp_path: Path) -> None:
    FakeProbe.fail = True
    store = StateStore(tmp_path / "state.db")
    with capture_logs() as logs:
        report = engine(policy_set(), host, store, FakeClock()).cycle()
    (d,) = report.policies[0].decisions
    assert d.kind is DecisionKind.NO_DATA and d.reason == "RuntimeError: probe exploded"
    assert logs[0]["event"] == "probe_failed" and logs[0]["log_level"] == "warning"


def test_failing_action_is_recorded_and_the_cycle_goes_on(host: HostRoot, tmp_path: Path) -> None:
    FakeAction.raise_in_apply = True
    store = StateStore(tmp_path / "state.db")
    with capture_logs() as logs:
        report = engine(policy_set(), host, store, FakeClock()).cycle()
    (a,) = report.policies[0].actions
    assert a.result.outcome is Outcome.FAILED
    assert a.result.message == "append a line to effects: [Errno 5] Input/output error"
    assert store.actions()[0].outcome == "failed"
    assert next(e for e in logs if e["event"] == "action_failed")["log_level"] == "error"


def test_breaker_trips_and_stays_open_until_reset(host: HostRoot, tmp_path: Path) -> None:
    clock = FakeClock()
    store = StateStore(tmp_path / "state.db")
    ps = policy_set(
        controller=Controller(breaker_max=1, breaker_window=3600.0),
        steps=(Step("fake-act", None, 10.0, NoParams()),),
    )
    e = engine(ps, host, store, clock)
    assert e.cycle().policies[0].actions[0].result.outcome is Outcome.APPLIED
    clock.advance(10.0)
    with capture_logs() as logs:
        a = e.cycle().policies[0].actions[0]
    assert (a.result.outcome, a.mode_reason) == (Outcome.WOULD_APPLY, "circuit breaker open")
    assert "breaker_tripped" in [x["event"] for x in logs]
    assert store.breaker().open and "reached the limit of 1" in (store.breaker().reason or "")
    assert effects(host) == 1
    # Still open an hour later: only a person closes it.
    clock.advance(7200.0)
    report = e.cycle()
    assert report.breaker.open
    assert report.policies[0].actions[0].result.outcome is Outcome.WOULD_APPLY
    store.reset_breaker(clock.now(), "test")
    clock.advance(10.0)
    assert e.cycle().policies[0].actions[0].result.outcome is Outcome.APPLIED
    assert effects(host) == 2


def test_state_survives_a_restart(host: HostRoot, tmp_path: Path) -> None:
    """A hold-down that began before a restart completes after it, without starting over."""
    clock = FakeClock()
    ps = policy_set(hold=300.0)
    store = StateStore(tmp_path / "state.db")
    d = engine(ps, host, store, clock).cycle().policies[0].decisions[0]
    assert d.phase is Phase.PENDING
    store.close()

    clock.advance(300.0)
    store = StateStore(tmp_path / "state.db")  # a new process, the same file
    d = engine(ps, host, store, clock).cycle().policies[0].decisions[0]
    assert (d.kind, d.phase) == (DecisionKind.ACT, Phase.FIRING)
    store.close()

    clock.advance(30.0)  # within settle: the step taken before the restart is remembered
    store = StateStore(tmp_path / "state.db")
    d = engine(ps, host, store, clock).cycle().policies[0].decisions[0]
    assert d.kind is DecisionKind.NONE and "settles" in d.reason
    assert effects(host) == 1


def test_a_crash_mid_action_never_repeats_the_step(host: HostRoot, tmp_path: Path) -> None:
    clock = FakeClock()
    ps = policy_set()

    class Crash(BaseException):
        pass

    def crash(self: Any, plan: Plan, ctx: ApplyContext) -> ActionResult:
        raise Crash

    store = StateStore(tmp_path / "state.db")
    original = FakeAction.apply
    FakeAction.apply = crash  # type: ignore[method-assign]
    try:
        with pytest.raises(Crash):
            engine(ps, host, store, clock).cycle()
    finally:
        FakeAction.apply = original  # type: ignore[method-assign]
    store.close()

    store = StateStore(tmp_path / "state.db")
    (row,) = store.mark_interrupted()
    assert (row.step, row.action, row.status) == (0, "fake-act", "started")
    clock.advance(5.0)
    d = engine(ps, host, store, clock).cycle().policies[0].decisions[0]
    assert d.kind is DecisionKind.NONE and "settles" in d.reason  # step 0 is not run again
    # The interrupted action counts against budgets and the breaker as if it had applied.
    assert [e.outcome for e in store.history(since=0)] == [Outcome.APPLIED]


def test_dry_run_state_is_separate_from_live(host: HostRoot, tmp_path: Path) -> None:
    clock = FakeClock()
    dry = StateStore(tmp_path / "state.db", namespace="dry-run")
    engine(policy_set(), host, dry, clock, dry_run=True).cycle()
    live = StateStore(tmp_path / "state.db", namespace=LIVE)
    assert live.conditions() == {} and live.actions() == []
    assert len(dry.actions()) == 1


def test_readonly_store_never_writes(host: HostRoot, tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    StateStore(db).close()
    before = db.read_bytes()
    ro = StateStore(db, readonly=True)
    engine(policy_set(), host, ro, FakeClock(), dry_run=True).cycle()
    ro.close()
    assert db.read_bytes() == before
    assert not (tmp_path / "missing.db").exists()
    StateStore(tmp_path / "missing.db", readonly=True).close()
    assert not (tmp_path / "missing.db").exists()


def test_a_step_with_nothing_to_do_never_opens_the_breaker(host: HostRoot, tmp_path: Path) -> None:
    """Only a step about to apply counts: a plan of "nothing to do" (no eligible container) or
    a condition that recovered before acting leaves the breaker closed."""
    clock = FakeClock()
    store = StateStore(tmp_path / "state.db")
    ps = policy_set(
        controller=Controller(breaker_max=1, breaker_window=3600.0),
        steps=(Step("fake-act", None, 10.0, NoParams()),),
    )
    e = engine(ps, host, store, clock)
    assert e.cycle().policies[0].actions[0].result.outcome is Outcome.APPLIED  # the limit is used
    original = FakeAction.plan
    FakeAction.plan = lambda self, ctx: "no eligible container"  # type: ignore[method-assign,assignment,return-value]
    try:
        for _ in range(3):
            clock.advance(10.0)
            with capture_logs() as logs:
                a = e.cycle().policies[0].actions[0]
            assert a.result.outcome is Outcome.SKIPPED
            assert "breaker_tripped" not in [x["event"] for x in logs]
            assert not store.breaker().open
    finally:
        FakeAction.plan = original  # type: ignore[method-assign]
    # Recovered right before acting: the fresh reading is under the trigger.
    clock.advance(10.0)
    (host.root / "value").write_text("200")
    report_value = FakeProbe.read
    calls = {"n": 0}

    def later_low(self: FakeProbe, ctx: ProbeContext) -> Reading:
        calls["n"] += 1
        return Reading("fake", ctx.clock.now(), {"m": 200.0 if calls["n"] == 1 else 10.0})

    FakeProbe.read = later_low  # type: ignore[method-assign]
    try:
        a = e.cycle().policies[0].actions[0]
    finally:
        FakeProbe.read = report_value  # type: ignore[method-assign]
    assert a.result.outcome is Outcome.SKIPPED and "recovered" in a.result.message
    assert not store.breaker().open
    # The next step that would really apply trips it, and the row says why it did not run.
    clock.advance(10.0)
    a = e.cycle().policies[0].actions[0]
    assert (a.result.outcome, a.mode_reason) == (Outcome.WOULD_APPLY, "circuit breaker open")
    assert store.breaker().open
    last = store.actions(limit=1)[0]
    assert (last.mode, last.mode_reason, last.outcome) == ("audit", "circuit breaker open", "would_apply")


class JournalledAction(FakeAction):
    """Journals two phases; `recover` records what it was handed."""

    name = "fake-journalled"
    recovered: ClassVar[list[tuple[str, dict[str, Any]]]] = []
    crash_after: str | None = None

    def apply(self, plan: Plan, ctx: ApplyContext) -> ActionResult:
        journal = ctx.journal(self.name, "target-1")
        for phase in ("one", "two"):
            journal.record(phase, {"done": phase})
            if phase == JournalledAction.crash_after:
                raise KeyboardInterrupt  # the process dies: nothing below runs
        journal.close("applied")
        return ActionResult(Outcome.APPLIED, "journalled")

    def recover(self, interrupted: Any, ctx: ApplyContext) -> ActionResult:
        JournalledAction.recovered.append((interrupted.phase, dict(interrupted.data)))
        return ActionResult(Outcome.SKIPPED, "rolled back")


def test_an_interrupted_journalled_action_is_recovered_once(host: HostRoot, tmp_path: Path) -> None:
    ACTIONS["fake-journalled"] = JournalledAction
    JournalledAction.recovered.clear()
    try:
        ps = policy_set(steps=(Step("fake-journalled", None, 60.0, NoParams()),))
        store = StateStore(tmp_path / "state.db")
        JournalledAction.crash_after = "one"
        with pytest.raises(KeyboardInterrupt):
            engine(ps, host, store, FakeClock()).cycle()
        store.close()

        store = StateStore(tmp_path / "state.db")
        (entry,) = store.journal_open()
        assert (entry.action, entry.target, entry.phase, entry.data) == (
            "fake-journalled",
            "target-1",
            "one",
            {"done": "one"},
        )
        with capture_logs() as logs:
            (summary,) = engine(ps, host, store, FakeClock()).recover_interrupted()
        assert JournalledAction.recovered == [("one", {"done": "one"})]
        assert summary["outcome"] == "skipped" and store.journal_open() == []
        assert [e["event"] for e in logs] == ["action_recovered"]
        assert engine(ps, host, store, FakeClock()).recover_interrupted() == []  # once only
        # A run that finished closes its entry: nothing to recover.
        JournalledAction.crash_after = None
        store.close()
        store = StateStore(tmp_path / "state2.db")
        engine(ps, host, store, FakeClock()).cycle()
        assert store.journal_open() == []
    finally:
        del ACTIONS["fake-journalled"]


def test_a_disruptive_step_without_the_opt_in_runs_in_audit(host: HostRoot, tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    step = Step("fake-act", None, 60.0, NoParams(), disruptive=True)
    report = engine(policy_set(steps=(step,)), host, store, FakeClock()).cycle()
    (a,) = report.policies[0].actions
    assert (a.mode, a.result.outcome) == (Mode.AUDIT, Outcome.WOULD_APPLY)
    assert a.mode_reason == "fake-act is disruptive and the step has no `allowDisruptive: true`"
    assert effects(host) == 0

    store = StateStore(tmp_path / "state2.db")
    step = Step("fake-act", None, 60.0, NoParams(), disruptive=True, allow_disruptive=True)
    report = engine(policy_set(steps=(step,)), host, store, FakeClock()).cycle()
    assert report.policies[0].actions[0].result.outcome is Outcome.APPLIED
    assert effects(host) == 1
