"""eBPF attribution, the pure parts: the stub kernel tree, the worker's output, cgroup id ->
container, and the merge with memcg slab attribution."""

from __future__ import annotations

import json
import os
from pathlib import Path

from remediator.clock import FakeClock
from remediator.model import ContainerRef, ContainerSample
from remediator.probes import dentry_attribution
from remediator.probes.base import ProbeContext, ProbeOptions
from remediator.probes.dentry_attribution import ebpf_counts, merge, wants_attribution
from remediator.probes.ebpf import (
    LookupCounts,
    ProcessCount,
    cgroup_ids,
    parse_release3,
    parse_worker_output,
    stub_files,
    unavailable,
    write_stub_tree,
)
from remediator.probes.ebpf_worker import PATH_SYSCALLS_X86_64, program_text
from remediator.probes.memory import DictMemory
from tests.helpers import make_host

T = ContainerRef(id="t" * 64, name="trasher", image="busybox", pid=10, cgroup="/docker/" + "t" * 64)
B = ContainerRef(id="b" * 64, name="bystander", image="busybox", pid=20, cgroup="/docker/" + "b" * 64)


def test_stub_tree_has_the_files_bcc_needs(tmp_path: Path) -> None:
    write_stub_tree(tmp_path, (6, 18, 44))
    version = (tmp_path / "include/linux/version.h").read_text()
    assert f"#define LINUX_VERSION_CODE {(6 << 16) + (18 << 8) + 44}" in version
    assert "#define CONFIG_BPF_SYSCALL 1" in (tmp_path / "include/linux/kconfig.h").read_text()
    assert "typedef __u64 __aligned_u64" in (tmp_path / "include/linux/types.h").read_text()
    assert sorted(stub_files((6, 1, 300))) == sorted(
        str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()
    )
    assert "+ 255\n" not in stub_files((6, 1, 300))["include/linux/version.h"]  # patch capped


def test_parse_release3() -> None:
    assert parse_release3("6.18.44-fc-v595\n") == (6, 18, 44)
    assert parse_release3("6.1") == (6, 1, 0)
    assert parse_release3("garbage") == (0, 0, 0)


def test_program_text_counts_only_path_syscalls() -> None:
    text = program_text()
    assert "RAW_TRACEPOINT_PROBE(sys_exit)" in text and "(long)ctx->args[1] != -2" in text
    assert all(f"case {nr}:" in text for nr in PATH_SYSCALLS_X86_64)
    assert "perf_submit" not in text  # never one event per lookup


def test_parse_worker_output() -> None:
    out = {
        "window_seconds": 2.0,
        "load_seconds": 0.3,
        "total": 1000,
        "by_cgroup": {"77": 900, "1": 100},
        "by_pid": [{"pid": 5, "cgroup_id": 77, "comm": "trasher", "count": 900}],
        "maps_full": False,
    }
    got = parse_worker_output("noise\n" + json.dumps(out) + "\n")
    assert got == LookupCounts(
        2.0, 0.3, 1000, {77: 900, 1: 100}, (ProcessCount(5, "trasher", 77, 900),), False
    )
    assert parse_worker_output(json.dumps({"error": "no bcc module for /x: No module named 'bcc'"})) == (
        "no bcc module for /x: No module named 'bcc'"
    )
    assert str(parse_worker_output("")).startswith("ebpf worker printed no JSON")
    assert str(parse_worker_output('{"total": 1}')).startswith("ebpf worker output malformed")


def test_unavailable_on_a_fixture_root(tmp_path: Path) -> None:
    assert unavailable(make_host(tmp_path, {})) == "host root is not / (eBPF sees only the real kernel)"


def test_cgroup_ids_from_v2_path_of_the_init_process(tmp_path: Path) -> None:
    host = make_host(
        tmp_path,
        {
            "proc/10/cgroup": f"0::/docker/{T.id}\n4:memory:/docker/{T.id}\n",
            f"sys/fs/cgroup/unified/docker/{T.id}/cgroup.procs": "10\n",
        },
    )
    ino = os.stat(tmp_path / f"sys/fs/cgroup/unified/docker/{T.id}").st_ino
    assert cgroup_ids(host, [T, B]) == {ino: T}


COUNTS = {
    "at": 0.0,
    "window_seconds": 2.0,
    "total": 1000,
    "by_cgroup": {"77": 800, "88": 0, "1": 200},
    "by_pid": [
        {"pid": 5, "comm": "trasher", "cgroup_id": 77, "count": 790},
        {"pid": 6, "comm": "sh", "cgroup_id": 77, "count": 10},
    ],
}


