"""deploy/kubernetes: consistent with the code it runs (the real API server validates it in
tests/real/test_kube_daemonset_real.py; this checks what the API server cannot know).

* the policy ConfigMap is in step with policies/ (scripts/render-policies-configmap.py --check),
  and reads back as the files;
* every environment variable the DaemonSet sets is one remediator reads, and the paths it points
  at are mounted;
* the agent's capabilities are the systemd unit's bounding set (one security story), it is not
  privileged, and RBAC grants no wildcard and none of the opt-in verbs.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from remediator.cli import main
from remediator.probes.kube_inventory import default_node_name

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"
RENDER = REPO / "scripts" / "render-policies-configmap.py"


def docs() -> list[dict[str, Any]]:
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    out: list[dict[str, Any]] = []
    for name in kust["resources"]:
        out += [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    return out


def one(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs() if d["kind"] == kind]
    return doc


def agent() -> dict[str, Any]:
    (container,) = one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_the_policy_configmap_is_in_step_with_policies() -> None:
    res = subprocess.run(
        [sys.executable, str(RENDER), "--check", str(DEPLOY / "policies-configmap.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    data = one("ConfigMap")["data"]
    files = {p.name: p.read_text() for p in sorted((REPO / "policies").glob("*.yaml"))}
    assert data == files


def test_the_renderer_keeps_awkward_text_exact(tmp_path: Path) -> None:
    texts = {
        "a.yaml": "x: 1\n\n\n",  # trailing blank lines
        "b.yaml": "x: 1",  # no final newline
        "c.yaml": "x: 'tab\there'  \n# trailing spaces above\n",
        "d.yaml": " leading: space\n",
    }
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    out = subprocess.run(
        [sys.executable, str(RENDER), str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    assert yaml.safe_load(out)["data"] == texts


def test_every_env_var_is_one_remediator_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    read_by_cli = {
        p.envvar for cmd in main.commands.values() for p in cmd.params if isinstance(p.envvar, str)
    }
    cli_source = (REPO / "remediator" / "cli.py").read_text()
    read_by_cli |= set(re.findall(r'"(REMEDIATOR_[A-Z_]+)"', cli_source))
    # Read by remediator's node-name default and by ctr/python, not by click.
    others = {"NODE_NAME", "POD_IP", "GOMAXPROCS", "PYTHONFAULTHANDLER"}
    env = {e["name"] for e in agent()["env"]}
    assert env - others <= read_by_cli, env - others - read_by_cli
    monkeypatch.setenv("NODE_NAME", "node-from-the-downward-api")
    assert default_node_name() == "node-from-the-downward-api"


def test_the_paths_the_env_names_are_mounted() -> None:
    container = agent()
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    for path in (
        env["REMEDIATOR_HOST_ROOT"] + "/proc",
        env["REMEDIATOR_HOST_ROOT"] + "/sys",
        env["REMEDIATOR_CRI_CONTAINERD_SOCKET"],
        env["REMEDIATOR_DOCKER_URL"].removeprefix("unix://"),
        "/var/lib/remediator",  # the default state dir
        "/etc/remediator/policies",  # the default policy dir
    ):
        assert any(path == m or path.startswith(m + "/") for m in mounts), path
    assert env["REMEDIATOR_METRICS_ADDRESS"].endswith(":9464")
    assert container["ports"][0]["containerPort"] == 9464
    annotations = one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9464"


def test_capabilities_are_the_systemd_units_and_not_privileged() -> None:
    unit = (REPO / "systemd" / "remediator.service").read_text()
    (line,) = [x for x in unit.splitlines() if x.startswith("CapabilityBoundingSet=")]
    unit_caps = {c.removeprefix("CAP_") for c in line.split("=", 1)[1].split()}
    sc = agent()["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": sorted(unit_caps, reverse=True)}
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True


def test_rbac_has_no_wildcard_and_no_opt_in_verb() -> None:
    rules = one("ClusterRole")["rules"]
    granted = {(r, v) for rule in rules for r in rule["resources"] for v in rule["verbs"]}
    assert not any("*" in r or "*" in v for r, v in granted)
    assert ("pods", "delete") not in granted and ("nodes", "patch") not in granted
    assert ("pods/eviction", "create") in granted and ("pods", "list") in granted
    binding = one("ClusterRoleBinding")
    (subject,) = binding["subjects"]
    sa = one("ServiceAccount")["metadata"]
    assert (subject["name"], subject["namespace"]) == (sa["name"], sa["namespace"])
    assert one("DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == sa["name"]
