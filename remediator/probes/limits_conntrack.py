"""Conntrack entries per container: who fills the host's nf_conntrack table.

The table's count is per network namespace, compared with one global nf_conntrack_max
(net/netfilter/nf_conntrack_core.c __nf_conntrack_alloc). A bridged container's traffic to the
host or through its NAT is tracked in the host's namespace, with the container's own address as
the original source: that is what fills the host's table and makes the host's own connects
time out ("nf_conntrack: table full, dropping packet").

So an entry of the host's /proc/net/nf_conntrack (CONFIG_NF_CONNTRACK_PROCFS) is attributed to
the container whose network namespace holds its original source address as a local address
(/proc/<pid>/net/fib_trie of the container's init process, "/32 host LOCAL"). Containers on the
host's network share the host's addresses and are not attributed; IPv6 entries are counted per
source but not mapped (the bundled bridge is IPv4).

Bounded: the table (up to nf_conntrack_max lines, ~150 B each) is read only when the count is at
least ATTRIBUTE_FROM of the limit, i.e. when the policies are about to need it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from remediator.host import HostRoot
from remediator.model import ContainerRef

ATTRIBUTE_FROM = 0.5  # of nf_conntrack_max: below it nobody is about to run out
TOP_SOURCES = 10


def parse_conntrack_sources(text: str) -> Counter[str]:
    """/proc/net/nf_conntrack -> entries per original source address.

    Each line: "ipv4 2 tcp 6 82 TIME_WAIT src=A dst=B sport=.. dport=.. src=B dst=A ..."; the
    first src= is the original direction's source (the reply tuple follows)."""
    sources: Counter[str] = Counter()
    for line in text.splitlines():
        at = line.find(" src=")
        if at < 0:
            continue
        end = line.find(" ", at + 5)
        sources[line[at + 5 : end if end > 0 else len(line)]] += 1
    return sources


def parse_fib_local(text: str) -> frozenset[str]:
    """/proc/<pid>/net/fib_trie -> the namespace's local IPv4 addresses (not 127/8).

    An address line "|-- 172.17.0.2" is followed by its leaf lines; "/32 host LOCAL" marks an
    address of this namespace (net/ipv4/fib_trie.c fib_trie_seq_show)."""
    local: set[str] = set()
    last: str | None = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|-- ") or s.startswith("+-- "):
            last = s[4:].split("/", 1)[0].strip()
        elif last is not None and s.startswith("/32 host LOCAL") and not last.startswith("127."):
            local.add(last)
    return frozenset(local)


def conntrack_by_container(
    host: HostRoot, refs: Sequence[ContainerRef], count: float, limit: float | None, detail: dict[str, Any]
) -> dict[str, int]:
    """Entries per container id (only those with any), when the table is full enough to matter."""
    if not limit or count < ATTRIBUTE_FROM * limit:
        return {}
    try:
        sources = parse_conntrack_sources(host.read_text(host.proc / "net" / "nf_conntrack"))
    except OSError as exc:
        detail["conntrack"] = f"entries not attributed: /proc/net/nf_conntrack: {exc.strerror or exc}"
        return {}
    detail["conntrack_by_source"] = dict(sources.most_common(TOP_SOURCES))
    try:
        host_ns = os.readlink(host.proc / "1" / "ns" / "net")
    except OSError:
        host_ns = None
    owner: dict[str, str] = {}
    for ref in refs:
        if ref.pid is None:
            continue
        pid_dir = host.proc / str(ref.pid)
        try:
            if host_ns is not None and os.readlink(pid_dir / "ns" / "net") == host_ns:
                continue  # --network host: its addresses are the host's
            addresses = parse_fib_local(host.read_text(pid_dir / "net" / "fib_trie"))
        except OSError:
            continue  # gone or not readable: not attributed
        for a in addresses:
            owner.setdefault(a, ref.id)
    held: Counter[str] = Counter()
    for address, n in sources.items():
        if (cid := owner.get(address)) is not None:
            held[cid] += n
    return dict(held)


__all__ = ["ATTRIBUTE_FROM", "conntrack_by_container", "parse_conntrack_sources", "parse_fib_local"]
