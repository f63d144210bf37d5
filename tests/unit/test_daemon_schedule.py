"""The daemon's schedule: one tick runs every due policy in one cycle, so a probe that several
policies use is read once per cycle; each policy still runs at its own interval."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from remediator.clock import Clock, FakeClock, SystemClock
from remediator.daemon import Daemon, tick_period
from remediator.runtime import load
from remediator.settings import Settings

HERE = Path(__file__).parent.parent

POLICY = """\
apiVersion: remediator.io/v1
kind: Policy
metadata: {{name: {name}}}
spec:
  mode: audit
  interval: {interval}
  watch: {{probe: {probe}, metric: {metric}, above: 1G}}
  actions: [{{action: drop-caches, params: {{what: dentries-inodes}}}}]
"""


def fixture_daemon(tmp_path: Path, policy: str, clock: Clock) -> tuple[Daemon, Path]:
    """A dry-run daemon on the fixture host tree with one policy file; (it, the policy dir)."""
    host = tmp_path / "host"
    shutil.copytree(HERE / "fixtures" / "host", host)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(policy)
    settings = Settings(
        host_root=host, state_dir=tmp_path / "state", docker_url=f"unix://{tmp_path}/none.sock", dry_run=True
    )
    return Daemon(settings, [policies], load([policies]), clock), policies


@pytest.mark.parametrize(
    ("intervals", "tick"),
    [
        ([30.0, 30.0, 60.0], 30.0),
        ([30.0, 45.0], 15.0),
        ([0.5, 0.25], 1.0),
        ([7.0, 30.0], 1.0),
        ([], 30.0),
        ([90.0, 60.0, 150.0], 30.0),
    ],
)
def test_tick_period_is_the_gcd_of_intervals(intervals: list[float], tick: float) -> None:
    assert tick_period(intervals) == tick


def test_policies_sharing_a_probe_share_one_read_per_cycle(tmp_path: Path) -> None:
    host = tmp_path / "host"
    shutil.copytree(HERE / "fixtures" / "host", host)
    (host / "run" / "containerd" / "fifo").mkdir(parents=True)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(
        "---\n".join(
            [
                POLICY.format(name="files-a", interval="30s", probe="limits", metric="file_handles"),
                POLICY.format(name="files-b", interval="30s", probe="limits", metric="file_handles"),
                POLICY.format(name="dentries", interval="1m", probe="dentries", metric="negative"),
            ]
        )
    )
    settings = Settings(
        host_root=host, state_dir=tmp_path / "state", docker_url=f"unix://{tmp_path}/none.sock", dry_run=True
    )
    clock = FakeClock()
    daemon = Daemon(settings, [policies], load([policies]), clock)
    daemon._schedule()
    with capture_logs() as logs:
        for _ in range(6):  # three minutes, a tick every 30 s
            daemon._tick()
            clock.advance(30.0)
    reads = [e["probe"] for e in logs if e["event"] == "probe_read"]
    evaluated = [e["policy"] for e in logs if e["event"] == "policy_evaluated"]
    # files-a and files-b: 6 cycles each, one limits read per cycle (not 12); dentries every
    # minute: 3 cycles, 3 reads.
    assert evaluated.count("files-a") == evaluated.count("files-b") == 6
    assert evaluated.count("dentries") == 3
    assert reads.count("limits") == 6 and reads.count("dentries") == 3


def test_a_tick_that_fires_a_little_early_still_runs_what_is_due(tmp_path: Path) -> None:
    """The scheduler's ticks jitter by milliseconds: a tick 2 ms less late than the one before
    must still run a policy whose interval is the tick."""
    clock = FakeClock(1000.0)
    daemon, _ = fixture_daemon(
        tmp_path, POLICY.format(name="a", interval="30s", probe="dentries", metric="negative"), clock
    )
    daemon._schedule()
    with capture_logs() as logs:
        for k, late in enumerate([0.003, 0.001, 0.004, 0.002, 0.0]):
            clock.advance(1000.0 + 30 * k + late - clock.now())
            daemon._tick()
    assert [e["policy"] for e in logs if e["event"] == "policy_evaluated"] == ["a"] * 5


def test_a_reload_replans_and_keeps_running(tmp_path: Path) -> None:
    daemon, policies = fixture_daemon(
        tmp_path, POLICY.format(name="a", interval="1m", probe="dentries", metric="negative"), FakeClock()
    )
    daemon._schedule()
    daemon._tick()
    (policies / "p.yaml").write_text(
        POLICY.format(name="b", interval="30s", probe="dentries", metric="negative")
    )
    assert daemon.reload()
    assert daemon._tick_s == 30.0
    with capture_logs() as logs:
        daemon._tick()
    assert [e["policy"] for e in logs if e["event"] == "policy_evaluated"] == ["b"]


def test_a_reload_during_a_cycle_evaluates_the_new_set_right_after_it(tmp_path: Path) -> None:
    """The scheduler running: a reload made while a tick's cycle is in progress plans the new
    set "now"; that run waits for the cycle and follows it, instead of being skipped as a second
    instance of the tick job and waiting a whole tick period (here an hour). Seen in CI: the
    reload fuzz test's last good set was never evaluated within its 30 s."""
    daemon, policies = fixture_daemon(
        tmp_path, POLICY.format(name="a", interval="1h", probe="dentries", metric="negative"), SystemClock()
    )
    in_cycle, release = threading.Event(), threading.Event()
    ran: list[list[str]] = []
    run_cycle = daemon._run_cycle

    def slow_first(names: list[str]) -> bool:
        ran.append(list(names))
        if len(ran) == 1:
            in_cycle.set()
            assert release.wait(10)
        return run_cycle(names)

    daemon._run_cycle = slow_first  # type: ignore[method-assign]
    daemon.scheduler.start()
    try:
        daemon._schedule()
        assert in_cycle.wait(10)  # the first tick is in its cycle
        # "a" stays (with another threshold), "b" is new: both are due at once, "a" too,
        # although the cycle in progress is evaluating its old version.
        (policies / "p.yaml").write_text(
            POLICY.format(name="a", interval="1h", probe="dentries", metric="negative").replace("1G", "2G")
            + "---\n"
            + POLICY.format(name="b", interval="1h", probe="dentries", metric="negative")
        )
        assert daemon.reload()
        release.set()
        deadline = time.monotonic() + 10
        while len(ran) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # nothing more runs: the next tick is an hour away
        assert ran == [["a"], ["a", "b"]]
    finally:
        release.set()
        daemon.scheduler.shutdown(wait=True)
