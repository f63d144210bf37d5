"""The canary runs again only when its answer can have changed: the dentries per hash bucket
moved (RERUN_PER_BUCKET), or the last run is MAX_REUSE_AGE old; otherwise the last lookup time
stands against the current baseline, and the detail says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from remediator.clock import FakeClock
from remediator.host import HostRoot
from remediator.probes import canary
from remediator.probes.base import ProbeContext, ProbeOptions
from remediator.probes.canary import MAX_REUSE_AGE, RERUN_PER_BUCKET, canary_values, rerun_reason
from remediator.probes.memory import DictMemory

BUCKETS = 1_000_000.0


def _ctx(memory: DictMemory, clock: FakeClock, scratch: Path | None) -> ProbeContext:
    return ProbeContext(
        HostRoot(Path("/nonexistent")), clock, memory=memory, options=ProbeOptions(scratch_dir=scratch)
    )


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every real canary run, with the lookup time it reports (ns): 100, 200, 300, ..."""
    made: list[float] = []

    def fake_run(scratch: Path, lookups: int = canary.LOOKUPS) -> float:
        made.append(100.0 * (len(made) + 1))
        return made[-1]

    monkeypatch.setattr(canary, "run_canary", fake_run)
    return made


@pytest.mark.parametrize(
    ("last", "age", "dentries", "buckets", "rerun"),
    [
        (None, 0, 1e6, BUCKETS, "no earlier run"),
        ({"at": 0.0, "values": {"lookup_ns": 5.0}}, 1, 1e6, BUCKETS, "did not record"),
        ({"at": 0.0, "values": {}, "dentries": 1e6}, 1, 1e6, BUCKETS, "measured nothing"),
        ({"at": 0.0, "values": {"lookup_ns": 5.0}, "dentries": 1e6}, 10, 1e6, BUCKETS, None),
        # Just under / at the per-bucket line, either direction.
        ({"at": 0.0, "values": {"lookup_ns": 5.0}, "dentries": 1e6}, 10, 1e6 + 99_999, BUCKETS, None),
        (
            {"at": 0.0, "values": {"lookup_ns": 5.0}, "dentries": 1e6},
            10,
            1e6 + 100_000,
            BUCKETS,
            "per bucket",
        ),
        (
            {"at": 0.0, "values": {"lookup_ns": 5.0}, "dentries": 1e6},
            10,
            1e6 - 100_000,
            BUCKETS,
            "per bucket",
        ),
        # Age: reused just before MAX_REUSE_AGE, measured at it; a clock that went back measures.
        ({"at": 0.0, "values": {"lookup_ns": 5.0}, "dentries": 1e6}, MAX_REUSE_AGE - 1, 1e6, BUCKETS, None),
        ({"at": 0.0, "values": {"lookup_ns": 5.0}, "dentries": 1e6}, MAX_REUSE_AGE, 1e6, BUCKETS, "old"),
        ({"at": 100.0, "values": {"lookup_ns": 5.0}, "dentries": 1e6}, 0, 1e6, BUCKETS, "old"),
        # No bucket count: 5 % of the dentry count.
        ({"at": 0.0, "values": {"lookup_ns": 5.0}, "dentries": 1e6}, 10, 1.049e6, None, None),
        ({"at": 0.0, "values": {"lookup_ns": 5.0}, "dentries": 1e6}, 10, 1.05e6, None, "moved by"),
    ],
)
def test_rerun_reason_edges(
    last: dict[str, object] | None, age: float, dentries: float, buckets: float | None, rerun: str | None
) -> None:
    why = rerun_reason(last, age, dentries, buckets)
    if rerun is None:
        assert why is None
    else:
        assert why is not None and rerun in why


def test_reuses_while_dentries_hold_still_and_reruns_when_they_move(
    tmp_path: Path, runs: list[float]
) -> None:
    memory, clock = DictMemory(), FakeClock(1000.0)
    scratch = tmp_path / "canary"
    first, detail = canary_values(_ctx(memory, clock, scratch), 0.01, clock.now(), 1e6, BUCKETS)
    assert runs == [100.0] and detail["calibrated"] is True and first["lookup_slowdown"] == 1.0
    clock.advance(10)
    again, detail = canary_values(_ctx(memory, clock, scratch), 0.01, clock.now(), 1e6 + 5, BUCKETS)
    assert runs == [100.0]  # nothing ran
    assert again == first
    assert detail["reused"]["measured_seconds_ago"] == 10.0 and detail["calibrated"] is False
    # The chains grew by RERUN_PER_BUCKET: measured again, compared with the baseline.
    clock.advance(10)
    grown = 1e6 + RERUN_PER_BUCKET * BUCKETS
    moved, detail = canary_values(_ctx(memory, clock, scratch), 2.0, clock.now(), grown, BUCKETS)
    assert runs == [100.0, 200.0] and "reused" not in detail
    assert moved["lookup_slowdown"] == pytest.approx(2.0)
    # Reused from the new run, and still against the unchanged baseline.
    clock.advance(10)
    held, detail = canary_values(_ctx(memory, clock, scratch), 2.0, clock.now(), grown, BUCKETS)
    assert runs == [100.0, 200.0] and held == moved and "reused" in detail
    # Old enough: measured whatever the count.
    clock.advance(MAX_REUSE_AGE)
    canary_values(_ctx(memory, clock, scratch), 2.0, clock.now(), grown, BUCKETS)
    assert runs == [100.0, 200.0, 300.0]


def test_without_a_dentry_count_every_read_measures(tmp_path: Path, runs: list[float]) -> None:
    memory, clock = DictMemory(), FakeClock(1000.0)
    for _ in range(3):
        canary_values(_ctx(memory, clock, tmp_path / "canary"), 0.01, clock.now())
        clock.advance(10)
    assert len(runs) == 3


def test_read_only_runs_still_report_the_last_measurement(tmp_path: Path, runs: list[float]) -> None:
    memory, clock = DictMemory(), FakeClock(1000.0)
    live, _ = canary_values(_ctx(memory, clock, tmp_path / "canary"), 0.01, clock.now(), 1e6, BUCKETS)
    clock.advance(20)
    canary_values(_ctx(memory, clock, tmp_path / "canary"), 0.01, clock.now(), 1e6, BUCKETS)  # reused
    audit, detail = canary_values(_ctx(memory, clock, None), 0.01, clock.now())
    assert audit == live and detail == {"measured_seconds_ago": 20.0}
