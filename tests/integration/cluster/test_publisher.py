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
from aiokafka.errors import KafkaTimeoutError
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.errors import TopicAuthorizationFailedError
from aiokafka.partitioner import murmur2
from cluster.actors.publisher import BATCH
from cluster.actors.publisher import PARTITIONS
from cluster.actors.publisher import ROUND_S
from cluster.actors.publisher import Publisher
from cluster.live.topic_auth import new_secret
from feed.broker import free_port

pytestmark = pytest.mark.asyncio

KEYS = [f"user-{n}".encode() for n in range(40)]
VALUE_BYTES = 900  # 20 messages of a key fill a record batch (16 KiB) and more
SECRET = new_secret()


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
    publisher = Publisher(kafka_broker, topic, SECRET)
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
        rounds = counted(publisher, sent=total)
        assert 1 <= rounds <= 30
    finally:
        publisher.close()


def counted(publisher: Publisher, sent: int, failures: int = 0, rejected: int = 0) -> int:
    """Assert ``publisher``'s stats (nothing dropped or pending); its rounds."""
    stats = publisher.stats()
    rounds = int(stats.pop("rounds"))
    assert stats == {"topic": publisher.topic, "sent": sent, "dropped": 0,
                     "failures": failures, "rejected": rejected, "pending": 0}
    return rounds


def fail_first_round(publisher: Publisher, failure: BaseException) -> None:
    """``publisher``'s first produce round raises ``failure`` before it sends anything; the
    later ones produce as they would."""
    produce = publisher._produce
    failures = [failure]

    async def failing_once(producer: object, batch: list[tuple[bytes, bytes]]) -> object:
        if failures:
            raise failures.pop()
        return await produce(producer, batch)  # type: ignore[arg-type]

    publisher._produce = failing_once  # type: ignore[method-assign]


@pytest.mark.parametrize("failure", [RuntimeError("a bug in a produce round"),
                                     asyncio.CancelledError(), KafkaTimeoutError()],
                         ids=["unexpected error", "stray cancellation",
                              "a timeout not marked retriable"])
async def test_a_produce_round_that_fails_unexpectedly_is_tried_again(
        kafka_broker: str, failure: BaseException) -> None:
    """Neither an exception no one foresaw nor a CancelledError escaping the Kafka client ends
    the publisher's thread: the round is tried again and every message arrives once."""
    topic = f"publisher-retry-{free_port()}"
    publisher = Publisher(kafka_broker, topic, SECRET)
    fail_first_round(publisher, failure)
    try:
        messages = [(KEYS[i % len(KEYS)], f"m{i}".encode()) for i in range(50)]
        publisher.offer(messages)
        got = await _read_all(kafka_broker, topic, len(messages))
        assert sorted(v for records in got.values() for _, v in records) == sorted(
            v for _, v in messages)
        # the failed round and the one that sent them
        assert counted(publisher, sent=len(messages), failures=1) >= 2
    finally:
        publisher.close()


async def test_a_stream_of_offers_is_carried_by_rounds_at_least_round_s_apart(
        kafka_broker: str) -> None:
    """A ledger committing every few milliseconds: its messages share rounds, since a round
    costs the thread about the same whatever it carries; none is lost or waits for more."""
    topic = f"publisher-rounds-{free_port()}"
    publisher = Publisher(kafka_broker, topic, SECRET)
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


MAX_MESSAGE_BYTES = 64 * 1024


def refusing_record_batches_over(publisher: Publisher, limit: int) -> None:
    """``publisher``'s producers answer a record batch over ``limit`` bytes as a Kafka broker
    whose ``message.max.bytes`` is ``limit`` does (the embedded one takes any size)."""
    connect = publisher._connect

    async def connect_refusing() -> object:
        producer = await connect()
        send_batch = producer.send_batch

        async def send(batch: object, topic: str, *, partition: int) -> object:
            if batch.size() <= limit:  # type: ignore[attr-defined]
                return await send_batch(batch, topic, partition=partition)
            answer = asyncio.get_running_loop().create_future()
            answer.set_exception(MessageSizeTooLargeError())
            return answer

        producer.send_batch = send  # type: ignore[method-assign]
        return producer

    publisher._connect = connect_refusing  # type: ignore[method-assign]


async def test_a_message_the_broker_refuses_for_good_is_dropped_and_later_ones_go_out(
        kafka_broker: str) -> None:
    """One message over the broker's size limit neither holds up nor repeats the others (each
    of its retries sent them again, and what came after its round waited until the queue
    overflowed): it is dropped and counted, every other one arrives once, in order per key."""
    topic = f"publisher-refused-{free_port()}"
    publisher = Publisher(kafka_broker, topic, SECRET)
    refusing_record_batches_over(publisher, MAX_MESSAGE_BYTES)
    try:
        too_large = (KEYS[0], b"x" * (MAX_MESSAGE_BYTES + 1))
        messages = [(KEYS[i % len(KEYS)], f"m{i}".encode()) for i in range(BATCH * 2)]
        publisher.offer([messages[0], too_large, *messages[1:10]])
        publisher.offer(messages[10:])  # more than the refused round carries
        deadline = time.monotonic() + 15
        while publisher.stats()["pending"]:
            assert time.monotonic() < deadline, publisher.stats()
            await asyncio.sleep(0.05)
        got = await _read_all(kafka_broker, topic, len(messages))
        assert sum(map(len, got.values())) == len(messages)  # nothing twice
        for key in KEYS:
            partition = (murmur2(key) & 0x7FFFFFFF) % PARTITIONS
            assert [v for k, v in got[partition] if k == key] == [v for k, v in messages
                                                                  if k == key], key
        counted(publisher, sent=len(messages), failures=1, rejected=1)
    finally:
        publisher.close()


async def test_a_round_the_broker_refuses_as_a_whole_is_dropped_and_later_ones_go_out(
        kafka_broker: str) -> None:
    """A topic the broker does not authorize (an operator's mistake, corrected later): what it
    refused is counted, not tried again forever ahead of everything else."""
    topic = f"publisher-unauthorized-{free_port()}"
    publisher = Publisher(kafka_broker, topic, SECRET)
    fail_first_round(publisher, TopicAuthorizationFailedError(topic))
    try:
        publisher.offer([(KEYS[0], b"refused")])
        deadline = time.monotonic() + 15
        while not publisher.stats().get("rejected"):
            assert time.monotonic() < deadline, publisher.stats()
            await asyncio.sleep(0.01)
        publisher.offer([(KEYS[0], b"later")])
        got = await _read_all(kafka_broker, topic, 1)
        assert [v for records in got.values() for _, v in records] == [b"later"]
        counted(publisher, sent=1, failures=1, rejected=1)
    finally:
        publisher.close()
