"""The API's fast formatters agree with the engine's exact ones."""

from __future__ import annotations

from datetime import UTC
from datetime import datetime
from datetime import timedelta

from cluster.http.api import _closed_kline_bytes
from cluster.http.api import decimal_text
from cluster.http.api import iso_us
from cluster.http.api import kline_json
from cluster.http.api import klines_body
from cluster.http.errors import json_bytes
from engine.amounts import from_units
from engine.assets import DEFAULT_ASSETS
from engine.assets import Asset
from engine.candles import Candle
from hypothesis import given
from hypothesis import strategies as st


@given(st.integers(min_value=-(2**63), max_value=2**63), st.integers(min_value=0, max_value=12))
def test_decimal_text_is_from_units(units: int, decimals: int) -> None:
    assert decimal_text(units, decimals) == from_units(units, decimals)


@given(st.integers(min_value=0, max_value=4_000_000_000_000_000))
def test_iso_us_is_exact_to_the_microsecond(ts_us: int) -> None:
    expected = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ts_us)
    assert iso_us(ts_us) == expected.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    parsed = datetime.fromisoformat(iso_us(ts_us).replace("Z", "+00:00"))
    assert parsed == expected


candles = st.builds(
    lambda start_s, prices, ticks, closed: Candle(
        "SOL", "1m", start_s * 60_000_000, *prices, ticks, start_s * 60_000_000, closed),
    st.integers(0, 10**8), st.tuples(*[st.integers(1, 2**62)] * 4), st.integers(1, 10**6),
    st.booleans())


@given(st.lists(candles, max_size=20), st.sampled_from(DEFAULT_ASSETS.assets))
def test_the_klines_body_is_its_candles_json_byte_for_byte(items: list[Candle],
                                                          asset: Asset) -> None:
    """Also when a closed candle comes again, changed (a late tick) or not."""
    for answer in (items, items + [c._replace(tick_count=c.tick_count + 1) for c in items],
                   items):
        assert klines_body(answer, asset) == json_bytes(
            {"klines": [kline_json(c, asset) for c in answer]})


def test_a_closed_candle_s_json_is_made_once() -> None:
    asset = DEFAULT_ASSETS["SOL"]
    closed = Candle("SOL", "1m", 60_000_000, 2, 4, 1, 3, 7, 60_000_001, True)
    klines_body([closed], asset)
    hits = _closed_kline_bytes.cache_info().hits
    klines_body([closed, closed._replace(closed=False)], asset)
    assert _closed_kline_bytes.cache_info().hits == hits + 1
