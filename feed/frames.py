"""Backpack WebSocket frames: routing, validation and normalisation into MarketDataMessages.

Wire format (see tests/fixtures/backpack/README.md): every data frame is
``{"data": {...}, "stream": "<name>"}``; errors are ``{"id": null, "error": {"code", "message"}}``.
Frames are routed on ``data.e`` (event type) and ``data.s`` (symbol), never on the stream name,
because symbols may contain dots and several event types share a socket.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, TypeGuard

from engine.amounts import AmountError
from engine.assets import Asset, AssetRegistry
from feed.message import MarketDataMessage, mid_price
from feed.payload import PayloadError, load_json
from feed.settings import SEQ_LIMIT, TS_US_LIMIT

log = logging.getLogger(__name__)

# Drop reasons of a frame, in the order they are checked.
DROP_REASONS = ("oversized", "too_deep", "malformed", "unknown_symbol", "null_side", "bad_price",
                "crossed", "above_bound", "stale_seq")
MAX_FRAME_BYTES = 1 << 20  # a bookTicker frame is about 250 bytes; larger frames are dropped
MAX_IGNORED_EVENTS = 32  # distinct event types counted by name; the rest count as "other"
MAX_ERROR_TEXT = 200  # characters of a server error message kept
# Frames of a symbol in a row whose update id is below the last accepted one, after which that
# id is forgotten: a real update never trails that many newer ones, so the last accepted id was
# the odd one (a corrupt frame, or ids the exchange restarted), and keeping it would drop every
# frame of the symbol for as long as the connection lasts.
MAX_STALE_RUN = 16


def subscribe_request(assets: AssetRegistry) -> dict[str, Any]:
    """The SUBSCRIBE frame for the bookTicker stream of every asset."""
    return {"method": "SUBSCRIBE", "params": [f"bookTicker.{a.symbol}" for a in assets.assets]}


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """An error the server answered with (4002 parse error, 4006 invalid stream, ...)."""

    code: int | None
    message: str


class FrameNormalizer:
    """Turn raw Backpack frames into SPEC messages, dropping and counting invalid ones.

    ``feed(raw)`` returns a :class:`MarketDataMessage` for a valid bookTicker of a known symbol,
    an :class:`ErrorFrame` for a server error frame, or None; it never raises. Counters:
    ``dropped[reason]`` (see :data:`DROP_REASONS`: a frame over :data:`MAX_FRAME_BYTES`, nested
    deeper than ``feed.payload.MAX_DEPTH``, not JSON or not of the frame shape, ``T``/``u`` not
    integers in range, an unknown symbol, a null side, a zero/negative/non-finite/unparsable/
    off-step price, bid > ask, an ask above the asset's ``max_price_ticks``, an update id older
    than the last one seen for that symbol, up to :data:`MAX_STALE_RUN` in a row),
    ``ignored[event]`` for other event types (depth, ticker, markPrice...; at most
    :data:`MAX_IGNORED_EVENTS` names), ``errors`` for error frames, ``accepted`` for messages
    produced. A dropped frame never becomes a price, least of all a price of 0.
    """

    def __init__(self, assets: AssetRegistry, source: str = "backpack") -> None:
        self.assets = assets
        self.source = source
        self.dropped: Counter[str] = Counter()
        self.ignored: Counter[str] = Counter()
        self.errors = 0
        self.accepted = 0
        self._last_seq: dict[str, int] = {}
        self._stale_run: dict[str, int] = {}  # frames dropped as stale_seq in a row, by symbol

    def reset_sequences(self) -> None:
        """Forget the last update id per symbol (on a new connection the exchange may restart)."""
        self._last_seq.clear()
        self._stale_run.clear()

    def feed(self, raw: str | bytes) -> MarketDataMessage | ErrorFrame | None:
        """One raw frame in; never raises, whatever the frame holds (a frame that cannot be
        handled is counted in ``dropped`` and the stream goes on)."""
        try:
            frame = load_json(raw, max_bytes=MAX_FRAME_BYTES)
        except PayloadError as exc:
            self.dropped["malformed" if exc.reason == "not_json" else exc.reason] += 1
            return None
        return self.feed_frame(frame)

    def feed_frame(self, frame: object) -> MarketDataMessage | ErrorFrame | None:
        """One parsed frame in; never raises (see :meth:`feed`)."""
        try:
            return self._route(frame)
        except Exception:  # a frame no check foresaw must not end the source
            log.exception("backpack: frame dropped by an unexpected error")
            self.dropped["malformed"] += 1
            return None

    def _route(self, frame: object) -> MarketDataMessage | ErrorFrame | None:
        if not isinstance(frame, dict):
            self.dropped["malformed"] += 1
            return None
        err = frame.get("error")
        if err is not None:  # "error": null is an answer that reports none
            err = err if isinstance(err, dict) else {}
            code = err.get("code")
            message = err.get("message", "")
            self.errors += 1
            return ErrorFrame(code if _is_int(code) else None,
                              (message if isinstance(message, str) else "")[:MAX_ERROR_TEXT])
        data = frame.get("data")
        if not isinstance(data, dict):
            self.dropped["malformed"] += 1
            return None
        event = data.get("e")
        if event != "bookTicker":
            name = event if isinstance(event, str) and len(event) <= 40 else "other"
            if name not in self.ignored and len(self.ignored) >= MAX_IGNORED_EVENTS:
                name = "other"
            self.ignored[name] += 1
            return None
        return self.book_ticker(data)

    def book_ticker(self, data: dict[str, Any]) -> MarketDataMessage | None:
        """Validate and normalise the ``data`` of one bookTicker frame."""
        symbol = data.get("s")
        asset = self.assets.by_symbol(symbol) if isinstance(symbol, str) else None
        if asset is None:
            self.dropped["unknown_symbol"] += 1
            return None
        ts_us = data.get("T")
        seq = data.get("u")
        if not (_is_int(ts_us) and 0 < ts_us < TS_US_LIMIT and _is_int(seq)
                and 0 <= seq < SEQ_LIMIT):
            self.dropped["malformed"] += 1
            return None
        raw_bid, raw_ask = data.get("b"), data.get("a")
        if raw_bid is None or raw_ask is None:
            self.dropped["null_side"] += 1
            return None
        bid_ticks = _ticks(asset, raw_bid)
        ask_ticks = _ticks(asset, raw_ask)
        if bid_ticks is None or ask_ticks is None:
            self.dropped["bad_price"] += 1
            return None
        if bid_ticks > ask_ticks:
            self.dropped["crossed"] += 1
            return None
        if ask_ticks > asset.max_price_ticks:
            self.dropped["above_bound"] += 1
            return None
        last = self._last_seq.get(asset.symbol)
        if last is not None and seq < last:
            run = self._stale_run.get(asset.symbol, 0) + 1
            if run <= MAX_STALE_RUN:
                self._stale_run[asset.symbol] = run
                self.dropped["stale_seq"] += 1
                return None
        self._stale_run.pop(asset.symbol, None)
        self._last_seq[asset.symbol] = seq
        bid = asset.ticks_to_price(bid_ticks)
        ask = asset.ticks_to_price(ask_ticks)
        self.accepted += 1
        return MarketDataMessage(asset.symbol, asset.name, bid, ask, mid_price(bid, ask), ts_us,
                                 seq, self.source)

    def stats(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "dropped": dict(self.dropped),
            "ignored": dict(self.ignored),
            "error_frames": self.errors,
        }


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _ticks(asset: Asset, value: object) -> int | None:
    """A Backpack price string as positive ticks, or None (prices on the wire are strings)."""
    if not isinstance(value, str):
        return None
    try:
        return asset.price_to_ticks(value)
    except AmountError:
        return None
