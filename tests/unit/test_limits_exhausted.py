"""Which pools ran dry, remembered across restarts (limits_exhausted): pure updates, and the probe
reporting a consumer that degraded before a restart of remediator, on fixture trees."""

from __future__ import annotations

from pathlib import Path

from remediator.clock import FakeClock
from remediator.host import HostRoot
from remediator.model import Reading
from remediator.probes.base import ProbeContext
from remediator.probes.limits import LimitsProbe
from remediator.probes.limits_exhausted import (
    KEY,
    MAX_POOLS,
    Exhausted,
    parse_uptime,
    recall,
    remember,
    update,
)
from remediator.probes.limits_fdscan import ScanCache
from remediator.probes.memory import DictMemory
from tests.helpers import make_host
from tests.unit.test_probe_pools import BASE, INOTIFY_3, add_process

BOOT = "5d1e8a40-0000-4000-8000-000000000001"


def test_update_keeps_first_and_moves_last() -> None:
    known = update({}, ["inotify:0"], 100.0)
    known = update(known, ["inotify:0", "file_handles"], 130.0)
    assert known == {"inotify:0": Exhausted(100.0, 130.0), "file_handles": Exhausted(130.0, 130.0)}
    assert update(known, [], 160.0) == known  # a pool with room again keeps its last exhaustion


def test_update_is_bounded_dropping_the_oldest() -> None:
    known = update({}, [f"inotify:{u}" for u in range(MAX_POOLS)], 1.0)
    known = update(known, ["inotify:99999"], 2.0)
    assert len(known) == MAX_POOLS and "inotify:99999" in known


def test_recall_is_per_boot_and_ignores_garbage() -> None:
    memory = DictMemory()
    remember(memory, BOOT, {"inotify:0": Exhausted(1.5, 2.25)})
    assert recall(memory, BOOT) == {"inotify:0": Exhausted(1.5, 2.25)}
    assert recall(memory, "another-boot") == {}  # rebooted: every process is new
    assert recall(memory, None) == {}
    memory.remember(KEY, {"boot": BOOT, "pools": {"inotify:0": "x", "tasks": [1, 2]}})
    assert recall(memory, BOOT) == {"tasks": Exhausted(1.0, 2.0)}
    assert parse_uptime("12345.67 23456.78\n") == 12345.67


def host_at(tmp_path: Path, uptime: float, boot: str = BOOT) -> HostRoot:
    host = make_host(
        tmp_path,
        {**BASE, "proc/uptime": f"{uptime} 1.0\n", "proc/sys/kernel/random/boot_id": f"{boot}\n"},
    )
    return host


def read(host: HostRoot, memory: DictMemory) -> Reading:
    # A new probe and a new scan cache each time: what a restarted daemon (or the timer) has.
    return LimitsProbe(cache=ScanCache()).read(ProbeContext(host, FakeClock(5000.0), memory=memory))


def test_a_restarted_remediator_still_reports_the_consumer_that_degraded(tmp_path: Path) -> None:
    host = host_at(tmp_path, uptime=10.0)
    hog = {fd: "anon_inode:inotify" for fd in (3, 4, 5)}
    add_process(tmp_path, 20, hog, fdinfo={fd: INOTIFY_3 for fd in hog})  # root's 3 of 3 instances
    # Started at 5.0 s (starttime in clock ticks): while the pool was exhausted, so no inotify.
    add_process(tmp_path, 30, {0: "/dev/null"}, name="tail", argv=("tail", "-f", "/x"), starttime=500)
    memory = DictMemory()
    first = read(host, memory)
    assert [c["pid"] for c in first.detail["degraded_consumers"]] == [30]
    assert first.detail["exhausted_pools"] == {"inotify:0": {"first": 10.0, "last": 10.0}}

    # The limit was raised; remediator restarted (no in-process memory); a new tail -f started at
    # 20 s holds no inotify either (idle on a pipe, say): it is not degraded, the old one still is.
    (tmp_path / "proc/sys/fs/inotify/max_user_instances").write_text("6\n")
    (tmp_path / "proc/uptime").write_text("25.0 1.0\n")
    add_process(tmp_path, 31, {0: "/dev/null"}, name="tail", argv=("tail", "-f", "/y"), starttime=2000)
    later = read(host, memory)
    assert later.detail["inotify_exhausted_uids"] == []
    assert [c["pid"] for c in later.detail["degraded_consumers"]] == [30]
    assert later.detail["exhausted_pools"]["inotify:0"] == {"first": 10.0, "last": 10.0}


def test_after_a_reboot_nothing_is_remembered(tmp_path: Path) -> None:
    host = host_at(tmp_path, uptime=10.0)
    hog = {fd: "anon_inode:inotify" for fd in (3, 4, 5)}
    add_process(tmp_path, 20, hog, fdinfo={fd: INOTIFY_3 for fd in hog})
    add_process(tmp_path, 30, {0: "/dev/null"}, name="tail", argv=("tail", "-f", "/x"), starttime=500)
    memory = DictMemory()
    read(host, memory)
    (tmp_path / "proc/sys/fs/inotify/max_user_instances").write_text("6\n")
    (tmp_path / "proc/sys/kernel/random/boot_id").write_text("another-boot\n")
    r = read(host, memory)
    assert r.detail["degraded_consumers"] == [] and r.detail["exhausted_pools"] == {}


def test_file_max_and_tasks_exhaustion_are_remembered_too(tmp_path: Path) -> None:
    host = host_at(tmp_path, uptime=42.0)
    nr = (tmp_path / "proc/sys/fs/file-nr").read_text().split()
    (tmp_path / "proc/sys/fs/file-max").write_text(f"{nr[0]}\n")  # allocated == max
    memory = DictMemory()
    r = read(host, memory)
    assert r.detail["exhausted_pools"]["file_handles"] == {"first": 42.0, "last": 42.0}
