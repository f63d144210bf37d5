"""Node conditions, Events and the opt-in taint (remediator/kube): what is written when, and
that a quiet node writes nothing. Against a fake API server that applies the patches as the
real one does (conditions merged by type, taints replaced under a resourceVersion)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from remediator.clock import FakeClock
from remediator.daemon import Daemon
from remediator.engine import ActionReport, CycleReport, PolicyReport, catalog
from remediator.errors import PermanentError, PolicyError, TemporaryError
from remediator.kube.conditions import condition_patch, condition_type, taint_patch
from remediator.kube.status import RETRY_AFTER_SECONDS, NodeReporter
from remediator.model import (
    ActionResult,
    Condition,
    ContainerRef,
    ContainerSample,
    Decision,
    DecisionKind,
    Mode,
    Outcome,
    Phase,
    Plan,
    PodRef,
    Reading,
    Scope,
    Target,
    TargetKind,
)
from remediator.policy.loader import load_policies
from remediator.policy.rules import Controller, KubeReporting, PolicySet
from remediator.quantity import Amount
from remediator.runtime import load
from remediator.settings import Settings
from tests.helpers import make_policy

NODE = "node-1"
CID = "a" * 64
POD = PodRef("trasher-1", "shop", "uid-trasher", "trasher", "ReplicaSet", "trasher", "BestEffort", NODE)
CONTAINER = ContainerRef(CID, "shop/trasher-1/trasher", runtime="cri", pid=10, cgroup="/kubepods/x", pod=POD)
POLICY = make_policy(
    name="negative-dentries", probe="dentries", metric="nr_negative", trigger=Amount(2_000_000)
)
T0 = 1_764_660_000.0


class FakeApi:
    """The few API server endpoints the reporter uses, applying patches like the real one."""

    def __init__(self) -> None:
        self.node: dict[str, Any] = {
            "kind": "Node",
            "metadata": {"name": NODE, "resourceVersion": "1"},
            "spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]},
        }
        self.events: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, Any]] = []
        self.fail: list[Exception] = []
        self.race = 0  # taint patches to answer 409 after someone else's edit

    @property
    def writes(self) -> int:
        return sum(1 for m, _, _ in self.calls if m != "GET")

    @property
    def reads(self) -> int:
        return sum(1 for m, _, _ in self.calls if m == "GET")

    def conditions(self) -> dict[str, dict[str, Any]]:
        return {c["type"]: c for c in self.node["status"]["conditions"]}

    def request(
        self, method: str, path: str, params: Any = None, body: Any = None, **kw: Any
    ) -> dict[str, Any]:
        self.calls.append((method, path, copy.deepcopy(body)))
        if self.fail:
            raise self.fail.pop(0)
        rv = self.node["metadata"]["resourceVersion"]
        if (method, path) == ("GET", f"/api/v1/nodes/{NODE}"):
            return copy.deepcopy(self.node)
        if (method, path) == ("PATCH", f"/api/v1/nodes/{NODE}/status"):
            assert kw["content_type"] == "application/strategic-merge-patch+json"
            have = self.conditions()
            for c in body["status"]["conditions"]:
                have[c["type"]] = c
            self.node["status"]["conditions"] = list(have.values())
            self.node["metadata"]["resourceVersion"] = str(int(rv) + 1)
            return copy.deepcopy(self.node)
        if (method, path) == ("PATCH", f"/api/v1/nodes/{NODE}"):
            assert kw["content_type"] == "application/merge-patch+json"
            if self.race:
                self.race -= 1
                self.node["spec"]["taints"].append({"key": f"raced-{self.race}", "effect": "NoExecute"})
                self.node["metadata"]["resourceVersion"] = str(int(rv) + 1)
            if body["metadata"]["resourceVersion"] != self.node["metadata"]["resourceVersion"]:
                raise PermanentError("kubernetes: PATCH: HTTP 409: the object has been modified")
            self.node["spec"]["taints"] = body["spec"]["taints"]
            self.node["metadata"]["resourceVersion"] = str(int(rv) + 1)
            return copy.deepcopy(self.node)
        if method == "POST" and path.endswith("/events"):
            assert body["metadata"]["namespace"] == path.split("/")[4]
            self.events[body["metadata"]["name"]] = body
            return body  # type: ignore[no-any-return]
        if method == "PATCH" and "/events/" in path:
            name = path.rsplit("/", 1)[1]
            if name not in self.events:
                raise PermanentError("kubernetes: PATCH: HTTP 404: not found")
            self.events[name].update(body)
            return self.events[name]
        raise AssertionError(f"unexpected {method} {path}")


def report(
    phase: Phase = Phase.FIRING,
    *,
    policy: Any = POLICY,
    actions: list[ActionReport] | None = None,
    dry_run: bool = False,
    at: float = T0,
) -> CycleReport:
    cond = Condition(policy.name, "host", phase)
    pr = PolicyReport(policy, conditions={"host": cond}, actions=actions or [])
    reading = Reading("dentries", at, containers=(ContainerSample(CONTAINER, {"nr_negative": 3e6}),))
    return CycleReport(at, "live", dry_run, {"dentries": reading}, [pr])


def reclaim(outcome: Outcome = Outcome.APPLIED) -> ActionReport:
    d = Decision(POLICY.name, "host", DecisionKind.ACT, Phase.FIRING, "", step=0, action="reclaim-cgroup")
    plan = Plan("reclaim-cgroup", Target(TargetKind.CGROUP, CID, CONTAINER.name), "reclaim")
    return ActionReport(d, Mode.ENFORCE, "", plan, ActionResult(outcome, "reclaimed 1.2G"))


def policies(*, taint: bool = False, heartbeat: float = 300.0, policy: Any = POLICY) -> PolicySet:
    cfg = KubeReporting(heartbeat=heartbeat, taint=frozenset({policy.name} if taint else ()))
    return PolicySet("p", (policy,), Controller(kubernetes=cfg))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


def reporter(api: FakeApi, clock: FakeClock, state: Path | None = None, **kw: Any) -> NodeReporter:
    return NodeReporter(NODE, lambda: api, clock.now, state_path=state, **kw)


def test_condition_type_is_npd_style_camel_case() -> None:
    assert condition_type("negative-dentries") == "RemediatorNegativeDentries"
    assert condition_type("fifo-leak-2") == "RemediatorFifoLeak2"


def test_firing_sets_the_condition_once_then_nothing_until_the_heartbeat(clock: FakeClock) -> None:
    api, ps = FakeApi(), policies()
    node = reporter(api, clock)
    out = node.cycle(report(), ps)
    cond = api.conditions()["RemediatorNegativeDentries"]
    assert (cond["status"], cond["reason"]) == ("True", "ThresholdExceeded")
    assert cond["message"] == "negative-dentries: dentries nr_negative over 2M on host"
    assert cond["lastTransitionTime"] == cond["lastHeartbeatTime"] == "2025-12-02T07:20:00Z"
    assert api.conditions()["Ready"]["reason"] == "KubeletReady"  # the kubelet's is kept
    assert [c.type for c in out.conditions] == ["RemediatorNegativeDentries"]
    # one GET of the Node (what it has of ours), the status PATCH, one Event on the Node
    assert [(m, p) for m, p, _ in api.calls] == [
        ("GET", "/api/v1/nodes/node-1"),
        ("PATCH", "/api/v1/nodes/node-1/status"),
        ("POST", "/api/v1/namespaces/default/events"),
    ]
    (event,) = api.events.values()
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": NODE}
    assert (event["type"], event["reason"], event["count"]) == ("Warning", "PolicyFiring", 1)
    assert event["source"] == {"component": "remediator", "host": NODE}

    # Still firing, nothing new: no call at all, cycle after cycle.
    calls = len(api.calls)
    for _ in range(29):
        clock.advance(10)
        node.cycle(report(at=clock.now()), ps)
    assert len(api.calls) == calls
    # Past the heartbeat: one write, the transition time kept.
    clock.advance(10)
    node.cycle(report(at=clock.now()), ps)
    assert api.writes == 3
    cond = api.conditions()["RemediatorNegativeDentries"]
    assert cond["lastTransitionTime"] == "2025-12-02T07:20:00Z"
    assert cond["lastHeartbeatTime"] == "2025-12-02T07:25:00Z"


def test_resolving_clears_it_with_an_event_and_then_writes_nothing(clock: FakeClock) -> None:
    api, ps = FakeApi(), policies()
    node = reporter(api, clock)
    node.cycle(report(), ps)
    clock.advance(60)
    node.cycle(report(Phase.RESOLVED, at=clock.now()), ps)
    cond = api.conditions()["RemediatorNegativeDentries"]
    assert (cond["status"], cond["reason"]) == ("False", "NoProblem")
    assert cond["lastTransitionTime"] == "2025-12-02T07:21:00Z"
    reasons = sorted(e["reason"] for e in api.events.values())
    assert reasons == ["PolicyFiring", "PolicyResolved"]
    writes = api.writes
    for _ in range(360):  # a quiet hour: a False condition has no heartbeat
        clock.advance(10)
        node.cycle(report(Phase.OK, at=clock.now()), ps)
    assert api.writes == writes


def test_a_policy_that_never_fired_writes_nothing(clock: FakeClock) -> None:
    api, ps = FakeApi(), policies()
    node = reporter(api, clock)
    for _ in range(100):
        node.cycle(report(Phase.OK, at=clock.now()), ps)
        clock.advance(10)
    assert (api.reads, api.writes) == (1, 0)
    assert "RemediatorNegativeDentries" not in api.conditions()


def test_the_patch_names_only_our_conditions() -> None:
    body = condition_patch([], {}, T0)
    assert body == {"status": {"conditions": []}}


def test_actions_make_events_on_the_node_and_on_the_target_pod(clock: FakeClock) -> None:
    api, ps = FakeApi(), policies()
    node = reporter(api, clock)
    node.cycle(report(actions=[reclaim()]), ps)
    by = {(e["involvedObject"]["kind"], e["reason"]): e for e in api.events.values()}
    assert set(by) == {("Node", "PolicyFiring"), ("Node", "ActionApplied"), ("Pod", "ActionApplied")}
    pod = by[("Pod", "ActionApplied")]
    assert pod["metadata"]["namespace"] == "shop"
    assert pod["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "trasher-1",
        "uid": "uid-trasher",
        "namespace": "shop",
    }
    assert pod["type"] == "Normal"
    assert pod["message"] == "negative-dentries: reclaim-cgroup applied: reclaimed 1.2G"
    clock.advance(30)
    node.cycle(report(actions=[reclaim(Outcome.FAILED)], at=clock.now()), ps)
    failed = [e for e in api.events.values() if e["reason"] == "ActionFailed"]
    assert sorted(e["involvedObject"]["kind"] for e in failed) == ["Node", "Pod"]
    assert {e["type"] for e in failed} == {"Warning"}


def test_a_repeat_within_ten_minutes_bumps_the_count(clock: FakeClock) -> None:
    api, ps = FakeApi(), policies()
    node = reporter(api, clock)
    node.cycle(report(actions=[reclaim()]), ps)
    clock.advance(60)
    node.cycle(report(actions=[reclaim()], at=clock.now()), ps)
    applied = [e for e in api.events.values() if e["reason"] == "ActionApplied"]
    assert sorted(e["count"] for e in applied) == [2, 2]
    assert {e["lastTimestamp"] for e in applied} == {"2025-12-02T07:21:00Z"}
    assert [m for m, p, _ in api.calls if "/events" in p].count("POST") == 3
    clock.advance(601)  # past the aggregation window: a new Event
    node.cycle(report(actions=[reclaim()], at=clock.now()), ps)
    assert len([e for e in api.events.values() if e["reason"] == "ActionApplied"]) == 4


def test_a_storm_of_events_is_rate_limited_and_counted(clock: FakeClock) -> None:
    api, ps = FakeApi(), policies()
    node = reporter(api, clock)
    for i in range(40):  # 40 distinct failures in 40 s: 2 Events each
        msg = ActionResult(Outcome.FAILED, f"failure {i}")
        ar = reclaim(Outcome.FAILED)
        node.cycle(report(actions=[ActionReport(ar.decision, ar.mode, "", ar.plan, msg)], at=clock.now()), ps)
        clock.advance(1)
    events = [e for e in api.events.values() if e["reason"] == "ActionFailed"]
    # 81 asked for (PolicyFiring, then 2 a cycle); a burst of 25 and one more after 30 s
    # were written: PolicyFiring and 25 ActionFailed; the rest were dropped and counted.
    assert len(events) == 25
    assert node.events.dropped == 81 - 26


def test_audit_mode_and_dry_runs_write_nothing_and_say_what_they_would(clock: FakeClock) -> None:
    api = FakeApi()
    audit = make_policy(name="negative-dentries", probe="dentries", metric="nr_negative", mode=Mode.AUDIT)
    for rep, ps in (
        (report(policy=audit), policies(policy=audit, taint=True)),
        (report(dry_run=True), policies(taint=True)),
    ):
        node = reporter(api, clock, readonly=True)
        with capture_logs() as logs:
            out = node.cycle(rep, ps)
        assert out.would and [w.status for w in out.conditions] == ["True"]
        assert out.taints_added == ["remediator.io/negative-dentries"]
        assert [n.reason for n in out.events] == ["PolicyFiring"]
        names = {e["event"] for e in logs}
        assert {"node_condition_would_set", "kube_event_would_create", "node_taint_would_set"} <= names
    assert api.calls == []


def test_an_unreachable_api_server_is_said_once_and_the_writes_follow_later(clock: FakeClock) -> None:
    api, ps = FakeApi(), policies()
    node = reporter(api, clock)
    node.cycle(report(Phase.OK), ps)  # learns the Node
    api.fail = [TemporaryError("kubernetes: PATCH: Connection refused")]
    with capture_logs() as logs:
        out = node.cycle(report(actions=[reclaim()], at=clock.now()), ps)
        for _ in range(2):  # within the back-off: not even tried
            clock.advance(10)
            later = node.cycle(report(at=clock.now()), ps)
    assert out.error is not None and "Connection refused" in out.error
    assert later.error is not None and "unreachable" in later.error
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["kube_api_write_failed"]
    assert "node-local actions go on" in warnings[0]["hint"]
    assert warnings[0]["queued_events"] == 3
    assert api.writes == 1  # the failed PATCH
    clock.advance(RETRY_AFTER_SECONDS)
    with capture_logs() as logs:
        done = node.cycle(report(at=clock.now()), ps)
    assert done.error is None
    assert [e["event"] for e in logs if e["event"].startswith("kube_api")] == ["kube_api_write_resumed"]
    assert api.conditions()["RemediatorNegativeDentries"]["status"] == "True"
    # the queued Events, each once: fired, applied on the Node and on the pod
    assert sorted(e["reason"] for e in api.events.values()) == [
        "ActionApplied",
        "ActionApplied",
        "PolicyFiring",
    ]


def test_a_cycle_survives_a_reporter_bug(clock: FakeClock) -> None:
    def broken() -> Any:
        raise RuntimeError("boom")

    node = NodeReporter(NODE, broken, clock.now)
    with capture_logs():
        out = node.cycle(report(), policies())
    assert out.error is not None


def test_opt_in_taint_while_firing_keeps_the_taints_of_others(clock: FakeClock) -> None:
    api, ps = FakeApi(), policies(taint=True)
    node = reporter(api, clock)
    api.race = 1  # someone edits the taints between our read and our patch
    out = node.cycle(report(), ps)
    assert out.taints_added == ["remediator.io/negative-dentries"]
    keys = [t["key"] for t in api.node["spec"]["taints"]]
    assert keys == ["dedicated", "raced-0", "remediator.io/negative-dentries"]
    ours = api.node["spec"]["taints"][-1]
    assert ours == {"key": "remediator.io/negative-dentries", "value": "true", "effect": "NoSchedule"}
    taint_patches = [b for m, p, b in api.calls if (m, p) == ("PATCH", "/api/v1/nodes/node-1")]
    assert len(taint_patches) == 2  # the 409, then again from a fresh read
    clock.advance(10)
    writes = api.writes
    node.cycle(report(at=clock.now()), ps)
    assert api.writes == writes  # still firing: nothing to do
    clock.advance(10)
    out = node.cycle(report(Phase.RESOLVED, at=clock.now()), ps)
    assert out.taints_removed == ["remediator.io/negative-dentries"]
    assert [t["key"] for t in api.node["spec"]["taints"]] == ["dedicated", "raced-0"]


def test_no_taint_without_the_opt_in(clock: FakeClock) -> None:
    api = FakeApi()
    reporter(api, clock).cycle(report(), policies())
    assert [t["key"] for t in api.node["spec"]["taints"]] == ["dedicated"]
    assert taint_patch(api.node, set(), {"remediator.io/x"}) is None


def test_timer_runs_keep_what_the_node_has_in_the_state_file(clock: FakeClock, tmp_path: Path) -> None:
    api, ps = FakeApi(), policies()
    state = tmp_path / "kube-node.json"
    reporter(api, clock, state).cycle(report(), ps)
    assert json.loads(state.read_text())["conditions"]["RemediatorNegativeDentries"]["status"] == "True"
    calls = len(api.calls)
    for _ in range(5):  # five one-shot runs: each a new process, still firing
        clock.advance(30)
        reporter(api, clock, state).cycle(report(at=clock.now()), ps)
    assert len(api.calls) == calls  # not even a GET
    clock.advance(30)
    reporter(api, clock, state).cycle(report(Phase.RESOLVED, at=clock.now()), ps)
    assert api.conditions()["RemediatorNegativeDentries"]["status"] == "False"
    assert "PolicyResolved" in {e["reason"] for e in api.events.values()}


def test_a_condition_left_by_a_removed_policy_is_cleared(clock: FakeClock) -> None:
    api = FakeApi()
    old = make_policy(name="old-leak", probe="dentries", metric="nr_negative")
    node = reporter(api, clock)
    node.cycle(report(policy=old), policies(policy=old))
    assert api.conditions()["RemediatorOldLeak"]["status"] == "True"
    clock.advance(10)
    node.cycle(report(Phase.OK, at=clock.now()), policies())
    assert api.conditions()["RemediatorOldLeak"]["reason"] == "PolicyRemoved"
    assert api.conditions()["RemediatorOldLeak"]["status"] == "False"


def test_container_scoped_firing_names_the_pod(clock: FakeClock) -> None:
    api = FakeApi()
    scoped = make_policy(
        name="negative-dentries", probe="dentries", metric="nr_negative", scope=Scope.CONTAINER
    )
    cond = Condition(scoped.name, CID, Phase.FIRING, subject_name=CONTAINER.name)
    pr = PolicyReport(scoped, conditions={CID: cond})
    reading = Reading("dentries", T0, containers=(ContainerSample(CONTAINER, {"nr_negative": 3e6}),))
    reporter(api, clock).cycle(
        CycleReport(T0, "live", False, {"dentries": reading}, [pr]), policies(policy=scoped)
    )
    assert api.conditions()["RemediatorNegativeDentries"]["message"].endswith("on shop/trasher-1/trasher")
    kinds = sorted(e["involvedObject"]["kind"] for e in api.events.values())
    assert kinds == ["Node", "Pod"]


POLICY_YAML = """\
apiVersion: remediator.io/v1
kind: Policy
metadata: {name: negative-dentries}
spec:
  watch: {probe: dentries, metric: negative, above: 2M}
  actions: [{action: drop-caches}]
