"""The plain containerd namespaces' inventory on the system containerd: a `ctr run` container in
namespace `default` (not moby, not k8s.io), as in the fifo case report's host.

* `ContainerdNamespacesSource` lists it with its init pid, its memory cgroup (ctr's default
  `/default/<id>`), labels and image, and no container of `moby` (Docker's own) or `k8s.io`;
* a child process of it is attributed to it by its cgroup path (the id is not 64 hex digits);
* `node_inventory_factory` with `REMEDIATOR_CONTAINERD_NAMESPACES=on` puts it beside Docker's.

`--null-io`: no fifo directory is made (a detached `ctr run` would otherwise leave one in
/run/containerd/fifo). The container is killed and deleted afterwards, and that is checked.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator

import pytest

from remediator.clock import SystemClock
from remediator.host import HostRoot
from remediator.probes.containerd import CtrCli
from remediator.probes.containerd_inventory import ContainerdNamespacesSource
from remediator.probes.inventory import SnapshotInventory
from remediator.probes.inventory_multi import node_inventory_factory
from remediator.settings import Settings
from tests.real.conftest import CONTAINER_PREFIX, CONTAINERD_SOCK, CTR_NAMESPACE

pytestmark = pytest.mark.real

HOST = HostRoot()
CTR = ["ctr", "--address", str(CONTAINERD_SOCK), "--namespace", CTR_NAMESPACE]


def ctr(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*CTR, *args], capture_output=True, text=True, timeout=60, check=False)
    if check and res.returncode:
        raise AssertionError(f"ctr {' '.join(args)}: {res.stderr.strip()}")
    return res


@pytest.fixture
def container(ctr_image: str) -> Iterator[str]:
    name = f"{CONTAINER_PREFIX}ctr-inv-{secrets.token_hex(3)}"
    fifo_root = CONTAINERD_SOCK.parent / "fifo"
    fifos_before = set(os.listdir(fifo_root)) if fifo_root.is_dir() else set()
    ctr(
        "run", "-d", "--null-io", "--label", "rmd.test=ctr-inventory", ctr_image, name,
        "/bin/sh", "-c", "sleep 600 & exec sleep 601",
    )  # fmt: skip
    try:
        yield name
    finally:
        ctr("tasks", "kill", "-s", "SIGKILL", name, check=False)
        for _ in range(100):
            deleted = ctr("tasks", "delete", name, check=False)
            if deleted.returncode == 0 or "not found" in deleted.stderr:
                break
            time.sleep(0.1)
        ctr("containers", "delete", name, check=False)
        assert name not in ctr("containers", "ls", "-q").stdout.split()
        fifos_after = set(os.listdir(fifo_root)) if fifo_root.is_dir() else set()
        assert fifos_after <= fifos_before, f"fifo dirs left: {fifos_after - fifos_before}"


def test_a_ctr_container_is_listed_and_its_processes_attributed(container: str, ctr_image: str) -> None:
    source = ContainerdNamespacesSource(HOST, CtrCli(), str(CONTAINERD_SOCK))
    deadline = time.monotonic() + 10
    while True:  # ctr run -d returns before the task is listed
        refs = {r.name: r for r in source.snapshot()}
        ref = refs.get(f"{CTR_NAMESPACE}/{container}")
        if ref is not None:
            break
        assert time.monotonic() < deadline, refs
        time.sleep(0.2)
    assert ref.runtime == "containerd" and ref.id == container
    assert ref.cgroup == f"/{CTR_NAMESPACE}/{container}", ref.cgroup
    assert ref.labels.get("rmd.test") == "ctr-inventory"
    assert ref.image == ctr_image
    assert not [n for n in refs if n.startswith(("moby/", "k8s.io/"))], sorted(refs)

    # Every process of the container, the init's child included, is the container's.
    inv = SnapshotInventory(tuple(refs.values()), HOST)
    memory = HOST.cgroup / "memory" if (HOST.cgroup / "memory").is_dir() else HOST.cgroup
    procs_file = memory / CTR_NAMESPACE / container / "cgroup.procs"
    deadline = time.monotonic() + 10
    while len(procs := [int(p) for p in procs_file.read_text().split()]) < 2:
        assert time.monotonic() < deadline, procs  # the shell forks its sleep a moment after start
        time.sleep(0.1)
    for pid in procs:
        got = inv.container_of_pid(pid)
        assert got is not None and got.name == ref.name, (pid, got)
    assert inv.container_of_pid(os.getpid()) is None

    # Wired behind the node inventory, beside Docker's.
    factory = node_inventory_factory(Settings(containerd_namespaces=True), HOST, SystemClock())
    node_inv = factory()
    assert node_inv.error is None or "containerd" not in node_inv.error, node_inv.error
    names = {c.name: c.runtime for c in node_inv.containers()}
    assert names.get(ref.name) == "containerd", names
