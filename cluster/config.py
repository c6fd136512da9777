"""Typed, frozen configuration: every default and its environment override in one place.

Every setting is checked when :class:`Settings` is built; a bad value raises :class:`ConfigError`
with one line naming the variable and what it must be, e.g.
``MAX_PRICE_AGE_S must be a finite number in (0, 86400] (got inf)``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

from engine.amounts import AmountError, from_units, to_units
from engine.assets import DEFAULT_ASSETS, AssetRegistry
from engine.position_ids import MAX_BOOK_TAG
from feed.settings import (
    BACKPACK_WS_URL,
    EMBEDDED_BROKER,
    MARKET_TOPIC,
    SOURCE_FORMS,
    FeedBounds,
    FeedSettings,
    SourceSpec,
    parse_source,
    plain_decimal,
    redacted_url,
)

CONSUMER_GROUP = "trading-engine"  # the feed actor's Kafka client id
ACCOUNT_TOPIC = "shardex-account-events"  # Kafka topic of the ledger's account events
MAX_SHARDS = MAX_BOOK_TAG + 1  # every shard's book tag is unique and fits 8 bits

__all__ = ["ACCOUNT_TOPIC", "CONSUMER_GROUP", "EMBEDDED_BROKER", "MARKET_TOPIC", "ConfigError",
           "Settings"]

# What each variable must be: the text of its error line.
RULES = {
    "KAFKA_BROKERS": "host:port[,host:port...] with ports in [1, 65535]",
    "BACKPACK_WS_URL": "a ws:// or wss:// URL with a host and, if it names one, a port 1-65535",
    "FEED_SOURCE": SOURCE_FORMS,
    "HOST": "a host name or IP address",
    "RAY_ADDRESS": "auto, host:port or ray://host[:port] with a port in [1, 65535]",
    "ASSETS": f"a comma-separated list of {', '.join(DEFAULT_ASSETS)} without repeats",
    "SHARDS": f"N or ASSET=N,... with N in [1, {MAX_SHARDS}], assets of ASSETS and at most "
              f"{MAX_SHARDS} shards in all",
    "DATA_DIR": "a directory path",
    "MAINTENANCE_MARGIN_RATE": "in [0, 1) with at most 6 decimals",
    "MAX_PRICE_AGE_S": "a finite number in (0, 86400]",
    "SIGNUP_BALANCE": "an amount in [0, 1000000] with at most 6 decimals",
    "MAX_CLOCK_SKEW_S": "a finite number in [0, 3600]",
    "ACCOUNT_EVENTS_TOPIC": "a Kafka topic name: 1 to 249 of A-Z a-z 0-9 . _ -",
}
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")

# Integer settings: field -> (variable, lowest, highest allowed).
_INTEGER_LIMITS = {
    "port": ("PORT", 1, 65535),
    "max_tick_jump_bps": ("MAX_TICK_JUMP_BPS", 1, 1_000_000),
    "max_body_bytes": ("MAX_BODY_BYTES", 1024, 64 * 1024 * 1024),
    "max_json_depth": ("MAX_JSON_DEPTH", 2, 512),
    "api_key_rate_per_s": ("API_KEY_RATE_PER_S", 0, 1_000_000),
    "api_key_burst": ("API_KEY_BURST", 1, 1_000_000),
    "signups_per_min": ("SIGNUPS_PER_MIN", 0, 1_000_000),
    "public_rate_per_s": ("PUBLIC_RATE_PER_S", 0, 1_000_000),
    "public_burst": ("PUBLIC_BURST", 1, 1_000_000),
    "state_positions": ("STATE_POSITIONS", 1, 10_000),
    "max_open_positions": ("MAX_OPEN_POSITIONS", 1, 100_000),
    "max_open_orders": ("MAX_OPEN_ORDERS", 1, 100_000),
    "client_order_id_ttl_s": ("CLIENT_ORDER_ID_TTL_S", 60, 30 * 86_400),
    "max_client_order_ids": ("MAX_CLIENT_ORDER_IDS", 1, 10_000_000),
    "http_connections": ("HTTP_CONNECTIONS", 0, 100_000),
    "ws_connections": ("WS_CONNECTIONS", 1, 100_000),
    "ws_subscriptions": ("WS_SUBSCRIPTIONS", 1, 10_000),
    "ws_unsent": ("WS_UNSENT", 1, 1_000_000),
    "ws_market_interval_ms": ("WS_MARKET_INTERVAL_MS", 0, 60_000),
    "api_replicas": ("API_REPLICAS", 1, 64),
    "api_max_replicas": ("API_MAX_REPLICAS", 0, 64),
    "min_free_disk_mb": ("MIN_FREE_DISK_MB", 0, 10**7),
}
RULES.update({var: f"an integer in [{low}, {high}]" for var, low, high in _INTEGER_LIMITS.values()})

PPM = 1_000_000  # MAINTENANCE_MARGIN_RATE is held in parts per million
MAX_SIGNUP_BALANCE_MICROS = 10**6 * 10**6  # 1,000,000 USD: the funding account stays far
# from int64 over millions of accounts

_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _is_host(host: str) -> bool:
    """Whether ``host`` is an IP address or a host name of RFC 1123 labels whose last is not
    all digits (``999.999.999.999`` is no address, and no name a resolver would look up)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        labels = host.split(".")
        return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels) \
            and not labels[-1].isdigit()


