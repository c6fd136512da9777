"""LedgerMachine: accounts and keys, margins, exactly-once settlement, clientOrderIds, history,
start-time reconciliation; replay of its events (and of the older journal layout) and its
snapshots give back an equal state."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cluster.durability.snapshot
import cluster.durability.store
import numpy as np
import pytest
from engine import events as ev
from engine.account_events import POSITION_OPENED
from engine.account_events import Balance
from engine.events import AccountCreated
from engine.events import ClientOrderStored
from engine.events import ClientOrderStoredAt
from engine.events import Event
from engine.events import MarginLocked
from engine.events import MarginReleased
from engine.events import TickApplied
from engine.events import decode
from engine.events import decode_batch
from engine.events import encode
from engine.events import encode_batch
from engine.ledger import LedgerError
from engine.ledger_machine import FORGOTTEN
from engine.ledger_machine import PENDING_OPEN
from engine.ledger_machine import START_RECONCILED
from engine.ledger_machine import AbandonLock
from engine.ledger_machine import AppliedSeq
from engine.ledger_machine import ApplySettlements
from engine.ledger_machine import Authenticate
from engine.ledger_machine import Begin
from engine.ledger_machine import CreateAccount
from engine.ledger_machine import ExpireAnswers
from engine.ledger_machine import Forget
from engine.ledger_machine import History
from engine.ledger_machine import LedgerMachine
from engine.ledger_machine import LockMargin
from engine.ledger_machine import Note
from engine.ledger_machine import OpenCount
from engine.ledger_machine import PendingRequests
from engine.ledger_machine import ReconcileAtStart
from engine.ledger_machine import ReleaseMargin
from engine.ledger_machine import Remember
from engine.ledger_machine import SettleRequests
from engine.ledger_machine import Totals
from engine.ledger_machine import decode_account_events
from engine.ledger_machine import decode_answer
from engine.ledger_machine import encode_account_events
from engine.ledger_machine import encode_answer
from engine.ledger_machine import hash_api_key
from engine.machine import run
from engine.messages import ClosedPosition
from engine.messages import IdemHit
from engine.messages import IdemKey
from engine.messages import MarginLock
from engine.messages import OpenPosition
from engine.messages import Principal
from engine.messages import SettlementItem
from engine.orders import CloseReason
from engine.orders import Side
from engine.results import Code
from engine.results import Rejected
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from tests.unit.engine.recorded_ledger import NOW
from tests.unit.engine.recorded_ledger import SHARD
from tests.unit.engine.recorded_ledger import SIGNUP
from tests.unit.engine.recorded_ledger import USD
from tests.unit.engine.recorded_ledger import Recorded
from tests.unit.engine.recorded_ledger import closed
from tests.unit.engine.recorded_ledger import older_answers_layout
from tests.unit.engine.recorded_ledger import one_account
from tests.unit.engine.recorded_ledger import opened
from tests.unit.engine.recorded_ledger import snapshot_round_trip


# ----------------------------------------------------------------------------- accounts
def test_accounts_keys_are_stored_only_as_hashes() -> None:
    led = Recorded()
    a, b = led.account(), led.account()
    assert a.user != b.user and a.account_id != b.account_id
    assert a.balance_micros == SIGNUP
    assert led(Authenticate(hash_api_key("key-1"))) == Principal(a.user, a.account_id)
    assert led(Authenticate(hash_api_key("key-1x"))) is None
    assert b"key-1" not in pickle.dumps((led.m.snapshot(), led.m.fingerprint()))
    assert led.balances(a.user) == (SIGNUP, 0) and led.balances(b.user) == (SIGNUP, 0)
    assert led.audit({}) == []
    # a key hash already in use is refused, and nothing changes
    before = led.m.fingerprint()
    refused = led(CreateAccount("acc_other", hash_api_key("key-1")))
    assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST
    assert led.m.fingerprint() == before
    assert hash_api_key("k") == "8254c329a92850f6d539dd376f4816ee2764517da5e0235514af433164480d7a"


def test_unknown_commands_and_events_are_bugs() -> None:
    m = LedgerMachine(SIGNUP)
    with pytest.raises(TypeError):
        m.decide(object(), NOW)
    with pytest.raises(LedgerError):
        m.apply(TickApplied(1, 2, 3))
    with pytest.raises(ValueError):
        LedgerMachine(-1)


# ----------------------------------------------------------------------------- margins
def test_lock_and_release_margins() -> None:
    led, u = one_account()
    out = [led(LockMargin(MarginLock(u, 6_000_000_000))),
           led(LockMargin(MarginLock(u, 6_000_000_000))),
           led(LockMargin(MarginLock(u, 4_000_000_000)))]
    assert out[0] is None and out[2] is None
    assert out[1] == Rejected(Code.INSUFFICIENT_BALANCE, "insufficient free balance: "
                              "6000.000000 USD asked, 4000.000000 USD free")
    assert led.balances(u) == (0, SIGNUP)
    assert led(ReleaseMargin(u, 4_000_000_000)) is None
    assert led.balances(u) == (4_000_000_000, 6_000_000_000)
    assert led.audit({u: 6_000_000_000}) == []
    assert led.audit({u: 5_000_000_000}) != []
    # refusals change nothing: more than locked, unknown user, no margin
    before = led.m.fingerprint()
    for command in (ReleaseMargin(u, 6_000_000_001), ReleaseMargin(99, 1)):
        refused = led(command)
        assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST
    assert isinstance(led(LockMargin(MarginLock(99, 1))), Rejected)
    assert isinstance(led(LockMargin(MarginLock(u, 0))), Rejected)
    assert led.m.fingerprint() == before
    led.restarted()


def test_release_by_request_id_ends_the_lock() -> None:
    led, u = one_account()
    key = IdemKey(u, "open", "refused")
    assert led(LockMargin(MarginLock(u, 30 * USD, key, 41))) is None
    answer = Rejected(Code.PRICE_MOVED, "price moved")
    assert led(ReleaseMargin(u, 30 * USD, 41, (key, answer))) is None
    assert led(AbandonLock(41)) is None  # released already: never twice
    assert led.balances(u) == (SIGNUP, 0)
    assert led(Begin(key)) == IdemHit(answer)
    led.restarted()


# ----------------------------------------------------------------------------- settlements
def test_settlements_apply_exactly_once_under_resends_and_reordering() -> None:
    led, u = one_account()
    for _ in range(3):
        assert led(LockMargin(MarginLock(u, 100_000_000))) is None
    items = (SettlementItem(1, closed(u, 11, 100_000_000, 5_000_000)),
             SettlementItem(2, closed(u, 12, 100_000_000, -30_000_000)),
             SettlementItem(3, closed(u, 13, 100_000_000, -120_000_000,
                                      CloseReason.LIQUIDATION)))
    # seq 2 and 3 arrive before seq 1: nothing applies (the shard resends its whole outbox)
    assert led(ApplySettlements(SHARD, items[1:])) == 0
    assert led.balances(u) == (SIGNUP - 300_000_000, 300_000_000)
    assert led.audit({}, {SHARD: list(items)}) == []
    assert led(ApplySettlements(SHARD, items[::-1])) == 3
    after = led.balances(u)
    assert after == (SIGNUP - 300_000_000 + 105_000_000 + 70_000_000, 0)
    for _ in range(3):  # resends change nothing
        assert led(ApplySettlements(SHARD, items)) == 3
    assert led.balances(u) == after
    # the same seq from another shard is another settlement
    assert led(ApplySettlements("shard-BTC-0", ())) == 0
    assert led(AppliedSeq(SHARD)) == 3 and led(AppliedSeq("shard-BTC-0")) == 0
    assert led.audit({}) == [] and led.audit({}, {SHARD: list(items)}) == []
    totals = led(Totals())
    assert totals["sum_micros"] == 0 and totals["closed_positions"] == 3
    assert totals["house_micros"] == -5_000_000 + 30_000_000 + 120_000_000
    assert totals["insurance_micros"] == -20_000_000
    assert totals["applied_seq"] == {SHARD: 3} and totals["users"] == 1
    # a restart (replay of the journal) still ignores the resends
    led.restarted()
    assert led(ApplySettlements(SHARD, items)) == 3
    assert led.balances(u) == after


def test_a_settlement_batch_with_a_bad_item_applies_nothing() -> None:
    led, u = one_account()
    for _ in range(2):
        assert led(LockMargin(MarginLock(u, 100 * USD))) is None
    good = SettlementItem(1, closed(u, 11, 100 * USD, 5 * USD))
    unbalanced = SettlementItem(2, closed(u, 12, 100 * USD, 0)._replace(house_micros=1))
    too_much = SettlementItem(2, closed(u, 12, 100 * USD + 1, 0))  # more than is left locked
    bad_side = SettlementItem(2, closed(u, 12, 100 * USD, 0)._replace(side=7))  # type: ignore[arg-type]
    key = IdemKey(u, "close", "c1")
    assert led(Begin(key, 5)) is None
    before = led.m.fingerprint()
    records = len(led.records)
    for bad in (unbalanced, too_much, bad_side):
        refused = led(ApplySettlements(SHARD, (good, bad), ((key, good.closed),)))
        assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST
        assert led.m.fingerprint() == before and len(led.records) == records
    assert led(AppliedSeq(SHARD)) == 0 and led(Begin(key)) == IdemHit(None, 5)
    # a bad item after a gap is not looked at: the run before it applies
    assert led(ApplySettlements(SHARD, (good, SettlementItem(3, unbalanced.closed)))) == 1
    assert led.balances(u) == (SIGNUP - 200 * USD + 105 * USD, 100 * USD)


def test_the_audit_reports_an_outbox_the_ledger_refuses() -> None:
    """A close the ledger refuses still holds its margin here, as the shard's outbox says,
    but it never settles, nor does any close after it: the audit says so."""
    led, u = one_account()
    for _ in range(2):
        assert led(LockMargin(MarginLock(u, 100 * USD))) is None
    unbalanced = SettlementItem(1, closed(u, 11, 100 * USD, 0)._replace(house_micros=1))
    after = SettlementItem(2, closed(u, 12, 100 * USD, 5 * USD))
    assert isinstance(led(ApplySettlements(SHARD, (unbalanced, after))), Rejected)
    problems = led.audit({}, {SHARD: [unbalanced, after]})
    assert [p.subject for p in problems] == [f"settlements:{SHARD}"]
    assert "settlement 1 of" in problems[0].text and "1 after it" in problems[0].text
    # the same closes, sound: nothing differs
    good = SettlementItem(1, closed(u, 11, 100 * USD, 0))
    assert led.audit({}, {SHARD: [good, after]}) == []
    assert led(ApplySettlements(SHARD, (good, after))) == 2


def test_an_event_that_cannot_be_encoded_is_refused_with_nothing_changed() -> None:
    led, u = one_account()
    assert led(LockMargin(MarginLock(u, 100 * USD))) is None
    margin = 100 * USD
    huge = closed(u, 11, margin, 0)._replace(pnl_micros=2**63, payout_micros=2**63 + margin,
                                             house_micros=-(2**63), insurance_micros=0)
    before = led.m.fingerprint()
    records = len(led.records)
    refused = led(ApplySettlements(SHARD, (SettlementItem(1, huge),)))
    assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST
    # a time or an amount past its field's width, too
    key = IdemKey(u, "open", "x")
    assert isinstance(led(Begin(key, 7), now_us=2**63), Rejected)
    assert isinstance(led(LockMargin(MarginLock(u, 2**64, None, 1))), Rejected)
    assert isinstance(led(Begin(IdemKey(u, "k" * 300, "x"))), Rejected)
    assert led.m.fingerprint() == before and len(led.records) == records
    assert led(AppliedSeq(SHARD)) == 0


def test_history_is_newest_first_with_limit_and_cursor() -> None:
    led, u = one_account()
    other = led.account().user
    for _ in range(5):
        led(LockMargin(MarginLock(u, 1_000_000)))
    led(LockMargin(MarginLock(other, 1_000_000)))
    items = [SettlementItem(i, closed(u, 100 + i, 1_000_000, 0)) for i in range(1, 6)]
    items.append(SettlementItem(6, closed(other, 999, 1_000_000, 0)))
    assert led(ApplySettlements("s", tuple(items))) == 6
    for _ in range(2):  # live, then recovered from a snapshot
        assert [p.position_id for p in led(History(u, limit=2))] == [105, 104]
        assert [p.position_id for p in led(History(u, 2, 104))] == [103, 102]
        assert [p.position_id for p in led(History(u, 10, 102))] == [101]
        assert led(History(u, before=101)) == []
        foreign = led(History(u, before=999))  # another user's id is not a cursor here
        unknown = led(History(u, before=12345))
        assert foreign == unknown and isinstance(foreign, Rejected)
        assert [p.position_id for p in led(History(other))] == [999]
        assert led(History(u, limit=10**9)) == [i.closed for i in items[4::-1]]
        led.m = snapshot_round_trip(led.m)


def test_history_from_a_snapshot_pages_on_into_the_closes_applied_after_it() -> None:
    led, u = one_account()
    for _ in range(6):
        led(LockMargin(MarginLock(u, 1_000_000)))
    first = [SettlementItem(i, closed(u, 100 + i, 1_000_000, i)) for i in range(1, 4)]
    assert led(ApplySettlements("s", tuple(first))) == 3
    led.m = snapshot_round_trip(led.m)  # these three stay in the snapshot's table
    later = [SettlementItem(i, closed(u, 100 + i, 1_000_000, i)) for i in range(4, 7)]
    assert led(ApplySettlements("s", tuple(later))) == 6
    replayed = led.replayed()  # never restored from a snapshot
    everything = [i.closed for i in (*first, *later)][::-1]
    for machine in (led.m, replayed, snapshot_round_trip(led.m)):
        assert [p.position_id for p in run(machine, History(u, limit=4))] == [106, 105, 104, 103]
        assert [p.position_id for p in run(machine, History(u, 2, 104))] == [103, 102]
        assert run(machine, History(u, limit=10)) == everything
        assert machine.fingerprint() == replayed.fingerprint() and machine.check() == []


def test_a_snapshot_keeps_the_history_as_its_table_and_the_next_reads_no_record_again() -> None:
    """A snapshot's history table becomes the live machine's own (a restart's form): the pages,
    the state and the next snapshots are those of a machine never snapshotted, a table handed
    to the snapshot's writer never changes, and a later snapshot copies that table rather than
    reading every record since the start again."""
    led, u = one_account()
    other = led.account().user
    for user in (u, other):
        for _ in range(6):
            led(LockMargin(MarginLock(user, 1_000_000)))
    first = [SettlementItem(i, closed(u if i % 3 else other, 100 + i, 1_000_000, i))
             for i in range(1, 5)]
    assert led(ApplySettlements("s", tuple(first))) == 4
    arrays, _ = led.m.snapshot()
    written = {name: table.copy() for name, table in arrays.items()}
    later = [SettlementItem(i, closed(u if i % 3 else other, 100 + i, 1_000_000, -i))
             for i in range(5, 9)]
    assert led(ApplySettlements("s", tuple(later))) == 8
    assert all(np.array_equal(arrays[n], written[n]) for n in arrays)  # the writer's, as taken
    never = led.replayed()
    assert led.m.fingerprint() == never.fingerprint() and led.m.check() == []
    for user in (u, other):
        for page in (History(user, limit=2), History(user, limit=10), History(user, 2, 106)):
            assert run(led.m, page) == run(never, page)
    again, again_meta = led.m.snapshot()
    fresh, fresh_meta = never.snapshot()
    assert again_meta == fresh_meta and again.keys() == fresh.keys()
    # each user's rows in order: the same records, whichever way the tables were made
    for machine in (snapshot_round_trip(led.m), snapshot_round_trip(never)):
        assert machine.fingerprint() == never.fingerprint()
    assert led.m.snapshot()[0]["history"] is again["history"]  # nothing added: no copy
    with pytest.raises(ValueError, match="read-only"):
        again["history"]["pnl_micros"][0] = 1


def test_a_snapshot_listing_a_text_twice_is_refused() -> None:
    led, u = one_account()
    led(LockMargin(MarginLock(u, 1_000_000)))
    assert led(ApplySettlements("s", (SettlementItem(1, closed(u, 101, 1_000_000, 0)),))) == 1
    arrays, meta = led.m.snapshot()
    assert meta["history_assets"] == ["SOL"]
    meta = {**meta, "history_assets": ["SOL", "SOL"]}
    with pytest.raises(ValueError, match="asset string listed twice"):
        LedgerMachine.from_snapshot(SIGNUP, led.m.max_open_positions, arrays, meta)


# ----------------------------------------------------------------------------- clientOrderIds
def test_idempotency_keys_return_the_first_answer() -> None:
    led, u = one_account()
    key = IdemKey(u, "open", "abc")
    first, second = opened(u, 1, 1_000_000), opened(u, 2, 1_000_000)
    assert led(LockMargin(MarginLock(u, 1_000_000, key))) is None
    assert led(LockMargin(MarginLock(u, 1_000_000, key))) == IdemHit(None)  # pending
    assert led(Remember(key, first)) is None
    assert led(Remember(key, second)) is None
    assert led(LockMargin(MarginLock(u, 1_000_000, key))) == IdemHit(first)
    assert led.balances(u) == (SIGNUP - 1_000_000, 1_000_000)
    # a refused lock is the key's answer too
    big = IdemKey(u, "open", "big")
    refused = led(LockMargin(MarginLock(u, SIGNUP, big)))
    assert isinstance(refused, Rejected)
    assert led(LockMargin(MarginLock(u, 1, big))) == IdemHit(refused)
    # forget only drops pending reservations
    close_key = IdemKey(u, "close", "abc")
    assert led(Begin(close_key)) is None
    led(Forget(close_key))
    led(Forget(key))
    assert led(Begin(close_key)) is None
    assert led(Begin(key)) == IdemHit(first)
    # an answer that cannot be stored is a bug, refused before anything changes
    with pytest.raises(TypeError):
        led(Remember(close_key, "not an answer"))
    led.restarted()
    assert led(Begin(key)) == IdemHit(first)
    hit = led(Begin(key))
    assert isinstance(hit.answer, OpenPosition) and isinstance(hit.answer.side, Side)


def test_a_client_order_id_is_held_with_the_terms_it_was_first_used_with() -> None:
    """A reservation or a refused lock keeps the digest of its request's terms (``asked``):
    the key with other terms is refused, pending or answered, and changes nothing; the same
    terms, or none given, get the first answer. The terms go with the key's end (forgotten or
    expired), and survive a restart from the journal and from a snapshot."""
    led, u = one_account()
    close, open_, big = (IdemKey(u, kind, "k") for kind in ("close", "open", "big"))
    assert led(Begin(close, 5, b"qty=1")) is None
    records = len(led.records)
    other = led(Begin(close, 6, b"qty=2"))
    assert isinstance(other, Rejected) and other.code is Code.INVALID_REQUEST
    assert "'k'" in other.message and len(led.records) == records
    assert led(Begin(close, 6, b"qty=1")) == IdemHit(None, 5)  # the same terms: pending
    assert led(Begin(close, 6)) == IdemHit(None, 5)  # no terms given: not checked
    refusal = Rejected(Code.NOT_FOUND, "no such open position")
    led(Remember(close, refusal, 5))
    assert led(Begin(close, 7, b"qty=1")) == IdemHit(refusal)
    assert isinstance(led(Begin(close, 7, b"qty=2")), Rejected)
    # a refused lock is answered with the terms it was asked with
    poor = led(LockMargin(MarginLock(u, SIGNUP + 1, big, 8), b"margin=all"))
    assert isinstance(poor, Rejected) and poor.code is Code.INSUFFICIENT_BALANCE
    assert led(LockMargin(MarginLock(u, USD, big, 9), b"margin=all")) == IdemHit(poor)
    assert led(LockMargin(MarginLock(u, USD, big, 9), b"margin=1")).code is \
        Code.INVALID_REQUEST
    assert led.balances(u) == (SIGNUP, 0)
    # the terms survive a restart, from the journal and from a snapshot
    for restored in (led.replayed(), snapshot_round_trip(led.m)):
        assert restored.fingerprint() == led.m.fingerprint()
        assert restored.decide(Begin(close, 10, b"qty=2"), NOW)[0].code is Code.INVALID_REQUEST
    # a forgotten reservation takes its terms with it: the key is free for any request
    assert led(LockMargin(MarginLock(u, USD, open_, 11), b"long")) is None
    assert isinstance(led(Begin(open_, 12, b"short")), Rejected)
    led(ReleaseMargin(u, USD, 11))
    led(Forget(open_, 11))
    assert led(Begin(open_, 12, b"short")) is None
    led(Forget(open_, 12))
    assert led(Begin(open_, 13, b"long")) is None
    led(Remember(open_, opened(u, 1, USD), 13))
    # an expired answer takes its terms with it too
    led.now_us += 10**9
    assert led(ExpireAnswers(1)) == 3
    assert led(Begin(close, 14, b"qty=2")) is None
    assert led.m.check() == [] and led.replayed().fingerprint() == led.m.fingerprint()


def test_answers_expire_after_the_ttl_and_pending_reservations_do_not() -> None:
    led, u = one_account()
    old, new, pending = (IdemKey(u, "open", name) for name in ("old", "new", "pending"))
    assert led(LockMargin(MarginLock(u, USD, old, 1))) is None
    led(Remember(old, opened(u, 1, USD)))
    led.now_us += 10
    assert led(LockMargin(MarginLock(u, USD, new, 2))) is None
    led(Remember(new, opened(u, 2, USD)))
    assert led(Begin(pending, 3)) is None
    ttl = 100
    led.now_us += ttl - 10  # "old" is exactly ttl old: kept
    assert led(ExpireAnswers(ttl)) == 0
    assert led(Begin(old)) == IdemHit(opened(u, 1, USD))
    led.now_us += 1
    before = len(led.records)
    assert led(ExpireAnswers(ttl)) == 1 and len(led.records) == before + 1  # journaled
    assert led(Begin(old, 4)) is None  # forgotten: the id may be used again
    assert led(Begin(new)) == IdemHit(opened(u, 2, USD))
    led.now_us += 10**9
    assert led(ExpireAnswers(ttl)) == 1  # "new"; "pending" and the new "old" still wait
    assert led(Begin(pending)) == IdemHit(None, 3) and led(Begin(old)) == IdemHit(None, 4)
    before = len(led.records)
    assert led(ExpireAnswers(ttl)) == 0 and len(led.records) == before  # nothing to journal
    # what expired stays expired after a restart, from the journal and from a snapshot
    again = led.restarted()
    assert snapshot_round_trip(again).fingerprint() == again.fingerprint()
    assert led(Begin(new, 5)) is None


def test_an_answer_past_the_ttl_frees_its_id_to_the_next_request_without_a_sweep() -> None:
    # SPEC: after the TTL the id may be reused; the sweep that forgets answers runs every few
    # seconds (or not at all while a shard is away), so the request itself looks at the age
    led, u = one_account()
    ttl = 100
    old, new, opened_ = (IdemKey(u, kind, "id") for kind in ("close", "order", "open"))
    assert led(Begin(old, 1, b"qty=1")) is None
    led(Remember(old, Rejected(Code.NOT_FOUND, "no such position"), 1))  # a refusal, remembered
    assert led(LockMargin(MarginLock(u, USD, opened_, 2), b"long")) is None
    led(Remember(opened_, opened(u, 1, USD), 2))
    led.now_us += 10
    assert led(Begin(new, 3, b"limit")) is None
    led(Remember(new, opened(u, 2, USD), 3))
    led.now_us += ttl - 10  # "old" and the open are exactly ttl old: still remembered
    refused = Rejected(Code.NOT_FOUND, "no such position")
    assert led(Begin(old, 4, b"qty=1", ttl)) == IdemHit(refused)
    assert led(Begin(old, 4, b"qty=2", ttl)).code is Code.INVALID_REQUEST
    assert led(LockMargin(MarginLock(u, USD, opened_, 4), b"long", ttl)) == \
        IdemHit(opened(u, 1, USD))
    led.now_us += 1  # one microsecond past the TTL: the id is free, for other terms too
    before = led.m.fingerprint()
    assert led(Begin(old, 5, b"qty=2", ttl)) is None
    assert led(Begin(old, 6, b"qty=2", ttl)) == IdemHit(None, 5)  # held by the new request
    assert led(LockMargin(MarginLock(u, 2 * USD, opened_, 7), b"short", ttl)) is None
    assert led.balances(u) == (SIGNUP - 3 * USD, 3 * USD)  # the new open's lock is made
    assert led(Begin(new, 8, b"other", ttl)).code is Code.INVALID_REQUEST  # "new" is young
    assert led.m.fingerprint() != before
    # journaled: a restart, and a snapshot, hold what the requests did
    again = led.restarted()
    assert snapshot_round_trip(again).fingerprint() == again.fingerprint()
    assert led(ExpireAnswers(ttl)) == 0  # nothing left for the sweep


def test_an_answer_past_the_ttl_behind_a_younger_one_stays_until_the_sweep_takes_it() -> None:
    # after a step back of the wall clock an older answer may follow a younger one; the sweep
    # stops at the younger, and a request does too (the id is remembered a little longer)
    led, u = one_account()
    first, second = (IdemKey(u, "close", name) for name in ("first", "second"))
    assert led(Begin(first, 1)) is None
    led(Remember(first, opened(u, 1, USD), 1))
    led.now_us -= 1_000  # the clock stepped back
    assert led(Begin(second, 2)) is None
    led(Remember(second, opened(u, 2, USD), 2))
    led.now_us += 600  # "second" is 600 us old, "first" 600 us younger than that
    assert led(Begin(second, 3, b"", 500)) == IdemHit(opened(u, 2, USD))
    led.now_us += 1_000
    assert led(Begin(second, 4, b"", 500)) is None and led(Begin(first, 5, b"", 500)) is None


def test_answers_expire_in_the_order_given_after_a_snapshot_too() -> None:
    # the wall clock may step back (NTP); expiry walks the answers in the order they were given
    # and stops at the first one still young, so a restored state must keep that order
    led, u = one_account()
    first, second = (IdemKey(u, "open", name) for name in ("first", "second"))
    assert led(LockMargin(MarginLock(u, USD, first, 1))) is None
    led(Remember(first, opened(u, 1, USD)))
    led.now_us -= 1_000  # the clock stepped back
    assert led(LockMargin(MarginLock(u, USD, second, 2))) is None
    led(Remember(second, opened(u, 2, USD)))
    restored = snapshot_round_trip(led.m)
    assert restored.fingerprint() == led.m.fingerprint()
    led.now_us += 600  # "second" is 600 us old, "first" 600 us younger than that
    assert led(ExpireAnswers(500)) == 0  # "first" is young: nothing after it is looked at
    restored_led = Recorded(led.m.max_open_positions)
    restored_led.m, restored_led.now_us = restored, led.now_us
    assert restored_led(ExpireAnswers(500)) == 0
    assert restored_led.m.fingerprint() == led.m.fingerprint()


def test_close_reservations_carry_their_request_id() -> None:
    led, u = one_account()
    lost, refused, wrong = (IdemKey(u, "close", n) for n in ("lost", "refused", "wrong"))
    assert led(Begin(lost, 71), now_us=NOW) is None
    assert led(Begin(refused, 72), now_us=NOW + 5) is None
    assert led(Begin(wrong, 73), now_us=NOW + 5) is None
    assert led(PendingRequests(), now_us=NOW + 5) == [71, 72, 73]
    assert led(PendingRequests(5), now_us=NOW + 5) == [71]
    assert led(PendingRequests(6), now_us=NOW + 5) == []
    # the shards say: 71 closed this position, 72 never arrived, 73 (an open's answer: not a
    # close's) stays pending
    position = closed(u, 9, 10 * USD, USD)
    assert led(SettleRequests({71: position, 73: opened(u, 3, USD)}, (72,))) == 2
    assert led(PendingRequests(), now_us=NOW + 5) == [73]
    led.restarted()
    assert led(Begin(lost)) == IdemHit(position)
    assert led(Begin(refused)) is None
    assert led(Begin(wrong)) == IdemHit(None, 73)


# ----------------------------------------------------------------------------- abandoned locks
def test_abandon_releases_a_lock_once_and_ignores_unknown_ids() -> None:
    led, user = one_account()
    key = IdemKey(user, "open", "c1")
    assert led(LockMargin(MarginLock(user, 30 * USD, key, 11))) is None
    assert led(LockMargin(MarginLock(user, 70 * USD, None, 12))) is None
    assert led(AbandonLock(999)) is None  # never locked: nothing changes
    assert led.balances(user) == (SIGNUP - 100 * USD, 100 * USD)
    assert led(AbandonLock(11)) == (11, user, 30 * USD)
    assert led.balances(user) == (SIGNUP - 70 * USD, 70 * USD)
    assert led(AbandonLock(11)) is None  # exactly once
    led.restarted()
    assert led(AbandonLock(11)) is None
    assert led.balances(user) == (SIGNUP - 70 * USD, 70 * USD)
    assert led(PendingRequests()) == []
    assert led(Begin(key)) is None  # the pending clientOrderId was dropped: a retry runs
    assert led.audit({user: 70 * USD}) == []  # 12 still backs an (assumed) open position


def test_abandon_keeps_a_lock_whose_clientorderid_has_an_answer() -> None:
    led, user = one_account()
    key = IdemKey(user, "open", "c1")
    position = opened(user, 5, 30 * USD)
    assert led(LockMargin(MarginLock(user, 30 * USD, key, 21))) is None
    assert led(Remember(key, position)) is None  # the request completed
    assert led(AbandonLock(21)) is None
    assert led.balances(user) == (SIGNUP - 30 * USD, 30 * USD)
    assert led(LockMargin(MarginLock(user, 30 * USD, key, 22))) == IdemHit(position)


def test_abandoning_an_old_lock_keeps_the_reservation_of_a_retry() -> None:
    led, user = one_account()
    key = IdemKey(user, "open", "c1")
    assert led(LockMargin(MarginLock(user, 30 * USD, key, 31))) is None
    assert led(SettleRequests({}, (31,))) == 1  # fenced everywhere: the key is free again
    assert led(LockMargin(MarginLock(user, 30 * USD, key, 32))) is None  # the retry
    assert led(AbandonLock(31)) == (31, user, 30 * USD)
    assert led(LockMargin(MarginLock(user, 30 * USD, key, 33))) == IdemHit(None, 32)
    assert led(PendingRequests()) == [32]


def test_a_late_end_of_a_settled_request_leaves_the_retrys_reservation() -> None:
    """Lock 31's request was settled (fenced, its lock abandoned) while it stalled, and its
    retry (32) reserved the key. When 31 ends after all, its release, its refusal and its
    Forget neither free margin nor answer or drop the retry's reservation."""
    led, user = one_account()
    key = IdemKey(user, "open", "c1")
    assert led(LockMargin(MarginLock(user, 30 * USD, key, 31))) is None
    assert led(AbandonLock(31)) == (31, user, 30 * USD)  # fenced at every shard: freed
    assert led(LockMargin(MarginLock(user, 30 * USD, key, 32))) is None  # the retry
    assert led(LockMargin(MarginLock(user, 30 * USD, key, 33))) == IdemHit(None, 32)
    records = len(led.records)
    refused = Rejected(Code.PRICE_MOVED, "late")
    assert led(ReleaseMargin(user, 30 * USD, 31, (key, refused))) is None
    assert led(Forget(key, 31)) is None
    assert led(Remember(key, refused, 31)) is None  # nor is its refusal 32's answer
    # (a fenced request makes nothing; were 31 noted anyway, its body is no answer of 32's)
    assert led(Note(user, 31, POSITION_OPENED, opened(user, 7, 30 * USD), key)) is None
    assert led(Begin(key)) == IdemHit(None, 32)
    assert led.balances(user) == (SIGNUP - 30 * USD, 30 * USD)
    assert len(led.records) == records + 1  # the note's account event, nothing else
    assert led(Forget(key, 32)) is None  # its own request drops it
    assert led(Begin(key, 34)) is None


