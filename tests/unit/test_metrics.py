"""Prometheus series: what a cycle sets, and that gone containers do not leave series behind."""

from __future__ import annotations

from prometheus_client import REGISTRY

from remediator import metrics
from remediator.engine import CycleReport, PolicyReport
from remediator.model import Condition, Phase, Reading, Scope
from tests.helpers import make_policy

POLICY = make_policy(name="metrics-test", scope=Scope.CONTAINER)


def report(**phases: Phase) -> CycleReport:
    conditions = {s: Condition(POLICY.name, s, phase=p) for s, p in phases.items()}
    reading = Reading("probe", 0.0, {"m": 5.0}, {"m": 10.0})
    return CycleReport(0.0, "live", False, {"probe": reading}, [PolicyReport(POLICY, conditions=conditions)])


def phase(subject: str, name: str) -> float | None:
    labels = {"policy": POLICY.name, "subject": subject, "phase": name}
    return REGISTRY.get_sample_value("remediator_condition_phase", labels)


def test_cycle_sets_readings_limits_and_one_phase_per_condition() -> None:
    metrics.observe_cycle(report(a=Phase.FIRING, b=Phase.PENDING))
    assert REGISTRY.get_sample_value("remediator_reading", {"probe": "probe", "metric": "m"}) == 5.0
    assert REGISTRY.get_sample_value("remediator_limit", {"probe": "probe", "metric": "m"}) == 10.0
    assert [phase("a", p.value) for p in Phase] == [0.0, 0.0, 1.0, 0.0]
    assert phase("b", "pending") == 1.0


def test_series_of_a_gone_container_are_removed() -> None:
    metrics.observe_cycle(report(a=Phase.FIRING, b=Phase.PENDING))
    metrics.observe_cycle(report(a=Phase.RESOLVED))
    assert phase("a", "resolved") == 1.0
    assert all(phase("b", p.value) is None for p in Phase)
