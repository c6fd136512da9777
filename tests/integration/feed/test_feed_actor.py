"""Produce -> Kafka (embedded broker) -> FeedActor (real local Ray) -> recording shard actors."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
import uuid
from typing import Any

import pytest
import ray
from cluster.actors.feed import FeedActor
from cluster.config import Settings
from engine.assets import DEFAULT_ASSETS
from engine.market import Tick
from feed.broker import EmbeddedBroker
from feed.broker import free_port
from feed.conflation import MAX_PENDING_PER_ASSET
from feed.message import message_from_ticks
from feed.producer import MarketDataProducer
from feed.source import make_source
from feed.source import run_source
from feed_recording_shard import RecordingShard
from feed_waits import now_us
from feed_waits import wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


async def ticks_of(shard: Any) -> list[Tick]:
    return [t for _, ticks in await shard.received.remote() for t in ticks]


async def produce(producer: MarketDataProducer, asset: str, bid_ticks: int, ts_us: int) -> None:
    a = DEFAULT_ASSETS[asset]
    await producer.publish(message_from_ticks(a, bid_ticks, bid_ticks + 1, ts_us, ts_us, "test"))


async def test_fan_out_newest_ticks_to_every_shard(kafka_broker: str, ray_local: None) -> None:
    ns = f"feed-{uuid.uuid4().hex[:8]}"
    topic = f"md-{ns}"
    settings = Settings(shards={"SOL": 2})
    producer = MarketDataProducer(kafka_broker, settings.assets, topic=topic)
    await producer.start()
    t0 = now_us()
    for i in range(50):  # history before the actor starts: only the newest may reach a shard
        await produce(producer, "SOL", 199_950 + i, t0 + i)
    await producer.flush()

    shards = {name: RecordingShard.options(name=name, namespace=ns).remote()
              for name in ("shard-SOL-0", "shard-BTC-0", "shard-ETH-0")}
    feed = FeedActor.remote(settings, kafka_broker, namespace=ns, topic=topic, group_id=ns)
    assert await feed.start.remote(30)
    await wait_for(lambda: _has_tick(shards["shard-SOL-0"], 199_999),
                   what="the pre-start newest")
    late = RecordingShard.options(name="shard-SOL-1", namespace=ns).remote()  # found by name later

    t1 = now_us()
    for i in range(300):
        for k, asset in enumerate(("SOL", "BTC", "ETH")):
            await produce(producer, asset, 200_000 + i * 3 + k, t1 + i * 3 + k)
        if i % 50 == 0:
            await asyncio.sleep(0.01)
    await producer._producer.send(topic, b"not json", key=b"SOL_USDC", partition=0)  # type: ignore[union-attr]
    await producer._producer.send(topic, b'{"symbol":"DOGE_USDC"}', partition=1)  # type: ignore[union-attr]
    await producer.flush()

    last = {"SOL": 200_000 + 299 * 3, "BTC": 200_000 + 299 * 3 + 1,
            "ETH": 200_000 + 299 * 3 + 2}
    for name, asset in (("shard-SOL-0", "SOL"), ("shard-BTC-0", "BTC"), ("shard-ETH-0", "ETH")):
        await wait_for(lambda n=name, a=asset: _has_tick(shards[n], last[a]), what=name)
    await wait_for(lambda: _has_tick(late, last["SOL"]), what="the late shard")
    shards["shard-SOL-1"] = late

    for name, shard in shards.items():
        asset = name.split("-")[1]
        calls = await shard.received.remote()
        for _, ticks in calls:
            assert ticks and {t.asset for t in ticks} == {asset}  # its own asset's ticks
        seen = [t for _, ticks in calls for t in ticks]
        assert all(a.ts_us < b.ts_us for a, b in itertools.pairwise(seen)), (
            seen[:5], await feed.stats.remote())
        assert all(t.bid_ticks >= 199_999 for t in seen) or asset != "SOL"
        assert seen[-1].bid_ticks == last[asset]
    sol0 = await ticks_of(shards["shard-SOL-0"])
    assert sol0[0].bid_ticks == 199_999  # started from the newest, not from the beginning

    stats = await feed.stats.remote()
    assert stats["consumed"] >= 900 + 2
    assert stats["dropped"].get("not_json") == 1 and stats["dropped"].get("unknown_symbol") == 1
    # conflation skips superseded records without decoding them
    assert stats["conflated_batch"] > 0 and stats["decoded"] < stats["consumed"]
    assert stats["delivered"] >= 4
    assert stats["prices"]["ETH"] == {"bid": DEFAULT_ASSETS["ETH"].ticks_to_price(last["ETH"]),
                                      "ask": DEFAULT_ASSETS["ETH"].ticks_to_price(last["ETH"] + 1),
                                      "ts_us": t1 + 299 * 3 + 2, "seq": t1 + 299 * 3 + 2,
                                      "source": "test"}
    assert set(stats["tick_age_s"]) == {"SOL", "BTC", "ETH"}
    assert stats["lag"] == 0
    await feed.stop.remote()
    await producer.stop()
    for shard in shards.values():
        ray.kill(shard)
    ray.kill(feed)


async def _has_tick(shard: Any, bid_ticks: int) -> bool:
    return any(t.bid_ticks == bid_ticks for t in await ticks_of(shard))


async def test_slow_shard_is_bounded_and_gets_every_accepted_tick(kafka_broker: str,
                                                                  ray_local: None) -> None:
    ns = f"slow-{uuid.uuid4().hex[:8]}"
    topic = f"md-{ns}"
    settings = Settings(assets=DEFAULT_ASSETS.subset(["SOL"]))
    slow = RecordingShard.options(name="shard-SOL-0", namespace=ns).remote(delay_s=0.2)
    feed = FeedActor.remote(settings, kafka_broker, namespace=ns, topic=topic, group_id=ns,
                            max_in_flight_per_shard=2)
    assert await feed.start.remote(30)
    producer = MarketDataProducer(kafka_broker, settings.assets, topic=topic)
    await producer.start()
    t0 = now_us()
    n = 3000
    for i in range(n):
        await produce(producer, "SOL", 500_000 + i, t0 + i)
        if i % 100 == 0:
            await asyncio.sleep(0.005)  # spread over many fetches, so pending really conflates
    await producer.flush()
    await wait_for(lambda: _has_tick(slow, 500_000 + n - 1),
                   what="the newest tick at a slow shard")
    assert await slow.max_concurrent.remote() == 2  # the bound, reached and never exceeded
    calls = await slow.received.remote()
    assert len(calls) < n / 5

    async def idle() -> bool:
        stats = await feed.stats.remote()
        return bool(stats["pending"] == 0 and stats["in_flight"] == 0)

    await wait_for(idle, what="the last call to finish")
    stats = await feed.stats.remote()
    calls = await slow.received.remote()
    delivered = [t for _, ticks in calls for t in ticks]
    # each call's ticks in order; each tick once (two calls in flight may be recorded in
    # either order by this threaded stand-in)
    assert all(all(a.ts_us < b.ts_us for a, b in itertools.pairwise(ticks))
               for _, ticks in calls)
    assert len({t.ts_us for t in delivered}) == len(delivered)
    assert max(len(ticks) for _, ticks in calls) <= MAX_PENDING_PER_ASSET
    # each tick read was delivered, or superseded within its batch or beyond the bound
    assert stats["conflated"] + len(delivered) == n, (stats, len(delivered))
    await feed.stop.remote()
    await producer.stop()
    ray.kill(slow)
    ray.kill(feed)


async def test_survives_a_broker_restart(ray_local: None) -> None:
    ns = f"restart-{uuid.uuid4().hex[:8]}"
    broker = EmbeddedBroker("127.0.0.1", free_port()).start()
    try:
        settings = Settings(feed_source="sim?rate=20&seed=1", kafka_brokers=broker.bootstrap)
        shards = {a: RecordingShard.options(name=f"shard-{a}-0", namespace=ns).remote()
                  for a in ("SOL", "BTC", "ETH")}
        feed = FeedActor.remote(settings, broker.bootstrap, namespace=ns, group_id=ns)
        assert await feed.start.remote(30)
        stop = asyncio.Event()
        source = asyncio.create_task(run_source(settings, stop))

        async def got_after(ts: int) -> bool:
            for shard in shards.values():
                if not any(t.ts_us > ts for t in await ticks_of(shard)):
                    return False
            return True

        await wait_for(lambda: got_after(0), what="ticks before the restart")
        await asyncio.to_thread(broker.restart)
        restarted_us = now_us()
        await wait_for(lambda: got_after(restarted_us + 500_000), timeout_s=60,
                       what="ticks after the broker restart")
        stats = await feed.stats.remote()  # while the source still runs: prices are fresh
        assert stats["assigned"]
        assert all(age < 5 for age in stats["tick_age_s"].values()), stats["tick_age_s"]
        stop.set()
        result = await asyncio.wait_for(source, 15)
        assert result["published"] > 0
        await feed.stop.remote()
        for shard in shards.values():
            ray.kill(shard)
        ray.kill(feed)
    finally:
        broker.stop()


async def test_source_feeds_the_feed_actor(kafka_broker: str, ray_local: None) -> None:
    """The source publishing from another process than the actor's (as the launcher runs it)."""
    ns = f"src-{uuid.uuid4().hex[:8]}"
    settings = Settings(assets=DEFAULT_ASSETS.subset(["SOL", "ETH"]), kafka_brokers=kafka_broker)
    shards = {a: RecordingShard.options(name=f"shard-{a}-0", namespace=ns).remote()
              for a in ("SOL", "ETH")}
    topic = f"md-{ns}"
    feed = FeedActor.remote(settings, namespace=ns, topic=topic, group_id=ns)
    assert await feed.start.remote(30)
    sim = make_source(settings, "sim?rate=40&seed=3")
    stop = asyncio.Event()
    source = asyncio.create_task(run_source(settings, stop, topic=topic, source=sim))
    await asyncio.sleep(0)
    assert sim is not None and not source.done() and sim.name == "sim"

    async def both_ticked() -> bool:
        for shard in shards.values():
            got = await ticks_of(shard)
            if len(got) < 3 or {t.source for t in got} != {"sim"}:
                return False
        return True

    await wait_for(both_ticked, what="sim ticks from the source at both shards")
    assert "sim" in {p["source"] for p in (await feed.prices.remote()).values()}
    stop.set()
    result = await asyncio.wait_for(source, 15)
    assert result["published"] > 0 and result["source"] == "sim"
    assert source.done()
    await feed.stop.remote()
    for shard in shards.values():
        ray.kill(shard)
    ray.kill(feed)


