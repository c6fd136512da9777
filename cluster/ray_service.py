"""A TradingService over Ray actor handles: what an API replica (Ray Serve) builds at start."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cluster.config import Settings
from cluster.ledger_actor import LEDGER_ACTOR_NAME
from cluster.trading.placement import shard_layout
from cluster.ports import RayLedgerPort, RayShardPort, ShardPort
from cluster.service import TradingService


def service_from_handles(settings: Settings, ledger: Any, shards: Mapping[str, Any], *,
                         call_timeout_s: float | None = 30.0,
                         health_checks: Mapping[str, Callable[[], Awaitable[bool]]]
                         | None = None) -> TradingService:
    """``ledger``: the LedgerActor handle; ``shards``: ShardActor handles by ShardSpec.name."""
    ports: dict[str, ShardPort] = {name: RayShardPort(name, handle, call_timeout_s)
                                   for name, handle in shards.items()}
    return TradingService(RayLedgerPort(ledger, call_timeout_s), ports, settings,
                          health_checks=health_checks)


def service_from_names(settings: Settings, *, namespace: str | None = None,
                       ledger_name: str = LEDGER_ACTOR_NAME, call_timeout_s: float | None = 30.0,
                       health_checks: Mapping[str, Callable[[], Awaitable[bool]]]
                       | None = None) -> TradingService:
    """Look the named actors up (``ray.get_actor``) in ``namespace`` and wrap them.
    Must run where Ray is initialised (e.g. in a Serve replica's constructor)."""
    import ray

    ledger = ray.get_actor(ledger_name, namespace=namespace)
    shards = {spec.name: ray.get_actor(spec.name, namespace=namespace)
              for spec in shard_layout(settings)}
    return service_from_handles(settings, ledger, shards, call_timeout_s=call_timeout_s,
                                health_checks=health_checks)
