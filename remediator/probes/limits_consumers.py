"""Degraded consumers beyond inotify: systemd services and containers that crash-loop or fail
with ENFILE, EMFILE or EAGAIN while a shared pool is (or was) exhausted.

When `fs.file-max` or the pid space runs out, services fail in ways one can see from outside:
systemd counts their automatic restarts (`NRestarts`), and a service that reports its errno
(`sd_notify("ERRNO=...")`, `StatusErrno`) says 23 (ENFILE), 24 (EMFILE) or 11 (EAGAIN). Raising
the limit heals none that already gave up (`start-limit-hit`, or a `Restart=no` service left
`failed`): they are reported with the pool, and `restart-degraded` can restart them.

Cost, bounded: nothing at all until a pool was seen exhausted this boot (limits_exhausted);
then one `systemctl list-units` (services in `failed` or `activating` state) and one
`systemctl show` of at most MAX_UNITS services per reading. Forking systemctl can fail while
ENFILE or a pid outage is on; that is "no data" for this reading, never an error of the probe
(remediator runs as root, which file-max does not hold back).

A service is degraded when a pool was exhausted this boot and:

* its `NRestarts` grew since the previous reading while a pool was seen exhausted since then
  (a crash loop during the outage), or
* it is `failed` or auto-restarting with `StatusErrno` ENFILE / EMFILE / EAGAIN, or
* it is `failed` (Result not `success`) and went so while file-max or the task pool was
  exhausted (its `StateChangeTimestampMonotonic` within the exhausted span, give or take SLACK
  seconds; CRASH_POOLS).

A service that is active and running again is not degraded, whatever its counters say. The
previous readings' `NRestarts` are kept in the probe memory (bounded, per boot).

Containers the same way, through the Docker API (one list call per reading of the containers
that are `restarting` or `exited`, then an inspect of at most MAX_CONTAINERS of them, newest
first; nothing while no pool was exhausted this boot): a container is degraded when its
`RestartCount` grew while a pool was exhausted, when its `State.Error` reads like ENFILE, EMFILE
or EAGAIN ("too many open files", "resource temporarily unavailable"), or when it is restarting
or exited non-zero and finished while file-max or the task pool was exhausted. A running
container is not.
"""

from __future__ import annotations

import errno
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from remediator.probes.limits_exhausted import Exhausted
from remediator.probes.memory import ProbeMemory

# Runs `systemctl ARGS...` and returns (exit status, output). Tests pass a fake.
Systemctl = Callable[[Sequence[str]], tuple[int, str]]

KEY = "limits/unit-restarts"
CONTAINERS_KEY = "limits/container-restarts"
MAX_CONTAINERS = 32
MAX_UNITS = 64  # services queried per reading: one outage can fail many, a listing stays cheap
SLACK = 60.0  # seconds: readings are one interval apart, a failure between them still counts
# The pools whose exhaustion makes programs fail outright (open: ENFILE; fork, clone: EAGAIN):
# a service or container that went down while one of these was exhausted is blamed on it even
# without a counter or an errno to say so. An exhausted inotify pool blames only by counter or
# errno (its consumers usually carry on degraded instead: limits_exhausted).
CRASH_POOLS = ("file_handles", "tasks")
POOL_ERRNOS = {errno.ENFILE: "ENFILE", errno.EMFILE: "EMFILE", errno.EAGAIN: "EAGAIN"}
PROPERTIES = (
    "Id",
    "InvocationID",
    "ActiveState",
    "SubState",
    "Result",
    "NRestarts",
    "StatusErrno",
    "StateChangeTimestampMonotonic",
)


def run_systemctl(args: Sequence[str]) -> tuple[int, str]:
    try:
        p = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:  # no systemctl, fork failed, timeout
        return -1, str(exc)
    return p.returncode, (p.stdout + p.stderr).strip()


@dataclass(frozen=True)
class UnitState:
    """One service as `systemctl show -p ...` describes it."""

    unit: str
    invocation: str  # InvocationID: names this run of the unit (re-checked before a restart)
    active: str  # ActiveState: active, failed, activating, ...
    sub: str  # SubState: running, auto-restart, failed, ...
    result: str  # success, exit-code, signal, start-limit-hit, ...
    restarts: int  # NRestarts: automatic restarts since the unit was last started by hand
    status_errno: int  # StatusErrno (0: none reported)
    changed_at: float | None  # StateChangeTimestampMonotonic, seconds since boot

    @property
    def running(self) -> bool:
        return self.active == "active" and self.sub == "running"


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value) if value not in (None, "", "[not set]") else default
    except ValueError:
        return default


