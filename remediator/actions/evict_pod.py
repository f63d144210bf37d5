"""evict-pod: ask the API server to evict a Kubernetes pod, so that its controller replaces it.

On a Kubernetes node a container must never be recreated behind the kubelet (the kubelet would
restart the old one or lose track of the new one). What recreate-container does for a Docker
container is, for a pod, an eviction through the API server: the Eviction subresource
(`policy/v1beta1` on Kubernetes 1.20, the version the tests run) deletes the pod only when its
PodDisruptionBudgets allow it, and the pod's controller then creates a replacement, with a new
mount namespace (which frees the overlay's negative dentries, like a recreate).

Refused at planning time, with the reason:

* containers that are not a pod's (Docker), or whose pod was described without the API server
  (`pod.source` labels/cgroup: its owner is unknown);
* bare pods (no controller: nothing would replace them), static (mirror) pods (the kubelet runs
  them from a file; the API server cannot evict them) and DaemonSet pods (the replacement would
  come back on this same node, leaking the same way);
* owners other than ReplicaSet, StatefulSet, ReplicationController and Job.

Re-check, right before acting: the pod read from the API server again has the planned uid, is
not being deleted, still has the same controller and no mirror annotation. The eviction is sent
with a uid precondition, so a pod of the same name created since cannot be evicted by mistake.
A PodDisruptionBudget refusal (HTTP 429) is reported as skipped, never retried within the cycle.
Verify: the pod is gone or has a deletionTimestamp.

Delete fallback (off by default). With `deleteFallback: true`, the pod is deleted (a plain
DELETE with the same uid precondition) only when the API server does not serve the Eviction
subresource: the eviction is answered 404 or 405 while a fresh read still finds the pod with the
planned uid (a 404 because the pod itself is gone is not a reason to delete anything). A
PodDisruptionBudget's refusal (429) is never overridden by it; only the separate
`deleteDespiteDisruptionBudget: true` (which needs `deleteFallback`) deletes then, for the
operator who decided that the leak is worse than the disruption.
"""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from remediator.actions.base import (
    Action,
    ApplyContext,
    ContainerTargetParams,
    PlanContext,
    register,
)
from remediator.errors import PermanentError, TemporaryError
from remediator.model import ActionResult, ContainerRef, Outcome, Plan, Target, TargetKind

EVICTABLE_OWNERS = frozenset({"ReplicaSet", "StatefulSet", "ReplicationController", "Job"})
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


class EvictPodParams(ContainerTargetParams):
    deleteFallback: bool = False
    """Delete the pod (uid precondition) when the API server does not serve the Eviction
    subresource (404/405 while the pod is still there). Off: such a pod is not touched."""
    deleteDespiteDisruptionBudget: bool = False
    """With `deleteFallback`: delete also when a PodDisruptionBudget refuses the eviction
    (HTTP 429). Off: the budget's refusal stands (skipped)."""

    @model_validator(mode="after")
    def _check_fallback(self) -> EvictPodParams:
        if self.deleteDespiteDisruptionBudget and not self.deleteFallback:
            raise ValueError("deleteDespiteDisruptionBudget needs deleteFallback: true")
        return self


def refusal(container: ContainerRef) -> str | None:
    """Why this container's pod must not be evicted, or None (pure)."""
    pod = container.pod
    if pod is None:
        return f"container {container.name} runs on {container.runtime}; evict-pod needs a Kubernetes pod"
    where = f"pod {pod.namespace}/{pod.name}"
    if pod.source != "api":
        return f"{where} was described by {pod.source} (API server unreachable): its owner is unknown"
    if pod.owner_kind is None:
        return f"{where} is a bare pod: no controller would replace it"
    if pod.owner_kind == "Node":
        return f"{where} is a static pod: the kubelet runs it from a file"
    if pod.owner_kind == "DaemonSet":
        return f"{where} belongs to DaemonSet {pod.owner_name}: its replacement would run on this node again"
    if pod.owner_kind not in EVICTABLE_OWNERS:
        return f"{where} is owned by a {pod.owner_kind}, not by a controller that replaces it"
    return None


def not_served(error: str) -> bool:
    """An eviction answer that says the Eviction subresource is not there (404, 405)."""
    return "HTTP 404" in error or "HTTP 405" in error


def _controller(obj: dict[str, Any]) -> tuple[str | None, str | None]:
    owners = [o for o in (obj.get("metadata") or {}).get("ownerReferences") or () if isinstance(o, dict)]
    chosen = next((o for o in owners if o.get("controller")), owners[0] if owners else None)
    return (chosen.get("kind"), chosen.get("name")) if chosen else (None, None)


