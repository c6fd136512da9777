"""New positions and orders of a split asset (SHARDS=SOL=4) while one of its splits does not
answer (a call, or a health check, found it down): they go to the splits that do, until it
answers again (a call to it succeeds, or a health check or the service's ping of it every
SPLIT_PROBE_S finds it taking writes)."""

from __future__ import annotations

import asyncio
import collections

import pytest
from cluster.actors.port import Port
from cluster.actors.port import Unavailable
from cluster.config import Settings
from cluster.trading.service import SPLIT_PROBE_S
from cluster.trading.service import TradingService
from engine.ledger_machine import LockMargin
from engine.messages import OpenPosition
from engine.messages import PendingOrder
from engine.messages import PlaceOrder
from engine.messages import Principal
from engine.order_book import OrderKind
from engine.orders import Side
from tests.unit.cluster.faulty_ports import Down
from tests.unit.cluster.faulty_ports import Gated
from tests.unit.cluster.local_platform import USD
from tests.unit.cluster.local_platform import Make
from tests.unit.cluster.local_platform import sol_long
from tests.unit.cluster.local_platform import sol_trader
from tests.unit.cluster.local_platform import until

pytestmark = pytest.mark.asyncio


async def split_platform(make: Make) -> tuple[TradingService, list[Down], Principal]:
    """A service over SOL split four ways whose port of each split can be taken down (by
    split), and a SOL trader."""
    p = make(settings=Settings(shards={"SOL": 4}))
    sol = p.hosts.layout.of_asset("SOL")
    downs = [Down(p.shards[s.name]) for s in sol]
    ports: dict[str, Port] = {**p.shards, **{d.name: d for d in downs}}
    svc = make.service(p, shards=ports)
    return svc, downs, await sol_trader(p, svc)


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
    svc, downs, who = await split_platform(make)
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


async def test_a_split_found_down_is_probed_not_spent_on_opens(make: Make) -> None:
    """A split found down (here by a read: no open in doubt) is pinged every SPLIT_PROBE_S
    while it stays down: no open is sent there to find out, however long that is, and once a
    ping is answered it takes opens again without one being asked of it first. Before, each
    3 s down cost an open (in doubt, answered 503), and a split back waited out the 3 s."""
    svc, downs, who = await split_platform(make)
    downs[2].down = True
    assert (await svc.state(who)).unavailable == (downs[2].name,)
    assert svc.split_down(downs[2].name)
    pinged = downs[2].pings
    await until(lambda: downs[2].pings >= pinged + 3, 20)  # three probes, none answered
    outcomes = []
    for _ in range(9):
        try:
            outcomes.append(await split_of_open(svc, who))
        except Unavailable:
            outcomes.append(-1)
    assert collections.Counter(outcomes) == {0: 3, 1: 3, 3: 3}
    assert svc.counters["opens_in_doubt"] == 0

    downs[2].down = False  # back: the next probe finds it
    await until(lambda: not svc.split_down(downs[2].name), 20)
    assert sorted([await split_of_open(svc, who) for _ in range(4)]) == [0, 1, 2, 3]
    pinged = downs[2].pings
    await asyncio.sleep(3 * SPLIT_PROBE_S)
    assert downs[2].pings == pinged  # a split that answers is not probed


async def test_a_probe_does_not_hold_the_service_from_stopping(make: Make) -> None:
    """A split down for good: the service still stops at once (its probe is cancelled, not
    waited for like a request)."""
    svc, downs, who = await split_platform(make)
    downs[0].down = True
    await svc.state(who)
    await until(lambda: downs[0].pings >= 1, 20)
    await asyncio.wait_for(svc.aclose(), 5 * SPLIT_PROBE_S)
    pinged = downs[0].pings
    await asyncio.sleep(3 * SPLIT_PROBE_S)
    assert downs[0].pings == pinged


async def test_every_split_down_answers_unavailable(make: Make) -> None:
    """With every split of SOL down an open goes round-robin as before and is refused
    (Unavailable: 503 at the API), each in doubt on the split it went to."""
    svc, downs, who = await split_platform(make)
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


async def test_a_health_check_finds_a_split_down_and_back_as_a_call_would(make: Make) -> None:
    """A split that does not answer /healthz's ping is passed over from then on: no open is
    spent finding it down; once a check finds it answering, it takes opens at once."""
    svc, downs, who = await split_platform(make)
    downs[3].down = True
    health = await svc.health()
    assert health.components[downs[3].name] == "unavailable"
    assert svc.split_down(downs[3].name)
    opened = collections.Counter([await split_of_open(svc, who) for _ in range(9)])
    assert opened == {0: 3, 1: 3, 2: 3} and svc.counters["opens_in_doubt"] == 0

    downs[3].down = False
    assert (await svc.health()).components[downs[3].name] == "ok"
    assert not svc.split_down(downs[3].name)  # at once, not at the probe's next ping
    assert sorted([await split_of_open(svc, who) for _ in range(4)]) == [0, 1, 2, 3]


