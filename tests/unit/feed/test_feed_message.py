"""MarketDataMessage encoding and the decoder into engine ticks (every drop reason, every
bound)."""

from __future__ import annotations

import json

import pytest
from engine.assets import DEFAULT_ASSETS
from engine.assets import Asset
from engine.events import TickApplied
from engine.events import encode
from engine.market import Tick
from feed.message import DECODE_DROP_REASONS
from feed.message import MAX_MESSAGE_BYTES
from feed.message import MarketDataMessage
from feed.message import TickDecoder
from feed.message import message_from_ticks
from feed.message import mid_price
from feed.payload import MAX_DEPTH
from feed.settings import FeedBounds
from hypothesis import given
from hypothesis import strategies as st
from tests.unit.feed import strategies

GOOD = {"v": 1, "symbol": "SOL_USDC", "asset": "SOL", "bid": "98.96", "ask": "98.97",
        "price": "98.965", "ts_us": 1788367430246081, "seq": 4330360995, "source": "backpack"}


def enc(**over: object) -> bytes:
    obj = dict(GOOD)
    for k, v in over.items():
        if v is ...:
            obj.pop(k)
        else:
            obj[k] = v
    return json.dumps(obj).encode()


def test_decode_spec_example() -> None:
    dec = TickDecoder(DEFAULT_ASSETS)
    assert dec.decode(enc()) == Tick("SOL", 9896, 9897, 1788367430246081, 4330360995, "backpack")
    assert dec.decoded == 1 and not dec.dropped


def test_asset_may_be_left_out() -> None:
    dec = TickDecoder(DEFAULT_ASSETS)
    assert dec.decode(enc(asset=...)) == dec.decode(enc())
    assert dec.decoded == 2 and not dec.dropped


def test_unknown_fields_are_ignored_and_numbers_accepted() -> None:
    dec = TickDecoder(DEFAULT_ASSETS)
    tick = dec.decode(enc(extra={"x": 1}, v=7, bid=98.96, ask=99, price=98.98))
    assert tick == Tick("SOL", 9896, 9900, 1788367430246081, 4330360995, "backpack")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"not json", "not_json"),
        (b"\xff\xfe", "not_json"),
        (b"[1,2]", "not_json"),
        (b"null", "not_json"),
        (None, "not_json"),
        (enc(symbol="DOGE_USDC"), "unknown_symbol"),
        (enc(symbol=...), "unknown_symbol"),
        # the asset contradicts the symbol: which market does the price belong to?
        (enc(asset="BTC"), "unknown_symbol"),
        (enc(asset="sol"), "unknown_symbol"),
        (enc(asset=None), "unknown_symbol"),
        (enc(symbol="BTC_USDC"), "unknown_symbol"),
        (enc(bid=...), "bad_price"),
        (enc(ask=None), "bad_price"),
        (enc(price=...), "bad_price"),
        *[(enc(**{side: text}), "bad_price") for text in strategies.INVALID_PRICE_TEXTS
          for side in ("bid", "ask")],
        (enc(price="0"), "bad_price"),
        # bid and ask in the strict decimal grammar too
        *[(enc(bid=text), "bad_price") for text in (" 98.96", "98.96 ", "+98.96", "9.896e1",
                                                   "98,96", "98.96.0", ".96", "98.")],
        # the mid has one decimal more than the step, in the strict decimal grammar
        *[(enc(price=text), "bad_price")
          for text in ("98.9651", "0.0001", "+98.965", " 98.965", "9_8.965",
                       "\u0669\u0668.\u0669\u0666", "1e2")],
        # a JSON number is read exactly: off the step by 1e-16 is off the step
        (b'{"symbol":"SOL_USDC","bid":98.9600000000000001,"ask":"98.97","price":"98.965",'
         b'"ts_us":1788367430246081}', "bad_price"),
        (enc(price="-1"), "bad_price"),
        (enc(price="Infinity"), "bad_price"),
        # NaN and Infinity are no JSON (the API refuses them as such): wherever they stand,
        # an extra field's too, which was accepted
        (b'{"symbol":"SOL_USDC","bid":NaN,"ask":"98.97","price":"1","ts_us":1,"seq":1}',
         "not_json"),
        (b'{"symbol":"SOL_USDC","bid":"98.96","ask":"98.97","price":Infinity,"ts_us":1}',
         "not_json"),
        (enc()[:-1] + b',"x":-Infinity}', "not_json"),
        (enc()[:-1] + b',"x":[NaN]}', "not_json"),
        (enc(bid=True), "bad_price"),
        # the mid must be exactly (bid + ask) / 2 of the same message
        (enc(price="5000"), "bad_price"),
        (enc(price="98.96"), "bad_price"),
        (enc(price="98.97"), "bad_price"),
        (enc(bid="98.90", price="98.965"), "bad_price"),
        (enc(bid="98.98"), "crossed"),
        (enc(ts_us=...), "bad_field"),
        (enc(ts_us="1"), "bad_field"),
        (enc(ts_us=True), "bad_field"),
        (enc(ts_us=0), "bad_field"),
        (enc(ts_us=-1788367430246081), "bad_field"),
        (enc(ts_us=2**63), "bad_field"),
        (enc(ts_us=10**30), "bad_field"),
        (enc(ts_us=1788367430246081.0), "bad_field"),
        (enc(seq=1.5), "bad_field"),
        (enc(seq=-1), "bad_field"),
        (enc(seq=2**63), "bad_field"),
        (enc(source="x" * 65), "bad_field"),
        (enc(ask="1518500.25"), "above_bound"),  # one step above SOL's bound
        (enc(bid="99999999999999.99", ask="99999999999999.99"), "above_bound"),
        (enc(bid="1e30", ask="1e30"), "bad_price"),  # beyond any amount at all
        (enc(bid=-5), "bad_price"),
        (enc(extra="x" * MAX_MESSAGE_BYTES), "oversized"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "too_deep"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "oversized"),
        (b'{"a":' * 600 + b"1" + b"}" * 600, "too_deep"),
        (b'{"symbol":"SOL_USDC","bid":"1.00","ask":"1.01","price":"1.005","ts_us":1', "not_json"),
        (b'{"symbol":"SOL_USDC","bid":"1.00","ask":"1.01","price":"1.005","ts_us":1e999}',
         "bad_field"),
    ],
)
def test_malformed_messages_are_dropped_by_reason(value: bytes | None, reason: str) -> None:
    dec = TickDecoder(DEFAULT_ASSETS)
    assert dec.decode(value) is None
    assert dec.dropped == {reason: 1}
    assert dec.decoded == 0


