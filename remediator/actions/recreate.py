"""recreate-container: replace a running container by a fresh copy of itself, never leaving the
service worse than before (docs/recreate.md).

Why: a container's negative dentries belong to its mount namespace, not to its processes.
Killing the trasher process frees nothing; removing the container tears the namespace down and
the kernel drops every dentry under it (../shared/seeds/dentry-cache-isolation-story.txt). On
overlay2 that is half the story: a failed lookup also leaves a negative dentry in the image's
lower-layer directory, which outlives the container; `reclaim-cgroup` frees both halves, so it
belongs before this action in a ladder.

The procedure and its crash recovery live in `recreate_procedure.py`, what a configuration is
and how two are compared in `docker_config.py`, the Engine API calls in `docker_engine.py`.
This module decides whether to recreate at all:

* refused: a container an orchestrator owns (Kubernetes, swarm tasks), `--rm` containers,
  protected ones, containers with dependents (`container:X` namespaces, `--volumes-from X`)
  unless `allowDependents`, writable-layer changes outside `disposablePaths` unless
  `allowLayerLoss`, anonymous volumes that are not local or larger than `maxVolumeCopy`;
* said in the plan and in audit mode: what cannot be carried over (the id, the log history,
  the restart count, the health state, writable-layer changes).

With `allowDependents`, the target and its dependents are one group: the dependents are stopped
first, the target is recreated, then each dependent is recreated against the new target's id
(its `container:` modes and `VolumesFrom` rewritten) and verified the same way; the originals
are removed only when every copy has settled, and any failure rolls back the whole group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from pydantic import ConfigDict, Field, field_validator

from remediator.actions.base import (
    Action,
    ApplyContext,
    ContainerTargetParams,
    Interrupted,
    PlanContext,
    register,
)
from remediator.actions.base import (
    choose_container as _choose,
)
from remediator.actions.docker_config import (
    anonymous_volumes,
    configuration,
    creation_spec,
    dependents,
    differences,
    layer_changes,
    name_of,
    orchestrator_refusal,
)
from remediator.actions.docker_engine import DockerEngine
from remediator.actions.recreate_procedure import (
    Recreation,
    commit_group,
    recover_group,
    rollback_group,
    temp_names,
    tree_size,
)
from remediator.host import HostRoot
from remediator.model import ActionResult, Outcome, Plan, Target, TargetKind
from remediator.probes.dentries import parse_dentry_state
from remediator.quantity import parse_count, parse_duration, shown

log = structlog.get_logger(__name__)

# Docker's own bound is none; ours keeps one recreate from holding the cycle for long.
MAX_STOP_TIMEOUT_SECONDS = 300.0
MAX_WATCH_SECONDS = 600.0
# Paths whose content is scratch by convention (FHS: /tmp, /var/tmp, /run): losing them with
# the writable layer is what a restart does anyway.
DEFAULT_DISPOSABLE = ("/tmp", "/var/tmp", "/run", "/var/run")  # noqa: S108 (inside the container)
DOCKER_MOUNT_POINTS = (
    "/dev",
    "/proc",
    "/sys",
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/sbin/docker-init",
)
LOST_ALWAYS = ("the container id", "its log history (docker logs)", "its restart count", "its health state")


class RecreateContainerParams(ContainerTargetParams):
    model_config = ConfigDict(populate_by_name=True)

    stop_timeout: str = Field(default="10s", alias="stopTimeout")
    """How long the old container gets to exit after its stop signal before SIGKILL, when the
    container sets no StopTimeout of its own. 10s: Docker's own default."""
    watch_for: str = Field(default="10s", alias="watchFor")
    """How long the copy must run (not exit, not restart, not turn unhealthy) before the
    original is removed. 10s sees a crash at start-up and the first restart of a crash loop."""
    health_timeout: str = Field(default="2m", alias="healthTimeout")
    """With a healthcheck: how long the copy may take to become healthy."""
    disposable_paths: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DISPOSABLE), alias="disposablePaths"
    )
    """Writable-layer changes under these paths may be lost; any other change refuses."""
    allow_layer_loss: bool = Field(default=False, alias="allowLayerLoss")
    """Recreate even when the writable layer holds changes outside `disposablePaths`."""
    allow_dependents: bool = Field(default=False, alias="allowDependents")
    """Recreate a container that others depend on (their `container:X` namespaces,
    `--volumes-from X`): they are stopped and recreated against the new container."""
    max_volume_copy: str = Field(default="1Gi", alias="maxVolumeCopy")
    """Anonymous volumes are copied into the copy's own (so they stay anonymous); refuse when
    their data is larger than this (the copy happens while the service is stopped)."""

    @field_validator("stop_timeout")
    @classmethod
    def _check_stop_timeout(cls, v: str) -> str:
        seconds = parse_duration(v)
        if seconds > MAX_STOP_TIMEOUT_SECONDS:
            raise ValueError(f"stopTimeout must be at most 5m, got {shown(v)}")
        return v

    @field_validator("watch_for", "health_timeout")
    @classmethod
    def _check_watch(cls, v: str) -> str:
        if parse_duration(v) > MAX_WATCH_SECONDS:
            raise ValueError(f"must be at most 10m, got {shown(v)}")
        return v

    @field_validator("disposable_paths")
    @classmethod
    def _check_paths(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.startswith("/") or p.rstrip("/") == "":
                raise ValueError(f"expected absolute paths other than /, got {p!r}")
        return v

    @field_validator("max_volume_copy")
    @classmethod
    def _check_size(cls, v: str) -> str:
        parse_count(v)
        return v

    @property
    def stop_timeout_seconds(self) -> int:
        # The Engine API takes whole seconds; round up so the container never gets less.
        return math.ceil(parse_duration(self.stop_timeout))


def _negative_dentries(host: HostRoot) -> int | None:
    try:
        return parse_dentry_state(host.read_sysctl("fs.dentry-state")).nr_negative
    except (OSError, ValueError):
        return None


def _engine(ctx: ApplyContext) -> DockerEngine:
    return DockerEngine(ctx.docker(), sleep=ctx.clock.sleep)


def _params(plan: Plan) -> RecreateContainerParams:
    return RecreateContainerParams.model_validate(dict(plan.params["params"]))


@register
class RecreateContainer(Action):
    name = "recreate-container"
    help = "Recreate a container from its own configuration (frees its mount namespace's dentries)."
    Params = RecreateContainerParams
    disruptive = True

    def plan(self, ctx: PlanContext) -> Plan | str:
        p = ctx.params
        assert isinstance(p, RecreateContainerParams)
        chosen = _choose(ctx, p.target, p.rankBy, p.offender)
        if isinstance(chosen, str):
            return chosen
        if chosen.runtime != "docker":
            return f"container {chosen.name} runs on {chosen.runtime}; recreate supports docker"
        refusal = orchestrator_refusal(chosen.labels)
        if refusal is not None:
            return f"container {chosen.name} is {refusal}"
        return Plan(
            self.name,
            Target(TargetKind.CONTAINER, id=chosen.id, name=chosen.name, detail={"image": chosen.image}),
            f"recreate container {chosen.name} ({chosen.short_id}) from its configuration: create a "
            f"copy, stop the original, swap names, start the copy, watch it {p.watch_for}, then remove "
            f"the original; lost: {', '.join(LOST_ALWAYS)}",
            params={"params": p.model_dump(mode="json", by_alias=True)},
            expect={"name": chosen.name},
        )

    # judging the live container ---------------------------------------------------------------
    def recheck(self, plan: Plan, ctx: ApplyContext) -> str | None:
        e = _engine(ctx)
        attrs = e.find(plan.target.id)
        if attrs is None:
            return f"container {plan.target.id[:12]} is gone"
        return self._judge(plan, attrs, ctx, e)

    def _judge(self, plan: Plan, attrs: Mapping[str, Any], ctx: ApplyContext, e: DockerEngine) -> str | None:
        p = _params(plan)
        short = plan.target.id[:12]
        if attrs.get("Id") != plan.target.id:
            return f"container {short} is now a different container ({str(attrs.get('Id'))[:12]})"
        name = name_of(attrs)
        if name != plan.target.name:
            return f"container {short} was renamed from {plan.target.name} to {name}"
        if not (attrs.get("State") or {}).get("Running"):
            return f"container {name} is not running"
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        protected = ctx.protected_by(name, labels)
        if protected is not None:
            return f"container {name} is protected ({protected})"
        refusal = orchestrator_refusal(labels)
        if refusal is not None:
            return f"container {name} is {refusal}"
        if (attrs.get("HostConfig") or {}).get("AutoRemove"):
            # Docker deletes a --rm container when it stops: nothing to roll back to.
            return f"container {name} was started with --rm (AutoRemove): not recreating"
        deps = dependents(attrs, e.all_containers())
        if deps and not p.allow_dependents:
            return (
                f"container {name} has dependents: {', '.join(map(str, deps))}; recreating it would "
                "cut them off (set allowDependents: true to stop and recreate them too)"
            )
        for d in deps:
            other = e.find(d.id) or {}
            why = ctx.protected_by(d.name, (other.get("Config") or {}).get("Labels") or {})
            if why is not None:
                return f"dependent {d.name} of {name} is protected ({why})"
        lost = self._layer_loss(attrs, e, p)
        if lost and not p.allow_layer_loss:
            shown = ", ".join(lost[:5]) + (f" (+{len(lost) - 5} more)" if len(lost) > 5 else "")
            return (
                f"container {name} has writable-layer changes a recreate would lose: {shown} "
                "(declare them in disposablePaths, or set allowLayerLoss: true)"
            )
        limit = int(parse_count(p.max_volume_copy))
        for v in anonymous_volumes(attrs):
            if v.driver != "local" or not v.source:
                return (
                    f"container {name}'s anonymous volume at {v.destination} uses driver "
                    f"{v.driver or '?'}: its data cannot be copied"
                )
            try:
                size = tree_size(v.source, limit)
            except OSError as exc:
                return f"cannot measure anonymous volume {v.destination} ({v.source}): {exc}"
            if size > limit:
                return (
                    f"container {name}'s anonymous volume at {v.destination} holds more than "
                    f"maxVolumeCopy ({p.max_volume_copy}) to copy"
                )
        return None

    @staticmethod
    def _layer_loss(attrs: Mapping[str, Any], e: DockerEngine, p: RecreateContainerParams) -> list[str]:
        mounts = [str(m.get("Destination") or "") for m in attrs.get("Mounts") or []]
        mounts += list(((attrs.get("HostConfig") or {}).get("Tmpfs") or {}).keys())
        # What Docker itself mounts into every container (and --init's binary).
        mounts += list(DOCKER_MOUNT_POINTS)
        return layer_changes(e.diff(str(attrs["Id"])), p.disposable_paths, mounts)

    def preview(self, plan: Plan, ctx: ApplyContext) -> str:
        e = _engine(ctx)
        attrs = e.find(plan.target.id) or {}
        p = _params(plan)
        state = attrs.get("State") or {}
        health = (state.get("Health") or {}).get("Status")
        facts = [
            f"restart count {attrs.get('RestartCount', 0)}",
            f"log driver {((attrs.get('HostConfig') or {}).get('LogConfig') or {}).get('Type', '?')}",
        ]
        if health:
            facts.append(f"health {health}")
        layer = self._layer_loss(attrs, e, p) if attrs else []
        lost = f"; writable-layer changes lost: {', '.join(layer[:5])}" if layer else ""
        deps = dependents(attrs, e.all_containers()) if attrs else []
        dep = f"; dependents recreated too: {', '.join(map(str, deps))}" if deps else ""
        anon = anonymous_volumes(attrs) if attrs else []
        vol = f"; anonymous volumes copied: {', '.join(v.destination for v in anon)}" if anon else ""
        return f" ({', '.join(facts)}{lost}{dep}{vol})"

    # acting --------------------------------------------------------------------------------
    def apply(self, plan: Plan, ctx: ApplyContext) -> ActionResult:
        e = _engine(ctx)
        p = _params(plan)
        old = e.find(plan.target.id)
        if old is None:
            return ActionResult(Outcome.SKIPPED, f"container {plan.target.id[:12]} is gone")
        reason = self._judge(plan, old, ctx, e)
        if reason is not None:
            return ActionResult(Outcome.SKIPPED, reason)
        before = {"configuration": configuration(old), "host_nr_negative": _negative_dentries(ctx.host)}
        old_id = str(old["Id"])
        dep_ids = list(dict.fromkeys(d.id for d in dependents(old, e.all_containers())))
        # One group: the target and its dependents are committed together, or not at all.
        jobs: list[Recreation] = []
        current: Recreation | None = None
        notes: list[str] = []
        try:
            current, note = self._job(old, ctx, e, group=old_id)
            running = [did for did in dep_ids if ((e.inspect(did).get("State") or {}).get("Running"))]
            if running:  # dependents first: they lose their namespace when the target stops
                current.stopped = running
                current.enter("stopping_dependents")
                for did in running:
                    e.stop(did, _stop_timeout(e.inspect(did), p))
            self._run(current, old, p, None)
            notes.append(note)
            jobs.append(current)
            target_copy = current.new_id
            assert target_copy is not None
            for did in dep_ids:
                d_old = e.inspect(did)
                rewrite = {old_id: target_copy, name_of(old): target_copy}
                current, note = self._job(d_old, ctx, e, group=old_id, rewrite=rewrite)
                self._run(current, d_old, p, rewrite)
                notes.append(note)
                jobs.append(current)
            current = None
        except Exception as exc:  # any failure, ours or Docker's: undo the whole group
            group = [*jobs, *([current] if current is not None else [])]
            steps = [s for j in group for s in j.steps]
            undo = rollback_group(group)
            log.error(
                "recreate_failed",
                container=plan.target.name,
                id=old_id,
                error=str(exc),
                steps=steps,
                rollback=undo,
            )
            return ActionResult(
                Outcome.FAILED,
                f"recreate {plan.target.name} failed after [{', '.join(steps) or 'nothing'}]: {exc}; "
                f"rollback: {'; '.join(undo) or 'nothing to undo'}",
                before,
            )
        problems = commit_group(jobs)
        for problem in problems:
            log.warning("recreate_old_kept", container=plan.target.name, error=problem)
        parts = [
            f"recreated {job.name}: {job.old_id[:12]} -> {str(job.new_id)[:12]}{note}"
            for job, note in zip(jobs, notes, strict=True)
        ]
        message = "; ".join(parts[:1] + [f"dependent {x}" for x in parts[1:]] + problems)
        return ActionResult(Outcome.APPLIED, message, before, {"id": jobs[0].new_id})

    def _job(
        self,
        old: Mapping[str, Any],
        ctx: ApplyContext,
        e: DockerEngine,
        *,
        group: str,
        rewrite: Mapping[str, str] | None = None,
    ) -> tuple[Recreation, str]:
        old_id, name = str(old["Id"]), name_of(old)
        image, image_note = self._image(e, old)
        temp, aside = temp_names(name)
        journal = ctx.journal(self.name, old_id)
        job = Recreation(e, journal, ctx.clock, old_id, name, temp, aside, ctx.clock.now(), group=group)
        job.spec = creation_spec(old, image, api_version=e.api_version, rewrite=rewrite)
        return job, image_note

    @staticmethod
    def _run(
        job: Recreation, old: Mapping[str, Any], p: RecreateContainerParams, rewrite: Mapping[str, str] | None
    ) -> None:
        assert job.spec is not None
        job.run(
            _rewritten(old, job.spec) if rewrite else old,
            job.spec,
            stop_timeout=_stop_timeout(old, p),
            watch_for=parse_duration(p.watch_for),
            health_timeout=parse_duration(p.health_timeout),
        )

    @staticmethod
    def _image(e: DockerEngine, old: Mapping[str, Any]) -> tuple[str, str]:
        """The image reference to create from: the same one, unless the tag has moved on.

        Recreating must not upgrade: if the tag now names another image (or is gone), pin the
        copy to the old container's image id.
        """
        ref = str((old.get("Config") or {}).get("Image") or "")
        image_id = str(old.get("Image"))
        if ref and e.image_id(ref) == image_id:
            return ref, ""
        return image_id, f" (pinned to image {image_id[:19]}: {ref or 'its tag'} moved)"

    def verify(self, plan: Plan, result: ActionResult, ctx: ApplyContext) -> ActionResult:
        e = _engine(ctx)
        new_id = str(result.after["id"])
        new = e.find(new_id)
        if new is None:
            return ActionResult(
                Outcome.APPLIED, f"{result.message}; the copy is gone", result.before, verified=False
            )
        found = differences(result.before["configuration"], configuration(new))
        if not (new.get("State") or {}).get("Running"):
            found.insert(0, "the copy is not running")
        if name_of(new) != plan.target.name:
            found.insert(0, f"the copy is named {name_of(new)}")
        after = {"id": new_id, "host_nr_negative": _negative_dentries(ctx.host), "differences": found}
        message = result.message
        if found:
            message += f"; the copy differs: {'; '.join(found[:5])}"
        return ActionResult(Outcome.APPLIED, message, result.before, after, verified=not found)

    def recover(self, interrupted: Interrupted, ctx: ApplyContext) -> ActionResult:
        return self.recover_all([interrupted], ctx)[0]

    def recover_all(self, entries: Sequence[Interrupted], ctx: ApplyContext) -> list[ActionResult]:
        """A target and its dependents (one journal entry each, same `group`) are finished or
        undone together."""
        e = _engine(ctx)
        groups: dict[str, list[Interrupted]] = {}
        for entry in entries:
            groups.setdefault(str(entry.data.get("group") or entry.data.get("old_id")), []).append(entry)
        results: dict[int, ActionResult] = {}
        for members in groups.values():
            journals = [(_ReuseJournal(ctx, m), m.phase, m.data) for m in members]
            forward, done = recover_group(e, ctx.clock, journals)
            how = "finished" if forward else "rolled back"
            failed = any("COULD NOT" in d for d in done)
            names = ", ".join(str(m.data.get("name")) for m in members)
            phases = ", ".join(m.phase for m in members)
            result = ActionResult(
                Outcome.FAILED if failed else (Outcome.APPLIED if forward else Outcome.SKIPPED),
                f"recreate of {names} interrupted in phase {phases}: {how}: "
                f"{'; '.join(done) or 'nothing to do'}",
            )
            for m in members:
                results[m.entry_id] = result
        return [results[entry.entry_id] for entry in entries]


class _ReuseJournal:
    """Recovery goes on writing the interrupted entry's phases (a crash during recovery is
    recovered again from where it got to)."""

    def __init__(self, ctx: ApplyContext, interrupted: Interrupted) -> None:
        self._record = ctx.extra.get("journal_update")
        self._interrupted = interrupted

    def record(self, phase: str, data: Mapping[str, Any], at: float | None = None) -> None:
        if self._record is not None:
            self._record(self._interrupted.entry_id, phase, data, at)

    def close(self, outcome: str, at: float | None = None) -> None:
        """The engine closes the entry with the recovery's outcome."""


def _stop_timeout(attrs: Mapping[str, Any], p: RecreateContainerParams) -> int:
    own = (attrs.get("Config") or {}).get("StopTimeout")
    if isinstance(own, int) and own >= 0:
        return min(own, int(MAX_STOP_TIMEOUT_SECONDS))
    return p.stop_timeout_seconds


def _rewritten(old: Mapping[str, Any], spec: Any) -> dict[str, Any]:
    """The original's inspect with the rewritten references, for the copy's diff."""
    out = dict(old)
    host_config = dict(old.get("HostConfig") or {})
    for key in ("NetworkMode", "PidMode", "IpcMode", "VolumesFrom"):
        if key in spec.body["HostConfig"]:
            host_config[key] = spec.body["HostConfig"][key]
    out["HostConfig"] = host_config
    return out
