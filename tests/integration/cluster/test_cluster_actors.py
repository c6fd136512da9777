"""The actor shells in a real local Ray: the service over Ray ports, the shard's outbox
delivered to the ledger exactly once, a restarted shard's numbering, a dead shard."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import ray

from cluster.config import Settings
from cluster.ledger_actor import create_ledger_actor
from engine.messages import CloseOrder, OpenOrder, OpenPosition, SettlementItem
from cluster.trading.placement import shard_layout
from cluster.ports import Unavailable
from cluster.ray_service import service_from_handles, service_from_names
from cluster.service import TradingService
from cluster.shard_actor import ShardActor, create_shard_actors
from engine.market import Tick
from engine.orders import CloseReason, Side
from engine.results import Rejected

USD = 10**6
SIGNUP = 10_000 * USD
SETTINGS = Settings()


@dataclass
class RayPlatform:
    namespace: str
    ledger: Any
    shards: dict[str, Any]
    seq: int = 0

    def tick(self, asset: str, bid: str, ask: str) -> int:
        """Apply a tick on the asset's shard actors (as the feed actor does); returns closes."""
        a = SETTINGS.assets[asset]
        self.seq += 1
        tick = Tick(asset, a.price_to_ticks(bid), a.price_to_ticks(ask),
                    time.time_ns() // 1000, self.seq, "test")
        refs = [h.apply_ticks.remote([tick]) for name, h in self.shards.items()
                if name.startswith(f"shard-{asset}-")]
        return sum(ray.get(refs))

    def flush(self) -> None:
        assert ray.get([h.flush_outbox.remote() for h in self.shards.values()]) == \
            [0] * len(self.shards)

    def service(self) -> TradingService:
        return service_from_handles(SETTINGS, self.ledger, self.shards)


@pytest.fixture
def rp(ray_local: None) -> Iterator[RayPlatform]:
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    ledger = create_ledger_actor(SETTINGS, namespace=namespace)
    shards = create_shard_actors(SETTINGS, ledger, namespace=namespace)
    p = RayPlatform(namespace, ledger, shards)
    yield p
    for handle in [ledger, *shards.values()]:
        ray.kill(handle)


async def audit(service: TradingService) -> list[str]:
    problems, totals = await service.audit()
    assert totals["sum_micros"] == 0
    return problems


@pytest.mark.asyncio
async def test_open_state_close_history_through_the_ray_ports(rp: RayPlatform) -> None:
    svc = rp.service()
    account = await svc.create_account()
    who = await svc.authenticate(account.api_key)
    assert who is not None
    rp.tick("SOL", "100.00", "100.01")
    results = await asyncio.gather(*(svc.open_position(who, OpenOrder(
        "SOL", Side.LONG, 10 * USD, 10)) for _ in range(8)))
    assert all(isinstance(r, OpenPosition) for r in results)
    batches, items = svc.batch_stats()["lock_margins"]
    assert items == 8 and batches < 8  # concurrent opens shared actor calls
    state = await svc.state(who)
    assert len(state.positions) == 8 and state.margin_micros == 80 * USD
    assert await audit(svc) == []
    first = results[0]
    assert isinstance(first, OpenPosition)
    closed = await svc.close_position(who, CloseOrder(first.position_id))
    assert not isinstance(closed, Rejected) and closed.reason == CloseReason.MANUAL
    history = await svc.history(who)
    assert isinstance(history, list) and [h.position_id for h in history] == [first.position_id]
    state = await svc.state(who)
    assert len(state.positions) == 7 and state.free_micros == SIGNUP - 80 * USD + \
        closed.payout_micros
    prices = await svc.prices()
    assert prices["SOL"].bid_ticks == 10000
    health = await svc.health()
    assert health.ok, health
    assert await audit(svc) == []
    # a service built from the actor names finds the same state
    named = service_from_names(SETTINGS, namespace=rp.namespace)
    assert (await named.state(who)) == state


@pytest.mark.asyncio
async def test_tick_closes_reach_the_ledger_exactly_once(rp: RayPlatform) -> None:
    svc = rp.service()
    account = await svc.create_account()
    who = await svc.authenticate(account.api_key)
    assert who is not None
    rp.tick("BTC", "60000.0", "60000.1")
    for _ in range(5):
        r = await svc.open_position(who, OpenOrder("BTC", Side.LONG, 100 * USD, 10,
                                                   tp_ticks=610000))
        assert isinstance(r, OpenPosition)
    assert rp.tick("BTC", "61000.0", "61000.1") == 5
    rp.flush()
    [shard_name] = [s.name for s in shard_layout(SETTINGS) if s.asset == "BTC"]
    assert ray.get(rp.ledger.applied_seq.remote(shard_name)) == 5
    totals = ray.get(rp.ledger.totals.remote())
    assert totals["closed_positions"] == 5
    state = await svc.state(who)
    assert state.positions == [] and state.margin_micros == 0
    # a lost acknowledgement: the shard resends everything; nothing changes
    history = await svc.history(who)
    assert isinstance(history, list) and len(history) == 5
    resend = [SettlementItem(i + 1, c) for i, c in enumerate(reversed(history))]
    assert ray.get(rp.ledger.apply_settlements.remote(shard_name, resend)) == 5
    assert await svc.state(who) == state
    assert ray.get(rp.ledger.totals.remote())["closed_positions"] == 5
    # a restarted shard continues the numbering the ledger knows
    spec = next(s for s in shard_layout(SETTINGS) if s.name == shard_name)
    ray.kill(rp.shards[shard_name])
    fresh = ShardActor.options(namespace=rp.namespace).remote(  # type: ignore[attr-defined]
        spec, SETTINGS.assets["BTC"], 0, SETTINGS.max_price_age_us, rp.ledger)
    rp.shards[shard_name] = fresh
    svc = rp.service()
    rp.tick("BTC", "60000.0", "60000.1")
    r = await svc.open_position(who, OpenOrder("BTC", Side.SHORT, 100 * USD, 10))
    assert isinstance(r, OpenPosition)
    closed = await svc.close_position(who, CloseOrder(r.position_id))
    assert not isinstance(closed, Rejected)
    assert ray.get(rp.ledger.applied_seq.remote(shard_name)) == 6
    rp.flush()
    assert await audit(svc) == []


@pytest.mark.asyncio
async def test_a_dead_shard_is_unavailable_and_the_lock_stays_in_doubt(rp: RayPlatform) -> None:
    svc = rp.service()
    account = await svc.create_account()
    who = await svc.authenticate(account.api_key)
    assert who is not None
    rp.tick("ETH", "3000.00", "3000.01")
    ray.kill(rp.shards["shard-ETH-0"])
    with pytest.raises(Unavailable):
        await svc.open_position(who, OpenOrder("ETH", Side.LONG, 10 * USD, 2))
    # its outcome is unknown, so the margin stays locked until the shard can say; reads still
    # answer, naming the shard whose positions are missing
    state = await svc.state(who)
    assert state.unavailable == ("shard-ETH-0",)
    assert state.margin_micros == 10 * USD and state.positions == []
    [(free, margin)] = ray.get(rp.ledger.balances_many.remote([who.user]))
    assert (free, margin) == (SIGNUP - 10 * USD, 10 * USD)
    assert await svc.reconcile() == 1
    health = await svc.health()
    assert not health.ok and health.components["shard-ETH-0"] != "ok"
    assert health.components["ledger"] == "ok"
    await svc.aclose()
