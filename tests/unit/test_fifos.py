"""The fifos probe: parsers, each clause of the orphan rule, and the probe on fixture trees.

Fixture trees hold real FIFOs (os.mkfifo) under tmp_path/run/containerd/fifo; "open by some
process" is a symlink tmp_path/proc/<pid>/fd/<n> -> the FIFO (stat follows it exactly as it
follows the real magic link), or, once, the real /proc with the FIFO held open by this test.
containerd is a `FakeCtr` answering canned `ctr` output.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from remediator.clock import FakeClock, SystemClock
from remediator.errors import PermanentError, TemporaryError
from remediator.host import HostRoot
from remediator.model import Reading
from remediator.probes.base import PROBES, ProbeContext
from remediator.probes.fifos import (
    ContainerdNotFound,
    CtrCli,
    DirSnapshot,
    Entry,
    FifosProbe,
    Keep,
    OrphanDir,
    judge_dynamic,
    judge_static,
    parse_exec_ids,
    parse_fifo_name,
    parse_id_list,
    query_known_ids,
    scan_open_fifos,
)

HOUR = 3600.0
STREAMS = ("stdin", "stdout", "stderr")

# Captured from containerd 1.6.20 (`ctr -n moby tasks ps <id>` with one `docker exec` running).
EXEC_ID = "81d38a55a2e43fb012868cb53325074591022c2e84bd652d2aa5d2198fb734e2"
CTR_TASKS_PS = f"PID     INFO\n6767    -\n6813    &ProcessDetails{{ExecID:{EXEC_ID},XXX_unrecognized:[],}}\n"


# ---------------------------------------------------------------------------------------------
# Builders shared with test_fifos_cleanup.py
# ---------------------------------------------------------------------------------------------


class FakeCtr:
    """A CtrRunner answering from a table {(namespace or None, verb...): output or exception}.

    Default: one namespace "default" with no containers and no tasks. Records every call.
    """

    def __init__(
        self,
        containers: Iterable[str] = (),
        tasks: Iterable[str] = (),
        execs: Mapping[str, Sequence[str]] | None = None,
        fail: BaseException | None = None,
    ) -> None:
        self.containers = list(containers)
        self.tasks = list(tasks)
        self.execs = dict(execs or {})
        self.fail = fail
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def __call__(self, address: str, args: Sequence[str]) -> str:
        self.calls.append((address, tuple(args)))
        if self.fail is not None:
            raise self.fail
        match list(args):
            case ["namespaces", "ls", "-q"]:
                return "default\n"
            case ["-n", "default", "containers", "ls", "-q"]:
                return "".join(f"{c}\n" for c in self.containers)
            case ["-n", "default", "tasks", "ls", "-q"]:
                return "".join(f"{t}\n" for t in self.tasks)
            case ["-n", "default", "tasks", "ps", task]:
                lines = ["PID     INFO", "1    -"]
                lines += [
                    f"2    &ProcessDetails{{ExecID:{e},XXX_unrecognized:[],}}"
                    for e in self.execs.get(task, ())
                ]
                return "\n".join(lines) + "\n"
        raise AssertionError(f"unexpected ctr call {args}")


class Tree:
    """A fixture host: <root>/run/containerd/fifo with leaked dirs, a fake /proc, a socket."""

    def __init__(self, root: Path, now: float, *, socket: bool = True) -> None:
        self.root = root
        self.now = now
        self.host = HostRoot(root)
        self.fifo_root = root / "run" / "containerd" / "fifo"
        self.fifo_root.mkdir(parents=True)
        (root / "proc").mkdir()
        if socket:
            # mknod(2) makes a socket inode without binding (no 108-byte sun_path limit).
            os.mknod(root / "run" / "containerd" / "containerd.sock", 0o600 | stat.S_IFSOCK)

    def leak(
        self,
        name: str,
        ids: Iterable[str] = ("test.1",),
        streams: Iterable[str] = STREAMS,
        age: float = HOUR,
    ) -> Path:
        d = self.fifo_root / name
        d.mkdir()
        for i in ids:
            for s in streams:
                os.mkfifo(d / f"{i}-{s}", 0o700)
        self.age(d, age)
        return d

    def age(self, d: Path, age: float) -> None:
        """Backdate every entry, then the directory (creating entries touches its mtime)."""
        t = self.now - age
        for p in d.iterdir():
            os.utime(p, (t, t), follow_symlinks=False)
        os.utime(d, (t, t), follow_symlinks=False)

    def hold_open(self, fifo: Path, pid: int = 4242, fd: int = 7) -> None:
        """Make fake /proc say process `pid` has `fifo` open as fd `fd`."""
        fd_dir = self.root / "proc" / str(pid) / "fd"
        fd_dir.mkdir(parents=True, exist_ok=True)
        (fd_dir / str(fd)).symlink_to(fifo)

    def read(self, ctr: FakeCtr | None = None, **kwargs: Any) -> Reading:
        probe = FifosProbe(ctr=ctr or FakeCtr(), **kwargs)
        return probe.read(ProbeContext(self.host, FakeClock(self.now)))


@pytest.fixture
def now() -> float:
    # Real file mtimes are compared with it, so it starts at the real time; FakeClock after.
    return SystemClock().now()


@pytest.fixture
def tree(tmp_path: Path, now: float) -> Tree:
    return Tree(tmp_path, now)


@contextmanager
def real_proc(tree: Tree) -> Iterator[None]:
    """Point the fixture host's proc at the real /proc for the duration."""
    fake = tree.root / "proc"
    fake.rename(tree.root / "proc.fake")
    fake.symlink_to(HostRoot().proc)
    try:
        yield
    finally:
        fake.unlink()
        (tree.root / "proc.fake").rename(fake)


