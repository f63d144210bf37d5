"""A real single-node Kubernetes (1.20) for the slow tier, started and torn down per session.

What runs, all on loopback, all under one short temporary directory (BASE):

* etcd 3.4, kube-apiserver, kube-controller-manager, kube-scheduler and kubelet, built by
  scripts/make-kube.sh from Debian 12's sources (cached in /var/cache/remediator-test);
* a private CRI containerd: the system /usr/bin/containerd with its own config (own root, state,
  grpc/ttrpc sockets, runc root; sandbox_image a locally imported pause image;
  restrict_oom_score_adj, since root here lacks CAP_SYS_RESOURCE; cgroupfs; CNI from Debian's
  containernetworking-plugins with its own conf_dir: a bridge `rmdk0` + host-local, IPAM state
  under BASE);
* images built from /bin/busybox (pause, and busybox with tests/real/dcache_load.c's static
  helper at /load/dcache_load), imported with `ctr -n k8s.io images import`; pods use
  `imagePullPolicy: Never`.

Credentials: a static token (user `admin` in system:masters) for every component and the tests;
the API server's self-signed serving certificate (127.0.0.1, localhost) is the CA the
kubeconfig trusts; a service-account key signs service-account tokens.

Restoring the host (the kubelet is not made for sharing a machine):

* the kubelet writes host sysctls when it starts (kernel.panic 10, kernel.panic_on_oops 1,
  vm.overcommit_memory 1, vm.panic_on_oom 0, kernel.keys.root_max*): a guard thread snapshots
  them before anything starts and writes back any that changed, every 50 ms, for the fixture's
  whole life (a panic_on_oops left at 1 turns any kernel oops into a reboot), then once more at
  teardown, and the teardown asserts them;
* paths the kubelet and CNI cannot be told to leave alone (/var/lib/kubelet/device-plugins,
  /var/lib/cni, /var/log/pods, /var/log/containers) are removed at teardown when they did not
  exist before (a top that existed is left, only our entries in it go);
* teardown deletes every pod through the API (so the kubelet stops each sandbox through CRI and
  CNI removes its veth and netns), stops the kubelet, control plane and containerd, unmounts
  what is left under BASE, deletes the bridge, removes the kubepods cgroups in every hierarchy,
  and then checks: no mount under BASE, no rmdk0, no kubepods cgroup, no new /run/netns entry,
  sysctls as before, paths as before. Anything left fails the session loudly.

The fixture refuses to start when a kubepods cgroup or the rmdk0 bridge already exists (another
kubelet runs here, or an earlier run leaked: the message says what to remove).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import listen_port
from tests.real.conftest import unavailable
from tests.real.kube_host import (
    NETNS_DIR,
    UNMOVABLE_PATHS,
    SysctlGuard,
    kubepods_dirs,
    link_exists,
    links_on_bridge,
    mounts_under,
    rmdir_tree,
)
from tests.real.kube_images import BUSYBOX_IMAGE, PAUSE_IMAGE, build_images

REPO = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/remediator-test")
CRI_NAMESPACE = "k8s.io"
BRIDGE = "rmdk0"
POD_SUBNET = "10.223.0.0/24"
SERVICE_RANGE = "10.222.0.0/24"
NODE_NAME = "rmd-kube-node"
TOKEN = "rmd-test-" + base64.b32encode(os.urandom(15)).decode().lower()


def run(
    cmd: list[str], timeout: float = 60, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and res.returncode:
        raise AssertionError(f"{' '.join(cmd)}: exit {res.returncode}: {res.stderr.strip()[-500:]}")
    return res


# -- the node -------------------------------------------------------------------------------------


@dataclass
class KubeNode:
    base: Path
    bindir: Path
    kubeconfig: Path
    server: str
    containerd_socket: Path
    node_name: str = NODE_NAME
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    guard: SysctlGuard | None = None

    # -- API ---------------------------------------------------------------------------------
    def _ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.base / "pki" / "apiserver.crt"))

    def api(self, method: str, path: str, body: Any = None, timeout: float = 10) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {TOKEN}")
        req.add_header("Accept", "application/json")
        if data is not None:
            ctype = "application/merge-patch+json" if method == "PATCH" else "application/json"
            req.add_header("Content-Type", ctype)
        with urllib.request.urlopen(req, timeout=timeout, context=self._ssl()) as resp:
            return json.loads(resp.read() or b"{}")

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60) -> str:
        cmd = [str(self.bindir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input, check=False)
        if res.returncode:
            raise AssertionError(f"kubectl {' '.join(args)}: {res.stderr.strip()[-500:]}")
        return res.stdout

    def apply(self, manifest: Mapping[str, Any] | list[Mapping[str, Any]]) -> None:
        docs = manifest if isinstance(manifest, list) else [manifest]
        self.kubectl(
            "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
        )

    def pods(self, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        q = f"?labelSelector={selector}" if selector else ""
        return list(self.api("GET", f"/api/v1/namespaces/{namespace}/pods{q}")["items"])

    def wait_running(
        self, namespace: str, selector: str, count: int, timeout: float = 120
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            pods = [
                p
                for p in self.pods(namespace, selector)
                if p["status"].get("phase") == "Running"
                and not p["metadata"].get("deletionTimestamp")
                and all(c.get("ready") for c in p["status"].get("containerStatuses") or [{}])
            ]
            if len(pods) >= count:
                return pods
            if time.monotonic() > deadline:
                seen = self.pods(namespace, selector)
                raise AssertionError(f"{namespace}/{selector}: {len(pods)} of {count} pods Running: {seen}")
            time.sleep(0.2)

    def node_ready(self) -> bool:
        try:
            node = self.api("GET", f"/api/v1/nodes/{self.node_name}")
        except (urllib.error.URLError, OSError):
            return False
        return any(
            c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions") or []
        )

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(
            ["ctr", "--address", str(self.containerd_socket), "--namespace", CRI_NAMESPACE, *args],
            check=check,
        )


def _start(node: KubeNode, name: str, cmd: list[str], env: Mapping[str, str] | None = None) -> None:
    log = (node.base / "logs" / f"{name}.log").open("wb")
    node.procs[name] = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
    )


def _wait(node: KubeNode, name: str, ready: Any, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        proc = node.procs[name]
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (node.base / "logs" / f"{name}.log").read_text(errors="replace")[-1500:]
            raise AssertionError(f"{name} did not come up (exit {proc.poll()}): {tail}")
        time.sleep(0.2)


def _pki(d: Path) -> None:
    d.mkdir()
    run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(d / "apiserver.key"), "-out", str(d / "apiserver.crt"),
            "-subj", "/CN=rmd-kube-test",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
        ]
    )  # fmt: skip
    run(["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"])
    (d / "tokens.csv").write_text(f"{TOKEN},admin,admin,system:masters\n")


def _kubeconfig(path: Path, server: str, ca: Path) -> None:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "rmd", "cluster": {"server": server, "certificate-authority": str(ca)}}
                ],
                "users": [{"name": "admin", "user": {"token": TOKEN}}],
                "contexts": [{"name": "rmd", "context": {"cluster": "rmd", "user": "admin"}}],
                "current-context": "rmd",
            }
        )
    )


def _containerd_config(b: Path) -> Path:
    cd = b / "cd"
    cni = b / "cni"
    cd.mkdir()
    (cni / "net.d").mkdir(parents=True)
    (cni / "net.d" / "10-rmd.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "0.4.0",
                "name": "rmd-kube",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": BRIDGE,
                        # No gateway, no masquerade: the pods need no route out, and the plugin
                        # then changes no host sysctl (ip_forward) and adds no iptables rule.
                        "isGateway": False,
                        "ipMasq": False,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": POD_SUBNET}]],
                            "dataDir": str(cni / "ipam"),
                        },
                    }
                ],
            }
        )
    )
    config = cd / "config.toml"
    config.write_text(
        f"""version = 2
