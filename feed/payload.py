"""Bounded JSON parsing of untrusted payloads (Backpack frames, Kafka message values).

Whatever arrives, :func:`load_json` either returns the parsed value or raises
:class:`PayloadError` naming one reason (``oversized``, ``too_deep``, ``not_json``); it never
lets another exception through. Nesting is bounded before parsing: the standard parser recurses
once per level and raises RecursionError (or, with a deep call stack, fails earlier) on a
payload like ``[[[[...``.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import numpy as np

MAX_DEPTH = 32  # deepest nesting accepted (the API's bound too); real payloads nest 1-3 levels

# A JSON string literal, or an unclosed one running to the end: every match attempt from a
# quote succeeds in one pass, so the scan is linear (a pattern that needs the closing quote
# fails, and is tried again from each later quote, on an unclosed string full of escaped ones).
_STRING = re.compile(rb'"[^"\\]*(?:\\[\s\S][^"\\]*)*(?:"|\\?\Z)')
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_OPEN = np.frombuffer(b"[{", dtype=np.uint8)


class PayloadError(ValueError):
    """A payload that is not acceptable JSON; ``reason`` is the drop counter's name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def nesting_depth(raw: bytes) -> int:
    """The deepest bracket nesting of ``raw`` outside string literals (0 for a scalar).

    Cost is linear in the size; a payload with few brackets is answered from two counts.
    """
    opened = raw.count(b"[") + raw.count(b"{")
    if opened <= 1:
        return opened
    brackets = _STRING.sub(b'""', raw).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where(np.isin(codes, _OPEN), 1, -1)
    return int(np.cumsum(steps).max(initial=0))


def refuse_constant(name: str) -> Any:
    """``json.loads(..., parse_constant=refuse_constant)``: ``NaN``, ``Infinity`` and
    ``-Infinity``, which Python reads and JSON (RFC 8259) has not, are refused (the topic's
    payloads here, the API's bodies and WebSocket frames in cluster.http)."""
    raise ValueError(f"{name} is not a JSON number")


def load_json(raw: bytes | bytearray | str | None, *, max_bytes: int,
              max_depth: int = MAX_DEPTH) -> object:
    """Parse ``raw`` (UTF-8 bytes or text) as JSON within the size and nesting bounds.

    Raises :class:`PayloadError`: ``oversized`` (longer than ``max_bytes``), ``too_deep``
    (nested deeper than ``max_depth``), ``not_json`` (anything the parser refuses, invalid
    UTF-8, a non-text value). A number with a fraction or an exponent parses as the exact
    :class:`~decimal.Decimal` of its text, never a float; ``NaN``/``Infinity``, which are not
    JSON, are ``not_json`` wherever they stand (the API refuses them too).
    """
    if isinstance(raw, str):
        if len(raw) > max_bytes:
            raise PayloadError("oversized", f"{len(raw)} characters")
        data = raw.encode("utf-8", "surrogatepass")
    elif isinstance(raw, bytes | bytearray):
        data = bytes(raw)
    else:
        raise PayloadError("not_json", f"a {type(raw).__name__}, not text")
    if len(data) > max_bytes:
        raise PayloadError("oversized", f"{len(data)} bytes")
    # no deeper than the brackets it opens (those in strings too): most payloads open fewer
    # than max_depth and are answered by two counts, a frame's full scan cost 8x its parse
    if (data.count(b"[") + data.count(b"{") > max_depth
            and nesting_depth(data) > max_depth):
        raise PayloadError("too_deep", f"nested deeper than {max_depth}")
    try:
        # UTF-8 only, as the API's bodies: json.loads on bytes would also read UTF-16 and
        # UTF-32, which no Backpack frame or producer of the topic sends (and text with a lone
        # surrogate is not UTF-8 either)
        return json.loads(data.decode("utf-8"), parse_float=Decimal,
                          parse_constant=refuse_constant)
    except RecursionError:
        raise PayloadError("too_deep", "parser recursion limit") from None
    except Exception as exc:  # ValueError, UnicodeDecodeError, MemoryError...: never escapes
        raise PayloadError("not_json", type(exc).__name__) from None
