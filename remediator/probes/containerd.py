"""Clause (e) of the fifo orphan rule: which ids does a containerd know?

We ask through `ctr`, not containerd's gRPC API. Why: `ctr` ships with every containerd build
(the one in the same package speaks that daemon's API), remediator needs no gRPC stack and no
generated protobuf code pinned to one API version, and every answer we need is a list command.
The price is text parsing, so every format is explicit and anything else fails closed: an
answer that cannot be parsed makes the check incomplete, naming the socket and the line.

What `ctr tasks ps <task>` prints for an exec process depends on the version of `ctr` (the
client decodes the runc shim's `ProcessDetails`), not on the daemon's:

* containerd 1.6's ctr (gogo protobuf's String()): `6813    &ProcessDetails{ExecID:ex1,XXX_unrecognized:[],}`
* containerd 1.7 and 2.x's ctr (google.golang.org/protobuf prototext): `12382    exec_id:"ex1"`

Both are recognised whatever the daemon (captured from 1.6.20, 1.7.24 and 2.1.9 in
tests/unit/test_containerd.py; tests/real runs each). The init process prints `-`.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import stat
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
import tenacity

from remediator.errors import PermanentError, TemporaryError

log = structlog.get_logger(__name__)

# A host running more tasks than this would need more `ctr tasks ps` calls per walk than we want
# to spend (~30 ms each, PS_PARALLEL at a time); above it the check is incomplete (fail safe).
MAX_TASK_QUERIES = 1000
# `ctr tasks ps` processes at a time: 4 keeps a 2-core host responsive and cuts the wait 4x.
PS_PARALLEL = 4


class ContainerdNotFound(PermanentError):
    """containerd answered "not found" (e.g. a task deleted between `ls` and `ps`)."""


class UnparsableAnswer(PermanentError):
    """containerd's (ctr's) answer is not in any format we know: fail closed."""


# ---------------------------------------------------------------------------------------------
# Output formats (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExecIdFormat:
    """How one `ctr` version prints the exec id in `tasks ps`'s INFO column."""

    name: str
    pattern: re.Pattern[str]

    def exec_id(self, info: str) -> str | None:
        m = self.pattern.fullmatch(info)
        return m.group(1) if m else None


CTR_16 = ExecIdFormat("ctr 1.6 (gogo text)", re.compile(r"&ProcessDetails\{ExecID:([^,}\s]+),.*\}"))
# containerd ids are identifiers ([A-Za-z0-9_.-], identifiers.Validate), so prototext never has
# to escape one; an escaped quote would not match and so fails closed.
CTR_PROTOTEXT = ExecIdFormat("ctr 1.7/2.x (prototext)", re.compile(r'exec_id:\s*"([^"\\]+)"'))
EXEC_ID_FORMATS = (CTR_16, CTR_PROTOTEXT)


def parse_id_list(text: str) -> frozenset[str]:
    """The output of `ctr ... ls -q`: one id per line."""
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


