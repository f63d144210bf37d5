# The C loop of fifo_walk.walk (see _fifowalk.c).
from collections.abc import Callable
from typing import Any, TypeVar

R = TypeVar("R")

def walk(
    rootfd: int,
    root_dev: int,
    max_entries: int,
    max_dirs: int,
    remove: bool,
    judge: Callable[
        [int, tuple[int, int, float], list[tuple[str, int, int, int, int, float]], R, bool, bool], str | None
    ],
    rule: R,
    xattr: str,
    /,
) -> dict[str, Any]: ...
