"""Policy files -> a validated, immutable `PolicySet`, or every error at once.

`reader` turns files into YAML documents with a line for every field, within fixed bounds
(size, nesting, no aliases); this module checks them against the schema and the catalog. The
set is compiled whole: one bad file rejects the set (the daemon keeps its last good set), and
a set without a single Policy is an error too (docs/policies.md, "An empty set").

Contract: whatever the files contain, `load_policies` returns a `PolicySet` or raises
`PolicyError`; any other exception is a bug (tests/unit/test_loader_fuzz.py looks for them).
"""

from __future__ import annotations

import subprocess
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from remediator.errors import PolicyError, PolicyIssue
from remediator.model import Scope
from remediator.policy import schema as S
from remediator.policy.catalog import Catalog
from remediator.policy.reader import (
    MAX_SET_BYTES,
    SET_TOO_LARGE,
    Doc,
    Loc,
    format_loc,
    parse_yaml,
    policy_files,
    read_text,
)
from remediator.policy.rules import (
    Controller,
    KubeReporting,
    Match,
    Notify,
    Policy,
    PolicySet,
    Selector,
    Source,
    Step,
    Webhook,
)
from remediator.quantity import shown


def _model_at(model: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc`, to list its allowed keys."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        fields = {(f.alias or n): f for n, f in current.model_fields.items()}
        if part not in fields:
            return None
        current = _first_model(fields[part].annotation)
    return current


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _message(err: Any, root: type[BaseModel], loc: Loc) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _model_at(root, loc[:-1])
        allowed = sorted((f.alias or n) for n, f in owner.model_fields.items()) if owner else []
        hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
        return f"unknown field{hint}"
    if kind == "missing":
        return "required field is missing"
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if kind in (
        "string_type",
        "int_type",
        "float_type",
        "bool_type",
        "dict_type",
        "list_type",
        "model_type",
        "int_from_float",
    ):
        msg = f"{msg}, got {shown(err.get('input'))}"
    return msg


def _clean_loc(loc: Sequence[Any]) -> Loc:
    # pydantic inserts validator/union tags ("function-after[...]", "str") into locations.
    return tuple(
        p for p in loc if isinstance(p, int) or ("[" not in str(p) and p not in ("str", "float", "int"))
    )


def _validation_issues(
    e: ValidationError, doc: Doc, root: type[BaseModel], prefix: Loc = ()
) -> list[PolicyIssue]:
    out = []
    for err in e.errors():
        loc = (*prefix, *_clean_loc(err["loc"]))
        out.append(PolicyIssue(doc.file, doc.line(loc), format_loc(loc), _message(err, root, loc)))
    return out


# Reading provenance must never write into the operator's checkout: a plain `git status`
# refreshes the index, which takes .git/index.lock and rewrites .git/index, so an operator's own
# `git add` racing it fails with "index.lock: File exists" (git-status(1), "BACKGROUND REFRESH";
# git(1) --no-optional-locks). And since remediator runs as root, the checkout's config must not
# make git run programs: core.fsmonitor names a hook command that `git status` would execute.
_GIT_READ_ONLY = (
    "git",
    "--no-optional-locks",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "core.untrackedCache=false",
)


def git_info(directory: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the policy directory when it is inside a git work tree. Read-only."""
    try:
        head = subprocess.run(
            [*_GIT_READ_ONLY, "-C", str(directory), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if head.returncode != 0:
            return None, None
        status = subprocess.run(
            [*_GIT_READ_ONLY, "-C", str(directory), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    return head.stdout.strip() or None, bool(status.stdout.strip()) if status.returncode == 0 else None


def _compile_notify(n: S.Notify) -> Notify:
    return Notify(
        events=frozenset(n.events),
        webhooks=tuple(Webhook(w.url, w.format, w.timeout) for w in n.webhooks),
        attempts=n.attempts,
        backoff_max=n.backoffMax,
        queue_max=n.queueMax,
    )


def _compile_selector(spec: S.Containers, controller_protect: tuple[Match, ...]) -> Selector:
    def m(x: S.Matcher) -> Match:
        return Match(name=x.name) if x.name is not None else Match.label(x.label or "")

    return Selector(
        include=tuple(m(x) for x in spec.include),
        exclude=tuple(m(x) for x in spec.exclude),
        protect=(Match.label(spec.protectLabel), *controller_protect),
    )


def _check_policy(doc: Doc, model: S.PolicyDoc, catalog: Catalog) -> tuple[list[Step], list[PolicyIssue]]:
    """Cross-references that need the catalog: probe, metric, actions and their params."""
    issues: list[PolicyIssue] = []

    def issue(loc: Loc, msg: str) -> None:
        issues.append(PolicyIssue(doc.file, doc.line(loc), format_loc(loc), msg))

    w = model.spec.watch
    probe = catalog.probes.get(w.probe)
    if probe is None:
        issue(
            ("spec", "watch", "probe"),
            f"unknown probe {shown(w.probe)} (expected one of: {', '.join(sorted(catalog.probes))})",
        )
    else:
        metric = probe.metric(w.metric)
        if metric is None:
            names = ", ".join(m.name for m in probe.metrics)
            issue(
                ("spec", "watch", "metric"),
                f"probe {w.probe!r} has no metric {shown(w.metric)} (expected one of: {names})",
            )
        else:
            if w.scope is Scope.CONTAINER and not metric.per_container:
                issue(
                    ("spec", "watch", "scope"),
                    f"metric {w.metric!r} is host-wide only; scope `container` needs a per-container metric",
                )
            for key, amount in (("above", w.above), ("clearBelow", w.clearBelow)):
                if amount is not None and amount.percent and metric.limit is None:
                    issue(
                        ("spec", "watch", key),
                        f"{amount} is a percentage, but metric {w.metric!r} has no kernel limit; "
                        "give an absolute number",
                    )
    steps: list[Step] = []
    for i, st in enumerate(model.spec.actions):
        loc: Loc = ("spec", "actions", i)
        spec = catalog.actions.get(st.action)
        if spec is None:
            issue(
                (*loc, "action"),
                f"unknown action {shown(st.action)} (expected one of: {', '.join(sorted(catalog.actions))})",
            )
            continue
        try:
            params = spec.params.model_validate(st.params)
        except ValidationError as e:
            issues.extend(_validation_issues(e, doc, spec.params, (*loc, "params")))
            continue
        rank_by = getattr(params, "rankBy", None)
        if rank_by is not None and probe is not None:
            m = probe.metric(rank_by)
            if m is None or not m.per_container:
                per = ", ".join(x.name for x in probe.metrics if x.per_container) or "none"
                issue(
                    (*loc, "params", "rankBy"),
                    f"probe {w.probe!r} has no per-container metric {shown(rank_by)} "
                    f"(expected one of: {per})",
                )
                continue
        steps.append(
            Step(
                st.action,
                st.mode,
                st.settle,
                params,
                doc.line(loc),
                disruptive=spec.disruptive,
                allow_disruptive=st.allowDisruptive,
            )
        )
    return steps, issues


def _is_dir(p: Path) -> bool:
    # Path.is_dir() raises for some errors (ENAMETOOLONG, EACCES on a parent); policy_files()
    # has already reported those as issues.
    try:
        return p.is_dir()
    except OSError:
        return False


def load_policies(paths: Sequence[Path], catalog: Catalog) -> PolicySet:
    """Compile every policy file under `paths`. Raises PolicyError listing all problems."""
    files, issues = policy_files(paths)
    directory = (
        paths[0] if len(paths) == 1 and _is_dir(paths[0]) else (files[0].parent if files else Path("."))
    )
    commit, dirty = git_info(directory) if _is_dir(directory) else (None, None)
    raw: list[tuple[Doc, S.PolicyDoc]] = []
    controllers: list[tuple[Doc, S.ControllerDoc]] = []

    budget = MAX_SET_BYTES
    for f in files:
        text, size, problem = read_text(f, budget)
        if problem is not None or text is None:
            if problem is not None:
                issues.append(problem)
                if problem.message == SET_TOO_LARGE:
                    break  # every later file would say the same
            continue
        budget -= size
        docs, yaml_issues = parse_yaml(text, str(f))
        issues.extend(yaml_issues)
        for doc in docs:
            if not isinstance(doc.data, dict):
                issues.append(
                    PolicyIssue(
                        doc.file, doc.line(()), "", "expected a mapping with apiVersion, kind, metadata, spec"
                    )
                )
                continue
            kind = doc.data.get("kind")
            if doc.data.get("apiVersion") != S.API_VERSION:
                issues.append(
                    PolicyIssue(
                        doc.file,
                        doc.line(("apiVersion",)),
                        "apiVersion",
                        f"expected {S.API_VERSION!r}, got {shown(doc.data.get('apiVersion'))}",
                    )
                )
                continue
            if not isinstance(kind, str) or kind not in S.KINDS:
                issues.append(
                    PolicyIssue(
                        doc.file,
                        doc.line(("kind",)),
                        "kind",
                        f"expected one of {sorted(S.KINDS)}, got {shown(kind)}",
                    )
                )
                continue
            model_cls = S.KINDS[kind]
            try:
                model = model_cls.model_validate(doc.data)
            except ValidationError as e:
                issues.extend(_validation_issues(e, doc, model_cls))
                continue
            if isinstance(model, S.PolicyDoc):
                raw.append((doc, model))
            elif isinstance(model, S.ControllerDoc):
                controllers.append((doc, model))

    controller = Controller()
    if len(controllers) > 1:
        for doc, _ in controllers[1:]:
            first = controllers[0][0]
            issues.append(
                PolicyIssue(
                    doc.file,
                    doc.line(("kind",)),
                    "kind",
                    "only one Controller document is allowed "
                    f"(first in {first.file}:{first.line(('kind',))})",
                )
            )
    if controllers:
        doc, c = controllers[0]
        controller = Controller(
            breaker_max=c.spec.breaker.maxActions,
            breaker_window=c.spec.breaker.window,
            history_max_age=c.spec.history.maxAge,
            history_max_actions=c.spec.history.maxActions,
            notify=_compile_notify(c.spec.notify),
            kubernetes=KubeReporting(
                conditions=c.spec.kubernetes.conditions,
                events=c.spec.kubernetes.events,
                heartbeat=c.spec.kubernetes.heartbeat,
                taint=frozenset(c.spec.kubernetes.taint),
            ),
            protect=tuple(
                Match(name=m.name) if m.name is not None else Match.label(m.label or "")
                for m in c.spec.protect
            ),
            source=Source(doc.file, doc.line(()), commit, dirty),
        )

    policies: list[Policy] = []
    names: dict[str, Doc] = {}
    for doc, model in raw:
        name = model.metadata.name
        if name in names:
            first = names[name]
            issues.append(
                PolicyIssue(
                    doc.file,
                    doc.line(("metadata", "name")),
                    "metadata.name",
                    f"policy {name!r} is already defined in {first.file}:{first.line(('metadata', 'name'))}",
                )
            )
            continue
        names[name] = doc
        steps, step_issues = _check_policy(doc, model, catalog)
        issues.extend(step_issues)
        if step_issues:
            continue
        spec, w = model.spec, model.spec.watch
        policies.append(
            Policy(
                name=name,
                description=model.metadata.description,
                source=Source(doc.file, doc.line(("metadata", "name")), commit, dirty),
                mode=spec.mode,
                interval=spec.interval,
                probe=w.probe,
                metric=w.metric,
                scope=w.scope,
                trigger=w.above,
                clear=w.clearBelow if w.clearBelow is not None else w.above,
                hold=w.for_,
                steps=tuple(steps),
                cooldown=spec.cooldown,
                budget_max=spec.budget.max,
                budget_window=spec.budget.per,
                selector=_compile_selector(spec.containers, controller.protect),
            )
        )

    if controllers:
        # A taint opt-in that names no policy is a typo that would never taint anything.
        doc, c = controllers[0]
        known = {p.name for p in policies}
        for i, name in enumerate(c.spec.kubernetes.taint):
            if name not in known:
                issues.append(
                    PolicyIssue(
                        doc.file,
                        doc.line(("spec", "kubernetes", "taint", i)),
                        f"spec.kubernetes.taint[{i}]",
                        f"no policy named {name!r} in this set",
                    )
                )
    if not issues and not policies:
        # Files that compile to nothing are a mistake, not a choice: the wrong --policies, a
        # checkout that lost its files, a Controller document alone. A daemon that runs without
        # policies repairs nothing while looking healthy; to stop repairs, stop the unit.
        where = controllers[0][0] if controllers else None
        issues.append(
            PolicyIssue(
                where.file if where else (str(files[0]) if files else str(directory)),
                where.line(("kind",)) if where else 1,
                "",
                "no Policy documents in this set: a Controller document alone repairs nothing"
                if where
                else "no Policy documents in this set",
            )
        )
    if issues:
        # One report per file, top to bottom, however many passes found the problems.
        raise PolicyError(sorted(issues, key=lambda i: (i.file, i.line or 0)))
    return PolicySet(
        directory=str(directory),
        policies=tuple(policies),
        controller=controller,
        files=tuple(str(f) for f in files),
        commit=commit,
        dirty=dirty,
    )