def test_abandoning_an_old_lock_after_a_retry_was_answered_keeps_the_answer() -> None:
    """The request of lock 31 died unanswered; its retry (32) opened and was answered. The
    old lock is still abandoned, once, and the clientOrderId keeps the retry's answer."""
    led, user = one_account()
    key = IdemKey(user, "open", "c1")
    assert led(LockMargin(MarginLock(user, 30 * USD, key, 31))) is None
    assert led(SettleRequests({}, (31,))) == 1
    assert led(LockMargin(MarginLock(user, 30 * USD, key, 32))) is None
    position = opened(user, 5, 30 * USD)
    assert led(Remember(key, position)) is None
    assert led.balances(user) == (SIGNUP - 60 * USD, 60 * USD)
    assert led(AbandonLock(31)) == (31, user, 30 * USD)
    assert led(AbandonLock(31)) is None
    assert led(AbandonLock(32)) is None  # the retry's lock backs its position
    assert led.balances(user) == (SIGNUP - 30 * USD, 30 * USD)
    assert led(Begin(key)) == IdemHit(position)
    assert led.audit({user: 30 * USD}) == []


def test_abandonable_locks_survive_a_snapshot() -> None:
    led, user = one_account()
    key = IdemKey(user, "open", "snap")
    assert led(LockMargin(MarginLock(user, 40 * USD, key, 7))) is None
    led.account()
    base, start = snapshot_round_trip(led.m), len(led.records)
    led.account()
    led.m = led.replayed(base, start)  # snapshot + journal tail
    assert led.balances(user) == (SIGNUP - 40 * USD, 40 * USD)
    assert led(LockMargin(MarginLock(user, 40 * USD, key, 8))) == IdemHit(None, 7)
    assert led(AbandonLock(7)) == (7, user, 40 * USD)
    led.restarted()
    assert led.balances(user) == (SIGNUP, 0)
    assert led(AbandonLock(7)) is None
    assert led(Begin(key)) is None
    assert led.audit({}) == []