# A host name or IPv4 address, or an IPv6 address in brackets: a colon outside brackets would
# make "h:1:2" a host "h:1" that no resolver knows.
_BROKER = re.compile(r"(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})")
_HOST_ONLY = re.compile(r"(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])")


class ConfigError(ValueError):
    """A setting holds a value the platform cannot run with (the message is one line)."""


def _shown(value: object) -> str:
    """``value`` as the error line shows it: plain when unambiguous, quoted otherwise."""
    if isinstance(value, str):
        if value and len(value) <= 80 and value.isprintable() and " " not in value:
            return value
        return repr(value[:80])
    return str(value)


def _fail(var: str, got: object, detail: str = "") -> NoReturn:
    more = f": {detail}" if detail else ""
    raise ConfigError(f"{var} must be {RULES[var]} (got {_shown(got)}{more})")


@dataclass(frozen=True, slots=True)
class Settings:
    """The platform's configuration; ``Settings.from_env()`` reads it, each field says from
    which variable. Built directly (tests, benchmarks), it is checked the same way."""

    kafka_brokers: str | None = None  # KAFKA_BROKERS; None = start the embedded broker
    backpack_ws_url: str = BACKPACK_WS_URL  # BACKPACK_WS_URL
    feed_source: str = "auto"  # FEED_SOURCE: backpack | sim | replay:PATH | none | auto
    port: int = 4000  # PORT of the HTTP API
    host: str = "127.0.0.1"  # HOST the API binds; 0.0.0.0 to serve other machines
    ray_address: str | None = None  # RAY_ADDRESS; None = start a local Ray
    assets: AssetRegistry = field(default_factory=lambda: DEFAULT_ASSETS)  # ASSETS=SOL,BTC
    shards: Mapping[str, int] = field(default_factory=dict)  # SHARDS: "4" or "SOL=2,BTC=1"
    data_dir: Path = Path("./data")  # DATA_DIR: journals and snapshots
    maintenance_margin_ppm: int = 0  # MAINTENANCE_MARGIN_RATE as parts per million
    max_price_age_s: float = 15.0  # MAX_PRICE_AGE_S: older prices refuse opens and closes
    signup_balance_micros: int = 10_000 * 10**6  # SIGNUP_BALANCE in USD
    max_body_bytes: int = 16 * 1024  # MAX_BODY_BYTES: a larger request body answers 413
    max_json_depth: int = 32  # MAX_JSON_DEPTH: a more deeply nested JSON body answers 400
    api_key_rate_per_s: int = 50  # API_KEY_RATE_PER_S: requests per API key (0 = unlimited)
    api_key_burst: int = 100  # API_KEY_BURST: requests an idle API key may send at once
    signups_per_min: int = 10  # SIGNUPS_PER_MIN: accounts per client address (0 = unlimited)
    public_rate_per_s: int = 20  # PUBLIC_RATE_PER_S: market/operations reads per client address
    public_burst: int = 100  # PUBLIC_BURST: such reads an idle client address may send at once
    state_positions: int = 200  # STATE_POSITIONS: positions in GET /state (the rest: paged)
    max_open_positions: int = 200  # MAX_OPEN_POSITIONS: per account; one more answers 409
    max_open_orders: int = 200  # MAX_OPEN_ORDERS: pending orders per account; then 409
    client_order_id_ttl_s: int = 86_400  # CLIENT_ORDER_ID_TTL_S: then the id may be reused
    max_client_order_ids: int = 100_000  # MAX_CLIENT_ORDER_IDS: held per account; then 429
    http_connections: int = 256  # HTTP_CONNECTIONS: open per client address (0 = any number)
    ws_connections: int = 10  # WS_CONNECTIONS: WebSockets per client address and per API key
    ws_subscriptions: int = 50  # WS_SUBSCRIPTIONS: streams per WebSocket
    ws_unsent: int = 1_000  # WS_UNSENT: frames a WebSocket may fall behind; then closed (1008)
    # WS_MARKET_INTERVAL_MS: the least time between two rounds of price and candle frames
    ws_market_interval_ms: int = 100
    max_clock_skew_s: float = 5.0  # MAX_CLOCK_SKEW_S: ticks further in the future are dropped
    max_tick_jump_bps: int = 1_000  # MAX_TICK_JUMP_BPS: a larger mid move waits for confirmation
    account_topic: str = ACCOUNT_TOPIC  # ACCOUNT_EVENTS_TOPIC: where account events go
    api_replicas: int = 1  # API_REPLICAS: HTTP API replicas; more than 1 puts HAProxy in front
    api_max_replicas: int = 0  # API_MAX_REPLICAS: above API_REPLICAS, Serve autoscales up to it
    min_free_disk_mb: int = 100  # MIN_FREE_DISK_MB: less free under a journal: /healthz 503

    def __post_init__(self) -> None:
        if self.kafka_brokers is not None:
            _check_brokers(self.kafka_brokers)
        _check_ws_url(self.backpack_ws_url)
        _parse_source(self.feed_source)
        if not _is_host(self.host):
            _fail("HOST", self.host)
        if self.ray_address is not None:
            _check_ray_address(self.ray_address)
        _check_shards(self.shards, self.assets)
        if not str(self.data_dir):
            _fail("DATA_DIR", str(self.data_dir))
        if not 0 <= self.maintenance_margin_ppm < PPM:
            _fail("MAINTENANCE_MARGIN_RATE", _decimal_text(self.maintenance_margin_ppm, 6))
        if not (isinstance(self.max_price_age_s, int | float)
                and math.isfinite(self.max_price_age_s) and 0 < self.max_price_age_s <= 86_400
                and self.max_price_age_us > 0):
            _fail("MAX_PRICE_AGE_S", self.max_price_age_s,
                  "kept in whole microseconds" if self.max_price_age_s else "")
        if not 0 <= self.signup_balance_micros <= MAX_SIGNUP_BALANCE_MICROS:
            _fail("SIGNUP_BALANCE", _decimal_text(self.signup_balance_micros, 6))
        if not (isinstance(self.max_clock_skew_s, int | float)
                and math.isfinite(self.max_clock_skew_s) and 0 <= self.max_clock_skew_s <= 3600):
            _fail("MAX_CLOCK_SKEW_S", self.max_clock_skew_s)
        if not isinstance(self.account_topic, str) or not _TOPIC.fullmatch(self.account_topic) \
                or self.account_topic in (".", ".."):
            _fail("ACCOUNT_EVENTS_TOPIC", self.account_topic)
        if self.account_topic == MARKET_TOPIC:  # account events would go to the price feed
            _fail("ACCOUNT_EVENTS_TOPIC", self.account_topic,
                  "that is the market data topic")
        if self.account_topic.startswith("__"):
            # Kafka keeps the prefix for its own topics; a broker refuses every produce to
            # __consumer_offsets or __transaction_state: no account event would reach a stream
            _fail("ACCOUNT_EVENTS_TOPIC", self.account_topic,
                  "a name starting with __ is Kafka's own")
        for name, (var, low, high) in _INTEGER_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                _fail(var, value)
        if self.api_max_replicas and self.api_max_replicas < self.api_replicas:
            _fail("API_MAX_REPLICAS", self.api_max_replicas,
                  f"0 or at least API_REPLICAS {self.api_replicas}")
        if self.replica_slots > 1 and self.port + self.replica_slots + 3 > 65535:
            # behind the front door on PORT, the replicas listen on PORT+1 .. PORT+N and the
            # front door's own listeners on the next three ports
            var = "API_MAX_REPLICAS" if self.api_max_replicas else "API_REPLICAS"
            _fail(var, self.replica_slots, f"PORT {self.port} + it + 3 exceeds 65535")

    @property
    def replica_slots(self) -> int:
        """The most API replicas that can run at once (each needs a port of its own)."""
        return max(self.api_replicas, self.api_max_replicas)

    @property
    def api_ports(self) -> range:
        """The ports the API listens on: PORT; behind the front door also the replicas' above
        it and the door's own three listeners after those."""
        slots = self.replica_slots
        return range(self.port, self.port + (slots + 4 if slots > 1 else 1))

    @property
    def autoscaled(self) -> bool:
        """Serve scales the API between API_REPLICAS and API_MAX_REPLICAS by its load."""
        return self.api_max_replicas > self.api_replicas

    @property
    def maintenance_margin_rate(self) -> str:
        """MAINTENANCE_MARGIN_RATE as its shortest decimal text (``5000`` ppm -> ``0.005``)."""
        return _decimal_text(self.maintenance_margin_ppm, 6)

    @property
    def max_price_age_us(self) -> int:
        # rounded as the feed's bound is (FeedBounds.from_seconds): a float of decimal
        # seconds may lie just below the whole microseconds it names
        return round(self.max_price_age_s * 1_000_000)

    @property
    def max_clock_skew_us(self) -> int:
        return self.feed.bounds.max_clock_skew_us  # the feed's bound, the shards' as well

    @property
    def feed(self) -> FeedSettings:
        """What ``feed/`` is configured with (it never reads these settings itself)."""
        return FeedSettings(
            assets=self.assets, kafka_brokers=self.kafka_brokers,
            backpack_ws_url=self.backpack_ws_url, feed_source=self.feed_source,
            bounds=FeedBounds.from_seconds(self.max_price_age_s, self.max_clock_skew_s,
                                           self.max_tick_jump_bps))

    def shards_of(self, asset: str) -> int:
        """How many shard actors share ``asset`` (at least 1)."""
        return max(1, int(self.shards.get(asset, self.shards.get("*", 1))))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``env`` (default ``os.environ``); ConfigError names the first bad one."""
        env = os.environ if env is None else env
        base = cls()
        # set but empty is refused, as every setting with a default value (HOST, PORT, ...):
        # only settings whose default is "unset" (KAFKA_BROKERS, SHARDS) take empty as unset
        assets = _parse_assets(env["ASSETS"]) if "ASSETS" in env else base.assets
        data_dir = env.get("DATA_DIR", str(base.data_dir))
        try:
            # spaces around it would name another directory (a leading one: a relative path)
            bad = not data_dir.strip() or data_dir != data_dir.strip()
            in_the_way = None if bad else _file_in_the_way(Path(data_dir))
        except OSError as exc:  # a name too long, ...
            _fail("DATA_DIR", data_dir[:80], exc.strerror or str(exc))
        if bad or in_the_way == Path(data_dir):
            _fail("DATA_DIR", data_dir)
        if in_the_way is not None:
            _fail("DATA_DIR", data_dir, f"{in_the_way} is a file")
        feed_source = env.get("FEED_SOURCE", base.feed_source)
        spec = _parse_source(feed_source)
        if spec.kind == "replay" and not Path(spec.path).is_file():
            _fail("FEED_SOURCE", feed_source, f"{spec.path} is not a regular file"
                  if Path(spec.path).exists() else f"no file {spec.path}")
        return cls(
            kafka_brokers=_check_brokers(env.get("KAFKA_BROKERS", "")) or None,
            backpack_ws_url=_check_ws_url(env.get("BACKPACK_WS_URL", base.backpack_ws_url)),
            feed_source=feed_source,
            host=env.get("HOST", base.host),
            ray_address=env.get("RAY_ADDRESS") or None,
            assets=assets,
            shards=_parse_shards(env.get("SHARDS", ""), assets),
            data_dir=Path(data_dir),
            maintenance_margin_ppm=_millionths(
                "MAINTENANCE_MARGIN_RATE", env.get("MAINTENANCE_MARGIN_RATE", "0"), PPM - 1),
            max_price_age_s=_seconds("MAX_PRICE_AGE_S", env.get("MAX_PRICE_AGE_S"),
                                     base.max_price_age_s, 0.0, 86_400.0, low_open=True),
            signup_balance_micros=_millionths("SIGNUP_BALANCE", env.get("SIGNUP_BALANCE", "10000"),
                                              MAX_SIGNUP_BALANCE_MICROS),
            **{name: _integer(var, env.get(var), getattr(base, name), low, high)
               for name, (var, low, high) in _INTEGER_LIMITS.items()},
            max_clock_skew_s=_seconds("MAX_CLOCK_SKEW_S", env.get("MAX_CLOCK_SKEW_S"),
                                      base.max_clock_skew_s, 0.0, 3600.0),
            account_topic=env.get("ACCOUNT_EVENTS_TOPIC", base.account_topic),
        )


def http_url(host: str, port: int) -> str:
    """The API's base URL on ``host:port`` (an IPv6 address in brackets, as URLs write it)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _decimal_text(units: int, decimals: int) -> str:
    """``units`` steps of ``10**-decimals`` as the shortest decimal text (``1000000, 6`` -> 1)."""
    text = from_units(units, decimals)
    return text.rstrip("0").rstrip(".") if "." in text else text


