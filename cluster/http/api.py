"""The HTTP API (SPEC "HTTP API"): a FastAPI app over a TradingService.

``create_app(service)`` is all a host needs: the no-Ray baseline and the e2e tests serve it with
plain uvicorn; the Ray Serve replica (cluster.actors.serve_app.ApiIngress) builds its service in its
constructor and returns ``create_app(service)`` to Serve. This is the only place where
integers become decimal strings and decimal input becomes integers.

Every error, including FastAPI's own (validation, unknown route, wrong method, malformed JSON),
has the SPEC shape ``{"error": {"code", "message"}}``. Responses are built as plain dicts and
serialised once (no response-model validation on the hot path); the pydantic models below
validate requests and document the responses in the OpenAPI schema, which states every
constraint the API enforces (decimal patterns, enums, ranges, the limits' 413 and 429).

Hostile input (SPEC "Limits"): bodies are capped while they arrive, whatever the transfer
encoding (cluster.http.limits.BodySizeLimit); JSON is read with its nesting bounded and its
numbers exact (cluster.http.json_body); decimal fields never see a float
(cluster.http.decimals); every authenticated request takes a token from its account's bucket,
every account creation one from its client address's bucket, every read of a public route
(market data, health, metrics, the OpenAPI document) one from another bucket of that address
(429 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import functools
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal, NoReturn, TypeVar

from fastapi import Depends, FastAPI, Path, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    RootModel,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    create_model,
)
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from cluster.actors.port import Unavailable
from cluster.http import server as http_server
from cluster.http.bounds import RETRY_AFTER_S
from cluster.http.decimals import (
    EXACT_DECIMAL,
    DecimalValue,
    decimal_schema,
    money_micros,
    price_ticks,
    quantity_steps,
)
from cluster.http.errors import (
    INTERNAL_ERROR,
    METHOD_NOT_ALLOWED,
    ApiError,
    error_response,
    invalid,
    json_bytes,
    rejected_response,
)
from cluster.http.exposition import CONTENT_TYPE as EXPOSITION_TYPE
from cluster.http.exposition import Exposition
from cluster.http.json_body import MAX_INT_DIGITS, ExactJsonRoute, parse_json
from cluster.http.limits import (
    SITE_SIGNUPS_FACTOR,
    UNKNOWN_KEYS,
    BodySizeLimit,
    PublicRateLimit,
    TokenBuckets,
    client_of,
    retry_after_s,
    site_of,
    too_many,
)
from cluster.http.server import DROPPED, REFUSED
from cluster.live.account_stream import (
    AccountSource,
    AccountStreams,
    AccountTail,
    LedgerTail,
)
from cluster.live.account_topic import TopicTail
from cluster.live.market import Change, current_streams
from cluster.live.streams import StreamHub, StreamLimits, refuse
from cluster.trading.batcher import Reused
from cluster.trading.service import HEALTH_TIMEOUT_S, PositionsCursor, TradingService
from cluster.web.terminal import add_terminal_routes
from engine import schema
from engine.account_events import AccountEvent, Balance
from engine.amounts import MONEY_DECIMALS, micros_to_money
from engine.assets import DEFAULT_ASSETS, Asset, AssetRegistry
from engine.candles import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MAX_QUERY_S,
    Candle,
    CandleQuery,
    half_ticks_to_price,
)
from engine.market import Tick
from engine.messages import (
    ClosedPosition,
    CloseOrder,
    EndedOrder,
    OpenOrder,
    OpenPosition,
    PendingOrder,
    PlaceOrder,
    Principal,
    ShardStats,
)
from engine.order_book import OrderKind, OrderStatus
from engine.orders import Side
from engine.results import Code, Rejected
from feed.pipeline import drop_counts

log = logging.getLogger("shardex.api")
R = TypeVar("R")  # what a handler renders when the service did not refuse

MAX_API_KEY_CHARS = 256
ACTORS_READ_REUSE_S = 1.0
"""How long the checks of ``/healthz``, and the actors' counters in ``/metrics``, also answer
the requests that follow (monitors ask every few seconds)."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# the one form of a time read (ISO 8601's extended calendar form, RFC 3339's profile with the
# seconds optional): datetime.fromisoformat alone also takes week dates, a time without a
# date's separators, a NUL or a newline inside and an offset's minutes past 59 (+00:99 as
# 1 h 39 min); an offset's hours are 00-23 (fromisoformat's refusal of +25:00 is in its own
# terms, timedelta's)
_ISO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?"
                       r"(Z|[+-]([01]\d|2[0-3]):[0-5]\d)?", re.ASCII)

# --------------------------------------------------------------------------- request models
# Every registry the platform can run is a subset of DEFAULT_ASSETS (config.ASSETS), so its
# finest price step and highest leverage bound every asset's; each app's document lists its own
# assets (_document_assets).
_PRICE_DECIMALS = max(a.price_decimals for a in DEFAULT_ASSETS.assets)
_MAX_LEVERAGE = max(a.max_leverage for a in DEFAULT_ASSETS.assets)
Money = Annotated[DecimalValue, EXACT_DECIMAL, WithJsonSchema(decimal_schema(
    MONEY_DECIMALS, description="USD, > 0, at most 6 decimals"))]
Price = Annotated[DecimalValue, EXACT_DECIMAL, WithJsonSchema(decimal_schema(
    _PRICE_DECIMALS, description="> 0, on the asset's price step"))]
Quantity = Annotated[DecimalValue, EXACT_DECIMAL, WithJsonSchema(decimal_schema(
    max(a.qty_decimals for a in DEFAULT_ASSETS.assets),
    description="> 0, on the asset's quantity step, at most the position's quantity (all of "
                "it: a whole close); none: close all"))]
MAX_ID_CHARS = 32
"""The longest position or order id a request may give as text."""


def _position_id_value(value: object) -> int | str:
    """A position id as given: an int, or text of at most MAX_ID_CHARS (one message for any
    other, where pydantic's union named its branches: ``positionId.int: ...``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS:
        return value
    raise PydanticCustomError("position_id", "expected the position's id: a string of its "
                              "digits (an integer is accepted too)")


# A position id that cannot exist (not 1..2**63-1) answers 404 like an unknown one.
PositionId = Annotated[int | str, PlainValidator(_position_id_value),
                       WithJsonSchema({"anyOf": [
                           {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
                           {"type": "string", "pattern": "^[0-9]{1,19}$"}],
                           "description": "the position's id (a decimal string; an integer "
                                          "is accepted too)"})]
ClientOrderId = Annotated[StrictStr, Field(min_length=1, max_length=64)]
_DIGITS = re.compile("[0-9]+")


_PAST_EVERY_BOUND = "9" * 20
"""A query integer above every parameter's bound (2**64 < it)."""


def _digits(value: object) -> object:
    """A query integer as its decimal digits alone: pydantic's lax int also reads a sign,
    spaces, a ``.0`` and underscores (``limit=1_0`` was 10). Digits of any number go on to
    the parameter's bounds, which name them: past 20 digits (leading zeros aside) as
    _PAST_EVERY_BOUND, since pydantic reads no more than 4,300."""
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise PydanticCustomError("int_digits",
                                      "Input should be an integer in decimal digits")
        if len(value.lstrip("0")) > len(_PAST_EVERY_BOUND):
            return _PAST_EVERY_BOUND
    return value


QueryInt = BeforeValidator(_digits)
"""Metadata for an ``int`` query parameter: ``Annotated[int, Query(...), QueryInt]``."""
PageLimit = Annotated[int, Query(ge=1, le=500), QueryInt]
NextCursor = Annotated[str | None, Query(pattern="^[0-9]{1,19}(-[0-9]{1,19})?$",
                                         description="'next' of the previous page")]
OrderCursor = Annotated[str | None, Query(
    pattern="^[0-9]{1,19}$", description="orderId of the last item of the previous page")]
CloseCursor = Annotated[str | None, Query(
    pattern="^[0-9]{1,20}$", description="closeId of the last item of the previous page")]