@register
class EvictPod(Action):
    name = "evict-pod"
    help = "Evict a controller-owned Kubernetes pod through the API server (respects PodDisruptionBudgets)."
    Params = EvictPodParams
    disruptive = True

    def plan(self, ctx: PlanContext) -> Plan | str:
        p = ctx.params
        assert isinstance(p, EvictPodParams)
        chosen = p.choose(ctx)
        if isinstance(chosen, str):
            return chosen
        why = refusal(chosen)
        if why is not None:
            return why
        pod = chosen.pod
        assert pod is not None  # refusal() checked
        target = Target(
            TargetKind.CONTAINER,
            id=chosen.id,
            name=chosen.name,
            detail={"namespace": pod.namespace, "pod": pod.name, "uid": pod.uid},
        )
        fallback = ""
        if p.deleteFallback:
            fallback = (
                ", else delete it (even against a PodDisruptionBudget)"
                if p.deleteDespiteDisruptionBudget
                else ", else delete it if the Eviction API is not served"
            )
        return Plan(
            self.name,
            target,
            f"evict pod {pod.namespace}/{pod.name} ({pod.owner_kind} {pod.owner_name}) "
            f"through the API server{fallback}",
            params={
                "target": p.target,
                "deleteFallback": p.deleteFallback,
                "deleteDespiteDisruptionBudget": p.deleteDespiteDisruptionBudget,
            },
            expect={"uid": pod.uid, "owner_kind": pod.owner_kind, "owner_name": pod.owner_name},
        )

    def _path(self, plan: Plan) -> str:
        d = plan.target.detail
        return f"/api/v1/namespaces/{d['namespace']}/pods/{d['pod']}"

    def _read(self, plan: Plan, ctx: ApplyContext) -> dict[str, Any] | str:
        try:
            return ctx.kube().request("GET", self._path(plan))  # type: ignore[no-any-return]
        except (TemporaryError, PermanentError) as e:
            return f"cannot read the pod: {e}"

    def recheck(self, plan: Plan, ctx: ApplyContext) -> str | None:
        if ctx.kube_factory is None:
            return "no Kubernetes API server configured"
        obj = self._read(plan, ctx)
        if isinstance(obj, str):
            return obj
        meta = obj.get("metadata") or {}
        if meta.get("uid") != plan.expect["uid"]:
            return f"pod {plan.target.detail['pod']} is now uid {meta.get('uid')}, not {plan.expect['uid']}"
        if meta.get("deletionTimestamp"):
            return f"pod {plan.target.detail['pod']} is already being deleted"
        if MIRROR_ANNOTATION in (meta.get("annotations") or {}):
            return f"pod {plan.target.detail['pod']} is a static pod"
        owner = _controller(obj)
        if owner != (plan.expect["owner_kind"], plan.expect["owner_name"]):
            return f"pod {plan.target.detail['pod']} is now owned by {owner}, not as planned"
        return None

    def apply(self, plan: Plan, ctx: ApplyContext) -> ActionResult:
        d = plan.target.detail
        body = {
            "apiVersion": "policy/v1beta1",
            "kind": "Eviction",
            "metadata": {"name": d["pod"], "namespace": d["namespace"]},
            "deleteOptions": {"preconditions": {"uid": d["uid"]}},
        }
        before = {"uid": d["uid"]}
        fallback = bool(plan.params.get("deleteFallback"))
        try:
            ctx.kube().request("POST", self._path(plan) + "/eviction", body=body, retry_throttled=False)
        except TemporaryError as e:
            if "HTTP 429" in str(e):
                if fallback and plan.params.get("deleteDespiteDisruptionBudget"):
                    return self._delete(plan, ctx, f"a PodDisruptionBudget refused the eviction ({e})")
                return ActionResult(
                    Outcome.SKIPPED, f"eviction refused by a PodDisruptionBudget: {e}", before
                )
            return ActionResult(Outcome.FAILED, f"eviction failed: {e}", before)
        except PermanentError as e:
            if fallback and not_served(str(e)):
                # 404 is also what a pod gone meanwhile gets: only a pod still there, with its
                # uid, means the subresource is what is missing.
                obj = self._read(plan, ctx)
                if isinstance(obj, dict) and (obj.get("metadata") or {}).get("uid") == d["uid"]:
                    return self._delete(plan, ctx, f"the Eviction API is not served ({e})")
            return ActionResult(Outcome.FAILED, f"eviction refused: {e}", before)
        return ActionResult(Outcome.APPLIED, f"evicted pod {d['namespace']}/{d['pod']}", before)

    def _delete(self, plan: Plan, ctx: ApplyContext, why: str) -> ActionResult:
        """The fallback: DELETE with the planned uid as precondition (a pod of the same name
        created since is answered 409, not deleted)."""
        d = plan.target.detail
        before = {"uid": d["uid"], "fallback": "delete"}
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": d["uid"]}}
        try:
            ctx.kube().request("DELETE", self._path(plan), body=body)
        except (TemporaryError, PermanentError) as e:
            return ActionResult(Outcome.FAILED, f"{why}; delete failed: {e}", before)
        return ActionResult(Outcome.APPLIED, f"deleted pod {d['namespace']}/{d['pod']}: {why}", before)

    def verify(self, plan: Plan, result: ActionResult, ctx: ApplyContext) -> ActionResult:
        try:
            obj = ctx.kube().request("GET", self._path(plan))
        except PermanentError as e:
            if "HTTP 404" in str(e):
                return ActionResult(
                    Outcome.APPLIED, f"{result.message}; pod gone", result.before, {"gone": True}, True
                )
            raise OSError(str(e)) from None
        except TemporaryError as e:
            raise OSError(str(e)) from None
        meta = obj.get("metadata") or {}
        deleting = bool(meta.get("deletionTimestamp")) or meta.get("uid") != plan.expect["uid"]
        after = {"uid": meta.get("uid"), "deletion_timestamp": meta.get("deletionTimestamp")}
        note = "; pod terminating" if deleting else "; pod still there without a deletionTimestamp"
        return ActionResult(Outcome.APPLIED, result.message + note, result.before, after, deleting)
