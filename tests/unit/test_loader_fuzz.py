"""Fuzzing the policy loader: 10,000+ mutated policy files, none of which may crash it.

The contract (remediator/policy/loader.py): whatever a file holds, `load_policies` returns a
`PolicySet` or raises `PolicyError` whose every issue names a file and a line; no load takes
more than 2 s; a set it accepts holds only finite numbers within their documented ranges.

Derandomized (the same 10,000 examples every run, no example database), so a failure
reproduces; hypothesis prints the draws that made the failing file. The mutators are in
tests/fuzzing.py; tests/fuzz/ puts the same kind of files through the real CLI and daemon.
"""

from __future__ import annotations

import datetime
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remediator.engine import catalog
from remediator.errors import PolicyError
from remediator.policy import loader
from remediator.policy import schema as S
from remediator.policy.rules import PolicySet
from remediator.quantity import MAX_COUNT
from tests import fuzzing

EXAMPLES = 10_000
SEEDS = fuzzing.seed_documents()
CATALOG = catalog()


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="remediator-fuzz-") as d:
        yield Path(d)


@pytest.fixture(autouse=True)
def _no_git(monkeypatch: pytest.MonkeyPatch) -> None:
    # Provenance (a git subprocess per load) is not input parsing, and would make 10,000 loads
    # take minutes; tests/unit/test_loader.py covers it.
    monkeypatch.setattr(loader, "git_info", lambda directory: (None, None))


def check_accepted(ps: PolicySet) -> None:
    """Every number of an accepted set is finite and in its documented range."""
    for p in ps.policies:
        assert S.INTERVAL_RANGE[0] <= p.interval <= S.INTERVAL_RANGE[1]
        assert S.HOLD_RANGE[0] <= p.hold <= S.HOLD_RANGE[1]
        assert S.COOLDOWN_RANGE[0] <= p.cooldown <= S.COOLDOWN_RANGE[1]
        assert S.WINDOW_RANGE[0] <= p.budget_window <= S.WINDOW_RANGE[1]
        assert S.BUDGET_MAX_RANGE[0] <= p.budget_max <= S.BUDGET_MAX_RANGE[1]
        for amount in (p.trigger, p.clear):
            assert math.isfinite(amount.value) and 0 <= amount.value <= MAX_COUNT
        for step in p.steps:
            assert S.SETTLE_RANGE[0] <= step.settle <= S.SETTLE_RANGE[1]
            for v in step.params_dict().values():
                assert not isinstance(v, float) or math.isfinite(v)
        # What the scheduler does with it (APScheduler: timedelta, then datetime arithmetic).
        now = datetime.datetime.now(datetime.UTC)
        assert now + datetime.timedelta(seconds=p.interval) * 1000 > now
    c = ps.controller
    assert S.WINDOW_RANGE[0] <= c.breaker_window <= S.WINDOW_RANGE[1]
    assert S.BREAKER_MAX_RANGE[0] <= c.breaker_max <= S.BREAKER_MAX_RANGE[1]


class Outcomes:
    def __init__(self) -> None:
        self.loads = 0
        self.accepted = 0
        self.slowest = 0.0
        self.slowest_size = 0
        self.messages: dict[str, int] = {}


def load_one(path: Path, data: bytes, seen: Outcomes) -> None:
    path.write_bytes(data)
    started = time.perf_counter()
    try:
        ps = loader.load_policies([path], CATALOG)
    except PolicyError as e:
        elapsed = time.perf_counter() - started
        assert e.issues
        for issue in e.issues:
            assert issue.file == str(path), issue
            assert issue.line is not None and issue.line >= 1, issue
            assert "\n" not in issue.message and len(issue.message) < 600, issue
            kind = issue.message.split(":")[0][:40]
            seen.messages[kind] = seen.messages.get(kind, 0) + 1
    else:
        elapsed = time.perf_counter() - started
        check_accepted(ps)
        seen.accepted += 1
    seen.loads += 1
    if elapsed > seen.slowest:
        seen.slowest, seen.slowest_size = elapsed, len(data)
    assert elapsed < 2.0, f"one load took {elapsed:.2f} s"


def test_ten_thousand_mutated_policy_files_never_crash_the_loader(workdir: Path) -> None:
    seen = Outcomes()
    path = workdir / "fuzzed.yaml"

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,  # the 2 s bound is asserted per load, without hypothesis' warm-up noise
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def run(data: st.DataObject) -> None:
        def pick(n: int) -> int:
            return data.draw(st.integers(0, n - 1)) if n > 1 else 0

        load_one(path, fuzzing.mutate(SEEDS, pick), seen)

    started = time.perf_counter()
    run()
    wall = time.perf_counter() - started
    # Hypothesis may stop early only if it ran out of distinct inputs, which these cannot.
    assert seen.loads >= EXAMPLES
    # Most mutations must be rejected and some accepted, or the mutators test nothing.
    assert 0 < seen.accepted < seen.loads // 2
    print(
        f"\nfuzz: {seen.loads} loads in {wall:.1f} s, {seen.accepted} accepted, "
        f"slowest {seen.slowest * 1000:.0f} ms ({seen.slowest_size} bytes); rejections by kind: "
        + ", ".join(f"{k}={n}" for k, n in sorted(seen.messages.items(), key=lambda kv: -kv[1])[:12])
    )
