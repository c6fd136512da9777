"""A slow, obviously-correct reference of engine.candles, straight from the SPEC's words.

It keeps the list of every tick it was given and recomputes every candle from that list on each
question: prices are :class:`fractions.Fraction` mids in the asset's currency, interval lengths
are read from their names (``5m`` is five minutes), and a tick counts for an interval when it is
not older than every tick counted before it (the book's rule for late ticks) and is not of the
interval of the newest of those when that interval had ended by the latest time its asset was
given to ``close_ended`` before it (a closed candle never changes). A candle is closed when a
later one exists or its interval has ended by the latest time its asset was given to
``close_ended``: ``now_us``, or for an asset in ``until_us`` the earlier of the two. Tests run
:class:`engine.candles.CandleBook` and this reference through the same ticks and check they
agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import NamedTuple

from engine.assets import Asset, AssetRegistry
from engine.candles import INTERVALS, Candle
from engine.market import Tick

_UNIT_S = {"m": 60, "h": 3600, "d": 86400}


def interval_length_us(interval: str) -> int:
    """``"15m"`` -> fifteen minutes in microseconds."""
    return int(interval[:-1]) * _UNIT_S[interval[-1]] * 10**6


def mid_price(asset: Asset, bid_ticks: int, ask_ticks: int) -> Fraction:
    """The mid of a tick in the asset's currency."""
    step = Fraction(1, 10**asset.price_decimals)
    return (bid_ticks * step + ask_ticks * step) / 2


class ExactCandle(NamedTuple):
    """A candle with Fraction prices (currency units); other fields as in
    :class:`engine.candles.Candle`."""

    asset: str
    interval: str
    start_us: int
    open: Fraction
    high: Fraction
    low: Fraction
    close: Fraction
    tick_count: int
    close_ts_us: int
    closed: bool


def exact(asset: Asset, candle: Candle) -> ExactCandle:
    """A book's candle with its half-tick prices as Fractions."""
    half_step = Fraction(1, 2 * 10**asset.price_decimals)
    return ExactCandle(candle.asset, candle.interval, candle.start_us,
                       candle.open_half_ticks * half_step, candle.high_half_ticks * half_step,
                       candle.low_half_ticks * half_step, candle.close_half_ticks * half_step,
                       candle.tick_count, candle.close_ts_us, candle.closed)


class ReferenceCandles:
    """Every tick given, and every candle recomputed from them on each call."""

    def __init__(self, assets: AssetRegistry, intervals: Sequence[str] = INTERVALS) -> None:
        self.assets = assets
        self.intervals = tuple(intervals)
        self.ticks: list[Tick] = []
        # for each tick, the latest close_ended time of its asset before it
        self.ended_at: list[int] = []
        self.ended_us = dict.fromkeys(assets, 0)  # asset -> its latest close_ended time

    def candles(self, asset: str, interval: str) -> list[ExactCandle]:
        """Every candle of (asset, interval) since the first tick, oldest first."""
        length_us = interval_length_us(interval)
        counted: list[Tick] = []
        for tick, ended_us in zip(self.ticks, self.ended_at, strict=True):
            if tick.asset != asset:
                continue
            if counted:
                newest = counted[-1]
                start_us = newest.ts_us // length_us * length_us
                if tick.ts_us < newest.ts_us or (
                        tick.ts_us // length_us * length_us == start_us
                        and start_us + length_us <= ended_us):
                    continue
            counted.append(tick)
        starts = sorted({t.ts_us // length_us * length_us for t in counted})
        out = []
        for start_us in starts:
            inside = [t for t in counted if start_us <= t.ts_us < start_us + length_us]
            mids = [mid_price(self.assets[asset], t.bid_ticks, t.ask_ticks) for t in inside]
            out.append(ExactCandle(asset, interval, start_us, mids[0], max(mids), min(mids),
                                   mids[-1], len(inside), inside[-1].ts_us,
                                   start_us != starts[-1]
                                   or start_us + length_us <= self.ended_us[asset]))
        return out

    def everything(self) -> list[ExactCandle]:
        """Every candle of every asset, by asset, then interval, then start."""
        return [c for asset in self.assets for interval in self.intervals
                for c in self.candles(asset, interval)]

    def apply(self, tick: Tick) -> list[ExactCandle]:
        """Add ``tick``; the candles of its asset that differ from before it, by interval,
        then start."""
        before = {c for interval in self.intervals for c in self.candles(tick.asset, interval)}
        self.ticks.append(tick)
        self.ended_at.append(self.ended_us[tick.asset])
        return [c for interval in self.intervals for c in self.candles(tick.asset, interval)
                if c not in before]

    def close_ended(self, now_us: int,
                    until_us: Mapping[str, int] | None = None) -> list[ExactCandle]:
        """Time is ``now_us`` (unix us), for an asset in ``until_us`` its time there if
        earlier; the candles that differ from before, by asset, then interval."""
        before = set(self.everything())
        for asset in self.ended_us:
            until = min(now_us, (until_us or {}).get(asset, now_us))
            self.ended_us[asset] = max(self.ended_us[asset], until)
        return [c for c in self.everything() if c not in before]

    def query(self, asset: str, interval: str, limit: int, start_s: int | None,
              end_s: int | None) -> list[ExactCandle]:
        """Candles whose start lies in ``[start_s, end_s]`` seconds (None: unbounded); of
        those the first ``limit`` when ``start_s`` is given, else the last ``limit``."""
        inside = [c for c in self.candles(asset, interval)
                  if (start_s is None or c.start_us >= start_s * 10**6)
                  and (end_s is None or c.start_us <= end_s * 10**6)]
        return inside[:limit] if start_s is not None else inside[-limit:]
