"""Typed values that flow through remediator: readings in, decisions and outcomes out.

Everything here is immutable and does no I/O. Probes produce `Reading`s, policy evaluation
turns readings into `Decision`s, actions turn decisions into `Plan`s and `ActionResult`s.
All of them serialise to plain JSON-compatible dicts (`to_dict`) for the audit log, the
state store and `remediator audit --record`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

JSON = dict[str, Any]


def _frozen(m: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(m or {}))


class Scope(enum.StrEnum):
    """What one condition of a policy is about."""

    HOST = "host"  # one condition for the whole host
    CONTAINER = "container"  # one condition per container in the reading


class Mode(enum.StrEnum):
    AUDIT = "audit"  # evaluate and plan, record "would", change nothing
    ENFORCE = "enforce"


class Phase(enum.StrEnum):
    """Life cycle of a condition: ok -> pending -> firing -> resolved (-> pending ...)."""

    OK = "ok"
    PENDING = "pending"  # over the trigger, hold-down (`for`) not yet elapsed
    FIRING = "firing"  # held long enough: the ladder runs
    RESOLVED = "resolved"  # was firing, went under the clear threshold


class Outcome(enum.StrEnum):
    """What happened to one planned action."""

    APPLIED = "applied"
    WOULD_APPLY = "would_apply"  # audit mode, dry run or open breaker
    SKIPPED = "skipped"  # re-check before acting found nothing to do (target changed, ...)
    FAILED = "failed"


class DecisionKind(enum.StrEnum):
    NONE = "none"  # nothing to do: ok, or still within hold-down / settle time
    ACT = "act"  # run ladder step `step` against `subject`
    SUPPRESSED = "suppressed"  # would act, but cooldown / budget / protection forbids it
    EXHAUSTED = "exhausted"  # every ladder step ran and the condition still holds
    NO_DATA = "no_data"  # the probe could not produce the metric (not an error)


class TargetKind(enum.StrEnum):
    HOST = "host"
    CONTAINER = "container"
    CGROUP = "cgroup"
    PATH = "path"
    SYSCTL = "sysctl"


@dataclass(frozen=True)
class PodRef:
    """The Kubernetes pod a CRI container belongs to, as it was described when read.

    `source` says who described it: "api" (the API server's pod list: every field it has) or
    "labels" (the container's io.kubernetes.* labels, when the API server was unreachable: no
    owner and no QoS class then). Fields the source did not give are None.
    """

    name: str
    namespace: str
    uid: str
    container: str | None = None  # the container's name in the pod spec; None for the sandbox
    owner_kind: str | None = None  # the controller from ownerReferences: ReplicaSet, DaemonSet, ...
    owner_name: str | None = None
    qos_class: str | None = None  # status.qosClass: Guaranteed, Burstable, BestEffort
    node: str | None = None  # spec.nodeName
    source: str = "api"

    def to_dict(self) -> JSON:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
            "container": self.container,
            "owner_kind": self.owner_kind,
            "owner_name": self.owner_name,
            "qos_class": self.qos_class,
            "node": self.node,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PodRef:
        return cls(
            name=d["name"],
            namespace=d["namespace"],
            uid=d["uid"],
            container=d.get("container"),
            owner_kind=d.get("owner_kind"),
            owner_name=d.get("owner_name"),
            qos_class=d.get("qos_class"),
            node=d.get("node"),
            source=d.get("source", "api"),
        )


@dataclass(frozen=True)
class ContainerRef:
    """A container as the runtime described it when it was read.

    `pod` is set for a Kubernetes (CRI) container and None for any other; `to_dict` writes the
    "pod" key only when it is set, so records of plain Docker containers keep their shape. A CRI
    container's `name` is "namespace/pod/container" (the sandbox's container is "POD"), so that
    every place that names a container names the pod too.
    """

    id: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    runtime: str = "docker"
    pid: int | None = None  # the init process, None when not running
    cgroup: str | None = None  # cgroup path relative to the hierarchy root, e.g. /docker/<id>
    image: str | None = None
    pod: PodRef | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def to_dict(self) -> JSON:
        return {
            "id": self.id,
            "name": self.name,
            "labels": dict(self.labels),
            "runtime": self.runtime,
            "pid": self.pid,
            "cgroup": self.cgroup,
            "image": self.image,
            **({"pod": self.pod.to_dict()} if self.pod is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ContainerRef:
        return cls(
            id=d["id"],
            name=d["name"],
            labels=d.get("labels") or {},
            runtime=d.get("runtime", "docker"),
            pid=d.get("pid"),
            cgroup=d.get("cgroup"),
            image=d.get("image"),
            pod=PodRef.from_dict(d["pod"]) if d.get("pod") else None,
        )


@dataclass(frozen=True)
class ContainerSample:
    """One container's share of a reading (attribution)."""

    container: ContainerRef
    values: Mapping[str, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", _frozen(self.values))

    @classmethod
    def owning(cls, container: ContainerRef, values: dict[str, float]) -> ContainerSample:
        """A sample of `values` taken over, not copied: the caller made the dict for it and lets
        go of it (probes make one per container per read: 200 a cycle at 100 containers)."""
        sample = object.__new__(cls)
        object.__setattr__(sample, "container", container)
        object.__setattr__(sample, "values", MappingProxyType(values))
        return sample

    def to_dict(self) -> JSON:
        return {"container": self.container.to_dict(), "values": dict(self.values)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ContainerSample:
        return cls(ContainerRef.from_dict(d["container"]), d.get("values") or {})


@dataclass(frozen=True)
class Reading:
    """What one probe saw at one instant.

    `values` are host-wide metrics, `limits` the live kernel limit that belongs to a metric
    (so that a threshold can be "80%" of it), `containers` the per-container attribution and
    `detail` extra JSON-serialisable facts for people and for action planning (e.g. the list
    of orphaned fifo directories). `error` is set when the probe could not read at all; a
    metric that is merely absent is "no data", not an error. `containers_error` says why the
    per-container attribution is missing or incomplete (Docker unreachable, no cgroup
    hierarchy): the host-wide values still stand, but a container absent from `containers` is
    then unknown, not gone.
    """

    probe: str
    taken_at: float
    values: Mapping[str, float] = field(default_factory=dict)
    limits: Mapping[str, float] = field(default_factory=dict)
    containers: tuple[ContainerSample, ...] = ()
    detail: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    containers_error: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", _frozen(self.values))
        object.__setattr__(self, "limits", _frozen(self.limits))
        object.__setattr__(self, "detail", _frozen(self.detail))
        object.__setattr__(self, "containers", tuple(self.containers))

    def to_dict(self) -> JSON:
        return {
            "probe": self.probe,
            "taken_at": self.taken_at,
            "values": dict(self.values),
            "limits": dict(self.limits),
            "containers": [c.to_dict() for c in self.containers],
            "detail": dict(self.detail),
            "error": self.error,
            "containers_error": self.containers_error,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Reading:
        return cls(
            probe=d["probe"],
            taken_at=float(d["taken_at"]),
            values=d.get("values") or {},
            limits=d.get("limits") or {},
            containers=tuple(ContainerSample.from_dict(c) for c in d.get("containers") or ()),
            detail=d.get("detail") or {},
            error=d.get("error"),
            containers_error=d.get("containers_error"),
        )


@dataclass(frozen=True)
class Target:
    """What an action acts on. `id` is what the re-check compares just before acting."""

    kind: TargetKind
    id: str
    name: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "detail", _frozen(self.detail))

    def describe(self) -> str:
        return f"{self.kind.value}:{self.name or self.id}"

    def to_dict(self) -> JSON:
        return {"kind": self.kind.value, "id": self.id, "name": self.name, "detail": dict(self.detail)}


@dataclass(frozen=True)
class Decision:
    """The pure evaluator's verdict for one (policy, subject) in one cycle."""

    policy: str
    subject: str  # "host" or a container id
    kind: DecisionKind
    phase: Phase
    reason: str
    value: float | None = None
    trigger: float | None = None  # the resolved trigger threshold (after % of limit)
    clear: float | None = None
    step: int | None = None  # ladder step index for ACT
    action: str | None = None  # the step's action name for ACT

    def to_dict(self) -> JSON:
        return {
            "policy": self.policy,
            "subject": self.subject,
            "kind": self.kind.value,
            "phase": self.phase.value,
            "reason": self.reason,
            "value": self.value,
            "trigger": self.trigger,
            "clear": self.clear,
            "step": self.step,
            "action": self.action,
        }


@dataclass(frozen=True)
class Plan:
    """Exactly what an action would do, to which target and why. Audit mode shows this."""

    action: str
    target: Target
    summary: str  # one line for people: "write 2 to /proc/sys/vm/drop_caches"
    params: Mapping[str, Any] = field(default_factory=dict)
    # Facts judged at planning time that apply() re-checks right before acting.
    expect: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", _frozen(self.params))
        object.__setattr__(self, "expect", _frozen(self.expect))

    def to_dict(self) -> JSON:
        return {
            "action": self.action,
            "target": self.target.to_dict(),
            "summary": self.summary,
            "params": dict(self.params),
            "expect": dict(self.expect),
        }


@dataclass(frozen=True)
class ActionResult:
    """What apply() (and its immediate read-back) found."""

    outcome: Outcome
    message: str
    before: Mapping[str, Any] = field(default_factory=dict)  # saved original values
    after: Mapping[str, Any] = field(default_factory=dict)  # read back after acting
    verified: bool | None = None  # immediate read-back of the effect; None when not checked

    def __post_init__(self) -> None:
        object.__setattr__(self, "before", _frozen(self.before))
        object.__setattr__(self, "after", _frozen(self.after))

    def to_dict(self) -> JSON:
        return {
            "outcome": self.outcome.value,
            "message": self.message,
            "before": dict(self.before),
            "after": dict(self.after),
            "verified": self.verified,
        }


class Verdict(enum.StrEnum):
    """Whether a step fixed its condition, judged after the step's settle time."""

    RESOLVED = "resolved"  # under the clear threshold
    IMPROVED = "improved"  # lower than when the step ran, but still over the clear threshold
    UNCHANGED = "unchanged"  # not lower
    UNKNOWN = "unknown"  # no data to judge


def judge(before: float | None, after: float | None, clear: float | None) -> Verdict:
    """Compare a metric before a step and after its settle time."""
    if after is None or before is None:
        return Verdict.UNKNOWN
    if clear is not None and after < clear:
        return Verdict.RESOLVED
    if after < before:
        return Verdict.IMPROVED
    return Verdict.UNCHANGED


@dataclass(frozen=True)
class Condition:
    """Persisted state of one (policy, subject) condition. Pure data; see policy/evaluate.py."""

    policy: str
    subject: str
    phase: Phase = Phase.OK
    since: float = 0.0  # when the current phase began
    active_since: float | None = None  # when the value went over the trigger (hold-down start)
    value: float | None = None  # last value seen
    step: int = 0  # index of the next ladder step
    step_at: float | None = None  # when the last step ran (or would have run, in audit)
    step_value: float | None = None  # the metric when the last step ran
    settle_until: float | None = None  # the last step is judged at/after this time
    ladder_ended_at: float | None = None  # cooldown runs from here
    subject_name: str | None = None  # container name, for people

    def to_dict(self) -> JSON:
        return {
            "policy": self.policy,
            "subject": self.subject,
            "phase": self.phase.value,
            "since": self.since,
            "active_since": self.active_since,
            "value": self.value,
            "step": self.step,
            "step_at": self.step_at,
            "step_value": self.step_value,
            "settle_until": self.settle_until,
            "ladder_ended_at": self.ladder_ended_at,
            "subject_name": self.subject_name,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Condition:
        return cls(
            policy=d["policy"],
            subject=d["subject"],
            phase=Phase(d.get("phase", "ok")),
            since=float(d.get("since") or 0.0),
            active_since=d.get("active_since"),
            value=d.get("value"),
            step=int(d.get("step") or 0),
            step_at=d.get("step_at"),
            step_value=d.get("step_value"),
            settle_until=d.get("settle_until"),
            ladder_ended_at=d.get("ladder_ended_at"),
            subject_name=d.get("subject_name"),
        )


@dataclass(frozen=True)
class ActionEvent:
    """The part of the action history that decisions depend on (budget, breaker)."""

    at: float
    policy: str
    subject: str
    outcome: Outcome


@dataclass(frozen=True)
class StepVerdict:
    """A ladder step judged after its settle time."""

    policy: str
    subject: str
    step: int
    action: str
    verdict: Verdict
    before: float | None
    after: float | None
    step_at: float | None

    def to_dict(self) -> JSON:
        return {
            "policy": self.policy,
            "subject": self.subject,
            "step": self.step,
            "action": self.action,
            "verdict": self.verdict.value,
            "before": self.before,
            "after": self.after,
            "step_at": self.step_at,
        }
