"""The monitoring contract: `once --textfile` on a fixture host writes a file that
prometheus_client's parser reads and `promtool check metrics` passes; the shipped alert rules
pass `promtool check rules` and their own `promtool test rules`; every metric the rules, the
dashboard and the exporter use is documented in docs/metrics.md.

promtool comes from Debian's `prometheus` package (scripts/test.sh installs it). Without it these
tests fail, naming the package: a monitoring contract that is never checked is not one."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from remediator import metric_names
from tests.unit.test_cli import env, host, run  # noqa: F401 (fixtures)

ROOT = Path(__file__).parent.parent.parent
MONITORING = ROOT / "monitoring"
DOCS = (ROOT / "docs" / "metrics.md").read_text()


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's `prometheus` package (scripts/test.sh does)")
    return path


def check(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], check=False, input=stdin, capture_output=True, text=True, timeout=60
    )


def documented() -> set[str]:
    """Documented names as prometheus_client's parser names families (a counter without
    `_total`)."""
    return {n.removesuffix("_total") for n in re.findall(r"^\| `(remediator_[a-z0-9_]+)`", DOCS, re.M)}


@pytest.fixture
def textfile(env: dict[str, str], tmp_path: Path) -> str:  # noqa: F811 (fixture)
    path = tmp_path / "textfile" / "remediator.prom"
    path.parent.mkdir()
    code, _, err = run(["once", "--textfile", str(path)], env)
    assert code == 0, err
    code, _, err = run(["once", "--textfile", str(path)], env)  # counters continue
    assert code == 0, err
    return path.read_text()


def test_textfile_parses_and_passes_promtool(textfile: str) -> None:
    families = {f.name: f for f in text_string_to_metric_families(textfile)}
    assert families["remediator_file_handles"].samples[0].value == 1856
    # The first run raised fs.file-max from 100000 to 200000; the second read the new limit.
    assert families["remediator_file_handles_limit"].samples[0].value == 200000
    assert families["remediator_cycles"].samples[0].value == 2.0
    applied = [s for s in families["remediator_actions"].samples if s.labels.get("outcome") == "applied"]
    assert [s.value for s in applied] == [1.0]
    result = check(["check", "metrics"], textfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_exported_metric_is_documented(textfile: str) -> None:
    exported = {f.name for f in text_string_to_metric_families(textfile)}
    assert exported - documented() == set()
    for name in metric_names.NAMES.values():
        assert name in documented(), name
    # The daemon's histograms and gauges beyond the exporter's.
    for name in ("remediator_cycle_seconds", "remediator_probe_seconds", "remediator_policies_loaded"):
        assert name in documented(), name


def test_alert_rules_check_and_pass_their_tests() -> None:
    result = check(["check", "rules", str(MONITORING / "alerts.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    result = check(["test", "rules", str(MONITORING / "alerts_test.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def _names_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(remediator_[a-z0-9_]+)", expr))


def test_rules_and_dashboard_use_documented_metrics() -> None:
    rules = (MONITORING / "alerts.yml").read_text()
    used = {
        n.removesuffix("_total") if n.endswith("_total") else n
        for n in _names_in("\n".join(line for line in rules.splitlines() if "expr:" in line))
    }
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= {n.removesuffix("_total") for n in _names_in(target["expr"])}
    assert used - documented() == set()
