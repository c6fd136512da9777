"""Compressed and undecodable record batches (real embedded broker, real aiokafka, no Ray).
Kafka producers compress on request, some by default: a batch in any of Kafka's codecs is
read. One the client cannot decode (corrupt, or naming a codec its records are not in) the
feed consumer steps past, counts, and reads on."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator
from typing import Any
from typing import NamedTuple

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka import TopicPartition
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record._crc32c import crc as crc32c
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from engine.assets import DEFAULT_ASSETS
from engine.market import Tick
from feed.broker import ensure_topic
from feed.broker import free_port
from feed.consumer import MarketDataConsumer
from feed.message import MarketDataMessage
from feed.message import message_from_ticks
from feed.pipeline import TickPipeline
from feed.settings import FeedBounds

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

SOL, BTC = DEFAULT_ASSETS["SOL"], DEFAULT_ASSETS["BTC"]
LZ4, GZIP = 3, 1  # the compression codec ids of a record batch's attributes


def tick_message(asset_name: str, bid: int) -> MarketDataMessage:
    now = time.time_ns() // 1000
    return message_from_ticks(DEFAULT_ASSETS[asset_name], bid, bid + 1, now, now, "test")


def batch_of(messages: list[MarketDataMessage]) -> bytes:
    """A plain v2 record batch of ``messages``."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False,
                                        producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                        batch_size=1 << 20)
    for i, msg in enumerate(messages):
        builder.append(i, timestamp=None, key=msg.key, value=msg.to_json_bytes(), headers=[])
    return bytes(builder.build())


def batch_flagged(codec: int, messages: list[MarketDataMessage]) -> bytes:
    """A v2 record batch of ``messages`` whose attributes name ``codec`` though its records
    are not compressed with it (valid CRC): undecodable whether the client has the codec
    or not."""
    buf = bytearray(batch_of(messages))
    # attributes at byte 21 (after base offset, length, leader epoch, magic, CRC); the CRC-32C
    # at byte 17 covers everything from the attributes on
    struct.pack_into(">h", buf, 21, struct.unpack_from(">h", buf, 21)[0] | codec)
    struct.pack_into(">I", buf, 17, crc32c(bytes(buf[21:])))
    return bytes(buf)


class Reading(NamedTuple):
    topic: str
    consumer: MarketDataConsumer
    producer: AIOKafkaProducer
    delivered: list[Tick]  # what the consumer handed to the shards, in order


@contextlib.asynccontextmanager
async def reading(broker: str, partitions: int, **producer_options: Any
                  ) -> AsyncIterator[Reading]:
    """A new topic of ``partitions``, a started consumer of it (SOL to one shard, BTC to
    another) and a producer to it."""
    topic = f"batches-{free_port()}"
    await ensure_topic(broker, partitions, topic)
    delivered: list[Tick] = []

    async def call(shard: str, ticks: list[Tick]) -> None:
        delivered.extend(ticks)

    pipeline = TickPipeline(DEFAULT_ASSETS, {"SOL": ["s0"], "BTC": ["s1"]}, FeedBounds(), 1)
    consumer = MarketDataConsumer(broker, pipeline, call, topic=topic)
    producer = AIOKafkaProducer(bootstrap_servers=broker, **producer_options)
    await producer.start()
    try:
        assert await consumer.start(timeout_s=10.0)
        yield Reading(topic, consumer, producer, delivered)
    finally:
        await consumer.stop()
        await producer.stop()


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_compressed_batches_are_read(kafka_broker: str, codec: str) -> None:
    """A producer compressing with ``codec``: every tick of its batches is read, none
    skipped."""
    async with reading(kafka_broker, 1, compression_type=codec) as (
            topic, consumer, producer, delivered):
        for bid in range(10_000, 10_005):
            sent = [await producer.send(topic, tick_message(name, bid).to_json_bytes(),
                                        partition=0) for name in ("SOL", "BTC")]
            await asyncio.gather(*sent)
            deadline = time.monotonic() + 10
            while not any(t.asset == "BTC" and t.bid_ticks == bid for t in delivered):
                assert time.monotonic() < deadline, consumer.stats()
                await asyncio.sleep(0.02)
        assert [t.bid_ticks for t in delivered if t.asset == "SOL"] == list(range(10_000, 10_005))
        assert consumer.undecodable == 0 and "undecodable" not in consumer.stats()["dropped"]


