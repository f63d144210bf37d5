#!/usr/bin/env python3
"""Build the cgroup v2 test VM: Debian's 6.1 kernel and a busybox initramfs.

    scripts/make-cgv2-vm.py [CACHE]        (default CACHE: /var/cache/remediator-test/cgv2-vm)

prints CACHE, which then holds `vmlinuz` and `initrd.gz` (tests/real/test_cgroup_v2_vm_real.py
boots them with qemu-system-x86_64 -accel tcg).

Why a VM: on the test host the memory controller is bound to cgroup v1, so the v2 code paths
(memory.stat `slab_reclaimable`, the `memory.reclaim` write and its EAGAIN) cannot run there. A
6.1 kernel booted with only cgroup2 mounted gives a real v2 memory controller.

* The kernel: linux-image-6.1.0-*-amd64-unsigned of the host's own suite (bookworm), fetched with
  `apt-get download` into CACHE (no apt configuration is changed: apt-get download only reads
  it) and unpacked with dpkg-deb. Cached; delete CACHE to fetch it again.
* The modules the guest needs (virtio-pci, 9p over virtio, loop, ext4) and their dependencies,
  resolved from each module's own `.modinfo` "depends=" (the package ships no modules.dep and
  the host has no depmod), are copied into the initramfs in load order.
* The initramfs: busybox-static, the modules, and `init` (tests/real/cgv2_vm_init.sh). It has
  no Python: the guest mounts the host's /usr and the checkout read-only over virtio-9p, so the
  Python that runs there is the host's interpreter and the project's own code, unchanged.
  Rebuilt on every call (a few seconds) so it always carries the current init.
"""

from __future__ import annotations

import glob
import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INIT = REPO / "tests" / "real" / "cgv2_vm_init.sh"
PACKAGE = "linux-image-6.1.0-*-amd64-unsigned"
# crc32c_generic: ext4 asks the crypto API for "crc32c" at mount (a soft dependency, not in
# depends=); without it the mount fails with "Cannot load crc32c driver".
WANTED = ("virtio_pci", "9pnet_virtio", "9p", "loop", "crc32c_generic", "ext4")
BUSYBOX = "/bin/busybox"


def die(msg: str) -> None:
    sys.exit(f"error: {msg}")


def newest_package() -> str:
    """The newest linux-image-6.1.0-N-amd64-unsigned the host's apt lists know."""
    out = subprocess.run(
        ["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    if not names:
        die(f"apt-cache knows no {PACKAGE} (run apt-get update)")
    return max(names, key=lambda n: int(re.findall(r"6\.1\.0-(\d+)", n)[0]))


def kernel_tree(cache: Path) -> Path:
    tree = cache / "kernel"
    if glob.glob(str(tree / "boot" / "vmlinuz-*")):
        return tree
    name = newest_package()
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        r = subprocess.run(
            ["apt-get", "download", name], cwd=tmp, capture_output=True, text=True, check=False
        )
        debs = glob.glob(os.path.join(tmp, "*.deb"))
        if r.returncode != 0 or not debs:
            die(f"apt-get download {name} failed: {r.stderr.strip()}")
        part = cache / "kernel.part"
        shutil.rmtree(part, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", debs[0], str(part)], check=True)
        part.rename(tree)
    return tree


def module_index(tree: Path) -> dict[str, Path]:
    out = {}
    for ko in tree.glob("lib/modules/*/kernel/**/*.ko"):
        out[ko.name[:-3].replace("-", "_")] = ko
    return out


def depends(ko: Path) -> list[str]:
    """The "depends=a,b" entry of the module's .modinfo section (null-separated key=value)."""
    m = re.search(rb"\x00depends=([^\x00]*)\x00", ko.read_bytes())
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


def load_order(index: dict[str, Path], wanted: tuple[str, ...]) -> list[str]:
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in index:
            die(f"module {name} is not in the kernel package (built in? then drop it from WANTED)")
        for dep in depends(index[name]):
            visit(dep)
        order.append(name)

    for w in wanted:
        visit(w)
    return order


def build_initrd(tree: Path, out: Path) -> None:
    index = module_index(tree)
    order = load_order(index, WANTED)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "tmp", "mnt", "usr", "load", "modules"):
            (root / d).mkdir()
        # Merged /usr: the loader and libc come from the host's /usr once it is mounted.
        for link in ("lib", "lib64", "sbin"):
            os.symlink(f"usr/{link}" if link != "sbin" else "bin", root / link)
        shutil.copy(BUSYBOX, root / "bin" / "busybox")
        for i, name in enumerate(order):
            shutil.copy(index[name], root / "modules" / f"{i:02d}-{name}.ko")
        shutil.copy(INIT, root / "init")
        (root / "init").chmod(0o755)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        cpio = subprocess.run(
            [BUSYBOX, "cpio", "-o", "-H", "newc"],
            cwd=root,
            input="\n".join(files).encode(),
            capture_output=True,
            check=True,
        ).stdout
    part = out.with_suffix(".part")
    with gzip.open(part, "wb", compresslevel=6) as f:
        f.write(cpio)
    part.rename(out)


def main() -> None:
    cache = Path(sys.argv[1] if len(sys.argv) > 1 else "/var/cache/remediator-test/cgv2-vm")
    cache.mkdir(parents=True, exist_ok=True)
    if not os.path.exists(BUSYBOX):
        die("no /bin/busybox (apt-get install busybox-static)")
    tree = kernel_tree(cache)
    (vmlinuz,) = glob.glob(str(tree / "boot" / "vmlinuz-*"))
    shutil.copy(vmlinuz, cache / "vmlinuz")
    build_initrd(tree, cache / "initrd.gz")
    print(cache)


if __name__ == "__main__":
    main()