def test_merge_ranks_by_lookups_and_names_the_process() -> None:
    samples = [
        ContainerSample(B, {"slab_reclaimable_bytes": 3e6}),
        ContainerSample(T, {"slab_reclaimable_bytes": 1e6, "slab_growth_bytes_per_second": 5e4}),
    ]
    merged, top = merge(samples, COUNTS, {77: T, 88: B})
    assert {s.container.name: s.values["failed_lookups_per_second"] for s in merged} == {
        "bystander": 0.0,
        "trasher": 400.0,
    }
    assert top[0]["container"] == "trasher" and top[0]["share"] == 0.8
    assert top[0]["processes"][0] == {"pid": 5, "comm": "trasher", "per_second": 395.0}
    assert top[0]["sources"] == ["memcg", "ebpf"] and top[0]["slab_share"] == 0.25


def test_merge_without_ebpf_ranks_by_slab_growth() -> None:
    samples = [
        ContainerSample(B, {"slab_reclaimable_bytes": 3e6, "slab_growth_bytes_per_second": 0.0}),
        ContainerSample(T, {"slab_reclaimable_bytes": 1e6, "slab_growth_bytes_per_second": 5e4}),
    ]
    merged, top = merge(samples, None, {})
    assert merged == samples
    assert [t["container"] for t in top] == ["trasher", "bystander"]
    assert "share" not in top[0] and top[0]["sources"] == ["memcg"]


def test_wants_attribution_edges() -> None:
    assert not wants_attribution({"negative_per_bucket": 0.99})
    assert wants_attribution({"negative_per_bucket": 1.0})
    assert wants_attribution({"negative_per_bucket": 0.1, "forecast_seconds": 600.0})
    assert not wants_attribution({"negative_per_bucket": 0.1, "forecast_seconds": 601.0})


def test_ebpf_counts_off_not_needed_and_reused(tmp_path: Path) -> None:
    host = make_host(tmp_path, {})
    memory = DictMemory()
    off = ProbeContext(host, FakeClock(), options=ProbeOptions(ebpf="off"))
    assert ebpf_counts(off, {"negative_per_bucket": 5.0}, 0.0) == (None, "off (REMEDIATOR_EBPF=off)")
    auto = ProbeContext(host, FakeClock(), memory=memory)
    assert ebpf_counts(auto, {"negative_per_bucket": 0.1}, 0.0)[1].startswith("not needed")
    # Needed, but on a fixture root BCC cannot run: says why.
    none, why = ebpf_counts(auto, {"negative_per_bucket": 5.0}, 0.0)
    assert none is None and why == "unavailable: host root is not / (eBPF sees only the real kernel)"
    dentry_attribution._last[str(host.root)] = {**COUNTS, "at": 100.0}
    got, why = ebpf_counts(auto, {"negative_per_bucket": 5.0}, 110.0)
    assert got is not None and got["total"] == 1000 and why == "reused from 10s ago"


def test_contributors_table_names_container_image_process_rate_share() -> None:
    from remediator.model import Reading
    from remediator.render import contributors_table

    samples = [ContainerSample(T, {"slab_reclaimable_bytes": 1e6, "slab_growth_bytes_per_second": 5e4})]
    _, top = merge(samples, COUNTS, {77: T})
    text = contributors_table(
        {"dentries": Reading("dentries", 0.0, detail={"attribution": {"ebpf": "measured", "top": top}})}
    )
    line = next(x for x in text.splitlines() if "trasher" in x)
    assert f"trasher {T.short_id}" in line and "busybox" in line and "80%" in line and "trasher[5]" in line
    assert contributors_table({"dentries": Reading("dentries", 0.0)}) == ""


def test_kept_stub_tree_is_written_once_per_release_and_reused(tmp_path: Path) -> None:
    from remediator.probes.ebpf import kept_stub_tree

    root = tmp_path / "bcc"
    first = kept_stub_tree(root, (6, 18, 44))
    assert first == root / "6.18.44" and (first / "include" / "linux" / "version.h").is_file()
    marker = os.stat(first / "include" / "linux" / "version.h").st_ino
    again = kept_stub_tree(root, (6, 18, 44))
    assert again == first and os.stat(again / "include" / "linux" / "version.h").st_ino == marker
    other = kept_stub_tree(root, (6, 1, 0))
    assert other == root / "6.1.0" and other != first
    # No half-written trees are left behind.
    assert sorted(p.name for p in root.iterdir()) == ["6.1.0", "6.18.44"]
