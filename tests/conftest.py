"""Suite-wide rules for the test tiers.

Every test under tests/real/ is marked ``real`` (root, the real kernel, running containerd and
dockerd), whether or not its module says so, so ``-m "not real"`` always means "no host state".

A real-tier test never passes by not running:

* A missing prerequisite (not root, daemon down, test image missing) is a failure whose message
  names the script that fixes it (see ``tests/real/conftest.py``), not a skip.
* ``REMEDIATOR_SKIP_REAL=1`` is the only way to turn those failures into skips, for a developer
  machine without the daemons; the run then ends with a banner counting what was not tested.
* Under ``CI`` (set by the CI runner) or ``REMEDIATOR_REQUIRE_REAL=1`` (set by scripts/test.sh),
  any skip in the real tier, whatever raised it, is reported as a failure. This overrides
  ``REMEDIATOR_SKIP_REAL``: CI must never be green on a host it did not touch.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

# pytester: tests/real/test_harness_real.py runs small pytest sessions against these rules.
pytest_plugins = ("pytester",)

REAL_DIR = Path(__file__).parent / "real"
_FALSE_WORDS = ("", "0", "false", "no")


def real_tier_required() -> bool:
    """True when a skipped real-tier test must count as a failure."""
    ci = os.environ.get("CI", "").strip().lower() not in _FALSE_WORDS
    return ci or os.environ.get("REMEDIATOR_REQUIRE_REAL") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(REAL_DIR):
            item.add_marker(pytest.mark.real)


# Real-tier skips let through this session (no CI, no REMEDIATOR_REQUIRE_REAL), for the banner.
_SKIPPED_REAL = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SKIPPED_REAL] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    # An xfail is reported as a skip with `wasxfail`; it is an expected failure, not a skip.
    if not report.skipped or hasattr(report, "wasxfail"):
        return report
    if item.get_closest_marker("real") is None:
        return report
    reason = _skip_reason(report)
    if real_tier_required():
        report.outcome = "failed"
        report.longrepr = (
            "real-tier test skipped while CI or REMEDIATOR_REQUIRE_REAL=1 is set, which makes "
            f"every real-tier skip a failure. Skip reason: {reason}"
        )
    else:
        item.config.stash[_SKIPPED_REAL].append(f"{item.nodeid} ({report.when}): {reason}")
    return report


def _skip_reason(report: pytest.TestReport) -> str:
    # A skip's longrepr is (path, lineno, "Skipped: reason").
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    skipped = config.stash.get(_SKIPPED_REAL, [])
    if not skipped:
        return
    tr = terminalreporter
    tr.section("REAL TIER NOT TESTED", sep="!", red=True, bold=True)
    tr.write_line(
        f"{len(skipped)} real-tier test(s) skipped: these results say nothing about the real "
        "host. scripts/test.sh installs and starts what they need.",
        red=True,
        bold=True,
    )
    for line in skipped:
        tr.write_line(f"  {line}")


@pytest.fixture(autouse=True)
def _fresh_containerd_answers() -> Iterator[None]:
    """Each test starts with no remembered containerd answers (the fifos probe keeps them for
    the daemon's process lifetime; a test asking a fake or a changed containerd must be asked)."""
    from remediator.probes import fifos

    fifos.KNOWN_IDS.clear()
    yield
    fifos.KNOWN_IDS.clear()
