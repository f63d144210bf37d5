"""A small Kubernetes API client: credentials, bounded retried GETs, the pods of one node.

Why not the `kubernetes` PyPI client: it is well kept, but importing it costs ~40 MB of RSS and
a second of start-up (it imports every API group's models), against the daemon's 60 MB goal and
`--help`'s 2x-bare-python goal; and the inventory needs one list call. So: plain HTTPS with
urllib3, which is already installed (requests, under the Docker SDK, depends on it), and the
JSON answers parsed by pure functions here. Writes (evictions, node conditions, events, taints)
go through the same `KubeClient.request`.

Credentials, in this order (`load_credentials`):

1. a kubeconfig file named by settings (`--kubeconfig` / REMEDIATOR_KUBECONFIG): its current
   context's cluster (server, certificate-authority[-data], insecure-skip-tls-verify) and user
   (token, tokenFile, client-certificate[-data] + client-key[-data]);
2. in-cluster: KUBERNETES_SERVICE_HOST/PORT and the pod's service-account token and CA at
   /var/run/secrets/kubernetes.io/serviceaccount (the process's own filesystem, not the host
   root's: it is the pod remediator runs in that has them).

Transient failures (connection refused or reset, timeouts, HTTP 429 and 5xx) are retried with
tenacity, 3 attempts within about a second; what is left becomes `TemporaryError`. Other
refusals (401, 403, 404, a body that is not JSON) are `PermanentError`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import ssl
import tempfile
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import tenacity
import urllib3
import yaml

from remediator.errors import PermanentError, TemporaryError
from remediator.model import PodRef

log = structlog.get_logger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# 3 attempts, 0.2 s then 0.4 s apart: the API server answers a node's pod list in milliseconds,
# and a cycle must not wait long for attribution (node-local readings go on without it).
RETRY_ATTEMPTS = 3
RETRY_BACKOFF_SECONDS = 0.2
# Seconds per request (connect and read). A list of a node's pods (at most 110 by default) is
# small; 5 s rides out a busy API server without stalling a cycle for long.
REQUEST_TIMEOUT_SECONDS = 5.0


class KubeConfigError(ValueError):
    """A kubeconfig (or the in-cluster environment) that cannot be used; one line, says which."""


@dataclass(frozen=True)
class KubeCredentials:
    """Where the API server is and how to prove who we are. Pure data (the secrets included)."""

    server: str  # https://host:port
    ca_pem: str | None = None  # None: the system's trust store
    insecure: bool = False  # insecure-skip-tls-verify (test clusters only)
    token: str | None = None
    client_cert_pem: str | None = None
    client_key_pem: str | None = None
    source: str = "kubeconfig"  # "kubeconfig" or "in-cluster", for messages

    def __repr__(self) -> str:  # never print the secrets
        return f"KubeCredentials(server={self.server!r}, source={self.source!r})"


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise KubeConfigError(f"{what}: cannot read {path}: {e.strerror}") from None


def _data(value: Any, where: str) -> str:
    try:
        return base64.b64decode(str(value), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise KubeConfigError(f"{where}: expected base64 PEM data") from None


def _named(items: Any, name: str, kind: str, where: str) -> Mapping[str, Any]:
    for item in items or ():
        if isinstance(item, Mapping) and item.get("name") == name and isinstance(item.get(kind), Mapping):
            return item[kind]  # type: ignore[no-any-return]  # checked Mapping above
    raise KubeConfigError(f"{where}: no {kind} named {name!r}")


def parse_kubeconfig(text: str, path: Path, context: str | None = None) -> KubeCredentials:
    """A kubeconfig's current (or the named) context as credentials; relative file paths in it
    are relative to its directory, as kubectl reads them. Reads the files it names."""
    where = str(path)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise KubeConfigError(f"{where}: not YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, Mapping):
        raise KubeConfigError(f"{where}: expected a mapping (apiVersion: v1, kind: Config)")
    name = context or doc.get("current-context")
    if not name:
        raise KubeConfigError(f"{where}: current-context: expected a context name")
    ctx = _named(doc.get("contexts"), name, "context", where)
    cluster = _named(doc.get("clusters"), str(ctx.get("cluster")), "cluster", where)
    user: Mapping[str, Any] = {}
    if ctx.get("user"):
        user = _named(doc.get("users"), str(ctx.get("user")), "user", where)
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise KubeConfigError(f"{where}: cluster.server: expected an https:// URL, got {server!r}")
    base = path.parent

    def pem(data_key: str, file_key: str, section: Mapping[str, Any]) -> str | None:
        if section.get(data_key):
            return _data(section[data_key], f"{where}: {data_key}")
        if section.get(file_key):
            return _read(base / str(section[file_key]), f"{where}: {file_key}")
        return None

    token = user.get("token")
    if not token and user.get("tokenFile"):
        token = _read(base / str(user["tokenFile"]), f"{where}: tokenFile").strip()
    cert = pem("client-certificate-data", "client-certificate", user)
    key = pem("client-key-data", "client-key", user)
    if (cert is None) != (key is None):
        raise KubeConfigError(f"{where}: user: expected both client-certificate and client-key")
    return KubeCredentials(
        server=server.rstrip("/"),
        ca_pem=pem("certificate-authority-data", "certificate-authority", cluster),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        token=str(token) if token else None,
        client_cert_pem=cert,
        client_key_pem=key,
        source="kubeconfig",
    )


def in_cluster_available(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("KUBERNETES_SERVICE_HOST"))


def in_cluster_credentials(
    environ: Mapping[str, str] | None = None, sa_dir: Path = SERVICE_ACCOUNT_DIR
) -> KubeCredentials:
    env = os.environ if environ is None else environ
    host = env.get("KUBERNETES_SERVICE_HOST", "")
    port = env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubeConfigError("in-cluster: KUBERNETES_SERVICE_HOST is not set")
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return KubeCredentials(
        server=f"https://{host}:{port}",
        ca_pem=_read(sa_dir / "ca.crt", "in-cluster: service-account CA"),
        token=_read(sa_dir / "token", "in-cluster: service-account token").strip(),
        source="in-cluster",
    )


def load_credentials(kubeconfig: Path | None) -> KubeCredentials | None:
    """The kubeconfig's credentials, else in-cluster ones, else None (no Kubernetes here)."""
    if kubeconfig is not None:
        return parse_kubeconfig(_read(kubeconfig, "kubeconfig"), kubeconfig)
    if in_cluster_available():
        return in_cluster_credentials()
    return None