def parse_systemctl_show(text: str) -> list[UnitState]:
    """`systemctl show -p Id,InvocationID,... u1 u2` -> one UnitState per unit: blocks of
    "Key=Value" lines separated by blank lines (systemctl(1)). Units that do not exist show
    `ActiveState=inactive` and no InvocationID; blocks without Id are skipped."""
    out = []
    for block in text.split("\n\n"):
        props: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                props[key.strip()] = value.strip()
        if not props.get("Id"):
            continue
        mono = _int(props.get("StateChangeTimestampMonotonic"), -1)
        out.append(
            UnitState(
                props["Id"],
                props.get("InvocationID", ""),
                props.get("ActiveState", ""),
                props.get("SubState", ""),
                props.get("Result", ""),
                _int(props.get("NRestarts")),
                _int(props.get("StatusErrno")),
                mono / 1e6 if mono > 0 else None,
            )
        )
    return out


def parse_list_units(text: str) -> list[str]:
    """`systemctl list-units --plain --no-legend` -> unit names (the first column; a leading
    bullet, printed for failed units by some versions, is skipped)."""
    names = []
    for line in text.splitlines():
        fields = [f for f in line.split() if f not in ("●", "*")]
        if fields and fields[0].endswith(".service"):
            names.append(fields[0])
    return names


@dataclass(frozen=True)
class DegradedUnit:
    state: UnitState
    pools: tuple[str, ...]  # the pools exhausted when it degraded
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """The entry of `detail.degraded_consumers` (the shape restart-degraded plans from)."""
        s = self.state
        return {
            "kind": "unit",
            "unit": s.unit,
            "invocation": s.invocation,
            "name": s.unit,
            "pool": ",".join(self.pools),
            "reason": self.reason,
            "restarts": s.restarts,
            "status_errno": s.status_errno,
            "container": None,
            "container_id": None,
        }


def _during(at: float, spans: Iterable[Exhausted]) -> bool:
    return any(e.first - SLACK <= at <= e.last + SLACK for e in spans)


def judge_units(
    states: Iterable[UnitState],
    exhausted: Mapping[str, Exhausted],
    previous: Mapping[str, tuple[str, int, float]],
    uptime: float,
) -> list[DegradedUnit]:
    """Which services degraded (pure). `exhausted`: the pools seen exhausted this boot (first /
    last seconds since boot); `previous`: unit -> (InvocationID, NRestarts, uptime) of the
    previous reading; `uptime`: now."""
    if not exhausted:
        return []
    pools = tuple(sorted(exhausted))
    last = max(e.last for e in exhausted.values())
    crash = [e for k, e in exhausted.items() if k in CRASH_POOLS]
    out = []
    for s in states:
        if s.running:
            continue  # healthy again (a restart, or it recovered by itself)
        looping = s.active == "failed" or s.sub == "auto-restart" or s.active == "activating"
        reason = None
        before = previous.get(s.unit)
        if before is not None and s.restarts > before[1] and last >= before[2] - SLACK:
            reason = f"NRestarts {before[1]} -> {s.restarts} while the pool was exhausted"
        elif looping and s.status_errno in POOL_ERRNOS:
            reason = f"{s.active}/{s.sub} with StatusErrno={s.status_errno} ({POOL_ERRNOS[s.status_errno]})"
        elif (
            s.active == "failed"
            and s.result not in ("", "success")
            and s.changed_at is not None
            and _during(s.changed_at, crash)
        ):
            reason = f"failed ({s.result}) while the pool was exhausted"
        if reason is not None:
            out.append(DegradedUnit(s, pools, reason))
    return out


def recall_restarts(memory: ProbeMemory | None, boot: str | None) -> dict[str, tuple[str, int, float]]:
    raw = memory.recall(KEY) if memory is not None else None
    if not isinstance(raw, dict) or boot is None or raw.get("boot") != boot:
        return {}
    units = raw.get("units")
    out = {}
    for unit, v in units.items() if isinstance(units, dict) else ():
        if isinstance(v, list) and len(v) == 3 and isinstance(v[1], int) and isinstance(v[2], int | float):
            out[str(unit)] = (str(v[0]), v[1], float(v[2]))
    return out


