"""The read model of GET /state (cluster.live.account_views): after every step of a trading
scenario, the state a view answers equals a full read of the ledger and every shard."""

from __future__ import annotations

from collections.abc import AsyncIterator
from collections.abc import Callable
from typing import Any

import pytest
import pytest_asyncio
from cluster.actors.port import LocalPort
from cluster.actors.port import Port
from cluster.actors.port import Unavailable
from cluster.live.account_views import AccountState
from cluster.live.market import MarketLive
from cluster.trading.service import TradingService
from engine.market import Tick
from engine.messages import CloseOrder
from engine.messages import PlaceOrder
from engine.messages import Principal
from engine.order_book import OrderKind
from engine.orders import Side
from engine.results import Code
from engine.results import Rejected
from engine.shard_machine import OutboxView
from engine.shard_machine import PositionsOf
from tests.unit.cluster.faulty_ports import Down
from tests.unit.cluster.faulty_ports import FailingBatches
from tests.unit.cluster.faulty_ports import Wrapped
from tests.unit.cluster.local_platform import USD
from tests.unit.cluster.local_platform import Platform
from tests.unit.cluster.local_platform import build_platform
from tests.unit.cluster.local_platform import signup
from tests.unit.cluster.local_platform import sol_long

pytestmark = pytest.mark.asyncio


class Market:
    """The platform with a market: ticks reach the market data first, then the shards (as the
    feed actor applies them), and a service that reads through views."""

    def __init__(self, p: Platform, service: TradingService, live: MarketLive,
                 down: dict[str, Down]) -> None:
        self.p, self.service, self.live, self.down = p, service, live, down

    def shard_down(self, asset: str, down: bool) -> str:
        """Make ``asset``'s shard stop (or resume) answering this service; its name."""
        name = next(n for n in self.down if asset in n)
        self.down[name].down = down
        return name

    async def tick(self, asset: str, bid: str, ask: str) -> None:
        a = self.p.settings.assets[asset]
        self.p.seq += 1
        tick = Tick(asset, a.price_to_ticks(bid), a.price_to_ticks(ask), self.p.clock.now_us,
                    self.p.seq, "test")
        self.live.apply([tick])
        await self.p.hosts.apply_ticks([tick])

    async def same_as_full_read(self, who: Principal) -> AccountState:
        """The view's answer, checked against a full read made just after it."""
        views = self.service.views
        assert views is not None
        before = views.counts["view_reads"]
        seen = await self.service.state(who)
        full = await self.service._read_state(who)
        assert seen == full
        assert views.counts["view_reads"] == before + 1, "answered by a full read"
        return seen


@pytest_asyncio.fixture
async def market() -> AsyncIterator[Market]:
    wrapped: dict[str, Down] = {}

    def wrap(port: LocalPort) -> Port:
        wrapped[port.name] = Down(port)
        return wrapped[port.name]

    p = build_platform()
    live = MarketLive(p.settings.assets, None)
    service = p.hosts.service(wrap, market=live)
    m = Market(p, service, live, wrapped)
    await m.tick("SOL", "100.00", "100.01")
    await m.tick("BTC", "50000.0", "50000.1")
    try:
        yield m
    finally:
        await service.aclose()
        await p.service.aclose()
        assert await p.audit() == []
        p.hosts.close()


