"""MarketDataMessage encoding and the decoder into engine ticks (every drop reason)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.assets import DEFAULT_ASSETS, Asset
from engine.market import Tick
from feed.message import MarketDataMessage, TickDecoder, message_from_ticks, mid_price

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
        (enc(bid=...), "bad_price"),
        (enc(ask=None), "bad_price"),
        (enc(price=...), "bad_price"),
        (enc(bid="0"), "bad_price"),
        (enc(bid="0.00"), "bad_price"),
        (enc(price="0"), "bad_price"),
        (enc(ask="-98.97"), "bad_price"),
        (enc(price="-1"), "bad_price"),
        (enc(ask="NaN"), "bad_price"),
        (enc(price="Infinity"), "bad_price"),
        (b'{"symbol":"SOL_USDC","bid":NaN,"ask":"98.97","price":"1","ts_us":1,"seq":1}',
         "bad_price"),
        (b'{"symbol":"SOL_USDC","bid":"98.96","ask":"98.97","price":Infinity,"ts_us":1}',
         "bad_price"),
        (enc(bid="abc"), "bad_price"),
        (enc(bid=True), "bad_price"),
        (enc(bid="98.961"), "bad_price"),
        (enc(bid="98.98"), "crossed"),
        (enc(ts_us=...), "bad_field"),
        (enc(ts_us="1"), "bad_field"),
        (enc(seq=1.5), "bad_field"),
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


@given(st.sampled_from(DEFAULT_ASSETS.assets), st.integers(1, 10**9), st.integers(0, 10**6),
       st.integers(0, 2**62), st.integers(0, 2**62))
def test_encode_decode_round_trip(asset: Asset, bid_ticks: int, spread: int, ts_us: int,
                                  seq: int) -> None:
    msg = message_from_ticks(asset, bid_ticks, bid_ticks + spread, ts_us, seq, "sim")
    assert isinstance(msg, MarketDataMessage) and msg.key == asset.symbol.encode()
    tick = TickDecoder(DEFAULT_ASSETS).decode(msg.to_json_bytes())
    assert tick == Tick(asset.name, bid_ticks, bid_ticks + spread, ts_us, seq, "sim")