---
apiVersion: remediator.io/v1
kind: Controller
spec:
  kubernetes:
    heartbeat: 10m
    taint:
      - negative-dentries
      - negative-dentry
"""


def test_a_taint_opt_in_must_name_a_policy_of_the_set(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY_YAML)
    with pytest.raises(PolicyError) as e:
        load_policies([tmp_path], catalog())
    (issue,) = e.value.issues
    assert (issue.line, issue.field) == (15, "spec.kubernetes.taint[1]")
    assert "no policy named 'negative-dentry'" in issue.message
    (tmp_path / "p.yaml").write_text(POLICY_YAML.replace("      - negative-dentry\n", ""))
    cfg = load_policies([tmp_path], catalog()).controller.kubernetes
    assert cfg == KubeReporting(
        conditions=True, events=True, heartbeat=600.0, taint=frozenset({"negative-dentries"})
    )


def test_the_daemon_feeds_each_cycle_to_its_node_reporter(tmp_path: Path, clock: FakeClock) -> None:
    host = tmp_path / "host"
    shutil.copytree(Path(__file__).parent.parent / "fixtures" / "host", host)
    (host / "run" / "containerd" / "fifo").mkdir(parents=True)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(
        "apiVersion: remediator.io/v1\nkind: Policy\nmetadata: {name: negative-dentries}\n"
        "spec:\n  mode: audit\n  watch: {probe: dentries, metric: negative, above: 1}\n"
        "  actions: [{action: drop-caches, params: {what: dentries-inodes}}]\n"
    )
    settings = Settings(
        host_root=host, state_dir=tmp_path / "state", docker_url=f"unix://{tmp_path}/none.sock"
    )
    daemon = Daemon(settings, [tmp_path / "policies"], load([tmp_path / "policies"]), clock)
    assert daemon.node_status is None  # no kubeconfig, not in a pod: no Kubernetes
    api = FakeApi()
    daemon.node_status = reporter(api, clock)
    daemon._schedule()
    with capture_logs() as logs:
        daemon._tick()
    would = [e for e in logs if e["event"] == "node_condition_would_set"]
    assert [(e["type"], e["status"]) for e in would] == [("RemediatorNegativeDentries", "True")]
    assert api.calls == []  # a policy in audit mode writes nothing


def test_an_eviction_event_goes_to_the_evicted_pod(clock: FakeClock) -> None:
    api = FakeApi()
    d = Decision(POLICY.name, "host", DecisionKind.ACT, Phase.FIRING, "", step=1, action="evict-pod")
    detail = {"namespace": "shop", "pod": "trasher-1", "uid": "uid-trasher"}
    plan = Plan("evict-pod", Target(TargetKind.CONTAINER, CID, CONTAINER.name, detail), "evict")
    evicted = ActionReport(
        d, Mode.ENFORCE, "", plan, ActionResult(Outcome.APPLIED, "evicted pod shop/trasher-1")
    )
    reporter(api, clock).cycle(report(actions=[evicted]), policies())
    (pod,) = [e for e in api.events.values() if e["involvedObject"]["kind"] == "Pod"]
    assert pod["involvedObject"]["uid"] == "uid-trasher" and pod["reason"] == "ActionApplied"
    assert pod["message"] == "negative-dentries: evict-pod applied: evicted pod shop/trasher-1"
