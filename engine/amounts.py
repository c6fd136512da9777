"""Fixed-point amounts: exact conversion between decimal text and integer step counts.

Money is an integer count of micro-dollars (``*_micros``); a price is an integer count of its
asset's price step (``*_ticks``); a quantity is an integer count of its quantity step
(``*_steps``). Every step is a power of ten, described by its number of decimals, so conversion
is exact string arithmetic through :class:`decimal.Decimal` and never through a float.
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation

MONEY_DECIMALS = 6
MICROS_PER_USD = 10**MONEY_DECIMALS
# Largest magnitude any stored amount may take: int64 columns must never overflow, and the
# products taken in kernels (price * quantity) are done on Python ints, so 2**62 leaves headroom.
MAX_UNITS = 2**62


class AmountError(ValueError):
    """A value that cannot be an amount: not a number, non-finite, negative, too precise or
    too large."""


def to_units(value: str | int | float | Decimal, decimals: int, *, allow_zero: bool = True,
             allow_negative: bool = False) -> int:
    """Parse ``value`` into an exact integer count of ``10**-decimals`` steps.

    Accepts a decimal string, an int, or a float (taken through its shortest ``repr``, the
    number the client wrote in JSON). Raises :class:`AmountError` for anything that is not a
    finite number, has more decimals than ``decimals``, is negative (unless allowed), zero
    (unless allowed) or larger than :data:`MAX_UNITS` steps.
    """
    if isinstance(value, bool):
        raise AmountError("expected a number, got a boolean")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AmountError("amount must be finite")
        text = repr(value)
    elif isinstance(value, int | Decimal):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text or len(text) > 64:
            raise AmountError("amount must be a short decimal string")
    else:
        raise AmountError(f"expected a number or a decimal string, got {type(value).__name__}")
    try:
        dec = Decimal(text)
    except InvalidOperation:
        raise AmountError(f"not a decimal number: {text!r}") from None
    if not dec.is_finite():
        raise AmountError("amount must be finite")
    if dec.is_signed() and dec != 0 and not allow_negative:
        raise AmountError("amount must not be negative")
    exponent = dec.as_tuple().exponent
    assert isinstance(exponent, int)
    if abs(dec.adjusted()) > 40:
        raise AmountError("amount out of range")
    scaled = dec.scaleb(decimals)
    if scaled != scaled.to_integral_value():
        raise AmountError(f"too many decimals: at most {decimals} allowed")
    units = int(scaled)
    if abs(units) > MAX_UNITS:
        raise AmountError("amount out of range")
    if units == 0 and not allow_zero:
        raise AmountError("amount must be greater than zero")
    return units


def from_units(units: int, decimals: int) -> str:
    """Format an integer count of ``10**-decimals`` steps as a plain decimal string.

    ``from_units(12345, 2) == "123.45"``; ``from_units(-5, 3) == "-0.005"``; always exactly
    ``decimals`` digits after the point (none when ``decimals == 0``).
    """
    units = int(units)
    sign = "-" if units < 0 else ""
    digits = str(abs(units))
    if decimals == 0:
        return sign + digits
    digits = digits.rjust(decimals + 1, "0")
    return f"{sign}{digits[:-decimals]}.{digits[-decimals:]}"


def money_to_micros(value: str | int | float | Decimal, *, allow_zero: bool = True,
                    allow_negative: bool = False) -> int:
    """Parse USD into micro-dollars (see :func:`to_units`)."""
    return to_units(value, MONEY_DECIMALS, allow_zero=allow_zero, allow_negative=allow_negative)


def micros_to_money(micros: int) -> str:
    """Format micro-dollars as a USD decimal string with 6 decimals."""
    return from_units(micros, MONEY_DECIMALS)


def floor_div(numerator: int, denominator: int) -> int:
    """Integer division rounded toward minus infinity (Python's ``//``), named for intent."""
    return numerator // denominator


def ceil_div(numerator: int, denominator: int) -> int:
    """Integer division rounded toward plus infinity."""
    return -((-numerator) // denominator)
