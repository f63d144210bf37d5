"""Compiled, immutable policy rules: what the loader produces and the evaluator consumes."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from remediator.model import ContainerRef, Mode, Scope
from remediator.quantity import Amount

PROTECT_DEFAULT = ("remediator.protect", "true")


@dataclass(frozen=True)
class Match:
    """A compiled matcher: by name glob or by label (key, or key=value)."""

    name: str | None = None
    label_key: str | None = None
    label_value: str | None = None  # None: the key's presence is enough

    @classmethod
    def label(cls, text: str) -> Match:
        key, sep, value = text.partition("=")
        return cls(label_key=key, label_value=value if sep else None)

    def matches(self, c: ContainerRef) -> bool:
        return self.matches_container(c.name, c.labels)

    def matches_container(self, name: str, labels: Mapping[str, str]) -> bool:
        """The same test on raw facts (an action re-checks a freshly inspected container)."""
        if self.name is not None:
            return fnmatch.fnmatchcase(name, self.name)
        if self.label_key is None or self.label_key not in labels:
            return False
        return self.label_value is None or labels[self.label_key] == self.label_value

    def __str__(self) -> str:
        if self.name is not None:
            return f"name={self.name}"
        return f"label={self.label_key}" + ("" if self.label_value is None else f"={self.label_value}")


@dataclass(frozen=True)
class Selector:
    include: tuple[Match, ...] = ()
    exclude: tuple[Match, ...] = ()
    protect: tuple[Match, ...] = (Match(label_key=PROTECT_DEFAULT[0], label_value=PROTECT_DEFAULT[1]),)

    def protected(self, c: ContainerRef) -> bool:
        return any(m.matches(c) for m in self.protect)

    def selected(self, c: ContainerRef) -> bool:
        if self.include and not any(m.matches(c) for m in self.include):
            return False
        return not any(m.matches(c) for m in self.exclude)

    def eligible(self, c: ContainerRef) -> bool:
        """May an action of this policy touch this container?"""
        return self.selected(c) and not self.protected(c)


@dataclass(frozen=True)
class Step:
    action: str
    mode: Mode | None
    settle: float
    params: BaseModel  # the action's validated Params instance
    line: int | None = None
    disruptive: bool = False  # the action's ActionSpec.disruptive, copied at compile time
    allow_disruptive: bool = False  # the step's `allowDisruptive: true` opt-in

    def params_dict(self) -> dict[str, Any]:
        return self.params.model_dump(mode="json")


@dataclass(frozen=True)
class Source:
    """Where a policy came from, for the audit trail."""

    file: str
    line: int | None
    commit: str | None = None  # git commit of the policy directory, when it is a work tree
    dirty: bool | None = None  # uncommitted changes in the policy directory

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "commit": self.commit, "dirty": self.dirty}


@dataclass(frozen=True)
class Policy:
    name: str
    description: str
    source: Source
    mode: Mode
    interval: float
    probe: str
    metric: str
    scope: Scope
    trigger: Amount
    clear: Amount
    hold: float  # `for`
    steps: tuple[Step, ...]
    cooldown: float
    budget_max: int
    budget_window: float
    selector: Selector

    def disruptive_without_opt_in(self) -> list[tuple[int, Step]]:
        """Steps that are disruptive, would enforce by mode, and lack `allowDisruptive: true`:
        the engine runs them in audit mode, and `validate` warns about them."""
        return [
            (i, s)
            for i, s in enumerate(self.steps)
            if s.disruptive and not s.allow_disruptive and (s.mode or self.mode) is Mode.ENFORCE
        ]

    def thresholds(self, limit: float | None) -> tuple[float | None, float | None]:
        """(trigger, clear) as absolute numbers, given the metric's live limit."""
        return self.trigger.resolve(limit), self.clear.resolve(limit)


@dataclass(frozen=True)
class Webhook:
    url: str
    format: str = "generic"  # generic | alertmanager
    timeout: float = 5.0


@dataclass(frozen=True)
class Notify:
    """Controller `spec.notify` (schema.Notify)."""

    events: frozenset[str] = frozenset({"applied", "failed", "escalation", "breaker"})
    webhooks: tuple[Webhook, ...] = ()
    attempts: int = 5
    backoff_max: float = 60.0
    queue_max: int = 1000


@dataclass(frozen=True)
class KubeReporting:
    """Controller `spec.kubernetes` (schema.Kubernetes): what this node tells its API server."""

    conditions: bool = True
    events: bool = True
    heartbeat: float = 300.0
    taint: frozenset[str] = frozenset()  # policies whose firing condition taints the node


@dataclass(frozen=True)
class Controller:
    breaker_max: int = 20
    breaker_window: float = 3600.0
    protect: tuple[Match, ...] = ()
    source: Source | None = None
    # Action history kept in state.db (schema.History): seconds, rows per namespace.
    history_max_age: float = 30 * 86400.0
    history_max_actions: int = 5000
    notify: Notify = field(default_factory=Notify)
    kubernetes: KubeReporting = field(default_factory=KubeReporting)


@dataclass(frozen=True)
class PolicySet:
    directory: str
    policies: tuple[Policy, ...] = ()
    controller: Controller = field(default_factory=Controller)
    files: tuple[str, ...] = ()
    commit: str | None = None
    dirty: bool | None = None

    def by_name(self) -> Mapping[str, Policy]:
        return {p.name: p for p in self.policies}

    def probes(self) -> tuple[str, ...]:
        return tuple(sorted({p.probe for p in self.policies}))