# ---------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("test.32583-stdout", "test.32583"),
        ("test.32583-stdin", "test.32583"),
        ("ex-1-stderr", "ex-1"),  # exec ids may contain dashes: the last one splits
        ("81d38a55a2e4-stdout", "81d38a55a2e4"),
        ("init-stdout", "init"),
        ("-stdout", None),  # no id
        ("test.1-stdlog", None),
        ("test.1", None),
        ("stdout", None),
    ],
)
def test_parse_fifo_name(name: str, expected: str | None) -> None:
    assert parse_fifo_name(name) == expected


def test_parse_id_list_ignores_blank_lines() -> None:
    assert parse_id_list("a\n\n  b \nc\n") == {"a", "b", "c"}
    assert parse_id_list("") == frozenset()


def test_parse_exec_ids_from_captured_ctr_tasks_ps() -> None:
    assert parse_exec_ids(CTR_TASKS_PS) == {EXEC_ID}
    assert parse_exec_ids("PID     INFO\n6767    -\n") == frozenset()


# ---------------------------------------------------------------------------------------------
# The rule, pure
# ---------------------------------------------------------------------------------------------

DEV = 42
NOW = 1_700_000_000.0


def snap(
    kind: str = "dir",
    dev: int = DEV,
    mtime: float = NOW - HOUR,
    entries: Sequence[tuple[str, str]] = (("t-stdin", "fifo"), ("t-stdout", "fifo")),
    overflow: bool = False,
    entry_mtime: float | None = None,
    entry_dev: int = DEV,
) -> DirSnapshot:
    es = tuple(
        Entry(n, k, entry_dev, 100 + i, mtime if entry_mtime is None else entry_mtime)
        for i, (n, k) in enumerate(entries)
    )
    return DirSnapshot("123", kind, dev, 99, mtime, es, overflow)


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        (snap(), None),
        (snap(kind="symlink"), Keep.SYMLINK),  # (a)
        (snap(kind="file"), Keep.NOT_A_DIRECTORY),  # (a)
        (snap(dev=7), Keep.OTHER_DEVICE),  # (a)
        (snap(entries=[("t-stdout", "fifo"), ("log", "file")]), Keep.NOT_ONLY_FIFOS),  # (b)
        (snap(entries=[("t-stdout", "fifo"), ("sub", "dir")]), Keep.NOT_ONLY_FIFOS),  # (b)
        (snap(entries=[("t-stdout", "symlink")]), Keep.NOT_ONLY_FIFOS),  # (b)
        (snap(entry_dev=7), Keep.NOT_ONLY_FIFOS),  # (b) a FIFO on another device: a mount
        (snap(entries=[]), Keep.EMPTY),  # (b)
        (snap(entries=[(f"t{i}-stdout", "fifo") for i in range(17)]), Keep.TOO_MANY_ENTRIES),
        (snap(overflow=True), Keep.TOO_MANY_ENTRIES),  # (b)
        (snap(entries=[("t-stdout", "fifo"), ("t-foo", "fifo")]), Keep.UNKNOWN_NAME),  # (b)
        (snap(mtime=NOW - 599), Keep.TOO_YOUNG),  # (c) the directory
        (snap(entry_mtime=NOW - 1), Keep.TOO_YOUNG),  # (c) one FIFO written to recently
        (snap(mtime=NOW - 600), None),  # (c) exactly min_age is old enough
    ],
)
def test_judge_static(s: DirSnapshot, expected: Keep | None) -> None:
    assert judge_static(s, root_dev=DEV, now=NOW, min_age=600, max_entries=16) is expected


