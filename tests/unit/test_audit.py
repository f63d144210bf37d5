"""The audit trail: info and above always reach the file; the stream follows --log-level."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from remediator import audit


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    audit.configure(level="warning", stream=io.StringIO())
    structlog.reset_defaults()


def emit_all() -> None:
    log = audit.get_logger()
    log.debug("probe_detail", n=1)
    log.info("decision", policy="p")
    log.warning("breaker_open", actions=3)


def events(text: str) -> list[str]:
    return [json.loads(line)["event"] for line in text.splitlines() if line]


@pytest.mark.parametrize(
    ("level", "stream_events"),
    [
        ("debug", ["probe_detail", "decision", "breaker_open"]),
        ("info", ["decision", "breaker_open"]),
        ("warning", ["breaker_open"]),
        ("error", []),
    ],
)
def test_stream_follows_level_file_keeps_info_and_above(
    tmp_path: Path, level: str, stream_events: list[str]
) -> None:
    stream, path = io.StringIO(), tmp_path / "audit.jsonl"
    audit.configure(level=level, audit_path=path, stream=stream)
    emit_all()
    assert events(stream.getvalue()) == stream_events
    assert events(path.read_text()) == ["decision", "breaker_open"]
    line = json.loads(path.read_text().splitlines()[1])
    assert (line["level"], line["actions"]) == ("warning", 3) and line["timestamp"].endswith("Z")


def test_without_audit_file_stream_only(tmp_path: Path) -> None:
    stream = io.StringIO()
    audit.configure(level="debug", stream=stream)
    emit_all()
    assert events(stream.getvalue()) == ["probe_detail", "decision", "breaker_open"]


def test_unopenable_audit_file_is_reported_and_the_stream_still_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    stream = io.StringIO()
    audit.configure(level="info", audit_path=blocker / "audit.jsonl", stream=stream)
    emit_all()
    assert "cannot open audit log" in capsys.readouterr().err
    assert events(stream.getvalue()) == ["decision", "breaker_open"]
