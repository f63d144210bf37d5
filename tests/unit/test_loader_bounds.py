"""Hostile and odd policy input: each case of issue 6 (and each crash the fuzzer found) is a
file:line error, never an exception; files that are not policy files say what they are; the
size, depth and alias bounds hold."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from remediator import daemon, runtime
from remediator.clock import SystemClock
from remediator.engine import catalog
from remediator.errors import PolicyError
from remediator.policy import reader
from remediator.policy.loader import load_policies
from remediator.settings import Settings

GOOD = """\
apiVersion: remediator.io/v1
kind: Policy
metadata: {name: p}
spec:
  interval: 30s
  watch: {probe: limits, metric: file_handles, above: ABOVE}
  actions:
    - action: raise-sysctl
      params: {key: fs.file-max, factor: FACTOR, ceiling: 1M}
"""


def good(**repl: str) -> str:
    """GOOD with each key of `repl` replaced by its value (then ABOVE: 90%, FACTOR: 2)."""
    text = GOOD
    for old, new in repl.items():
        text = text.replace(old, new, 1)
    return text.replace("ABOVE", "90%").replace("FACTOR", "2")


def errors(tmp_path: Path, content: str | bytes, name: str = "x.yaml") -> list[str]:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    with pytest.raises(PolicyError) as e:
        load_policies([p], catalog())
    return [str(i).replace(f"{tmp_path}/", "") for i in e.value.issues]


LAUGHS = (  # a 342-byte "billion laughs" (issue 6 used one of 545 bytes): 9^9 "lol"s expanded
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
    "i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
)

CASES = [
    # (what, file content, expected error)
    ("NUL byte in a value", good(**{"30s": "3\x000s"}), "x.yaml:5: contains the control character U+0000"),
    (
        "escape character",
        good(**{"name: p": "name: \x1bp"}),
        "x.yaml:3: contains the control character U+001B",
    ),
    ("kind is a list", good(**{"kind: Policy": "kind: [Policy]"}), "x.yaml:2: kind: expected one of"),
    ("above is a list", good(ABOVE="[1, 2]"), "x.yaml:6: spec.watch.above: expected a number"),
    ("2000 nested [", "a: " + "[" * 2000, "x.yaml:1: nested more than 32 levels deep"),
    ("550 nested [] closed", "a: " + "[" * 550 + "]" * 550, "x.yaml:1: nested more than 32 levels deep"),
    ("deep mappings", "a: " + "{a: " * 40 + "1" + "}" * 40, "x.yaml:1: nested more than 32 levels deep"),
    (
        "above 1 and 400 zeros",
        good(ABOVE="1" + "0" * 400),
        "x.yaml:6: spec.watch.above: must be at most 2^63",
    ),
    (
        "above as a 400-digit string",
        good(ABOVE='"1' + "0" * 400 + '"'),
        "spec.watch.above: must be at most 2^63",
    ),
    ("a 5000-digit integer", good(ABOVE="9" * 5000), "x.yaml:6: a number of 5000 characters is out of range"),
    ("a 330-digit factor", good(FACTOR="9" * 330), "x.yaml:9: spec.actions[0].params.factor:"),
    ("interval 1000000000d", good(**{"30s": "1000000000d"}), "x.yaml:5: spec.interval: must be at most 366d"),
    ("interval 2d", good(**{"30s": "2d"}), "x.yaml:5: spec.interval: must be from 1s to 1d, got 2d"),
    (
        "interval 400 digits",
        good(**{"30s": "1" + "0" * 400 + "s"}),
        "x.yaml:5: spec.interval: must be at most 366d",
    ),
    ("above .nan", good(ABOVE=".nan"), "x.yaml:6: spec.watch.above: expected a number, got .nan"),
    ("above .inf", good(ABOVE=".inf"), "x.yaml:6: spec.watch.above: must be at most 2^63 (9.2E18), got inf"),
    ("above 1.0e+400", good(ABOVE="1.0e+400"), "x.yaml:6: spec.watch.above: must be at most 2^63"),
    ("factor .nan", good(FACTOR=".nan"), "params.factor: factor must be a number greater than 1"),
    ("factor 1000", good(FACTOR="1000"), "params.factor: factor must be at most 100"),
    ("self-referencing alias", "a: &a [*a]\n", "x.yaml:1: anchors (&a) are not supported"),
    ("an alias", "a: *a\n", "x.yaml:1: aliases (*a) are not supported"),
    ("billion laughs", LAUGHS, "x.yaml:1: anchors (&a) are not supported"),
    (
        "merge key",
        good(**{"spec:\n": "spec:\n  <<: {mode: enforce}\n"}),
        "x.yaml:5: merge keys (<<) are not supported",
    ),
    ("python tag", good(FACTOR="!!python/object/apply:os.system [true]"), "x.yaml:9: tags such as"),
    ("!!int of nothing", good(FACTOR='!!int ""'), "x.yaml:9: cannot read ''"),
    ("!!int x", good(FACTOR="!!int x"), "x.yaml:9: cannot read 'x'"),
    (
        "a date that does not exist",
        good(**{"name: p": "name: p, description: 2001-13-45"}),
        "x.yaml:3: cannot read",
    ),
    ("a list as a key", "? [a, b]\n: 1\n", "x.yaml:1: a key must be a plain name"),
    ("Arabic-Indic digits", good(**{"30s": "\u0663\u0660s"}), "x.yaml:5: spec.interval: expected a duration"),
    (
        "a newline in a name",
        good(**{"name: p": 'name: "p\\n"'}),
        "x.yaml:3: metadata.name: expected a lower-case",
    ),
    (
        "a newline in a sysctl",
        good(**{"fs.file-max": '"fs.file-max\\n"'}),
        "params.key: 'fs.file-max\\n' is not a shared kernel pool",
    ),
    ("an empty file", "", "x.yaml:1: no policy documents: the file is empty or holds only comments"),
    ("only comments", "# nothing yet\n", "x.yaml:1: no policy documents"),
    ("only document markers", "---\n---\n", "x.yaml:1: no policy documents"),
    (
        "Controller alone",
        "apiVersion: remediator.io/v1\nkind: Controller\n",
        "x.yaml:2: no Policy documents in this set",
    ),
    (
        "huge unknown probe name",
        good(**{"probe: limits": "probe: " + "p" * 100_000}),
        "spec.watch.probe: unknown probe 'ppppp",
    ),
    (
        "a reclaim amount of 400 digits",
        good(
            **{
                "raise-sysctl": "reclaim-cgroup",
                "{key: fs.file-max, factor: FACTOR, ceiling: 1M}": (
                    "{rankBy: file_handles, amount: 1" + "0" * 400 + "Ki}"
                ),
            }
        ),
        "params.amount: must be at most 2^63 (9.2E18), got '1000",
    ),
    (
        "budget max 10^6",
        good(**{"interval: 30s": "interval: 30s\n  budget: {max: 1000000, per: 1h}"}),
        "spec.budget.max: Input should be less than or equal to 1000",
    ),
    (
        "cooldown 31d",
        good(**{"interval: 30s": "interval: 30s\n  cooldown: 31d"}),
        "spec.cooldown: must be from 0s to 30d, got 31d",
    ),
]


@pytest.mark.parametrize(("what", "content", "expected"), CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_a_file_line_error(tmp_path: Path, what: str, content: str, expected: str) -> None:
    found = errors(tmp_path, content)
    assert any(expected in e for e in found), found
    assert all(len(e) < 600 and "\n" not in e for e in found), found  # one line, however big the input


def test_binary_file(tmp_path: Path) -> None:
    assert errors(tmp_path, b"\x7fELF\x02\x01\x01\x00\xff\xfe\n") == [
        "x.yaml:1: not UTF-8 text (byte 0xff at offset 8): a binary file?"
    ]
    assert errors(tmp_path, b"a: b\n\x00\x01") == [
        "x.yaml:2: contains the control character U+0000, which YAML does not allow"
    ]


def test_the_billion_laughs_is_refused_before_any_expansion(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text(LAUGHS)
    started = time.perf_counter()
    with pytest.raises(PolicyError):
        load_policies([tmp_path / "x.yaml"], catalog())
    # Not a timing assertion on a busy host, a sanity bound: expanded it takes minutes.
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            os.mkfifo,
            "is a FIFO (named pipe); expected a policy file (*.yaml) or a directory of them",
        ),
        (
            lambda p: p.symlink_to("/dev/null"),
            "is a character device; expected a policy file (*.yaml) or a directory of them",
        ),
        (lambda p: p.mkdir(), "no *.yaml policy files in this directory"),
        (lambda p: None, "no such file or directory"),
    ],
    ids=["fifo", "dev-null", "empty-directory", "missing"],
)
def test_a_path_that_is_not_a_policy_file_says_what_it_is(
    tmp_path: Path, make: object, expected: str
) -> None:
    p = tmp_path / "given"
    make(p)  # type: ignore[operator]
    with pytest.raises(PolicyError) as e:
        load_policies([p], catalog())
    assert [str(i) for i in e.value.issues] == [f"{p}: {expected}"]


def test_a_path_too_long_for_the_kernel(tmp_path: Path) -> None:
    # Path.is_dir() raises ENAMETOOLONG instead of returning False: found by a command-line
    # fuzz (`remediator validate` with a 5000-character path exited 4).
    p = tmp_path / ("a" * 5000)
    with pytest.raises(PolicyError) as e:
        load_policies([p], catalog())
    assert [i.message for i in e.value.issues] == ["cannot read: File name too long"]


def test_in_a_directory_non_files_are_errors_and_dotfiles_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(good())
    os.mkfifo(tmp_path / "b.yaml")  # would block a reader that opened it without O_NONBLOCK
    (tmp_path / ".#a.yaml").symlink_to("user@host.1234:1700000000")  # an Emacs lock file
    (tmp_path / "c.yaml").symlink_to(tmp_path / "gone.yaml")
    with pytest.raises(PolicyError) as e:
        load_policies([tmp_path], catalog())
    assert [str(i).replace(f"{tmp_path}/", "") for i in e.value.issues] == [
        "b.yaml: is a FIFO (named pipe), not a policy file",
        "c.yaml: no such file or directory (a dangling symlink?)",
    ]


def test_size_caps(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    (big / "a.yaml").write_text("#" * (reader.MAX_FILE_BYTES + 1))
    with pytest.raises(PolicyError) as e:
        load_policies([big], catalog())
    assert [i.message for i in e.value.issues] == ["larger than 1 MiB; a policy file is a few kilobytes"]

    # The set: a small file and then files just under the file cap go over the set cap (4 MiB)
    # at the fourth big one; the files after it are not read (every one would say the same).
    many = tmp_path / "many"
    many.mkdir()
    (many / "00.yaml").write_text(good())
    big_files = reader.MAX_SET_BYTES // reader.MAX_FILE_BYTES + 2
    for i in range(1, big_files + 1):
        (many / f"{i:02d}.yaml").write_text("#" * (reader.MAX_FILE_BYTES - 1) + "\n")
    with pytest.raises(PolicyError) as e:
        load_policies([many], catalog())
    over = [i for i in e.value.issues if i.message == reader.SET_TOO_LARGE]
    assert [Path(i.file).name for i in over] == [f"{reader.MAX_SET_BYTES // reader.MAX_FILE_BYTES:02d}.yaml"]
    assert reader.SET_TOO_LARGE == "the policy set is larger than 4 MiB (this file goes over it)"


def test_too_many_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "MAX_FILES", 3)
    for i in range(5):
        (tmp_path / f"{i}.yaml").write_text(good().replace("name: p", f"name: p{i}"))
    with pytest.raises(PolicyError) as e:
        load_policies([tmp_path], catalog())
    assert [str(i).replace(f"{tmp_path}/", "") for i in e.value.issues] == [
        "3.yaml: too many policy files (5; a set may have at most 3)"
    ]


def test_accepted_edges(tmp_path: Path) -> None:
    """The bounds are inclusive, and a quoted core tag or a BOM is fine."""
    p = tmp_path / "x.yaml"
    p.write_text(
        "\ufeff"
        + good(**{"30s": "1d", "ABOVE": "!!str 9223372036854775808"}).replace(
            "interval: 1d", "interval: !!str 1d\n  cooldown: 30d\n  budget: {max: 1000, per: 30d}"
        )
    )
    ps = load_policies([p], catalog())
    (policy,) = ps.policies
    assert (policy.interval, policy.cooldown, policy.budget_max) == (86400.0, 30 * 86400.0, 1000)
    assert policy.trigger.value == 2.0**63


# -- reload ----------------------------------------------------------------------------------


def make_daemon(tmp_path: Path) -> daemon.Daemon:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "a.yaml").write_text(good())
    settings = Settings(state_dir=tmp_path / "state", host_root=tmp_path)
    d = daemon.Daemon(settings, [policies], runtime.load([policies]), SystemClock())
    d._schedule()  # what run() does before it waits for signals
    return d


@pytest.mark.parametrize(("what", "content", "expected"), CASES[:12], ids=[c[0] for c in CASES[:12]])
def test_reload_keeps_the_last_good_set_whatever_the_files_hold(
    tmp_path: Path, what: str, content: str, expected: str
) -> None:
    d = make_daemon(tmp_path)
    before = d.policies
    (tmp_path / "policies" / "a.yaml").write_text(content)
    with capture_logs() as logs:
        assert d.reload() is False
    assert d.policies is before
    (failed,) = [e for e in logs if e["event"] == "policies_reload_failed"]
    assert any(expected.replace("x.yaml", "a.yaml") in err for err in failed["errors"]), failed
    assert [j.id[:5] for j in d.scheduler.get_jobs()] == ["tick-"] and set(d._due) == {"p"}


def test_reload_survives_a_loader_bug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = make_daemon(tmp_path)
    before = d.policies

    def broken(paths: list[Path]) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(daemon, "load", broken)
    with capture_logs() as logs:
        assert d.reload() is False
    assert d.policies is before
    events = [e["event"] for e in logs]
    assert events == ["internal_error", "policies_reload_failed"]
    assert "RecursionError" in logs[1]["errors"][0]


def test_reload_restores_the_last_good_schedule_when_the_new_one_cannot_be_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second line of defence behind the compile-time ranges: if the scheduler refuses the
    # new set's job (APScheduler raised OverflowError for `interval: 1000000000d` before the
    # ranges), the daemon goes back to the old set's schedule.
    d = make_daemon(tmp_path)
    before = d.policies
    add_job = d.scheduler.add_job

    def refusing(*args: object, **kw: object) -> object:
        if any(p.name == "q" for p in d.policies.policies):
            raise OverflowError("date value out of range")
        return add_job(*args, **kw)

    monkeypatch.setattr(d.scheduler, "add_job", refusing)
    (tmp_path / "policies" / "a.yaml").write_text(good(**{"name: p": "name: q"}))
    with capture_logs() as logs:
        assert d.reload() is False
    assert d.policies is before
    assert [j.id[:5] for j in d.scheduler.get_jobs()] == ["tick-"] and set(d._due) == {"p"}
    (failed,) = [e for e in logs if e["event"] == "policies_reload_failed"]
    assert failed["errors"] == ["cannot schedule the new set: OverflowError: date value out of range"]
