"""WebSocket connections per API key (SPEC "Limits": 10 per key or per client address;
cluster.live.streams.StreamHub). From one address the address limit comes first, so the key's
limit shows with clients on several addresses (each a scripted Starlette-like socket here): the
AUTH beyond it is refused with RATE_LIMITED and that connection stays open without the account,
serving public streams; once a connection of the key goes, the refused one may AUTH again."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

from cluster.live.streams import StreamHub
from cluster.live.streams import StreamLimits
from engine.messages import Principal
from starlette.websockets import WebSocketState

KEY = "sk-" + "7" * 40
OTHER_KEY = "sk-" + "8" * 40
PRINCIPALS = {KEY: Principal(7, "acc-7"), OTHER_KEY: Principal(8, "acc-8")}


async def authenticate(key: str, address: str) -> Principal | None:
    return PRINCIPALS.get(key)


class Client:
    """One client's side of a socket: what it sends waits in ``inbox``, what the hub sends
    arrives in ``frames`` (decoded)."""

    def __init__(self, host: str) -> None:
        self.client = SimpleNamespace(host=host, port=40_000)
        self.application_state = WebSocketState.CONNECTED
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    async def send_text(self, text: str) -> None:
        await self.frames.put(json.loads(text))

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.application_state = WebSocketState.DISCONNECTED

    async def say(self, method: str, *params: str) -> list[dict[str, Any]]:
        """Send a frame; the frames it was answered with (none, for an AUTH that took). An
        frame no method takes after it marks the end of the answer: its error comes last."""
        for frame in ({"method": method, "params": list(params)}, {"method": "MARK"}):
            await self.inbox.put({"type": "websocket.receive", "text": json.dumps(frame)})
        answer = []
        while True:
            frame = await asyncio.wait_for(self.frames.get(), 5)
            if frame.get("error", {}).get("message", "").startswith("expected {"):
                return answer
            answer.append(frame)

    async def leave(self, handler: asyncio.Task[None]) -> None:
        await self.inbox.put({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(handler, 5)


def test_connections_beyond_the_key_limit_are_refused_the_account_until_one_goes() -> None:
    async def scenario() -> None:
        hub = StreamHub(market=lambda: None, render=lambda change: {},
                        streams=("bookTicker.SOL",), authenticate=authenticate,
                        limits=StreamLimits(connections=2))
        clients = [Client(f"10.0.0.{i}") for i in range(1, 5)]
        handlers = [asyncio.create_task(hub.serve(c)) for c in clients]  # type: ignore[arg-type]
        first, second, third, fourth = clients

        assert await first.say("AUTH", KEY) == []
        assert await second.say("AUTH", KEY) == []
        refused = await third.say("AUTH", KEY)
        assert [f["error"]["code"] for f in refused] == ["RATE_LIMITED"], refused
        assert "too many connections for this key" in refused[0]["error"]["message"]
        assert hub.by_key == {KEY: 2}
        assert await third.say("SUBSCRIBE", "bookTicker.SOL") == []  # public streams: served
        assert await fourth.say("AUTH", OTHER_KEY) == []  # another key has its own count
        assert hub.by_key == {KEY: 2, OTHER_KEY: 1}

        await first.leave(handlers[0])
        assert hub.by_key == {KEY: 1, OTHER_KEY: 1}
        assert await third.say("AUTH", KEY) == []  # the place that went is taken
        assert hub.by_key == {KEY: 2, OTHER_KEY: 1}
        fifth = Client("10.0.0.5")
        clients.append(fifth)
        handlers.append(asyncio.create_task(hub.serve(fifth)))  # type: ignore[arg-type]
        assert [f["error"]["code"] for f in await fifth.say("AUTH", KEY)] == ["RATE_LIMITED"]
        for client, handler in zip(clients[1:], handlers[1:], strict=True):
            await client.leave(handler)
        assert hub.by_key == {} and hub.by_address == {} and hub.connections == set()

    asyncio.run(scenario())


class SlowHandshake(Client):
    """A client whose handshake answer waits on the server (a proxy in front, such as Serve's,
    relays the accept), and which records whether it was refused."""

    refused: bool = False

    async def accept(self) -> None:
        await asyncio.sleep(0)

    async def send_denial_response(self, response: Any) -> None:
        self.refused = True


def test_handshakes_at_once_from_one_address_are_held_to_its_limit() -> None:
    """The address's count was taken after the accept: handshakes arriving together all
    passed the check before any was counted, so one address could hold any number."""
    async def scenario() -> None:
        hub = StreamHub(market=lambda: None, render=lambda change: {},
                        streams=("bookTicker.SOL",), authenticate=authenticate,
                        limits=StreamLimits(connections=2))
        clients = [SlowHandshake("10.0.0.9") for _ in range(4)]
        handlers = [asyncio.create_task(hub.serve(c)) for c in clients]  # type: ignore[arg-type]
        for _ in range(10):
            await asyncio.sleep(0)
        assert [c.refused for c in clients] == [False, False, True, True]
        assert len(hub.connections) == 2 and hub.by_address == {"10.0.0.9": 2}
        for client, handler in zip(clients[:2], handlers[:2], strict=True):
            await client.leave(handler)
        await asyncio.gather(*handlers[2:])
        assert hub.by_address == {} and hub.connections == set()

    asyncio.run(scenario())
