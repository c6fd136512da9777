"""The account events' topic on the embedded broker, kept short like the market data's: the
publisher goes on producing across the topic's recreation, and a replica's reader of the topic
(TopicTail) says it restarted (None: its subscriptions read what they missed from the ledger),
then reads what comes after; a message that is not account events, or not signed with the
run's secret, is counted, and the events read with it still arrive."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaProducer
from cluster.actors.publisher import Publisher
from cluster.live.account_topic import TopicTail
from cluster.live.topic_auth import MAC_HEADER
from cluster.live.topic_auth import SignedTopic
from cluster.live.topic_auth import new_secret
from cluster.live.topic_auth import sign
from engine.account_events import BALANCE
from engine.account_events import AccountEvent
from engine.account_events import Balance
from engine.ledger_machine import encode_account_events
from feed.broker import TopicTrimmer
from feed.broker import ensure_topic
from feed.broker import free_port

pytestmark = pytest.mark.asyncio

BOUND = 20  # messages a partition may hold before the trimmer recreates the topic
SECRET = new_secret()


def _events(user: int, first_seq: int, n: int) -> list[AccountEvent]:
    return [AccountEvent(user, seq, seq, BALANCE, Balance(seq, 0))
            for seq in range(first_seq, first_seq + n)]


async def _read_until(tail: TopicTail, done: object, timeout_s: float = 20.0
                      ) -> list[list[AccountEvent] | None]:
    """Reads of ``tail`` until ``done(reads)`` holds."""
    reads: list[list[AccountEvent] | None] = []
    deadline = time.monotonic() + timeout_s
    while not done(reads):  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out after {reads[-5:]}"
        reads.append(await tail.read())
    return reads


async def test_a_readers_tail_restarts_at_a_recreation_and_reads_what_follows(
        kafka_broker: str) -> None:
    topic = f"account-events-trim-{free_port()}"
    await ensure_topic(kafka_broker, 4, topic)
    tail = TopicTail(SignedTopic(kafka_broker, topic, SECRET))
    publisher = Publisher(kafka_broker, topic, SECRET)
    trimmer = TopicTrimmer(kafka_broker, {topic: BOUND}, check_s=0.1).start()
    try:
        # the first read that finds the partitions starts at the newest: None
        await _read_until(tail, lambda reads: None in reads)
        publisher.offer(encode_account_events(_events(7, 1, 3)))
        reads = await _read_until(tail, lambda rs: sum(len(r or ()) for r in rs) >= 3)
        assert [e.seq for r in reads for e in r or ()] == [1, 2, 3]

        # one message per event of user 7 (one key: one partition) until the topic is recreated
        seq = 4
        while trimmer.trims == 0:
            publisher.offer(encode_account_events(_events(7, seq, 1)))
            seq += 1
            await asyncio.sleep(0.01)
            assert seq < 2_000, f"never trimmed: {trimmer.last_error}"
        reads = await _read_until(tail, lambda rs: None in rs)  # the reader restarted

        # what is published after the recreation reaches the reader
        later = _events(7, 10_000, 3)
        publisher.offer(encode_account_events(later))
        reads = await _read_until(
            tail, lambda rs: any(e.seq == 10_002 for r in rs for e in r or ()))
        # (a batch the publisher sent again after a failed delivery comes twice: readers keep
        # each seq once)
        got = {e.seq: e for r in reads for e in r or () if e.seq >= 10_000}
        assert sorted(got.values()) == later
        assert publisher.stats()["dropped"] == 0
        assert publisher.stats()["rejected"] == 0  # the recreation is no refusal
    finally:
        trimmer.stop()
        publisher.close()
        await tail.close()


@pytest.mark.parametrize("hostile", [b"[" * 5_000 + b"]" * 5_000,
                                     b'[{"kind":"balance","user":7,"seq":1,"version":1,'
                                     b'"body":[1e400,0]}]'],
                         ids=["nested past the parser's recursion", "an infinite number"])
async def test_a_hostile_message_is_counted_and_the_events_beside_it_arrive(
        kafka_broker: str, hostile: bytes) -> None:
    topic = f"account-events-hostile-{free_port()}"
    await ensure_topic(kafka_broker, 4, topic)
    tail = TopicTail(SignedTopic(kafka_broker, topic, SECRET))
    publisher = Publisher(kafka_broker, topic, SECRET)
    try:
        await _read_until(tail, lambda reads: None in reads)
        [(key, value)] = encode_account_events(_events(7, 1, 2))
        publisher.offer([(key, hostile), (key, value)])  # one partition, one fetch
        reads = await _read_until(tail, lambda rs: sum(len(r or ()) for r in rs) >= 2)
        assert [e.seq for r in reads for e in r or ()] == [1, 2]
        assert tail.malformed == 1
    finally:
        publisher.close()
        await tail.close()


async def test_a_message_not_signed_with_the_runs_secret_is_dropped_and_counted(
        kafka_broker: str) -> None:
    """Anyone may produce to the topic: an event with the account's next seq, unsigned, signed
    with another secret, or under the tag of another value, is dropped and counted; the
    ledger's own event with that seq arrives."""
    topic = f"account-events-forged-{free_port()}"
    await ensure_topic(kafka_broker, 4, topic)
    tail = TopicTail(SignedTopic(kafka_broker, topic, SECRET))
    publisher = Publisher(kafka_broker, topic, SECRET)
    [(key, real)] = encode_account_events(_events(7, 1, 1))
    [(_, forged)] = encode_account_events([AccountEvent(7, 1, 1, BALANCE, Balance(10**12, 0))])
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker)
    await producer.start()
    try:
        await _read_until(tail, lambda reads: None in reads)
        for headers in ([], [(MAC_HEADER, sign(new_secret(), key, forged))],
                        [(MAC_HEADER, sign(SECRET, key, real))]):
            await producer.send_and_wait(topic, forged, key=key, headers=headers)
        publisher.offer([(key, real)])
        reads = await _read_until(tail, lambda rs: sum(len(r or ()) for r in rs) >= 1)
        assert [e for r in reads for e in r or ()] == _events(7, 1, 1)
        assert (tail.unauthenticated, tail.malformed) == (3, 0)
    finally:
        await producer.stop()
        publisher.close()
        await tail.close()