async def test_a_health_check_slowed_by_another_part_keeps_what_a_later_call_found(
        make: Make) -> None:
    """A split's ping answered, then a call finds the split down while another part of the
    check (here an extra one) has still not answered: the split stays passed over when the
    check ends. Before, the check's older "ok" marked it back up and the next open sent
    there was lost in doubt."""
    slow = asyncio.Event()

    async def waits() -> bool:
        await slow.wait()
        return True

    p = make(settings=Settings(shards={"SOL": 4}))
    downs = [Down(p.shards[s.name]) for s in p.hosts.layout.of_asset("SOL")]
    svc = make.service(p, shards={**p.shards, **{d.name: d for d in downs}},
                       health_checks={"slow": waits})
    who = await sol_trader(p, svc)
    checking = asyncio.ensure_future(svc.health())
    await until(lambda: all(d.pings for d in downs), 5)  # every split answered its ping
    downs[1].down = True
    assert (await svc.state(who)).unavailable == (downs[1].name,)
    assert svc.split_down(downs[1].name)
    slow.set()
    assert (await checking).components[downs[1].name] == "ok"
    assert svc.split_down(downs[1].name)
    opened = collections.Counter([await split_of_open(svc, who) for _ in range(6)])
    assert opened == {0: 2, 2: 2, 3: 2} and svc.counters["opens_in_doubt"] == 0


class SlowPing(Down):
    """Down, and its ping answers (or fails) only once ``answer`` is set."""

    def __init__(self, inner: Port) -> None:
        super().__init__(inner)
        self.answer = asyncio.Event()

    async def ping(self) -> bool:
        self.pings += 1
        await self.answer.wait()
        self.pings -= 1  # counted by Down's own, below
        return await super().ping()


async def test_a_health_check_that_ends_after_the_service_stopped_starts_no_probe(
        make: Make) -> None:
    """A split whose ping fails only after the service stopped: the check under way then
    starts no probe, which would ping it on, forever. Before, it did."""
    p = make(settings=Settings(shards={"SOL": 4}))
    slow = SlowPing(p.shards[p.hosts.layout.of_asset("SOL")[2].name])
    slow.down = True
    svc = make.service(p, shards={**p.shards, slow.name: slow})
    checking = asyncio.ensure_future(svc.health())
    await until(lambda: slow.pings == 1, 5)  # asked
    await svc.aclose()
    slow.answer.set()
    assert (await checking).components[slow.name] == "unavailable"
    await asyncio.sleep(3 * SPLIT_PROBE_S)
    assert slow.pings == 1  # nothing pings it any more


async def test_a_split_found_down_while_an_open_locks_its_margin_is_passed_over(
        make: Make) -> None:
    """The split an open goes to is chosen once its margin is locked: split 0, whose turn it
    was when the open arrived, is found down while the ledger locks the margin, and the open
    goes to split 1 and succeeds. Before, the split was chosen before the lock, the open was
    sent to split 0 all the same and answered 503, in doubt."""
    p = make(settings=Settings(shards={"SOL": 4}))
    downs = [Down(p.shards[s.name]) for s in p.hosts.layout.of_asset("SOL")]
    locking = Gated(p.ledger, LockMargin)
    svc = make.service(p, ledger=locking, shards={**p.shards, **{d.name: d for d in downs}})
    who = await sol_trader(p, svc)
    opening = asyncio.ensure_future(svc.open_position(who, sol_long(10)))
    await asyncio.wait_for(locking.reached.wait(), 5)
    downs[0].down = True
    assert (await svc.state(who)).unavailable == (downs[0].name,)
    locking.opened.set()
    pos = await opening
    assert isinstance(pos, OpenPosition), pos
    spec = svc.layout.of_position(pos.position_id)
    assert spec is not None and spec.split == 1
    assert svc.counters["opens_in_doubt"] == 0


async def test_a_request_after_the_service_stopped_starts_no_background_task(
        make: Make) -> None:
    """Once the service stopped, a request still served (or Serve's health check, which
    starts the sweeps) leaves no task behind: its split down starts no probe, and neither
    the sweeps nor the reconciler's rounds start again. Before, the sweeps did, every 10 s,
    forever, and so did the rounds over a request in doubt while its split stayed down."""
    svc, downs, who = await split_platform(make)
    await svc.aclose()
    before = asyncio.all_tasks()
    svc.watch()
    for down in downs:
        down.down = True
    with pytest.raises(Unavailable):  # in doubt: the reconciler's work, were it running
        await svc.open_position(who, sol_long(10))
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == before
