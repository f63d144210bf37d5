"""The journal of multi-phase actions and the undo records, on a real SQLite file."""

from __future__ import annotations

from pathlib import Path

from remediator.state import StateStore, StoreJournal


def test_journal_phases_survive_reopening_and_close(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    j = StoreJournal(store, "recreate-container", "c1", None, 10.0)
    j.record("creating", {"old_id": "c1", "new_id": None})
    j.record("created", {"old_id": "c1", "new_id": "n1"}, at=11.0)
    store.close()

    again = StateStore(tmp_path / "state.db")
    (entry,) = again.journal_open()
    assert (entry.action, entry.target, entry.phase, entry.data) == (
        "recreate-container",
        "c1",
        "created",
        {"old_id": "c1", "new_id": "n1"},
    )
    assert (entry.started, entry.updated, entry.status) == (10.0, 11.0, "open")
    again.journal_close(entry.id, "recovered", "skipped", 12.0)
    assert again.journal_open() == []
    # Another namespace never sees it.
    assert StateStore(tmp_path / "state.db", namespace="dry-run").journal_open() == []


def test_undo_keeps_the_first_original(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    first = store.record_undo(
        at=1.0, action="cap-memory", target="c1", target_name="web", original={"memory": 0}
    )
    second = store.record_undo(
        at=2.0, action="cap-memory", target="c1", target_name="web", original={"memory": 5}
    )
    assert first == second
    record = store.pending_undo("cap-memory", "c1")
    assert record is not None and record.original == {"memory": 0}
    store.mark_undone(record.id, 3.0, "ops")
    assert store.pending_undo("cap-memory", "c1") is None and store.pending_undos("cap-memory") == []
