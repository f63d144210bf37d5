"""Clause (e): ctr output formats of every containerd we run, and the query failing closed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from remediator.errors import PermanentError, TemporaryError
from remediator.probes.containerd import (
    CTR_16,
    CTR_PROTOTEXT,
    ContainerdNotFound,
    CtrCli,
    UnparsableAnswer,
    parse_id_list,
    parse_tasks_ps,
    query_known_ids,
)
from tests.unit.test_fifos import FakeCtr

FIXTURES = Path(__file__).parent.parent / "fixtures" / "ctr"
DOCKER_EXEC = "81d38a55a2e43fb012868cb53325074591022c2e84bd652d2aa5d2198fb734e2"  # a `docker exec`


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        # ctr 1.6 prints gogo text whatever the daemon; 1.7 and 2.x print prototext.
        (
            "tasks-ps-ctr-1.6.20-daemon-1.6.20.txt",
            {"81d38a55a2e43fb012868cb53325074591022c2e84bd652d2aa5d2198fb734e2"},
        ),
        ("tasks-ps-ctr-1.6.20-daemon-1.7.24.txt", {"ex1"}),
        ("tasks-ps-ctr-1.6.20-daemon-2.1.9.txt", {"ex1"}),
        ("tasks-ps-ctr-1.7.24-daemon-1.7.24.txt", {"ex1"}),
        ("tasks-ps-ctr-2.1.9-daemon-2.1.9.txt", {"ex1"}),
    ],
)
def test_exec_ids_from_captured_ctr_tasks_ps(fixture: str, expected: set[str]) -> None:
    assert parse_tasks_ps((FIXTURES / fixture).read_text()) == expected


def test_each_format_alone() -> None:
    assert CTR_16.exec_id("&ProcessDetails{ExecID:ex-1,XXX_unrecognized:[],}") == "ex-1"
    assert CTR_16.exec_id('exec_id:"ex-1"') is None
    assert CTR_PROTOTEXT.exec_id('exec_id:"ex-1"') == "ex-1"
    assert CTR_PROTOTEXT.exec_id("&ProcessDetails{ExecID:ex-1,XXX_unrecognized:[],}") is None


def test_init_only_and_no_process() -> None:
    assert parse_tasks_ps("PID     INFO\n6767    -\n") == frozenset()
    assert parse_tasks_ps("PID     INFO\n") == frozenset()


@pytest.mark.parametrize(
    "text",
    [
        "",  # no header
        "6767    -\n",
        "PID     INFO\n6767\n",  # no info column
        "PID     INFO\nabc    -\n",
        'PID     INFO\n12    {"exec_id": "ex1"}\n',  # a format we do not know: fail closed
        'PID     INFO\n12    exec_id:"e\\"x"\n',  # an escaped quote is no containerd id
    ],
)
def test_anything_else_is_unparsable(text: str) -> None:
    with pytest.raises(UnparsableAnswer):
        parse_tasks_ps(text)


def test_parse_id_list_ignores_blank_lines() -> None:
    assert parse_id_list("a\n\n  b \nc\n") == {"a", "b", "c"}
    assert parse_id_list("") == frozenset()


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    p = tmp_path / "containerd.sock"
    os.mknod(p, 0o600 | stat.S_IFSOCK)
    return p


def test_query_lists_namespaces_containers_tasks_and_execs(sock: Path) -> None:
    ctr = FakeCtr(containers=["c1", "t1"], tasks=["t1"], execs={"t1": ["e1", "e2"]})
    known = query_known_ids(ctr, [sock])
    assert known.complete
    assert known.ids == {"c1", "t1", "e1", "e2"}
    assert known.to_dict()["ids"] == 4


def test_query_fails_closed_when_ps_output_is_unknown_and_names_the_socket(sock: Path) -> None:
    class NewCtr(FakeCtr):
        def __call__(self, address: str, args: list[str]) -> str:  # type: ignore[override]
            if list(args)[-2:-1] == ["ps"]:
                return 'PID  INFO\n1  -\n2  exec_id:{value:"e1"}\n'
            return super().__call__(address, args)

    known = query_known_ids(NewCtr(tasks=["t1"]), [sock])
    assert not known.complete
    assert len(known.errors) == 1
    assert known.errors[0].startswith(
        f"{sock}: namespace default task t1: tasks ps: exec details in no known"
    )


def test_query_fails_closed_on_a_missing_socket_or_an_error(tmp_path: Path, sock: Path) -> None:
    missing = query_known_ids(FakeCtr(), [sock, tmp_path / "gone.sock"])
    assert not missing.complete
    assert missing.errors == (f"{tmp_path / 'gone.sock'}: No such file or directory",)
    (tmp_path / "file.sock").write_text("")
    assert query_known_ids(FakeCtr(), [tmp_path / "file.sock"]).errors == (
        f"{tmp_path / 'file.sock'}: not a socket",
    )
    down = query_known_ids(FakeCtr(fail=TemporaryError("no answer")), [sock])
    assert not down.complete
    assert down.errors == (f"{sock}: no answer",)


def test_a_task_gone_between_ls_and_ps_is_not_an_error(sock: Path) -> None:
    class Racy(FakeCtr):
        def __call__(self, address: str, args: list[str]) -> str:  # type: ignore[override]
            if list(args)[-2:-1] == ["ps"]:
                raise ContainerdNotFound("task t1 not found")
            return super().__call__(address, args)

    known = query_known_ids(Racy(tasks=["t1"]), [sock])
    assert known.complete
    assert known.ids == {"t1"}


def test_too_many_tasks_is_incomplete(sock: Path) -> None:
    known = query_known_ids(FakeCtr(tasks=["a", "b", "c"]), [sock], max_task_queries=2)
    assert not known.complete
    assert known.errors == ("3 tasks: more than 2 exec listings",)


def test_ctr_cli_reports_a_missing_binary_and_not_found(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="not found"):
        CtrCli(binary=str(tmp_path / "no-ctr"))("/x.sock", ["namespaces", "ls", "-q"])
    fake = tmp_path / "ctr"
    fake.write_text("#!/bin/sh\necho 'ctr: task t1 not found' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(ContainerdNotFound):
        CtrCli(binary=str(fake), attempts=1)("/x.sock", ["tasks", "ps", "t1"])
    fake.write_text("#!/bin/sh\necho 'ctr: connection refused' >&2\nexit 1\n")
    sleeps: list[float] = []
    with pytest.raises(TemporaryError, match="connection refused"):
        CtrCli(binary=str(fake), attempts=2, sleep=sleeps.append)("/x.sock", ["namespaces", "ls", "-q"])
    assert len(sleeps) == 1
