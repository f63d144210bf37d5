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
    CanaryProbe,
    measure_failed_lookups,
    run_canary,
    update_baseline,
)
from remediator.probes.memory import DictMemory
from tests.helpers import make_host


def test_baseline_is_calibrated_only_when_healthy() -> None:
    assert update_baseline(None, 1000.0, 0.1, 5.0) == Baseline(1000.0, 5.0, 1)
    assert update_baseline(None, 1000.0, HEALTHY_PER_BUCKET, 5.0) is None  # not healthy
    assert update_baseline(None, 1000.0, None, 5.0) is None  # load unknown
    old = Baseline(1000.0, 5.0, 3)
    assert update_baseline(old, 2000.0, 0.0, 9.0) == Baseline(1200.0, 9.0, 4)  # EWMA 0.2
    assert update_baseline(old, 2000.0, 2.0, 9.0) is old  # a sick host never moves it


def test_measure_takes_the_median_batch(tmp_path: Path) -> None:
    ticks = iter([10e-6, 1e-6, 2e-6])  # batch times in seconds; the median batch is 2 us

    def timer() -> Callable[[], float]:
        t = next(ticks)
        return lambda: t

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ns = measure_failed_lookups(fd, ["a", "b", "c", "d", "e", "f"], batches=3, timer=timer)
    finally:
        os.close(fd)
    assert ns == pytest.approx(2e-6 * 1e9 / 2)


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


def _host(tmp_path: Path, negative: int) -> HostRoot:
    return make_host(tmp_path / "host", {"proc/sys/fs/dentry-state": f"10 5 45 0 {negative} 0\n"})


def test_probe_calibrates_then_reports_slowdown(tmp_path: Path) -> None:
    memory, clock = DictMemory(), FakeClock(1000.0)
    opts = ProbeOptions(dentry_hash_buckets=1000, scratch_dir=tmp_path / "canary")
    first = CanaryProbe().read(ProbeContext(_host(tmp_path, 10), clock, memory=memory, options=opts))
    assert first.error is None and first.detail["calibrated"] is True
    assert first.values["slowdown"] == pytest.approx(1.0)
    # A sick host (5 per bucket): measured, compared, but the baseline does not move.
    clock.advance(30)
    sick = CanaryProbe().read(ProbeContext(_host(tmp_path, 5000), clock, memory=memory, options=opts))
    assert sick.detail["calibrated"] is False
    assert sick.values["baseline_ns"] == first.values["baseline_ns"]
    assert sick.values["slowdown"] == pytest.approx(sick.values["lookup_ns"] / first.values["lookup_ns"])


def test_probe_without_baseline_says_so(tmp_path: Path) -> None:
    opts = ProbeOptions(dentry_hash_buckets=1000, scratch_dir=tmp_path / "canary")
    r = CanaryProbe().read(
        ProbeContext(_host(tmp_path, 5000), FakeClock(), memory=DictMemory(), options=opts)
    )
    assert "slowdown" not in r.values and "lookup_ns" in r.values
    assert r.detail["baseline"].startswith("none yet")


def test_read_only_run_reports_last_measurement_and_writes_nothing(tmp_path: Path) -> None:
    memory, clock = DictMemory(), FakeClock(1000.0)
    opts = ProbeOptions(dentry_hash_buckets=1000, scratch_dir=tmp_path / "canary")
    live = CanaryProbe().read(ProbeContext(_host(tmp_path, 10), clock, memory=memory, options=opts))
    clock.advance(20)
    before = dict(memory.data)
    audit = CanaryProbe().read(
        ProbeContext(_host(tmp_path, 10), clock, memory=memory, options=ProbeOptions())
    )
    assert dict(audit.values) == dict(live.values)
    assert audit.detail == {"measured_seconds_ago": 20.0}
    assert memory.data == before
    clock.advance(3600)
    stale = CanaryProbe().read(
        ProbeContext(_host(tmp_path, 10), clock, memory=memory, options=ProbeOptions())
    )
    assert not stale.values and "old" in stale.detail["canary"]