async def test_every_step_of_a_trading_day_reads_the_same_as_a_full_read(market: Market) -> None:
    svc, sol = market.service, market.p.settings.assets["SOL"]
    who = await signup(svc)
    first = await svc.state(who)  # loads the view
    assert first.positions == [] and svc.views is not None
    assert svc.views.counts["view_loads"] == 1

    a = await svc.open_position(who, sol_long(100, 10))
    b = await svc.open_position(who, sol_long(50, 20)._replace(side=Side.SHORT))
    c = await svc.open_position(who, sol_long(200, 5)._replace(asset="BTC"))
    state = await market.same_as_full_read(who)
    assert {q.position_id for q in state.positions} == {a.position_id, b.position_id,
                                                         c.position_id}
    await market.tick("SOL", "101.50", "101.52")  # marked again at the new price
    state = await market.same_as_full_read(who)
    pnl = {q.position_id: q.unrealized_pnl_micros for q in state.positions}
    assert pnl[a.position_id] > 0 > pnl[b.position_id]

    await svc.set_levels(who, a.position_id, sol.price_to_ticks("130.00"), None)
    await svc.change_margin(who, b.position_id, 25 * USD)
    await svc.change_margin(who, c.position_id, -10 * USD)
    await market.same_as_full_read(who)

    closed = await svc.close_position(who, CloseOrder(b.position_id))
    assert closed.position_id == b.position_id
    state = await market.same_as_full_read(who)
    assert b.position_id not in [q.position_id for q in state.positions]

    # a pending order fills on a tick: its position is in the view
    await svc.place_order(who, PlaceOrder("SOL", Side.LONG, OrderKind.LIMIT,
                                          sol.price_to_ticks("99.00"), 40 * USD, 10))
    await market.tick("SOL", "98.90", "98.95")
    state = await market.same_as_full_read(who)
    assert len(state.positions) == 3

    # the take-profit closes a position on a tick; a liquidation closes another
    await market.tick("SOL", "130.00", "130.01")
    state = await market.same_as_full_read(who)
    assert a.position_id not in [q.position_id for q in state.positions]
    await market.tick("BTC", "30000.0", "30000.1")
    state = await market.same_as_full_read(who)
    assert c.position_id not in [q.position_id for q in state.positions]
    assert svc.views.counts["view_loads"] == 1  # one full read in all: the first


