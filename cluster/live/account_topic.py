"""TopicTail: an API replica follows the account events on the Kafka topic the ledger publishes
them to (``Settings.account_topic``; cluster.actors.publisher, engine.ledger_machine's
``encode_account_events``: an account's events under one key, a JSON array per message).

Every replica reads every partition itself (no consumer group: each one needs all events), from
the newest message on: what came before is read from the ledger by each subscription's cursor
(cluster.live.account_stream), so ``read`` answers None whenever reading (re)starts at the
newest (the first read, a new partition, a rebuilt consumer, a partition whose topic was created
again: the embedded broker trims it, seen as the partition's end falling below the reader's
position, or as records read from before it, where the client moved itself to the new end). A
reader that lay idle until the new topic held as many messages as it had read cannot tell, and
reads on from there; the checks of cluster.live.account_stream bring what it missed. The topic
is not trusted: anyone who can produce to the Kafka can write to it, so a message whose tag does
not verify (cluster.live.topic_auth: not signed by the ledger's host with this run's secret) is
dropped and counted before it is read, and so is what is not an account event; a forged event
never reaches a connection, and the real one with its seq then comes as the next. A record
batch the Kafka client cannot decode (corrupt, or not in the codec it names: anyone can produce
one) counts as one message whose tag did not verify, and its partition is read on from its end:
the client stays at such a batch, so every read would fail on it, and starting over at the
newest would have every subscription read its account from the ledger again. What the
partition held after it is brought by the checks of cluster.live.account_stream, as any event
the topic lost.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition

from cluster.live.topic_auth import SignedTopic, authentic
from engine.account_events import AccountEvent
from engine.ledger_machine import decode_account_events
from feed.clients import stop_client
from feed.consumer import (
    StallWatch,
    UnreadableBatch,
    position_of,
    read_records,
    recreated_partitions,
)

log = logging.getLogger(__name__)

# The broker holds a fetch at most this long when there is nothing new. A Kafka broker answers
# a held fetch as soon as a message arrives; the embedded one answers it later (up to about
# half of this), so on one machine this bounds how late an event reaches a replica. Shorter
# costs both processes more CPU while a replica has account subscribers (README "The account
# stream on the embedded broker").
FETCH_WAIT_MS = 250
READ_TIMEOUT_MS = 1000
PARTITION_CHECK_S = 5.0  # how often the topic's partitions are looked up again
MAX_RECORDS = 5000


class TopicTail:
    """cluster.live.account_stream.AccountTail over ``topic``: its messages signed with
    ``topic.secret``."""

    def __init__(self, topic: SignedTopic) -> None:
        self.bootstrap = topic.bootstrap
        self.topic = topic.topic
        self._secret = topic.secret
        self._consumer: AIOKafkaConsumer | None = None
        self._check_at = 0.0
        self.malformed = 0  # items that were not account events (in signed messages)
        self.unauthenticated = 0  # messages whose tag did not verify (or batches unread)
        self._next: dict[TopicPartition, int] = {}  # after the newest record read
        self._stalls = StallWatch()
        self._stalled_end: dict[TopicPartition, int] = {}  # the end when last stalled

    async def read(self) -> list[AccountEvent] | None:
        consumer = self._consumer
        if consumer is None:
            consumer = self._consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                auto_offset_reset="latest", fetch_max_wait_ms=FETCH_WAIT_MS,
                metadata_max_age_ms=5000, request_timeout_ms=10_000)
            try:
                await consumer.start()
            except BaseException:
                self._consumer = None
                await stop_client(consumer)
                raise
        try:
            # (while none is assigned, every read looks: the topic is created again by the
            # publisher's next message after a broker restart)
            if time.monotonic() >= self._check_at or not consumer.assignment():
                self._check_at = time.monotonic() + PARTITION_CHECK_S
                if await self._assign(consumer):
                    return None
            if not consumer.assignment():
                await asyncio.sleep(READ_TIMEOUT_MS / 1000)
                return []
            batch = await read_records(consumer, READ_TIMEOUT_MS, MAX_RECORDS, self._next,
                                       functools.partial(self._step_past, consumer),
                                       self._stalls)
        except BaseException:
            await self.close()  # rebuilt by the next read, which starts at the newest again
            raise
        if await self._recreated(consumer):
            return None  # the topic was created again (trimmed): what it had is gone
        restarted = False
        for tp, records in batch.items():
            if records:
                # before what was read: the client met the recreated topic's partition and
                # moved itself to its end, past what the new topic already held
                restarted |= records[0].offset < self._next.get(tp, 0)
                self._next[tp] = records[-1].offset + 1
        if restarted:
            return None
        events: list[AccountEvent] = []
        for records in batch.values():
            for record in records:
                if not authentic(self._secret, record.key, record.value, record.headers):
                    self.unauthenticated += 1
                    continue
                decoded, malformed = decode_account_events(record.value or b"")
                events.extend(decoded)
                self.malformed += malformed
        return events

    def _step_past(self, consumer: AIOKafkaConsumer, tp: TopicPartition, stopped: int | None,
                   end: int | None, exc: BaseException) -> None:
        """Move ``tp`` past a record batch the client cannot read (feed.consumer.read_records),
        counting it in ``unauthenticated``: past one it cannot decode to its end (the failed
        fetch's); past one it reads nothing of (``UnreadableBatch``: no records) to its newest
        record, the events between brought by cluster.live.account_stream's checks. Such a
        batch holding the newest record stalls again there, and is counted once."""
        if isinstance(exc, UnreadableBatch) and stopped is not None and end is not None:
            if stopped >= self._stalled_end.get(tp, 0):
                self.unauthenticated += 1
            self._stalled_end[tp] = end
            end = max(stopped + 1, end - 1)
        else:
            self.unauthenticated += 1
        log.warning("account topic: an unreadable record batch at %s[%d] offset %s skipped: "
                    "%r", tp.topic, tp.partition, stopped, exc)
        if end is not None:
            consumer.seek(tp, end)
            self._next[tp] = end

    async def _assign(self, consumer: AIOKafkaConsumer) -> bool:
        """Assign the topic's partitions if they changed (new ones read from their end);
        True when they did."""
        cluster = await consumer._client.fetch_all_metadata()  # fresh (see feed.consumer)
        partitions = {TopicPartition(self.topic, p)
                      for p in (cluster.partitions_for_topic(self.topic) or ())}
        current = set(consumer.assignment())
        if not partitions or partitions == current:
            return False
        consumer.assign(sorted(partitions))
        await consumer.seek_to_end(*partitions)  # (returns once the positions are known)
        self._next.clear()
        for tp in partitions:
            position = await position_of(consumer, tp)
            if position is not None:
                self._next[tp] = position
        return True

    async def _recreated(self, consumer: AIOKafkaConsumer) -> bool:
        """Read from its new end every partition whose topic was deleted and created again
        (the embedded broker trims it, feed.broker.TopicTrimmer); True when one was."""
        behind = await recreated_partitions(consumer)
        for tp, end in behind.items():
            consumer.seek(tp, end)  # (not seek_to_end: a lazy reset can race the recreation)
            self._next[tp] = end
        return bool(behind)

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        self._check_at = 0.0
        self._next.clear()
        if consumer is not None:
            await stop_client(consumer)


__all__ = ["TopicTail"]
