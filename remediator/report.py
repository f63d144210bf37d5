"""`remediator report`: what happened, per policy, over a window of the audit trail.

Built from the events of the audit file (docs/operations.md lists them) and the state store:
- episodes: a condition leaving `ok` (pending or firing) until it is `resolved` or back to `ok`;
  the time from trigger to relief is that span;
- the actions taken in each (by action and outcome), escalations (ladder steps after the first),
  exhausted ladders, failures with their messages;
- verification: the verdicts of steps judged after their settle time;
- the breaker: trips and resets in the window, and whether it is open now (state);
- the conditions not `ok` now (state).

Pure apart from `read_trail`: `summarize` takes the events and the state it needs, so it is
golden-tested on a recorded trail.
"""

from __future__ import annotations

import datetime
import json
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remediator.errors import UserError
from remediator.model import Condition, Phase
from remediator.quantity import format_duration, format_number
from remediator.render import iso, table
from remediator.state import BreakerState

FORMAT = "remediator.report/v1"
_ACTION_EVENTS = {
    "action_applied": "applied",
    "action_would_apply": "would_apply",
    "action_skipped": "skipped",
    "action_failed": "failed",
}
_ACTIVE = {Phase.PENDING.value, Phase.FIRING.value}
_RELIEVED = {Phase.RESOLVED.value, Phase.OK.value}


@dataclass
class Trail:
    events: list[dict[str, Any]]
    unreadable: int  # lines that were not JSON objects with a timestamp (a torn write, an edit)


def _timestamp(event: dict[str, Any]) -> float | None:
    ts = event.get("timestamp")
    if not isinstance(ts, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(ts)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def parse_trail(lines: Iterable[str]) -> Trail:
    events: list[dict[str, Any]] = []
    unreadable = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            unreadable += 1
            continue
        at = _timestamp(event) if isinstance(event, dict) else None
        if at is None:
            unreadable += 1
            continue
        event["_at"] = at
        events.append(event)
    events.sort(key=lambda e: e["_at"])  # concurrent writers (timer and daemon) interleave
    return Trail(events, unreadable)


def read_trail(path: Path) -> Trail:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_trail(f)
    except FileNotFoundError:
        return Trail([], 0)
    except OSError as e:
        raise UserError(f"{path}: cannot read the audit trail: {e.strerror or e}") from None


@dataclass
class Episode:
    subject: str
    started: float
    value: float | None
    firing_at: float | None = None
    relieved_at: float | None = None
    peak: float | None = None
    actions: list[str] = field(default_factory=list)
    exhausted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "started": iso(self.started),
            "firing": iso(self.firing_at),
            "relieved": iso(self.relieved_at),
            "relief_seconds": None if self.relieved_at is None else round(self.relieved_at - self.started, 3),
            "peak": self.peak,
            "actions": self.actions,
            "exhausted": self.exhausted,
        }


@dataclass
class PolicySummary:
    name: str
    episodes: list[Episode] = field(default_factory=list)
    actions: Counter[tuple[str, str]] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)
    escalations: int = 0  # attempts at a ladder step after the first (skipped ones aside)
    failures: list[dict[str, Any]] = field(default_factory=list)
    now: list[Condition] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        relief = [e.relieved_at - e.started for e in self.episodes if e.relieved_at is not None]
        return {
            "name": self.name,
            "conditions": {
                "episodes": len(self.episodes),
                "relieved": len(relief),
                "open": sum(1 for e in self.episodes if e.relieved_at is None),
                "exhausted": sum(1 for e in self.episodes if e.exhausted),
            },
            "relief_seconds": {
                "median": round(statistics.median(relief), 3) if relief else None,
                "max": round(max(relief), 3) if relief else None,
            },
            "actions": [
                {"action": a, "outcome": o, "count": n} for (a, o), n in sorted(self.actions.items())
            ],
            "escalations": self.escalations,
            "verdicts": dict(sorted(self.verdicts.items())),
            "failures": self.failures,
            "episodes": [e.to_dict() for e in self.episodes],
            "now": [
                {"subject": c.subject, "phase": c.phase.value, "since": iso(c.since), "value": c.value}
                for c in self.now
            ],
        }


