"""The shared kernel pools: which sysctls are pool limits, their ceilings, and "no limit" values.

The limits probe uses it to leave "no limit" values out of its limits; raise-sysctl uses it as
its allow-list and for its ceilings.

Only limits that bound a pool every container shares are here. A sysctl that is a switch
(`kernel.panic_on_oops`, `kernel.modules_disabled`) or a per-process/per-netns knob
(`vm.max_map_count`, `fs.nr_open`, `net.core.somaxconn`) is refused at validate time: "raise"
would flip a boolean, or change nothing shared.

Each ceiling is a formula of the host's RAM (MemTotal, bytes), so a policy needs no host-specific
number; a policy's `ceiling` overrides it. Each `PoolKey` below carries its formula and the reason
for it; docs/runbooks/shared-limits.md shows the same table.

"No limit": some values mean the pool is unbounded and raising them is nonsense: LONG_MAX or more
(systemd as PID 1 sets fs.file-max to 9223372036854775807), a negative value, and 0 for the pipe
limits (pipe(7): "0 means no limit"). No percentage of such a value is ever computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

KiB = 1024
LONG_MAX = 2**63 - 1
# Values at or above this are "no limit": LONG_MAX itself and anything near it (ULONG_MAX read
# through a signed parser, LONG_MAX minus a few that some tools write).
UNLIMITED_FROM = 2**62
FUTEX_TID_MASK = 0x3FFFFFFF  # the kernel's own upper bound on threads-max (kernel/fork.c)


@dataclass(frozen=True)
class PoolKey:
    key: str
    pool: str  # what the limit bounds, for messages
    formula: str  # the ceiling, as documented
    ceiling: Callable[[int], int]  # MemTotal in bytes -> ceiling
    why: str
    zero_is_unlimited: bool = False

    def unlimited(self, value: int) -> bool:
        """True when `value` means "no limit" for this key (never raise, never take a percentage)."""
        return value < 0 or value >= UNLIMITED_FROM or (self.zero_is_unlimited and value == 0)


def _const(n: int) -> Callable[[int], int]:
    return lambda _mem: n


POOL_KEYS: dict[str, PoolKey] = {
    p.key: p
    for p in (
        PoolKey(
            "fs.file-max",
            "open file handles",
            "2 x MemTotal_KiB / 10",
            lambda m: 2 * (m // KiB // 10),
            "the kernel default is ~10% of RAM in KiB, ~1 KiB per file (files_maxfiles_init)",
        ),
        PoolKey(
            "fs.inotify.max_user_watches",
            "inotify watches per uid",
            "min(1048576, 5% RAM / 1312 B)",
            lambda m: min(1_048_576, m * 5 // 100 // 1312),
            "a watch pins ~1.3 KiB (INOTIFY_WATCH_COST); the default is 1% of RAM, at most 1M",
        ),
        PoolKey(
            "fs.inotify.max_user_instances",
            "inotify instances per uid",
            "1024",
            _const(1024),
            "each instance has its own event queue (max_queued_events): 8x the default 128",
        ),
        PoolKey(
            "kernel.pid_max",
            "pids",
            "4194304",
            _const(4_194_304),
            "PID_MAX_LIMIT on 64-bit: the kernel refuses more",
        ),
        PoolKey(
            "kernel.threads-max",
            "tasks",
            "MemTotal / 64 KiB",
            lambda m: min(FUTEX_TID_MASK, m // (64 * KiB)),
            "the kernel default is RAM / (8 x 16 KiB stack); twice that caps stacks at ~25% of RAM",
        ),
        PoolKey(
            "fs.aio-max-nr",
            "aio requests",
            "1048576",
            _const(1_048_576),
            "16x the default 65536; each request pins ring memory",
        ),
        PoolKey(
            "kernel.keys.maxkeys",
            "keys per uid",
            "1000000",
            _const(1_000_000),
            "what root itself gets by default (kernel.keys.root_maxkeys)",
        ),
        PoolKey(
            "kernel.keys.maxbytes",
            "key bytes per uid",
            "25000000",
            _const(25_000_000),
            "what root itself gets by default (kernel.keys.root_maxbytes)",
        ),
        PoolKey(
            "net.netfilter.nf_conntrack_max",
            "conntrack entries",
            "min(4194304, 5% RAM / 384 B)",
            lambda m: min(4_194_304, m * 5 // 100 // 384),
            "an entry is ~320 B plus its hash slot",
        ),
        PoolKey(
            "net.core.netdev_max_backlog",
            "per-CPU input queue",
            "16384",
            _const(16_384),
            "a per-CPU queue of packets: 16x the default 1000",
        ),
        PoolKey(
            "fs.pipe-user-pages-soft",
            "pipe pages per uid",
            "5% RAM / 4 KiB",
            lambda m: m * 5 // 100 // (4 * KiB),
            "pipe buffers are pages of unswappable memory",
            zero_is_unlimited=True,
        ),
        PoolKey(
            "fs.epoll.max_user_watches",
            "epoll watches per uid",
            "8% RAM / 160 B",
            lambda m: m * 8 // 100 // 160,
            "twice the kernel default (4% of low memory / ~160 B per epitem, epoll(7))",
        ),
    )
}


def pool_key(key: str) -> PoolKey | None:
    return POOL_KEYS.get(key.replace("/", "."))


def allowed_keys_message() -> str:
    return ", ".join(sorted(POOL_KEYS))


def parse_mem_total(meminfo: str) -> int:
    """/proc/meminfo -> MemTotal in bytes ("MemTotal:       24683584 kB")."""
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                unit = fields[2] if len(fields) > 2 else "B"
                return int(fields[1]) * (KiB if unit == "kB" else 1)
            break
    raise ValueError("meminfo: no MemTotal line")


__all__ = [
    "LONG_MAX",
    "POOL_KEYS",
    "UNLIMITED_FROM",
    "PoolKey",
    "allowed_keys_message",
    "parse_mem_total",
    "pool_key",
]
