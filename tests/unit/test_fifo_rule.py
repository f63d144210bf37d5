"""The fifo orphan rule (pure): every clause, on tuples shaped like what the walk reads."""

from __future__ import annotations

import stat

import pytest

from remediator.probes.fifo_rule import EntryRead, Keep, RuleInputs, judge, parse_fifo_name

DEV = 42
NOW = 1_000_000.0
OLD = NOW - 3600
FIFO = stat.S_IFIFO | 0o700
RULE = RuleInputs(DEV, NOW, 600.0, frozenset(), frozenset())


def fifos(ident: str = "test.1", mtime: float = OLD, first_ino: int = 100) -> list[EntryRead]:
    return [
        (f"{ident}-{s}", first_ino + i, FIFO, DEV, first_ino + i, mtime)
        for i, s in enumerate(("stdin", "stdout", "stderr"))
    ]


def verdict(entries: list[EntryRead], rule: RuleInputs = RULE, **kw: bool) -> Keep | None:
    return judge(10, (DEV, 10, OLD), entries, rule, **kw)


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
        ("a\nb-stdout", None),
    ],
)
def test_parse_fifo_name(name: str, expected: str | None) -> None:
    assert parse_fifo_name(name) == expected


def test_an_old_unheld_unknown_fifo_set_is_an_orphan() -> None:
    assert verdict(fifos()) is None
    assert verdict(fifos()[:2]) is None  # a terminal: stdin and stdout only


def test_a_is_other_device_or_mount_point_before_anything_else() -> None:
    assert judge(10, (DEV + 1, 10, OLD), fifos(), RULE) is Keep.OTHER_DEVICE
    # A mount point: the root's listing names the covered inode, fstat the mounted one.
    assert judge(10, (DEV, 11, OLD), fifos(), RULE) is Keep.MOUNT_POINT
    assert judge(10, (DEV, 11, OLD), [], RULE) is Keep.MOUNT_POINT


def test_b_only_named_fifos_at_most_max_entries() -> None:
    mounted = fifos()
    mounted[1] = (mounted[1][0], 555, FIFO, DEV, mounted[1][4], OLD)  # d_ino != st_ino
    assert verdict(mounted) is Keep.MOUNT_POINT
    elsewhere = fifos()
    elsewhere[0] = (elsewhere[0][0], 100, FIFO, DEV + 1, 100, OLD)
    assert verdict(elsewhere) is Keep.MOUNT_POINT
    regular = [*fifos()[:2], ("test.1-stderr", 102, stat.S_IFREG | 0o600, DEV, 102, OLD)]
    assert verdict(regular) is Keep.NOT_ONLY_FIFOS
    subdir = [*fifos()[:2], ("test.1-stderr", 102, stat.S_IFDIR | 0o700, DEV, 102, OLD)]
    assert verdict(subdir) is Keep.NOT_ONLY_FIFOS
    assert verdict([*fifos(), ("notes", 9, FIFO, DEV, 9, OLD)]) is Keep.UNKNOWN_NAME
    many = [e for i in range(6) for e in fifos(f"t{i}", first_ino=100 + 10 * i)]
    assert verdict(many) is Keep.TOO_MANY_ENTRIES
    assert verdict(fifos(), overflow=True) is Keep.TOO_MANY_ENTRIES
    assert verdict([]) is Keep.EMPTY


def test_b_an_empty_dir_we_marked_is_finished() -> None:
    assert verdict([], emptied_mark=True) is None
    # The mark does not override anything else.
    assert judge(10, (DEV, 11, OLD), [], RULE, emptied_mark=True) is Keep.MOUNT_POINT


def test_c_the_newest_of_dir_and_fifos_must_be_older_than_min_age() -> None:
    assert verdict(fifos(mtime=NOW - 599)) is Keep.TOO_YOUNG
    assert verdict(fifos(mtime=NOW - 600)) is None
    young_dir = judge(10, (DEV, 10, NOW - 10), fifos(), RULE)
    assert young_dir is Keep.TOO_YOUNG
    one_young = fifos()
    one_young[2] = (*one_young[2][:5], NOW - 5)
    assert verdict(one_young) is Keep.TOO_YOUNG


def test_d_a_fifo_held_open_keeps_the_dir() -> None:
    rule = RuleInputs(DEV, NOW, 600.0, frozenset({(DEV, 101)}), frozenset())
    assert verdict(fifos(), rule) is Keep.OPEN
    other_dev = RuleInputs(DEV, NOW, 600.0, frozenset({(DEV + 1, 101)}), frozenset())
    assert verdict(fifos(), other_dev) is None


def test_e_an_id_containerd_knows_keeps_the_dir() -> None:
    rule = RuleInputs(DEV, NOW, 600.0, frozenset(), frozenset({"test.1"}))
    assert verdict(fifos(), rule) is Keep.KNOWN_TO_CONTAINERD
    assert verdict(fifos("test.2"), rule) is None
    mixed = [*fifos("test.2"), *fifos("test.1", first_ino=200)]
    assert verdict(mixed, rule) is Keep.KNOWN_TO_CONTAINERD
