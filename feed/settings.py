"""What the market data side needs to know, frozen: the topic, the broker, the source, the bounds.

``cluster.config.Settings`` builds a :class:`FeedSettings` (``settings.feed``) from the
environment and validates it there; nothing in ``feed/`` reads the environment or imports
``cluster/``. Functions of ``feed/`` that take settings accept a :class:`FeedSettings` or any
object whose ``feed`` attribute is one (:func:`feed_settings`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qsl

from engine.assets import DEFAULT_ASSETS, AssetRegistry

MARKET_TOPIC = "backpack-market-updates"  # Kafka topic of MarketDataMessages (SPEC)
EMBEDDED_BROKER = "127.0.0.1:9092"  # where the embedded Tansu broker listens by default
BACKPACK_WS_URL = "wss://ws.backpack.exchange"  # the live market data source

_USERINFO = re.compile(r"^([^:/?#]*://)[^/?#]*@")
_QUERY_VALUE = re.compile(r"=[^&]*")
_PLAIN_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def plain_decimal(text: str) -> float:
    """``text`` as a float when it is plain ASCII decimal text of at most 64 characters, as
    every number setting and option is written; NaN otherwise (float() also takes a sign,
    spaces, "1_000", "1e3", "inf" and other scripts' digits)."""
    return float(text) if len(text) <= 64 and _PLAIN_DECIMAL.fullmatch(text) else math.nan


def redacted_url(url: str) -> str:
    """``url`` with its user and password, if it has any, and the value of each field of its
    query shown as ``***`` (logs and errors never carry credentials: a token is often a query
    field)."""
    shown = _USERINFO.sub(r"\1***@", url)
    base, asked, rest = shown.partition("?")
    if not asked:
        return shown
    query, hashed, fragment = rest.partition("#")
    return f"{base}?{_QUERY_VALUE.sub('=***', query)}{hashed}{fragment}"


TS_US_LIMIT = 2**63  # every ts_us is in (0, TS_US_LIMIT): journals store it as int64
SEQ_LIMIT = 2**63  # every seq is in [0, SEQ_LIMIT)


@dataclass(frozen=True, slots=True)
class FeedBounds:
    """The consumer's bounds on a tick (SPEC "Market data on Kafka").

    ``max_price_age_us``: a tick older than this (``now - ts_us``) is dropped as ``stale``;
    ``max_clock_skew_us``: one more than this in the future as ``future``;
    ``max_tick_jump_bps``: a mid further than this (basis points) from the last accepted one is
    held until the next tick confirms it. ValueError when a value is out of range.
    """

    max_price_age_us: int = 15_000_000
    max_clock_skew_us: int = 5_000_000
    max_tick_jump_bps: int = 1_000

    def __post_init__(self) -> None:
        if not 0 < self.max_price_age_us < TS_US_LIMIT:
            raise ValueError(f"max_price_age_us out of range: {self.max_price_age_us}")
        if not 0 <= self.max_clock_skew_us < TS_US_LIMIT:
            raise ValueError(f"max_clock_skew_us out of range: {self.max_clock_skew_us}")
        if not 0 < self.max_tick_jump_bps <= 1_000_000:
            raise ValueError(f"max_tick_jump_bps out of range: {self.max_tick_jump_bps}")

    @classmethod
    def from_seconds(cls, max_price_age_s: float, max_clock_skew_s: float,
                     max_tick_jump_bps: int) -> FeedBounds:
        """Bounds from seconds (as configured); ValueError for a non-finite value."""
        if not (math.isfinite(max_price_age_s) and math.isfinite(max_clock_skew_s)):
            raise ValueError("feed bounds must be finite")
        return cls(round(max_price_age_s * 1_000_000), round(max_clock_skew_s * 1_000_000),
                   max_tick_jump_bps)


SOURCE_FORMS = ("backpack | sim[?seed=N&rate=HZ] | replay:PATH[?speed=X&loop=1] | none | "
                "auto[?wait=S&seed=N&rate=HZ]")  # FEED_SOURCE, for messages

# Options each FEED_SOURCE kind takes, and what each must be.
_SOURCE_OPTIONS = {"backpack": (), "none": (), "sim": ("seed", "rate"),
                   "replay": ("speed", "loop"), "auto": ("wait", "seed", "rate")}
LOOP_OFF = ("", "0", "false")  # loop=VALUE (any case) that plays the file once
_LOOP_VALUES = (*LOOP_OFF, "1", "true")


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A parsed FEED_SOURCE: ``kind`` in backpack/sim/replay/none/auto, ``path`` for replay."""

    kind: str
    path: str = ""
    options: dict[str, str] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        """The ``seed`` option, exactly (through a float, seeds past 2**53 would share walks)."""
        return int(self.options.get("seed", "0"))

    def number(self, key: str, default: float) -> float:
        try:
            return float(self.options.get(key, default))
        except ValueError:
            raise ValueError(f"FEED_SOURCE option {key}={self.options[key]!r} is not a number")\
                from None


def _check_option(key: str, value: str) -> None:
    if key == "loop":
        if value.lower() not in _LOOP_VALUES:
            raise ValueError("option loop must be 0 or 1")
        return
    if key == "seed":
        # ASCII digits only: isdigit() also passes "²", and lstrip("-") "--5", which the
        # source then failed to read as a number once the start was under way
        if len(value) > 19 or not re.fullmatch(r"-?[0-9]+", value):
            raise ValueError("option seed must be an integer")
        return
    number = plain_decimal(value)  # a number option (rate, speed, wait)
    low_ok = number >= 0 if key == "speed" else number > 0
    if not (math.isfinite(number) and low_ok and number <= 1e6):
        floor = ">= 0" if key == "speed" else "> 0"
        raise ValueError(f"option {key} must be a number {floor} and <= 1000000")


def parse_source(text: str) -> SourceSpec:
    """Parse a FEED_SOURCE value; ValueError for an unknown kind, a replay without a path, an
    option the kind does not take or an option value out of range."""
    text = text.strip()
    body, options = text, {}
    head, sep, query = text.rpartition("?")
    if sep and "=" in query:
        pairs = parse_qsl(query, keep_blank_values=True)
        body, options = head, dict(pairs)
        if len(options) < len(pairs):  # which one would count: the first, the last?
            keys = [key for key, _ in pairs]
            raise ValueError(f"option {next(k for k in keys if keys.count(k) > 1)} is given "
                             "twice")
    kind, colon, path = body.partition(":")
    kind = kind.strip().lower()
    if kind == "replay":
        if not colon or not path:
            raise ValueError("FEED_SOURCE=replay needs a path: replay:PATH")
    elif colon or kind not in _SOURCE_OPTIONS:
        raise ValueError(f"unknown FEED_SOURCE {text!r}: {SOURCE_FORMS}")
    for key, value in options.items():
        if key not in _SOURCE_OPTIONS[kind]:
            raise ValueError(f"FEED_SOURCE={kind} takes no option {key!r}")
        _check_option(key, value)
    return SourceSpec(kind, path if kind == "replay" else "", options)


@dataclass(frozen=True, slots=True)
class FeedSettings:
    """Everything ``feed/`` is configured with (built by ``cluster.config.Settings.feed``)."""

    assets: AssetRegistry = field(default_factory=lambda: DEFAULT_ASSETS)
    kafka_brokers: str | None = None  # None: the embedded broker at EMBEDDED_BROKER
    backpack_ws_url: str = BACKPACK_WS_URL
    feed_source: str = "auto"  # backpack | sim | replay:PATH | none | auto (feed.source)
    bounds: FeedBounds = field(default_factory=FeedBounds)

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_brokers or EMBEDDED_BROKER


class HasFeedSettings(Protocol):
    """Anything that carries feed settings (``cluster.config.Settings`` does)."""

    @property
    def feed(self) -> FeedSettings: ...


def feed_settings(settings: FeedSettings | HasFeedSettings) -> FeedSettings:
    """``settings`` itself, or its ``feed`` attribute."""
    return settings if isinstance(settings, FeedSettings) else settings.feed
