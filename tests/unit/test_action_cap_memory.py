"""cap-memory's limits (pure) and its read-back against a fixture cgroup tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from remediator.actions.cap_memory import CgroupMemory, new_limits

Mi = 1024 * 1024


@pytest.mark.parametrize(
    ("old_mem", "old_swap", "anon", "requested", "expected"),
    [
        (1024 * Mi, -1, 100 * Mi, None, (164 * Mi, -1)),  # floor, unlimited swap stays unlimited
        (1024 * Mi, 2048 * Mi, 100 * Mi, None, (164 * Mi, 1188 * Mi)),  # the swap allowance is kept
        (0, 0, 100 * Mi, None, (164 * Mi, -1)),  # no limit before: swap stays unlimited
        (1024 * Mi, -1, 100 * Mi, 50 * Mi, (164 * Mi, -1)),  # never below anon + headroom
        (1024 * Mi, -1, 100 * Mi, 300 * Mi, (300 * Mi, -1)),
        (1024 * Mi, -1, 100 * Mi + 1, None, (164 * Mi + 4096, -1)),  # page-rounded up
        (0, 0, 0, None, (64 * Mi, -1)),
    ],
)
def test_new_limits(
    old_mem: int, old_swap: int, anon: int, requested: int | None, expected: tuple[int, int]
) -> None:
    assert new_limits(old_mem, old_swap, anon, 64 * Mi, requested) == expected


def test_no_cap_when_already_at_or_below() -> None:
    out = new_limits(100 * Mi, -1, 90 * Mi, 64 * Mi, None)
    assert isinstance(out, str) and "already at or below" in out


@pytest.mark.parametrize("version", [1, 2])
def test_cgroup_reads(tmp_path: Path, version: int) -> None:
    from tests.helpers import make_host

    rel = "docker/" + "a" * 64
    if version == 1:
        files = {
            "sys/fs/cgroup/memory/memory.stat": "rss 0\n",
            f"sys/fs/cgroup/memory/{rel}/memory.stat": "rss 10\ntotal_rss 4096\ncache 5\n",
            f"sys/fs/cgroup/memory/{rel}/memory.limit_in_bytes": "268435456\n",
            "proc/42/cgroup": f"9:memory:/{rel}\n",
        }
    else:
        files = {
            "sys/fs/cgroup/cgroup.controllers": "cpu memory pids\n",
            f"sys/fs/cgroup/{rel}/memory.stat": "anon 8192\nfile 5\n",
            f"sys/fs/cgroup/{rel}/memory.max": "max\n",
            "proc/42/cgroup": f"0::/{rel}\n",
        }
    cg = CgroupMemory(make_host(tmp_path, files), 42)
    assert cg.anon() == (4096 if version == 1 else 8192)
    assert cg.limit() == (268435456 if version == 1 else None)
