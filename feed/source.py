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
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl

from cluster.config import MARKET_TOPIC, Settings
from engine.assets import AssetRegistry
from feed.backpack import BackpackClient
from feed.message import MarketDataMessage
from feed.producer import MarketDataProducer
from feed.replay import ReplaySource
from feed.sim import SimSource

log = logging.getLogger(__name__)

AUTO_WAIT_S = 10.0  # how long ``auto`` waits for a first Backpack price before using sim


class Source(Protocol):
    """Anything that yields MarketDataMessages until ``stop`` is set."""

    @property
    def name(self) -> str: ...

    def stream(self, stop: asyncio.Event) -> AsyncIterator[MarketDataMessage]: ...

    def stats(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A parsed FEED_SOURCE: ``kind`` in backpack/sim/replay/none/auto, ``path`` for replay."""

    kind: str
    path: str = ""
    options: dict[str, str] = field(default_factory=dict)

    def number(self, key: str, default: float) -> float:
        try:
            return float(self.options.get(key, default))
        except ValueError:
            raise ValueError(f"FEED_SOURCE option {key}={self.options[key]!r} is not a number")\
                from None


def parse_source(text: str) -> SourceSpec:
    """Parse a FEED_SOURCE value (raises ValueError for an unknown kind or a missing path)."""
    text = text.strip()
    body, options = text, {}
    head, sep, query = text.rpartition("?")
    if sep and "=" in query:
        body, options = head, dict(parse_qsl(query, keep_blank_values=True))
    kind, colon, path = body.partition(":")
    kind = kind.strip().lower()
    if kind == "replay":
        if not colon or not path:
            raise ValueError("FEED_SOURCE=replay needs a path: replay:PATH")
        return SourceSpec("replay", path, options)
    if colon or kind not in ("backpack", "sim", "none", "auto"):
        raise ValueError(f"unknown FEED_SOURCE {text!r} "
                         "(backpack | sim | replay:PATH | none | auto)")
    return SourceSpec(kind, "", options)


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


def make_source(settings: Settings, spec: SourceSpec | str | None = None) -> Source | None:
    """Build the source ``spec`` (default ``settings.feed_source``) names; None for ``none``."""
    if spec is None:
        spec = settings.feed_source
    if isinstance(spec, str):
        spec = parse_source(spec)
    assets: AssetRegistry = settings.assets
    if spec.kind == "none":
        return None
    if spec.kind == "sim":
        return SimSource(assets, seed=int(spec.number("seed", 0)), rate_hz=spec.number("rate", 4))
    if spec.kind == "replay":
        return ReplaySource(spec.path, assets, speed=spec.number("speed", 1.0),
                            loop=spec.options.get("loop", "0") not in ("", "0", "false"))
    backpack = BackpackClient(settings.backpack_ws_url, assets)
    if spec.kind == "backpack":
        return backpack
    sim = SimSource(assets, seed=int(spec.number("seed", 0)), rate_hz=spec.number("rate", 4))
    return AutoSource(backpack, sim, wait_s=spec.number("wait", AUTO_WAIT_S))


async def run_source(settings: Settings, stop: asyncio.Event, *, bootstrap: str | None = None,
                     topic: str = MARKET_TOPIC, source: Source | None = None,
                     linger_ms: int = 1) -> dict[str, Any]:
    """Publish ``source`` (default: the one FEED_SOURCE names) to ``topic`` until ``stop``.

    ``bootstrap`` defaults to ``settings.bootstrap_servers``. The topic is created (one
    partition per asset) if missing, and again after a broker restart. Returns the final
    counters. With ``FEED_SOURCE=none`` it just waits for ``stop``.
    """
    if source is None:
        source = make_source(settings)
    if source is None:
        log.info("feed: FEED_SOURCE=none, producing nothing")
        await stop.wait()
        return {"source": "none", "published": 0}
    producer = MarketDataProducer(bootstrap or settings.bootstrap_servers, settings.assets,
                                  topic=topic, linger_ms=linger_ms)
    await producer.start()
    log.info("feed: publishing source %s to %s on %s", source.name, topic, producer.bootstrap)
    try:
        async for msg in source.stream(stop):
            await producer.publish(msg)
            if stop.is_set():
                break
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.flush(), 5.0)
        await producer.stop()
    return {"source": source.name, "published": producer.sent, "producer": producer.stats(),
            "source_stats": source.stats()}
