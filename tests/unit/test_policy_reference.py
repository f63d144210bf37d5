"""The policy reference in docs/policies.md is generated from the code (remediator/policy/
reference.py): the published file is what the generator makes of it, every field has a meaning,
the generator follows the models (a new field, a new metric, a removed one), keeps the prose it
must keep, and refuses a document without a place for a part. The action sections, whose prose
has no code source, are checked against the action registry instead."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import pytest
import structlog
from pydantic import Field

from remediator.engine import catalog
from remediator.policy import reference
from remediator.policy.catalog import Catalog, MetricSpec, ProbeSpec
from remediator.policy.schema import ControllerDoc, Doc, PolicyDoc, Strict, Within
from tests.helpers import run_cli

DOC = Path(__file__).parent.parent.parent / "docs" / "policies.md"


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """`remediator` commands configure structlog process-wide (a "warning" filter drops info
    events): start and end each test with the defaults, so capture_logs() sees every event."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def test_docs_policies_md_is_what_the_generator_makes() -> None:
    text = DOC.read_text()
    assert text == reference.render(text, catalog()), (
        "docs/policies.md is not current with the code; regenerate with: "
        f"{reference.REGENERATE} (and review the diff)"
    )


def test_every_generated_part_is_in_the_document() -> None:
    text = DOC.read_text()
    for name in reference.sections(catalog()):
        assert f"<!-- generated: {name} " in text and f"<!-- end generated: {name} -->" in text


@pytest.mark.parametrize("model", [PolicyDoc, ControllerDoc])
def test_every_field_has_a_meaning_and_a_type(model: type[Strict]) -> None:
    rows = list(reference.field_rows(model))
    assert len(rows) > 5
    no_meaning = [r.path for r in rows if not r.meaning]
    assert not no_meaning, f"give these fields a description= in remediator/policy/schema.py: {no_meaning}"
    bad_type = [r.path for r in rows if not r.type or "typing" in r.type or "<class" in r.type]
    assert not bad_type, f"give these fields Doc(type=...) in remediator/policy/schema.py: {bad_type}"


def test_field_rows_follow_the_model() -> None:
    rows = {r.path: r for r in reference.field_rows(PolicyDoc)}
    # Aliases as written in YAML, ranges from the validators, defaults from the enclosing field.
    assert rows["spec.watch.for"].type == "duration, 0s-7d"
    assert rows["spec.interval"].default == "`30s`"
    assert rows["spec.budget.max"].type == "integer, 1-1,000"
    assert rows["spec.budget.max"].default == "`3`" and rows["spec.budget.per"].default == "`1h`"
    assert rows["spec.actions[].allowDisruptive"].default == "`false`"
    assert rows["spec.watch.above"].default == "required"
    assert rows["spec.mode"].why.startswith("A new policy")


class _Inner(Strict):
    depth: Annotated[int, Field(ge=2, le=9), Doc(why="Deep enough.")] = Field(
        default=4, description="How deep."
    )


class _Spec(Strict):
    wait: Annotated[float, Doc(type="duration")] = Field(default=90.0, description="Wait.")
    inner: _Inner = Field(default_factory=_Inner)
    name: str = Field(description="A name | with a bar.")


class _Toy(Strict):
    spec: _Spec


def test_a_new_field_appears_with_its_facts() -> None:
    table = reference.field_table(_Toy)
    assert "| `spec.inner.depth` | integer, 2-9 | `4` | How deep. | Deep enough. |" in table
    assert "| `spec.wait` | duration | `1m30s` | Wait. | |" in table
    # A `|` inside a cell is escaped so the table keeps its columns.
    assert "| `spec.name` | string | required | A name \\| with a bar. | |" in table


def test_a_duration_range_is_read_from_its_validator() -> None:
    from pydantic import AfterValidator

    class _R(Strict):
        t: Annotated[float, AfterValidator(Within(0.5, 7200.0)), Doc(type="duration")] = Field(
            default=1.0, description="T."
        )

    assert "| `t` | duration, 500ms-2h | `1s` | T. | |" in reference.field_table(_R)


