"""The dentries, limits and containers probes against the real host, kernel and dockerd.

Case "shared kernel limits": a container's inotify watches count against the host-wide
per-uid limit; the limits probe must see them and attribute them to that container. The
probes only read: every sysctl they look at reads the same afterwards.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from remediator.clock import SystemClock
from remediator.host import HostRoot
from remediator.probes.base import ProbeContext
from remediator.probes.containers import make_inventory_factory
from remediator.probes.dentries import DentriesProbe
from remediator.probes.inventory import SnapshotInventory
from remediator.probes.limits import (
    SYSCTLS,
    LimitsProbe,
    group_inotify_instances,
    kcmp_file_order,
    scan_processes,
)
from remediator.probes.slab import parse_slabinfo, parse_slub_sysfs
from tests.real.conftest import OTHER_UID, MakeContainer, run_holder

pytestmark = pytest.mark.real

HOST = HostRoot()
DOCKER_URL = "unix:///var/run/docker.sock"


def read_sysctls() -> dict[str, str]:
    return {key: HOST.read_sysctl(key) for key in SYSCTLS}


def test_probes_attribute_container_inotify_watches_on_the_real_host(
    make_container: MakeContainer, holder_dir: Path
) -> None:
    # Two instances x three watches as root; one instance x two watches as an unused uid.
    as_root = run_holder(make_container, holder_dir, ("2", "/tmp", "/bin", "/etc"))
    as_other = run_holder(make_container, holder_dir, ("1", "/tmp", "/etc"), user=f"{OTHER_UID}:{OTHER_UID}")
    before = read_sysctls()
    ctx = ProbeContext(HOST, SystemClock(), make_inventory_factory(DOCKER_URL, HOST, 30.0))

    inventory = ctx.inventory()
    assert isinstance(inventory, SnapshotInventory) and inventory.error is None
    refs = {c.id: c for c in inventory.containers()}
    ref = refs[as_root.id]
    pid = as_root.attrs["State"]["Pid"]
    assert (ref.name, ref.pid, ref.image) == (as_root.name, pid, "remediator-test/busybox:latest")
    assert ref.labels["remediator.test"] == "1"
    assert ref.cgroup is not None and as_root.id in ref.cgroup
    assert inventory.container_of_pid(pid) == ref
    assert inventory.container_of_cgroup(ref.cgroup) == ref
    assert inventory.container_of_pid(os.getpid()) is None

    limits = LimitsProbe().read(ctx)
    assert limits.error is None
    per_container = {s.container.id: dict(s.values) for s in limits.containers}
    # fds: stdin (/dev/null), stdout and stderr (pipes to dockerd), the inotify instances.
    assert per_container[as_root.id] == {
        "file_handles": 5,
        "tasks": 1,
        "inotify_watches": 6,
        "inotify_instances": 2,
        "epoll_watches": 0,
        "pipe_pages": 32,  # stdout and stderr: two pipes of 16 pages
        "conntrack_entries": 0,  # the table is far from half full: not attributed
    }
    assert per_container[as_other.id] == {
        "file_handles": 4,
        "tasks": 1,
        "inotify_watches": 2,
        "inotify_instances": 1,
        "epoll_watches": 0,
        "pipe_pages": 32,
        "conntrack_entries": 0,
    }
    by_uid = limits.detail["inotify_by_uid"]
    assert by_uid[str(OTHER_UID)] == {"instances": 1, "watches": 2}
    assert by_uid["0"]["instances"] >= 2 and by_uid["0"]["watches"] >= 6
    assert limits.values["inotify_watches_max_uid"] >= 6
    assert limits.detail["scan"]["fd_dedup"] == "kcmp"
    # The limits every host has (the optional pools' sysctls are there too, and some move).
    assert {k: limits.detail["sysctls"][k] for k in SYSCTLS} == {
        key: int(value) for key, value in before.items()
    }
    assert limits.limits["file_handles"] == int(before["fs.file-max"])
    assert limits.limits["inotify_watches_max_uid"] == int(before["fs.inotify.max_user_watches"])
    assert limits.limits["tasks"] == min(int(before["kernel.threads-max"]), int(before["kernel.pid_max"]))
    assert 0 < limits.values["file_handles"] < limits.limits["file_handles"]
    assert limits.values["tasks"] >= len([p for p in os.listdir(HOST.proc) if p.isdigit()])

    dentries = DentriesProbe().read(ctx)
    assert dentries.error is None
    assert dentries.values["total"] >= dentries.values["unused"] >= dentries.values["negative"]
    assert dentries.values["slab_bytes"] > 0
    assert dentries.detail["cgroup_version"] in (1, 2)
    slab = {s.container.id: s.values["slab_reclaimable_bytes"] for s in dentries.containers}
    assert slab[as_root.id] > 0  # its processes' dentries, inodes and (v1) other kernel memory

    assert read_sysctls() == before


@pytest.fixture
def inotify_fds(tmp_path: Path) -> Iterator[tuple[int, int, int]]:
    """(fd, its dup, another instance watching the same directory) in this process."""
    libc = ctypes.CDLL(None, use_errno=True)
    opened: list[int] = []
    try:
        for _ in range(2):
            fd = libc.inotify_init1(os.O_CLOEXEC)
            assert fd >= 0, os.strerror(ctypes.get_errno())
            opened.append(fd)
            assert libc.inotify_add_watch(fd, str(tmp_path).encode(), 0x100) == 1  # IN_CREATE
        opened.append(os.dup(opened[0]))
        yield opened[0], opened[2], opened[1]
    finally:
        for fd in opened:
            os.close(fd)


def test_kcmp_counts_a_duplicated_inotify_fd_once(inotify_fds: tuple[int, int, int]) -> None:
    first, dup, other = inotify_fds
    order = kcmp_file_order()
    assert order is not None
    scan = scan_processes(HOST, None)
    mine = [f for f in scan.inotify_fds if f.pid == os.getpid()]
    assert sorted(f.fd for f in mine) == sorted((first, dup, other))
    assert len({f.signature for f in mine}) == 1  # identical watch lists: only kcmp tells
    instances = group_inotify_instances(mine, order)
    groups = sorted(sorted(f.fd for f in instance) for instance in instances)
    assert groups == sorted([sorted((first, dup)), [other]])


def test_the_dentry_slab_from_sysfs_is_the_slabinfo_line() -> None:
    """SLUB's sysfs counters of the `dentry` cache and its /proc/slabinfo line are the same
    numbers, read a moment apart: only the object counts may move in between."""
    directory = HOST.sys / "kernel" / "slab" / "dentry"
    assert directory.is_dir(), "this kernel has no SLUB sysfs: the probe would read slabinfo"
    for _ in range(5):  # a moment of churn can move the counts apart; a steady read agrees
        sysfs = parse_slub_sysfs(directory, "dentry")
        line = parse_slabinfo(HOST.read_text(HOST.proc / "slabinfo"), only="dentry")["dentry"]
        assert sysfs is not None
        if abs(sysfs.num_objs - line.num_objs) <= max(64, line.num_objs // 100):
            break
    assert (sysfs.objsize, sysfs.objperslab, sysfs.pagesperslab) == (
        line.objsize,
        line.objperslab,
        line.pagesperslab,
    )
    assert abs(sysfs.num_objs - line.num_objs) <= max(64, line.num_objs // 100)
    assert abs(sysfs.active_objs - line.active_objs) <= max(64, line.active_objs // 100)
    assert abs(sysfs.num_slabs - line.num_slabs) <= max(4, line.num_slabs // 100)
    reading = DentriesProbe().read(ProbeContext(HOST, SystemClock()))
    assert reading.detail["slab"]["source"] == "sysfs"
