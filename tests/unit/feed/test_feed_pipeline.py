"""The feed actor's consumer logic end to end, without Ray or Kafka: records in, calls out."""

from __future__ import annotations

import json
from typing import NamedTuple

from engine.assets import DEFAULT_ASSETS
from engine.market import Tick
from feed.message import message_from_ticks
from feed.pipeline import DROP_REASONS
from feed.pipeline import TickPipeline
from feed.pipeline import drop_counts
from feed.pipeline import drops_text
from feed.pipeline import quantiles_ms
from feed.settings import FeedBounds

NOW = 1_788_367_430_000_000


class Rec(NamedTuple):
    key: bytes | None
    value: bytes | None


def rec(asset: str, bid: int, ts: int, seq: int = 0) -> Rec:
    msg = message_from_ticks(DEFAULT_ASSETS[asset], bid, bid + 1, ts, seq or ts, "test")
    return Rec(msg.key, msg.to_json_bytes())


def pipeline() -> TickPipeline:
    routes = {"SOL": ["s0", "s1"], "BTC": ["s1"], "ETH": ["s2"]}
    return TickPipeline(DEFAULT_ASSETS, routes, FeedBounds(), max_in_flight=1)


def test_batches_flow_to_the_shards_and_drops_are_counted_by_reason() -> None:
    p = pipeline()
    sol = DEFAULT_ASSETS["SOL"]
    hostile = [
        Rec(b"SOL_USDC", b"\x00\xff garbage"),
        Rec(b"SOL_USDC", b"[" * 1000),
        Rec(None, json.dumps({"symbol": "SOL_USDC", "bid": "1.00"}).encode()),
        Rec(b"SOL_USDC", rec("SOL", 10_000, NOW + 3_600_000_000).value),
        Rec(b"SOL_USDC", rec("SOL", 10_000, 1).value),
        Rec(b"SOL_USDC", rec("SOL", sol.max_price_ticks + 1, NOW).value),
    ]
    accepted = p.ingest([[rec("SOL", 10_000, NOW - 2), rec("SOL", 10_001, NOW - 1), *hostile],
                         [rec("BTC", 950_000, NOW)]], NOW)
    assert [t.bid_ticks for t in accepted] == [10_001, 950_000]
    calls = dict(p.take_ready())
    assert calls == {"s0": [accepted[0]], "s1": [accepted[0], accepted[1]]}
    dropped = p.dropped()
    assert set(dropped) == set(DROP_REASONS)
    assert {r: n for r, n in dropped.items() if n} == {
        "not_json": 1, "too_deep": 1, "bad_price": 1, "future": 1, "stale": 1,
        "above_bound": 1}
    stats = p.stats(NOW)
    assert stats["consumed"] == 9 and stats["dropped_total"] == 6
    assert stats["prices"]["SOL"]["bid"] == "100.01"
    assert stats["read_age_ms"]["n"] == 2


def test_jump_held_across_batches_then_confirmed_or_dropped() -> None:
    p = pipeline()
    p.ingest([[rec("SOL", 10_000, NOW - 10)]], NOW)
    assert p.ingest([[rec("SOL", 20_000, NOW - 9)]], NOW) == []  # held
    assert p.stats(NOW)["held"] == {"SOL": {"bid": "200.00", "ask": "200.01"}}
    confirmed = p.ingest([[rec("SOL", 20_100, NOW - 8)]], NOW)
    assert [t.bid_ticks for t in confirmed] == [20_000, 20_100]  # the held price first
    assert [[t.bid_ticks for t in ticks] for _, ticks in p.take_ready()] == \
        [[10_000, 20_000, 20_100]] * 2  # both of the pipeline's shards get it, in order
    assert p.ingest([[rec("SOL", 1_000, NOW - 7)]], NOW) == []  # held again
    assert [t.bid_ticks for t in p.ingest([[rec("SOL", 20_050, NOW - 6)]], NOW)] == [20_050]
    stats = p.stats(NOW)
    assert stats["jumps_held"] == 2 and stats["jumps_confirmed"] == 1
    assert stats["dropped"]["jump"] == 1 and stats["held"] == {}
    assert stats["dropped_total"] == 1  # the gate's drops count as the decoder's do


