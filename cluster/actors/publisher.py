"""Publisher: what a host's machine has committed for others to read, produced to Kafka.

A machine that offers ``outbound(after) -> (version, [(key, value), ...])`` (the ledger: its
account events, engine.ledger_machine.LedgerMachine.outbound) is read by its host after every
batch that was journaled (so nothing unjournaled is published) and the messages are handed to a
:class:`Publisher`, which produces them to one topic from a thread of its own (the host's calls
never wait for Kafka). Kafka's default partitioner keeps each key on one partition, so the
messages of a key stay in order.

A failed delivery is retried (with a growing pause, the producer rebuilt, the topic created
again: the embedded broker forgets topics when it restarts) until it succeeds; readers ignore
what they already have, so a message produced twice does no harm. At most :data:`MAX_PENDING`
messages wait: beyond that the oldest are dropped and counted (a reader notices the gap and
reads what it missed from the machine itself). After a restart the host publishes everything
the machine still keeps, so what a crash cut off before it was produced is produced then.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from feed.broker import ensure_topic

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

Message = tuple[bytes, bytes]


class Publisher:
    """Produces ``(key, value)`` messages to ``topic`` on ``bootstrap``; ``offer`` from any
    thread, ``close`` to stop (what is still waiting is given up to two seconds)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._pending: collections.deque[Message] = collections.deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._started = threading.Event()
        self._stopping = False
        self.sent = 0
        self.dropped = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name=f"publish-{topic}",
                                        daemon=True)
        self._thread.start()
        self._started.wait(5.0)

    def offer(self, messages: list[Message]) -> None:
        """Queue ``messages`` (in order) to be produced; never blocks."""
        if not messages:
            return
        with self._lock:
            self._pending.extend(messages)
            excess = len(self._pending) - MAX_PENDING
            for _ in range(max(0, excess)):
                self._pending.popleft()
            self.dropped += max(0, excess)
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
        return {"topic": self.topic, "sent": self.sent, "dropped": self.dropped,
                "failures": self.failures, "pending": len(self._pending)}

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        self._started.set()
        producer: AIOKafkaProducer | None = None
        backoff_s = 0.1
        while True:
            if not self._pending:
                if self._stopping:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                self._wake.clear()
                continue
            with self._lock:
                batch = [self._pending[i] for i in range(min(BATCH, len(self._pending)))]
            try:
                if producer is None:
                    producer = await self._connect()
                sent = [await producer.send(self.topic, value, key=key) for key, value in batch]
                await asyncio.gather(*sent)
            except (KafkaError, OSError, TimeoutError) as exc:
                self.failures += 1
                log.warning("publisher %s: %s; again in %.1f s", self.topic, exc, backoff_s)
                if producer is not None:
                    await _stop(producer)
                    producer = None
                if self._stopping:
                    break
                await asyncio.sleep(backoff_s)
                backoff_s = min(MAX_BACKOFF_S, backoff_s * 2)
                continue
            backoff_s = 0.1
            with self._lock:  # what was produced leaves (the queue may have dropped some)
                for _ in range(min(len(batch), len(self._pending))):
                    self._pending.popleft()
            self.sent += len(batch)
        if producer is not None:
            await _stop(producer)

    async def _connect(self) -> AIOKafkaProducer:
        await ensure_topic(self.bootstrap, PARTITIONS, self.topic, timeout_s=5.0)
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=1, acks=1,
                                    request_timeout_ms=5000)
        await producer.start()
        return producer


async def _stop(producer: AIOKafkaProducer) -> None:
    try:
        await producer.stop()
    except KafkaError as exc:  # pending batches to a dead broker: nothing to save
        log.warning("publisher: stop: %s", exc)


__all__ = ["MAX_PENDING", "TRIMMED_AT", "Publisher"]
