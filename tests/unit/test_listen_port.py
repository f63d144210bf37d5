"""The tests' loopback ports: free to listen on and never one the kernel picks for a connection."""

from __future__ import annotations

import socket

from tests.helpers import _ephemeral_range, listen_port


def test_ports_are_free_distinct_and_below_the_ephemeral_range() -> None:
    ephemeral = _ephemeral_range()
    ports = [listen_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert not [p for p in ports if p in ephemeral]
    for port in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            s.listen()
