"""Argument types of the benchmarks' options: a value out of range is a usage error (argparse
prints it with the usage and exits 2), never a traceback from deep inside a run."""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

from engine.assets import DEFAULT_ASSETS
from feed.settings import plain_decimal

# a whole number in plain ASCII digits: int() also takes "1_000", "+5", other scripts' digits
_WHOLE = re.compile(r"-?[0-9]{1,18}")


def _number(convert: Callable[[str], float], low: float, low_open: bool,
            what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        plain = text.strip()
        if convert is int:
            value: float = int(plain) if _WHOLE.fullmatch(plain) else math.nan
        else:
            value = plain_decimal(plain)
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


def asset_list(text: str) -> tuple[str, ...]:
    """Names of the registry's assets, comma-separated, any case, each once (``"SOL,btc"``);
    as ASSETS reads them, so "\u017fol" (upper() makes it SOL) and an empty name are refused."""
    names = [n.strip().upper() if n.strip().isascii() else "" for n in text.split(",")]
    if not all(n in DEFAULT_ASSETS for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         f"{', '.join(DEFAULT_ASSETS)} without repeats")
    return tuple(names)


def new_file(text: str) -> str:
    """A path to write a file to once a run is done: checked before the run (which takes
    minutes), so its directory exists and may be written, and it is no directory itself."""
    path = Path(text)
    if not text or path.is_dir() or not path.parent.is_dir() or not os.access(path.parent,
                                                                              os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file path in an existing, "
                                         "writable directory")
    return text


def existing_file(text: str) -> str:
    """A path of a file that exists."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing file")
    return text
