"""The bound on a closed WebSocket's unsent data (cluster.http.server.CLOSE_FLUSH_S) over a
real asyncio socket transport: a client that takes it all in time closes the connection, with
nothing left to drop; one that takes nothing is dropped."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from cluster.http.server import _StallWatch

FLUSH_S = 0.2
UNSENT = b"x" * 4_000_000  # more than the socket pair's buffers hold


async def closed_with_unsent(read: bool) -> tuple[list[dict[str, Any]], bool]:
    """Write :data:`UNSENT`, close through the transport, and let the client read all of it
    (``read``) or nothing; the loop's errors, and whether the connection ended, once the
    flush bound has passed."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    lost = asyncio.Event()

    class Server(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.set()

    server_side, client = socket.socketpair()
    with client:
        client.setblocking(False)
        raw, _ = await loop.connect_accepted_socket(Server, server_side)
        transport = _StallWatch(raw, FLUSH_S, from_writes=False)  # type: ignore[arg-type]
        transport.write(UNSENT)
        transport.close()
        assert not lost.is_set()  # it waits for the client
        end = loop.time() + 3 * FLUSH_S
        while loop.time() < end:
            if read:
                try:
                    while client.recv(1 << 20):
                        pass
                except BlockingIOError:
                    pass
            await asyncio.sleep(0.01)
    return errors, lost.is_set()


def test_a_client_that_takes_all_in_time_ends_the_connection_without_an_error() -> None:
    """The connection ends as the client takes its last byte; the drop due later then finds
    nothing to drop (asyncio's abort of a transport closed that way raised, logged as an
    error of the event loop for every such client)."""
    errors, ended = asyncio.run(closed_with_unsent(read=True))
    assert ended
    assert errors == []


def test_a_client_that_takes_nothing_is_dropped() -> None:
    errors, ended = asyncio.run(closed_with_unsent(read=False))
    assert ended
    assert errors == []
