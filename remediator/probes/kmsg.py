"""The kernel log as the kernel still holds it: /dev/kmsg records, read without blocking.

Only boot-time facts are wanted from it (the dentry hash size), and those never change while
the host runs, so what was found is kept for the life of the process.
"""

from __future__ import annotations

import os

from remediator.host import HostRoot

_cache: dict[str, list[str] | None] = {}


def kernel_log_cached(host: HostRoot) -> list[str] | None:
    """`kernel_log` once per process and host root: boot lines do not come back once gone."""
    key = str(host.root)
    if key not in _cache:
        _cache[key] = kernel_log(host)
    return _cache[key]


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


__all__ = ["kernel_log", "kernel_log_cached"]
