"""restart-degraded: restart the consumers that broke while a shared pool was exhausted.

Raising a limit heals nothing that already failed: a `tail -f` that fell back to polling stays
so, a kubelet that could not set its watches stays broken (seed case "shared-kernel-limits").
The limits probe lists them (`detail.degraded_consumers`): processes that rely on inotify and
hold none after their uid's pool was exhausted, and (limits_consumers) systemd services and
containers that crash-looped or failed with ENFILE / EMFILE / EAGAIN while a pool was exhausted.
This action restarts what can be restarted cleanly, through the owner:

* a process in a container: the container, through the Docker Engine API (`restart`, with the
  container's own stop timeout bound by `stopTimeout`); protected containers are skipped;
* a host process in a systemd service: `systemctl restart <unit>`;
* anything else (a `tail -f` in a login session) is never signalled: it is reported, for a
  person to restart.

Disruptive (the consumer restarts), so the bundled policy keeps it in audit mode. Right before
each restart the target is re-checked by handle: an inotify consumer is the same pid with the
same start time, still holding no inotify fd, and for a container the same container id, still
running; a crash-looping service is still not running and still in the same loop (the same
InvocationID, or NRestarts no lower than planned: each automatic restart is a new invocation);
a crash-looping container is the same id, still restarting or exited with an error, its
RestartCount no lower than planned, and not protected now. At most `maxRestarts` per run.
Verify: the degraded process is gone (replaced by the restart); a service runs under a new
InvocationID; a container has started again (a new StartedAt).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import Field

from remediator.actions.base import Action, ActionParams, ApplyContext, PlanContext, register
from remediator.host import HostRoot
from remediator.model import ActionResult, ContainerRef, Outcome, Plan, Target, TargetKind
from remediator.probes.limits_consumers import (
    PROPERTIES,
    ContainerState,
    UnitState,
    parse_systemctl_show,
)
from remediator.probes.limits_fdscan import INOTIFY_LINK
from remediator.probes.limits_parse import parse_stat_starttime

# Runs `systemctl ARGS...` and returns (exit status, output). ApplyContext.extra["systemctl"]
# replaces it in tests.
Systemctl = Callable[[Sequence[str]], tuple[int, str]]


def run_systemctl(args: Sequence[str]) -> tuple[int, str]:
    p = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=60, check=False)
    return p.returncode, (p.stdout + p.stderr).strip()


class RestartDegradedParams(ActionParams):
    maxRestarts: int = Field(default=5, ge=1, le=100)
    """At most this many restarts per run: one pool outage can degrade many consumers, and a
    storm of restarts is an outage of its own."""
    stopTimeout: int = Field(default=10, ge=0, le=300)
    """Seconds a container gets to exit before SIGKILL (`docker restart -t`); Docker's default."""
    containers: bool = True
    """Restart degraded processes' containers."""
    units: bool = True
    """Restart degraded host processes' systemd services."""


def _alive(host: HostRoot, pid: int, starttime: int) -> bool:
    try:
        return parse_stat_starttime(host.read_text(host.proc / str(pid) / "stat")) == starttime
    except (OSError, ValueError):
        return False


def _holds_inotify(host: HostRoot, pid: int) -> bool:
    fd_dir = host.proc / str(pid) / "fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(fd_dir / name) == INOTIFY_LINK:
                return True
        except OSError:
            continue
    return False


def _unit_state(ctx: ApplyContext, unit: str) -> UnitState | None:
    systemctl: Systemctl = ctx.extra.get("systemctl", run_systemctl)
    code, out = systemctl(["show", "--no-pager", "-p", ",".join(PROPERTIES), "--", unit])
    states = parse_systemctl_show(out) if code == 0 else []
    return states[0] if states and states[0].unit == unit else None


def _container_state(ctx: ApplyContext, cid: str) -> ContainerState | None:
    try:
        return ContainerState.from_inspect(ctx.docker().api.inspect_container(cid))
    except Exception:  # removed (NotFound) or Docker unreachable: not something to restart
        return None


