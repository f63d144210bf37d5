"""The Kubernetes client's pure parts and its retry policy, with a fake connection pool."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import urllib3

from remediator.errors import PermanentError, TemporaryError
from remediator.probes.kube_api import (
    KubeClient,
    KubeConfigError,
    KubeCredentials,
    in_cluster_credentials,
    is_static_pod,
    parse_kubeconfig,
    parse_pod_list,
)
from tests.helpers import copy_fixture_host, run_cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kube"
C1, C2, C3, C4 = ("1" * 64, "2" * 64, "3" * 64, "4" * 64)


def podlist() -> dict[str, Any]:
    return json.loads((FIXTURES / "podlist-node.json").read_text())  # type: ignore[no-any-return]


def test_pod_list_gives_owner_qos_and_every_container_id() -> None:
    pods = parse_pod_list(podlist())
    assert set(pods) == {
        "3f1e2d4c-5b6a-4789-8abc-def012345678",
        "0a0b0c0d-1e1f-4a4b-8c8d-9e9f0a0b0c0d",
        "9a8b7c6d-5e4f-4321-8fed-cba987654321",
    }  # the item without a uid is not a pod
    trasher = pods["3f1e2d4c-5b6a-4789-8abc-def012345678"]
    assert trasher.ref.name == "trasher-6d8f7c9b4-x2x7q"
    assert trasher.ref.namespace == "shop"
    assert (trasher.ref.owner_kind, trasher.ref.owner_name) == ("ReplicaSet", "trasher-6d8f7c9b4")
    assert trasher.ref.qos_class == "BestEffort"
    assert trasher.ref.node == "node-1"
    assert trasher.ref.source == "api"
    image = "docker.io/rmd-test/busybox:1"
    # the running one, the last terminated one (its cgroup may linger), the sidecar, the init
    assert dict(trasher.containers) == {
        C1: ("main", image),
        C2: ("main", image),
        C3: ("sidecar", image),
        C4: ("init", image),
    }
    # the controller owner wins over the first owner
    proxy = pods["0a0b0c0d-1e1f-4a4b-8c8d-9e9f0a0b0c0d"]
    assert (proxy.ref.owner_kind, proxy.ref.owner_name) == ("DaemonSet", "kube-proxy")
    assert proxy.containers == {}
    static = pods["9a8b7c6d-5e4f-4321-8fed-cba987654321"]
    assert (static.ref.owner_kind, static.ref.owner_name) == (None, None)
    assert is_static_pod(podlist()["items"][2])
    assert not is_static_pod(podlist()["items"][0])


def test_a_list_of_something_else_is_refused() -> None:
    with pytest.raises(PermanentError, match="expected a PodList"):
        parse_pod_list({"kind": "NodeList", "items": []})


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_kubeconfig_current_context_with_files_relative_to_it(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("CA PEM")
    (tmp_path / "token").write_text("s3cret\n")
    cfg = tmp_path / "kubeconfig"
    text = f"""
apiVersion: v1
kind: Config
current-context: b
clusters:
- name: one
  cluster: {{server: "https://10.0.0.1:6443", certificate-authority-data: {_b64("OTHER")}}}
- name: two
  cluster: {{server: "https://127.0.0.1:6443/", certificate-authority: ca.crt}}
users:
- name: u
  user: {{tokenFile: token}}
contexts:
- name: a
  context: {{cluster: one, user: u}}
- name: b
  context: {{cluster: two, user: u}}