def test_judge_dynamic() -> None:
    s = snap()
    assert judge_dynamic(s, set(), set()) is None
    assert judge_dynamic(s, {(DEV, 101)}, set()) is Keep.OPEN  # (d)
    assert judge_dynamic(s, {(7, 101)}, set()) is None  # same inode number, other device
    assert judge_dynamic(s, set(), {"t"}) is Keep.KNOWN_TO_CONTAINERD  # (e)
    assert judge_dynamic(s, set(), {"t2"}) is None


def test_orphan_dir_round_trips_and_rejects_garbage() -> None:
    o = OrphanDir("123", 5, 6, 7.5, ("t-stdin",))
    assert OrphanDir.from_dict(o.to_dict()) == o
    for bad in ({"name": "x"}, {**o.to_dict(), "ino": "5"}, {**o.to_dict(), "fifos": [1]}):
        with pytest.raises(ValueError, match="not an orphan"):
            OrphanDir.from_dict(bad)


# ---------------------------------------------------------------------------------------------
# The probe on fixture trees
# ---------------------------------------------------------------------------------------------


def test_probe_is_registered_with_its_metrics() -> None:
    spec = PROBES["fifos"].spec()
    assert [m.name for m in spec.metrics] == [
        "run_inodes_used",
        "run_inodes_free",
        "fifo_dirs",
        "orphan_fifo_dirs",
    ]
    used = spec.metric("run_inodes_used")
    assert used is not None and used.limit is not None  # "80%" works


def test_leaked_dir_is_an_orphan(tree: Tree) -> None:
    d = tree.leak("000001714", ids=["test.32583"])
    r = tree.read()
    assert r.error is None
    assert r.values["fifo_dirs"] == 1
    assert r.values["orphan_fifo_dirs"] == 1
    st = d.stat()
    assert r.detail["orphans"] == [
        {
            "name": "000001714",
            "ino": st.st_ino,
            "dev": st.st_dev,
            "mtime": pytest.approx(tree.now - HOUR),
            "fifos": ["test.32583-stderr", "test.32583-stdin", "test.32583-stdout"],
        }
    ]
    assert r.detail["truncated"] is False
    assert r.detail["root"] == str(tree.fifo_root)
    assert r.detail["dev"] == st.st_dev
    assert r.detail["device"] == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    assert r.detail["orphan_check"] == "complete"
    assert r.detail["containerd"]["complete"] is True
    assert r.detail["open_fifo_scan"]["complete"] is True


def test_inode_metrics_come_from_statvfs_of_run(tree: Tree) -> None:
    r = tree.read()
    vfs = os.statvfs(tree.host.run)
    assert r.limits["run_inodes_used"] == vfs.f_files
    # Other processes share this filesystem: allow for a little churn between the two reads.
    assert r.values["run_inodes_used"] == pytest.approx(vfs.f_files - vfs.f_ffree, abs=1000)
    assert r.values["run_inodes_free"] == pytest.approx(vfs.f_ffree, abs=1000)


def test_each_clause_keeps_its_dir(tree: Tree, tmp_path: Path) -> None:
    tree.leak("orphan", ids=["gone.1"])
    tree.leak("young", ids=["young.1"], age=60)  # (c)
    tree.leak("written", ids=["w.1"])
    recent = tree.now - 5
    os.utime(tree.fifo_root / "written" / "w.1-stdout", (recent, recent))  # (c) fresh output
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "x-stdout")
    (tree.fifo_root / "link").symlink_to(outside)  # (a)
    f = tree.leak("with-file", ids=["f.1"])
    (f / "notes.txt").write_text("mine")  # (b)
    tree.age(f, HOUR)
    s = tree.leak("with-subdir", ids=["s.1"])
    (s / "sub").mkdir()  # (b)
    tree.age(s, HOUR)
    tree.leak("empty", ids=[])  # (b)
    tree.leak("crowded", ids=[f"c{i}" for i in range(6)])  # (b) 18 entries
    tree.leak("odd-names", ids=["o.1"], streams=["stdin", "log"])  # (b)
    held = tree.leak("held", ids=["h.1"])
    tree.hold_open(held / "h.1-stdout")  # (d)
    tree.leak("known", ids=["alive.1"])  # (e)
    (tree.fifo_root / "stray-file").write_text("")  # (a)

    r = tree.read(FakeCtr(containers=["alive.1"]))

    assert [o["name"] for o in r.detail["orphans"]] == ["orphan"]
    assert r.values["orphan_fifo_dirs"] == 1
    assert r.values["fifo_dirs"] == 12
    assert r.detail["kept"] == {
        "empty": 1,
        "known_to_containerd": 1,
        "not_a_directory": 1,
        "not_only_fifos": 2,
        "open": 1,
        "symlink": 1,
        "too_many_entries": 1,
        "too_young": 2,
        "unknown_name": 1,
    }