def _integer(var: str, raw: str | None, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    text = raw.strip()
    if not re.fullmatch(r"-?[0-9]{1,19}", text) or not low <= int(text) <= high:
        _fail(var, raw)
    return int(text)


def _seconds(var: str, raw: str | None, default: float, low: float, high: float, *,
             low_open: bool = False) -> float:
    if raw is None:
        return default
    value = plain_decimal(raw.strip())
    above = value > low if low_open else value >= low
    if not (math.isfinite(value) and above and value <= high):
        _fail(var, raw)
    return value


def _millionths(var: str, raw: str, high: int) -> int:
    """``raw``, a decimal of at most 6 places, in millionths (a rate in ppm, money in micros)
    from 0 to ``high``; ConfigError naming ``var`` otherwise."""
    try:
        units = to_units(raw.strip(), 6)  # spaces around it, as every number setting
    except AmountError:
        _fail(var, raw)
    if not 0 <= units <= high:
        _fail(var, raw)
    return units


def _file_in_the_way(path: Path) -> Path | None:
    """What stands, not a directory, where ``path`` or the nearest of its parents that exists
    should be one (no directory can be made there); None when nothing does."""
    for part in (path, *path.parents):
        if part.exists():
            return None if part.is_dir() else part
    return None


def _check_brokers(text: str) -> str:
    """``text`` without surrounding spaces ("" when it is only spaces: unset), when it is a
    valid bootstrap list."""
    text = text.strip()
    for part in text.split(",") if text else ():
        match = _BROKER.fullmatch(part.strip())
        if match is None or not 1 <= int(match["port"]) <= 65535:
            _fail("KAFKA_BROKERS", text)
    return text


def _check_ray_address(text: str) -> None:
    """ConfigError unless ``text`` is ``auto``, ``host:port`` or ``ray://host[:port]``, with a
    port in 1..65535: Ray started a new Ray of its own for "local", as if joined, and failed
    on other text ("garbage") with its own message, which named no setting."""
    if text == "auto":
        return
    rest = text.removeprefix("ray://")
    match = _BROKER.fullmatch(rest) or (rest != text and _HOST_ONLY.fullmatch(rest))
    port = match.groupdict().get("port") if match else None
    if not match or (port is not None and not 1 <= int(port) <= 65535):
        _fail("RAY_ADDRESS", text)


def _check_ws_url(url: str) -> str:
    """``url`` when it is a ws:// or wss:// URL with a host and, if one is given, a port of
    1..65535 (a URL the source would fail to reach every second is refused at start)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError: not a number, or past 65535
    except ValueError:
        _fail("BACKPACK_WS_URL", redacted_url(url))
    if parts.scheme.lower() not in ("ws", "wss") or not parts.hostname or port == 0 or any(
            c.isspace() for c in url):
        _fail("BACKPACK_WS_URL", redacted_url(url))
    return url


def _parse_source(text: str) -> SourceSpec:
    try:
        return parse_source(text)
    except ValueError as exc:
        detail = "" if str(exc).startswith("unknown") else str(exc)
        _fail("FEED_SOURCE", text, detail)


def _asset_name(text: str) -> str:
    """``text`` as an asset's name, any case; "" when it cannot be one: upper() turns some
    other letters into ASCII ones ("\u017fol" would read as SOL), and "*" stands for every
    asset only where a lone N puts it."""
    name = text.strip()
    return name.upper() if name.isascii() and name != "*" else ""


def _parse_assets(text: str) -> AssetRegistry:
    names = [_asset_name(n) for n in text.split(",")]
    if not all(n in DEFAULT_ASSETS for n in names) or len(set(names)) != len(names):
        _fail("ASSETS", text)
    return DEFAULT_ASSETS.subset(names)


def _parse_shards(text: str, assets: AssetRegistry) -> dict[str, int]:
    """``"2"`` = two shards for every asset; ``"SOL=3,BTC=1"`` = per asset."""
    text = text.strip()
    if not text:
        return {}
    out: dict[str, int] = {}
    pairs = (part.partition("=") for part in text.split(","))
    parts = [("*", text)] if "=" not in text else [(_asset_name(n), c) for n, _, c in pairs]
    for name, count in parts:
        count = count.strip()
        if not name or not re.fullmatch(r"[0-9]{1,4}", count) or name in out:
            _fail("SHARDS", text)
        out[name] = int(count)
    try:
        _check_shards(out, assets)
    except ConfigError:
        _fail("SHARDS", text)
    return out


def _check_shards(shards: Mapping[str, int], assets: AssetRegistry) -> None:
    if any((name != "*" and name not in assets) or isinstance(count, bool)
           or not isinstance(count, int) or not 1 <= count <= MAX_SHARDS
           for name, count in shards.items()) \
            or sum(shards.get(a, shards.get("*", 1)) for a in assets) > MAX_SHARDS:
        _fail("SHARDS", ",".join(f"{k}={v}" for k, v in shards.items()))
