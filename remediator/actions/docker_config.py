"""What a Docker container's configuration is, read from `docker inspect` (pure: no I/O).

Used by recreate-container to build the copy, to prove the copy equals the original before the
original is touched, and to say what a recreate cannot carry over. Everything here takes the
inspected attributes (the Engine API's `GET /containers/{id}/json`) and returns plain data.

Normalisation (what Docker itself rewrites, so a difference there is no difference):

* a mount target's trailing slash (`-v vol:/data/` and `/data` are one mount point);
* the default hostname, which Docker sets to the container's short id;
* network aliases Docker adds by itself: the short id (20.10 adds it on user networks), and the
  container's own name;
* runtime facts of an endpoint (addresses Docker picked, endpoint and sandbox ids, MAC
  addresses it generated): only what was asked for (`IPAMConfig`, `Aliases`, `Links`,
  `DriverOpts`) is configuration;
* an anonymous volume's name (the copy gets its own anonymous volume, see recreate.py): it is
  compared by destination, driver and mode, not by name;
* environment values are compared by hash (`redact_env`), so the state database never holds
  secrets passed in the environment.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

KUBERNETES_LABEL_PREFIX = "io.kubernetes."
SWARM_TASK_LABEL = "com.docker.swarm.task.id"
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
SWARM_SERVICE_LABEL = "com.docker.swarm.service.name"
# Namespace-sharing modes that point at another container: "container:<id or name>".
SHARED_MODES = ("NetworkMode", "PidMode", "IpcMode")


def _path(p: str) -> str:
    """A mount path as Docker compares it: no trailing slash (but "/" stays "/")."""
    return p.rstrip("/") or "/"


def bind_parts(bind: str) -> tuple[str | None, str, str]:
    """`-v` syntax "src:dst[:opts]" / "dst" -> (src or None, dst, opts). On Linux neither
    part holds a ':'."""
    parts = bind.split(":")
    if len(parts) == 1:
        return None, parts[0], ""
    return parts[0], parts[1], ":".join(parts[2:])


def short_id(attrs: Mapping[str, Any]) -> str:
    return str(attrs.get("Id") or "")[:12]


def name_of(attrs: Mapping[str, Any]) -> str:
    return str(attrs.get("Name") or "").lstrip("/")


# ---------------------------------------------------------------------------------------------
# Anonymous volumes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnonymousVolume:
    destination: str
    name: str
    source: str  # the host path of its data (local driver), "" otherwise
    driver: str


def anonymous_volumes(attrs: Mapping[str, Any]) -> list[AnonymousVolume]:
    """Volumes Docker created for this container without a name being asked for: `-v /path`,
    `--mount type=volume,target=/path`, and an image's VOLUME that nothing else covers.

    These are the ones `docker rm -v` deletes with the container (Docker skips mount points
    whose spec names a source). The inspected `Mounts` list does not say which are anonymous;
    the configuration does: a volume mount point is named exactly when a bind or mount of the
    configuration gives it a source.
    """
    host_config = attrs.get("HostConfig") or {}
    named: set[str] = set()
    for bind in host_config.get("Binds") or []:
        src, dst, _ = bind_parts(bind)
        if src:
            named.add(_path(dst))
    for m in host_config.get("Mounts") or []:
        if m.get("Source"):
            named.add(_path(str(m.get("Target") or "")))
    out = []
    for m in attrs.get("Mounts") or []:
        if m.get("Type") != "volume":
            continue
        dst = _path(str(m.get("Destination") or ""))
        if dst in named:
            continue
        out.append(
            AnonymousVolume(
                dst, str(m.get("Name") or ""), str(m.get("Source") or ""), str(m.get("Driver") or "")
            )
        )
    return sorted(out, key=lambda v: v.destination)


# ---------------------------------------------------------------------------------------------
# The create body
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateSpec:
    body: dict[str, Any]  # POST /containers/create body
    extra_networks: dict[str, dict[str, Any]] = field(default_factory=dict)  # connect after create


def endpoint_intent(settings: Mapping[str, Any], own: Sequence[str]) -> dict[str, Any]:
    """User intent from an inspected endpoint; drops what the daemon derived at runtime and the
    aliases Docker adds by itself (`own`: the container's short id and name)."""
    aliases = [a for a in settings.get("Aliases") or [] if a not in own]
    ep: dict[str, Any] = {}
    ipam = {k: v for k, v in (settings.get("IPAMConfig") or {}).items() if v}
    if ipam:
        ep["IPAMConfig"] = ipam
    if settings.get("Links"):
        ep["Links"] = sorted(settings["Links"])
    if aliases:
        ep["Aliases"] = sorted(aliases)
    if settings.get("DriverOpts"):
        ep["DriverOpts"] = dict(settings["DriverOpts"])
    return ep


def _api_at_least(version: str | None, want: tuple[int, int]) -> bool:
    try:
        major, minor = (int(x) for x in str(version).split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= want


def creation_spec(
    attrs: Mapping[str, Any],
    image: str,
    *,
    api_version: str | None = None,
    rewrite: Mapping[str, str] | None = None,
) -> CreateSpec:
    """The create body that reproduces the inspected container `attrs`, with `image` as image.

    The inspected `Config` and `HostConfig` are posted back as they are, so settings the SDK
    has no argument for survive, and anonymous volumes stay anonymous (the configuration has no
    source for them, so Docker makes the copy its own). `rewrite` maps a container id to
    another in `container:<id>` modes and `VolumesFrom` (a dependent recreated against the new
    target). Engine API >= 1.44 takes every network at create; older ones take one, the rest
    are connected after create (`extra_networks`).
    """
    own = [short_id(attrs), name_of(attrs)]
    config = dict(attrs.get("Config") or {})
    host_config = dict(attrs.get("HostConfig") or {})
    config["Image"] = image
    # Docker sets an unset hostname to the short id; keep only a hostname someone chose.
    if config.get("Hostname") == own[0]:
        config.pop("Hostname")
    if str(host_config.get("NetworkMode") or "").startswith("container:"):
        # Joining another container's network namespace, the hostname is that container's
        # (Docker copies it in) and may not be set: "conflicting options: hostname and the
        # network mode".
        config.pop("Hostname", None)
        config.pop("Domainname", None)
    # Inspect shows legacy links as "/db:/web/db"; create wants "db:db".
    if host_config.get("Links"):
        host_config["Links"] = [
            f"{src.lstrip('/')}:{dst.rsplit('/', 1)[-1]}"
            for src, _, dst in (link.partition(":") for link in host_config["Links"])
        ]
    if rewrite:
        for key in SHARED_MODES:
            mode = str(host_config.get(key) or "")
            if mode.startswith("container:") and mode[len("container:") :] in rewrite:
                host_config[key] = "container:" + rewrite[mode[len("container:") :]]
        if host_config.get("VolumesFrom"):
            out = []
            for entry in host_config["VolumesFrom"]:
                ref, sep, opt = str(entry).partition(":")
                out.append(rewrite.get(ref, ref) + sep + opt)
            host_config["VolumesFrom"] = out
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
    endpoints = {n: endpoint_intent(s, own) for n, s in networks.items()}
    if _api_at_least(api_version, (1, 44)):
        body["NetworkingConfig"] = {"EndpointsConfig": endpoints}
        return CreateSpec(body)
    if primary in endpoints:
        body["NetworkingConfig"] = {"EndpointsConfig": {primary: endpoints.pop(primary)}}
    return CreateSpec(body, endpoints)


# ---------------------------------------------------------------------------------------------
# The configuration as compared
# ---------------------------------------------------------------------------------------------


def redact_env(entries: Sequence[str]) -> list[str]:
    """`KEY=value` -> `KEY=sha256:<12 hex>`: the audit trail and the state database must not hold
    secrets passed in the environment, yet verify can still tell that every value came across."""
    out = []
    for entry in entries:
        key, sep, value = entry.partition("=")
        out.append(f"{key}=sha256:{hashlib.sha256(value.encode()).hexdigest()[:12]}" if sep else key)
    return out


def _binds(binds: Sequence[str]) -> list[str]:
    out = []
    for b in binds:
        src, dst, opts = bind_parts(b)
        out.append(":".join(x for x in (src or "", _path(dst), opts) if x) if src else _path(dst))
    return sorted(out)


def _mounts_config(mounts: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in mounts:
        d = {k: v for k, v in m.items() if v not in (None, "", False, {}, [])}
        if "Target" in d:
            d["Target"] = _path(str(d["Target"]))
        out.append(d)
    return sorted(out, key=lambda d: str(d.get("Target")))


def _mount_points(attrs: Mapping[str, Any]) -> list[list[Any]]:
    anonymous = {v.destination for v in anonymous_volumes(attrs)}
    out = []
    for m in attrs.get("Mounts") or []:
        dst = _path(str(m.get("Destination") or ""))
        kind = str(m.get("Type"))
        if kind == "volume":
            source = "<anonymous>" if dst in anonymous else str(m.get("Name"))
        else:
            source = str(m.get("Source"))
        out.append(
            [kind, source, dst, bool(m.get("RW")), str(m.get("Driver") or ""), str(m.get("Mode") or "")]
        )
    return sorted(out, key=lambda x: (x[2], x[0]))


def configuration(attrs: Mapping[str, Any], *, extra_own: Sequence[str] = ()) -> dict[str, Any]:
    """Every field of `attrs` that is configuration, normalised (see the module docstring).
    JSON-friendly; two containers with equal configurations give equal dicts.

    `extra_own`: more names Docker may have added as aliases (a copy's temporary name).
    """
    own = [short_id(attrs), name_of(attrs), *extra_own]
    config = dict(attrs.get("Config") or {})
    if config.get("Hostname") == own[0]:
        config["Hostname"] = "<default>"
    if str((attrs.get("HostConfig") or {}).get("NetworkMode") or "").startswith("container:"):
        config["Hostname"] = "<the network container's>"
    config.pop("Image", None)  # compared as the image id below (a moved tag is pinned)
    config["Env"] = redact_env(config.get("Env") or [])
    host_config = dict(attrs.get("HostConfig") or {})
    host_config["Binds"] = _binds(host_config.get("Binds") or [])
    # Inspect shows a legacy link as "/db:/<own name>/alias": the own name is the container's
    # current one (a copy's temporary name), so compare "db:alias".
    host_config["Links"] = sorted(
        f"{src.lstrip('/')}:{dst.rsplit('/', 1)[-1]}"
        for src, _, dst in (str(link).partition(":") for link in host_config.get("Links") or [])
    )
    host_config["Mounts"] = _mounts_config(host_config.get("Mounts") or [])
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    mode = str(host_config.get("NetworkMode") or "")
    endpoints = (
        {}
        if mode in ("host", "none") or mode.startswith("container:")
        else {n: endpoint_intent(s, own) for n, s in networks.items()}
    )
    return {
        "Image": attrs.get("Image"),
        "Config": config,
        "HostConfig": host_config,
        "Networks": endpoints,
        "MountPoints": _mount_points(attrs),
    }


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Where two `configuration()` dicts differ: "HostConfig.Memory: 0 -> 268435456"."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if k not in old:
                out.append(f"{sub}: missing in the original, {new[k]!r} in the copy")
            elif k not in new:
                out.append(f"{sub}: {old[k]!r} in the original, missing in the copy")
            else:
                out += differences(old[k], new[k], sub)
        return out
    if old != new:
        return [f"{path}: {old!r} -> {new!r}"]
    return []


# ---------------------------------------------------------------------------------------------
# What a recreate cannot carry over, and what it must not touch
# ---------------------------------------------------------------------------------------------


def orchestrator_refusal(labels: Mapping[str, str]) -> str | None:
    """Why an orchestrator owns this container and recreating it behind its back is wrong."""
    k8s = sorted(k for k in labels if k.startswith(KUBERNETES_LABEL_PREFIX))
    if k8s:
        pod = labels.get("io.kubernetes.pod.name")
        ns = labels.get("io.kubernetes.pod.namespace")
        what = f"pod {ns}/{pod}" if pod else f"labels {', '.join(k8s[:3])}"
        return (
            f"managed by the kubelet ({what}): recreating it behind the kubelet's back "
            "desynchronises the node; the fix is deleting the pod through the API server "
            "(comes with Kubernetes node support)"
        )
    if SWARM_TASK_LABEL in labels:
        return (
            f"a swarm task ({SWARM_TASK_LABEL}={labels[SWARM_TASK_LABEL]}): the swarm orchestrator "
            "replaces its tasks; use `docker service update --force`"
        )
    return None


@dataclass(frozen=True)
class Dependent:
    id: str
    name: str
    how: str  # "NetworkMode", "PidMode", "IpcMode" or "VolumesFrom"

    def __str__(self) -> str:
        return f"{self.name} ({self.how})"


def dependents(target: Mapping[str, Any], others: Sequence[Mapping[str, Any]]) -> list[Dependent]:
    """Containers that join the target's namespaces (`--network/--pid/--ipc container:X`) or
    mount its volumes (`--volumes-from X`), X being its id or name. Docker stores what was
    given: the name or the full id (20.10 resolves names to ids for the modes)."""
    refs = {str(target.get("Id")), name_of(target)}
    out = []
    for o in others:
        if o.get("Id") == target.get("Id"):
            continue
        host_config = o.get("HostConfig") or {}
        for key in SHARED_MODES:
            mode = str(host_config.get(key) or "")
            if mode.startswith("container:") and mode[len("container:") :] in refs:
                out.append(Dependent(str(o.get("Id")), name_of(o), key))
        for entry in host_config.get("VolumesFrom") or []:
            if str(entry).partition(":")[0] in refs:
                out.append(Dependent(str(o.get("Id")), name_of(o), "VolumesFrom"))
    return out


def layer_changes(
    changes: Sequence[Mapping[str, Any]], disposable: Sequence[str], mount_points: Sequence[str]
) -> list[str]:
    """Writable-layer changes (`docker diff`: Kind 0 modified, 1 added, 2 deleted) that a
    recreate would lose: not under a disposable path, not a mount point or a directory Docker
    made to hold one, and not a directory that is only listed because something under it
    changed."""
    kinds = {0: "C", 1: "A", 2: "D"}
    paths = [_path(str(c.get("Path") or "")) for c in changes]
    mounts = [_path(m) for m in mount_points]
    keep_roots = [_path(d) for d in disposable]

    def under(p: str, roots: Sequence[str]) -> bool:
        return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)

    out = []
    for c, p in zip(changes, paths, strict=True):
        kind = int(c.get("Kind") or 0)
        if under(p, keep_roots):
            continue
        if any(m == p or m.startswith(p.rstrip("/") + "/") for m in mounts):
            continue  # a mount point or one of its parents: Docker creates them
        if kind == 0 and any(q != p and q.startswith(p.rstrip("/") + "/") for q in paths):
            continue  # a directory listed because of a change beneath it
        out.append(f"{kinds.get(kind, '?')} {p}")
    return out


def has_healthcheck(attrs: Mapping[str, Any]) -> bool:
    test = ((attrs.get("Config") or {}).get("Healthcheck") or {}).get("Test") or []
    return bool(test) and test[0] != "NONE"
