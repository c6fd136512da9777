"""What one WebSocket connection may hold in the replica's memory (cluster.live.streams): once
it ends nothing of it is kept, and a client that reads nothing holds at most one account
stream's unsent frames, however often it starts that stream again."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
from cluster.live.streams import StreamHub
from engine.messages import Principal
from tests.unit.cluster.test_account_stream import ALICE
from tests.unit.cluster.test_account_stream import Stream
from tests.unit.cluster.test_account_stream import run
from tests.unit.cluster.test_account_stream import until
from tests.unit.cluster.test_stream_handler import ScriptedSocket


async def alice(key: str, address: str) -> Principal | None:
    return ALICE if key == "alice-key" else None


@pytest.mark.parametrize("streams", [[], ["bookTicker.SOL"], ["bookTicker.SOL", "kline.1m.SOL"]])
def test_an_ended_connection_is_not_kept(streams: list[str]) -> None:
    """The frame rate's bucket of a connection held the connection itself (its socket, and
    its queue of up to WS_UNSENT frames) after it ended, until another client's frame came
    2 s later: after a burst of connections, a quiet replica kept them all. Nor do the
    streams it subscribed to keep it."""
    async def scenario() -> None:
        hub = StreamHub(market=lambda: None, render=lambda change: {},
                        streams=("bookTicker.SOL", "kline.1m.SOL"), authenticate=alice)
        socket = ScriptedSocket()
        handler = asyncio.create_task(hub.serve(socket))  # type: ignore[arg-type]
        if streams:
            socket.say({"method": "SUBSCRIBE", "params": streams})
        socket.say({"method": "PING"})
        await until(lambda: {"method": "PONG"} in socket.sent)
        (connection,) = hub.connections
        assert all(hub.subscribers[s] == {connection} for s in streams)
        ended = weakref.ref(connection)
        del connection
        socket.gone.set()
        await handler
        gc.collect()
        assert ended() is None and hub.subscribers == {}

    run(scenario)


class StalledSocket(ScriptedSocket):
    """A ScriptedSocket whose client reads nothing until ``reading`` is set: the frame being
    sent waits, and what follows waits in the connection's queue."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()

    async def send_text(self, text: str) -> None:
        await self.reading.wait()
        await super().send_text(text)


def test_a_restarted_account_stream_drops_what_the_one_before_left_unsent() -> None:
    """Each SUBSCRIBE naming a ``since`` the account never reached queues a snapshot (the
    account's state: up to 200 positions and orders), and an UNSUBSCRIBE then SUBSCRIBE one
    too: a client reading nothing held every one of them queued, WS_UNSENT snapshots, megabytes
    per connection. The stream that replaces one sends what its unsent frames said."""
    async def scenario() -> None:
        s = Stream()
        s.record(ALICE, 5)
        hub = StreamHub(market=lambda: None, render=lambda change: {}, streams=(),
                        authenticate=alice, accounts=s.streams)
        socket = StalledSocket()
        handler = asyncio.create_task(hub.serve(socket))  # type: ignore[arg-type]
        socket.say({"method": "AUTH", "params": ["alice-key"]})
        socket.say({"method": "PING"})  # the frame in flight when the client stops reading
        for _ in range(4):
            socket.say({"method": "SUBSCRIBE", "params": ["account"], "since": 10**6})
        socket.say({"method": "UNSUBSCRIBE", "params": ["account"]})
        socket.say({"method": "SUBSCRIBE", "params": ["account"]})
        await until(lambda: s.streams.counts.snapshots == 5)
        (connection,) = hub.connections
        sub = connection.account
        assert sub is not None
        await until(lambda: sub.started and sub.refill is not None and sub.refill.done())
        s.tail.push(s.record(ALICE, 1))
        await until(lambda: sub.seq == 6)
        socket.reading.set()
        await until(lambda: len(socket.sent) >= 3)
        await asyncio.sleep(0.05)
        pong, *account = socket.sent
        assert pong == {"method": "PONG"}
        # the newest stream's frames alone: its snapshot (at seq 5), then the new event
        assert [(f["data"]["event"], f["data"]["seq"]) for f in account] == [
            ("snapshot", 5), ("balance", 6)], account
        socket.gone.set()
        await handler
        await s.close()

    run(scenario)