def _long_int(value: object) -> object:
    """A body integer past MAX_INT_DIGITS digits (parse_json keeps it a Decimal, so no huge
    int is built) as one beyond every bound, of its sign: the field's range names it, where it
    read ``Input should be a valid integer``. A number with a fraction or an exponent of other
    digits stays refused as no integer."""
    if (isinstance(value, Decimal) and value.is_finite() and value.as_tuple().exponent == 0
            and len(value.as_tuple().digits) > MAX_INT_DIGITS):
        return 10 ** MAX_INT_DIGITS if value > 0 else -(10 ** MAX_INT_DIGITS)
    return value


BodyInt = Annotated[StrictInt, BeforeValidator(_long_int)]
"""An ``int`` body field: pydantic's strict int (no text, no bool, no fraction)."""
SlippageBps = Annotated[BodyInt, Field(ge=0, le=10_000)]
AssetName = Annotated[StrictStr, Field(min_length=1, max_length=32,
                                       description="one of the tradable assets")]
# LEVERAGE_OUT_OF_RANGE, not a validation error, answers a leverage outside the range
Leverage = Annotated[BodyInt, Field(description="integer in 1..maxLeverage of the asset",
                                      json_schema_extra={"minimum": 1,
                                                         "maximum": _MAX_LEVERAGE})]


class RequestBody(BaseModel):
    """A request body: a field it does not name is refused (422 ``INVALID_REQUEST``), so a
    misspelt ``stopLoss`` cannot open a position without its stop."""

    model_config = ConfigDict(extra="forbid")


class OpenBody(RequestBody):
    """POST /api/v1/positions/open."""

    model_config = ConfigDict(json_schema_extra={"example": {
        "asset": "SOL", "type": "long", "margin": "100", "leverage": 10,
        "takeProfit": "120", "stopLoss": "95", "currentPrice": "100", "maxSlippageBps": 100,
        "clientOrderId": "my-order-1"}})

    asset: AssetName
    type: Literal["long", "short"]
    margin: Money
    leverage: Leverage
    takeProfit: Price | None = None
    stopLoss: Price | None = None
    currentPrice: Price | None = Field(
        None, description="the price the client saw; only used for the slippage check")
    maxSlippageBps: SlippageBps = 100
    clientOrderId: ClientOrderId | None = None


class ModifyBody(RequestBody):
    """POST /api/v1/positions/modify: a field present sets its level, null removes it, an
    absent one stays as it is."""

    model_config = ConfigDict(json_schema_extra={"example": {
        "positionId": "17179869440", "takeProfit": "125", "stopLoss": None,
        "clientOrderId": "tp-1"}})

    positionId: PositionId
    takeProfit: Price | None = None
    stopLoss: Price | None = None
    clientOrderId: ClientOrderId | None = None


SignedMoney = Annotated[DecimalValue, EXACT_DECIMAL, WithJsonSchema(decimal_schema(
    MONEY_DECIMALS, allow_negative=True,
    description="USD, not 0, at most 6 decimals: > 0 adds margin, < 0 removes it"))]


class MarginBody(RequestBody):
    """POST /api/v1/positions/margin."""

    model_config = ConfigDict(json_schema_extra={"example": {
        "positionId": "17179869440", "amount": "-20", "clientOrderId": "margin-1"}})

    positionId: PositionId
    amount: SignedMoney
    clientOrderId: ClientOrderId | None = None


class OrderBody(RequestBody):
    """POST /api/v1/orders."""

    model_config = ConfigDict(json_schema_extra={"example": {
        "asset": "SOL", "type": "long", "orderType": "limit", "triggerPrice": "95",
        "margin": "100", "leverage": 10, "takeProfit": "110", "stopLoss": "90",
        "expiresAt": "2030-01-01T00:00:00Z", "clientOrderId": "my-order-2"}})

    asset: AssetName
    type: Literal["long", "short"]
    orderType: Literal["limit", "stop"] = Field(
        description="limit: fills at the trigger or better (long: ask <= trigger; short: bid >= "
                    "trigger); stop: fills once the price reaches the trigger, at the tick's "
                    "price (long: ask >= trigger; short: bid <= trigger)")
    triggerPrice: Price
    margin: Money
    leverage: Leverage
    takeProfit: Price | None = None
    stopLoss: Price | None = None
    expiresAt: Annotated[StrictStr, Field(
        min_length=10, max_length=40,
        # documented only: the route refuses a mismatch with its own message (expires_us)
        json_schema_extra={"pattern": f"^{_ISO_TIME.pattern}$"},
        description="ISO-8601 time (UTC unless it names an offset); none: good till "
                    "cancelled")] | None = None
    clientOrderId: ClientOrderId | None = None


class CloseBody(RequestBody):
    """POST /api/v1/positions/close."""

    model_config = ConfigDict(json_schema_extra={"example": {
        "positionId": "17179869440", "quantity": "0.5", "currentPrice": "100",
        "clientOrderId": "close-1"}})

    positionId: PositionId
    quantity: Quantity | None = None
    currentPrice: Price | None = None
    maxSlippageBps: SlippageBps = 100
    clientOrderId: ClientOrderId | None = None


# --------------------------------------------------------------------------- response models
class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail


class AccountOut(BaseModel):
    accountId: str
    apiKey: str
    balance: str


def api_model(name: str, api_fields: tuple[schema.ApiField, ...]) -> type[BaseModel]:
    """A response model with the keys of ``api_fields`` in order, each required, with
    engine.schema.api_annotation's type and the field's description (tools/mypy_records.py
    tells mypy it is a model)."""
    fields: dict[str, Any] = {af.key: (schema.api_annotation(af),
                                       Field(description=af.description))
                              for af in api_fields}
    return create_model(name, **fields)


PositionOut = api_model("PositionOut", schema.API_POSITION)
ClosedPositionOut = api_model("ClosedPositionOut", schema.API_CLOSED_POSITION)
OrderOut = api_model("OrderOut", schema.API_ORDER)


class OrdersOut(BaseModel):
    orders: list[OrderOut]


class BalancesOut(BaseModel):
    free: str
    margin: str
    equity: str


class StateOut(BaseModel):
    accountId: str
    balances: BalancesOut
    positions: list[PositionOut]
    morePositions: bool = Field(
        default=False,
        description="true when the account holds more open positions than listed here (the "
                    "first STATE_POSITIONS, oldest first); GET /api/v1/positions pages them all")
    unavailable: list[str] | None = Field(
        default=None,
        description="Present only when the answer is partial: the shards (e.g. 'shard-SOL-0') "
                    "that did not answer, whose positions are missing. free and margin are "
                    "complete; equity counts the unrealized PnL of the listed positions only. "
                    "Opens and closes on those shards answer 503 until they recover.")


class HistoryOut(BaseModel):
    positions: list[ClosedPositionOut]


class PositionsOut(BaseModel):
    positions: list[PositionOut]
    next: str | None = Field(description="the cursor of the next page; null on the last")


class AssetOut(BaseModel):
    name: str
    symbol: str
    priceStep: str
    quantityStep: str
    maxLeverage: int
    maintenanceMarginRate: str = Field(
        description="the rate of the maintenance margin of a position opened now (rate x "
                    "entry price x quantity), a decimal; 0 liquidates when the loss reaches "
                    "the margin")


class AssetsOut(BaseModel):
    assets: list[AssetOut]


class PriceOut(BaseModel):
    bid: str
    ask: str
    ts: str
    source: str


class PricesOut(RootModel[dict[str, PriceOut]]):
    pass


class KlineOut(BaseModel):
    start: str = Field(description="ISO-8601 UTC start of the interval")
    open: str = Field(description="mid price, decimal string")
    high: str
    low: str
    close: str
    ticks: int = Field(description="ticks the candle was built from")
    closed: bool = Field(description="false for the current candle")


class KlinesOut(BaseModel):
    klines: list[KlineOut]


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable"]
    components: dict[str, str]
    feedSources: dict[str, str] = Field(
        default_factory=dict, description="asset -> source of its newest price")
    priceAgesS: dict[str, float] = Field(
        default_factory=dict, description="asset -> age of its newest price, seconds")
    stalePrices: list[str] = Field(
        default_factory=list, description="assets whose newest price is older than "
                                          "MAX_PRICE_AGE_S: opens and closes on them answer "
                                          "503 PRICE_UNAVAILABLE")
    error: ErrorDetail | None = None


