"""The account events of each operation on a whole platform in one process (SPEC "Live data"):
which kinds, in which order, with the bodies GET /positions and the ledger's balances hold right
after it; nothing for a refused request or a retry with its clientOrderId; and the same events
whether read live (the topic's messages), replayed by ``since``, or replayed after a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from engine.account_events import AccountEvent
from engine.account_events import Balance
from engine.ledger_machine import decode_account_events
from engine.ledger_machine import encode_account_events
from engine.messages import ClosedPosition
from engine.messages import CloseOrder
from engine.messages import EndedOrder
from engine.messages import OpenPosition
from engine.messages import PendingOrder
from engine.messages import PlaceOrder
from engine.messages import Principal
from engine.order_book import OrderKind
from engine.order_book import OrderStatus
from engine.orders import CloseReason
from engine.orders import Side
from engine.results import Code
from engine.results import Rejected
from tests.unit.cluster.local_platform import SIGNUP
from tests.unit.cluster.local_platform import USD
from tests.unit.cluster.local_platform import Platform
from tests.unit.cluster.local_platform import balances
from tests.unit.cluster.local_platform import build_platform
from tests.unit.cluster.local_platform import sol_long
from tests.unit.cluster.local_platform import sol_trader

pytestmark = pytest.mark.asyncio


class Stream:
    """``who``'s account events as a subscriber reads them: :meth:`new` gives those since the
    last call, after checking they are numbered on from it and that the newest balance event
    holds the ledger's balances."""

    def __init__(self, p: Platform, who: Principal) -> None:
        self.p, self.who, self.seq = p, who, 0
        self.all: list[AccountEvent] = []

    async def new(self) -> list[tuple[str, Any]]:
        last, events = await self.p.service.account_events(self.who.user, self.seq)
        assert events is not None
        assert [e.seq for e in events] == list(range(self.seq + 1, last + 1))
        self.seq = last
        self.all.extend(events)
        money = [e.body for e in events if isinstance(e.body, Balance)]
        if money:
            assert (money[-1].free_micros, money[-1].margin_micros) == balances(self.p, self.who)
        return [(e.kind, e.body) for e in events]

    async def held(self, position_id: int) -> OpenPosition:
        """The position as GET /positions lists it, but for the PnL marked at the read."""
        page = await self.p.service.positions(self.who, 100)
        assert not isinstance(page, Rejected)
        [held] = [q for q in page[0] if q.position_id == position_id]
        return held


def unmarked(body: object) -> object:
    return body._replace(unrealized_pnl_micros=0) if isinstance(body, OpenPosition) else body


