"""Leaked shims and stale shim sockets: parsers on captured text, the report on a fixture tree."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from remediator.clock import FakeClock
from remediator.host import HostRoot
from remediator.probes.base import ProbeContext
from remediator.probes.shims import ShimScan, SocketWatch, parse_listening_unix, parse_shim_cmdline, report

# Captured on the test VM: a docker container's shim (containerd 1.6.20).
SHIM_ARGV = (
    b"/usr/bin/containerd-shim-runc-v2\0-namespace\0moby\0-id\0b438d9f1d33b\0"
    b"-address\0/run/containerd/containerd.sock\0"
)
NET_UNIX = """Num       RefCount Protocol Flags    Type St Inode Path
0000000000e3ff18: 00000002 00000000 00010000 0001 01 331504 /run/containerd/s/a1f8
000000004b7212c3: 00000003 00000000 00000000 0001 03 331509 /run/containerd/s/a1f8
00000000543448e5: 00000003 00000000 00000000 0001 03 325551
00000000348f5bed: 00000002 00000000 00000000 0001 03 332843 /run/containerd/s/7e52
"""


def test_parse_shim_cmdline() -> None:
    shim = parse_shim_cmdline(19083, SHIM_ARGV)
    assert shim is not None
    assert (shim.namespace, shim.id, shim.address) == (
        "moby",
        "b438d9f1d33b",
        "/run/containerd/containerd.sock",
    )
    assert parse_shim_cmdline(1, b"/sbin/init\0splash\0") is None
    assert parse_shim_cmdline(2, b"") is None
    assert parse_shim_cmdline(3, b"containerd-shim-runc-v2\0-namespace\0moby\0") is None


def test_parse_listening_unix_keeps_only_listening_paths() -> None:
    assert parse_listening_unix(NET_UNIX) == {"/run/containerd/s/a1f8"}


def fake_proc(tmp_path: Path, pid: int, argv: bytes, net_unix: str) -> Path:
    proc = tmp_path / "proc"
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cmdline").write_bytes(argv)
    (proc / "net").mkdir()
    (proc / "net" / "unix").write_text(net_unix)
    return proc


def test_report_names_a_shim_without_task_and_a_socket_nobody_listens_on(tmp_path: Path) -> None:
    sdir = tmp_path / "s"
    sdir.mkdir()
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(sdir / "live"))
    live.listen()
    os.mknod(sdir / "stale", 0o600 | stat.S_IFSOCK)
    (sdir / "not-a-socket").write_text("")
    net = f"Num RefCount Protocol Flags Type St Inode Path\n0: 2 0 00010000 0001 01 1 {sdir / 'live'}\n"
    proc = fake_proc(tmp_path, 4242, SHIM_ARGV, net)
    try:
        r = report(proc, sdir, [(Path("/run/containerd/containerd.sock"), {"other"})])
    finally:
        live.close()
    assert r.shims == 1
    assert [s["id"] for s in r.leaked] == ["b438d9f1d33b"]
    assert "knows no container or task b438d9f1d33b" in r.leaked[0]["reason"]
    assert r.sockets == 2
    assert [s["path"] for s in r.stale] == [str(sdir / "stale")]
    # The same shim, its task known: not leaked. A containerd not asked: unchecked, not leaked.
    known = report(proc, sdir, [(Path("/run/containerd/containerd.sock"), {"b438d9f1d33b"})])
    assert known.leaked == ()
    unasked = report(proc, sdir, [])
    assert (unasked.leaked, unasked.unchecked) == ((), 1)


def test_socket_watch_checks_again_only_when_something_it_depends_on_moved(tmp_path: Path) -> None:
    sdir = tmp_path / "s"
    sdir.mkdir()
    listening = f"Num RefCount Protocol Flags Type St Inode Path\n0: 2 0 00010000 0001 01 1 {sdir / 'a'}\n"
    proc = fake_proc(tmp_path, 4242, SHIM_ARGV, listening)
    os.mknod(sdir / "a", 0o600 | stat.S_IFSOCK)
    shim = parse_shim_cmdline(4242, SHIM_ARGV)
    assert shim is not None
    watch = SocketWatch()

    def stale() -> tuple[list[str], bool]:
        check, reused = watch(proc, sdir, [shim])
        return [os.path.basename(s["path"]) for s in check.stale], reused

    assert stale() == ([], False)
    # The listener died but its shim and the directory are unchanged (a shim that closed its
    # socket and lives on): seen at the periodic check, never later.
    (proc / "net" / "unix").write_text("Num RefCount Protocol Flags Type St Inode Path\n")
    seen = [stale() for _ in range(SocketWatch.REFRESH_EVERY)]
    assert seen[:-1] == [([], True)] * (SocketWatch.REFRESH_EVERY - 1)
    assert seen[-1] == (["a"], False)
    assert stale() == (["a"], True)
    # A new socket file moves the directory's mtime: checked at once.
    (proc / "net" / "unix").write_text(listening)
    os.mknod(sdir / "b", 0o600 | stat.S_IFSOCK)
    os.utime(sdir, ns=(0, os.stat(sdir).st_mtime_ns + 1))  # a coarse clock may not move it
    assert stale() == (["b"], False)
    # Now b listens and a does not: nothing the watch depends on moved, so the last answer holds
    # until the shim that served a goes away, which is checked at once.
    (proc / "net" / "unix").write_text(listening.replace(f"{sdir / 'a'}", f"{sdir / 'b'}"))
    assert stale() == (["b"], True)
    gone, reused = watch(proc, sdir, [])
    assert [os.path.basename(s["path"]) for s in gone.stale] == ["a"] and not reused
    # A failed check is never reused.
    (proc / "net" / "unix").unlink()
    (proc / "net").rmdir()
    (proc / "net").write_text("")  # /proc/net/unix unreadable: NotADirectoryError
    first, again = watch(proc, sdir, [shim]), watch(proc, sdir, [shim])
    assert first[0].error is not None and (first[1], again[1]) == (False, False)


def test_one_listing_of_proc_serves_the_cycle(tmp_path: Path) -> None:
    """The shim scan and the fd scan share the cycle's listing of /proc (ProbeContext.processes):
    listed once, a process started after it is seen the next cycle, not this one."""
    proc = fake_proc(tmp_path, 4242, SHIM_ARGV, NET_UNIX)
    ctx = ProbeContext(HostRoot(tmp_path), FakeClock(0.0))
    listing = ctx.processes()
    assert set(listing) == {4242}
    assert listing[4242] == os.stat(proc / "4242").st_ino
    (proc / "4243").mkdir()
    (proc / "4243" / "cmdline").write_bytes(SHIM_ARGV.replace(b"b438d9f1d33b", b"c0ffee"))
    assert ctx.processes() is listing  # the same listing for the rest of the cycle
    scan = ShimScan()
    assert [s.id for s in scan(proc, ctx.processes())] == ["b438d9f1d33b"]
    later = ProbeContext(HostRoot(tmp_path), FakeClock(10.0))  # the next cycle lists again
    assert sorted(s.id for s in scan(proc, later.processes())) == ["b438d9f1d33b", "c0ffee"]
    assert sorted(s.id for s in scan(proc)) == ["b438d9f1d33b", "c0ffee"]  # or lists itself