def test_mid_price_is_exact() -> None:
    assert mid_price("98.96", "98.97") == "98.965"
    assert mid_price("98.96", "98.96") == "98.96"
    assert mid_price("95000.0", "95000.1") == "95000.05"
    assert mid_price("1", "2") == "1.5"


@given(st.sampled_from(DEFAULT_ASSETS.assets), st.integers(1, 10**8), st.integers(0, 10**6),
       st.integers(1, 2**63 - 1), st.integers(0, 2**63 - 1))
def test_encode_decode_round_trip(asset: Asset, bid_ticks: int, spread: int, ts_us: int,
                                  seq: int) -> None:
    msg = message_from_ticks(asset, bid_ticks, bid_ticks + spread, ts_us, seq, "sim")
    assert isinstance(msg, MarketDataMessage) and msg.key == asset.symbol.encode()
    tick = TickDecoder(DEFAULT_ASSETS).decode(msg.to_json_bytes())
    assert tick == Tick(asset.name, bid_ticks, bid_ticks + spread, ts_us, seq, "sim")


def test_bounds_are_inclusive_at_the_asset_maximum() -> None:
    sol = DEFAULT_ASSETS["SOL"]
    top = sol.ticks_to_price(sol.max_price_ticks)
    tick = TickDecoder(DEFAULT_ASSETS).decode(enc(bid=top, ask=top, price=top))
    assert tick is not None and tick.ask_ticks == sol.max_price_ticks


NOW = 1788367430246081
BOUNDS = FeedBounds(max_price_age_us=15_000_000, max_clock_skew_us=5_000_000)


