"""The pure part of the node reporting: conditions, taints and Events from a cycle's report.

No I/O: `status.NodeReporter` reads and writes the API server with what these compute. See
status.py's docstring for the rules (when a condition is written, what a taint looks like).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from remediator.engine import CycleReport, PolicyReport
from remediator.kube.events import NORMAL, WARNING, Involved, Note, rfc3339
from remediator.model import Outcome, Phase, TargetKind
from remediator.quantity import format_number

CONDITION_PREFIX = "Remediator"
TAINT_PREFIX = "remediator.io/"
FIRING_REASON = "ThresholdExceeded"
CLEAR_REASON = "NoProblem"
REMOVED_REASON = "PolicyRemoved"
STATE_VERSION = 1
# The firing subjects a condition's message names (the rest are counted).
MESSAGE_SUBJECTS = 3


def condition_type(policy: str) -> str:
    """`negative-dentries` -> `RemediatorNegativeDentries` (CamelCase, as NPD's types are)."""
    return CONDITION_PREFIX + "".join(w[:1].upper() + w[1:] for w in policy.split("-") if w)


def taint_key(policy: str) -> str:
    return TAINT_PREFIX + policy


@dataclass(frozen=True)
class Want:
    """One condition as this cycle wants it on the Node."""

    type: str
    status: str  # "True" | "False"
    reason: str
    message: str


@dataclass
class Seen:
    """One of our conditions as the Node has it (transition and heartbeat: Unix seconds)."""

    status: str
    reason: str
    message: str
    transition: float
    heartbeat: float

    def same(self, want: Want) -> bool:
        return (self.status, self.reason, self.message) == (want.status, want.reason, want.message)


@dataclass
class NodeState:
    """What this node's API object has of ours, and what the last cycle wanted (for Events)."""

    conditions: dict[str, Seen] = field(default_factory=dict)
    taints: set[str] = field(default_factory=set)
    last: dict[str, str] = field(default_factory=dict)  # condition type -> status wanted

    def to_dict(self, node: str) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "node": node,
            "conditions": {t: vars(s) for t, s in sorted(self.conditions.items())},
            "taints": sorted(self.taints),
            "last": dict(sorted(self.last.items())),
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], node: str) -> NodeState | None:
        """None: another node's, another version's, or not this shape (then the Node is read)."""
        if doc.get("version") != STATE_VERSION or doc.get("node") != node:
            return None
        try:
            return cls(
                {t: Seen(**s) for t, s in (doc.get("conditions") or {}).items()},
                set(doc.get("taints") or ()),
                {str(t): str(s) for t, s in (doc.get("last") or {}).items()},
            )
        except TypeError:
            return None


def _time(value: Any) -> float:
    try:
        return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def parse_node(obj: Mapping[str, Any]) -> NodeState:
    """Our conditions and taints of a Node object (pure); `last` from the conditions' statuses."""
    state = NodeState()
    for c in (obj.get("status") or {}).get("conditions") or ():
        if isinstance(c, Mapping) and str(c.get("type", "")).startswith(CONDITION_PREFIX):
            state.conditions[str(c["type"])] = Seen(
                str(c.get("status")),
                str(c.get("reason") or ""),
                str(c.get("message") or ""),
                _time(c.get("lastTransitionTime")),
                _time(c.get("lastHeartbeatTime")),
            )
    for t in (obj.get("spec") or {}).get("taints") or ():
        if isinstance(t, Mapping) and str(t.get("key", "")).startswith(TAINT_PREFIX):
            state.taints.add(str(t["key"]))
    state.last = {t: s.status for t, s in state.conditions.items()}
    return state


def _firing(pr: PolicyReport) -> list[str]:
    return sorted(c.subject_name or c.subject for c in pr.conditions.values() if c.phase is Phase.FIRING)


def want_of(pr: PolicyReport) -> Want:
    """The condition a policy's report asks for (pure)."""
    p = pr.policy
    ctype = condition_type(p.name)
    firing = _firing(pr)
    if not firing:
        return Want(ctype, "False", CLEAR_REASON, f"{p.name}: {p.probe} {p.metric} is not over its trigger")
    # The trigger as written (a percentage of the live limit stays one), not the resolved
    # number: the message must not change, and cost a write, when the limit moves.
    trigger = str(p.trigger) if p.trigger.percent else format_number(p.trigger.value)
    names = ", ".join(firing[:MESSAGE_SUBJECTS])
    more = f" and {len(firing) - MESSAGE_SUBJECTS} more" if len(firing) > MESSAGE_SUBJECTS else ""
    return Want(
        ctype,
        "True",
        FIRING_REASON,
        f"{p.name}: {p.probe} {p.metric} over {trigger} on {names}{more}",
    )


