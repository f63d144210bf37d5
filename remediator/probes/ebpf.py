"""Failed path lookups per container and per process, counted in the kernel by BCC.

The memory cgroup's slab says which container *holds* dentries; this says which one is *making*
failed lookups now, and which process in it. Together they name an offender with evidence from
two independent sources (issue 9).

How it runs, and why:

* In a child process (`python -m remediator.probes.ebpf_worker`), for a bounded window (a few
  seconds), under a timeout and an address-space limit. BCC with its LLVM costs 120-160 MB of
  resident memory; the daemon must stay small while the host is healthy, so it pays that only
  when there is something to attribute and gives it back when the child exits.
* Against a stub kernel header tree generated here at run time (the host has no kernel headers
  and no /lib/modules): just enough for BCC's own helpers header to compile (issue 9 lists the
  files). `BCC_KERNEL_SOURCE` points the child at it. The program reads no kernel struct
  through these headers, so the stubs cannot give a wrong offset.
* Cgroup id -> container: `bpf_get_current_cgroup_id()` is the inode number of the process's
  cgroup v2 directory. On a v1 host with the hybrid layout, runc still places each container in
  cgroup2 `/docker/<id>` under `/sys/fs/cgroup/unified`; on a v2 host it is the container's own
  cgroup. We stat those directories for each known container.

When BCC cannot run, `unavailable()` / the child say exactly why (not root, no cgroup2 mounted,
no bcc module for this interpreter, the program did not load) and attribution carries on from
the memory cgroups alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from remediator.host import HostRoot
from remediator.model import ContainerRef
from remediator.probes.containers import parse_proc_cgroup

# The child's address-space ceiling: LLVM maps far more than it touches (~1 GiB virtual for
# ~150 MB resident, measured here); 2 GiB bounds a runaway without starving a normal load.
CHILD_ADDRESS_SPACE = 2 << 30
# Seconds beyond the counting window for the child to compile, load and print (0.2-0.6 s
# measured here; a loaded 2-core machine needs more).
CHILD_GRACE = 30.0

STUB_FILES = {
    "include/linux/kconfig.h": "#define CONFIG_BPF_SYSCALL 1\n",
    "include/linux/types.h": (
        "typedef unsigned char __u8; typedef signed char __s8;\n"
        "typedef unsigned short __u16; typedef signed short __s16;\n"
        "typedef unsigned int __u32; typedef signed int __s32;\n"
        "typedef unsigned long long __u64; typedef signed long long __s64;\n"
        "typedef __u8 u8; typedef __s8 s8; typedef __u16 u16; typedef __s16 s16;\n"
        "typedef __u32 u32; typedef __s32 s32; typedef __u64 u64; typedef __s64 s64;\n"
        "typedef __u16 __be16; typedef __u32 __be32;\n"
        "typedef __u64 __aligned_u64 __attribute__((aligned(8)));\n"
        "typedef unsigned long size_t; typedef unsigned long uintptr_t;\n"
    ),
    "include/linux/log2.h": "",
    "include/linux/bpf_common.h": "",
    "include/asm/page.h": "",
    "include/uapi/linux/bpf.h": "",
    "include/uapi/linux/if_packet.h": "",
}


def stub_files(release: tuple[int, int, int]) -> dict[str, str]:
    """The stub kernel tree for BCC: {relative path: content}, version.h for `release`."""
    major, minor, patch = release
    code = (major << 16) + (minor << 8) + min(patch, 255)
    version = (
        f"#define LINUX_VERSION_CODE {code}\n"
        "#define KERNEL_VERSION(a, b, c) (((a) << 16) + ((b) << 8) + ((c) > 255 ? 255 : (c)))\n"
    )
    return {**STUB_FILES, "include/linux/version.h": version}


def write_stub_tree(directory: Path, release: tuple[int, int, int]) -> None:
    for rel, content in stub_files(release).items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


def kept_stub_tree(root: Path, release: tuple[int, int, int]) -> Path:
    """ROOT/<release>: the stub tree for this kernel, written once (into a fresh directory,
    then renamed into place, so a reader never sees half a tree) and reused after."""
    final = root / ".".join(map(str, release))
    if final.is_dir() and not final.is_symlink():
        return final
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=".new-", dir=root))
    write_stub_tree(fresh, release)
    try:
        fresh.rename(final)
    except OSError:  # another instance won the race: theirs is the same tree
        if not final.is_dir():
            raise
        shutil.rmtree(fresh, ignore_errors=True)  # our own fresh temporary copy
    return final


def parse_release3(text: str) -> tuple[int, int, int]:
    """ "6.18.44-fc-v595" -> (6, 18, 44); missing parts are 0."""
    m = re.match(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    if not m:
        return 0, 0, 0
    return int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)


@dataclass(frozen=True)
class ProcessCount:
    pid: int
    comm: str
    cgroup_id: int
    count: int


@dataclass(frozen=True)
class LookupCounts:
    """Failed path lookups in one window, as the kernel counted them."""

    window_seconds: float
    load_seconds: float
    total: int
    by_cgroup: Mapping[int, int]
    by_process: tuple[ProcessCount, ...]
    maps_full: bool


def parse_worker_output(text: str) -> LookupCounts | str:
    """The child's one JSON line -> counts, or the reason it gives (or a parse error)."""
    try:
        data = json.loads(text.strip().splitlines()[-1] if text.strip() else "")
    except (ValueError, IndexError):
        return f"ebpf worker printed no JSON: {text.strip()[:200]!r}"
    if not isinstance(data, dict):
        return "ebpf worker printed no JSON object"
    if "error" in data:
        return str(data["error"])
    try:
        return LookupCounts(
            window_seconds=float(data["window_seconds"]),
            load_seconds=float(data["load_seconds"]),
            total=int(data["total"]),
            by_cgroup={int(k): int(v) for k, v in dict(data["by_cgroup"]).items()},
            by_process=tuple(
                ProcessCount(int(p["pid"]), str(p["comm"]), int(p["cgroup_id"]), int(p["count"]))
                for p in data["by_pid"]
            ),
            maps_full=bool(data.get("maps_full", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        return f"ebpf worker output malformed: {exc}"


def unavailable(host: HostRoot) -> str | None:
    """Why BCC attribution cannot run here, checked without starting it; None when it may."""
    if not host.is_real:
        return "host root is not / (eBPF sees only the real kernel)"
    if os.geteuid() != 0:
        return "not root: loading BPF programs needs CAP_BPF and CAP_PERFMON (run as root)"
    if not (_is_cgroup2(host.cgroup) or _is_cgroup2(host.cgroup / "unified")):
        return f"no cgroup2 mounted at {host.cgroup} or {host.cgroup}/unified: cgroup ids cannot be mapped"
    return None


def _is_cgroup2(path: Path) -> bool:
    return (path / "cgroup.procs").exists() and (path / "cgroup.controllers").exists()


def count_failed_lookups(host: HostRoot, seconds: float, stub_root: Path | None = None) -> LookupCounts | str:
    """Run the BCC child for `seconds`; its counts, or exactly why there are none."""
    why = unavailable(host)
    if why is not None:
        return why
    try:
        release = parse_release3(host.read_sysctl("kernel.osrelease"))
    except OSError as exc:
        return f"kernel release unreadable: {exc}"
    temporary = stub_root is None
    try:
        if stub_root is None:
            stub = Path(tempfile.mkdtemp(prefix="remediator-bcc-"))
            write_stub_tree(stub, release)
        else:
            stub = kept_stub_tree(stub_root, release)
    except OSError as exc:
        return f"cannot write BCC's stub kernel headers: {exc}"
    try:
        env = {**os.environ, "BCC_KERNEL_SOURCE": str(stub), "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "remediator.probes.ebpf_worker",
                    f"{seconds:g}",
                    str(CHILD_ADDRESS_SPACE),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=seconds + CHILD_GRACE,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"ebpf worker did not finish within {seconds + CHILD_GRACE:g}s (killed)"
        except OSError as exc:
            return f"ebpf worker could not start: {exc}"
        result = parse_worker_output(done.stdout)
        if isinstance(result, str) and done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or [""]
            return f"ebpf worker exited {done.returncode}: {tail[0][:200]}"
        return result
    finally:
        if temporary:
            shutil.rmtree(stub, ignore_errors=True)  # our own fresh temp dir, no symlinks in it


def cgroup_ids(host: HostRoot, containers: Iterable[ContainerRef]) -> dict[int, ContainerRef]:
    """{cgroup v2 inode: container} for every container whose v2 cgroup directory we find."""
    out: dict[int, ContainerRef] = {}
    for c in containers:
        for path in _v2_paths(host, c):
            try:
                out[os.stat(path).st_ino] = c
            except OSError:
                continue
    return out


def _v2_paths(host: HostRoot, c: ContainerRef) -> list[Path]:
    rels: list[str] = []
    if c.pid:
        try:
            v2 = parse_proc_cgroup(host.read_text(host.proc / str(c.pid) / "cgroup")).get("")
        except OSError:
            v2 = None
        if v2:
            rels.append(v2)
    if c.cgroup:
        rels.append(c.cgroup)
    paths = []
    for rel in dict.fromkeys(rels):
        parts = [p for p in rel.split("/") if p not in ("", ".", "..")]
        if not parts:
            continue
        paths += [host.cgroup.joinpath("unified", *parts), host.cgroup.joinpath(*parts)]
    return paths


__all__ = [
    "LookupCounts",
    "ProcessCount",
    "cgroup_ids",
    "count_failed_lookups",
    "parse_release3",
    "parse_worker_output",
    "stub_files",
    "unavailable",
    "write_stub_tree",
]
