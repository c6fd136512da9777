"""Fixed-point amounts: exact decimal text <-> integer steps, and every way input can be bad."""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction

import pytest
from engine.amounts import MAX_UNITS
from engine.amounts import AmountError
from engine.amounts import ceil_div
from engine.amounts import decimal_places
from engine.amounts import decimal_text_pattern
from engine.amounts import from_units
from engine.amounts import micros_to_money
from engine.amounts import money_to_micros
from engine.amounts import to_units
from engine.assets import DEFAULT_ASSETS
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st


@pytest.mark.parametrize(("value", "decimals", "units"), [
    ("123.45", 2, 12_345),
    ("123.4", 2, 12_340),
    ("0.01", 2, 1),
    ("100", 2, 10_000),
    ("007.50", 1, 75),
    ("1.50000", 2, 150),  # trailing zeros are not extra precision
    ("1." + "0" * 30, 6, 1_000_000),
    ("123456789012.123456", 6, 123_456_789_012_123_456),  # 18 digits: a float rounds it
    (100, 6, 100_000_000),
    (0.1, 2, 10),  # a float is read as the shortest text that round-trips: "0.1"
    (98.97, 2, 9_897),
    (Decimal("0.000001"), 6, 1),
    # a JSON number arrives as a Decimal of its text: exact, exponents allowed
    (Decimal("123456789012.123456"), 6, 123_456_789_012_123_456),
    (Decimal("1.5E+3"), 0, 1_500),
    (Decimal("2500e-2"), 0, 25),
    (Decimal("0e-999999999999999999"), 2, 0),
    (Decimal("-0.0"), 2, 0),
    ("0", 2, 0),
])
def test_valid_amounts(value: object, decimals: int, units: int) -> None:
    assert to_units(value, decimals) == units  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "decimals"), [
    ("1.001", 2),  # too many decimals
    ("0.0000001", 6),
    (0.1 + 0.2, 2),  # 0.30000000000000004
    ("NaN", 2), ("nan", 2), ("Infinity", 2), ("-inf", 2), ("sNaN", 2),
    (float("nan"), 2), (float("inf"), 2), (float("-inf"), 2),
    ("-1", 2), (-1, 2), (-0.01, 2), (Decimal("-5"), 2),  # negative
    ("1e50", 0), ("9" * 30, 2), (2**62 + 1, 0), ("1e-50", 2),  # huge or absurdly small
    (True, 2), (False, 2),  # bools are not numbers here
    ("", 2), ("   ", 2), ("abc", 2), ("1,5", 2), ("0x10", 2), ("1" * 65, 0),
    (None, 2), ([1], 2), (b"1", 2),
    # the strict grammar: digits 0-9, one optional point with digits on both sides, no sign
    # but a '-' where allowed, no spaces, separators, exponents or non-ASCII digits
    (" 7.5 ", 1), ("7.5 ", 1), ("\t7", 0), ("7\n", 0), ("+5", 0), ("1_000", 0), ("1e2", 0),
    ("1E2", 0), ("1.", 0), (".5", 1), ("1.2.3", 2), ("--1", 0), ("٣", 0), ("５", 0),
    ("1٣", 0), ("Infinity", 0),
    # exact: never rounded to fit, whatever the number of digits
    ("100.00000000000000001", 6), ("1." + "0" * 29 + "1", 6), ("0." + "0" * 40 + "1", 6),
    (Decimal("100.00000000000000001"), 6), (Decimal("1e-999999999999999999"), 6),
    (Decimal("1e999999999999999999"), 0), (Decimal("NaN"), 0), (Decimal("-Infinity"), 0),
    (Decimal("4611686018427.387905"), 6),  # MAX_UNITS + 1 micro-dollars
    (-(2**62) - 1, 0), (10**500, 0),
])
def test_invalid_amounts(value: object, decimals: int) -> None:
    with pytest.raises(AmountError):
        to_units(value, decimals)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "message"), [
    ("1" * 65, "decimal text longer than 64 characters"),  # digits alone, yet not read
    ("1." + "0" * 100, "decimal text longer than 64 characters"),
    ("1" * 64, "amount out of range"),
    ("1." + "0" * 58 + "1", "too many decimals: at most 6 allowed"),
    ("1,5", "not a decimal number: expected digits 0-9 with one optional point, like 12.5"),
])
def test_a_refused_amount_says_why(value: str, message: str) -> None:
    """Digits past the length read were refused as not being a decimal number, which they
    are."""
    with pytest.raises(AmountError) as refused:
        to_units(value, 6)
    assert str(refused.value) == message