async def test_killed_feed_actor_resumes_within_seconds(kafka_broker: str,
                                                        ray_local: None) -> None:
    """kill -9 of the feed actor's process: Ray restarts it and prices flow again at once (the
    actor joins no consumer group, so nothing waits for a dead member's session to expire)."""
    ns = f"kill-{uuid.uuid4().hex[:8]}"
    topic = f"md-{ns}"
    settings = Settings(assets=DEFAULT_ASSETS.subset(["SOL"]))
    shard = RecordingShard.options(name="shard-SOL-0", namespace=ns).remote()
    feed = FeedActor.options(max_restarts=-1).remote(settings, kafka_broker, namespace=ns,
                                                     topic=topic, group_id=ns)
    assert await feed.start.remote(30)
    producer = MarketDataProducer(kafka_broker, settings.assets, topic=topic)
    await producer.start()
    t0 = now_us()
    await produce(producer, "SOL", 7000, t0)
    await producer.flush()
    await wait_for(lambda: _has_tick(shard, 7000), what="a tick before the kill")
    old_pid = await feed.pid.remote()
    os.kill(old_pid, signal.SIGKILL)

    async def restarted() -> bool:
        try:
            return bool(await feed.pid.remote() != old_pid)  # the first call starts consuming
        except ray.exceptions.RayActorError:
            return False

    await wait_for(restarted, timeout_s=30, what="Ray to restart the feed actor")
    killed_at = time.monotonic()
    bid = 7001
    while not await _has_tick(shard, bid):  # produce until one arrives: bounded below
        assert time.monotonic() - killed_at < 15, await feed.stats.remote()
        bid += 1
        await produce(producer, "SOL", bid, now_us())
        await producer.flush()
        await asyncio.sleep(0.2)
    stats = await feed.stats.remote()
    assert stats["pid"] != old_pid and stats["assigned"]
    assert stats["prices"]["SOL"]["bid"] == DEFAULT_ASSETS["SOL"].ticks_to_price(bid)
    await producer.stop()
    await feed.stop.remote()
    ray.kill(feed, no_restart=True)
    ray.kill(shard)