def _doc(table: str = "") -> str:
    return (
        "# Title\n\nprose before\n\n"
        "<!-- generated: metrics-toy (hand-written note) -->\n"
        f"{table}"
        "<!-- end generated: metrics-toy -->\n\nprose after\n"
        "<!-- generated: policy-fields x -->\n<!-- end generated: policy-fields -->\n"
        "<!-- generated: controller-fields x -->\n<!-- end generated: controller-fields -->\n"
    )


def _catalog(*metrics: MetricSpec) -> Catalog:
    return Catalog(probes={"toy": ProbeSpec("toy", "A toy probe.", metrics)})


def test_metric_rows_come_from_the_code_and_keep_their_prose() -> None:
    first = reference.render(
        _doc(),
        _catalog(
            MetricSpec("used", "short help", limit="fs.file-max", per_container=True),
            MetricSpec("gone", "will be removed"),
        ),
    )
    assert "| `used` | count | `fs.file-max` | yes | short help |" in first
    assert "prose before" in first and "prose after" in first
    assert first.count("| Field | Type |") == 2

    # Someone writes better prose for `used`; the code changes its unit, drops `gone`, adds `new`.
    edited = first.replace("| short help |", "| Long, careful prose. |")
    second = reference.render(
        edited,
        _catalog(
            MetricSpec("used", "short help", unit="bytes", limit="fs.file-max", per_container=True),
            MetricSpec("new", "brand new"),
        ),
    )
    assert "| `used` | bytes | `fs.file-max` | yes | Long, careful prose. |" in second
    assert "`gone`" not in second
    assert "| `new` | count | | no | brand new |" in second
    # Rendering what it rendered changes nothing.
    assert (
        reference.render(
            second,
            _catalog(
                MetricSpec("used", "short help", unit="bytes", limit="fs.file-max", per_container=True),
                MetricSpec("new", "brand new"),
            ),
        )
        == second
    )


def test_a_part_without_a_place_is_refused_with_the_marker_to_add() -> None:
    text = _doc().replace("<!-- generated: metrics-toy (hand-written note) -->\n", "")
    text = text.replace("<!-- end generated: metrics-toy -->\n", "")
    with pytest.raises(reference.ReferenceError, match="metrics-toy"):
        reference.render(text, _catalog(MetricSpec("used", "h")))
    broken = _doc().replace("<!-- end generated: metrics-toy -->\n", "")
    with pytest.raises(reference.ReferenceError, match="no end marker"):
        reference.render(broken, _catalog(MetricSpec("used", "h")))


def test_the_cli_rewrites_a_stale_copy_and_reports_broken_markers(tmp_path: Path) -> None:
    copy = tmp_path / "policies.md"
    current = DOC.read_text()
    stale = re.sub(r"\| `spec.interval` \| duration[^\n]*\n", "", current, count=1)
    assert stale != current
    copy.write_text(stale)
    code, out, err = run_cli(["schema", "--markdown", str(copy)])
    assert (code, err) == (0, ""), err
    assert "updated" in out
    assert copy.read_text() == current
    code, out, _ = run_cli(["schema", "--markdown", str(copy)])
    assert code == 0 and "already current" in out

    copy.write_text(current.replace("<!-- end generated: policy-fields -->", ""))
    code, out, err = run_cli(["schema", "--markdown", str(copy)])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "no end marker" in err


def test_every_action_has_a_section_with_its_params() -> None:
    """The action prose has no code source; its facts that do are checked: each action of the
    registry has a `### name (disruptive|not disruptive)` section, and the first table after
    it lists exactly the action's params."""
    text = DOC.read_text()
    problems = []
    for name, spec in sorted(catalog().actions.items()):
        kind = "disruptive" if spec.disruptive else "not disruptive"
        heading = f"### `{name}` ({kind})"
        if heading not in text:
            problems.append(f"no heading {heading!r}")
            continue
        section = text.split(heading, 1)[1].split("\n### ", 1)[0]
        params = {f.alias or n for n, f in spec.params.model_fields.items()}
        rows = set(re.findall(r"^\| `([A-Za-z]+)` \|", section, re.M))
        if rows != params:
            problems.append(f"{name}: params {sorted(params)} but the table has {sorted(rows)}")
    assert not problems, problems