# ----------------------------------------------------------------------------- recovery
def test_batch_records_and_stored_answers_round_trip() -> None:
    events: list[Event] = [MarginLocked(1, 5, 0), TickApplied(1, 2, 3),
                           ClientOrderStoredAt(1, "open", "é", 2**64 - 2, -5, b"\x00")]
    assert decode_batch(encode_batch([encode(e) for e in events])) == events
    assert decode_batch(encode(events[0])) == [events[0]]  # a bare event is a batch of one
    for cut in (1, 3, 6):
        with pytest.raises(ValueError):
            decode_batch(encode_batch([encode(events[0])])[:-cut])
    assert cluster.durability.store.encode_batch is ev.encode_batch
    assert cluster.durability.store.decode_batch is ev.decode_batch
    assert cluster.durability.store.BATCH_TAG == ev.BATCH_TAG
    position = opened(1, 5, 3)
    close = ClosedPosition(5, 1, "SOL", Side.LONG, 100, 2, 3, 4, 90, 0, 0, NOW, 95, -10, 0, 10,
                           -7, 3, NOW + 1, 5, 0)
    for answer in (None, Rejected(Code.INSUFFICIENT_BALANCE, "no"), position, close,
                   position._replace(side=Side.SHORT, tp_ticks=90, sl_ticks=110)):
        back = decode_answer(encode_answer(answer))
        assert back == answer and type(back) is type(answer)
        if isinstance(back, OpenPosition | ClosedPosition):
            assert isinstance(back.side, Side)
    assert decode_answer(PENDING_OPEN + b"[1,2]") is None


