"""recreate-container: replace a running container by a fresh copy of itself (Docker adapter).

Why: a container's negative dentries belong to its mount namespace, not to its processes.
Killing the trasher process frees nothing; removing the container tears the namespace down and
the kernel drops every dentry under it (../shared/seeds/dentry-cache-isolation-story.txt).
Recreating does that while keeping the service: same name, image, labels, env, mounts, restart
policy and networks. On overlay2 that is half the story: a failed lookup also leaves a negative
dentry in the image's lower-layer directory on the host filesystem, which every container of
the image shares and which outlives the container (measured on 6.18: 200k failed lookups made
424k negative dentries, recreate freed 200k of them in 1.6 s). `reclaim-cgroup` frees both
halves, so it belongs before this action in a ladder.

Sequence (on any failure: remove the copy, give the old container its name back, start it):

1. inspect the old container;
2. create the copy from the inspected `Config` + `HostConfig` + the primary network's
   endpoint, under `<name>.remediator-new`, and connect its other networks (Engine API < 1.44
   accepts only one network at create);
3. stop the old one (`stopTimeout`), rename it `<name>.remediator-old`;
4. rename the copy to `<name>` and start it;
5. remove the old container (never its volumes: the copy uses them).

The create body is the inspected configuration posted back through the SDK's low-level
`create_container_from_config`, not rebuilt from keyword arguments, so settings the SDK has no
argument for survive. What is deliberately not copied: the default hostname (the old short id;
Docker gives the copy its own), the old short id among network aliases, and runtime facts
(addresses, endpoint ids). Anonymous volumes are re-attached by name, or the copy would start
with empty ones.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import docker.errors
import structlog
from pydantic import ConfigDict, Field, field_validator

from remediator.actions.base import (
    Action,
    ApplyContext,
    ContainerTargetParams,
    PlanContext,
    choose_container,
    register,
)
from remediator.errors import PermanentError
from remediator.host import HostRoot
from remediator.model import ActionResult, Outcome, Plan, Target, TargetKind
from remediator.probes.containers import call_with_retries
from remediator.probes.dentries import parse_dentry_state
from remediator.quantity import parse_duration, shown

log = structlog.get_logger(__name__)

T = TypeVar("T")

NEW_SUFFIX = ".remediator-new"
OLD_SUFFIX = ".remediator-old"
# Docker's own bound is none; ours keeps one recreate from holding the cycle for long.
MAX_STOP_TIMEOUT_SECONDS = 300.0


class RecreateContainerParams(ContainerTargetParams):
    model_config = ConfigDict(populate_by_name=True)

    stop_timeout: str = Field(default="10s", alias="stopTimeout")
    """How long the old container gets to exit after SIGTERM before SIGKILL (`docker stop -t`).
    10s: Docker's own default, which images are written to expect."""

    @field_validator("stop_timeout")
    @classmethod
    def _check_stop_timeout(cls, v: str) -> str:
        seconds = parse_duration(v)
        if seconds > MAX_STOP_TIMEOUT_SECONDS:
            raise ValueError(f"stopTimeout must be at most 5m, got {shown(v)}")
        return v

    @property
    def stop_timeout_seconds(self) -> int:
        # The Engine API takes whole seconds; round up so the container never gets less.
        return math.ceil(parse_duration(self.stop_timeout))


# ---------------------------------------------------------------------------------------------
# The create body (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateSpec:
    body: dict[str, Any]  # POST /containers/create body
    extra_networks: dict[str, dict[str, Any]] = field(default_factory=dict)  # connect after create


def _bind_target(bind: str) -> str:
    # "src:dst[:opts]"; src is a host path or a volume name (Linux: no ':' in either).
    parts = bind.split(":")
    return parts[1] if len(parts) >= 2 else parts[0]


def _endpoint(settings: Mapping[str, Any], old_short_id: str) -> dict[str, Any]:
    """User intent from an inspected endpoint; drops what the daemon derived at runtime."""
    aliases = [a for a in settings.get("Aliases") or [] if a != old_short_id]
    ep: dict[str, Any] = {}
    if settings.get("IPAMConfig"):
        ep["IPAMConfig"] = settings["IPAMConfig"]
    if settings.get("Links"):
        ep["Links"] = settings["Links"]
    if aliases:
        ep["Aliases"] = aliases
    if settings.get("DriverOpts"):
        ep["DriverOpts"] = settings["DriverOpts"]
    return ep