@pytest.mark.parametrize(
    ("ts_us", "reason"),
    [
        (NOW + 5_000_001, "future"),
        (NOW + 10**15, "future"),
        (2**63 - 1, "future"),
        (NOW - 15_000_001, "stale"),
        (1, "stale"),
        (None, None),  # now itself
        (NOW + 5_000_000, None),  # exactly at the skew bound
        (NOW - 15_000_000, None),  # exactly at the age bound
    ],
)
def test_clock_window(ts_us: int | None, reason: str | None) -> None:
    dec = TickDecoder(DEFAULT_ASSETS, BOUNDS)
    tick = dec.decode(enc(ts_us=NOW if ts_us is None else ts_us), now_us=NOW)
    if reason is None:
        assert tick is not None and not dec.dropped
    else:
        assert tick is None and dec.dropped == {reason: 1}


def test_no_clock_no_window() -> None:
    dec = TickDecoder(DEFAULT_ASSETS, BOUNDS)
    assert dec.decode(enc(ts_us=1)) is not None and dec.decode(enc(ts_us=2**63 - 1)) is not None


def test_zero_skew_still_takes_the_present() -> None:
    dec = TickDecoder(DEFAULT_ASSETS, FeedBounds(max_clock_skew_us=0))
    assert dec.decode(enc(ts_us=NOW), now_us=NOW) is not None
    assert dec.decode(enc(ts_us=NOW + 1), now_us=NOW) is None
    assert dec.dropped == {"future": 1}


@given(st.binary(max_size=300))
def test_random_bytes_never_raise(value: bytes) -> None:
    dec = TickDecoder(DEFAULT_ASSETS, BOUNDS)
    assert dec.decode(value, now_us=NOW) is None
    assert sum(dec.dropped.values()) == 1
    assert set(dec.dropped) <= set(DECODE_DROP_REASONS)


json_values = strategies.json_values(20, 8, 20)


@given(st.dictionaries(st.sampled_from(["symbol", "bid", "ask", "price", "ts_us", "seq",
                                        "source", "v"]), json_values, max_size=8))
def test_random_json_objects_never_raise(obj: dict[str, object]) -> None:
    dec = TickDecoder(DEFAULT_ASSETS, BOUNDS)
    try:
        raw = json.dumps(obj).encode()
    except ValueError:
        return
    tick = dec.decode(raw, now_us=NOW)
    assert (tick is None) == (sum(dec.dropped.values()) == 1)
    assert set(dec.dropped) <= set(DECODE_DROP_REASONS)


@pytest.mark.parametrize("source", [
    "", "a\u0000", "a\n", "\u202egnp", "a\u200bb", "\ud800", "\t", "a\u2028b", 5, None, True,
    {}, ["backpack"], 1.5])
def test_a_source_the_api_could_not_show_as_it_is_is_dropped(source: object) -> None:
    """``source`` goes on to ``/prices``, the ``bookTicker`` stream and the terminal's label as
    it is: a NUL, a line break, a direction override or a lone surrogate there, or an empty
    label, was accepted and shown; a value that is not text read ``unknown``. Each is dropped
    as ``bad_field``; a source not given still reads ``unknown``."""
    dec = TickDecoder(DEFAULT_ASSETS)
    assert dec.decode(enc(source=source)) is None
    assert dec.dropped == {"bad_field": 1}
    tick = dec.decode(enc(source=...))
    assert tick is not None and tick.source == "unknown"
    assert dec.decode(enc(source="sim 2 (é)")) is not None


@pytest.mark.parametrize("source", ["\U0001F600" * 16, "\u00e9" * 32, "\u20ac" * 21, "x" * 64])
def test_a_source_the_decoder_accepts_fits_the_journal(source: str) -> None:
    """``source`` is journaled with every tick a shard applies, behind a one-byte length. Its
    bound was 64 characters, and 64 characters of four UTF-8 bytes do not fit that length: the
    decoder took the tick (the feed showed the price and built candles from it) and every shard
    then refused it, unable to journal it. The bound is on the bytes now."""
    dec = TickDecoder(DEFAULT_ASSETS)
    tick = dec.decode(enc(source=source))
    assert tick is not None and tick.source == source
    encode(TickApplied(tick.bid_ticks, tick.ask_ticks, tick.ts_us, tick.seq, tick.source))
    for longer in ("\U0001F600" * 17, "\u00e9" * 33, "\u20ac" * 22, "\U0001F600" * 64):
        assert dec.decode(enc(source=longer)) is None
    assert dec.dropped == {"bad_field": 4}
