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
    ceiling_for,
    current_from_readings,
    parse_single_int,
    raised_value,
)
from remediator.actions.sysctl_persist import (
    SysctlLine,
    find_owners,
    parse_sysctl_conf,
    parse_tuned_sysctls,
    read_own_file,
)
from remediator.clock import FakeClock
from remediator.host import HostRoot
from remediator.model import Outcome, Plan, Reading, TargetKind
from remediator.probes.limits_pools import POOL_KEYS, parse_mem_total
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
    (host.config / "etc").mkdir(exist_ok=True)  # a host has /etc; sysctl.d is made when missing
    return ApplyContext(host=host, clock=FakeClock(1_700_000_000.0), dry_run=dry_run)


def planned(p: RaiseSysctlParams, current: int | None) -> Plan:
    result = RaiseSysctl().plan(plan_ctx(p, {KEY: current} if current is not None else None))
    assert isinstance(result, Plan)
    return result


# --- params ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field", "message"),
    [
        ({"key": "fs"}, "key", "not a shared kernel pool"),
        ({"key": "fs..file-max"}, "key", "not a shared kernel pool"),
        ({"key": "../../etc/passwd"}, "key", "not a shared kernel pool"),
        ({"key": "fs/file-max"}, "key", "not a shared kernel pool"),
        # Switches and per-process knobs: "raise" would flip a boolean or change nothing shared.
        ({"key": "kernel.panic_on_oops"}, "key", "expected one of: fs.aio-max-nr, fs.epoll"),
        ({"key": "kernel.modules_disabled"}, "key", "not a shared kernel pool"),
        ({"key": "vm.max_map_count"}, "key", "not a shared kernel pool"),
        ({"key": "net.core.somaxconn"}, "key", "not a shared kernel pool"),
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


def test_params_ceiling_defaults_to_the_ram_formula() -> None:
    p = RaiseSysctlParams.model_validate({"key": KEY})
    assert p.ceiling_value is None and p.persist is True


def test_refusal_lists_every_allowed_key() -> None:
    with pytest.raises(ValidationError) as err:
        RaiseSysctlParams.model_validate({"key": "kernel.modules_disabled"})
    message = err.value.errors()[0]["msg"]
    for key in POOL_KEYS:
        assert key in message


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
    assert result == f"{KEY} is -1, which means no limit: not raising"


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
    assert dict(result.before) == {"key": KEY, "value": 8192, "ceiling": 1_000_000}
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
        ("-1\n", f"{KEY} is -1, which means no limit: not raising"),
    ],
)
def test_recheck_skips_when_the_value_moved(tmp_path: Path, live: str, reason: str) -> None:
    host = make_host(tmp_path, {FILE: live})
    result = RaiseSysctl().execute(planned(params(), 8192), apply_ctx(host))
    assert (result.outcome, result.message) == (Outcome.SKIPPED, reason)
    assert (tmp_path / FILE).read_text() == live


def test_recheck_rejects_multi_value_sysctls(tmp_path: Path) -> None:
    host = make_host(tmp_path, {FILE: "32768\t60999\n"})
    result = RaiseSysctl().execute(planned(params(), None), apply_ctx(host))
    assert result.outcome is Outcome.SKIPPED
    assert "not a single integer" in result.message
    assert (tmp_path / FILE).read_text() == "32768\t60999\n"


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


# --- ceilings from RAM, "no limit" values ----------------------------------------------------

MEM_24G = 24683584 * 1024  # MemTotal of the test machine, bytes


