"""Reproduces shared-kernel-limits-ja.txt: one container's inotify instances count against a
host-wide per-uid limit shared with every other container and the host. `remediator once`
(the real CLI, real kernel, real dockerd) raises the limit within its ceiling, plans the
disruptive step in audit mode only, and leaves a bystander container untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from remediator.host import HostRoot
from tests.helpers import remediator_json
from tests.real.conftest import OTHER_UID, MakeContainer, run_holder

pytestmark = pytest.mark.real

HOST = HostRoot()
KEY = "fs.inotify.max_user_instances"

POLICY = """\
apiVersion: remediator.io/v1
kind: Policy
metadata:
  name: inotify-instances
spec:
  mode: enforce
  interval: 30s
  watch:
    probe: limits
    metric: inotify_instances_max_uid
    above: 10
    clearBelow: 5
  actions:
    - action: raise-sysctl
      settle: 1m
      params: {key: fs.inotify.max_user_instances, factor: 2.0, ceiling: %(ceiling)d}
    - action: recreate-container
      mode: audit
      settle: 5m
      params: {target: top}
"""


def remediator(*args: str, tmp_path: Path) -> dict[str, Any]:
    # raise-sysctl persists into the config root's etc/sysctl.d: a temporary tree, not /etc.
    (tmp_path / "config" / "etc").mkdir(parents=True, exist_ok=True)
    return remediator_json(
        *args,
        "--config-root",
        str(tmp_path / "config"),
        policies=tmp_path / "policies",
        state=tmp_path / "state",
    )


def test_inotify_hog_once_raises_the_limit_and_spares_the_bystander(
    make_container: MakeContainer,
    holder_dir: Path,
    sysctl_guard: Any,
    tmp_path: Path,
) -> None:
    original = int(sysctl_guard(KEY))  # restored after the test, even on failure
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(POLICY % {"ceiling": original * 4})

    bystander = make_container()
    hog = run_holder(make_container, holder_dir, ("20", "/tmp"), user=f"{OTHER_UID}:{OTHER_UID}")

    # Audit first: the same decision, planned and re-checked, and nothing changes.
    doc = remediator("audit", tmp_path=tmp_path)
    (pol,) = doc["policies"]
    assert pol["decisions"][0]["kind"] == "act" and pol["decisions"][0]["value"] == 20
    assert pol["actions"][0]["result"]["outcome"] == "would_apply"
    assert int(HOST.read_sysctl(KEY)) == original

    # One real cycle: the limit is raised, read back, and recorded.
    doc = remediator("once", tmp_path=tmp_path)
    (a,) = doc["policies"][0]["actions"]
    assert (a["action"], a["mode"], a["result"]["outcome"]) == ("raise-sysctl", "enforce", "applied")
    assert a["result"]["verified"] is True
    assert a["result"]["before"]["value"] == original and a["result"]["after"]["value"] == original * 2
    assert int(HOST.read_sysctl(KEY)) == original * 2
    persisted = (tmp_path / "config/etc/sysctl.d/90-remediator.conf").read_text()
    assert f"\n{KEY} = {original * 2}\n" in persisted

    # Within the settle time nothing more happens, and state persisted across processes.
    doc = remediator("once", tmp_path=tmp_path)
    assert doc["policies"][0]["actions"] == []
    status = remediator("status", tmp_path=tmp_path)
    (cond,) = status["conditions"]
    assert (cond["phase"], cond["step"]) == ("firing", 1)
    assert status["actions"][0]["verdict"] is None

    # The containers: the hog is still the same container (recreate is audit-only), and the
    # bystander was never touched.
    for c, before in ((bystander, bystander.id), (hog, hog.id)):
        c.reload()
        assert (c.id, c.status) == (before, "running")
