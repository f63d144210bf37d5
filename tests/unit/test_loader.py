"""Policy compilation: every error names file, line and field; the bundled set compiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from remediator.engine import catalog
from remediator.errors import PolicyError
from remediator.model import Mode, Scope
from remediator.policy.loader import load_policies
from remediator.policy.schema import json_schema
from remediator.settings import bundled_policies

FIXTURES = Path(__file__).parent.parent / "fixtures" / "policies"


def errors_of(paths: list[Path]) -> list[str]:
    with pytest.raises(PolicyError) as e:
        load_policies(paths, catalog())
    return [str(i).replace(str(FIXTURES) + "/", "") for i in e.value.issues]


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


POLICY = """\
apiVersion: remediator.io/v1
kind: Policy
metadata:
  name: p1
spec:
  mode: enforce
  watch:
    probe: dentries
    metric: negative
    above: 10M
    clearBelow: 5M
    for: 10m
  actions:
    - action: drop-caches
      mode: audit
      settle: 2m
"""


def test_bundled_policies_compile() -> None:
    directory = bundled_policies()
    assert directory is not None
    ps = load_policies([directory], catalog())
    names = {p.name for p in ps.policies}
    assert {
        "negative-dentries",
        "leaked-fifo-dirs",
        "fifo-inodes-full",
        "fifo-inodes-forecast",
        "inotify-watches",
        "inotify-instances",
        "file-handles",
    } <= names
    assert ps.controller.breaker_max == 20
    for p in ps.policies:
        # Bundled policies enforce only what is safe by construction; disruptive steps audit.
        for step in p.steps:
            if catalog().actions[step.action].disruptive:
                assert step.mode is Mode.AUDIT, (p.name, step.action)


def test_every_error_in_every_file_at_once() -> None:
    assert errors_of([FIXTURES / "broken"]) == [
        "broken/10-types.yaml:6: spec.mode: Input should be 'audit' or 'enforce'",
        "broken/10-types.yaml:7: spec.interval: expected a duration such as 30s, 5m, 1h30m or 1d, got 30",
        "broken/10-types.yaml:11: spec.watch.above: expected a number (20M, 64Mi, 1.5k) or a "
        "percentage of the live kernel limit (80%), got 'lots'",
        "broken/10-types.yaml:12: spec.watch.for: expected a duration such as 30s, 5m, 1h30m or 1d, got '5x'",
        "broken/10-types.yaml:13: spec.watch.colour: unknown field (expected one of: above, "
        "clearBelow, for, metric, probe, scope)",
        "broken/10-types.yaml:20: spec.budget.max: Input should be a valid integer, got '3'",
        "broken/20-refs.yaml:8: spec.watch.metric: probe 'dentries' has no metric 'positive' "
        "(expected one of: total, unused, negative, negative_projected, growth_per_second, hash_buckets, "
        "negative_per_bucket, forecast_seconds, lookup_slowdown, lookup_ns, lookup_baseline_ns, slab_bytes, "
        "slab_reclaimable_bytes, "
        "failed_lookups_per_second, "
        "slab_growth_bytes_per_second)",
        "broken/20-refs.yaml:11: spec.actions[0].action: unknown action 'reboot-host' (expected one "
        "of: cap-memory, clean-fifos, drop-caches, evict-pod, raise-sysctl, reclaim-cgroup, "
        "reclaim-parent-cgroup, recreate-container, restart-degraded)",
        "broken/20-refs.yaml:16: metadata.name: policy 'bad-refs' is already defined in "
        "broken/20-refs.yaml:4",
        "broken/20-refs.yaml:25: apiVersion: expected 'remediator.io/v1', got 'remediator.io/v2'",
        "broken/30-yaml.yaml:5: metadata.name: duplicate key (first given on line 4)",
        "broken/30-yaml.yaml:7: not valid YAML: did not find expected ',' or ']'",
    ]


def test_action_params_errors_point_into_params(tmp_path: Path) -> None:
    text = POLICY.replace(
        "      settle: 2m\n", "      settle: 2m\n      params:\n        what: everything\n        extra: 1\n"
    )
    errs = errors_of([write(tmp_path, "p.yaml", text)])
    assert len(errs) == 2
    assert errs[0].startswith(f"{tmp_path}/p.yaml:18: spec.actions[0].params.what: Input should be ")
    assert errs[1].startswith(f"{tmp_path}/p.yaml:19: spec.actions[0].params.extra: unknown field")


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    text = POLICY.replace("  mode: enforce\n", "  mode: enforce\n  mode: audit\n")
    assert errors_of([write(tmp_path, "p.yaml", text)]) == [
        f"{tmp_path}/p.yaml:7: spec.mode: duplicate key (first given on line 6)"
    ]


def test_clear_above_trigger_is_rejected(tmp_path: Path) -> None:
    text = POLICY.replace("clearBelow: 5M", "clearBelow: 20M")
    (err,) = errors_of([write(tmp_path, "p.yaml", text)])
    expected = "spec.watch: clearBelow (2e+07) must not be above the trigger `above` (1e+07)"
    assert err == f"{tmp_path}/p.yaml:7: {expected}"


def test_percent_needs_a_metric_with_a_limit(tmp_path: Path) -> None:
    text = (
        POLICY.replace("above: 10M", "above: 80%")
        .replace("clearBelow: 5M", "clearBelow: 70%")
        .replace("metric: negative", "metric: total")
    )
    above, clear = errors_of([write(tmp_path, "p.yaml", text)])
    assert "p.yaml:10: spec.watch.above: 80% is a percentage, but metric 'total' has no kernel limit" in above
    assert "p.yaml:11: spec.watch.clearBelow: 70% is a percentage" in clear


def test_container_scope_needs_per_container_metric(tmp_path: Path) -> None:
    text = POLICY.replace("    metric: negative\n", "    metric: negative\n    scope: container\n")
    (err,) = errors_of([write(tmp_path, "p.yaml", text)])
    assert "spec.watch.scope: metric 'negative' is host-wide only" in err


def test_missing_paths_and_empty_dirs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert errors_of([tmp_path / "nope", empty]) == [
        f"{empty}: no *.yaml policy files in this directory",
        f"{tmp_path}/nope: no such file or directory",
    ]


def test_compiled_policy_fields(tmp_path: Path) -> None:
    ps = load_policies([write(tmp_path, "p.yaml", POLICY)], catalog())
    (p,) = ps.policies
    assert (p.name, p.mode, p.scope, p.hold, p.interval) == ("p1", Mode.ENFORCE, Scope.HOST, 600.0, 30.0)
    assert (p.trigger.value, p.clear.value) == (10e6, 5e6)
    assert p.steps[0].mode is Mode.AUDIT and p.steps[0].settle == 120.0
    assert p.source.file == str(tmp_path / "p.yaml") and p.source.line == 4
    assert (p.budget_max, p.budget_window, p.cooldown) == (3, 3600.0, 600.0)


def test_git_commit_and_dirty_flag_are_recorded(tmp_path: Path) -> None:
    import subprocess

    write(tmp_path, "p.yaml", POLICY)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "p"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    ps = load_policies([tmp_path], catalog())
    assert (ps.commit, ps.dirty) == (head, False)
    assert ps.policies[0].source.commit == head
    (tmp_path / "p.yaml").write_text(POLICY.replace("10M", "11M"))
    assert load_policies([tmp_path], catalog()).dirty is True


def test_json_schema_is_published_and_current() -> None:
    cat = catalog()
    schema = json_schema({n: s.params.model_json_schema() for n, s in cat.actions.items()})
    assert schema["$defs"]["Watch"]["properties"]["for"]["type"] == "string"
    published = Path(__file__).parent.parent.parent / "remediator" / "schema" / "policy.schema.json"
    assert json.loads(published.read_text()) == json.loads(json.dumps(schema, sort_keys=True)), (
        "regenerate with: remediator schema > remediator/schema/policy.schema.json"
    )


def test_rank_by_must_be_a_per_container_metric(tmp_path: Path) -> None:
    text = POLICY.replace(
        "    - action: drop-caches\n      mode: audit\n      settle: 2m\n",
        "    - action: reclaim-cgroup\n      params: {target: top, rankBy: negative}\n",
    )
    (err,) = errors_of([write(tmp_path, "p.yaml", text)])
    assert err == (
        f"{tmp_path}/p.yaml:15: spec.actions[0].params.rankBy: probe 'dentries' has no per-container "
        "metric 'negative' (expected one of: slab_reclaimable_bytes, failed_lookups_per_second, "
        "slab_growth_bytes_per_second)"
    )


def test_raise_sysctl_refuses_a_switch_with_the_list_of_pools(tmp_path: Path) -> None:
    text = POLICY.replace(
        "    - action: drop-caches\n      mode: audit\n      settle: 2m\n",
        "    - action: raise-sysctl\n      params:\n        key: kernel.modules_disabled\n",
    )
    (err,) = errors_of([write(tmp_path, "p.yaml", text)])
    assert err.startswith(
        f"{tmp_path}/p.yaml:16: spec.actions[0].params.key: 'kernel.modules_disabled' is not a shared "
        "kernel pool raise-sysctl may raise; expected one of: fs.aio-max-nr, fs.epoll.max_user_watches, "
    )
    assert "net.netfilter.nf_conntrack_max" in err
