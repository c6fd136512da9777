"""The broker check of ``/healthz``: a broker of the bootstrap list accepts a connection."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from feed.broker import broker_answers
from feed.broker import free_port


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP listener on IPv6 loopback (skipped where the host has none)."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    sock.listen()
    yield sock
    sock.close()


def test_a_broker_past_the_first_answering_is_healthy(listener: socket.socket) -> None:
    """The first broker of KAFKA_BROKERS refusing, the next listening: the clients read and
    write through the next, so the platform trades; only the first was tried, and /healthz
    answered 503 naming the broker."""
    port = listener.getsockname()[1]
    bootstrap = f"127.0.0.1:{free_port()}, [::1]:{port}"
    assert asyncio.run(broker_answers(bootstrap, 1.0)) is True


def test_a_bracketed_ipv6_broker_is_reached(listener: socket.socket) -> None:
    """KAFKA_BROKERS takes ``[::1]:9092``; its host was looked up with the brackets, which
    fails as a name, so /healthz answered 503 while the broker ran."""
    assert asyncio.run(broker_answers(f"[::1]:{listener.getsockname()[1]}", 1.0)) is True


def test_no_broker_answering_raises_within_the_bound() -> None:
    """Every broker refusing: the check raises (a component that does not answer)."""
    bootstrap = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    with pytest.raises(OSError):
        asyncio.run(asyncio.wait_for(broker_answers(bootstrap, 0.5), 2.0))