# ---------------------------------------------------------------------------------------------
# Pods (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodInfo:
    """One pod of the list: its description and the CRI container ids of its containers."""

    ref: PodRef  # container=None: the pod itself
    # CRI container id -> (its name in the pod spec, its image as the status reports it)
    containers: Mapping[str, tuple[str, str | None]] = field(default_factory=dict)


def _owner(meta: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The controlling owner (controller: true), else the first owner, else none."""
    owners = [o for o in meta.get("ownerReferences") or () if isinstance(o, Mapping)]
    chosen = next((o for o in owners if o.get("controller")), owners[0] if owners else None)
    if chosen is None:
        return None, None
    return chosen.get("kind"), chosen.get("name")


def _container_ids(status: Mapping[str, Any]) -> dict[str, tuple[str, str | None]]:
    ids: dict[str, tuple[str, str | None]] = {}
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or ():
            if not isinstance(cs, Mapping):
                continue
            # "containerd://<id>"; the last terminated instance's id is in lastState, and its
            # cgroup may linger a moment after a restart.
            last = (cs.get("lastState") or {}).get("terminated") or {}
            image = cs.get("image") if isinstance(cs.get("image"), str) else None
            for raw in (cs.get("containerID"), last.get("containerID")):
                if isinstance(raw, str) and "://" in raw:
                    ids.setdefault(raw.split("://", 1)[1], (str(cs.get("name")), image))
    return ids


def parse_pod(obj: Mapping[str, Any]) -> PodInfo | None:
    """One item of a PodList, or None when it lacks a uid/name/namespace (not a pod)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    uid, name, namespace = meta.get("uid"), meta.get("name"), meta.get("namespace")
    if not (isinstance(uid, str) and isinstance(name, str) and isinstance(namespace, str)):
        return None
    kind, owner = _owner(meta)
    ref = PodRef(
        name=name,
        namespace=namespace,
        uid=uid,
        owner_kind=kind,
        owner_name=owner,
        qos_class=status.get("qosClass"),
        node=spec.get("nodeName"),
        source="api",
    )
    return PodInfo(ref, _container_ids(status))


def parse_pod_list(doc: Mapping[str, Any]) -> dict[str, PodInfo]:
    """A PodList (GET /api/v1/pods) -> {pod uid: PodInfo}."""
    if doc.get("kind") not in (None, "PodList"):
        raise PermanentError(f"kubernetes: expected a PodList, got {doc.get('kind')!r}")
    pods = {}
    for item in doc.get("items") or ():
        if isinstance(item, Mapping) and (info := parse_pod(item)) is not None:
            pods[info.ref.uid] = info
    return pods


def is_static_pod(obj: Mapping[str, Any]) -> bool:
    """A static (mirror) pod: the kubelet runs it from a file; the API server cannot evict it."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return "kubernetes.io/config.mirror" in annotations


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


class _Transient(Exception):
    """An answer worth retrying (429, 5xx); carries the message."""


def _ssl_context(creds: KubeCredentials) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=creds.ca_pem) if creds.ca_pem else ssl.create_default_context()
    if creds.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if creds.client_cert_pem and creds.client_key_pem:
        # ssl loads a certificate chain from files only: a private directory, removed at once.
        with tempfile.TemporaryDirectory(prefix="remediator-kube-") as d:
            cert, key = Path(d) / "cert.pem", Path(d) / "key.pem"
            for p, text in ((cert, creds.client_cert_pem), (key, creds.client_key_pem)):
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
            ctx.load_cert_chain(str(cert), str(key))
    return ctx


class KubeClient:
    """GET (and later write) JSON from one API server; counts its calls (`reads`, `writes`)."""

    def __init__(
        self,
        creds: KubeCredentials,
        *,
        timeout: float = REQUEST_TIMEOUT_SECONDS,
        attempts: int = RETRY_ATTEMPTS,
        backoff: float = RETRY_BACKOFF_SECONDS,
        sleep: Callable[[float], None] | None = None,
        pool: Any = None,  # a urllib3.PoolManager-like object; tests pass a fake
    ) -> None:
        self.creds = creds
        self._timeout = timeout
        self._attempts = attempts
        self._backoff = backoff
        self._sleep = sleep if sleep is not None else tenacity.nap.sleep
        self._pool = pool if pool is not None else urllib3.PoolManager(ssl_context=_ssl_context(creds))
        self.reads = 0
        self.writes = 0

    def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        *,
        retry_throttled: bool = True,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One API call, retried when transient; the decoded JSON answer.

        `retry_throttled=False`: an HTTP 429 is not retried (an eviction's 429 is a
        PodDisruptionBudget saying no, which a second later still says no); it is raised as
        TemporaryError at once. `content_type`: of the body, e.g. a PATCH's
        `application/strategic-merge-patch+json` or `application/merge-patch+json`."""
        url = self.creds.server + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        headers = {"Accept": "application/json"}
        if self.creds.token:
            headers["Authorization"] = f"Bearer {self.creds.token}"
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        what = f"{method} {path}"

        def once() -> dict[str, Any]:
            if method == "GET":
                self.reads += 1
            else:
                self.writes += 1
            try:
                resp = self._pool.request(
                    method,
                    url,
                    body=data,
                    headers=headers,
                    timeout=urllib3.Timeout(total=self._timeout),
                    retries=False,
                    redirect=False,
                )
            except urllib3.exceptions.HTTPError as e:  # connection refused, reset, timeout, TLS
                if isinstance(e, urllib3.exceptions.SSLError):
                    raise PermanentError(f"kubernetes: {what}: TLS: {e}") from None
                raise _Transient(f"kubernetes: {what}: {e}") from None
            status = int(resp.status)
            if status == 429 and not retry_throttled:
                raise TemporaryError(f"kubernetes: {what}: HTTP 429: {_message(resp.data)}")
            if status == 429 or status >= 500:
                raise _Transient(f"kubernetes: {what}: HTTP {status}: {_message(resp.data)}")
            if status >= 400:
                raise PermanentError(f"kubernetes: {what}: HTTP {status}: {_message(resp.data)}")
            try:
                answer = json.loads(resp.data or b"{}")
            except ValueError:
                raise PermanentError(f"kubernetes: {what}: the answer is not JSON") from None
            if not isinstance(answer, dict):
                raise PermanentError(f"kubernetes: {what}: expected a JSON object")
            return answer

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.debug("kube_retry", call=what, attempt=state.attempt_number, error=str(exc))

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._attempts),
            wait=tenacity.wait_exponential(multiplier=self._backoff, max=1.0),
            retry=tenacity.retry_if_exception_type(_Transient),
            before_sleep=before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            return retrying(once)
        except _Transient as e:
            raise TemporaryError(str(e)) from None

    def node_pods(self, node: str) -> dict[str, PodInfo]:
        """The pods bound to `node` (one list call, `spec.nodeName` field selector)."""
        doc = self.request("GET", "/api/v1/pods", {"fieldSelector": f"spec.nodeName={node}"})
        return parse_pod_list(doc)

    def close(self) -> None:
        self._pool.clear()


