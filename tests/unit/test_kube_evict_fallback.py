"""evict-pod's delete fallback: only where the policy allows, only when the Eviction API is not
served (or, with a separate opt-in, against a PodDisruptionBudget), always with the uid."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from pydantic import ValidationError

from remediator.actions.evict_pod import EvictPod, EvictPodParams
from remediator.errors import PermanentError, TemporaryError
from remediator.model import Outcome, Plan
from tests.unit.test_action_evict_pod import PATH, UID, FakeKube, apply_ctx, cri, plan_ctx, pod_obj

NOT_FOUND = PermanentError("kubernetes: POST ...: HTTP 404: the server could not find the requested resource")
NOT_ALLOWED = PermanentError("kubernetes: POST ...: HTTP 405: method not allowed")
PDB = TemporaryError(
    "kubernetes: POST ...: HTTP 429: Cannot evict pod as it would violate the pod's disruption budget."
)
DELETE_BODY = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": UID}}


def plan_with(**params: Any) -> Plan:
    ctx = replace(
        plan_ctx(cri()),
        params=EvictPodParams.model_validate({"target": "top", "rankBy": "slab_reclaimable_bytes", **params}),
    )
    plan = EvictPod().plan(ctx)
    assert isinstance(plan, Plan)
    return plan


def methods(kube: FakeKube) -> list[str]:
    return [c[0] for c in kube.calls]


@pytest.mark.parametrize("answer", [NOT_FOUND, NOT_ALLOWED])
def test_not_served_eviction_deletes_with_the_uid_precondition(answer: Exception) -> None:
    kube = FakeKube(
        {
            ("GET", PATH): [pod_obj(), pod_obj(), pod_obj(deletionTimestamp="2026-12-02T01:00:00Z")],
            ("POST", PATH + "/eviction"): [answer],
            ("DELETE", PATH): [{"kind": "Pod"}],
        }
    )
    plan = plan_with(deleteFallback=True)
    assert "else delete it if the Eviction API is not served" in plan.summary
    result = EvictPod().execute(plan, apply_ctx(kube))
    assert result.outcome is Outcome.APPLIED and result.verified is True, result
    assert "the Eviction API is not served" in result.message
    assert result.before == {"uid": UID, "fallback": "delete"}
    # re-check, eviction, read again (is the pod still there?), delete, verify
    assert methods(kube) == ["GET", "POST", "GET", "DELETE", "GET"]
    assert kube.calls[3][2] == DELETE_BODY


def test_without_the_opt_in_a_not_served_eviction_fails_and_nothing_is_deleted() -> None:
    kube = FakeKube({("GET", PATH): [pod_obj()], ("POST", PATH + "/eviction"): [NOT_FOUND]})
    result = EvictPod().execute(plan_with(), apply_ctx(kube))
    assert result.outcome is Outcome.FAILED and "HTTP 404" in result.message
    assert "DELETE" not in methods(kube)


def test_a_404_because_the_pod_went_away_deletes_nothing() -> None:
    gone = PermanentError("kubernetes: GET ...: HTTP 404: pods not found")
    kube = FakeKube({("GET", PATH): [pod_obj(), gone], ("POST", PATH + "/eviction"): [NOT_FOUND]})
    result = EvictPod().execute(plan_with(deleteFallback=True), apply_ctx(kube))
    assert result.outcome is Outcome.FAILED
    assert "DELETE" not in methods(kube)


def test_a_replacement_of_the_same_name_is_not_deleted() -> None:
    other = pod_obj(uid="99999999-0000-4000-8000-000000000000")
    kube = FakeKube({("GET", PATH): [pod_obj(), other], ("POST", PATH + "/eviction"): [NOT_FOUND]})
    result = EvictPod().execute(plan_with(deleteFallback=True), apply_ctx(kube))
    assert result.outcome is Outcome.FAILED
    assert "DELETE" not in methods(kube)


def test_a_disruption_budget_refusal_is_not_overridden_by_the_fallback_alone() -> None:
    kube = FakeKube({("GET", PATH): [pod_obj()], ("POST", PATH + "/eviction"): [PDB]})
    result = EvictPod().execute(plan_with(deleteFallback=True), apply_ctx(kube))
    assert result.outcome is Outcome.SKIPPED and "PodDisruptionBudget" in result.message
    assert methods(kube) == ["GET", "POST"]


def test_the_separate_opt_in_deletes_against_a_disruption_budget() -> None:
    kube = FakeKube(
        {
            ("GET", PATH): [pod_obj(), PermanentError("kubernetes: GET ...: HTTP 404: pods not found")],
            ("POST", PATH + "/eviction"): [PDB],
            ("DELETE", PATH): [{"kind": "Pod"}],
        }
    )
    plan = plan_with(deleteFallback=True, deleteDespiteDisruptionBudget=True)
    assert "even against a PodDisruptionBudget" in plan.summary
    result = EvictPod().execute(plan, apply_ctx(kube))
    assert result.outcome is Outcome.APPLIED and "PodDisruptionBudget refused" in result.message
    assert methods(kube) == ["GET", "POST", "DELETE", "GET"]
    assert kube.calls[2][2] == DELETE_BODY


def test_a_failed_delete_is_failed() -> None:
    kube = FakeKube(
        {
            ("GET", PATH): [pod_obj()],
            ("POST", PATH + "/eviction"): [NOT_ALLOWED],
            ("DELETE", PATH): [PermanentError("kubernetes: DELETE ...: HTTP 409: Precondition failed: UID")],
        }
    )
    result = EvictPod().execute(plan_with(deleteFallback=True), apply_ctx(kube))
    assert result.outcome is Outcome.FAILED and "delete failed" in result.message and "409" in result.message


def test_the_budget_override_needs_the_fallback() -> None:
    with pytest.raises(ValidationError, match="needs deleteFallback"):
        EvictPodParams.model_validate({"deleteDespiteDisruptionBudget": True})


def test_audit_sends_no_eviction_and_no_delete() -> None:
    kube = FakeKube({("GET", PATH): [pod_obj()]})
    result = EvictPod().execute(plan_with(deleteFallback=True), apply_ctx(kube, dry_run=True))
    assert result.outcome is Outcome.WOULD_APPLY
    assert methods(kube) == ["GET"]