def test_recovers_accounts_keys_history_and_answers_from_snapshot_and_tail() -> None:
    led = Recorded()
    accounts = [led.account() for _ in range(4)]
    user = accounts[0].user
    key = IdemKey(user, "open", "order-1")
    assert led(LockMargin(MarginLock(user, 250 * USD, key, 1))) is None
    position = OpenPosition(1 << 34 | 3, user, "SOL", Side.SHORT, 10000, 250, 250 * USD, 10,
                            10999, 0, 0, NOW, 0)
    base, start = snapshot_round_trip(led.m), len(led.records)
    led(Remember(key, position))
    close = ClosedPosition(position.position_id, user, "SOL", Side.SHORT, 10000, 250, 250 * USD,
                           10, 10999, 0, 0, NOW, 9000, 250 * USD, 500 * USD, -250 * USD, 0,
                           int(CloseReason.MANUAL), NOW + 1, position.position_id, 0)
    led(ApplySettlements(SHARD, (SettlementItem(1, close),)))
    want = led.m.fingerprint()
    again = led.replayed(base, start)
    assert again.fingerprint() == want
    led.m = again
    for n, account in enumerate(accounts, 1):  # keys still authenticate (hashes were stored)
        assert led(Authenticate(hash_api_key(f"key-{n}"))) == (account.user, account.account_id)
    assert led(History(user)) == [close]
    # the clientOrderId answer survived: a retry gets the first answer, locks nothing
    assert led(LockMargin(MarginLock(user, 250 * USD, key))) == IdemHit(position)
    assert led.balances(user) == (SIGNUP + 250 * USD, 0)
    assert led.account().user == accounts[-1].user + 1  # new users continue the numbering
    assert snapshot_round_trip(led.m).fingerprint() == led.m.fingerprint()
    arrays, meta = led.m.snapshot()
    loaded = SimpleNamespace(seq=9, arrays=arrays, meta=meta)  # as a snapshot file loads
    assert LedgerMachine.restore(SIGNUP, loaded).fingerprint() == led.m.fingerprint()
    assert LedgerMachine.restore(SIGNUP, None).fingerprint() == \
        LedgerMachine(SIGNUP).fingerprint()