def client_factory(
    kubeconfig: Path | None,
    *,
    timeout: float = REQUEST_TIMEOUT_SECONDS,
    attempts: int = RETRY_ATTEMPTS,
) -> Callable[[], KubeClient] | None:
    """A lazy KubeClient maker for actions (ApplyContext.kube_factory), or None without a cluster.

    Credentials are read when the first action needs them; one that cannot be read then is a
    PermanentError of that action (the inventory has already said so at start, exit 2)."""
    if kubeconfig is None and not in_cluster_available():
        return None

    def make() -> KubeClient:
        try:
            creds = load_credentials(kubeconfig)
        except KubeConfigError as e:
            raise PermanentError(str(e)) from None
        if creds is None:
            raise PermanentError("kubernetes: no credentials")
        return KubeClient(creds, timeout=timeout, attempts=attempts)

    return make


def _message(data: bytes | None) -> str:
    """The Status message of an error answer, else its first 200 bytes."""
    try:
        doc = json.loads(data or b"")
        if isinstance(doc, dict) and doc.get("message"):
            return str(doc["message"])
    except ValueError:
        pass
    return (data or b"")[:200].decode(errors="replace")


__all__ = [
    "KubeClient",
    "KubeConfigError",
    "KubeCredentials",
    "PodInfo",
    "client_factory",
    "in_cluster_available",
    "in_cluster_credentials",
    "is_static_pod",
    "load_credentials",
    "parse_kubeconfig",
    "parse_pod",
    "parse_pod_list",
]
