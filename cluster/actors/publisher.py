"""Publisher: what a host's machine has committed for others to read, produced to Kafka.

A machine that offers ``outbound(after) -> (version, [(key, value), ...])`` (the ledger: its
account events, engine.ledger_machine.LedgerMachine.outbound) is read by its host after every
batch that was journaled (so nothing unjournaled is published) and the messages are handed to a
:class:`Publisher`, which produces them to one topic from a thread of its own (the host's calls
never wait for Kafka). Each message carries its tag (cluster.live.topic_auth: an HMAC of its key and
value) in a record header, so readers can tell it from one anyone else produced to the topic.
Kafka's default partitioner keeps each key on one partition, so the messages of a key stay in
order. The thread produces in rounds: a round sends one record batch
per partition and waits for the broker's acknowledgement. A round costs the thread about the
same CPU whatever it carries (the Kafka client's requests, futures and event-loop
turns), so rounds begin at least :data:`ROUND_S` apart: a message that comes after a quiet
while goes out at once, and under a steady stream of commits one round carries the messages of
all the commits since the last, each at most :data:`ROUND_S` later.

A failed delivery is retried (with a growing pause, the producer rebuilt, the topic created
again: the embedded broker forgets topics when it restarts) until it succeeds; readers ignore
what they already have, so a message produced twice does no harm. What the broker refuses for
good (:func:`refused`: a record batch over its size limit, a topic it does not authorize or
that is invalid) is dropped and counted as ``rejected`` instead, or it would hold up every
later message; the rest of its round counts as delivered, so the messages of a key that are
sent stay in order. At most :data:`MAX_PENDING` messages wait: beyond that the oldest are
dropped and counted (a reader notices the gap, or its checks find it, and reads what it missed
from the machine itself). After a restart the host publishes everything the machine still
keeps, so what a crash cut off before it was produced is produced then.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
from typing import Any

from aiokafka import AIOKafkaProducer, errors
from aiokafka.partitioner import DefaultPartitioner

from cluster.live.topic_auth import MAC_HEADER, sign
from feed.broker import ensure_topic
from feed.clients import stop_client

log = logging.getLogger(__name__)

MAX_PENDING = 200_000  # messages waiting at most
TRIMMED_AT = 2_000
"""Messages a partition of the topic may hold on the embedded broker before it recreates the
topic empty (feed.broker.TopicTrimmer: its memory engine keeps every message and reads slow
down as a partition grows); readers start at the newest and read what they missed from the
machine itself."""
PARTITIONS = 4  # of a topic this creates
BATCH = 1000  # messages per produce round
MAX_BACKOFF_S = 5.0
ROUND_S = 0.02  # rounds begin at least this far apart (at most BATCH messages each)
MAX_KEYS = 100_000  # keys whose partition is remembered
_PARTITIONER = DefaultPartitioner()  # Kafka's: a key's partition as any client computes it

Message = tuple[bytes, bytes]
# broker answers not marked retriable that may well pass the next time
_PASSING = (errors.BrokerNotAvailableError, errors.CorruptRecordException,
            errors.ReplicaNotAvailableError, errors.UnknownError)


def refused(exc: BaseException) -> bool:
    """Whether ``exc`` says the broker will never take what was sent (too large, not
    authorized, an invalid topic or request): sending it again cannot help. The client's own
    errors (a timeout, a lost connection) and retriable answers are worth another try."""
    return isinstance(exc, errors.RecordTooLargeError) or (
        isinstance(exc, errors.BrokerResponseError) and not exc.retriable
        and not isinstance(exc, _PASSING))


class ProduceQueue:
    """The messages waiting to be produced, oldest first, numbered in the order offered; at most
    ``limit`` (beyond that the oldest are dropped). Thread-safe.

    A produce round takes the first messages (:meth:`take`) and, once the broker acknowledged
    them, removes them by their numbers (:meth:`remove`): messages dropped while the round was
    under way are not mistaken for the ones it produced. ``dropped`` counts the messages given
    up without being produced."""

    def __init__(self, limit: int = MAX_PENDING) -> None:
        self.limit = limit
        self._messages: collections.deque[Message] = collections.deque(maxlen=limit)
        self._first = 0  # the number of _messages[0]
        self._lock = threading.Lock()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._messages)

    def add(self, messages: list[Message]) -> bool:
        """Queue ``messages`` (in order); True when nothing was waiting before them."""
        with self._lock:
            idle = not self._messages
            # the deque drops these from its head itself as the new ones arrive
            excess = max(0, len(self._messages) + len(messages) - self.limit)
            self._messages.extend(messages)
            self._first += excess
            self.dropped += excess
        return idle

    def take(self, count: int) -> tuple[int, list[Message]]:
        """The number of the first waiting message and up to ``count`` messages from it."""
        with self._lock:
            return self._first, list(itertools.islice(self._messages, count))

    def remove(self, first: int, count: int) -> None:
        """Messages ``first`` .. ``first + count - 1`` were produced: those still waiting
        leave, and those dropped meanwhile were not lost after all."""
        end = first + count
        with self._lock:
            # the head only moved on by drops since the round took its messages
            self.dropped -= max(0, min(self._first, end) - first)
            while self._messages and self._first < end:
                self._messages.popleft()
                self._first += 1


class Publisher:
    """Produces ``(key, value)`` messages to ``topic`` on ``bootstrap``, each signed with
    ``secret`` (cluster.live.topic_auth); ``offer`` from any thread, ``close`` to stop (what is
    still waiting is given up to two seconds)."""

    def __init__(self, bootstrap: str, topic: str, secret: bytes) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._secret = secret
        self._queue = ProduceQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._started = threading.Event()
        self._stopping = False
        self.sent = 0
        self.rounds = 0  # produce rounds begun (a failed one included)
        self.failures = 0
        self.rejected = 0  # messages the broker refused for good (dropped)
        self._partitions: dict[bytes, int] = {}  # key -> partition, for _partition_count
        self._partition_count = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()),
                                        name=f"publish-{topic}", daemon=True)
        self._thread.start()
        self._started.wait(5.0)

    def offer(self, messages: list[Message]) -> None:
        """Queue ``messages`` (in order) to be produced; never blocks."""
        if messages and self._queue.add(messages):  # else the thread looks again after
            self._signal()

    def _signal(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended
                loop.call_soon_threadsafe(wake.set)

    def close(self, timeout_s: float = 2.0) -> None:
        self._stopping = True
        self._signal()
        self._thread.join(timeout_s)

    def stats(self) -> dict[str, Any]:
        return {"topic": self.topic, "sent": self.sent, "rounds": self.rounds,
                "dropped": self._queue.dropped, "failures": self.failures,
                "rejected": self.rejected, "pending": len(self._queue)}

    # -- the thread ------------------------------------------------------------------------
    async def _main(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        self._started.set()
        producer: AIOKafkaProducer | None = None
        backoff_s = 0.1
        last_round_at = -ROUND_S  # when the last round began (loop time)
        while True:
            if not self._queue:
                if self._stopping:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                self._wake.clear()
                continue
            since_s = self._loop.time() - last_round_at
            if len(self._queue) < BATCH and not self._stopping and since_s < ROUND_S:
                await asyncio.sleep(ROUND_S - since_s)
            last_round_at = self._loop.time()
            self.rounds += 1
            first, batch = self._queue.take(BATCH)
            try:
                if producer is None:
                    producer = await self._connect()
                rejected = await self._produce(producer, batch)
            except (Exception, asyncio.CancelledError) as exc:
                # (nothing cancels this loop's task: a CancelledError escaped a Kafka client,
                # and any other failure is tried again rather than ending the thread unseen)
                if refused(exc):  # the whole round (the topic: not authorized, invalid)
                    self._done(first, batch, len(batch), exc)
                else:
                    self.failures += 1
                log.warning("publisher %s: %r; again in %.1f s", self.topic, exc, backoff_s)
                if producer is not None:
                    await stop_client(producer)
                    producer = None
                if self._stopping:
                    break
                await asyncio.sleep(backoff_s)
                backoff_s = min(MAX_BACKOFF_S, backoff_s * 2)
                continue
            backoff_s = 0.1
            self._done(first, batch, *rejected)
        if producer is not None:
            await stop_client(producer)

    def _done(self, first: int, batch: list[Message], rejected: int = 0,
              exc: BaseException | None = None) -> None:
        """The round of ``batch`` (from message ``first``) is over: all of it was acknowledged
        but ``rejected`` messages, which the broker refused with ``exc``."""
        self._queue.remove(first, len(batch))
        self.sent += len(batch) - rejected
        if rejected:
            self.failures += 1
            self.rejected += rejected
            log.warning("publisher %s: %d messages dropped, refused for good: %r", self.topic,
                        rejected, exc)

    async def _produce(self, producer: AIOKafkaProducer, batch: list[Message]
                       ) -> tuple[int, BaseException | None]:
        """``batch`` produced and acknowledged but what the broker refused for good (how many
        messages, and its answer): one record batch per partition (and per ``max_batch_size``
        bytes) rather than one ``send`` per message, whose futures and pure-Python key hashing
        cost more than the messages themselves. Any other failure raises."""
        partitions = sorted(await producer.partitions_for(self.topic))
        if not partitions:  # metadata caught mid-recreation: the round is tried again
            raise errors.UnknownTopicOrPartitionError(self.topic)
        if len(partitions) != self._partition_count:  # the topic was created anew
            self._partition_count, self._partitions = len(partitions), {}
        builders: dict[int, Any] = {}
        sent: list[tuple[int, asyncio.Future[Any]]] = []  # (messages, acknowledgement)
        for key, value in batch:
            partition = self._partitions.get(key)
            if partition is None:
                if len(self._partitions) >= MAX_KEYS:
                    self._partitions.clear()
                partition = self._partitions[key] = _PARTITIONER(key, partitions, partitions)
            headers = [(MAC_HEADER, sign(self._secret, key, value))]
            builder = builders.get(partition)
            if builder is None or builder.append(timestamp=None, key=key, value=value,
                                                 headers=headers) is None:
                if builder is not None:  # full: it leaves, a new one takes the message
                    sent.append((builder.record_count(), await producer.send_batch(
                        builder, self.topic, partition=partition)))
                builder = builders[partition] = producer.create_batch()
                # a first always fits
                builder.append(timestamp=None, key=key, value=value, headers=headers)
        for partition, builder in builders.items():
            sent.append((builder.record_count(), await producer.send_batch(
                builder, self.topic, partition=partition)))
        answers = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
        failed = [(n, a) for (n, _), a in zip(sent, answers, strict=True)
                  if isinstance(a, BaseException)]
        for _, exc in failed:
            if not refused(exc):
                raise exc  # the whole round again (readers drop what they already have)
        return sum(n for n, _ in failed), failed[0][1] if failed else None

    async def _connect(self) -> AIOKafkaProducer:
        await ensure_topic(self.bootstrap, PARTITIONS, self.topic, timeout_s=5.0)
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=1, acks=1,
                                    request_timeout_ms=5000)
        await producer.start()
        return producer


__all__ = ["MAX_PENDING", "TRIMMED_AT", "ProduceQueue", "Publisher"]
