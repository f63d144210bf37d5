"""Reproduces dentry-cache-isolation-story.txt on the real kernel and dockerd.

A trasher container makes failed stat() calls of fresh names under its overlay /tmp (two
negative dentries each: the overlay's and the image layer's), a worker lstat()s a tree of cached
paths in a loop and reports its loop time, an idle bystander of the same image does nothing.

* `remediator audit` names the trasher, container and process, with a plausible rate, from both
  sources (memcg slab growth and BCC failed-lookup counts), and changes nothing.
* `remediator once` (the bundled negative-dentries ladder; only its lines are set relative to
  this host's count before the test, to keep the flood to a few million) holds for its 10 s,
  then reclaims the trasher's cgroup: nr_negative goes under the clear line, the canary is back
  within 20 % of its healthy baseline, worker and bystander keep their ids and run, and no
  global cache drop was used (recorded in the state).

The host is restored: the trasher's cgroup is reclaimed again at the end (only our own
containers' cgroups are ever reclaimed; no host-wide drop), and the count is checked.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from remediator.host import HostRoot
from remediator.probes.dentries import parse_dentry_state
from remediator.probes.ebpf import unavailable
from remediator.settings import bundled_policies
from tests.helpers import remediator_json
from tests.real.conftest import MakeContainer, reclaim_own_cgroup, run_dcache_load
from tests.real.conftest import unavailable as missing

pytestmark = pytest.mark.real

HOST = HostRoot()
FLOOD = 2_400_000  # failed lookups in the burst: one negative each measured here (6.18, overlay2)
BURST_RATE = 0  # as fast as it goes: ~0.4 M/s, the case report's rate
TRICKLE = 20_000  # per second afterwards: the trasher keeps going, slowly
ACT_ABOVE = 2_000_000  # over the host's count before the test
CLEAR_BELOW = 1_000_000


def negatives() -> int:
    return parse_dentry_state(HOST.read_sysctl("fs.dentry-state")).nr_negative


def policy_text(base: int) -> str:
    bundled = bundled_policies()
    assert bundled is not None
    text = (bundled / "negative-dentries.yaml").read_text()
    assert "above: 200%" in text and "clearBelow: 100%" in text
    return text.replace("above: 200%", f"above: {base + ACT_ABOVE}").replace(
        "clearBelow: 100%", f"clearBelow: {base + CLEAR_BELOW}"
    )


def run(cmd: str, tmp_path: Path) -> dict[str, Any]:
    return remediator_json(cmd, policies=tmp_path / "policies", state=tmp_path / "state", timeout=180)


def loop_ns(container: Any) -> list[int]:
    return [int(x) for x in re.findall(rb"loop_ns (\d+)", container.logs())]


def test_trasher_named_by_audit_and_relieved_by_once(
    make_container: MakeContainer, dcache_load_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    why = unavailable(HOST)
    if why is not None:
        missing(f"BCC attribution cannot run: {why}", "run the real tier as root on a cgroup2 host")
    monkeypatch.setenv("REMEDIATOR_EBPF", "always")
    (tmp_path / "policies").mkdir()
    base = negatives()
    (tmp_path / "policies" / "negative-dentries.yaml").write_text(policy_text(base))

    bystander = run_dcache_load(make_container, dcache_load_dir, ("idle",))
    worker = run_dcache_load(make_container, dcache_load_dir, ("work", "/data", "5000"))
    # Healthy: one cycle calibrates the canary (nothing to do yet).
    healthy = run("once", tmp_path)
    values = healthy["readings"]["dentries"]["values"]
    if "lookup_slowdown" not in values:
        missing(
            "the host is not healthy enough to calibrate the canary: "
            f"{healthy['readings']['dentries']['detail']['canary']}",
            "reclaim the cgroups holding negative dentries (see docs/runbooks/negative-dentries.md)",
        )
    assert values["lookup_slowdown"] == pytest.approx(1.0)
    baseline_ns = values["lookup_baseline_ns"]
    time.sleep(2)
    worker_before = loop_ns(worker)[-2:]

    trasher = run_dcache_load(
        make_container, dcache_load_dir, ("trash", "/tmp", str(FLOOD), str(BURST_RATE), str(TRICKLE))
    )
    try:
        deadline = time.monotonic() + 90
        while b"done" not in trasher.logs():
            assert time.monotonic() < deadline, trasher.logs()
            time.sleep(0.2)
        flooded = negatives()
        assert flooded > base + ACT_ABOVE, f"only {flooded - base} new negatives"
        worker_during = loop_ns(worker)[-2:]

        # Audit names the trasher from both sources, and changes nothing.
        doc = run("audit", tmp_path)
        reading = doc["readings"]["dentries"]
        attribution = reading["detail"]["attribution"]
        assert attribution["ebpf"] == "measured", attribution["ebpf"]
        top = attribution["top"][0]
        assert (top["container"], top["id"]) == (trasher.name, trasher.id[:12]), attribution["top"]
        assert top["sources"] == ["memcg", "ebpf"]
        assert 0.5 * TRICKLE <= top["failed_lookups_per_second"] <= 1.5 * TRICKLE, top
        assert top["processes"][0]["comm"] == "dcache_load"
        assert top["processes"][0]["pid"] == trasher.attrs["State"]["Pid"]
        assert top["slab_growth_bytes_per_second"] is not None and top["slab_growth_bytes_per_second"] > 0
        (pol,) = doc["policies"]
        assert [a["result"]["outcome"] for a in pol["actions"]] in ([], ["would_apply"])
        assert negatives() >= flooded * 0.95  # audit freed nothing

        # once: pending for the 10 s hold-down, then the first step reclaims the trasher.
        first = run("once", tmp_path)
        assert first["policies"][0]["decisions"][0]["phase"] == "pending"
        time.sleep(11)
        second = run("once", tmp_path)
        (act,) = second["policies"][0]["actions"]
        assert (act["action"], act["result"]["outcome"]) == ("reclaim-cgroup", "applied"), act["result"]
        assert act["plan"]["target"]["name"] == trasher.name
        before, after = act["result"]["before"], act["result"]["after"]
        assert after["host_nr_negative"] < base + CLEAR_BELOW, (before, after)
        assert after["kmem_bytes" if "kmem_bytes" in after else "slab_bytes"] < before.get(
            "kmem_bytes", before.get("slab_bytes")
        )
        assert negatives() < base + CLEAR_BELOW

        # The canary after the settle, in the next cycle; worker and bystander untouched.
        time.sleep(2)
        # Load on the machine only ever slows the canary's lookups: the best of up to three
        # fresh measurements is the cache's own state. (A later run would reuse the last one
        # while the dentry count stands still: its record goes, the baseline stays.)
        slowdowns = []
        for _ in range(3):
            third = run("once", tmp_path)
            assert "reused" not in third["readings"]["dentries"]["detail"]["canary"]
            slowdowns.append(third["readings"]["dentries"]["values"]["lookup_slowdown"])
            if slowdowns[-1] <= 1.2:
                break
            memory_file = tmp_path / "state" / "probe-memory.json"
            memory = json.loads(memory_file.read_text())
            memory.pop("canary.last", None)
            memory_file.write_text(json.dumps(memory))
        assert min(slowdowns) <= 1.2, (slowdowns, baseline_ns)
        for c, cid in ((bystander, bystander.id), (worker, worker.id), (trasher, trasher.id)):
            c.reload()
            assert (c.id, c.status) == (cid, "running")
        status = run("status", tmp_path)
        applied = [a["action"] for a in status["actions"] if a["outcome"] == "applied"]
        assert applied == ["reclaim-cgroup"], status["actions"]  # no global drop
        print(
            f"\nnegatives: base {base}, flooded {flooded}, after reclaim {after['host_nr_negative']}; "
            f"canary slowdown after {min(slowdowns):.2f}; worker loop ns before {worker_before} during "
            f"{worker_during} after {loop_ns(worker)[-2:]}; ebpf top {top}"
        )
    finally:
        # Restore: stop the trickle's growth by reclaiming the trasher's own cgroup (its
        # removal at teardown then leaves no image-layer negatives behind in /docker).
        trasher.pause()  # the cgroup stays, the trickle stops
        reclaim_own_cgroup(trasher)
    assert negatives() < base + CLEAR_BELOW