def test_out_of_order_batch_is_dropped() -> None:
    p = pipeline()
    p.ingest([[rec("ETH", 300_000, NOW - 5)]], NOW)
    assert p.ingest([[rec("ETH", 300_100, NOW - 6)]], NOW) == []
    assert p.dropped()["out_of_order"] == 1
    assert p.last["ETH"] == Tick("ETH", 300_000, 300_001, NOW - 5, NOW - 5, "test")


def test_failed_call_keeps_the_ticks_pending() -> None:
    p = pipeline()
    p.ingest([[rec("ETH", 300_000, NOW)]], NOW)
    [(name, ticks)] = p.take_ready(["s2"])
    p.done(name, ticks, ok=False)
    assert p.take_ready(["s2"]) == [("s2", ticks)]
    p.done("s2", ticks, ok=True)
    assert p.stats(NOW)["delivered"] == 1 and p.stats(NOW)["failed_calls"] == 1


def test_quantiles() -> None:
    assert quantiles_ms([]) is None
    assert quantiles_ms([1000, 3000, 2000]) == {"p50": 2.0, "p99": 3.0, "max": 3.0, "n": 3}
    # enough samples that the 99th percentile is not the largest one, nor the median a third
    assert quantiles_ms(range(200_000, 0, -1000)) == {"p50": 101.0, "p99": 199.0, "max": 200.0,
                                                      "n": 200}


def test_drops_for_operators() -> None:
    assert drops_text({}) == "none" and drops_text({r: 0 for r in DROP_REASONS}) == "none"
    assert drops_text({"stale": 3, "not_json": 1, "zzz": 2}) == "not_json=1 stale=3 zzz=2"
    counts = drop_counts({"jump": 2, "zzz": 1})  # what /metrics shows, zeros included
    assert counts == [(r, 2 if r == "jump" else 0) for r in DROP_REASONS] + [("zzz", 1)]


def test_a_message_read_twice_is_delivered_once() -> None:
    """The topic can hold a message twice (a producer's retry after a lost acknowledgement),
    and the consumer reads the last one again when it repositions a partition one message
    back. The gate let the same tick through again: it went to the shards and to the candles a
    second time (``tick_count`` counted it twice, the bookTicker stream sent it twice). It is
    dropped as ``out_of_order``, the last delivered update again; an update with the same
    ``(ts_us, seq)`` and another price still passes."""
    p = pipeline()
    first = p.ingest([[rec("ETH", 300_000, NOW - 5)]], NOW)
    assert len(first) == 1
    assert p.ingest([[rec("ETH", 300_000, NOW - 5)]], NOW) == []
    assert p.dropped()["out_of_order"] == 1
    assert [t for _, ticks in p.take_ready() for t in ticks] == first
    assert [t.bid_ticks for t in p.ingest([[rec("ETH", 300_001, NOW - 5, NOW - 5)]], NOW)] \
        == [300_001]


def test_a_jump_is_confirmed_by_a_next_tick_however_late_it_comes() -> None:
    """A market whose ticks come further apart than ``MAX_PRICE_AGE_S`` still moves after a
    gap: the held jump and the tick that confirms it are delivered, in order. (Dropping the
    held tick once too old to accept held each next tick in turn, dropped stale before a
    next one came: such a market never moved again.)"""
    p = pipeline()
    age_us = FeedBounds().max_price_age_us
    p.ingest([[rec("SOL", 10_000, NOW - 10)]], NOW)
    assert p.ingest([[rec("SOL", 20_000, NOW - 9)]], NOW) == []  # held
    later = NOW - 9 + age_us + 1
    confirmed = p.ingest([[rec("SOL", 20_100, later)]], later)
    assert [t.bid_ticks for t in confirmed] == [20_000, 20_100]
    assert p.last["SOL"].bid_ticks == 20_100 and "SOL" not in p.gate.held
    assert p.stats(later)["jumps_confirmed"] == 1
