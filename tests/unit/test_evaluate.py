"""The pure decision logic, driven by a fake clock: exact edges of every rule."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from remediator.clock import FakeClock
from remediator.model import (
    ActionEvent,
    Condition,
    ContainerRef,
    ContainerSample,
    DecisionKind,
    Mode,
    Outcome,
    Phase,
    Reading,
    Scope,
    Verdict,
)
from remediator.policy.evaluate import (
    breaker_count,
    breaker_would_trip,
    effective_mode,
    evaluate,
)
from remediator.policy.rules import Match, Policy, Selector, Step
from remediator.quantity import Amount
from tests.helpers import NoParams, make_policy


class Sim:
    """Feeds values through evaluate() cycle by cycle, carrying state like the engine does."""

    def __init__(self, policy: Policy, clock: FakeClock | None = None) -> None:
        self.policy = policy
        self.clock = clock or FakeClock()
        self.conditions: dict[str, Condition] = {}
        self.history: list[ActionEvent] = []
        self.verdicts: list[Any] = []

    def tick(
        self,
        value: float | None,
        advance: float = 0.0,
        *,
        limit: float | None = None,
        outcome: Outcome = Outcome.APPLIED,
        error: str | None = None,
    ) -> Any:
        self.clock.advance(advance)
        now = self.clock.now()
        values = {} if value is None else {"m": value}
        limits = {} if limit is None else {"m": limit}
        reading = Reading("probe", now, values, limits, error=error)
        ev = evaluate(self.policy, reading, self.conditions, self.history, now)
        self.conditions = ev.conditions
        self.verdicts.extend(ev.verdicts)
        (d,) = ev.decisions
        if d.kind is DecisionKind.ACT:
            self.history.append(ActionEvent(now, self.policy.name, d.subject, outcome))
        return d

    @property
    def cond(self) -> Condition:
        return self.conditions["host"]


def test_below_trigger_is_ok_and_does_nothing() -> None:
    sim = Sim(make_policy())
    d = sim.tick(100)  # the trigger is "above": equal is not over
    assert (d.kind, d.phase) == (DecisionKind.NONE, Phase.OK)


def test_hold_down_exact_edge() -> None:
    sim = Sim(make_policy(hold=300.0))
    assert sim.tick(101).phase is Phase.PENDING
    d = sim.tick(101, 299.0)
    assert (d.kind, d.phase) == (DecisionKind.NONE, Phase.PENDING)
    assert d.reason == "pending: held 4m59s of 5m"
    d = sim.tick(101, 1.0)
    assert (d.kind, d.phase, d.step, d.action) == (DecisionKind.ACT, Phase.FIRING, 0, "first")


def test_zero_hold_down_acts_on_first_sight() -> None:
    d = Sim(make_policy(hold=0.0)).tick(101)
    assert (d.kind, d.step) == (DecisionKind.ACT, 0)


def test_dip_below_clear_during_hold_down_restarts_it() -> None:
    sim = Sim(make_policy(hold=300.0))
    sim.tick(150)
    sim.tick(40, 200.0)  # below clear (50): back to ok
    assert sim.cond.phase is Phase.OK
    sim.tick(150, 10.0)
    d = sim.tick(150, 299.0)
    assert d.kind is DecisionKind.NONE  # the hold-down started again at the re-trigger


def test_hysteresis_band_keeps_holding_during_hold_down() -> None:
    sim = Sim(make_policy(hold=300.0))
    sim.tick(150)
    sim.tick(60, 100.0)  # under the trigger but above clear: still holding
    assert sim.cond.phase is Phase.PENDING
    assert sim.tick(60, 200.0).kind is DecisionKind.ACT


@pytest.mark.parametrize(
    ("after", "verdict", "next_kind"),
    [
        (49, Verdict.RESOLVED, DecisionKind.NONE),
        (80, Verdict.IMPROVED, DecisionKind.ACT),
        (200, Verdict.UNCHANGED, DecisionKind.ACT),
    ],
)
def test_settle_then_judge_then_escalate(after: float, verdict: Verdict, next_kind: DecisionKind) -> None:
    sim = Sim(make_policy(hold=0.0))
    assert sim.tick(200).step == 0
    d = sim.tick(after, 59.0)
    assert d.kind is DecisionKind.NONE or after < 50  # still settling (unless resolved early)
    if after >= 50:
        assert "settles" in d.reason
        d = sim.tick(after, 1.0)
    assert sim.verdicts[-1].verdict is verdict
    assert sim.verdicts[-1].before == 200 and sim.verdicts[-1].after == after
    assert d.kind is next_kind
    if next_kind is DecisionKind.ACT:
        assert (d.step, d.action) == (1, "second")
    else:
        assert sim.cond.phase is Phase.RESOLVED


def test_exhausted_ladder_waits_for_cooldown_then_restarts() -> None:
    sim = Sim(make_policy(hold=0.0, cooldown=600.0))
    sim.tick(200)  # step 0
    assert sim.tick(200, 60.0).step == 1  # step 1 after settle 60s
    d = sim.tick(200, 120.0)  # step 1 settled: nothing left
    assert d.kind is DecisionKind.EXHAUSTED
    assert sim.verdicts[-1].step == 1
    assert sim.tick(200, 599.0).kind is DecisionKind.EXHAUSTED
    d = sim.tick(200, 1.0)
    assert (d.kind, d.step) == (DecisionKind.ACT, 0)


def test_resolved_then_retrigger_within_cooldown_is_suppressed() -> None:
    sim = Sim(make_policy(hold=0.0, cooldown=600.0))
    sim.tick(200)
    sim.tick(10, 60.0)
    assert sim.cond.phase is Phase.RESOLVED
    d = sim.tick(200, 100.0)
    assert (d.kind, d.phase) == (DecisionKind.SUPPRESSED, Phase.FIRING)
    assert d.reason == "cooldown: 8m20s left"
    assert sim.tick(200, 499.0).kind is DecisionKind.SUPPRESSED
    assert sim.tick(200, 1.0).kind is DecisionKind.ACT


def test_flapping_around_the_trigger_acts_once() -> None:
    sim = Sim(make_policy(hold=0.0, cooldown=600.0, steps=(Step("only", None, 30.0, NoParams()),)))
    kinds = [sim.tick(v, 30.0).kind for v in (101, 99, 101, 99, 101, 99, 101)]
    assert kinds.count(DecisionKind.ACT) == 1  # 99 is inside the band: never resolves
    assert sim.cond.phase is Phase.FIRING


def test_budget_exhaustion_and_next_slot() -> None:
    # One-step ladder, no cooldown: the ladder restarts as soon as its step has settled, so
    # only the budget (2 per hour) holds the policy back.
    policy = make_policy(
        hold=0.0,
        cooldown=0.0,
        budget_max=2,
        budget_window=3600.0,
        steps=(Step("only", None, 10.0, NoParams()),),
    )
    sim = Sim(policy)
    assert sim.tick(200).kind is DecisionKind.ACT  # t=0
    assert sim.tick(200, 10.0).kind is DecisionKind.ACT  # t=10
    d = sim.tick(200, 10.0)  # t=20
    assert d.kind is DecisionKind.SUPPRESSED
    assert d.reason == ("budget exhausted: 2 actions in the last 1h (max 2); next slot in 59m40s")
    assert sim.tick(200, 3579.0).kind is DecisionKind.SUPPRESSED  # t=3599
    assert sim.tick(200, 1.0).kind is DecisionKind.ACT  # t=3600: the t=0 action left the window


def test_skipped_actions_do_not_consume_budget() -> None:
    policy = make_policy(hold=0.0, cooldown=0.0, budget_max=1, steps=(Step("only", None, 10.0, NoParams()),))
    sim = Sim(policy)
    sim.tick(200, outcome=Outcome.SKIPPED)
    for _ in range(3):
        sim.tick(200, 10.0, outcome=Outcome.SKIPPED)
    assert all(e.outcome is Outcome.SKIPPED for e in sim.history)
    assert len(sim.history) >= 2


def test_percent_threshold_uses_live_limit() -> None:
    sim = Sim(make_policy(trigger=Amount(80, percent=True), clear=Amount(70, percent=True), hold=0.0))
    d = sim.tick(79, limit=100)
    assert (d.kind, d.trigger, d.clear) == (DecisionKind.NONE, 80.0, 70.0)
    assert sim.tick(81, 1.0, limit=100).kind is DecisionKind.ACT


def test_percent_threshold_without_limit_is_no_data() -> None:
    sim = Sim(make_policy(trigger=Amount(80, percent=True), clear=Amount(70, percent=True)))
    d = sim.tick(1e9)
    assert d.kind is DecisionKind.NO_DATA and "limit" in d.reason


def test_probe_error_is_no_data_and_keeps_state() -> None:
    sim = Sim(make_policy(hold=300.0))
    sim.tick(200)
    before = sim.cond
    d = sim.tick(None, 100.0, error="boom")
    assert (d.kind, d.reason) == (DecisionKind.NO_DATA, "boom")
    assert sim.cond == before


def _container_reading(now: float, values: dict[str, float], labels: dict[str, dict[str, str]]) -> Reading:
    samples = tuple(
        ContainerSample(ContainerRef(cid, f"name-{cid}", labels.get(cid, {})), {"m": v})
        for cid, v in values.items()
    )
    return Reading("probe", now, {"m": sum(values.values())}, {}, samples)


def test_container_scope_tracks_each_container_and_respects_protection() -> None:
    selector = Selector(exclude=(Match(name="name-skip"),))
    policy = make_policy(scope=Scope.CONTAINER, hold=0.0, selector=selector)
    labels = {"prot": {"remediator.protect": "true"}}
    r = _container_reading(0.0, {"a": 200, "b": 10, "prot": 500, "skip": 900}, labels)
    ev = evaluate(policy, r, {}, [], 0.0)
    by_subject = {d.subject: d for d in ev.decisions}
    assert set(by_subject) == {"a", "b", "prot"}  # excluded containers are not tracked
    assert by_subject["a"].kind is DecisionKind.ACT
    assert by_subject["b"].kind is DecisionKind.NONE
    assert by_subject["prot"].kind is DecisionKind.SUPPRESSED
    assert by_subject["prot"].reason == "container is protected"
    assert ev.conditions["a"].subject_name == "name-a"


def test_gone_container_is_forgotten_but_unknown_one_is_kept() -> None:
    policy = make_policy(scope=Scope.CONTAINER, hold=300.0)
    first = evaluate(policy, _container_reading(0.0, {"a": 200, "b": 200}, {}), {}, [], 0.0)
    assert {k: c.phase for k, c in first.conditions.items()} == {"a": Phase.PENDING, "b": Phase.PENDING}

    # Docker did not answer: the reading has host values but no containers. Both conditions
    # stay exactly as they were (hold-down not restarted) and say why there is no data.
    blind = replace(_container_reading(100.0, {}, {}), containers_error="docker: connection refused")
    ev = evaluate(policy, blind, first.conditions, [], 100.0)
    assert ev.conditions == first.conditions
    assert [(d.subject, d.kind, d.reason) for d in ev.decisions] == [
        ("a", DecisionKind.NO_DATA, "unknown: docker: connection refused"),
        ("b", DecisionKind.NO_DATA, "unknown: docker: connection refused"),
    ]

    # A whole-probe error keeps them too.
    failed = Reading("probe", 150.0, error="dentry-state: EIO")
    assert evaluate(policy, failed, first.conditions, [], 150.0).conditions == first.conditions

    # A complete reading without b: b is gone, a reaches its hold-down on schedule.
    ev = evaluate(policy, _container_reading(300.0, {"a": 200}, {}), first.conditions, [], 300.0)
    assert set(ev.conditions) == {"a"} and ev.conditions["a"].phase is Phase.FIRING


def test_budget_counts_actions_decided_in_the_same_cycle() -> None:
    policy = make_policy(scope=Scope.CONTAINER, hold=0.0, budget_max=2)
    r = _container_reading(0.0, {"a": 200, "b": 200, "c": 200}, {})
    kinds = [d.kind for d in evaluate(policy, r, {}, [], 0.0).decisions]
    assert kinds.count(DecisionKind.ACT) == 2 and kinds.count(DecisionKind.SUPPRESSED) == 1


def test_breaker_counts_only_applied_actions_in_window() -> None:
    h = [
        ActionEvent(t, "p", "host", o)
        for t, o in (
            (0.0, Outcome.APPLIED),
            (10.0, Outcome.WOULD_APPLY),
            (20.0, Outcome.APPLIED),
            (30.0, Outcome.FAILED),
            (40.0, Outcome.APPLIED),
        )
    ]
    assert breaker_count(h, 100.0, 3600.0) == 3
    assert breaker_count(h, 3610.0, 3600.0) == 2  # t=0 fell out of the window; 20 and 40 remain
    assert breaker_would_trip(h, 100.0, 3, 3600.0)
    assert not breaker_would_trip(h, 100.0, 4, 3600.0)


@pytest.mark.parametrize(
    ("policy_mode", "step_mode", "dry_run", "breaker", "expected"),
    [
        (Mode.ENFORCE, None, False, False, (Mode.ENFORCE, "enforce")),
        (Mode.AUDIT, None, False, False, (Mode.AUDIT, "policy mode is audit")),
        (Mode.AUDIT, Mode.ENFORCE, False, False, (Mode.ENFORCE, "enforce")),
        (Mode.ENFORCE, Mode.AUDIT, False, False, (Mode.AUDIT, "step mode is audit")),
        (Mode.ENFORCE, None, True, False, (Mode.AUDIT, "dry run")),
        (Mode.ENFORCE, Mode.ENFORCE, False, True, (Mode.AUDIT, "circuit breaker open")),
    ],
)
def test_effective_mode(
    policy_mode: Mode, step_mode: Mode | None, dry_run: bool, breaker: bool, expected: tuple[Mode, str]
) -> None:
    policy = make_policy(mode=policy_mode)
    step = replace(policy.steps[0], mode=step_mode)
    assert effective_mode(policy, step, dry_run=dry_run, breaker_open=breaker) == expected


@pytest.mark.parametrize(
    ("policy_mode", "step_mode", "allow", "expected_mode"),
    [
        (Mode.ENFORCE, None, False, Mode.AUDIT),  # the opt-in is missing: audit, whatever mode says
        (Mode.ENFORCE, Mode.ENFORCE, False, Mode.AUDIT),
        (Mode.ENFORCE, None, True, Mode.ENFORCE),
        (Mode.AUDIT, None, True, Mode.AUDIT),  # the opt-in alone does not enforce
    ],
)
def test_a_disruptive_step_needs_the_opt_in(
    policy_mode: Mode, step_mode: Mode | None, allow: bool, expected_mode: Mode
) -> None:
    policy = make_policy(mode=policy_mode)
    step = replace(policy.steps[0], mode=step_mode, disruptive=True, allow_disruptive=allow)
    mode, why = effective_mode(policy, step, dry_run=False, breaker_open=False)
    assert mode is expected_mode
    if policy_mode is Mode.ENFORCE and not allow:
        assert why == "first is disruptive and the step has no `allowDisruptive: true`"
    policy = make_policy(mode=policy_mode, steps=(step,))
    assert [i for i, _ in policy.disruptive_without_opt_in()] == (
        [0] if policy_mode is Mode.ENFORCE and not allow else []
    )
