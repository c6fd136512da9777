"""Generated hostile requests to every operation of the OpenAPI document, over a real socket.

Near-valid JSON bodies (each field valid or not, of the wrong type, huge, negative, fractional,
with an exponent or too many decimals, unicode, null; keys missing, extra or given twice;
nesting past the limit), bodies that are not JSON or not what their content type says, odd
queries (repeated, huge, negative, not numbers, unknown intervals and assets) and path ids, sent
with no key, a wrong one, the caller's own, or the key of another account than the ids' owner.

Whatever comes: never a 5xx; a refusal has SPEC's error shape and a code SPEC gives its status;
nobody gets or learns of another account's position or order; and after each batch the ledger
audit is clean and each account's balances, positions and orders are what its 2xx answers say
(the model here applies those answers, and nothing else, to what the accounts held before).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from cluster.config import Settings
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from tests.e2e.api_client import signup
from tests.e2e.api_client import tick
from tests.e2e.http_platform import LocalHttpPlatform

# bid == ask: a tick repeating the price fires nothing. A position's take-profit and stop-loss
# lie beyond its entry, which is then also its closing-side price, and an open or a margin
# removal that the price would liquidate is refused; open orders are cancelled before a tick.
PRICES = {"SOL": "100.00", "BTC": "60000.0", "ETH": "3000.00"}
REFRESH_S = 8.0  # well within MAX_PRICE_AGE_S (15): a trade never meets a stale price (503)
KEEP = 2  # open positions and orders each account holds for the fuzz to aim at
TIDY = 12  # more than this of either, and the oldest are closed or cancelled

CODES: dict[int, set[str]] = {  # SPEC "HTTP API"; 405 in the README, 426 in the document
    400: {"INVALID_REQUEST"},
    401: {"UNAUTHORIZED"},
    404: {"NOT_FOUND"},
    405: {"METHOD_NOT_ALLOWED"},
    409: {"INSUFFICIENT_BALANCE", "PRICE_MOVED", "ORDER_NOT_OPEN", "TOO_MANY_POSITIONS",
          "TOO_MANY_ORDERS"},
    413: {"INVALID_REQUEST"},
    422: {"INVALID_REQUEST", "UNKNOWN_ASSET", "LEVERAGE_OUT_OF_RANGE", "INVALID_TRIGGER",
          "WOULD_LIQUIDATE"},
    426: {"INVALID_REQUEST"},  # GET /ws without an upgrade
    429: {"RATE_LIMITED"},
}
# refusals that could only come from looking at the position or order named: another
# account's must get the 404 an unknown id gets
TELLING = {"INSUFFICIENT_BALANCE", "PRICE_MOVED", "ORDER_NOT_OPEN", "INVALID_TRIGGER",
           "WOULD_LIQUIDATE"}
KINDS = {("POST", "/api/v1/positions/open"): "open",
         ("POST", "/api/v1/positions/close"): "close",
         ("POST", "/api/v1/positions/modify"): "modify",
         ("POST", "/api/v1/positions/margin"): "margin",
         ("POST", "/api/v1/orders"): "order",
         ("DELETE", "/api/v1/orders/{orderId}"): "cancel"}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


# --------------------------------------------------------------------------- JSON, written
@dataclass(frozen=True)
class Num:
    """A JSON number written as ``text`` (Python's json would send a float's repr)."""

    text: str


@dataclass(frozen=True)
class Obj:
    """A JSON object as its pairs in order: a key may come twice."""

    pairs: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Ref:
    """The id of a position or an order (``kind``) of account ``owner``: its ``index``-th
    (modulo) open one, or ended one (``ended``); resolved when the request is sent."""

    kind: str
    owner: str
    index: int
    ended: bool = False
    as_int: bool = False


def dump(value: Any, resolve: Callable[[Ref], Any]) -> str:
    """``value`` as JSON text (lone surrogates escaped, as a client may send them)."""
    if isinstance(value, Ref):
        value = resolve(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Num):
        return value.text
    if isinstance(value, list):
        return "[" + ",".join(dump(v, resolve) for v in value) + "]"
    if isinstance(value, dict):
        value = Obj(tuple(value.items()))
    assert isinstance(value, Obj), value
    return "{" + ",".join(f"{json.dumps(k)}:{dump(v, resolve)}" for k, v in value.pairs) + "}"


@dataclass(frozen=True)
class Body:
    """A request body: ``value`` written as JSON, then ``mangle``d (``cut``: where)."""

    value: Any
    mangle: str = "none"
    cut: int = 0

    def encode(self, resolve: Callable[[Ref], Any]) -> bytes:
        text = dump(self.value, resolve)
        raw = text.encode("utf-8", "surrogatepass")
        match self.mangle:
            case "truncate":
                return raw[:self.cut % max(1, len(raw))]
            case "bad-utf8":
                at = self.cut % (len(raw) + 1)
                return raw[:at] + b"\xff\xc0" + raw[at:]
            case "utf-16":
                return text.encode("utf-16", "surrogatepass")
            case "bom":
                return "\ufeff".encode() + raw
            case "trailing":
                return raw + b" ,}garbage"
            case "nul":
                return raw + b"\x00"
            case "empty":
                return b""
            case "form":
                return b"asset=SOL&type=long&margin=10&leverage=5"
            case "deep":
                depth = 30 + self.cut % 10  # around MAX_JSON_DEPTH (32)
                return b'{"a":' * depth + raw + b"}" * depth
        return raw


MANGLES = ["none"] * 24 + ["truncate", "bad-utf8", "utf-16", "bom", "trailing", "nul", "empty",
                           "form", "deep"]


# --------------------------------------------------------------------------- values
NUMBER_TEXTS = [
    "0", "-0", "1", "-1", "0.0", "-0.0", "1e2", "1E+2", "1e-7", "1E-6", "1e400", "-1e400",
    "1e-400", "1e999999999999999999", "1e-999999999999999999", "2.5", "100.005", "1.0000001",
    "5.0000000", "9223372036854775807", "9223372036854775808", "18446744073709551616",
    "4611686018427387904", "4611686018427.387904", "1" + "0" * 40, "9" * 41, "9" * 300,
    "0.30000000000000004", "10." + "0" * 29 + "1", "1e18", "1e19", "0e0", "0.0000001e7",
    "1.5e-1", "100", "60000.05", "3000.001", "-100", "-0.000001", "100.0", "1e-6", "12e-1",
]
DECIMAL_TEXTS = [
    "NaN", "nan", "Infinity", "-Infinity", "inf", "1e5", "1E-2", " 1", "1 ", "+1", "1_0",
    "١٠", "１０", "𝟙", "0x10", "", "-", ".", ".5", "5.", "1,5", "1.2.3", "--1", "-0", "0",
    "0.000000", "0.0000001", "1.0000000", "100.001", "9" * 64, "9" * 65, "0." + "0" * 63 + "1",
    "4611686018427.387904", "99999999999999999999", "\u0000", "1\u00002", "\ud800", "1\n",
]
TEXTS = ["", " ", "\u0000", "\ud800", "\udfff", "\ud83d", "💥", "\u202e", "ＳＯＬ", "null",
         "true", "{}", "[]", "\\", '"', "\n", "a" * 65]

numbers = st.one_of(st.sampled_from(NUMBER_TEXTS), st.integers(-2**80, 2**80).map(str),
                    st.decimals(allow_nan=False, allow_infinity=False).map(str)).map(Num)
decimal_strings = st.one_of(
    st.sampled_from(DECIMAL_TEXTS),
    st.from_regex(r"-?[0-9]{1,25}(\.[0-9]{1,25})?", fullmatch=True),
    st.decimals(allow_nan=False, allow_infinity=False).map(str))
strings = st.one_of(decimal_strings, st.sampled_from(TEXTS), st.text(max_size=24),
                    st.integers(1, 20_000).map(lambda n: "9" * n))
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)


def nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


hostile = st.one_of(
    scalars,
    st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=6),
    st.integers(28, 40).map(nested))


def money_text(micros: int) -> str:
    return f"{micros // 1_000_000}.{micros % 1_000_000:06d}".rstrip("0").rstrip(".")


def as_number_or_text(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.one_of(text, text.map(Num))


def prices(asset: str, low: int = 500, high: int = 1500) -> st.SearchStrategy[Any]:
    """A price of ``asset`` between ``low`` and ``high`` per mille of its price, on the
    coarsest step (0.1)."""
    return as_number_or_text(st.integers(low, high).map(
        lambda permille: str((Decimal(PRICES[asset]) * permille / 1000).quantize(
            Decimal("0.1")))))


ids = st.builds(Ref, st.sampled_from(["position", "order"]), st.sampled_from(["A", "B"]),
                st.integers(0, 5), st.booleans(), st.booleans())
open_positions = st.builds(Ref, st.just("position"), st.sampled_from(["A", "B"]),
                           st.integers(0, 5), st.just(False), st.booleans())
BAD_IDS = ["0", "-1", "abc", "1.5", "", " 1", "1 ", "+1", "0x1", "٣", "１", str(2**63 - 1),
           str(2**63), str(2**64), "9" * 19, "9" * 20, "9" * 33, "1e3", "\u0000", "💥"]
coids = st.one_of(st.sampled_from(["retry-1", "retry-2"]), st.text(min_size=1, max_size=64),
                  st.sampled_from(TEXTS))
iso_times = st.one_of(
    st.sampled_from(["2030-01-01T00:00:00Z", "2030-01-01T00:00", "9999-12-31T23:59:59.999999Z",
                     "9999-12-31T23:59:59-00:01", "0001-01-01T00:00:00+23:59",
                     "1970-01-01T00:00:00Z", "1970-01-01T00:00:00.000001Z", "2030-02-30T00:00Z",
                     "2030-01-01T24:00:00Z", "2030-01-01T00:00:00+24:00", "2030-W01-1",
                     "2030-01-01 00:00:00", "2030-01-01T00:00:00z", "20300101T000000Z",
                     "2000-01-01T00:00:00Z"]),
    st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?"
                  r"(Z|[+-][0-9]{2}:[0-9]{2})?", fullmatch=True),
    st.datetimes().map(lambda d: d.isoformat()))


def valid(name: str, asset: str) -> st.SearchStrategy[Any]:
    """A value of body field ``name`` that a request on ``asset`` may well have succeed with
    (a level may still lie on the wrong side, a balance fall short)."""
    match name:
        case "asset":
            return st.just(asset)
        case "type":
            return st.sampled_from(["long", "short"])
        case "orderType":
            return st.sampled_from(["limit", "stop"])
        case "margin":
            return as_number_or_text(st.integers(1_000_000, 60_000_000).map(money_text))
        case "amount":  # now and then more than the free balance or the margin
            return as_number_or_text(st.one_of(
                st.integers(-20_000_000, 20_000_000).filter(bool),
                st.sampled_from([20_000_000_000, -20_000_000_000])).map(
                lambda m: ("-" if m < 0 else "") + money_text(abs(m))))
        case "leverage":
            return st.integers(1, 100)
        case "takeProfit" | "stopLoss":
            return st.one_of(st.none(), prices(asset))
        case "currentPrice":
            return prices(asset, 998, 1002)
        case "triggerPrice":
            return prices(asset)
        case "maxSlippageBps":
            return st.integers(0, 10_000)
        case "quantity":
            return as_number_or_text(st.sampled_from(["0.01", "0.1", "0.5", "0.00001", "0.0001",
                                                      "0.001", "1", "0.02", "0.19"]))
        case "positionId":
            return open_positions
        case "expiresAt":
            return st.sampled_from(["2030-01-01T00:00:00Z", "2099-12-31T23:59:59+05:30",
                                    "9999-12-31T23:59:59.999999Z", "2100-01-01T00:00"])
        case "clientOrderId":
            return coids
    raise KeyError(name)


NEAR: dict[str, st.SearchStrategy[Any]] = {  # field-shaped values that are not quite right
    "asset": st.sampled_from(["sol", "Sol", "DOGE", "SOL ", "SOL\u0000", "", "SOL_USDC", "ＳＯＬ"]),
    "type": st.sampled_from(["LONG", "buy", "", "long ", "shorts"]),
    "orderType": st.sampled_from(["market", "LIMIT", "stop_limit", ""]),
    "leverage": st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, 101, -1, 2**63])),
    "maxSlippageBps": st.one_of(st.integers(-2**70, 2**70), st.sampled_from([-1, 10_001])),
    "positionId": st.one_of(ids, st.sampled_from(BAD_IDS), numbers),
    "expiresAt": iso_times,
    "clientOrderId": coids,
}
TYPO = {"stopLoss": "stoploss", "takeProfit": "take_profit", "margin": "Margin",
        "positionId": "positionID", "expiresAt": "expiry", "quantity": "qty"}


def broken(name: str) -> st.SearchStrategy[Any]:
    """A value of field ``name`` that should not pass."""
    return st.one_of(NEAR.get(name, st.nothing()), decimal_strings, numbers, hostile)


@st.composite
def near_valid(draw: st.DrawFn, schema: dict[str, Any]) -> Obj:
    """An object of ``schema``'s fields: valid; or with one thing wrong (a field broken, left
    out, misspelt, added or given twice); or with any number of fields broken."""
    asset = draw(st.sampled_from(list(PRICES)))
    required = set(schema.get("required", ()))
    pairs = [(name, draw(valid(name, asset))) for name in schema["properties"]
             if name in required or draw(st.integers(0, 2)) == 0]
    mode = draw(st.integers(0, 9))
    if 3 <= mode < 8 and pairs:
        at = draw(st.integers(0, len(pairs) - 1))
        name, value = pairs[at]
        match draw(st.sampled_from(["break", "break", "break", "drop", "typo", "extra",
                                    "twice"])):
            case "break":
                pairs[at] = (name, draw(broken(name)))
            case "drop":
                del pairs[at]
            case "typo":
                pairs[at] = (TYPO.get(name, name.upper()), value)
            case "extra":
                pairs.append((draw(st.text(max_size=12)), draw(scalars)))
            case "twice":
                pairs.append((name, draw(st.one_of(st.just(value), valid(name, asset)))))
    elif mode >= 8:
        pairs = [(name, draw(broken(name)) if draw(st.booleans()) else value)
                 for name, value in pairs]
    return Obj(tuple(draw(st.permutations(pairs))))


# --------------------------------------------------------------------------- queries, paths
QUERY_TEXTS = ["", "0", "-1", "1", "50", "500", "501", "1000", "1001", "1e3", "1.5", "abc", " 1",
               "1 ", "+1", "0x10", "١", "1_0", "9" * 19, "9" * 20, "9" * 30, str(2**63),
               "9223372036854", "9223372036855", "1-2", "-", "1-", "-1-1", "0-0",
               "9" * 19 + "-" + "9" * 19, "\u0000", "\ud800", "💥", "true", "null", "[]"]
query_values = st.one_of(st.sampled_from(QUERY_TEXTS), st.integers(-2**70, 2**70).map(str),
                         st.text(max_size=20), st.integers(1, 8_000).map(lambda n: "9" * n))
INTERVALS = ["1m", "5m", "15m", "1h", "4h", "1d"]
NOW_S = int(time.time())
VALID_QUERY: dict[str, st.SearchStrategy[Any]] = {
    "asset": st.sampled_from(list(PRICES)),
    "interval": st.sampled_from(INTERVALS),
    "startTime": st.integers(NOW_S - 86_400 * 30, NOW_S + 86_400).map(str),
    "endTime": st.integers(NOW_S - 86_400, NOW_S + 86_400 * 30).map(str),
    "limit": st.integers(1, 500).map(str),
    "cursor": open_positions,
    "before": st.one_of(st.integers(1, 2**63).map(str), ids),
    "clientOrderId": coids,
}
NEAR_QUERY: dict[str, st.SearchStrategy[Any]] = {
    "asset": st.sampled_from(["DOGE", "sol", "", "SOL_USDC", "SOL,BTC"]),
    "interval": st.sampled_from(["2m", "1w", "1M", "1H", "1m ", "60", ""]),
    "cursor": ids,
}


@st.composite
def query(draw: st.DrawFn, params: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """The operation's query ``params``: valid; or one of them broken, left out or repeated,
    or an unknown one added; or any number broken."""
    names = [p["name"] for p in params if p["in"] == "query"]
    required = {p["name"] for p in params if p["in"] == "query" and p.get("required")}
    out = [(name, draw(VALID_QUERY[name])) for name in names
           if name in required or draw(st.booleans())]
    mode = draw(st.integers(0, 9))
    if 3 <= mode < 8:
        at = draw(st.integers(0, max(0, len(out) - 1)))
        match draw(st.sampled_from(["break", "break", "drop", "twice", "unknown"])):
            case "break" if out:
                name = out[at][0]
                out[at] = (name, draw(st.one_of(NEAR_QUERY.get(name, st.nothing()),
                                                query_values)))
            case "drop" if out:
                del out[at]
            case "twice" if out:
                out.append((out[at][0], draw(st.one_of(VALID_QUERY[out[at][0]], query_values))))
            case _:
                out.append((draw(st.text(min_size=1, max_size=10)), draw(query_values)))
    elif mode >= 8:
        out = [(name, draw(query_values) if draw(st.booleans()) else value)
               for name, value in out]
    return out


path_segments = st.one_of(ids, st.sampled_from(BAD_IDS), st.text(max_size=40))
static_paths = st.lists(st.one_of(
    st.sampled_from(["..", ".", "vendor", "app.js", "index.html", ".hidden", "", "%2e%2e",
                     "etc", "passwd", "\u0000", "a" * 300, "static", "~"]),
    st.text(max_size=12)), min_size=1, max_size=4).map("/".join)


# --------------------------------------------------------------------------- requests
BAD_AUTH = ["", "Bearer", "Bearer wrong-key", "Basic dXNlcjpwYXNz", "Bearer " + "x" * 300,
            "Bearer {key}x", "Bearer {short}", "Token {key}", "Bearer {key},{key}", "{key}",
            "Bearer {key}|Bearer {other}", "Bearer {key}|Bearer {key}"]  # |: another header
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", "application/json; charset=utf-16", "",
                 "application/json;;;", "*/*", "application/jsonx", "text/json"]


@dataclass(frozen=True)
class Call:
    """One request: ``method`` on operation ``path`` (its template) with ``args`` for its
    parameters, as account ``auth`` ("A" or "B" with ``form`` the scheme's spelling, "none",
    or "bad" with ``form`` the Authorization's)."""

    method: str
    path: str
    args: tuple[tuple[str, Any], ...]
    params: tuple[tuple[str, Any], ...]
    body: Body | None
    content_type: str | None
    auth: str
    form: str = ""
    chunked: bool = False


class Document:
    """The OpenAPI document's operations (``(METHOD, path)``: operation) and schemas."""

    def __init__(self, operations: dict[tuple[str, str], dict[str, Any]],
                 schemas: dict[str, Any]) -> None:
        self.operations = operations
        self.schemas = schemas

    def part(self, with_body: bool) -> Document:
        """The operations that take a request body, or those that do not."""
        return Document({k: op for k, op in self.operations.items()
                         if ("requestBody" in op) == with_body}, self.schemas)

    def __repr__(self) -> str:  # short in Hypothesis's reports
        return f"Document({len(self.operations)} operations)"


@st.composite
def calls(draw: st.DrawFn, document: Document) -> Call:
    operations, schemas = document.operations, document.schemas
    method, path = draw(st.sampled_from(sorted(operations)))
    op = operations[method, path]
    args = []
    for param in op.get("parameters", ()):
        if param["in"] == "path":
            segment = static_paths if path.startswith("/static/") else path_segments
            args.append((param["name"], draw(segment)))
    params = draw(query(list(op.get("parameters", ()))))
    body = None
    content = op.get("requestBody", {}).get("content", {}).get("application/json")
    if content is not None or draw(st.integers(0, 9)) == 0:
        ref = (content or {}).get("schema", {}).get("$ref", "")
        schema = schemas.get(ref.rsplit("/", 1)[-1])
        value = draw(near_valid(schema)) if schema else draw(st.one_of(
            st.just({}), hostile, st.dictionaries(st.text(max_size=8), scalars, max_size=3)))
        body = Body(value, draw(st.sampled_from(MANGLES)), draw(st.integers(0, 2**16)))
    content_type = None
    if body is not None:
        roll = draw(st.integers(0, 9))
        content_type = "application/json" if roll < 7 else \
            draw(st.sampled_from(CONTENT_TYPES)) if roll < 9 else None
    auth = draw(st.sampled_from(["A", "A", "A", "A", "B", "B", "none", "bad"]))
    return Call(
        method=draw(st.sampled_from(METHODS)) if draw(st.integers(0, 19)) == 0 else method,
        path=path, args=tuple(args), params=tuple(params), body=body,
        content_type=content_type, auth=auth,
        form=draw(st.sampled_from(BAD_AUTH if auth == "bad" else ["Bearer", "bearer", "BEARER"])),
        chunked=draw(st.integers(0, 9)) == 0)


# --------------------------------------------------------------------------- the model
def encoded(text: str) -> str:
    """``text`` percent-encoded as UTF-8, a lone surrogate too (as the bytes it would be)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def micros(text: str) -> int:
    return int(Decimal(text) * 1_000_000)


POSITION_KEYS = ("asset", "type", "margin", "leverage", "quantity", "entryPrice", "takeProfit",
                 "stopLoss")
ORDER_KEYS = ("asset", "type", "orderType", "triggerPrice", "margin", "leverage", "takeProfit",
              "stopLoss", "expiresAt", "status")
DECIMALS = {"margin", "quantity", "entryPrice", "takeProfit", "stopLoss", "triggerPrice"}


def view(item: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """What a Position or an Order says that only a request may change."""
    return {k: Decimal(item[k]) if k in DECIMALS and item[k] is not None else item[k]
            for k in keys}


def position_view(p: dict[str, Any]) -> dict[str, Any]:
    return view(p, POSITION_KEYS)


@dataclass
class Account:
    """What an account holds, as its 2xx answers said; ``ended``: ids that no longer are."""

    name: str
    headers: dict[str, str]
    free: int
    margin: int = 0
    positions: dict[str, dict[str, Any]] = field(default_factory=dict)
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    ended: dict[str, list[str]] = field(default_factory=lambda: {"position": [], "order": []})
    closes: int = 0  # entries of the position history: whole and partial closes
    answers: dict[tuple[str, str], Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.headers["Authorization"].removeprefix("Bearer ")

    def apply(self, kind: str, answer: dict[str, Any], coids: list[str]) -> None:
        """Account for a 2xx ``answer`` to a request of ``kind`` (its clientOrderId: one of
        ``coids``): a retry's answer is the first one's, and changes nothing."""
        for coid in coids:
            first = self.answers.get((kind, coid))
            if first is not None and first == answer:
                return
        for coid in coids:
            self.answers.setdefault((kind, coid), answer)
        if kind == "open":
            assert answer["positionId"] not in self.positions, answer
            self.positions[answer["positionId"]] = position_view(answer)
            self._lock(micros(answer["margin"]))
        elif kind == "close":
            pid = answer["positionId"]
            assert pid in self.positions, (self.name, "closed what it does not hold", answer)
            closed = micros(answer["margin"])
            self.margin -= closed
            self.free += micros(answer["payout"])
            self.closes += 1
            if answer.get("partial"):
                rest = self.positions[pid]
                rest["margin"] -= Decimal(closed) / 1_000_000
                rest["quantity"] -= Decimal(answer["quantity"])
                assert rest["quantity"] > 0 and rest["margin"] > 0, (rest, answer)
            else:
                del self.positions[pid]
                self.ended["position"].append(pid)
        elif kind in ("modify", "margin"):
            pid = answer["positionId"]
            assert pid in self.positions, (self.name, f"{kind} of what it does not hold", answer)
            before = self.positions[pid]["margin"]
            self.positions[pid] = position_view(answer)
            self._lock(micros(answer["margin"]) - int(before * 1_000_000))
        elif kind == "order":
            assert answer["orderId"] not in self.orders, answer
            self.orders[answer["orderId"]] = view(answer, ORDER_KEYS)
            self._lock(micros(answer["margin"]))
        elif kind == "cancel":
            oid = answer["orderId"]
            assert oid in self.orders and answer["status"] == "cancelled", (self.name, answer)
            self._lock(-micros(answer["margin"]))
            assert self.orders.pop(oid) == {**view(answer, ORDER_KEYS), "status": "open"}
            self.ended["order"].append(oid)

    def _lock(self, amount: int) -> None:
        self.free -= amount
        self.margin += amount


class World:
    """The platform, two accounts A and B, and their model."""

    def __init__(self, platform: LocalHttpPlatform, http: httpx.Client) -> None:
        self.platform = platform
        self.http = http
        self.accounts = {}
        for name in ("A", "B"):
            headers = signup(http)
            self.accounts[name] = Account(name, headers, micros("10000"))
        self.priced_at = 0.0
        document = http.get("/openapi.json").json()
        self.document = Document(
            {(method.upper(), path): op for path, ops in document["paths"].items()
             for method, op in ops.items()}, document["components"]["schemas"])
        self.operations = self.document.operations
        self._coid = 0
        self.log: list[str] = []

    # ------------------------------------------------------------------ upkeep
    def ready(self) -> None:
        """Fresh prices (open orders cancelled first: a tick could fill them), and a few open
        positions and orders for the fuzz to aim at, but not too many."""
        if time.monotonic() - self.priced_at > REFRESH_S:
            for account in self.accounts.values():
                for oid in list(account.orders):
                    self._cancel(account, oid)
            self.log.append("ticks")
            for asset, price in PRICES.items():
                tick(self.platform, self.http, asset, price, price)
            self.priced_at = time.monotonic()
        for account in self.accounts.values():
            for i in range(KEEP - len(account.positions)):
                asset = list(PRICES)[i % 3]
                self._valid(account, "POST", "/api/v1/positions/open", "open", {
                    "asset": asset, "type": "long", "margin": "10", "leverage": 2})
            for i in range(KEEP - len(account.orders)):
                self._valid(account, "POST", "/api/v1/orders", "order", {
                    "asset": "SOL", "type": ("long", "short")[i % 2], "orderType": "limit",
                    "triggerPrice": ("50", "150")[i % 2], "margin": "5", "leverage": 2})
            for pid in list(account.positions)[:-TIDY]:
                self._valid(account, "POST", "/api/v1/positions/close", "close",
                            {"positionId": pid})
            for oid in list(account.orders)[:-TIDY]:
                self._cancel(account, oid)

    def _cancel(self, account: Account, oid: str) -> None:
        self._valid(account, "DELETE", f"/api/v1/orders/{oid}", "cancel", None)

    def _valid(self, account: Account, method: str, url: str, kind: str,
               body: dict[str, Any] | None) -> None:
        """A valid request of ``account``'s, its answer applied to the model."""
        self._coid += 1
        coid = f"upkeep-{self._coid}"
        if kind == "cancel":
            r = self.http.request(method, url, params={"clientOrderId": coid},
                                  headers=account.headers)
        else:
            r = self.http.request(method, url, json={**(body or {}), "clientOrderId": coid},
                                  headers=account.headers)
        self.log.append(f"upkeep {account.name} {method} {url} {body} -> {r.status_code} "
                        f"{r.text[:200]}")
        if r.status_code == 409 and kind in ("open", "order"):
            return  # the fuzz spent the balance, or filled the account up
        assert r.status_code < 300, (method, url, body, r.status_code, r.text)
        account.apply(kind, r.json(), [coid])

    # ------------------------------------------------------------------ one request
    def resolver(self, named: set[str]) -> Callable[[Ref], Any]:
        def resolve(ref: Ref) -> Any:
            pool = self.accounts[ref.owner].ended[ref.kind] if ref.ended else \
                list(self.accounts[ref.owner].positions if ref.kind == "position"
                     else self.accounts[ref.owner].orders)
            if not pool:
                return "1"
            value = pool[ref.index % len(pool)]
            named.add(value)
            return int(value) if ref.as_int else value
        return resolve

    def send(self, call: Call) -> tuple[httpx.Response, set[str], bytes | None]:
        """Send ``call``; the answer, the accounts whose ids it named, the body sent."""
        named: set[str] = set()
        resolve = self.resolver(named)
        url = call.path
        for name, value in call.args:
            segment = str(resolve(value) if isinstance(value, Ref) else value)
            segment = "/".join(encoded(s) for s in segment.split("/")) \
                if call.path.startswith("/static/") else encoded(segment)
            url = url.replace("{" + name + "}", segment)
        params = [(k, str(resolve(v)) if isinstance(v, Ref) else v) for k, v in call.params]
        if params:  # percent-encoded here: httpx cannot encode a lone surrogate
            url += "?" + "&".join(f"{encoded(k)}={encoded(v)}" for k, v in params)
        headers: list[tuple[str, str]] = []
        if call.auth in self.accounts:
            headers.append(("Authorization", f"{call.form} {self.accounts[call.auth].key}"))
        elif call.auth == "bad":
            key, other = self.accounts["A"].key, self.accounts["B"].key
            headers += [("Authorization", value) for value in call.form.format(
                key=key, short=key[:-1], other=other).split("|")]
        if call.content_type is not None:
            headers.append(("Content-Type", call.content_type))
        raw = None if call.body is None else call.body.encode(resolve)
        content: Any = raw
        if raw is not None and call.chunked:
            content = iter([raw[:len(raw) // 2], raw[len(raw) // 2:]])
        self.log.append(f"{call.method} {url} {headers} {raw[:300] if raw else raw!r}")
        r = self.http.request(call.method, url, headers=headers, content=content)
        self.log.append(f"-> {r.status_code} {r.text[:300]}")
        return r, named, raw

    def owners(self, kind: str, named: set[str]) -> set[str]:
        """The accounts that hold (or held) a ``kind`` of one of the ids ``named`` (a position
        and an order may have the same id)."""
        return {a.name for a in self.accounts.values() for i in named
                if i in (a.positions if kind == "position" else a.orders)
                or i in a.ended[kind]}

    def check(self, call: Call, r: httpx.Response, named: set[str], raw: bytes | None) -> None:
        """The answer's contract, then its effect on the model."""
        assert r.status_code < 500, (r.status_code, r.text)
        who = call.auth if call.auth in self.accounts else None
        secured = "security" in self.operations.get((call.method, call.path), {})
        if secured and who is None:
            assert r.status_code >= 400, "served without a key"
        kind = KINDS.get((call.method, call.path))
        target = "order" if kind == "cancel" else \
            "position" if kind in ("close", "modify", "margin") else None
        foreign = self.owners(target, named) - {who} if who and target else set()
        if r.status_code >= 400:
            if call.method != "HEAD":
                assert r.headers["content-type"] == "application/json", r.headers
                body = r.json()
                assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
                assert isinstance(body["error"]["message"], str), body
                code = body["error"]["code"]
                assert code in CODES.get(r.status_code, set()), (r.status_code, code)
                if foreign and call.path != "/api/v1/accounts":
                    assert code not in TELLING, f"tells of {foreign}'s id: {body}"
            if r.status_code == 401:
                assert r.headers.get("www-authenticate") == "Bearer"
            return
        if kind is None or who is None:
            return
        assert not foreign, f"{who} reached {foreign}'s id: {r.text}"
        coids = [v for k, v in call.params if k == "clientOrderId" and isinstance(v, str)]
        if raw is not None and kind != "cancel":
            sent = json.loads(raw)
            if isinstance(sent.get("clientOrderId"), str):
                coids.append(sent["clientOrderId"])
        self.accounts[who].apply(kind, r.json(), coids)

    # ------------------------------------------------------------------ after a batch
    def verify(self) -> None:
        assert self.platform.audit() == []
        for account in self.accounts.values():
            r = self.http.get("/api/v1/state", headers=account.headers)
            assert r.status_code == 200, r.text
            s = r.json()
            assert (micros(s["balances"]["free"]), micros(s["balances"]["margin"])) == \
                (account.free, account.margin), (account.name, s["balances"])
            assert {p["positionId"]: position_view(p) for p in s["positions"]} == \
                account.positions, account.name
            r = self.http.get("/api/v1/orders", headers=account.headers)
            assert r.status_code == 200, r.text
            assert {o["orderId"]: view(o, ORDER_KEYS) for o in r.json()["orders"]} == \
                account.orders, account.name
            for kind, entries in (("positions", account.closes),
                                  ("orders", len(account.ended["order"]))):
                r = self.http.get(f"/api/v1/{kind}/history?limit=500", headers=account.headers)
                assert r.status_code == 200, r.text
                assert len(r.json()[kind]) == min(entries, 500), (account.name, kind)


# --------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def platform() -> Iterator[LocalHttpPlatform]:
    """Rates unlimited: the fuzz sends thousands of requests from one address."""
    with LocalHttpPlatform(Settings(api_key_rate_per_s=0, signups_per_min=0,
                                    public_rate_per_s=0)) as p:
        yield p


@pytest.fixture(scope="module")
def world(platform: LocalHttpPlatform) -> Iterator[World]:
    with httpx.Client(base_url=platform.base_url, timeout=10) as http:
        yield World(platform, http)


# the body strategies name each field of the document's request bodies
BODIES = ("OpenBody", "CloseBody", "ModifyBody", "MarginBody", "OrderBody")


def test_every_operation_and_body_field_is_fuzzed(world: World) -> None:
    """A route or a body field added to the API is covered, or this fails."""
    assert set(KINDS) <= set(world.operations)
    with_body = {key for key, op in world.operations.items() if "requestBody" in op}
    assert with_body == {("POST", "/api/v1/accounts"), *(k for k in KINDS if k[0] == "POST")}
    for name in BODIES:
        for field_name in world.document.schemas[name]["properties"]:
            valid(field_name, "SOL")  # KeyError for a field with no strategy
    for op in world.operations.values():
        for param in op.get("parameters", ()):
            assert param["in"] == "path" or param["name"] in VALID_QUERY, param


BODY_FUZZ = settings(max_examples=500, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.filter_too_much])
QUERY_FUZZ = settings(BODY_FUZZ, max_examples=500)
# In a whole run the session's broker (tests/conftest.py, started by the browser tests) keeps a
# Kafka client that draws from the global random in a thread of its own; Hypothesis takes a
# change of that state while it draws a batch for these strategies' doing (they use none).
OTHER_THREADS_RANDOM = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning")


def _batch(world: World, batch: list[Call]) -> None:
    world.log = []
    world.ready()
    try:
        for call in batch:
            r, named, raw = world.send(call)
            world.check(call, r, named, raw)
        world.verify()
    except AssertionError as exc:  # with what was sent: the state came from earlier examples
        raise AssertionError("\n".join([str(exc), *world.log])) from exc


@OTHER_THREADS_RANDOM
@BODY_FUZZ
@given(data=st.data())
def test_hostile_bodies_are_refused_and_change_nothing(world: World, data: st.DataObject) -> None:
    batch = st.lists(calls(world.document.part(with_body=True)), min_size=1, max_size=6)
    _batch(world, data.draw(batch))


@OTHER_THREADS_RANDOM
@QUERY_FUZZ
@given(data=st.data())
def test_hostile_queries_and_paths_are_refused_and_change_nothing(
        world: World, data: st.DataObject) -> None:
    batch = st.lists(calls(world.document.part(with_body=False)), min_size=1, max_size=6)
    _batch(world, data.draw(batch))
