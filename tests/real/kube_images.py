"""The Kubernetes node's images, built from /bin/busybox with no registry: pause, and busybox
with tests/real/dcache_load.c's static helper at /load/dcache_load, as docker-archive tars that
`ctr -n k8s.io images import` reads."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.real.conftest import unavailable

PAUSE_IMAGE = "docker.io/rmd-test/pause:1"
BUSYBOX_IMAGE = "docker.io/rmd-test/busybox:1"
DCACHE_LOAD_SOURCE = Path(__file__).resolve().parent / "dcache_load.c"


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if res.returncode:
        raise AssertionError(f"{' '.join(cmd)}: exit {res.returncode}: {res.stderr.strip()[-500:]}")
    return res.stdout


def _busybox_rootfs(root: Path, extra: Mapping[str, Path]) -> None:
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        unavailable("/bin/busybox is missing", "apt-get install busybox-static")
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "proc", "sys", "dev", "run", "load"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)
    shutil.copy2(busybox, root / "bin" / "busybox")
    listed = _run([str(busybox), "--list-full"]).split()
    for applet in listed:
        if "/" in applet and not (root / applet).exists():
            (root / applet).symlink_to("/bin/busybox")
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    for rel, src in extra.items():
        shutil.copy2(src, root / rel)


def docker_archive(rootfs: Path, tag: str, cmd: list[str], out: Path) -> None:
    """A `docker save`-format tar of one layer: what `ctr images import` reads."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:

        def owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            return info

        for p in sorted(rootfs.rglob("*")):
            t.add(p, arcname=str(p.relative_to(rootfs)), recursive=False, filter=owner)
    layer_bytes = layer.getvalue()
    diff_id = hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created_by": "tests/real/kube_node.py"}],
    }
    config_bytes = json.dumps(config).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": [f"{diff_id}/layer.tar"]}]
    with tarfile.open(out, "w") as t:
        for name, data in (
            (f"{diff_id}/layer.tar", layer_bytes),
            (config_name, config_bytes),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def build_images(out: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        unavailable("no C compiler for tests/real/dcache_load.c", "apt-get install gcc")
    work = out / "work"
    work.mkdir()
    helper = work / "dcache_load"
    _run([cc, "-static", "-O2", "-o", str(helper), str(DCACHE_LOAD_SOURCE)])
    pause_root, busybox_root = work / "pause", work / "busybox"
    _busybox_rootfs(pause_root, {})
    _busybox_rootfs(busybox_root, {"load/dcache_load": helper})
    docker_archive(pause_root, PAUSE_IMAGE, ["/bin/sleep", "2147483647"], out / "pause.tar")
    docker_archive(busybox_root, BUSYBOX_IMAGE, ["/bin/sh"], out / "busybox.tar")
    shutil.rmtree(work)


def busybox_deployment(
    namespace: str,
    name: str,
    command: list[str],
    *,
    replicas: int = 1,
    container_name: str | None = None,
    pod: Mapping[str, Any] | None = None,
    container: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A Deployment of the local busybox image (never pulled, no grace period, no service
    account token) running `command`; `pod` and `container` add keys to the pod spec and to its
    one container."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "automountServiceAccountToken": False,
                    **(pod or {}),
                    "containers": [
                        {
                            "name": container_name or name,
                            "image": BUSYBOX_IMAGE,
                            "imagePullPolicy": "Never",
                            "command": command,
                            **(container or {}),
                        }
                    ],
                },
            },
        },
    }