"""
    creds = parse_kubeconfig(text, cfg)
    assert creds.server == "https://127.0.0.1:6443"
    assert creds.ca_pem == "CA PEM"
    assert creds.token == "s3cret"
    assert creds.source == "kubeconfig"
    assert "s3cret" not in repr(creds)
    other = parse_kubeconfig(text, cfg, context="a")
    assert other.ca_pem == "OTHER"


def test_kubeconfig_client_certificate_data() -> None:
    text = json.dumps(
        {
            "current-context": "c",
            "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
            "clusters": [
                {"name": "k", "cluster": {"server": "https://k:6443", "insecure-skip-tls-verify": True}}
            ],
            "users": [
                {
                    "name": "u",
                    "user": {"client-certificate-data": _b64("CERT"), "client-key-data": _b64("KEY")},
                }
            ],
        }
    )
    creds = parse_kubeconfig(text, Path("/x/config"))
    assert (creds.client_cert_pem, creds.client_key_pem, creds.insecure, creds.token) == (
        "CERT",
        "KEY",
        True,
        None,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a list", "expected a mapping"),
        ("kind: Config\n", "current-context: expected a context name"),
        ("current-context: x\ncontexts: []\n", "no context named 'x'"),
        (
            "current-context: c\ncontexts: [{name: c, context: {cluster: k}}]\n"
            "clusters: [{name: k, cluster: {server: 'ftp://k'}}]\n",
            "cluster.server: expected an https:// URL",
        ),
        (
            "current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
            "clusters: [{name: k, cluster: {server: 'https://k'}}]\n"
            "users: [{name: u, user: {client-certificate-data: Q0VSVA==}}]\n",
            "expected both client-certificate and client-key",
        ),
        (
            "current-context: c\ncontexts: [{name: c, context: {cluster: k}}]\n"
            "clusters: [{name: k, cluster: {server: 'https://k', certificate-authority: missing.crt}}]\n",
            "certificate-authority: cannot read",
        ),
        ("a: [unclosed", "not YAML"),
    ],
)
def test_bad_kubeconfig_is_one_line_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(KubeConfigError) as e:
        parse_kubeconfig(text, tmp_path / "kubeconfig")
    assert message in str(e.value)
    assert str(e.value).startswith(str(tmp_path / "kubeconfig") + ": ") or "kubeconfig" in str(e.value)
    assert "\n" not in str(e.value)


def test_in_cluster_credentials(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("CA")
    (tmp_path / "token").write_text("tok\n")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    creds = in_cluster_credentials(env, tmp_path)
    assert (creds.server, creds.ca_pem, creds.token, creds.source) == (
        "https://10.96.0.1:443",
        "CA",
        "tok",
        "in-cluster",
    )
    v6 = in_cluster_credentials({"KUBERNETES_SERVICE_HOST": "fd00::1"}, tmp_path)
    assert v6.server == "https://[fd00::1]:443"
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST"):
        in_cluster_credentials({}, tmp_path)


class FakeResponse:
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.data = body if isinstance(body, bytes) else json.dumps(body).encode()


class FakePool:
    """Answers from a script: each item is a response or an exception to raise."""

    def __init__(self, *answers: FakeResponse | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, str, dict[str, str]]] = []

    def request(self, method: str, url: str, **kw: Any) -> FakeResponse:
        self.calls.append((method, url, kw["headers"]))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def clear(self) -> None:
        pass


CREDS = KubeCredentials(server="https://127.0.0.1:6443", token="tok")


def client(pool: FakePool) -> KubeClient:
    return KubeClient(CREDS, pool=pool, sleep=lambda s: None)


def test_node_pods_is_one_list_with_a_field_selector() -> None:
    pool = FakePool(FakeResponse(200, podlist()))
    pods = client(pool).node_pods("node-1")
    assert len(pods) == 3
    ((method, url, headers),) = pool.calls
    assert method == "GET"
    assert url == "https://127.0.0.1:6443/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1"
    assert headers["Authorization"] == "Bearer tok"


def test_transient_failures_are_retried_then_temporary() -> None:
    refused = urllib3.exceptions.NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]
    pool = FakePool(refused, FakeResponse(503, {"message": "etcd is down"}), FakeResponse(200, podlist()))
    c = client(pool)
    assert len(c.node_pods("node-1")) == 3
    assert c.reads == 3
    pool = FakePool(
        FakeResponse(429, b"slow down"), FakeResponse(500, {}), FakeResponse(503, {"message": "etcd is down"})
    )
    with pytest.raises(TemporaryError, match="HTTP 503: etcd is down"):
        client(pool).node_pods("node-1")
    assert not pool.answers  # 3 attempts, no more


@pytest.mark.parametrize("status", [401, 403, 404])
def test_refusals_are_permanent_and_not_retried(status: int) -> None:
    pool = FakePool(FakeResponse(status, {"kind": "Status", "message": "pods is forbidden"}))
    with pytest.raises(PermanentError, match=f"HTTP {status}: pods is forbidden"):
        client(pool).node_pods("node-1")
    assert len(pool.calls) == 1


def test_an_answer_that_is_not_json_is_permanent() -> None:
    with pytest.raises(PermanentError, match="not JSON"):
        client(FakePool(FakeResponse(200, b"<html>"))).node_pods("n")


def test_cli_refuses_an_unusable_kubeconfig_with_one_line_and_exit_2(tmp_path: Path) -> None:
    host = copy_fixture_host(tmp_path / "host")
    bad = tmp_path / "kubeconfig"
    bad.write_text("apiVersion: v1\nkind: Config\n")
    code, out, err = run_cli(
        ["audit", "--host-root", str(host), "--state-dir", str(tmp_path / "state"), "--kubeconfig", str(bad)]
    )
    assert (code, out) == (2, "")
    assert err.strip() == f"remediator: {bad}: current-context: expected a context name"
