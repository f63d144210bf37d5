"""The dentries probe: parsers on captured kernel files, the probe on fixture trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from remediator.clock import FakeClock
from remediator.host import HostRoot
from remediator.model import ContainerRef, Reading
from remediator.probes.base import ProbeContext
from remediator.probes.containers import StaticInventory
from remediator.probes.dentries import (
    DentriesProbe,
    DentryState,
    MemoryHierarchy,
    find_memory_hierarchy,
    memory_hierarchy,
    parse_dentry_state,
    parse_flat_keyed,
    parse_kernel_release,
    parse_slabinfo,
)
from remediator.probes.slab import parse_slub_sysfs, read_slab_cache
from tests.helpers import make_host

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
PROC = FIXTURES / "proc" / "linux-6.18"
CID = "5fed7652134bd8636559d9cfa0ce537d1d35ece4c49c5a944a3ee94faac7ec36"
V1_CGROUP = FIXTURES / "sys" / "linux-6.18-cgroup-v1" / "fs" / "cgroup" / "memory" / "docker" / CID
V2_ROOT = FIXTURES / "sys" / "synthetic-cgroup-v2" / "fs" / "cgroup"
V2_SCOPE = f"system.slice/docker-{CID}.scope"


def fixture(path: Path) -> str:
    return path.read_text()


def proc_files() -> dict[str, str]:
    """The captured host-wide files the dentries probe reads."""
    return {
        "proc/sys/fs/dentry-state": fixture(PROC / "sys/fs/dentry-state"),
        "proc/sys/fs/dentry-negative": fixture(PROC / "sys/fs/dentry-negative"),
        "proc/sys/kernel/osrelease": fixture(PROC / "sys/kernel/osrelease"),
        "proc/slabinfo": fixture(PROC / "slabinfo"),
    }


def container(cgroup: str | None) -> ContainerRef:
    return ContainerRef(id=CID, name="probe-scout2", pid=8082, cgroup=cgroup)


def read(host: HostRoot, inventory: StaticInventory | None = None) -> Reading:
    ctx = ProbeContext(host, FakeClock(1000.0), (lambda: inventory) if inventory else None)
    return DentriesProbe().read(ctx)


# --- parsers -------------------------------------------------------------------------------


def test_parse_dentry_state_captured_6_18() -> None:
    assert parse_dentry_state(fixture(PROC / "sys/fs/dentry-state")) == DentryState(
        nr_dentry=5090, nr_unused=3242, age_limit=45, want_pages=0, nr_negative=818, dummy=0
    )


def test_parse_dentry_state_pre_5_0_layout_has_dummy_zeros() -> None:
    # Linux 4.x: "nr_dentry nr_unused age_limit want_pages dummy dummy".
    state = parse_dentry_state("125443\t110392\t45\t0\t0\t0\n")
    assert (state.nr_dentry, state.nr_unused, state.nr_negative) == (125443, 110392, 0)


@pytest.mark.parametrize("text", ["", "1 2 3 4 5", "1 2 3 4 5 6 7", "1 2 x 4 5 6"])
def test_parse_dentry_state_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="dentry-state"):
        parse_dentry_state(text)


def test_parse_slabinfo_captured_6_18() -> None:
    caches = parse_slabinfo(fixture(PROC / "slabinfo"))
    assert len(caches) == 235  # 237 lines minus the two header lines
    dentry = caches["dentry"]
    assert (dentry.active_objs, dentry.num_objs, dentry.objsize) == (5208, 5208, 192)
    assert (dentry.objperslab, dentry.pagesperslab) == (21, 1)
    assert (dentry.active_slabs, dentry.num_slabs) == (248, 248)
    assert dentry.size_bytes == 5208 * 192
    assert caches["ext4_inode_cache"].objsize == 1128


def test_parse_slabinfo_only_one_cache_gives_the_same_line() -> None:
    text = fixture(PROC / "slabinfo")
    assert parse_slabinfo(text, only="dentry") == {"dentry": parse_slabinfo(text)["dentry"]}
    assert parse_slabinfo(text, only="no-such-cache") == {}
    with pytest.raises(ValueError):
        parse_slabinfo("slabinfo - version: 1.1\ndentry 1 2 3 4 5\n", only="dentry")


def test_parse_slabinfo_rejects_other_versions() -> None:
    with pytest.raises(ValueError, match="version"):
        parse_slabinfo("slabinfo - version: 1.1\ndentry 1 2 3 4 5\n")


def test_parse_slabinfo_rejects_malformed_lines() -> None:
    with pytest.raises(ValueError, match="cannot parse line"):
        parse_slabinfo("slabinfo - version: 2.1\ndentry 1 2 192 21 : tunables 0 0 0\n")


def test_parse_flat_keyed_captured_v1_memory_stat_has_no_slab_keys() -> None:
    stat = parse_flat_keyed(fixture(V1_CGROUP / "memory.stat"))
    assert "cache" in stat and "rss" in stat
    assert not [k for k in stat if "slab" in k]


def test_parse_kernel_release() -> None:
    assert parse_kernel_release("6.18.44-fc-v595\n") == (6, 18)
    assert parse_kernel_release("4.19.0-27-amd64") == (4, 19)
    assert parse_kernel_release("garbage") is None


# --- cgroup hierarchy detection ------------------------------------------------------------


def test_find_memory_hierarchy_pure_v2(tmp_path: Path) -> None:
    host = make_host(tmp_path, {"sys/fs/cgroup/cgroup.controllers": "cpu io memory pids\n"})
    assert find_memory_hierarchy(host) == MemoryHierarchy(2, tmp_path / "sys/fs/cgroup")


def test_find_memory_hierarchy_hybrid_prefers_v1_memory(tmp_path: Path) -> None:
    host = make_host(
        tmp_path,
        {
            "sys/fs/cgroup/unified/cgroup.controllers": "\n",  # v2 mounted without controllers
            "sys/fs/cgroup/memory/memory.stat": "cache 0\n",
        },
    )
    assert find_memory_hierarchy(host) == MemoryHierarchy(1, tmp_path / "sys/fs/cgroup/memory")


def test_find_memory_hierarchy_v2_memory_in_unified(tmp_path: Path) -> None:
    host = make_host(tmp_path, {"sys/fs/cgroup/unified/cgroup.controllers": "memory pids\n"})
    assert find_memory_hierarchy(host) == MemoryHierarchy(2, tmp_path / "sys/fs/cgroup/unified")


def test_find_memory_hierarchy_none(tmp_path: Path) -> None:
    assert find_memory_hierarchy(make_host(tmp_path, {})) is None


def test_the_probes_look_at_the_hierarchy_is_kept_a_minute_on_the_real_host_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from remediator.probes import dentries

    looks: list[Path] = []

    def counted(host: HostRoot) -> MemoryHierarchy | None:
        looks.append(host.root)
        return MemoryHierarchy(1, host.root / "m")

    monkeypatch.setattr(dentries, "find_memory_hierarchy", counted)
    monkeypatch.setattr(dentries, "_HIERARCHY", {})
    real = HostRoot()
    first = memory_hierarchy(real, now=1000.0)
    assert memory_hierarchy(real, now=1000.0 + dentries.HIERARCHY_TTL - 1) is first
    assert looks == [Path("/")]
    memory_hierarchy(real, now=1000.0 + dentries.HIERARCHY_TTL)  # a minute on: looked at again
    memory_hierarchy(real, now=999.0)  # a clock that went back: looked at again
    assert looks == [Path("/")] * 3
    fixture_host = make_host(tmp_path, {})
    memory_hierarchy(fixture_host, now=1.0)
    memory_hierarchy(fixture_host, now=1.0)
    assert looks[3:] == [tmp_path, tmp_path]  # a fixture tree (tests change it): every time


# --- the probe -----------------------------------------------------------------------------


def test_probe_host_values_from_captured_files(tmp_path: Path) -> None:
    reading = read(make_host(tmp_path, proc_files()))
    assert reading.error is None
    assert dict(reading.values) == {
        "total": 5090,
        "unused": 3242,
        "negative": 818,
        "slab_bytes": 5208 * 192,
        # No samples remembered: the probe read twice, FIRST_RATE_SPAN apart (a fake clock).
        "growth_per_second": 0.0,
        "negative_projected": 818,
    }
    assert reading.taken_at == 1000.0
    assert reading.detail["age_limit"] == 45
    assert reading.detail["dentry_negative_policy"] == 0
    assert reading.detail["slab"]["num_objs"] == 5208
    assert reading.detail["cgroup_version"] is None
    assert reading.containers == ()


def test_probe_cgroup_v1_uses_kmem_usage(tmp_path: Path) -> None:
    files = proc_files()
    files[f"sys/fs/cgroup/memory/docker/{CID}/memory.stat"] = fixture(V1_CGROUP / "memory.stat")
    files[f"sys/fs/cgroup/memory/docker/{CID}/memory.kmem.usage_in_bytes"] = fixture(
        V1_CGROUP / "memory.kmem.usage_in_bytes"
    )
    files["sys/fs/cgroup/memory/memory.stat"] = "cache 0\n"
    host = make_host(tmp_path, files)
    reading = read(host, StaticInventory([container(f"/docker/{CID}")]))
    assert reading.detail["cgroup_version"] == 1
    assert reading.detail["slab_source"] == "memory.kmem.usage_in_bytes"
    [sample] = reading.containers
    assert sample.container.id == CID
    expected = int(fixture(V1_CGROUP / "memory.kmem.usage_in_bytes"))
    assert dict(sample.values) == {"slab_reclaimable_bytes": expected}


def test_probe_cgroup_v1_prefers_slab_reclaimable_when_memory_stat_has_it(tmp_path: Path) -> None:
    files = proc_files()
    files[f"sys/fs/cgroup/memory/docker/{CID}/memory.stat"] = "cache 0\nslab_reclaimable 4096\n"
    files[f"sys/fs/cgroup/memory/docker/{CID}/memory.kmem.usage_in_bytes"] = "999999\n"
    files["sys/fs/cgroup/memory/memory.stat"] = "cache 0\n"
    reading = read(make_host(tmp_path, files), StaticInventory([container(f"/docker/{CID}")]))
    assert reading.detail["slab_source"] == "memory.stat:slab_reclaimable"
    assert reading.containers[0].values["slab_reclaimable_bytes"] == 4096


def test_probe_cgroup_v2_uses_memory_stat_slab_reclaimable(tmp_path: Path) -> None:
    files = proc_files()
    files["sys/fs/cgroup/cgroup.controllers"] = fixture(V2_ROOT / "cgroup.controllers")
    files[f"sys/fs/cgroup/{V2_SCOPE}/memory.stat"] = fixture(V2_ROOT / V2_SCOPE / "memory.stat")
    reading = read(make_host(tmp_path, files), StaticInventory([container(f"/{V2_SCOPE}")]))
    assert reading.detail["cgroup_version"] == 2
    assert reading.detail["slab_source"] == "memory.stat:slab_reclaimable"
    assert dict(reading.containers[0].values) == {"slab_reclaimable_bytes": 2621440}


def test_probe_says_when_attribution_is_missing(tmp_path: Path) -> None:
    files = proc_files()
    files["sys/fs/cgroup/cgroup.controllers"] = "memory\n"
    host = make_host(tmp_path, files)
    down = read(host, StaticInventory(error="docker: list containers: connection refused"))
    assert down.error is None and down.values["negative"] > 0  # host-wide values still stand
    assert (down.containers, down.containers_error) == ((), "docker: list containers: connection refused")
    assert read(host, None).containers_error == "no container inventory configured"
    assert read(host, StaticInventory()).containers_error is None

    del files["sys/fs/cgroup/cgroup.controllers"]
    bare = read(make_host(tmp_path / "bare", files), StaticInventory())
    assert bare.containers_error is not None and "no memory cgroup hierarchy" in bare.containers_error


def test_probe_skips_container_whose_cgroup_is_gone_or_unknown(tmp_path: Path) -> None:
    files = proc_files()
    files["sys/fs/cgroup/cgroup.controllers"] = "memory\n"
    gone = ContainerRef(id="a" * 64, name="gone", cgroup="/docker/" + "a" * 64)
    unknown = ContainerRef(id="b" * 64, name="nocgroup", cgroup=None)
    reading = read(make_host(tmp_path, files), StaticInventory([gone, unknown]))
    assert reading.error is None
    assert reading.containers == ()
    assert reading.detail["containers_unreadable"] == ["gone", "nocgroup"]


def test_probe_without_slabinfo_has_no_slab_bytes(tmp_path: Path) -> None:
    files = proc_files()
    del files["proc/slabinfo"]  # e.g. not root: /proc/slabinfo is mode 0400
    reading = read(make_host(tmp_path, files))
    assert reading.error is None
    assert "slab_bytes" not in reading.values
    assert reading.detail["slabinfo"].startswith("unreadable: ")
    assert reading.values["total"] == 5090


@pytest.mark.parametrize("sysfs", ["none", "merged"])
def test_probe_without_dentry_cache_in_slabinfo(tmp_path: Path, sysfs: str) -> None:
    files = proc_files()
    if sysfs == "merged":  # a merged cache in sysfs falls back to slabinfo
        files |= slub_files() | {"sys/kernel/slab/dentry/aliases": "2\n"}  # shared with 2 more
    files["proc/slabinfo"] = "slabinfo - version: 2.1\n"  # which shows it under another name
    reading = read(make_host(tmp_path, files))
    assert "slab_bytes" not in reading.values
    assert "no 'dentry' cache" in reading.detail["slabinfo"]


def test_probe_old_kernel_reports_no_negative_metric(tmp_path: Path) -> None:
    files = proc_files()
    files["proc/sys/kernel/osrelease"] = "4.19.0-27-amd64\n"
    files["proc/sys/fs/dentry-state"] = "125443\t110392\t45\t0\t0\t0\n"
    reading = read(make_host(tmp_path, files))
    assert "negative" not in reading.values
    assert reading.values["total"] == 125443


def test_probe_without_dentry_state_is_an_error(tmp_path: Path) -> None:
    reading = read(make_host(tmp_path, {}))
    assert reading.error is not None and reading.error.startswith("dentry-state: ")
    assert reading.values == {}


def test_probe_spec_declares_metrics() -> None:
    spec = DentriesProbe.spec()
    assert spec.name == "dentries"
    assert [m.name for m in spec.metrics] == [
        "total",
        "unused",
        "negative",
        "negative_projected",
        "growth_per_second",
        "hash_buckets",
        "negative_per_bucket",
        "forecast_seconds",
        "lookup_slowdown",
        "lookup_ns",
        "lookup_baseline_ns",
        "slab_bytes",
        "slab_reclaimable_bytes",
        "failed_lookups_per_second",
        "slab_growth_bytes_per_second",
    ]
    per_container = spec.metric("slab_reclaimable_bytes")
    assert per_container is not None and per_container.per_container
    assert per_container.unit == "bytes"


def test_probe_cgroup_v1_reads_memory_stat_once_then_only_the_counter(tmp_path: Path) -> None:
    files = proc_files()
    stat_file = f"sys/fs/cgroup/memory/docker/{CID}/memory.stat"
    files[stat_file] = fixture(V1_CGROUP / "memory.stat")
    files[f"sys/fs/cgroup/memory/docker/{CID}/memory.kmem.usage_in_bytes"] = "4096\n"
    files["sys/fs/cgroup/memory/memory.stat"] = "cache 0\n"
    host = make_host(tmp_path, files)
    inventory = StaticInventory([container(f"/docker/{CID}")])
    first = read(host, inventory)
    (tmp_path / stat_file).unlink()  # not read again: the kernel's v1 memory.stat has no slab keys
    (tmp_path / f"sys/fs/cgroup/memory/docker/{CID}/memory.kmem.usage_in_bytes").write_text("8192\n")
    again = read(host, inventory)
    assert [dict(s.values)["slab_reclaimable_bytes"] for s in (*first.containers, *again.containers)] == [
        4096,
        8192,
    ]
    assert again.detail["slab_source"] == "memory.kmem.usage_in_bytes"
    assert "containers_unreadable" not in again.detail


# --- the dentry slab from SLUB's sysfs ------------------------------------------------------

SLUB = FIXTURES / "sys" / "linux-6.18-slub"


def slub_files() -> dict[str, str]:
    d = SLUB / "kernel" / "slab" / "dentry"
    return {f"sys/kernel/slab/dentry/{f.name}": f.read_text() for f in d.iterdir()}


def test_slub_sysfs_gives_the_slabinfo_line_captured_with_it(tmp_path: Path) -> None:
    host = make_host(tmp_path, slub_files())
    line = (SLUB / "slabinfo-dentry-line").read_text()
    want = parse_slabinfo("slabinfo - version: 2.1\n" + line)["dentry"]
    got, source = read_slab_cache(host, "dentry", 1000.0)
    assert (got, source) == (want, "sysfs")


def test_probe_reads_the_slab_from_sysfs_before_slabinfo(tmp_path: Path) -> None:
    files = proc_files() | slub_files()
    reading = read(make_host(tmp_path, files))
    assert reading.detail["slab"]["source"] == "sysfs"
    assert reading.values["slab_bytes"] == 87381 * 192
    del files["sys/kernel/slab/dentry/objects"]  # half readable: slabinfo decides
    reading = read(make_host(tmp_path / "half", files))
    assert reading.detail["slab"]["source"] == "slabinfo"
    assert reading.values["slab_bytes"] == parse_slabinfo(fixture(PROC / "slabinfo"))["dentry"].size_bytes


def test_slub_sysfs_garbage_is_an_error_not_a_number(tmp_path: Path) -> None:
    files = slub_files()
    files["sys/kernel/slab/dentry/total_objects"] = "lots\n"
    with pytest.raises(ValueError):
        parse_slub_sysfs(make_host(tmp_path, files).sys / "kernel" / "slab" / "dentry", "dentry")
