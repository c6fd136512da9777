"""The simulated source: a seeded random walk of the top of book per asset.

Deterministic by seed: the price path of an asset depends only on the seed, the asset, the
band of its moves (``MAX_TICK_JUMP_BPS``; at the default 1,000 bp no move of a normal price
reaches it) and a top it was resumed from, not on how the assets' updates interleave or on the
clock (the clock only stamps ``ts_us``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Mapping

from engine.assets import Asset, AssetRegistry
from feed.gate import mid2_within_band
from feed.message import MarketDataMessage, message_from_ticks
from feed.settings import FeedBounds

# Realistic starting mids and spreads (in price units) for the default assets; others start at
# 100 with a one-step spread.
START_PRICES = {"SOL": "140.00", "BTC": "95000.0", "ETH": "3200.00"}
MAX_SPREAD_STEPS = {"SOL": 2, "BTC": 10, "ETH": 5}
VOLATILITY_PER_TICK = 0.0002  # relative standard deviation of the mid per update (~2 bp)
MIN_MID_TICKS = 1_000  # the walk's floor: one tick is at most 10 bp of the price above it
DEFAULT_MAX_MOVE_BPS = FeedBounds().max_tick_jump_bps  # largest move of the mid per update


class SimWalk:
    """Per-asset random walks in integer ticks; ``next(asset)`` gives the next (bid, ask) ticks.

    Every top it makes is on the step, ``0 < bid < ask <= asset.max_price_ticks``, with its
    mid within ``max_move_bps`` (the consumers' ``MAX_TICK_JUMP_BPS``) of the previous one:
    the platform's jump gate does not hold its own sim ticks. The walk does not go below
    :data:`MIN_MID_TICKS` (where a one-tick step is over 10 bp of the price), or below a lower
    price it started or was resumed from; a step that would break one of these is not taken
    (the mid stays; at a price so low that no step fits the band, it stays there).
    """

    def __init__(self, assets: AssetRegistry, seed: int = 0,
                 max_move_bps: int = DEFAULT_MAX_MOVE_BPS) -> None:
        if max_move_bps <= 0:
            raise ValueError("sim max_move_bps must be > 0")
        self.assets = assets
        self.max_move_bps = max_move_bps
        self._rng = {a.name: random.Random(f"{seed}:{a.name}") for a in assets.assets}
        self._mid_ticks = {a.name: a.price_to_ticks(START_PRICES.get(a.name, "100"))
                           for a in assets.assets}
        # a start below the floor (an asset of no START_PRICES with a coarse step) is its floor
        self._floor = {name: min(MIN_MID_TICKS, mid) for name, mid in self._mid_ticks.items()}
        # the last top given (its bid + ask is the reference of the next move)
        self._top = {name: (mid, mid + 1) for name, mid in self._mid_ticks.items()}

    def resume_from(self, tops: Mapping[str, tuple[int, int]]) -> dict[str, int]:
        """Continue each asset of ``tops`` (name -> (bid, ask) ticks, the last prices the
        platform saw) from exactly that top instead of its starting price; returns the mids
        taken. A crossed top, or one outside ``(0, max_price_ticks]``, is ignored."""
        taken = {}
        for name, (bid, ask) in tops.items():
            if name in self._mid_ticks and 0 < bid <= ask <= self.assets[name].max_price_ticks:
                mid = self._mid_ticks[name] = taken[name] = (bid + ask) // 2
                self._floor[name] = min(MIN_MID_TICKS, mid)
                self._top[name] = (bid, ask)
        return taken

    def next(self, asset: Asset) -> tuple[int, int]:
        name = asset.name
        rng = self._rng[name]
        mid = self._mid_ticks[name]
        sigma = max(1.0, mid * VOLATILITY_PER_TICK)
        moved = mid + round(rng.gauss(0.0, sigma))
        spread = rng.randint(1, MAX_SPREAD_STEPS.get(name, 1))
        last_bid, last_ask = self._top[name]
        last2 = last_bid + last_ask
        for candidate in (moved if moved >= self._floor[name] else mid, mid):
            bid = max(1, candidate - spread // 2)
            ask = bid + spread
            if ask <= asset.max_price_ticks and mid2_within_band(bid + ask, last2,
                                                                 self.max_move_bps):
                self._mid_ticks[name] = candidate
                self._top[name] = (bid, ask)
                return bid, ask
        return last_bid, last_ask


class SimSource:
    """Emit ``rate_hz`` updates per second per asset (round robin), stamped with the wall clock.

    ``seq`` starts at the start time in microseconds and counts up, so it keeps increasing
    across restarts of the service (as long as the rate stays below 1M/s).
    """

    name = "sim"

    def __init__(self, assets: AssetRegistry, seed: int = 0, rate_hz: float = 4.0,
                 max_move_bps: int = DEFAULT_MAX_MOVE_BPS) -> None:
        if rate_hz <= 0:
            raise ValueError("sim rate must be > 0")
        self.assets = assets
        self.walk = SimWalk(assets, seed, max_move_bps)
        self.rate_hz = rate_hz
        self.emitted = 0

    def stats(self) -> dict[str, int]:
        return {"emitted": self.emitted}

    async def stream(self, stop: asyncio.Event) -> AsyncIterator[MarketDataMessage]:
        assets = self.assets.assets
        interval_s = 1.0 / (self.rate_hz * len(assets))
        start = time.monotonic()
        seq0 = time.time_ns() // 1000
        n = 0
        while not stop.is_set():
            due = int((time.monotonic() - start) / interval_s) + 1
            # At high rates several updates are due per wake-up; cap the burst so a stalled loop
            # does not emit a flood of identical timestamps afterwards.
            burst = min(due - n, 10_000)
            if burst <= 0:
                await asyncio.sleep(interval_s - ((time.monotonic() - start) % interval_s))
                continue
            if due - n > burst:
                n = due - burst
            now_us = time.time_ns() // 1000
            for _ in range(burst):
                asset = assets[n % len(assets)]
                bid, ask = self.walk.next(asset)
                n += 1
                self.emitted += 1
                yield message_from_ticks(asset, bid, ask, now_us, seq0 + n, self.name)
            await asyncio.sleep(0)
