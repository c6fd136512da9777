"""Fixed-point amounts: exact conversion between decimal text and integer step counts.

Money is an integer count of micro-dollars (``*_micros``); a price is an integer count of its
asset's price step (``*_ticks``); a quantity is an integer count of its quantity step
(``*_steps``). Every step is a power of ten, described by its number of decimals, so conversion
is exact integer arithmetic on the digits, never through a float.

Decimal text has one strict grammar (:data:`DECIMAL_TEXT`): ASCII digits, one optional point
with digits on both sides, and a leading ``-`` only where a negative value is allowed; no
spaces, no ``+``, no ``_``, no exponent, no other Unicode digits. A JSON number, which may carry
an exponent, reaches :func:`to_units` as a :class:`~decimal.Decimal` (or an int) built from its
text, never as a float.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

MONEY_DECIMALS = 6
# Largest magnitude any stored amount may take: int64 columns must never overflow, and the
# products taken in kernels (price * quantity) are done on Python ints, so 2**62 leaves headroom.
MAX_UNITS = 2**62
_MAX_UNITS_DIGITS = len(str(MAX_UNITS))
MAX_DECIMAL_CHARS = 64
"""Longest decimal text accepted (any valid amount is far shorter)."""
DECIMAL_TEXT = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?")
"""The decimal text grammar (``fullmatch``): sign, integer digits, fraction digits."""


class AmountError(ValueError):
    """A value that cannot be an amount: not a number, non-finite, negative, too precise or
    too large."""


def decimal_text_pattern(decimals: int, *, allow_negative: bool = False,
                         as_written: bool = False) -> str:
    """The ECMA-262 regular expression of the decimal text :func:`to_units` accepts for a
    step of ``10**-decimals`` (trailing zeros beyond the step are not extra precision), for
    documents such as an OpenAPI schema; ``as_written``: of the text :func:`decimal_places`
    also keeps within ``decimals`` (no digit after the step, a zero included). Magnitude and
    zero are checked separately."""
    sign = "-?" if allow_negative else ""
    if as_written:
        fraction = rf"(\.[0-9]{{1,{decimals}}})?" if decimals > 0 else ""
    else:
        fraction = rf"(\.[0-9]{{1,{decimals}}}0*)?" if decimals > 0 else r"(\.0+)?"
    return f"^{sign}[0-9]+{fraction}$"


def decimal_places(value: str | int | Decimal) -> int:
    """How many digits ``value`` has after its point as written: a text's, or a JSON number's
    (its exponent: ``5.0000000`` has 7); 0 for an int."""
    if isinstance(value, str):
        _, point, fraction = value.partition(".")
        return len(fraction) if point else 0
    if isinstance(value, Decimal):
        exponent = value.as_tuple().exponent
        return max(0, -exponent) if isinstance(exponent, int) else 0
    return 0


def to_units(value: str | int | float | Decimal, decimals: int, *, allow_zero: bool = True,
             allow_negative: bool = False) -> int:
    """Parse ``value`` into an exact integer count of ``10**-decimals`` steps.

    Accepts decimal text (the strict :data:`DECIMAL_TEXT` grammar), an int, a
    :class:`~decimal.Decimal` (a JSON number read exactly; it may carry an exponent), or a float
    (taken through its shortest ``repr``; only for trusted producers, never for client input).
    Raises :class:`AmountError` for anything that is not a finite number, has more decimals
    than ``decimals``, is negative (unless allowed), zero (unless allowed) or larger than
    :data:`MAX_UNITS` steps.
    """
    if isinstance(value, bool):
        raise AmountError("expected a number, got a boolean")
    if isinstance(value, int):
        if abs(value) > MAX_UNITS:  # before str(): a huge int's text is slow to build
            raise AmountError("amount out of range")
        negative, digits, exponent = value < 0, str(abs(value)), 0
    elif isinstance(value, str):
        if len(value) > MAX_DECIMAL_CHARS:  # before the grammar: digits alone may be this long
            raise AmountError(f"decimal text longer than {MAX_DECIMAL_CHARS} characters")
        match = DECIMAL_TEXT.fullmatch(value)
        if match is None:
            raise AmountError("not a decimal number: expected digits 0-9 with one optional "
                              "point, like 12.5")
        sign, whole, fraction = match.groups()
        negative, digits, exponent = bool(sign), whole + (fraction or ""), -len(fraction or "")
    elif isinstance(value, float | Decimal):
        if isinstance(value, float):
            if not math.isfinite(value):
                raise AmountError("amount must be finite")
            value = Decimal(repr(value))
        if not value.is_finite():
            raise AmountError("amount must be finite")
        sign_bit, digit_tuple, exp = value.as_tuple()
        assert isinstance(exp, int)
        negative, digits, exponent = bool(sign_bit), "".join(map(str, digit_tuple)), exp
    else:
        raise AmountError(f"expected a number or a decimal string, got {type(value).__name__}")
    # decimal text carries a '-' only where negatives are allowed (SPEC), '-0' included; a
    # number's negative zero (a sign bit, not something typed) is zero
    if negative and not allow_negative and (isinstance(value, str) or digits.strip("0")):
        raise AmountError("amount must not be negative")
    units = _scaled(digits, exponent, decimals)
    if negative:
        units = -units
    if units == 0 and not allow_zero:
        # where a negative amount is allowed (a margin removal), "greater than zero" would
        # tell the client that it is not
        raise AmountError("amount must not be zero" if allow_negative
                          else "amount must be greater than zero")
    return units


def _scaled(digits: str, exponent: int, decimals: int) -> int:
    """``int(digits) * 10**(exponent + decimals)``, exactly, or AmountError when that is not an
    integer (too many decimals) or exceeds :data:`MAX_UNITS`; never builds a huge power."""
    significant = digits.lstrip("0")
    if not significant:
        return 0
    trimmed = significant.rstrip("0")
    shift = exponent + decimals + len(significant) - len(trimmed)
    if shift < 0:
        raise AmountError(f"too many decimals: at most {decimals} allowed")
    if len(trimmed) + shift > _MAX_UNITS_DIGITS:
        raise AmountError("amount out of range")
    units = int(trimmed) * 10**shift
    if units > MAX_UNITS:
        raise AmountError("amount out of range")
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


def ceil_div(numerator: int, denominator: int) -> int:
    """Integer division rounded toward plus infinity."""
    return -((-numerator) // denominator)
