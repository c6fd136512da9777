"""The SPEC ``MarketDataMessage`` (the Kafka wire format) and its decoder into engine ticks.

Encoding happens once per tick in the market data service; decoding happens in the feed actor,
which is the first place the engine's integer world begins: every price is parsed exactly into
ticks with :meth:`engine.assets.Asset.price_to_ticks`, never through a float.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from engine.amounts import AmountError
from engine.assets import Asset, AssetRegistry
from engine.market import Tick

SCHEMA_VERSION = 1  # the "v" field of every message this module writes


@dataclass(frozen=True, slots=True)
class MarketDataMessage:
    """One top-of-book update as it travels on Kafka (SPEC "Market data on Kafka").

    ``bid``/``ask``/``price`` are exact decimal strings on the asset's price step (``price`` is the
    mid and may carry one more decimal); ``ts_us`` is the exchange's engine time (Backpack ``T``)
    in microseconds since the epoch; ``seq`` the exchange's update id (Backpack ``u``);
    ``source`` is ``backpack`` / ``sim`` / ``replay`` (or whatever another producer says).
    """

    symbol: str
    asset: str
    bid: str
    ask: str
    price: str
    ts_us: int
    seq: int
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "symbol": self.symbol,
            "asset": self.asset,
            "bid": self.bid,
            "ask": self.ask,
            "price": self.price,
            "ts_us": self.ts_us,
            "seq": self.seq,
            "source": self.source,
        }

    def to_json_bytes(self) -> bytes:
        """The Kafka message value: compact UTF-8 JSON."""
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @property
    def key(self) -> bytes:
        """The Kafka message key: the Backpack symbol, UTF-8."""
        return self.symbol.encode()


def mid_price(bid: str, ask: str) -> str:
    """Exact ``(bid + ask) / 2`` as a plain decimal string (``98.96``/``98.97`` -> ``98.965``)."""
    mid = (Decimal(bid) + Decimal(ask)) / 2
    text = format(mid, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def message_from_ticks(asset: Asset, bid_ticks: int, ask_ticks: int, ts_us: int, seq: int,
                       source: str) -> MarketDataMessage:
    """Build a message from integer ticks (used by the sim source and benchmarks)."""
    bid = asset.ticks_to_price(bid_ticks)
    ask = asset.ticks_to_price(ask_ticks)
    return MarketDataMessage(asset.symbol, asset.name, bid, ask, mid_price(bid, ask), ts_us, seq,
                             source)


class TickDecoder:
    """Decode MarketDataMessage JSON into :class:`engine.market.Tick`, dropping malformed input.

    ``decode`` returns a Tick or None; every None is counted in :attr:`dropped` under one reason:
    ``not_json`` (not UTF-8 JSON or not an object), ``unknown_symbol``, ``bad_price`` (bid, ask or
    price missing, unparsable, zero, negative, non-finite or off the asset's price step),
    ``crossed`` (bid > ask), ``bad_field`` (``ts_us``/``seq`` missing or not integers).
    Unknown fields are ignored. ``seq`` may be absent (0); ``source`` defaults to ``unknown``.
    """

    def __init__(self, assets: AssetRegistry) -> None:
        self.assets = assets
        self.dropped: Counter[str] = Counter()
        self.decoded = 0

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def decode(self, value: bytes | str | None) -> Tick | None:
        try:
            obj = json.loads(value) if value is not None else None
        except (ValueError, UnicodeDecodeError):
            obj = None
        if not isinstance(obj, dict):
            self._drop("not_json")
            return None
        symbol = obj.get("symbol")
        asset = self.assets.by_symbol(symbol) if isinstance(symbol, str) else None
        if asset is None:
            self._drop("unknown_symbol")
            return None
        bid_ticks = _ticks(asset, obj.get("bid"))
        ask_ticks = _ticks(asset, obj.get("ask"))
        if bid_ticks is None or ask_ticks is None or not _positive_price(obj.get("price")):
            self._drop("bad_price")
            return None
        if bid_ticks > ask_ticks:
            self._drop("crossed")
            return None
        ts_us = obj.get("ts_us")
        seq = obj.get("seq", 0)
        if not isinstance(ts_us, int) or not isinstance(seq, int) or not (
                _is_int(ts_us) and _is_int(seq)):
            self._drop("bad_field")
            return None
        source = obj.get("source")
        self.decoded += 1
        return Tick(asset.name, bid_ticks, ask_ticks, ts_us, seq,
                    source if isinstance(source, str) else "unknown")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ticks(asset: Asset, value: object) -> int | None:
    """``value`` as a positive count of ``asset``'s price step, or None (never 0)."""
    if value is None or isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        return asset.price_to_ticks(value)
    except AmountError:
        return None


def _positive_price(value: object) -> bool:
    """The mid ``price`` must be a finite number > 0 (it may have one decimal more than a step)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return False
    if isinstance(value, float):
        return math.isfinite(value) and value > 0
    try:
        dec = Decimal(str(value).strip())
    except ArithmeticError:
        return False
    return dec.is_finite() and dec > 0
