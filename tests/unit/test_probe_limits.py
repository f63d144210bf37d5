"""The limits probe: parsers on captured kernel files, the /proc scan on fixture trees."""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path
from typing import Any

import pytest

from remediator.clock import FakeClock
from remediator.host import HostRoot
from remediator.model import ContainerRef, Reading
from remediator.probes.base import ProbeContext
from remediator.probes.containers import StaticInventory
from remediator.probes.limits import (
    FileNr,
    FileOrder,
    InotifyFd,
    InotifyWatch,
    LimitsProbe,
    group_inotify_instances,
    inotify_by_uid,
    parse_file_nr,
    parse_inotify_fdinfo,
    parse_loadavg_threads,
    parse_proc_status,
    scan_processes,
)
from tests.helpers import make_host

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
PROC = FIXTURES / "proc" / "linux-6.18"


def fixture(rel: str) -> str:
    return (PROC / rel).read_text()


# --- parsers -------------------------------------------------------------------------------


def test_parse_file_nr_captured_6_18() -> None:
    assert parse_file_nr(fixture("sys/fs/file-nr")) == FileNr(737, 0, 2466183)


@pytest.mark.parametrize("text", ["", "1 0", "1 0 2 3", "a 0 2"])
def test_parse_file_nr_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="file-nr"):
        parse_file_nr(text)


def test_parse_inotify_fdinfo_captured_container_instance() -> None:
    watches = parse_inotify_fdinfo(fixture("8082/fdinfo/3"))
    # holder watched /tmp, /bin, /etc: three watches, newest first, numbers in hex.
    assert [w.wd for w in watches] == [3, 2, 1]
    assert watches[0] == InotifyWatch(wd=3, ino=0x168115, sdev=0x3D, mask=0x302)
    assert watches[2].ino == 0x1662D2


def test_parse_inotify_fdinfo_captured_containerd() -> None:
    assert parse_inotify_fdinfo(fixture("3358/fdinfo/8")) == (
        InotifyWatch(wd=1, ino=0x166296, sdev=0xFE00000, mask=0xFC6),
    )


def test_parse_inotify_fdinfo_of_other_fd_has_no_watches() -> None:
    assert parse_inotify_fdinfo(fixture("8082/fdinfo/0")) == ()


def test_parse_inotify_fdinfo_rejects_malformed_watch_line() -> None:
    with pytest.raises(ValueError, match="inotify line"):
        parse_inotify_fdinfo("pos:\t0\ninotify wd:zz ino:1 sdev:2 mask:3\n")


def test_parse_proc_status_captured() -> None:
    holder = parse_proc_status(fixture("8277/status"))
    assert (holder.name, holder.uids, holder.euid, holder.threads) == (
        "holder",
        (1000, 1000, 1000, 1000),
        1000,
        1,
    )
    containerd = parse_proc_status(fixture("3358/status"))
    assert (containerd.name, containerd.euid, containerd.threads) == ("containerd", 0, 9)


def test_parse_proc_status_effective_uid_is_the_second_field() -> None:
    status = parse_proc_status("Name:\tx\nUid:\t1000\t0\t0\t0\nThreads:\t2\n")
    assert status.euid == 0


def test_parse_proc_status_requires_uid() -> None:
    with pytest.raises(ValueError, match="no Uid"):
        parse_proc_status("Name:\tx\n")


def test_parse_loadavg_threads_captured() -> None:
    assert parse_loadavg_threads(fixture("loadavg")) == 176


# --- inotify instances ---------------------------------------------------------------------

W1 = (InotifyWatch(1, 0x10, 0x3D, 0x302),)
W2 = (InotifyWatch(1, 0x11, 0x3D, 0x302), InotifyWatch(2, 0x12, 0x3D, 0x302))


def test_group_instances_without_comparer_counts_every_fd() -> None:
    fds = [InotifyFd(10, 3, 0, W1), InotifyFd(11, 3, 0, W1), InotifyFd(12, 4, 0, W2)]
    assert len(group_inotify_instances(fds)) == 3


def file_order(files: dict[tuple[int, int], int], calls: list[object] | None = None) -> FileOrder:
    """An ordering like kcmp's over made-up open files: (pid, fd) -> file number; a (pid, fd)
    not in `files` belongs to a process that exited (None: cannot tell)."""

    def order(a: InotifyFd, b: InotifyFd) -> int | None:
        if calls is not None:
            calls.append(((a.pid, a.fd), (b.pid, b.fd)))
        fa, fb = files.get((a.pid, a.fd)), files.get((b.pid, b.fd))
        if fa is None or fb is None:
            return None
        return (fa > fb) - (fa < fb)

    return order


