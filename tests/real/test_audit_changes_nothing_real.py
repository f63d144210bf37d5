"""Audit mode must never change the host. Every action remediator has is forced to fire in
enforce mode against real targets (a dentry-trashing container, a leaked fifo dir in the real
/run/containerd/fifo, a real sysctl), and `remediator audit` plans and re-checks all of them:
afterwards no container, sysctl, fifo or cache has changed."""

from __future__ import annotations

import json
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from remediator.host import HostRoot
from remediator.probes.dentries import parse_dentry_state
from tests.helpers import remediator_json
from tests.real.conftest import MakeContainer

pytestmark = pytest.mark.real
HOST = HostRoot()
SYSCTL = "fs.inotify.max_user_instances"

POLICIES = """\
apiVersion: remediator.io/v1
kind: Policy
metadata: {name: force-reclaim}
spec:
  mode: enforce
  watch: {probe: dentries, metric: negative, above: 0}
  actions: [{action: reclaim-cgroup, params: {target: top, rankBy: slab_reclaimable_bytes}}]
---
apiVersion: remediator.io/v1
kind: Policy
metadata: {name: force-recreate}
spec:
  mode: enforce
  watch: {probe: dentries, metric: negative, above: 0}
  actions: [{action: recreate-container, params: {target: top, rankBy: slab_reclaimable_bytes}}]
---
apiVersion: remediator.io/v1
kind: Policy
metadata: {name: force-drop}
spec:
  mode: enforce
  watch: {probe: dentries, metric: negative, above: 0}
  actions: [{action: drop-caches, params: {what: all}}]
---
apiVersion: remediator.io/v1
kind: Policy
metadata: {name: force-sysctl}
spec:
  mode: enforce
  watch: {probe: limits, metric: inotify_instances_max_uid, above: 0}
  actions: [{action: raise-sysctl, params: {key: fs.inotify.max_user_instances, ceiling: 1M}}]
---
apiVersion: remediator.io/v1
kind: Policy
metadata: {name: force-fifos}
spec:
  mode: enforce
  watch: {probe: fifos, metric: orphan_fifo_dirs, above: 0}
  actions: [{action: clean-fifos}]
"""


@pytest.fixture
def leaked_fifo_dir() -> Iterator[Path]:
    """A leaked-looking fifo dir in the real /run/containerd/fifo: FIFOs named after an id no
    containerd knows, an hour old, held open by nobody. Removed by the test itself after."""
    root = HOST.run / "containerd" / "fifo"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    d = root / f"rmdtest{secrets.token_hex(4)}"
    d.mkdir(mode=0o700)
    fake_id = secrets.token_hex(32)
    old = time.time() - 3600
    try:
        for stream in ("stdin", "stdout", "stderr"):
            os.mkfifo(d / f"{fake_id}-{stream}", 0o700)
            os.utime(d / f"{fake_id}-{stream}", (old, old))
        os.utime(d, (old, old))
        yield d
    finally:
        for entry in d.iterdir() if d.is_dir() else ():
            if stat.S_ISFIFO(entry.lstat().st_mode):
                entry.unlink()
        if d.is_dir():
            d.rmdir()


def negative_dentries() -> int:
    return parse_dentry_state(HOST.read_text(HOST.proc / "sys/fs/dentry-state")).nr_negative or 0


def test_audit_plans_every_action_and_changes_nothing(
    make_container: MakeContainer, leaked_fifo_dir: Path, tmp_path: Path
) -> None:
    # The trasher from the dentry case report: failed lookups of paths that do not exist.
    trasher = make_container(
        command=(
            "sh",
            "-c",
            "i=0; while [ $i -lt 30000 ]; do [ -e /tmp/nx-$i ]; i=$((i+1)); done; echo trashed; sleep 3600",
        )
    )
    deadline = time.monotonic() + 60
    while b"trashed" not in trasher.logs():
        assert time.monotonic() < deadline, "the trasher did not finish"
        time.sleep(0.2)
    bystander = make_container()

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "force.yaml").write_text(POLICIES)
    fifos_before = sorted(p.name for p in leaked_fifo_dir.iterdir())
    sysctl_before = HOST.read_sysctl(SYSCTL)
    negative_before = negative_dentries()

    doc = remediator_json("audit", policies=policies, state=tmp_path / "state", timeout=300)

    outcomes = {
        p["name"]: [(a["action"], a["result"]["outcome"]) for a in p["actions"]] for p in doc["policies"]
    }
    assert outcomes == {
        "force-reclaim": [("reclaim-cgroup", "would_apply")],
        "force-recreate": [("recreate-container", "would_apply")],
        "force-drop": [("drop-caches", "would_apply")],
        "force-sysctl": [("raise-sysctl", "would_apply")],
        "force-fifos": [("clean-fifos", "would_apply")],
    }, json.dumps(doc["policies"], indent=1)[:4000]
    plans = {p["name"]: p["actions"][0]["plan"] for p in doc["policies"]}
    # The container actions picked the trasher, not the bystander.
    assert plans["force-reclaim"]["target"]["id"] == trasher.id
    assert plans["force-recreate"]["target"]["id"] == trasher.id
    # clean-fifos plans the root (the walk judges each directory when it runs), with our leak in
    # the probe's estimate.
    (fifo_plan_root,) = plans["force-fifos"]["expect"]["roots"]
    assert fifo_plan_root["path"] == str(leaked_fifo_dir.parent)
    assert fifo_plan_root["estimate"] >= 1

    # And nothing changed.
    for c, cid in ((trasher, trasher.id), (bystander, bystander.id)):
        c.reload()
        assert (c.id, c.status) == (cid, "running")
    assert HOST.read_sysctl(SYSCTL) == sysctl_before
    assert sorted(p.name for p in leaked_fifo_dir.iterdir()) == fifos_before
    # A cache drop or a cgroup reclaim would take most of the trasher's ~30k negative dentries.
    assert negative_dentries() >= negative_before * 0.9
    assert not (tmp_path / "state" / "state.db").exists()
