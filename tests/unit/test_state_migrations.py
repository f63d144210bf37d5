"""The state database's schema version and migrations (docs/upgrading.md): a database of an
older release migrates in place and keeps its rows, a fresh one gets the same schema, a newer
one is refused in one line (by the CLI too, exit 2), read-only commands never migrate, and a
migration that fails leaves the database at the version it had."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from remediator import state
from remediator.errors import UserError
from remediator.state import MIGRATIONS, SCHEMA_VERSION, Migration, StateStore
from tests.helpers import run_cli

FIXTURE_V1 = Path(__file__).parent.parent / "fixtures" / "state" / "state-v1.sql"


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """`remediator` commands configure structlog process-wide (a "warning" filter drops info
    events): start and end each test with the defaults, so capture_logs() sees every event."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def _from_sql(path: Path, sql: str) -> Path:
    db = sqlite3.connect(path)
    db.executescript(sql)
    db.close()
    return path


def _v1_db(tmp_path: Path) -> Path:
    return _from_sql(tmp_path / "state.db", FIXTURE_V1.read_text())


def _versions(path: Path) -> tuple[int, str | None]:
    db = sqlite3.connect(path)
    try:
        uv = int(db.execute("PRAGMA user_version").fetchone()[0])
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return uv, (row[0] if row else None)
    finally:
        db.close()


def _schema(path: Path) -> set[tuple[str, str]]:
    db = sqlite3.connect(path)
    try:
        return {(t, n) for t, n in db.execute("SELECT type, name FROM sqlite_master")}
    finally:
        db.close()


def test_migrations_are_numbered_one_by_one_up_to_the_schema_version() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert MIGRATIONS[-1].version == SCHEMA_VERSION
    assert all(m.statements and m.why for m in MIGRATIONS)


def test_the_first_migration_is_the_whole_v1_schema(tmp_path: Path) -> None:
    # The split into single statements (needed to run them inside one transaction) lost nothing.
    by_script = tmp_path / "script.db"
    db = sqlite3.connect(by_script)
    db.executescript(state._SCHEMA)
    db.close()
    by_migration = tmp_path / "migration.db"
    db = sqlite3.connect(by_migration)
    for statement in MIGRATIONS[0].statements:
        db.execute(statement)
    db.commit()
    db.close()
    assert _schema(by_script) == _schema(by_migration)
    assert ("table", "actions") in _schema(by_migration)


def test_a_v1_database_from_a_fixture_migrates_and_keeps_its_rows(tmp_path: Path) -> None:
    path = _v1_db(tmp_path)
    assert _versions(path) == (0, "1")

    with capture_logs() as events:
        store = StateStore(path)
    migrated = [e for e in events if e["event"] == "state_migrated"]
    assert [(e["from_version"], e["to_version"]) for e in migrated] == [
        (v - 1, v) for v in range(2, SCHEMA_VERSION + 1)
    ]
    assert all(e["path"] == str(path) and e["why"] for e in migrated)
    try:
        assert _versions(path) == (SCHEMA_VERSION, str(SCHEMA_VERSION))
        assert ("index", "actions_by_status") in _schema(path)
        conditions = store.conditions()
        assert list(conditions) == [("file-handles", "host")]
        assert conditions[("file-handles", "host")].value == 1234.0
        rows = store.actions()
        assert [(r.action, r.status) for r in rows] == [
            ("recreate-container", "started"),
            ("raise-sysctl", "done"),
        ]
        breaker = store.breaker()
        assert breaker.open and breaker.reason == "21 actions in 1h"
        undo = store.pending_undo("cap-memory", "0123abcd")
        assert undo is not None and undo.original == {"memory": 0}
        # What a crash left started is still found after the upgrade.
        assert [r.action for r in store.mark_interrupted()] == ["recreate-container"]
        # New rows go on after the old ids.
        new_id = store.record_undo(at=1.0, action="cap-memory", target="ffff", target_name=None, original={})
        assert new_id == 2
    finally:
        store.close()

    # A migrated database and a fresh one have the same tables and indexes.
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    with capture_logs() as events:
        StateStore(fresh_dir / "state.db").close()
    assert [e for e in events if e["event"] == "state_migrated"] == []
    assert _schema(path) == _schema(fresh_dir / "state.db")
    assert _versions(fresh_dir / "state.db") == (SCHEMA_VERSION, str(SCHEMA_VERSION))

    # Opening it again changes nothing.
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    StateStore(path).close()
    assert _versions(path) == (SCHEMA_VERSION, str(SCHEMA_VERSION))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_read_only_commands_read_an_old_database_without_migrating_it(tmp_path: Path) -> None:
    path = _v1_db(tmp_path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    store = StateStore(path, readonly=True)
    try:
        assert store.breaker().open
        assert len(store.actions()) == 2
    finally:
        store.close()
    assert _versions(path) == (0, "1")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize("where", ["user_version", "meta"])
def test_a_database_newer_than_the_code_is_refused_in_one_line(
    tmp_path: Path, readonly: bool, where: str
) -> None:
    path = tmp_path / "state.db"
    StateStore(path).close()
    db = sqlite3.connect(path)
    if where == "user_version":
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    else:  # how a release before user_version would have marked it
        db.execute("PRAGMA user_version = 0")
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UserError) as e:
        StateStore(path, readonly=readonly)
    message = str(e.value)
    assert "\n" not in message
    assert f"state schema {SCHEMA_VERSION + 1}" in message
    assert f"knows up to {SCHEMA_VERSION}" in message
    assert str(path) in message
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_the_cli_refuses_a_newer_database_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    StateStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    code, out, err = run_cli(["status", "--state-dir", str(tmp_path)])
    assert code == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "written by a newer remediator" in lines[0], err


def test_a_failing_migration_leaves_the_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _v1_db(tmp_path)
    StateStore(path).close()  # now at SCHEMA_VERSION
    broken = Migration(
        SCHEMA_VERSION + 1,
        "a test migration whose second statement fails",
        ("CREATE TABLE half_done (x INTEGER)", "ALTER TABLE no_such_table ADD COLUMN y"),
    )
    monkeypatch.setattr(state, "MIGRATIONS", (*MIGRATIONS, broken))
    monkeypatch.setattr(state, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(UserError, match="cannot use the state database"):
        StateStore(path)
    assert _versions(path) == (SCHEMA_VERSION, str(SCHEMA_VERSION))
    assert ("table", "half_done") not in _schema(path)

    # Fixed, the same database migrates.
    fixed = Migration(SCHEMA_VERSION + 1, "fixed", ("CREATE TABLE half_done (x INTEGER)",))
    monkeypatch.setattr(state, "MIGRATIONS", (*MIGRATIONS, fixed))
    StateStore(path).close()
    assert _versions(path) == (SCHEMA_VERSION + 1, str(SCHEMA_VERSION + 1))
    assert ("table", "half_done") in _schema(path)
