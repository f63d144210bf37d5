"""Pure decision logic: (policy, reading, conditions, history, now) -> (conditions, decisions).

No I/O and no clock: everything it knows is passed in, so it is tested exhaustively with a
fake clock. The engine executes the decisions and records what happened.

A condition moves ok -> pending -> firing -> resolved:

* It starts to hold when the value goes **above** the trigger, and keeps holding until the
  value drops **below** the clear threshold (hysteresis: between the two it keeps its phase).
* pending -> firing once it has held for the hold-down (`for`). A dip under the clear
  threshold during hold-down resets it to ok.
* firing runs the ladder: step 0 acts; after the step's `settle` the step is judged
  (resolved / improved / unchanged) and, if the condition still holds, the next step acts.
  When every step has run and it still holds, the ladder is exhausted; it may start again from
  step 0 after the cooldown.
* firing -> resolved when the value drops below the clear threshold. A new ladder for the same
  condition may start only after `cooldown` from the end of the previous one.
* Every act is bounded by the policy's budget (at most N per window, counting applied, failed
  and would-apply actions) and by protection (protected containers are never acted on).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from remediator.model import (
    ActionEvent,
    Condition,
    ContainerRef,
    Decision,
    DecisionKind,
    Mode,
    Outcome,
    Phase,
    Reading,
    Scope,
    StepVerdict,
    judge,
)
from remediator.policy.rules import Policy, Step
from remediator.quantity import format_duration
from remediator.quantity import format_number as n

HOST = "host"

# Outcomes that consume a policy's budget. SKIPPED does not: the re-check found nothing to do.
BUDGET_OUTCOMES = frozenset({Outcome.APPLIED, Outcome.FAILED, Outcome.WOULD_APPLY})


@dataclass(frozen=True)
class Subject:
    key: str
    value: float | None
    limit: float | None
    container: ContainerRef | None = None


@dataclass
class Evaluation:
    conditions: dict[str, Condition] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    verdicts: list[StepVerdict] = field(default_factory=list)


def subjects(policy: Policy, reading: Reading) -> list[Subject]:
    """The conditions this policy tracks in this reading."""
    limit = reading.limits.get(policy.metric)
    if policy.scope is Scope.HOST:
        return [Subject(HOST, reading.values.get(policy.metric), limit)]
    out = []
    for sample in reading.containers:
        if not policy.selector.selected(sample.container):
            continue
        out.append(Subject(sample.container.id, sample.values.get(policy.metric), limit, sample.container))
    return out


def budget_used(history: Iterable[ActionEvent], policy: str, now: float, window: float) -> list[float]:
    """Times of this policy's budget-consuming actions within the window, oldest first."""
    return sorted(
        e.at for e in history if e.policy == policy and e.outcome in BUDGET_OUTCOMES and e.at > now - window
    )


def breaker_count(history: Iterable[ActionEvent], now: float, window: float) -> int:
    """Applied actions host-wide within the breaker window (audit actions do not count)."""
    return sum(1 for e in history if e.outcome is Outcome.APPLIED and e.at > now - window)


def breaker_would_trip(history: Iterable[ActionEvent], now: float, max_actions: int, window: float) -> bool:
    """True when one more applied action would exceed the breaker's limit."""
    return breaker_count(history, now, window) + 1 > max_actions


def effective_mode(policy: Policy, step: Step, *, dry_run: bool, breaker_open: bool) -> tuple[Mode, str]:
    """The mode an action really runs in, and why. Any one reason for audit wins."""
    if dry_run:
        return Mode.AUDIT, "dry run"
    if breaker_open:
        return Mode.AUDIT, "circuit breaker open"
    if step.mode is Mode.AUDIT:
        return Mode.AUDIT, "step mode is audit"
    if step.mode is None and policy.mode is Mode.AUDIT:
        return Mode.AUDIT, "policy mode is audit"
    if step.disruptive and not step.allow_disruptive:
        # The opt-in is the engine's to enforce, not a convention: a disruptive action (one that
        # restarts a service or hurts every tenant) needs the operator's explicit yes.
        return Mode.AUDIT, f"{step.action} is disruptive and the step has no `allowDisruptive: true`"
    return Mode.ENFORCE, "enforce"


def evaluate(
    policy: Policy,
    reading: Reading,
    conditions: Mapping[str, Condition],
    history: Sequence[ActionEvent],
    now: float,
) -> Evaluation:
    ev = Evaluation()
    used = budget_used(history, policy.name, now, policy.budget_window)
    for subj in subjects(policy, reading):
        prev = conditions.get(subj.key) or Condition(policy.name, subj.key, since=now)
        if subj.container is not None:
            prev = replace(prev, subject_name=subj.container.name)
        cond, decision, verdict = _step(policy, reading, subj, prev, used, now)
        ev.conditions[subj.key] = cond
        ev.decisions.append(decision)
        if verdict is not None:
            ev.verdicts.append(verdict)
        if decision.kind is DecisionKind.ACT:
            used.append(now)
    unknown = reading.error or reading.containers_error
    if policy.scope is Scope.CONTAINER and unknown:
        # Containers missing from an incomplete reading are unknown, not gone: keep their
        # conditions (hold-down, ladder position, settle times) as they were.
        for key in sorted(set(conditions) - set(ev.conditions)):
            cond = conditions[key]
            ev.conditions[key] = cond
            ev.decisions.append(
                _decision(policy, Subject(key, None, None), cond, DecisionKind.NO_DATA, f"unknown: {unknown}")
            )
    return ev


