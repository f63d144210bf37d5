# The C loop of limits_fdscan (see _fdscan.c). An fd's watches are (count, digest)
# (limits_parse.WatchSet); an int in their place is an errno, -1 (unparsable) or -2 (not that kind).
Watches = tuple[int, int] | int

def examine(
    pid_dir: str, /
) -> tuple[int, int, list[int], list[tuple[int, Watches]], list[tuple[int, Watches]]]: ...
def refresh(pid_dir: str, fd: int, kind: str, /) -> Watches: ...
def glance(pid_dir: str, threads: bool, runtime: bool, /) -> tuple[int, int, int]: ...
def survey(
    proc: str, listing: dict[int, int], expect: dict[int, tuple[int, int, int, int, int]], always: int, /
) -> dict[int, int | tuple[int, int, int] | None]: ...
def status(pid_dir: str, /) -> tuple[str, tuple[int, int, int, int], int]: ...
def whole(
    pid_dir: str, /
) -> tuple[
    tuple[int, int, int, int, bool],
    tuple[str, tuple[int, int, int, int], int],
    tuple[int, int, list[int], list[tuple[int, Watches]], list[tuple[int, Watches]]],
]: ...
