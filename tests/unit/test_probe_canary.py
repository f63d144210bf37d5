"""The canary probe: baseline calibration (pure), a real run in a temporary directory, and
read-only runs that report the last measurement without writing."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from remediator.clock import FakeClock
from remediator.host import HostRoot
from remediator.probes.base import ProbeContext, ProbeOptions
from remediator.probes.canary import (
    HEALTHY_PER_BUCKET,
    Baseline,
    canary_values,
    measure_failed_lookups,
    run_canary,
    update_baseline,
)
from remediator.probes.memory import DictMemory


def test_baseline_is_calibrated_only_when_healthy() -> None:
    assert update_baseline(None, 1000.0, 0.1, 5.0) == Baseline(1000.0, 5.0, 1)
    assert update_baseline(None, 1000.0, HEALTHY_PER_BUCKET, 5.0) is None  # not healthy
    assert update_baseline(None, 1000.0, None, 5.0) is None  # load unknown
    old = Baseline(1000.0, 5.0, 3)
    assert update_baseline(old, 2000.0, 0.0, 9.0) == Baseline(1200.0, 9.0, 4)  # EWMA 0.2
    assert update_baseline(old, 2000.0, 2.0, 9.0) is old  # a sick host never moves it


def test_measure_takes_the_fastest_batch(tmp_path: Path) -> None:
    ticks = iter([10e-6, 1e-6, 2e-6])  # batch times in seconds; the fastest batch is 1 us

    def timer() -> Callable[[], float]:
        t = next(ticks)
        return lambda: t

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ns = measure_failed_lookups(fd, ["a", "b", "c", "d", "e", "f"], batches=3, timer=timer)
    finally:
        os.close(fd)
    assert ns == pytest.approx(1e-6 * 1e9 / 2)


def test_run_canary_leaves_nothing_behind(tmp_path: Path) -> None:
    scratch = tmp_path / "canary"
    ns = run_canary(scratch, lookups=200)
    assert ns > 0
    assert list(scratch.iterdir()) == []  # its run directory is gone


def test_run_canary_refuses_a_symlinked_scratch(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "canary").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        run_canary(tmp_path / "canary", lookups=10)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def _ctx(memory: DictMemory, clock: FakeClock, scratch: Path | None) -> ProbeContext:
    return ProbeContext(
        HostRoot(Path("/nonexistent")), clock, memory=memory, options=ProbeOptions(scratch_dir=scratch)
    )


def test_calibrates_when_healthy_then_reports_slowdown(tmp_path: Path) -> None:
    memory, clock = DictMemory(), FakeClock(1000.0)
    first, detail = canary_values(_ctx(memory, clock, tmp_path / "canary"), 0.01, clock.now())
    assert detail["calibrated"] is True
    assert first["lookup_slowdown"] == pytest.approx(1.0)
    # A sick host (5 per bucket): measured, compared, but the baseline does not move.
    clock.advance(30)
    sick, detail = canary_values(_ctx(memory, clock, tmp_path / "canary"), 5.0, clock.now())
    assert detail["calibrated"] is False
    assert sick["lookup_baseline_ns"] == first["lookup_baseline_ns"]
    assert sick["lookup_slowdown"] == pytest.approx(sick["lookup_ns"] / first["lookup_ns"])


def test_without_baseline_says_so(tmp_path: Path) -> None:
    values, detail = canary_values(_ctx(DictMemory(), FakeClock(), tmp_path / "canary"), 5.0, 0.0)
    assert "lookup_slowdown" not in values and "lookup_ns" in values
    assert detail["baseline"].startswith("none yet")


def test_read_only_run_reports_last_measurement_and_writes_nothing(tmp_path: Path) -> None:
    memory, clock = DictMemory(), FakeClock(1000.0)
    live, _ = canary_values(_ctx(memory, clock, tmp_path / "canary"), 0.0, clock.now())
    clock.advance(20)
    before = dict(memory.data)
    audit, detail = canary_values(_ctx(memory, clock, None), 0.0, clock.now())
    assert audit == live and detail == {"measured_seconds_ago": 20.0}
    assert memory.data == before
    clock.advance(3600)
    stale, detail = canary_values(_ctx(memory, clock, None), 0.0, clock.now())
    assert not stale and "old" in detail["canary"]
