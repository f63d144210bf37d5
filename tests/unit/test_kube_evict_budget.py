"""API actions count like any other: an eviction through the API server is held back by the
policy's budget and by the circuit breaker, in the engine, with the real evict-pod action and a
fake API server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remediator.actions.evict_pod import EvictPodParams
from remediator.clock import FakeClock
from remediator.engine import Engine
from remediator.model import ContainerSample, Outcome, Reading
from remediator.policy.catalog import MetricSpec
from remediator.policy.rules import Controller, PolicySet, Step
from remediator.probes.base import PROBES, Probe, ProbeContext
from remediator.state import StateStore
from tests.helpers import make_host, make_policy
from tests.unit.test_action_evict_pod import PATH, FakeKube, cri, pod_obj


class PodsProbe(Probe):
    """One CRI container of a ReplicaSet's pod, over the line."""

    name = "fakepods"
    help = "test probe"
    metrics = (MetricSpec("m", "test metric", per_container=True),)

    def read(self, ctx: ProbeContext) -> Reading:
        return Reading(
            "fakepods", ctx.clock.now(), {"m": 200.0}, containers=(ContainerSample(cri(), {"m": 200.0}),)
        )


@pytest.fixture(autouse=True)
def probe() -> Iterator[None]:
    PROBES["fakepods"] = PodsProbe
    yield
    del PROBES["fakepods"]


def evicting(**kw: Any) -> PolicySet:
    controller = kw.pop("controller", Controller())
    step = Step("evict-pod", None, 10.0, EvictPodParams(), disruptive=True, allow_disruptive=True)
    policy = make_policy(probe="fakepods", hold=0.0, cooldown=0.0, steps=(step,), **kw)
    return PolicySet("/policies", (policy,), controller)


def kube() -> FakeKube:
    return FakeKube({("GET", PATH): [pod_obj()], ("POST", PATH + "/eviction"): [{"kind": "Status"}]})


def run(ps: PolicySet, tmp_path: Path, cycles: int) -> tuple[list[list[Any]], FakeKube]:
    api, clock = kube(), FakeClock()
    e = Engine(
        ps,
        host=make_host(tmp_path / "host", {}),
        clock=clock,
        store=StateStore(tmp_path / "state.db"),
        kube_factory=lambda: api,
    )
    out = []
    for _ in range(cycles):
        out.append(e.cycle().policies[0].actions)
        clock.advance(10.0)
    return out, api


def evictions(api: FakeKube) -> int:
    return sum(1 for m, p, _ in api.calls if m == "POST" and p.endswith("/eviction"))


def test_the_budget_counts_evictions(tmp_path: Path) -> None:
    cycles, api = run(evicting(budget_max=2, budget_window=3600.0), tmp_path, 5)
    applied = [a.result.outcome for acts in cycles for a in acts if a.result.outcome is Outcome.APPLIED]
    assert len(applied) == 2
    assert evictions(api) == 2


def test_the_breaker_counts_evictions(tmp_path: Path) -> None:
    ps = evicting(budget_max=100, controller=Controller(breaker_max=1, breaker_window=3600.0))
    cycles, api = run(ps, tmp_path, 3)
    first, second = cycles[0][0], cycles[1][0]
    assert first.result.outcome is Outcome.APPLIED
    assert (second.result.outcome, second.mode_reason) == (Outcome.WOULD_APPLY, "circuit breaker open")
    assert evictions(api) == 1
