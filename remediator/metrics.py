"""Prometheus metrics of the daemon (`remediator run --metrics-address 127.0.0.1:9464`).

Names and labels are part of the operations contract (docs/operations.md). Subject labels are
container ids or "host", so cardinality is bounded by the containers on one host.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from remediator.engine import CycleReport
from remediator.model import Phase

READING = Gauge("remediator_reading", "Last value a probe read", ["probe", "metric"])
LIMIT = Gauge("remediator_limit", "Live kernel limit belonging to a metric", ["probe", "metric"])
PROBE_ERRORS = Counter("remediator_probe_errors_total", "Probe reads that failed", ["probe"])
CONDITION = Gauge(
    "remediator_condition_phase", "1 for the phase each condition is in", ["policy", "subject", "phase"]
)
ACTIONS = Counter("remediator_actions_total", "Actions by outcome", ["policy", "action", "outcome"])
BREAKER = Gauge("remediator_breaker_open", "1 while the circuit breaker is open")
_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
CYCLE = Histogram(
    "remediator_cycle_seconds",
    "Wall time of one policy's cycle: its probe's read (shared with the other policies of the "
    "cycle that use it), decisions, actions and verification",
    ["policy"],
    buckets=_BUCKETS,
)
PROBE_SECONDS = Histogram(
    "remediator_probe_seconds", "Wall time of one probe read (once per cycle)", ["probe"], buckets=_BUCKETS
)
POLICIES = Gauge("remediator_policies_loaded", "Policies in the running set")
RELOAD_FAILURES = Counter(
    "remediator_policy_reload_failures_total", "Reloads rejected because the new policy set was invalid"
)


# The subjects each policy's condition series were last set for (one daemon, one registry).
_SUBJECTS: dict[str, set[str]] = {}


def serve(host: str, port: int) -> None:
    start_http_server(port, addr=host)


def observe_cycle(report: CycleReport) -> None:
    for name, seconds in report.probe_seconds.items():
        PROBE_SECONDS.labels(name).observe(seconds)
    for pr in report.policies:
        CYCLE.labels(pr.policy.name).observe(pr.seconds + report.probe_seconds.get(pr.policy.probe, 0.0))
    for name, r in report.readings.items():
        if r.error:
            PROBE_ERRORS.labels(name).inc()
            continue
        for metric, value in r.values.items():
            READING.labels(name, metric).set(value)
        for metric, value in r.limits.items():
            LIMIT.labels(name, metric).set(value)
    for pr in report.policies:
        subjects = set(pr.conditions)
        # Containers come and go: drop the series of subjects this policy no longer tracks, or
        # a host with container churn grows four series per container forever.
        for gone in _SUBJECTS.get(pr.policy.name, set()) - subjects:
            for phase in Phase:
                CONDITION.remove(pr.policy.name, gone, phase.value)
        _SUBJECTS[pr.policy.name] = subjects
        for subject, cond in pr.conditions.items():
            for phase in Phase:
                CONDITION.labels(pr.policy.name, subject, phase.value).set(
                    1.0 if cond.phase is phase else 0.0
                )
        for a in pr.actions:
            ACTIONS.labels(pr.policy.name, a.decision.action or "", a.result.outcome.value).inc()
    BREAKER.set(1.0 if report.breaker.open else 0.0)
