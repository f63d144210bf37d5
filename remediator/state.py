"""Persistent state in SQLite: conditions, action history with verification, the breaker.

Why SQLite: atomic transactions survive crashes (WAL + synchronous=FULL), the timer and the
daemon can share it, and operators can inspect it with the sqlite3 shell.

Crash safety of actions: the condition's advanced ladder step and a `started` action row are
committed in one transaction *before* the action runs, and the row is completed after. So a
crash mid-action never repeats the step on restart; the row stays `interrupted` for people.

State is kept per namespace: "live" for real runs and "dry-run" for `--dry-run`, so that a
dry run never moves the real cooldowns, budgets or ladders.

Only one instance acts at a time: `InstanceLock` (flock on <state_dir>/lock) is held for the
duration of a cycle by the daemon and by `remediator once`.

The database carries its schema version in `PRAGMA user_version` (and, for remediator releases
from before it, in `meta.schema_version`). Opening it for writing applies the missing entries of
`MIGRATIONS` in order, each in its own write transaction together with its version bump, so a
crash leaves the previous version, never half of one. A database newer than this code is refused
with one line; read-only commands never migrate (docs/upgrading.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from remediator.errors import LockHeld, UserError
from remediator.model import ActionEvent, Condition, Outcome, StepVerdict

# Lists longer than this inside a stored plan or result keep their first items and a note of how
# many were left out: one clean-fifos batch may judge 100,000 directories, and the state must
# stay small whatever an action reports (the audit file keeps the event as it was).
MAX_STORED_LIST = 100

LIVE = "live"
DRY_RUN = "dry-run"

# Version 1: the tables below, the version only in meta.schema_version.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS conditions (
    ns TEXT NOT NULL, policy TEXT NOT NULL, subject TEXT NOT NULL,
    data TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (ns, policy, subject)
);
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ns TEXT NOT NULL, at REAL NOT NULL, policy TEXT NOT NULL, subject TEXT NOT NULL,
    step INTEGER NOT NULL, action TEXT NOT NULL, mode TEXT NOT NULL, mode_reason TEXT,
    status TEXT NOT NULL,          -- started | done | interrupted
    outcome TEXT,                  -- Outcome value once done
    value REAL,                    -- the metric when the step ran
    plan TEXT, result TEXT,        -- JSON
    verdict TEXT, verdict_at REAL, verdict_value REAL
);
CREATE INDEX IF NOT EXISTS actions_by_time ON actions (ns, at);
CREATE INDEX IF NOT EXISTS actions_by_subject ON actions (ns, policy, subject, step);
-- The journal of multi-phase actions (recreate-container): each phase is written before it is
-- taken, so a crash leaves the last phase begun; `recover` finishes or undoes it on the next
-- start. `open` rows are the ones recovery must look at.
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ns TEXT NOT NULL, action_id INTEGER, action TEXT NOT NULL, target TEXT NOT NULL,
    phase TEXT NOT NULL, data TEXT NOT NULL, started REAL NOT NULL, updated REAL NOT NULL,
    status TEXT NOT NULL,          -- open | done | recovered
    outcome TEXT
);
CREATE INDEX IF NOT EXISTS journal_open ON journal (ns, status);
-- What an action changed that an operator may want back (cap-memory's original limits).
CREATE TABLE IF NOT EXISTS undo (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ns TEXT NOT NULL, at REAL NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL,
    target_name TEXT, original TEXT NOT NULL,  -- JSON
    undone_at REAL, undone_by TEXT
);
CREATE TABLE IF NOT EXISTS breaker (
    ns TEXT PRIMARY KEY, open INTEGER NOT NULL, opened_at REAL, reason TEXT,
    reset_at REAL, reset_by TEXT
);
"""


@dataclass(frozen=True)
class Migration:
    """One step of the state schema: the statements that take a database from `version - 1`
    to `version`. Only ever appended: a released migration is never edited (databases in the
    field ran it as it was)."""

    version: int
    why: str
    statements: tuple[str, ...]


