"""The `limits` probe's pools that one kernel counter each describes: aio, conntrack, keys,
and netdev backlog drops. Read apart from the fd scan because they cost one read each.

Kept between readings of one process: the previous softnet_stat drop counters, so that
`netdev_backlog_drops` is new drops since then (a counter's first reading is 0).
"""

from __future__ import annotations

import os
from typing import Any

from remediator import handles
from remediator.host import HostRoot
from remediator.probes.limits_parse import parse_key_users, parse_softnet_drops

_SOFTNET: dict[str, tuple[int, ...]] = {}


def read_counter_pools(
    host: HostRoot,
    sysctls: dict[str, int],
    values: dict[str, float],
    limits: dict[str, float],
    detail: dict[str, Any],
    problems: list[str],
) -> None:
    """The pools read from one kernel counter each: aio, conntrack, keys, softnet drops."""
    if "fs.aio-nr" in sysctls:
        values["aio_requests"] = sysctls["fs.aio-nr"]
    if "net.netfilter.nf_conntrack_count" in sysctls:
        values["conntrack_entries"] = sysctls["net.netfilter.nf_conntrack_count"]
        if host.is_real and not _in_host_netns(host):
            detail["conntrack"] = "read in a network namespace other than PID 1's: not the host's table"
    else:
        detail["conntrack"] = "nf_conntrack module not loaded (no net.netfilter.nf_conntrack_count)"
    try:
        users = parse_key_users(handles.read_text(host, host.proc / "key-users"))
    except FileNotFoundError:
        users = ()  # CONFIG_KEYS off
    except (OSError, ValueError) as exc:
        problems.append(f"key-users: {exc}")
        users = ()
    if users:
        worst = max(users, key=lambda u: (u.keys / max(1, u.max_keys), u.uid))
        values["keys_max_uid"], limits["keys_max_uid"] = worst.keys, worst.max_keys
        worst_b = max(users, key=lambda u: (u.bytes / max(1, u.max_bytes), u.uid))
        values["key_bytes_max_uid"], limits["key_bytes_max_uid"] = worst_b.bytes, worst_b.max_bytes
        detail["keys_by_uid"] = {
            str(u.uid): {"keys": u.keys, "max_keys": u.max_keys, "bytes": u.bytes, "max_bytes": u.max_bytes}
            for u in users
        }
    try:
        drops = parse_softnet_drops(handles.read_text(host, host.proc / "net" / "softnet_stat"))
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        problems.append(f"softnet_stat: {exc}")
        return
    previous = _SOFTNET.get(str(host.proc))
    _SOFTNET[str(host.proc)] = drops
    detail["netdev_backlog_drops_total"] = sum(drops)
    # A counter: the first reading of a process has no "since"; a CPU going offline shrinks it.
    values["netdev_backlog_drops"] = (
        max(0, sum(drops) - sum(previous)) if previous is not None and len(previous) == len(drops) else 0
    )


def _in_host_netns(host: HostRoot) -> bool:
    try:
        return os.readlink(host.proc / "self" / "ns" / "net") == os.readlink(host.proc / "1" / "ns" / "net")
    except OSError:
        return True  # cannot tell (no permission on PID 1): do not cry wolf


__all__ = ["read_counter_pools"]
