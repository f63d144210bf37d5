"""Small builders shared by the tests."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from remediator.host import HostRoot


def make_host(tmp_path: Path, files: Mapping[str, str | bytes]) -> HostRoot:
    """A fixture host tree: {"proc/sys/fs/file-nr": "1 0 100\\n"} -> HostRoot(tmp_path)."""
    for rel, content in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    return HostRoot(tmp_path)