def _statements(script: str) -> tuple[str, ...]:
    # One statement per `;` at a line end (the schema has no `;` inside a statement). Run one by
    # one with execute(): executescript() would commit in the middle of the migration.
    lines = [ln for ln in script.splitlines() if not ln.lstrip().startswith("--")]
    return tuple(st.strip() for st in "\n".join(lines).split(";\n") if st.strip().rstrip(";"))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "the first schema: conditions, actions, journal, undo, breaker", _statements(_SCHEMA)),
    Migration(
        2,
        "the version moves to PRAGMA user_version; an index for the crash check of every locked "
        "cycle (actions still `started`), which scanned the whole history",
        ("CREATE INDEX IF NOT EXISTS actions_by_status ON actions (ns, status)",),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

log = structlog.get_logger()


@dataclass(frozen=True)
class BreakerState:
    open: bool = False
    opened_at: float | None = None
    reason: str | None = None
    reset_at: float | None = None
    reset_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "opened_at": self.opened_at,
            "reason": self.reason,
            "reset_at": self.reset_at,
            "reset_by": self.reset_by,
        }


@dataclass(frozen=True)
class ActionRow:
    id: int
    at: float
    policy: str
    subject: str
    step: int
    action: str
    mode: str
    mode_reason: str | None
    status: str
    outcome: str | None
    value: float | None
    plan: dict[str, Any] | None
    result: dict[str, Any] | None
    verdict: str | None
    verdict_at: float | None
    verdict_value: float | None

    def event(self) -> ActionEvent | None:
        if self.outcome is None:
            # An interrupted action may have acted: count it as applied for budget and breaker.
            return ActionEvent(self.at, self.policy, self.subject, Outcome.APPLIED)
        return ActionEvent(self.at, self.policy, self.subject, Outcome(self.outcome))

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class JournalEntry:
    """One multi-phase action as the journal last recorded it."""

    id: int
    action_id: int | None
    action: str
    target: str
    phase: str
    data: dict[str, Any]
    started: float
    updated: float
    status: str
    outcome: str | None


@dataclass(frozen=True)
class UndoRecord:
    id: int
    at: float
    action: str
    target: str
    target_name: str | None
    original: dict[str, Any]
    undone_at: float | None
    undone_by: str | None


class StoreJournal:
    """The journal of one action run, as actions see it (`actions.base.Journal`).

    Every `record` is its own committed transaction (synchronous=FULL): once it returns, the
    phase survives a kill -9 or a power cut.
    """

    def __init__(
        self, store: StateStore, action: str, target: str, action_id: int | None, now: float
    ) -> None:
        self._store = store
        self._now = now
        self.id = store.journal_begin(action, target, action_id, now)

    def record(self, phase: str, data: Mapping[str, Any], at: float | None = None) -> None:
        self._store.journal_update(self.id, phase, data, at if at is not None else self._now)

    def close(self, outcome: str, at: float | None = None) -> None:
        self._store.journal_close(self.id, "done", outcome, at if at is not None else self._now)


