"""The DaemonSet of deploy/kubernetes on a real Kubernetes node, from a locally built image.

* The node image (scripts/make-node-image.sh: Debian 12, the project from a wheel) is imported
  into the node's `k8s.io` namespace; the manifests are rendered by the cluster's own
  `kubectl kustomize`, accepted by `kubectl apply --dry-run=server`, then applied. Three things
  are changed for this shared test machine, nothing else: the policies in the ConfigMap (the
  test's, acting only on this test's namespace), the state hostPath (a fresh directory instead of
  the host's /var/lib/remediator), and the sockets and port (the fixture's private CRI
  containerd, no Docker: other tests' containers are not ours; a free metrics port; the API
  server's own address, as there is no kube-proxy to serve the `kubernetes` Service).
* The agent's pod becomes Ready (its readiness probe is the metrics endpoint), as the
  ServiceAccount of the manifest; RBAC grants what docs/kubernetes.md lists and no more: checked
  with `kubectl auth can-i --as`, and from inside the pod with its own token (reading Secrets and
  deleting a pod are refused with 403).
* A trasher pod floods negative dentries beside an idle bystander. With the policy in audit mode,
  `remediator audit` run inside the agent's pod (its env: host root /host, in-cluster
  credentials) names the trasher's pod and namespace as the top contributor, described by the
  API server; `remediator limits` there dedups fds with kcmp(2) (the pod's /host is the live
  host); the daemon only logs `action_would_apply`.
* The ConfigMap then carries the same policy in enforce mode, and the agent is restarted (the
  GitOps flow of docs/kubernetes.md): the daemon reclaims the trasher container's cgroup; the
  trasher keeps flooding, is past the line again after the step's settle time, and the daemon
  evicts its pod through the API server with its ServiceAccount; the ReplicaSet's replacement
  runs (idle: a marker says the flood happened), the bystander keeps its uid. The metrics
  endpoint answers on the node's address with the policy's series.
* The Node is given its loopback address first (the kubelet does not report a loopback
  --node-ip): the API server reaches the kubelet for `kubectl exec`, and the hostNetwork pod's
  IP, the metrics address, is the node's as on a real node.

Teardown deletes what was applied, waits for the namespaces and the agent's pod to be gone,
reclaims what the test's pods left charged to kubepods/besteffort, removes the state directory,
and checks: no remediator object left in the API, no state directory, no new file in the host's
/etc/sysctl.d, /var/lib/remediator as before, the negative count back under the clear line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from remediator.host import HostRoot
from remediator.probes.dentries import find_memory_hierarchy, parse_dentry_state
from tests.helpers import listen_port
from tests.real.conftest import unavailable
from tests.real.kube_node import BUSYBOX_IMAGE, REPO, KubeNode, kube_node_running, run

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.timeout(2400)]

HOST = HostRoot()
DEPLOY = REPO / "deploy" / "kubernetes"
AGENT_NS = "remediator"
AGENT = "app.kubernetes.io/name=remediator"
SA = f"system:serviceaccount:{AGENT_NS}:remediator"
NS = "rmd-ds"
FLOOD = 1_200_000  # failed lookups in the burst, two negatives each
TRICKLE = 50_000  # per second afterwards: past the line again within the reclaim's settle time
ACT_ABOVE = 1_500_000
CLEAR_BELOW = 700_000  # what the teardown brings the count back under

CONTROLLER = """\
apiVersion: remediator.io/v1
kind: Controller
spec:
  breaker: {maxActions: 10, window: 1h}
"""

# Clears only below 1: the ladder goes on to its second step after the reclaim's settle time,
# and the eviction acts when the count is past the line again then (the engine re-reads the
# probe right before acting): the trasher keeps flooding. Only this test's pods are targets.
POLICY = """\
apiVersion: remediator.io/v1
kind: Policy
metadata:
  name: {name}
  description: Relieve the pod holding the most dentry slab, then evict it (test).
spec:
  mode: {mode}
  interval: 5s
  watch:
    probe: dentries
    metric: negative
    above: {above}
    clearBelow: 1
    for: 5s
  containers:
    include: [{{name: "{ns}/*"}}]
  actions:
    - action: reclaim-cgroup
      settle: 30s
      params: {{target: top, rankBy: slab_reclaimable_bytes}}
    - action: evict-pod
      allowDisruptive: true
      settle: 1m
      params: {{target: top, rankBy: slab_reclaimable_bytes}}
  cooldown: 1h
