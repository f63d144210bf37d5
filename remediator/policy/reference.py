"""The generated parts of docs/policies.md: the field reference and the probes' metric tables.

One source for each fact, so the reference cannot drift from the code:

* **Fields** of `Policy` and `Controller` documents come from the pydantic models in
  `schema.py`: the path (aliases as written in YAML), the type and its range (from the
  annotation: literals, enums, `Within` duration ranges, integer bounds), the default (from the
  field, or from the enclosing field's default for nested documents such as `budget`), the
  meaning (`description`, the same text editors show from the JSON Schema) and why the default
  (`Doc.why`).
* **Metrics** come from the probes' `MetricSpec`s (the catalog): name, unit, limit and whether
  it is per container. The "What" column is prose: a row already in the document keeps its
  text, a new metric gets its `help`, a metric the code no longer has loses its row.

Each generated part sits between `<!-- generated: NAME ... -->` and `<!-- end generated: NAME -->`
markers; the prose around them is hand-written. `remediator schema --markdown docs/policies.md`
rewrites the parts in place, and a unit test fails when the file is not what this produces.

Pure: text in, text out (the CLI reads and writes the file).
"""

from __future__ import annotations

import enum
import re
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import AfterValidator, BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from remediator.policy.catalog import Catalog, ProbeSpec
from remediator.policy.schema import ControllerDoc, Doc, Matcher, PolicyDoc, Within
from remediator.quantity import format_duration

REGENERATE = "remediator schema --markdown docs/policies.md"

_BEGIN = re.compile(r"^<!-- generated: (?P<name>[a-z0-9-]+)\b[^\n]*-->\n", re.M)
_END = "<!-- end generated: {name} -->"

FIELD_HEADER = "| Field | Type | Default | Meaning | Why the default |\n|---|---|---|---|---|\n"
METRIC_HEADER = "| Metric | Unit | Limit | Per container | What |\n|---|---|---|---|---|\n"

# Models documented by prose of their own, shown as one row ("list of matchers").
_LEAVES: dict[type[BaseModel], str] = {Matcher: "matchers"}


class ReferenceError(ValueError):
    """The document's markers are broken (one line, for the CLI)."""


@dataclass(frozen=True)
class FieldRow:
    path: str
    type: str
    default: str
    meaning: str
    why: str

    def markdown(self) -> str:
        return _row((f"`{self.path}`", self.type, self.default, self.meaning, self.why))


def _row(cells: tuple[str, ...]) -> str:
    return "|" + "|".join(f" {_cell(c)} " if c else " " for c in cells) + "|"


def _cell(text: str) -> str:
    # A `|` inside a cell ends it in GitHub Markdown unless escaped; so does a newline.
    return re.sub(r"(?<!\\)\|", r"\\|", " ".join(text.split()))


def _docs(info: FieldInfo) -> Doc:
    """The field's Doc markers merged, later ones (the field's own) over earlier (its type's)."""
    why = type_ = default = ""
    for m in info.metadata:
        if isinstance(m, Doc):
            why, type_, default = m.why or why, m.type or type_, m.default or default
    return Doc(why=why, type=type_, default=default)


def _duration(seconds: float) -> str:
    return format_duration(seconds) if seconds else "0s"


def _range(info: FieldInfo) -> str:
    lo: float | None = None
    hi: float | None = None
    for m in info.metadata:
        if isinstance(m, AfterValidator) and isinstance(m.func, Within):
            return f"{_duration(m.func.lo)}-{_duration(m.func.hi)}"
        if isinstance(m, annotated_types.Ge):
            lo = float(m.ge)  # type: ignore[arg-type]  # bounds of int fields are numbers
        if isinstance(m, annotated_types.Le):
            hi = float(m.le)  # type: ignore[arg-type]
    if lo is not None and hi is not None:
        return f"{lo:,.0f}-{hi:,.0f}"
    return ""


