"""Settlements on the hot paths, through in-process ports: the feed's outbox read in its tick
call, a manual close's own item, each delivered with one ledger call, the acknowledgement
riding with the shard's next call; and what sends them the whole way round instead."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from cluster.actors.host import host_specs
from cluster.actors.local import LocalPort
from cluster.actors.port import BATCHES_IN_FLIGHT
from cluster.actors.port import Port
from cluster.actors.port import Unavailable
from cluster.trading.courier import Courier
from engine.ledger_machine import AppliedSeq
from engine.ledger_machine import ApplySettlements
from engine.ledger_machine import History
from engine.ledger_machine import Totals
from engine.market import Tick
from engine.messages import ClosedPosition
from engine.messages import CloseOrder
from engine.messages import OpenPosition
from engine.messages import Principal
from engine.results import Rejected
from engine.shard_machine import AckOutbox
from engine.shard_machine import ApplyTick
from engine.shard_machine import Close
from engine.shard_machine import Open
from engine.shard_machine import Outbox
from engine.shard_machine import OutboxView
from engine.shard_machine import Stats
from tests.unit.cluster.faulty_ports import FailingBatches
from tests.unit.cluster.faulty_ports import Gated
from tests.unit.cluster.faulty_ports import Wrapped
from tests.unit.cluster.local_platform import SIGNUP
from tests.unit.cluster.local_platform import USD
from tests.unit.cluster.local_platform import Make
from tests.unit.cluster.local_platform import Platform
from tests.unit.cluster.local_platform import balances
from tests.unit.cluster.local_platform import sol_long
from tests.unit.cluster.local_platform import sol_trader

pytestmark = pytest.mark.asyncio


class Recording(Wrapped):
    """Every batch that goes through, as the command types it carried."""

    def __init__(self, inner: Port) -> None:
        super().__init__(inner)
        self.batches: list[list[type]] = []

    async def execute(self, commands: list[Any]) -> list[Any]:
        self.batches.append([type(c) for c in commands])
        return await self.inner.execute(commands)


def tick(p: Platform, bid: str, ask: str, seq: int) -> ApplyTick:
    asset = p.settings.assets["SOL"]
    return ApplyTick(Tick("SOL", asset.price_to_ticks(bid), asset.price_to_ticks(ask),
                          p.clock.now_us, seq, "test"))


async def two_take_profits(p: Platform, who: Principal, port: Port) -> OutboxView:
    """Two SOL longs whose take-profit the tick sent through ``port`` crosses: the outbox as
    the call that carried the tick read it."""
    for _ in range(2):
        assert isinstance(await p.service.open_position(who, sol_long(tp_ticks=10100)),
                          OpenPosition)
    closed, view = await port.call_many([tick(p, "101.00", "101.01", 10_000), Outbox()])
    assert closed == 2 and [i.seq for i in view.items] == [1, 2]
    return view


async def resumed_with_two_closes(make: Make
                                  ) -> tuple[Platform, Principal, str, OutboxView, Courier]:
    """A platform whose SOL trader ``who`` had two longs closed by one tick on shard ``name``
    (``view``: the outbox that tick's call read), and a courier over the platform's own ports
    that has resumed that shard, as on its first delivery: nothing delivered yet."""
    p = make()
    who = await sol_trader(p)
    name = p.shard_of("SOL").name
    view = await two_take_profits(p, who, p.shards[name])
    courier = Courier(p.ledger, dict(p.shards))
    await courier.resume(name)
    return p, who, name, view, courier


# --------------------------------------------------------------------------- the port
async def test_a_posted_command_rides_with_the_next_batch_and_outlives_a_failed_one(
        make: Make) -> None:
    p = make()
    who = await sol_trader(p)
    name = p.shard_of("SOL").name
    recording = Recording(p.shards[name])
    failing = FailingBatches(recording, Stats, failures=1)
    view = await two_take_profits(p, who, p.shards[name])
    assert await p.ledger.call(ApplySettlements(name, tuple(view.items))) == 2

    failing.post(AckOutbox(1))
    failing.post(AckOutbox(2))  # replaces the older one
    assert recording.batches == []  # no call of its own
    with pytest.raises(Unavailable):  # the batch it rode with was lost on its way
        await failing.call(Stats())
    assert (await p.shards[name].call(Outbox())).items == view.items
    stats = await failing.call(Stats())  # posted again: it rides with the next batch
    assert stats.outbox_len == 0 and recording.batches == [[AckOutbox, Stats]]
    assert await failing.call_many([Stats()]) == [stats]  # sent once
    assert recording.batches[-1] == [Stats]


async def test_calls_made_while_the_host_is_busy_wait_and_leave_in_one_batch(
        make: Make) -> None:
    p = make()
    await sol_trader(p)
    name = p.shard_of("SOL").name
    recording = Recording(p.shards[name])
    port = Gated(recording, Stats)  # a host whose batches take until the test opens the gate
    first = [asyncio.ensure_future(port.call(Stats())) for _ in range(3)]
    await asyncio.sleep(0)  # one loop turn: those three leave as one batch
    later: list[asyncio.Future[Any]] = []
    for _ in range(BATCHES_IN_FLIGHT + 1):  # one batch per loop turn while there is room
        later += [asyncio.ensure_future(port.call(Stats())) for _ in range(2)]
        await asyncio.sleep(0)
    assert port.batcher.batches == BATCHES_IN_FLIGHT  # the rest wait here, not at the host
    port.opened.set()
    answers = await asyncio.gather(*first, *later)
    assert all(a.opens == 0 for a in answers)
    sizes = [len(b) for b in recording.batches]
    # the calls that waited went together, in one batch, once one under way returned
    assert sizes == [3, *[2] * (BATCHES_IN_FLIGHT - 1), 2 * 2]


# --------------------------------------------------------------------------- manual closes
async def test_a_manual_close_acknowledges_its_settlement_with_the_shards_next_call(
        make: Make) -> None:
    recording: list[Recording] = []

    def wrap(port: Any) -> Port:
        recording.append(Recording(port))
        return recording[-1]

    p = make(wrap=wrap)
    sol = next(r for r in recording if r.name == p.shard_of("SOL").name)
    who = await sol_trader(p)
    for _ in range(2):  # the first settlement resumes the shard's numbering (the full path)
        position = await p.service.open_position(who, sol_long())
        assert isinstance(position, OpenPosition)
        sol.batches.clear()
        closed = await p.service.close_position(who, CloseOrder(position.position_id))
        assert closed == (await p.ledger.call(History(who.user)))[0]
    assert sol.batches == [[Close]]  # its acknowledgement waits for the shard's next call
    [view] = p.shard_of("SOL").execute_blocking([Outbox()])
    assert [i.seq for i in view.items] == [2]  # applied by the ledger, not acknowledged yet
    position = await p.service.open_position(who, sol_long())
    assert isinstance(position, OpenPosition)
    assert sol.batches[-1] == [AckOutbox, Open]
    [view] = p.shard_of("SOL").execute_blocking([Outbox()])
    assert view == OutboxView([], 2)
    pnl = sum(h.pnl_micros for h in await p.ledger.call(History(who.user)))
    assert balances(p, who) == (SIGNUP - 100 * USD + pnl, 100 * USD)
    assert await p.audit() == []


# --------------------------------------------------------------------------- tick closes
async def test_the_outbox_read_with_the_ticks_is_delivered_with_one_ledger_call(
        make: Make) -> None:
    p = make()
    who = await sol_trader(p)
    name = p.shard_of("SOL").name
    ledger = Recording(p.ledger)
    shard = Recording(p.shards[name])
    courier = Courier(ledger, {name: shard})
    await courier.resume(name)  # what a courier does on its first delivery to a shard
    ledger.batches.clear()
    shard.batches.clear()
    view = await two_take_profits(p, who, shard)
    assert await courier.forward(name, view) == 2
    assert ledger.batches == [[ApplySettlements]]
    assert shard.batches == [[ApplyTick, Outbox]]  # the acknowledgement is posted, not sent
    assert await courier.forward(name, view) == 2  # a resend changes nothing
    closed, view = await shard.call_many([tick(p, "101.00", "101.01", 10_001), Outbox()])
    assert closed == 0 and view == OutboxView([], 2)
    assert shard.batches[-1] == [AckOutbox, ApplyTick, Outbox]
    assert (await p.ledger.call(Totals()))["closed_positions"] == 2
    assert balances(p, who)[1] == 0
    assert await p.audit() == []


async def test_a_gap_before_the_outbox_read_is_delivered_the_whole_way(make: Make) -> None:
    p, _, name, view, courier = await resumed_with_two_closes(make)
    # the first close is still on its way: the ledger cannot apply the second alone
    assert await courier.forward(name, OutboxView(view.items[1:], 2)) == 2
    assert await p.ledger.call(AppliedSeq(name)) == 2
    assert (await p.shards[name].call(Outbox())).items == []  # acknowledged on that path
    assert await p.audit() == []


async def restarted_empty(p: Platform, name: str) -> LocalPort:
    """Shard ``name``'s port over a new, empty host (one that lost its memory), priced again
    at 100.00/100.01."""
    port = p.shards[name]
    port.runner = host_specs(p.settings)[1][name].runner()
    port.runner.clock_us = p.clock
    await port.call(tick(p, "100.00", "100.01", 20_000))
    return port


async def test_an_outbox_numbered_below_the_ledger_continues_after_it(make: Make) -> None:
    p, who, name, view, courier = await resumed_with_two_closes(make)
    assert await courier.forward(name, view) == 2
    # the shard restarts empty and closes one position before anyone resumes it: its
    # numbering starts again at 1, below the 2 the ledger applied
    port = await restarted_empty(p, name)
    pos = await p.service.open_position(who, sol_long(tp_ticks=10100))
    assert isinstance(pos, OpenPosition)
    closed, view = await port.call_many([tick(p, "101.00", "101.01", 20_001), Outbox()])
    assert closed == 1 and view.last_seq == 1 < await p.ledger.call(AppliedSeq(name))
    # not taken for a resend: renumbered after the ledger, and delivered as such
    assert await courier.forward(name, view) == 3
    assert await port.call(Outbox()) == OutboxView([], 3)
    _, view = await port.call_many([tick(p, "101.00", "101.01", 20_002), Outbox()])
    assert await courier.forward(name, view) == 3
    history = await p.ledger.call(History(who.user))
    assert history[0].position_id == pos.position_id and len(history) == 3
    assert balances(p, who)[1] == 0
    assert await p.audit() == []


async def test_a_manual_close_numbered_below_the_ledger_is_settled_not_acknowledged(
        make: Make) -> None:
    p = make()
    who = await sol_trader(p)
    for _ in range(2):  # the service's courier resumes the shard on the first
        position = await p.service.open_position(who, sol_long())
        assert isinstance(position, OpenPosition)
        closed = await p.service.close_position(who, CloseOrder(position.position_id))
        assert not isinstance(closed, Rejected)
    name = p.shard_of("SOL").name
    assert await p.ledger.call(AppliedSeq(name)) == 2
    # the shard restarts empty and closes a position by hand before anyone resumes it: its
    # close is number 1 again, below the 2 the ledger applied from its earlier life
    await restarted_empty(p, name)
    pos = await p.service.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    closed = await p.service.close_position(who, CloseOrder(pos.position_id))
    assert isinstance(closed, ClosedPosition)
    # settled (renumbered after the ledger's) before the answer, never dropped as a resend
    assert await p.ledger.call(AppliedSeq(name)) == 3
    assert (await p.ledger.call(History(who.user)))[0] == closed
    assert balances(p, who)[1] == 0
    assert await p.audit() == []
