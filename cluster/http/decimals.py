"""Exact decimal request fields (SPEC "Decimal inputs").

A decimal field takes decimal text (``"12.5"``) or a JSON number, which the body parser
(:mod:`cluster.http.json_body`) hands over as an int or a :class:`~decimal.Decimal` of its text;
a float is refused, so no binary rounding can ever decide an amount. The field's OpenAPI schema
states the grammar (:func:`engine.amounts.decimal_text_pattern`) and the range; the value is
turned into integer units by :func:`money_micros` / :func:`price_ticks` /
:func:`quantity_steps`, whose refusals (more decimals than the step as written, zeros
included, as SPEC says: ``"5.0000000"`` is not a margin; out of range; zero) are a 422 naming
the field.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from pydantic import PlainValidator

from cluster.http.errors import invalid
from engine.amounts import (
    MAX_DECIMAL_CHARS,
    MAX_UNITS,
    MONEY_DECIMALS,
    AmountError,
    decimal_places,
    decimal_text_pattern,
    money_to_micros,
)
from engine.assets import Asset

DecimalValue = str | int | Decimal
"""What a decimal field holds once validated: text, or an exactly read JSON number."""


def _decimal_value(value: Any) -> DecimalValue:
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ValueError("expected a decimal string (like \"12.5\") or a JSON number")
    return value


EXACT_DECIMAL = PlainValidator(_decimal_value)
"""Validator of a decimal field: text or an exact JSON number passes (unchanged, converted
later against its step), anything else (a float included) is refused. Use as
``Annotated[DecimalValue, EXACT_DECIMAL, WithJsonSchema(decimal_schema(...))]``."""


def decimal_schema(decimals: int, *, allow_negative: bool = False,
                   description: str | None = None) -> dict[str, Any]:
    """The JSON schema of a decimal field with at most ``decimals`` decimals, positive or (with
    ``allow_negative``) of any sign: the text grammar as a pattern, or a number in range."""
    bound = MAX_UNITS // 10**decimals
    number: dict[str, Any] = {"type": "number", "maximum": bound}
    if allow_negative:
        number["minimum"] = -bound
    else:
        number["exclusiveMinimum"] = 0
    text = {"type": "string", "maxLength": MAX_DECIMAL_CHARS,
            "pattern": decimal_text_pattern(decimals, allow_negative=allow_negative,
                                            as_written=True)}
    schema: dict[str, Any] = {"anyOf": [text, number]}
    if description:
        schema["description"] = description
    return schema


def money_micros(value: DecimalValue, field: str, *, allow_negative: bool = False) -> int:
    """USD (> 0, or != 0 with ``allow_negative``) as micro-dollars; 422 naming ``field``."""
    try:
        micros = money_to_micros(value, allow_zero=False, allow_negative=allow_negative)
    except AmountError as exc:
        raise invalid(f"{field}: {exc}") from None
    _within_places(value, MONEY_DECIMALS, field, "money step 0.000001")
    return micros


def price_ticks(asset: Asset, value: DecimalValue | None, field: str) -> int | None:
    """A positive price of ``asset`` as ticks (None stays None), at most the largest price a
    tick of it may carry (``Asset.max_price_ticks``); 422 naming ``field``."""
    if value is None:
        return None
    return _bounded(asset, value, field, asset.price_to_ticks, asset.ticks_to_price,
                    asset.max_price_ticks, asset.price_decimals,
                    f"price step {asset.price_step}")


def quantity_steps(asset: Asset, value: DecimalValue | None, field: str) -> int:
    """A positive quantity of ``asset`` as steps (None: 0, which means "all"), at most the
    largest position quantity (``Asset.max_qty_steps``: no position is larger); 422 naming
    ``field``."""
    if value is None:
        return 0
    return _bounded(asset, value, field, asset.qty_to_steps, asset.steps_to_qty,
                    asset.max_qty_steps, asset.qty_decimals, f"quantity step {asset.qty_step}")


def _within_places(value: DecimalValue, decimals: int, field: str, step: str) -> None:
    if decimal_places(value) > decimals:
        raise invalid(f"{field}: too many decimals: at most {decimals} allowed ({step})")


def _bounded(asset: Asset, value: DecimalValue, field: str, parse: Callable[[DecimalValue], int],
             show: Callable[[int], str], largest: int, decimals: int, step: str) -> int:
    try:
        units = parse(value)
    except AmountError as exc:
        raise invalid(f"{field}: {exc} ({step})") from None
    _within_places(value, decimals, field, step)
    if units > largest:
        raise invalid(f"{field}: amount out of range (at most {show(largest)} for {asset.name})")
    return units


__all__ = ["EXACT_DECIMAL", "DecimalValue", "decimal_schema", "money_micros", "price_ticks",
           "quantity_steps"]
