"""containerd issue #2421 on a real Kubernetes node: leaked FIFO sets beside running pods'.

The CRI plugin gives every container a fifo root of its own,
`<containerd state>/io.containerd.grpc.v1.cri/containers/<id>/io`, where
`cio.NewFIFOSetInDir` makes the container's `<random>/<id>-stdout|stderr` set, held open by its
shim and by containerd's log reader. Two running pods: `web` logs a line a second (its live set
is young: every write moves the FIFOs' mtime), `quiet` said one line and sleeps, and its live
set is backdated an hour, so only the open-FIFO and known-id rules can keep it. In each one's
fifo root, beside its live set, 4 leaked sets are planted (FIFOs named after ids no containerd
knows, backdated an hour, as a real pile is).

`remediator once --fifo-root <root>=<the CRI containerd's socket>` (both roots) with a policy
on `orphan_fifo_dirs` runs `clean-fifos`: every planted set is gone, every live set is still
there (same inode) and both pods keep running and logging as the same pods. containerd's
default root (the system containerd's /run/containerd/fifo, also judged) is left as it was.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import remediator_json
from tests.real.kube_images import busybox_deployment
from tests.real.kube_node import KubeNode, kube_node_running
from tests.real.test_kube_dentries_real import pod_log, wait_log

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.timeout(1200)]

NS = "rmd-fifo"
LEAKED_PER_ROOT = 4
HOUR = 3600.0
SYSTEM_FIFO_ROOT = Path("/run/containerd/fifo")

POLICY = """\
apiVersion: remediator.io/v1
kind: Policy
metadata:
  name: cri-fifos
spec:
  mode: enforce
  interval: 1m
  watch:
    probe: fifos
    metric: orphan_fifo_dirs
    above: 3
    clearBelow: 1
    for: 0s
  actions:
    - action: clean-fifos
      params: {minAge: 10m}
"""


LOGGING = "echo ready; while true; do echo tick; sleep 1; done"
QUIET = "echo ready; exec sleep 3600"


def deployment(name: str, script: str) -> dict[str, Any]:
    return busybox_deployment(NS, name, ["/bin/sh", "-c", script])


def io_root(node: KubeNode, pod: dict[str, Any]) -> Path:
    cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    return node.base / "cd" / "state" / "io.containerd.grpc.v1.cri" / "containers" / cid / "io"


def backdate(d: Path, age: float) -> None:
    t = time.time() - age
    for p in d.iterdir():
        os.utime(p, (t, t), follow_symlinks=False)
    os.utime(d, (t, t), follow_symlinks=False)


def leak(root: Path) -> Path:
    """One FIFO set as a client that never cleans up leaves it, an hour old."""
    d = Path(tempfile.mkdtemp(dir=root))
    orphan = secrets.token_hex(32)
    for stream in ("stdin", "stdout", "stderr"):
        os.mkfifo(d / f"{orphan}-{stream}")
    backdate(d, HOUR)
    return d


def listing(root: Path) -> dict[str, int]:
    """Entries of a fifo root, by name -> inode."""
    try:
        return {e.name: e.inode() for e in os.scandir(root)}
    except FileNotFoundError:
        return {}


@pytest.fixture(scope="module")
def node() -> Iterator[KubeNode]:
    with kube_node_running() as n:
        yield n


def test_clean_fifos_removes_only_the_leaked_sets_beside_running_pods(
    node: KubeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMEDIATOR_KUBE_NODE_NAME", node.node_name)
    monkeypatch.setenv("REMEDIATOR_CRI_CONTAINERD_SOCKET", str(node.containerd_socket))
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(POLICY)
    node.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}])
    node.apply([deployment("web", LOGGING), deployment("quiet", QUIET)])
    pods = [node.wait_running(NS, f"app={n}", 1)[0] for n in ("web", "quiet")]
    for p in pods:
        wait_log(p, "ready", 30)
    roots = [io_root(node, p) for p in pods]
    live = {r: listing(r) for r in roots}
    for r, names in live.items():
        assert len(names) == 1, f"{r}: expected the container's one live set, found {sorted(names)}"
        (name,) = names
        assert any(f.name.endswith("-stdout") for f in (r / name).iterdir()), list((r / name).iterdir())
    (quiet_set,) = live[roots[1]]
    backdate(roots[1] / quiet_set, HOUR)  # only its mtimes: the quiet pod writes nothing more
    system_before = listing(SYSTEM_FIFO_ROOT)
    leaked = [leak(r) for r in roots for _ in range(LEAKED_PER_ROOT)]
    try:
        args = [a for r in roots for a in ("--fifo-root", f"{r}={node.containerd_socket}")]
        doc = remediator_json(
            "once",
            "--kubeconfig",
            str(node.kubeconfig),
            *args,
            policies=policies,
            state=tmp_path / "state",
            timeout=240,
        )
        (pol,) = doc["policies"]
        reading = doc["readings"]["fifos"]
        assert reading["values"]["orphan_fifo_dirs"] >= len(leaked), reading["values"]
        (act,) = pol["actions"]
        assert (act["action"], act["result"]["outcome"]) == ("clean-fifos", "applied"), act["result"]

        gone = [d for d in leaked if not d.exists()]
        assert gone == leaked, f"left: {[str(d) for d in leaked if d.exists()]}"
        for r, names in live.items():
            assert listing(r) == names, f"{r}: the live set changed: {names} -> {listing(r)}"
        per_root = act["result"]["after"]["roots"]
        assert per_root[str(roots[0])]["kept"] == {"too_young": 1}, per_root
        kept_quiet = per_root[str(roots[1])]["kept"]
        assert set(kept_quiet) <= {"open", "known_to_containerd"}, per_root
        assert sum(kept_quiet.values()) == 1, per_root
        assert listing(SYSTEM_FIFO_ROOT) == system_before

        # The pods run on as the same pods; the logging one still logs through its FIFOs.
        for p in pods:
            before = pod_log(p).count("tick")
            (now,) = node.wait_running(NS, f"app={p['metadata']['labels']['app']}", 1, timeout=10)
            assert now["metadata"]["uid"] == p["metadata"]["uid"]
            assert now["status"]["containerStatuses"][0]["restartCount"] == 0
            deadline = time.monotonic() + 10
            while p is pods[0] and pod_log(p).count("tick") <= before:
                assert time.monotonic() < deadline, f"{p['metadata']['name']} stopped logging"
                time.sleep(0.2)
        print(
            f"\nleaked {len(leaked)} sets in {len(roots)} CRI fifo roots: removed {len(gone)}; "
            f"result {act['result']}"
        )
    finally:
        for d in leaked:  # whatever the outcome, no planted set outlives the test
            if d.exists():
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()
        node.kubectl("delete", "namespace", NS, "--wait=false")
    assert not any(d.exists() for d in leaked)
