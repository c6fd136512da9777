"""Decimal request fields: what the validator lets through (never a float), the 422 naming
the field, and the schema stating the grammar the parser applies."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated

import pytest
from cluster.http.decimals import EXACT_DECIMAL
from cluster.http.decimals import DecimalValue
from cluster.http.decimals import decimal_schema
from cluster.http.decimals import money_micros
from cluster.http.decimals import price_ticks
from cluster.http.errors import ApiError
from engine.assets import DEFAULT_ASSETS
from pydantic import BaseModel
from pydantic import ValidationError
from pydantic import WithJsonSchema

BTC = DEFAULT_ASSETS["BTC"]  # price step 0.1


class Body(BaseModel):
    margin: Annotated[DecimalValue, EXACT_DECIMAL, WithJsonSchema(decimal_schema(6))]


@pytest.mark.parametrize("value", ["12.5", 12, Decimal("12.5"), Decimal("1.25E+1")])
def test_text_and_exact_numbers_pass_unchanged(value: DecimalValue) -> None:
    assert Body.model_validate({"margin": value}).margin == value


@pytest.mark.parametrize("value", [12.5, True, None, [1], {"a": 1}])
def test_anything_else_is_refused_a_float_included(value: object) -> None:
    with pytest.raises(ValidationError):
        Body.model_validate({"margin": value})


def test_conversions_name_the_field() -> None:
    assert money_micros(Decimal("1e1"), "margin") == 10_000_000
    assert money_micros("-2.5", "amount", allow_negative=True) == -2_500_000
    for value, field in (("0", "margin"), ("1.0000001", "margin"), ("-1", "margin")):
        with pytest.raises(ApiError) as refused:
            money_micros(value, field)
        assert refused.value.status_code == 422 and refused.value.message.startswith(field)
    assert price_ticks(BTC, "60000.1", "takeProfit") == 600_001
    assert price_ticks(BTC, None, "takeProfit") is None
    too_high = BTC.ticks_to_price(BTC.max_price_ticks + 1)
    for value in ("60000.05", "0", too_high):
        with pytest.raises(ApiError) as refused:
            price_ticks(BTC, value, "stopLoss")
        assert refused.value.message.startswith("stopLoss:")


def test_the_schema_states_the_grammar_and_range() -> None:
    schema = Body.model_json_schema()["properties"]["margin"]
    text, number = schema["anyOf"]
    pattern = re.compile(text["pattern"])
    assert all(pattern.search(t) for t in ("10", "0.000001", "1.500000"))
    # more decimals than the step, zeros included, is refused (SPEC): the pattern says so
    assert not any(pattern.search(t) for t in ("1e1", " 1", "+1", "-1", "1.", "1.0000001",
                                                "1.5000000"))
    assert number == {"type": "number", "exclusiveMinimum": 0, "maximum": 2**62 // 10**6}
    signed = decimal_schema(6, allow_negative=True)["anyOf"]
    assert re.search(signed[0]["pattern"], "-1.5") and signed[1]["minimum"] == -(2**62 // 10**6)
