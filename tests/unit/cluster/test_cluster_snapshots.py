"""Shard and ledger cores survive a snapshot written and read by engine.snapshot."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.ledger_core import LedgerCore, hash_api_key
from cluster.messages import (
    CloseOrder,
    IdemKey,
    MarginLock,
    OpenOrder,
    OpenPosition,
    ShardOpen,
)
from cluster.ports import LocalLedgerPort, LocalShardPort
from cluster.shard_core import ShardCore, merge_margins
from engine.orders import Side
from engine.snapshot import load_latest_snapshot, write_snapshot
from tests.unit.cluster.local_platform import build_platform

USD = 10**6


@pytest.mark.asyncio
async def test_cores_rebuilt_from_snapshots_are_the_same_platform(tmp_path: Path) -> None:
    p = build_platform()
    svc = p.service
    sol = p.shard_of("SOL")
    sol.ledger = None  # keep tick settlements in the outbox: they must survive too
    accounts = [await svc.create_account() for _ in range(3)]
    users = [await svc.authenticate(a.api_key) for a in accounts]
    await p.push_tick("SOL", "100.00", "100.01")
    await p.push_tick("BTC", "60000.0", "60000.1")
    opened: list[OpenPosition] = []
    for i, who in enumerate(users):
        assert who is not None
        for lev in (5, 50):
            r = await svc.open_position(who, OpenOrder("SOL", Side.LONG, 10 * USD, lev,
                                                       client_order_id=f"o{i}{lev}"))
            assert isinstance(r, OpenPosition)
            opened.append(r)
        b = await svc.open_position(who, OpenOrder("BTC", Side.SHORT, 20 * USD, 3))
        assert isinstance(b, OpenPosition)
    assert users[0] is not None
    closed = await svc.close_position(users[0], CloseOrder(opened[0].position_id,
                                                           client_order_id="c0"))
    assert not isinstance(closed, OpenPosition)
    await p.push_tick("SOL", "98.00", "98.01")  # liquidates the 50x longs (into the outbox)
    assert len(sol.core.outbox()) == 4  # the manual close (not acked yet) + 3 liquidations

    # snapshot every core through real files, rebuild them
    for name, port in p.shards.items():
        arrays, meta = port.core.to_snapshot()
        write_snapshot(tmp_path / name, 7, arrays, meta)
    _, ledger_meta = p.ledger.core.to_snapshot()
    write_snapshot(tmp_path / "ledger", 9, {}, ledger_meta)
    ledger_snap = load_latest_snapshot(tmp_path / "ledger")
    assert ledger_snap is not None
    ledger2 = LedgerCore.from_snapshot(ledger_snap.meta)
    shards2: dict[str, ShardCore] = {}
    for name, port in p.shards.items():
        snap = load_latest_snapshot(tmp_path / name)
        assert snap is not None
        shards2[name] = ShardCore.from_snapshot(port.core.spec, port.core.asset, 0,
                                                port.core.max_price_age_us, snap.arrays,
                                                snap.meta)
        old, new = port.core, shards2[name]
        assert new.outbox() == old.outbox() and new.last_tick == old.last_tick
        assert new.stats()._replace(book_nbytes=0) == old.stats()._replace(book_nbytes=0)
        assert new.open_margins_by_user() == old.open_margins_by_user()
        owners = [u.user for u in users if u is not None]
        assert new.positions_of_many(owners) == old.positions_of_many(owners)
    owners = [u.user for u in users if u is not None]
    assert ledger2.balances_many(owners) == p.ledger.core.balances_many(owners)
    assert ledger2.totals() == p.ledger.core.totals()
    for u in owners:
        assert ledger2.history(u) == p.ledger.core.history(u)
    assert ledger2.principal_of_key_hash(hash_api_key(accounts[1].api_key)) == users[1]
    outboxes = {n: c.outbox() for n, c in shards2.items()}
    assert ledger2.audit(merge_margins(c.open_margins_by_user() for c in shards2.values()),
                         outboxes) == []
    # stored answers and remembered open results still answer retries
    key = IdemKey(owners[0], "open", "o05")
    assert ledger2.begin([key])[0] is not None
    sol2 = shards2[sol.name]
    first = ShardOpen(1, owners[0], Side.LONG, USD, 2, None, None, None, 100)
    assert ledger2.lock_margins([MarginLock(owners[0], USD)]) == [None]  # as the service does
    [a] = sol2.open_many([first], sol.clock_us())
    [b] = sol2.open_many([first], sol.clock_us())
    assert a == b and len(sol2.book) == len(sol.core.book) + 1
    # the rebuilt platform keeps working: deliver the outbox, new accounts get new ids
    last = ledger2.apply_settlements(sol.name, sol2.outbox())
    assert last == sol2.stats().last_seq
    sol2.ack_outbox(last)
    assert ledger2.create_account().user == max(owners) + 1
    ports = {n: LocalShardPort(c) for n, c in shards2.items()}
    ledger_port = LocalLedgerPort(ledger2)
    views = [await port.audit_view() for port in ports.values()]
    assert await ledger_port.audit(merge_margins(v[0] for v in views),
                                   {n: v[1] for n, v in zip(ports, views, strict=True)}) == []
    for port in ports.values():
        port.serial.shutdown()
    ledger_port.serial.shutdown()


def test_a_snapshot_belongs_to_its_shard() -> None:
    p = build_platform()
    sol, btc = p.shard_of("SOL").core, p.shard_of("BTC").core
    arrays, meta = sol.to_snapshot()
    with pytest.raises(ValueError):
        ShardCore.from_snapshot(btc.spec, btc.asset, 0, 1, arrays, meta)