async def test_a_partial_close_reloads_the_view_from_a_full_read(market: Market) -> None:
    svc = market.service
    who = await signup(svc)
    p = await svc.open_position(who, sol_long(100, 10))
    await market.same_as_full_read(await _loaded(svc, who))
    await svc.close_position(who, CloseOrder(p.position_id, qty_steps=p.qty_steps // 3))
    views = svc.views
    assert views is not None
    loads = views.counts["view_loads"]
    seen = await svc.state(who)
    assert seen == await svc._read_state(who)
    assert seen.positions[0].qty_steps == p.qty_steps - p.qty_steps // 3
    assert views.counts["view_loads"] == loads + 1
    await market.same_as_full_read(who)  # and kept again


class Untold(Wrapped):
    """A shard's port whose outbox answers leave out the positions fills opened."""

    async def execute(self, commands: list[Any]) -> list[Any]:
        answers = await self.inner.execute(commands)
        return [a._replace(opened=()) if isinstance(a, OutboxView) else a for a in answers]


async def _filled_with(market: Market, shard_port: Callable[[Port], Port]
                       ) -> tuple[Principal, int]:
    """A SOL limit order filled by a tick, the courier reaching the shard through
    ``shard_port``; -> the owner and the view loads before the fill."""
    svc, sol = market.service, market.p.settings.assets["SOL"]
    who = await signup(svc)
    await svc.place_order(who, PlaceOrder("SOL", Side.LONG, OrderKind.LIMIT,
                                          sol.price_to_ticks("99.00"), 40 * USD, 10))
    await market.same_as_full_read(await _loaded(svc, who))
    assert svc.views is not None
    loads = svc.views.counts["view_loads"]
    courier = market.p.hosts.courier
    name = next(n for n in courier.shards if "SOL" in n)
    courier.shards[name] = shard_port(courier.shards[name])
    await market.tick("SOL", "98.90", "98.95")
    return who, loads


async def test_a_fill_is_told_with_its_position_even_by_a_shard_that_reads_no_more(
        market: Market) -> None:
    # the positions fills opened come in the same answer as the fills: a separate read of
    # them, which the shard might not answer, left the fill without its positionOpened
    svc = market.service
    who, loads = await _filled_with(market, lambda port: FailingBatches(port, PositionsOf))
    seen = await market.same_as_full_read(who)
    assert len(seen.positions) == 1
    assert svc.views is not None and svc.views.counts["view_loads"] == loads  # followed


async def test_a_fill_whose_position_was_not_told_reloads_the_view(market: Market) -> None:
    # the fill reaches the ledger without the positionOpened that follows it
    svc = market.service
    who, _ = await _filled_with(market, Untold)
    seen = await svc.state(who)
    assert seen == await svc._read_state(who)
    assert len(seen.positions) == 1  # and its unrealized PnL counted in the equity
    assert seen.equity_micros == seen.free_micros + seen.margin_micros \
        + seen.positions[0].unrealized_pnl_micros
    await market.same_as_full_read(who)  # and kept again


async def test_a_failed_write_makes_reads_full_ones(market: Market) -> None:
    svc = market.service
    who = await signup(svc)
    await svc.open_position(who, sol_long(100, 10))
    await market.same_as_full_read(await _loaded(svc, who))
    sol_shard = market.shard_down("SOL", True)
    with pytest.raises(Unavailable):
        await svc.open_position(who, sol_long(100, 10))
    views = svc.views
    assert views is not None
    full = views.counts["full_reads"]
    partial = await svc.state(who)  # the outcome is unknown: what the shards hold, no view
    assert partial.unavailable == (sol_shard,) and partial.positions == []
    assert views.counts["full_reads"] == full + 1
    market.shard_down("SOL", False)
    assert await svc.reconciler.run_once() == 0


async def test_a_kept_view_still_lists_the_positions_of_a_recovering_shard(
        market: Market) -> None:
    svc = market.service
    who, stranger = await signup(svc), await signup(svc)
    p = await svc.open_position(who, sol_long(100, 10))
    await svc.open_position(stranger, sol_long(100, 10))
    kept = await market.same_as_full_read(await _loaded(svc, who))
    sol_shard = market.shard_down("SOL", True)
    assert await svc.state(who) == kept
    assert [q.position_id for q in kept.positions] == [p.position_id]
    # an account not read before: a full read, partial, and not kept
    partial = await svc.state(stranger)
    assert partial.unavailable == (sol_shard,) and partial.positions == []
    assert (await svc.state(stranger)).unavailable == (sol_shard,)
    market.shard_down("SOL", False)


async def test_an_asset_without_a_price_here_is_read_in_full(market: Market) -> None:
    svc = market.service
    who = await signup(svc)
    await svc.open_position(who, sol_long(100, 10))
    await _loaded(svc, who)
    market.live._latest.clear()  # no top of book known (a restarted feed)
    views = svc.views
    assert views is not None
    full = views.counts["full_reads"]
    assert await svc.state(who) == await svc._read_state(who)
    assert views.counts["full_reads"] == full + 1


async def test_a_view_asks_no_shard(market: Market) -> None:
    svc = market.service
    who = await signup(svc)
    await svc.open_position(who, sol_long(100, 10))
    await _loaded(svc, who)
    asked = {name: port.batcher.items for name, port in svc.shards.items()}
    for _ in range(5):
        await svc.state(who)
    assert {name: port.batcher.items for name, port in svc.shards.items()} == asked


async def test_a_top_up_asks_the_shard_only_about_a_position_no_view_holds(
        market: Market) -> None:
    svc = market.service
    who, stranger = await signup(svc), await signup(svc)
    p = await svc.open_position(who, sol_long(100, 10))
    await _loaded(svc, who)

    def asked() -> int:
        return sum(port.batcher.items for port in svc.shards.values())

    before = asked()
    added = await svc.change_margin(who, p.position_id, 5 * USD)
    assert not isinstance(added, Rejected) and added.margin_micros == p.margin_micros + 5 * USD
    assert asked() == before + 1  # the top-up alone: the view holds the position
    refused = await svc.change_margin(stranger, p.position_id, 10**6 * USD)
    assert isinstance(refused, Rejected) and refused.code is Code.NOT_FOUND, refused
    assert asked() == before + 2  # the stranger's positions there, not a lock
    assert (await svc.state(stranger)).free_micros == (await svc.state(who)).free_micros \
        + p.margin_micros + 5 * USD


async def _loaded(svc: TradingService, who: Principal) -> Principal:
    """``who`` after a read that loaded their view."""
    await svc.state(who)
    return who
