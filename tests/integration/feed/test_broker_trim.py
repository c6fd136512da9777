"""The embedded broker keeps a topic short (Tansu's memory engine keeps every batch and lists
them all on each fetch): past its bound the topic is created again, empty, with the same
partitions, and the feed's consumer reads the recreated topic from its start at once."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka import AIOKafkaProducer
from aiokafka import TopicPartition
from engine.assets import DEFAULT_ASSETS
from engine.market import Tick
from feed.broker import TopicTrimmer
from feed.broker import ensure_topic
from feed.broker import free_port
from feed.consumer import MarketDataConsumer
from feed.message import message_from_ticks
from feed.pipeline import TickPipeline
from feed.settings import FeedBounds

B = 100_000  # SOL bids around this: every step stays within the jump band


async def _ends(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return {tp.partition: end for tp, end in ends.items()}
    finally:
        await consumer.stop()


async def _wait_for(condition: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_max_records_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_records"):
        TopicTrimmer("127.0.0.1:1", {"t": 0})


@pytest.mark.asyncio
async def test_a_topic_past_its_bound_is_created_again_empty(kafka_broker: str) -> None:
    long, short = f"trim-{free_port()}", f"keep-{free_port()}"
    for topic in (long, short):
        await ensure_topic(kafka_broker, 3, topic)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker, linger_ms=0)
    await producer.start()
    try:
        for i in range(60):  # a batch per record: the records Tansu answers as the end
            await (await producer.send(long, b"x", partition=1))
            if i < 20:
                await (await producer.send(short, b"x", partition=1))
    finally:
        await producer.stop()
    trimmer = TopicTrimmer(kafka_broker, {long: 30, short: 30}, check_s=0.05).start()
    try:
        await _wait_for(lambda: trimmer.trims, 10.0)
        assert trimmer.trims == 1 and trimmer.last_error is None
        assert await _ends(kafka_broker, long, 3) == {0: 0, 1: 0, 2: 0}
        assert (await _ends(kafka_broker, short, 3))[1] >= 19  # within its bound: kept
    finally:
        trimmer.stop()


@pytest.mark.asyncio
async def test_the_consumer_reads_a_recreated_topic_at_once(kafka_broker: str) -> None:
    topic = f"trim-feed-{free_port()}"
    await ensure_topic(kafka_broker, 3, topic)
    sol = DEFAULT_ASSETS["SOL"]
    delivered: list[int] = []

    async def call(shard: str, ticks: list[Tick]) -> None:
        delivered.extend(t.bid_ticks for t in ticks)

    pipeline = TickPipeline(DEFAULT_ASSETS, {"SOL": ["s0"]}, FeedBounds(), 1)
    # partition checks far apart: reading on after the recreation must not wait for one
    consumer = MarketDataConsumer(kafka_broker, pipeline, call, topic=topic,
                                  partition_check_s=60.0)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker, linger_ms=0)
    await producer.start()
    trimmer = TopicTrimmer(kafka_broker, {topic: 30}, check_s=0.05)

    async def produce(bid: int) -> None:
        now = time.time_ns() // 1000
        msg = message_from_ticks(sol, bid, bid + 1, now, now, "test")
        await (await producer.send(topic, msg.to_json_bytes(), key=msg.key,
                                   partition=sol.index % 3))

    try:
        assert await consumer.start(timeout_s=10.0)
        for bid in range(B, B + 40):
            await produce(bid)
        await _wait_for(lambda: delivered and delivered[-1] == B + 39, 10.0)
        trimmer.start()
        await _wait_for(lambda: trimmer.trims, 10.0)
        t0 = time.monotonic()
        await produce(B + 50)
        await _wait_for(lambda: delivered[-1] == B + 50, 5.0)
        assert time.monotonic() - t0 < 2.0
        assert consumer.repositions >= 1
    finally:
        trimmer.stop()
        await consumer.stop()
        await producer.stop()