def test_reconcile_at_start_releases_orphaned_locks_and_drops_pending_reservations() -> None:
    led, user = one_account()
    key = IdemKey(user, "open", "lost")
    # a lock whose open never reached a shard (the API process died), and one that opened
    assert led(LockMargin(MarginLock(user, 30 * USD, key))) is None
    assert led(LockMargin(MarginLock(user, 70 * USD, None, 9))) is None
    led.restarted()
    assert led(Begin(key)) == IdemHit(None)  # the reservation is durable
    assert led(ReconcileAtStart({user: 70 * USD}, {})) == {user: 30 * USD}
    assert led.audit({user: 70 * USD}) == []
    assert led(AbandonLock(9)) is None  # every lock ended with the reconciliation
    led.restarted()
    assert led.audit({user: 70 * USD}) == []
    assert led(AbandonLock(9)) is None
    assert led(Begin(key)) is None  # a retry may run again


def test_reconcile_at_start_ends_locks_even_when_nothing_is_in_excess() -> None:
    led, user = one_account()
    assert led(LockMargin(MarginLock(user, 25 * USD, None, 9))) is None
    kept = len(led.m.account_log.kept())
    assert led(ReconcileAtStart({user: 25 * USD}, {})) == {}
    # no balance moved: the user's stream is told nothing
    assert len(led.m.account_log.kept()) == kept
    assert led(AbandonLock(9)) is None
    led.restarted()
    assert led(AbandonLock(9)) is None
    assert led.balances(user) == (SIGNUP - 25 * USD, 25 * USD)
    # unapplied closes count as still locked; negative margins are refused
    item = SettlementItem(1, closed(user, 4, 25 * USD, 0))
    assert led(ReconcileAtStart({}, {SHARD: [item]})) == {}
    assert isinstance(led(ReconcileAtStart({user: -1}, {})), Rejected)