_ERROR_DESCRIPTIONS = {
    400: "INVALID_REQUEST: the body is not JSON, or nests deeper than the limit; more than "
         "one Authorization header",
    401: "UNAUTHORIZED: missing or wrong API key",
    404: "NOT_FOUND",
    409: "INSUFFICIENT_BALANCE / PRICE_MOVED / TOO_MANY_POSITIONS / TOO_MANY_ORDERS / "
         "ORDER_NOT_OPEN",
    413: "INVALID_REQUEST: the body is larger than the limit",
    422: "INVALID_REQUEST / UNKNOWN_ASSET / LEVERAGE_OUT_OF_RANGE / INVALID_TRIGGER / "
         "WOULD_LIQUIDATE",
    429: "RATE_LIMITED: too many requests for this API key (or account creations, or reads of "
         "the public routes, from this address; or a new clientOrderId past the account's "
         "MAX_CLIENT_ORDER_IDS); retry after Retry-After seconds",
    503: "PRICE_UNAVAILABLE / SERVICE_UNAVAILABLE (a component did not answer: retry after "
         "Retry-After seconds, with the same clientOrderId)",
}
_ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds until a request may succeed",
                          "required": True, "schema": {"type": "integer", "minimum": 1}}},
    503: {"Retry-After": {"description": "with SERVICE_UNAVAILABLE: seconds until a retry "
                                         "may succeed",
                          "schema": {"type": "integer", "minimum": 1}}},
}
_BODY_ERRORS = (400, 413, 422)  # any route with a JSON body
_AUTH_ERRORS = (400, 401, 429)  # any route behind an API key (400: the key given twice)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error ``statuses`` (all in the SPEC error shape)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in sorted(set(statuses)):
        out[status] = {"model": ErrorOut, "description": _ERROR_DESCRIPTIONS[status]}
        if status in _ERROR_HEADERS:
            out[status]["headers"] = _ERROR_HEADERS[status]
    return out


# --------------------------------------------------------------------------- formatting
@functools.lru_cache(maxsize=4096)
def _iso_second(ts_s: int) -> str:
    return (_EPOCH + timedelta(seconds=ts_s)).strftime("%Y-%m-%dT%H:%M:%S")


def kline_json(candle: Candle, asset: Asset) -> dict[str, Any]:
    """A SPEC ``Kline`` (prices of the mid, exact decimal strings)."""
    price = half_ticks_to_price
    return {"start": f"{_iso_second(candle.start_us // 1_000_000)}Z",
            "open": price(asset, candle.open_half_ticks),
            "high": price(asset, candle.high_half_ticks),
            "low": price(asset, candle.low_half_ticks),
            "close": price(asset, candle.close_half_ticks), "ticks": candle.tick_count,
            "closed": candle.closed}


CLOSED_KLINES_CACHED = 16_384
"""Closed candles whose JSON a replica keeps (a few MB): a closed candle seldom changes (a
late tick only), and the newest thousand of each series are read again by every chart."""


@functools.lru_cache(maxsize=CLOSED_KLINES_CACHED)
def _closed_kline_bytes(candle: Candle, asset: Asset) -> bytes:
    return json_bytes(kline_json(candle, asset))


def klines_body(candles: Iterable[Candle], asset: Asset) -> bytes:
    """The body of ``GET /api/v1/klines``: ``json_bytes({"klines": [kline_json(c, asset) for c
    in candles]})`` byte for byte, each closed candle's part made once (keyed by the whole
    candle, so one a late tick changed is made again)."""
    parts = [_closed_kline_bytes(c, asset) if c.closed else json_bytes(kline_json(c, asset))
             for c in candles]
    return b'{"klines":[' + b",".join(parts) + b"]}"


def book_ticker_json(tick: Tick, asset: Asset) -> dict[str, Any]:
    """The top of book of ``asset`` (the ``bookTicker`` stream and ``GET /api/v1/prices``)."""
    return {"bid": asset.ticks_to_price(tick.bid_ticks),
            "ask": asset.ticks_to_price(tick.ask_ticks), "ts": iso_us(tick.ts_us),
            "source": tick.source}


def iso_us(ts_us: int) -> str:
    """Microseconds since the epoch as ISO 8601 UTC with microseconds (``...T..:..:...Z``)."""
    seconds, micros = divmod(ts_us, 1_000_000)
    return f"{_iso_second(seconds)}.{micros:06d}Z"


def decimal_text(units: int, decimals: int) -> str:
    """``engine.amounts.from_units`` on the hot path (same output, a third of the cost)."""
    if decimals == 0:
        return str(units)
    if units >= 0:
        whole, frac = divmod(units, _SCALES[decimals])
        return f"{whole}.{frac:0{decimals}d}"
    whole, frac = divmod(-units, _SCALES[decimals])
    return f"-{whole}.{frac:0{decimals}d}"


_SCALES = tuple(10**d for d in range(19))


def money(micros: int) -> str:
    return decimal_text(micros, MONEY_DECIMALS)


_FORMATS: dict[str, Callable[[int, Asset], str]] = {
    "price": lambda v, a: decimal_text(v, a.price_decimals),
    "quantity": lambda v, a: decimal_text(v, a.qty_decimals),
    "money": lambda v, a: money(v),
    "time": lambda v, a: iso_us(v)}
_OPEN_JSON = schema.json_renderer(OpenPosition, schema.API_POSITION, _FORMATS)
_CLOSED_JSON = schema.json_renderer(ClosedPosition, schema.API_CLOSED_POSITION, _FORMATS)
_ORDER_JSON = schema.json_renderer(EndedOrder, schema.API_ORDER, _FORMATS)


def order_json(order: PendingOrder | EndedOrder, asset: Asset) -> dict[str, Any]:
    """A SPEC ``Order`` as JSON-ready values (an open order: status ``open``)."""
    if isinstance(order, PendingOrder):
        order = EndedOrder(*order, int(OrderStatus.OPEN), 0, order.placed_ts_us, "")
    return _ORDER_JSON(order, asset)


_LAST_US = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)
"""The last microsecond an ISO 8601 UTC time can name (9999-12-31T23:59:59.999999Z)."""