@pytest.mark.parametrize(
    ("key", "ceiling"),
    [
        ("fs.file-max", 2 * (24683584 // 10)),  # twice the kernel default (~10% of RAM in KiB)
        ("fs.inotify.max_user_watches", MEM_24G * 5 // 100 // 1312),  # under the 1M cap here
        ("fs.inotify.max_user_instances", 1024),
        ("kernel.pid_max", 4_194_304),
        ("kernel.threads-max", MEM_24G // 65536),
        ("fs.aio-max-nr", 1_048_576),
        ("kernel.keys.maxkeys", 1_000_000),
        ("kernel.keys.maxbytes", 25_000_000),
        ("net.netfilter.nf_conntrack_max", MEM_24G * 5 // 100 // 384),
        ("net.core.netdev_max_backlog", 16384),
        ("fs.pipe-user-pages-soft", MEM_24G * 5 // 100 // 4096),
        ("fs.epoll.max_user_watches", MEM_24G * 8 // 100 // 160),
    ],
)
def test_ceiling_formulas(key: str, ceiling: int) -> None:
    assert ceiling_for(key, None, MEM_24G) == ceiling
    assert ceiling_for(key, 77, MEM_24G) == 77  # the policy's own ceiling overrides


def test_max_user_watches_ceiling_is_capped_at_1m_on_big_hosts() -> None:
    assert ceiling_for("fs.inotify.max_user_watches", None, 512 * 2**30) == 1_048_576


def test_parse_mem_total() -> None:
    assert parse_mem_total("MemTotal:       24683584 kB\nMemFree: 1 kB\n") == MEM_24G
    with pytest.raises(ValueError, match="MemTotal"):
        parse_mem_total("MemFree: 1 kB\n")


def test_plan_uses_the_ram_formula_from_the_reading() -> None:
    p = RaiseSysctlParams.model_validate({"key": "fs.file-max"})
    limits = Reading(
        "limits", 0.0, detail={"sysctls": {"fs.file-max": 4_000_000}, "mem_total_bytes": MEM_24G}
    )
    ctx = plan_ctx(p)
    ctx = PlanContext(**{**ctx.__dict__, "reading": limits, "readings": {"limits": limits}})
    plan = RaiseSysctl().plan(ctx)
    assert isinstance(plan, Plan)
    assert plan.expect["new"] == 2 * (24683584 // 10)  # 8M wanted, held at the ceiling
    assert plan.summary.endswith(f"ceiling {2 * (24683584 // 10)} (from RAM))")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("fs.file-max", 9223372036854775807),  # systemd as PID 1 writes LONG_MAX
        ("fs.file-max", 9223372036854775000),
        ("fs.pipe-user-pages-soft", 0),  # pipe(7): 0 means no limit
        ("fs.aio-max-nr", -1),
    ],
)
def test_no_limit_values_are_never_raised(key: str, value: int) -> None:
    p = RaiseSysctlParams.model_validate({"key": key})
    limits = Reading("limits", 0.0, detail={"sysctls": {key: value}, "mem_total_bytes": MEM_24G})
    ctx = PlanContext(**{**plan_ctx(p).__dict__, "reading": limits, "readings": {"limits": limits}})
    assert RaiseSysctl().plan(ctx) == f"{key} is {value}, which means no limit: not raising"


def test_recheck_computes_the_ceiling_from_live_meminfo(tmp_path: Path) -> None:
    host = make_host(
        tmp_path,
        {"proc/sys/fs/file-max": "9223372036854775807\n", "proc/meminfo": "MemTotal: 24683584 kB\n"},
    )
    p = RaiseSysctlParams.model_validate({"key": "fs.file-max"})
    result = RaiseSysctl().execute(planned(p, None), apply_ctx(host))
    assert (result.outcome, result.message) == (
        Outcome.SKIPPED,
        "fs.file-max is 9223372036854775807, which means no limit: not raising",
    )


def test_computed_ceiling_bounds_the_write(tmp_path: Path) -> None:
    host = make_host(
        tmp_path, {"proc/sys/fs/file-max": "4000000\n", "proc/meminfo": "MemTotal: 24683584 kB\n"}
    )
    p = RaiseSysctlParams.model_validate({"key": "fs.file-max"})
    result = RaiseSysctl().execute(planned(p, None), apply_ctx(host))
    assert result.outcome is Outcome.APPLIED and result.verified
    assert int((tmp_path / "proc/sys/fs/file-max").read_text()) == 2 * (24683584 // 10)


# --- persistence -------------------------------------------------------------------------------

OWN = "etc/sysctl.d/90-remediator.conf"


def test_raise_is_persisted_and_read_back(tmp_path: Path) -> None:
    host = make_host(tmp_path, {FILE: "8192\n"})
    result = RaiseSysctl().execute(planned(params(), 8192), apply_ctx(host))
    assert result.verified is True
    assert result.after["persisted_value"] == 16384
    text = (tmp_path / OWN).read_text()
    assert f"\n{KEY} = 16384\n" in text
    assert "raised from 8192 to 16384 at 2023-11-14T22:13:20Z" in text
    assert parse_sysctl_conf(text) == (SysctlLine(5, KEY, "16384"),)
    assert oct((tmp_path / OWN).stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in (tmp_path / "etc/sysctl.d").iterdir()] == ["90-remediator.conf"]  # no temp left


def test_a_second_key_keeps_the_first(tmp_path: Path) -> None:
    other = "proc/sys/fs/inotify/max_user_instances"
    host = make_host(tmp_path, {FILE: "8192\n", other: "128\n"})
    RaiseSysctl().execute(planned(params(), 8192), apply_ctx(host))
    p2 = RaiseSysctlParams.model_validate({"key": "fs.inotify.max_user_instances", "ceiling": 1024})
    result = RaiseSysctl().execute(planned(p2, None), apply_ctx(host))
    assert result.verified is True
    assert read_own_file(host) == {
        KEY: (16384, f"{KEY}: raised from 8192 to 16384 at 2023-11-14T22:13:20Z"),
        "fs.inotify.max_user_instances": (
            256,
            "fs.inotify.max_user_instances: raised from 128 to 256 at 2023-11-14T22:13:20Z",
        ),
    }


def test_persist_false_writes_no_file(tmp_path: Path) -> None:
    host = make_host(tmp_path, {FILE: "8192\n"})
    result = RaiseSysctl().execute(planned(params(persist=False), 8192), apply_ctx(host))
    assert result.verified is True and "persisted" not in result.after
    assert not (tmp_path / "etc/sysctl.d").exists()


def test_a_symlink_in_place_of_the_file_is_refused_not_followed(tmp_path: Path) -> None:
    host = make_host(tmp_path, {FILE: "8192\n", "elsewhere/victim": "precious\n"})
    (tmp_path / "etc/sysctl.d").mkdir(parents=True)
    (tmp_path / OWN).symlink_to(tmp_path / "elsewhere/victim")
    result = RaiseSysctl().execute(planned(params(), 8192), apply_ctx(host))
    # The live raise stands (the host is no worse); the result says it is not persisted.
    assert result.outcome is Outcome.APPLIED and result.verified is False
    assert "not persisted" in result.message
    assert (tmp_path / FILE).read_text() == "16384\n"
    assert (tmp_path / "elsewhere/victim").read_text() == "precious\n"
    assert (tmp_path / OWN).is_symlink()


def test_dry_run_writes_no_file(tmp_path: Path) -> None:
    host = make_host(tmp_path, {FILE: "8192\n"})
    RaiseSysctl().execute(planned(params(), 8192), apply_ctx(host, dry_run=True))
    assert not (tmp_path / "etc/sysctl.d").exists()


# --- other owners ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "owner"),
    [
        ({"usr/lib/sysctl.d/50-x.conf": f"# c\n{KEY} = 65536\n"}, "/usr/lib/sysctl.d/50-x.conf:2 (= 65536)"),
        ({"etc/sysctl.conf": f"; c\n\n-{KEY}=1\n"}, "/etc/sysctl.conf:3 (= 1)"),
        ({"run/sysctl.d/10-y.conf": "fs/inotify/max_user_watches = 9\n"}, "/run/sysctl.d/10-y.conf:1 (= 9)"),
        ({"etc/sysctl.d/20-glob.conf": "fs.inotify.max_user_* = 5\n"}, "/etc/sysctl.d/20-glob.conf:1 (= 5)"),
        (
            {
                "etc/tuned/active_profile": "mine\n",
                "etc/tuned/mine/tuned.conf": "[main]\ninclude=base\n[cpu]\ngovernor=x\n",
                "usr/lib/tuned/base/tuned.conf": f"[sysctl]\n{KEY}=524288\n",
            },
            "tuned profile base (/usr/lib/tuned/base/tuned.conf) (= 524288)",
        ),
    ],
)
def test_another_owner_is_reported_and_nothing_is_written(
    tmp_path: Path, files: dict[str, str], owner: str
) -> None:
    host = make_host(tmp_path, {FILE: "8192\n", **files})
    result = RaiseSysctl().execute(planned(params(), 8192), apply_ctx(host))
    assert result.outcome is Outcome.SKIPPED
    assert result.message == (
        f"{KEY} is owned by {owner}: remediator does not fight another owner of a key; raise it there"
    )
    assert (tmp_path / FILE).read_text() == "8192\n"
    assert not (tmp_path / OWN).exists()


def test_debian_sysctl_conf_link_is_one_owner(tmp_path: Path) -> None:
    host = make_host(tmp_path, {FILE: "8192\n", "etc/sysctl.conf": f"{KEY}=1\n"})
    (tmp_path / "etc/sysctl.d").mkdir()
    (tmp_path / "etc/sysctl.d/99-sysctl.conf").symlink_to("../sysctl.conf")
    owners = find_owners(host, KEY)
    assert [str(o) for o in owners] == ["/etc/sysctl.d/99-sysctl.conf:1 (= 1)"]


def test_masked_and_unrelated_files_are_not_owners(tmp_path: Path) -> None:
    host = make_host(
        tmp_path,
        {
            FILE: "8192\n",
            "usr/lib/sysctl.d/50-x.conf": f"{KEY} = 65536\n",
            "etc/sysctl.d/60-other.conf": "fs.file-max = 5\n# fs.inotify.max_user_watches = 1\n",
            "usr/lib/sysctl.d/README": f"{KEY} = 1\n",  # not a .conf: not read by the boot
            OWN: f"{KEY} = 4096\n",  # our own file is not "another owner"
        },
    )
    (tmp_path / "etc/sysctl.d/50-x.conf").symlink_to("/dev/null")  # masks usr/lib's 50-x.conf
    assert find_owners(host, KEY) == []
    result = RaiseSysctl().execute(planned(params(), 8192), apply_ctx(host))
    assert result.outcome is Outcome.APPLIED and result.verified is True


def test_parse_sysctl_conf_and_tuned() -> None:
    text = (
        "# c\n; c\nkernel.pid_max = 4194304\n-net.ipv4.conf.all.rp_filter=1\n"
        "net/ipv4/conf/eth0.1/x = 2\nbad\n"
    )
    assert parse_sysctl_conf(text) == (
        SysctlLine(3, "kernel.pid_max", "4194304"),
        SysctlLine(4, "net.ipv4.conf.all.rp_filter", "1"),
        SysctlLine(5, "net.ipv4.conf.eth0/1.x", "2"),
    )
    assert parse_tuned_sysctls("[main]\ninclude = a, b\n[sysctl]\nFs.X=1\n") == ({"Fs.X": "1"}, ("a", "b"))
    with pytest.raises(ValueError, match=r"tuned\.conf"):
        parse_tuned_sysctls("no section\n")
