"""ShardActor: the thin Ray shell around one ShardCore.

It reads the clock (the core never does) and delivers the core's settlement outbox to the
ledger actor: after every ``apply_ticks`` it sends the unacknowledged settlements (at most one
delivery in flight, never waited for on the tick path) and drops them once the ledger's answer
(its last applied sequence number) arrives. A failed delivery is simply resent with the next
batch of ticks or by ``flush_outbox``: the ledger ignores what it already applied.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import ray

from cluster.config import Settings
from engine.messages import (
    OpenPosition,
    SettlementItem,
    ShardClose,
    ShardOpen,
    ShardStats,
)
from cluster.trading.placement import ShardSpec, shard_layout
from cluster.shard_core import ShardCore
from engine.assets import Asset
from engine.market import Tick
from engine.results import Rejected


def _now_us() -> int:
    return time.time_ns() // 1000


@ray.remote
class ShardActor:
    """One shard (``spec``) of ``asset``; ``ledger`` is the ledger actor's handle (or None).

    With ``data_dir`` the core is the journaled ``cluster.shard_store.DurableShard`` in
    ``data_dir/<spec.name>`` (recovered before the first call; ``store_options`` go to it);
    without, the book lives in memory only.
    """

    def __init__(self, spec: ShardSpec, asset: Asset, maintenance_margin_ppm: int,
                 max_price_age_us: int, ledger: Any = None, data_dir: str | None = None,
                 **store_options: Any) -> None:
        self.spec = spec
        if data_dir is None:
            self.core = ShardCore(spec, asset, maintenance_margin_ppm, max_price_age_us)
        else:
            from cluster.shard_store import DurableShard

            self.core = DurableShard(spec, asset, maintenance_margin_ppm, max_price_age_us,
                                     os.path.join(data_dir, spec.name), **store_options)
        self.ledger = ledger
        self._delivery: Any = None  # ObjectRef of the settlement delivery in flight
        if ledger is not None:
            # A restarted shard continues the numbering the ledger knows, and drops (a
            # recovered one) what the ledger already applied; the rest is resent.
            applied = int(ray.get(ledger.applied_seq.remote(spec.name)))
            self.core.resume_seq(applied)
            self.core.ack_outbox(applied)

    def ping(self) -> bool:
        return True

    # ------------------------------------------------------------------ market data
    def apply_ticks(self, ticks: Sequence[Tick]) -> int:
        """Sweep with each tick (see ShardCore.apply_ticks); returns how many closed."""
        closed = self.core.apply_ticks(ticks, _now_us())
        self._deliver()
        return closed

    def _collect(self, timeout_s: float) -> None:
        """Take the answer of the delivery in flight if it came within ``timeout_s``."""
        ref = self._delivery
        if ref is None:
            return
        ready, _ = ray.wait([ref], timeout=timeout_s)
        if not ready:
            return
        self._delivery = None
        try:
            applied = ray.get(ref)
        except ray.exceptions.RayError:
            return  # resent below or next time
        self.core.ack_outbox(int(applied))

    def _deliver(self) -> None:
        if self.ledger is None:
            return
        self._collect(0)
        if self._delivery is None:
            items = self.core.outbox()
            if items:
                self._delivery = self.ledger.apply_settlements.remote(self.spec.name, items)

    def flush_outbox(self, timeout_s: float = 10.0) -> int:
        """Deliver the outbox and wait for the ledger; returns how many settlements remain."""
        deadline = time.monotonic() + timeout_s
        while self.ledger is not None and time.monotonic() < deadline:
            self._collect(max(0.0, deadline - time.monotonic()))
            if not self.core.outbox():
                break
            if self._delivery is None:
                self._deliver()
        return len(self.core.outbox())

    # ------------------------------------------------------------------ trading
    def open_many(self, requests: Sequence[ShardOpen]) -> list[OpenPosition | Rejected]:
        return self.core.open_many(requests, _now_us())

    def resolve_opens(self, request_ids: Sequence[int]) -> list[OpenPosition | Rejected | None]:
        return self.core.resolve_opens(request_ids)

    def close_many(self, requests: Sequence[ShardClose]) -> list[SettlementItem | Rejected]:
        return self.core.close_many(requests, _now_us())

    # ------------------------------------------------------------------ reads
    def positions_of_many(self, owners: Sequence[int]) -> list[list[OpenPosition]]:
        return self.core.positions_of_many(owners)

    def last_tick(self) -> Tick | None:
        return self.core.last_tick

    def outbox(self) -> list[SettlementItem]:
        return self.core.outbox()

    def ack_outbox(self, upto_seq: int) -> int:
        return self.core.ack_outbox(upto_seq)

    def open_margins_by_user(self) -> dict[int, int]:
        return self.core.open_margins_by_user()

    def audit_view(self) -> tuple[dict[int, int], list[SettlementItem]]:
        return self.core.audit_view()

    def stats(self) -> ShardStats:
        return self.core.stats()


def create_shard_actors(settings: Settings, ledger: Any, data_dir: str | None = None,
                        **options: Any) -> dict[str, Any]:
    """Start one named actor per ShardSpec of the layout (name = ``spec.name``); ``options``
    go to ``.options()``; ``data_dir`` makes them durable. Returns ``{spec.name: handle}``."""
    handles: dict[str, Any] = {}
    for spec in shard_layout(settings):
        handles[spec.name] = ShardActor.options(  # type: ignore[attr-defined]
            name=spec.name, **options).remote(
            spec, settings.assets[spec.asset], settings.maintenance_margin_ppm,
            settings.max_price_age_us, ledger, data_dir)
    return handles