def _bare(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True), without `Annotated` wrappers."""
    annotation = _bare(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        args = [_bare(a) for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _literal(values: tuple[Any, ...]) -> str:
    return " \\| ".join(f"`{v}`" for v in values)


def _type(annotation: Any, info: FieldInfo, doc: Doc) -> str:
    rng = _range(info)
    if doc.type:
        return f"{doc.type}, {rng}" if rng else doc.type
    ann, _ = _unwrap(annotation)
    origin = get_origin(ann)
    if origin is Literal:
        return _literal(get_args(ann))
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return _literal(tuple(m.value for m in ann))
    if origin is list:
        item = _bare(get_args(ann)[0])
        if get_origin(item) is Literal:
            return "list of " + ", ".join(f"`{v}`" for v in get_args(item))
        if isinstance(item, type) and item in _LEAVES:
            return f"list of {_LEAVES[item]}"
        return "list"
    if origin is dict or ann is dict:
        return "mapping"
    if ann is bool:
        return "boolean"
    if ann is int:
        return f"integer, {rng}" if rng else "integer"
    if ann is str:
        return "string"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "mapping"
    return str(ann)


def _value(v: Any, kind: str) -> str:
    if v is None:
        return "none"
    if isinstance(v, enum.Enum):
        return f"`{v.value}`"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if kind.startswith("duration") and isinstance(v, int | float):
        return f"`{_duration(float(v))}`"
    if isinstance(v, list) and not v:
        return "`[]`"
    if isinstance(v, str):
        return f'`"{v}"`' if v == "" else f"`{v}`"
    if isinstance(v, int):
        return f"`{v}`"
    return f"`{v}`"


def _default_of(info: FieldInfo) -> tuple[bool, Any]:
    """(has a default, the default)."""
    if info.default_factory is not None:
        return True, info.default_factory()  # type: ignore[call-arg]  # no validated-data factories here
    if info.default is PydanticUndefined:
        return False, None
    return True, info.default


def field_rows(model: type[BaseModel], prefix: str = "", parent_default: Any = None) -> Iterator[FieldRow]:
    """One row per field of `model` (and, depth first, of the documents nested in it)."""
    for name, info in model.model_fields.items():
        key = info.alias or name
        path = f"{prefix}{key}"
        ann, optional = _unwrap(info.annotation)
        doc = _docs(info)
        has_default, default = _default_of(info)
        if parent_default is not None:
            has_default, default = True, getattr(parent_default, name)
        kind = _type(info.annotation, info, doc)
        if doc.default:
            shown = doc.default
        elif not has_default:
            shown = "required"
        else:
            shown = _value(default, kind)
        nested = isinstance(ann, type) and issubclass(ann, BaseModel)
        item = _bare(get_args(ann)[0]) if get_origin(ann) is list else None
        nested_items = isinstance(item, type) and issubclass(item, BaseModel) and item not in _LEAVES
        if nested and not info.description:
            # A group of fields (`spec.watch`, `spec.budget`): its fields are the rows.
            yield from field_rows(ann, f"{path}.", default if has_default and not optional else None)
            continue
        yield FieldRow(path, kind, shown, info.description or "", doc.why)
        if nested:
            yield from field_rows(ann, f"{path}.")
        elif nested_items and isinstance(item, type):
            yield from field_rows(item, f"{path}[].")


def field_table(model: type[BaseModel]) -> str:
    return FIELD_HEADER + "".join(r.markdown() + "\n" for r in field_rows(model))


def _split_row(line: str) -> list[str]:
    inner = line.strip()[1:-1]
    return [c.strip() for c in re.split(r"(?<!\\)\|", inner)]


def _existing_what(section: str) -> dict[str, str]:
    """Metric name -> the "What" cell of a table already in the document."""
    out: dict[str, str] = {}
    for line in section.splitlines():
        m = re.match(r"^\| `([a-z0-9_]+)` \|", line)
        if m:
            cells = _split_row(line)
            if len(cells) == 5:
                out[m.group(1)] = cells[4]
    return out


def _limit(text: str | None) -> str:
    if not text:
        return ""
    # Sysctl names as code: `fs.file-max`, `kernel.threads-max`.
    return re.sub(r"\b([a-z][a-z0-9_]*(?:\.[a-z0-9_-]+)+)", r"`\1`", text)


def metric_table(probe: ProbeSpec, existing: str = "") -> str:
    what = _existing_what(existing)
    rows = []
    for m in probe.metrics:
        cells = (
            f"`{m.name}`",
            m.unit,
            _limit(m.limit),
            "yes" if m.per_container else "no",
            what.get(m.name) or m.help,
        )
        rows.append(_row(cells) + "\n")
    return METRIC_HEADER + "".join(rows)


def sections(catalog: Catalog, current: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every generated part by name; `current` (name -> text now in the document) supplies the
    prose cells the generator keeps."""
    current = current or {}
    out = {"policy-fields": field_table(PolicyDoc), "controller-fields": field_table(ControllerDoc)}
    for name, probe in sorted(catalog.probes.items()):
        key = f"metrics-{name}"
        out[key] = metric_table(probe, current.get(key, ""))
    return out


def _parts(text: str) -> dict[str, tuple[int, int]]:
    """Name -> (start, end) of the text between a part's markers."""
    found: dict[str, tuple[int, int]] = {}
    for m in _BEGIN.finditer(text):
        name = m.group("name")
        end = text.find(_END.format(name=name), m.end())
        if end < 0:
            raise ReferenceError(f"generated part {name!r} has no end marker {_END.format(name=name)!r}")
        if name in found:
            raise ReferenceError(f"generated part {name!r} appears twice")
        found[name] = (m.end(), end)
    return found


def render(text: str, catalog: Catalog) -> str:
    """`text` (docs/policies.md) with every generated part rewritten. Every part must have its
    markers in the document already: where a table goes is a decision of the prose. A probe the
    document has no part for yet is an error naming the marker to add."""
    parts = _parts(text)
    current = {name: text[a:b] for name, (a, b) in parts.items()}
    wanted = sections(catalog, current)
    missing = sorted(set(wanted) - set(parts))
    if missing:
        raise ReferenceError(
            "no place for the generated part(s) "
            + ", ".join(missing)
            + ": add `<!-- generated: NAME -->` and `<!-- end generated: NAME -->` lines where each goes"
        )
    out, pos = [], 0
    for name, (a, b) in sorted(parts.items(), key=lambda kv: kv[1][0]):
        out.append(text[pos:a])
        if name in wanted:
            out.append(wanted[name])
        # A part the code no longer produces (a removed probe) is left empty.
        pos = b
    out.append(text[pos:])
    return "".join(out)
