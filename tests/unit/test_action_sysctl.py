"""raise-sysctl: params, raise arithmetic, plan, and recheck/apply/verify on fixture trees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from remediator.actions.base import ApplyContext, PlanContext
from remediator.actions.sysctl import (
    RaiseSysctl,
    RaiseSysctlParams,
    current_from_readings,
    parse_single_int,
    raised_value,
)
from remediator.clock import FakeClock
from remediator.host import HostRoot
from remediator.model import Outcome, Plan, Reading, TargetKind
from tests.helpers import make_host

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "proc" / "linux-6.18"
KEY = "fs.inotify.max_user_watches"
FILE = "proc/sys/fs/inotify/max_user_watches"


def params(**kw: Any) -> RaiseSysctlParams:
    return RaiseSysctlParams.model_validate({"key": KEY, "ceiling": "1M", **kw})


def plan_ctx(p: RaiseSysctlParams, sysctls: dict[str, Any] | None = None) -> PlanContext:
    limits = Reading("limits", 1000.0, detail={"sysctls": sysctls} if sysctls is not None else {})
    return PlanContext(
        policy="inotify-watches",
        metric="inotify_watches",
        subject="host",
        reading=limits,
        params=p,
        eligible=lambda c: True,
        now=1000.0,
        readings={"limits": limits},
    )


def apply_ctx(host: HostRoot, dry_run: bool = False) -> ApplyContext:
    return ApplyContext(host=host, clock=FakeClock(), dry_run=dry_run)


def planned(p: RaiseSysctlParams, current: int | None) -> Plan:
    result = RaiseSysctl().plan(plan_ctx(p, {KEY: current} if current is not None else None))
    assert isinstance(result, Plan)
    return result


# --- params ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field", "message"),
    [
        ({"key": "fs"}, "key", "expected a sysctl name"),
        ({"key": "fs..file-max"}, "key", "expected a sysctl name"),
        ({"key": "../../etc/passwd"}, "key", "expected a sysctl name"),
        ({"key": "fs/file-max"}, "key", "expected a sysctl name"),
        ({"factor": 1.0}, "factor", "greater than 1"),
        ({"factor": 0.5}, "factor", "greater than 1"),
        ({"factor": float("inf")}, "factor", "greater than 1"),
        ({"step": 0}, "step", ">= 1"),
        ({"ceiling": "lots"}, "ceiling", "expected a number such as 20M"),
        ({"ceiling": "1.5"}, "ceiling", "whole number"),
        ({"ceiling": 0}, "ceiling", "whole number"),
        ({"ceilng": "1M"}, "ceilng", "Extra inputs are not permitted"),
    ],
)
def test_params_reject_with_clear_messages(raw: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        RaiseSysctlParams.model_validate({"key": KEY, "ceiling": "1M", **raw})
    errors = err.value.errors()
    assert [e["loc"][0] for e in errors] == [field]
    assert message in errors[0]["msg"]


def test_params_require_ceiling() -> None:
    with pytest.raises(ValidationError) as err:
        RaiseSysctlParams.model_validate({"key": KEY})
    assert err.value.errors()[0]["loc"] == ("ceiling",)


@pytest.mark.parametrize(("ceiling", "value"), [("1M", 1_000_000), (524288, 524288), ("64Ki", 65536)])
def test_params_ceiling_counts(ceiling: str | int, value: int) -> None:
    assert params(ceiling=ceiling).ceiling_value == value


# --- arithmetic -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "factor", "step", "ceiling", "expected"),
    [
        (8192, 2.0, None, 1_000_000, 16384),  # doubled
        (100, 1.1, 50, 1000, 150),  # step wins over a small factor
        (100, 3.0, 50, 1000, 300),  # factor wins over a small step
        (900, 2.0, None, 1000, 1000),  # capped at the ceiling
        (999, 2.0, None, 1000, 1000),
        (3, 1.1, None, 100, 4),  # 3.3 rounds up: always strictly more
        (0, 2.0, None, 10, 1),  # a factor does nothing to 0; +1 floor
        (0, 2.0, 5, 10, 5),
    ],
)
def test_raised_value(current: int, factor: float, step: int | None, ceiling: int, expected: int) -> None:
    assert raised_value(current, factor, step, ceiling) == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [("8192\n", 8192), ("  -1 ", -1), ("32768\t60999\n", None), ("cubic\n", None), ("", None)],
)
def test_parse_single_int(text: str, value: int | None) -> None:
    assert parse_single_int(text) == value


def test_current_from_readings_accepts_ints_only() -> None:
    def readings(v: Any) -> dict[str, Reading]:
        return {"limits": Reading("limits", 0.0, detail={"sysctls": {KEY: v}})}

    assert current_from_readings(KEY, readings(8192)) == 8192
    assert current_from_readings(KEY, readings(8192.0)) == 8192
    assert current_from_readings(KEY, readings("8192")) == 8192
    assert current_from_readings(KEY, readings("1 2")) is None
    assert current_from_readings(KEY, readings(True)) is None
    assert current_from_readings("fs.file-max", readings(8192)) is None


# --- plan -----------------------------------------------------------------------------------


def test_plan_raises_from_the_limits_reading() -> None:
    plan = planned(params(), 8192)
    assert plan.action == "raise-sysctl"
    assert (plan.target.kind, plan.target.id) == (TargetKind.SYSCTL, KEY)
    assert plan.summary == f"raise {KEY} from 8192 to 16384 (x2, ceiling 1000000)"
    assert dict(plan.expect) == {"current": 8192, "new": 16384}


def test_plan_at_ceiling_is_nothing_to_do() -> None:
    result = RaiseSysctl().plan(plan_ctx(params(ceiling=8192), {KEY: 8192}))
    assert result == f"at ceiling: {KEY} is 8192, ceiling is 8192"


def test_plan_refuses_negative_unlimited_values() -> None:
    result = RaiseSysctl().plan(plan_ctx(params(), {KEY: -1}))
    assert isinstance(result, str)
    assert "unlimited" in result


def test_plan_without_a_reading_defers_to_the_live_value() -> None:
    plan = planned(params(step=1000), None)
    assert "from the value read just before acting" in plan.summary
    assert dict(plan.expect) == {"current": None, "new": None}


# --- recheck / apply / verify ---------------------------------------------------------------


def test_execute_raises_and_reads_back(tmp_path: Path) -> None:
    host = make_host(tmp_path, {FILE: "8192\n"})
    result = RaiseSysctl().execute(planned(params(), 8192), apply_ctx(host))
    assert result.outcome is Outcome.APPLIED
    assert result.verified is True
    assert dict(result.before) == {"key": KEY, "value": 8192}
    assert result.after["value"] == 16384
    assert (tmp_path / FILE).read_text() == "16384\n"


def test_execute_on_the_captured_6_18_value(tmp_path: Path) -> None:
    captured = (FIXTURES / "sys/fs/inotify/max_user_watches").read_text()
    host = make_host(tmp_path, {FILE: captured})
    current = int(captured)
    result = RaiseSysctl().execute(planned(params(ceiling=10**9), current), apply_ctx(host))
    assert result.outcome is Outcome.APPLIED
    assert int((tmp_path / FILE).read_text()) == current * 2


def test_execute_without_reading_raises_from_live_value(tmp_path: Path) -> None:
    host = make_host(tmp_path, {FILE: "8192\n"})
    result = RaiseSysctl().execute(planned(params(step=10_000), None), apply_ctx(host))
    assert result.outcome is Outcome.APPLIED
    assert (tmp_path / FILE).read_text() == "18192\n"


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    host = make_host(tmp_path, {FILE: "8192\n"})
    result = RaiseSysctl().execute(planned(params(), 8192), apply_ctx(host, dry_run=True))
    assert result.outcome is Outcome.WOULD_APPLY
    assert result.message == f"would raise {KEY} from 8192 to 16384 (x2, ceiling 1000000)"
    assert (tmp_path / FILE).read_text() == "8192\n"


@pytest.mark.parametrize(
    ("live", "reason"),
    [
        ("16384\n", f"{KEY} is already 16384 (planned 16384)"),
        ("20000\n", f"{KEY} is already 20000 (planned 16384)"),
        ("9000\n", f"{KEY} changed under us: planned from 8192, now 9000"),
        ("1000000\n", f"at ceiling: {KEY} is 1000000, ceiling is 1000000"),
        ("-1\n", f"{KEY} is -1: a negative limit usually means unlimited; not raising"),
    ],
)
def test_recheck_skips_when_the_value_moved(tmp_path: Path, live: str, reason: str) -> None:
    host = make_host(tmp_path, {FILE: live})
    result = RaiseSysctl().execute(planned(params(), 8192), apply_ctx(host))
    assert (result.outcome, result.message) == (Outcome.SKIPPED, reason)
    assert (tmp_path / FILE).read_text() == live


def test_recheck_rejects_multi_value_sysctls(tmp_path: Path) -> None:
    key = "net.ipv4.ip_local_port_range"
    host = make_host(tmp_path, {"proc/sys/net/ipv4/ip_local_port_range": "32768\t60999\n"})
    p = RaiseSysctlParams.model_validate({"key": key, "ceiling": 65535})
    result = RaiseSysctl().execute(planned(p, None), apply_ctx(host))
    assert result.outcome is Outcome.SKIPPED
    assert "not a single integer" in result.message
    assert (tmp_path / "proc/sys/net/ipv4/ip_local_port_range").read_text() == "32768\t60999\n"


def test_recheck_missing_sysctl(tmp_path: Path) -> None:
    host = make_host(tmp_path, {})
    result = RaiseSysctl().execute(planned(params(), 8192), apply_ctx(host))
    assert (result.outcome, result.message) == (Outcome.SKIPPED, f"no sysctl {KEY} on this host")


def test_apply_never_writes_lower_even_after_recheck(tmp_path: Path) -> None:
    """The value moved between recheck and apply: apply re-judges before writing."""
    host = make_host(tmp_path, {FILE: "8192\n"})
    action, plan, ctx = RaiseSysctl(), planned(params(), 8192), apply_ctx(host)
    assert action.recheck(plan, ctx) is None
    (tmp_path / FILE).write_text("50000\n")
    result = action.apply(plan, ctx)
    assert result.outcome is Outcome.SKIPPED
    assert (tmp_path / FILE).read_text() == "50000\n"


def test_verify_reports_a_clamped_value(tmp_path: Path) -> None:
    """The kernel may clamp a limit (proc_dointvec_minmax): read-back tells the truth."""
    host = make_host(tmp_path, {FILE: "8192\n"})
    action, plan, ctx = RaiseSysctl(), planned(params(), 8192), apply_ctx(host)
    applied = action.apply(plan, ctx)
    (tmp_path / FILE).write_text("10000\n")  # what a clamping kernel would show
    result = action.verify(plan, applied, ctx)
    assert result.verified is False
    assert result.after["value"] == 10000
    assert "read back '10000'" in result.message
