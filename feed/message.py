"""The SPEC ``MarketDataMessage`` (the Kafka wire format) and its decoder into engine ticks.

Encoding happens once per tick in the market data service; decoding happens in the feed actor,
which is the first place the engine's integer world begins: every price is parsed exactly into
ticks with :func:`engine.amounts.to_units` (as :meth:`engine.assets.Asset.price_to_ticks`),
never through a float.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeGuard

from engine.amounts import AmountError, to_units
from engine.assets import Asset, AssetRegistry
from engine.market import Tick
from feed.payload import PayloadError, load_json
from feed.settings import SEQ_LIMIT, TS_US_LIMIT, FeedBounds

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


MAX_MESSAGE_BYTES = 4096  # a real message is about 200 bytes; anything far larger is dropped
# ``source`` is journaled with every tick a shard applies, behind a one-byte length: the bound
# is on its UTF-8 bytes (64 characters of 4 bytes each would not fit that length)
MAX_SOURCE_BYTES = 64

# Drop reasons of the decoder, in the order they are checked.
DECODE_DROP_REASONS = ("oversized", "too_deep", "not_json", "unknown_symbol", "bad_price",
                       "crossed", "above_bound", "bad_field", "future", "stale")


class TickDecoder:
    """Decode MarketDataMessage JSON into :class:`engine.market.Tick`, dropping malformed input.

    ``decode(value, now_us)`` returns a Tick or None; every None is counted in :attr:`dropped`
    under one reason (:data:`DECODE_DROP_REASONS`): ``oversized`` (more than
    :data:`MAX_MESSAGE_BYTES`), ``too_deep`` (nested deeper than ``feed.payload.MAX_DEPTH``),
    ``not_json`` (not UTF-8 JSON, or not an object), ``unknown_symbol`` (not a symbol of the
    registry, or not the one the record's key names, or ``asset``, when given, not its asset),
    ``bad_price`` (bid,
    ask or price missing, not decimal text or a JSON number, zero, negative, non-finite or off
    the asset's price step; price, one decimal finer, not exactly ``(bid + ask) / 2``),
    ``crossed`` (bid > ask), ``above_bound`` (ask above the asset's
    :attr:`~engine.assets.Asset.max_price_ticks`), ``bad_field`` (``ts_us`` not an integer in
    ``(0, 2**63)``, ``seq`` not one in ``[0, 2**63)``, ``source`` not text, empty, over
    :data:`MAX_SOURCE_BYTES` bytes of UTF-8 or with a character that is not printable: the API
    and the terminal show it), and, when ``now_us`` is given, ``future``
    (``ts_us`` more than ``bounds.max_clock_skew_us`` ahead of ``now_us``) and ``stale`` (more
    than ``bounds.max_price_age_us`` behind). Unknown fields are ignored. ``seq`` may be absent (0);
    a missing ``source`` reads ``unknown``. No input makes it raise.
    """

    def __init__(self, assets: AssetRegistry, bounds: FeedBounds | None = None) -> None:
        self.assets = assets
        self.bounds = bounds or FeedBounds()
        self.dropped: Counter[str] = Counter()
        self.decoded = 0

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def decode(self, value: bytes | str | None, now_us: int | None = None,
               key_asset: str | None = None) -> Tick | None:
        """``key_asset``: the asset whose symbol the record's Kafka key is, if any."""
        try:
            obj = load_json(value, max_bytes=MAX_MESSAGE_BYTES)
        except PayloadError as exc:
            self._drop(exc.reason)
            return None
        if not isinstance(obj, dict):
            self._drop("not_json")
            return None
        symbol = obj.get("symbol")
        asset = self.assets.by_symbol(symbol) if isinstance(symbol, str) else None
        # a record keyed with another asset's symbol: the conflator skips the older records of
        # a key unread, so such a record would be read or not depending on the poll; an
        # ``asset`` other than the symbol's: the message contradicts itself about what it prices
        if asset is None or (key_asset is not None and key_asset != asset.name) or obj.get(
                "asset", asset.name) != asset.name:
            self._drop("unknown_symbol")
            return None
        bid_ticks = _ticks(asset, obj.get("bid"))
        ask_ticks = _ticks(asset, obj.get("ask"))
        mid_tenths = _mid_tenths(asset, obj.get("price"))
        if bid_ticks is None or ask_ticks is None or mid_tenths is None:
            self._drop("bad_price")
            return None
        if bid_ticks > ask_ticks:
            self._drop("crossed")
            return None
        if ask_ticks > asset.max_price_ticks:
            self._drop("above_bound")
            return None
        if mid_tenths != (bid_ticks + ask_ticks) * 5:
            self._drop("bad_price")  # a mid that disagrees with its own bid and ask
            return None
        ts_us = obj.get("ts_us")
        seq = obj.get("seq", 0)
        source = obj.get("source", "unknown")
        if not (_is_int(ts_us) and 0 < ts_us < TS_US_LIMIT and _is_int(seq)
                and 0 <= seq < SEQ_LIMIT and _shown_label(source)):
            self._drop("bad_field")
            return None
        if now_us is not None:
            if ts_us - now_us > self.bounds.max_clock_skew_us:
                self._drop("future")
                return None
            if now_us - ts_us > self.bounds.max_price_age_us:
                self._drop("stale")
                return None
        self.decoded += 1
        return Tick(asset.name, bid_ticks, ask_ticks, ts_us, seq, source)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown_label(source: object) -> TypeGuard[str]:
    """Whether ``source`` is a label the API and the terminal may show as it is: text of 1 to
    MAX_SOURCE_BYTES bytes of UTF-8, every character printable (no control character, line
    break, direction override or lone surrogate)."""
    return (isinstance(source, str) and 0 < _utf8_len(source) <= MAX_SOURCE_BYTES
            and source.isprintable())


def _utf8_len(text: str) -> int:
    """Bytes of ``text`` as the journal writes it (UTF-8; a lone surrogate, which a JSON
    ``\\ud800`` escape makes, takes 3)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _units(value: object, decimals: int) -> int | None:
    """``value`` (decimal text or an exact number) as a positive count of ``10**-decimals``,
    or None (never 0)."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        return None
    try:
        return to_units(value, decimals, allow_zero=False)
    except AmountError:
        return None


def _ticks(asset: Asset, value: object) -> int | None:
    """``value`` as a positive count of ``asset``'s price step, or None (never 0)."""
    return _units(value, asset.price_decimals)


def _mid_tenths(asset: Asset, value: object) -> int | None:
    """The mid ``price`` in tenths of the asset's price step (the mid of two prices on the step
    has one decimal more), or None unless it is decimal text or an exact number > 0 on it."""
    return _units(value, asset.price_decimals + 1)
