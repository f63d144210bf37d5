"""Degraded consumers beyond inotify: systemd services that crash-loop or fail with ENFILE,
EMFILE or EAGAIN while a shared pool is (or was) exhausted.

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
* it is `failed` (Result not `success`) and went so while a pool was exhausted (its
  `StateChangeTimestampMonotonic` within the exhausted span, give or take SLACK seconds).

A service that is active and running again is not degraded, whatever its counters say. The
previous readings' `NRestarts` are kept in the probe memory (bounded, per boot).
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from remediator.probes.limits_exhausted import Exhausted
from remediator.probes.memory import ProbeMemory

# Runs `systemctl ARGS...` and returns (exit status, output). Tests pass a fake.
Systemctl = Callable[[Sequence[str]], tuple[int, str]]

KEY = "limits/unit-restarts"
MAX_UNITS = 64  # services queried per reading: one outage can fail many, a listing stays cheap
SLACK = 60.0  # seconds: readings are one interval apart, a failure between them still counts
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
    first = min(e.first for e in exhausted.values())
    last = max(e.last for e in exhausted.values())
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
            and first - SLACK <= s.changed_at <= last + SLACK
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


__all__ = [
    "KEY",
    "MAX_UNITS",
    "POOL_ERRNOS",
    "PROPERTIES",
    "DegradedUnit",
    "Systemctl",
    "UnitState",
    "degraded_units",
    "judge_units",
    "parse_list_units",
    "parse_systemctl_show",
    "query_units",
    "recall_restarts",
    "remember_restarts",
    "run_systemctl",
]