def test_fifo_held_open_by_this_very_process_is_not_an_orphan(tree: Tree) -> None:
    held = tree.leak("held", ids=["h.1"])
    tree.leak("orphan", ids=["o.1"])
    # O_NONBLOCK: opening a FIFO for reading without a writer returns at once (fifo(7)).
    fd = os.open(held / "h.1-stdout", os.O_RDONLY | os.O_NONBLOCK)
    try:
        with real_proc(tree):
            r = tree.read()
    finally:
        os.close(fd)
    assert [o["name"] for o in r.detail["orphans"]] == ["orphan"]
    assert r.detail["kept"] == {"open": 1}
    assert r.detail["open_fifo_scan"]["processes"] > 1


@pytest.mark.parametrize("where", ["task", "exec"])
def test_ids_known_as_tasks_or_execs_are_not_orphans(tree: Tree, where: str) -> None:
    tree.leak("1", ids=["ex-9"])
    ctr = FakeCtr(tasks=["ex-9"]) if where == "task" else FakeCtr(tasks=["c1"], execs={"c1": ["ex-9"]})
    r = tree.read(ctr)
    assert r.detail["orphans"] == []
    assert r.detail["kept"] == {"known_to_containerd": 1}


def test_exec_processes_are_listed_only_while_an_id_is_unknown(tree: Tree) -> None:
    tree.leak("1", ids=["c1"])
    ctr = FakeCtr(containers=["c1"], tasks=["c1"])
    tree.read(ctr)
    assert not any("ps" in args for _, args in ctr.calls)
    tree.leak("2", ids=["gone"])
    ctr = FakeCtr(containers=["c1"], tasks=["c1"])
    tree.read(ctr)
    assert (
        str(tree.host.run / "containerd" / "containerd.sock"),
        ("-n", "default", "tasks", "ps", "c1"),
    ) in ctr.calls


def test_containerd_is_not_asked_when_nothing_passes_the_cheap_clauses(tree: Tree) -> None:
    tree.leak("young", age=1)
    ctr = FakeCtr()
    r = tree.read(ctr)
    assert ctr.calls == []
    assert r.detail["containerd"] == {"queried": False}
    assert r.detail["open_fifo_scan"] is None
    assert r.values["orphan_fifo_dirs"] == 0


@pytest.mark.parametrize(
    "fail",
    [TemporaryError("ctr namespaces ls -q: no answer in 5s"), PermanentError("ctr: not found")],
)
def test_unreachable_containerd_makes_nothing_an_orphan(tree: Tree, fail: Exception) -> None:
    tree.leak("1")
    r = tree.read(FakeCtr(fail=fail))
    assert r.detail["orphans"] == []
    assert "orphan_fifo_dirs" not in r.values  # unknown is not zero
    assert r.values["fifo_dirs"] == 1
    assert r.detail["kept"] == {"unverified": 1}
    assert r.detail["orphan_check"] == "incomplete"
    assert r.detail["containerd"]["complete"] is False
    assert str(fail) in r.detail["containerd"]["errors"][0]


def test_missing_containerd_socket_makes_nothing_an_orphan(tmp_path: Path, now: float) -> None:
    tree = Tree(tmp_path, now, socket=False)
    tree.leak("1")
    ctr = FakeCtr()
    r = tree.read(ctr)
    assert ctr.calls == []
    assert r.detail["kept"] == {"unverified": 1}
    assert "No such file" in r.detail["containerd"]["errors"][0]