root = "{cd}/root"
state = "{cd}/state"
[grpc]
  address = "{cd}/containerd.sock"
[ttrpc]
  address = "{cd}/containerd.sock.ttrpc"
[debug]
  address = "{cd}/debug.sock"
[metrics]
  address = ""
[plugins."io.containerd.runtime.v1.linux"]
  runtime_root = "{cd}/runc-v1"
[plugins."io.containerd.internal.v1.opt"]
  path = "{cd}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{cd}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}/net.d"
"""
    )
    return config


def _kube_binaries() -> Path:
    res = subprocess.run(
        [str(REPO / "scripts" / "make-kube.sh"), str(CACHE)],
        capture_output=True,
        text=True,
        timeout=7200,
        check=False,
    )
    if res.returncode:
        unavailable(
            f"scripts/make-kube.sh failed: {res.stderr.strip()[-400:]}", f"scripts/make-kube.sh {CACHE}"
        )
    return Path(res.stdout.strip().splitlines()[-1]) / "bin"


def start_node(node: KubeNode, image_dir: Path) -> None:
    """Start everything, recording each process in `node` as it starts (so that a failure half
    way leaves the caller able to stop what runs)."""
    base, bindir = node.base, node.bindir
    for p in ("logs", "etcd", "kubelet", "kubelet-pki", "volume-plugins", "flex", "manifests"):
        (base / p).mkdir()
    _pki(base / "pki")
    pki = base / "pki"
    etcd_port, peer_port, api_port, kcm_port, sched_port, kubelet_port = (listen_port() for _ in range(6))
    server = f"https://127.0.0.1:{api_port}"
    kubeconfig = node.kubeconfig
    _kubeconfig(kubeconfig, server, pki / "apiserver.crt")
    node.server = server

    # containerd first: the images must be in before the kubelet asks for the pause image.
    config = _containerd_config(base)
    _start(node, "containerd", ["/usr/bin/containerd", "--config", str(config)])
    _wait(node, "containerd", lambda: node.ctr("version", check=False).returncode == 0, timeout=30)
    for tar in sorted(image_dir.glob("*.tar")):
        node.ctr("images", "import", str(tar))

    etcd = f"http://127.0.0.1:{etcd_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    _start(
        node,
        "etcd",
        [
            str(bindir / "etcd"), "--name", "rmd", "--data-dir", str(base / "etcd"),
            "--listen-client-urls", etcd, "--advertise-client-urls", etcd,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"rmd={peer}", "--log-level", "warn",
        ],
    )  # fmt: skip
    _start(
        node,
        "kube-apiserver",
        [
            str(bindir / "kube-apiserver"), "--etcd-servers", etcd,
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(api_port), "--insecure-port", "0",
            "--tls-cert-file", str(pki / "apiserver.crt"),
            "--tls-private-key-file", str(pki / "apiserver.key"),
            "--token-auth-file", str(pki / "tokens.csv"), "--authorization-mode", "RBAC",
            "--service-cluster-ip-range", SERVICE_RANGE,
            "--service-account-key-file", str(pki / "sa.key"),
            "--service-account-signing-key-file", str(pki / "sa.key"),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            # The kubernetes Service's endpoint would be 127.0.0.1, which Endpoints refuse.
            "--endpoint-reconciler-type", "none",
            "--allow-privileged=true", "--profiling=false",
            "--cert-dir", str(pki / "apiserver-generated"),
        ],
    )  # fmt: skip

    def healthy() -> bool:
        try:
            req = urllib.request.Request(server + "/readyz", headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(req, timeout=2, context=node._ssl()) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    _wait(node, "kube-apiserver", healthy, timeout=120)
    common = ["--kubeconfig", str(kubeconfig), "--authentication-kubeconfig", str(kubeconfig),
              "--authorization-kubeconfig", str(kubeconfig), "--bind-address", "127.0.0.1",
              "--leader-elect=false", "--port", "0"]  # fmt: skip
    _start(
        node,
        "kube-controller-manager",
        [
            str(bindir / "kube-controller-manager"), *common, "--secure-port", str(kcm_port),
            "--service-account-private-key-file", str(pki / "sa.key"),
            "--root-ca-file", str(pki / "apiserver.crt"),
            "--flex-volume-plugin-dir", str(base / "flex"),
            "--use-service-account-credentials=false",
        ],
    )  # fmt: skip
    _start(
        node, "kube-scheduler", [str(bindir / "kube-scheduler"), *common, "--secure-port", str(sched_port)]
    )
    _start(
        node,
        "kubelet",
        [
            str(bindir / "kubelet"), "--kubeconfig", str(kubeconfig),
            "--container-runtime", "remote",
            "--container-runtime-endpoint", f"unix://{node.containerd_socket}",
            "--image-service-endpoint", f"unix://{node.containerd_socket}",
            "--cgroup-driver", "cgroupfs", "--fail-swap-on=false", "--protect-kernel-defaults=false",
            "--enforce-node-allocatable=", "--make-iptables-util-chains=false",
            "--root-dir", str(base / "kubelet"), "--cert-dir", str(base / "kubelet-pki"),
            "--volume-plugin-dir", str(base / "volume-plugins"),
            "--pod-manifest-path", str(base / "manifests"),
            "--hostname-override", NODE_NAME, "--node-ip", "127.0.0.1", "--address", "127.0.0.1",
            "--port", str(kubelet_port), "--read-only-port", "0", "--healthz-port", "0",
            # Other helpers fill this machine's disk and memory: the kubelet must not evict our
            # pods or collect our images for it.
            "--eviction-hard", "memory.available<1Mi,nodefs.available<1%,imagefs.available<1%",
            "--image-gc-high-threshold", "100", "--image-gc-low-threshold", "99",
            "--cgroups-per-qos=true", "--v", "1",
        ],
    )  # fmt: skip
    _wait(node, "kubelet", node.node_ready, timeout=120)
    # Pods need the default ServiceAccount (made by the controller-manager) before they can start.
    _wait(
        node,
        "kube-controller-manager",
        lambda: bool(node.api("GET", "/api/v1/namespaces/default/serviceaccounts")["items"]),
        timeout=60,
    )


def _stop_proc(node: KubeNode, name: str, problems: list[str]) -> None:
    proc = node.procs.get(name)
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        problems.append(f"{name} needed SIGKILL")


def _new_netns(before: dict[str, Any]) -> set[str]:
    now = set(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else set()
    return now - before["netns"]


def stop_node(node: KubeNode, before: dict[str, Any]) -> list[str]:
    """Tear everything down and check the host is as before; the problems found."""
    problems: list[str] = []
    base = node.base
    if node.procs.get("kube-apiserver") is not None and node.procs["kube-apiserver"].poll() is None:
        with contextlib.suppress(AssertionError, subprocess.SubprocessError):
            node.kubectl(
                "delete", "deployments,replicasets,daemonsets,statefulsets,jobs,pods", "--all",
                "--all-namespaces", "--grace-period=0", "--force", "--wait=false", timeout=60,
            )  # fmt: skip
        for f in (base / "manifests").glob("*"):
            f.unlink()
        # The kubelet stops each sandbox through CRI: containerd kills the pause task first and
        # runs CNI DEL (veth and netns) after it, so wait for both before stopping the kubelet.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            tasks = (
                node.ctr("tasks", "ls", "-q", check=False).stdout.split()
                if node.procs["containerd"].poll() is None
                else []
            )
            attached = links_on_bridge(BRIDGE) if link_exists(BRIDGE) else []
            if not tasks and not attached and not _new_netns(before):
                break
            time.sleep(0.5)
        else:
            problems.append(
                f"90 s after deleting every pod: CRI tasks {tasks}, interfaces on {BRIDGE} "
                f"{attached}, new netns {sorted(_new_netns(before))}"
            )
    for name in ("kubelet", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
        _stop_proc(node, name, problems)
    if node.procs.get("containerd") is not None and node.procs["containerd"].poll() is None:
        for task in node.ctr("tasks", "ls", "-q", check=False).stdout.split():
            node.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
            for _ in range(50):
                if node.ctr("tasks", "delete", task, check=False).returncode == 0:
                    break
                time.sleep(0.1)
            problems.append(f"task {task[:12]} left running by the kubelet")
        for c in node.ctr("containers", "ls", "-q", check=False).stdout.split():
            node.ctr("containers", "delete", c, check=False)
    _stop_proc(node, "containerd", problems)

    # A sandbox whose CNI DEL was cut short leaves its netns pinned in /run/netns: unpinning it
    # destroys the namespace and with it the veth pair (checked below).
    for name in sorted(_new_netns(before)):
        run(["ip", "netns", "delete", name], check=False)
    for m in sorted(mounts_under(base), key=lambda p: len(p.parts), reverse=True):
        if run(["umount", str(m)], check=False).returncode:
            run(["umount", "-l", str(m)], check=False)
    if link_exists(BRIDGE):
        for _ in range(50):  # the kernel destroys an unpinned netns (and its veths) asynchronously
            attached = links_on_bridge(BRIDGE)
            if not attached:
                break
            time.sleep(0.2)
        if attached:
            problems.append(f"interfaces still on {BRIDGE}: {attached}")
        run(["ip", "link", "delete", BRIDGE], check=False)
    for d in kubepods_dirs():
        rmdir_tree(d)
    if node.guard is not None:
        problems += node.guard.stop()
        if node.guard.restored:
            # Expected: the kubelet writes them at start. Recorded for the report, not a problem.
            before["sysctl_restores"] = node.guard.restored
    for path in UNMOVABLE_PATHS:
        if not before["paths"][str(path)] and path.exists():
            leftover = mounts_under(path)
            if leftover:
                problems.append(f"mounts under {path}: {leftover}")
            else:
                shutil.rmtree(path, ignore_errors=True)
    cni_results = Path("/var/lib/cni/results")
    if before["paths"]["/var/lib/cni"] and cni_results.is_dir():
        for f in cni_results.glob("rmd-kube-*"):
            f.unlink()

    # Checks.
    if mounts_under(base):
        problems.append(f"still mounted under {base}: {mounts_under(base)}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    if link_exists(BRIDGE):
        problems.append(f"interface {BRIDGE} still exists")
    if kubepods_dirs():
        problems.append(f"kubepods cgroups left: {kubepods_dirs()}")
    if _new_netns(before):
        problems.append(f"network namespaces left in {NETNS_DIR}: {sorted(_new_netns(before))}")
    for path in UNMOVABLE_PATHS:
        if path.exists() != before["paths"][str(path)]:
            problems.append(f"{path} exists={path.exists()}, before={before['paths'][str(path)]}")
    return problems


@contextlib.contextmanager
def kube_node_running() -> Iterator[KubeNode]:
    if os.geteuid() != 0:
        unavailable("the Kubernetes node needs root", "run the real tier as root")
    for tool in ("openssl", "ctr", "ip"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is missing", "scripts/test.sh installs it")
    if not Path("/usr/lib/cni/bridge").exists():
        unavailable("/usr/lib/cni/bridge is missing", "apt-get install containernetworking-plugins")
    if kubepods_dirs():
        pytest.fail(
            f"kubepods cgroups exist before the node starts (another kubelet, or a leak): {kubepods_dirs()}"
        )
    if link_exists(BRIDGE):
        pytest.fail(f"interface {BRIDGE} exists before the node starts: ip link delete {BRIDGE}")
    bindir = _kube_binaries()
    # A short path: unix socket paths under it must fit sun_path (108 bytes).
    base = Path(tempfile.mkdtemp(prefix="rmd-kube-", dir="/tmp"))
    before: dict[str, Any] = {
        "paths": {str(p): p.exists() for p in UNMOVABLE_PATHS},
        "netns": set(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else set(),
    }
    images = base / "images"
    images.mkdir()
    build_images(images)
    guard = SysctlGuard()
    guard.start()
    node = KubeNode(base, bindir, base / "kubeconfig", "", base / "cd" / "containerd.sock", guard=guard)
    try:
        start_node(node, images)
        yield node
    finally:
        problems = stop_node(node, before)
        if problems:
            pytest.fail(f"Kubernetes node teardown: {problems}", pytrace=False)


__all__ = [
    "BRIDGE",
    "BUSYBOX_IMAGE",
    "NODE_NAME",
    "KubeNode",
    "kube_node_running",
]
