"""Node conditions (NPD-compatible), Events and the opt-in taint, from each cycle's report.

Conditions. Each policy has a condition type `Remediator<PolicyName>` (`negative-dentries` ->
`RemediatorNegativeDentries`). While any of its subjects is firing the Node carries it with
status True, reason `ThresholdExceeded` and a message naming the metric, the trigger and the
firing subjects; when none is firing any more it is set to False, reason `NoProblem`. A type
that was never True is not written at all (absent means no problem, as for any condition the
Node never had). Writes are a strategic-merge PATCH of `status.conditions` (merged by `type`),
so conditions of others (the kubelet's, node-problem-detector's) are never touched.

Zero writes when nothing changes: a condition is written when its status, reason or message
changes, and a True one also when its `lastHeartbeatTime` is older than the controller's
`kubernetes.heartbeat` (default 5 min, node-problem-detector's). A False one is never refreshed,
so a quiet node writes nothing. What is on the Node is learnt once (one GET of the Node when no
earlier run left it in the state directory) and then kept from the PATCH answers.

Taint (opt-in, `kubernetes.taint: [policy, ...]`): while such a policy fires the Node carries
`remediator.io/<policy>=true:NoSchedule`, removed when it clears. The taint list is a JSON merge
PATCH of `spec.taints` carrying the `resourceVersion` it was computed from: a concurrent edit of
the taints (someone else's) makes the API server answer 409, and the list is read and computed
again (3 tries), so no other taint is lost.

Who writes: only a live run (not `audit`, not `--dry-run`) and only for a policy in mode
`enforce`; otherwise `node_condition_would_set`, `node_taint_would_set` and `kube_event_would_create`
say what would be written. An unreachable API server: the writes are kept for the next cycle
(conditions and taints are recomputed from what the Node last had; Events wait in a bounded
queue), one `kube_api_write_failed` warning says so, and nothing is tried again for
`RETRY_AFTER_SECONDS`, so a dead API server costs a cycle at most one timed-out request.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from remediator import metrics
from remediator.engine import CycleReport, PolicyReport
from remediator.errors import PermanentError, TemporaryError
from remediator.kube.conditions import (
    REMOVED_REASON,
    TAINT_PREFIX,
    NodeState,
    Want,
    changes,
    condition_patch,
    condition_type,
    notes_of,
    parse_node,
    taint_key,
    taint_patch,
    want_of,
)
from remediator.kube.events import EventRecorder, Note
from remediator.model import Mode
from remediator.policy.rules import KubeReporting, PolicySet
from remediator.probes.kube_api import client_factory
from remediator.probes.kube_inventory import default_node_name
from remediator.settings import Settings

log = structlog.get_logger(__name__)

# After a failed write, how long before the API server is tried again: a blackholed server
# costs each try a timeout, and a daemon cycle every 10 s must not pay it every time.
RETRY_AFTER_SECONDS = 30.0
TAINT_TRIES = 3  # reads and patches of the taint list when concurrent edits race (HTTP 409)
# The reporter's requests: 2 s and 2 attempts (not the inventory's 5 s and 3): a write that
# waits for the next cycle loses nothing, a cycle that waits on the API server does.
WRITE_TIMEOUT_SECONDS = 2.0
WRITE_ATTEMPTS = 2
# In the state directory: what the Node has of ours, between one-shot runs.
STATE_FILE = "kube-node.json"


@dataclass
class NodeReport:
    """What one cycle wrote (or would have), for the log and the tests."""

    conditions: list[Want] = field(default_factory=list)
    taints_added: list[str] = field(default_factory=list)
    taints_removed: list[str] = field(default_factory=list)
    events: list[Note] = field(default_factory=list)
    would: bool = False
    error: str | None = None
    node: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "would": self.would,
            "conditions": [vars(w) for w in self.conditions],
            "taints_added": self.taints_added,
            "taints_removed": self.taints_removed,
            "events": [
                {
                    "object": f"{n.involved.kind}/{n.involved.name}",
                    "namespace": n.involved.namespace,
                    "type": n.type,
                    "reason": n.reason,
                    "message": n.message,
                }
                for n in self.events
            ],
            "error": self.error,
        }


class NodeReporter:
    """Keeps this Node's conditions, Events and taints in step with the cycles' reports.

    `client_factory` makes the API client (lazily: the first write needs it); `state_path`
    keeps what the Node has between runs (timer mode), None: memory only."""

    def __init__(
        self,
        node: str,
        client_factory: Callable[[], Any],
        now: Callable[[], float],
        *,
        state_path: Path | None = None,
        readonly: bool = False,
    ) -> None:
        self.node = node
        self._factory = client_factory
        self._client: Any = None
        self._now = now
        self.state_path = state_path
        self.readonly = readonly
        loaded = self._load()
        # `synced`: the state came from the Node (a GET, a PATCH answer) or an earlier run's file.
        self.synced = loaded is not None
        self.state = loaded or NodeState()
        self._would_last: dict[str, str] = {}  # `last` of the policies that only say "would"
        self.events = EventRecorder(node, now)
        self._retry_at = 0.0
        self._down_since: float | None = None
        self._dropped_counted = 0

    def _load(self) -> NodeState | None:
        if self.state_path is None:
            return None
        try:
            doc = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        return NodeState.from_dict(doc, self.node) if isinstance(doc, dict) else None

    def _save(self) -> None:
        if self.state_path is None or self.readonly or not self.synced:
            return
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state.to_dict(self.node), indent=1) + "\n")
        os.replace(tmp, self.state_path)

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._factory()
        return self._client

    # ------------------------------------------------------------------------------------
    def cycle(self, report: CycleReport, policies: PolicySet) -> NodeReport:
        """Write what this cycle changed. Never raises: the cycle's report must reach the
        metrics and the notifications whatever happens here."""
        try:
            return self._cycle(report, policies)
        except Exception as e:  # a bug here must not cost the cycle
            log.exception("kube_node_report_failed", node=self.node, error=f"{type(e).__name__}: {e}")
            return NodeReport(error=f"{type(e).__name__}: {e}")

    def _cycle(self, report: CycleReport, policies: PolicySet) -> NodeReport:
        cfg: KubeReporting = policies.controller.kubernetes
        now = self._now()
        out = NodeReport(node=self.node)
        live = [pr for pr in report.policies if not report.dry_run and pr.policy.mode is Mode.ENFORCE]
        dry = [pr for pr in report.policies if pr not in live]
        if live and not self.synced and now >= self._retry_at:
            try:
                fresh = parse_node(self.client.request("GET", f"/api/v1/nodes/{self.node}"))
            except (TemporaryError, PermanentError) as e:
                self._failed("read the node", e, now, out)
            else:
                # What earlier cycles of this process wanted (the API server was down) stands.
                fresh.last.update(self.state.last)
                self.state, self.synced = fresh, True
        state = self.state
        if dry:
            self._would(report, dry, state, cfg, now, out)
        if live:
            self._live(report, live, policies, state, cfg, now, out)
        return out

    def _would(
        self,
        report: CycleReport,
        prs: list[PolicyReport],
        state: NodeState,
        cfg: KubeReporting,
        now: float,
        out: NodeReport,
    ) -> None:
        out.would = True
        for pr in prs:
            want = want_of(pr)
            if cfg.conditions and changes([want], state.conditions, now, cfg.heartbeat):
                out.conditions.append(want)
                log.info("node_condition_would_set", node=self.node, policy=pr.policy.name, **vars(want))
            if cfg.events:
                was = self._would_last.get(want.type, state.last.get(want.type))
                for note in notes_of(report, pr, was, want, self.node):
                    out.events.append(note)
                    log.info(
                        "kube_event_would_create",
                        object=f"{note.involved.kind}/{note.involved.name}",
                        type=note.type,
                        reason=note.reason,
                        message=note.message,
                    )
            self._would_last[want.type] = want.status
            key = taint_key(pr.policy.name)
            if pr.policy.name in cfg.taint and (want.status == "True") != (key in state.taints):
                (out.taints_added if want.status == "True" else out.taints_removed).append(key)
                log.info("node_taint_would_set", node=self.node, taint=key, on=want.status == "True")

    def _live(
        self,
        report: CycleReport,
        prs: list[PolicyReport],
        policies: PolicySet,
        state: NodeState,
        cfg: KubeReporting,
        now: float,
        out: NodeReport,
    ) -> None:
        wants = [want_of(pr) for pr in prs]
        if cfg.conditions:
            # Conditions of policies no longer in the set: cleared, once.
            ours = {condition_type(p.name) for p in policies.policies}
            for ctype, seen in state.conditions.items():
                if ctype not in ours and seen.status == "True":
                    wants.append(Want(ctype, "False", REMOVED_REASON, "the policy was removed"))
        for pr, want in zip(prs, wants, strict=False):
            if cfg.events:
                for note in notes_of(report, pr, state.last.get(want.type), want, self.node):
                    if self.events.record(note):
                        out.events.append(note)
            state.last[want.type] = want.status
        add = {
            taint_key(pr.policy.name)
            for pr, w in zip(prs, wants, strict=False)
            if w.status == "True" and pr.policy.name in cfg.taint
        }
        managed = {taint_key(pr.policy.name) for pr in prs} | {
            k for k in state.taints if k[len(TAINT_PREFIX) :] not in policies.by_name()
        }
        remove = (managed - add) & state.taints
        add -= state.taints
        writes = changes(wants, state.conditions, now, cfg.heartbeat) if cfg.conditions else []
        if now < self._retry_at or not self.synced:
            if writes or add or remove or self.events.pending:
                out.error = "the API server was unreachable: writes wait for the next try"
            self._save()
            return
        try:
            if writes:
                answer = self.client.request(
                    "PATCH",
                    f"/api/v1/nodes/{self.node}/status",
                    body=condition_patch(writes, state.conditions, now),
                    content_type="application/strategic-merge-patch+json",
                )
                fresh = parse_node(answer)
                state.conditions = fresh.conditions
                out.conditions = writes
                metrics.KUBE_WRITES.labels("condition", "ok").inc(len(writes))
                for w in writes:
                    log.info("node_condition_set", node=self.node, **vars(w))
            if add or remove:
                self._taint(add, remove, state, out)
            before = self.events.pending
            error = self.events.flush(self.client) if before else None
            sent = before - self.events.pending
            if sent:
                metrics.KUBE_WRITES.labels("event", "ok").inc(sent)
            if error is not None:
                raise TemporaryError(error)
        except (TemporaryError, PermanentError) as e:
            self._failed("write", e, now, out)
        else:
            if self._down_since is not None:
                log.info("kube_api_write_resumed", node=self.node, down_seconds=now - self._down_since)
                self._down_since = None
        metrics.KUBE_EVENTS_DROPPED.inc(self.events.dropped - self._dropped_counted)
        self._dropped_counted = self.events.dropped
        self._save()

    def _taint(self, add: set[str], remove: set[str], state: NodeState, out: NodeReport) -> None:
        for attempt in range(1, TAINT_TRIES + 1):
            obj = self.client.request("GET", f"/api/v1/nodes/{self.node}")
            body = taint_patch(obj, add, remove)
            if body is not None:
                try:
                    obj = self.client.request(
                        "PATCH",
                        f"/api/v1/nodes/{self.node}",
                        body=body,
                        content_type="application/merge-patch+json",
                    )
                except PermanentError as e:
                    if "HTTP 409" in str(e) and attempt < TAINT_TRIES:
                        log.debug("node_taint_conflict", node=self.node, attempt=attempt)
                        continue
                    raise
                metrics.KUBE_WRITES.labels("taint", "ok").inc()
            state.taints = parse_node(obj).taints
            out.taints_added, out.taints_removed = sorted(add), sorted(remove)
            log.info("node_taint_set", node=self.node, added=sorted(add), removed=sorted(remove))
            return

    def _failed(self, what: str, e: Exception, now: float, out: NodeReport) -> None:
        out.error = str(e)
        metrics.KUBE_WRITES.labels(what.rsplit(maxsplit=1)[-1], "failed").inc()
        self._retry_at = now + RETRY_AFTER_SECONDS
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "kube_api_write_failed",
                node=self.node,
                what=what,
                error=str(e),
                queued_events=self.events.pending,
                hint="node-local actions go on; conditions, taints and events are written when "
                "the API server answers again",
            )
        else:
            log.debug("kube_api_write_failed", node=self.node, what=what, error=str(e))


def node_reporter(
    settings: Settings, now: Callable[[], float], *, readonly: bool = False
) -> NodeReporter | None:
    """This node's reporter, or None where no kubeconfig or in-cluster credentials are set."""
    factory = client_factory(settings.kubeconfig, timeout=WRITE_TIMEOUT_SECONDS, attempts=WRITE_ATTEMPTS)
    if factory is None:
        return None
    return NodeReporter(
        settings.kube_node_name or default_node_name(),
        factory,
        now,
        state_path=settings.state_dir / STATE_FILE,
        readonly=readonly or settings.dry_run,
    )


__all__ = ["NodeReport", "NodeReporter", "node_reporter"]
