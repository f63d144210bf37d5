"""One cycle: read probes -> evaluate policies (pure) -> execute decisions -> record.

The engine is the only place that joins the pure evaluator with I/O (probes, actions, state,
audit events). A failing probe or action never stops the cycle: it becomes a reading with an
error or an action with outcome FAILED, and the next policy runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from remediator import actions as actions_pkg
from remediator import probes as probes_pkg
from remediator.actions.base import ACTIONS, ApplyContext, PlanContext
from remediator.audit import get_logger
from remediator.clock import Clock
from remediator.host import HostRoot
from remediator.model import (
    ActionEvent,
    ActionResult,
    Condition,
    Decision,
    DecisionKind,
    Mode,
    Outcome,
    Phase,
    Plan,
    Reading,
    StepVerdict,
)
from remediator.policy.catalog import Catalog
from remediator.policy.evaluate import (
    breaker_count,
    breaker_would_trip,
    effective_mode,
    evaluate,
    subjects,
)
from remediator.policy.rules import Policy, PolicySet
from remediator.probes.base import PROBES, Inventory, ProbeContext
from remediator.quantity import format_duration, format_number
from remediator.state import BreakerState, StateStore


def catalog() -> Catalog:
    """Every probe and action this build knows, for policy compilation."""
    return Catalog(probes=probes_pkg.specs(), actions=actions_pkg.specs())


@dataclass
class ActionReport:
    decision: Decision
    mode: Mode
    mode_reason: str
    plan: Plan | None
    result: ActionResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.decision.step,
            "action": self.decision.action,
            "subject": self.decision.subject,
            "mode": self.mode.value,
            "mode_reason": self.mode_reason,
            "plan": self.plan.to_dict() if self.plan else None,
            "result": self.result.to_dict(),
        }


@dataclass
class PolicyReport:
    policy: Policy
    decisions: list[Decision] = field(default_factory=list)
    verdicts: list[StepVerdict] = field(default_factory=list)
    actions: list[ActionReport] = field(default_factory=list)
    conditions: dict[str, Condition] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        p = self.policy
        return {
            "name": p.name,
            "source": p.source.to_dict(),
            "mode": p.mode.value,
            "probe": p.probe,
            "metric": p.metric,
            "scope": p.scope.value,
            "decisions": [d.to_dict() for d in self.decisions],
            "verdicts": [v.to_dict() for v in self.verdicts],
            "actions": [a.to_dict() for a in self.actions],
        }


@dataclass
class CycleReport:
    at: float
    namespace: str
    dry_run: bool
    readings: dict[str, Reading] = field(default_factory=dict)
    policies: list[PolicyReport] = field(default_factory=list)
    breaker: BreakerState = field(default_factory=BreakerState)

    def outcomes(self) -> list[Outcome]:
        return [a.result.outcome for p in self.policies for a in p.actions]


class Engine:
    def __init__(
        self,
        policies: PolicySet,
        *,
        host: HostRoot,
        clock: Clock,
        store: StateStore,
        dry_run: bool = False,
        inventory_factory: Callable[[], Inventory] | None = None,
        docker_factory: Callable[[], Any] | None = None,
        replay: bool = False,
    ) -> None:
        self.policies = policies
        self.host = host
        self.clock = clock
        self.store = store
        self.dry_run = dry_run or replay
        self.replay = replay  # recorded readings: plan only, never touch the host
        self.inventory_factory = inventory_factory
        self.docker_factory = docker_factory
        self.log = get_logger(namespace=store.ns)

    # probes -----------------------------------------------------------------------------
    def read_probes(self, names: Sequence[str], ctx: ProbeContext | None = None) -> dict[str, Reading]:
        ctx = ctx or ProbeContext(self.host, self.clock, self.inventory_factory)
        readings: dict[str, Reading] = {}
        for name in names:
            started = self.clock.now()
            try:
                reading = PROBES[name]().read(ctx)
            except Exception as e:  # a probe bug must not stop the cycle
                reading = Reading(name, started, error=f"{type(e).__name__}: {e}")
            readings[name] = reading
            if reading.error:
                self.log.warning("probe_failed", probe=name, error=reading.error)
            else:
                self.log.info(
                    "probe_read",
                    probe=name,
                    values=dict(reading.values),
                    limits=dict(reading.limits),
                    containers=len(reading.containers),
                )
        return readings

    # the cycle --------------------------------------------------------------------------
    def cycle(
        self, only: Sequence[str] | None = None, readings: Mapping[str, Reading] | None = None
    ) -> CycleReport:
        now = self.clock.now()
        chosen = [p for p in self.policies.policies if only is None or p.name in only]
        report = CycleReport(now, self.store.ns, self.dry_run)
        if readings is None:
            report.readings = self.read_probes(sorted({p.probe for p in chosen}))
        else:
            report.readings = dict(readings)
        ctrl = self.policies.controller
        window = max([ctrl.breaker_window, *(p.budget_window for p in chosen)])
        history = self.store.history(since=now - window)
        breaker = self.store.breaker()
        if breaker.open:
            self.log.error(
                "breaker_open",
                opened_at=breaker.opened_at,
                reason=breaker.reason,
                hint="every action runs in audit mode until `remediator reset-breaker`",
            )
        for policy in chosen:
            reading = report.readings.get(policy.probe) or Reading(
                policy.probe, now, error="no reading recorded for this probe"
            )
            pr = self._run_policy(policy, reading, report.readings, history, breaker, now)
            report.policies.append(pr)
            breaker = self.store.breaker() if not self.replay else breaker
        report.breaker = breaker
        return report

    def _run_policy(
        self,
        policy: Policy,
        reading: Reading,
        readings: Mapping[str, Reading],
        history: list[ActionEvent],
        breaker: BreakerState,
        now: float,
    ) -> PolicyReport:
        conds = {s: c for (_, s), c in self.store.conditions(policy.name).items()}
        ev = evaluate(policy, reading, conds, history, now)
        pr = PolicyReport(policy, ev.decisions, ev.verdicts, conditions=ev.conditions)
        src = policy.source
        plog = self.log.bind(
            policy=policy.name, policy_file=src.file, policy_commit=src.commit, policy_dirty=src.dirty
        )
        for v in ev.verdicts:
            self.store.record_verdict(v, now)
            plog.info(
                "step_verified",
                subject=v.subject,
                step=v.step,
                action=v.action,
                verdict=v.verdict.value,
                before=v.before,
                after=v.after,
            )
        final = dict(ev.conditions)
        for d in ev.decisions:
            old = conds.get(d.subject)
            if (old is not None and old.phase is not d.phase) or (old is None and d.phase is not Phase.OK):
                plog.info(
                    "condition_changed",
                    subject=d.subject,
                    **{"from": old.phase.value if old else None},
                    to=d.phase.value,
                    value=d.value,
                )
            plog.info(
                "policy_evaluated",
                subject=d.subject,
                decision=d.kind.value,
                phase=d.phase.value,
                value=d.value,
                trigger=d.trigger,
                clear=d.clear,
                reason=d.reason,
                reading_error=reading.error,
            )
            if d.kind is not DecisionKind.ACT or d.step is None:
                continue
            ar = self._act(policy, d, reading, readings, final[d.subject], history, breaker, now, plog)
            pr.actions.append(ar)
            if ar.result.outcome is not Outcome.SKIPPED or ar.plan is not None:
                history.append(ActionEvent(now, policy.name, d.subject, ar.result.outcome))
            breaker = self.store.breaker() if not self.replay else breaker
        self.store.save_conditions(policy.name, final, now)
        return pr

    def _act(
        self,
        policy: Policy,
        d: Decision,
        reading: Reading,
        readings: Mapping[str, Reading],
        cond: Condition,
        history: list[ActionEvent],
        breaker: BreakerState,
        now: float,
        plog: Any,
    ) -> ActionReport:
        assert d.step is not None
        step = policy.steps[d.step]
        action = ACTIONS[step.action]()
        mode, why = effective_mode(policy, step, dry_run=self.dry_run, breaker_open=breaker.open)
        ctrl = self.policies.controller
        if mode is Mode.ENFORCE and breaker_would_trip(history, now, ctrl.breaker_max, ctrl.breaker_window):
            count = breaker_count(history, now, ctrl.breaker_window)
            reason = (
                f"{count} actions applied in the last {format_duration(ctrl.breaker_window)} reached the "
                f"limit of {ctrl.breaker_max}; {policy.name} wanted {step.action}"
            )
            self.store.open_breaker(now, reason)
            plog.error(
                "breaker_tripped",
                reason=reason,
                hint="every action runs in audit mode until `remediator reset-breaker`",
            )
            mode, why = Mode.AUDIT, "circuit breaker open"

        subj = next((s for s in subjects(policy, reading) if s.key == d.subject), None)
        eligible = policy.selector.eligible
        ctx = PlanContext(
            policy.name, policy.metric, d.subject, reading, step.params, eligible, now, readings
        )
        plan: Plan | None = None
        try:
            planned = action.plan(ctx)
        except Exception as e:  # an action bug must not stop the cycle
            planned = f"planning failed: {type(e).__name__}: {e}"
            result = ActionResult(Outcome.FAILED, planned)
        else:
            if isinstance(planned, str):
                result = ActionResult(Outcome.SKIPPED, f"nothing to do: {planned}")
            else:
                plan = planned
                result = ActionResult(Outcome.WOULD_APPLY, f"would {plan.summary}")

        # What the state row and the event both say about this action.
        facts: dict[str, Any] = {
            "subject": d.subject,
            "step": d.step,
            "action": step.action,
            "mode": mode.value,
            "mode_reason": why,
            "value": d.value,
        }
        row = (
            self.store.start_action(at=now, policy=policy.name, plan=plan.to_dict(), condition=cond, **facts)
            if plan is not None
            else -1
        )

        if plan is not None and not self.replay:
            recovered = (
                self._recovered(policy, d, subj.container.id if subj and subj.container else None)
                if mode is Mode.ENFORCE and not action.rechecks_target
                else None
            )
            if recovered is not None:
                result = ActionResult(Outcome.SKIPPED, recovered)
            else:
                actx = ApplyContext(
                    self.host,
                    self.clock,
                    dry_run=mode is Mode.AUDIT,
                    docker_factory=self.docker_factory,
                    protect=policy.selector.protect,
                )
                try:
                    result = action.execute(plan, actx)
                except Exception as e:  # TemporaryError after retries, or a bug: report, go on
                    result = ActionResult(Outcome.FAILED, f"{type(e).__name__}: {e}")
        self.store.finish_action(row, result.outcome, result.to_dict())
        event = {
            Outcome.APPLIED: "action_applied",
            Outcome.WOULD_APPLY: "action_would_apply",
            Outcome.SKIPPED: "action_skipped",
            Outcome.FAILED: "action_failed",
        }[result.outcome]
        emit = plog.error if result.outcome is Outcome.FAILED else plog.info
        emit(
            event,
            **facts,
            target=plan.target.to_dict() if plan else None,
            summary=plan.summary if plan else None,
            message=result.message,
            before=dict(result.before),
            after=dict(result.after),
            verified=result.verified,
        )
        return ActionReport(d, mode, why, plan, result)

    def _recovered(self, policy: Policy, d: Decision, container_id: str | None) -> str | None:
        """Re-read the probe right before acting: did the condition go away meanwhile?

        Like earlyoom's "recovered while selecting victim": acting on a stale reading is how a
        remediator causes the outage it was meant to prevent.
        """
        fresh = self.read_probes([policy.probe]).get(policy.probe)
        if fresh is None or fresh.error:
            return None
        now_value = next((s.value for s in subjects(policy, fresh) if s.key == d.subject), None)
        if container_id is not None and now_value is None:
            return f"container {container_id[:12]} is gone"
        if now_value is not None and d.trigger is not None and now_value <= d.trigger:
            return f"recovered before acting: {format_number(now_value)} <= {format_number(d.trigger)}"
        return None


def interrupted_actions(store: StateStore) -> list[dict[str, Any]]:
    """Mark actions a crash left half-done; return them for the start-up log."""
    return [r.to_dict() for r in store.mark_interrupted()]


def forget_removed(store: StateStore, policies: PolicySet) -> int:
    return store.forget_policies([p.name for p in policies.policies])


__all__ = ["ActionReport", "CycleReport", "Engine", "PolicyReport", "catalog"]
