"""Every relative link in README.md and docs/ points at a file that exists and, with an anchor,
at a heading that exists (GitHub's heading slugs), so a renamed section or page cannot leave a
dead link behind. Links inside code blocks are not links."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: Path) -> set[str]:
    found, in_code = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"^#+ (.*)", line)):
            found.add(slug(m.group(1)))
    return found


def test_slug_follows_github() -> None:
    assert slug("The policy `apiVersion`") == "the-policy-apiversion"
    assert slug("`clean-fifos` (not disruptive)") == "clean-fifos-not-disruptive"


def test_every_relative_link_resolves() -> None:
    assert len(DOCS) > 5
    dead = []
    for doc in DOCS:
        text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            where = f"{doc.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                dead.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in headings(dest):
                dead.append(f"{where}: no heading with that anchor")
    assert not dead, "\n".join(dead)
