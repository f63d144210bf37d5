"""raise-sysctl: raise a shared kernel limit (fs.file-max, fs.inotify.max_user_watches, ...).

Raise-only, like tuned's `>` prefix: the new value is `min(ceiling, max(current * factor,
current + step))` and a lower value is never written. The ceiling is required: a limit that is
exhausted by a leak only moves the cliff, so the policy author must say how far is still sane
(every inotify watch costs ~1 KiB of unswappable kernel memory, see inotify(7)).

The current value comes from the limits probe (`Reading.detail["sysctls"][key]`); when no
reading carries it, the raise is computed from the value read at re-check time and the plan
says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import field_validator

from remediator.actions.base import Action, ActionParams, ApplyContext, PlanContext, register
from remediator.host import HostRoot
from remediator.model import ActionResult, Outcome, Plan, Target, TargetKind
from remediator.quantity import parse_count, shown

# procfs sysctl names: dot-separated components, at least two ("fs.file-max", "vm.max_map_count",
# "net.core.somaxconn"). The `/` spelling sysctl(8) accepts for interface names with dots is not
# supported: HostRoot maps both separators to one.
# fullmatch: `$` would also accept a trailing newline.
_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+")
# A factor above 100 is a typo (one raise would take a 8192 limit to 819200+); it also keeps
# current * factor far from float overflow, which int() of the result cannot take.
MAX_FACTOR = 100.0
MAX_STEP = 2**63 - 1


class RaiseSysctlParams(ActionParams):
    key: str
    """The sysctl to raise, e.g. `fs.inotify.max_user_watches`."""
    factor: float = 2.0
    """Multiply the current value by this (> 1). 2.0: one step buys as much headroom as the leak
    used so far, so a steady leak gets a full hold-down period of breathing room again."""
    step: int | None = None
    """Raise by at least this much (>= 1); useful for small limits where doubling is too little."""
    ceiling: str | int
    """Hard upper bound (a count such as `1M` or an integer); never written above."""

    @field_validator("key")
    @classmethod
    def _check_key(cls, v: str) -> str:
        if len(v) > 255 or not _KEY.fullmatch(v):
            raise ValueError(f"expected a sysctl name such as fs.inotify.max_user_watches, got {shown(v)}")
        return v

    @field_validator("factor")
    @classmethod
    def _check_factor(cls, v: float) -> float:
        if not (v > 1.0 and math.isfinite(v)):
            raise ValueError(f"factor must be a number greater than 1 (raise-only), got {shown(v)}")
        if v > MAX_FACTOR:
            raise ValueError(f"factor must be at most {MAX_FACTOR:g}, got {shown(v)}")
        return v

    @field_validator("step")
    @classmethod
    def _check_step(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_STEP:
            raise ValueError(f"step must be an integer >= 1 (at most 2^63-1), got {shown(v)}")
        return v

    @field_validator("ceiling")
    @classmethod
    def _check_ceiling(cls, v: str | int) -> str | int:
        n = parse_count(v)  # raises ValueError with the expected form
        if n < 1 or n != int(n):
            raise ValueError(f"ceiling must be a whole number >= 1 (such as 1M or 524288), got {shown(v)}")
        return v

    @property
    def ceiling_value(self) -> int:
        return int(parse_count(self.ceiling))


def raised_value(current: int, factor: float, step: int | None, ceiling: int) -> int:
    """The value to write: more than `current`, at most `ceiling` (callers check current < ceiling).

    `current + 1` is the floor because a factor does nothing to a limit of 0.
    """
    wanted = max(math.ceil(current * factor), current + (step or 1))
    return min(ceiling, wanted)


def parse_single_int(text: str) -> int | None:
    """The value of a one-integer sysctl file, None for anything else ("4 4 1 7", "cubic")."""
    fields = text.split()
    if len(fields) != 1:
        return None
    try:
        return int(fields[0])
    except ValueError:
        return None


def current_from_readings(key: str, readings: Mapping[str, Any]) -> int | None:
    """The live value the limits probe recorded for `key`, if any reading has it as an integer."""
    for reading in readings.values():
        sysctls = reading.detail.get("sysctls")
        if not isinstance(sysctls, Mapping) or key not in sysctls:
            continue
        value = sysctls[key]
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return parse_single_int(value)
    return None


def _write(path: Path, value: int) -> None:
    # One write(2) of the whole value: proc_dointvec/proc_doulongvec parse it in one go.
    with open(path, "w", encoding="ascii") as f:
        f.write(f"{value}\n")


def _read_live(host: HostRoot, key: str) -> tuple[int | None, str]:
    text = host.read_sysctl(key)
    return parse_single_int(text), text


@register
class RaiseSysctl(Action):
    name = "raise-sysctl"
    help = "Raise a shared kernel limit (raise-only, bounded by a ceiling)."
    Params = RaiseSysctlParams
    disruptive = False

    def plan(self, ctx: PlanContext) -> Plan | str:
        p = ctx.params
        assert isinstance(p, RaiseSysctlParams)
        ceiling = p.ceiling_value
        readings = dict(ctx.readings)
        readings.setdefault(ctx.reading.probe, ctx.reading)
        current = current_from_readings(p.key, readings)
        target = Target(TargetKind.SYSCTL, id=p.key, name=p.key)
        how = f"x{p.factor:g}" + (f", at least +{p.step}" if p.step else "")
        params = {"key": p.key, "factor": p.factor, "step": p.step, "ceiling": ceiling}
        if current is None:
            return Plan(
                self.name,
                target,
                f"raise {p.key} ({how}, ceiling {ceiling}) from the value read just before "
                "acting (no reading this cycle carried it)",
                params=params,
                expect={"current": None, "new": None},
            )
        if current < 0:
            return f"{p.key} is {current}: a negative limit usually means unlimited; not raising"
        if current >= ceiling:
            return f"at ceiling: {p.key} is {current}, ceiling is {ceiling}"
        new = raised_value(current, p.factor, p.step, ceiling)
        return Plan(
            self.name,
            target,
            f"raise {p.key} from {current} to {new} ({how}, ceiling {ceiling})",
            params=params,
            expect={"current": current, "new": new},
        )

    def recheck(self, plan: Plan, ctx: ApplyContext) -> str | None:
        key = plan.target.id
        try:
            live, text = _read_live(ctx.host, key)
        except FileNotFoundError:
            return f"no sysctl {key} on this host"
        return self._judge(plan, live, text)

    @staticmethod
    def _judge(plan: Plan, live: int | None, text: str) -> str | None:
        key = plan.target.id
        if live is None:
            return (
                f"{key} is {text.strip()!r}, not a single integer: raise-sysctl only raises one-number limits"
            )
        if live < 0:
            return f"{key} is {live}: a negative limit usually means unlimited; not raising"
        ceiling = int(plan.params["ceiling"])
        if live >= ceiling:
            return f"at ceiling: {key} is {live}, ceiling is {ceiling}"
        expected, new = plan.expect.get("current"), plan.expect.get("new")
        if new is not None and live >= new:
            return f"{key} is already {live} (planned {new})"
        if expected is not None and live != expected:
            return f"{key} changed under us: planned from {expected}, now {live}"
        return None

    def apply(self, plan: Plan, ctx: ApplyContext) -> ActionResult:
        key = plan.target.id
        live, text = _read_live(ctx.host, key)
        # Re-judge on the value we are about to replace: apply must never write a lower value,
        # even if something changed it since recheck.
        reason = self._judge(plan, live, text)
        if reason is not None or live is None:
            return ActionResult(Outcome.SKIPPED, reason or f"{key} unreadable")
        new = plan.expect.get("new")
        if new is None:
            pp = plan.params
            new = raised_value(live, float(pp["factor"]), pp["step"], int(pp["ceiling"]))
        before = {"key": key, "value": live}
        _write(ctx.host.sysctl_path(key), int(new))
        return ActionResult(
            Outcome.APPLIED, f"raised {key} from {live} to {new}", before, after={"wanted": new}
        )

    def verify(self, plan: Plan, result: ActionResult, ctx: ApplyContext) -> ActionResult:
        key = plan.target.id
        wanted = int(result.after["wanted"])
        value, text = _read_live(ctx.host, key)
        ok = value == wanted
        message = (
            result.message
            if ok
            else (f"{result.message}; read back {text.strip()!r} (the kernel may clamp this limit)")
        )
        return ActionResult(
            Outcome.APPLIED, message, result.before, {"wanted": wanted, "value": value}, verified=ok
        )
