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
from remediator.actions.base import ACTIONS, ApplyContext, Interrupted, Journal, PlanContext
from remediator.audit import get_logger
from remediator.clock import Clock, stopwatch
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
from remediator.probes.base import PROBES, Inventory, ProbeContext, ProbeOptions
from remediator.probes.memory import ProbeMemory
from remediator.quantity import format_duration, format_number
from remediator.state import BreakerState, StateStore, StoreJournal


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
    # Seconds of evaluation, actions and verification (the shared probe read is not included).
    seconds: float = 0.0

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
    # Seconds each probe took to read in this cycle (absent for recorded readings).
    probe_seconds: dict[str, float] = field(default_factory=dict)

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
        kube_factory: Callable[[], Any] | None = None,
        replay: bool = False,
        log_namespace: str | None = None,
        probe_memory: ProbeMemory | None = None,
        probe_options: ProbeOptions | None = None,
    ) -> None:
        self.policies = policies
        self.host = host
        self.clock = clock
        self.store = store
        self.dry_run = dry_run or replay
        self.replay = replay  # recorded readings: plan only, never touch the host
        self.inventory_factory = inventory_factory
        self.docker_factory = docker_factory
        self.kube_factory = kube_factory
        self.probe_memory = probe_memory
        self.probe_options = probe_options or ProbeOptions()
        # Events say which trail they belong to: `live`, `dry-run`, `replay`, or `audit` for
        # `remediator audit`, which reads the live state but must never look like it acted.
        self.log = get_logger(namespace=log_namespace or store.ns)

    # probes -----------------------------------------------------------------------------
    def read_probes(
        self,
        names: Sequence[str],
        ctx: ProbeContext | None = None,
        seconds: dict[str, float] | None = None,
    ) -> dict[str, Reading]:
        """Read each named probe once; `seconds`, when given, receives each read's cost."""
        ctx = ctx or ProbeContext(
            self.host,
            self.clock,
            self.inventory_factory,
            memory=self.probe_memory,
            options=self.probe_options,
        )
        readings: dict[str, Reading] = {}
        for name in names:
            started = self.clock.now()
            elapsed = stopwatch()
            try:
                reading = PROBES[name]().read(ctx)
            except Exception as e:  # a probe bug must not stop the cycle
                reading = Reading(name, started, error=f"{type(e).__name__}: {e}")
            if seconds is not None:
                seconds[name] = elapsed()
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
            # Each probe once per cycle, whatever number of policies use it.
            report.readings = self.read_probes(
                sorted({p.probe for p in chosen}), seconds=report.probe_seconds
            )
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
        # Every policy's conditions in one query, and every deferrable write of the cycle in one
        # transaction (StateStore.batch: an action's own rows still commit before it acts).
        stored: dict[str, dict[str, Condition]] = {}
        for (name, subject), c in self.store.conditions().items():
            stored.setdefault(name, {})[subject] = c
        with self.store.batch():
            for policy in chosen:
                reading = report.readings.get(policy.probe) or Reading(
                    policy.probe, now, error="no reading recorded for this probe"
                )
                elapsed = stopwatch()
                pr = self._run_policy(
                    policy, reading, report.readings, history, breaker, now, stored.get(policy.name, {})
                )
                pr.seconds = elapsed()
                report.policies.append(pr)
                if pr.actions and not self.replay:
                    breaker = self.store.breaker()  # an action may have opened it
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
        conds: dict[str, Condition] | None = None,
    ) -> PolicyReport:
        """`conds`: this policy's stored conditions (read by the cycle); None: read them here."""
        if conds is None:
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
        # A condition advanced by an action was stored with it (start_action): compare with that.
        self.store.save_conditions(policy.name, final, now, stored=None if pr.actions else conds)
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
            elif mode is Mode.ENFORCE and self._trip_breaker(policy, step.action, history, now, plog):
                # Only a step that is about to change the host counts: one that planned nothing
                # or found the condition recovered never opens the breaker.
                mode, why = Mode.AUDIT, "circuit breaker open"
                facts.update(mode=mode.value, mode_reason=why)
                result = ActionResult(Outcome.WOULD_APPLY, f"would {plan.summary} (circuit breaker open)")
            else:
                actx = self.apply_context(
                    dry_run=mode is Mode.AUDIT, protect=policy.selector.protect, action_row=row
                )
                try:
                    result = action.execute(plan, actx)
                except Exception as e:  # TemporaryError after retries, or a bug: report, go on
                    result = ActionResult(Outcome.FAILED, f"{type(e).__name__}: {e}")
        self.store.finish_action(row, result.outcome, result.to_dict(), mode=facts["mode"], mode_reason=why)
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

    def _trip_breaker(
        self, policy: Policy, action: str, history: list[ActionEvent], now: float, plog: Any
    ) -> bool:
        """Open the breaker when one more applied action would pass its limit."""
        ctrl = self.policies.controller
        if not breaker_would_trip(history, now, ctrl.breaker_max, ctrl.breaker_window):
            return False
        count = breaker_count(history, now, ctrl.breaker_window)
        reason = (
            f"{count} actions applied in the last {format_duration(ctrl.breaker_window)} reached the "
            f"limit of {ctrl.breaker_max}; {policy.name} wanted {action}"
        )
        self.store.open_breaker(now, reason)
        plog.error(
            "breaker_tripped",
            reason=reason,
            hint="every action runs in audit mode until `remediator reset-breaker`",
        )
        return True

    def apply_context(
        self, *, dry_run: bool, protect: tuple[Any, ...] | None = None, action_row: int | None = None
    ) -> ApplyContext:
        """The context actions act in: journal and undo records go to this engine's state."""

        def journal(action: str, target: str) -> Journal:
            return StoreJournal(self.store, action, target, action_row, self.clock.now())

        def record_undo(action: str, target: str, name: str | None, original: Mapping[str, Any]) -> None:
            self.store.record_undo(
                at=self.clock.now(), action=action, target=target, target_name=name, original=original
            )

        ctx = ApplyContext(
            self.host,
            self.clock,
            dry_run=dry_run,
            docker_factory=self.docker_factory,
            kube_factory=self.kube_factory,
            journal_factory=None if (dry_run or self.store.readonly) else journal,
            record_undo=None if (dry_run or self.store.readonly) else record_undo,
        )
        if protect is not None:
            ctx.protect = protect
        return ctx

    def recover_interrupted(self) -> list[dict[str, Any]]:
        """Finish or undo the multi-phase actions a crash left open (journal), before any new
        cycle acts. Returns one summary per entry, also logged as `action_recovered`."""
        if self.dry_run or self.store.readonly:
            return []
        out = []
        protect = self.policies.controller.protect
        by_action: dict[str, list[Interrupted]] = {}
        for row in self.store.journal_open():
            by_action.setdefault(row.action, []).append(
                Interrupted(row.id, row.action, row.target, row.phase, row.data, row.started)
            )
        for action, entries in by_action.items():
            cls = ACTIONS.get(action)
            ctx = self.apply_context(dry_run=False)
            if protect:
                ctx.protect = (*ctx.protect, *protect)
            ctx.extra["journal_update"] = lambda eid, phase, data, at: self.store.journal_update(
                eid, phase, data, at if at is not None else self.clock.now()
            )
            if cls is None:
                results = [ActionResult(Outcome.FAILED, f"unknown action {action!r} in the journal")] * len(
                    entries
                )
            else:
                try:
                    results = cls().recover_all(entries, ctx)
                except Exception as e:  # keep the entries open: the next start tries again
                    message = f"recovery failed: {type(e).__name__}: {e}"
                    self.log.error("action_recovery_failed", action=action, error=message)
                    out += [
                        {"journal": i.entry_id, "phase": i.phase, "outcome": "failed", "message": message}
                        for i in entries
                    ]
                    continue
            for entry, result in zip(entries, results, strict=True):
                self.store.journal_close(entry.entry_id, "recovered", result.outcome.value, self.clock.now())
                summary = {
                    "journal": entry.entry_id,
                    "action": action,
                    "target": entry.target,
                    "phase": entry.phase,
                    **result.to_dict(),
                }
                emit = self.log.error if result.outcome is Outcome.FAILED else self.log.warning
                emit("action_recovered", **summary)
                out.append(summary)
        return out

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
    """Mark actions a crash left half-done; return them for the log.

    Only call this while holding the instance lock: every action runs inside a locked cycle, so
    under the lock a row still `started` belongs to a process that died. Without the lock it
    may be another instance's action in progress."""
    return [r.to_dict() for r in store.mark_interrupted()]


def forget_removed(store: StateStore, policies: PolicySet) -> int:
    return store.forget_policies([p.name for p in policies.policies])


def keep_state_bounded(store: StateStore, policies: PolicySet, now: float) -> int:
    """Drop conditions of removed policies and action history past the controller's retention.

    Rows inside the longest budget or breaker window are kept whatever the retention says:
    they are what budgets and the breaker count."""
    ctrl = policies.controller
    window = max([ctrl.breaker_window, *(p.budget_window for p in policies.policies)])
    forget_removed(store, policies)
    return store.prune(
        now, max_age=ctrl.history_max_age, max_actions=ctrl.history_max_actions, keep_since=now - window
    )


__all__ = ["ActionReport", "CycleReport", "Engine", "PolicyReport", "catalog", "keep_state_bounded"]
