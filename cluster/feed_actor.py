"""The feed actor: a Ray shell that reads the market data topic and calls the shards.

Create it with Ray (shards are looked up by their actor name, ``ShardSpec.name``, in
``namespace``; or pass ``shard_handles={name: handle}``)::

    feed = FeedActor.options(name="feed", namespace="shardex").remote(
        settings, bootstrap, namespace="shardex")
    ray.get(feed.start.remote())          # returns once partitions are assigned
    ray.get(feed.stats.remote())          # counters, drops by reason, lag, tick ages, prices

What happens to the records it reads (decoding, bounds, conflation, the order and jump gate,
the per-shard fan-out, drop counting) is ``feed.pipeline.TickPipeline``, free of Ray and
Kafka; this module owns the Kafka consumer and the Ray calls.

Every shard host receives one ``execute`` call of ``ApplyTick`` commands (engine.shard_machine)
carrying the newest tick of each of its assets; at most ``max_in_flight_per_shard`` calls are
outstanding per shard, and while they are, newer ticks replace older pending ones (so a slow
shard costs bounded memory and only superseded ticks are ever skipped). A shard that is missing
or dead keeps its newest pending ticks and is looked up again every ``lookup_retry_s``.

The actor assigns itself every partition of the topic directly (``consumer.assign``); it joins
no consumer group. Offsets are never committed and every assignment seeks to the newest anyway,
so group membership bought nothing but a rebalance wait: an actor restarted after its process
died (Ray ``max_restarts``) had to wait for the dead member's session to expire, 24-127 s
without prices. ``group_id`` (default ``CONSUMER_GROUP``) is used for identification only, as
the Kafka ``client_id``; no group coordinator is contacted.

Consumption starts from the newest offsets on every assignment (the last message of each
partition is re-read so the newest price is delivered at once). The topic's partitions are
read from fresh metadata every ``partition_check_s``: a topic that does not exist yet is
created (after 3 s without partitions), new partitions are assigned, and a partition whose end
offset fell below the read position (the embedded broker forgets every topic on restart, and
the recreated topic starts again at 0) is positioned again; any consumer failure rebuilds the
consumer after a backoff.

``fetch_max_wait_ms`` stays at 5: Tansu holds an empty fetch that long, and shorter waits
caused second-long stalls in ``shardex bench feed`` (README, performance).

:data:`FeedSource` is the market data source as a Ray actor, for a launcher that wants the
source inside the cluster rather than in its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import ray
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from cluster.actor_names import LEDGER
from cluster.actors.port import RayPort
from cluster.config import CONSUMER_GROUP, MARKET_TOPIC, Settings
from cluster.trading.courier import Courier
from cluster.trading.placement import Layout
from engine.market import Tick
from engine.shard_machine import ApplyTick
from feed.broker import ensure_topic
from feed.pipeline import TickPipeline

log = logging.getLogger(__name__)


def _now_us() -> int:
    return time.time_ns() // 1000


class FeedActorCore:
    """The Kafka consumer and the shard calls around a :class:`feed.pipeline.TickPipeline`, on
    an asyncio loop; :class:`FeedActor` is its Ray shell.

    Its only Ray calls are the shard lookup (``_lookup``) and the shard call (``_call``); a
    call whose ticks closed positions hands that shard's settlements to the ledger through the
    courier (cluster.trading.courier), retried every ``lookup_retry_s`` while it fails.
    """

    def __init__(self, settings: Settings, bootstrap: str | None = None, *,
                 namespace: str | None = None, shard_handles: Mapping[str, Any] | None = None,
                 topic: str = MARKET_TOPIC, group_id: str = CONSUMER_GROUP,
                 max_in_flight_per_shard: int = 1, start_from: str = "latest",
                 max_batch: int = 20_000, fetch_max_wait_ms: int = 5,
                 lookup_retry_s: float = 1.0, partition_check_s: float = 1.0) -> None:
        if start_from not in ("latest", "earliest"):
            raise ValueError("start_from must be 'latest' or 'earliest'")
        self.settings = settings
        self.assets = settings.assets
        self.bootstrap = bootstrap or settings.bootstrap_servers
        self.namespace = namespace
        self.topic = topic
        self.group_id = group_id
        self.start_from = start_from
        self.max_batch = max_batch
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.lookup_retry_s = lookup_retry_s
        self.partition_check_s = partition_check_s
        routes = {a.name: [s.name for s in Layout(settings).of_asset(a.name)]
                  for a in self.assets.assets}
        self.pipeline = TickPipeline(self.assets, routes, settings.feed.bounds,
                                     max_in_flight_per_shard)
        self.handles: dict[str, Any] = dict(shard_handles or {})
        self._fixed_handles = shard_handles is not None
        self._lookup_after: dict[str, float] = {}
        self.consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self._courier: Courier | None = None
        self._undelivered: set[str] = set()
        self._retry: asyncio.Task[None] | None = None
        self.ticks_refused = 0  # ticks a shard refused (out of its bounds): dropped, counted
        self.deliveries_failed = 0
        self._assigned = asyncio.Event()
        self._stopping = False
        self._next_offset: dict[TopicPartition, int] = {}
        self.consumer_restarts = 0
        self.polls = 0  # getmany calls
        self.batches = 0  # getmany calls that returned records
        self.topic_recreations = 0
        self.assignments = 0  # assign() calls: the first, then partition set changes
        self.repositions = 0  # partitions sought again because their end fell below our position
        self.last_error: str | None = None
        self.first_record_s: float | None = None
        self.last_record_s: float | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def start(self, timeout_s: float = 30.0) -> bool:
        """Start consuming; True once partitions are assigned (False after ``timeout_s``)."""
        self.ensure_started()
        try:
            await asyncio.wait_for(self._assigned.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._close_consumer()

    async def _close_consumer(self) -> None:
        consumer, self.consumer = self.consumer, None
        self._assigned.clear()
        if consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 10.0)

    async def _open_consumer(self) -> AIOKafkaConsumer:
        with contextlib.suppress(Exception):
            await ensure_topic(self.bootstrap, len(self.assets), self.topic, timeout_s=5.0)
        # group_id=None: manual assignment, no group join, no coordinator (see the module doc);
        # "earliest" only applies to an out-of-range position, i.e. a recreated topic, whose
        # messages are all newer than anything read before.
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, client_id=self.group_id,
            auto_offset_reset="earliest", enable_auto_commit=False,
            fetch_max_wait_ms=self.fetch_max_wait_ms, metadata_max_age_ms=2000,
            max_partition_fetch_bytes=4 * 1024 * 1024, request_timeout_ms=10_000,
            retry_backoff_ms=100,
        )
        await consumer.start()
        self.consumer = consumer
        return consumer

    async def _topic_partitions(self, consumer: AIOKafkaConsumer) -> set[TopicPartition]:
        """The topic's partitions from fresh metadata (empty when the topic does not exist)."""
        # aiokafka's public calls read cached metadata (partitions_for_topic) or return only
        # topic names (topics()); the client's fetch_all_metadata is the one fresh answer
        cluster = await asyncio.wait_for(consumer._client.fetch_all_metadata(), 10.0)
        return {TopicPartition(self.topic, p)
                for p in (cluster.partitions_for_topic(self.topic) or ())}

    async def _check_assignment(self, consumer: AIOKafkaConsumer) -> bool:
        """Assign new partitions and re-position recreated ones; True when any are assigned."""
        partitions = await self._topic_partitions(consumer)
        if not partitions:
            return bool(consumer.assignment())
        current = set(consumer.assignment())
        if partitions != current:
            # assign() replaces the whole assignment and forgets every position: partitions
            # already read continue where they were, new ones start at the newest
            consumer.assign(sorted(partitions))
            self.assignments += 1
            for tp in current - partitions:
                self._next_offset.pop(tp, None)
            for tp in partitions & current:
                if tp in self._next_offset:
                    consumer.seek(tp, self._next_offset[tp])
            await self.position(sorted(tp for tp in partitions if tp not in self._next_offset))
        else:
            # the high watermark of the last fetch response (ListOffsets answers can lag behind
            # what a fetch already returned, so they would trigger false re-reads)
            behind = [tp for tp in partitions
                      if (hw := consumer.highwater(tp)) is not None
                      and hw < self._next_offset.get(tp, 0)]
            if behind:
                self.repositions += len(behind)
                for tp in behind:
                    self._next_offset.pop(tp, None)
                await self.position(behind)
        self._assigned.set()
        return True

    async def position(self, partitions: list[TopicPartition]) -> None:
        """Seek ``partitions`` to their newest message (``latest``) or their beginning."""
        consumer = self.consumer
        if consumer is None or not partitions:
            return
        if self.start_from == "earliest":
            await consumer.seek_to_beginning(*partitions)
        else:
            ends = await consumer.end_offsets(partitions)
            begins = await consumer.beginning_offsets(partitions)
            for tp in partitions:
                consumer.seek(tp, max(begins.get(tp, 0), ends.get(tp, 0) - 1))
        self._assigned.set()

    # -- the consume loop ------------------------------------------------------------------
    async def _run(self) -> None:
        backoff_s = 0.2
        while not self._stopping:
            try:
                consumer = await self._open_consumer()
                backoff_s = 0.2
                await self._consume(consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("feed actor: consumer failed (%s); rebuilding in %.1f s",
                            self.last_error, backoff_s)
            await self._close_consumer()
            if self._stopping:
                return
            self.consumer_restarts += 1
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        unassigned_since = time.monotonic()
        check_at = 0.0
        while not self._stopping:
            if time.monotonic() >= check_at:
                check_at = time.monotonic() + self.partition_check_s
                try:
                    assigned = await self._check_assignment(consumer)
                except (KafkaError, TimeoutError) as exc:
                    # broker unreachable for now: keep the consumer (it reconnects by itself)
                    # and keep fetching what is assigned; check again next round
                    self.last_error = f"partition check: {type(exc).__name__}: {exc}"
                    assigned = bool(consumer.assignment())
                if assigned:
                    unassigned_since = time.monotonic()
                elif time.monotonic() - unassigned_since > 3.0:
                    # The topic does not exist (yet, or any more: the embedded broker forgets
                    # topics on restart), and nobody may be producing yet.
                    unassigned_since = time.monotonic()
                    with contextlib.suppress(Exception):
                        if await ensure_topic(self.bootstrap, len(self.assets), self.topic, 5.0):
                            self.topic_recreations += 1
                    check_at = time.monotonic()
            if not consumer.assignment():
                self._pump()
                await asyncio.sleep(0.1)
                continue
            batch = await consumer.getmany(timeout_ms=100, max_records=self.max_batch)
            self.polls += 1
            if batch:
                self.batches += 1
                now_s = time.time()
                if self.first_record_s is None:
                    self.first_record_s = now_s
                self.last_record_s = now_s
                for tp, records in batch.items():
                    self._next_offset[tp] = records[-1].offset + 1
                self.pipeline.ingest(batch.values(), _now_us())
            self._pump()

    def _pump(self) -> None:
        """Start every call the in-flight bound allows, for shards whose handle is known."""
        fanout = self.pipeline.fanout
        if not fanout.pending_count():
            return
        for name in fanout.shards:
            if name not in self.handles and fanout.pending[name]:
                self._lookup(name)
        for name, ticks in self.pipeline.take_ready(self.handles):
            task = asyncio.get_running_loop().create_task(self._call(name, ticks))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    def _lookup(self, name: str) -> None:
        if self._fixed_handles or time.monotonic() < self._lookup_after.get(name, 0.0):
            return
        try:
            self.handles[name] = ray.get_actor(name, namespace=self.namespace)
        except ValueError:
            self._lookup_after[name] = time.monotonic() + self.lookup_retry_s

    async def _call(self, name: str, ticks: list[Tick]) -> None:
        ok = False
        try:
            answers = await self.handles[name].execute.remote([ApplyTick(t) for t in ticks])
            ok = True
            self.ticks_refused += sum(1 for a in answers if not isinstance(a, int))
            if any(isinstance(a, int) and a > 0 for a in answers) or name in self._undelivered:
                await self._settle(name)
        except Exception as exc:  # a dead or failing shard: look it up again later
            self.last_error = f"shard {name}: {type(exc).__name__}: {exc}"
            log.warning("feed actor: %s", self.last_error)
            if not self._fixed_handles:
                self.handles.pop(name, None)
                self._lookup_after[name] = time.monotonic() + self.lookup_retry_s
        finally:
            self.pipeline.done(name, ticks, ok)
        self._pump()

    async def _settle(self, name: str) -> None:
        """Deliver shard ``name``'s settlements to the ledger; on failure retry later."""
        try:
            courier = self._courier
            if courier is None:
                ledger = ray.get_actor(LEDGER, namespace=self.namespace)
                courier = self._courier = Courier(RayPort(LEDGER, ledger), {})
            if name not in courier.shards:
                courier.shards[name] = RayPort(name, self.handles[name])
            await courier.deliver(name)
            self._undelivered.discard(name)
        except Exception as exc:  # the ledger is down or recovering: the outbox waits
            self.deliveries_failed += 1
            self.last_error = f"settlements of {name}: {type(exc).__name__}: {exc}"
            self._undelivered.add(name)
            if self._retry is None or self._retry.done():
                self._retry = asyncio.get_running_loop().create_task(self._retry_settle())

    async def _retry_settle(self) -> None:
        while self._undelivered and not self._stopping:
            await asyncio.sleep(self.lookup_retry_s)
            for name in list(self._undelivered):
                if name in self.handles:
                    await self._settle(name)

    def use_shard_handles(self, handles: Mapping[str, Any]) -> None:
        """Call these handles from now on; never look shards up by name again."""
        self.handles.update(handles)
        self._fixed_handles = True

    # -- what others read ------------------------------------------------------------------
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
        return {
            **self.pipeline.stats(_now_us()),
            "polls": self.polls,
            "batches": self.batches,
            "lag": self.lag(),
            "assigned": self.consumer is not None and bool(self.consumer.assignment()),
            "shards_known": sorted(self.handles),
            "consumer_restarts": self.consumer_restarts,
            "topic_recreations": self.topic_recreations,
            "assignments": self.assignments,
            "repositions": self.repositions,
            "ticks_refused_by_shards": self.ticks_refused,
            "settlement_deliveries_failed": self.deliveries_failed,
            "shards_with_undelivered_settlements": sorted(self._undelivered),
            "pid": os.getpid(),
            "last_error": self.last_error,
            "first_record_s": self.first_record_s,
            "last_record_s": self.last_record_s,
            "bootstrap": self.bootstrap,
            "topic": self.topic,
        }


def _renice(nice: int) -> None:
    """Best effort: set this process's nice value (Ray starts workers at nice 15).

    Every price the engine acts on passes through this one actor, so under CPU contention it
    must not be the first process starved; without the privilege to lower the value, keep it.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except (OSError, AttributeError) as exc:
        log.info("feed actor: cannot set nice %d (%s); keeping %d", nice, exc,
                 os.getpriority(os.PRIO_PROCESS, 0))


class FeedActorShell:
    """Ray shell of :class:`FeedActorCore` (same constructor arguments); use :data:`FeedActor`.

    Extra arguments: ``nice`` (default 0) is applied to the actor's process, best effort (see
    :func:`_renice`; ``None`` keeps Ray's nice 15); ``switch_interval_s`` sets the process's GIL
    switch interval (``None`` keeps Python's 5 ms).

    Methods (all async; any of them starts consumption if it is not running, so a restarted
    actor resumes on the first call): ``start(timeout_s=30) -> bool``, ``stats() -> dict``,
    ``prices() -> dict``, ``pid() -> int``, ``stop()``, ``set_shard_handles({name: handle})``.
    """

    def __init__(self, settings: Settings, bootstrap: str | None = None, *,
                 nice: int | None = 0, switch_interval_s: float | None = 0.0005,
                 **kwargs: Any) -> None:
        if nice is not None:
            _renice(nice)
        if switch_interval_s is not None:
            # The asyncio loop shares the GIL with Ray's worker threads; with the default 5 ms
            # switch interval every wake-up of the consume loop can wait that long for it.
            sys.setswitchinterval(switch_interval_s)
        self.core = FeedActorCore(settings, bootstrap, **kwargs)

    async def start(self, timeout_s: float = 30.0) -> bool:
        return await self.core.start(timeout_s)

    async def stats(self) -> dict[str, Any]:
        self.core.ensure_started()
        return self.core.stats()

    async def prices(self) -> dict[str, dict[str, Any]]:
        self.core.ensure_started()
        return self.core.prices()

    async def set_shard_handles(self, handles: Mapping[str, Any]) -> None:
        self.core.use_shard_handles(handles)

    async def pid(self) -> int:
        """The actor's process id (tests kill it to exercise a Ray restart)."""
        self.core.ensure_started()
        return os.getpid()

    async def stop(self) -> None:
        await self.core.stop()


class FeedSourceShell:
    """The market data source (FEED_SOURCE -> Kafka) as a Ray actor; use :data:`FeedSource`.

    ``FeedSource.remote(settings, bootstrap=None, source=None, topic=MARKET_TOPIC)`` (``source``
    overrides ``settings.feed_source``, e.g. ``"sim?rate=50"``). Methods: ``start()`` (returns
    at once, publishing runs in the background), ``stats() -> dict``, ``stop() -> dict`` (the
    final counters).
    The launcher may as well run ``feed.source.run_source`` in its own process instead.
    """

    def __init__(self, settings: Settings, bootstrap: str | None = None,
                 source: str | None = None, *, topic: str = MARKET_TOPIC,
                 nice: int | None = 0) -> None:
        from feed.source import make_source

        if nice is not None:
            _renice(nice)
        self.settings = settings
        self.bootstrap = bootstrap or settings.bootstrap_servers
        self.source = make_source(settings, source)
        self.topic = topic
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[dict[str, Any]] | None = None

    async def start(self) -> None:
        from feed.source import run_source

        if self._task is None or self._task.done():
            self._stop = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                run_source(self.settings, self._stop, bootstrap=self.bootstrap,
                           topic=self.topic, source=self.source))

    async def stats(self) -> dict[str, Any]:
        running = self._task is not None and not self._task.done()
        return {"running": running, "bootstrap": self.bootstrap,
                "source": self.source.name if self.source is not None else "none",
                "source_stats": self.source.stats() if self.source is not None else None}

    async def stop(self) -> dict[str, Any]:
        task, self._task = self._task, None
        if task is None:
            return {}
        if self._stop is not None:
            self._stop.set()
        try:
            return await asyncio.wait_for(task, 15.0)
        except TimeoutError:
            return {"error": "source did not stop within 15 s"}


# The Ray actor class (``FeedActor.remote(...)``, ``FeedActor.options(name=...)``). It asks for
# no CPU slot: it is I/O bound and must not take one of the shards' slots on a small machine.
# Typed Any because Ray's decorator typing does not model actor classes with options.
_ray_remote: Any = ray.remote
FeedActor: Any = _ray_remote(num_cpus=0)(FeedActorShell)
FeedSource: Any = _ray_remote(num_cpus=0)(FeedSourceShell)
