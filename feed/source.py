"""Choosing and running a market data source (FEED_SOURCE), publishing to Kafka.

``FEED_SOURCE`` forms (query options are optional):

- ``backpack`` — the live Backpack WebSocket (``BACKPACK_WS_URL``).
- ``sim`` / ``sim?seed=7&rate=4`` — seeded random walk, ``rate`` updates per second per asset.
- ``replay:PATH`` / ``replay:PATH?speed=10&loop=1`` — a jsonl of Backpack frames; ``speed`` x
  the recorded pace (``0`` = as fast as possible), ``loop`` starts over at the end.
- ``none`` — produce nothing (others feed the topic).
- ``auto`` / ``auto?wait=10`` — Backpack; if no valid price arrives within ``wait`` seconds, a
  loud warning and the sim source for the rest of the run. ``source`` of every message says
  which one is in use.

Reusable from another process (the launcher)::

    stop = asyncio.Event()
    stats = await run_source(settings, stop, bootstrap=broker.bootstrap)  # until stop is set
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from feed.backpack import BackpackClient
from feed.message import MarketDataMessage
from feed.producer import LINGER_MS, MarketDataProducer, ProducerStopped
from feed.replay import ReplaySource
from feed.settings import (
    LOOP_OFF,
    MARKET_TOPIC,
    FeedSettings,
    HasFeedSettings,
    SourceSpec,
    feed_settings,
    parse_source,
)
from feed.sim import SimSource

log = logging.getLogger(__name__)

AUTO_WAIT_S = 10.0  # how long ``auto`` waits for a first Backpack price before using sim
RESTART_DELAY_S = 1.0  # pause before a source that failed unexpectedly is started again

__all__ = ["AUTO_WAIT_S", "AutoSource", "Source", "SourceSpec", "make_source", "parse_source",
           "run_source"]


class Source(Protocol):
    """Anything that yields MarketDataMessages until ``stop`` is set."""

    @property
    def name(self) -> str: ...

    def stream(self, stop: asyncio.Event) -> AsyncIterator[MarketDataMessage]: ...

    def stats(self) -> Any: ...


class AutoSource:
    """Backpack, falling back to the sim source when no valid price arrives within ``wait_s``."""

    def __init__(self, primary: Source, fallback: Source, wait_s: float = AUTO_WAIT_S) -> None:
        self.primary = primary
        self.fallback = fallback
        self.wait_s = wait_s
        self.active: Source = primary

    @property
    def name(self) -> str:
        return self.active.name

    def stats(self) -> dict[str, Any]:
        return {"active": self.active.name, "primary": self.primary.stats(),
                "fallback": self.fallback.stats() if self.active is self.fallback else None}

    async def stream(self, stop: asyncio.Event) -> AsyncIterator[MarketDataMessage]:
        primary = aiter(self.primary.stream(stop))
        try:
            first = await asyncio.wait_for(anext(primary), self.wait_s)
        except (TimeoutError, StopAsyncIteration):
            first = None
        if first is not None:
            yield first
            async for msg in primary:
                yield msg
            return
        aclose = getattr(primary, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        if stop.is_set():
            return
        self.active = self.fallback
        banner = "!" * 78
        log.warning("%s\nFEED_SOURCE=auto: no price from Backpack within %.0f s; FALLING BACK TO "
                    "THE SIMULATED SOURCE. Prices are NOT real (source=\"sim\" in every "
                    "message).\n%s", banner, self.wait_s, banner)
        async for msg in self.fallback.stream(stop):
            yield msg


def make_source(settings: FeedSettings | HasFeedSettings,
                spec: SourceSpec | str | None = None) -> Source | None:
    """Build the source ``spec`` (default ``settings.feed_source``) names; None for ``none``."""
    settings = feed_settings(settings)
    if spec is None:
        spec = settings.feed_source
    if isinstance(spec, str):
        spec = parse_source(spec)
    assets = settings.assets
    if spec.kind == "none":
        return None
    if spec.kind == "sim":
        return SimSource(assets, seed=spec.seed, rate_hz=spec.number("rate", 4),
                         max_move_bps=settings.bounds.max_tick_jump_bps)
    if spec.kind == "replay":
        return ReplaySource(spec.path, assets, speed=spec.number("speed", 1.0),
                            loop=spec.options.get("loop", "0").lower() not in LOOP_OFF)
    backpack = BackpackClient(settings.backpack_ws_url, assets)
    if spec.kind == "backpack":
        return backpack
    sim = SimSource(assets, seed=spec.seed, rate_hz=spec.number("rate", 4),
                    max_move_bps=settings.bounds.max_tick_jump_bps)
    return AutoSource(backpack, sim, wait_s=spec.number("wait", AUTO_WAIT_S))


async def run_source(settings: FeedSettings | HasFeedSettings, stop: asyncio.Event, *,
                     bootstrap: str | None = None, topic: str = MARKET_TOPIC,
                     source: Source | None = None, linger_ms: int = LINGER_MS
                     ) -> dict[str, Any]:
    """Publish ``source`` (default: the one FEED_SOURCE names) to ``topic`` until ``stop``.

    ``bootstrap`` defaults to ``settings.bootstrap_servers``. The topic is created (one
    partition per asset) if missing, and again after a broker restart. A source that fails
    unexpectedly (anything but a normal end) is logged, counted in ``source_restarts`` and
    started again after :data:`RESTART_DELAY_S`; a finite source (a replay) that ends ends
    this. Returns the final counters. With ``FEED_SOURCE=none`` it just waits for ``stop``.
    """
    settings = feed_settings(settings)
    if source is None:
        source = make_source(settings)
    if source is None:
        log.info("feed: FEED_SOURCE=none, producing nothing")
        await stop.wait()
        return {"source": "none", "published": 0}
    producer = MarketDataProducer(bootstrap or settings.bootstrap_servers, settings.assets,
                                  topic=topic, linger_ms=linger_ms, stop_event=stop)
    try:
        await producer.start()
    except ProducerStopped:  # stopped before the broker ever answered
        return {"source": source.name, "published": 0, "producer": producer.stats()}
    log.info("feed: publishing source %s to %s on %s", source.name, topic, producer.bootstrap)
    restarts = 0
    try:
        while not stop.is_set():
            try:
                async for msg in source.stream(stop):
                    await producer.publish(msg)
                    if stop.is_set():
                        break
                break
            except ProducerStopped:  # a recovery still reaching the broker when stopped
                break
            except Exception:
                restarts += 1
                log.exception("feed: source %s failed; starting it again in %.1f s",
                              source.name, RESTART_DELAY_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RESTART_DELAY_S)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.flush(), 5.0)
        await producer.stop()
    return {"source": source.name, "published": producer.sent, "producer": producer.stats(),
            "source_stats": source.stats(), "source_restarts": restarts}
