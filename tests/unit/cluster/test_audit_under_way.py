"""The live audit while requests are under way: each request held at a gate between two of its
steps (as long as the audit reads, and longer), the audit run in the middle. What a request
under way holds is no difference; margin nothing holds is one, under way or not."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from collections.abc import Callable
from typing import Any

import pytest
from cluster.actors.port import Port
from cluster.trading.service import TradingService
from engine.ledger_machine import ApplySettlements
from engine.ledger_machine import LockMargin
from engine.ledger_machine import Note
from engine.ledger_machine import ReleaseMargin
from engine.market import Tick
from engine.messages import CloseOrder
from engine.messages import MarginLock
from engine.messages import OpenPosition
from engine.messages import PendingOrder
from engine.messages import PlaceOrder
from engine.messages import Principal
from engine.order_book import OrderKind
from engine.orders import Side
from engine.shard_machine import ApplyTick
from engine.shard_machine import ChangeMargin
from engine.shard_machine import Open
from engine.shard_machine import Place
from tests.unit.cluster.faulty_ports import Gated
from tests.unit.cluster.faulty_ports import HeldReplies
from tests.unit.cluster.local_platform import USD
from tests.unit.cluster.local_platform import Make
from tests.unit.cluster.local_platform import Platform
from tests.unit.cluster.local_platform import signup
from tests.unit.cluster.local_platform import sol_long
from tests.unit.cluster.local_platform import sol_trader

pytestmark = pytest.mark.asyncio

Request = Callable[[TradingService, Platform, Principal, OpenPosition], Awaitable[object]]


def limit_long(p: Platform, price: str) -> PlaceOrder:
    return PlaceOrder("SOL", Side.LONG, OrderKind.LIMIT,
                      p.settings.assets["SOL"].price_to_ticks(price), 50 * USD, 10)


async def subjects(p: Platform) -> list[str]:
    """The subjects of the live audit's differences (three reads, 0.2 s apart)."""
    return [d.subject for d in await p.audit()]


# (where the request waits: the shard's kind, "held" for a reply held after the shard acted,
# or the ledger's kind; the request)
STEPS: dict[str, tuple[type, str, Request]] = {
    "open: locked, not at its shard": (
        Open, "shard", lambda s, p, w, pos: s.open_position(w, sol_long())),
    "open: made, its note on the way": (
        Open, "held", lambda s, p, w, pos: s.open_position(w, sol_long())),
    "order: locked, not at its shard": (
        Place, "shard", lambda s, p, w, pos: s.place_order(w, limit_long(p, "99"))),
    "order: placed, its note on the way": (
        Note, "ledger", lambda s, p, w, pos: s.place_order(w, limit_long(p, "99"))),
    "top-up: locked, not at its shard": (
        ChangeMargin, "shard", lambda s, p, w, pos: s.change_margin(w, pos.position_id, 10 * USD)),
    "top-up: made, its note on the way": (
        ChangeMargin, "held",
        lambda s, p, w, pos: s.change_margin(w, pos.position_id, 10 * USD)),
    "removal: announced, not at its shard": (
        ChangeMargin, "shard",
        lambda s, p, w, pos: s.change_margin(w, pos.position_id, -10 * USD)),
    "removal: made, its release on the way": (
        ReleaseMargin, "ledger",
        lambda s, p, w, pos: s.change_margin(w, pos.position_id, -10 * USD)),
    "close: made, its settlement on the way": (
        ApplySettlements, "ledger",
        lambda s, p, w, pos: s.close_position(w, CloseOrder(pos.position_id))),
    "partial close: made, its settlement on the way": (
        ApplySettlements, "ledger", lambda s, p, w, pos: s.close_position(
            w, CloseOrder(pos.position_id, qty_steps=pos.qty_steps // 2))),
}


@pytest.mark.parametrize("step", list(STEPS))
async def test_a_request_held_between_its_steps_is_no_difference(make: Make, step: str) -> None:
    """Before, a lock whose open, order or top-up had not reached its shard, and a removal
    the shard made whose release had not reached the ledger, were reported (margin and slot
    counts) once the request took longer than the audit's three reads: on a platform trading
    in a loop, a read lands on such locks at every try."""
    kind, where, request = STEPS[step]
    p = make()
    who = await sol_trader(p)
    pos = await p.service.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    sol = p.shard_of("SOL")
    gate: Gated | HeldReplies
    ledger: Port = p.ledger
    shards: dict[str, Port] = dict(p.shards)
    if where == "ledger":
        ledger = gate = Gated(p.ledger, kind)
    else:
        gate = Gated(sol, kind) if where == "shard" else HeldReplies(sol, kind)
        shards[sol.name] = gate
    svc = make.service(p, ledger=ledger, shards=shards)
    held = asyncio.ensure_future(request(svc, p, who, pos))
    try:
        await asyncio.wait_for(gate.reached.wait(), 5)
        assert await subjects(p) == []
    finally:  # (a request left at the gate would hold up the service's close)
        gate.opened.set()
    assert not isinstance(await held, BaseException)
    assert await subjects(p) == []


async def test_ticks_that_close_and_fill_are_no_difference_before_their_delivery(
        make: Make) -> None:
    """A tick that liquidates the positions of several accounts and fills an order, applied at
    the shard, its settlements not yet at the ledger."""
    p = make()
    await p.push_tick("SOL", "100.00", "100.01")
    traders = [await signup(p.service) for _ in range(4)]
    for who in traders:
        for _ in range(3):
            assert isinstance(await p.service.open_position(who, sol_long(20, 50)), OpenPosition)
    order = await p.service.place_order(traders[0], limit_long(p, "98"))
    assert isinstance(order, PendingOrder)
    sol = p.settings.assets["SOL"]
    tick = Tick("SOL", sol.price_to_ticks("97.00"), sol.price_to_ticks("97.01"),
                p.clock.now_us, 99, "test")
    assert await p.shard_of("SOL").call(ApplyTick(tick)) == 12
    assert await subjects(p) == []
    await p.hosts.courier.deliver(p.shard_of("SOL").name)
    assert await subjects(p) == []


async def test_margin_nothing_holds_is_a_difference_beside_a_request_under_way(
        make: Make) -> None:
    """Margin locked with no request (nor position) to hold it is reported, also while
    another request of the same account is under way (it explains its own margin, no more),
    and margin short of what the books hold is reported whatever is under way."""
    p = make()
    who = await sol_trader(p)
    gate = Gated(p.shard_of("SOL"), Open)
    svc = make.service(p, shards={**p.shards, gate.name: gate})
    held = asyncio.ensure_future(svc.open_position(who, sol_long()))
    try:
        await asyncio.wait_for(gate.reached.wait(), 5)
        assert await p.ledger.call(LockMargin(MarginLock(who.user, 5 * USD, None, 0))) is None
        assert await subjects(p) == [f"user:{who.user}:margin", f"user:{who.user}:open_count"]
        # the stray lock released (no request id, nothing recorded), then 1 USD too few locked
        assert await p.ledger.call(ReleaseMargin(who.user, 6 * USD)) is None
        assert await subjects(p) == [f"user:{who.user}:margin"]
    finally:
        gate.opened.set()
    answer: Any = await held
    assert isinstance(answer, OpenPosition)
    assert await subjects(p) == [f"user:{who.user}:margin"]
