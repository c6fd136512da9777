"""A client that goes away at every point of every trading request (Ray Serve cancels its
handler task): after each, the platform is as if the request had run or never come.

Each operation (an open, a whole and a partial close, a TP/SL change, margin added and
removed, an order placed and cancelled; each with and without a clientOrderId) runs on a whole
platform in one process whose ports answer on the event loop's thread one loop turn after a
batch leaves (:class:`InLoop`), so the request's steps fall on the same loop turns in every
run. Its handler task is cancelled after exactly k loop turns, for k = 0, 1, 2, ... until it
ends before the cancel, each k for a new account. Once the request's shielded work and the
reconciler's rounds are done: no lock or clientOrderId is pending (nothing is left to the
sweeps of dead processes, and the sweeps then find nothing); the audit is clean; the
account's margin is its open positions' and orders' and its counts are theirs; its account
events, numbered 1, 2, 3..., replayed, give its open positions (bodies as the shard holds
them), its open orders and its balances; the request's shielded work was never cancelled;
and a retry with the clientOrderId, sent as soon as the client went away, gets the answer the
request made (or runs it, if it never began), and so does one more, changing nothing.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Coroutine
from typing import Any

import pytest
import pytest_asyncio
from cluster.actors.local import LocalHosts
from cluster.actors.port import LocalPort
from cluster.actors.port import Port
from cluster.config import Settings
from cluster.durability.runner import Runner
from cluster.trading.reconciler import ORPHAN_ROUNDS
from cluster.trading.service import TradingService
from engine.account_events import BALANCE
from engine.account_events import ORDER_PLACED
from engine.account_events import POSITION_CLOSED
from engine.account_events import POSITION_OPENED
from engine.account_events import POSITION_UPDATED
from engine.account_events import Balance
from engine.ledger_machine import AccountEvents
from engine.ledger_machine import Balances
from engine.ledger_machine import OpenCount
from engine.ledger_machine import OpenLocks
from engine.ledger_machine import OrderCount
from engine.ledger_machine import PendingRequests
from engine.market import Tick
from engine.messages import ClosedPosition
from engine.messages import CloseOrder
from engine.messages import EndedOrder
from engine.messages import OpenPosition
from engine.messages import PendingOrder
from engine.messages import PlaceOrder
from engine.messages import Principal
from engine.order_book import OrderKind
from engine.orders import Side
from engine.shard_machine import ApplyTick
from engine.shard_machine import OrdersOf
from engine.shard_machine import PositionsOf
from tests.unit.cluster.local_platform import USD
from tests.unit.cluster.local_platform import Clock
from tests.unit.cluster.local_platform import signup
from tests.unit.cluster.local_platform import sol_long

pytestmark = pytest.mark.asyncio

MAX_TURNS = 200  # a request that takes longer than this is a test that never ends


class InLoop(Port):
    """``port``'s runner on the event loop's thread, answering a batch one loop turn after it
    left: the loop turns a request takes are the same in every run."""

    def __init__(self, port: LocalPort) -> None:
        super().__init__(port.name)
        self.runner: Runner[Any] = port.runner

    async def execute(self, commands: list[Any]) -> list[Any]:
        await asyncio.sleep(0)
        return self.runner.execute(commands)

    async def ping(self) -> bool:
        return True

    def read(self, command: Any) -> Any:
        [answer] = self.runner.execute([command])
        return answer


class World:
    """A platform whose service reaches the machines through :class:`InLoop` ports; the
    tasks the service starts (its shielded requests) are kept in ``started``."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.hosts = LocalHosts(self.settings, clock_us=Clock())
        self.svc = self.hosts.service(wrap=InLoop, wrap_ledger=InLoop)
        self.ledger = self.svc.ledger
        assert isinstance(self.ledger, InLoop)
        self.shards = {n: p for n, p in self.svc.shards.items() if isinstance(p, InLoop)}
        self.started: list[asyncio.Task[Any]] = []
        start = self.svc._start

        def recorded(work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
            task = start(work)
            self.started.append(task)
            return task

        self.svc._start = recorded  # type: ignore[method-assign]

    async def tick(self, asset: str, bid: int, ask: int) -> None:
        clock = self.hosts.ledger.runner.clock_us
        tick = Tick(asset, bid, ask, clock(), 1, "test")
        for spec in self.svc.layout.of_asset(asset):
            await self.shards[spec.name].call(ApplyTick(tick))

    def held(self, who: Principal) -> tuple[list[OpenPosition], list[PendingOrder]]:
        """``who``'s open positions and orders, as the shards hold them."""
        positions = [p for s in self.shards.values()
                     for p in s.read(PositionsOf((who.user,)))[0]]
        orders = [o for s in self.shards.values() for o in s.read(OrdersOf((who.user,)))[0]]
        return positions, orders

    def seen(self, who: Principal) -> tuple[object, ...]:
        """What ``who`` can see: balances, open positions and orders, account event count."""
        positions, orders = self.held(who)
        last, _ = self.ledger.read(AccountEvents(who.user))
        return (self.ledger.read(Balances(who.user)), sorted(map(unmarked, positions)),
                sorted(orders), last)

    async def settle(self) -> None:
        """The shielded work to its end, and the reconciler's rounds until nothing is left."""
        await asyncio.gather(*self.started, return_exceptions=True)
        for _ in range(10):
            if not await self.svc.reconciler.run_once():
                break
        assert self.svc.reconciler.outstanding == 0

    async def check(self, who: Principal) -> None:
        """The ledger, the shards and ``who``'s account events agree (the module docstring)."""
        assert self.ledger.read(OpenLocks()) == []
        assert self.ledger.read(PendingRequests()) == []
        problems, totals = await self.svc.audit(attempts=1)
        assert problems == [] and totals["sum_micros"] == 0
        positions, orders = self.held(who)
        free, margin = self.ledger.read(Balances(who.user))
        assert margin == sum(p.margin_micros for p in positions) + \
            sum(o.margin_micros for o in orders)
        assert self.ledger.read(OpenCount(who.user)) == len(positions) + len(orders)
        assert self.ledger.read(OrderCount(who.user)) == len(orders)
        assert replay(self.ledger.read(AccountEvents(who.user, 0))) == (
            {p.position_id: unmarked(p) for p in positions}, {o.order_id: o for o in orders},
            Balance(free, margin))
        # the sweeps of what a dead process leaves: nothing is theirs
        await self.svc.reconciler.settle_pending(older_than_s=0)
        for _ in range(ORPHAN_ROUNDS):
            assert await self.svc.reconciler.end_orphaned_locks() == 0
        assert self.ledger.read(Balances(who.user)) == (free, margin)

    async def aclose(self) -> None:
        await self.svc.aclose()
        self.hosts.close()


def unmarked(body: Any) -> Any:
    """A position without its PnL marked at the read."""
    return body._replace(unrealized_pnl_micros=0) if isinstance(body, OpenPosition) else body


def replay(answer: tuple[int, list[Any] | None]
           ) -> tuple[dict[int, OpenPosition], dict[int, PendingOrder], Balance | None]:
    """An account's events, numbered 1, 2, 3..., replayed: its open positions (newest body),
    open orders and last balances. A position opened twice, or changed or closed while not
    open (an order likewise), fails."""
    last, events = answer
    assert events is not None and [e.seq for e in events] == list(range(1, last + 1))
    positions: dict[int, OpenPosition] = {}
    orders: dict[int, PendingOrder] = {}
    money = None
    for e in events:
        if e.kind == BALANCE:
            money = e.body
        elif e.kind == POSITION_OPENED:
            assert e.body.position_id not in positions, e
            positions[e.body.position_id] = unmarked(e.body)
        elif e.kind == POSITION_UPDATED:
            assert e.body.position_id in positions, e
            positions[e.body.position_id] = unmarked(e.body)
        elif e.kind == POSITION_CLOSED:
            assert isinstance(e.body, ClosedPosition) and e.body.position_id in positions, e
            if not e.body.partial:
                del positions[e.body.position_id]
        elif e.kind == ORDER_PLACED:
            assert e.body.order_id not in orders, e
            orders[e.body.order_id] = e.body
        else:  # an order's end
            assert isinstance(e.body, EndedOrder) and e.body.order_id in orders, e
            del orders[e.body.order_id]
    return positions, orders, money


SOL_BID, SOL_ASK = 10_000, 10_001  # 100.00 / 100.01


def limit_long(key: str | None) -> PlaceOrder:
    return PlaceOrder("SOL", Side.LONG, OrderKind.LIMIT, 9_500, 40 * USD, 10,
                      client_order_id=key)


Setup = Callable[[TradingService, Principal], Awaitable[Any]]
Operation = Callable[[TradingService, Principal, Any, str | None], Awaitable[Any]]


async def a_position(svc: TradingService, who: Principal) -> OpenPosition:
    made = await svc.open_position(who, sol_long(100, 10))
    assert isinstance(made, OpenPosition)
    return made


async def an_order(svc: TradingService, who: Principal) -> PendingOrder:
    made = await svc.place_order(who, limit_long(None))
    assert isinstance(made, PendingOrder)
    return made


async def nothing(svc: TradingService, who: Principal) -> None:
    return None


# name -> (what it needs, the request, what it answers when it runs uncancelled)
OPERATIONS: dict[str, tuple[Setup, Operation, type]] = {
    "open": (nothing, lambda svc, who, _, key: svc.open_position(
        who, sol_long(100, 10, client_order_id=key)), OpenPosition),
    "close": (a_position, lambda svc, who, pos, key: svc.close_position(
        who, CloseOrder(pos.position_id, client_order_id=key)), ClosedPosition),
    "partial-close": (a_position, lambda svc, who, pos, key: svc.close_position(
        who, CloseOrder(pos.position_id, client_order_id=key, qty_steps=pos.qty_steps // 3)),
        ClosedPosition),
    "tp-sl": (a_position, lambda svc, who, pos, key: svc.set_levels(
        who, pos.position_id, 11_000, 9_500, key), OpenPosition),
    "margin-add": (a_position, lambda svc, who, pos, key: svc.change_margin(
        who, pos.position_id, 20 * USD, key), OpenPosition),
    "margin-remove": (a_position, lambda svc, who, pos, key: svc.change_margin(
        who, pos.position_id, -10 * USD, key), OpenPosition),
    "place-order": (nothing, lambda svc, who, _, key: svc.place_order(who, limit_long(key)),
                    PendingOrder),
    "cancel-order": (an_order, lambda svc, who, order, key: svc.cancel_order(
        who, order.order_id, key), EndedOrder),
}


@pytest_asyncio.fixture
async def world() -> AsyncIterator[World]:
    """A :class:`World`; nothing asyncio reports meanwhile (e.g. a request's failure that
    nobody read once its client went away)."""
    loop = asyncio.get_running_loop()
    unread: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unread.append(context))
    w = World()
    try:
        yield w
        await w.aclose()
        gc.collect()  # a task is reported when it is collected with its outcome unread
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert unread == []


@pytest.mark.parametrize("key", [None, "k-1"], ids=["no-key", "key"])
@pytest.mark.parametrize("name", list(OPERATIONS))
async def test_a_client_that_goes_away_after_any_loop_turn_leaves_the_platform_consistent(
        world: World, name: str, key: str | None) -> None:
    setup, operation, answers = OPERATIONS[name]
    svc = world.svc
    await world.tick("SOL", SOL_BID, SOL_ASK)
    cut = 0
    for cut in range(MAX_TURNS):
        who = await signup(svc)
        subject = await setup(svc, who)
        await world.settle()
        world.started.clear()
        client = asyncio.create_task(operation(svc, who, subject, key))
        for _ in range(cut):
            await asyncio.sleep(0)
        client.cancel()  # the client went away
        mine = list(world.started)  # the request's shielded work, once it began
        # the client is back at once with its clientOrderId, the request maybe under way
        retry = None if key is None else asyncio.create_task(
            operation(svc, who, subject, key))
        await asyncio.gather(client, return_exceptions=True)
        await world.settle()
        await world.check(who)
        assert not any(t.cancelled() for t in mine), cut
        first = [t.result() for t in mine]  # what the request made (nothing if not begun)
        assert all(isinstance(a, answers) for a in first), (cut, first)
        if not client.cancelled():  # it ended before the cut: every point is covered
            assert [client.result()] == first
        if retry is not None:
            again = await retry
            assert isinstance(again, answers)
            assert [again] == (first or [again]), cut
            seen = world.seen(who)
            assert await operation(svc, who, subject, key) == again  # and it ran once
            await world.settle()
            await world.check(who)
            assert world.seen(who) == seen
        if not client.cancelled():
            break
    assert 3 < cut < MAX_TURNS - 1
