"""LedgerCore: accounts and keys, margins, exactly-once settlement, idempotency, history."""

from __future__ import annotations

import pickle

from cluster.ledger_core import LedgerCore, hash_api_key
from engine.messages import ClosedPosition, IdemHit, IdemKey, MarginLock, SettlementItem
from engine.orders import CloseReason, Side
from engine.results import Code, Rejected

SIGNUP = 10_000_000_000


def closed(owner: int, position_id: int, margin: int, pnl: int,
           reason: CloseReason = CloseReason.MANUAL) -> ClosedPosition:
    payout = 0 if reason == CloseReason.LIQUIDATION else max(0, margin + pnl)
    return ClosedPosition(position_id, owner, "SOL", Side.LONG, 10000, 100, margin, 10, 9000, 0,
                          0, 1, 10000, pnl, payout, -pnl, margin + pnl - payout, int(reason), 2)


def test_accounts_keys_are_random_and_stored_only_as_hashes() -> None:
    core = LedgerCore(SIGNUP)
    a, b = core.create_account(), core.create_account()
    assert a.user != b.user and a.account_id != b.account_id and a.api_key != b.api_key
    assert len(a.api_key) >= 43  # 32 random bytes, base64url
    assert core.principal_of_key_hash(hash_api_key(a.api_key)) == (a.user, a.account_id)
    assert core.principal_of_key_hash(hash_api_key(a.api_key + "x")) is None
    assert a.api_key.encode() not in pickle.dumps(core.__dict__)
    assert core.balances_many([a.user, b.user]) == [(SIGNUP, 0), (SIGNUP, 0)]
    assert core.audit({}) == []


def test_lock_and_release_margins_in_one_batch() -> None:
    core = LedgerCore(SIGNUP)
    u = core.create_account().user
    out = core.lock_margins([MarginLock(u, 6_000_000_000), MarginLock(u, 6_000_000_000),
                             MarginLock(u, 4_000_000_000)])
    assert out[0] is None and out[2] is None
    assert isinstance(out[1], Rejected) and out[1].code is Code.INSUFFICIENT_BALANCE
    assert core.balances_many([u]) == [(0, SIGNUP)]
    core.release_margins([(u, 4_000_000_000)])
    assert core.balances_many([u]) == [(4_000_000_000, 6_000_000_000)]
    assert core.audit({u: 6_000_000_000}) == []
    assert core.audit({u: 5_000_000_000}) != []


def test_settlements_apply_exactly_once_under_resends_and_reordering() -> None:
    core = LedgerCore(SIGNUP)
    u = core.create_account().user
    core.lock_margins([MarginLock(u, 100_000_000)] * 3)
    items = [SettlementItem(1, closed(u, 11, 100_000_000, 5_000_000)),
             SettlementItem(2, closed(u, 12, 100_000_000, -30_000_000)),
             SettlementItem(3, closed(u, 13, 100_000_000, -120_000_000,
                                      CloseReason.LIQUIDATION))]
    # seq 2 and 3 arrive before seq 1: they wait
    assert core.apply_settlements("shard-SOL-0", items[1:]) == 0
    assert core.balances_many([u]) == [(SIGNUP - 300_000_000, 300_000_000)]
    assert core.audit({}, {"shard-SOL-0": items}) == []
    assert core.apply_settlements("shard-SOL-0", items) == 3
    after = core.balances_many([u])
    assert after == [(SIGNUP - 300_000_000 + 105_000_000 + 70_000_000, 0)]
    for _ in range(3):  # resends change nothing
        assert core.apply_settlements("shard-SOL-0", items) == 3
    assert core.balances_many([u]) == after
    # the same seq from another shard is another settlement
    assert core.apply_settlements("shard-BTC-0", []) == 0
    assert core.audit({}) == [] and core.audit({}, {"shard-SOL-0": items}) == []
    totals = core.totals()
    assert totals["sum_micros"] == 0 and totals["closed_positions"] == 3
    assert totals["house_micros"] == -5_000_000 + 30_000_000 + 120_000_000
    assert totals["insurance_micros"] == -20_000_000


def test_idempotency_keys_return_the_first_answer() -> None:
    core = LedgerCore(SIGNUP)
    u = core.create_account().user
    key = IdemKey(u, "open", "abc")
    assert core.lock_margins([MarginLock(u, 1_000_000, key)]) == [None]
    assert core.lock_margins([MarginLock(u, 1_000_000, key)]) == [IdemHit(None)]  # pending
    core.remember([(key, "first answer")])
    core.remember([(key, "second answer")])
    assert core.lock_margins([MarginLock(u, 1_000_000, key)]) == [IdemHit("first answer")]
    assert core.balances_many([u]) == [(SIGNUP - 1_000_000, 1_000_000)]
    # a refused lock is the key's answer too
    big = IdemKey(u, "open", "big")
    [refused] = core.lock_margins([MarginLock(u, SIGNUP, big)])
    assert isinstance(refused, Rejected)
    assert core.lock_margins([MarginLock(u, 1, big)]) == [IdemHit(refused)]
    # forget only drops pending reservations
    close_key = IdemKey(u, "close", "abc")
    assert core.begin([close_key]) == [None]
    core.forget([close_key, key])
    assert core.begin([close_key]) == [None]
    assert core.begin([key]) == [IdemHit("first answer")]


def test_history_is_newest_first_with_limit_and_cursor() -> None:
    core = LedgerCore(SIGNUP)
    u = core.create_account().user
    other = core.create_account().user
    core.lock_margins([MarginLock(u, 1_000_000)] * 5 + [MarginLock(other, 1_000_000)])
    items = [SettlementItem(i, closed(u, 100 + i, 1_000_000, 0)) for i in range(1, 6)]
    items.append(SettlementItem(6, closed(other, 999, 1_000_000, 0)))
    assert core.apply_settlements("s", items) == 6
    page = core.history(u, limit=2)
    assert isinstance(page, list) and [p.position_id for p in page] == [105, 104]
    page2 = core.history(u, limit=2, before=104)
    assert isinstance(page2, list) and [p.position_id for p in page2] == [103, 102]
    page3 = core.history(u, limit=10, before=102)
    assert isinstance(page3, list) and [p.position_id for p in page3] == [101]
    assert core.history(u, before=101) == []
    foreign = core.history(u, before=999)  # another user's id is not a cursor here
    unknown = core.history(u, before=12345)
    assert foreign == unknown and isinstance(foreign, Rejected)
    assert [p.position_id for p in core.history(other)] == [999]  # type: ignore[union-attr]
