"""raise-sysctl: raise a shared kernel pool's limit, within a ceiling, and keep it across reboots.

What an operator can trust it to do:
* Only pools (`sysctl_pools.POOL_KEYS`): any other key is refused at validate time, with the list
  in the message, so "raise" can never flip a switch such as `kernel.modules_disabled`.
* Raise-only, like tuned's `>` prefix: the new value is `min(ceiling, max(current * factor,
  current + step))` and a lower value is never written. The ceiling is the key's formula of
  RAM (documented in sysctl_pools) unless the policy gives one.
* "No limit" values (LONG_MAX, which systemd writes to fs.file-max; negative; 0 for the pipe
  limits) are left alone: no percentage of them is ever computed.
* Another owner of the key (a sysctl.d file, /etc/sysctl.conf, an active tuned profile) is
  reported and nothing is written: the boot or tuned would undo the raise, and remediator does
  not fight configuration management.
* The value is written to /proc/sys in one write(2), read back, then persisted to remediator's
  own sysctl.d file (sysctl_persist), replaced atomically, and read back again. All in-process
  (no fork); the daemon reads and writes the key through a descriptor it opened at start
  (remediator/handles.py), so a raise of fs.file-max works when no file handle is left, and
  the owner check answers from its last look while no sysctl.d file changed (a stat shows it).

The current value comes from the limits probe (`Reading.detail["sysctls"][key]`); when no
reading carries it, the raise is computed from the value read at re-check time and the plan
says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import Field, JsonValue, field_validator

from remediator import handles
from remediator.actions.base import Action, ActionParams, ApplyContext, PlanContext, register
from remediator.actions.sysctl_persist import find_owners, persist, read_own_file
from remediator.host import HostRoot
from remediator.model import ActionResult, Outcome, Plan, Target, TargetKind
from remediator.probes.limits_pools import POOL_KEYS, allowed_keys_message, parse_mem_total, pool_key
from remediator.quantity import parse_count, shown

# A factor above 100 is a typo (one raise would take a 8192 limit to 819200+); it also keeps
# current * factor far from float overflow, which int() of the result cannot take.
MAX_FACTOR = 100.0
MAX_STEP = 2**63 - 1


class RaiseSysctlParams(ActionParams):
    key: str = Field(json_schema_extra={"enum": list[JsonValue](sorted(POOL_KEYS))})  # editors offer the list
    """The pool limit to raise, e.g. `fs.inotify.max_user_watches`: one of the shared pools
    (docs/policies.md lists them with their ceilings)."""
    factor: float = 2.0
    """Multiply the current value by this (> 1). 2.0: one step buys as much headroom as the leak
    used so far, so a steady leak gets a full hold-down period of breathing room again."""
    step: int | None = None
    """Raise by at least this much (>= 1); useful for small limits where doubling is too little."""
    ceiling: str | int | None = None
    """Upper bound (a count such as `1M` or an integer); never written above. Default: the key's
    formula of RAM (e.g. fs.file-max: twice the kernel's default of ~10 % of RAM in KiB)."""
    persist: bool = True
    """Also keep the raise in remediator's own sysctl.d file, so a reboot keeps it."""

    @field_validator("key")
    @classmethod
    def _check_key(cls, v: str) -> str:
        if pool_key(v) is None or "/" in v:
            raise ValueError(
                f"{shown(v)} is not a shared kernel pool raise-sysctl may raise; expected one of: "
                f"{allowed_keys_message()}"
            )
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
    def _check_ceiling(cls, v: str | int | None) -> str | int | None:
        if v is None:
            return v
        n = parse_count(v)  # raises ValueError with the expected form
        if n < 1 or n != int(n):
            raise ValueError(f"ceiling must be a whole number >= 1 (such as 1M or 524288), got {shown(v)}")
        return v

    @property
    def ceiling_value(self) -> int | None:
        """The policy's own ceiling, None when the key's RAM formula applies."""
        return None if self.ceiling is None else int(parse_count(self.ceiling))


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


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return parse_single_int(value)
    return None


def current_from_readings(key: str, readings: Mapping[str, Any]) -> int | None:
    """The live value the limits probe recorded for `key`, if any reading has it as an integer."""
    for reading in readings.values():
        sysctls = reading.detail.get("sysctls")
        if isinstance(sysctls, Mapping) and key in sysctls:
            value = _as_int(sysctls[key])
            if value is not None:
                return value
    return None


def mem_total_from_readings(readings: Mapping[str, Any]) -> int | None:
    for reading in readings.values():
        value = _as_int(reading.detail.get("mem_total_bytes"))
        if value is not None and value > 0:
            return value
    return None


def ceiling_for(key: str, explicit: int | None, mem_total: int | None) -> int | None:
    """The policy's ceiling, else the key's formula of RAM; None when RAM is not known yet."""
    if explicit is not None:
        return explicit
    pool = pool_key(key)
    if pool is None or mem_total is None:
        return None
    return max(1, pool.ceiling(mem_total))


def _read_live(host: HostRoot, key: str) -> tuple[int | None, str]:
    # Through the descriptor the daemon holds (handles.py): works at fs.file-max.
    text = handles.read_sysctl(host, key)
    return parse_single_int(text), text


def _live_ceiling(plan: Plan, host: HostRoot) -> int:
    explicit = plan.params.get("ceiling")
    if explicit is not None:
        return int(explicit)
    mem = parse_mem_total(handles.read_text(host, host.proc / "meminfo"))
    ceiling = ceiling_for(plan.target.id, None, mem)
    assert ceiling is not None  # allow-listed key (validated) and a known MemTotal
    return ceiling


def _unlimited(key: str, value: int) -> str | None:
    pool = pool_key(key)
    if pool is not None and pool.unlimited(value):
        return f"{key} is {value}, which means no limit: not raising"
    return None


@register
class RaiseSysctl(Action):
    name = "raise-sysctl"
    help = "Raise a shared kernel pool's limit (raise-only, within a ceiling), persisted to sysctl.d."
    Params = RaiseSysctlParams
    disruptive = False

    def plan(self, ctx: PlanContext) -> Plan | str:
        p = ctx.params
        assert isinstance(p, RaiseSysctlParams)
        readings = dict(ctx.readings)
        readings.setdefault(ctx.reading.probe, ctx.reading)
        current = current_from_readings(p.key, readings)
        ceiling = ceiling_for(p.key, p.ceiling_value, mem_total_from_readings(readings))
        target = Target(TargetKind.SYSCTL, id=p.key, name=p.key)
        how = f"x{p.factor:g}" + (f", at least +{p.step}" if p.step else "")
        shown = str(ceiling) if ceiling is not None else "from RAM"
        if p.ceiling_value is None and ceiling is not None:
            shown += " (from RAM)"
        params = {
            "key": p.key,
            "factor": p.factor,
            "step": p.step,
            "ceiling": p.ceiling_value,
            "persist": p.persist,
        }
        if current is None or ceiling is None:
            return Plan(
                self.name,
                target,
                f"raise {p.key} ({how}, ceiling {shown}) from the value read just before "
                "acting (no reading this cycle carried it)",
                params=params,
                expect={"current": current, "new": None},
            )
        if (reason := _unlimited(p.key, current)) is not None:
            return reason
        if current >= ceiling:
            return f"at ceiling: {p.key} is {current}, ceiling is {ceiling}"
        new = raised_value(current, p.factor, p.step, ceiling)
        return Plan(
            self.name,
            target,
            f"raise {p.key} from {current} to {new} ({how}, ceiling {shown})",
            params=params,
            expect={"current": current, "new": new},
        )

    def recheck(self, plan: Plan, ctx: ApplyContext) -> str | None:
        key = plan.target.id
        try:
            live, text = _read_live(ctx.host, key)
        except FileNotFoundError:
            return f"no sysctl {key} on this host"
        try:
            ceiling = _live_ceiling(plan, ctx.host)
        except ValueError as exc:
            return f"cannot compute the ceiling of {key}: {exc}"
        reason = self._judge(plan, live, text, ceiling)
        if reason is not None:
            return reason
        owners = find_owners(ctx.host, key)
        if owners:
            return (
                f"{key} is owned by {'; '.join(map(str, owners))}: remediator does not fight "
                "another owner of a key; raise it there"
            )
        return None

    @staticmethod
    def _judge(plan: Plan, live: int | None, text: str, ceiling: int) -> str | None:
        key = plan.target.id
        if live is None:
            return (
                f"{key} is {text.strip()!r}, not a single integer: raise-sysctl only raises one-number limits"
            )
        if (reason := _unlimited(key, live)) is not None:
            return reason
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
        ceiling = _live_ceiling(plan, ctx.host)
        # Re-judge on the value we are about to replace: apply must never write a lower value,
        # even if something changed it since recheck.
        reason = self._judge(plan, live, text, ceiling)
        if reason is not None or live is None:
            return ActionResult(Outcome.SKIPPED, reason or f"{key} unreadable")
        new = plan.expect.get("new")
        if new is None:
            pp = plan.params
            new = raised_value(live, float(pp["factor"]), pp["step"], ceiling)
        new = min(int(new), ceiling)
        before = {"key": key, "value": live, "ceiling": ceiling}
        # In-process, through the held read-write descriptor when the daemon has one: no fork,
        # no new file, so the raise works with fs.file-max reached and no pid left.
        handles.write_sysctl(ctx.host, key, new)
        after: dict[str, Any] = {"wanted": new}
        message = f"raised {key} from {live} to {new}"
        if plan.params.get("persist", True):
            when = datetime.fromtimestamp(ctx.clock.now(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            try:
                path = persist(ctx.host, key, new, f"{key}: raised from {live} to {new} at {when}")
            except OSError as exc:
                # The live raise stands (the host is no worse); the next boot will not keep it.
                after["persist_error"] = str(exc)
                message += f"; not persisted: {exc}"
            else:
                after["persisted"] = str(path)
                message += f", persisted in {path}"
        return ActionResult(Outcome.APPLIED, message, before, after=after)

    def verify(self, plan: Plan, result: ActionResult, ctx: ApplyContext) -> ActionResult:
        key = plan.target.id
        wanted = int(result.after["wanted"])
        value, text = _read_live(ctx.host, key)
        after = {**result.after, "value": value}
        problems = []
        if value != wanted:
            problems.append(f"read back {text.strip()!r} (the kernel may clamp this limit)")
        if "persisted" in result.after:
            kept = read_own_file(ctx.host).get(key)
            after["persisted_value"] = kept[0] if kept else None
            if kept is None or kept[0] != wanted:
                problems.append(f"the sysctl.d file holds {kept[0] if kept else 'nothing'} for {key}")
        message = "; ".join([result.message, *problems])  # a persist error is in the message already
        ok = not problems and "persist_error" not in result.after
        return ActionResult(Outcome.APPLIED, message, result.before, after, verified=ok)