def changes(wants: Iterable[Want], seen: Mapping[str, Seen], now: float, heartbeat: float) -> list[Want]:
    """The conditions to write this cycle (pure): new or changed ones, a True one whose
    heartbeat is due; never a False one that the Node does not have."""
    out = []
    for w in wants:
        have = seen.get(w.type)
        if have is None:
            if w.status == "True":
                out.append(w)
        elif not have.same(w) or (w.status == "True" and now - have.heartbeat >= heartbeat):
            out.append(w)
    return out


def condition_patch(writes: Iterable[Want], seen: Mapping[str, Seen], now: float) -> dict[str, Any]:
    """The strategic-merge patch of status.conditions (pure): merged by `type`, so the other
    conditions stay; lastTransitionTime moves only when the status does."""
    conditions = []
    for w in writes:
        have = seen.get(w.type)
        transition = have.transition if have is not None and have.status == w.status else now
        conditions.append(
            {
                "type": w.type,
                "status": w.status,
                "reason": w.reason,
                "message": w.message,
                "lastHeartbeatTime": rfc3339(now),
                "lastTransitionTime": rfc3339(transition),
            }
        )
    return {"status": {"conditions": conditions}}


def taint_patch(obj: Mapping[str, Any], add: set[str], remove: set[str]) -> dict[str, Any] | None:
    """A JSON merge patch of spec.taints with the Node's resourceVersion as its precondition,
    or None when the taints are already so (pure). Others' taints are kept as they are."""
    taints = [t for t in (obj.get("spec") or {}).get("taints") or () if isinstance(t, Mapping)]
    keys = {str(t.get("key")) for t in taints}
    new = [dict(t) for t in taints if str(t.get("key")) not in remove]
    new += [{"key": k, "value": "true", "effect": "NoSchedule"} for k in sorted(add - keys)]
    if len(new) == len(taints) and not (add - keys):
        return None
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    return {"metadata": {"resourceVersion": rv}, "spec": {"taints": new}}


def _pod_of(report: CycleReport, pr: PolicyReport, container_id: str) -> Involved | None:
    """The pod of a container the cycle's readings attributed (the policy's probe first)."""
    first = report.readings.get(pr.policy.probe)
    readings = [first] if first is not None else []
    readings += [r for r in report.readings.values() if r is not first]
    for reading in readings:
        for sample in reading.containers:
            pod = sample.container.pod
            if sample.container.id == container_id and pod is not None:
                return Involved("Pod", pod.name, pod.uid, pod.namespace)
    return None


def notes_of(report: CycleReport, pr: PolicyReport, was: str | None, want: Want, node: str) -> list[Note]:
    """The Events one policy's cycle asks for (pure): fired, each action applied or failed (on
    the Node, and on the target's pod), cleared."""
    p = pr.policy
    node_ref = Involved.node(node)
    notes = []
    if want.status == "True" and was != "True":
        notes.append(Note(node_ref, WARNING, "PolicyFiring", want.message))
        for c in pr.conditions.values():
            if c.phase is Phase.FIRING and (owner := _pod_of(report, pr, c.subject)) is not None:
                notes.append(Note(owner, WARNING, "PolicyFiring", want.message))
    for ar in pr.actions:
        if ar.result.outcome not in (Outcome.APPLIED, Outcome.FAILED) or ar.plan is None:
            continue
        applied = ar.result.outcome is Outcome.APPLIED
        message = f"{p.name}: {ar.decision.action} {ar.result.outcome.value}: {ar.result.message}"
        kind, reason = (NORMAL, "ActionApplied") if applied else (WARNING, "ActionFailed")
        notes.append(Note(node_ref, kind, reason, message))
        target = ar.plan.target
        detail = target.detail
        pod: Involved | None = None
        if {"pod", "namespace", "uid"} <= set(detail):
            pod = Involved("Pod", str(detail["pod"]), str(detail["uid"]), str(detail["namespace"]))
        elif target.kind in (TargetKind.CONTAINER, TargetKind.CGROUP):
            # reclaim-cgroup's target is a container's cgroup, named by the container's id.
            pod = _pod_of(report, pr, target.id)
        if pod is not None:
            notes.append(Note(pod, kind, reason, message))
    if want.status == "False" and was == "True":
        notes.append(Note(node_ref, NORMAL, "PolicyResolved", want.message))
    return notes


__all__ = [
    "CLEAR_REASON",
    "FIRING_REASON",
    "NodeState",
    "Seen",
    "Want",
    "changes",
    "condition_patch",
    "condition_type",
    "notes_of",
    "parse_node",
    "taint_key",
    "taint_patch",
    "want_of",
]
