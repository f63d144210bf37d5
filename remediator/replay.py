"""Offline policy testing: recorded readings through the engine on a simulated clock.

`remediator audit --record FILE` appends one JSON line per audit with every probe's reading.
`remediator replay FILE` feeds them, oldest first, to a fresh in-memory state with a fake clock
set to each recording's time, and returns the cycle reports. `--hold` keeps the last recording
in force for longer, evaluated every `--every`, to answer "if the host stayed like this, what
would the policies do?". Replay never reads or touches the host: actions are planned only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remediator.clock import FakeClock
from remediator.engine import CycleReport, Engine
from remediator.errors import UserError
from remediator.host import HostRoot
from remediator.model import Reading
from remediator.policy.rules import PolicySet
from remediator.quantity import format_duration
from remediator.state import StateStore

RECORD_FORMAT = "remediator.record/v1"


@dataclass(frozen=True)
class Recording:
    at: float
    readings: dict[str, Reading]


def record_line(at: float, readings: dict[str, Reading], host: str) -> str:
    return (
        json.dumps(
            {
                "format": RECORD_FORMAT,
                "at": at,
                "host": host,
                "readings": {k: r.to_dict() for k, r in readings.items()},
            }
        )
        + "\n"
    )


def _numbers(where: str, m: Any) -> None:
    if m is None:
        return
    if not isinstance(m, dict):
        raise TypeError(f"{where}: expected an object of numbers, got {type(m).__name__}")
    for k, v in m.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"{where}.{k}: expected a number, got {v!r:.40}")


def _reading(name: str, d: Any) -> Reading:
    """A recorded reading, its numbers checked: the evaluator trusts what probes produce."""
    if not isinstance(d, dict):
        raise TypeError(f"readings.{name}: expected an object, got {type(d).__name__}")
    _numbers(f"readings.{name}.values", d.get("values"))
    _numbers(f"readings.{name}.limits", d.get("limits"))
    for i, c in enumerate(d.get("containers") or ()):
        if not isinstance(c, dict) or not isinstance(c.get("container"), dict):
            raise TypeError(f"readings.{name}.containers[{i}]: expected an object with a container")
        _numbers(f"readings.{name}.containers[{i}].values", c.get("values"))
    return Reading.from_dict(d)


def load_recordings(path: Path) -> list[Recording]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read recording: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not a remediator recording: byte {e.start} is not UTF-8 (a binary file?)"
        ) from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc: Any = json.loads(line)
            if doc.get("format") != RECORD_FORMAT:
                raise ValueError(f"expected format {RECORD_FORMAT!r}, got {doc.get('format')!r}")
            readings = {k: _reading(k, v) for k, v in doc["readings"].items()}
            at = float(doc["at"])
            if not math.isfinite(at) or at < 0:
                raise ValueError(f"expected a finite, non-negative 'at' time, got {doc['at']!r}")
            out.append(Recording(at, readings))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError) as e:
            raise UserError(f"{path}:{n}: not a remediator recording line: {e}") from None
    if not out:
        raise UserError(f"{path}: no recordings in this file (make them with `remediator audit --record`)")
    return sorted(out, key=lambda r: r.at)


# Cycles one replay may simulate: --hold 30d --every 30s is 86,400, and every cycle's report is
# kept for the output. More is a typo (--every 1ms), refused before any work is done.
MAX_REPLAY_CYCLES = 100_000


def replay(
    policies: PolicySet, recordings: list[Recording], *, hold: float = 0.0, every: float = 30.0
) -> list[CycleReport]:
    if every <= 0:
        raise UserError("--every must be longer than 0s")
    held = int(hold // every) if hold > 0 else 0
    if len(recordings) + held > MAX_REPLAY_CYCLES:
        raise UserError(
            f"--hold {format_duration(hold)} every {format_duration(every)} is {held:,} cycles on top of "
            f"{len(recordings):,} recordings; at most {MAX_REPLAY_CYCLES:,} in one replay "
            "(a longer --every, or a shorter --hold)"
        )
    clock = FakeClock(recordings[0].at)
    store = StateStore(Path(":memory:"), namespace="replay")
    engine = Engine(
        policies, host=HostRoot(Path("/nonexistent-replay-root")), clock=clock, store=store, replay=True
    )
    reports = []
    try:
        for rec in recordings:
            if rec.at > clock.now():
                clock.advance(rec.at - clock.now())
            reports.append(engine.cycle(readings=rec.readings))
        end = clock.now() + hold
        last = recordings[-1].readings
        while hold > 0 and clock.now() + every <= end:
            clock.advance(every)
            # The recorded values, re-stamped: the host "stays like this".
            stamped = {k: Reading.from_dict(dict(r.to_dict(), taken_at=clock.now())) for k, r in last.items()}
            reports.append(engine.cycle(readings=stamped))
    finally:
        store.close()
    return reports
