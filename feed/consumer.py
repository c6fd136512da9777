"""Reading the market data topic into a :class:`feed.pipeline.TickPipeline` and handing the
ticks it makes ready to the shards through a callback; free of Ray.

::

    consumer = MarketDataConsumer(bootstrap, pipeline, call, reachable=reachable)
    await consumer.start()   # True once partitions are assigned
    consumer.stats()         # the pipeline's counters and the consumer's (lag, polls, ...)
    await consumer.stop()

``await call(shard, ticks)`` hands ``ticks`` (``engine.market.Tick``: every accepted tick of
the assets routed to ``shard`` not sent yet, in order, at most
``feed.conflation.MAX_PENDING_PER_ASSET`` of an asset) to one shard; an exception means the
shard did not take them: they go back to pending, before the newer ticks of their assets
waiting there, and are sent again on a later round: every ``retry_s`` until the shard
takes them, whatever the Kafka consumer is doing (a broker that is away, a consumer being
rebuilt), so a shard back from a restart gets the prices it missed without waiting for the
broker.
``reachable(shard) -> bool`` says whether a shard can be called now (the caller may look it up
there). At most ``pipeline.fanout.max_in_flight`` calls are outstanding per shard.
``cluster.actors.feed`` provides both with Ray actor handles.

The consumer assigns itself every partition of the topic directly (``consumer.assign``); it
joins no consumer group. Offsets are never committed and every assignment seeks to the newest
anyway, so group membership bought nothing but a rebalance wait: a consumer restarted after its
process died had to wait for the dead member's session to expire before it read prices again.
``client_id`` names the consumer to the broker; no group coordinator is contacted.

With ``start_from="latest"`` a partition starts at its newest message (re-read, so the newest
price is delivered at once); with ``"earliest"`` at its beginning. A partition already read
continues where it was, across reassignments and consumer rebuilds. The topic's partitions
are read from fresh metadata every ``partition_check_s``: a topic that does not exist yet is
created (after :data:`CREATE_TOPIC_AFTER_S` without partitions), new partitions are assigned,
and a partition whose end offset fell below the read position (the embedded broker forgets
every topic on restart, and trims the market topic by creating it again: the recreated topic
starts again at 0) is positioned again as soon as a fetch reports the new end. A record
batch the Kafka client cannot decode (corrupt, or not in the codec it names) is stepped
over and counted (``dropped["undecodable"]``): the client stays at it, so every poll, and a
rebuilt consumer's, would fail on it for ever. So is a batch of no records, which the client
reads nothing of without failing (:class:`StallWatch`, within :data:`MARKET_STALL_AFTER_S`,
to the partition's newest record). Any other consumer failure rebuilds the
consumer after a backoff (:data:`REBUILD_BACKOFF_S`, doubling up to
:data:`MAX_REBUILD_BACKOFF_S`).

The default ``fetch_max_wait_ms`` holds while records flow. The embedded broker answers a
fetch that finds nothing when its wait is over, so that wait sets how many fetches a second a
market moving a few times a second costs the feed actor and the broker: 20 ms reads ticks about
as soon as 5 ms with a quarter of the fetches, and waits below 5 ms caused stalls in ``shardex
bench feed`` (README, performance). Once none came for ``idle_after_s`` the consumer asks for
``idle_fetch_max_wait_ms`` instead (:class:`FetchWait`): ten fetches a second while the feed is
idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CorruptRecordException, KafkaError, UnsupportedCodecError

from engine.market import Tick
from feed.broker import ensure_topic
from feed.clients import stop_client
from feed.pipeline import TickPipeline
from feed.settings import MARKET_TOPIC

log = logging.getLogger(__name__)

CREATE_TOPIC_AFTER_S = 3.0  # without partitions this long, the topic is created (again)
REBUILD_BACKOFF_S = 0.2  # the first wait before a failed consumer is rebuilt
MAX_REBUILD_BACKOFF_S = 5.0  # the longest wait between rebuilds of a consumer that keeps failing
IDLE_SLEEP_S = 0.1  # the pause between rounds while no partition is assigned
POLL_TIMEOUT_MS = 100  # the longest a poll waits for records
POSITION_WAIT_S = 0.01  # a partition's position is known at once unless it is being reset
# How long a partition is read on its own to find the one a poll could not decode: its
# records are on the broker, so a fetch answers at once; one that comes later is tried again
PROBE_TIMEOUT_MS = 1000

# How long a partition may stay at one position, its end beyond it, before it is taken for
# one the client reads no further (:class:`StallWatch`); the fetches in between are many.
# The account stream's reader waits longer: the events it passes over come from the ledger's
# checks instead, seconds late.
STALL_AFTER_S = 2.0
MARKET_STALL_AFTER_S = 0.5  # each empty batch holds its partition's prices back this long

ShardCall = Callable[[str, list[Tick]], Awaitable[None]]


@dataclass
class FetchWait:
    """How long a fetch may wait at the broker for records (Kafka's ``fetch_max_wait_ms``):
    ``busy_ms`` while records flow, ``idle_ms`` once none came for ``idle_after_s``.

    A fetch that finds nothing is answered when its wait is over, so the wait sets how many
    empty fetches an idle consumer makes (and the broker answers) per second. It is also how
    late the first record after a pause may be read: the embedded broker (Tansu) does not
    answer a waiting fetch as soon as records arrive. Short while the market moves, long
    while it does not.
    """

    busy_ms: int
    idle_ms: int
    idle_after_s: float
    last_record_s: float | None = None  # monotonic seconds of the last poll with records

    def next_ms(self, now_s: float, records: int) -> int:
        """The wait for the next fetch after a poll at ``now_s`` that read ``records``; the
        first poll counts as one with records (a consumer starts busy)."""
        if records or self.last_record_s is None:
            self.last_record_s = now_s
        return self.busy_ms if now_s - self.last_record_s < self.idle_after_s else self.idle_ms


def _now_us() -> int:
    return time.time_ns() // 1000


def _always(shard: str) -> bool:
    return True


def undecodable(exc: BaseException) -> bool:
    """True when ``exc``, raised by a poll, is a record batch the client cannot read: corrupt,
    compressed with a codec it lacks, or one whose decompression failed (gzip, ...: not a
    KafkaError; the client's own failures are)."""
    return isinstance(exc, CorruptRecordException | UnsupportedCodecError) or (
        isinstance(exc, Exception) and not isinstance(exc, KafkaError))


async def position_of(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """``tp``'s position, or None while it is being reset."""
    try:
        async with asyncio.timeout(POSITION_WAIT_S):
            return await consumer.position(tp)
    except (TimeoutError, KafkaError):
        return None


class UnreadableBatch(Exception):
    """A partition's client reads nothing at its position though the partition's end lies
    beyond it, and raises nothing (:class:`StallWatch`)."""


@dataclass(eq=False)
class StallWatch:
    """Finds the partitions a client reads no further without failing: a record batch of no
    records (anyone can produce one) is stored by the embedded broker, which answers a fetch
    at its offset with nothing, so the client stays there, and every record after it (the
    newest prices of the partition's assets) would be read only after a restart.

    A partition is stalled once it stayed at one position for ``after_s`` while its end (the
    high watermark of the client's last fetch) lay beyond it and no poll read from it."""

    after_s: float = STALL_AFTER_S

    def __post_init__(self) -> None:
        self._since: dict[TopicPartition, tuple[int, float]] = {}  # position, first seen
        self._check_at = 0.0

    async def stalled(self, consumer: AIOKafkaConsumer, read: Mapping[TopicPartition, Any]
                      ) -> list[tuple[TopicPartition, int, int]]:
        """(partition, position, end) of each stalled one, after a poll that read ``read``;
        looks at most twice per ``after_s``."""
        now = time.monotonic()
        if now < self._check_at:  # (a partition read from since moved: seen anew at a check)
            return []
        self._check_at = now + self.after_s / 2
        found = []
        for tp in consumer.assignment():
            end = consumer.highwater(tp)
            at = None if tp in read or end is None else await position_of(consumer, tp)
            if at is None or end is None or at >= end:
                self._since.pop(tp, None)
                continue
            seen = self._since.get(tp)
            if seen is None or seen[0] != at:
                self._since[tp] = (at, now)
            elif now - seen[1] >= self.after_s:
                del self._since[tp]
                found.append((tp, at, end))
        return found


async def read_records(
        consumer: AIOKafkaConsumer, timeout_ms: int, max_records: int,
        delivered: Mapping[TopicPartition, int],
        step_past: Callable[[TopicPartition, int | None, int | None, BaseException], None],
        stalls: StallWatch,
) -> dict[TopicPartition, list[Any]]:
    """``consumer.getmany(timeout_ms=..., max_records=...)``, also when it fails on a record
    batch the client cannot decode (:func:`undecodable`). The client stays at such a batch, so
    every read (and a rebuilt consumer's, from the same offset) would fail on it for ever:
    every partition goes back to its ``delivered`` offset (the failed read may have taken
    other partitions' records, which went with it), then each with records left is read on
    its own; for one that fails so, ``step_past(tp, stopped, end, exc)`` (where the client
    stopped: the bad batch's first offset, and the partition's end, either None when
    unknown) moves it past the batch. So does a partition ``stalls`` finds read no further
    (``exc`` an :class:`UnreadableBatch`). Returns the records read."""
    try:
        read = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
    except Exception as exc:
        if not undecodable(exc):
            raise
    else:
        for tp, at, end in await stalls.stalled(consumer, read):
            step_past(tp, at, end, UnreadableBatch(
                f"no record read at offset {at} for {stalls.after_s:g} s, the end at {end}"))
        return read
    for tp in consumer.assignment():
        if tp in delivered:
            consumer.seek(tp, delivered[tp])
    batch: dict[TopicPartition, list[Any]] = {}
    for tp in sorted(consumer.assignment()):
        hw = consumer.highwater(tp)
        position = await position_of(consumer, tp)
        if hw is None or position is None or position >= hw:
            continue
        try:
            batch.update(await consumer.getmany(tp, timeout_ms=PROBE_TIMEOUT_MS,
                                                max_records=max_records))
        except Exception as exc:
            if not undecodable(exc):
                raise
            step_past(tp, await position_of(consumer, tp), consumer.highwater(tp), exc)
    return batch


async def recreated_partitions(consumer: AIOKafkaConsumer) -> dict[TopicPartition, int]:
    """The assigned partitions whose end fell below ``consumer``'s position (their topic was
    created again), with that end: the high watermark of the last fetch response (ListOffsets
    answers can lag behind what a fetch already returned, so they would see false ones)."""
    behind: dict[TopicPartition, int] = {}
    for tp in consumer.assignment():
        hw = consumer.highwater(tp)
        if hw is None:
            continue
        # The consumer's own position, not the last offset read: a seek made while the topic
        # was being recreated was seen undone (a reassignment positioned from a stale
        # ListOffsets answer), leaving the partition waiting past its new end.
        position = await position_of(consumer, tp)
        if position is None:  # being reset: its next fetch tells
            continue
        if hw < position:
            behind[tp] = hw
    return behind


@dataclass(eq=False)
class MarketDataConsumer:
    """Reads ``topic`` on an asyncio loop into ``pipeline`` and calls the shards with ``call``.

    ``bootstrap``: the Kafka bootstrap servers; the topic, when it has to be created, gets one
    partition per asset of ``pipeline.assets``. ``reachable`` (default: every shard) filters
    the shards ready ticks are handed to. ``start_from``: ``"latest"`` or ``"earliest"``;
    ``max_batch``: records per poll at most. ``fetch_max_wait_ms`` while records flow,
    ``idle_fetch_max_wait_ms`` once none came for ``idle_after_s`` (:class:`FetchWait`; equal
    values keep one wait). ``on_accepted`` (optional) is given the ticks of each batch the
    pipeline accepts, in order, before they go to the shards (what builds the candles).

    Counters (read by :meth:`stats`): ``polls`` (polls made), ``batches`` (polls that returned
    records), ``consumer_restarts``, ``topic_recreations``, ``assignments`` (the first
    assignment, then one per change of the partition set), ``repositions`` (partitions
    positioned again because their end fell below the read position), ``undecodable`` (record
    batches stepped over, also ``dropped["undecodable"]`` once there is one), ``last_error`` (text,
    also set by the caller for its own failures), ``first_record_s`` / ``last_record_s``
    (wall-clock seconds of the first and last poll that returned records).
    """

    bootstrap: str
    pipeline: TickPipeline
    call: ShardCall
    _: KW_ONLY
    reachable: Callable[[str], bool] = _always
    topic: str = MARKET_TOPIC
    client_id: str = "shardex-feed"
    start_from: str = "latest"
    max_batch: int = 20_000
    fetch_max_wait_ms: int = 20
    idle_fetch_max_wait_ms: int = 100
    idle_after_s: float = 5.0  # shorter pauses (between bursts of a source) keep the short wait
    partition_check_s: float = 1.0
    retry_s: float = 0.1  # how often the ticks of failed calls are offered again
    on_accepted: Callable[[list[Tick]], object] | None = None

    def __post_init__(self) -> None:
        if self.start_from not in ("latest", "earliest"):
            raise ValueError("start_from must be 'latest' or 'earliest'")
        if self.idle_fetch_max_wait_ms < self.fetch_max_wait_ms:
            raise ValueError("idle_fetch_max_wait_ms must not be below fetch_max_wait_ms")
        self.fetch_wait = FetchWait(self.fetch_max_wait_ms, self.idle_fetch_max_wait_ms,
                                    self.idle_after_s)
        self._fetch_wait_ms = self.fetch_max_wait_ms  # what the current consumer asks for
        self.consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self._retry: asyncio.Task[None] | None = None
        self._assigned = asyncio.Event()
        self._stopping = False
        self._next_offset: dict[TopicPartition, int] = {}
        self.polls = 0
        self.batches = 0
        self.consumer_restarts = 0
        self.topic_recreations = 0
        self.assignments = 0
        self.repositions = 0
        self.undecodable = 0
        self._undecodable_end: dict[TopicPartition, int] = {}  # the end when last skipped
        self._stalls = StallWatch(MARKET_STALL_AFTER_S)
        self.last_error: str | None = None
        self._failing: set[str] = set()  # shards whose last call failed
        self.first_record_s: float | None = None
        self.last_record_s: float | None = None

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True from :meth:`ensure_started` until :meth:`stop` (rebuilds included)."""
        return self._task is not None and not self._task.done()

    def ensure_started(self) -> None:
        """Start consuming in the background unless it is running, or :meth:`stop` stopped it
        (also one under way: an owner may close the shards after it); needs a running loop."""
        if not self.running and not self._stopping:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def start(self, timeout_s: float = 30.0) -> bool:
        """Start consuming, also after :meth:`stop`; True once partitions are assigned (False
        after ``timeout_s``)."""
        self._stopping = False
        self.ensure_started()
        try:
            await asyncio.wait_for(self._assigned.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Stop consuming and close the Kafka consumer. Calls already made run to their end,
        and it returns after them; none starts after (an owner may then close the shards)."""
        self._stopping = True
        tasks = (self._task, self._retry)
        self._task = self._retry = None
        for task in tasks:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._calls:  # a call is not cancelled: its shard may already have taken it
            await asyncio.gather(*self._calls, return_exceptions=True)
        await self._close_consumer()

    async def _close_consumer(self) -> None:
        consumer, self.consumer = self.consumer, None
        self._assigned.clear()
        if consumer is not None:
            await stop_client(consumer)

    async def _open_consumer(self) -> AIOKafkaConsumer:
        with contextlib.suppress(Exception):
            await ensure_topic(self.bootstrap, len(self.pipeline.assets), self.topic,
                               timeout_s=5.0)
        # group_id=None: manual assignment, no group join, no coordinator (see the module doc);
        # "earliest" only applies to an out-of-range position, i.e. a recreated topic, whose
        # messages are all newer than anything read before.
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, client_id=self.client_id,
            auto_offset_reset="earliest", enable_auto_commit=False,
            fetch_max_wait_ms=self.fetch_max_wait_ms, metadata_max_age_ms=2000,
            max_partition_fetch_bytes=4 * 1024 * 1024, request_timeout_ms=10_000,
            retry_backoff_ms=100,
        )
        await consumer.start()
        self.consumer = consumer
        self._fetch_wait_ms = self.fetch_max_wait_ms
        return consumer

    def _set_fetch_wait(self, consumer: AIOKafkaConsumer, wait_ms: int) -> None:
        """Make the consumer's next fetches wait ``wait_ms`` at most for records."""
        if wait_ms == self._fetch_wait_ms:
            return
        # aiokafka (0.14) sets fetch_max_wait_ms once, in the constructor, and has no public
        # way to change it; a new consumer would reconnect and drop the records it fetched
        # ahead. Its Fetcher reads this attribute for every fetch request it builds, so the
        # next fetch waits the new time.
        fetcher = getattr(consumer, "_fetcher", None)
        if fetcher is not None and hasattr(fetcher, "_fetch_max_wait_ms"):
            fetcher._fetch_max_wait_ms = wait_ms
        self._fetch_wait_ms = wait_ms

    # -- assignment and positions ----------------------------------------------------------
    async def _topic_partitions(self, consumer: AIOKafkaConsumer) -> set[TopicPartition]:
        """The topic's partitions from fresh metadata (empty when the topic does not exist)."""
        # aiokafka's public calls read cached metadata (partitions_for_topic) or return only
        # topic names (topics()); the client's fetch_all_metadata is the one fresh answer.
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation that
        # arrives as the answer does, and the loop would go on after its task was cancelled.
        async with asyncio.timeout(10.0):
            cluster = await consumer._client.fetch_all_metadata()
        return {TopicPartition(self.topic, p)
                for p in (cluster.partitions_for_topic(self.topic) or ())}

    async def check_assignment(self, consumer: AIOKafkaConsumer) -> bool:
        """Assign new partitions and position recreated ones; True when any are assigned."""
        partitions = await self._topic_partitions(consumer)
        if not partitions:
            return bool(consumer.assignment())
        current = set(consumer.assignment())
        if partitions != current:
            # assign() replaces the whole assignment and forgets every position: partitions
            # already read (by this consumer or the one it rebuilt) continue where they were,
            # new ones start at the newest
            consumer.assign(sorted(partitions))
            self.assignments += 1
            for tp in set(self._next_offset) - partitions:
                del self._next_offset[tp]
            for tp in partitions:
                if tp in self._next_offset:
                    consumer.seek(tp, self._next_offset[tp])
            await self.position(sorted(tp for tp in partitions if tp not in self._next_offset))
        else:
            await self.reposition_recreated(consumer)
        self._assigned.set()
        return True

    async def reposition_recreated(self, consumer: AIOKafkaConsumer) -> int:
        """Read again every partition whose end fell below the consumer's position (its topic
        was created again: the embedded broker restarted, or trimmed it), from its newest
        message (``latest``) or its beginning; returns how many."""
        behind = await recreated_partitions(consumer)
        for tp, hw in behind.items():
            # "latest": the newest message, not offset 0: Tansu's high watermark can also lag a
            # few records behind those the same fetch returned, and reading a partition again
            # from 0 for that would be thousands of stale ticks; from hw - 1 it is a few, dropped
            # as out of order. A seek, not seek_to_beginning: that lazy reset was seen lost when
            # it raced the topic's recreation.
            self.repositions += 1
            self._undecodable_end.pop(tp, None)
            self._seek(consumer, tp, 0 if self.start_from == "earliest" else max(0, hw - 1))
        return len(behind)

    async def position(self, partitions: list[TopicPartition]) -> None:
        """Seek ``partitions`` to their newest message (``latest``) or their beginning."""
        consumer = self.consumer
        if consumer is None or not partitions:
            return
        begins = await consumer.beginning_offsets(partitions)
        ends = {} if self.start_from == "earliest" else await consumer.end_offsets(partitions)
        for tp in partitions:
            self._seek(consumer, tp, max(begins.get(tp, 0), ends.get(tp, 0) - 1))
        self._assigned.set()

    def _seek(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` on from ``offset``, also after a rebuild or a failed poll."""
        self._next_offset[tp] = offset
        consumer.seek(tp, offset)

    # -- the consume loop ------------------------------------------------------------------
    async def _run(self) -> None:
        backoff_s = REBUILD_BACKOFF_S
        while not self._stopping:
            try:
                consumer = await self._open_consumer()
                backoff_s = REBUILD_BACKOFF_S
                await self._consume(consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("feed consumer: failed (%s); rebuilding in %.1f s",
                            self.last_error, backoff_s)
            await self._close_consumer()
            if self._stopping:
                return
            self.consumer_restarts += 1
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, MAX_REBUILD_BACKOFF_S)

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        unassigned_since = time.monotonic()
        check_at = 0.0
        while not self._stopping:
            if time.monotonic() >= check_at:
                check_at = time.monotonic() + self.partition_check_s
                try:
                    assigned = await self.check_assignment(consumer)
                except (KafkaError, TimeoutError) as exc:
                    # broker unreachable for now: keep the consumer (it reconnects by itself)
                    # and keep fetching what is assigned; check again next round
                    self.last_error = f"partition check: {type(exc).__name__}: {exc}"
                    assigned = bool(consumer.assignment())
                if assigned:
                    unassigned_since = time.monotonic()
                elif time.monotonic() - unassigned_since > CREATE_TOPIC_AFTER_S:
                    # The topic does not exist (yet, or any more: the embedded broker forgets
                    # topics on restart), and nobody may be producing yet.
                    unassigned_since = time.monotonic()
                    with contextlib.suppress(Exception):
                        if await ensure_topic(self.bootstrap, len(self.pipeline.assets),
                                              self.topic, 5.0):
                            self.topic_recreations += 1
                    check_at = time.monotonic()
            if not consumer.assignment():
                self.pump()
                await asyncio.sleep(IDLE_SLEEP_S)
                continue
            await self.poll(consumer)

    async def poll(self, consumer: AIOKafkaConsumer) -> int:
        """Read one batch into the pipeline and start the calls it allows; the records read."""
        batch = await read_records(consumer, POLL_TIMEOUT_MS, self.max_batch, self._next_offset,
                                   functools.partial(self._step_past, consumer), self._stalls)
        self.polls += 1
        read = 0
        if batch:
            self.batches += 1
            now_s = time.time()
            if self.first_record_s is None:
                self.first_record_s = now_s
            self.last_record_s = now_s
            for tp, records in batch.items():
                self._next_offset[tp] = records[-1].offset + 1
                read += len(records)
            accepted = self.pipeline.ingest(batch.values(), _now_us())
            if accepted and self.on_accepted is not None:
                self.on_accepted(accepted)
        # set before this task next yields, which is when the fetcher builds its next request
        self._set_fetch_wait(consumer, self.fetch_wait.next_ms(time.monotonic(), read))
        self.pump()
        # Tansu answers a fetch past the end of a recreated partition with no records and no
        # error: without this, reading it would resume only at the next partition check
        await self.reposition_recreated(consumer)
        return read

    def _step_past(self, consumer: AIOKafkaConsumer, tp: TopicPartition, stopped: int | None,
                   hw: int | None, exc: BaseException) -> None:
        """Move ``tp`` past the batch it cannot read at ``stopped`` to its newest record
        (:func:`read_records`; to its end if that batch holds the newest), counting
        the batch in ``undecodable``."""
        if stopped is None or hw is None:
            return
        # a batch holding the newest record fails again at hw - 1: counted once
        if stopped >= self._undecodable_end.get(tp, 0):
            self.undecodable += 1
        self._undecodable_end[tp] = hw
        self.last_error = f"undecodable records at {tp.topic}[{tp.partition}] " \
            f"offset {stopped}: {exc!r}"
        log.warning("feed consumer: %s; skipped", self.last_error)
        self._seek(consumer, tp, max(stopped + 1, hw - 1))  # where a rebuild resumes

    # -- the shard calls -------------------------------------------------------------------
    def pump(self) -> None:
        """Start every call the in-flight bound allows, for the shards ``reachable`` accepts."""
        fanout = self.pipeline.fanout
        if self._stopping or not fanout.pending_count():
            return
        reachable = [name for name in fanout.shards
                     if fanout.pending[name] and self.reachable(name)]
        for name, ticks in self.pipeline.take_ready(reachable):
            task = asyncio.get_running_loop().create_task(self._deliver(name, ticks))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _deliver(self, shard: str, ticks: list[Tick]) -> None:
        ok = False
        try:
            await self.call(shard, ticks)
            ok = True
        except Exception as exc:  # a dead or failing shard: its ticks stay pending
            self.last_error = f"shard {shard}: {type(exc).__name__}: {exc}"
            if shard not in self._failing:  # once per outage: a restart fails ~10 rounds
                self._failing.add(shard)
                log.warning("feed consumer: %s (its ticks wait)", self.last_error)
            if self._retry is None or self._retry.done():
                self._retry = asyncio.get_running_loop().create_task(self._retry_failed())
        finally:
            self.pipeline.done(shard, ticks, ok)
        if ok:  # after a failure the next round retries, not this call at once
            if shard in self._failing:
                self._failing.discard(shard)
                log.warning("feed consumer: shard %s takes ticks again", shard)
            self.pump()

    async def _retry_failed(self) -> None:
        """Offer pending ticks again every ``retry_s`` while a shard's last call failed. The
        consume loop pumps only between polls, and a broker that is away keeps it in failing
        polls and consumer rebuilds (backing off up to :data:`MAX_REBUILD_BACKOFF_S`), where
        the tick that crossed a liquidation would wait for the broker to reach its shard."""
        while self._failing and not self._stopping:
            await asyncio.sleep(self.retry_s)
            self.pump()

    # -- what others read ------------------------------------------------------------------
    @property
    def assigned(self) -> bool:
        """True while the Kafka consumer has partitions assigned."""
        return self.consumer is not None and bool(self.consumer.assignment())

    def lag(self) -> int | None:
        """Messages on the broker not yet read, over the assigned partitions (None: unknown)."""
        consumer = self.consumer
        if consumer is None:
            return None
        total = 0
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            nxt = self._next_offset.get(tp)
            if high is None or nxt is None:
                continue
            total += max(0, high - nxt)
        return total

    def prices(self) -> dict[str, dict[str, Any]]:
        """``{asset: {"bid", "ask", "ts_us", "seq", "source"}}`` of the last delivered ticks."""
        return self.pipeline.prices()

    def stats(self) -> dict[str, Any]:
        """The pipeline's counters (``dropped`` by reason, ...) and the consumer's."""
        stats = self.pipeline.stats(_now_us())
        if self.undecodable:  # a reason of the consumer's, shown once it happened
            stats["dropped"]["undecodable"] = self.undecodable
            stats["dropped_total"] += self.undecodable
        return {
            **stats,
            "polls": self.polls,
            "batches": self.batches,
            "lag": self.lag(),
            "fetch_wait_ms": self._fetch_wait_ms,
            "assigned": self.assigned,
            "consumer_restarts": self.consumer_restarts,
            "topic_recreations": self.topic_recreations,
            "assignments": self.assignments,
            "repositions": self.repositions,
            "last_error": self.last_error,
            "first_record_s": self.first_record_s,
            "last_record_s": self.last_record_s,
            "bootstrap": self.bootstrap,
            "topic": self.topic,
        }
