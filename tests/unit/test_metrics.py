"""Prometheus series: names and units from the table, limits beside usages, bounded
per-container and per-uid series, stale readings marked and not repeated, counters that survive
timer runs through the textfile, and the textfile that parses."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from remediator import metric_names, metrics
from remediator.engine import ActionReport, CycleReport, PolicyReport
from remediator.model import (
    ActionResult,
    Condition,
    ContainerRef,
    ContainerSample,
    Decision,
    DecisionKind,
    Mode,
    Outcome,
    Phase,
    Reading,
    Scope,
    StepVerdict,
    Verdict,
)
from remediator.policy.catalog import MetricSpec, ProbeSpec
from remediator.state import BreakerState
from tests.helpers import make_policy

POLICY = make_policy(name="metrics-test", scope=Scope.CONTAINER, probe="dentries", metric="negative")
SPECS = {
    "dentries": ProbeSpec(
        "dentries",
        "",
        (
            MetricSpec("negative", "Negative dentries."),
            MetricSpec("slab_bytes", "Slab.", unit="bytes", limit="the memory"),
            MetricSpec("slab_reclaimable_bytes", "Per container.", unit="bytes", per_container=True),
        ),
    )
}


def sample(cid: str, value: float) -> ContainerSample:
    return ContainerSample(ContainerRef(cid * 12, f"name-{cid}"), {"slab_reclaimable_bytes": value})


def reading(error: str | None = None, containers: int = 3) -> Reading:
    return Reading(
        "dentries",
        100.0,
        {"negative": 5.0, "slab_bytes": 4096.0, "new_thing_total": 7.0},
        {"slab_bytes": 8192.0},
        containers=tuple(sample(chr(ord("a") + i), float(i)) for i in range(containers)),
        detail={"inotify_by_uid": {"0": {"watches": 10, "instances": 1}, "1000": {"watches": 99}}},
        error=error,
    )


def action(outcome: Outcome) -> ActionReport:
    d = Decision(POLICY.name, "host", DecisionKind.ACT, Phase.FIRING, "", step=0, action="first")
    return ActionReport(d, Mode.ENFORCE, "", None, ActionResult(outcome, ""))


def report(r: Reading, **phases: Phase) -> CycleReport:
    conditions = {s: Condition(POLICY.name, s, phase=p, value=1.0) for s, p in phases.items()}
    pr = PolicyReport(
        POLICY,
        verdicts=[StepVerdict(POLICY.name, "host", 0, "first", Verdict.RESOLVED, 5, 1, 90)],
        actions=[action(Outcome.APPLIED), action(Outcome.FAILED)],
        conditions=conditions,
    )
    return CycleReport(
        100.0, "live", False, {"dentries": r}, [pr], BreakerState(True, 50.0, "x"), {"dentries": 0.01}
    )


def samples(exporter: metrics.Exporter) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in exporter.collect():
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(exporter: metrics.Exporter, name: str, **labels: str) -> float | None:
    return samples(exporter).get((name, tuple(sorted(labels.items()))))


def test_readings_are_named_from_the_table_with_units_and_limits() -> None:
    e = metrics.Exporter(specs=SPECS)
    e.observe(report(reading()))
    assert get(e, "remediator_negative_dentries") == 5.0
    assert get(e, "remediator_dentry_slab_bytes") == 4096.0
    assert get(e, "remediator_dentry_slab_limit_bytes") == 8192.0
    # Not in the table: still exported, by the generic rule, never as a gauge ending in _total.
    assert get(e, "remediator_dentries_new_thing_all") == 7.0
    assert get(e, "remediator_probe_up", probe="dentries") == 1.0
    assert get(e, "remediator_probe_last_success_timestamp_seconds", probe="dentries") == 100.0
    assert get(e, "remediator_probe_duration_seconds", probe="dentries") == 0.01


def test_per_container_and_per_uid_series_are_the_top_n() -> None:
    e = metrics.Exporter(top_n=2, specs=SPECS)
    e.observe(report(reading(containers=5)))
    per_container = {
        dict(k[1])["container_name"]: v
        for k, v in samples(e).items()
        if k[0] == "remediator_container_slab_reclaimable_bytes"
    }
    assert per_container == {"name-e": 4.0, "name-d": 3.0}
    assert get(e, "remediator_probe_containers", probe="dentries") == 5.0
    assert get(e, "remediator_inotify_watches_per_uid", uid="1000") == 99.0
    assert get(e, "remediator_inotify_watches_per_uid", uid="0") == 10.0


def test_a_failed_read_is_marked_and_its_old_values_are_not_repeated() -> None:
    e = metrics.Exporter(specs=SPECS)
    e.observe(report(reading()))
    e.observe(report(reading(error="boom")))
    assert get(e, "remediator_probe_up", probe="dentries") == 0.0
    assert get(e, "remediator_negative_dentries") is None
    assert (
        get(e, "remediator_container_slab_reclaimable_bytes", container_id="b" * 12, container_name="name-b")
        is None
    )
    # The last good read's time stays: how stale the data is.
    assert get(e, "remediator_probe_last_success_timestamp_seconds", probe="dentries") == 100.0
    assert get(e, "remediator_probe_errors_total", probe="dentries") == 1.0


def test_conditions_actions_verdicts_and_breaker() -> None:
    e = metrics.Exporter(specs=SPECS)
    e.observe(report(reading(), a=Phase.FIRING, b=Phase.OK, c=Phase.OK))
    e.observe(report(reading(), a=Phase.RESOLVED, b=Phase.OK))
    assert get(e, "remediator_condition_phase", policy=POLICY.name, subject="a", phase="resolved") == 1.0
    # ok conditions are counted, not listed; a gone subject leaves no series.
    assert get(e, "remediator_condition_phase", policy=POLICY.name, subject="b", phase="ok") is None
    assert get(e, "remediator_conditions", policy=POLICY.name, phase="ok") == 1.0
    assert get(e, "remediator_condition_phase", policy=POLICY.name, subject="a", phase="firing") is None
    labels = {"policy": POLICY.name, "action": "first"}
    assert get(e, "remediator_actions_total", **labels, outcome="applied") == 2.0
    assert get(e, "remediator_actions_total", **labels, outcome="failed") == 2.0
    assert get(e, "remediator_step_verdicts_total", **labels, verdict="resolved") == 2.0
    assert get(e, "remediator_breaker_open") == 1.0
    assert get(e, "remediator_breaker_opened_timestamp_seconds") == 50.0
    assert get(e, "remediator_cycles_total") == 2.0


def test_textfile_parses_and_counters_carry_over_between_runs(tmp_path: Path) -> None:
    path = tmp_path / "remediator.prom"
    for _ in range(3):  # three timer runs, each a fresh process's exporter
        e = metrics.Exporter(specs=SPECS)
        e.carry_over(path)
        e.observe(report(reading()))
        metrics.write_textfile(e, path)
    families = {f.name: f for f in text_string_to_metric_families(path.read_text())}
    assert families["remediator_actions"].type == "counter"
    values = {tuple(sorted(s.labels.items())): s.value for s in families["remediator_actions"].samples}
    assert values[(("action", "first"), ("outcome", "applied"), ("policy", POLICY.name))] == 3.0
    assert families["remediator_negative_dentries"].samples[0].value == 5.0
    assert [p.name for p in tmp_path.iterdir()] == ["remediator.prom"]  # no temporary file left


def test_a_broken_previous_textfile_starts_the_counters_at_zero(tmp_path: Path) -> None:
    path = tmp_path / "remediator.prom"
    path.write_text("this is { not the format\n")
    e = metrics.Exporter(specs=SPECS)
    e.carry_over(path)
    assert get(e, "remediator_cycles_total") is None


def test_names_keep_the_unit_last() -> None:
    spec = MetricSpec("x_seconds", "", unit="seconds")
    assert metric_names.limit_name("p", "x_seconds", spec) == "remediator_p_x_limit_seconds"
    assert metric_names.container_name("limits", "file_handles") == "remediator_container_file_handles"
    assert metric_names.host_name("p", "age", spec) == "remediator_p_age_seconds"


def test_every_catalog_metric_has_a_documented_name() -> None:
    """A probe metric added later is exported by the generic rule without any change here; its
    name (and its limit's, and its per-container series') must still be in docs/metrics.md."""
    import re
    from pathlib import Path

    from remediator.engine import catalog

    docs = (Path(__file__).parent.parent.parent / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(remediator_[a-z0-9_]+)`", docs, re.M))
    missing = []
    for probe, spec in catalog().probes.items():
        for m in spec.metrics:
            names = [metric_names.host_name(probe, m.name, m)]
            if m.limit:
                names.append(metric_names.limit_name(probe, m.name, m))
            if m.per_container:
                names.append(metric_names.container_name(probe, m.name, m))
            missing += [f"{probe}.{m.name}: {n}" for n in names if n not in documented]
    assert not missing, (
        "undocumented metrics (add a row to docs/metrics.md; name them in "
        f"remediator/metric_names.py NAMES if the generic name reads badly): {missing}"
    )


def test_daemon_registry_has_process_metrics() -> None:
    assert metrics.REGISTRY.get_sample_value("process_resident_memory_bytes") is not None
