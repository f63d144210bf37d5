"""What does the CRI inventory cost per cycle at 100 pods, against Docker's at 100 containers?

Both run over the same kind of fixture host (a cgroup v1 memory hierarchy and /proc/<pid>/cgroup
files in a temporary directory), with their API answers served from memory, so what is timed is
remediator's own work per cycle (walking cgroups, parsing answers, building the index), not the
daemons' latency:

1. Docker (baseline): `DockerInventory.refresh()` over 100 running containers: one list and
   100 inspects through the SDK's low-level API (a fake client), one /proc read each;
2. CRI, steady state: `KubeInventorySource()` on a node of 100 pods (a sandbox and one
   container each, 200 cgroups) whose pod list is already held: the cgroup walk, no API call;
3. CRI, relist: the same with the 100-pod PodList fetched (JSON decoded and parsed) this cycle.

It also counts API calls over a simulated hour of 10 s cycles on a quiet node (target: zero
writes, bounded reads): the inventory's (the bounded relist), and the node reporter's (Node
conditions, Events, taint: remediator/kube) fed each cycle's report of the bundled policies
with nothing firing; and, for contrast, an hour with one policy firing throughout (one
condition write, one Event, then a heartbeat every 5 minutes). No root needed.

    .venv/bin/python benchmarks/kube_inventory.py --pods 100 --runs 20
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from remediator.clock import FakeClock
from remediator.engine import CycleReport, PolicyReport, catalog
from remediator.host import HostRoot
from remediator.kube.status import NodeReporter
from remediator.model import Condition, Phase
from remediator.policy.loader import load_policies
from remediator.policy.rules import PolicySet
from remediator.probes.containers import DockerInventory
from remediator.probes.kube_api import KubeClient, KubeCredentials
from remediator.probes.kube_inventory import KubeInventorySource
from remediator.settings import bundled_policies


def uid(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-{i:012x}"


def cid(i: int, kind: int) -> str:
    return f"{kind:02x}{i:062x}"


def make_host(root: Path, n: int) -> None:
    memory = root / "sys" / "fs" / "cgroup" / "memory"
    memory.mkdir(parents=True)
    (memory / "memory.stat").write_text("cache 0\n")
    for i in range(n):
        for kind in (0, 1):  # the sandbox, the container
            pid = 10_000 + 2 * i + kind
            rel = f"kubepods/besteffort/pod{uid(i)}/{cid(i, kind)}"
            d = memory / rel
            d.mkdir(parents=True)
            (d / "cgroup.procs").write_text(f"{pid}\n")
            p = root / "proc" / str(pid)
            p.mkdir(parents=True)
            (p / "cgroup").write_text(f"4:memory:/{rel}\n0::/\n")
        # the Docker baseline's containers
        dpid = 50_000 + i
        p = root / "proc" / str(dpid)
        p.mkdir(parents=True)
        (p / "cgroup").write_text(f"4:memory:/docker/{cid(i, 2)}\n0::/\n")


def pod_list(n: int) -> bytes:
    items = []
    for i in range(n):
        items.append(
            {
                "metadata": {
                    "name": f"web-5d9c7b8f6-{i:05d}",
                    "namespace": "shop",
                    "uid": uid(i),
                    "ownerReferences": [{"kind": "ReplicaSet", "name": "web-5d9c7b8f6", "controller": True}],
                    "labels": {"app": "web", "pod-template-hash": "5d9c7b8f6"},
                },
                "spec": {"nodeName": "node-1", "containers": [{"name": "main", "image": "busybox"}]},
                "status": {
                    "phase": "Running",
                    "qosClass": "BestEffort",
                    "containerStatuses": [
                        {
                            "name": "main",
                            "ready": True,
                            "image": "busybox",
                            "containerID": f"containerd://{cid(i, 1)}",
                        }
                    ],
                },
            }
        )
    return json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}).encode()


class Pool:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def request(self, method: str, url: str, **kw: Any) -> Any:
        return type("R", (), {"status": 200, "data": self.body})()

    def clear(self) -> None:
        pass


class FakeDockerApi:
    def __init__(self, n: int) -> None:
        self.n = n

    def containers(self, filters: Any = None) -> list[dict[str, str]]:
        return [{"Id": cid(i, 2)} for i in range(self.n)]

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        i = int(container_id[2:], 16)
        return {
            "Id": container_id,
            "Name": f"/web-{i}",
            "State": {"Running": True, "Pid": 50_000 + i},
            "Config": {"Labels": {"app": "web"}, "Image": "busybox"},
        }


class NodeApi:
    """The Node endpoints the reporter uses, answered from memory; counts reads and writes."""

    def __init__(self) -> None:
        self.node: dict[str, Any] = {"metadata": {"name": "node-1"}, "spec": {}, "status": {"conditions": []}}
        self.reads = self.writes = 0

    def request(self, method: str, path: str, params: Any = None, body: Any = None, **kw: Any) -> Any:
        if method == "GET":
            self.reads += 1
            return self.node
        self.writes += 1
        if path.endswith("/status"):
            have = {c["type"]: c for c in self.node["status"]["conditions"]}
            have.update({c["type"]: c for c in body["status"]["conditions"]})
            self.node["status"]["conditions"] = list(have.values())
            return self.node
        return body


def bundled() -> PolicySet:
    where = bundled_policies()
    assert where is not None
    return load_policies([where], catalog())


def reporter_hour(ps: PolicySet, firing: str | None) -> NodeApi:
    """360 cycles of 10 s: every bundled policy evaluated each cycle, `firing` firing."""
    api, clock = NodeApi(), FakeClock(1_764_660_000.0)
    node = NodeReporter("node-1", lambda: api, clock.now)
    for _ in range(360):
        prs = []
        for p in ps.policies:
            phase = Phase.FIRING if p.name == firing else Phase.OK
            prs.append(PolicyReport(p, conditions={"host": Condition(p.name, "host", phase)}))
        node.cycle(CycleReport(clock.now(), "live", False, {}, prs), ps)
        clock.advance(10)
    return api


def best(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    # The reporter logs each condition it sets; the benchmark prints its own counts.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        make_host(root, args.pods)
        host = HostRoot(root)
        docker_client = type("C", (), {"api": FakeDockerApi(args.pods)})()
        docker_s = best(lambda: DockerInventory(docker_client, host).refresh(), args.runs)

        clock = FakeClock()
        client = KubeClient(
            KubeCredentials(server="https://k:6443", token="t"), pool=Pool(pod_list(args.pods))
        )
        source = KubeInventorySource(host, clock, client, "node-1", None, "/nonexistent")
        inv = source()
        assert len(inv.containers()) == 2 * args.pods
        assert all(c.pod is not None and c.pod.source == "api" for c in inv.containers())
        steady_s = best(source, args.runs)

        def relist() -> None:
            clock.advance(source.relist_seconds)
            source()

        relist_s = best(relist, args.runs)

        # A quiet hour of 10 s cycles: API calls made.
        counting = KubeClient(
            KubeCredentials(server="https://k:6443", token="t"), pool=Pool(pod_list(args.pods))
        )
        quiet = KubeInventorySource(host, FakeClock(), counting, "node-1", None, "/nonexistent")
        for _ in range(360):
            quiet()
            quiet.clock.advance(10)  # type: ignore[attr-defined]  # a FakeClock
    ps = bundled()
    quiet_node = reporter_hour(ps, None)
    firing_node = reporter_hour(ps, "negative-dentries")
    print(f"pods {args.pods} (containers {2 * args.pods}), best of {args.runs}")
    rows = (
        (f"docker refresh (baseline, {args.pods} containers)", docker_s),
        ("cri, steady (no API call)", steady_s),
        ("cri, relist this cycle", relist_s),
    )
    for label, seconds in rows:
        print(f"  {label:<44} {seconds * 1e3:8.2f} ms  ratio {seconds / docker_s:5.2f}")
    print(f"  quiet hour of 10 s cycles: {counting.reads} reads, {counting.writes} writes")
    print(
        f"  node reporter, quiet hour ({len(ps.policies)} policies): "
        f"{quiet_node.reads} reads, {quiet_node.writes} writes"
    )
    print(
        "  node reporter, an hour with negative-dentries firing: "
        f"{firing_node.reads} reads, {firing_node.writes} writes"
    )


if __name__ == "__main__":
    main()
