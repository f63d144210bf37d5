"""`remediator report` on a recorded trail (tests/fixtures/report/audit.jsonl, recorded by
record_trail.py beside it): golden text and JSON, the window, the state's part (conditions now,
the breaker), and a trail with torn or foreign lines."""

from __future__ import annotations

import json
from pathlib import Path

from remediator import report
from remediator.model import Condition, Phase
from remediator.state import BreakerState
from tests.unit.test_cli import golden, run

TRAIL = Path(__file__).parent.parent / "fixtures" / "report" / "audit.jsonl"
WINDOW = ["--since", "2025-11-30T21:00:00Z", "--until", "2025-12-01T00:00:00Z"]


def cli(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    env = {"REMEDIATOR_STATE_DIR": str(tmp_path / "state"), "REMEDIATOR_AUDIT_LOG": str(TRAIL)}
    return run(["report", *args], env)


def test_report_text_golden(tmp_path: Path) -> None:
    code, out, err = cli(tmp_path, *WINDOW)
    assert code == 0, err
    golden("report.txt", out)
    assert not (tmp_path / "state").exists()  # a report creates nothing


def test_report_json_golden(tmp_path: Path) -> None:
    code, out, err = cli(tmp_path, *WINDOW, "--json")
    assert code == 0, err
    golden("report.json", out)
    doc = json.loads(out)
    fh = next(p for p in doc["policies"] if p["name"] == "file-handles")
    assert fh["relief_seconds"] == {"median": 60.001, "max": 60.001}  # events are 1 ms apart
    nd = next(p for p in doc["policies"] if p["name"] == "negative-dentries")
    assert nd["failures"][0]["action"] == "drop-caches"
    assert doc["breaker"]["tripped"][0]["policy"] == "file-handles"
    assert doc["trail"]["unreadable_lines"] == 1


def test_since_is_a_duration_before_until(tmp_path: Path) -> None:
    # 22:30 .. 23:00: only the second file-handles episode starts, and the breaker trips.
    code, out, _ = cli(tmp_path, "--since", "30m", "--until", "2025-11-30T23:00:00Z", "--json")
    assert code == 0
    doc = json.loads(out)
    names = {p["name"]: p for p in doc["policies"]}
    assert set(names) == {"file-handles"}
    assert names["file-handles"]["conditions"]["episodes"] == 1
    assert names["file-handles"]["conditions"]["open"] == 1
    assert len(doc["breaker"]["tripped"]) == 1


def test_bad_since_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = cli(tmp_path, "--since", "yesterday")
    assert code == 2 and "'--since'" in err and "Traceback" not in err


def test_missing_trail_reports_nothing(tmp_path: Path) -> None:
    env = {"REMEDIATOR_STATE_DIR": str(tmp_path / "state")}
    code, out, _ = run(["report"], env)
    assert code == 0 and "nothing happened in this window." in out


def test_state_adds_the_conditions_now_and_the_breaker() -> None:
    trail = report.parse_trail(TRAIL.read_text().splitlines())
    doc = report.summarize(
        trail,
        since=0,
        until=2e9,
        namespace="live",
        conditions=[
            Condition("file-handles", "host", Phase.FIRING, since=1_764_543_270.0, value=2100),
            Condition("negative-dentries", "host", Phase.OK),
        ],
        breaker=BreakerState(True, 1_764_543_690.0, "too many"),
    )
    fh = next(p for p in doc["policies"] if p["name"] == "file-handles")
    assert fh["now"] == [
        {"subject": "host", "phase": "firing", "since": "2025-11-30T22:54:30+00:00", "value": 2100}
    ]
    assert doc["breaker"]["open"] and doc["breaker"]["reason"] == "too many"
    assert "OPEN since" in report.text(doc)


def test_other_namespaces_and_broken_lines_are_not_counted() -> None:
    lines = [
        '{"namespace": "audit", "event": "action_would_apply", "policy": "p", "action": "a", '
        '"timestamp": "2025-01-01T00:00:00Z"}',
        '{"namespace": "dry-run", "event": "action_applied", "policy": "p", "action": "a", '
        '"timestamp": "2025-01-01T00:00:00Z"}',
        "not json",
        '{"event": "no timestamp"}',
        "[1, 2]",
    ]
    trail = report.parse_trail(lines)
    assert trail.unreadable == 3
    assert report.summarize(trail, since=0, until=2e9, namespace="live")["policies"] == []
    dry = report.summarize(trail, since=0, until=2e9, namespace="dry-run")
    assert dry["policies"][0]["actions"] == [{"action": "a", "outcome": "applied", "count": 1}]
