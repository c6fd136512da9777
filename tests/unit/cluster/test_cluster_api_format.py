"""The API's fast formatters agree with the engine's exact ones."""

from __future__ import annotations

from datetime import UTC
from datetime import datetime
from datetime import timedelta

from cluster.http.api import decimal_text
from cluster.http.api import iso_us
from engine.amounts import from_units
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
