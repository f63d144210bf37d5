"""Runs inside the cgroup v2 VM (tests/real/cgv2_vm_init.sh): the controller's own v2 code paths.

    python -m tests.real.cgv2_vm_guest EXT4_DIR DCACHE_LOAD LOOKUPS

1. A memory cgroup laid out as dockerd's systemd-less cgroupfs driver lays it out on v2,
   `/docker/<64 hex id>`, with `memory` enabled down to it; a process in it (tests/real/
   dcache_load.c) makes LOOKUPS failed stat() calls of fresh names on ext4 (one negative dentry
   each) and then sleeps, as a trasher container's init would.
2. The `dentries` probe reads the host (the VM) with an inventory holding that one container,
   once when the process is ready and once when its lookups are done (the samples kept between
   them as the state directory keeps them): the hierarchy must be found as v2, the container's
   slab read from memory.stat `slab_reclaimable`, its growth rate from the two reads positive,
   and the attribution's top contributor must be it.
3. `reclaim-cgroup` plans from that reading (rankBy slab_reclaimable_bytes), re-checks, applies
   (writes 1Gi to memory.reclaim: far more than the cgroup holds, so the kernel answers EAGAIN,
   which must be recorded as partial, not failed) and verifies.
4. The negatives must be freed: nr_negative down by at least 90 % of LOOKUPS, the cgroup's slab
   down.

Prints one line "CGV2-RESULT {json}" (the host test parses it) and exits 0, or raises.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from remediator.actions.base import ApplyContext, PlanContext
from remediator.actions.reclaim import ReclaimCgroup, ReclaimCgroupParams
from remediator.clock import SystemClock
from remediator.host import HostRoot
from remediator.model import ContainerRef, Outcome, Plan, Reading
from remediator.probes.base import ProbeContext, ProbeOptions
from remediator.probes.dentries import DentriesProbe, find_memory_hierarchy, parse_dentry_state
from remediator.probes.memory import DictMemory


class OneContainer:
    """The container inventory the probe asks for (docker's, on a real host)."""

    def __init__(self, ref: ContainerRef) -> None:
        self.ref = ref
        self.error: str | None = None

    def containers(self) -> list[ContainerRef]:
        return [self.ref]

    def container_of_pid(self, pid: int) -> ContainerRef | None:
        return self.ref if pid == self.ref.pid else None

    def container_of_cgroup(self, cgroup_path: str) -> ContainerRef | None:
        return self.ref if cgroup_path.startswith(str(self.ref.cgroup)) else None


def negatives(host: HostRoot) -> int:
    return parse_dentry_state(host.read_sysctl("fs.dentry-state")).nr_negative


def main() -> int:
    ext4, load, lookups = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    host = HostRoot()
    clock = SystemClock()
    out: dict[str, object] = {"kernel": os.uname().release}
    hierarchy = find_memory_hierarchy(host)
    assert hierarchy is not None and hierarchy.version == 2, hierarchy
    out["hierarchy"] = [hierarchy.version, str(hierarchy.root)]

    root = hierarchy.root
    (root / "cgroup.subtree_control").write_text("+memory")
    (root / "docker").mkdir()
    (root / "docker" / "cgroup.subtree_control").write_text("+memory")
    cid = secrets.token_hex(32)
    cg = root / "docker" / cid
    cg.mkdir()
    (ext4 / "t").mkdir()
    base = negatives(host)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ["/bin/sh", "-c", f"echo $$ > {cg}/cgroup.procs && exec {load} trash {ext4}/t {lookups} 0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ref = ContainerRef(cid, "vm-trasher", pid=proc.pid, cgroup=f"/docker/{cid}", image="busybox")
    memory = DictMemory()  # what the state directory keeps between cycles on a real host

    def read() -> Reading:
        ctx = ProbeContext(
            host,
            clock,
            inventory_factory=lambda: OneContainer(ref),
            memory=memory,
            options=ProbeOptions(scratch_dir=Path("/tmp/canary"), ebpf="off"),
        )
        return DentriesProbe().read(ctx)

    for line in proc.stdout:
        if line.startswith("ready"):
            read()  # the first sample of the container's slab, before its lookups
            break
    for line in proc.stdout:
        if line.startswith("done"):
            break
    out["trash_seconds"] = round(time.monotonic() - t0, 2)
    flooded = negatives(host)
    out["negatives"] = {"base": base, "flooded": flooded}
    assert flooded - base >= 0.9 * lookups, out

    reading = read()  # the growth rate comes from the sample at "ready"
    (sample,) = reading.containers
    out["probe"] = {
        "cgroup_version": reading.detail["cgroup_version"],
        "slab_source": reading.detail.get("slab_source"),
        "slab_reclaimable_bytes": sample.values["slab_reclaimable_bytes"],
        "slab_growth_bytes_per_second": sample.values.get("slab_growth_bytes_per_second"),
        "top": reading.detail["attribution"]["top"][:1],
    }
    assert reading.detail["cgroup_version"] == 2, out
    assert reading.detail.get("slab_source") == "memory.stat:slab_reclaimable", out
    # ~190 bytes of slab per negative dentry (dentry objects of 192 bytes, measured on 6.x).
    assert sample.values["slab_reclaimable_bytes"] >= 100 * lookups, out
    assert reading.detail["attribution"]["top"][0]["id"] == cid[:12], out
    assert (sample.values.get("slab_growth_bytes_per_second") or 0) > 0, out

    action = ReclaimCgroup()
    params = ReclaimCgroupParams(target="top", rankBy="slab_reclaimable_bytes", amount="1Gi")
    plan = action.plan(
        PlanContext(
            "negative-dentries",
            "negative",
            "host",
            reading,
            params,
            eligible=lambda c: True,
            now=clock.now(),
            readings={"dentries": reading},
        )
    )
    assert isinstance(plan, Plan), plan
    out["plan"] = plan.summary
    assert "memory.reclaim" in plan.summary and "(cgroup v2)" in plan.summary, out
    actx = ApplyContext(host, clock, dry_run=False)
    assert action.recheck(plan, actx) is None
    applied = action.apply(plan, actx)
    verified = action.verify(plan, applied, actx)
    after = negatives(host)
    out["result"] = {
        "outcome": verified.outcome.value,
        "message": verified.message,
        "verified": verified.verified,
        "before": dict(verified.before),
        "after": dict(verified.after),
    }
    out["negatives"] = {"base": base, "flooded": flooded, "after": after}
    print("CGV2-RESULT " + json.dumps(out, default=str), flush=True)
    proc.kill()
    assert applied.outcome is Outcome.APPLIED, out
    assert verified.after["partial"] is True, out  # EAGAIN: asked 1Gi, the cgroup held ~20 MB
    assert verified.verified, out
    assert flooded - after >= 0.9 * lookups, out
    return 0


if __name__ == "__main__":
    sys.exit(main())