def expires_us(text: str | None) -> int:
    """``expiresAt`` (ISO 8601; UTC unless it names an offset) in microseconds since the epoch,
    exactly; 0 when not given. 422 naming the field otherwise, and for a time at or before the
    epoch (0 means "no expiry"; such a time is past anyway) or after year 9999 in UTC (which
    the answers could not write back)."""
    if text is None:
        return 0
    if not _ISO_TIME.fullmatch(text):
        raise invalid("expiresAt: not an ISO-8601 time (YYYY-MM-DDTHH:MM[:SS[.ffffff]], then Z "
                      "or +HH:MM, or nothing for UTC)")
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:  # of the form (ASCII, short), a field past its range: named
        raise invalid(f"expiresAt {text}: {exc}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    us = (when - _EPOCH) // timedelta(microseconds=1)
    if us <= 0:
        raise invalid("expiresAt is not in the future")
    if us > _LAST_US:
        raise invalid("expiresAt: after 9999-12-31T23:59:59.999999Z")
    return us


def position_json(p: OpenPosition | ClosedPosition, asset: Asset) -> dict[str, Any]:
    """A SPEC ``Position`` (or ``ClosedPosition``) as JSON-ready values (engine.schema's API
    view of the position)."""
    return (_CLOSED_JSON if isinstance(p, ClosedPosition) else _OPEN_JSON)(p, asset)


def _json(content: Any, status_code: int = 200) -> Response:
    return Response(json_bytes(content), status_code=status_code, media_type="application/json")


def _position_id(value: int | str) -> int | None:
    """The id ``value`` names (ASCII digits, or an int), or None if no position can have it."""
    if isinstance(value, str):
        if not 0 < len(value) <= 19 or not value.isascii() or not value.isdigit():
            return None
        value = int(value)
    return value if 0 < value < 2**63 else None


def _cursor_id(name: str, value: str | None, what: str = "a position id",
               below: int = 1 << 63) -> int | None:
    """The id a paging cursor names (None: from the start): a position's, one laid out like it
    (an order's), or a close's (``below=1 << 64``); 422 if none can exist."""
    if value is None:
        return None
    item_id = int(value)  # ASCII digits: the parameter's pattern lets nothing else through
    if not 0 < item_id < below:
        raise invalid(f"{name}: not {what}")
    return item_id


MAX_NAME_SHOWN = 64
"""A field name longer than this is shown by its start in a refusal."""


def _validation_message(exc: RequestValidationError) -> str:
    """The first three of ``exc``'s errors as ``field: message; ...``, unknown fields first
    (a misspelt field explains the required one said missing)."""
    parts = []
    errors = sorted(exc.errors(), key=lambda err: err.get("type") != "extra_forbidden")
    for err in errors[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            message = "unknown field" + _did_you_mean(loc)
        if len(loc) > MAX_NAME_SHOWN:  # a name the client made up, as long as its body
            loc = loc[:MAX_NAME_SHOWN] + "..."
        parts.append(f"{loc}: {message}")
    return "; ".join(parts) or "invalid request"


def _is_json(content_type: str | None) -> bool:
    """Whether ``content_type`` is one FastAPI reads a body of as JSON."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))


def _did_you_mean(name: str) -> str:
    """`` (did you mean stopLoss?)`` for a name close to a field of a request body, `` of this
    request`` for the very field of another body, else ``""``."""
    known = {f for body in RequestBody.__subclasses__() for f in body.model_fields}
    if name in known:
        return " of this request"
    by_case = [f for f in known if f.lower() == name.lower()]
    close = by_case or difflib.get_close_matches(name[:MAX_NAME_SHOWN], sorted(known), n=1,
                                                 cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


# --------------------------------------------------------------------------- metrics
# the methods counted under their own name; any other a client sends counts as "other" (one
# series per made-up method would grow for as long as clients make them up)
_COUNTED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS",
                              "TRACE", "CONNECT"})


def _route_of(routes: Sequence[BaseRoute], scope: MutableMapping[str, Any]) -> BaseRoute | None:
    """The route the router hands ``scope`` to: its first full match, else its first partial
    one (the path's route asked with a method it does not take); None for neither."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route
        if match is Match.PARTIAL and partial is None:
            partial = route
    return partial


def _route_label(scope: MutableMapping[str, Any], routes: Sequence[BaseRoute],
                 templates: set[str]) -> str:
    """The template (``"/api/v1/orders/{order_id}"``) of the route taking ``scope``, or
    ``other``: one label per route, whatever the path's parameters. The router sets the
    route as it matches; one refused before it did (a 413) is matched here as it would be."""
    route = scope.get("route") or _route_of(routes, scope)
    path = getattr(route, "path", "other")
    return path if path in templates else "other"


class _HttpCounter:
    """Pure-ASGI counter of responses by route and status (a few us per request). It also
    serves ``HEAD`` as the same route's ``GET`` (RFC 9110 9.3.2): the app answers a GET and
    the HTTP server, whose scope still says HEAD, sends its status and headers only.
    ``app_routes``: the router's (:func:`_route_label`); ``routes``: their templates."""

    def __init__(self, app: Callable[..., Awaitable[None]], app_routes: Sequence[BaseRoute],
                 routes: set[str], counts: Counter[tuple[str, str, int]]) -> None:
        self.app = app
        self.app_routes = app_routes
        self.routes = routes
        self.counts = counts

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"] if scope["method"] in _COUNTED_METHODS else "other"
        if method == "HEAD":
            scope = {**scope, "method": "GET"}

        started = False

        def count(status: int) -> None:
            key = (method, _route_label(scope, self.app_routes, self.routes), status)
            self.counts[key] += 1

        async def counting_send(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                count(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            # nothing handled it: Starlette's outermost middleware answers 500 (the app's
            # handler for Exception runs there), outside this counter
            if not started:
                count(500)
            raise


# --------------------------------------------------------------------------- auth
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <apiKey>")


def _refuse_rate(what: str, wait_s: float) -> NoReturn:
    """429 RATE_LIMITED for too many ``what``, with ``Retry-After``."""
    raise ApiError(Code.RATE_LIMITED, too_many(what, wait_s),
                   headers={"Retry-After": str(retry_after_s(wait_s))})


async def _principal(request: Request) -> Principal:
    """The caller, once its API key is known and its bucket has a token for this request.

    The bearer scheme is called here rather than declared as a dependency of its own: FastAPI
    resolves every declared dependency anew on each request, and this one sits on every
    authenticated route. The OpenAPI document still names the scheme (:func:`_document_auth`).

    A request with more than one ``Authorization`` is refused (400, as RFC 6750 3.1 says of a
    repeated credential): the first would act while a proxy or a log in front may read
    another."""
    if len(request.headers.getlist("authorization")) > 1:
        raise invalid("more than one Authorization header", 400)
    credentials = await _bearer(request)
    if credentials is None or not credentials.credentials \
            or len(credentials.credentials) > MAX_API_KEY_CHARS:
        raise ApiError(Code.UNAUTHORIZED, "missing or malformed API key")
    address = request.client.host if request.client is not None else ""
    who = await request.app.state.check_key(credentials.credentials, address)
    if isinstance(who, float):
        _refuse_rate(UNKNOWN_KEYS, who)
    if who is None:
        raise ApiError(Code.UNAUTHORIZED, "unknown API key")
    wait_s = request.app.state.key_buckets.take(who.user)
    if wait_s > 0:
        _refuse_rate("requests for this API key", wait_s)
    return who


def key_checker(service: TradingService, refused: TokenBuckets
                ) -> Callable[[str, str], Awaitable[Principal | float | None]]:
    """``check(api_key, client_address)`` for the REST API and the WebSocket's AUTH alike:
    the key's Principal; None for an unknown key (counted against the address); the seconds
    to wait when the address sent too many unknown keys. A key not seen here costs the ledger
    a lookup: an address that sent many unknown ones is answered from here until its bucket
    fills again (keys it used before pass). A lookup takes its token before it starts, so
    lookups under way at once count too, and gives it back for a key that is known (or when
    the ledger does not answer). A key's requests that arrive while its lookup is under way
    wait for that lookup, which costs one token for them all: a key the replica has not seen
    yet (restarted, or the account made on another replica) may still send its burst at once
    (SPEC), though that is more than its address's budget of unknown keys."""
    looking: dict[str, asyncio.Task[Principal | None]] = {}  # key -> its lookup under way

    async def look_up(api_key: str, address: str) -> Principal | None:
        try:
            who = await service.authenticate(api_key)
        except BaseException:  # no answer: nothing says the key is unknown
            refused.give_back(address)
            raise
        if who is not None:
            refused.give_back(address)
        return who

    def done(api_key: str, lookup: asyncio.Task[Principal | None]) -> None:
        if looking.get(api_key) is lookup:
            del looking[api_key]
        if not lookup.cancelled():
            lookup.exception()  # its callers were given it (when none was left: dropped)

    async def check(api_key: str, address: str) -> Principal | float | None:
        who = service.known(api_key)
        if who is not None:
            return who
        lookup = looking.get(api_key)
        if lookup is None:
            client = client_of(address)
            wait_s = refused.take(client)
            if wait_s > 0:
                return wait_s
            lookup = looking[api_key] = asyncio.ensure_future(look_up(api_key, client))
            lookup.add_done_callback(functools.partial(done, api_key))
        # shielded: a caller that goes away does not cut the lookup the others wait for
        return await asyncio.shield(lookup)
    return check


Caller = Annotated[Principal, Depends(_principal)]


# --------------------------------------------------------------------------- the app
def create_app(service: TradingService) -> FastAPI:
    """The SPEC's HTTP API over ``service`` (routes, OpenAPI at /openapi.json and /docs). The
    limits (body size, JSON depth, rates) are the service's settings."""
    settings = service.settings
    app = FastAPI(title="shardex", version="1.0.0",
                  description="Leveraged crypto trading (isolated margin). Money and prices are "
                              "decimal strings; requests accept a JSON number or a decimal "
                              "string, read exactly. Errors are "
                              '`{"error":{"code","message"}}`.',
                  # the API's figures are its own (/metrics); FastAPI would otherwise look for
                  # an OpenTelemetry provider on every request (5 us each on this machine)
                  telemetry={"tracing": False, "metrics": False, "logs": False},
                  # /docs is served from the vendored Swagger UI (cluster.web.terminal); ReDoc
                  # would load its script from a CDN
                  docs_url=None, redoc_url=None,
                  # a path with a trailing slash is not a route (404), not a redirect whose
                  # Location is made from the client's own Host header
                  redirect_slashes=False)
    app.router.route_class = ExactJsonRoute  # every body is read with exact numbers
    assets = service.assets
    app.state.max_json_depth = settings.max_json_depth
    state_positions = settings.state_positions
    app.state.key_buckets = TokenBuckets(settings.api_key_rate_per_s, settings.api_key_burst)
    # unknown keys per client address: on with the per-key limit, a tenth of its rate
    app.state.check_key = key_checker(service, TokenBuckets(
        settings.api_key_rate_per_s / 10, max(1.0, settings.api_key_burst / 2)))
    signup_buckets = TokenBuckets(settings.signups_per_min / 60, settings.signups_per_min)
    site_signups = SITE_SIGNUPS_FACTOR * settings.signups_per_min
    site_buckets = TokenBuckets(site_signups / 60, site_signups)

    def tradable(name: str) -> Asset:
        """The asset a request names; 422 UNKNOWN_ASSET for any other (case counts)."""
        asset = assets.get(name)
        if asset is None:
            raise ApiError(Code.UNKNOWN_ASSET, f"unknown asset {name[:32]!r}")
        return asset

    def as_position(p: OpenPosition | ClosedPosition) -> dict[str, Any]:
        return position_json(p, assets[p.asset])

    def as_order(o: PendingOrder | EndedOrder) -> dict[str, Any]:
        return order_json(o, assets[o.asset])

    def answer(result: R | Rejected, render: Callable[[R], Any],
               status_code: int = 200) -> Response:
        """``render(result)``, or the refusal. The asset of a position or an order is its
        own: a retry's answer is the first request's, which may name another one."""
        if isinstance(result, Rejected):
            return rejected_response(result)
        return _json(render(result), status_code)

    def position_of(value: int | str, missing: str = "no such open position"
                    ) -> tuple[int, Asset]:
        """The id ``value`` names and the asset of the shard that issued it (positions and
        orders alike); NOT_FOUND (``missing``) when no position or order can have it."""
        item_id = _position_id(value)
        asset = None if item_id is None else service.asset_of_position(item_id)
        if item_id is None or asset is None:
            raise ApiError(Code.NOT_FOUND, missing)
        return item_id, asset

    def positions_json(items: Iterable[OpenPosition | ClosedPosition]) -> list[dict[str, Any]]:
        return [as_position(p) for p in items]

    def orders_json(items: Iterable[PendingOrder | EndedOrder]) -> dict[str, Any]:
        return {"orders": [as_order(o) for o in items]}

    async def state_json(who: Principal) -> dict[str, Any]:
        """The body of ``GET /api/v1/state``."""
        state = await service.state(who)
        shown = state.positions[:state_positions]
        body: dict[str, Any] = {
            "accountId": state.account_id,
            "balances": {"free": money(state.free_micros),
                         "margin": money(state.margin_micros),
                         "equity": money(state.equity_micros)},
            "positions": positions_json(shown),
            "morePositions": len(state.positions) > len(shown),
        }
        if state.unavailable:  # partial: a shard is recovering
            body["unavailable"] = list(state.unavailable)
        return body

    def account_event_json(event: AccountEvent) -> dict[str, Any]:
        """An account stream frame's ``data``: the event's name and seq, then the REST API's
        fields of its object (a balance: ``free`` and ``margin``)."""
        body = event.body
        data: dict[str, Any] = {"event": event.kind, "seq": event.seq}
        if isinstance(body, Balance):
            data.update(free=money(body.free_micros), margin=money(body.margin_micros))
        elif isinstance(body, OpenPosition | ClosedPosition):
            data.update(as_position(body))
        elif isinstance(body, PendingOrder | EndedOrder):
            data.update(as_order(body))
        return data

    async def account_snapshot(who: Principal) -> dict[str, Any]:
        """A ``snapshot`` frame's state: ``GET /api/v1/state``'s body and the open orders."""
        state, orders = await asyncio.gather(state_json(who), service.orders(who))
        return {**state, **orders_json(orders)}

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return error_response(exc.status_code, exc.code.value, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        message = _validation_message(exc)
        if message.startswith("body: ") and not _is_json(request.headers.get("content-type")):
            # FastAPI reads a body as JSON only when its Content-Type says so (``curl -d``
            # says a form): the whole body then fails, as if it were no object at all
            message = "body: send a JSON object with Content-Type: application/json"
        return error_response(422, Code.INVALID_REQUEST.value, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {401: Code.UNAUTHORIZED.value, 404: Code.NOT_FOUND.value,
                405: METHOD_NOT_ALLOWED}.get(exc.status_code, Code.INVALID_REQUEST.value)
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code >= 500:
            code = Code.SERVICE_UNAVAILABLE.value
        headers = exc.headers
        if exc.status_code == 405:
            # Starlette names the methods of the first route that matched the path only; the
            # path's other routes (one per method, same template) allow theirs too
            routes = [r for r in request.app.routes if getattr(r, "methods", None)]
            path = request.url.path
            first = next((r for r in routes if r.path_regex.match(path)), None)
            if first is not None:
                allowed = {m for r in routes if r.path == first.path for m in r.methods}
                if "GET" in allowed:
                    allowed.add("HEAD")
                headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
        return error_response(exc.status_code, code, message, headers)

    @app.exception_handler(Unavailable)
    async def _unavailable(_: Request, exc: Unavailable) -> Response:
        return error_response(503, Code.SERVICE_UNAVAILABLE.value, str(exc),
                              {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> Response:
        log.exception("internal error")
        return error_response(500, INTERNAL_ERROR, "internal error")

    # ------------------------------------------------------------------ accounts
    @app.post("/api/v1/accounts", status_code=201, tags=["accounts"],
              operation_id="createAccount",
              responses={201: {"model": AccountOut}, **_errors(*_BODY_ERRORS, 429, 503)},
              openapi_extra={"requestBody": {"required": False, "content": {
                  "application/json": {"schema": {"type": "object"}}}}})
    async def create_account(request: Request) -> Response:
        """Create an account with the signup balance; the API key is shown only here.

        Account creations are limited per client address (429 with ``Retry-After``)."""
        raw = await request.body()
        if raw.strip() and not isinstance(parse_json(raw, settings.max_json_depth), dict):
            raise invalid("body must be a JSON object (or empty)")
        # the peer as this server sees it, or the client's address that a proxy on this node
        # (API_REPLICAS > 1: HAProxy) appended to X-Forwarded-For (cluster.http.server); behind
        # a proxy elsewhere every client shares its address (and limit): it should limit itself
        address = request.client.host if request.client is not None else ""
        client, site = client_of(address), site_of(address)
        # and per IPv6 /48: its holder has 65,536 /64s, each an address of its own above, and
        # every account is kept for good
        taken = [(signup_buckets, client, "account creations from this address")]
        if site is not None:
            taken.append((site_buckets, site, "account creations from this network (/48)"))
        for at, (buckets, key, what) in enumerate(taken):
            wait_s = buckets.take(key)
            if wait_s > 0:
                for earlier, earlier_key, _ in taken[:at]:
                    earlier.give_back(earlier_key)
                _refuse_rate(what, wait_s)
        try:
            account = await service.create_account()
        except Unavailable:
            # answered 503 with Retry-After: the retry it asks for must not find the token gone
            # (an account the ledger made meanwhile has a key nobody was told: unusable)
            for buckets, key, _ in taken:
                buckets.give_back(key)
            raise
        return _json({"accountId": account.account_id, "apiKey": account.api_key,
                      "balance": micros_to_money(account.balance_micros)}, 201)

    @app.get("/api/v1/state", tags=["accounts"], operation_id="getState",
             responses={200: {"model": StateOut}, **_errors(*_AUTH_ERRORS, 503)})
    async def get_state(who: Caller) -> Response:
        """Balances (free, margin, equity = free + margin + unrealized PnL) and open positions.

        While a shard recovers the answer is still 200 but partial: ``unavailable`` names the
        shards whose positions are missing (equity then counts only the positions listed)."""
        return _json(await state_json(who))

    # ------------------------------------------------------------------ positions
    @app.post("/api/v1/positions/open", status_code=201, tags=["positions"],
              operation_id="openPosition",
              responses={201: {"model": PositionOut, "links": {"ClosePosition": {
                  "operationId": "closePosition",
                  "requestBody": {"positionId": "$response.body#/positionId"},
                  "description": "close the position just opened"}}},
                         **_errors(*_BODY_ERRORS, *_AUTH_ERRORS, 409, 503)})
    async def open_position(body: OpenBody, who: Caller) -> Response:
        """Open a long (at the ask) or a short (at the bid) with an isolated margin."""
        asset = tradable(body.asset)
        order = OpenOrder(
            asset=asset.name,
            side=Side.parse(body.type),
            margin_micros=money_micros(body.margin, "margin"),
            leverage=body.leverage,
            tp_ticks=price_ticks(asset, body.takeProfit, "takeProfit"),
            sl_ticks=price_ticks(asset, body.stopLoss, "stopLoss"),
            current_price_ticks=price_ticks(asset, body.currentPrice, "currentPrice"),
            max_slippage_bps=body.maxSlippageBps,
            client_order_id=body.clientOrderId)
        return answer(await service.open_position(who, order), as_position, 201)

    @app.post("/api/v1/positions/close", tags=["positions"], operation_id="closePosition",
              responses={200: {"model": ClosedPositionOut, "links": {"HistoryBefore": {
                  "operationId": "positionHistory",
                  "parameters": {"before": "$response.body#/closeId"},
                  "description": "the closed positions older than this one"}}},
                         **_errors(*_BODY_ERRORS, *_AUTH_ERRORS, 404, 409, 503)})
    async def close_position(body: CloseBody, who: Caller) -> Response:
        """Close one of your positions at the current bid (long) or ask (short): all of it,
        or ``quantity`` of it (the rest stays open under the same positionId)."""
        position_id, asset = position_of(body.positionId)
        order = CloseOrder(position_id, price_ticks(asset, body.currentPrice, "currentPrice"),
                           body.maxSlippageBps, body.clientOrderId,
                           quantity_steps(asset, body.quantity, "quantity"))
        return answer(await service.close_position(who, order), as_position)

    @app.post("/api/v1/positions/modify", tags=["positions"], operation_id="modifyPosition",
              responses={200: {"model": PositionOut},
                         **_errors(*_BODY_ERRORS, *_AUTH_ERRORS, 404, 503)})
    async def modify_position(body: ModifyBody, who: Caller) -> Response:
        """Set, replace or remove (null) the take-profit and stop-loss of one of your open
        positions, against the current price (a long's TP above the bid and its SL between the
        liquidation price and the bid; a short's the other way round), else 422
        INVALID_TRIGGER."""
        position_id, asset = position_of(body.positionId)
        given = body.model_fields_set

        def level(name: str, value: DecimalValue | None) -> int | None:
            if name not in given:
                return None  # unchanged
            return price_ticks(asset, value, name) or 0  # null: removed

        result = await service.set_levels(
            who, position_id, level("takeProfit", body.takeProfit),
            level("stopLoss", body.stopLoss), body.clientOrderId)
        return answer(result, as_position)

    @app.post("/api/v1/positions/margin", tags=["positions"], operation_id="changeMargin",
              responses={200: {"model": PositionOut},
                         **_errors(*_BODY_ERRORS, *_AUTH_ERRORS, 404, 409, 503)})
    async def change_margin(body: MarginBody, who: Caller) -> Response:
        """Add margin (amount > 0, from your free balance) to one of your open positions, or
        remove it (amount < 0, back to your free balance); its liquidation price is recomputed.
        A removal is refused (422) if the notional would exceed margin x max leverage, the
        position would be liquidatable at the current price, or its stop-loss would no longer
        lie beyond the liquidation price."""
        position_id, _ = position_of(body.positionId)
        amount = money_micros(body.amount, "amount", allow_negative=True)
        return answer(await service.change_margin(who, position_id, amount, body.clientOrderId),
                      as_position)

    @app.get("/api/v1/positions", tags=["positions"], operation_id="listPositions",
             responses={200: {"model": PositionsOut}, **_errors(*_AUTH_ERRORS, 422, 503)})
    async def list_positions(who: Caller, limit: PageLimit = 100,
                             cursor: NextCursor = None
                             ) -> Response:
        """Your open positions, oldest first, paged: ``next`` names where a page ended, and
        stays good when that position closes before the next page is read."""
        after: PositionsCursor | int | None
        if cursor is not None and "-" in cursor:  # "<openedAt us>-<positionId>": a page's end
            opened_ts_us, position_id = cursor.split("-")
            after = PositionsCursor(int(opened_ts_us), int(position_id))
        else:  # a positionId: where an open position is
            after = _cursor_id("cursor", cursor)
        return answer(await service.positions(who, limit, after), lambda page: {
            "positions": positions_json(page[0]),
            "next": None if page[1] is None else f"{page[1].opened_ts_us}-{page[1].position_id}"})

    @app.get("/api/v1/positions/history", tags=["positions"], operation_id="positionHistory",
             responses={200: {"model": HistoryOut}, **_errors(*_AUTH_ERRORS, 422, 503)})
    async def history(who: Caller, limit: PageLimit = 50,
                      before: CloseCursor = None
                      ) -> Response:
        """Your closed positions (whole and partial closes), newest first."""
        result = await service.history(who, limit,
                                       _cursor_id("before", before, "a close id", 1 << 64))
        return answer(result, lambda closed: {"positions": positions_json(closed)})

    # ------------------------------------------------------------------ orders
    @app.post("/api/v1/orders", status_code=201, tags=["orders"], operation_id="placeOrder",
              responses={201: {"model": OrderOut, "links": {"CancelOrder": {
                  "operationId": "cancelOrder",
                  "parameters": {"orderId": "$response.body#/orderId"},
                  "description": "cancel the order just placed"}}},
                         **_errors(*_BODY_ERRORS, *_AUTH_ERRORS, 409, 503)})
    async def place_order(body: OrderBody, who: Caller) -> Response:
        """Place a pending limit or stop order: its margin is locked now; on the first later
        tick that meets its condition it opens a position exactly like a market open at that
        tick's price (ask for a long, bid for a short)."""
        asset = tradable(body.asset)
        order = PlaceOrder(
            asset=asset.name,
            side=Side.parse(body.type),
            kind=OrderKind.parse(body.orderType),
            trigger_ticks=price_ticks(asset, body.triggerPrice, "triggerPrice") or 0,
            margin_micros=money_micros(body.margin, "margin"),
            leverage=body.leverage,
            tp_ticks=price_ticks(asset, body.takeProfit, "takeProfit") or 0,
            sl_ticks=price_ticks(asset, body.stopLoss, "stopLoss") or 0,
            expires_ts_us=expires_us(body.expiresAt),
            client_order_id=body.clientOrderId)
        return answer(await service.place_order(who, order), as_order, 201)

    @app.get("/api/v1/orders", tags=["orders"], operation_id="listOrders",
             responses={200: {"model": OrdersOut}, **_errors(*_AUTH_ERRORS, 503)})
    async def list_orders(who: Caller) -> Response:
        """Your open orders, oldest first."""
        return _json(orders_json(await service.orders(who)))

    @app.get("/api/v1/orders/history", tags=["orders"], operation_id="orderHistory",
             responses={200: {"model": OrdersOut}, **_errors(*_AUTH_ERRORS, 422, 503)})
    async def order_history(who: Caller, limit: PageLimit = 50,
                            before: OrderCursor = None) -> Response:
        """Your ended orders (filled, cancelled, expired, rejected), newest first."""
        result = await service.order_history(who, limit,
                                                  _cursor_id("before", before, "an order id"))
        return answer(result, orders_json)

    @app.delete("/api/v1/orders/{orderId}", tags=["orders"], operation_id="cancelOrder",
                responses={200: {"model": OrderOut},
                           **_errors(*_AUTH_ERRORS, 404, 409, 422, 503)})
    async def cancel_order(orderId: Annotated[str, Path(
            max_length=MAX_ID_CHARS, description="the order's id")], who: Caller,
            request: Request,
            clientOrderId: Annotated[str | None, Query(
                min_length=1, max_length=64,
                description="makes the cancel idempotent: a retry gets the first answer")]
            = None) -> Response:
        """Cancel one of your open orders: its margin is released. 409 ORDER_NOT_OPEN when it
        has already filled, expired, been rejected or cancelled."""
        if await request.body():  # its clientOrderId would be dropped: a retry cancels again
            raise invalid("a cancel takes no body: give clientOrderId as ?clientOrderId=")
        order_id, _ = position_of(orderId, "no such open order")
        return answer(await service.cancel_order(who, order_id, clientOrderId), as_order)

    # ------------------------------------------------------------------ market
    assets_body = json_bytes({"assets": [
        {"name": a.name, "symbol": a.symbol, "priceStep": a.price_step,
         "quantityStep": a.qty_step, "maxLeverage": a.max_leverage,
         "maintenanceMarginRate": settings.maintenance_margin_rate} for a in assets.assets]})

    @app.get("/api/v1/assets", tags=["market"], operation_id="getAssets",
             responses={200: {"model": AssetsOut}, **_errors(429)})
    async def get_assets() -> Response:
        """The tradable assets: their steps, leverage limits and maintenance margin rate."""
        return Response(assets_body, media_type="application/json")

    @app.get("/api/v1/prices", tags=["market"], operation_id="getPrices",
             responses={200: {"model": PricesOut}, **_errors(429, 503)})
    async def get_prices() -> Response:
        """The newest bid/ask of each asset that has one."""
        ticks: dict[str, Tick] = await service.prices()
        return _json({name: book_ticker_json(t, assets[name]) for name, t in ticks.items()})

    @app.get("/api/v1/klines", tags=["market"], operation_id="getKlines",
             responses={200: {"model": KlinesOut}, **_errors(422, 429, 503)})
    async def get_klines(
            asset: Annotated[str, Query(min_length=1, max_length=32,
                                        description="one of the tradable assets")],
            interval: Annotated[Literal["1m", "5m", "15m", "1h", "4h", "1d"], Query()],
            startTime: Annotated[int | None, Query(
                ge=0, le=MAX_QUERY_S, description="unix seconds: candles starting at or after "
                                                  "it, the oldest first"), QueryInt] = None,
            endTime: Annotated[int | None, Query(
                ge=0, le=MAX_QUERY_S, description="unix seconds: candles starting at or before "
                                                  "it"), QueryInt] = None,
            limit: Annotated[int, Query(ge=1, le=MAX_LIMIT), QueryInt] = DEFAULT_LIMIT) -> Response:
        """Candles of the mid price, oldest first: the newest ``limit`` (the current one
        included), or from ``startTime`` on."""
        tradable(asset)
        if startTime is not None and endTime is not None and startTime > endTime:
            raise invalid("startTime must not be after endTime")
        # (the query's parameters are checked above: CandleQuery has nothing left to refuse)
        candles = await service.klines(asset, interval, CandleQuery(limit, startTime, endTime))
        return Response(klines_body(candles, assets[asset]), media_type="application/json")

    # ------------------------------------------------------------------ operations
    @app.get("/healthz", tags=["operations"], operation_id="health",
             responses={200: {"model": HealthOut}, 503: {"model": HealthOut},
                        **_errors(429)})
    async def healthz() -> Response:
        """200 when the ledger, every shard and the extra checks answer; 503 names the failures."""
        health = await health_checks()
        body: dict[str, Any] = {"status": "ok" if health.ok else "unavailable",
                                "components": health.components}
        with contextlib.suppress(Exception):  # prices are informative; health decides above
            # bound as the checks are: a shard that does not answer must not hold the answer
            prices = await service.prices(timeout_s=HEALTH_TIMEOUT_S)
            now_us = time.time_ns() // 1000
            ages_s = {a: max(0, now_us - t.ts_us) / 1e6 for a, t in prices.items()}
            body["feedSources"] = {a: t.source for a, t in prices.items()}
            body["priceAgesS"] = {a: round(age, 1) for a, age in ages_s.items()}
            # a market no feed moves (`shardex engine` with nothing producing) is seen here
            body["stalePrices"] = sorted(a for a in assets
                                         if ages_s.get(a, math.inf) > settings.max_price_age_s)
        if not health.ok:
            failed = [f"{k}: {v}" for k, v in health.components.items() if v != "ok"]
            body["error"] = {"code": Code.SERVICE_UNAVAILABLE.value,
                             "message": "; ".join(failed)}
        return _json(body, 200 if health.ok else 503)

    # the checks ping every actor, outside the batching of calls, and any client may ask: a
    # flood of /healthz (or /metrics) must not be a flood of calls to the ledger and shards.
    # The prices are read per request (the newest, batched as every read of them is).
    health_checks = Reused(service.health, ACTORS_READ_REUSE_S)

    http_counts: Counter[tuple[str, str, int]] = Counter()

    @app.get("/metrics", tags=["operations"], operation_id="metrics",
             response_class=PlainTextResponse, responses={429: {
                 "description": _ERROR_DESCRIPTIONS[429], "headers": _ERROR_HEADERS[429],
                 # JSON, as every error: the route's own answer is text
                 "content": {"application/json": {
                     "schema": {"$ref": "#/components/schemas/ErrorOut"}}}}})
    async def metrics(request: Request) -> Response:
        """Prometheus text exposition."""
        out = Exposition()
        out.family("shardex_http_responses_total", "counter",
                   "HTTP responses of this replica by method, route and status")
        # with those the HTTP server (asked through) refused itself, counted as the app counts
        # its own
        server = request.scope.get("server") or ("", None)
        by_server = REFUSED.get(server[1], Counter())
        for (method, path, status), n in sorted((by_server + http_counts).items()):
            out.add("shardex_http_responses_total", n, method=method, path=path, status=status)
        out.family("shardex_service_events_total", "counter",
                   "events of this replica's trading service by kind")
        for name, n in sorted(service.counters.items()):
            out.add("shardex_service_events_total", n, event=name)
        out.family("shardex_batches_total", "counter", "batched calls by batching point")
        out.family("shardex_batched_items_total", "counter",
                   "items carried by the batched calls, by batching point")
        for name, (batches, items) in sorted(service.batch_stats().items()):
            out.add("shardex_batches_total", batches, call=name)
            out.add("shardex_batched_items_total", items, call=name)
        feed, stats = await actor_counters()
        if feed is not None:
            with contextlib.suppress(Exception):  # a feed's odd counters show in healthz
                dropped = drop_counts(feed.get("dropped", {}))
                refused = int(feed.get("ticks_refused_by_shards", 0))
                out.family("shardex_feed_dropped_total", "counter",
                           "ticks the feed dropped, by reason")
                for reason, n in dropped:
                    out.add("shardex_feed_dropped_total", n, reason=reason)
                out.family("shardex_feed_ticks_refused_by_shards_total", "counter",
                           "ticks the feed sent that a shard refused")
                out.add("shardex_feed_ticks_refused_by_shards_total", refused)
                # with the drops, what became of every record read: the older records of an
                # asset in one read are passed over undecoded (malformed or not) for its newest
                out.family("shardex_feed_records_total", "counter",
                           "records the feed read from the market data topic")
                out.add("shardex_feed_records_total", int(feed.get("consumed", 0)))
                out.family("shardex_feed_conflated_total", "counter",
                           "records passed over undecoded for a newer one of their asset in "
                           "the same read (batch), ticks a shard that far behind lost (pending)")
                out.add("shardex_feed_conflated_total", int(feed.get("conflated_batch", 0)),
                        stage="batch")
                out.add("shardex_feed_conflated_total", int(feed.get("conflated_pending", 0)),
                        stage="pending")
                # the records a trim of the topic (or a broker restart) took before the feed
                # read them are not among those: each such start over of a partition is
                out.family("shardex_feed_partitions_restarted_total", "counter",
                           "partitions the feed found created again (trimmed or the broker "
                           "restarted) and read again from their newest record; records "
                           "produced after its last read and before that were never read")
                out.add("shardex_feed_partitions_restarted_total",
                        int(feed.get("repositions", 0)))
        out.family("shardex_http_unread_dropped_total", "counter",
                   "connections dropped for leaving their answers unread")
        out.add("shardex_http_unread_dropped_total", DROPPED["unread"])
        out.family("shardex_http_connections_refused_total", "counter",
                   "connections refused for their client address's HTTP_CONNECTIONS")
        out.add("shardex_http_connections_refused_total", DROPPED["per_address"])
        for name, n in hub.stats().items():  # this replica's WebSockets
            gauge = name in ("ws_connections", "ws_account_subscriptions")
            metric = f"shardex_{name}" + ("" if gauge else "_total")
            out.family(metric, "gauge" if gauge else "counter", f"this replica's {name}")
            out.add(metric, n)
        out.family("shardex_shard_up", "gauge", "1 when the shard answered this scrape")
        out.family("shardex_open_positions", "gauge", "open positions by shard")
        out.family("shardex_open_orders", "gauge", "open pending orders by shard")
        out.family("shardex_ticks_applied_total", "counter", "ticks a shard applied")
        out.family("shardex_closes_total", "counter",
                   "whole closes of positions by shard and reason")
        for name, s in stats.items():
            out.add("shardex_shard_up", 0 if s is None else 1, shard=name)
            if s is None:
                continue
            out.add("shardex_open_positions", s.positions, shard=name, asset=s.asset)
            out.add("shardex_open_orders", s.orders, shard=name, asset=s.asset)
            out.add("shardex_ticks_applied_total", s.ticks_applied, shard=name)
            for reason, n in (("manual", s.closes_manual), ("take_profit", s.closes_take_profit),
                              ("stop_loss", s.closes_stop_loss),
                              ("liquidation", s.closes_liquidation)):
                out.add("shardex_closes_total", n, shard=name, reason=reason)
        return PlainTextResponse(out.text(), media_type=EXPOSITION_TYPE)

    async def read_actor_counters() -> tuple[dict[str, Any] | None,
                                             dict[str, ShardStats | None]]:
        """The feed's counters (None: no feed here, or it did not answer) and each shard's."""
        feed: dict[str, Any] | None = None
        if service.feed_stats is not None:
            with contextlib.suppress(Exception):  # a feed that does not answer shows in healthz
                feed = await asyncio.wait_for(service.feed_stats(), 2.0)
        return feed, await service.shard_stats()

    actor_counters = Reused(read_actor_counters, ACTORS_READ_REUSE_S)

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = default_openapi()
            _document_assets(document, assets)
            _document_auth(document, app)
            _document_validation_errors(document)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    # the counter's routes: filled once every route is added (the terminal's and /ws's below)
    routes: set[str] = set()
    # the routes any client may read without a key, bounded per client address
    public = frozenset({app.openapi_url or ""} | {
        getattr(r, "path", "") for r in app.routes
        if {"market", "operations"} & set(getattr(r, "tags", ()))})
    app.add_middleware(PublicRateLimit, paths=public, buckets=TokenBuckets(
        settings.public_rate_per_s, settings.public_burst))
    # the limits are inside the counter, so their 413s and 429s are counted too
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(_HttpCounter, app_routes=app.router.routes, routes=routes,
                       counts=http_counts)
    def render(change: Change) -> dict[str, Any]:
        value = change.value
        if isinstance(value, Tick):
            return book_ticker_json(value, assets[value.asset])
        return kline_json(value, assets[value.asset])

    def account_tail(source: AccountSource) -> AccountTail:
        topic = source.account_topic
        return LedgerTail(source) if topic is None else TopicTail(topic)

    # more missed events than half of what a connection may have unsent: a snapshot instead
    accounts = AccountStreams(lambda: service, account_event_json, account_snapshot,
                              account_tail, max_replay=max(1, settings.ws_unsent // 2))
    hub = StreamHub(lambda: service.market, render,
                    current_streams([a.name for a in assets.assets]),
                    app.state.check_key, StreamLimits(settings.ws_connections,
                                               settings.ws_subscriptions, settings.ws_unsent,
                                               settings.ws_market_interval_ms / 1000),
                    accounts)
    app.state.streams = hub

    @app.websocket("/ws")
    async def websocket(socket: WebSocket) -> None:
        """Live streams (SPEC "Live data"): bookTicker.<ASSET>, kline.<interval>.<ASSET>,
        account (after AUTH)."""
        await hub.serve(socket)

    @app.websocket("/{path:path}")
    async def no_websocket_here(socket: WebSocket) -> None:
        """A WebSocket handshake to any other path (Starlette would refuse it with an empty
        403)."""
        await refuse(socket, 404, Code.NOT_FOUND, "no WebSocket here: the streams are at /ws")

    # 426 is its status: a plain HTTP request gets nothing else (FastAPI would document a 200)
    @app.get("/ws", tags=["market"], operation_id="liveStreams", status_code=426,
             responses={101: {"description": "the WebSocket (with an Upgrade request)"},
                        426: {"model": ErrorOut, "description": "not a WebSocket request"}})
    async def websocket_over_http() -> Response:
        """Live streams over a WebSocket: send `{"method":"SUBSCRIBE","params":
        ["bookTicker.SOL","kline.1m.SOL"]}` (also `UNSUBSCRIBE`, and `AUTH` with an API key,
        then `{"method":"SUBSCRIBE","params":["account"],"since":<seq>}` for your account's
        events); frames `{"stream","data"}`, errors `{"error":{"code","message"}}`. A plain
        HTTP request is answered 426."""
        return error_response(426, Code.INVALID_REQUEST.value,
                              "a WebSocket upgrade is required (ws://host:port/ws)",
                              headers={"Upgrade": "websocket"})

    add_terminal_routes(app)
    routes.update(getattr(r, "path", "") for r in app.routes)

    def refusal_labels(method: str, path: str) -> tuple[str, str]:
        scope = {"type": "http", "method": method, "path": path, "root_path": ""}
        return (method if method in _COUNTED_METHODS else "other",
                _route_label(scope, app.router.routes, routes) if path else "other")

    http_server.refusal_labels = refusal_labels
    return app


def _document_auth(document: dict[str, Any], app: FastAPI) -> None:
    """Name the bearer scheme in the OpenAPI ``document``, as a declared ``HTTPBearer``
    dependency would: in its security schemes, and as the security of every operation whose
    endpoint takes a :data:`Caller`."""
    name = _bearer.scheme_name
    document.setdefault("components", {}).setdefault("securitySchemes", {})[name] = \
        _bearer.model.model_dump(mode="json", by_alias=True, exclude_none=True)
    for route in app.routes:
        if isinstance(route, APIRoute) and route.include_in_schema and any(
                d.call is _principal for d in route.dependant.dependencies):
            for method in route.methods or ():
                document["paths"][route.path_format][method.lower()]["security"] = [{name: []}]


def _document_validation_errors(document: dict[str, Any]) -> None:
    """Name the SPEC error shape for a 422 FastAPI documents by itself (an operation with
    parameters that declares none): every validation error is answered in that shape
    (``_validation_error``), never as FastAPI's ``{"detail":[...]}``, whose schemas go."""
    fastapi_shape = {"$ref": "#/components/schemas/HTTPValidationError"}
    for operations in document["paths"].values():
        for op in operations.values():
            response = op.get("responses", {}).get("422")
            if response is not None and response.get("content", {}).get(
                    "application/json", {}).get("schema") == fastapi_shape:
                op["responses"]["422"] = {
                    "description": "INVALID_REQUEST: a parameter is not valid",
                    "content": {"application/json": {"schema": {
                        "$ref": "#/components/schemas/ErrorOut"}}}}
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _document_assets(document: dict[str, Any], assets: AssetRegistry) -> None:
    """State in the OpenAPI ``document`` which assets this app trades: the ``asset`` field of
    every request body gets their names as its enum (any other answers UNKNOWN_ASSET)."""
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("OpenBody", "OrderBody"):  # the request bodies with an ``asset`` field
        schemas[name]["properties"]["asset"]["enum"] = [a.name for a in assets.assets]
