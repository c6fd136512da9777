"""Argument types of the benchmarks' options: a value out of range is a usage error (argparse
prints it with the usage and exits 2), never a traceback from deep inside a run."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

# plain ASCII decimal text: int() and float() also take "1_000", "+5", other scripts' digits
# (and float() "1e3", "inf")
_WHOLE = re.compile(r"-?[0-9]{1,18}")
_DECIMAL = re.compile(r"-?([0-9]{1,18}(\.[0-9]{0,18})?|\.[0-9]{1,18})")


def _number(convert: Callable[[str], float], low: float, low_open: bool,
            what: str) -> Callable[[str], float]:
    grammar = _WHOLE if convert is int else _DECIMAL

    def parse(text: str) -> float:
        if not grammar.fullmatch(text.strip()):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        value = convert(text.strip())
        if not math.isfinite(value) or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what  # argparse names the type in its message
    return parse


integer = _number(int, -math.inf, False, "a whole number")
positive_int = _number(int, 0, True, "a whole number > 0")
nonneg_int = _number(int, 0, False, "a whole number >= 0")
duration = _number(float, 0, True, "a number of seconds > 0")
duration_or_zero = _number(float, 0, False, "a number of seconds >= 0")
rate = _number(float, 0, True, "a number > 0")


def share(text: str) -> float:
    """A fraction in (0, 1]."""
    value = rate(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1]")
    return value


def int_list(text: str) -> list[int]:
    """A comma-separated list of whole numbers > 0 (``"1,64"``)."""
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole "
                                         "numbers > 0")
    return [int(positive_int(p)) for p in parts]