def test_reconcile_at_start_releases_a_margin_wider_than_one_event_can_carry() -> None:
    """Each lock fits an int64, their sum need not: the start still releases all of it."""
    led, user = one_account()
    arrays, meta = led.m.snapshot()
    meta = json.loads(json.dumps(meta))
    rich = 2**63 + 7  # a user who won more than an int64 of micros (the house paid it)
    meta["ledger"]["accounts"].update({f"user:{user}:free": rich, "house": SIGNUP - rich})
    base = LedgerMachine.from_snapshot(SIGNUP, arrays, meta)
    led.m, start = LedgerMachine.from_snapshot(SIGNUP, arrays, meta), len(led.records)
    for request_id in (1, 2):
        assert led(LockMargin(MarginLock(user, 2**62 + 3, None, request_id))) is None
    assert led.balances(user) == (rich - 2**63 - 6, 2**63 + 6)
    assert led(ReconcileAtStart({}, {})) == {user: 2**63 + 6}
    assert led.balances(user) == (rich, 0)
    assert led(AbandonLock(1)) is None and led(AbandonLock(2)) is None
    assert led.replayed(base, start).fingerprint() == led.m.fingerprint()


def test_balances_past_an_int64_stay_exact_through_a_snapshot_file(tmp_path: Path) -> None:
    """No account is a fixed-width field: funding below -2**63 (another signup), a free
    balance above 2**63 - 1 and the house below -2**63 (a payout) are exact ints, in the
    account events, a snapshot file and a replay alike."""
    led, user = one_account()
    assert led(LockMargin(MarginLock(user, 100 * USD))) is None
    arrays, meta = led.m.snapshot()
    meta = json.loads(json.dumps(meta))
    accounts = meta["ledger"]["accounts"]
    near = 2**63 - 10 * USD  # moved to the user from the house, to sum to 0
    accounts.update({"funding": -(2**63) + 1, "insurance": 2**63 - 1 - SIGNUP,
                     f"user:{user}:free": accounts[f"user:{user}:free"] + near,
                     "house": -near})
    base = LedgerMachine.from_snapshot(SIGNUP, arrays, meta)
    led.m, start = LedgerMachine.from_snapshot(SIGNUP, arrays, meta), len(led.records)
    led.account()
    win = closed(user, 11, 100 * USD, 20 * SIGNUP)
    assert led(ApplySettlements(SHARD, (SettlementItem(1, win),))) == 1
    totals = led(Totals())
    assert totals["funding_micros"] == -(2**63) + 1 - SIGNUP
    assert totals["house_micros"] == -near - 20 * SIGNUP < -(2**63)
    free = led.balances(user)[0]
    assert free == near + 21 * SIGNUP > 2**63
    ((_, message),) = encode_account_events(e for e in led.m.account_log.kept() if e.user == user)
    assert decode_account_events(message)[0][-1].body == Balance(free, 0)
    written = cluster.durability.snapshot.write_snapshot(tmp_path, 1, *led.m.snapshot())
    loaded = cluster.durability.snapshot.read_snapshot(written)
    assert LedgerMachine.restore(SIGNUP, loaded).fingerprint() == led.m.fingerprint()
    assert led.replayed(base, start).fingerprint() == led.m.fingerprint()


def test_pending_opens_are_resolved_by_their_request_id_at_start() -> None:
    led, user = one_account()
    opened_key, lost_key = IdemKey(user, "open", "opened"), IdemKey(user, "open", "lost")
    close_key = IdemKey(user, "close", "closing")
    # two opens locked and a close begun; the API process dies before it stores any answer
    assert led(LockMargin(MarginLock(user, 30 * USD, opened_key, 101))) is None
    assert led(LockMargin(MarginLock(user, 70 * USD, lost_key, 202))) is None
    assert led(Begin(close_key, 303)) is None
    base, start = snapshot_round_trip(led.m), len(led.records)
    led.account()
    led.m = led.replayed(base, start)
    assert led(PendingRequests()) == [101, 202, 303]
    assert led(Begin(opened_key)) == IdemHit(None, 101)
    assert led(Begin(lost_key)) == IdemHit(None, 202)
    # the shards say: 101 opened (this position), 202 never arrived (now fenced), 303 closed
    position = opened(user, 5 << 34 | 3, 30 * USD)
    close = closed(user, 6, 10 * USD, 0)
    assert led(ReconcileAtStart({user: 30 * USD}, {}, {101: position, 303: close})) == \
        {user: 70 * USD}
    assert led(PendingRequests()) == []
    led.restarted()
    # a retry of the open that happened gets its position; the other may run again
    assert led(LockMargin(MarginLock(user, 30 * USD, opened_key, 404))) == IdemHit(position)
    assert led(Begin(lost_key)) is None
    assert led(Begin(close_key)) == IdemHit(close)
    assert led.audit({user: 30 * USD}) == []


def test_stale_pending_opens_are_settled_while_running() -> None:
    led, user = one_account()
    keys = [IdemKey(user, "open", f"k{i}") for i in range(3)]
    for i, k in enumerate(keys):
        assert led(LockMargin(MarginLock(user, 10 * USD, k, 500 + i))) is None
    assert led(PendingRequests(3600 * 10**6)) == []  # all fresh
    assert led(PendingRequests(3600 * 10**6), now_us=NOW + 3600 * 10**6) == [500, 501, 502]
    position = OpenPosition(9 << 34 | 3, user, "SOL", Side.SHORT, 10000, 100, 10 * USD, 1,
                            20000, 0, 0, NOW, 0)
    # 500 opened, 501 is on no shard (fenced everywhere), 502: a shard did not answer
    assert led(SettleRequests({500: position}, (501,))) == 2
    assert led(PendingRequests()) == [502]
    led.restarted()
    assert led(PendingRequests()) == [502]
    assert [led(Begin(k)) for k in keys] == [IdemHit(position), None, IdemHit(None, 502)]


