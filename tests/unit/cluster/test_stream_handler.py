"""One WebSocket connection's handler (cluster.live.streams.StreamHub.serve): when the server
cancels it, as Ray Serve does with a request whose client went away, nothing it started is
left running, and nothing ends later as an exception no one takes (which asyncio logs as an
error, once per such client); a SUBSCRIBE to ``account`` naming ``since`` restarts its stream
from there; a candle whose interval ended without a later tick is sent ``closed: true`` once."""

from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path
from typing import Any

from cluster.config import Settings
from cluster.live.market import Change
from cluster.live.market import MarketLive
from cluster.live.streams import StreamHub
from engine.candles import Candle
from engine.market import Tick
from engine.messages import Principal
from starlette.websockets import WebSocketState
from tests.unit.cluster.test_account_stream import ALICE
from tests.unit.cluster.test_account_stream import Stream
from tests.unit.cluster.test_account_stream import run
from tests.unit.cluster.test_account_stream import until
from tests.unit.cluster.test_market_candles import MINUTE_US
from tests.unit.cluster.test_market_candles import T5_US
from tests.unit.cluster.test_market_candles import Clock
from tests.unit.cluster.test_market_candles import sol


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


class ScriptedSocket(Socket):
    """A Socket whose client sends the frames pushed with ``say``; ``sent`` holds what the
    server sent, parsed."""

    def __init__(self) -> None:
        super().__init__()
        self.said: asyncio.Queue[str] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []

    def say(self, frame: dict[str, Any]) -> None:
        self.said.put_nowait(json.dumps(frame))

    async def receive(self) -> dict[str, Any]:
        said = asyncio.ensure_future(self.said.get())
        gone = asyncio.ensure_future(self.gone.wait())
        done, _ = await asyncio.wait({said, gone}, return_when=asyncio.FIRST_COMPLETED)
        for task in (said, gone):
            task.cancel()
        if said in done:
            return {"type": "websocket.receive", "text": said.result()}
        return {"type": "websocket.disconnect", "code": 1001}

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))

    @property
    def seqs(self) -> list[int | str]:
        """The seq of each account frame sent (``"snapshot"`` for a snapshot's), or the code
        of an error frame."""
        return [f["error"]["code"] if "error" in f else
                "snapshot" if f["data"]["event"] == "snapshot" else f["data"]["seq"]
                for f in self.sent]


def test_subscribing_to_the_account_again_with_since_restarts_it_from_there() -> None:
    async def scenario() -> None:
        s = Stream()
        s.record(ALICE, 5)

        async def alice(key: str, address: str) -> Principal | None:
            return ALICE if key == "alice-key" else None

        hub = StreamHub(market=lambda: None, render=lambda change: {}, streams=(),
                        authenticate=alice, accounts=s.streams)
        socket = ScriptedSocket()
        handler = asyncio.create_task(hub.serve(socket))  # type: ignore[arg-type]
        socket.say({"method": "AUTH", "params": ["alice-key"]})
        socket.say({"method": "SUBSCRIBE", "params": ["account"], "since": 3})
        await until(lambda: socket.seqs == [4, 5])
        # since again: what follows it is replayed, though the stream ran past it
        socket.say({"method": "SUBSCRIBE", "params": ["account"], "since": 1})
        await until(lambda: socket.seqs == [4, 5, 2, 3, 4, 5])
        # since no longer reachable (beyond the newest): the state, as a first subscribe gets
        socket.say({"method": "SUBSCRIBE", "params": ["account"], "since": 10**6})
        await until(lambda: len(socket.seqs) == 7)
        assert socket.seqs[-1] == "snapshot" and socket.sent[-1]["data"]["seq"] == 5
        # without since, the running stream's cursor goes on: nothing again, then each new
        # event once
        (connection,) = hub.connections
        sub = connection.account
        assert sub is not None
        await until(lambda: sub.started and sub.refill is not None and sub.refill.done())
        socket.say({"method": "SUBSCRIBE", "params": ["account"]})
        await asyncio.sleep(0.05)
        s.tail.push(s.record(ALICE, 1))
        await until(lambda: socket.seqs[-1] == 6)
        await asyncio.sleep(0.05)
        assert socket.seqs == [4, 5, 2, 3, 4, 5, "snapshot", 6]
        assert connection.account is sub
        assert len(s.streams.by_user[ALICE.user]) == 1  # the replaced ones are gone
        socket.gone.set()
        await handler
        assert s.streams.by_user == {}
        s.tail.push([])  # the tail's next (quiet) read ends its poller
        poller = s.streams._poller
        assert poller is not None
        await asyncio.wait_for(poller, 3)

    run(scenario)


