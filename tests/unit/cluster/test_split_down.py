"""New positions and orders of a split asset (SHARDS=SOL=4) while one of its splits does not
answer: they go to the splits that do, until it answers again or SPLIT_DOWN_S passes."""

from __future__ import annotations

import collections

import pytest
from cluster.actors.port import Port
from cluster.actors.port import Unavailable
from cluster.config import Settings
from cluster.trading.service import SPLIT_DOWN_S
from cluster.trading.service import TradingService
from engine.messages import OpenPosition
from engine.messages import PendingOrder
from engine.messages import PlaceOrder
from engine.messages import Principal
from engine.order_book import OrderKind
from engine.orders import Side
from tests.unit.cluster.faulty_ports import Down
from tests.unit.cluster.local_platform import USD
from tests.unit.cluster.local_platform import Make
from tests.unit.cluster.local_platform import Seconds
from tests.unit.cluster.local_platform import sol_long
from tests.unit.cluster.local_platform import sol_trader

pytestmark = pytest.mark.asyncio


async def split_platform(make: Make) -> tuple[TradingService, list[Down], Seconds, Principal]:
    """A service over SOL split four ways whose port of each split can be taken down (by
    split), its clock, and a SOL trader."""
    p = make(settings=Settings(shards={"SOL": 4}))
    sol = p.hosts.layout.of_asset("SOL")
    downs = [Down(p.shards[s.name]) for s in sol]
    clock = Seconds()
    ports: dict[str, Port] = {**p.shards, **{d.name: d for d in downs}}
    svc = make.service(p, shards=ports, clock=clock)
    return svc, downs, clock, await sol_trader(p, svc)


async def split_of_open(svc: TradingService, who: Principal) -> int:
    """The split that took a new SOL position of ``who``."""
    pos = await svc.open_position(who, sol_long(10))
    assert isinstance(pos, OpenPosition), pos
    spec = svc.layout.of_position(pos.position_id)
    assert spec is not None
    return spec.split


async def split_of_order(svc: TradingService, who: Principal) -> int:
    """The split that took a new SOL limit order of ``who`` (at 90.00: it waits)."""
    order = await svc.place_order(who, PlaceOrder("SOL", Side.LONG, OrderKind.LIMIT, 9_000,
                                                  10 * USD, 10))
    assert isinstance(order, PendingOrder), order
    spec = svc.layout.of_position(order.order_id)
    assert spec is not None
    return spec.split


async def test_opens_and_orders_pass_over_a_split_that_does_not_answer(make: Make) -> None:
    """After the one open that finds split 1 down (in doubt: it is not sent elsewhere), every
    open and order goes to the other three, evenly; once a call to split 1 succeeds (a read of
    the account), it takes opens again. Before, every fourth open was answered 503."""
    svc, downs, _, who = await split_platform(make)
    assert [await split_of_open(svc, who) for _ in range(4)] == [0, 1, 2, 3]
    downs[1].down = True
    assert await split_of_open(svc, who) == 0
    with pytest.raises(Unavailable):  # its turn: the first open finds it down
        await svc.open_position(who, sol_long(10))
    assert svc.counters["opens_in_doubt"] == 1
    opened = collections.Counter([await split_of_open(svc, who) for _ in range(9)])
    assert opened == {0: 3, 2: 3, 3: 3}
    placed = collections.Counter([await split_of_order(svc, who) for _ in range(6)])
    assert placed == {0: 2, 2: 2, 3: 2}
    assert svc.counters["opens_in_doubt"] == 1

    downs[1].down = False
    assert (await svc.state(who)).unavailable == ()  # split 1 answers a read
    assert sorted([await split_of_open(svc, who) for _ in range(4)]) == [0, 1, 2, 3]
    assert await svc.reconciler.run_once() == 0  # the open in doubt: it never arrived
    problems, _ = await svc.audit()
    assert problems == []


async def test_a_split_found_down_gets_opens_again_after_split_down_s(make: Make) -> None:
    """A split found down by a read (no open in doubt) is passed over for SPLIT_DOWN_S, then
    a new open probes it: taken when it answers, and passed over again when it does not."""
    svc, downs, clock, who = await split_platform(make)
    downs[2].down = True
    assert (await svc.state(who)).unavailable == (downs[2].name,)
    downs[2].down = False  # back, but nothing has asked it since
    assert [await split_of_open(svc, who) for _ in range(3)] == [0, 1, 3]
    clock.now += SPLIT_DOWN_S
    assert sorted([await split_of_open(svc, who) for _ in range(4)]) == [0, 1, 2, 3]

    downs[2].down = True
    assert (await svc.state(who)).unavailable == (downs[2].name,)
    clock.now += SPLIT_DOWN_S  # still down: the probing open fails, the rest go elsewhere
    outcomes = []
    for _ in range(8):
        try:
            outcomes.append(await split_of_open(svc, who))
        except Unavailable:
            outcomes.append(-1)
    assert outcomes.count(-1) == 1 and 2 not in outcomes
    assert svc.counters["opens_in_doubt"] == 1


async def test_every_split_down_answers_unavailable(make: Make) -> None:
    """With every split of SOL down an open goes round-robin as before and is refused
    (Unavailable: 503 at the API), each in doubt on the split it went to."""
    svc, downs, _, who = await split_platform(make)
    for down in downs:
        down.down = True
    for _ in range(5):
        with pytest.raises(Unavailable):
            await svc.open_position(who, sol_long(10))
    assert svc.counters["opens_in_doubt"] == 5
    for down in downs:
        down.down = False
    assert await svc.reconciler.run_once() == 0
    assert (await svc.state(who)).positions == []
