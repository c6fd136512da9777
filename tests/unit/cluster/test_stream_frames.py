"""Client frames at the edges of one WebSocket connection (cluster.live.streams.StreamHub):
the ``account`` stream is one of the connection's subscriptions, a stream named twice in a frame
counts once, and an UNSUBSCRIBE frees its place; an AUTH after the connection's (the same key,
or a key refused) changes neither its account nor its stream, and no other account's event
reaches it."""

from __future__ import annotations

import asyncio
from typing import Any

from cluster.live.streams import StreamHub
from cluster.live.streams import StreamLimits
from engine.messages import Principal
from tests.unit.cluster.test_account_stream import ALICE
from tests.unit.cluster.test_account_stream import BOB
from tests.unit.cluster.test_account_stream import Stream
from tests.unit.cluster.test_account_stream import run
from tests.unit.cluster.test_account_stream import until
from tests.unit.cluster.test_stream_handler import ScriptedSocket

KEYS = {"alice-key": ALICE, "bob-key": BOB}
STREAMS = ("bookTicker.SOL", "kline.1m.SOL", "kline.5m.SOL")


async def authenticate(key: str, address: str) -> Principal | None:
    return KEYS.get(key)


async def answer(socket: ScriptedSocket, frame: dict[str, Any]) -> list[dict[str, Any]]:
    """Send ``frame``; the frames sent in answer to it (a PING after it marks their end)."""
    start = len(socket.sent)
    socket.say(frame)
    socket.say({"method": "PING"})
    await until(lambda: {"method": "PONG"} in socket.sent[start:])
    return [f for f in socket.sent[start:] if f != {"method": "PONG"}]


async def end_tail(s: Stream) -> None:
    """Once nobody follows an account: the tail's next (quiet) read ends its poller."""
    assert s.streams.by_user == {}
    s.tail.push([])
    poller = s.streams._poller
    assert poller is not None
    await asyncio.wait_for(poller, 3)


def codes(frames: list[dict[str, Any]]) -> list[str]:
    return [f["error"]["code"] for f in frames]


def test_the_account_stream_takes_one_of_the_subscriptions_and_repeats_count_once() -> None:
    async def scenario() -> None:
        s = Stream()
        s.record(ALICE, 2)
        hub = StreamHub(market=lambda: None, render=lambda change: {}, streams=STREAMS,
                        authenticate=authenticate, limits=StreamLimits(subscriptions=3),
                        accounts=s.streams)
        socket = ScriptedSocket()
        handler = asyncio.create_task(hub.serve(socket))  # type: ignore[arg-type]
        assert await answer(socket, {"method": "AUTH", "params": ["alice-key"]}) == []
        assert await answer(socket, {"method": "SUBSCRIBE", "params": [
            "bookTicker.SOL", "bookTicker.SOL", "kline.1m.SOL"]}) == []  # two streams
        refused = await answer(socket, {"method": "SUBSCRIBE",
                                        "params": ["account", "kline.5m.SOL"]})
        assert refused == [{"error": {"code": "INVALID_REQUEST",
                                      "message": "at most 3 subscriptions per connection"}}]
        (connection,) = hub.connections
        assert connection.account is None and connection.streams == set(STREAMS[:2])
        await answer(socket, {"method": "SUBSCRIBE", "params": ["account", "account"]})
        await until(lambda: any(f.get("stream") == "account" for f in socket.sent))
        assert [f["data"] for f in socket.sent if f.get("stream") == "account"] == [
            {"event": "snapshot", "seq": 2, "state": "x"}]
        # the third place is the account's
        assert codes(await answer(socket, {"method": "SUBSCRIBE",
                                           "params": ["kline.5m.SOL"]})) == ["INVALID_REQUEST"]
        assert await answer(socket, {"method": "UNSUBSCRIBE", "params": ["account"]}) == []
        assert await answer(socket, {"method": "SUBSCRIBE", "params": ["kline.5m.SOL"]}) == []
        assert codes(await answer(socket, {"method": "SUBSCRIBE",
                                           "params": ["account"]})) == ["INVALID_REQUEST"]
        assert not connection.following_account and connection.streams == set(STREAMS)
        socket.gone.set()
        await handler
        await end_tail(s)

    run(scenario)


def test_an_auth_after_the_connections_changes_neither_its_account_nor_its_stream() -> None:
    async def scenario() -> None:
        s = Stream()
        s.record(ALICE, 1)
        s.record(BOB, 1)
        hub = StreamHub(market=lambda: None, render=lambda change: {}, streams=STREAMS,
                        authenticate=authenticate, accounts=s.streams)
        socket = ScriptedSocket()
        handler = asyncio.create_task(hub.serve(socket))  # type: ignore[arg-type]
        assert await answer(socket, {"method": "AUTH", "params": ["alice-key"]}) == []
        await answer(socket, {"method": "SUBSCRIBE", "params": ["account"], "since": 1})
        (connection,) = hub.connections
        sub = connection.account
        assert sub is not None
        await until(lambda: sub.started and sub.refill is not None and sub.refill.done())
        # the same key again: nothing to answer, counted once, the stream goes on
        assert await answer(socket, {"method": "AUTH", "params": ["alice-key"]}) == []
        assert hub.by_key == {"alice-key": 1}
        assert codes(await answer(socket, {"method": "AUTH", "params": ["bob-key"]})) == [
            "INVALID_REQUEST"]
        # a key that opens no account is refused as any other key is (not UNAUTHORIZED, which
        # told the client the connection was logged out)
        assert codes(await answer(socket, {"method": "AUTH", "params": ["nobody"]})) == [
            "INVALID_REQUEST"]
        assert connection.principal == ALICE and connection.account is sub
        assert hub.by_key == {"alice-key": 1}
        s.tail.push([*s.record(BOB, 2), *s.record(ALICE, 1)])
        await until(lambda: any(f.get("stream") == "account" for f in socket.sent))
        await asyncio.sleep(0.05)
        assert [f["data"]["seq"] for f in socket.sent if f.get("stream") == "account"] == [2]
        assert s.streams.counts.snapshots == 0
        socket.gone.set()
        await handler
        assert hub.by_key == {}
        await end_tail(s)

    run(scenario)


def test_a_frame_of_no_method_it_knows_is_told_every_method_ping_included() -> None:
    async def scenario() -> None:
        hub = StreamHub(market=lambda: None, render=lambda change: {}, streams=STREAMS,
                        authenticate=authenticate)
        socket = ScriptedSocket()
        handler = asyncio.create_task(hub.serve(socket))  # type: ignore[arg-type]
        (refused,) = await answer(socket, {"method": "FOO"})
        assert refused["error"]["code"] == "INVALID_REQUEST"
        message = refused["error"]["message"]
        for method in ("SUBSCRIBE", "UNSUBSCRIBE", "AUTH", "PING"):
            assert f'"{method}"' in message, message
        socket.gone.set()
        await handler

    run(scenario)