async def trading_day(p: Platform, who: Principal) -> Stream:
    svc, sol = p.service, p.settings.assets["SOL"]
    s = Stream(p, who)
    assert await s.new() == [("balance", Balance(SIGNUP, 0))]

    a = await svc.open_position(who, sol_long(100, 10))
    assert isinstance(a, OpenPosition)
    assert await s.new() == [("balance", Balance(SIGNUP - 100 * USD, 100 * USD)),
                             ("positionOpened", a)]
    # each change: the position as the shard holds it then; a retry with its key: nothing
    updated, moved = ["positionUpdated"], ["balance", "positionUpdated"]
    for change, kinds in ((lambda: svc.set_levels(who, a.position_id, 11000, 9500, "m-1"),
                           updated),
                          (lambda: svc.change_margin(who, a.position_id, 20 * USD, "t-1"), moved),
                          (lambda: svc.change_margin(who, a.position_id, -10 * USD, "r-1"),
                           moved)):
        made = await change()
        assert isinstance(made, OpenPosition)
        held = await s.held(a.position_id)
        assert [k for k, _ in await s.new()] == kinds
        assert s.all[-1].body == made and unmarked(made) == unmarked(held)
        assert await change() == made and await s.new() == []
    assert held.margin_micros == 110 * USD and held.liq_ticks != a.liq_ticks

    part = CloseOrder(a.position_id, qty_steps=a.qty_steps // 3, client_order_id="c-1")
    closed = await svc.close_position(who, part)
    assert isinstance(closed, ClosedPosition) and closed.partial
    rest = await s.held(a.position_id)
    [(k1, b1), (k2, _), (k3, b3)] = await s.new()
    assert (k1, b1, k2, k3) == ("positionClosed", closed, "balance", "positionUpdated")
    assert unmarked(b3) == unmarked(rest) and rest.qty_steps == a.qty_steps - closed.qty_steps
    assert rest.margin_micros == held.margin_micros - closed.margin_micros
    assert await svc.close_position(who, part) == closed and await s.new() == []

    # refused before anything moved: no event
    refused = [await svc.open_position(who, sol_long(10**6)),
               await svc.set_levels(who, a.position_id, 9000, None),
               await svc.change_margin(who, a.position_id, -10**3 * USD),
               await svc.cancel_order(who, a.position_id)]
    assert [r.code for r in refused if isinstance(r, Rejected)] == [
        Code.INSUFFICIENT_BALANCE, Code.INVALID_TRIGGER, Code.INVALID_REQUEST, Code.NOT_FOUND]
    assert await s.new() == []

    def limit_long(price: str, **kw: Any) -> PlaceOrder:
        return PlaceOrder("SOL", Side.LONG, OrderKind.LIMIT, sol.price_to_ticks(price),
                          40 * USD, 10, **kw)

    async def placed(order: PlaceOrder) -> PendingOrder:
        free, margin = balances(p, who)
        made = await svc.place_order(who, order)
        assert isinstance(made, PendingOrder)
        assert await s.new() == [("balance", Balance(free - 40 * USD, margin + 40 * USD)),
                                 ("orderPlaced", made)]
        return made

    async def ended(order: PendingOrder, status: OrderStatus, kind: str) -> EndedOrder:
        [(k1, end), (k2, money)] = await s.new()
        assert isinstance(end, EndedOrder) and money == Balance(*balances(p, who))
        assert (k1, k2, end.order_id, end.status) == (kind, "balance", order.order_id, status)
        return end

    cancelled = await placed(limit_long("97.00", client_order_id="x-1"))
    assert isinstance(await svc.cancel_order(who, cancelled.order_id, "x-1"), EndedOrder)
    await ended(cancelled, OrderStatus.CANCELLED, "orderCancelled")
    assert isinstance(await svc.cancel_order(who, cancelled.order_id, "x-1"), EndedOrder)
    assert await s.new() == []

    filled = await placed(limit_long("99.00", tp_ticks=sol.price_to_ticks("120.00")))
    await p.push_tick("SOL", "98.90", "98.95")
    [(k1, fill), (k2, opened)] = await s.new()
    assert (k1, k2, fill.status) == ("orderFilled", "positionOpened", OrderStatus.FILLED)
    assert fill.position_id == opened.position_id and opened.tp_ticks == filled.tp_ticks
    assert unmarked(opened) == unmarked(await s.held(fill.position_id))

    # a fill below its own SL cannot open: rejected, its margin released
    rejected = await placed(limit_long("98.60", sl_ticks=sol.price_to_ticks("98.50")))
    await p.push_tick("SOL", "98.40", "98.45")
    end = await ended(rejected, OrderStatus.REJECTED, "orderRejected")
    assert end.reject_code == Code.INVALID_TRIGGER.value

    expiring = await placed(limit_long("90.00", expires_ts_us=p.clock.now_us + 10**6))
    p.clock.now_us += 2 * 10**6
    await p.push_tick("SOL", "98.40", "98.45")
    await ended(expiring, OrderStatus.EXPIRED, "orderExpired")

    # one tick closes three of the account's positions: a's SL, b's liquidation, c's TP
    b = await svc.open_position(who, sol_long(100, 50))
    c = await svc.open_position(who, sol_long(100, 10, tp_ticks=sol.price_to_ticks("96.00"))
                                ._replace(side=Side.SHORT))
    assert isinstance(b, OpenPosition) and isinstance(c, OpenPosition)
    await s.new()
    await p.push_tick("SOL", "95.00", "95.01")
    events = await s.new()
    assert [k for k, _ in events] == ["positionClosed", "balance"] * 3
    assert {body.position_id: CloseReason(body.reason) for _, body in events[::2]} == {
        a.position_id: CloseReason.STOP_LOSS, b.position_id: CloseReason.LIQUIDATION,
        c.position_id: CloseReason.TAKE_PROFIT}
    return s


async def test_each_operation_gives_its_events_and_every_reading_gives_the_same(
        tmp_path: Path) -> None:
    p = build_platform(data_dir=str(tmp_path))
    try:
        who, other = await sol_trader(p), await sol_trader(p)
        s = await trading_day(p, who)
        # another account numbers its own events: only its signup balance
        _, theirs = await p.service.account_events(other.user, 0)
        assert theirs is not None and [(e.seq, e.kind) for e in theirs] == [(1, "balance")]
        live = [e for _, value in encode_account_events(s.all)
                for e in decode_account_events(value)[0]]
        assert live == s.all
        assert (await p.service.account_events(who.user, 0))[1] == s.all
    finally:
        await p.service.aclose()
        p.hosts.close()
    again = build_platform(data_dir=str(tmp_path))
    try:
        assert (await again.service.account_events(who.user, 0))[1] == s.all
    finally:
        await again.service.aclose()
        again.hosts.close()
