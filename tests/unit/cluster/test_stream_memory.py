"""What one WebSocket connection may hold in the replica's memory (cluster.live.streams): once
it ends nothing of it is kept, and a client that reads nothing holds at most one account
stream's unsent frames, however often it starts that stream again."""

from __future__ import annotations

import asyncio
import gc
import weakref

from cluster.live.streams import StreamHub
from engine.messages import Principal
from tests.unit.cluster.test_account_stream import ALICE
from tests.unit.cluster.test_account_stream import Stream
from tests.unit.cluster.test_account_stream import run
from tests.unit.cluster.test_account_stream import until
from tests.unit.cluster.test_stream_handler import ScriptedSocket


async def alice(key: str, address: str) -> Principal | None:
    return ALICE if key == "alice-key" else None


def test_an_ended_connection_is_not_kept() -> None:
    """The frame rate's bucket of a connection held the connection itself (its socket, and
    its queue of up to WS_UNSENT frames) after it ended, until another client's frame came
    2 s later: after a burst of connections, a quiet replica kept them all."""
    async def scenario() -> None:
        hub = StreamHub(market=lambda: None, render=lambda change: {}, streams=(),
                        authenticate=alice)
        socket = ScriptedSocket()
        handler = asyncio.create_task(hub.serve(socket))  # type: ignore[arg-type]
        socket.say({"method": "PING"})
        await until(lambda: socket.sent == [{"method": "PONG"}])
        (connection,) = hub.connections
        ended = weakref.ref(connection)
        del connection
        socket.gone.set()
        await handler
        gc.collect()
        assert ended() is None

    run(scenario)