def test_older_journal_records_still_replay() -> None:
    """A journal written before ClientOrderStoredAt: pending opens packed their request id
    into the response (PENDING_OPEN), nothing carried a time."""
    key, other = IdemKey(1, "open", "old"), IdemKey(1, "open", "answered")
    position = opened(1, 5, 20 * USD)
    old: list[Event] = [
        AccountCreated(1, SIGNUP, "acc_1", hash_api_key("key-1")),
        MarginLocked(1, 30 * USD, 101),
        ClientOrderStored(1, "open", "old", PENDING_OPEN + json.dumps([101, 30 * USD]).encode()),
        MarginLocked(1, 20 * USD, 102),
        ClientOrderStored(1, "open", "answered",
                          PENDING_OPEN + json.dumps([102, 20 * USD]).encode()),
        ClientOrderStored(1, "open", "answered", encode_answer(position)),
        ClientOrderStored(1, "close", "dropped", b""),
        ClientOrderStored(1, "close", "dropped", FORGOTTEN),
    ]
    led = Recorded()
    led.records = [encode_batch([encode(e) for e in old[:3]]), encode(old[3]),
                   encode_batch([encode(e) for e in old[4:]])]
    assert [decode(encode(e)) for e in old] == old
    led.m = led.replayed()
    assert led.m.check() == []
    assert led(PendingRequests(), now_us=0) == [101]  # pending since "ever"
    assert led(Begin(other)) == IdemHit(position)
    assert led(Begin(IdemKey(1, "close", "dropped"))) is None
    assert led(AbandonLock(102)) is None  # its open answered
    assert led(AbandonLock(101)) == (101, 1, 30 * USD)
    assert led(Begin(key)) is None
    assert led.balances(1) == (SIGNUP - 20 * USD, 20 * USD)


def test_older_snapshots_still_restore() -> None:
    """The meta of the older durable ledger: pending opens apart, locks without their key."""
    led, user = one_account()
    key = IdemKey(user, "open", "p")
    assert led(LockMargin(MarginLock(user, 30 * USD, key, 11))) is None
    assert led(LockMargin(MarginLock(user, 5 * USD, None, 12))) is None
    arrays, meta = led.m.snapshot()
    meta = json.loads(json.dumps(meta))
    meta["pending_opens"] = [[*k, r, 30 * USD] for *k, r, _ in meta.pop("pending_requests")]
    meta["recent_locks"] = [row[:3] for row in meta["recent_locks"]]
    old = LedgerMachine.from_snapshot(SIGNUP, arrays, meta)
    assert old.check() == []
    assert run(old, PendingRequests()) == [11]
    assert run(old, AbandonLock(11)) == (11, user, 30 * USD)
    assert run(old, Begin(key)) is None  # dropped with its abandoned lock


def test_a_snapshot_holding_a_stored_answer_that_is_none_is_refused() -> None:
    """A restore checks every stored answer (kind, length, code) without building it; a retry
    after it gets the answer built, as before the snapshot."""
    led, user = one_account()
    keys = [IdemKey(user, "open", f"k{n}") for n in range(3)]
    position = opened(user, 1 << 34 | 3, 30 * USD)
    for n, key in enumerate(keys[:2]):
        assert led(LockMargin(MarginLock(user, 30 * USD, key, 21 + n))) is None
    led(Remember(keys[0], position))
    refused = led(LockMargin(MarginLock(user, SIGNUP, keys[2], 23)))
    assert isinstance(refused, Rejected)
    arrays, meta = led.m.snapshot()
    meta = json.loads(json.dumps(meta))
    again = LedgerMachine.from_snapshot(SIGNUP, led.m.max_open_positions, arrays, meta)
    assert again.fingerprint() == led.m.fingerprint()
    assert run(again, LockMargin(MarginLock(user, 30 * USD, keys[0], 30))) == IdemHit(position)
    assert run(again, LockMargin(MarginLock(user, SIGNUP, keys[2], 31))) == IdemHit(refused)
    assert run(again, LockMargin(MarginLock(user, 30 * USD, keys[1], 32))) == IdemHit(None, 22)
    lines = bytes(arrays["answers"]).decode().split("\n")
    at = next(i for i, line in enumerate(lines[:-1:2])
              if json.loads(line)[:3] == [user, "open", "k0"]) * 2 + 1
    stored = lines[at]
    older = older_answers_layout(arrays, meta)
    older_at = next(i for i, row in enumerate(older[1]["answers"]) if row[2] == "k0")
    assert older[1]["answers"][older_at][3] == stored
    for bad in ("{", '["opened"]', '["nothing",1]', '["rejected","NO_SUCH_CODE","x"]',
                '["rejected","INSUFFICIENT_BALANCE",1]', "1,2", "7", stored[:-1]):
        broken = [*lines[:at], bad, *lines[at + 1:]]
        table = np.frombuffer("\n".join(broken).encode(), dtype=np.uint8)
        with pytest.raises(ValueError):
            LedgerMachine.from_snapshot(SIGNUP, led.m.max_open_positions,
                                        {**arrays, "answers": table}, meta)
        broken_meta = json.loads(json.dumps(older[1]))
        broken_meta["answers"][older_at][3] = bad
        with pytest.raises(ValueError):
            LedgerMachine.from_snapshot(SIGNUP, led.m.max_open_positions, older[0], broken_meta)


# ----------------------------------------------------------------------------- property
KEYS = 4
ASKED = st.sampled_from([b"", b"a", b"b"])  # the terms a clientOrderId is used with
LOCK = st.tuples(st.just("lock"), st.integers(0, 3), st.integers(-1, 4_000),
                 st.sampled_from([None, *range(KEYS)]), st.booleans(), ASKED)
CLOSE = st.tuples(st.just("close"), st.integers(0, 1), st.integers(0, 30), st.integers(-3, 3))
DELIVER = st.tuples(st.just("deliver"), st.integers(0, 1), st.sampled_from([0, 0, 0, 1, 2]),
                    st.booleans(), st.sampled_from([None, *range(KEYS)]))
OPS = st.lists(st.one_of(
    st.tuples(st.just("account")),
    LOCK, LOCK, LOCK, CLOSE, CLOSE, DELIVER, DELIVER,
    st.tuples(st.just("release"), st.integers(0, 30), st.sampled_from([None, *range(KEYS)])),
    st.tuples(st.just("abandon"), st.integers(0, 40)),
    st.tuples(st.just("begin"), st.integers(0, KEYS - 1), st.booleans(), ASKED),
    st.tuples(st.just("remember"), st.integers(0, KEYS - 1), st.integers(0, 2)),
    st.tuples(st.just("forget"), st.integers(0, KEYS - 1)),
    st.tuples(st.just("bad"), st.integers(0, 1)),
    st.tuples(st.just("settle_requests"), st.integers(0, 255)),
    st.tuples(st.just("reconcile"), st.booleans()),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("wait"), st.integers(0, 10**7)),
    st.tuples(st.just("expire"), st.integers(0, 3 * 10**7)),
), min_size=10, max_size=80)


CAPS = st.sampled_from([2, 200])  # open positions per account: a small one is reached often


