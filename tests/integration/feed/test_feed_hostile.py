"""Hostile producers on the market data topic (real embedded broker, real Ray): the feed actor
keeps delivering the good ticks, never a bad one, and counts every drop by reason."""

from __future__ import annotations

import functools
import json
import random
import uuid
from typing import Any

import pytest
import ray
from aiokafka import AIOKafkaProducer
from cluster.actors.feed import FeedActor
from cluster.config import Settings
from engine.assets import DEFAULT_ASSETS
from engine.market import Tick
from feed.message import message_from_ticks
from feed.message import mid_price
from feed.pipeline import DROP_REASONS
from feed.pipeline import drop_counts
from feed.pipeline import drops_text
from feed_recording_shard import RecordingShard
from feed_waits import now_us
from feed_waits import wait_for as _wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

SOL = DEFAULT_ASSETS["SOL"]
PARTITION = {a.name: a.index for a in DEFAULT_ASSETS.assets}  # the producer's layout
wait_for = functools.partial(_wait_for, timeout_s=20.0, poll_s=0.02)  # 20 s at most, every 20 ms


def value(asset: str, bid: str | int, ask: str | int, ts_us: int, **over: Any) -> bytes:
    try:  # the mid of the two, so that what spoils the message is bid, ask or the rest
        mid: str | int = mid_price(str(bid), str(ask))
    except ArithmeticError:
        mid = bid
    obj: dict[str, Any] = {"v": 1, "symbol": DEFAULT_ASSETS[asset].symbol, "asset": asset,
                           "bid": bid, "ask": ask, "price": mid, "ts_us": ts_us, "seq": ts_us,
                           "source": "hostile"}
    obj.update(over)
    return json.dumps(obj).encode()


def hostile_messages(rng: random.Random) -> list[tuple[bytes | None, bytes, str]]:
    """``(key, value, reason it must be dropped for)``, each to be read on its own."""
    t = now_us()
    key = SOL.symbol.encode()
    out: list[tuple[bytes | None, bytes, str]] = [
        (key, bytes(rng.randrange(256) for _ in range(64)), "not_json"),
        (None, bytes(rng.randrange(256) for _ in range(300)), "not_json"),
        (key, b"[" * 200_000, "oversized"),
        (key, b"[" * 500 + b"]" * 500, "too_deep"),
        (key, b'{"symbol":' * 40 + b"1" + b"}" * 40, "too_deep"),
        (key, json.dumps([rng.random() for _ in range(5)]).encode(), "not_json"),
        (key, json.dumps({"symbol": "DOGE_USDC", "bid": "1", "ask": "1"}).encode(),
         "unknown_symbol"),
        (key, value("SOL", "-140.00", "140.01", t), "bad_price"),
        (key, value("SOL", "1e308", "1e308", t), "bad_price"),
        (key, value("SOL", 0, 1, t), "bad_price"),
        (key, value("SOL", "140.001", "140.01", t), "bad_price"),
        (key, value("SOL", "NaN", "140.01", t), "bad_price"),
        (key, value("SOL", "141.00", "140.00", t), "crossed"),
        (key, value("SOL", "140.00", "140.01", t, price="150.005"), "bad_price"),
        (key, value("SOL", "99999999.00", "99999999.00", t), "above_bound"),
        (key, value("SOL", "140.00", "140.01", -t), "bad_field"),
        (key, value("SOL", "140.00", "140.01", 2**64), "bad_field"),
        (key, value("SOL", "140.00", "140.01", t, seq=-1), "bad_field"),
        (key, value("SOL", "140.00", "140.01", t + 3_600_000_000), "future"),
        (key, value("SOL", "140.00", "140.01", 2**63 - 1), "future"),
        (key, value("SOL", "140.00", "140.01", t - 3_600_000_000), "stale"),
        (key, value("SOL", "140.00", "140.01", 1), "stale"),
    ]
    for _ in range(3):  # random JSON objects that are not messages
        keys = [rng.choice(["bid", "ask", "x", "ts_us"]) for _ in range(3)]
        junk: dict[str, object] = {k: rng.choice([None, [], {}, "a", -1.5]) for k in keys}
        out.append((key, json.dumps(junk).encode(), "unknown_symbol"))
    return out