def test_group_instances_merges_only_what_the_order_calls_the_same_file() -> None:
    parent, child, other = InotifyFd(10, 3, 0, W1), InotifyFd(11, 3, 0, W1), InotifyFd(12, 5, 0, W1)
    # 11 inherited 10's fd across fork; 12 has its own instance with the same watches.
    order = file_order({(10, 3): 7, (11, 3): 7, (12, 5): 2})
    assert group_inotify_instances([other, child, parent], order) == [(parent, child), (other,)]


def test_group_instances_keeps_apart_what_cannot_be_compared() -> None:
    fds = [InotifyFd(10, 3, 0, W1), InotifyFd(11, 3, 0, W1), InotifyFd(12, 3, 0, W1)]
    order = file_order({(10, 3): 1, (12, 3): 1})  # pid 11 exited during the scan
    assert group_inotify_instances(fds, order) == [(fds[0], fds[2]), (fds[1],)]


def test_group_instances_sorts_instead_of_comparing_every_pair() -> None:
    # 2,000 workers each with its own instance on the same files, plus 500 forked children
    # sharing their parent's: the case that made pairwise comparison quadratic.
    fds = [InotifyFd(1000 + i, 3, 0, W1) for i in range(2000)]
    files = {(f.pid, f.fd): (i * 7919) % 2000 for i, f in enumerate(fds)}
    children = [InotifyFd(5000 + i, 3, 0, W1) for i in range(500)]
    files.update({(c.pid, c.fd): files[(1000 + i, 3)] for i, c in enumerate(children)})
    calls: list[object] = []
    instances = group_inotify_instances(fds + children, file_order(files, calls))
    assert len(instances) == 2000
    assert sorted(len(i) for i in instances)[-500:] == [2] * 500
    assert instances[0] == (fds[0], children[0])
    n = len(fds) + len(children)
    assert len(calls) < 3 * n * math.log2(n)  # pairwise would be ~n^2/2 = 3.1M