def test_dockers_own_containerd_must_answer_too(tree: Tree) -> None:
    tree.leak("1")
    docker_sock = tree.host.run / "docker" / "containerd" / "containerd.sock"
    docker_sock.parent.mkdir(parents=True)
    os.mknod(docker_sock, 0o600 | stat.S_IFSOCK)

    def ctr(address: str, args: Sequence[str]) -> str:
        if address == str(docker_sock):
            raise TemporaryError("connection refused")
        return FakeCtr()(address, args)

    r = FifosProbe(ctr=ctr).read(ProbeContext(tree.host, FakeClock(tree.now)))
    assert r.detail["orphans"] == []
    assert r.detail["containerd"]["sockets"] == [
        str(tree.host.run / "containerd" / "containerd.sock"),
        str(docker_sock),
    ]


def test_too_many_tasks_to_list_execs_is_incomplete(tree: Tree) -> None:
    tree.leak("1", ids=["gone"])
    r = tree.read(FakeCtr(tasks=["a", "b", "c"]), max_task_queries=2)
    assert r.detail["orphans"] == []
    assert "3 tasks" in r.detail["containerd"]["errors"][0]


def test_unreadable_proc_makes_nothing_an_orphan(tree: Tree) -> None:
    tree.leak("1")
    (tree.root / "proc" / "77").mkdir()
    (tree.root / "proc" / "77" / "fd").write_text("")  # listdir -> ENOTDIR
    r = tree.read()
    assert r.detail["orphans"] == []
    assert r.detail["open_fifo_scan"]["complete"] is False
    assert r.detail["kept"] == {"unverified": 1}


def test_missing_fifo_root_is_zero_dirs_not_an_error(tmp_path: Path, now: float) -> None:
    (tmp_path / "run").mkdir()
    r = FifosProbe(ctr=FakeCtr()).read(ProbeContext(HostRoot(tmp_path), FakeClock(now)))
    assert r.error is None
    assert r.values["fifo_dirs"] == 0
    assert r.values["orphan_fifo_dirs"] == 0
    assert r.detail["present"] is False


def test_fifo_root_replaced_by_a_symlink_is_not_followed(tmp_path: Path, now: float) -> None:
    elsewhere = Tree(tmp_path / "elsewhere", now)
    elsewhere.leak("1")
    run = tmp_path / "host" / "run" / "containerd"
    run.mkdir(parents=True)
    (run / "fifo").symlink_to(elsewhere.fifo_root)
    r = FifosProbe(ctr=FakeCtr()).read(ProbeContext(HostRoot(tmp_path / "host"), FakeClock(now)))
    assert r.detail["problem"].endswith("is not a directory")
    assert "fifo_dirs" not in r.values
    assert "orphan_fifo_dirs" not in r.values


def test_missing_run_is_a_probe_error(tmp_path: Path, now: float) -> None:
    r = FifosProbe(ctr=FakeCtr()).read(ProbeContext(HostRoot(tmp_path), FakeClock(now)))
    assert r.error is not None and "statvfs" in r.error


def test_orphan_list_is_capped_oldest_first(tree: Tree) -> None:
    tree.leak("b", ids=["b"], age=3 * HOUR)
    tree.leak("a", ids=["a"], age=2 * HOUR)
    tree.leak("c", ids=["c"], age=4 * HOUR)
    r = tree.read(max_listed=2)
    assert [o["name"] for o in r.detail["orphans"]] == ["c", "b"]
    assert r.detail["truncated"] is True
    assert r.values["orphan_fifo_dirs"] == 3


def test_docker_fifo_dirs_are_reported_not_judged(tree: Tree) -> None:
    d = tree.host.run / "docker" / "containerd" / ("ab" * 32)
    d.mkdir(parents=True)
    for n in ("init-stdout", "init-stderr"):
        os.mkfifo(d / n)
    (d.parent / "containerd.sock").write_text("")  # not a socket: would fail the query
    r = tree.read()
    assert r.detail["docker"] == {"root": str(d.parent), "dirs": 1, "fifos": 2}
    assert r.values["orphan_fifo_dirs"] == 0


def test_scan_open_fifos_filters_by_device_and_skips_vanished_fds(tree: Tree) -> None:
    d = tree.leak("1")
    tree.hold_open(d / "test.1-stdin", pid=1, fd=3)
    (tree.root / "proc" / "1" / "fd" / "4").symlink_to(tree.root / "gone")  # closed meanwhile
    (tree.root / "proc" / "self").symlink_to("1")  # not a pid: ignored
    st = os.stat(d / "test.1-stdin")
    scan = scan_open_fifos(tree.host.proc, {st.st_dev})
    assert scan.complete
    assert scan.keys == {(st.st_dev, st.st_ino)}
    assert scan.processes == 1
    assert scan_open_fifos(tree.host.proc, {st.st_dev + 1}).keys == frozenset()


