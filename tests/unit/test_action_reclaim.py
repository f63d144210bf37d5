"""reclaim-cgroup: target selection, params, and recheck/apply/verify on cgroup v1 and v2 trees."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import remediator.actions.reclaim as reclaim_module
from remediator.actions.base import ApplyContext, PlanContext, choose_container
from remediator.actions.reclaim import (
    ReclaimCgroup,
    ReclaimCgroupParams,
)
from remediator.clock import FakeClock
from remediator.host import HostRoot
from remediator.model import ContainerRef, ContainerSample, Outcome, Plan, Reading, TargetKind
from tests.helpers import make_host

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
LAYOUTS = FIXTURES / "proc" / "cgroup-layouts"
CID = "5fed7652134bd8636559d9cfa0ce537d1d35ece4c49c5a944a3ee94faac7ec36"
OTHER = "7ebf05fcdc9c" + "0" * 52
V1_CG = f"/docker/{CID}"
V2_CG = f"/system.slice/docker-{CID}.scope"
V1_DIR = f"sys/fs/cgroup/memory/docker/{CID}"
V2_DIR = f"sys/fs/cgroup/system.slice/docker-{CID}.scope"
METRIC = "slab_reclaimable_bytes"
PROTECT = "remediator.protect"


def ref(
    cid: str = CID,
    name: str = "trasher",
    cgroup: str | None = V1_CG,
    pid: int | None = 8082,
    labels: dict[str, str] | None = None,
) -> ContainerRef:
    return ContainerRef(id=cid, name=name, labels=labels or {}, pid=pid, cgroup=cgroup)


def not_protected(c: ContainerRef) -> bool:
    return c.labels.get(PROTECT) != "true"


def plan_ctx(
    samples: list[tuple[ContainerRef, float | None]],
    target: str = "top",
    subject: str = "host",
    cgroup_version: int | None = 1,
    amount: str = "1Gi",
) -> PlanContext:
    detail: dict[str, Any] = {"cgroup_version": cgroup_version} if cgroup_version else {}
    reading = Reading(
        "dentries",
        1000.0,
        containers=tuple(ContainerSample(c, {METRIC: v} if v is not None else {}) for c, v in samples),
        detail=detail,
    )
    return PlanContext(
        policy="negative-dentries",
        metric=METRIC,
        subject=subject,
        reading=reading,
        params=ReclaimCgroupParams.model_validate({"target": target, "amount": amount}),
        eligible=not_protected,
        now=1000.0,
        readings={"dentries": reading},
    )


def planned(container: ContainerRef, cgroup_version: int | None = 1) -> Plan:
    plan = ReclaimCgroup().plan(plan_ctx([(container, 400e6)], cgroup_version=cgroup_version))
    assert isinstance(plan, Plan)
    return plan


def v1_host(tmp_path: Path, proc_cgroup: str = "docker-cgroupfs-v1-hybrid") -> HostRoot:
    return make_host(
        tmp_path,
        {
            "sys/fs/cgroup/memory/memory.stat": "cache 0\n",
            f"{V1_DIR}/memory.force_empty": "",
            f"{V1_DIR}/memory.usage_in_bytes": "410000000\n",
            f"{V1_DIR}/memory.kmem.usage_in_bytes": "400297984\n",
            f"{V1_DIR}/memory.stat": "cache 241664\nrss 53248\n",
            "proc/8082/cgroup": (LAYOUTS / proc_cgroup).read_text(),
            "proc/sys/fs/dentry-state": "2050186\t2048392\t45\t0\t2007232\t0\n",
        },
    )


def v2_host(tmp_path: Path) -> HostRoot:
    v2 = FIXTURES / "sys" / "synthetic-cgroup-v2" / "fs" / "cgroup"
    return make_host(
        tmp_path,
        {
            "sys/fs/cgroup/cgroup.controllers": (v2 / "cgroup.controllers").read_text(),
            f"{V2_DIR}/memory.reclaim": "",
            f"{V2_DIR}/memory.current": "8192000\n",
            f"{V2_DIR}/memory.stat": (v2 / V2_CG.lstrip("/") / "memory.stat").read_text(),
            "proc/8082/cgroup": (LAYOUTS / "docker-systemd-v2").read_text(),
            "proc/sys/fs/dentry-state": "5090\t3242\t45\t0\t818\t0\n",
        },
    )


def ctx(host: HostRoot, dry_run: bool = False) -> ApplyContext:
    return ApplyContext(host=host, clock=FakeClock(), dry_run=dry_run)


# --- target selection -----------------------------------------------------------------------


def test_top_picks_the_largest_eligible() -> None:
    a, b = ref(cid="a" * 64, name="a"), ref(cid="b" * 64, name="b")
    guarded = ref(cid="c" * 64, name="guarded", labels={PROTECT: "true"})
    chosen = choose_container(plan_ctx([(a, 10.0), (guarded, 1e9), (b, 20.0)]), "top")
    assert chosen == b


def test_top_breaks_ties_by_id_and_skips_missing_or_zero_values() -> None:
    a, b = ref(cid="a" * 64, name="a"), ref(cid="b" * 64, name="b")
    none, zero = ref(cid="d" * 64, name="none"), ref(cid="e" * 64, name="zero")
    chosen = choose_container(plan_ctx([(b, 5.0), (a, 5.0), (none, None), (zero, 0.0)]), "top")
    assert chosen == b


def test_top_with_nothing_eligible() -> None:
    guarded = ref(labels={PROTECT: "true"})
    assert choose_container(plan_ctx([(guarded, 1e9)]), "top") == (f"no eligible container has {METRIC} > 0")


def test_subject_needs_a_container_scoped_policy() -> None:
    result = choose_container(plan_ctx([(ref(), 1.0)], target="subject"), "subject")
    assert isinstance(result, str)
    assert "container-scoped" in result


def test_subject_is_the_condition_container() -> None:
    other = ref(cid=OTHER, name="bigger")
    c = plan_ctx([(ref(), 1.0), (other, 1e9)], target="subject", subject=CID)
    assert choose_container(c, "subject") == ref()


def test_subject_protected_is_refused() -> None:
    guarded = ref(labels={PROTECT: "true"})
    c = plan_ctx([(guarded, 1.0)], target="subject", subject=CID)
    assert choose_container(c, "subject") == (
        "subject container trasher is not eligible (protected or not selected)"
    )


def test_subject_missing_from_reading() -> None:
    c = plan_ctx([(ref(cid=OTHER), 1.0)], target="subject", subject=CID)
    assert choose_container(c, "subject") == f"subject container {CID[:12]} is not in this reading"


# --- params and plan ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"amount": "lots"}, "expected a size such as 256Mi"),
        ({"amount": "1"}, "at least one page"),
        ({"target": "biggest"}, "Input should be 'subject' or 'top'"),
        ({"amount": 1024}, "Input should be a valid string"),
    ],
)
def test_params_reject(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        ReclaimCgroupParams.model_validate(raw)
    assert message in str(err.value)


def test_params_defaults() -> None:
    p = ReclaimCgroupParams()
    assert (p.target, p.amount_bytes) == ("top", 2**30)


@pytest.mark.parametrize(
    ("version", "interface"),
    [
        (1, "memory.force_empty (cgroup v1: reclaims all it can; amount does not apply)"),
        (2, "memory.reclaim 268435456 bytes (cgroup v2)"),
        (None, "memory.reclaim 268435456 bytes on cgroup v2, memory.force_empty on cgroup v1"),
    ],
)
def test_plan_names_the_interface(version: int | None, interface: str) -> None:
    plan = ReclaimCgroup().plan(plan_ctx([(ref(), 1.0)], cgroup_version=version, amount="256Mi"))
    assert isinstance(plan, Plan)
    assert plan.summary.startswith(f"reclaim cgroup {V1_CG} of container trasher via {interface}")
    assert (plan.target.kind, plan.target.id, plan.target.name) == (TargetKind.CGROUP, CID, "trasher")
    assert dict(plan.target.detail) == {"cgroup": V1_CG, "pid": 8082}


@pytest.mark.parametrize(
    ("container", "reason"),
    [
        (ref(cgroup="/"), "container trasher is in the root cgroup: refusing"),
        (ref(pid=None), "container trasher has no cgroup or init pid (not running?)"),
        (ref(cgroup=None), "container trasher has no cgroup or init pid (not running?)"),
    ],
)
def test_plan_refuses(container: ContainerRef, reason: str) -> None:
    assert ReclaimCgroup().plan(plan_ctx([(container, 1.0)])) == reason


# --- recheck / apply / verify ---------------------------------------------------------------


def test_v1_force_empty(tmp_path: Path) -> None:
    host = v1_host(tmp_path)
    action, plan, c = ReclaimCgroup(), planned(ref()), ctx(host)
    assert action.recheck(plan, c) is None
    applied = action.apply(plan, c)
    assert applied.outcome is Outcome.APPLIED
    assert (tmp_path / V1_DIR / "memory.force_empty").read_text() == "0"
    assert dict(applied.before) == {
        "interface": "memory.force_empty",
        "usage_bytes": 410000000,
        "kmem_bytes": 400297984,
        "host_nr_negative": 2007232,
    }
    # What the kernel did (measured on 6.18): the fixture files are told.
    (tmp_path / V1_DIR / "memory.usage_in_bytes").write_text("10842112\n")
    (tmp_path / V1_DIR / "memory.kmem.usage_in_bytes").write_text("10555392\n")
    verified = action.verify(plan, applied, c)
    assert verified.verified is True
    assert verified.after["kmem_bytes"] == 10555392
    assert verified.after["partial"] is False
    assert verified.message == f"wrote memory.force_empty on {V1_CG}; freed 399157888 bytes"


def test_verify_unchanged_usage_is_not_verified(tmp_path: Path) -> None:
    result = ReclaimCgroup().execute(planned(ref()), ctx(v1_host(tmp_path)))
    assert result.outcome is Outcome.APPLIED
    assert result.verified is False


def test_v2_memory_reclaim(tmp_path: Path) -> None:
    host = v2_host(tmp_path)
    action, plan, c = ReclaimCgroup(), planned(ref(cgroup=V2_CG), cgroup_version=2), ctx(host)
    applied = action.apply(plan, c)
    assert (tmp_path / V2_DIR / "memory.reclaim").read_text() == str(2**30)
    assert applied.before["slab_bytes"] == 2779328
    assert applied.before["usage_bytes"] == 8192000
    (tmp_path / V2_DIR / "memory.current").write_text("4096000\n")
    assert action.verify(plan, applied, c).verified is True


def test_v2_eagain_is_partial_not_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = v2_host(tmp_path)
    real_open = open

    def eagain_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith("memory.reclaim"):
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(reclaim_module, "open", eagain_open, raising=False)
    result = ReclaimCgroup().execute(planned(ref(cgroup=V2_CG), cgroup_version=2), ctx(host))
    assert result.outcome is Outcome.APPLIED
    assert result.after["partial"] is True
    assert "reclaimed less than asked: EAGAIN" in result.message


def test_v1_write_errors_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = v1_host(tmp_path)

    def ebusy_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(reclaim_module, "open", ebusy_open, raising=False)
    result = ReclaimCgroup().execute(planned(ref()), ctx(host))
    assert result.outcome is Outcome.FAILED


def test_systemd_inside_the_container_is_still_the_container(tmp_path: Path) -> None:
    """The init pid sits in /docker/<id>/init.scope: below the planned cgroup, still ours."""
    host = v1_host(tmp_path)
    (tmp_path / "proc/8082/cgroup").write_text(f"4:memory:{V1_CG}/init.scope\n0::{V1_CG}/init.scope\n")
    assert ReclaimCgroup().recheck(planned(ref()), ctx(host)) is None


@pytest.mark.parametrize(
    ("proc_cgroup", "reason"),
    [
        (
            f"4:memory:/docker/{OTHER}\n",
            f"pid 8082 is in /docker/{OTHER}, which is not container {CID[:12]}",
        ),
        ("4:memory:/\n", f"pid 8082 is in /, which is not container {CID[:12]}"),
        (f"4:memory:/other/{CID}\n", f"pid 8082 is in /other/{CID}, not in the planned cgroup {V1_CG}"),
        ("0::/init.scope\n", f"pid 8082 is in /init.scope, which is not container {CID[:12]}"),
    ],
)
def test_recheck_pid_moved(tmp_path: Path, proc_cgroup: str, reason: str) -> None:
    host = v1_host(tmp_path)
    (tmp_path / "proc/8082/cgroup").write_text(proc_cgroup)
    result = ReclaimCgroup().execute(planned(ref()), ctx(host))
    assert (result.outcome, result.message) == (Outcome.SKIPPED, reason)
    assert (tmp_path / V1_DIR / "memory.force_empty").read_text() == ""


def test_recheck_pid_gone(tmp_path: Path) -> None:
    host = v1_host(tmp_path)
    (tmp_path / "proc/8082/cgroup").unlink()
    result = ReclaimCgroup().execute(planned(ref()), ctx(host))
    assert (result.outcome, result.message) == (
        Outcome.SKIPPED,
        f"container {CID[:12]} init pid 8082 is gone",
    )


def test_recheck_refuses_a_cgroup_not_naming_the_container(tmp_path: Path) -> None:
    """An inventory bug (wrong cgroup for the id) must not aim reclaim at someone else."""
    host = v1_host(tmp_path)
    result = ReclaimCgroup().execute(planned(ref(cgroup=f"/docker/{OTHER}")), ctx(host))
    assert (result.outcome, result.message) == (
        Outcome.SKIPPED,
        f"planned cgroup /docker/{OTHER} does not name container {CID[:12]}",
    )


def test_recheck_refuses_a_path_escaping_the_hierarchy(tmp_path: Path) -> None:
    host = v1_host(tmp_path)
    escaped = f"/docker/{CID}/../../.."
    (tmp_path / "proc/8082/cgroup").write_text(f"4:memory:{escaped}\n")
    result = ReclaimCgroup().execute(planned(ref(cgroup=escaped)), ctx(host))
    assert result.outcome is Outcome.SKIPPED
    assert "outside the memory hierarchy" in result.message


def test_recheck_without_a_memory_controller(tmp_path: Path) -> None:
    host = make_host(tmp_path, {"proc/8082/cgroup": f"0::{V1_CG}\n"})
    result = ReclaimCgroup().execute(planned(ref()), ctx(host))
    assert (result.outcome, result.message) == (Outcome.SKIPPED, "no memory cgroup controller on this host")


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    host = v1_host(tmp_path)
    result = ReclaimCgroup().execute(planned(ref()), ctx(host, dry_run=True))
    assert result.outcome is Outcome.WOULD_APPLY
    assert result.message.startswith(f"would reclaim cgroup {V1_CG} of container trasher")
    assert (tmp_path / V1_DIR / "memory.force_empty").read_text() == ""