@pytest.mark.parametrize("codec", [LZ4, GZIP], ids=["lz4", "gzip"])
@pytest.mark.parametrize("records", [1, 3])
@pytest.mark.parametrize("read_alone", [False, True], ids=["followed", "newest"])
async def test_an_undecodable_batch_is_stepped_past_and_counted(
        kafka_broker: str, codec: int, records: int, read_alone: bool) -> None:
    """``read_alone``: the bad batch is read while it holds the partition's newest record."""
    async with reading(kafka_broker, 3, linger_ms=0) as (topic, consumer, producer, delivered):

        async def produce(msg: MarketDataMessage) -> None:
            asset = DEFAULT_ASSETS[msg.asset]
            await (await producer.send(topic, msg.to_json_bytes(), key=msg.key,
                                       partition=asset.index % 3))

        def bids(asset: str) -> list[int]:
            return [t.bid_ticks for t in delivered if t.asset == asset]

        async def until(condition: object, timeout_s: float = 10.0) -> None:
            deadline = time.monotonic() + timeout_s
            while not condition():  # type: ignore[operator]
                assert time.monotonic() < deadline, (bids("SOL"), bids("BTC"), consumer.stats())
                await asyncio.sleep(0.02)

        await produce(tick_message("SOL", 10_000))
        await until(lambda: bids("SOL") == [10_000])
        partition = SOL.index % 3
        leader = producer.client.cluster.leader_for_partition(TopicPartition(topic, partition))
        bad = batch_flagged(codec, [tick_message("SOL", 10_001 + i) for i in range(records)])
        request = ProduceRequest(transactional_id=None, required_acks=1, timeout=5000,
                                 topics=[(topic, [(partition, bad)])])
        await producer.client.send(leader, request)
        if read_alone:
            await until(lambda: consumer.undecodable)
            await asyncio.sleep(0.5)  # polls on: it is not read, nor counted, again
        for bid in (10_005, 10_006):
            await produce(tick_message("SOL", bid))
            await produce(tick_message("BTC", 500_000 + bid))
            await asyncio.sleep(0.2)
        # the records after the bad batch are read on; the newest of each asset at least
        await until(lambda: bids("SOL")[-1:] == [10_006] and bids("BTC")[-1:] == [510_006])
        assert all(bid not in bids("SOL") for bid in range(10_001, 10_001 + records))
        stats = consumer.stats()
        assert stats["dropped"]["undecodable"] == consumer.undecodable == 1
        assert stats["consumer_restarts"] == 0


async def test_records_of_other_partitions_in_a_failing_poll_are_read(kafka_broker: str) -> None:
    """A poll that fails on one partition's batch may already hold another partition's
    records: those are still delivered."""
    async with reading(kafka_broker, 3, linger_ms=0) as (topic, consumer, producer, delivered):
        sol, btc = SOL.index % 3, BTC.index % 3
        leader = producer.client.cluster.leader_for_partition(TopicPartition(topic, sol))
        for round_ in range(10):
            good = batch_of([tick_message("SOL", 10_000 + round_)])
            bad = batch_flagged(LZ4, [tick_message("BTC", 500_000 + round_)])
            # one request, so that one fetch sees both
            request = ProduceRequest(transactional_id=None, required_acks=1, timeout=5000,
                                     topics=[(topic, [(sol, good), (btc, bad)])])
            await producer.client.send(leader, request)
            deadline = time.monotonic() + 5
            while consumer.undecodable <= round_:
                assert time.monotonic() < deadline, consumer.stats()
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
        assert [t.bid_ticks for t in delivered if t.asset == "SOL"] == \
            [10_000 + round_ for round_ in range(10)], consumer.stats()


@pytest.mark.parametrize("codec", [0, GZIP], ids=["plain", "gzip"])
async def test_an_empty_batch_is_stepped_past_and_counted(kafka_broker: str, codec: int) -> None:
    """Record batches of no records (valid CRC), which the client neither reads nor fails on:
    the partition was read no further, its assets' prices frozen until a restart. Each run of
    them is stepped past and counted as undecodable, and the newest tick after it is
    delivered (those before it in the same read are conflated, as in any read)."""
    async with reading(kafka_broker, 1, linger_ms=0) as (topic, consumer, producer, delivered):
        bids = lambda: [t.bid_ticks for t in delivered if t.asset == "SOL"]  # noqa: E731
        leader = producer.client.cluster.leader_for_partition(TopicPartition(topic, 0))
        empty = batch_flagged(codec, []) if codec else batch_of([])

        async def produce(*bids: int | None) -> None:  # None: an empty batch
            for bid in bids:
                if bid is None:
                    await producer.client.send(leader, ProduceRequest(
                        transactional_id=None, required_acks=1, timeout=5000,
                        topics=[(topic, [(0, empty)])]))
                else:
                    await (await producer.send(
                        topic, tick_message("SOL", bid).to_json_bytes(), partition=0))

        async def until_delivered(last: int) -> None:
            deadline = time.monotonic() + 15
            while bids()[-1:] != [last]:
                assert time.monotonic() < deadline, (bids(), consumer.stats())
                await asyncio.sleep(0.02)

        await produce(10_000)
        await until_delivered(10_000)
        await produce(None, 10_001, 10_002)
        await until_delivered(10_002)
        await produce(None, None, 10_003)
        await until_delivered(10_003)
        await produce(None, 10_004)
        await until_delivered(10_004)
        assert set(bids()) <= set(range(10_000, 10_005))
        assert consumer.stats()["dropped"]["undecodable"] == consumer.undecodable == 3
        assert consumer.stats()["consumer_restarts"] == 0
