"""Only the C part of the build; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # The fifo walk's system-call loop (see the file's header for why it is C).
        Extension(
            "remediator.actions._fifowalk",
            ["remediator/actions/_fifowalk.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"],
        ),
        # The limits probe's per-process fd loop (see the file's header). Optional: when it did
        # not build, limits_fdscan falls back to the same loop in Python.
        Extension(
            "remediator.probes._fdscan",
            ["remediator/probes/_fdscan.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"],
            optional=True,
        ),
        # kcmp(2) of open files, one and in bulk, for the inotify/epoll instance dedup.
        Extension(
            "remediator.probes._kcmp",
            ["remediator/probes/_kcmp.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"],
            optional=True,
        ),
        # The listing of /proc and the batch read of held counters (see the file's header).
        # Optional too: without it, the same loops run in Python.
        Extension(
            "remediator.probes._batch",
            ["remediator/probes/_batch.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"],
            optional=True,
        ),
    ]
)