"""


def negatives() -> int:
    return parse_dentry_state(HOST.read_sysctl("fs.dentry-state")).nr_negative


def node_image() -> Path:
    if shutil.which("debootstrap") is None:
        unavailable("debootstrap is missing (the node image's rootfs)", "apt-get install debootstrap")
    res = subprocess.run(
        [str(REPO / "scripts" / "make-node-image.sh")],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert res.returncode == 0, f"scripts/make-node-image.sh: {res.stderr.strip()[-1500:]}"
    return Path(res.stdout.strip().splitlines()[-1])


def rendered(node: KubeNode) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(node.kubectl("kustomize", str(DEPLOY))) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def for_this_node(
    docs: list[dict[str, Any]], node: KubeNode, state: Path, port: int, policies: dict[str, str]
) -> list[dict[str, Any]]:
    """The manifests with the test machine's differences (the module docstring lists them)."""
    docs = json.loads(json.dumps(docs))
    one(docs, "ConfigMap")["data"] = policies
    spec = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    env["REMEDIATOR_CRI_CONTAINERD_SOCKET"]["value"] = f"/host/cri/{node.containerd_socket.name}"
    env["REMEDIATOR_DOCKER_URL"]["value"] = "unix:///host/run/rmd-test-no-docker.sock"
    env["REMEDIATOR_METRICS_ADDRESS"]["value"] = f"$(POD_IP):{port}"
    # No kube-proxy here: the `kubernetes` Service's address leads nowhere, the API server's
    # own (loopback, in the node's network namespace) does.
    api_host, api_port = node.server.removeprefix("https://").rsplit(":", 1)
    container["env"] += [
        {"name": "KUBERNETES_SERVICE_HOST", "value": api_host},
        {"name": "KUBERNETES_SERVICE_PORT", "value": api_port},
    ]
    (metrics,) = container["ports"]
    metrics["containerPort"] = port
    one(docs, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = str(port)
    container["volumeMounts"].append({"name": "cri", "mountPath": "/host/cri"})
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["state"]["hostPath"]["path"] == "/var/lib/remediator"
    volumes["state"]["hostPath"]["path"] = str(state)
    spec["volumes"].append(
        {"name": "cri", "hostPath": {"path": str(node.containerd_socket.parent), "type": "Directory"}}
    )
    return docs


def apply(node: KubeNode, docs: list[dict[str, Any]], *extra: str) -> str:
    return node.kubectl(
        "apply", *extra, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    )


def can_i(node: KubeNode, verb: str, resource: str, *extra: str) -> bool:
    res = run(
        [str(node.bindir / "kubectl"), "--kubeconfig", str(node.kubeconfig), "auth", "can-i",
         verb, resource, "--as", SA, *extra],
        check=False,
    )  # fmt: skip
    assert res.stdout.strip() in ("yes", "no"), (res.stdout, res.stderr)
    return res.stdout.strip() == "yes"


def events(state: Path, name: str, policy: str) -> list[dict[str, Any]]:
    path = state / "audit.jsonl"
    if not path.exists():
        return []
    found = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            e = json.loads(line)
            if e.get("event") == name and e.get("policy") == policy:
                found.append(e)
    return found


def trail(state: Path, policy: str) -> list[str]:
    """The policy's audit events in short, for a failure message."""
    path = state / "audit.jsonl"
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            e = json.loads(line)
            if e.get("policy") == policy and e.get("event") != "policy_evaluated":
                out.append(
                    f"{e.get('event')} {e.get('action', '')} {e.get('message') or e.get('reason') or ''}"
                )
    return out[-15:]


def wait_for(what: str, check: Any, timeout: float, interval: float = 1.0, why: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s" + (f": {why()}" if why else ""))
        time.sleep(interval)


def workload(name: str, command: list[str], marker: Path | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 0,
        "automountServiceAccountToken": False,
        "containers": [
            {"name": name, "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never", "command": command}
        ],
    }
    if marker is not None:
        spec["volumes"] = [{"name": "marker", "hostPath": {"path": str(marker), "type": "DirectoryOrCreate"}}]
        spec["containers"][0]["volumeMounts"] = [{"name": "marker", "mountPath": "/marker"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
    }


def wait_agent(node: KubeNode, other_than: str | None = None, timeout: float = 180) -> dict[str, Any]:
    """The agent's pod once Ready (and not `other_than`); fails at once on a container that
    cannot start, with the reason and its log."""
    deadline = time.monotonic() + timeout
    while True:
        pods = [p for p in node.pods(AGENT_NS, AGENT) if p["metadata"]["uid"] != other_than]
        for p in pods:
            for status in p["status"].get("containerStatuses") or []:
                waiting = status.get("state", {}).get("waiting") or {}
                if waiting.get("reason") in ("CreateContainerError", "CrashLoopBackOff", "ErrImageNeverPull"):
                    log = run(
                        [str(node.bindir / "kubectl"), "--kubeconfig", str(node.kubeconfig), "logs",
                         "-n", AGENT_NS, p["metadata"]["name"], "--tail", "40"],
                        check=False,
                    )  # fmt: skip
                    raise AssertionError(f"agent: {waiting}; log: {log.stdout[-3000:]}{log.stderr[-500:]}")
        ready = [
            p
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
            and all(s.get("ready") for s in p["status"].get("containerStatuses") or [{}])
        ]
        if ready:
            return ready[0]
        assert time.monotonic() < deadline, (
            f"agent not Ready in {timeout:.0f} s: {[p['status'] for p in pods]}"
        )
        time.sleep(0.5)


def gone(node: KubeNode, path: str) -> bool:
    try:
        node.api("GET", path)
    except urllib.error.HTTPError as e:
        return e.code == 404
    return False


def agent_cost(memory_root: Path, pod: dict[str, Any]) -> tuple[int, int, float]:
    """(memory cgroup usage, RSS of its processes, CPU share over 20 s) of the agent's container."""
    cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    cg = memory_root / "kubepods" / pod["status"]["qosClass"].lower() / f"pod{pod['metadata']['uid']}" / cid
    knob = cg / "memory.usage_in_bytes" if (cg / "memory.usage_in_bytes").exists() else cg / "memory.current"
    pids = [int(p) for p in (cg / "cgroup.procs").read_text().split()]
    rss = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) * 1024

    def cpu_ticks() -> float:
        total = 0.0
        for pid in pids:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += float(fields[11]) + float(fields[12])  # utime, stime
        return total

    t0, c0 = time.monotonic(), cpu_ticks()
    time.sleep(20)
    share = (cpu_ticks() - c0) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0)
    return int(knob.read_text()), rss, share


@pytest.fixture(scope="module")
def node() -> Iterator[KubeNode]:
    with kube_node_running() as n:
        yield n


def test_the_daemonset_runs_on_the_node_and_relieves_it_through_its_serviceaccount(node: KubeNode) -> None:
    # The kubelet does not report a loopback --node-ip as the Node's address, and without one
    # the API server cannot reach the kubelet for `kubectl exec`, nor has a hostNetwork pod an
    # IP. The kubelet keeps an address it did not work out itself: give the Node its own.
    node.api(
        "PATCH",
        f"/api/v1/nodes/{node.node_name}/status",
        {"status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}},
    )
    image = node_image()
    node.ctr("images", "import", str(image))
    docs = rendered(node)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]
    ), kinds

    base = negatives()
    sysctl_d_before = sorted(p.name for p in Path("/etc/sysctl.d").iterdir())
    var_lib_before = Path("/var/lib/remediator").exists()
    state = Path(tempfile.mkdtemp(prefix="rmd-ds-state-", dir="/var/lib"))
    port = listen_port()

    def policies(mode: str, name: str) -> dict[str, str]:
        text = POLICY.format(mode=mode, name=name, above=base + ACT_ABOVE, ns=NS)
        return {"controller.yaml": CONTROLLER, f"{name}.yaml": text}

    audit_docs = for_this_node(docs, node, state, port, policies("audit", "ds-dentries-audit"))
    h = find_memory_hierarchy(HOST)
    assert h is not None
    besteffort = h.root / "kubepods" / "besteffort"
    marker = node.base / "ds-marker"
    flood_once = (
        "if [ -e /marker/flooded ]; then exec /load/dcache_load idle; fi; touch /marker/flooded; "
        f"exec /load/dcache_load trash /tmp {FLOOD} 0 {TRICKLE}"
    )
    try:
        # The manifests as the API server validates them (the namespace first: a server dry run
        # of an object in a namespace that does not exist is refused), then for real.
        apply(node, [d for d in audit_docs if d["kind"] == "Namespace"])
        dry = apply(node, audit_docs, "--dry-run=server")
        assert "daemonset.apps/remediator created (server dry run)" in dry, dry
        assert gone(node, f"/apis/apps/v1/namespaces/{AGENT_NS}/daemonsets/remediator")
        apply(node, audit_docs)
        agent = wait_agent(node)
        assert agent["spec"]["serviceAccountName"] == "remediator"
        assert agent["spec"]["priorityClassName"] == "system-node-critical"
        assert agent["status"]["podIP"] == "127.0.0.1", agent["status"]  # hostNetwork: the node's

        # RBAC: what the agent uses, and nothing else.
        allowed = {
            ("list", "pods"), ("get", "pods"), ("watch", "pods"), ("create", "pods/eviction"),
            ("get", "nodes"), ("patch", "nodes/status"), ("create", "events"), ("patch", "events"),
        }  # fmt: skip
        refused = {
            ("delete", "pods"), ("patch", "nodes"), ("get", "secrets"), ("list", "configmaps"),
            ("create", "pods"), ("update", "nodes/status"), ("delete", "nodes"),
        }  # fmt: skip
        for verb, resource in allowed | refused:
            res, _, sub = resource.partition("/")
            extra = ("--subresource", sub) if sub else ()
            assert can_i(node, verb, res, *extra) == ((verb, resource) in allowed), (verb, resource)

        node.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}])
        node.apply(workload("idle", ["/load/dcache_load", "idle"]))
        node.apply(workload("trasher", ["/bin/sh", "-c", flood_once], marker))
        (bystander,) = node.wait_running(NS, "app=idle", 1)
        (trasher,) = node.wait_running(NS, "app=trasher", 1)
        wait_for("the flood", lambda: negatives() > base + ACT_ABOVE, 120, 0.5)

        # Inside the pod, with its own token: the forbidden is forbidden.
        probe = (
            "import json, os, ssl, sys, urllib.request, urllib.error\n"
            "d = '/var/run/secrets/kubernetes.io/serviceaccount/'\n"
            "ctx = ssl.create_default_context(cafile=d + 'ca.crt')\n"
            "host = os.environ['KUBERNETES_SERVICE_HOST'] + ':' + os.environ['KUBERNETES_SERVICE_PORT']\n"
            "token = open(d + 'token').read()\n"
            "out = {}\n"
            "for method, path in json.loads(sys.argv[1]):\n"
            "    req = urllib.request.Request(f'https://{host}{path}', method=method)\n"
            "    req.add_header('Authorization', 'Bearer ' + token)\n"
            "    try:\n"
            "        out[path + ' ' + method] = urllib.request.urlopen(req, context=ctx, timeout=10).status\n"
            "    except urllib.error.HTTPError as e:\n"
            "        out[path + ' ' + method] = e.code\n"
            "print(json.dumps(out))\n"
        )
        asks = [
            ("GET", f"/api/v1/pods?fieldSelector=spec.nodeName={node.node_name}"),
            ("GET", f"/api/v1/namespaces/{AGENT_NS}/secrets"),
            ("DELETE", f"/api/v1/namespaces/{NS}/pods/{bystander['metadata']['name']}"),
        ]
        name = agent["metadata"]["name"]
        answers = json.loads(
            node.kubectl("exec", "-n", AGENT_NS, name, "--", "python3", "-c", probe, json.dumps(asks))
        )
        assert list(answers.values()) == [200, 403, 403], answers

        # Audit mode: `remediator audit` inside the pod names the trasher's pod and namespace.
        doc = json.loads(
            node.kubectl(
                "exec", "-n", AGENT_NS, name, "--", "remediator", "audit", "--json", "--log-level", "error",
                timeout=240,
            )
        )  # fmt: skip
        reading = doc["readings"]["dentries"]
        assert reading.get("error") is None, reading
        top = reading["detail"]["attribution"]["top"][0]
        pod_name = trasher["metadata"]["name"]
        assert (top.get("pod"), top.get("namespace")) == (pod_name, NS), reading["detail"]["attribution"]
        described = [c["container"] for c in reading["containers"] if c["container"].get("pod")]
        ours = [c for c in described if c["pod"]["name"] == pod_name and c["pod"]["container"]]
        assert ours and ours[0]["pod"]["source"] == "api", ours  # listed with the ServiceAccount
        assert ours[0]["pod"]["owner_kind"] == "ReplicaSet", ours
        # The pod's /host is the live host (hostPID): the fd scan dedups with kcmp(2), which
        # SYS_PTRACE allows under the RuntimeDefault seccomp profile.
        limits = json.loads(
            node.kubectl("exec", "-n", AGENT_NS, name, "--", "remediator", "limits", "--json", timeout=240)
        )
        assert '"fd_dedup": "kcmp"' in json.dumps(limits), json.dumps(limits)[:3000]
        # The daemon, in audit mode, would act and does not.
        would = wait_for(
            "action_would_apply", lambda: events(state, "action_would_apply", "ds-dentries-audit"), 90
        )
        assert would[0]["action"] == "reclaim-cgroup", would[0]
        assert not events(state, "action_applied", "ds-dentries-audit")
        assert negatives() > base + ACT_ABOVE * 0.9

        # Enforce: the ConfigMap changes in git, CI renders it, it is applied; the agent restarts.
        apply(node, for_this_node(docs, node, state, port, policies("enforce", "ds-dentries")))
        node.kubectl("rollout", "restart", "-n", AGENT_NS, "daemonset/remediator")
        wait_agent(node, other_than=agent["metadata"]["uid"])
        reclaimed = wait_for(
            "the reclaim",
            lambda: events(state, "action_applied", "ds-dentries"),
            120,
            why=lambda: trail(state, "ds-dentries"),
        )
        assert reclaimed[0]["action"] == "reclaim-cgroup", reclaimed[0]
        assert reclaimed[0]["target"]["name"].startswith(f"{NS}/{pod_name}/"), reclaimed[0]["target"]
        evicted = wait_for(
            "the eviction",
            lambda: [e for e in events(state, "action_applied", "ds-dentries") if e["action"] == "evict-pod"],
            120,
            why=lambda: trail(state, "ds-dentries"),
        )
        assert evicted[0]["target"]["detail"] == {
            "namespace": NS,
            "pod": pod_name,
            "uid": trasher["metadata"]["uid"],
        }, evicted[0]
        assert evicted[0]["verified"] is True, evicted[0]
        replacement = wait_for(
            "the trasher's replacement",
            lambda: [p for p in node.wait_running(NS, "app=trasher", 1)
                     if p["metadata"]["uid"] != trasher["metadata"]["uid"]],
            60,
        )  # fmt: skip
        assert (
            replacement[0]["metadata"]["ownerReferences"][0]["name"]
            == trasher["metadata"]["ownerReferences"][0]["name"]
        )
        (still,) = node.wait_running(NS, "app=idle", 1, timeout=10)
        assert still["metadata"]["uid"] == bystander["metadata"]["uid"]
        assert still["status"]["containerStatuses"][0]["restartCount"] == 0
        assert not events(state, "action_failed", "ds-dentries")

        # The metrics endpoint, on the node's address, as Prometheus' pod discovery finds it.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        assert "remediator_negative_dentries" in body
        assert 'policy="ds-dentries"' in body, body[-2000:]

        # The agent's own cost, for the requests and limits of the manifest.
        memcg, rss, cpu = agent_cost(h.root, node.wait_running(AGENT_NS, AGENT, 1)[0])
        print(
            f"\nnegatives: base {base}; would: {would[0]['summary']}; "
            f"reclaimed: {reclaimed[0]['summary']}; evicted {pod_name}; agent memcg {memcg / 2**20:.1f} MiB, "
            f"RSS {rss / 2**20:.1f} MiB, CPU {cpu * 100:.2f} % of a core over 20 s"
        )
    finally:
        problems: list[str] = []
        with contextlib.suppress(AssertionError, subprocess.SubprocessError):
            node.kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=false")
        with contextlib.suppress(AssertionError, subprocess.SubprocessError):
            node.kubectl(
                "delete", "-f", "-", "--ignore-not-found", "--wait=false",
                input=json.dumps({"apiVersion": "v1", "kind": "List", "items": audit_docs}),
            )  # fmt: skip
        deadline = time.monotonic() + 120
        paths = (
            f"/api/v1/namespaces/{AGENT_NS}",
            f"/api/v1/namespaces/{NS}",
            "/apis/rbac.authorization.k8s.io/v1/clusterroles/remediator-node-agent",
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/remediator-node-agent",
        )
        while not all(gone(node, p) for p in paths) and time.monotonic() < deadline:
            time.sleep(1)
        problems += [f"{p} still exists" for p in paths if not gone(node, p)]
        # The test's pods' leftovers (the evicted trasher's negatives moved to its parents).
        for knob, value in (("memory.force_empty", "0"), ("memory.reclaim", str(4 << 30))):
            if (besteffort / knob).exists():
                with contextlib.suppress(OSError):
                    (besteffort / knob).write_text(value)
                break
        shutil.rmtree(state, ignore_errors=True)
        if state.exists():
            problems.append(f"{state} still exists")
        if sorted(p.name for p in Path("/etc/sysctl.d").iterdir()) != sysctl_d_before:
            problems.append(
                f"/etc/sysctl.d changed: {sorted(p.name for p in Path('/etc/sysctl.d').iterdir())}"
            )
        if Path("/var/lib/remediator").exists() != var_lib_before:
            problems.append("/var/lib/remediator appeared or went")
        assert not problems, problems
    assert negatives() < base + CLEAR_BELOW