def creation_spec(attrs: Mapping[str, Any], image: str) -> CreateSpec:
    """The create body that reproduces the inspected container `attrs`, with `image` as image."""
    old_short_id = str(attrs["Id"])[:12]
    config = dict(attrs.get("Config") or {})
    host_config = dict(attrs.get("HostConfig") or {})
    config["Image"] = image
    # Docker sets an unset hostname to the short id; keep only a hostname someone chose.
    if config.get("Hostname") == old_short_id:
        config.pop("Hostname")
    # Inspect shows legacy links as "/db:/web/db"; create wants "db:db".
    if host_config.get("Links"):
        host_config["Links"] = [
            f"{src.lstrip('/')}:{dst.rsplit('/', 1)[-1]}"
            for src, _, dst in (link.partition(":") for link in host_config["Links"])
        ]
    # Anonymous volumes (an image VOLUME, `-v /path`, `--mount type=volume` without source)
    # have no name in the configuration, only in the inspected Mounts. Name them, or the copy
    # starts with new, empty volumes.
    volume_names = {
        m["Destination"]: m["Name"]
        for m in attrs.get("Mounts") or []
        if m.get("Type") == "volume" and m.get("Name")
    }
    mounts = [dict(m) for m in host_config.get("Mounts") or []]
    for m in mounts:
        if m.get("Type") == "volume" and not m.get("Source") and m.get("Target") in volume_names:
            m["Source"] = volume_names[m["Target"]]
    covered = {_bind_target(b) for b in host_config.get("Binds") or []}
    covered |= {str(m.get("Target")) for m in mounts}
    mounts += [
        {"Type": "volume", "Source": volume, "Target": target, "ReadOnly": not rw}
        for target, volume, rw in (
            (m["Destination"], m["Name"], m.get("RW", True))
            for m in attrs.get("Mounts") or []
            if m.get("Type") == "volume" and m.get("Name")
        )
        if target not in covered
    ]
    if mounts:
        host_config["Mounts"] = mounts
    body: dict[str, Any] = {**config, "HostConfig": host_config}

    networks = dict((attrs.get("NetworkSettings") or {}).get("Networks") or {})
    mode = str(host_config.get("NetworkMode") or "default")
    if mode in ("host", "none") or mode.startswith("container:"):
        return CreateSpec(body)
    primary = "bridge" if mode == "default" else mode
    if primary not in networks:  # NetworkMode may hold a network id
        primary = next(
            (n for n, s in networks.items() if str(s.get("NetworkID", "")).startswith(mode)),
            primary,
        )
    endpoints = {n: _endpoint(s, old_short_id) for n, s in networks.items()}
    if primary in endpoints:
        body["NetworkingConfig"] = {"EndpointsConfig": {primary: endpoints.pop(primary)}}
    return CreateSpec(body, endpoints)


def _mount_key(m: Mapping[str, Any]) -> tuple[str, str, str, bool]:
    source = m.get("Name") if m.get("Type") == "volume" else m.get("Source")
    return (str(m.get("Type")), str(source), str(m.get("Destination")), bool(m.get("RW")))


def redact_env(entries: Sequence[str]) -> list[str]:
    """`KEY=value` -> `KEY=sha256:<12 hex>`: the audit trail and the state database must not hold
    secrets passed in the environment, yet verify can still tell that every value came across."""
    out = []
    for entry in entries:
        key, sep, value = entry.partition("=")
        out.append(f"{key}=sha256:{hashlib.sha256(value.encode()).hexdigest()[:12]}" if sep else key)
    return out


