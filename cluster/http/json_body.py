"""Reading a JSON request body: nesting depth bounded before parsing, numbers kept exact, a
key given twice refused (in the body, and a parameter the route reads in the query string).

A JSON number with a fraction or an exponent becomes a :class:`~decimal.Decimal` of its text
(never a float), an integer an int (a :class:`~decimal.Decimal` past 40 digits, so no huge int
is ever built); ``NaN`` and ``Infinity`` are refused. An object naming a key twice is refused
too: JSON leaves its meaning open (Python keeps the last value, other parsers the first), so a
proxy or log reading the body could see another order than the platform executes. For the
same reason a query parameter the route reads is refused when given twice (FastAPI took the
last value); one it does not read is ignored.
:class:`ExactJsonRoute` makes FastAPI read every request this way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Coroutine, Iterator
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from cluster.http.errors import invalid
from feed.payload import refuse_constant

MAX_INT_DIGITS = 40
"""Integers longer than this stay Decimals (no int field takes one; amounts refuse them)."""
_OPEN, _CLOSE, _QUOTE, _BACKSLASH = frozenset(b"[{"), frozenset(b"]}"), ord('"'), ord("\\")


def nests_deeper_than(raw: bytes, max_depth: int) -> bool:
    """Whether the JSON text ``raw`` nests arrays/objects deeper than ``max_depth`` (brackets
    inside strings do not count), scanning without recursion and stopping at the first level
    too deep. An ordinary body, with no more opening brackets than ``max_depth``, is answered
    by counting them."""
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return False
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                in_string = False
        elif byte == _QUOTE:
            in_string = True
        elif byte in _OPEN:
            depth += 1
            if depth > max_depth:
                return True
        elif byte in _CLOSE:
            depth -= 1
    return False


def _exact_number(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:  # an exponent beyond +-10**18
        raise ValueError(f"number out of range: {text[:20]}") from None


def _exact_int(text: str) -> int | Decimal:
    return int(text) if len(text) <= MAX_INT_DIGITS else Decimal(text)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's ``pairs`` as a dict; ValueError naming a key given twice
    (``json.loads(..., object_pairs_hook=unique_keys)``)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):  # rare: find which
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {key[:40]!r} given twice")
            seen.add(key)
    return obj


def parse_json(raw: bytes, max_depth: int) -> Any:
    """``raw`` as JSON with exact numbers; ApiError 400 INVALID_REQUEST when it is not JSON
    (or not UTF-8) or nests deeper than ``max_depth``."""
    if nests_deeper_than(raw, max_depth):
        raise invalid(f"JSON nested deeper than {max_depth} levels", 400)
    try:
        # UTF-8 only (RFC 8259 8.1): json.loads on bytes would also read UTF-16 and UTF-32,
        # which a proxy or a log in front of the API may read otherwise
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("malformed JSON: not UTF-8", 400) from None
    try:
        return json.loads(text, parse_float=_exact_number, parse_int=_exact_int,
                          parse_constant=refuse_constant, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as exc:
        raise invalid(f"malformed JSON: {exc.msg} at position {exc.pos}", 400) from None
    except (ValueError, RecursionError) as exc:  # bad UTF-8, NaN, an absurd exponent, a key twice
        raise invalid(f"malformed JSON: {exc}"[:200], 400) from None


def repeated_query_key(query_string: bytes, names: Collection[str]) -> str | None:
    """The first of ``names`` given twice in ``query_string`` (compared once decoded, as the
    routes read them), or None."""
    if not names or b"&" not in query_string:  # the common case: at most one parameter
        return None
    seen: set[str] = set()
    for key, _ in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key in seen:
            return key
        if key in names:
            seen.add(key)
    return None


def _query_names(dependant: Dependant) -> Iterator[str]:
    """The query parameters a route (or a dependency of it) reads."""
    yield from (param.alias for param in dependant.query_params)
    for sub in dependant.dependencies:
        yield from _query_names(sub)


class ExactJsonRequest(Request):
    """A request whose ``json()`` is :func:`parse_json` with the app's nesting limit
    (``app.state.max_json_depth``)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body(), self.app.state.max_json_depth)
        return self._json


class ExactJsonRoute(APIRoute):
    """An APIRoute whose handler reads the body through :class:`ExactJsonRequest`, and which
    refuses (422 INVALID_REQUEST) a query parameter it reads given twice and (400) a body
    under a Content-Encoding, which it does not decode."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        names = frozenset(_query_names(self.dependant))

        async def exact_json_handler(request: Request) -> Response:
            repeated = repeated_query_key(request.scope.get("query_string", b""), names)
            if repeated is not None:
                raise invalid(f"query.{repeated}: given more than once")
            # a compressed body read as JSON fails as "not UTF-8", and one that was never
            # compressed would be acted on under a header that says otherwise
            if any(value.strip().lower() not in ("", "identity")
                   for value in request.headers.getlist("content-encoding")):
                raise invalid("Content-Encoding is not read: send the body uncompressed", 400)
            return await handler(ExactJsonRequest(request.scope, request.receive))

        return exact_json_handler