def _decision(
    policy: Policy,
    subj: Subject,
    cond: Condition,
    kind: DecisionKind,
    reason: str,
    trigger: float | None = None,
    clear: float | None = None,
) -> Decision:
    step = cond.step if kind in (DecisionKind.ACT, DecisionKind.SUPPRESSED) else None
    action = policy.steps[cond.step].action if step is not None and step < len(policy.steps) else None
    return Decision(policy.name, subj.key, kind, cond.phase, reason, subj.value, trigger, clear, step, action)


def _step(
    policy: Policy, reading: Reading, subj: Subject, cond: Condition, used: list[float], now: float
) -> tuple[Condition, Decision, StepVerdict | None]:
    if reading.error is not None or subj.value is None:
        why = reading.error or f"probe {policy.probe!r} has no value for {policy.metric!r}"
        return cond, _decision(policy, subj, cond, DecisionKind.NO_DATA, why), None
    trigger, clear = policy.thresholds(subj.limit)
    if trigger is None or clear is None:
        why = f"the limit of {policy.metric!r} is unknown, so {policy.trigger} cannot be resolved"
        return cond, _decision(policy, subj, cond, DecisionKind.NO_DATA, why), None
    clear = min(clear, trigger)  # a percentage clear over an absolute trigger must not invert
    value = subj.value
    cond = replace(cond, value=value)

    def d(c: Condition, kind: DecisionKind, reason: str) -> Decision:
        return _decision(policy, subj, c, kind, reason, trigger, clear)

    verdict: StepVerdict | None = None

    if cond.phase in (Phase.OK, Phase.RESOLVED):
        if value <= trigger:
            return cond, d(cond, DecisionKind.NONE, f"{cond.phase.value}: {n(value)} <= {n(trigger)}"), None
        cond = replace(cond, phase=Phase.PENDING, since=now, active_since=now)

    if cond.phase is Phase.PENDING:
        if value < clear:
            cond = replace(cond, phase=Phase.OK, since=now, active_since=None)
            return (
                cond,
                d(cond, DecisionKind.NONE, f"cleared during hold-down: {n(value)} < {n(clear)}"),
                None,
            )
        held = now - (cond.active_since if cond.active_since is not None else now)
        if held < policy.hold:
            reason = f"pending: held {format_duration(held)} of {format_duration(policy.hold)}"
            return cond, d(cond, DecisionKind.NONE, reason), None
        cond = replace(
            cond, phase=Phase.FIRING, since=now, step=0, step_at=None, step_value=None, settle_until=None
        )

    # FIRING
    if cond.settle_until is not None and (now >= cond.settle_until or value < clear):
        last = cond.step - 1
        verdict = StepVerdict(
            policy.name,
            subj.key,
            last,
            policy.steps[last].action,
            judge(cond.step_value, value, clear),
            cond.step_value,
            value,
            cond.step_at,
        )
        cond = replace(cond, settle_until=None)

    if value < clear:
        cond = replace(
            cond,
            phase=Phase.RESOLVED,
            since=now,
            active_since=None,
            step=0,
            settle_until=None,
            ladder_ended_at=now if cond.step_at is not None else cond.ladder_ended_at,
        )
        return cond, d(cond, DecisionKind.NONE, f"resolved: {n(value)} < {n(clear)}"), verdict

    if cond.settle_until is not None:
        reason = (
            f"firing: step {cond.step - 1} ({policy.steps[cond.step - 1].action}) settles "
            f"for {format_duration(cond.settle_until - now)} more"
        )
        return cond, d(cond, DecisionKind.NONE, reason), verdict

    if cond.step >= len(policy.steps):
        ended = cond.ladder_ended_at if cond.ladder_ended_at is not None else now
        cond = replace(cond, ladder_ended_at=ended)
        if now - ended < policy.cooldown:
            reason = (
                f"ladder exhausted: all {len(policy.steps)} steps ran and {n(value)} > {n(clear)}; "
                f"restarts after cooldown in {format_duration(ended + policy.cooldown - now)}"
            )
            return cond, d(cond, DecisionKind.EXHAUSTED, reason), verdict
        cond = replace(cond, step=0)

    if cond.step == 0 and cond.ladder_ended_at is not None and now - cond.ladder_ended_at < policy.cooldown:
        left = cond.ladder_ended_at + policy.cooldown - now
        return cond, d(cond, DecisionKind.SUPPRESSED, f"cooldown: {format_duration(left)} left"), verdict

    if len(used) >= policy.budget_max:
        next_slot = used[-policy.budget_max] + policy.budget_window - now
        reason = (
            f"budget exhausted: {len(used)} actions in the last "
            f"{format_duration(policy.budget_window)} (max {policy.budget_max}); "
            f"next slot in {format_duration(max(next_slot, 0))}"
        )
        return cond, d(cond, DecisionKind.SUPPRESSED, reason), verdict

    if subj.container is not None and policy.selector.protected(subj.container):
        return cond, d(cond, DecisionKind.SUPPRESSED, "container is protected"), verdict

    step = policy.steps[cond.step]
    decision = d(
        cond, DecisionKind.ACT, f"firing: {n(value)} > {n(clear)}, step {cond.step} of {len(policy.steps)}"
    )
    cond = replace(
        cond,
        step=cond.step + 1,
        step_at=now,
        step_value=value,
        settle_until=now + step.settle,
        ladder_ended_at=None,
    )
    return cond, decision, verdict
