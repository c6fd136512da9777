"""The feed actor: a Ray shell that calls the shards with the ticks ``feed.consumer`` reads.

Create it with Ray (shards are looked up by their actor name, ``ShardSpec.name``, in
``namespace``)::

    feed = FeedActor.options(name="feed", namespace="shardex").remote(
        settings, bootstrap, namespace="shardex")
    ray.get(feed.start.remote())          # returns once partitions are assigned
    ray.get(feed.stats.remote())          # counters, drops by reason, lag, tick ages, prices

Reading the topic (assignment without a consumer group, positioning at the newest, partition
checks, topic recreation, consumer rebuilds, lag) is ``feed.consumer.MarketDataConsumer``, and
what happens to the records it reads (decoding, bounds, conflation, the order and jump gate, the
per-shard fan-out, drop counting) is ``feed.pipeline.TickPipeline``; both are free of Ray. This
module owns the Ray calls: the shard lookup, the shard call and the settlement delivery.

Every shard host receives one ``execute`` call of ``ApplyTick`` commands (engine.shard_machine)
carrying every accepted tick of its assets it has not been sent yet, in order, followed by an
``Outbox`` read; at most ``max_in_flight_per_shard`` calls are outstanding per shard, and while
they are, newer ticks wait (up to ``feed.conflation.MAX_PENDING_PER_ASSET`` an asset: a slow
shard costs bounded memory). A shard that is missing or dead keeps its pending ticks, which
are offered again (and the shard looked up again) every ``lookup_retry_s``, also while the
broker is away. A tick a shard refuses (out of its bounds) is dropped and counted
(``ticks_refused_by_shards``). Settlements the call's answer holds go to the ledger
through the courier (cluster.trading.courier) with one ledger call, their acknowledgement riding
with the shard's next call; a shard whose delivery failed is delivered in full (outbox read,
ledger, acknowledgement) every ``lookup_retry_s`` until it succeeds.

Every shard call leaves a :class:`CallTiming` (when its ticks were read, when the call was sent,
when the shard and then the ledger answered) in a ring of the newest :data:`CALLS_KEPT`, read
with ``call_timings``: the feed's part of ``shardex bench latency``. Keeping it costs three
clock reads and a tuple per call, and one clock read per batch the pipeline accepts.

The ticks the pipeline accepts also build the candles (cluster.live.market.MarketLive, written
to ``candles_dir`` before they are served), read by the API through ``klines`` and, for the
public WebSocket streams, ``live_changes`` (a long poll).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, NamedTuple

import ray

from cluster.actors.names import LEDGER
from cluster.actors.port import RayPort
from cluster.config import CONSUMER_GROUP, MARKET_TOPIC, Settings
from cluster.durability.runner import wall_clock_us
from cluster.live.market import Changes, MarketLive
from cluster.trading.courier import Courier
from cluster.trading.placement import Layout
from engine.candles import Candle, CandleQuery
from engine.market import Tick
from engine.shard_machine import ApplyTick, Outbox, OutboxView
from feed.consumer import MarketDataConsumer
from feed.pipeline import TickPipeline

log = logging.getLogger(__name__)

CALLS_KEPT = 4096  # shard calls whose timings the feed actor keeps (the newest)
READS_KEPT = 4  # read times kept per asset, for the ticks of calls not made yet
# How soon a shard whose call failed is tried again. A call to a restarting host fails at once
# (cluster.actors.deploy), so trying often is cheap, and the first try after the shard is back
# gives it its price: until then it answers opens and closes PRICE_UNAVAILABLE and sweeps
# nothing. At 1 s, a shard that was back waited up to another second for its price.
LOOKUP_RETRY_S = 0.1


class CallTiming(NamedTuple):
    """One tick call to a shard, wall clock in microseconds since the epoch (comparable with
    the hosts' ExecuteTiming; 0 where it did not happen).

    ``shard``; ``ticks``: ``(ts_us, seq, read_us)`` of each tick it carried, ``read_us`` when
    the batch holding it was read and accepted (0: unknown); ``sent_us``: the call was made;
    ``answered_us``: the shard's answer arrived; ``closed``: positions its ticks closed;
    ``settle_us`` / ``settled_us``: the settlement delivery to the ledger that followed began
    and ended.
    """

    shard: str
    ticks: tuple[tuple[int, int, int], ...]
    sent_us: int
    answered_us: int
    closed: int
    settle_us: int
    settled_us: int


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
    """Ray shell of :class:`feed.consumer.MarketDataConsumer`; use :data:`FeedActor`.

    Arguments: ``settings`` (assets, shard layout, feed bounds); ``bootstrap`` (default
    ``settings.feed.bootstrap_servers``); ``namespace``, the Ray namespace the shards and the ledger
    are looked up in; ``topic``; ``group_id``, the Kafka ``client_id`` (identification only: no
    group is joined); ``max_in_flight_per_shard``; ``lookup_retry_s``; ``nice``, applied to the
    actor's process, best effort (see :func:`_renice`; ``None`` keeps Ray's nice 15);
    ``switch_interval_s``, the process's GIL switch interval (``None`` keeps Python's);
    ``candles_dir``, where the candle store lives (None: candles in memory only).
    Other keyword arguments (``start_from``, ``max_batch``, ``fetch_max_wait_ms``,
    ``partition_check_s``) go to :class:`~feed.consumer.MarketDataConsumer`.

    Methods (all async): ``start(timeout_s=30) -> bool``, ``stats() -> dict``,
    ``prices() -> dict``, ``pid() -> int``, ``stop()``, ``klines(asset, interval, query) ->
    [Candle]``, ``live_changes(since, timeout_s) -> Changes``, ``call_timings(since) ->
    (count, [CallTiming])``. These start consumption if it is not running, so a restarted actor
    resumes on the first call; after ``stop`` only ``start`` does.
    """

    def __init__(self, settings: Settings, bootstrap: str | None = None, *,
                 namespace: str | None = None,
                 topic: str = MARKET_TOPIC, group_id: str = CONSUMER_GROUP,
                 max_in_flight_per_shard: int = 1, lookup_retry_s: float = LOOKUP_RETRY_S,
                 nice: int | None = 0, switch_interval_s: float | None = 0.0005,
                 candles_dir: str | None = None, **consumer_options: Any) -> None:
        if nice is not None:
            _renice(nice)
        if switch_interval_s is not None:
            # The asyncio loop shares the GIL with Ray's worker threads; with Python's default
            # switch interval every wake-up of the consume loop can wait that long for it.
            sys.setswitchinterval(switch_interval_s)
        self.namespace = namespace
        self.lookup_retry_s = lookup_retry_s
        self.handles: dict[str, Any] = {}
        self._lookup_after: dict[str, float] = {}
        self._ports: dict[str, RayPort] = {}  # over the current handles, shared with the courier
        self._courier: Courier | None = None
        self._undelivered: set[str] = set()
        self._retry: asyncio.Task[None] | None = None
        self.ticks_refused = 0  # ticks a shard refused (out of its bounds): dropped, counted
        self.deliveries_failed = 0
        self._timings: deque[CallTiming] = deque(maxlen=CALLS_KEPT)
        self._timed = 0  # calls timed since the start (the ring keeps the newest)
        # (tick, read_us) of the newest ticks accepted, per asset: a call finds its ticks' here
        self._reads: dict[str, deque[tuple[Tick, int]]] = {
            a.name: deque(maxlen=READS_KEPT) for a in settings.assets.assets}
        routes = {a.name: [s.name for s in Layout(settings).of_asset(a.name)]
                  for a in settings.assets.assets}
        pipeline = TickPipeline(settings.assets, routes, settings.feed.bounds,
                                max_in_flight_per_shard)
        # a candle is final once no tick of its interval can be accepted any more
        self.market = MarketLive(settings.assets,
                                 None if candles_dir is None else Path(candles_dir),
                                 late_s=settings.max_price_age_s,
                                 held=lambda: tuple(pipeline.gate.held.values()))
        self.consumer = MarketDataConsumer(
            bootstrap or settings.feed.bootstrap_servers, pipeline, self._call,
            reachable=self._reachable, topic=topic, client_id=group_id,
            on_accepted=self._accepted, **{"retry_s": lookup_retry_s, **consumer_options})

    # -- the actor's methods ---------------------------------------------------------------
    async def start(self, timeout_s: float = 30.0) -> bool:
        """Start consuming; True once partitions are assigned (False after ``timeout_s``)."""
        return await self.consumer.start(timeout_s)

    async def stats(self) -> dict[str, Any]:
        """The consumer's and the pipeline's counters, and the shard calls' own."""
        self.consumer.ensure_started()
        return {
            **self.consumer.stats(),
            **self.market.stats(),
            "shards_known": sorted(self.handles),
            "ticks_refused_by_shards": self.ticks_refused,
            "settlement_deliveries_failed": self.deliveries_failed,
            "shards_with_undelivered_settlements": sorted(self._undelivered),
            "pid": os.getpid(),
        }

    async def prices(self) -> dict[str, dict[str, Any]]:
        """``{asset: {"bid", "ask", "ts_us", "seq", "source"}}`` of the last delivered ticks."""
        self.consumer.ensure_started()
        return self.consumer.prices()

    async def klines(self, asset: str, interval: str, query: CandleQuery) -> list[Candle]:
        """The candles ``query`` selects (cluster.live.market.MarketLive.candles)."""
        self.consumer.ensure_started()
        return self.market.candles(asset, interval, query)

    async def live_changes(self, since: int, timeout_s: float) -> Changes:
        """What changed after version ``since``, once something did or after ``timeout_s``
        (cluster.live.market.MarketLive.wait). A restarted actor counts versions from 0 again:
        a reader that is ahead gets everything."""
        self.consumer.ensure_started()
        if since > self.market.version:
            since = 0
        return await self.market.wait(since, timeout_s)

    async def call_timings(self, since: int = 0) -> tuple[int, list[CallTiming]]:
        """``(count, timings)``: how many shard calls were timed so far, and the timings of
        those after the first ``since`` (a count an earlier call returned), oldest first; only
        the newest :data:`CALLS_KEPT` are kept."""
        self.consumer.ensure_started()
        count, kept = self._timed, len(self._timings)
        newer = min(kept, max(0, count - since))
        return count, list(itertools.islice(self._timings, kept - newer, kept))

    async def pid(self) -> int:
        """The actor's process id (tests kill it to exercise a Ray restart)."""
        self.consumer.ensure_started()
        return os.getpid()

    async def stop(self) -> None:
        """Stop consuming: the shard calls under way end first, and no shard or ledger call
        follows (the settlement retries end too), so the shards may be closed after it; then
        close the candle store. No other method's call consumes again, also one that came
        while it ran (Ray runs them concurrently); :meth:`start` does."""
        await self.consumer.stop()
        # not cancelled (a call it made may already be on its way): it ends by itself once
        # the consumer is not running
        retry, self._retry = self._retry, None
        if retry is not None:
            with contextlib.suppress(Exception):
                await retry
        self.market.close()

    # -- the Ray calls ---------------------------------------------------------------------
    def _accepted(self, ticks: list[Tick]) -> None:
        """The ticks of a batch the pipeline accepted: note when they were read, build the
        candles."""
        read_us = wall_clock_us()
        for tick in ticks:
            reads = self._reads.get(tick.asset)
            if reads is not None:
                reads.append((tick, read_us))
        self.market.apply(ticks)

    def _read_us(self, tick: Tick) -> int:
        for seen, read_us in reversed(self._reads.get(tick.asset, ())):
            if seen is tick:
                return read_us
        return 0

    def _reachable(self, name: str) -> bool:
        """True when shard ``name``'s handle is known, looking it up by name at most every
        ``lookup_retry_s``."""
        if name in self.handles:
            return True
        if time.monotonic() < self._lookup_after.get(name, 0.0):
            return False
        try:
            self.handles[name] = ray.get_actor(name, namespace=self.namespace)
        except ValueError:
            self._lookup_after[name] = time.monotonic() + self.lookup_retry_s
            return False
        return True

    def _port(self, name: str) -> RayPort:
        """The port of shard ``name`` over its current handle (a new one after a lookup)."""
        port = self._ports.get(name)
        if port is None or port.handle is not self.handles[name]:
            # no timeout: the tick call waits as long as the shard takes (a tick resent after
            # a timeout could apply after a newer one)
            port = self._ports[name] = RayPort(name, self.handles[name], timeout_s=None)
        return port

    async def _call(self, name: str, ticks: list[Tick]) -> None:
        """Apply ``ticks`` on shard ``name`` (refusals are counted) and deliver the settlements
        they made; raises when the shard is down."""
        undelivered = name in self._undelivered
        commands: list[object] = [ApplyTick(t) for t in ticks]
        if not undelivered:  # the settlements come back with the ticks' answers
            commands.append(Outbox())
        stamps = tuple((t.ts_us, t.seq, self._read_us(t)) for t in ticks)
        sent_us = wall_clock_us()
        try:
            answers = await self._port(name).send(commands)
        except Exception:  # a dead or failing shard: look it up again later
            self.handles.pop(name, None)
            self._lookup_after[name] = time.monotonic() + self.lookup_retry_s
            raise
        answered_us = settle_us = wall_clock_us()
        closed = sum(a for a in answers[:len(ticks)] if type(a) is int)
        self.ticks_refused += sum(1 for a in answers[:len(ticks)] if not isinstance(a, int))
        if undelivered:
            await self._settle(name)
        elif isinstance(answers[-1], OutboxView) and answers[-1].items:
            await self._settle(name, answers[-1])
        else:
            settle_us = 0
        self._timings.append(CallTiming(name, stamps, sent_us, answered_us, closed, settle_us,
                                        wall_clock_us() if settle_us else 0))
        self._timed += 1

    async def _settle(self, name: str, view: OutboxView | None = None) -> None:
        """Deliver shard ``name``'s settlements to the ledger (``view``: the outbox as the tick
        call read it; None: read it again); on failure retry later."""
        try:
            courier = self._courier
            if courier is None:
                ledger = ray.get_actor(LEDGER, namespace=self.namespace)
                courier = self._courier = Courier(RayPort(LEDGER, ledger), {})
            courier.shards[name] = self._port(name)
            if view is None:
                await courier.deliver(name)
            else:
                await courier.forward(name, view)
            self._undelivered.discard(name)
        except Exception as exc:  # the ledger is down or recovering: the outbox waits
            self.deliveries_failed += 1
            self.consumer.last_error = f"settlements of {name}: {type(exc).__name__}: {exc}"
            self._undelivered.add(name)
            if self._retry is None or self._retry.done():
                self._retry = asyncio.get_running_loop().create_task(self._retry_settle())

    async def _retry_settle(self) -> None:
        while self._undelivered and self.consumer.running:
            await asyncio.sleep(self.lookup_retry_s)
            for name in list(self._undelivered):
                if name in self.handles and self.consumer.running:  # none after a stop
                    await self._settle(name)


# The Ray actor class (``FeedActor.remote(...)``, ``FeedActor.options(name=...)``). It asks for
# no CPU slot: it is I/O bound and must not take one of the shards' slots on a small machine,
# and records no task events (cluster.actors.host.host_class says why).
# Typed Any because Ray's decorator typing does not model actor classes with options.
_ray_remote: Any = ray.remote
FeedActor: Any = _ray_remote(num_cpus=0, enable_task_events=False)(FeedActorShell)