def test_query_known_ids_unions_every_namespace(tree: Tree) -> None:
    def ctr(address: str, args: Sequence[str]) -> str:
        table = {
            ("namespaces", "ls", "-q"): "default\nmoby\n",
            ("-n", "default", "containers", "ls", "-q"): "a\n",
            ("-n", "default", "tasks", "ls", "-q"): "",
            ("-n", "moby", "containers", "ls", "-q"): "b\n",
            ("-n", "moby", "tasks", "ls", "-q"): "b\n",
            ("-n", "moby", "tasks", "ps", "b"): CTR_TASKS_PS,
        }
        return table[tuple(args)]

    sock = tree.host.run / "containerd" / "containerd.sock"
    known = query_known_ids(ctr, [sock], {"zzz"})
    assert known.complete
    assert known.ids == {"a", "b", EXEC_ID}


def test_task_that_vanished_before_ps_is_not_a_failure(tree: Tree) -> None:
    def ctr(address: str, args: Sequence[str]) -> str:
        if "ps" in args:
            raise ContainerdNotFound('ctr: task "t" not found')
        return FakeCtr(tasks=["t"])(address, args)

    known = query_known_ids(ctr, [tree.host.run / "containerd" / "containerd.sock"], {"x"})
    assert known.complete
    assert known.ids == {"t"}


# ---------------------------------------------------------------------------------------------
# The ctr adapter, against a stand-in `ctr` script
# ---------------------------------------------------------------------------------------------


def fake_ctr_binary(tmp_path: Path, body: str) -> str:
    script = tmp_path / "ctr"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_ctr_cli_passes_timeouts_and_retries_temporary_failures(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    binary = fake_ctr_binary(
        tmp_path,
        f"echo x >> {counter}\n"
        f'[ "$(wc -l < {counter})" -ge 3 ] || {{ echo "ctr: connection refused" >&2; exit 1; }}\n'
        'echo "$@"',
    )
    sleeps: list[float] = []
    out = CtrCli(binary, timeout=3, sleep=sleeps.append)("/run/x.sock", ["namespaces", "ls", "-q"])
    assert out.split() == [
        "--address",
        "/run/x.sock",
        "--connect-timeout",
        "3s",
        "--timeout",
        "3s",
        "namespaces",
        "ls",
        "-q",
    ]
    assert len(sleeps) == 2


def test_ctr_cli_gives_up_after_bounded_attempts(tmp_path: Path) -> None:
    binary = fake_ctr_binary(tmp_path, 'echo "ctr: connection refused" >&2; exit 1')
    sleeps: list[float] = []
    with pytest.raises(TemporaryError, match="connection refused"):
        CtrCli(binary, attempts=3, sleep=sleeps.append)("/s", ["namespaces", "ls", "-q"])
    assert len(sleeps) == 2


def test_ctr_cli_not_found_is_permanent_and_not_retried(tmp_path: Path) -> None:
    binary = fake_ctr_binary(tmp_path, 'echo "ctr: task \\"t\\" not found" >&2; exit 1')
    sleeps: list[float] = []
    with pytest.raises(ContainerdNotFound):
        CtrCli(binary, sleep=sleeps.append)("/s", ["-n", "x", "tasks", "ps", "t"])
    assert sleeps == []


def test_ctr_cli_timeout_and_missing_binary(tmp_path: Path) -> None:
    binary = fake_ctr_binary(tmp_path, "exec sleep 10")
    with pytest.raises(TemporaryError, match="no answer"):
        CtrCli(binary, timeout=0.1, attempts=1)._once("/s", ["namespaces", "ls"])
    with pytest.raises(PermanentError, match="not found"):
        CtrCli(str(tmp_path / "nope"))("/s", ["namespaces", "ls"])


def test_process_root_may_not_inspect_is_skipped_and_named(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree.leak("1")
    (tree.root / "proc" / "1" / "fd").mkdir(parents=True)
    real_listdir = os.listdir

    def listdir(path: Any = ".") -> list[str]:
        if str(path).endswith("/proc/1/fd"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    r = tree.read()
    assert r.detail["open_fifo_scan"]["complete"] is True
    assert r.detail["open_fifo_scan"]["unreadable_pids"] == [1]
    assert r.values["orphan_fifo_dirs"] == 1
