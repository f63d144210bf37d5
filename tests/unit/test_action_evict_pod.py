"""evict-pod: who may be evicted (pure), re-check, the Eviction call and its read-back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from remediator.actions.base import ApplyContext, PlanContext
from remediator.actions.evict_pod import EvictPod, EvictPodParams, refusal
from remediator.clock import FakeClock
from remediator.errors import PermanentError, TemporaryError
from remediator.host import HostRoot
from remediator.model import ContainerRef, ContainerSample, Outcome, Plan, PodRef, Reading

CID = "c" * 64
UID = "3f1e2d4c-5b6a-4789-8abc-def012345678"
METRIC = "slab_reclaimable_bytes"
POD = PodRef(
    name="trasher-6d8f7c9b4-x2x7q",
    namespace="shop",
    uid=UID,
    container="trasher",
    owner_kind="ReplicaSet",
    owner_name="trasher-6d8f7c9b4",
    qos_class="BestEffort",
    source="api",
)


def cri(pod: PodRef | None = POD, cid: str = CID) -> ContainerRef:
    name = f"{pod.namespace}/{pod.name}/{pod.container}" if pod else "web"
    return ContainerRef(
        id=cid, name=name, runtime="cri" if pod else "docker", pid=10, cgroup="/kubepods/x", pod=pod
    )


def plan_ctx(container: ContainerRef) -> PlanContext:
    reading = Reading("dentries", 1000.0, containers=(ContainerSample(container, {METRIC: 5e8}),))
    return PlanContext(
        policy="negative-dentries",
        metric=METRIC,
        subject="host",
        reading=reading,
        params=EvictPodParams.model_validate({"target": "top", "rankBy": METRIC}),
        eligible=lambda c: True,
        now=1000.0,
    )


@pytest.mark.parametrize(
    ("pod", "reason"),
    [
        (None, "runs on docker; evict-pod needs a Kubernetes pod"),
        (replace(POD, source="labels", owner_kind=None, owner_name=None), "described by labels"),
        (replace(POD, owner_kind=None, owner_name=None), "is a bare pod: no controller would replace it"),
        (replace(POD, owner_kind="Node", owner_name="node-1"), "is a static pod"),
        (
            replace(POD, owner_kind="DaemonSet", owner_name="agent"),
            "DaemonSet agent: its replacement would run on this node",
        ),
        (replace(POD, owner_kind="Workflow", owner_name="w"), "owned by a Workflow"),
    ],
)
def test_refused_pods_are_never_planned(pod: PodRef | None, reason: str) -> None:
    container = cri(pod)
    why = refusal(container)
    assert why is not None and reason in why
    assert EvictPod().plan(plan_ctx(container)) == why


@pytest.mark.parametrize("owner", ["ReplicaSet", "StatefulSet", "ReplicationController", "Job"])
def test_controller_owned_pods_are_planned(owner: str) -> None:
    plan = EvictPod().plan(plan_ctx(cri(replace(POD, owner_kind=owner))))
    assert isinstance(plan, Plan)
    assert plan.target.detail == {"namespace": "shop", "pod": POD.name, "uid": UID}
    assert plan.expect["uid"] == UID and plan.expect["owner_kind"] == owner
    assert "evict pod shop/trasher-6d8f7c9b4-x2x7q" in plan.summary


def pod_obj(uid: str = UID, **meta: Any) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {
            "name": POD.name,
            "namespace": "shop",
            "uid": uid,
            "ownerReferences": [{"kind": "ReplicaSet", "name": "trasher-6d8f7c9b4", "controller": True}],
            **meta,
        },
    }


class FakeKube:
    def __init__(self, answers: dict[tuple[str, str], list[Any]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str, Any]] = []

    def request(
        self, method: str, path: str, params: Any = None, body: Any = None, **kw: Any
    ) -> dict[str, Any]:
        self.calls.append((method, path, body))
        queue = self.answers[(method, path)]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]


PATH = f"/api/v1/namespaces/shop/pods/{POD.name}"


def apply_ctx(kube: FakeKube | None, dry_run: bool = False) -> ApplyContext:
    return ApplyContext(
        HostRoot(Path("/nonexistent")),
        FakeClock(),
        dry_run=dry_run,
        kube_factory=(lambda: kube) if kube else None,
    )


def the_plan() -> Plan:
    plan = EvictPod().plan(plan_ctx(cri()))
    assert isinstance(plan, Plan)
    return plan


def test_evicts_with_a_uid_precondition_and_verifies_the_pod_terminating() -> None:
    kube = FakeKube(
        {
            ("GET", PATH): [pod_obj(), pod_obj(deletionTimestamp="2026-12-02T01:00:00Z")],
            ("POST", PATH + "/eviction"): [{"kind": "Status", "status": "Success"}],
        }
    )
    result = EvictPod().execute(the_plan(), apply_ctx(kube))
    assert result.outcome is Outcome.APPLIED and result.verified is True, result
    (_, _, body) = kube.calls[1]
    assert body == {
        "apiVersion": "policy/v1beta1",
        "kind": "Eviction",
        "metadata": {"name": POD.name, "namespace": "shop"},
        "deleteOptions": {"preconditions": {"uid": UID}},
    }
    assert [c[0] for c in kube.calls] == ["GET", "POST", "GET"]


def test_gone_after_the_eviction_is_verified_too() -> None:
    kube = FakeKube(
        {
            ("GET", PATH): [pod_obj(), PermanentError("kubernetes: GET ...: HTTP 404: pods not found")],
            ("POST", PATH + "/eviction"): [{}],
        }
    )
    result = EvictPod().execute(the_plan(), apply_ctx(kube))
    assert (result.outcome, result.verified, result.after.get("gone")) == (Outcome.APPLIED, True, True)


def test_audit_rechecks_but_sends_nothing() -> None:
    kube = FakeKube({("GET", PATH): [pod_obj()]})
    result = EvictPod().execute(the_plan(), apply_ctx(kube, dry_run=True))
    assert result.outcome is Outcome.WOULD_APPLY
    assert [c[0] for c in kube.calls] == ["GET"]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (pod_obj(uid="99999999-0000-4000-8000-000000000000"), "is now uid"),
        (pod_obj(deletionTimestamp="2026-12-02T01:00:00Z"), "already being deleted"),
        (pod_obj(annotations={"kubernetes.io/config.mirror": "x"}), "is a static pod"),
        (
            {**pod_obj(), "metadata": {**pod_obj()["metadata"], "ownerReferences": []}},
            "now owned by (None, None)",
        ),
        (TemporaryError("kubernetes: GET: Connection refused"), "cannot read the pod"),
    ],
)
def test_recheck_skips_a_pod_that_is_not_the_one_judged(answer: Any, reason: str) -> None:
    kube = FakeKube({("GET", PATH): [answer]})
    result = EvictPod().execute(the_plan(), apply_ctx(kube))
    assert result.outcome is Outcome.SKIPPED and reason in result.message, result
    assert all(c[0] == "GET" for c in kube.calls)


def test_no_cluster_configured_skips() -> None:
    result = EvictPod().execute(the_plan(), apply_ctx(None))
    assert result.outcome is Outcome.SKIPPED and "no Kubernetes API server" in result.message


def test_a_disruption_budget_refusal_is_skipped_not_failed() -> None:
    kube = FakeKube(
        {
            ("GET", PATH): [pod_obj()],
            ("POST", PATH + "/eviction"): [
                TemporaryError(
                    "kubernetes: POST ...: HTTP 429: "
                    "Cannot evict pod as it would violate the pod's disruption budget."
                )
            ],
        }
    )
    result = EvictPod().execute(the_plan(), apply_ctx(kube))
    assert result.outcome is Outcome.SKIPPED and "PodDisruptionBudget" in result.message
    assert [c[0] for c in kube.calls] == ["GET", "POST"]
