"""Held files (remediator/handles.py): read and written at offset 0 through descriptors opened in
advance, so that they keep working when no descriptor can be opened; and the owner check of
raise-sysctl, answered from its last look while stat(2) shows nothing changed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from remediator import handles
from remediator.actions import sysctl_persist
from remediator.actions.sysctl_persist import find_owners
from remediator.host import HostRoot
from tests.helpers import make_host

OLD = 1_000_000_000  # a time long ago (2001), for files "not changed lately"


@pytest.fixture
def held() -> Iterator[handles.HeldFiles]:
    h = handles.HeldFiles()
    yield h
    h.close()


def test_a_held_file_reads_its_current_content(tmp_path: Path, held: handles.HeldFiles) -> None:
    f = tmp_path / "value"
    f.write_text("100\n")
    assert held.read(f) is None  # not held
    assert held.hold(f) is None
    with open(f, "r+") as w:  # changed in place, as the kernel changes a /proc/sys value
        w.write("250\n")
    assert held.read(f) == "250\n"
    assert held.write(f, b"300\n") is False  # held read-only: never written through
    assert held.hold(f, writable=True) is None  # upgraded to read-write
    assert held.write(f, b"300\n") is True and f.read_text() == "300\n"
    assert held.held() == {str(f): True}
    assert held.hold(f) is None and held.held() == {str(f): True}  # read-only asked: stays rw


def test_keep_only_closes_the_rest_and_a_missing_file_says_why(
    tmp_path: Path, held: handles.HeldFiles
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("1")
    b.write_text("2")
    held.hold(a)
    held.hold(b)
    fds = len(os.listdir("/proc/self/fd"))
    held.keep_only([a])
    assert held.held() == {str(a): False}
    assert len(os.listdir("/proc/self/fd")) == fds - 1
    assert "No such file" in (held.hold(tmp_path / "missing") or "")


def test_a_file_of_many_records_is_read_to_its_end_and_a_huge_one_is_an_error(
    tmp_path: Path, held: handles.HeldFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held with records=True, a file is read on until a read gives nothing (here past the one
    read's 64 KiB: a key-users of 3,000 uids); past _MAX_RECORDS it is an error, never cut."""
    path = tmp_path / "key-users"
    lines = "".join(f"{uid:5d}:     1 1/1 1/200 9/20000\n" for uid in range(100000, 103000))
    path.write_text(lines)
    assert len(lines) > 1 << 16
    held.hold(path, records=True)
    assert held.read(path) == lines
    monkeypatch.setattr(handles, "_MAX_RECORDS", 1 << 16)
    with pytest.raises(OSError, match="longer than"):
        held.read(path)


def test_host_reads_fall_back_to_open_when_nothing_is_held(tmp_path: Path) -> None:
    host = make_host(tmp_path, {"proc/sys/fs/file-max": "8192\n"})
    assert handles.read_sysctl(host, "fs.file-max") == "8192"
    handles.write_sysctl(host, "fs.file-max", 9000)
    assert (tmp_path / "proc/sys/fs/file-max").read_text() == "9000\n"


CHILD = """
import os, resource, sys
from pathlib import Path
from remediator import handles
from remediator.host import HostRoot
host = HostRoot(Path(sys.argv[1]))
if sys.argv[2] == "held":
    handles.HELD.hold(host.sysctl_path("fs.file-max"), writable=True)
    handles.HELD.hold(host.proc / "sys/fs/file-nr")
n = len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor is closed again
resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))  # no descriptor left: every open fails
try:
    print(handles.read_text(host, host.proc / "sys/fs/file-nr").split()[0])
    handles.write_sysctl(host, "fs.file-max", int(handles.read_sysctl(host, "fs.file-max")) * 2)
    print(handles.read_sysctl(host, "fs.file-max"))
except OSError as e:
    print("failed", e.errno)
"""


@pytest.mark.parametrize(("mode", "out"), [("held", ["900", "16384"]), ("open", ["failed", "24"])])
def test_read_and_raise_work_with_no_descriptor_left_only_when_held(
    tmp_path: Path, mode: str, out: list[str]
) -> None:
    make_host(tmp_path, {"proc/sys/fs/file-max": "8192\n", "proc/sys/fs/file-nr": "900\t0\t8192\n"})
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == out  # 24: EMFILE, this process's share of ENFILE


def _config(tmp_path: Path) -> HostRoot:
    host = make_host(tmp_path, {"etc/sysctl.d/10-net.conf": "fs.file-max = 50000\n", "etc/sysctl.conf": "\n"})
    host = HostRoot(host.root, config_root=host.root)
    for dirpath, dirnames, filenames in os.walk(tmp_path):
        for name in [*dirnames, *filenames, "."]:
            os.utime(Path(dirpath) / name, (OLD, OLD), follow_symlinks=False)
    return host


@pytest.fixture(autouse=True)
def fresh_owner_cache() -> Iterator[None]:
    sysctl_persist._OWNERS.clear()
    yield
    sysctl_persist._OWNERS.clear()


