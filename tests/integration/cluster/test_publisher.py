"""The Publisher on the embedded broker: every message offered arrives once, each key on the
partition Kafka's default partitioner gives it (what any other client would compute) and in
the order offered, across produce rounds larger than one record batch; a stream of small
offers is carried by rounds at least ROUND_S apart."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition
from aiokafka.partitioner import murmur2
from cluster.actors.publisher import PARTITIONS
from cluster.actors.publisher import ROUND_S
from cluster.actors.publisher import Publisher
from feed.broker import free_port

pytestmark = pytest.mark.asyncio

KEYS = [f"user-{n}".encode() for n in range(40)]
VALUE_BYTES = 900  # 20 messages of a key fill a record batch (16 KiB) and more


async def _read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0
                    ) -> dict[int, list[tuple[bytes, bytes]]]:
    """``{partition: [(key, value), ...]}`` read from the start of ``topic``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        got: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
        deadline = time.monotonic() + timeout_s
        while sum(map(len, got.values())) < expected:
            assert time.monotonic() < deadline, f"read {sum(map(len, got.values()))}"
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                got[tp.partition] += [(r.key, r.value) for r in records]
        return got
    finally:
        await consumer.stop()


async def test_each_key_arrives_in_order_on_kafkas_partition_for_it(kafka_broker: str) -> None:
    topic = f"publisher-order-{free_port()}"
    publisher = Publisher(kafka_broker, topic)
    try:
        offered: dict[bytes, list[bytes]] = defaultdict(list)
        for round_ in range(30):  # small offers and a large one, as a ledger's commits come
            size = 200 if round_ == 10 else 3
            messages = []
            for i in range(size):
                key = KEYS[(round_ * 7 + i) % len(KEYS)]
                value = f"{round_}:{i}:".encode().ljust(VALUE_BYTES, b".")
                offered[key].append(value)
                messages.append((key, value))
            publisher.offer(messages)
            await asyncio.sleep(0.002)
        total = sum(map(len, offered.values()))
        got = await _read_all(kafka_broker, topic, total)
        assert sum(map(len, got.values())) == total  # nothing twice
        for partition, records in got.items():
            for key, _ in records:
                assert (murmur2(key) & 0x7FFFFFFF) % PARTITIONS == partition, key
        for key, values in offered.items():
            partition = (murmur2(key) & 0x7FFFFFFF) % PARTITIONS
            assert [v for k, v in got[partition] if k == key] == values, key
        stats = publisher.stats()
        assert 1 <= stats.pop("rounds") <= 30
        assert stats == {"topic": topic, "sent": total, "dropped": 0, "failures": 0,
                         "pending": 0}
    finally:
        publisher.close()


@pytest.mark.parametrize("failure", [RuntimeError("a bug in a produce round"),
                                     asyncio.CancelledError()],
                         ids=["unexpected error", "stray cancellation"])
async def test_a_produce_round_that_fails_unexpectedly_is_tried_again(
        kafka_broker: str, failure: BaseException) -> None:
    """Neither an exception no one foresaw nor a CancelledError escaping the Kafka client ends
    the publisher's thread: the round is tried again and every message arrives once."""
    topic = f"publisher-retry-{free_port()}"
    publisher = Publisher(kafka_broker, topic)
    produce = publisher._produce
    failures = [failure]

    async def failing_once(producer: object, batch: list[tuple[bytes, bytes]]) -> None:
        if failures:
            raise failures.pop()
        await produce(producer, batch)  # type: ignore[arg-type]

    publisher._produce = failing_once  # type: ignore[method-assign]
    try:
        messages = [(KEYS[i % len(KEYS)], f"m{i}".encode()) for i in range(50)]
        publisher.offer(messages)
        got = await _read_all(kafka_broker, topic, len(messages))
        assert sorted(v for records in got.values() for _, v in records) == sorted(
            v for _, v in messages)
        stats = publisher.stats()
        assert stats.pop("rounds") >= 2  # the failed round and the one that sent them
        assert stats == {"topic": topic, "sent": len(messages), "dropped": 0, "failures": 1,
                         "pending": 0}
    finally:
        publisher.close()


async def test_a_stream_of_offers_is_carried_by_rounds_at_least_round_s_apart(
        kafka_broker: str) -> None:
    """A ledger committing every few milliseconds: its messages share rounds, since a round
    costs the thread about the same whatever it carries; none is lost or waits for more."""
    topic = f"publisher-rounds-{free_port()}"
    publisher = Publisher(kafka_broker, topic)
    try:
        messages = [(KEYS[i % len(KEYS)], f"m{i}".encode()) for i in range(150)]
        started = time.monotonic()
        for message in messages:
            publisher.offer([message])
            await asyncio.sleep(0.002)
        while publisher.stats()["sent"] < len(messages):
            assert time.monotonic() < started + 20, publisher.stats()
            await asyncio.sleep(0.002)
        elapsed_s = time.monotonic() - started
        rounds = publisher.stats()["rounds"]
        # rounds begin ROUND_S apart at the least: no more of them fit in the time taken
        assert 2 <= rounds <= elapsed_s / ROUND_S + 1, (rounds, elapsed_s)
        got = await _read_all(kafka_broker, topic, len(messages))
        assert sorted(v for records in got.values() for _, v in records) == sorted(
            v for _, v in messages)
    finally:
        publisher.close()
