"""Typed, frozen configuration: every default and its environment override in one place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from engine.amounts import AmountError, money_to_micros, to_units
from engine.assets import DEFAULT_ASSETS, AssetRegistry

MARKET_TOPIC = "backpack-market-updates"  # Kafka topic of MarketDataMessages (SPEC)
CONSUMER_GROUP = "trading-engine"  # the feed actor's consumer group
EMBEDDED_BROKER = "127.0.0.1:9092"  # where the embedded Tansu broker listens


class ConfigError(ValueError):
    """An environment variable holds a value the platform cannot run with."""


@dataclass(frozen=True, slots=True)
class Settings:
    kafka_brokers: str | None = None  # KAFKA_BROKERS; None = start the embedded broker
    backpack_ws_url: str = "wss://ws.backpack.exchange"  # BACKPACK_WS_URL
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

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_brokers or EMBEDDED_BROKER

    @property
    def max_price_age_us(self) -> int:
        return int(self.max_price_age_s * 1_000_000)

    def shards_of(self, asset: str) -> int:
        """How many shard actors share ``asset`` (at least 1)."""
        return max(1, int(self.shards.get(asset, self.shards.get("*", 1))))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        base = cls()
        try:
            assets = base.assets
            if env.get("ASSETS"):
                names = [n.strip().upper() for n in env["ASSETS"].split(",") if n.strip()]
                unknown = [n for n in names if n not in DEFAULT_ASSETS]
                if unknown:
                    raise ConfigError(f"ASSETS: unknown asset(s) {unknown}")
                assets = DEFAULT_ASSETS.subset(names)
            return cls(
                kafka_brokers=env.get("KAFKA_BROKERS") or None,
                backpack_ws_url=env.get("BACKPACK_WS_URL", base.backpack_ws_url),
                feed_source=env.get("FEED_SOURCE", base.feed_source),
                port=int(env.get("PORT", base.port)),
                host=env.get("HOST", base.host),
                ray_address=env.get("RAY_ADDRESS") or None,
                assets=assets,
                shards=_parse_shards(env.get("SHARDS", "")),
                data_dir=Path(env.get("DATA_DIR", str(base.data_dir))),
                maintenance_margin_ppm=to_units(env.get("MAINTENANCE_MARGIN_RATE", "0"), 6),
                max_price_age_s=float(env.get("MAX_PRICE_AGE_S", base.max_price_age_s)),
                signup_balance_micros=money_to_micros(env.get("SIGNUP_BALANCE", "10000")),
                max_body_bytes=int(env.get("MAX_BODY_BYTES", base.max_body_bytes)),
                max_json_depth=int(env.get("MAX_JSON_DEPTH", base.max_json_depth)),
                api_key_rate_per_s=int(env.get("API_KEY_RATE_PER_S", base.api_key_rate_per_s)),
                api_key_burst=int(env.get("API_KEY_BURST", base.api_key_burst)),
                signups_per_min=int(env.get("SIGNUPS_PER_MIN", base.signups_per_min)),
            )
        except (AmountError, ValueError) as exc:
            raise ConfigError(str(exc)) from exc


def _parse_shards(text: str) -> dict[str, int]:
    """``"2"`` = two shards for every asset; ``"SOL=3,BTC=1"`` = per asset."""
    text = text.strip()
    if not text:
        return {}
    if "=" not in text:
        return {"*": _positive(text)}
    out: dict[str, int] = {}
    for part in text.split(","):
        name, _, count = part.partition("=")
        out[name.strip().upper()] = _positive(count)
    return out


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ConfigError(f"SHARDS: shard count must be >= 1, got {value}")
    return value
