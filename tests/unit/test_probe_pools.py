"""The limits probe's other shared pools (aio, keys, conntrack, netdev backlog, epoll, pipes),
degraded inotify consumers, and the incremental, CPU-bounded fd scan, on fixture trees."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from remediator.clock import FakeClock
from remediator.host import HostRoot
from remediator.model import ContainerRef, Reading
from remediator.probes.base import ProbeContext
from remediator.probes.containers import StaticInventory
from remediator.probes.limits import LimitsProbe
from remediator.probes.limits_fdread import Glance, PyReader
from remediator.probes.limits_fdscan import Consumer, ScanCache, scan_processes
from remediator.probes.limits_parse import (
    EpollWatch,
    KeyUser,
    ProcStatus,
    parse_epoll_fdinfo,
    parse_key_users,
    parse_softnet_drops,
    parse_stat_starttime,
)
from remediator.probes.limits_pools import POOL_KEYS
from tests.helpers import make_host

PROC = Path(__file__).resolve().parent.parent / "fixtures" / "proc" / "linux-6.18"
LONG_MAX = "9223372036854775807\n"


def fixture(rel: str) -> str:
    return (PROC / rel).read_text()


# --- parsers on captured files ---------------------------------------------------------------


def test_parse_key_users_captured() -> None:
    assert parse_key_users(fixture("key-users")) == (KeyUser(0, 4, 1_000_000, 110, 25_000_000),)


def test_parse_key_users_several_uids_and_errors() -> None:
    text = "    0:    14 13/13 8/1000000 269/25000000\n 1000:     2 2/2 2/200 90/20000\n"
    assert parse_key_users(text)[1] == KeyUser(1000, 2, 200, 90, 20_000)
    with pytest.raises(ValueError, match="key-users"):
        parse_key_users("    0:    14 13/13 8\n")


def test_parse_softnet_drops_captured_and_hex() -> None:
    assert parse_softnet_drops(fixture("net/softnet_stat")) == (0, 0)  # two CPUs, no drops
    assert parse_softnet_drops("0000026e 0000001a 00\n00003d86 00000100 00\n") == (26, 256)
    with pytest.raises(ValueError, match="softnet_stat"):
        parse_softnet_drops("0000026e zz\n")


def test_parse_epoll_fdinfo_captured() -> None:
    watches = parse_epoll_fdinfo(fixture("epoll-fdinfo"))
    assert len(watches) == 59
    assert watches[0] == EpollWatch(25, 0x49CD8)
    assert parse_epoll_fdinfo(fixture("8082/fdinfo/0")) == ()  # /dev/null: not an epoll fd
    with pytest.raises(ValueError, match="epoll"):
        parse_epoll_fdinfo("tfd: x events: 1\n")


def test_parse_stat_starttime_captured_and_tricky_comm() -> None:
    assert parse_stat_starttime(fixture("1/stat")) == int(fixture("1/stat").rsplit(")", 1)[1].split()[19])
    assert parse_stat_starttime("7 (a) b) (c) S 1 7 7 0 -1 0 " + "0 " * 12 + "4242 0 0") == 4242
    with pytest.raises(ValueError):
        parse_stat_starttime("7 (x) S 1\n")


# --- the pools read from counters --------------------------------------------------------------


def stat_line(pid: int, starttime: int, comm: str = "p") -> str:
    return f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 " + "0 " * 12 + f"{starttime} 0 0\n"


def status(uid: int, name: str = "p", threads: int = 1) -> str:
    return f"Name:\t{name}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nThreads:\t{threads}\n"


BASE = {
    "proc/sys/fs/file-nr": fixture("sys/fs/file-nr"),
    "proc/sys/fs/file-max": fixture("sys/fs/file-max"),
    "proc/sys/fs/inotify/max_user_watches": "10\n",
    "proc/sys/fs/inotify/max_user_instances": "3\n",
    "proc/sys/kernel/threads-max": fixture("sys/kernel/threads-max"),
    "proc/sys/kernel/pid_max": fixture("sys/kernel/pid_max"),
    "proc/sys/fs/aio-nr": "60000\n",
    "proc/sys/fs/aio-max-nr": fixture("sys/fs/aio-max-nr"),
    "proc/sys/fs/epoll/max_user_watches": fixture("sys/fs/epoll/max_user_watches"),
    "proc/sys/fs/pipe-user-pages-soft": fixture("sys/fs/pipe-user-pages-soft"),
    "proc/sys/net/netfilter/nf_conntrack_count": "200000\n",
    "proc/sys/net/netfilter/nf_conntrack_max": fixture("sys/net/netfilter/nf_conntrack_max"),
    "proc/loadavg": fixture("loadavg"),
    "proc/meminfo": fixture("meminfo"),
    "proc/key-users": "    0:    14 13/13 8/1000000 269/25000000\n 1000:   190 190/190 190/200 900/20000\n",
    "proc/net/softnet_stat": "0000026e 00000002 00\n00003d86 00000003 00\n",
}


def add_process(
    root: Path,
    pid: int,
    links: dict[int, str],
    *,
    uid: int = 0,
    name: str = "p",
    argv: tuple[str, ...] = ("p",),
    starttime: int | None = None,
    fdinfo: dict[int, str] | None = None,
) -> None:
    d = root / "proc" / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "fdinfo").mkdir()
    (d / "stat").write_text(stat_line(pid, starttime if starttime is not None else 100 + pid, name))
    (d / "status").write_text(status(uid, name))
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    for fd, target in links.items():
        os.symlink(target, d / "fd" / str(fd))
    for fd, text in (fdinfo or {}).items():
        (d / "fdinfo" / str(fd)).write_text(text)


def read(host: HostRoot, probe: LimitsProbe | None = None) -> Reading:
    return (probe or LimitsProbe(cache=ScanCache())).read(ProbeContext(host, FakeClock(5000.0)))


def test_counter_pools_against_their_limits(tmp_path: Path) -> None:
    host = make_host(tmp_path, BASE)
    r = read(host)
    assert r.values["aio_requests"] == 60000 and r.limits["aio_requests"] == 65536
    assert r.values["conntrack_entries"] == 200000 and r.limits["conntrack_entries"] == 262144
    # uid 1000 is at 95 % of its quota of 200 keys; root at 0.0008 % of its million.
    assert (r.values["keys_max_uid"], r.limits["keys_max_uid"]) == (190, 200)
    assert (r.values["key_bytes_max_uid"], r.limits["key_bytes_max_uid"]) == (900, 20000)
    assert r.detail["keys_by_uid"]["1000"] == {"keys": 190, "max_keys": 200, "bytes": 900, "max_bytes": 20000}
    assert r.values["netdev_backlog_drops"] == 0  # a counter's first reading has no "since"
    assert r.detail["netdev_backlog_drops_total"] == 5
    assert r.detail["mem_total_bytes"] == 24683584 * 1024
    assert "conntrack" not in r.detail


def test_netdev_drops_are_new_drops_since_the_previous_reading(tmp_path: Path) -> None:
    host = make_host(tmp_path, BASE)
    probe = LimitsProbe(cache=ScanCache())
    read(host, probe)
    (tmp_path / "proc/net/softnet_stat").write_text("0000026e 00000012 00\n00003d86 00000003 00\n")
    assert read(host, probe).values["netdev_backlog_drops"] == 16


def test_conntrack_module_absent_is_said(tmp_path: Path) -> None:
    files = {k: v for k, v in BASE.items() if "netfilter" not in k}
    r = read(make_host(tmp_path, files))
    assert "conntrack_entries" not in r.values and "conntrack_entries" not in r.limits
    assert r.detail["conntrack"] == "nf_conntrack module not loaded (no net.netfilter.nf_conntrack_count)"
    assert "problems" not in r.detail


@pytest.mark.parametrize(("key", "value"), [("fs/file-max", LONG_MAX), ("fs/pipe-user-pages-soft", "0\n")])
def test_no_limit_values_are_not_limits(tmp_path: Path, key: str, value: str) -> None:
    """systemd as PID 1 writes LONG_MAX to fs.file-max; 0 is "no limit" for the pipe limits:
    neither becomes a limit, so no percentage of it is ever taken."""
    host = make_host(tmp_path, {**BASE, f"proc/sys/{key}": value})
    r = read(host)
    metric = "file_handles" if "file-max" in key else "pipe_pages_max_uid"
    assert metric not in r.limits
    assert r.detail["no_limit"] == [key.replace("/", ".")]


def test_every_pool_has_a_probe_limit_or_reading() -> None:
    """Each key raise-sysctl may raise is one the probe reads."""
    from remediator.probes.limits import OPTIONAL_SYSCTLS, SYSCTLS

    assert set(POOL_KEYS) <= set(SYSCTLS) | set(OPTIONAL_SYSCTLS)


# --- epoll and pipes per uid -------------------------------------------------------------------


def test_epoll_and_pipes_per_uid(tmp_path: Path) -> None:
    host = make_host(tmp_path, BASE)
    epoll = fixture("epoll-fdinfo")
    add_process(
        tmp_path, 10, {3: "anon_inode:[eventpoll]", 4: "pipe:[77]", 5: "pipe:[77]"}, fdinfo={3: epoll}
    )
    add_process(tmp_path, 11, {0: "pipe:[77]", 1: "pipe:[78]"}, uid=1000)  # 77 is pid 10's pipe
    r = read(host)
    assert r.values["epoll_watches_max_uid"] == 59
    assert r.detail["epoll_by_uid"] == {"0": {"instances": 1, "watches": 59}}
    assert r.detail["pipe_pages_by_uid"] == {"0": 16, "1000": 16}  # one pipe each, counted once


# --- degraded consumers --------------------------------------------------------------------------

INOTIFY_3 = fixture("8082/fdinfo/3")  # three watches


def test_tail_f_without_inotify_while_the_pool_is_exhausted_is_degraded(tmp_path: Path) -> None:
    host = make_host(tmp_path, BASE)  # max_user_instances 3, max_user_watches 10
    hog = {fd: "anon_inode:inotify" for fd in (3, 4, 5)}
    add_process(tmp_path, 20, hog, fdinfo={fd: INOTIFY_3 for fd in hog})  # root: 3 instances, 9 watches
    add_process(tmp_path, 30, {0: "/dev/null"}, name="tail", argv=("tail", "-f", "/var/log/x"))
    add_process(tmp_path, 31, {0: "/dev/null"}, name="tail", argv=("tail", "-n", "5", "/x"))  # not following
    add_process(
        tmp_path,
        32,
        {3: "anon_inode:inotify"},
        name="tail",
        argv=("tail", "-fn0", "/y"),
        fdinfo={3: fixture("3358/fdinfo/8")},
    )  # follows with inotify: fine
    add_process(tmp_path, 33, {0: "/dev/null"}, uid=1000, name="tail", argv=("tail", "--follow=name", "/z"))
    r = read(host)
    assert r.detail["inotify_exhausted_uids"] == [0]
    assert r.values["inotify_degraded"] == 1  # uid 1000's pool is not exhausted: 33 is just idle
    assert r.detail["degraded_consumers"] == [
        {
            "pid": 30,
            "starttime": 130,
            "name": "tail",
            "uid": 0,
            "pool": "inotify",
            "container": None,
            "container_id": None,
            "unit": None,
        }
    ]


def test_a_degraded_consumer_stays_reported_after_the_raise(tmp_path: Path) -> None:
    host = make_host(tmp_path, BASE)
    hog = {fd: "anon_inode:inotify" for fd in (3, 4, 5)}
    add_process(tmp_path, 20, hog, fdinfo={fd: INOTIFY_3 for fd in hog})
    add_process(tmp_path, 50, {0: "/dev/null"}, name="kubelet", argv=("kubelet", "--config", "/x"))
    (tmp_path / "proc/50/cgroup").write_text("0::/system.slice/kubelet.service\n")
    probe = LimitsProbe(cache=ScanCache())
    assert read(host, probe).detail["degraded_consumers"][0]["unit"] == "kubelet.service"
    (tmp_path / "proc/sys/fs/inotify/max_user_instances").write_text("6\n")  # raised: room again
    r = read(host, probe)
    assert r.detail["inotify_exhausted_uids"] == []
    assert [c["pid"] for c in r.detail["degraded_consumers"]] == [50]  # still broken: needs a restart
    assert read(host).values["inotify_degraded"] == 0  # a fresh process never saw the exhaustion


def test_consumer_matching() -> None:
    tail = Consumer("tail", ("-f", "-F", "--follow"))
    assert tail.matches("tail", ["tail", "-F", "x"])
    assert tail.matches("tail", ["tail", "-qf", "x"])
    assert tail.matches("tail", ["tail", "--follow=descriptor", "x"])
    assert not tail.matches("tail", ["tail", "-n", "10", "x"])
    assert not tail.matches("tailf", ["tailf", "-f"])
    assert Consumer("kubelet").matches("kubelet", ["kubelet"])


# --- the incremental scan ------------------------------------------------------------------------


def incremental_host(tmp_path: Path) -> HostRoot:
    host = make_host(tmp_path, BASE)
    add_process(tmp_path, 40, {3: "anon_inode:inotify", 4: "/etc/x"}, fdinfo={3: INOTIFY_3})
    add_process(tmp_path, 41, {0: "/dev/null", 1: "/dev/null"})
    return host


def set_fd_counts(monkeypatch: pytest.MonkeyPatch, counts: dict[int, int]) -> None:
    """What stat(/proc/<pid>/fd).st_size says on Linux >= 6.2 (a fixture dir says its byte size)."""
    real_stat = os.stat

    def fake_stat(path: str | os.PathLike[str], *a: object, **kw: object) -> os.stat_result:
        st = real_stat(path, *a, **kw)  # type: ignore[arg-type]  # passthrough of os.stat's own args
        parts = str(path).rsplit("/", 2)
        if parts[-1] == "fd" and parts[-2].isdigit() and int(parts[-2]) in counts:
            fields = list(st)
            fields[6] = counts[int(parts[-2])]
            return os.stat_result(fields)
        return st

    monkeypatch.setattr(os, "stat", fake_stat)


def test_unchanged_processes_are_not_reread_but_their_watches_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = incremental_host(tmp_path)
    set_fd_counts(monkeypatch, {40: 2, 41: 2})
    cache = ScanCache()
    first = scan_processes(host, None, cache=cache)
    assert (first.examined, first.reused, first.full) == (2, 0, True)

    # A watch added to the existing inotify fd: the fd count does not move, the fdinfo does.
    (tmp_path / "proc/40/fdinfo/3").write_text(
        INOTIFY_3 + INOTIFY_3.splitlines()[-1].replace("wd:1", "wd:9") + "\n"
    )
    # A new fd the fd count does not show yet (it will): not seen until the count changes.
    os.symlink("anon_inode:inotify", tmp_path / "proc/41/fd/7")
    (tmp_path / "proc/41/fdinfo/7").write_text(INOTIFY_3)
    second = scan_processes(host, None, cache=cache)
    assert (second.examined, second.reused, second.full) == (0, 2, False)
    assert [len(f.watches) for f in second.inotify_fds] == [4]

    set_fd_counts(monkeypatch, {40: 2, 41: 3})
    third = scan_processes(host, None, cache=cache)
    assert (third.examined, third.reused) == (1, 1)
    assert sorted((f.pid, f.fd) for f in third.inotify_fds) == [(40, 3), (41, 7)]


def test_a_reused_pid_is_examined_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = incremental_host(tmp_path)
    set_fd_counts(monkeypatch, {40: 2, 41: 2})
    cache = ScanCache()
    scan_processes(host, None, cache=cache)
    # Same pid, another process: procfs gives it a new /proc/41 (a new inode), with the same
    # fd count here. Its start time is read from the new stat.
    old = tmp_path / "proc/41"
    shutil.copytree(old, tmp_path / "proc/41.new", symlinks=True)
    shutil.rmtree(old)
    (tmp_path / "proc/41.new").rename(old)
    (old / "stat").write_text(stat_line(41, 999))
    scan = scan_processes(host, None, cache=cache)
    assert (scan.examined, scan.reused) == (1, 1)
    assert cache.records[41].starttime == 999
    # The same process, only its stat rewritten: the listing shows the same inode, so it is
    # reused without reading stat (the periodic full scan reads it again).
    (old / "stat").write_text(stat_line(41, 1234))
    scan = scan_processes(host, None, cache=cache)
    assert (scan.examined, scan.reused) == (0, 2) and cache.records[41].starttime == 999


def test_every_nth_scan_is_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = incremental_host(tmp_path)
    set_fd_counts(monkeypatch, {40: 2, 41: 2})
    cache = ScanCache()
    fulls = [scan_processes(host, None, cache=cache, full_every=3).full for _ in range(7)]
    assert fulls == [True, False, False, True, False, False, True]


def test_unknown_fd_count_means_always_examined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = incremental_host(tmp_path)
    set_fd_counts(monkeypatch, {40: 0, 41: 0})  # Linux < 6.2: st_size is 0
    cache = ScanCache()
    scan_processes(host, None, cache=cache)
    assert scan_processes(host, None, cache=cache).examined == 2


class TickingCpu:
    """A CPU clock that advances a fixed step each time it is read."""

    def __init__(self, step: float) -> None:
        self.t, self.step = 0.0, step
        self.reads = 0

    def __call__(self) -> float:
        self.t += self.step
        self.reads += 1
        return self.t


def test_budget_cuts_a_scan_and_the_next_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = incremental_host(tmp_path)
    for pid in (42, 43, 44):
        add_process(tmp_path, pid, {0: "/dev/null"})
    pids = (40, 41, 42, 43, 44)
    set_fd_counts(monkeypatch, dict.fromkeys(pids, 1))
    cache = ScanCache()
    # Each CPU read costs 1 s, the budget 2.5 s: two processes fit, then it is spent. Except on
    # the first scan of a cache, which is always complete (a one-shot `once` sees everything).
    first = scan_processes(host, None, cache=cache, budget=2.5, cpu=TickingCpu(1.0), check_every=1)
    assert not first.budget_exhausted and first.examined == 5

    set_fd_counts(monkeypatch, dict.fromkeys(pids, 2))  # everyone changed: all need re-reading
    second = scan_processes(
        host, None, cache=cache, budget=2.5, cpu=TickingCpu(1.0), check_every=1, full_every=100
    )
    assert second.budget_exhausted and (second.examined, second.stale, second.pids) == (2, 3, 5)
    assert cache.resume_at == 42
    third = scan_processes(
        host, None, cache=cache, budget=2.5, cpu=TickingCpu(1.0), check_every=1, full_every=100
    )
    # Resumed at 42: 42 and 43 examined; 44 still waits on its old record, and so does 40 (it
    # holds inotify and its CPU time is unknown: its watches are due a re-read). 41's glance
    # showed it unchanged: reused, not stale.
    assert (third.examined, third.stale, third.unexamined, third.pids) == (2, 2, 0, 5)
    assert third.reused == 1
    assert cache.resume_at == 44
    fourth = scan_processes(
        host, None, cache=cache, budget=100, cpu=TickingCpu(1.0), check_every=1, full_every=100
    )
    assert not fourth.budget_exhausted and (fourth.examined, fourth.reused) == (1, 4)
    assert cache.resume_at == 0


def test_a_process_new_after_a_cut_scan_is_unexamined_not_invented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = incremental_host(tmp_path)
    set_fd_counts(monkeypatch, {40: 2, 41: 2, 45: 1})
    cache = ScanCache()
    scan_processes(host, None, cache=cache)
    add_process(tmp_path, 39, {0: "/dev/null"})  # sorts first: examined before the budget runs out
    add_process(tmp_path, 45, {0: "/dev/null"})
    set_fd_counts(monkeypatch, {39: 1, 40: 3, 41: 3, 45: 1})
    scan = scan_processes(
        host, None, cache=cache, budget=1.5, cpu=TickingCpu(1.0), check_every=1, full_every=100
    )
    assert (scan.examined, scan.stale, scan.unexamined) == (1, 2, 1)  # 45 has no record: not counted
    assert scan.pids == 3

    # 41 exits and its pid is reused (a new /proc/41) while the budget is spent again: the old
    # record is not carried over for the new process.
    old = tmp_path / "proc/41"
    shutil.copytree(old, tmp_path / "proc/41.new", symlinks=True)
    shutil.rmtree(old)
    (tmp_path / "proc/41.new").rename(old)
    scan = scan_processes(
        host, None, cache=cache, budget=0.5, cpu=TickingCpu(1.0), check_every=1, full_every=100
    )
    assert scan.budget_exhausted and 41 not in cache.records and scan.unexamined >= 1


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("0::/system.slice/kubelet.service\n", "kubelet.service"),
        ("12:pids:/x\n1:name=systemd:/system.slice/containerd.service\n0::/\n", "containerd.service"),
        ("0::/user.slice/user-0.slice/session-3.scope\n", None),  # a login session: not restartable
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.service\n", None),  # a user unit
        ("0::/user.slice/user-1000.slice/user@1000.service\n", None),  # the user manager itself
    ],
)
def test_systemd_unit_of_a_host_process(tmp_path: Path, cgroup: str, unit: str | None) -> None:
    from remediator.probes.limits import systemd_unit

    host = make_host(tmp_path, {"proc/7/cgroup": cgroup})
    assert systemd_unit(host, 7) == unit
    assert systemd_unit(host, 8) is None  # gone


class CountingInventory(StaticInventory):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.asked: list[int] = []

    def container_of_pid(self, pid: int) -> ContainerRef | None:
        self.asked.append(pid)
        return super().container_of_pid(pid)


def test_reused_processes_keep_their_container_and_containers_their_fresh_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = incremental_host(tmp_path)  # pid 40 (host), pid 41 (in container app)
    app = ContainerRef(id="a" * 64, name="app", pid=41)
    set_fd_counts(monkeypatch, {40: 2, 41: 2})
    cache = ScanCache()
    first = scan_processes(host, CountingInventory([app]), cache=cache)
    assert first.containers[app.id].tasks == 1
    inventory = CountingInventory([app])
    (tmp_path / "proc/41/status").write_text(status(0, threads=9))  # a thread leak: fd count unmoved
    (tmp_path / "proc/40/status").write_text(status(1000))  # a host process changed uid
    second = scan_processes(host, inventory, cache=cache)
    assert second.reused == 2 and inventory.asked == []  # membership from the record: no cgroup reads
    assert second.containers[app.id].tasks == 9  # container processes' status is read every scan
    assert {f.pid: f.uid for f in second.inotify_fds} == {40: 0}  # host: the record's (until re-examined)


class GlanceLog(PyReader):
    """The Python reader, noting what each steady-state glance asked for and each status read."""

    def __init__(self) -> None:
        self.asked: dict[int, tuple[bool, bool]] = {}
        self.statuses: list[int] = []

    def glance(self, pid_dir: str, *, threads: bool, runtime: bool) -> Glance:
        self.asked[int(pid_dir.rsplit("/", 1)[1])] = (threads, runtime)
        return super().glance(pid_dir, threads=threads, runtime=runtime)

    def status(self, pid_dir: str) -> ProcStatus:
        self.statuses.append(int(pid_dir.rsplit("/", 1)[1]))
        return super().status(pid_dir)


def test_a_steady_scan_stats_most_processes_once_and_counts_threads_from_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host process with no inotify fd costs one stat; a container process's threads come
    from /proc/<pid>/task's link count (2 + threads, as procfs says), not from its status."""
    host = incremental_host(tmp_path)  # pid 40 (host, inotify), pid 41 (in container app)
    add_process(tmp_path, 42, {0: "/dev/null"})  # host, no inotify
    (tmp_path / "proc/41/task/41").mkdir(parents=True)
    app = ContainerRef(id="a" * 64, name="app", pid=41)
    set_fd_counts(monkeypatch, {40: 2, 41: 2, 42: 1})
    reader, cache = GlanceLog(), ScanCache()
    scan_processes(host, StaticInventory([app]), cache=cache, reader=reader)
    assert reader.asked == {}  # the first scan reads everyone whole
    for tid in (42, 43):
        (tmp_path / f"proc/41/task/{tid}").mkdir()  # two more threads, no new fd
    reader.statuses.clear()
    second = scan_processes(host, StaticInventory([app]), cache=cache, reader=reader)
    assert reader.asked == {40: (True, True), 41: (True, False), 42: (False, False)}
    assert reader.statuses == [] and second.reused == 3
    assert second.containers[app.id].tasks == 3


