"""The cycle's fast paths on the real kernel: each gives what the plain path it replaces gives.

* The C survey of a steady fd scan and the Python one (limits_fdread.survey_py) report the same
  processes for the same expectations, and the totals a steady scan keeps incrementally are
  what its records add up to (limits_totals), while processes come and go.
* The /proc listing in C is os.scandir's; the uptime from the boot clock is /proc/uptime's.
* A container's cgroup counter held open (counter_files.CounterFiles): `docker rm` goes through
  while it is held, `docker restart` (a new cgroup under the same path) is read from the new
  cgroup, and the sweep lets go of a removed container's file.
* A held seq_file of many records reads to its end, and every file the probes hold reads as a
  plain open reads it.

Read-only on the host, except for the test's own containers (removed at teardown).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remediator import handles
from remediator.host import HostRoot
from remediator.probes import _batch
from remediator.probes.base import list_processes
from remediator.probes.cgroup_slab import slab_reclaimable, slab_reclaimable_many
from remediator.probes.containers import make_inventory_factory
from remediator.probes.counter_files import CounterFiles
from remediator.probes.dentries import find_memory_hierarchy
from remediator.probes.limits_exhausted import boot_and_uptime
from remediator.probes.limits_fdread import NATIVE_READER, PYTHON_READER, S_RUNTIME, S_THREADS, survey_py
from remediator.probes.limits_fdscan import ScanCache, scan_processes
from remediator.probes.limits_totals import Totals
from remediator.runtime import probe_files
from tests.real.conftest import MakeContainer

pytestmark = pytest.mark.real

DOCKER = "unix:///var/run/docker.sock"


def test_the_c_listing_of_proc_is_scandirs() -> None:
    for _ in range(20):  # processes come and go: equal on some try, and never far apart
        with os.scandir("/proc") as entries:
            before = {int(e.name): e.inode() for e in entries if e.name.isdigit()}
        got = _batch.list_pids("/proc")
        if got == before:
            break
    assert got == before
    assert got[os.getpid()] == os.stat(f"/proc/{os.getpid()}").st_ino
    assert list_processes("/proc") == got or abs(len(list_processes("/proc")) - len(got)) < 50


def test_the_c_survey_reports_what_the_python_survey_reports() -> None:
    """Expectations from a real scan, some made wrong on purpose (a moved fd count, a watcher's
    CPU time, another inode): both surveys name the same processes, with the same glances for
    the ones that are alive throughout."""
    assert NATIVE_READER is not None, "remediator.probes._fdscan did not build"
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sleeper.stdout is not None and sleeper.stdout.readline() == "ready\n"  # settled
    try:
        cache = ScanCache()
        scan_processes(HostRoot(), None, cache=cache, reader=NATIVE_READER)
        expect = dict(cache.expect)
        me = os.getpid()
        e = expect[sleeper.pid]
        expect[sleeper.pid] = (e[0], e[1] + 1, e[2], e[3], e[4])  # its fd count "moved"
        e = expect[me]
        expect[me] = (e[0], e[1], e[2] | S_THREADS | S_RUNTIME, e[3], 1)  # "a watcher that ran"
        e = expect[1]
        expect[1] = (e[0] + 1, *e[1:])  # "another process under pid 1"
        listing = list_processes("/proc")
        for _ in range(20):
            c = NATIVE_READER.survey("/proc", listing, expect, 0)
            p = survey_py(PYTHON_READER, "/proc", listing, expect, 0)
            if c.keys() == p.keys():
                break
            listing = list_processes("/proc")  # something exited between the two: again
        assert c.keys() == p.keys()
        assert c[1] is None and p[1] is None
        assert c[sleeper.pid].fd_count + 1 == expect[sleeper.pid][1]
        assert p[sleeper.pid].fd_count == c[sleeper.pid].fd_count
        assert c[me].threads == p[me].threads and c[me].runtime_ns > 1
        # Unchanged expectations: nothing to report about the sleeper once they are true again.
        expect[sleeper.pid] = cache.expect[sleeper.pid]
        assert sleeper.pid not in NATIVE_READER.survey("/proc", listing, expect, 0)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_incremental_scan_totals_what_its_records_add_up_to(make_container: MakeContainer) -> None:
    """Steady scans while processes come and go in containers and on the host: after each, the
    totals kept incrementally equal the totals counted from nothing over the same records, and
    the scan's processes are the listing's (a full scan from an empty cache finds the same)."""
    host = HostRoot()
    cache = ScanCache()
    containers = [make_container() for _ in range(3)]
    feed = make_inventory_factory(DOCKER, host, 30.0)
    inventory = feed()
    assert inventory.error is None
    try:
        scan_processes(host, inventory, cache=cache, full_every=1000)
        changed = 0
        for i in range(12):
            containers[i % 3].exec_run(["sh", "-c", "sleep 2 & sleep 1"], detach=True)
            subprocess.run(["true"], check=True)
            time.sleep(0.3)
            listing = list_processes("/proc")
            steady = scan_processes(host, inventory, cache=cache, full_every=1000, listing=listing)
            assert not steady.full
            changed += steady.examined
            recount = Totals()
            for pid, rec in sorted(cache.records.items()):
                recount.count(pid, rec, lambda _rec, pid=pid: cache.totals.shares[pid].consumer)
            totals = cache.totals
            assert (recount.fds, recount.usage, recount.in_containers) == (
                totals.fds,
                totals.usage,
                totals.in_containers,
            )
            key = lambda f: (f.pid, f.fd, f.uid, f.signature)  # noqa: E731
            for mine, theirs in zip(recount.anon_fds(), totals.anon_fds(), strict=True):
                assert list(map(key, mine)) == list(map(key, theirs))
            assert recount.pipe_pages_by_uid() == totals.pipe_pages_by_uid() == steady.pipe_pages_by_uid
            assert steady.pids == len(cache.records) and steady.fds == totals.fds
            fresh = scan_processes(host, inventory, cache=ScanCache(), listing=listing)
            assert fresh.full and fresh.pids + fresh.vanished == steady.pids + steady.vanished
            assert {c for c, u in steady.containers.items() if u.tasks} == {
                c for c, u in fresh.containers.items() if u.tasks
            }
        assert changed > 0  # the exec'd processes were read
        assert steady.examined < steady.pids // 2  # and the scans were incremental
    finally:
        feed.close()


def test_a_held_cgroup_counter_follows_rm_and_restart(make_container: MakeContainer) -> None:
    host = HostRoot()
    hierarchy = find_memory_hierarchy(host)
    assert hierarchy is not None
    files = CounterFiles()
    kept, gone = make_container(), make_container()
    feed = make_inventory_factory(DOCKER, host, 30.0)
    inventory = feed()
    try:
        refs = {c.id: c for c in inventory.containers()}
        cg = {c.id: str(refs[c.id].cgroup) for c in (kept, gone)}
        name = "memory.kmem.usage_in_bytes" if hierarchy.version == 1 else "memory.stat"
        paths = {cid: str(hierarchy._dir(g) / name) for cid, g in cg.items()}
        first = files.read_many([paths[kept.id], paths[gone.id]])
        assert all(isinstance(b, bytes) and b for b in first) and files.held() == 2
        gone.remove(force=True)  # while its counter file is held open
        assert not Path(paths[gone.id]).exists()
        after = files.read_many([paths[kept.id], paths[gone.id]])
        assert isinstance(after[0], bytes) and isinstance(after[1], OSError)
        files.sweep()  # the removed one's descriptor went with its failed read
        assert files.held() == 1
        files.sweep()  # and one not read since the last sweep is let go
        assert files.held() == 0
        files.read_many([paths[kept.id]])
        before = os.stat(Path(paths[kept.id]).parent).st_ino
        kept.restart(timeout=1)
        assert os.stat(Path(paths[kept.id]).parent).st_ino != before  # a new cgroup, same path
        again = files.read_many([paths[kept.id]])
        assert isinstance(again[0], bytes)
        # The probe's batch read and its one-by-one read agree on the new cgroup.
        many = slab_reclaimable_many(host, hierarchy, [cg[kept.id]])[0]
        one = slab_reclaimable(host, hierarchy, cg[kept.id])
        assert many is not None and many[1] == one[1]
    finally:
        files.close()
        feed.close()


def test_the_uptime_from_the_boot_clock_is_proc_uptime() -> None:
    before = float(Path("/proc/uptime").read_text().split()[0])
    boot, uptime = boot_and_uptime(HostRoot())
    after = float(Path("/proc/uptime").read_text().split()[0])
    assert boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert uptime is not None and before - 0.01 <= uptime <= after + 0.01


def test_a_held_file_of_many_records_is_read_to_its_end() -> None:
    """A seq_file of many records fills at most a page per read: held with `records=True` it
    reads whole, held without it only its first page (why key-users and softnet_stat say so)."""
    # A child with a maps file of many pages that does not change while it sleeps.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import mmap, time; m = [mmap.mmap(-1, 4096) for _ in range(400)];"
            " print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    held = handles.HeldFiles()
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        maps = Path(f"/proc/{child.pid}/maps")
        plain = maps.read_text()
        assert len(plain) > 3 * 4096
        assert held.hold(maps, records=True) is None
        assert held.read(maps) == plain
        assert held.read(maps) == plain  # and again, from offset 0
        held.hold(maps)  # the same descriptor, now read as one record
        one = held.read(maps)
        assert one is not None and len(one) <= 4096 and plain.startswith(one)
    finally:
        held.close()
        child.kill()
        child.wait()


def test_the_files_the_probes_hold_read_as_a_plain_open_reads_them() -> None:
    """Every file the bundled probes hold (runtime.probe_files) is there on this kernel, and
    read through its held descriptor gives what an open gives (counters that move between the
    two reads compared by their fields' count)."""
    host = HostRoot()
    files = probe_files(host, ["dentries", "fifos", "limits"])
    paths = {str(f.path): f for f in files}
    for name in ["key-users", "net/softnet_stat"]:
        assert paths[f"/proc/{name}"].records
    assert "/proc/sys/fs/dentry-state" in paths and "/proc/sys/fs/file-nr" in paths
    held = handles.HeldFiles()
    try:
        for f in files:
            if not f.path.exists():
                continue  # a sysctl of a module not loaded (nf_conntrack)
            assert held.hold(f.path, records=f.records) is None, f.path
            got, plain = held.read(f.path), f.path.read_text()
            assert got is not None
            if f.path.name in ("dentry-state", "file-nr", "meminfo", "loadavg", "softnet_stat", "key-users"):
                assert [len(line.split()) for line in got.splitlines()] == [
                    len(line.split()) for line in plain.splitlines()
                ], f.path
            else:
                assert got == plain, f.path
    finally:
        held.close()