def render(change: Change) -> dict[str, Any]:
    value = change.value
    if isinstance(value, Tick):
        return {"bid": value.bid_ticks}
    assert isinstance(value, Candle)
    return {"start": value.start_us, "ticks": value.tick_count, "closed": value.closed}


def test_a_candle_whose_minute_ended_without_a_tick_is_sent_closed_once() -> None:
    async def scenario() -> None:
        clock = Clock(T5_US + 2)
        market = MarketLive(Settings().assets, None, clock)
        market.apply([sol(10_000, T5_US + 1, 1)])
        hub = StreamHub(market=lambda: market, render=render, streams=("kline.1m.SOL",),
                        authenticate=no_key)
        listener = ScriptedSocket()
        handler = asyncio.create_task(hub.serve(listener))  # type: ignore[arg-type]
        listener.say({"method": "SUBSCRIBE", "params": ["kline.1m.SOL"]})
        await until(lambda: len(listener.sent) == 1)
        clock.now_us = T5_US + MINUTE_US  # the minute is over; no tick came
        await until(lambda: len(listener.sent) == 2)
        # a later subscriber gets no current candle: the minute's is closed, the next has none
        late = ScriptedSocket()
        late_handler = asyncio.create_task(hub.serve(late))  # type: ignore[arg-type]
        late.say({"method": "SUBSCRIBE", "params": ["kline.1m.SOL"]})
        await until(lambda: any(c.streams for c in hub.connections if c.socket is late))
        market.apply([sol(10_010, T5_US + MINUTE_US + 1, 2)])
        await until(lambda: len(listener.sent) == 3 and len(late.sent) == 1)
        await asyncio.sleep(0.1)
        minute, later = T5_US, T5_US + MINUTE_US
        assert [f["data"] for f in listener.sent] == [
            {"start": minute, "ticks": 1, "closed": False},
            {"start": minute, "ticks": 1, "closed": True},
            {"start": later, "ticks": 1, "closed": False}]  # the minute not closed again
        assert [f["data"] for f in late.sent] == [
            {"start": later, "ticks": 1, "closed": False}]
        listener.gone.set()
        late.gone.set()
        await asyncio.gather(handler, late_handler)

    asyncio.run(scenario())


def test_a_candle_that_ended_while_the_feed_was_down_is_sent_closed_to_who_saw_it_open(
        tmp_path: Path) -> None:
    """The feed restarts (a new market source, its candles restored from the store) after the
    minute a subscriber was sent open has ended: that subscriber is sent it closed, and a later
    one is not sent it at all (neither the old open frame nor, as news, the closed one)."""
    async def scenario() -> None:
        first = MarketLive(Settings().assets, tmp_path, Clock(T5_US + 2))
        first.apply([sol(10_000, T5_US + 1, 1)])
        markets = [first]
        hub = StreamHub(market=lambda: markets[-1], render=render,
                        streams=("kline.1m.SOL",), authenticate=no_key)
        listener = ScriptedSocket()
        handler = asyncio.create_task(hub.serve(listener))  # type: ignore[arg-type]
        listener.say({"method": "SUBSCRIBE", "params": ["kline.1m.SOL"]})
        await until(lambda: len(listener.sent) == 1)
        first.close()
        markets.append(MarketLive(Settings().assets, tmp_path, Clock(T5_US + 2 * MINUTE_US)))
        await until(lambda: hub.source == markets[-1].source_id, timeout_s=5.0)
        await until(lambda: len(listener.sent) == 2)
        late = ScriptedSocket()
        late_handler = asyncio.create_task(hub.serve(late))  # type: ignore[arg-type]
        late.say({"method": "SUBSCRIBE", "params": ["kline.1m.SOL"]})
        await until(lambda: any(c.streams for c in hub.connections if c.socket is late))
        await asyncio.sleep(0.1)
        assert [f["data"] for f in listener.sent] == [
            {"start": T5_US, "ticks": 1, "closed": False},
            {"start": T5_US, "ticks": 1, "closed": True}]
        assert late.sent == []
        listener.gone.set()
        late.gone.set()
        await asyncio.gather(handler, late_handler)
        markets[-1].close()

    asyncio.run(scenario())
