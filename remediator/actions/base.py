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

from pydantic import BaseModel, ConfigDict

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


class ContainerTargetParams(ActionParams):
    """Parameters of actions that act on one container."""

    target: TargetChoice = "top"
    """"top": the eligible container with the most of `rankBy`; "subject": the condition's own
    container (container-scoped policies)."""
    rankBy: str | None = None
    """The per-container metric that picks the "top" container (default: the policy's metric).
    Host-wide metrics such as `negative` need one: e.g. `slab_reclaimable_bytes`."""


def choose_container(
    ctx: PlanContext, target: TargetChoice, rank_by: str | None = None
) -> ContainerRef | str:
    """The container to act on, or why there is none.

    "top": the eligible container with the largest value of `rank_by` (default: the policy's
    metric) in this reading, ties broken by id so audit replays choose the same one.
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