def remember_restarts(
    memory: ProbeMemory | None, boot: str | None, states: Sequence[UnitState], uptime: float
) -> None:
    if memory is None or boot is None:
        return
    units = {s.unit: [s.invocation, s.restarts, round(uptime, 2)] for s in states[:MAX_UNITS]}
    memory.remember(KEY, {"boot": boot, "units": units})


def query_units(systemctl: Systemctl, named: Sequence[str], problems: list[str]) -> list[UnitState] | None:
    """The services worth judging: those `named` (units of degraded inotify consumers, the
    policy's list) and every service systemd lists as failed or activating, at most MAX_UNITS.
    None when systemctl could not be run (a problem is noted)."""
    code, out = systemctl(
        [
            "list-units",
            "--type=service",
            "--all",
            "--plain",
            "--no-legend",
            "--no-pager",
            "--state=failed,activating",
        ]
    )
    if code != 0:
        problems.append(f"systemctl list-units: {out or code}")
        return None
    units = list(dict.fromkeys([*named, *parse_list_units(out)]))[:MAX_UNITS]
    if not units:
        return []
    code, out = systemctl(["show", "--no-pager", "-p", ",".join(PROPERTIES), "--", *units])
    if code != 0:
        problems.append(f"systemctl show: {out or code}")
        return None
    return parse_systemctl_show(out)


def degraded_units(
    systemctl: Systemctl | None,
    named: Sequence[str],
    exhausted: Mapping[str, Exhausted],
    memory: ProbeMemory | None,
    boot: str | None,
    uptime: float | None,
    problems: list[str],
) -> list[DegradedUnit]:
    """Read and judge the services (nothing is run while no pool was exhausted this boot)."""
    if systemctl is None or not exhausted or uptime is None:
        return []
    states = query_units(systemctl, named, problems)
    if states is None:
        return []
    found = judge_units(states, exhausted, recall_restarts(memory, boot), uptime)
    remember_restarts(memory, boot, states, uptime)
    return found


# What Docker's State.Error says for the pool errors (strerror of ENFILE, EMFILE, EAGAIN, as
# runc and dockerd pass them on): "too many open files in system" also matches the first.
POOL_ERROR = re.compile(r"too many open files|resource temporarily unavailable", re.IGNORECASE)


def parse_docker_time(text: str | None) -> float | None:
    """Docker's RFC 3339 times ("2026-12-02T07:10:11.123456789Z") -> seconds since the epoch;
    None for the zero time (never) and anything unreadable."""
    if not text or text.startswith("0001-"):
        return None
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if m is None:
        return None
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    try:
        base = datetime.fromisoformat(m.group(1) + zone).timestamp()
    except ValueError:
        return None
    return base + (float("0." + m.group(2)) if m.group(2) else 0.0)


@dataclass(frozen=True)
class ContainerState:
    """One container as Docker's inspect describes it (the fields judged here)."""

    id: str
    name: str
    labels: Mapping[str, str]
    status: str  # State.Status: running, restarting, exited, ...
    restart_count: int
    exit_code: int
    error: str  # State.Error: why the runtime could not start it, when it could not
    finished_at: float | None  # seconds since the epoch

    @classmethod
    def from_inspect(cls, attrs: Mapping[str, Any]) -> ContainerState:
        st = attrs.get("State") or {}
        return cls(
            str(attrs.get("Id", "")),
            str(attrs.get("Name", "")).lstrip("/"),
            dict((attrs.get("Config") or {}).get("Labels") or {}),
            "restarting" if st.get("Restarting") else str(st.get("Status", "")),
            int(attrs.get("RestartCount") or 0),
            int(st.get("ExitCode") or 0),
            str(st.get("Error") or ""),
            parse_docker_time(st.get("FinishedAt")),
        )

    @property
    def down(self) -> bool:
        """Not running, and not by choice: restarting, or exited with an error."""
        return self.status == "restarting" or (
            self.status in ("exited", "dead") and (self.exit_code != 0 or bool(self.error))
        )


@dataclass(frozen=True)
class DegradedContainer:
    state: ContainerState
    pools: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        s = self.state
        return {
            "kind": "container",
            "name": s.name,
            "pool": ",".join(self.pools),
            "reason": reason_text(self.reason),
            "restarts": s.restart_count,
            "container": s.name,
            "container_id": s.id,
            "labels": dict(s.labels),
        }


