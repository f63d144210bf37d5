"""HostRoot.is_real: the running kernel's procfs seen from this process, under any root."""

from __future__ import annotations

from pathlib import Path

from remediator.host import HostRoot


def test_slash_is_real() -> None:
    assert HostRoot().is_real


def test_a_fixture_tree_is_not(tmp_path: Path) -> None:
    (tmp_path / "proc" / "1").mkdir(parents=True)
    assert not HostRoot(root=tmp_path).is_real
    (tmp_path / "proc" / "self").symlink_to("1")  # a captured tree's self, not this process
    assert not HostRoot(root=tmp_path).is_real


def test_the_hosts_proc_mounted_under_a_root_is_real(tmp_path: Path) -> None:
    # As in the DaemonSet's pod (hostPID, the host's /proc at /host/proc); a symlink stands in
    # for the mount: what counts is that <root>/proc/self is this process.
    (tmp_path / "proc").symlink_to("/proc")
    assert HostRoot(root=tmp_path).is_real
