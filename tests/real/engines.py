"""Fixtures that run a test module against every Docker engine the real tier has: the system
dockerd (Debian 12's docker.io 20.10) and the private docker 26 and 28 from Debian's later suites
(tests/real/private_docker.py). A module opts in by importing them:

    from tests.real import engines
    engine = engines.engine  # likewise docker_client, busybox_image, docker_url

They shadow the session-wide `docker_client` and `busybox_image` for that module only.
"""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest

from tests.real.conftest import BUSYBOX_IMAGE, ENGINES, engine_client

# The system engine is in the default suite; the private ones are the slow version matrix.
ENGINE_PARAMS = [name if name == "system" else pytest.param(name, marks=pytest.mark.slow) for name in ENGINES]


@pytest.fixture(scope="module", params=ENGINE_PARAMS)
def engine(request: pytest.FixtureRequest) -> Iterator[tuple[docker.DockerClient, str]]:
    """(client, Docker URL) of each engine in turn."""
    yield from engine_client(request)


@pytest.fixture(scope="module")
def docker_client(engine: tuple[docker.DockerClient, str]) -> docker.DockerClient:
    return engine[0]


@pytest.fixture(scope="module")
def busybox_image(docker_client: docker.DockerClient) -> str:
    return BUSYBOX_IMAGE


@pytest.fixture(scope="module")
def docker_url(engine: tuple[docker.DockerClient, str]) -> str:
    return engine[1]