def reason_text(reason: str) -> str:
    return reason[:200]  # a runtime's error can be long: the reading stays small


def judge_containers(
    states: Iterable[ContainerState],
    exhausted: Mapping[str, Exhausted],
    previous: Mapping[str, tuple[int, float]],
    uptime: float,
    boot_at: float,
) -> list[DegradedContainer]:
    """Which containers degraded (pure). `previous`: id -> (RestartCount, uptime) of the previous
    reading; `boot_at`: the boot's time in seconds since the epoch (Docker's times are wall
    clock, the exhausted spans seconds since boot)."""
    if not exhausted:
        return []
    pools = tuple(sorted(exhausted))
    last = max(e.last for e in exhausted.values())
    crash = [e for k, e in exhausted.items() if k in CRASH_POOLS]
    out = []
    for s in states:
        if not s.down:
            continue
        before = previous.get(s.id)
        finished = s.finished_at - boot_at if s.finished_at is not None else None
        if before is not None and s.restart_count > before[0] and last >= before[1] - SLACK:
            reason = f"RestartCount {before[0]} -> {s.restart_count} while the pool was exhausted"
        elif POOL_ERROR.search(s.error):
            reason = f"{s.status}: {s.error}"
        elif finished is not None and _during(finished, crash):
            reason = f"{s.status} (exit {s.exit_code}) since the pool was exhausted"
        else:
            continue
        out.append(DegradedContainer(s, pools, reason))
    return out


def query_containers(api: Any, problems: list[str]) -> list[ContainerState] | None:
    """Containers that are restarting or exited: one list call, then an inspect of at most
    MAX_CONTAINERS of them (Docker lists the newest first). None when Docker could not say."""
    try:
        listed = api.containers(all=True, filters={"status": ["restarting", "exited"]})
        out = []
        for summary in listed[:MAX_CONTAINERS]:
            try:
                out.append(ContainerState.from_inspect(api.inspect_container(summary["Id"])))
            except Exception as exc:  # removed meanwhile (docker.errors.NotFound): skip it
                if getattr(getattr(exc, "response", None), "status_code", None) != 404:
                    raise
        return out
    except Exception as exc:  # the SDK's errors are many; any of them is "no data" here
        problems.append(f"docker containers: {type(exc).__name__}: {exc}")
        return None


def recall_container_restarts(memory: ProbeMemory | None, boot: str | None) -> dict[str, tuple[int, float]]:
    raw = memory.recall(CONTAINERS_KEY) if memory is not None else None
    if not isinstance(raw, dict) or boot is None or raw.get("boot") != boot:
        return {}
    got = raw.get("containers")
    out = {}
    for cid, v in got.items() if isinstance(got, dict) else ():
        if isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], int | float):
            out[str(cid)] = (v[0], float(v[1]))
    return out


def degraded_containers(
    api: Any,
    exhausted: Mapping[str, Exhausted],
    memory: ProbeMemory | None,
    boot: str | None,
    uptime: float | None,
    now: float,
    problems: list[str],
) -> list[DegradedContainer]:
    """Read and judge the containers (no Docker call while no pool was exhausted this boot)."""
    if api is None or not exhausted or uptime is None:
        return []
    states = query_containers(api, problems)
    if states is None:
        return []
    found = judge_containers(states, exhausted, recall_container_restarts(memory, boot), uptime, now - uptime)
    if memory is not None and boot is not None:
        memory.remember(
            CONTAINERS_KEY,
            {"boot": boot, "containers": {s.id: [s.restart_count, round(uptime, 2)] for s in states}},
        )
    return found


__all__ = [
    "CONTAINERS_KEY",
    "KEY",
    "MAX_CONTAINERS",
    "MAX_UNITS",
    "POOL_ERRNOS",
    "POOL_ERROR",
    "PROPERTIES",
    "ContainerState",
    "DegradedContainer",
    "DegradedUnit",
    "Systemctl",
    "UnitState",
    "degraded_containers",
    "degraded_units",
    "judge_containers",
    "judge_units",
    "parse_docker_time",
    "parse_list_units",
    "parse_systemctl_show",
    "query_containers",
    "query_units",
    "recall_container_restarts",
    "recall_restarts",
    "remember_restarts",
    "run_systemctl",
]