def _restarted(t: Mapping[str, Any], ctx: ApplyContext) -> bool:
    """Whether the restart replaced what was degraded."""
    if t.get("why") != "crash":
        return not _alive(ctx.host, int(t["pid"]), int(t["starttime"]))
    if t["kind"] == "unit":
        state = _unit_state(ctx, str(t["id"]))
        return state is not None and state.invocation != t["invocation"]
    try:
        attrs = ctx.docker().api.inspect_container(t["id"])
    except Exception:
        return False
    return bool(attrs.get("State", {}).get("StartedAt") != t.get("started_at"))


@register
class RestartDegraded(Action):
    name = "restart-degraded"
    help = "Restart consumers that degraded while a pool was exhausted (their container or systemd service)."
    Params = RestartDegradedParams
    disruptive = True

    def plan(self, ctx: PlanContext) -> Plan | str:
        p = ctx.params
        assert isinstance(p, RestartDegradedParams)
        consumers = ctx.reading.detail.get("degraded_consumers") or []
        refs: dict[str, ContainerRef] = {s.container.id: s.container for s in ctx.reading.containers}
        targets: list[dict[str, Any]] = []
        by_hand: list[str] = []
        seen: set[tuple[str, str]] = set()
        for c in consumers:
            kind = c.get("kind")
            if kind in ("unit", "container"):  # crash loops and pool errnos (limits_consumers)
                target = self._crash_target(c, p, ctx, by_hand)
                if target is not None and (target["kind"], target["id"]) not in seen:
                    seen.add((target["kind"], target["id"]))
                    targets.append(target)
                continue
            who = f"pid {c['pid']} {c['name']} (uid {c['uid']})"
            cid, unit = c.get("container_id"), c.get("unit")
            if cid:
                ref = refs.get(cid)
                if not p.containers or ref is None or not ctx.eligible(ref):
                    by_hand.append(f"{who} in container {c.get('container')}: not eligible")
                    continue
                key = ("container", cid)
            elif unit:
                if not p.units:
                    by_hand.append(f"{who} in {unit}: units disabled")
                    continue
                key = ("unit", unit)
            else:
                by_hand.append(f"{who}: not in a container or a service, restart it by hand")
                continue
            if key in seen:
                continue
            seen.add(key)
            targets.append(
                {
                    "kind": key[0],
                    "id": key[1],
                    "name": c.get("container") or unit,
                    "why": "inotify",
                    "pid": c["pid"],
                    "starttime": c["starttime"],
                }
            )
        targets = targets[: p.maxRestarts]
        if not targets:
            return "no restartable degraded consumer" + (f" ({'; '.join(by_hand)})" if by_hand else "")
        names = ", ".join(f"{t['kind']} {t['name']}" for t in targets)
        return Plan(
            self.name,
            Target(TargetKind.HOST, id="degraded-consumers", name=names),
            f"restart {len(targets)} degraded consumer(s): {names}",
            params={"stopTimeout": p.stopTimeout},
            expect={"targets": targets, "by_hand": by_hand},
        )

    @staticmethod
    def _crash_target(
        c: Mapping[str, Any], p: RestartDegradedParams, ctx: PlanContext, by_hand: list[str]
    ) -> dict[str, Any] | None:
        why = f"{c.get('reason')} ({c.get('pool')})"
        if c["kind"] == "unit":
            if not p.units:
                by_hand.append(f"{c['unit']}: {why}: units disabled")
                return None
            return {
                "kind": "unit",
                "id": c["unit"],
                "name": c["unit"],
                "why": "crash",
                "invocation": c.get("invocation") or "",
                "restarts": int(c.get("restarts") or 0),
            }
        ref = ContainerRef(id=c["container_id"], name=c["container"], labels=c.get("labels") or {})
        if not p.containers or not ctx.eligible(ref):
            by_hand.append(f"container {ref.name}: {why}: not eligible")
            return None
        return {
            "kind": "container",
            "id": ref.id,
            "name": ref.name,
            "why": "crash",
            "restarts": int(c.get("restarts") or 0),
        }

    def recheck(self, plan: Plan, ctx: ApplyContext) -> str | None:
        if not any(self._still_degraded(t, ctx) for t in plan.expect["targets"]):
            return (
                "no planned consumer is still degraded (gone, restarted, holds inotify again, or recovered)"
            )
        return None

    @staticmethod
    def _still_degraded(t: Mapping[str, Any], ctx: ApplyContext) -> bool:
        if t.get("why") != "crash":
            host = ctx.host
            return _alive(host, int(t["pid"]), int(t["starttime"])) and not _holds_inotify(
                host, int(t["pid"])
            )
        if t["kind"] == "unit":
            state = _unit_state(ctx, str(t["id"]))
            return (
                state is not None
                and not state.running
                and (state.invocation == t["invocation"] or state.restarts >= int(t["restarts"]))
            )
        c = _container_state(ctx, str(t["id"]))
        return c is not None and c.id == t["id"] and c.down and c.restart_count >= int(t["restarts"])

    def apply(self, plan: Plan, ctx: ApplyContext) -> ActionResult:
        systemctl: Systemctl = ctx.extra.get("systemctl", run_systemctl)
        done: list[dict[str, Any]] = []
        skipped: list[str] = []
        for planned in plan.expect["targets"]:
            t = dict(planned)  # the container's StartedAt is added for verify
            if not self._still_degraded(t, ctx):
                skipped.append(f"{t['kind']} {t['name']}: no longer degraded")
                continue
            if t["kind"] == "container":
                reason = self._restart_container(t, plan, ctx)
            else:
                if t.get("why") == "crash":
                    # A service that hit its start limit refuses `restart` until the failure is
                    # reset ("Start request repeated too quickly"); resetting changes nothing else.
                    systemctl(["reset-failed", str(t["id"])])
                code, out = systemctl(["restart", str(t["id"])])
                reason = None if code == 0 else f"systemctl restart {t['id']}: {out or code}"
            if reason is None:
                done.append(t)
            else:
                skipped.append(reason)
        if not done:
            return ActionResult(Outcome.SKIPPED, "; ".join(skipped) or "nothing restarted")
        message = "restarted " + ", ".join(f"{t['kind']} {t['name']}" for t in done)
        if skipped:
            message += f"; skipped: {'; '.join(skipped)}"
        return ActionResult(Outcome.APPLIED, message, {"targets": done}, after={"restarted": done})

    @staticmethod
    def _restart_container(t: dict[str, Any], plan: Plan, ctx: ApplyContext) -> str | None:
        api = ctx.docker().api
        attrs = api.inspect_container(t["id"])
        if t.get("why") == "crash":
            state = ContainerState.from_inspect(attrs)
            if state.id != t["id"] or not state.down:
                return f"container {t['name']}: not the same degraded container any more"
        elif attrs.get("Id") != t["id"] or not attrs.get("State", {}).get("Running"):
            return f"container {t['name']}: not the same running container any more"
        t["started_at"] = attrs.get("State", {}).get("StartedAt")
        name = str(attrs.get("Name", "")).lstrip("/")
        labels = attrs.get("Config", {}).get("Labels") or {}
        if (m := ctx.protected_by(name, labels)) is not None:
            return f"container {name}: protected ({m})"
        api.restart(t["id"], timeout=int(plan.params["stopTimeout"]))
        return None

    def verify(self, plan: Plan, result: ActionResult, ctx: ApplyContext) -> ActionResult:
        still = [t for t in result.after["restarted"] if not _restarted(t, ctx)]
        message = result.message + (
            f"; still running as before: {[t['name'] for t in still]}" if still else ""
        )
        return ActionResult(Outcome.APPLIED, message, result.before, result.after, verified=not still)
