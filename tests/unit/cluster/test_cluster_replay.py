"""Journaled cores: replaying their events (through the engine.events codec) rebuilds them."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.ledger_core import LedgerCore
from cluster.messages import CloseOrder, OpenOrder, OpenPosition, ShardOpen
from cluster.shard_core import ShardCore, merge_margins
from engine.events import decode, encode
from engine.orders import Side
from tests.unit.cluster.local_platform import Platform, build_platform

USD = 10**6


def journaled_platform() -> Platform:
    p = build_platform()
    p.ledger.core.events = []
    for port in p.shards.values():
        port.core.events = []
    return p


def drain(events: list[Any] | None) -> list[Any]:
    assert events is not None
    out = [decode(encode(e)) for e in events]  # what the journal would give back
    events.clear()
    return out


async def scenario(p: Platform) -> None:
    svc = p.service
    users = []
    for _ in range(3):
        who = await svc.authenticate((await svc.create_account()).api_key)
        assert who is not None
        users.append(who)
    await p.push_tick("SOL", "100.00", "100.01")
    await p.push_tick("ETH", "3000.00", "3000.01")
    opened = []
    for i, who in enumerate(users):
        for lev, tp in ((5, 10500), (50, None)):
            r = await svc.open_position(who, OpenOrder("SOL", Side.LONG, 10 * USD, lev,
                                                       tp_ticks=tp, client_order_id=f"{i}{lev}"))
            assert isinstance(r, OpenPosition)
            opened.append(r)
        e = await svc.open_position(who, OpenOrder("ETH", Side.SHORT, 30 * USD, 4))
        assert isinstance(e, OpenPosition)
    refused = await svc.open_position(users[0], OpenOrder("SOL", Side.LONG, 10**6 * USD, 1,
                                                          client_order_id="big"))
    assert not isinstance(refused, OpenPosition)
    bad_tp = await svc.open_position(users[2], OpenOrder("SOL", Side.LONG, 10 * USD, 5,
                                                         tp_ticks=5000))
    assert not isinstance(bad_tp, OpenPosition)  # refused by the shard: the lock is released
    await svc.close_position(users[1], CloseOrder(opened[2].position_id, client_order_id="c"))
    await p.push_tick("SOL", "98.00", "98.01")   # liquidates the 50x longs
    await p.push_tick("SOL", "105.00", "105.01")  # takes the 5x profits
    p.shard_of("ETH").core.resolve_opens([424242])  # a fence


@pytest.mark.asyncio
async def test_replaying_the_journal_rebuilds_every_core() -> None:
    p = journaled_platform()
    await scenario(p)
    ledger_events = drain(p.ledger.core.events)
    kinds = {type(e).__name__ for e in ledger_events}
    assert kinds == {"AccountCreated", "MarginLocked", "MarginReleased", "SettlementApplied",
                     "ClientOrderStored"}
    ledger2 = LedgerCore(p.settings.signup_balance_micros)
    for event in ledger_events:
        ledger2.apply_event(event)
    old = p.ledger.core
    users = list(range(1, 4))
    assert ledger2.balances_many(users) == old.balances_many(users)
    assert ledger2.totals() == old.totals()
    assert [ledger2.history(u) for u in users] == [old.history(u) for u in users]
    assert ledger2._answers == {k: v for k, v in old._answers.items() if v is not None}
    shards2 = {}
    for name, port in p.shards.items():
        core = ShardCore(port.core.spec, port.core.asset, 0, port.core.max_price_age_us)
        for event in drain(port.core.events):
            core.apply_event(event)
        # acknowledgements are not journaled: a restarted shard learns them from the ledger
        core.ack_outbox(ledger2.applied_seq(name))
        assert core.open_margins_by_user() == port.core.open_margins_by_user()
        assert core.outbox() == port.core.outbox()
        assert core.book.to_arrays().keys() == port.core.book.to_arrays().keys()
        assert [[(q.position_id, q.liq_ticks, q.margin_micros) for q in ps]
                for ps in core.positions_of_many(users)] == \
            [[(q.position_id, q.liq_ticks, q.margin_micros) for q in ps]
             for ps in port.core.positions_of_many(users)]
        shards2[name] = core
    # the rebuilt ledger agrees with the rebuilt shards
    assert ledger2.audit(merge_margins(c.open_margins_by_user() for c in shards2.values()),
                         {n: c.outbox() for n, c in shards2.items()}) == []
    # a fenced request stays fenced after the replay
    eth = shards2["shard-ETH-0"]
    [late] = eth.open_many([ShardOpen(424242, 1, Side.LONG, USD, 2, None, None, None, 100)],
                           p.clock.now_us)
    assert not isinstance(late, OpenPosition)


@pytest.mark.asyncio
async def test_snapshot_plus_journal_tail_equals_the_live_core() -> None:
    p = journaled_platform()
    await scenario(p)
    sol = p.shard_of("SOL").core
    drain(sol.events)
    arrays, meta = sol.to_snapshot()
    _, ledger_meta = p.ledger.core.to_snapshot()
    drain(p.ledger.core.events)
    await scenario(p)  # more changes after the snapshots
    sol2 = ShardCore.from_snapshot(sol.spec, sol.asset, 0, sol.max_price_age_us, arrays, meta)
    for event in drain(sol.events):
        sol2.apply_event(event)
    sol2.ack_outbox(p.ledger.core.applied_seq(sol.spec.name))
    assert sol2.outbox() == sol.outbox()
    assert sol2.open_margins_by_user() == sol.open_margins_by_user()
    ledger2 = LedgerCore.from_snapshot(ledger_meta)
    for event in drain(p.ledger.core.events):
        ledger2.apply_event(event)
    assert ledger2.totals() == p.ledger.core.totals()
    users = list(range(1, 7))
    assert ledger2.balances_many(users) == p.ledger.core.balances_many(users)