async def test_hostile_messages_are_dropped_by_reason_and_good_ticks_flow(
        kafka_broker: str, ray_local: None) -> None:
    ns = f"hostile-{uuid.uuid4().hex[:8]}"
    topic = f"md-{ns}"
    settings = Settings()
    shards = {a: RecordingShard.options(name=f"shard-{a}-0", namespace=ns).remote()
              for a in ("SOL", "BTC", "ETH")}
    feed = FeedActor.remote(settings, kafka_broker, namespace=ns, topic=topic, group_id=ns)
    assert await feed.start.remote(30)
    raw = AIOKafkaProducer(bootstrap_servers=kafka_broker, linger_ms=0)
    await raw.start()
    good: dict[str, list[Tick]] = {a: [] for a in shards}
    mids = {"SOL": 14_000, "BTC": 950_000, "ETH": 320_000}

    async def send(asset: str, key: bytes | None, payload: bytes) -> None:
        await raw.send_and_wait(topic, payload, key=key, partition=PARTITION[asset])

    async def received(asset: str) -> list[Tick]:
        return [t for _, ticks in await shards[asset].received.remote() for t in ticks]

    async def good_tick(asset: str, bid: int | None = None, ts_us: int | None = None) -> Tick:
        """Produce a good tick and wait until its shard has it."""
        bid = mids[asset] + random.randint(-3, 3) if bid is None else bid
        a = DEFAULT_ASSETS[asset]
        msg = message_from_ticks(a, bid, bid + 1, ts_us or now_us(), now_us(), "test")
        await send(asset, msg.key, msg.to_json_bytes())
        tick = Tick(asset, bid, bid + 1, msg.ts_us, msg.seq, "test")
        good[asset].append(tick)

        async def arrived() -> bool:
            return tick in await received(asset)

        await wait_for(arrived, what=f"good {asset} tick {bid}")
        return tick

    async def dropped() -> dict[str, int]:
        return dict((await feed.stats.remote())["dropped"])

    async def expect_drop(key: bytes | None, payload: bytes, reason: str,
                          asset: str = "SOL") -> None:
        before = await dropped()
        await send(asset, key, payload)

        async def counted() -> bool:
            return (await dropped()).get(reason, 0) > before.get(reason, 0)

        await wait_for(counted, what=f"a {reason} drop of {payload[:60]!r}")
        after = await dropped()
        assert {r: n - before.get(r, 0) for r, n in after.items() if n != before.get(r, 0)} == {
            reason: 1}, payload[:80]

    for asset in shards:
        await good_tick(asset)
    expected: dict[str, int] = {}
    for i, (key, payload, reason) in enumerate(hostile_messages(random.Random(7))):
        await expect_drop(key, payload, reason)
        expected[reason] = expected.get(reason, 0) + 1
        await good_tick(("SOL", "BTC", "ETH")[i % 3])  # the feed keeps delivering

    # an update older than the last delivered one
    last_sol = await good_tick("SOL")
    stale_order = message_from_ticks(SOL, 14_001, 14_002, last_sol.ts_us - 1_000, 1, "hostile")
    await expect_drop(stale_order.key, stale_order.to_json_bytes(), "out_of_order")
    expected["out_of_order"] = 1

    # a jump the next tick does not confirm: held, then dropped
    spike = message_from_ticks(SOL, 28_000, 28_001, now_us(), now_us(), "hostile")
    await send("SOL", spike.key, spike.to_json_bytes())

    async def held() -> bool:
        return bool((await feed.stats.remote())["held"])

    await wait_for(held, what="the spike to be held")
    await good_tick("SOL", 14_002)
    expected["jump"] = 1
    assert (await dropped())["jump"] == 1

    # a jump stamped seconds ahead (within the clock skew allowed): held; the next update,
    # stamped before it, drops it and is delivered (every update was dropped as out of order
    # until the held one's time, a print every 2 s freezing the price for good)
    ahead = message_from_ticks(SOL, 7_000, 7_001, now_us() + 4_000_000, now_us(), "hostile")
    await send("SOL", ahead.key, ahead.to_json_bytes())
    await wait_for(held, what="the print stamped ahead to be held")
    await good_tick("SOL", 14_003)
    await good_tick("SOL", 14_004)
    expected["jump"] = 2
    assert (await dropped())["jump"] == 2

    # a jump the next tick confirms: the market really moved, and the shards sweep the price
    # it moved to before the confirming one (SPEC: the held tick is accepted)
    move = message_from_ticks(SOL, 16_000, 16_001, now_us(), now_us(), "test")
    await send("SOL", move.key, move.to_json_bytes())
    await wait_for(held, what="the move to be held")
    good["SOL"].append(Tick("SOL", 16_000, 16_001, move.ts_us, move.seq, "test"))
    confirmed = await good_tick("SOL", 16_050)

    stats = await feed.stats.remote()
    assert stats["jumps_confirmed"] == 1 and stats["jumps_held"] == 3 and not stats["held"]
    assert {r: n for r, n in stats["dropped"].items() if n} == expected
    assert set(stats["dropped"]) == set(DROP_REASONS)
    assert set(expected) == set(DROP_REASONS)  # every reason was exercised
    assert stats["prices"]["SOL"]["bid"] == SOL.ticks_to_price(confirmed.bid_ticks)

    # the shards got the good ticks, in order, and nothing else
    for asset, shard_ticks in [(a, await received(a)) for a in shards]:
        assert shard_ticks == good[asset], asset
        assert all(t.source == "test" for t in shard_ticks)

    # what an operator reads (shardex status, /metrics)
    line = drops_text(stats["dropped"])
    print(f"feed dropped: {line}")
    for reason, n in expected.items():
        assert f"{reason}={n}" in line
    assert ("jump", 2) in drop_counts(stats["dropped"])  # as /metrics shows it

    await feed.stop.remote()
    await raw.stop()
    for shard in shards.values():
        ray.kill(shard)
    ray.kill(feed)
