"""The feed's Kafka consumer without a broker: assignment, positions, polling, shard calls, lag,
rebuilds, against an in-memory stand-in for aiokafka's consumer and the topic it reads."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from typing import NamedTuple

import feed.consumer as consumer_module
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError
from engine.assets import DEFAULT_ASSETS
from engine.market import Tick
from feed.clients import stop_client
from feed.consumer import MarketDataConsumer
from feed.message import message_from_ticks
from feed.pipeline import TickPipeline
from feed.settings import FeedBounds

REPO = Path(__file__).resolve().parents[3]
TOPIC = "md"
B = 100_000  # bids around this: every step stays within the jump band
ROUTES = {"SOL": ["s0", "s1"], "BTC": ["s1"], "ETH": ["s2"]}


def tp(partition: int) -> TopicPartition:
    return TopicPartition(TOPIC, partition)


def now_us() -> int:
    return time.time_ns() // 1000


class Rec(NamedTuple):
    key: bytes | None
    value: bytes | None
    offset: int


class Topic:
    """The topic on a broker: per-partition logs; ``restart`` forgets it, like Tansu does."""

    def __init__(self, partitions: int | None = None) -> None:
        self.logs: dict[int, list[Rec]] | None = None
        if partitions is not None:
            self.create(partitions)
        self.created = 0
        self.ensure_failures = 0  # ensure_topic calls to fail before it answers
        self.stays_past_end = False  # Tansu: a position past the end reads nothing, no reset
        self.poll_failures = 0  # getmany calls to fail (any consumer)
        # stop calls to end in a CancelledError nobody asked for, as aiokafka 0.14's does when
        # it stops while a fetch waits out its retry backoff
        self.stray_cancels = 0
        self.consumers: list[FakeConsumer] = []

    def create(self, partitions: int) -> None:
        self.logs = {p: [] for p in range(partitions)}

    def restart(self) -> None:
        self.logs = None

    def produce(self, asset: str, bid_ticks: int, ts_us: int | None = None) -> None:
        assert self.logs is not None
        a = DEFAULT_ASSETS[asset]
        ts_us = ts_us or now_us()
        msg = message_from_ticks(a, bid_ticks, bid_ticks + 1, ts_us, ts_us, "test")
        log = self.logs[a.index % len(self.logs)]
        log.append(Rec(msg.key, msg.to_json_bytes(), len(log)))

    def end(self, partition: int) -> int:
        return len((self.logs or {}).get(partition, []))

    async def ensure_topic(self, bootstrap: str, partitions: int, topic: str = TOPIC,
                           timeout_s: float = 10.0) -> bool:
        if self.ensure_failures:
            self.ensure_failures -= 1
            raise KafkaConnectionError("broker not ready")
        if self.logs is not None:
            return False
        self.create(partitions)
        self.created += 1
        return True

    def consumer(self, **options: Any) -> FakeConsumer:
        consumer = FakeConsumer(self, options)
        self.consumers.append(consumer)
        return consumer


class FakeConsumer:
    """What MarketDataConsumer uses of ``aiokafka.AIOKafkaConsumer``, over a :class:`Topic`.

    Positions are forgotten by ``assign``; a partition without a position, or positioned past
    its end, starts at its beginning (``auto_offset_reset="earliest"``)."""

    def __init__(self, topic: Topic, options: dict[str, Any]) -> None:
        self.topic = topic
        self.options = options
        self.assigned: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self.high: dict[TopicPartition, int] = {}
        self._client = self
        self.stopped = False

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True
        if self.topic.stray_cancels:
            self.topic.stray_cancels -= 1
            raise asyncio.CancelledError

    async def fetch_all_metadata(self) -> FakeConsumer:
        return self

    def partitions_for_topic(self, name: str) -> set[int] | None:
        logs = self.topic.logs
        return set(logs) if name == TOPIC and logs is not None else None

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = set(partitions)
        self.positions = {}

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.positions[partition] = offset

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        for p in partitions:
            self.positions[p] = 0

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {p: self.topic.end(p.partition) for p in partitions}

    async def beginning_offsets(self,
                                partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {p: 0 for p in partitions}

    def highwater(self, partition: TopicPartition) -> int | None:
        return self.high.get(partition)

    async def position(self, partition: TopicPartition) -> int:
        return self.positions.get(partition, 0)

    async def getmany(self, timeout_ms: int,
                      max_records: int) -> dict[TopicPartition, list[Rec]]:
        if self.topic.poll_failures:
            self.topic.poll_failures -= 1
            raise KafkaConnectionError("connection lost")
        batch = {}
        for p in sorted(self.assigned):
            log = (self.topic.logs or {}).get(p.partition, [])
            pos = self.positions.get(p, 0)
            self.high[p] = len(log)
            if pos > len(log):
                if self.topic.stays_past_end:
                    continue
                pos = 0
            if log[pos:]:
                batch[p] = log[pos:]
            self.positions[p] = len(log)
        if not batch:
            await asyncio.sleep(0.005)
        return batch


class Shards:
    """The shard-call side: records calls; ``hold`` blocks calls until set; ``unreachable``
    shards are never handed ticks; a call to a shard in ``fail`` raises and makes it
    unreachable (as ``cluster.actors.feed`` forgets a failed shard's handle)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.fail: set[str] = set()
        self.unreachable: set[str] = set()
        self.hold: asyncio.Event | None = None
        self.outstanding = 0
        self.max_outstanding = 0

    async def call(self, shard: str, ticks: list[Tick]) -> None:
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        try:
            if self.hold is not None:
                await self.hold.wait()
            self.calls.append((shard, [t.bid_ticks for t in ticks]))
            if shard in self.fail:
                self.unreachable.add(shard)
                raise RuntimeError("shard is dead")
        finally:
            self.outstanding -= 1

    def reachable(self, shard: str) -> bool:
        return shard not in self.unreachable

    def bids(self, shard: str) -> list[list[int]]:
        return [bids for name, bids in self.calls if name == shard]


def make(shards: Shards, **options: Any) -> MarketDataConsumer:
    pipeline = TickPipeline(DEFAULT_ASSETS, ROUTES, FeedBounds(),
                            options.pop("max_in_flight", 1))
    return MarketDataConsumer("fake:9092", pipeline, shards.call, reachable=shards.reachable,
                              topic=TOPIC, client_id="test", **options)


def attach(c: MarketDataConsumer, topic: Topic) -> FakeConsumer:
    fake = topic.consumer()
    c.consumer = fake  # type: ignore[assignment]
    return fake


async def assigned(topic: Topic, shards: Shards, **options: Any
                   ) -> tuple[MarketDataConsumer, FakeConsumer]:
    """A consumer (:func:`make`) reading ``topic`` through a fake Kafka consumer that has just
    been assigned the topic's partitions."""
    c = make(shards, **options)
    fake = attach(c, topic)
    assert await c.check_assignment(fake)  # type: ignore[arg-type]
    return c, fake


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_start_from_must_be_latest_or_earliest() -> None:
    with pytest.raises(ValueError, match="start_from"):
        make(Shards(), start_from="newest")


@pytest.mark.asyncio
async def test_first_assignment_starts_at_each_partitions_newest_message() -> None:
    topic = Topic(3)
    for bid in range(B, B + 5):
        topic.produce("SOL", bid)
    topic.produce("ETH", 3 * B)
    c = make(Shards())
    assert c.lag() is None  # no Kafka consumer yet
    fake = attach(c, topic)
    assert c.lag() == 0
    assert await c.check_assignment(fake)  # type: ignore[arg-type]
    assert fake.assigned == {tp(0), tp(1), tp(2)} and c.assignments == 1
    # the last message is re-read (the newest price at once); an empty partition at 0
    assert fake.positions == {tp(0): 4, tp(1): 0, tp(2): 0}
    assert await c.check_assignment(fake)  # type: ignore[arg-type]
    assert c.assignments == 1 and c.repositions == 0  # nothing changed: nothing done


@pytest.mark.asyncio
async def test_earliest_starts_at_the_beginning() -> None:
    topic = Topic(3)
    for bid in range(B, B + 5):
        topic.produce("SOL", bid)
    _, fake = await assigned(topic, Shards(), start_from="earliest")
    assert fake.positions == {tp(0): 0, tp(1): 0, tp(2): 0}


@pytest.mark.asyncio
async def test_no_topic_no_assignment() -> None:
    c = make(Shards())
    fake = attach(c, Topic())
    assert not await c.check_assignment(fake)  # type: ignore[arg-type]
    assert fake.assigned == set() and c.assignments == 0
    assert not c.assigned and c.stats()["assigned"] is False


@pytest.mark.asyncio
async def test_polled_ticks_reach_their_shards_and_lag_counts_the_unread() -> None:
    topic = Topic(3)
    shards = Shards()
    c, fake = await assigned(topic, shards)
    for bid in (B, B + 1, B + 2):
        topic.produce("SOL", bid)
    topic.produce("BTC", 900_000)
    assert await c.poll(fake) == 4  # type: ignore[arg-type]
    await settle()
    # the newest tick of each asset, once per shard it is routed to
    assert shards.bids("s0") == [[B + 2]]
    assert sorted(shards.bids("s1")[0]) == [B + 2, 900_000]
    assert shards.bids("s2") == []
    assert c.lag() == 0
    topic.produce("SOL", B + 3)
    topic.produce("SOL", B + 4)
    fake.high[tp(0)] = topic.end(0)  # the broker's watermark, as a fetch would report it
    assert c.lag() == 2
    stats = c.stats()
    assert stats["polls"] == 1 and stats["batches"] == 1 and stats["consumed"] == 4
    assert stats["delivered"] == 3 and stats["lag"] == 2 and stats["assigned"]
    assert stats["first_record_s"] == stats["last_record_s"] is not None
    assert stats["prices"]["SOL"]["bid"] == DEFAULT_ASSETS["SOL"].ticks_to_price(B + 2)
    assert stats["topic"] == TOPIC and stats["bootstrap"] == "fake:9092"
    assert c.prices() == stats["prices"]
    assert await c.poll(fake) == 2  # type: ignore[arg-type]
    await c.poll(fake)  # type: ignore[arg-type]
    assert c.polls == 3 and c.batches == 2 and c.lag() == 0


@pytest.mark.asyncio
async def test_a_new_partition_is_assigned_without_moving_the_others() -> None:
    topic = Topic(2)
    c, fake = await assigned(topic, Shards())
    topic.produce("SOL", B)
    topic.produce("SOL", B + 1)
    await c.poll(fake)  # type: ignore[arg-type]
    topic.produce("SOL", B + 2)  # not read yet: must be read after the reassignment
    assert topic.logs is not None
    topic.logs[2] = []
    topic.produce("ETH", 3 * B)
    topic.produce("ETH", 3 * B + 1)
    assert await c.check_assignment(fake)  # type: ignore[arg-type]
    assert c.assignments == 2
    assert fake.positions == {tp(0): 2, tp(1): 0, tp(2): 1}


@pytest.mark.asyncio
async def test_a_partition_whose_end_fell_below_the_read_position_is_read_again() -> None:
    topic = Topic(3)
    topic.stays_past_end = True  # as Tansu answers: no records, no out-of-range error
    shards = Shards()
    c, fake = await assigned(topic, shards)
    for bid in range(B, B + 10):
        topic.produce("SOL", bid)
    await c.poll(fake)  # type: ignore[arg-type]
    topic.restart()  # the broker forgot (or trimmed) the topic; it is created again, empty
    topic.create(3)
    await c.poll(fake)  # type: ignore[arg-type]  # the fetch reports the new, lower end
    assert c.repositions == 1  # at that poll, not at the next partition check
    assert await c.check_assignment(fake)  # type: ignore[arg-type]
    assert c.repositions == 1 and c.assignments == 1
    topic.produce("SOL", B + 20)
    topic.produce("SOL", B + 21)
    await c.poll(fake)  # type: ignore[arg-type]
    await settle()
    assert shards.bids("s0") == [[B + 9], [B + 21]]
    assert c.lag() == 0


@pytest.mark.asyncio
async def test_failed_and_unreachable_shards_keep_their_newest_ticks() -> None:
    topic = Topic(3)
    shards = Shards()
    shards.fail.add("s0")
    shards.unreachable.add("s2")
    c, fake = await assigned(topic, shards)
    topic.produce("SOL", B)
    topic.produce("ETH", 3 * B)
    await c.poll(fake)  # type: ignore[arg-type]
    await settle()
    assert c.last_error is not None and c.last_error.startswith("shard s0: RuntimeError")
    stats = c.stats()
    assert stats["failed_calls"] == 1 and stats["delivered"] == 1  # s1 took its tick
    assert len(shards.bids("s0")) == 1  # a failed call is not retried at once
    assert shards.bids("s2") == [] and stats["pending"] == 2
    shards.fail.clear()
    shards.unreachable.clear()
    topic.produce("SOL", B + 1)
    await c.poll(fake)  # type: ignore[arg-type]
    await settle()
    # the failed SOL tick goes again, before the newer one; the ETH tick waited for its shard
    assert shards.bids("s0")[-1] == [B, B + 1] and shards.bids("s1")[-1] == [B + 1]
    assert shards.bids("s2") == [[3 * B]]
    assert c.stats()["pending"] == 0


@pytest.mark.asyncio
async def test_a_shard_outage_is_logged_once_and_its_end_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """A restarting shard fails every retry until it is back (the feed actor retries it every
    0.1 s): one warning when its calls start failing, one when it takes ticks again, not one
    per failed call."""
    topic = Topic(3)
    shards = Shards()
    shards.fail.add("s0")
    c, fake = await assigned(topic, shards)
    caplog.set_level(logging.WARNING, logger="feed.consumer")
    for bid in range(B, B + 4):
        topic.produce("SOL", bid)
        await c.poll(fake)  # type: ignore[arg-type]
        await settle()
        shards.unreachable.discard("s0")  # looked up again: the next round calls it again
    assert len(shards.bids("s0")) == 4 and c.stats()["failed_calls"] == 4
    shards.fail.clear()
    await c.poll(fake)  # type: ignore[arg-type]
    await settle()
    # every tick of the outage reaches it, in order (it ignores any it had applied already)
    assert shards.bids("s0")[-1] == [B, B + 1, B + 2, B + 3]
    assert [r.getMessage() for r in caplog.records] == [
        "feed consumer: shard s0: RuntimeError: shard is dead (its ticks wait)",
        "feed consumer: shard s0 takes ticks again"]


@pytest.mark.asyncio
async def test_at_most_max_in_flight_calls_per_shard_and_the_waiting_ticks_go_next() -> None:
    topic = Topic(3)
    shards = Shards()
    shards.hold = asyncio.Event()
    c, fake = await assigned(topic, shards, max_in_flight=1)
    for bid in range(B, B + 10):
        topic.produce("SOL", bid)
        await c.poll(fake)  # type: ignore[arg-type]
        await settle()
    assert shards.max_outstanding == 2  # s0 and s1, one call each
    shards.hold.set()
    await settle()
    await settle()
    # every tick accepted while the shards were busy reaches them, in order, in one call
    assert shards.bids("s0") == [[B], list(range(B + 1, B + 10))]
    assert shards.bids("s1") == [[B], list(range(B + 1, B + 10))]
    assert c.stats()["conflated_pending"] == 0


@pytest.mark.asyncio
async def test_the_loop_creates_a_missing_topic_and_rebuilds_a_failed_consumer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    topic = Topic()
    topic.ensure_failures = 1  # the broker is not ready when the consumer opens
    monkeypatch.setattr(consumer_module, "AIOKafkaConsumer", topic.consumer)
    monkeypatch.setattr(consumer_module, "ensure_topic", topic.ensure_topic)
    monkeypatch.setattr(consumer_module, "CREATE_TOPIC_AFTER_S", 0.05)
    monkeypatch.setattr(consumer_module, "REBUILD_BACKOFF_S", 0.01)
    shards = Shards()
    c = make(shards, partition_check_s=0.01)
    try:
        assert await c.start(5)
        assert c.topic_recreations == 1 and topic.created == 1 and c.running
        assert topic.consumers[0].options["group_id"] is None  # no consumer group
        assert topic.consumers[0].options["client_id"] == "test"

        async def delivered(bid: int) -> bool:
            for _ in range(500):
                if [bid] in shards.bids("s0"):
                    return True
                await asyncio.sleep(0.01)
            return False

        topic.produce("SOL", B)
        assert await delivered(B)
        topic.produce("SOL", B + 1)
        assert await delivered(B + 1)
        topic.poll_failures = 1
        topic.produce("SOL", B + 2)
        assert await delivered(B + 2)
        assert c.consumer_restarts == 1 and len(topic.consumers) == 2
        assert topic.consumers[0].stopped
        assert c.last_error is not None and "KafkaConnectionError" in c.last_error
        # the rebuilt consumer continued where the failed one was, re-reading nothing
        assert shards.bids("s0") == [[B], [B + 1], [B + 2]]
        assert c.stats()["consumed"] == 3

        # closing the failed consumer raises a stray CancelledError: the loop goes on
        topic.poll_failures, topic.stray_cancels = 1, 1
        topic.produce("SOL", B + 3)
        assert await delivered(B + 3)
        assert c.running and c.consumer_restarts == 2 and topic.stray_cancels == 0
    finally:
        await c.stop()
    assert not c.running and c.consumer is None and topic.consumers[2].stopped
    assert c.lag() is None


@pytest.mark.asyncio
async def test_a_failed_call_goes_again_while_the_broker_is_away(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The ticks of a failed call are offered again every 0.1 s by themselves: a shard back
    from a restart gets the tick that crossed its liquidations while the Kafka consumer fails
    and is rebuilt (backing off 0.2, 0.4, 0.8 s ...), not once the broker answers again."""
    topic = Topic()
    monkeypatch.setattr(consumer_module, "AIOKafkaConsumer", topic.consumer)
    monkeypatch.setattr(consumer_module, "ensure_topic", topic.ensure_topic)
    monkeypatch.setattr(consumer_module, "CREATE_TOPIC_AFTER_S", 0.05)
    shards = Shards()
    c = make(shards, partition_check_s=0.01)
    try:
        assert await c.start(5)
        shards.fail.add("s0")
        topic.produce("SOL", B)
        for _ in range(200):
            if shards.bids("s0") and shards.bids("s1"):
                break
            await asyncio.sleep(0.01)
        assert shards.bids("s0") == [[B]] and shards.bids("s1") == [[B]]
        topic.poll_failures = 10**6  # the broker is away: every poll fails from now on
        for _ in range(100):
            if c.consumer_restarts:
                break
            await asyncio.sleep(0.01)
        assert c.consumer_restarts
        shards.fail.clear()
        shards.unreachable.clear()  # the shard is back
        for _ in range(60):
            if len(shards.bids("s0")) == 2:
                break
            await asyncio.sleep(0.01)
        assert shards.bids("s0") == [[B], [B]] and c.stats()["pending"] == 0
    finally:
        await c.stop()


@pytest.mark.asyncio
async def test_stopping_a_client_lets_only_a_cancellation_of_the_caller_through() -> None:
    stopped = asyncio.Event()

    class Stray:
        async def stop(self) -> None:
            raise asyncio.CancelledError  # from inside the client: nobody cancelled the caller

    class Slow:
        async def stop(self) -> None:
            stopped.set()
            await asyncio.sleep(10)

    await stop_client(Stray())
    task = asyncio.get_running_loop().create_task(
        stop_client(Slow()))
    await stopped.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_the_consumer_imports_nothing_from_cluster() -> None:
    code = ("import sys, feed.consumer; "
            "print(sorted(m for m in sys.modules if m == 'cluster' or m.startswith('cluster.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"
