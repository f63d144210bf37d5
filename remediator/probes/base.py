"""The probe interface: read the host, return one typed `Reading`.

A probe reads and parses; parsing lives in pure `parse_*` functions tested on captured kernel
files. A probe never changes the host. When it cannot read at all it returns a Reading with
`error` set (the cycle goes on); a metric it does not have is simply absent ("no data").
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import ClassVar, Protocol, TypeVar

from remediator.clock import Clock
from remediator.handles import HeldPath
from remediator.host import HostRoot
from remediator.model import ContainerRef, Reading
from remediator.policy.catalog import MetricSpec, ProbeSpec
from remediator.probes.memory import ProbeMemory

_native: ModuleType | None
try:
    from remediator.probes import _batch as _native
except ImportError:  # not built: the same listing through os.scandir
    _native = None


def list_processes(proc: Path | str) -> dict[int, int]:
    """{pid: inode of <proc>/<pid>}. The inode comes with the listing (procfs instantiates each
    entry to list it), and a new process under a reused pid gets a new one, so it names the
    process at no cost. Raises OSError when `proc` cannot be listed. In C when it built (no
    DirEntry per process: 0.25 ms instead of 0.34 for 270 processes here)."""
    if _native is not None:
        listing: dict[int, int] = _native.list_pids(str(proc))
        return listing
    with os.scandir(proc) as entries:
        return {int(e.name): e.inode() for e in entries if e.name.isdigit() and e.name.isascii()}


class Inventory(Protocol):
    """The containers on this host and which one a process or cgroup belongs to.

    `error` is set when the list could not be had (Docker unreachable): the inventory is then
    empty, and readings say so in `containers_error` instead of reporting zero containers.
    """

    @property
    def error(self) -> str | None: ...

    def containers(self) -> list[ContainerRef]: ...

    def container_of_pid(self, pid: int) -> ContainerRef | None: ...

    def container_of_cgroup(self, cgroup_path: str) -> ContainerRef | None: ...


@dataclass(frozen=True)
class ProbeOptions:
    """Host facts an operator may state when the probe cannot find them (settings.py)."""

    # The dentry hash table's bucket count (boot option dhash_entries=, or the kernel log line
    # "Dentry cache hash table entries: N"). None: the probe finds it itself.
    dentry_hash_buckets: int | None = None
    # Where the canary may make (and remove) its run directories: STATE_DIR/canary on the
    # host's real filesystem. None (read-only runs such as audit): the canary measures nothing.
    scratch_dir: Path | None = None
    # BCC attribution of failed lookups (probes/ebpf.py): "auto" runs it only when the dentry
    # cache needs attributing, "always" on every read (tests), "off" never. REMEDIATOR_EBPF.
    ebpf: str = "auto"
    # Its counting window, seconds: long enough for a steady rate, short enough that a cycle
    # that needs it is not held up for long.
    ebpf_seconds: float = 2.0
    # Where BCC's stub kernel headers live (STATE_DIR/bcc, one tree per kernel release, written
    # once and kept): in the controller's own directory also for audit, which must write
    # nothing anywhere else. None: a temporary directory, removed after the run.
    bcc_dir: Path | None = None
    # The Docker API the limits probe asks, while a pool was exhausted this boot, for containers
    # that crash-loop or exited (limits_consumers). None: not asked (fixture trees, tests).
    docker_url: str | None = None
    docker_timeout: float = 30.0


@dataclass
class ProbeContext:
    host: HostRoot
    clock: Clock
    # Built lazily and at most once per cycle: listing containers costs a Docker API call.
    inventory_factory: Callable[[], Inventory] | None = None
    # Samples kept between reads (and between processes: the timer), for growth rates. None:
    # rates come from two reads within this one (a short pause), see probes/dentries.py.
    memory: ProbeMemory | None = None
    options: ProbeOptions = field(default_factory=ProbeOptions)
    _inventory: Inventory | None = field(default=None, init=False, repr=False)
    _processes: dict[int, int] | None = field(default=None, init=False, repr=False)

    def processes(self) -> dict[int, int]:
        """{pid: inode of /proc/<pid>} of every process, from one listing of /proc per cycle
        (the fd scan and the shim scan both walk it). The inode names the process: a reused
        pid has a new one. A process that exits after the listing vanishes when read, one
        started after it is seen next cycle. Raises OSError when /proc cannot be listed."""
        if self._processes is None:
            self._processes = list_processes(self.host.proc)
        return self._processes

    def inventory(self) -> Inventory | None:
        if self._inventory is None and self.inventory_factory is not None:
            self._inventory = self.inventory_factory()
        return self._inventory

    def inventory_error(self) -> str | None:
        """Why there is no per-container attribution this cycle, or None when there is."""
        inventory = self.inventory()
        if inventory is None:
            return "no container inventory configured"
        return inventory.error


class Probe(abc.ABC):
    name: ClassVar[str]
    help: ClassVar[str]
    metrics: ClassVar[tuple[MetricSpec, ...]]

    @classmethod
    def spec(cls) -> ProbeSpec:
        return ProbeSpec(cls.name, cls.help, cls.metrics)

    @abc.abstractmethod
    def read(self, ctx: ProbeContext) -> Reading:
        """Read the host now. Must not raise for "no data"; may raise on bugs only."""

    @classmethod
    def held_files(cls, host: HostRoot) -> list[HeldPath]:
        """The files every read opens, for the daemon to hold open (handles.py, through
        `handles.read_text`): a held one costs a pread instead of an open, a read and a close,
        and still reads when the host has no file handle left. None by default."""
        return []


PROBES: dict[str, type[Probe]] = {}


P = TypeVar("P", bound=type[Probe])


def register(cls: P) -> P:
    if cls.name in PROBES:
        raise RuntimeError(f"probe {cls.name!r} registered twice")
    PROBES[cls.name] = cls
    return cls