class Model:
    """Drives a Recorded ledger with random commands; ``replica`` follows from the journal."""

    def __init__(self, cap: int = 200) -> None:
        self.led = Recorded(cap)
        self.replica = LedgerMachine(SIGNUP, cap)
        self.cap = cap
        self.users: list[int] = []
        self.locks: list[tuple[int, int, int]] = []  # user, margin, request id (held)
        self.lock_rids: list[int] = []  # request ids of every lock made
        self.outbox: dict[str, list[SettlementItem]] = {"s0": [], "s1": []}
        self.rid = 0
        self.pid = 0

    def key(self, k: int) -> IdemKey:
        user = self.users[k % len(self.users)] if self.users else 1
        return IdemKey(user, "open" if k % 2 else "close", f"c{k}")

    def answer(self, k: int, choice: int) -> object:
        user = self.key(k).user
        return (Rejected(Code.INSUFFICIENT_BALANCE, "no"), opened(user, 7, USD),
                closed(user, 8, USD, -USD // 2))[choice]

    def step(self, command: Any) -> Any:
        m = self.led.m
        before = m.fingerprint()
        m.decide(command, self.led.now_us)  # decide changes nothing
        assert m.fingerprint() == before
        records = len(self.led.records)
        answer = self.led(command)  # asserts check() == []
        if isinstance(command, ApplySettlements) and isinstance(answer, Rejected):
            assert len(self.led.records) == records  # nothing of the batch applies
        if isinstance(answer, Rejected) and answer.code is Code.TOO_MANY_POSITIONS:
            assert isinstance(command, LockMargin)
            assert self.led(OpenCount(command.lock.user)) >= self.cap
            assert m.fingerprint()["accounts"] == before["accounts"]  # nothing locked
        if len(self.led.records) == records:  # no events: nothing changed
            assert m.fingerprint() == before
        for record in self.led.records[records:]:
            self.replica.apply_batch(self.replica.decode_record(record))
        assert self.replica.fingerprint() == m.fingerprint()
        return answer

    def run(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        self.led.now_us += 1000
        if kind == "account":
            self.users.append(self.led.account().user)
            self.replica.apply_batch(self.replica.decode_record(self.led.records[-1]))
        elif kind == "lock":
            _, u, usd, k, with_rid, *asked = op
            self.rid += 1
            user = self.users[u % len(self.users)] if self.users else u
            key = None if k is None else self.key(k)
            lock = MarginLock(user, usd * USD, key, self.rid if with_rid else 0)
            if self.step(LockMargin(lock, *asked)) is None:
                self.locks.append((user, usd * USD, lock.request_id))
                if with_rid:
                    self.lock_rids.append(lock.request_id)
        elif kind == "release" and self.locks:
            user, margin, rid = self.locks.pop(op[1] % len(self.locks))
            answer = None if op[2] is None else (self.key(op[2]), self.answer(op[2], 0))
            self.step(ReleaseMargin(user, margin, rid, answer))
        elif kind == "abandon":
            # mostly a request id that was locked once (maybe released since), else any id
            rids = self.lock_rids
            rid = rids[op[1] % len(rids)] if rids and op[1] < 30 else op[1]
            released = self.step(AbandonLock(rid))
            if isinstance(released, tuple):
                self.locks = [lock for lock in self.locks if lock[2] != rid]
        elif kind == "begin":
            self.rid += 1
            self.step(Begin(self.key(op[1]), self.rid if op[2] else 0, op[3]))
        elif kind == "remember":
            self.step(Remember(self.key(op[1]), self.answer(op[1], op[2])))
        elif kind == "forget":
            self.step(Forget(self.key(op[1])))
        elif kind == "close":
            if not self.locks:  # lock something to close
                self.run(("lock", op[2], 1 + op[2] * 10, None, True))
            if not self.locks:
                return
            user, margin, _ = self.locks.pop(op[2] % len(self.locks))
            outbox = self.outbox[f"s{op[1]}"]
            self.pid += 1
            seq = outbox[-1].seq + 1 if outbox else self.led.m.decide(
                AppliedSeq(f"s{op[1]}"), 0)[0] + 1
            outbox.append(SettlementItem(seq, closed(user, self.pid, margin, op[3] * margin // 2,
                                                     CloseReason(abs(op[3]) % 4))))
        elif kind == "deliver":
            shard = f"s{op[1]}"
            sent = self.outbox[shard][op[2]:]  # a gap when the first ones are left out
            if op[3]:
                sent = sent[::-1]
            answers = () if op[4] is None or not sent else \
                ((self.key(op[4]), sent[0].closed),)
            last = self.step(ApplySettlements(shard, tuple(sent), answers))
            if isinstance(last, int):
                self.outbox[shard] = [i for i in self.outbox[shard] if i.seq > last]
        elif kind == "bad":
            shard = f"s{op[1]}"
            applied = self.led.m.decide(AppliedSeq(shard), 0)[0]
            bad = closed(1, 0, USD, 0)._replace(insurance_micros=1)
            items = (*self.outbox[shard], SettlementItem(applied + len(self.outbox[shard]) + 1,
                                                         bad))
            assert isinstance(self.step(ApplySettlements(shard, items)), Rejected)
        elif kind == "settle_requests":
            pending = self.led.m.decide(PendingRequests(), self.led.now_us)[0]
            opened_: dict[int, OpenPosition | ClosedPosition] = {
                r: self.answer(r, 1 if r % 2 else 2)  # type: ignore[misc]
                for i, r in enumerate(pending) if op[1] >> (2 * i % 8) & 1}
            absent = tuple(r for i, r in enumerate(pending) if op[1] >> (2 * i % 8 + 1) & 1)
            self.step(SettleRequests(opened_, absent))
        elif kind == "reconcile":
            margins: dict[int, int] = {}
            counts: dict[int, int] = {}
            for user, margin, _ in self.locks:
                margins[user] = margins.get(user, 0) + margin
                counts[user] = counts.get(user, 0) + 1
            self.step(ReconcileAtStart(margins, dict(self.outbox), None,
                                       counts if op[1] else None))
        elif kind == "snapshot":
            restored = snapshot_round_trip(self.led.m)
            assert restored.fingerprint() == self.led.m.fingerprint()
            assert restored.check() == []
            # a restored state's own snapshots (its tables extend the ones it loaded) too
            assert snapshot_round_trip(self.replica).fingerprint() == restored.fingerprint()
            self.replica = restored  # the journal tail now replays onto the snapshot
        elif kind == "wait":
            self.led.now_us += op[1]
        elif kind == "expire":
            self.step(ExpireAnswers(op[1]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, CAPS)
def test_any_sequence_replays_to_an_equal_state(ops: list[tuple[Any, ...]], cap: int) -> None:
    model = Model(cap)
    model.run(("account",))
    for op in ops:
        model.run(op)
    led = model.led
    assert led.replayed().fingerprint() == led.m.fingerprint()
    assert snapshot_round_trip(led.m).fingerprint() == led.m.fingerprint()
    # whatever happened, the accounts still sum to 0 and the totals agree with the history
    totals = led(Totals())
    assert totals["sum_micros"] == 0
    history = [c for u in model.users for c in led(History(u, limit=500))]
    assert totals["closed_positions"] == len(history)
    assert led.m.check() == []


def test_start_reconciled_marker_is_reserved() -> None:
    led, u = one_account()
    for command in (LockMargin(MarginLock(u, USD, None, START_RECONCILED)),
                    ReleaseMargin(u, 0, START_RECONCILED),
                    Begin(IdemKey(u, "open", "x"), START_RECONCILED)):
        assert isinstance(led(command), Rejected)
    assert led(ReleaseMargin(u, 0)) is None  # a zero release is a valid transfer
    assert decode(encode(MarginReleased(u, 0, START_RECONCILED))) == \
        MarginReleased(u, 0, START_RECONCILED)


def test_a_snapshot_whose_next_user_is_taken_gives_a_new_account_a_new_id() -> None:
    """A restored ledger numbers new accounts past every user it holds, as replaying their
    creations does: a snapshot whose next user id is already taken (check() refuses it) gave
    the next signup that user's id, its balance and positions, under a second API key."""
    led, first = one_account()
    arrays, meta = led.m.snapshot()
    meta = json.loads(json.dumps(meta))
    meta["next_user"] = first
    led.m = LedgerMachine.from_snapshot(SIGNUP, arrays, meta)
    assert led.m.check() == []
    assert led.account().user == first + 1
    assert led.balances(first) == (SIGNUP, 0)
