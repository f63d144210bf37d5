"""Output for people (aligned tables) and for machines (stable JSON documents).

The JSON documents are versioned by their `format` field and documented in docs/cli.md;
fields are only ever added within one format version.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from remediator.engine import CycleReport
from remediator.model import Condition, Reading
from remediator.policy.rules import PolicySet
from remediator.quantity import format_duration, format_number
from remediator.state import ActionRow, BreakerState

AUDIT_FORMAT = "remediator.cycle/v1"
STATUS_FORMAT = "remediator.status/v1"


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


human = format_number


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    body = [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in body:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for r in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def policy_set_dict(ps: PolicySet) -> dict[str, Any]:
    return {
        "directory": ps.directory,
        "commit": ps.commit,
        "dirty": ps.dirty,
        "files": list(ps.files),
        "policies": [p.name for p in ps.policies],
        "breaker": {"max_actions": ps.controller.breaker_max, "window_seconds": ps.controller.breaker_window},
    }


def cycle_json(report: CycleReport, ps: PolicySet) -> dict[str, Any]:
    return {
        "format": AUDIT_FORMAT,
        "time": iso(report.at),
        "host": socket.gethostname(),
        "namespace": report.namespace,
        "dry_run": report.dry_run,
        "policy_set": policy_set_dict(ps),
        "breaker": report.breaker.to_dict(),
        "readings": {k: r.to_dict() for k, r in sorted(report.readings.items())},
        "policies": [p.to_dict() for p in report.policies],
    }


def readings_table(readings: dict[str, Reading]) -> str:
    rows = []
    for name, r in sorted(readings.items()):
        if r.error:
            rows.append((name, "-", "-", "-", f"error: {r.error}"))
            continue
        for metric, value in r.values.items():
            top = ""
            per = [
                (s.values.get(metric), s.container.name)
                for s in r.containers
                if s.values.get(metric) is not None
            ]
            if per:
                v, who = max(per, key=lambda t: t[0] or 0)
                top = f"top container: {who} ({human(v)})"
            rows.append((name, metric, human(value), human(r.limits.get(metric)), top))
        if r.containers_error:
            rows.append((name, "-", "-", "-", f"no per-container data: {r.containers_error}"))
    return table(("probe", "metric", "value", "limit", "note"), rows)


def contributors_table(readings: dict[str, Reading]) -> str:
    """Who makes negative dentries (the dentries probe's `detail.attribution`), or ""."""
    rows = []
    for name, r in sorted(readings.items()):
        attribution = r.detail.get("attribution")
        if not isinstance(attribution, dict) or not attribution.get("top"):
            continue
        for t in attribution["top"]:
            procs = ", ".join(
                f"{p['comm']}[{p['pid']}] {human(p['per_second'])}/s" for p in t.get("processes") or []
            )
            share = t.get("share")
            rows.append(
                (
                    name,
                    f"{t['container']} {t['id']}",
                    str(t.get("image") or "-"),
                    human(t.get("failed_lookups_per_second")),
                    f"{share:.0%}" if isinstance(share, int | float) else "-",
                    human(t.get("slab_growth_bytes_per_second")),
                    procs or "-",
                )
            )
        rows.append((name, "(ebpf)", "", "", "", "", str(attribution.get("ebpf"))))
    if not rows:
        return ""
    header = ("probe", "top contributor", "image", "failed lookups/s", "share", "slab B/s", "processes")
    return table(header, rows)


def cycle_text(report: CycleReport, ps: PolicySet) -> str:
    out = []
    where = ps.directory + (f" @ {ps.commit[:12]}{' (dirty)' if ps.dirty else ''}" if ps.commit else "")
    mode = "dry run: nothing is changed" if report.dry_run else "live"
    out.append(f"remediator {iso(report.at)}  policies: {where}  ({mode})")
    if report.breaker.open:
        out.append(
            f"!! CIRCUIT BREAKER OPEN since {iso(report.breaker.opened_at)}: "
            f"{report.breaker.reason}. Run `remediator reset-breaker` after review."
        )
    out.append("")
    out.append(readings_table(report.readings))
    contributors = contributors_table(report.readings)
    if contributors:
        out += ["", contributors]
    out.append("")
    rows = []
    for pr in report.policies:
        for d in pr.decisions:
            subject = (
                d.subject
                if d.subject == "host"
                else (
                    pr.conditions[d.subject].subject_name or d.subject[:12]
                    if d.subject in pr.conditions
                    else d.subject[:12]
                )
            )
            rows.append(
                (
                    pr.policy.name,
                    pr.policy.mode.value,
                    subject,
                    d.phase.value,
                    human(d.value),
                    human(d.trigger),
                    d.kind.value,
                    d.reason,
                )
            )
    out.append(table(("policy", "mode", "subject", "phase", "value", "trigger", "decision", "reason"), rows))
    acts = [(pr.policy.name, a) for pr in report.policies for a in pr.actions]
    if acts:
        out.append("")
        out.append(
            table(
                ("policy", "step", "action", "mode", "target", "outcome", "what"),
                [
                    (
                        n,
                        a.decision.step,
                        a.decision.action,
                        f"{a.mode.value} ({a.mode_reason})",
                        a.plan.target.describe() if a.plan else "-",
                        a.result.outcome.value,
                        a.result.message,
                    )
                    for n, a in acts
                ],
            )
        )
    return "\n".join(out)


def status_json(
    ps: PolicySet,
    readings: dict[str, Reading],
    conditions: dict[tuple[str, str], Condition],
    actions: list[ActionRow],
    breaker: BreakerState,
    budgets: dict[str, dict[str, Any]],
    now: float,
    namespace: str,
) -> dict[str, Any]:
    return {
        "format": STATUS_FORMAT,
        "time": iso(now),
        "host": socket.gethostname(),
        "namespace": namespace,
        "policy_set": policy_set_dict(ps),
        "breaker": breaker.to_dict(),
        "readings": {k: r.to_dict() for k, r in sorted(readings.items())},
        "conditions": [dict(c.to_dict(), cooldown_until=_cooldown_until(ps, c)) for c in conditions.values()],
        "budgets": budgets,
        "actions": [a.to_dict() for a in actions],
    }


def _cooldown_until(ps: PolicySet, c: Condition) -> float | None:
    p = ps.by_name().get(c.policy)
    if p is None or c.ladder_ended_at is None:
        return None
    return c.ladder_ended_at + p.cooldown


def status_text(doc: dict[str, Any], now: float) -> str:
    out = [f"remediator status {doc['time']}  namespace: {doc['namespace']}"]
    b = doc["breaker"]
    out.append("breaker: " + (f"OPEN since {iso(b['opened_at'])}: {b['reason']}" if b["open"] else "closed"))
    out.append("")
    out.append(readings_table({k: Reading.from_dict(v) for k, v in doc["readings"].items()}))
    out.append("")
    rows = []
    for c in doc["conditions"]:
        cool = c.get("cooldown_until")
        rows.append(
            (
                c["policy"],
                c["subject_name"] or c["subject"][:12],
                c["phase"],
                format_duration(max(now - c["since"], 0)),
                human(c["value"]),
                c["step"],
                format_duration(cool - now) if cool and cool > now else "-",
            )
        )
    out.append(
        table(("policy", "subject", "phase", "for", "value", "next step", "cooldown"), rows)
        if rows
        else "no conditions recorded yet"
    )
    out.append("")
    out.append(
        table(
            ("policy", "budget used", "window"),
            [
                (n, f"{b['used']}/{b['max']}", format_duration(b["window_seconds"]))
                for n, b in sorted(doc["budgets"].items())
            ],
        )
    )
    out.append("")
    if doc["actions"]:
        out.append(
            table(
                ("time", "policy", "subject", "step", "action", "mode", "outcome", "verdict"),
                [
                    (
                        iso(a["at"]),
                        a["policy"],
                        a["subject"][:12],
                        a["step"],
                        a["action"],
                        a["mode"],
                        a["outcome"] or a["status"],
                        a["verdict"],
                    )
                    for a in doc["actions"]
                ],
            )
        )
    else:
        out.append("no actions recorded")
    return "\n".join(out)


# --- `remediator limits` ------------------------------------------------------------------------

LIMITS_FORMAT = "remediator.limits/v1"

# Each pool row: (metric, what it counts, the sysctl that bounds it, scope).
_POOLS = (
    ("file_handles", "open file handles", "fs.file-max", "host"),
    ("tasks", "tasks (threads)", "min(kernel.threads-max, kernel.pid_max)", "host"),
    ("inotify_watches_max_uid", "inotify watches", "fs.inotify.max_user_watches", "per uid (max)"),
    ("inotify_instances_max_uid", "inotify instances", "fs.inotify.max_user_instances", "per uid (max)"),
    ("epoll_watches_max_uid", "epoll watches", "fs.epoll.max_user_watches", "per uid (max)"),
    ("pipe_pages_max_uid", "pipe pages (estimate)", "fs.pipe-user-pages-soft", "per uid (max)"),
    ("keys_max_uid", "keys", "kernel.keys.maxkeys", "per uid (max)"),
    ("key_bytes_max_uid", "key bytes", "kernel.keys.maxbytes", "per uid (max)"),
    ("aio_requests", "aio requests", "fs.aio-max-nr", "host"),
    ("conntrack_entries", "conntrack entries", "net.netfilter.nf_conntrack_max", "host"),
    ("netdev_backlog_drops", "backlog drops since last read", "net.core.netdev_max_backlog", "host"),
)
_CONTAINER_COLUMNS = (
    "file_handles",
    "tasks",
    "inotify_watches",
    "inotify_instances",
    "epoll_watches",
    "pipe_pages",
)


def limits_json(reading: Reading) -> dict[str, Any]:
    """The limits view: every pool's usage against its limit (fullest first), per uid, per
    container (most file handles first), and the consumers that degraded."""
    pools: list[dict[str, Any]] = []
    for metric, what, sysctl, scope in _POOLS:
        if metric not in reading.values:
            continue
        usage, limit = reading.values[metric], reading.limits.get(metric)
        percent = round(100.0 * usage / limit, 1) if limit else None
        pools.append(
            {
                "pool": metric,
                "what": what,
                "sysctl": sysctl,
                "scope": scope,
                "usage": usage,
                "limit": limit,
                "percent": percent,
            }
        )
    pools.sort(key=lambda p: (-(p["percent"] if p["percent"] is not None else -1.0), p["pool"]))
    d = reading.detail
    uids: dict[str, dict[str, Any]] = {}
    for key, field_map in (
        ("inotify_by_uid", {"instances": "inotify_instances", "watches": "inotify_watches"}),
        ("epoll_by_uid", {"watches": "epoll_watches"}),
        ("keys_by_uid", {"keys": "keys", "bytes": "key_bytes"}),
    ):
        for uid, counts in (d.get(key) or {}).items():
            row = uids.setdefault(uid, {"uid": int(uid)})
            for src, dst in field_map.items():
                row[dst] = counts[src]
    for uid, pages in (d.get("pipe_pages_by_uid") or {}).items():
        uids.setdefault(uid, {"uid": int(uid)})["pipe_pages"] = pages
    by_uid = sorted(
        uids.values(), key=lambda r: (-r.get("inotify_watches", 0), -r.get("inotify_instances", 0), r["uid"])
    )
    containers: list[dict[str, Any]] = [
        {"name": s.container.name, "id": s.container.id, **{c: s.values.get(c) for c in _CONTAINER_COLUMNS}}
        for s in reading.containers
    ]
    containers.sort(key=lambda c: (-(c["file_handles"] or 0), c["name"]))
    notes = [f"{k}: no limit" for k in d.get("no_limit", [])]
    notes += [str(d[k]) for k in ("conntrack",) if k in d]
    notes += list(d.get("problems", []))
    if reading.containers_error:
        notes.append(f"containers: {reading.containers_error}")
    return {
        "format": LIMITS_FORMAT,
        "taken_at": iso(reading.taken_at),
        "pools": pools,
        "by_uid": by_uid,
        "containers": containers,
        "degraded_consumers": list(d.get("degraded_consumers", [])),
        "notes": notes,
        "scan": d.get("scan"),
        "error": reading.error,
    }


def limits_text(doc: dict[str, Any]) -> str:
    def pct(p: float | None) -> str | None:
        return None if p is None else f"{p:.1f}%"

    out = [
        table(
            ("pool", "scope", "usage", "limit", "used", "sysctl"),
            (
                (
                    p["what"],
                    p["scope"],
                    human(p["usage"]),
                    None if p["limit"] is None else human(p["limit"]),
                    pct(p["percent"]),
                    p["sysctl"],
                )
                for p in doc["pools"]
            ),
        )
    ]
    if doc["by_uid"]:
        cols = ("inotify_watches", "inotify_instances", "epoll_watches", "pipe_pages", "keys", "key_bytes")
        out += [
            "",
            "Per uid:",
            table(("uid", *cols), ((r["uid"], *(r.get(c) for c in cols)) for r in doc["by_uid"])),
        ]
    if doc["containers"]:
        out += [
            "",
            "Per container:",
            table(
                ("container", *_CONTAINER_COLUMNS),
                ((c["name"], *(c[k] for k in _CONTAINER_COLUMNS)) for c in doc["containers"]),
            ),
        ]
    if doc["degraded_consumers"]:
        out += ["", "Degraded consumers (rely on the pool, hold none of it):"]
        out += [
            f"  pid {c['pid']} {c['name']} (uid {c['uid']}"
            f"{', container ' + c['container'] if c['container'] else ''}): "
            f"no {c['pool']} while the pool is exhausted"
            for c in doc["degraded_consumers"]
        ]
    if doc["notes"]:
        out += ["", *(f"note: {n}" for n in doc["notes"])]
    return "\n".join(out)