def test_group_memo_skips_kcmp_for_an_unchanged_group_and_redoes_a_changed_one() -> None:
    fds = [InotifyFd(1000 + i, 3, 0, W1) for i in range(50)]
    files = {(f.pid, f.fd): i // 2 for i, f in enumerate(fds)}  # pairs share an instance
    memo: dict[Any, Any] = {}
    calls: list[object] = []
    first = group_inotify_instances(fds, file_order(files, calls), memo)
    assert len(first) == 25 and calls
    calls.clear()
    assert group_inotify_instances(fds, file_order(files, calls), memo) == first
    assert calls == []  # same fds, same watch list: the last split, no kcmp
    newcomer = InotifyFd(2000, 3, 0, W1)
    files[(2000, 3)] = 999
    again = group_inotify_instances([*fds, newcomer], file_order(files, calls), memo)
    assert len(again) == 26 and calls  # the group changed: compared again


def test_group_instances_never_compares_different_watch_lists() -> None:
    def order(a: InotifyFd, b: InotifyFd) -> int:
        raise AssertionError("different watch lists are different instances")

    fds = [InotifyFd(10, 3, 0, W1), InotifyFd(10, 4, 0, W2), InotifyFd(10, 5, 0, ())]
    assert len(group_inotify_instances(fds, order)) == 3


def test_inotify_by_uid_counts_each_instance_once() -> None:
    shared = (InotifyFd(10, 3, 0, W2), InotifyFd(11, 3, 0, W2))
    usage = inotify_by_uid([shared, (InotifyFd(12, 3, 1000, W1),), (InotifyFd(13, 3, 0, ()),)])
    assert {uid: (u.instances, u.watches) for uid, u in usage.items()} == {0: (2, 2), 1000: (1, 1)}


# --- the probe on a fixture tree -----------------------------------------------------------

CID_A = "5fed7652134bd8636559d9cfa0ce537d1d35ece4c49c5a944a3ee94faac7ec36"
CID_B = "7ebf05fcdc9c30502e775a9f9f8ad589165400c54edf32ccfa1a6df50b916bf5"
A = ContainerRef(id=CID_A, name="a", pid=200, cgroup=f"/docker/{CID_A}")
B = ContainerRef(id=CID_B, name="b", pid=400, cgroup=f"/docker/{CID_B}")
HOST_STATUS = "Name:\tcontainerd\nUid:\t0\t0\t0\t0\nThreads:\t8\n"


def status(uid: int, threads: int) -> str:
    return f"Name:\tp\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nThreads:\t{threads}\n"


def stat_line(pid: int, starttime: int, comm: str = "p") -> str:
    """/proc/<pid>/stat with `starttime` as field 22 (proc(5))."""
    return f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 " + "0 " * 12 + f"{starttime} 0 0\n"


def limits_host(tmp_path: Path) -> HostRoot:
    """pid 100: host containerd (1 inotify instance, 1 watch; 3 fds).
    pid 200: container A, root, 2 inotify instances x 3 watches (captured fdinfo), 3 threads.
    pid 300: container A, uid 1000, 1 instance with 1 watch.
    pid 400: container B, no inotify, 5 fds, 2 threads.
    """
    host = make_host(
        tmp_path,
        {
            "proc/sys/fs/file-nr": fixture("sys/fs/file-nr"),
            "proc/sys/fs/file-max": fixture("sys/fs/file-max"),
            "proc/sys/fs/inotify/max_user_watches": fixture("sys/fs/inotify/max_user_watches"),
            "proc/sys/fs/inotify/max_user_instances": fixture("sys/fs/inotify/max_user_instances"),
            "proc/sys/kernel/threads-max": fixture("sys/kernel/threads-max"),
            "proc/sys/kernel/pid_max": fixture("sys/kernel/pid_max"),
            "proc/loadavg": fixture("loadavg"),
            "proc/100/status": HOST_STATUS,
            "proc/100/fdinfo/8": fixture("3358/fdinfo/8"),
            "proc/200/status": status(0, 3),
            "proc/200/fdinfo/3": fixture("8082/fdinfo/3"),
            "proc/200/fdinfo/4": fixture("8082/fdinfo/3"),
            "proc/300/status": status(1000, 1),
            "proc/300/fdinfo/3": fixture("8277/fdinfo/3"),
            "proc/400/status": status(0, 2),
        },
    )
    links = {
        100: {0: "/dev/null", 1: "socket:[1]", 8: "anon_inode:inotify"},
        200: {
            0: "/dev/null",
            1: "pipe:[2]",
            2: "pipe:[3]",
            3: "anon_inode:inotify",
            4: "anon_inode:inotify",
        },
        300: {0: "/dev/null", 3: "anon_inode:inotify"},
        400: {fd: "/data/f" for fd in range(5)},
    }
    for pid, fds in links.items():
        (tmp_path / "proc" / str(pid) / "stat").write_text(stat_line(pid, 1000 + pid))
        fd_dir = tmp_path / "proc" / str(pid) / "fd"
        fd_dir.mkdir(parents=True)
        for fd, target in fds.items():
            os.symlink(target, fd_dir / str(fd))
    return host


def read(host: HostRoot, inventory: StaticInventory | None) -> Reading:
    ctx = ProbeContext(host, FakeClock(5000.0), (lambda: inventory) if inventory else None)
    return LimitsProbe().read(ctx)


INVENTORY = StaticInventory([A, B], pid_map={300: CID_A})


def test_probe_host_values_and_limits(tmp_path: Path) -> None:
    reading = read(limits_host(tmp_path), INVENTORY)
    assert reading.error is None
    assert dict(reading.values) == {
        "file_handles": 737,
        "tasks": 176,
        "inotify_watches_max_uid": 7,  # root: 1 (host) + 2 x 3 (container A)
        "inotify_instances_max_uid": 3,
        "epoll_watches_max_uid": 0,
        "pipe_pages_max_uid": 32,  # root: pid 200's two pipes, 16 pages each
        "inotify_degraded": 0,
        "degraded_consumers": 0,
    }
    assert dict(reading.limits) == {
        "file_handles": 2466183,
        "inotify_watches_max_uid": 192536,
        "inotify_watches": 192536,
        "inotify_instances_max_uid": 128,
        "inotify_instances": 128,
        "tasks": 32768,  # min(threads-max 192731, pid_max 32768)
    }
    assert reading.detail["sysctls"] == {
        "fs.file-max": 2466183,
        "fs.inotify.max_user_watches": 192536,
        "fs.inotify.max_user_instances": 128,
        "kernel.threads-max": 192731,
        "kernel.pid_max": 32768,
    }
    assert reading.detail["inotify_by_uid"] == {
        "0": {"instances": 3, "watches": 7},
        "1000": {"instances": 1, "watches": 1},
    }
    scan = reading.detail["scan"]
    assert (scan["pids"], scan["fds"], scan["inotify_fds"], scan["vanished"]) == (4, 15, 4, 0)
    assert scan["fd_dedup"] == "none"  # a fixture tree's pids are not real: no kcmp


def test_probe_attributes_usage_to_containers(tmp_path: Path) -> None:
    reading = read(limits_host(tmp_path), INVENTORY)
    by_name = {s.container.name: dict(s.values) for s in reading.containers}
    assert by_name == {
        "a": {
            "file_handles": 7,
            "tasks": 4,
            "inotify_watches": 7,
            "inotify_instances": 3,
            "epoll_watches": 0,
            "pipe_pages": 32,
            "conntrack_entries": 0,
        },
        "b": {
            "file_handles": 5,
            "tasks": 2,
            "inotify_watches": 0,
            "inotify_instances": 0,
            "epoll_watches": 0,
            "pipe_pages": 0,
            "conntrack_entries": 0,
        },
    }


def test_probe_without_inventory_has_no_container_samples(tmp_path: Path) -> None:
    reading = read(limits_host(tmp_path), None)
    assert reading.containers == ()
    assert reading.values["inotify_watches_max_uid"] == 7


def test_scan_skips_processes_that_vanish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = limits_host(tmp_path)
    (tmp_path / "proc" / "500").mkdir()  # listed in /proc, but its fd dir is already gone
    real_readlink = os.readlink

    def readlink(path: str | os.PathLike[str]) -> str:
        if str(path).endswith("/proc/300/fd/3"):
            raise ProcessLookupError(errno.ESRCH, "No such process")  # exited mid-scan
        return real_readlink(path)

    monkeypatch.setattr(os, "readlink", readlink)
    scan = scan_processes(host, INVENTORY)
    assert scan.vanished == 1
    assert scan.pids == 4
    assert sorted((f.pid, f.fd) for f in scan.inotify_fds) == [(100, 8), (200, 3), (200, 4)]


def test_scan_skips_inotify_fd_closed_between_readlink_and_fdinfo(tmp_path: Path) -> None:
    host = limits_host(tmp_path)
    (tmp_path / "proc" / "200" / "fdinfo" / "4").unlink()
    scan = scan_processes(host, None)
    assert sorted((f.pid, f.fd) for f in scan.inotify_fds) == [(100, 8), (200, 3), (300, 3)]


def test_scan_skips_inotify_fd_with_unknown_fdinfo_format(tmp_path: Path) -> None:
    host = limits_host(tmp_path)
    (tmp_path / "proc" / "300" / "fdinfo" / "3").write_text("inotify wd:? ino:?\n")
    reading = read(host, None)
    assert reading.detail["scan"]["unparsable"] == 1
    assert "1000" not in reading.detail["inotify_by_uid"]


def test_scan_counts_processes_it_may_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = limits_host(tmp_path)
    real_listdir = os.listdir

    def listdir(path: str | os.PathLike[str]) -> list[str]:
        if str(path).endswith("/proc/100/fd"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    reading = read(host, None)
    assert reading.detail["scan"]["denied"] == 1
    assert reading.detail["inotify_by_uid"]["0"] == {"instances": 2, "watches": 6}


@pytest.mark.parametrize(("err", "denied_fds"), [(errno.EACCES, 1), (errno.ENOENT, 0), (errno.ESRCH, 0)])
def test_scan_counts_single_fds_it_may_not_inspect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, denied_fds: int
) -> None:
    host = limits_host(tmp_path)
    real_readlink = os.readlink

    def readlink(path: str | os.PathLike[str], **kwargs: Any) -> str:
        if str(path).endswith("/proc/300/fd/3"):
            raise OSError(err, os.strerror(err))
        return real_readlink(path, **kwargs)

    monkeypatch.setattr(os, "readlink", readlink)
    reading = read(host, None)
    # Closed or exited is not a denial; a refused fd is counted (the inotify totals are lower bounds).
    assert (reading.detail["scan"]["denied"], reading.detail["scan"]["denied_fds"]) == (0, denied_fds)


def test_probe_falls_back_to_file_nr_max_without_sysctls(tmp_path: Path) -> None:
    host = make_host(tmp_path, {"proc/sys/fs/file-nr": "10\t0\t500\n", "proc/loadavg": "0 0 0 1/9 1\n"})
    reading = read(host, None)
    assert reading.error is None
    assert reading.values["file_handles"] == 10
    assert dict(reading.limits) == {"file_handles": 500}
    assert reading.detail["sysctls"] == {}
    assert len(reading.detail["problems"]) == 6  # 5 sysctls and meminfo
    assert reading.values["inotify_watches_max_uid"] == 0


def test_probe_with_nothing_readable_is_an_error(tmp_path: Path) -> None:
    reading = read(HostRoot(tmp_path / "missing"), None)
    assert reading.values == {}
    assert reading.error is not None and "file-nr" in reading.error


def test_probe_spec_declares_limits_and_container_metrics() -> None:
    spec = LimitsProbe.spec()
    assert {m.name: (m.limit, m.per_container) for m in spec.metrics} == {
        "file_handles": ("fs.file-max", True),
        "inotify_watches_max_uid": ("fs.inotify.max_user_watches", False),
        "inotify_instances_max_uid": ("fs.inotify.max_user_instances", False),
        "tasks": ("min(kernel.threads-max, kernel.pid_max)", True),
        "inotify_watches": ("fs.inotify.max_user_watches", True),
        "inotify_instances": ("fs.inotify.max_user_instances", True),
        "aio_requests": ("fs.aio-max-nr", False),
        "keys_max_uid": ("that uid's maxkeys", False),
        "key_bytes_max_uid": ("that uid's maxbytes", False),
        "conntrack_entries": ("net.netfilter.nf_conntrack_max", True),
        "netdev_backlog_drops": (None, False),
        "epoll_watches_max_uid": ("fs.epoll.max_user_watches", False),
        "epoll_watches": ("fs.epoll.max_user_watches", True),
        "pipe_pages_max_uid": ("fs.pipe-user-pages-soft", False),
        "pipe_pages": ("fs.pipe-user-pages-soft", True),
        "inotify_degraded": (None, False),
        "degraded_consumers": (None, False),
    }


def test_the_same_fds_are_grouped_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A steady scan hands out the very fd objects of the last one: their instances are the
    last grouping's, with no grouping at all; one new object (a process re-read) groups anew."""
    from remediator.probes import limits as limits_module
    from remediator.probes.limits_dedup import EpollFd
    from remediator.probes.limits_fdscan import ScanCache

    calls = []
    real = limits_module.group_instances

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(limits_module, "group_instances", counting)
    cache = ScanCache()
    fds = [EpollFd(10, 3, 0, ()), EpollFd(11, 4, 0, ())]
    first = limits_module._grouped(cache, "epoll", fds, None)
    again = limits_module._grouped(cache, "epoll", list(fds), None)  # a new list, the same fds
    assert again is first and len(calls) == 1
    changed = [fds[0], EpollFd(11, 4, 0, ())]  # equal, but not the same object: grouped again
    assert limits_module._grouped(cache, "epoll", changed, None) == first and len(calls) == 2
    assert limits_module._grouped(cache, "epoll", fds[:1], None) == [(fds[0],)] and len(calls) == 3


def test_the_per_uid_counts_are_reused_only_for_the_same_grouping(tmp_path: Path) -> None:
    """Reads with one scan cache: a steady read reuses the per-uid count with the grouping
    (the same dict), and a watch added to a process shows at the next read that sees it."""
    from remediator.probes.limits_fdscan import ScanCache

    host = limits_host(tmp_path)
    probe = LimitsProbe()
    probe.cache = ScanCache()
    clock = FakeClock(5000.0)

    def again() -> Reading:
        clock.advance(10)
        return probe.read(ProbeContext(host, clock, lambda: INVENTORY))

    first = again()
    counted = probe.cache.by_uid["inotify"][1]
    second = again()
    assert probe.cache.by_uid["inotify"][1] is counted  # nothing changed: not counted again
    assert second.detail["inotify_by_uid"] == first.detail["inotify_by_uid"]
    # uid 1000's process gets a second watch (its fdinfo grows by a line) and a new fd, so
    # that its glance differs and its record is read again.
    info = tmp_path / "proc/300/fdinfo/3"
    line = next(ln for ln in info.read_text().splitlines() if ln.startswith("inotify wd:"))
    info.write_text(info.read_text() + line.replace("wd:", "wd:9", 1).replace("ino:", "ino:1", 1) + "\n")
    os.symlink("/dev/null", tmp_path / "proc/300/fd/4")
    third = again()
    assert third.detail["inotify_by_uid"]["1000"] == {"instances": 1, "watches": 2}
    assert third.values["inotify_watches_max_uid"] == 7  # root still has the most
    assert probe.cache.by_uid["inotify"][1] is not counted
