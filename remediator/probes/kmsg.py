"""The kernel log as the kernel still holds it: /dev/kmsg records, read without blocking.

Only boot-time facts are wanted from it (the dentry hash size), and those never change while
the host runs, so what was found is kept for the life of the process.
"""

from __future__ import annotations

import os
from pathlib import Path

from remediator.host import HostRoot
from remediator.probes.base import ProbeContext
from remediator.probes.dentry_hash import (
    parse_dentry_hash_entries,
    parse_meminfo_total,
    sized_dentry_hash_entries,
)

# Per host root, what the kernel log said of the dentry hash: (the bucket count, None when the
# log has no such line; whether the log could be read at all). Read and searched once per
# process: boot lines do not come back once gone, and the records themselves are not kept.
_buckets: dict[str, tuple[int | None, bool]] = {}


def logged_dentry_hash_buckets(host: HostRoot) -> tuple[int | None, bool]:
    """(the bucket count from the kernel log or None, whether the log was readable), once per
    process and host root."""
    key = str(host.root)
    if key not in _buckets:
        lines = kernel_log(host)
        _buckets[key] = (parse_dentry_hash_entries(lines) if lines is not None else None, lines is not None)
    return _buckets[key]


def kernel_log(host: HostRoot) -> list[str] | None:
    """The kernel log records still in the ring buffer, from /dev/kmsg (non-blocking), or None.

    Read each cycle only until the bucket line is found would be cheaper, but the ring buffer is
    finite: on a long-running host the boot lines are gone, and the answer is then the estimate.
    """
    path = host.root / "dev" / "kmsg"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    lines: list[str] = []
    try:
        for _ in range(100_000):  # the ring buffer holds far fewer records
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:
                continue  # EPIPE: records were overwritten while reading; go on with the next
            except OSError:
                break
            if not record:
                break
            lines.append(record.decode("utf-8", "replace"))
    finally:
        os.close(fd)
    return lines


def dentry_hash_buckets(ctx: ProbeContext) -> tuple[int | None, str]:
    """(bucket count, how it was found): the kernel log, else the configured value, else the
    kernel's own sizing rule applied to MemTotal (an estimate, see dentry_hash.py)."""
    host = ctx.host
    found, readable = logged_dentry_hash_buckets(host)
    if found is not None:
        return found, "kernel log"
    if ctx.options.dentry_hash_buckets is not None:
        return ctx.options.dentry_hash_buckets, "configured (REMEDIATOR_DENTRY_HASH_BUCKETS)"
    estimated = _ESTIMATED.get(host.proc)
    if estimated is not None:
        return estimated
    try:
        total = parse_meminfo_total(host.read_text(host.proc / "meminfo"))
    except (OSError, ValueError) as exc:
        return None, f"unknown: kernel log has no bucket line, none configured, meminfo: {exc}"
    why = "no bucket line in the kernel log" if readable else "kernel log unreadable"
    source = f"estimated from MemTotal by the kernel's sizing rule ({why})"
    estimated = sized_dentry_hash_entries(total), source
    if host.is_real:
        _ESTIMATED[host.proc] = estimated
    return estimated


# The estimate per proc root of the running kernel: the table was sized at boot and is never
# resized, so MemTotal (meminfo, ~0.15 ms to generate) is read once per process.
_ESTIMATED: dict[Path, tuple[int, str]] = {}


__all__ = ["dentry_hash_buckets", "kernel_log", "logged_dentry_hash_buckets"]