class StateStore:
    """All reads and writes of state.db. Not thread-safe: one per thread (the engine runs
    cycles one at a time)."""

    def __init__(self, path: Path, *, namespace: str = LIVE, readonly: bool = False) -> None:
        self.path = path
        self.ns = namespace
        self.readonly = readonly
        check_state_dir(path.parent, create=not readonly)
        if path.is_dir() or (path.exists() and not path.is_file()):
            raise UserError(f"{path}: expected the state database file, found a directory or special file")
        try:
            if readonly and not path.exists():
                # Nothing recorded yet: an empty state, and nothing is created for it.
                self._db = sqlite3.connect(":memory:", isolation_level=None)
                self._migrate()
            elif readonly:
                self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
                self._check_readable()
                self._check_not_newer(self._version())
            else:
                self._db = sqlite3.connect(path, timeout=10, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                # Sorts and statement journals in memory, not in temporary files: at fs.file-max
                # the daemon can open no new file, and its cycle must still record what it did.
                self._db.execute("PRAGMA temp_store=MEMORY")
                self._migrate()
        except sqlite3.DatabaseError as e:
            raise UserError(
                f"{path}: cannot use the state database: {e} (move it aside to start with an empty state)"
            ) from None
        except OSError as e:
            raise UserError(f"{path}: cannot open the state database: {e.strerror or e}") from None
        self._db.row_factory = sqlite3.Row
        self._batching = False  # inside batch()
        self._in_batch = False  # the batch's transaction is open

    def _check_readable(self) -> None:
        """Fail now, with the path, on a file that is not a remediator state database."""
        names = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if names and not {"meta", "conditions", "actions", "breaker"} <= names:
            raise sqlite3.DatabaseError("not a remediator state database (tables missing)")

    def _version(self) -> int:
        """The schema version of the open database: 0 for an empty one."""
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version:
            return version
        has_meta = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
        ).fetchone()
        if not has_meta:
            return 0
        # Written before user_version was used: the version is only in meta (it was 1).
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else 1

    def _check_not_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise UserError(
                f"{self.path}: written by a newer remediator (state schema {version}, this one "
                f"knows up to {SCHEMA_VERSION}): run the newer version, or move the file aside "
                "to start with an empty state"
            )

    def _migrate(self) -> None:
        """Apply the missing migrations in order, each in one write transaction with its
        version. Writers open the store under the instance lock; BEGIN IMMEDIATE also makes a
        second process that opens it at the same moment wait, then find the work done."""
        # Never add our tables to somebody else's database.
        self._check_readable()
        found = self._version()
        self._check_not_newer(found)
        for m in MIGRATIONS:
            if found >= m.version:
                continue  # the common case takes no write lock at all
            self._db.execute("BEGIN IMMEDIATE")
            try:
                current = self._version()
                self._check_not_newer(current)
                if current >= m.version:
                    self._db.execute("ROLLBACK")
                    continue
                for statement in m.statements:
                    self._db.execute(statement)
                # Both places: remediator releases before version 2 read only meta, and so
                # refuse a database that a newer one migrated (instead of misreading it).
                self._db.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) "
                    "DO UPDATE SET value=excluded.value",
                    (str(m.version),),
                )
                self._db.execute(f"PRAGMA user_version = {int(m.version)}")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            if found:  # a new database is created, not migrated: nothing to tell anyone
                log.info(
                    "state_migrated",
                    path=str(self.path),
                    from_version=current,
                    to_version=m.version,
                    why=m.why,
                )

    def close(self) -> None:
        self.commit_batch()
        self._db.close()

    # One transaction per cycle ----------------------------------------------------------
    # A cycle writes every policy's conditions and verdicts; each in its own transaction was
    # ~20 commits (each an fsync of the WAL, synchronous=FULL) every 30 s. Inside `batch()` these
    # deferrable writes share one transaction, committed when the batch ends or right before any
    # write that must be durable at once (an action's `started` row, its result, the breaker,
    # the journal, undo records): those still commit before the side effect they describe, and
    # carry the cycle's earlier writes with them, so the order on disk is the order of events.

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Let conditions and verdicts written inside share one transaction (see above)."""
        if self.readonly or self._batching:
            yield
            return
        self._batching = True
        try:
            yield
        finally:
            self._batching = False
            self.commit_batch()

    def commit_batch(self) -> None:
        """Commit the deferred writes of the current batch, if any."""
        if self._in_batch:
            self._in_batch = False
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise

    def _deferred(self, sql: str, args: Sequence[Any]) -> sqlite3.Cursor:
        """A write that may wait for the batch's commit (outside a batch: committed at once)."""
        if self._batching and not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")
            self._in_batch = True
        return self._db.execute(sql, args)

    def _durable(self, sql: str, args: Sequence[Any]) -> sqlite3.Cursor:
        """A write committed before this returns, after the batch's earlier writes."""
        self.commit_batch()
        return self._db.execute(sql, args)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        if self.readonly:
            yield
            return
        self.commit_batch()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # conditions -------------------------------------------------------------------------
    def conditions(self, policy: str | None = None) -> dict[tuple[str, str], Condition]:
        q = "SELECT policy, subject, data FROM conditions WHERE ns=?"
        args: list[Any] = [self.ns]
        if policy is not None:
            q += " AND policy=?"
            args.append(policy)
        return {
            (r["policy"], r["subject"]): Condition.from_dict(json.loads(r["data"]))
            for r in self._db.execute(q, args)
        }

    def save_conditions(
        self,
        policy: str,
        conditions: Mapping[str, Condition],
        now: float,
        *,
        prune: bool = True,
        stored: Mapping[str, Condition] | None = None,
    ) -> None:
        """Store this policy's conditions; with `prune`, forget subjects not given (gone).

        `stored`: what the database holds for this policy now (read this cycle, under the
        instance lock): conditions equal to their stored row are not written again, and the
        prune runs only when a stored subject is gone. `updated` is then when a condition last
        changed, not when it was last evaluated (the audit trail has every evaluation)."""
        if self.readonly:
            return
        if stored is not None:
            changed = {s: c for s, c in conditions.items() if stored.get(s) != c}
            if not changed and (not prune or set(stored) <= set(conditions)):
                return
            prune = prune and not set(stored) <= set(conditions)
            conditions_to_write: Mapping[str, Condition] = changed
        else:
            conditions_to_write = conditions
        if self._batching:
            self._save_conditions(policy, conditions_to_write, now, prune, keep=list(conditions))
            return
        with self.transaction():
            self._save_conditions(policy, conditions_to_write, now, prune, keep=list(conditions))

    def _save_conditions(
        self, policy: str, conditions: Mapping[str, Condition], now: float, prune: bool, keep: list[str]
    ) -> None:
        for subject, c in conditions.items():
            self._deferred(
                "INSERT INTO conditions VALUES (?,?,?,?,?) ON CONFLICT (ns, policy, subject) "
                "DO UPDATE SET data=excluded.data, updated=excluded.updated",
                (self.ns, policy, subject, json.dumps(c.to_dict()), now),
            )
        if prune:
            marks = ",".join("?" * len(keep))
            self._deferred(
                f"DELETE FROM conditions WHERE ns=? AND policy=? AND subject NOT IN ({marks})",  # noqa: S608 (placeholders only)
                (self.ns, policy, *keep),
            )

    def forget_policies(self, keep: Sequence[str]) -> int:
        """Drop conditions of policies that no longer exist. Action history is kept."""
        if self.readonly:
            return 0
        marks = ",".join("?" * len(keep))
        cur = self._durable(
            f"DELETE FROM conditions WHERE ns=? AND policy NOT IN ({marks})",  # noqa: S608
            (self.ns, *keep),
        )
        return cur.rowcount

    def prune(self, now: float, *, max_age: float, max_actions: int, keep_since: float) -> int:
        """Bound the action history: drop rows older than `max_age` seconds, then all but the
        newest `max_actions` rows of this namespace. Rows at or after `keep_since` (what budgets
        and the breaker still count) and rows still `started` (how a crash mid-action is found)
        are never dropped. Returns the number of rows removed."""
        if self.readonly:
            return 0
        cutoff = min(now - max_age, keep_since)
        with self.transaction():
            old = self._db.execute(
                "DELETE FROM actions WHERE ns=? AND at < ? AND status != 'started'", (self.ns, cutoff)
            ).rowcount
            over = self._db.execute(
                "DELETE FROM actions WHERE ns=? AND status != 'started' AND at < ? AND id NOT IN ("
                "SELECT id FROM actions WHERE ns=? ORDER BY at DESC, id DESC LIMIT ?)",
                (self.ns, keep_since, self.ns, max_actions),
            ).rowcount
        return int(old) + int(over)

    def size(self) -> int:
        """Rows of action history in this namespace."""
        return int(self._db.execute("SELECT count(*) FROM actions WHERE ns=?", (self.ns,)).fetchone()[0])

    # actions ----------------------------------------------------------------------------
    def start_action(
        self,
        *,
        at: float,
        policy: str,
        subject: str,
        step: int,
        action: str,
        mode: str,
        mode_reason: str,
        value: float | None,
        plan: Mapping[str, Any] | None,
        condition: Condition,
    ) -> int:
        """Commit the advanced condition and a `started` row together, before acting."""
        if self.readonly:
            return -1
        with self.transaction():
            self._save_conditions(policy, {condition.subject: condition}, at, prune=False, keep=[])
            cur = self._db.execute(
                "INSERT INTO actions (ns, at, policy, subject, step, action, mode, mode_reason, "
                "status, value, plan) VALUES (?,?,?,?,?,?,?,?, 'started', ?, ?)",
                (
                    self.ns,
                    at,
                    policy,
                    subject,
                    step,
                    action,
                    mode,
                    mode_reason,
                    value,
                    _dumps(plan) if plan is not None else None,
                ),
            )
            return int(cur.lastrowid or 0)

    def finish_action(
        self,
        action_id: int,
        outcome: Outcome,
        result: Mapping[str, Any],
        *,
        mode: str | None = None,
        mode_reason: str | None = None,
    ) -> None:
        """Complete a `started` row; `mode` when it changed since the start (the breaker opened
        right before applying)."""
        if self.readonly or action_id < 0:
            return
        self._durable(
            "UPDATE actions SET status='done', outcome=?, result=?, mode=coalesce(?, mode), "
            "mode_reason=coalesce(?, mode_reason) WHERE id=?",
            (outcome.value, _dumps(result), mode, mode_reason, action_id),
        )

    def mark_interrupted(self) -> list[ActionRow]:
        """Rows left `started` by a crash. Called at start-up; returns them for the log."""
        if self.readonly:
            return []
        rows = self._rows("SELECT * FROM actions WHERE ns=? AND status='started'", (self.ns,))
        self._durable("UPDATE actions SET status='interrupted' WHERE ns=? AND status='started'", (self.ns,))
        return rows

    def record_verdict(self, v: StepVerdict, at: float) -> None:
        if self.readonly:
            return
        self._deferred(
            "UPDATE actions SET verdict=?, verdict_at=?, verdict_value=? WHERE id = ("
            "SELECT id FROM actions WHERE ns=? AND policy=? AND subject=? AND step=? "
            "ORDER BY at DESC LIMIT 1)",
            (v.verdict.value, at, v.after, self.ns, v.policy, v.subject, v.step),
        )

    def _rows(self, q: str, args: Sequence[Any]) -> list[ActionRow]:
        out = []
        for r in self._db.execute(q, args):
            d = dict(r)
            d.pop("ns")
            d["plan"] = json.loads(d["plan"]) if d["plan"] else None
            d["result"] = json.loads(d["result"]) if d["result"] else None
            out.append(ActionRow(**d))
        return out

    def actions(self, *, since: float | None = None, limit: int | None = None) -> list[ActionRow]:
        q = "SELECT * FROM actions WHERE ns=?"
        args: list[Any] = [self.ns]
        if since is not None:
            q += " AND at > ?"
            args.append(since)
        q += " ORDER BY at DESC, id DESC"
        if limit is not None:
            q += " LIMIT ?"
            args.append(limit)
        return self._rows(q, args)

    def history(self, since: float) -> list[ActionEvent]:
        """Budget- and breaker-relevant events since `since`."""
        return [e for r in self.actions(since=since) if (e := r.event()) is not None]

    # journal ----------------------------------------------------------------------------
    def journal_begin(self, action: str, target: str, action_id: int | None, at: float) -> int:
        if self.readonly:
            return -1
        cur = self._durable(
            "INSERT INTO journal (ns, action_id, action, target, phase, data, started, updated, status) "
            "VALUES (?,?,?,?, 'begin', '{}', ?, ?, 'open')",
            (
                self.ns,
                action_id if action_id is not None and action_id >= 0 else None,
                action,
                target,
                at,
                at,
            ),
        )
        return int(cur.lastrowid or 0)

    def journal_update(self, entry: int, phase: str, data: Mapping[str, Any], at: float) -> None:
        if self.readonly or entry < 0:
            return
        self._durable(
            "UPDATE journal SET phase=?, data=?, updated=? WHERE id=?",
            (phase, json.dumps(dict(data), sort_keys=True), at, entry),
        )

    def journal_close(self, entry: int, status: str, outcome: str, at: float) -> None:
        if self.readonly or entry < 0:
            return
        self._durable(
            "UPDATE journal SET status=?, outcome=?, updated=? WHERE id=?", (status, outcome, at, entry)
        )

    def journal_open(self) -> list[JournalEntry]:
        """Entries a crash left open, oldest first."""
        rows = self._db.execute(
            "SELECT * FROM journal WHERE ns=? AND status='open' ORDER BY id", (self.ns,)
        ).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d.pop("ns")
            d["data"] = json.loads(d["data"])
            out.append(JournalEntry(**d))
        return out

    # undo records -----------------------------------------------------------------------
    def record_undo(
        self, *, at: float, action: str, target: str, target_name: str | None, original: Mapping[str, Any]
    ) -> int:
        """Remember the original of something an action changed, unless one is already kept:
        the first original is the one to go back to (a second cap must not overwrite it)."""
        if self.readonly:
            return -1
        existing = self.pending_undo(action, target)
        if existing is not None:
            return existing.id
        cur = self._durable(
            "INSERT INTO undo (ns, at, action, target, target_name, original) VALUES (?,?,?,?,?,?)",
            (self.ns, at, action, target, target_name, json.dumps(dict(original), sort_keys=True)),
        )
        return int(cur.lastrowid or 0)

    def pending_undo(self, action: str, target: str) -> UndoRecord | None:
        r = self._db.execute(
            "SELECT * FROM undo WHERE ns=? AND action=? AND target=? AND undone_at IS NULL "
            "ORDER BY id LIMIT 1",
            (self.ns, action, target),
        ).fetchone()
        if r is None:
            return None
        d = dict(r)
        d.pop("ns")
        d["original"] = json.loads(d["original"])
        return UndoRecord(**d)

    def pending_undos(self, action: str) -> list[UndoRecord]:
        rows = self._db.execute(
            "SELECT * FROM undo WHERE ns=? AND action=? AND undone_at IS NULL ORDER BY id", (self.ns, action)
        ).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d.pop("ns")
            d["original"] = json.loads(d["original"])
            out.append(UndoRecord(**d))
        return out

    def mark_undone(self, record: int, at: float, by: str) -> None:
        if self.readonly:
            return
        self._durable("UPDATE undo SET undone_at=?, undone_by=? WHERE id=?", (at, by, record))

    # breaker ----------------------------------------------------------------------------
    def breaker(self) -> BreakerState:
        r = self._db.execute("SELECT * FROM breaker WHERE ns=?", (self.ns,)).fetchone()
        if r is None:
            return BreakerState()
        return BreakerState(bool(r["open"]), r["opened_at"], r["reason"], r["reset_at"], r["reset_by"])

    def open_breaker(self, at: float, reason: str) -> None:
        if self.readonly:
            return
        self._durable(
            "INSERT INTO breaker (ns, open, opened_at, reason) VALUES (?, 1, ?, ?) "
            "ON CONFLICT (ns) DO UPDATE SET open=1, opened_at=excluded.opened_at, "
            "reason=excluded.reason",
            (self.ns, at, reason),
        )

    def reset_breaker(self, at: float, by: str) -> BreakerState:
        before = self.breaker()
        self._durable(
            "INSERT INTO breaker (ns, open, reset_at, reset_by) VALUES (?, 0, ?, ?) "
            "ON CONFLICT (ns) DO UPDATE SET open=0, reset_at=excluded.reset_at, "
            "reset_by=excluded.reset_by",
            (self.ns, at, by),
        )
        return before


def check_state_dir(directory: Path, *, create: bool) -> None:
    """The state directory must be a directory (made, 0700, when `create`), so that a file or
    a dangling path there is one clear message instead of an error deep inside SQLite."""
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory}: the state directory is not a directory")
    if not create:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise UserError(f"{directory}: cannot create the state directory: {e.strerror or e}") from None


def _bounded(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _bounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_bounded(v) for v in value[:MAX_STORED_LIST]]
        if len(value) > MAX_STORED_LIST:
            items.append(f"... {len(value) - MAX_STORED_LIST} more not stored (see the audit log)")
        return items
    return value


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(_bounded(value), default=str)


class InstanceLock:
    """flock(2) on <state_dir>/lock: one instance acts at a time.

    flock is released by the kernel when the process dies, so a crashed daemon never leaves a
    stale lock behind. The holder's pid is written into the file for the error message.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._fd: int | None = None

    def acquire(self) -> None:
        check_state_dir(self.path.parent, create=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise UserError(f"{self.path}: cannot open the instance lock: {e.strerror or e}") from None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise LockHeld(
                        f"another remediator instance (pid {holder}) is acting on this host "
                        f"({self.path}); waited {self.timeout:g}s"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
