"""The action interface: plan (pure), re-check, apply, verify.

`Action.execute` is the one place where the dry-run check sits, on the line before the side
effect: plan and re-check run in audit mode too, so audit exercises everything but the change.

Contract for every action:
* `plan()` is pure: from the policy's reading and params it picks a target and says exactly
  what it would do. Returning a string means "nothing to do" and why.
* `recheck()` reads the host right before acting and confirms the target is still what was
  judged (same container id, fifo still orphaned, value still over the line). A non-None
  return is the reason to skip.
* `apply()` saves the original state first (into `ActionResult.before`), then acts once,
  bounded. It must re-check individual items itself where a batch is involved (fifo dirs).
* `verify()` reads back the immediate effect (sysctl value, cgroup usage).
* An action of several phases (recreate-container) writes each phase to `ApplyContext.journal`
  before taking it, and implements `recover()`: given the last phase a crash left behind, it
  finishes or undoes the action (`engine.recover_interrupted` calls it on the next start).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from remediator.clock import Clock
from remediator.host import HostRoot
from remediator.model import ActionResult, ContainerRef, Outcome, Plan, Reading
from remediator.policy.catalog import ActionSpec
from remediator.policy.rules import PROTECT_DEFAULT, Match


class ActionParams(BaseModel):
    """Base for action parameters: strict, frozen, no unknown keys."""

    # Field docstrings become the JSON Schema descriptions (editors show them).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)


class NoParams(ActionParams):
    pass


TargetChoice = Literal["subject", "top"]


def _fraction(text: object, what: str) -> float:
    if not isinstance(text, str) or not text.strip().endswith("%"):
        raise ValueError(f"{what}: expected a percentage such as 50%, got {text!r}")
    try:
        pct = float(text.strip()[:-1])
    except ValueError:
        raise ValueError(f"{what}: expected a percentage such as 50%, got {text!r}") from None
    if not 0 < pct <= 100:
        raise ValueError(f"{what}: expected a percentage in (0, 100], got {text!r}")
    return pct / 100


@dataclass(frozen=True)
class OffenderRule:
    """When the "top" container counts as the offender of a shared pool (a kernel limit all
    containers share): it holds at least `min_share` of the pool's usage, or the pool is
    critical (usage at least `or_top_above` of its limit) and it is the top holder. Otherwise no
    container is acted on: raising the limit is the fix, and no one container is to blame.
    Shares are fractions (0.5); `min_share_text` / `or_top_above_text` are the policy's words."""

    min_share_text: str
    or_top_above_text: str | None = None

    @property
    def min_share(self) -> float:
        return _fraction(self.min_share_text, "minShare")

    @property
    def or_top_above(self) -> float | None:
        return None if self.or_top_above_text is None else _fraction(self.or_top_above_text, "orTopAbove")

    def judge(self, name: str, held: float, usage: float | None, limit: float | None) -> str | None:
        """None when a container holding `held` of a pool at `usage` of `limit` is the offender;
        else why not (pure)."""
        need = self.min_share_text
        if usage is None or usage <= 0:
            return f"pool usage is unknown: cannot tell whether {name} holds {need} of it"
        share = held / usage
        if share >= self.min_share:
            return None
        critical = self.or_top_above
        said = f"{name} holds {share:.0%} of the pool ({held:g} of {usage:g}), under minShare {need}"
        if critical is None:
            return said
        if not limit:
            return f"{said}, and the pool's limit is unknown"
        if usage / limit >= critical:
            return None  # the pool is about to run out: the top holder it is
        fill = f"{usage / limit:.0%}"
        return f"{said}, and the pool is at {fill} of its limit, under orTopAbove {self.or_top_above_text}"