def config_snapshot(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The facts verify compares between old and new: JSON-friendly, order-insensitive mounts,
    environment values redacted (`redact_env`)."""
    config = attrs.get("Config") or {}
    host_config = attrs.get("HostConfig") or {}
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    return {
        "id": attrs.get("Id"),
        "name": str(attrs.get("Name") or "").lstrip("/"),
        "image": attrs.get("Image"),
        "labels": dict(config.get("Labels") or {}),
        "env": redact_env(config.get("Env") or []),
        "cmd": list(config.get("Cmd") or []),
        "mounts": sorted(list(_mount_key(m)) for m in attrs.get("Mounts") or []),
        "restart_policy": dict(host_config.get("RestartPolicy") or {}),
        "networks": sorted(networks),
    }


_COMPARED = ("name", "image", "labels", "env", "cmd", "mounts", "restart_policy", "networks")


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [k for k in _COMPARED if old.get(k) != new.get(k)]


# ---------------------------------------------------------------------------------------------
# The action
# ---------------------------------------------------------------------------------------------


def _negative_dentries(host: HostRoot) -> int | None:
    try:
        return parse_dentry_state(host.read_sysctl("fs.dentry-state")).nr_negative
    except (OSError, ValueError):
        return None


def _is_not_found(exc: BaseException) -> bool:
    return isinstance(exc.__cause__, docker.errors.NotFound)


class _Docker:
    """The few Engine API calls recreate needs, each retried (bounded) on transient errors."""

    def __init__(self, ctx: ApplyContext) -> None:
        self.api = ctx.docker().api
        self._sleep = ctx.clock.sleep

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return call_with_retries(what, fn, *args, sleep=self._sleep, **kwargs)

    def inspect(self, ident: str) -> dict[str, Any]:
        return dict(self.call("inspect container", self.api.inspect_container, ident))


@dataclass
class _Recreation:
    """One recreate in progress: does the steps and records them, so rollback undoes exactly
    what was done (newest first)."""

    dk: _Docker
    old_id: str
    name: str
    new_id: str | None = None
    touched_old: bool = False
    steps: list[str] = field(default_factory=list)

    def swap(self, spec: CreateSpec, stop_timeout: int) -> None:
        dk, api, name = self.dk, self.dk.api, self.name
        created = dk.call(
            "create copy", api.create_container_from_config, spec.body, name=f"{name}{NEW_SUFFIX}"
        )
        self.new_id = str(created["Id"])
        self.steps.append(f"created {name}{NEW_SUFFIX} ({self.new_id[:12]})")
        for network, ep in spec.extra_networks.items():
            ipam = ep.get("IPAMConfig") or {}
            dk.call(
                "connect network",
                api.connect_container_to_network,
                self.new_id,
                network,
                aliases=ep.get("Aliases"),
                links=ep.get("Links"),
                ipv4_address=ipam.get("IPv4Address") or None,
                ipv6_address=ipam.get("IPv6Address") or None,
                driver_opt=ep.get("DriverOpts"),
            )
            self.steps.append(f"connected {network}")
        # From here on the old container may change even if a call reports failure (a timeout
        # after the daemon acted): rollback then restores it from its inspected state.
        self.touched_old = True
        dk.call("stop old container", api.stop, self.old_id, timeout=stop_timeout)
        self.steps.append("stopped old")
        dk.call("rename old container", api.rename, self.old_id, f"{name}{OLD_SUFFIX}")
        self.steps.append(f"renamed old to {name}{OLD_SUFFIX}")
        dk.call("rename copy", api.rename, self.new_id, name)
        self.steps.append(f"renamed copy to {name}")
        dk.call("start copy", api.start, self.new_id)
        self.steps.append("started copy")

    def rollback(self) -> list[str]:
        """Remove the copy, then give the old container back its name and start it again.

        Keeps going on errors and says what could not be undone. The old container's state is
        read, not assumed, so an ambiguous failure (did the rename happen?) is undone correctly.
        """
        dk, api, name, done = self.dk, self.dk.api, self.name, []
        # Without an id, create may still have happened (the answer was lost), or a leftover of
        # an interrupted earlier attempt holds the temporary name: remove it by that name.
        new = self.new_id or f"{name}{NEW_SUFFIX}"
        try:
            # force: it may be running; v=False: anonymous volumes are the old container's too.
            dk.call("remove copy", api.remove_container, new, v=False, force=True)
            done.append("removed copy")
        except Exception as e:
            if self.new_id is not None or not _is_not_found(e):
                done.append(f"COULD NOT remove copy {new}: {e}")
        if not self.touched_old:
            return done
        try:
            old = dk.inspect(self.old_id)
        except Exception as e:
            return [*done, f"COULD NOT inspect old container: {e}"]
        if str(old.get("Name") or "").lstrip("/") != name:
            try:
                dk.call("rename old back", api.rename, self.old_id, name)
                done.append(f"renamed old back to {name}")
            except Exception as e:
                done.append(f"COULD NOT rename old back to {name}: {e}")
        if not (old.get("State") or {}).get("Running"):
            try:
                dk.call("restart old", api.start, self.old_id)
                done.append("started old")
            except Exception as e:
                done.append(f"COULD NOT start old: {e}")
        return done


@register
class RecreateContainer(Action):
    name = "recreate-container"
    help = "Recreate a container from its own configuration (frees its mount namespace's dentries)."
    Params = RecreateContainerParams
    disruptive = True

    def plan(self, ctx: PlanContext) -> Plan | str:
        p = ctx.params
        assert isinstance(p, RecreateContainerParams)
        chosen = choose_container(ctx, p.target, p.rankBy)
        if isinstance(chosen, str):
            return chosen
        if chosen.runtime != "docker":
            return f"container {chosen.name} runs on {chosen.runtime}; recreate supports docker"
        return Plan(
            self.name,
            Target(TargetKind.CONTAINER, id=chosen.id, name=chosen.name, detail={"image": chosen.image}),
            f"recreate container {chosen.name} ({chosen.short_id}) from its configuration: "
            f"create a copy, stop the old one (timeout {p.stop_timeout}), swap names, start "
            "the copy, remove the old one",
            params={
                "target": p.target,
                "stopTimeout": p.stop_timeout,
                "stop_timeout_s": p.stop_timeout_seconds,
            },
            expect={"name": chosen.name},
        )

    def recheck(self, plan: Plan, ctx: ApplyContext) -> str | None:
        dk = _Docker(ctx)
        try:
            attrs = dk.inspect(plan.target.id)
        except PermanentError as e:
            if _is_not_found(e):
                return f"container {plan.target.id[:12]} is gone"
            raise
        return self._judge(plan, attrs, ctx)

    @staticmethod
    def _judge(plan: Plan, attrs: Mapping[str, Any], ctx: ApplyContext) -> str | None:
        short = plan.target.id[:12]
        if attrs.get("Id") != plan.target.id:
            return f"container {short} is now a different container ({str(attrs.get('Id'))[:12]})"
        name = str(attrs.get("Name") or "").lstrip("/")
        if name != plan.target.name:
            return f"container {short} was renamed from {plan.target.name} to {name}"
        if not (attrs.get("State") or {}).get("Running"):
            return f"container {name} is not running"
        protected = ctx.protected_by(name, (attrs.get("Config") or {}).get("Labels") or {})
        if protected is not None:
            return f"container {name} is protected ({protected})"
        if (attrs.get("HostConfig") or {}).get("AutoRemove"):
            # Docker deletes a --rm container when it stops: there would be nothing to roll
            # back to if the copy failed to start.
            return f"container {name} was started with --rm (AutoRemove): not recreating"
        return None

    def apply(self, plan: Plan, ctx: ApplyContext) -> ActionResult:
        dk = _Docker(ctx)
        old_id = plan.target.id
        old = dk.inspect(old_id)
        reason = self._judge(plan, old, ctx)
        if reason is not None:
            return ActionResult(Outcome.SKIPPED, reason)
        name = str(plan.target.name)
        before = {**config_snapshot(old), "host_nr_negative": _negative_dentries(ctx.host)}
        image, image_note = self._image(dk, old)
        spec = creation_spec(old, image)
        job = _Recreation(dk, old_id, name)
        try:
            job.swap(spec, int(plan.params["stop_timeout_s"]))
        except Exception as e:  # any failure, ours or Docker's: undo what was done
            undo = job.rollback()
            log.error(
                "recreate_failed", container=name, id=old_id, error=str(e), steps=job.steps, rollback=undo
            )
            return ActionResult(
                Outcome.FAILED,
                f"recreate {name} failed after [{', '.join(job.steps) or 'nothing'}]: {e}; "
                f"rollback: {'; '.join(undo) or 'nothing to undo'}",
                before,
            )
        assert job.new_id is not None
        message = f"recreated {name}: {old_id[:12]} -> {job.new_id[:12]}{image_note}"
        try:
            dk.call("remove old container", dk.api.remove_container, old_id, v=False)
        except Exception as e:  # the copy runs; the old one just lingers
            message += f"; old container kept as {name}{OLD_SUFFIX}: {e}"
            log.warning("recreate_old_kept", container=name, id=old_id, error=str(e))
        return ActionResult(Outcome.APPLIED, message, before, after={"id": job.new_id})

    @staticmethod
    def _image(dk: _Docker, old: Mapping[str, Any]) -> tuple[str, str]:
        """The image reference to create from: the same one, unless the tag has moved on.

        Recreating must not upgrade: if the tag now names another image (or is gone), pin the
        copy to the old container's image id.
        """
        ref = str((old.get("Config") or {}).get("Image") or "")
        image_id = str(old.get("Image"))
        try:
            current = dk.call("inspect image", dk.api.inspect_image, ref)["Id"] if ref else None
        except PermanentError:
            current = None
        if current == image_id:
            return ref, ""
        return image_id, f" (pinned to image {image_id[:19]}: {ref or 'its tag'} moved)"

    def verify(self, plan: Plan, result: ActionResult, ctx: ApplyContext) -> ActionResult:
        dk = _Docker(ctx)
        new_id = str(result.after["id"])
        new = dk.inspect(new_id)
        snapshot = config_snapshot(new)
        running = bool((new.get("State") or {}).get("Running"))
        differences = config_differences(result.before, snapshot)
        if not running:
            differences.insert(0, "not running")
        after = {**snapshot, "host_nr_negative": _negative_dentries(ctx.host), "differences": differences}
        message = result.message
        if differences:
            message += f"; the copy differs in: {', '.join(differences)}"
        return ActionResult(Outcome.APPLIED, message, result.before, after, verified=not differences)