def summarize(
    trail: Trail,
    *,
    since: float,
    until: float,
    namespace: str,
    conditions: Iterable[Condition] = (),
    breaker: BreakerState | None = None,
) -> dict[str, Any]:
    """The report document (`remediator.report/v1`) for events in [since, until]."""
    policies: dict[str, PolicySummary] = {}
    open_eps: dict[tuple[str, str], Episode] = {}
    trips: list[dict[str, Any]] = []
    resets: list[dict[str, Any]] = []

    def summary(name: str) -> PolicySummary:
        if name not in policies:
            policies[name] = PolicySummary(name)
        return policies[name]

    for e in _events(trail, namespace, until):
        at, kind, policy = e["_at"], e.get("event"), e.get("policy")
        inside = at >= since
        if kind == "breaker_tripped" and inside:
            trips.append({"at": iso(at), "policy": policy, "reason": e.get("reason")})
        elif kind == "breaker_reset" and inside:
            resets.append({"at": iso(at), "by": e.get("by"), "was_open": e.get("was_open")})
        if not isinstance(policy, str):
            continue
        key = (policy, str(e.get("subject", "host")))
        ep = open_eps.get(key)
        if kind == "condition_changed":
            to = e.get("to")
            if to in _ACTIVE and ep is None:
                ep = open_eps[key] = Episode(key[1], at, _num(e.get("value")))
                ep.peak = ep.value
            if ep is not None and to == Phase.FIRING.value and ep.firing_at is None:
                ep.firing_at = at
            if ep is not None and to in _RELIEVED:
                ep.relieved_at = at
                del open_eps[key]
                if at >= since:
                    summary(policy).episodes.append(ep)
        elif kind == "policy_evaluated" and ep is not None:
            v = _num(e.get("value"))
            if v is not None and (ep.peak is None or v > ep.peak):
                ep.peak = v
            if e.get("decision") == "exhausted":
                ep.exhausted = True
        elif kind in _ACTION_EVENTS and inside:
            s = summary(policy)
            outcome = _ACTION_EVENTS[kind]
            action = str(e.get("action"))
            s.actions[(action, outcome)] += 1
            if isinstance(e.get("step"), int) and e["step"] > 0 and outcome != "skipped":
                s.escalations += 1
            if ep is not None:
                ep.actions.append(f"{action}:{outcome}")
            if outcome == "failed":
                s.failures.append(
                    {"at": iso(at), "subject": key[1], "action": action, "message": e.get("message")}
                )
        elif kind == "step_verified" and inside:
            summary(policy).verdicts[str(e.get("verdict"))] += 1
    for (policy, _), ep in open_eps.items():
        summary(policy).episodes.append(ep)  # still open at the end of the window
    for c in conditions:
        if c.phase is not Phase.OK:
            summary(c.policy).now.append(c)
    for s in policies.values():
        s.episodes.sort(key=lambda ep: (ep.started, ep.subject))
        s.now.sort(key=lambda c: c.subject)
    b = breaker or BreakerState()
    return {
        "format": FORMAT,
        "since": iso(since),
        "until": iso(until),
        "namespace": namespace,
        "trail": {"events": len(trail.events), "unreadable_lines": trail.unreadable},
        "breaker": {
            "open": b.open,
            "opened_at": iso(b.opened_at),
            "reason": b.reason,
            "tripped": trips,
            "reset": resets,
        },
        "policies": [policies[n].to_dict() for n in sorted(policies)],
    }


def _events(trail: Trail, namespace: str, until: float) -> Iterator[dict[str, Any]]:
    for e in trail.events:
        if e["_at"] > until:
            break
        ns = e.get("namespace")
        # `breaker_reset` comes from the CLI, outside any cycle, without a namespace.
        if ns == namespace or (ns is None and e.get("event") == "breaker_reset"):
            yield e


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _dur(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def text(doc: dict[str, Any]) -> str:
    """The report for a terminal."""
    out = [
        f"remediator report, {doc['namespace']} state, {doc['since']} .. {doc['until']}",
        f"audit trail: {doc['trail']['events']} events"
        + (
            f", {doc['trail']['unreadable_lines']} unreadable lines"
            if doc["trail"]["unreadable_lines"]
            else ""
        ),
    ]
    b = doc["breaker"]
    state = f"OPEN since {b['opened_at']}: {b['reason']}" if b["open"] else "closed"
    out.append(f"breaker: {state}; tripped {len(b['tripped'])}x, reset {len(b['reset'])}x in the window")
    for t in b["tripped"]:
        out.append(f"  tripped {t['at']} ({t['policy']}): {t['reason']}")
    if not doc["policies"]:
        out.append("")
        out.append("nothing happened in this window.")
    for p in doc["policies"]:
        c, r = p["conditions"], p["relief_seconds"]
        out.append("")
        out.append(f"== {p['name']}")
        out.append(
            f"conditions: {c['episodes']} episodes, {c['relieved']} relieved, {c['open']} open"
            + (f", {c['exhausted']} exhausted the ladder" if c["exhausted"] else "")
            + (
                f"; trigger to relief: median {_dur(r['median'])}, max {_dur(r['max'])}"
                if c["relieved"]
                else ""
            )
        )
        acts = ", ".join(f"{a['action']} {a['outcome']} x{a['count']}" for a in p["actions"]) or "none"
        out.append(f"actions: {acts}" + (f"; {p['escalations']} escalations" if p["escalations"] else ""))
        verdicts = ", ".join(f"{k} x{n}" for k, n in p["verdicts"].items()) or "none"
        out.append(f"verification: {verdicts}")
        for f in p["failures"]:
            out.append(f"  FAILED {f['at']} {f['subject'][:12]} {f['action']}: {f['message']}")
        if p["episodes"]:
            rows = [
                (
                    ep["subject"][:12],
                    ep["started"],
                    _dur(ep["relief_seconds"]) if ep["relieved"] else "open",
                    format_number(ep["peak"]),
                    " ".join(ep["actions"]) or "-",
                )
                for ep in p["episodes"]
            ]
            out.append(_indent(table(("subject", "started", "relief", "peak", "actions"), rows)))
        for n in p["now"]:
            out.append(
                f"  now: {n['subject'][:12]} {n['phase']} since {n['since']} ({format_number(n['value'])})"
            )
    return "\n".join(out)


def _indent(s: str) -> str:
    return "\n".join("  " + line for line in s.splitlines())