def test_sign_and_zero_options() -> None:
    assert to_units("-1.5", 1, allow_negative=True) == -15
    assert to_units(Decimal("-2E+1"), 0, allow_negative=True) == -20
    assert to_units(Decimal("-0"), 2) == 0  # a number's negative zero is zero
    with pytest.raises(AmountError, match="negative"):
        to_units("-0", 2)  # text: a '-' only where negatives are allowed (SPEC)
    assert to_units("-0", 2, allow_negative=True) == 0
    with pytest.raises(AmountError, match="negative"):
        to_units("-0.001", 2)  # the sign is the reason, not the decimals
    with pytest.raises(AmountError, match="range"):
        to_units(10**5000, 0)  # refused before its 5001 digits are ever formatted
    with pytest.raises(AmountError, match="greater than zero"):
        to_units("0", 2, allow_zero=False)
    with pytest.raises(AmountError, match="greater than zero"):
        to_units("0.00", 2, allow_zero=False)
    # a signed amount (a margin change) is told that zero, not its sign, is the problem
    for zero in ("0", "-0", "-0.00", 0):
        with pytest.raises(AmountError, match=r"^amount must not be zero$"):
            to_units(zero, 2, allow_zero=False, allow_negative=True)
    assert to_units(MAX_UNITS, 0) == MAX_UNITS


@pytest.mark.parametrize(("units", "decimals", "text"), [
    (12_345, 2, "123.45"), (-5, 3, "-0.005"), (0, 6, "0.000000"), (7, 0, "7"),
    (1, 6, "0.000001"), (-1_000_000, 6, "-1.000000"),
])
def test_format(units: int, decimals: int, text: str) -> None:
    assert from_units(units, decimals) == text


@settings(max_examples=200, deadline=None)
@given(st.integers(-MAX_UNITS, MAX_UNITS), st.integers(0, 12))
def test_format_then_parse_round_trips(units: int, decimals: int) -> None:
    assert to_units(from_units(units, decimals), decimals, allow_negative=True) == units


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**25), st.integers(-30, 30), st.integers(0, 12), st.booleans())
def test_json_numbers_are_exact(mantissa: int, exponent: int, decimals: int,
                                negative: bool) -> None:
    value = Fraction(mantissa) * Fraction(10) ** exponent * (-1 if negative else 1)
    scaled = value * 10**decimals
    number = Decimal(f"{'-' if negative else ''}{mantissa}e{exponent}")
    if scaled.denominator != 1 or abs(scaled) > MAX_UNITS:
        with pytest.raises(AmountError):
            to_units(number, decimals, allow_negative=True)
    else:
        assert to_units(number, decimals, allow_negative=True) == scaled


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789.-+e_ ٣", max_size=10), st.integers(0, 4), st.booleans())
def test_the_documented_pattern_is_the_grammar(text: str, decimals: int, signed: bool) -> None:
    pattern = decimal_text_pattern(decimals, allow_negative=signed)
    try:
        to_units(text, decimals, allow_negative=signed)
        accepted = True
    except AmountError as exc:
        accepted = "range" in str(exc)  # the pattern states the form, not the magnitude
    assert accepted == (re.fullmatch(pattern[1:-1], text) is not None), (text, pattern)


def test_money() -> None:
    assert money_to_micros("10000") == 10_000_000_000
    assert money_to_micros(0.000001) == 1
    assert micros_to_money(-1_500_000) == "-1.500000"
    with pytest.raises(AmountError):
        money_to_micros("0.0000005")


def test_rounding_divisions() -> None:
    assert (ceil_div(7, 2), ceil_div(-7, 2), ceil_div(6, 3), ceil_div(-6, 3)) == (4, -3, 2, -2)


def test_asset_steps() -> None:
    btc, eth = DEFAULT_ASSETS["BTC"], DEFAULT_ASSETS["ETH"]
    assert btc.price_to_ticks("60000.1") == 600_001
    assert btc.qty_to_steps("0.00001") == 1 and btc.steps_to_qty(1_666) == "0.01666"
    assert eth.price_to_ticks("3000.01") == 300_001 and eth.qty_to_steps("0.1166") == 1_166
    with pytest.raises(AmountError):
        btc.price_to_ticks("60000.05")  # finer than BTC's 0.1 step
    with pytest.raises(AmountError):
        eth.qty_to_steps("0.00001")
    with pytest.raises(AmountError):
        btc.price_to_ticks("0")
    assert btc.notional_micros(600_000, 1_666) == 999_600_000  # 60000.0 * 0.01666


def test_decimal_places_as_written() -> None:
    assert [decimal_places(v) for v in ("5", "5.0000000", "0.10", "-1.5", 12,
                                        Decimal("5.0000000"), Decimal("2500E-2"),
                                        Decimal("1E+2"))] == [0, 7, 2, 1, 0, 7, 2, 0]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789.-", max_size=10), st.integers(0, 4))
def test_the_as_written_pattern_is_the_grammar_within_the_places(text: str,
                                                                decimals: int) -> None:
    """The API's documented pattern: the engine's grammar with at most ``decimals`` digits
    after the point as written (what the API refuses beyond the step, zeros included)."""
    pattern = decimal_text_pattern(decimals, allow_negative=True, as_written=True)
    try:
        to_units(text, decimals, allow_negative=True)
        accepted = decimal_places(text) <= decimals
    except AmountError as exc:
        accepted = "range" in str(exc) and decimal_places(text) <= decimals
    assert accepted == (re.fullmatch(pattern[1:-1], text) is not None), (text, pattern)
