"""Policy files -> a validated, immutable `PolicySet`, or every error at once.

YAML is composed into nodes first so that every error can name its file and line; PyYAML's
plain loader would also silently keep the last of two duplicate keys, which we reject. The set
is compiled whole: one bad file rejects the set (the daemon keeps its last good set).
"""

from __future__ import annotations

import subprocess
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from remediator.errors import PolicyError, PolicyIssue
from remediator.model import Scope
from remediator.policy import schema as S
from remediator.policy.catalog import Catalog
from remediator.policy.rules import (
    Controller,
    Match,
    Notify,
    Policy,
    PolicySet,
    Selector,
    Source,
    Step,
    Webhook,
)

Loc = tuple[str | int, ...]
SUFFIXES = (".yaml", ".yml")


@dataclass
class _Doc:
    file: str
    index: int
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)

    def line(self, loc: Sequence[str | int]) -> int | None:
        """Line of the deepest part of `loc` that exists in the file."""
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get(())


def format_loc(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int], file: str, issues: list[PolicyIssue]) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                issues.append(
                    PolicyIssue(
                        file,
                        line,
                        format_loc((*loc, key)),
                        f"duplicate key (first given on line {seen[key]})",
                    )
                )
                continue
            seen[key] = line
            lines[(*loc, key)] = line
            _walk(value_node, (*loc, key), lines, file, issues)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*loc, i)] = item.start_mark.line + 1
            _walk(item, (*loc, i), lines, file, issues)


def parse_yaml(text: str, file: str) -> tuple[list[_Doc], list[PolicyIssue]]:
    docs: list[_Doc] = []
    issues: list[PolicyIssue] = []
    loader = yaml.SafeLoader(text)
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                break
            lines: dict[Loc, int] = {}
            before = len(issues)
            _walk(node, (), lines, file, issues)
            data = loader.construct_document(node)
            if len(issues) == before and data is not None:
                docs.append(_Doc(file, index, data, lines))
            index += 1
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        issues.append(PolicyIssue(file, line, "", f"not valid YAML: {e.problem or e}"))
    except yaml.YAMLError as e:
        issues.append(PolicyIssue(file, None, "", f"not valid YAML: {e}"))
    finally:
        loader.dispose()
    return docs, issues


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
        msg = f"{msg}, got {err.get('input')!r}"
    return msg


def _clean_loc(loc: Sequence[Any]) -> Loc:
    # pydantic inserts validator/union tags ("function-after[...]", "str") into locations.
    return tuple(
        p for p in loc if isinstance(p, int) or ("[" not in str(p) and p not in ("str", "float", "int"))
    )


def _validation_issues(
    e: ValidationError, doc: _Doc, root: type[BaseModel], prefix: Loc = ()
) -> list[PolicyIssue]:
    out = []
    for err in e.errors():
        loc = (*prefix, *_clean_loc(err["loc"]))
        out.append(PolicyIssue(doc.file, doc.line(loc), format_loc(loc), _message(err, root, loc)))
    return out


def policy_files(paths: Iterable[Path]) -> tuple[list[Path], list[PolicyIssue]]:
    """Expand directories (non-recursive, sorted) into their *.yaml / *.yml files."""
    files: list[Path] = []
    issues: list[PolicyIssue] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES and f.is_file())
            if not found:
                issues.append(PolicyIssue(str(p), None, "", "no *.yaml policy files in this directory"))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            issues.append(PolicyIssue(str(p), None, "", "no such file or directory"))
    return files, issues


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


def _check_policy(doc: _Doc, model: S.PolicyDoc, catalog: Catalog) -> tuple[list[Step], list[PolicyIssue]]:
    """Cross-references that need the catalog: probe, metric, actions and their params."""
    issues: list[PolicyIssue] = []

    def issue(loc: Loc, msg: str) -> None:
        issues.append(PolicyIssue(doc.file, doc.line(loc), format_loc(loc), msg))

    w = model.spec.watch
    probe = catalog.probes.get(w.probe)
    if probe is None:
        issue(
            ("spec", "watch", "probe"),
            f"unknown probe {w.probe!r} (expected one of: {', '.join(sorted(catalog.probes))})",
        )
    else:
        metric = probe.metric(w.metric)
        if metric is None:
            names = ", ".join(m.name for m in probe.metrics)
            issue(
                ("spec", "watch", "metric"),
                f"probe {w.probe!r} has no metric {w.metric!r} (expected one of: {names})",
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
                f"unknown action {st.action!r} (expected one of: {', '.join(sorted(catalog.actions))})",
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
                    f"probe {w.probe!r} has no per-container metric {rank_by!r} (expected one of: {per})",
                )
                continue
        steps.append(Step(st.action, st.mode, st.settle, params, doc.line(loc)))
    return steps, issues


def load_policies(paths: Sequence[Path], catalog: Catalog) -> PolicySet:
    """Compile every policy file under `paths`. Raises PolicyError listing all problems."""
    files, issues = policy_files(paths)
    directory = (
        paths[0] if len(paths) == 1 and paths[0].is_dir() else (files[0].parent if files else Path("."))
    )
    commit, dirty = git_info(directory) if directory.exists() else (None, None)
    raw: list[tuple[_Doc, S.PolicyDoc]] = []
    controllers: list[tuple[_Doc, S.ControllerDoc]] = []

    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            issues.append(PolicyIssue(str(f), None, "", f"cannot read: {e}"))
            continue
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
                        f"expected {S.API_VERSION!r}, got {doc.data.get('apiVersion')!r}",
                    )
                )
                continue
            if kind not in S.KINDS:
                issues.append(
                    PolicyIssue(
                        doc.file,
                        doc.line(("kind",)),
                        "kind",
                        f"expected one of {sorted(S.KINDS)}, got {kind!r}",
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
            protect=tuple(
                Match(name=m.name) if m.name is not None else Match.label(m.label or "")
                for m in c.spec.protect
            ),
            source=Source(doc.file, doc.line(()), commit, dirty),
        )

    policies: list[Policy] = []
    names: dict[str, _Doc] = {}
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
