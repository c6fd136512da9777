"""One WebSocket connection's handler (cluster.live.streams.StreamHub.serve) when the server
cancels it, as Ray Serve does with a request whose client went away: nothing it started is
left running, and nothing ends later as an exception no one takes (which asyncio logs as an
error, once per such client)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from cluster.live.streams import StreamHub
from starlette.websockets import WebSocketState


class Socket:
    """The part of a Starlette WebSocket the hub uses; ``receive`` waits until the client
    goes away (``leave``), then says so."""

    def __init__(self) -> None:
        self.client = None
        self.application_state = WebSocketState.CONNECTED
        self.gone = asyncio.Event()
        self.receiving = 0

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict[str, Any]:
        self.receiving += 1
        await self.gone.wait()
        return {"type": "websocket.disconnect", "code": 1001}

    async def send_text(self, text: str) -> None:
        pass

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.application_state = WebSocketState.DISCONNECTED


async def no_key(key: str, address: str) -> None:
    return None


def test_a_cancelled_handler_leaves_no_read_behind_to_fail_unseen() -> None:
    async def scenario() -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        unseen: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: unseen.append(context))
        hub = StreamHub(market=lambda: None, render=lambda change: {}, streams=(),
                        authenticate=no_key)
        socket = Socket()
        handler = asyncio.create_task(hub.serve(socket))  # type: ignore[arg-type]
        while not socket.receiving:
            await asyncio.sleep(0)
        handler.cancel()
        await asyncio.gather(handler, return_exceptions=True)
        socket.gone.set()  # the client's disconnect arrives after the handler ended
        for _ in range(5):
            await asyncio.sleep(0)
        gc.collect()  # a task is reported when it is collected with its exception untaken
        await asyncio.sleep(0)
        assert hub.connections == set()
        return unseen

    assert asyncio.run(scenario()) == []