# The flags field of kthreadd's /proc/2/stat, captured on the 6.18 test host: PF_KTHREAD set.
KTHREAD_FLAGS = "2129984"


def test_a_kernel_thread_is_read_in_full_scans_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel thread (PF_KTHREAD in stat's flags) holds nothing and never runs user code: a
    steady scan keeps its record without a look; a full scan, or a new process under its pid
    (a new /proc inode), reads it whole again."""
    host = incremental_host(tmp_path)
    add_process(tmp_path, 2, {}, name="kthreadd")
    stat = tmp_path / "proc/2/stat"
    stat.write_text(stat.read_text().replace(" 4194560 ", f" {KTHREAD_FLAGS} "))
    set_fd_counts(monkeypatch, {40: 2, 41: 2, 2: 0})
    reader, cache = GlanceLog(), ScanCache()
    first = scan_processes(host, None, cache=cache, reader=reader, full_every=3)
    assert cache.records[2].kthread and not cache.records[40].kthread
    assert first.pids == 3
    second = scan_processes(host, None, cache=cache, reader=reader, full_every=3)
    assert set(reader.asked) == {40, 41}  # pid 2: no glance
    assert (second.pids, second.reused, second.examined) == (3, 3, 0)
    # Gone and replaced by a user process under the same pid: a new inode, read whole.
    add_process(tmp_path / "new", 2, {0: "/dev/null"}, name="p")  # made while the old one is there
    shutil.rmtree(tmp_path / "proc/2")
    (tmp_path / "new/proc/2").rename(tmp_path / "proc/2")
    third = scan_processes(host, None, cache=cache, reader=reader, full_every=3)
    assert third.examined == 1 and not cache.records[2].kthread
    assert third.fds == second.fds + 1
    stat.write_text(stat.read_text().replace(" 4194560 ", f" {KTHREAD_FLAGS} "))  # (the new pid 2's)
    fourth = scan_processes(host, None, cache=cache, reader=reader, full_every=3)  # the full scan
    assert fourth.full and fourth.examined == 3 and cache.records[2].kthread


def test_a_kernel_threads_cgroup_is_never_read_and_a_shared_one_is_parsed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an inventory, a full scan asks whose each process is: a kernel thread is nobody's
    (its cgroup not read), and processes outside containers that share a cgroup (the shims,
    the host's daemons) have their text parsed once for the cycle's inventory."""
    from remediator.probes import cgroups, inventory
    from remediator.probes.inventory import SnapshotInventory

    host = incremental_host(tmp_path)
    add_process(tmp_path, 2, {}, name="kthreadd")
    stat = tmp_path / "proc/2/stat"
    stat.write_text(stat.read_text().replace(" 4194560 ", f" {KTHREAD_FLAGS} "))
    cid = "c" * 64
    host_cgroup = "4:memory:/system.slice/containerd.service\n0::/system.slice/containerd.service\n"
    for pid, text in {40: host_cgroup, 41: host_cgroup, 2: "0::/\n"}.items():
        (tmp_path / f"proc/{pid}/cgroup").write_text(text)
    add_process(tmp_path, 50, {0: "/dev/null"})
    (tmp_path / "proc/50/cgroup").write_text(f"4:memory:/docker/{cid}\n0::/\n")
    app = ContainerRef(id=cid, name="app", cgroup=f"/docker/{cid}")
    read: list[str] = []
    real_read = HostRoot.read_text

    def reading(self: HostRoot, path: Path) -> str:
        read.append(path.parent.name if path.name == "cgroup" else "")
        return real_read(self, path)

    parsed: list[str] = []
    real_parse = cgroups.container_id_from_cgroup

    def parsing(text: str) -> str | None:
        parsed.append(text)
        return real_parse(text)

    monkeypatch.setattr(HostRoot, "read_text", reading)
    monkeypatch.setattr(inventory, "container_id_from_cgroup", parsing)
    scan = scan_processes(host, SnapshotInventory([app], host), cache=ScanCache())
    assert sorted(p for p in read if p) == ["40", "41", "50"]  # not the kernel thread's
    assert sorted(parsed) == sorted([host_cgroup, f"4:memory:/docker/{cid}\n0::/\n"])
    assert scan.pid_container == {50: app}
    assert scan.containers[cid].file_handles == 1


def test_the_cpu_clock_is_read_once_per_check_every_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = incremental_host(tmp_path)
    pids = [40, 41, *range(42, 42 + 38)]
    for pid in pids[2:]:
        add_process(tmp_path, pid, {0: "/dev/null"})
    set_fd_counts(monkeypatch, dict.fromkeys(pids, 1))
    cache = ScanCache()
    scan_processes(host, None, cache=cache)
    set_fd_counts(monkeypatch, dict.fromkeys(pids, 2))
    cpu = TickingCpu(0.0)
    scan = scan_processes(host, None, cache=cache, budget=100, cpu=cpu, full_every=100, check_every=16)
    assert scan.examined == 40 and not scan.budget_exhausted
    assert cpu.reads == 1 + 3  # the start, then processes 0, 16 and 32