def test_owners_come_from_the_last_look_while_nothing_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = _config(tmp_path)
    (first,) = find_owners(host, "fs.file-max")
    assert first.where == "/etc/sysctl.d/10-net.conf:1"

    def no_open(path: Path, looked: list[Path] | None = None) -> str:
        raise OSError(23, "Too many open files in system")

    monkeypatch.setattr(sysctl_persist, "_read_small", no_open)
    assert find_owners(host, "fs.file-max") == [first]  # no file opened: ENFILE does not matter
    # A new file in a sysctl.d directory (its mtime moves): looked at again, which now fails.
    (tmp_path / "etc/sysctl.d/20-more.conf").write_text("fs.file-max = 60000\n")
    with pytest.raises(OSError):
        find_owners(host, "fs.file-max")
    monkeypatch.undo()
    assert [o.where for o in find_owners(host, "fs.file-max")] == [
        "/etc/sysctl.d/10-net.conf:1",
        "/etc/sysctl.d/20-more.conf:1",
    ]


@pytest.mark.parametrize(
    "change",
    [
        "edit",  # same name, new content
        "remove",
        "replace",  # rename(2) over it, as editors and config management do
        "tuned",  # a tuned profile becomes active
    ],
)
def test_any_change_is_looked_at_again(tmp_path: Path, change: str) -> None:
    host = _config(tmp_path)
    assert len(find_owners(host, "fs.file-max")) == 1
    conf = tmp_path / "etc/sysctl.d/10-net.conf"
    if change == "edit":
        conf.write_text("# fs.file-max moved away\n")
        expected = 0
    elif change == "remove":
        conf.unlink()
        expected = 0
    elif change == "replace":
        tmp = tmp_path / "etc/sysctl.d/.new"
        tmp.write_text("fs.file-max = 1\nfs.file-max = 2\n")
        os.utime(tmp, (OLD, OLD))
        tmp.replace(conf)
        expected = 2
    else:
        (tmp_path / "etc/tuned/p").mkdir(parents=True)
        (tmp_path / "etc/tuned/p/tuned.conf").write_text("[sysctl]\nfs.file-max = 7\n")
        (tmp_path / "etc/tuned/active_profile").write_text("p\n")
        expected = 2
    assert len(find_owners(host, "fs.file-max")) == expected


def test_a_look_at_files_changed_just_before_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = make_host(tmp_path, {"etc/sysctl.d/10-net.conf": "fs.file-max = 50000\n"})
    host = HostRoot(host.root, config_root=host.root)
    find_owners(host, "fs.file-max")
    reads: list[Path] = []
    real = sysctl_persist._read_small

    def counting(path: Path, looked: list[Path] | None = None) -> str:
        reads.append(path)
        return real(path, looked)

    monkeypatch.setattr(sysctl_persist, "_read_small", counting)
    find_owners(host, "fs.file-max")
    assert reads  # the files are seconds old: a same-size edit in the same tick would not show


def test_the_daemon_holds_what_its_policies_need_and_lets_go_at_reload(tmp_path: Path) -> None:
    from remediator.policy.rules import PolicySet
    from remediator.probes.limits import OPTIONAL_SYSCTLS, SYSCTLS
    from remediator.runtime import hold_files, load
    from remediator.settings import Settings, bundled_policies

    files = {
        "proc/meminfo": "MemTotal: 1000 kB\n",
        "proc/sys/fs/file-nr": "1 0 9\n",
        "proc/loadavg": "0 0 0 1/2 3\n",
        "proc/key-users": "    0:     1 1/1 1/200000 9/25000000\n",
        "proc/sys/fs/dentry-state": "1 1 45 0 0 0\n",  # the dentries probe's, every cycle
    }
    files |= {"proc/sys/" + k.replace(".", "/"): "1\n" for k in SYSCTLS if k != "kernel.pid_max"}
    host = make_host(tmp_path, files)
    settings = Settings(host_root=host.root, config_root=host.root)
    policies = load([bundled_policies()])
    try:
        held = hold_files(settings, policies)
        keys = {
            str(getattr(st.params, "key", ""))
            for p in policies.policies
            for st in p.steps
            if st.action == "raise-sysctl"
        }
        raised = {str(host.sysctl_path(k)) for k in keys if host.sysctl_path(k).exists()}
        assert {
            str(host.sysctl_path("fs.file-max")),
            str(host.sysctl_path("fs.inotify.max_user_watches")),
        } <= raised
        # Every present file is held; missing ones (sysctls of modules not loaded) are no data.
        assert held["problems"] == []
        assert set(held["read_write"]) == raised  # the other raised keys are absent here
        assert held["read_only"] == 5 + len(SYSCTLS) - 1 - len(raised)
        every_cycle = {str(host.proc / "key-users"), str(host.proc / "sys/fs/dentry-state")}
        assert every_cycle <= set(handles.HELD.held())
        # key-users has a line per uid: held as a file of many records, read to its end.
        assert handles.read_text(host, host.proc / "key-users") == files["proc/key-users"]
        assert not any(str(host.sysctl_path(k)) in handles.HELD.held() for k in OPTIONAL_SYSCTLS)
        # A reload to a set without limits policies lets everything go.
        only_fifos = PolicySet(
            policies.directory, tuple(p for p in policies.policies if p.probe == "fifos"), policies.controller
        )
        assert hold_files(settings, only_fifos) == {"read_only": 0, "read_write": [], "problems": []}
        assert handles.HELD.held() == {}
        # Dry-run holds the raised keys read-only: it never writes.
        dry = hold_files(Settings(host_root=host.root, config_root=host.root, dry_run=True), policies)
        assert dry["read_write"] == []
    finally:
        handles.HELD.close()
