"""cap-memory on the real kernel and dockerd, driven by the CLI: the dentry case report's trasher
grows its dentry slab; `remediator once` lowers its memory limit to anonymous memory + headroom
(the kernel reclaims its slab to fit), verified in the cgroup; `remediator restore-memory` puts
the original limit back. A bystander's limit is never touched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from docker.models.containers import Container

from remediator.actions.cap_memory import CgroupMemory
from remediator.host import HostRoot
from tests.helpers import remediator_json
from tests.real import engines
from tests.real.conftest import MakeContainer

pytestmark = pytest.mark.real
# Every test here runs against each Docker engine (tests/real/engines.py).
engine = engines.engine
docker_client = engines.docker_client
busybox_image = engines.busybox_image
docker_url = engines.docker_url


HOST = HostRoot()
MiB = 1024 * 1024

POLICY = """\
apiVersion: remediator.io/v1
kind: Policy
metadata:
  name: trasher-slab
spec:
  mode: enforce
  watch:
    probe: dentries
    metric: slab_reclaimable_bytes
    scope: container
    above: 16Mi
  containers:
    include: [{name: %(name)s}]
  actions:
    - action: cap-memory
      params: {target: subject, headroom: 32Mi}
"""


def kmem(c: Container) -> int:
    cg = CgroupMemory(HOST, int(c.attrs["State"]["Pid"]))
    name = "memory.kmem.usage_in_bytes" if cg.version == 1 else "memory.stat"
    text = HOST.read_text(cg.dir / name)
    if cg.version == 1:
        return int(text)
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("slab "))


def limit(c: Container) -> int | None:
    c.reload()
    return CgroupMemory(HOST, int(c.attrs["State"]["Pid"])).limit()


def cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "remediator",
            *args,
            "--state-dir",
            str(tmp_path / "state"),
            "--policies",
            str(tmp_path / "policies"),
            "--log-level",
            "error",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cap_memory_lowers_the_trashers_limit_and_restore_puts_it_back(
    make_container: MakeContainer, tmp_path: Path, docker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMEDIATOR_DOCKER_URL", docker_url)
    trasher = make_container(mem_limit="1g")
    bystander = make_container(mem_limit="1g")
    script = "i=0; while [ $i -lt 200000 ]; do [ -e /tmp/t-$i ]; i=$((i+1)); done"
    assert trasher.exec_run(["sh", "-c", script]).exit_code == 0
    before_kmem = kmem(trasher)
    assert before_kmem > 32 * MiB
    assert limit(trasher) == limit(bystander) == 1024 * MiB
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(POLICY % {"name": trasher.name})

    doc: dict[str, Any] = remediator_json("once", policies=tmp_path / "policies", state=tmp_path / "state")
    (a,) = doc["policies"][0]["actions"]
    r = a["result"]
    assert (a["action"], a["mode"], r["outcome"]) == ("cap-memory", "enforce", "applied"), r["message"]
    assert r["verified"] is True
    capped = r["after"]["memory"]
    anon = r["before"]["anon"]
    assert anon + 32 * MiB <= capped < anon + 32 * MiB + 8 * MiB  # the floor, page-rounded (min 6M)
    assert limit(trasher) == capped
    assert kmem(trasher) < capped and kmem(trasher) < before_kmem  # the slab was reclaimed to fit
    assert limit(bystander) == 1024 * MiB

    restored = cli("restore-memory", trasher.name, tmp_path=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert "restored the memory limit" in restored.stdout
    assert limit(trasher) == 1024 * MiB
    trasher.reload()
    assert trasher.attrs["HostConfig"]["Memory"] == 1024 * MiB
    # Restored once: a second restore has nothing recorded.
    again = cli("restore-memory", trasher.name, tmp_path=tmp_path)
    assert again.returncode == 2 and "no recorded memory cap" in again.stderr
    assert limit(bystander) == 1024 * MiB


def test_restore_of_an_unlimited_container_says_docker_cannot_unset(
    make_container: MakeContainer, tmp_path: Path, docker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMEDIATOR_DOCKER_URL", docker_url)
    c = make_container()
    assert c.attrs["HostConfig"]["Memory"] == 0
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(
        (POLICY % {"name": c.name}).replace("above: 16Mi", "above: 0")
    )
    assert (
        c.exec_run(
            ["sh", "-c", "i=0; while [ $i -lt 2000 ]; do [ -e /tmp/u-$i ]; i=$((i+1)); done"]
        ).exit_code
        == 0
    )
    doc = remediator_json("once", policies=tmp_path / "policies", state=tmp_path / "state")
    (a,) = doc["policies"][0]["actions"]
    assert a["result"]["outcome"] == "applied" and a["result"]["verified"] is True, a["result"]["message"]
    restored = cli("restore-memory", c.name, tmp_path=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert "Docker cannot remove one" in restored.stdout
    total = next(
        int(x.split()[1]) * 1024
        for x in HOST.read_text(HOST.proc / "meminfo").splitlines()
        if x.startswith("MemTotal:")
    )
    got = limit(c)
    assert got is not None and got >= total
