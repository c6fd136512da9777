"""Publishing MarketDataMessages to Kafka with aiokafka, recovering from broker restarts.

Each asset goes to its own partition (``asset.index % partitions``) with key = the Backpack
symbol, so per-asset order is kept and the consumer can conflate per partition. When the broker
restarts (the embedded one forgets every topic), a failed send recreates the topic and the
producer, and publishing goes on; messages lost in the gap are only superseded prices.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from engine.assets import AssetRegistry
from feed.broker import aiokafka_quiet, ensure_topic
from feed.message import MarketDataMessage
from feed.settings import MARKET_TOPIC

log = logging.getLogger(__name__)

LINGER_MS = 1  # how long a batch waits for more messages before it is sent (see the class)


class ProducerStopped(Exception):
    """``stop_event`` was set while the producer was still trying to reach its broker."""


@dataclass(eq=False)
class MarketDataProducer:
    """``await start()``, ``await publish(msg)`` (many), ``await stop()``.

    ``publish`` only enqueues (aiokafka batches in the background, ``linger_ms``); delivery
    failures are counted in ``errors`` and trigger a recovery on the next publish.
    ``create_topic`` makes the producer create the topic (one partition per asset) when missing.

    ``linger_ms`` (default :data:`LINGER_MS`, what ``shardex feed`` and ``shardex up`` publish
    with) is how long each price may wait for others to share its produce request: a longer
    one sends fewer requests at thousands of ticks a second, each price later (``bench latency
    --linger-ms`` compares them).
    """

    bootstrap: str
    assets: AssetRegistry
    _: KW_ONLY
    topic: str = MARKET_TOPIC
    linger_ms: int = LINGER_MS
    create_topic: bool = True
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)  # set: start gives up
    request_timeout_ms: int = 5000

    def __post_init__(self) -> None:
        self._producer: AIOKafkaProducer | None = None
        self._partitions = 0
        self._broken = False
        self._generation = 0
        self._recover_delay_s = 0.0
        self.sent = 0
        self.errors = 0
        self.recoveries = 0

    def stats(self) -> dict[str, Any]:
        return {"sent": self.sent, "errors": self.errors, "recoveries": self.recoveries,
                "topic": self.topic, "bootstrap": self.bootstrap}

    async def start(self) -> None:
        """Connect (retrying until the broker answers) and make sure the topic exists;
        :class:`ProducerStopped` once ``stop_event`` is set (a stop must not wait for a broker)."""
        delay = 0.1
        tries = 0
        while True:
            if self.stop_event.is_set():
                raise ProducerStopped(f"stopped while reaching {self.bootstrap}")
            try:
                with aiokafka_quiet():
                    await self._connect()
                if tries:  # the last line was the warning: say that it is over
                    log.warning("producer: %s reached after %d failed tries; publishing",
                                self.bootstrap, tries)
                return
            except (KafkaError, OSError) as exc:
                tries += 1
                log.warning("producer: cannot reach %s (%s); retrying in %.1f s", self.bootstrap,
                            exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), delay)
                delay = min(delay * 2, 5.0)

    async def _connect(self) -> None:
        if self.create_topic:
            await ensure_topic(self.bootstrap, len(self.assets), self.topic)
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=self.linger_ms,
                                    acks=1, request_timeout_ms=self.request_timeout_ms,
                                    max_batch_size=256 * 1024)
        await producer.start()
        try:
            parts = await producer.partitions_for(self.topic)
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer
        self._generation += 1
        self._partitions = max(1, len(parts or ()))
        self._broken = False

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await producer.stop()
            except KafkaError as exc:  # pending batches to a dead broker: nothing to save
                log.warning("producer: stop: %s", exc)

    async def _recover(self) -> None:
        self.recoveries += 1
        if self._recover_delay_s:
            # Right after a restart the broker may refuse a while (Tansu answers UnknownError
            # for a second or two): back off instead of rebuilding a producer per message.
            await asyncio.sleep(self._recover_delay_s)
        self._recover_delay_s = min(2.0, max(0.05, self._recover_delay_s * 2))
        log.warning("producer: recovering (broker restart or topic loss?)")
        await self.stop()
        await self.start()

    def _on_done(self, generation: int, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            if generation == self._generation:
                self._recover_delay_s = 0.0
            return
        self.errors += 1
        # A batch of a producer already replaced must not condemn its successor.
        if generation == self._generation:
            if not self._broken:
                log.warning("producer: delivery failed: %r",
                            None if fut.cancelled() else fut.exception())
            self._broken = True

    async def publish(self, msg: MarketDataMessage) -> None:
        """Enqueue ``msg`` (key = symbol, partition = the asset's); recovers and retries once."""
        for _attempt in range(2):
            if self._producer is None or self._broken:
                await self._recover()
            assert self._producer is not None
            asset = self.assets.get(msg.asset)
            partition = (asset.index if asset else 0) % self._partitions
            try:
                fut = await self._producer.send(self.topic, msg.to_json_bytes(), key=msg.key,
                                                partition=partition)
            except KafkaError as exc:
                self.errors += 1
                self._broken = True
                log.warning("producer: send failed: %s", exc)
                continue
            fut.add_done_callback(functools.partial(self._on_done, self._generation))
            self.sent += 1
            return

    async def flush(self) -> None:
        if self._producer is not None:
            await self._producer.flush()