class ContainerTargetParams(ActionParams):
    """Parameters of actions that act on one container."""

    target: TargetChoice = "top"
    """"top": the eligible container with the most of `rankBy`; "subject": the condition's own
    container (container-scoped policies)."""
    rankBy: str | None = None
    """The per-container metric that picks the "top" container (default: the policy's metric).
    Host-wide metrics such as `negative` need one: e.g. `slab_reclaimable_bytes`."""
    minShare: str | None = None
    """With target "top", for shared pools: act only on a container holding at least this
    percentage of the pool's usage (the policy's metric: host-wide, or the uid holding the most
    for per-uid pools), e.g. 50%. Unset: the top container whatever its share."""
    orTopAbove: str | None = None
    """With `minShare`: once the pool's usage is at least this percentage of its live limit
    (critical, e.g. 95%), the top holder is the offender whatever its share."""

    @field_validator("minShare", "orTopAbove")
    @classmethod
    def _check_percentage(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            _fraction(v, str(info.field_name))
        return v

    @model_validator(mode="after")
    def _check_offender(self) -> ContainerTargetParams:
        if self.orTopAbove is not None and self.minShare is None:
            raise ValueError("orTopAbove needs minShare (it widens the offender rule minShare sets)")
        if self.minShare is not None and self.target != "top":
            raise ValueError('minShare picks among containers: it needs target "top"')
        return self

    @property
    def offender(self) -> OffenderRule | None:
        return None if self.minShare is None else OffenderRule(self.minShare, self.orTopAbove)

    def choose(self, ctx: PlanContext) -> ContainerRef | str:
        """The container these params pick in this reading, or why there is none: every
        container action chooses through here, so none can forget a part of the rule."""
        return choose_container(ctx, self.target, self.rankBy, self.offender)


def choose_container(
    ctx: PlanContext, target: TargetChoice, rank_by: str | None = None, offender: OffenderRule | None = None
) -> ContainerRef | str:
    """The container to act on, or why there is none.

    "top": the eligible container with the largest value of `rank_by` (default: the policy's
    metric) in this reading, ties broken by id so audit replays choose the same one; with
    `offender`, only when it is the pool's offender by that rule (its share is of the policy
    metric's host-wide value, the limit that metric's live limit).
    "subject": the condition's own container, for container-scoped policies.
    """
    if target == "subject":
        if ctx.subject == "host":
            return "target 'subject' needs a container-scoped policy (this condition is host-wide)"
        container = ctx.subject_container
        if container is None:
            return f"subject container {ctx.subject[:12]} is not in this reading"
        if not ctx.eligible(container):
            return f"subject container {container.name} is not eligible (protected or not selected)"
        return container
    metric = rank_by or ctx.metric
    best: tuple[float, str, ContainerRef] | None = None
    for sample in ctx.reading.containers:
        value = sample.values.get(metric)
        if value is None or value <= 0 or not ctx.eligible(sample.container):
            continue
        key = (float(value), sample.container.id, sample.container)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None:
        return f"no eligible container has {metric} > 0"
    if offender is not None:
        why = offender.judge(
            best[2].name, best[0], ctx.reading.values.get(ctx.metric), ctx.reading.limits.get(ctx.metric)
        )
        if why is not None:
            return why
    return best[2]


@dataclass(frozen=True)
class PlanContext:
    policy: str
    metric: str
    subject: str  # "host" or a container id
    reading: Reading  # the policy's probe reading this cycle
    params: BaseModel  # the step's validated Params instance (the action's own class)
    eligible: Callable[[ContainerRef], bool]  # selectors + protection, already combined
    now: float
    readings: Mapping[str, Reading] = field(default_factory=dict)  # every probe read this cycle

    @property
    def subject_container(self) -> ContainerRef | None:
        for sample in self.reading.containers:
            if sample.container.id == self.subject:
                return sample.container
        return None


class Journal(Protocol):
    """Where a multi-phase action records the phase it is about to take (state.StoreJournal)."""

    def record(self, phase: str, data: Mapping[str, Any], at: float | None = None) -> None: ...

    def close(self, outcome: str, at: float | None = None) -> None: ...


@dataclass
class MemoryJournal:
    """A journal kept in memory: for tests and for runs without a state database."""

    phases: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    outcome: str | None = None

    def record(self, phase: str, data: Mapping[str, Any], at: float | None = None) -> None:
        self.phases.append((phase, dict(data)))

    def close(self, outcome: str, at: float | None = None) -> None:
        self.outcome = outcome


@dataclass(frozen=True)
class Interrupted:
    """What `recover()` is given: the journal entry a crash left open."""

    entry_id: int
    action: str
    target: str
    phase: str
    data: Mapping[str, Any]
    started: float


@dataclass
class ApplyContext:
    host: HostRoot
    clock: Clock
    dry_run: bool
    # Adapters are created lazily: most cycles never need a Docker client.
    docker_factory: Callable[[], Any] | None = None
    # The Kubernetes API client (probes/kube_api.KubeClient), lazily too; None: no cluster.
    kube_factory: Callable[[], Any] | None = None
    # The policy's protect matchers (its protectLabel and the controller's list): an action that
    # re-inspects a container before acting skips it when one of these matches it now.
    protect: tuple[Match, ...] = (Match(label_key=PROTECT_DEFAULT[0], label_value=PROTECT_DEFAULT[1]),)
    extra: dict[str, Any] = field(default_factory=dict)
    # Opens the journal of one multi-phase action (its target's id); the engine binds it to the
    # state database. None: an in-memory journal (nothing to recover after a crash).
    journal_factory: Callable[[str, str], Journal] | None = None
    # Remembers an original an operator may restore later (cap-memory's limit):
    # (action, target id, target name, original) -> None. None: not recorded.
    record_undo: Callable[[str, str, str | None, Mapping[str, Any]], None] | None = None

    def journal(self, action: str, target: str) -> Journal:
        if self.journal_factory is None:
            return MemoryJournal()
        return self.journal_factory(action, target)

    def protected_by(self, name: str, labels: Mapping[str, str]) -> Match | None:
        return next((m for m in self.protect if m.matches_container(name, labels)), None)

    def docker(self) -> Any:
        if self.docker_factory is None:
            raise RuntimeError("no Docker client configured")
        if "docker" not in self.extra:
            self.extra["docker"] = self.docker_factory()
        return self.extra["docker"]

    def kube(self) -> Any:
        if self.kube_factory is None:
            raise RuntimeError("no Kubernetes API server configured")
        if "kube" not in self.extra:
            self.extra["kube"] = self.kube_factory()
        return self.extra["kube"]


class Action(abc.ABC):
    name: ClassVar[str]
    help: ClassVar[str]
    Params: ClassVar[type[ActionParams]] = NoParams
    disruptive: ClassVar[bool] = False
    # True when apply() re-checks every target itself right before acting on it (clean-fifos
    # judges each directory at removal): the engine then skips its whole-probe re-read.
    rechecks_target: ClassVar[bool] = False

    @classmethod
    def spec(cls) -> ActionSpec:
        return ActionSpec(cls.name, cls.help, cls.Params, cls.disruptive, cls.rechecks_target)

    @abc.abstractmethod
    def plan(self, ctx: PlanContext) -> Plan | str: ...

    def recheck(self, plan: Plan, ctx: ApplyContext) -> str | None:
        """Reason to skip, or None when the target is still what was judged."""
        return None

    @abc.abstractmethod
    def apply(self, plan: Plan, ctx: ApplyContext) -> ActionResult: ...

    def verify(self, plan: Plan, result: ActionResult, ctx: ApplyContext) -> ActionResult:
        """Read back the immediate effect; default: trust apply's own result."""
        return result

    def preview(self, plan: Plan, ctx: ApplyContext) -> str:
        """Extra facts for the audit-mode message, read after the re-check (e.g. what a
        recreate would lose). Empty by default."""
        return ""

    def recover(self, interrupted: Interrupted, ctx: ApplyContext) -> ActionResult:
        """Finish or undo an action a crash interrupted. Only journalled actions have any."""
        return ActionResult(Outcome.SKIPPED, f"{self.name} keeps no journal: nothing to recover")

    def recover_all(self, entries: Sequence[Interrupted], ctx: ApplyContext) -> list[ActionResult]:
        """Every open entry of this action at once, oldest first (entries that belong together,
        a recreated target and its dependents, are decided together). One result per entry."""
        return [self.recover(e, ctx) for e in entries]

    def execute(self, plan: Plan, ctx: ApplyContext) -> ActionResult:
        """Re-check, then (unless dry run) apply and verify. Never raises for host errors."""
        try:
            reason = self.recheck(plan, ctx)
        except OSError as e:
            return ActionResult(Outcome.FAILED, f"re-check failed: {e}")
        if reason is not None:
            return ActionResult(Outcome.SKIPPED, reason)
        if ctx.dry_run:
            try:
                note = self.preview(plan, ctx)
            except OSError as e:
                note = f" (preview failed: {e})"
            return ActionResult(Outcome.WOULD_APPLY, f"would {plan.summary}{note}")
        try:
            result = self.apply(plan, ctx)
        except OSError as e:
            return ActionResult(Outcome.FAILED, f"{plan.summary}: {e}")
        if result.outcome is not Outcome.APPLIED:
            return result
        try:
            return self.verify(plan, result, ctx)
        except OSError as e:
            return ActionResult(
                Outcome.APPLIED,
                f"{result.message}; read-back failed: {e}",
                result.before,
                verified=False,
            )


ACTIONS: dict[str, type[Action]] = {}

A = TypeVar("A", bound=type[Action])


def register(cls: A) -> A:
    if cls.name in ACTIONS:
        raise RuntimeError(f"action {cls.name!r} registered twice")
    ACTIONS[cls.name] = cls
    return cls