def parse_tasks_ps(text: str, formats: Sequence[ExecIdFormat] = EXEC_ID_FORMATS) -> frozenset[str]:
    """Exec ids from `ctr tasks ps <task>`; raises UnparsableAnswer on anything unexpected.

    Expected: a header `PID INFO`, then one `<pid> <info>` line per process, where info is `-`
    (the init process, or a process with no details) or an exec id in one of `formats`.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or lines[0].split() != ["PID", "INFO"]:
        raise UnparsableAnswer(f"tasks ps: no 'PID INFO' header: {text[:80]!r}")
    ids: set[str] = set()
    for line in lines[1:]:
        parts = line.split(None, 1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise UnparsableAnswer(f"tasks ps: unexpected line {line[:120]!r}")
        info = parts[1].strip()
        if info == "-":
            continue
        found = next((i for f in formats if (i := f.exec_id(info)) is not None), None)
        if found is None:
            raise UnparsableAnswer(f"tasks ps: exec details in no known format: {info[:120]!r}")
        ids.add(found)
    return frozenset(ids)


# ---------------------------------------------------------------------------------------------
# Running ctr
# ---------------------------------------------------------------------------------------------


class CtrRunner(Protocol):
    """Runs one `ctr --address <address> <args...>` and returns its standard output.

    Raises TemporaryError when containerd did not answer in time, ContainerdNotFound when it
    said "not found", PermanentError when ctr cannot run at all.
    """

    def __call__(self, address: str, args: Sequence[str]) -> str: ...


class CtrCli:
    """The real `CtrRunner`: the `ctr` binary, bounded by a timeout, retried with tenacity.

    `--connect-timeout` matters: without it a missing socket costs ctr's 10 s default dial
    timeout per call.
    """

    def __init__(
        self,
        binary: str = "ctr",
        timeout: float = 5.0,
        attempts: int = 3,
        backoff: float = 0.2,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.binary = binary
        self.timeout = timeout  # seconds per call; containerd answers a list in milliseconds
        self.attempts = attempts  # 3 attempts: a containerd restart takes about a second
        self.backoff = backoff
        self._sleep = sleep if sleep is not None else tenacity.nap.sleep

    def __call__(self, address: str, args: Sequence[str]) -> str:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.debug("ctr_retry", args=list(args), attempt=state.attempt_number, error=str(exc))

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_exponential(multiplier=self.backoff, max=2.0),
            retry=tenacity.retry_if_exception_type(TemporaryError),
            before_sleep=before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        return retrying(self._once, address, args)

    def _once(self, address: str, args: Sequence[str]) -> str:
        seconds = f"{self.timeout:g}s"
        cmd = [self.binary, "--address", address, "--connect-timeout", seconds, "--timeout", seconds, *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout + 1, check=False)
        except FileNotFoundError:
            raise PermanentError(f"{self.binary}: not found") from None
        except subprocess.TimeoutExpired:
            raise TemporaryError(f"ctr {' '.join(args)}: no answer in {seconds}") from None
        except OSError as e:
            # No pid left (fork: EAGAIN) or no file handle for the pipes (ENFILE, EMFILE): the
            # host is exhausted, which is what the daemon is there to repair. The query is then
            # incomplete (fail safe: nothing is judged an orphan) and the rest of the cycle runs.
            log.warning("ctr_cannot_start", args=list(args), error=f"{type(e).__name__}: {e}")
            raise TemporaryError(f"ctr {' '.join(args)}: cannot start it: {e.strerror or e}") from None
        if proc.returncode != 0:
            message = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            if "not found" in message[0]:
                raise ContainerdNotFound(message[0])
            raise TemporaryError(f"ctr {' '.join(args)}: {message[0]}")
        return proc.stdout


# ---------------------------------------------------------------------------------------------
# The query
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnownIds:
    """Every container, task and exec id the queried containerds know."""

    ids: frozenset[str]
    complete: bool
    sockets: tuple[str, ...]
    errors: tuple[str, ...] = ()
    tasks: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "queried": True,
            "complete": self.complete,
            "sockets": list(self.sockets),
            "errors": list(self.errors),
            "ids": len(self.ids),
            "tasks": self.tasks,
        }


def query_known_ids(
    ctr: CtrRunner,
    sockets: Iterable[Path],
    max_task_queries: int = MAX_TASK_QUERIES,
    *,
    execs: bool = True,
    parallel: int = PS_PARALLEL,
) -> KnownIds:
    """Ask every containerd for its namespaces, containers, tasks and (`execs`) every task's execs.

    Incomplete (fail safe) when a socket is missing, a query fails or an answer cannot be parsed,
    except a task that vanished between `tasks ls` and `tasks ps` (its execs went with it).
    Each error names its socket. The `tasks ps` calls, one per task, run `parallel` at a time:
    each is a `ctr` process (~30 ms), so a host with 100 tasks answers in ~0.4 s, not 3 s.
    """
    ids: set[str] = set()
    errors: list[str] = []
    names: list[str] = []
    tasks: list[tuple[str, str, str]] = []  # (address, namespace, task id)
    for sock in sockets:
        address = str(sock)
        names.append(address)
        try:
            if not stat.S_ISSOCK(os.stat(sock).st_mode):
                errors.append(f"{address}: not a socket")
                continue
        except OSError as e:
            errors.append(f"{address}: {e.strerror}")
            continue
        try:
            for ns in sorted(parse_id_list(ctr(address, ["namespaces", "ls", "-q"]))):
                ids |= parse_id_list(ctr(address, ["-n", ns, "containers", "ls", "-q"]))
                ns_tasks = parse_id_list(ctr(address, ["-n", ns, "tasks", "ls", "-q"]))
                ids |= ns_tasks
                tasks.extend((address, ns, t) for t in sorted(ns_tasks))
        except (TemporaryError, PermanentError) as e:
            errors.append(f"{address}: {e}")
    if not errors and len(tasks) > max_task_queries:
        errors.append(f"{len(tasks)} tasks: more than {max_task_queries} exec listings")
    if errors or not execs or not tasks:
        return KnownIds(frozenset(ids), not errors, tuple(names), tuple(errors), len(tasks))

    def exec_ids(task: tuple[str, str, str]) -> frozenset[str] | str:
        address, ns, tid = task
        try:
            return parse_tasks_ps(ctr(address, ["-n", ns, "tasks", "ps", tid]))
        except ContainerdNotFound:
            return frozenset()
        except (TemporaryError, PermanentError) as e:
            return f"{address}: namespace {ns} task {tid}: {e}"

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for found in pool.map(exec_ids, tasks):
            if isinstance(found, str):
                errors.append(found)
            else:
                ids |= found
    return KnownIds(frozenset(ids), not errors, tuple(names), tuple(errors[:1]), len(tasks))
