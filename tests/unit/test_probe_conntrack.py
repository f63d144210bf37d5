"""Conntrack entries attributed to containers by their source addresses (limits_conntrack), on
captured files and fixture trees."""

from __future__ import annotations

import os
from pathlib import Path

from remediator.model import ContainerRef
from remediator.probes.limits_conntrack import (
    conntrack_by_container,
    parse_conntrack_sources,
    parse_fib_local,
)
from tests.helpers import make_host

PROC = Path(__file__).resolve().parent.parent / "fixtures" / "proc" / "linux-6.18"
FIB = (PROC / "container-net/fib_trie").read_text()
UDP = (
    "ipv4     2 udp      17 29 src=172.17.0.2 dst=172.17.0.1 sport=40000 dport={port} [UNREPLIED] "
    "src=172.17.0.1 dst=172.17.0.2 sport={port} dport=40000 mark=0 zone=0 use=2\n"
)
V6 = "ipv6     10 tcp      6 50 SYN_SENT src=fd00::2 dst=fd00::1 sport=1 dport=2 [UNREPLIED] src=fd00::1\n"


def test_parse_conntrack_sources_counts_the_original_source() -> None:
    captured = (PROC / "net/nf_conntrack").read_text()
    assert parse_conntrack_sources(captured) == {"127.0.0.1": 1}
    text = captured + "".join(UDP.format(port=p) for p in range(3)) + V6 + "garbage\n"
    assert parse_conntrack_sources(text) == {"127.0.0.1": 1, "172.17.0.2": 3, "fd00::2": 1}


def test_parse_fib_local_finds_the_containers_address_not_loopback() -> None:
    assert parse_fib_local(FIB) == {"172.17.0.2"}
    assert parse_fib_local("") == frozenset()


def table_host(tmp_path: Path, entries: int) -> tuple[object, list[ContainerRef]]:
    lines = "".join(UDP.format(port=p) for p in range(entries)) + (PROC / "net/nf_conntrack").read_text()
    host = make_host(
        tmp_path,
        {
            "proc/net/nf_conntrack": lines,
            "proc/50/net/fib_trie": FIB,
            "proc/60/net/fib_trie": FIB.replace("172.17.0.2", "172.17.0.3"),
        },
    )
    (tmp_path / "proc/1/ns").mkdir(parents=True)
    os.symlink("net:[4026531840]", tmp_path / "proc/1/ns/net")
    for pid, ns in ((50, "net:[4026532001]"), (60, "net:[4026531840]")):  # 60: --network host
        (tmp_path / f"proc/{pid}/ns").mkdir(parents=True)
        os.symlink(ns, tmp_path / f"proc/{pid}/ns/net")
    refs = [
        ContainerRef("a" * 64, "flood", pid=50),
        ContainerRef("b" * 64, "hostnet", pid=60),
        ContainerRef("c" * 64, "stopped"),
    ]
    return host, refs


def test_entries_go_to_the_container_whose_address_sent_them(tmp_path: Path) -> None:
    host, refs = table_host(tmp_path, 300)
    detail: dict[str, object] = {}
    held = conntrack_by_container(host, refs, 301, 400, detail)  # type: ignore[arg-type]
    assert held == {"a" * 64: 300}
    assert detail["conntrack_by_source"] == {"172.17.0.2": 300, "127.0.0.1": 1}


def test_the_table_is_not_read_below_half_full(tmp_path: Path) -> None:
    host, refs = table_host(tmp_path, 300)
    detail: dict[str, object] = {}
    assert conntrack_by_container(host, refs, 301, 700, detail) == {}  # type: ignore[arg-type]
    assert conntrack_by_container(host, refs, 301, None, detail) == {}  # type: ignore[arg-type]
    assert detail == {}


def test_an_unreadable_table_is_said(tmp_path: Path) -> None:
    host, refs = table_host(tmp_path, 1)
    (tmp_path / "proc/net/nf_conntrack").unlink()
    detail: dict[str, object] = {}
    assert conntrack_by_container(host, refs, 10, 10, detail) == {}  # type: ignore[arg-type]
    assert str(detail["conntrack"]).startswith("entries not attributed: /proc/net/nf_conntrack")
