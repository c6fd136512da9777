"""A TradingService over the platform's named hosts: what an API replica builds at start."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cluster.actors.deploy import ray_ports
from cluster.actors.names import LEDGER
from cluster.config import Settings
from cluster.live.market import MarketSource
from cluster.trading.placement import shard_layout
from cluster.trading.service import TradingService


def service_from_names(settings: Settings, *, namespace: str | None = None,
                       call_timeout_s: float | None = 30.0,
                       health_checks: Mapping[str, Callable[[], Awaitable[bool]]]
                       | None = None,
                       feed_stats: Callable[[], Awaitable[dict[str, Any]]] | None = None,
                       market: MarketSource | None = None,
                       account_topic: tuple[str, str] | None = None,
                       leading: Callable[[], bool] | None = None) -> TradingService:
    """Look the named hosts up (``ray.get_actor``) in ``namespace`` and wrap them in ports.
    Must run where Ray is initialised (e.g. in a Serve replica's constructor)."""
    import ray

    ledger = ray.get_actor(LEDGER, namespace=namespace)
    shards = {spec.name: ray.get_actor(spec.name, namespace=namespace)
              for spec in shard_layout(settings)}
    ledger_port, shard_ports = ray_ports(ledger, shards, call_timeout_s)
    return TradingService(ledger_port, shard_ports, settings, health_checks=health_checks,
                          feed_stats=feed_stats, market=market, account_topic=account_topic,
                          leading=leading)
