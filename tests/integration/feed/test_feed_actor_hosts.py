"""The feed actor on real hosts: produce -> Kafka -> FeedActor -> shard host -> ledger host
(local Ray, in memory). The latency rings (the feed actor's call timings, the hosts' execute
timings) tell the way of a tick that closes a position, in order, on the one wall clock."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
import ray
from cluster.actors.deploy import ray_ports
from cluster.actors.deploy import start_hosts
from cluster.actors.feed import FeedActor
from cluster.config import Settings
from cluster.trading.placement import shard_layout
from cluster.trading.service import TradingService
from engine.ledger_machine import Totals
from engine.messages import OpenOrder
from engine.messages import OpenPosition
from engine.orders import Side
from engine.shard_machine import LastTick
from feed.message import message_from_ticks
from feed.producer import MarketDataProducer
from feed_waits import now_us
from feed_waits import wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

USD = 10**6
SETTINGS = Settings()
BTC = SETTINGS.assets["BTC"]
SHARD = next(s.name for s in shard_layout(SETTINGS) if s.asset == "BTC")


@dataclass
class Hosted:
    """The ledger and shard hosts, a service over them, a producer and the feed actor."""

    ledger: Any
    shards: dict[str, Any]
    svc: TradingService
    producer: MarketDataProducer
    feed: Any
    seq: int = 0

    async def tick(self, bid: str) -> tuple[int, int]:
        """Produce a BTC tick at ``bid`` (ask one step above); returns its (ts_us, seq)."""
        self.seq += 1
        ts_us = now_us()
        bid_ticks = BTC.price_to_ticks(bid)
        await self.producer.publish(message_from_ticks(BTC, bid_ticks, bid_ticks + 1, ts_us,
                                                       self.seq, "test"))
        await self.producer.flush()
        return ts_us, self.seq

    async def at_shard(self, seq: int) -> bool:
        """Whether the BTC shard's last tick is the one numbered ``seq``."""
        last = (await self.shards[SHARD].execute.remote([LastTick()]))[0]
        return last is not None and last.seq == seq

    async def closed(self) -> int:
        totals = (await self.ledger.execute.remote([Totals()]))[0]
        return int(totals["closed_positions"])

    async def long_with_tp(self, tp: str) -> OpenPosition:
        account = await self.svc.create_account()
        who = await self.svc.authenticate(account.api_key)
        assert who is not None
        opened = await self.svc.open_position(who, OpenOrder(
            "BTC", Side.LONG, 100 * USD, 10, tp_ticks=BTC.price_to_ticks(tp)))
        assert isinstance(opened, OpenPosition)
        return opened


@pytest_asyncio.fixture
async def hosted(kafka_broker: str, ray_local: None) -> AsyncIterator[Hosted]:
    ns = f"feed-hosts-{uuid.uuid4().hex[:8]}"
    topic = f"md-{ns}"
    ledger, shards = start_hosts(SETTINGS, ns, None, 60.0)
    ledger_port, shard_ports = ray_ports(ledger, shards)
    producer = MarketDataProducer(kafka_broker, SETTINGS.assets, topic=topic)
    await producer.start()
    feed = FeedActor.remote(SETTINGS, kafka_broker, namespace=ns, topic=topic, group_id=ns)
    h = Hosted(ledger, shards, TradingService(ledger_port, shard_ports, SETTINGS), producer,
               feed)
    try:
        assert await feed.start.remote(30)
        _, seq = await h.tick("60000.0")
        await wait_for(lambda: h.at_shard(seq), what="the first price at the shard")
        yield h
    finally:
        await feed.stop.remote()
        await producer.stop()
        await h.svc.aclose()
        for handle in [feed, ledger, *shards.values()]:
            ray.kill(handle)


async def _equals(value: Any, want: Any) -> bool:
    return bool(await value == want)


async def test_a_closing_tick_is_timed_from_read_to_settled(hosted: Hosted) -> None:
    h = hosted
    await h.long_with_tp("61000.0")
    calls0, _ = await h.feed.call_timings.remote(0)
    shard0, _ = await h.shards[SHARD].timings.remote(0)
    ledger0, _ = await h.ledger.timings.remote(0)

    ts_us, seq = await h.tick("61000.0")  # takes the profit
    await wait_for(lambda: _equals(h.closed(), 1), what="the close settled in the ledger")

    async def timed() -> bool:
        _, calls = await h.feed.call_timings.remote(calls0)
        return any(c.closed for c in calls)

    await wait_for(timed, what="the closing call in the feed actor's ring")
    count, calls = await h.feed.call_timings.remote(calls0)
    assert count == calls0 + len(calls)
    [call] = [c for c in calls if c.closed]
    assert call.shard == SHARD and call.closed == 1
    [(tick_ts_us, tick_seq, read_us)] = call.ticks
    assert (tick_ts_us, tick_seq) == (ts_us, seq)
    assert ts_us <= read_us <= call.sent_us <= call.answered_us <= call.settle_us \
        <= call.settled_us
    # the shard's execute ran inside the call, the ledger's inside the delivery
    _, executes = await h.shards[SHARD].timings.remote(shard0)
    [inside] = [e for e in executes
                if call.sent_us <= e.start_us and e.end_us <= call.answered_us]
    assert inside.commands >= 2  # the tick and the outbox read (and any acknowledgement)
    assert inside.step_us >= 0 and inside.commit_us >= 0 and inside.after_us == 0
    _, ledger_executes = await h.ledger.timings.remote(ledger0)
    assert [e for e in ledger_executes
            if call.settle_us <= e.start_us and e.end_us <= call.settled_us]
