"""Account events (SPEC "Live data"): the AccountLog's numbering per account and over all
accounts, its bounded kept window and its restore; the LedgerMachine's account events of every
change an account sees (balances, positions noted and closed, orders noted and ended), the
reads of them, and their numbering across snapshots and journal replay."""

from __future__ import annotations

import json
from typing import Any

import pytest
from engine.account_events import BALANCE
from engine.account_events import ORDER_PLACED
from engine.account_events import POSITION_CLOSED
from engine.account_events import POSITION_OPENED
from engine.account_events import POSITION_UPDATED
from engine.account_events import AccountEvent
from engine.account_events import AccountLog
from engine.account_events import Balance
from engine.events import AccountNoted
from engine.events import ClientOrderStoredAt
from engine.events import decode_batch
from engine.ledger_machine import AbandonLock
from engine.ledger_machine import AccountEvents
from engine.ledger_machine import AccountTail
from engine.ledger_machine import ApplySettlements
from engine.ledger_machine import Begin
from engine.ledger_machine import ExpectRelease
from engine.ledger_machine import LedgerMachine
from engine.ledger_machine import LockMargin
from engine.ledger_machine import Note
from engine.ledger_machine import OpenLocks
from engine.ledger_machine import PendingRequests
from engine.ledger_machine import ReleaseMargin
from engine.ledger_machine import _account_event_row
from engine.ledger_machine import encode_answer
from engine.messages import EndedOrder
from engine.messages import IdemHit
from engine.messages import IdemKey
from engine.messages import MarginLock
from engine.messages import OpenPosition
from engine.messages import PendingOrder
from engine.messages import SettlementItem
from engine.order_book import OrderKind
from engine.order_book import OrderStatus
from engine.orders import Side
from engine.position_ids import partial_close_id
from engine.results import Code
from engine.results import Rejected
from tests.unit.engine.recorded_ledger import NOW
from tests.unit.engine.recorded_ledger import SHARD
from tests.unit.engine.recorded_ledger import SIGNUP
from tests.unit.engine.recorded_ledger import USD
from tests.unit.engine.recorded_ledger import Recorded
from tests.unit.engine.recorded_ledger import closed
from tests.unit.engine.recorded_ledger import one_account
from tests.unit.engine.recorded_ledger import opened
from tests.unit.engine.recorded_ledger import snapshot_round_trip

PID = 2**34 + 5  # a position id (its whole close is named by it)
ENDED_KINDS = {OrderStatus.FILLED: "orderFilled", OrderStatus.CANCELLED: "orderCancelled",
               OrderStatus.EXPIRED: "orderExpired", OrderStatus.REJECTED: "orderRejected"}


def bal(free: int, margin: int = 0) -> Balance:
    return Balance(free, margin)


def pending(owner: int, order_id: int, margin: int = USD) -> PendingOrder:
    """A SOL limit long of ``margin`` at 95.00, placed at NOW."""
    return PendingOrder(order_id, owner, "SOL", Side.LONG, OrderKind.LIMIT, 9500, margin, 10, 0,
                        0, 0, NOW)


def ended(order: PendingOrder, status: OrderStatus, position_id: int = 0) -> EndedOrder:
    code = Code.WOULD_LIQUIDATE.value if status == OrderStatus.REJECTED else ""
    return EndedOrder(**order._asdict(), status=status, position_id=position_id,
                      ended_ts_us=NOW + 1_000_000, reject_code=code)


def kinds(events: list[AccountEvent]) -> list[str]:
    return [e.kind for e in events]


def log_of(led: Recorded) -> AccountLog:
    return led.m.account_log


def new_events(led: Recorded, command: Any) -> tuple[Any, list[AccountEvent]]:
    """Step ``command``: its answer and the account events it added."""
    before = log_of(led).version
    answer = led(command)
    added = log_of(led).version - before
    return answer, log_of(led).kept()[len(log_of(led).kept()) - added:] if added else []


def filled_log(users: list[int], kept: int = 1000) -> AccountLog:
    """A log with one balance event per entry of ``users`` (the i-th: free = i)."""
    log = AccountLog(kept)
    for i, user in enumerate(users):
        log.record(user, BALANCE, bal(i))
    return log


# ============================================================================ AccountLog
def test_each_account_numbers_its_events_and_the_version_counts_them_all() -> None:
    log = filled_log([7, 7, 9, 7, 9])
    assert [(e.user, e.seq, e.version) for e in log.kept()] == [
        (7, 1, 1), (7, 2, 2), (9, 1, 3), (7, 3, 4), (9, 2, 5)]
    assert log.last_seq == {7: 3, 9: 2} and log.version == 5
    assert [e.body for e in log.kept()] == [bal(i) for i in range(5)]
    assert log.problems() == []
    with pytest.raises(ValueError):
        AccountLog(0)


def test_since_answers_exactly_the_later_events_of_the_account() -> None:
    log = filled_log([7, 7, 9, 7, 9])
    sevens = [e for e in log.kept() if e.user == 7]
    assert log.since(7, 0) == sevens
    assert log.since(7, 1) == sevens[1:]
    assert log.since(7, 2) == sevens[2:]
    assert log.since(7, 3) == []  # at the newest
    assert log.since(9, 1) == [log.kept()[4]]
    assert log.since(7, 4) is None  # beyond the newest: not a number this account gave
    assert log.since(7, -1) is None
    assert log.since(8, 0) == []  # an account with no events yet
    assert log.since(8, 1) is None


def test_since_is_none_once_the_needed_events_left_the_kept_window() -> None:
    log = filled_log([1, 2, 1, 3, 1, 2, 2, 1], kept=5)  # versions 4..8 are kept
    assert [(e.user, e.seq) for e in log.kept()] == [(3, 1), (1, 3), (2, 2), (2, 3), (1, 4)]
    assert log.last_seq == {1: 4, 2: 3, 3: 1} and log.version == 8
    assert log.since(1, 0) is None and log.since(1, 1) is None  # seq 2 was dropped
    assert log.since(1, 2) == [log.kept()[1], log.kept()[4]]
    assert log.since(1, 4) == []
    assert log.since(2, 0) is None
    assert log.since(2, 1) == log.kept()[2:4]
    assert log.since(3, 0) == [log.kept()[0]]
    log.record(4, BALANCE, bal(99))  # user 3's only kept event drops out
    assert log.since(3, 0) is None and log.since(3, 1) == []
    assert log.since(4, 0) == [log.kept()[-1]]


def test_after_pages_every_account_in_order_and_honours_the_limit() -> None:
    log = filled_log([1, 2, 1, 3, 2, 1])
    everything = log.kept()
    assert log.after(0, 100) == (6, everything)
    assert log.after(0, 2) == (6, everything[:2])
    assert log.after(2, 2) == (6, everything[2:4])
    assert log.after(4, 2) == (6, everything[4:])
    assert log.after(5, 1) == (6, everything[5:])
    assert log.after(6, 10) == (6, [])  # at the newest
    # paging with the last version read walks everything once, in order
    seen: list[AccountEvent] = []
    version = 0
    while True:
        now, page = log.after(version, 4)
        assert page is not None
        if not page:
            break
        seen.extend(page)
        version = page[-1].version
    assert seen == everything and version == now == 6
    assert log.after(7, 10) == (6, None)  # beyond the newest
    assert log.after(-1, 10) == (6, None)


def test_after_is_none_once_the_events_after_the_version_left_the_kept_window() -> None:
    log = filled_log([1, 2, 1, 3, 2, 1, 1, 2], kept=5)  # versions 4..8 are kept
    kept = log.kept()
    assert [e.version for e in kept] == [4, 5, 6, 7, 8]
    assert log.after(3, 100) == (8, kept)
    assert log.after(3, 2) == (8, kept[:2])
    assert log.after(6, 100) == (8, kept[3:])
    assert log.after(2, 100) == (8, None)
    assert log.after(0, 100) == (8, None)


def test_eviction_keeps_each_accounts_index_consistent() -> None:
    users = [(i * 7) % 4 + (i % 3 == 0) for i in range(60)]
    log = filled_log(users, kept=9)
    assert log.problems() == []
    assert len(log.kept()) == 9 and log.version == 60
    assert [e.version for e in log.kept()] == list(range(52, 61))
    for user, last in log.last_seq.items():
        assert last == users.count(user)
        mine = [e for e in log.kept() if e.user == user]
        # from the first seq still kept, since() answers exactly the account's kept events
        first = mine[0].seq - 1 if mine else last
        assert log.since(user, first) == mine
        assert [e.seq for e in mine] == list(range(first + 1, last + 1))
        assert first == 0 or log.since(user, first - 1) is None
    # problems() does see a broken numbering
    log.last_seq[next(iter(log.last_seq))] += 1
    assert log.problems() != []


def test_load_restores_the_numbering_and_the_versions() -> None:
    log = filled_log([1, 2, 1, 3, 2, 1, 1, 2], kept=5)
    again = AccountLog(kept=5)
    again.load(sorted(log.last_seq.items()), [e._replace(version=0) for e in log.kept()])
    assert again.kept() == log.kept() and again.problems() == []
    assert again.last_seq == log.last_seq and again.version == log.version
    for version in range(-1, 10):
        for limit in (1, 3, 100):
            assert again.after(version, limit) == log.after(version, limit)
    for user in (1, 2, 3, 4):
        for seq in range(-1, 6):
            assert again.since(user, seq) == log.since(user, seq)
    # the numbering continues from where it was
    for each in (log, again):
        each.record(3, BALANCE, bal(50))
    assert again.kept() == log.kept() and again.kept()[-1][:3] == (3, 2, 9)
    # loaded into a smaller window: the newest are kept, numbered as before
    small = AccountLog(kept=2)
    small.load(log.last_seq.items(), log.kept())
    assert small.kept() == log.kept()[-2:] and small.problems() == []
    assert small.after(7, 10) == (9, log.kept()[-2:]) and small.after(6, 10) == (9, None)


# ============================================================================ the ledger
def test_an_account_starts_with_its_signup_balance_and_a_lock_changes_it() -> None:
    led, user = one_account()
    assert log_of(led).kept() == [AccountEvent(user, 1, 1, BALANCE, bal(SIGNUP, 0))]
    answer, added = new_events(led, LockMargin(MarginLock(user, 100 * USD, request_id=1)))
    assert answer is None
    assert added == [AccountEvent(user, 2, 2, BALANCE, bal(SIGNUP - 100 * USD, 100 * USD))]
    other = led.account().user
    assert log_of(led).kept()[-1] == AccountEvent(other, 1, 3, BALANCE, bal(SIGNUP, 0))
    _, added = new_events(led, ReleaseMargin(user, 100 * USD, 1))
    assert added == [AccountEvent(user, 3, 4, BALANCE, bal(SIGNUP, 0))]
    # a refused lock changes nothing the account sees
    answer, added = new_events(led, LockMargin(MarginLock(user, SIGNUP + 1, request_id=2)))
    assert isinstance(answer, Rejected) and added == []


def test_a_note_numbers_the_position_once_per_request() -> None:
    led, user = one_account()
    led(LockMargin(MarginLock(user, 100 * USD, request_id=1)))
    position = opened(user, PID, 100 * USD)
    answer, added = new_events(led, Note(user, 1, POSITION_OPENED, position))
    assert answer is None
    assert led.m.decode_record(led.records[-1]) == [
        AccountNoted(user, 1, POSITION_OPENED, encode_answer(position))]
    assert added == [AccountEvent(user, 3, 3, POSITION_OPENED, position)]
    assert type(added[0].body) is OpenPosition and added[0].body == position
    # noted again (the answer was lost and the note resent): nothing more
    records = len(led.records)
    answer, added = new_events(led, Note(user, 1, POSITION_OPENED, position))
    assert answer is None and added == [] and len(led.records) == records
    # another request on the same position (a TP/SL change) is noted
    changed = position._replace(tp_ticks=12000)
    _, added = new_events(led, Note(user, 2, POSITION_UPDATED, changed))
    assert added == [AccountEvent(user, 4, 4, POSITION_UPDATED, changed)]
    # an order placed
    led(LockMargin(MarginLock(user, 5 * USD, request_id=3, order=True)))
    order = pending(user, 3, 5 * USD)
    _, added = new_events(led, Note(user, 3, ORDER_PLACED, order))
    assert added == [AccountEvent(user, 6, 6, ORDER_PLACED, order)]
    assert type(added[0].body) is PendingOrder


@pytest.mark.parametrize("note", [
    Note(1, 1, POSITION_OPENED, opened(2, PID, USD)),  # another account's position
    Note(2, 1, POSITION_OPENED, opened(1, PID, USD)),  # noted for another account
    Note(3, 1, POSITION_OPENED, opened(3, PID, USD)),  # an account that does not exist
    Note(1, 1, ORDER_PLACED, opened(1, PID, USD)),  # an order noted with a position
    Note(1, 1, POSITION_OPENED, pending(1, 1)),  # a position noted with an order
    Note(1, 1, POSITION_CLOSED, opened(1, PID, USD)),  # not a kind that is noted
    Note(1, 1, "positionMoved", opened(1, PID, USD)),  # an unknown kind
    Note(1, -1, POSITION_OPENED, opened(1, PID, USD)),  # a request id out of range
], ids=["owner", "user", "no-account", "order-kind", "position-kind", "closed-kind", "unknown-kind",
        "request-id"])
def test_a_note_that_does_not_fit_is_refused_with_no_events(note: Note) -> None:
    led, user = one_account()
    assert (user, led.account().user) == (1, 2)
    led(LockMargin(MarginLock(user, USD, request_id=1)))
    # the same note made to fit is accepted (so each refusal is for what the case changed)
    fits = Note(1, 1, POSITION_OPENED, opened(1, PID, USD))
    assert led.m.decide(fits, NOW)[0] is None
    answer, events = led.m.decide(note, NOW)
    assert isinstance(answer, Rejected) and answer.code is Code.INVALID_REQUEST
    assert list(events) == []
    assert led(note) == answer and log_of(led).version == 3


def test_a_note_with_a_client_order_id_stores_the_answer() -> None:
    led, user = one_account()
    key = IdemKey(user, "open", "c-1")
    assert led(LockMargin(MarginLock(user, 100 * USD, key, request_id=7))) is None
    assert led(Begin(key)) == IdemHit(None, 7)  # pending
    assert led(PendingRequests()) == [7]
    position = opened(user, PID, 100 * USD)
    _, added = new_events(led, Note(user, 7, POSITION_OPENED, position, key))
    assert [type(e) for e in led.m.decode_record(led.records[-1])] == [
        ClientOrderStoredAt, AccountNoted]
    assert kinds(added) == [POSITION_OPENED]
    assert led(Begin(key)) == IdemHit(position)
    assert led(PendingRequests()) == []
    # a retry of the open gets the answer and locks nothing
    answer, added = new_events(led, LockMargin(MarginLock(user, 100 * USD, key, request_id=8)))
    assert answer == IdemHit(position) and added == []
    assert led.balances(user) == (SIGNUP - 100 * USD, 100 * USD)
    # a resent note stores nothing new and notes nothing again
    records = len(led.records)
    assert led(Note(user, 7, POSITION_OPENED, position._replace(tp_ticks=1), key)) is None
    assert len(led.records) == records and led(Begin(key)) == IdemHit(position)


def test_a_whole_close_records_the_closed_position_then_the_balance() -> None:
    led, user = one_account()
    led(LockMargin(MarginLock(user, 100 * USD, request_id=1)))
    led(Note(user, 1, POSITION_OPENED, opened(user, PID, 100 * USD)))
    part = closed(user, PID, 40 * USD, 5 * USD)._replace(close_id=partial_close_id(1, 3),
                                                        partial=1)
    whole = closed(user, PID, 60 * USD, -10 * USD)
    answer, added = new_events(led, ApplySettlements(SHARD, (SettlementItem(1, part),
                                                             SettlementItem(2, whole))))
    assert answer == 2
    after_part = bal(SIGNUP - 100 * USD + 45 * USD, 60 * USD)
    assert added == [AccountEvent(user, 4, 4, POSITION_CLOSED, part),
                     AccountEvent(user, 5, 5, BALANCE, after_part),
                     AccountEvent(user, 6, 6, POSITION_CLOSED, whole),
                     AccountEvent(user, 7, 7, BALANCE, bal(SIGNUP - 5 * USD, 0))]
    assert type(added[2].body) is type(whole)
    # a resend of the outbox applies (and records) nothing
    _, added = new_events(led, ApplySettlements(SHARD, (SettlementItem(2, whole),)))
    assert added == []


def test_a_note_after_the_position_closed_whole_records_nothing() -> None:
    led, user = one_account()
    key = IdemKey(user, "open", "c-1")
    led(LockMargin(MarginLock(user, 100 * USD, key, request_id=1)))
    # a trigger closed the position before the open's answer was noted
    led(ApplySettlements(SHARD, (SettlementItem(1, closed(user, PID, 100 * USD, USD)),)))
    version = log_of(led).version
    position = opened(user, PID, 100 * USD)
    assert led(Note(user, 1, POSITION_OPENED, position, key)) is None
    assert log_of(led).version == version
    # the answer is still stored and the request is noted as completed (its lock is no longer
    # open); only the account event is left out of the stream
    assert [type(e) for e in led.m.decode_record(led.records[-1])] == [ClientOrderStoredAt,
                                                                        AccountNoted]
    assert led(OpenLocks()) == []
    assert led(Begin(key)) == IdemHit(position)
    # a partial close does not end the position: a change of it is still noted
    other = PID + 1
    led(LockMargin(MarginLock(user, 10 * USD, request_id=2)))
    part = closed(user, other, 4 * USD, 0)._replace(close_id=partial_close_id(2, 3),
                                                   partial=1)
    led(ApplySettlements(SHARD, (SettlementItem(2, part),)))
    rest = opened(user, other, 6 * USD)
    _, added = new_events(led, Note(user, 3, POSITION_UPDATED, rest))
    assert added == [AccountEvent(user, log_of(led).last_seq[user], log_of(led).version,
                                  POSITION_UPDATED, rest)]


@pytest.mark.parametrize("status", list(ENDED_KINDS))
def test_an_ended_order_records_its_end_and_a_balance_only_if_margin_was_released(
        status: OrderStatus) -> None:
    led, user = one_account()
    assert led(LockMargin(MarginLock(user, 30 * USD, request_id=4, order=True))) is None
    order = pending(user, 4, 30 * USD)
    led(Note(user, 4, ORDER_PLACED, order))
    last = log_of(led).last_seq[user]
    end = ended(order, status, PID if status == OrderStatus.FILLED else 0)
    answer, added = new_events(led, ApplySettlements(SHARD, (SettlementItem(1, end),)))
    assert answer == 1
    if status == OrderStatus.FILLED:  # its margin is the position's now: no balance change
        assert added == [AccountEvent(user, last + 1, last + 1, ENDED_KINDS[status], end)]
        assert led.balances(user) == (SIGNUP - 30 * USD, 30 * USD)
    else:
        assert added == [AccountEvent(user, last + 1, last + 1, ENDED_KINDS[status], end),
                         AccountEvent(user, last + 2, last + 2, BALANCE, bal(SIGNUP, 0))]
    assert type(added[0].body) is EndedOrder
    # the placement noted after its order ended (the answer arrived late) records nothing
    version = log_of(led).version
    assert led(Note(user, 5, ORDER_PLACED, order)) is None
    assert log_of(led).version == version


def test_a_fill_is_followed_by_the_position_it_opened_once_even_if_it_closed_since() -> None:
    led, user = one_account()
    orders = []
    for request_id in (4, 5, 6):
        assert led(LockMargin(MarginLock(user, 10 * USD, request_id=request_id,
                                         order=True))) is None
        orders.append(pending(user, request_id, 10 * USD))
        led(Note(user, request_id, ORDER_PLACED, orders[-1]))
    first, second, third = (opened(user, PID + i, 10 * USD) for i in range(3))
    fills = tuple(SettlementItem(i + 1, ended(o, OrderStatus.FILLED, PID + i))
                  for i, o in enumerate(orders))
    last = log_of(led).last_seq[user]
    # the first fill with its position; a position no fill in the run opened is not noted
    stranger = opened(user, PID + 99, 10 * USD)
    _, added = new_events(led, ApplySettlements(SHARD, fills[:1], (), (stranger, first)))
    assert [(e.seq, e.kind, e.body) for e in added] == [
        (last + 1, "orderFilled", fills[0].closed), (last + 2, POSITION_OPENED, first)]
    # sent again with its position: applied already, nothing
    _, added = new_events(led, ApplySettlements(SHARD, fills[:1], (), (first,)))
    assert added == []
    # the second fill and the third, the third's position closed in the same run (a later
    # tick of the same shard call): each position is noted right after its own fill, the
    # closed one with the terms it closed with (an unrealized PnL of 0), before its close
    close = SettlementItem(4, closed(user, PID + 2, 10 * USD, 0))
    _, added = new_events(led, ApplySettlements(SHARD, (*fills[1:], close), (),
                                                (third, second)))
    assert [(e.kind, getattr(e.body, "position_id", None)) for e in added] == [
        ("orderFilled", PID + 1), (POSITION_OPENED, PID + 1), ("orderFilled", PID + 2),
        (POSITION_OPENED, PID + 2), (POSITION_CLOSED, PID + 2), (BALANCE, None)]
    noted = added[3].body
    assert noted == OpenPosition(*(getattr(close.closed, f) for f in OpenPosition._fields[:-1]),
                                 0)
    # a fill's note carries no request id: later requests are noted as usual
    assert led(Note(user, 7, POSITION_UPDATED, second)) is None
    assert log_of(led).kept()[-1].kind == POSITION_UPDATED


def test_an_order_that_ends_before_its_placement_is_noted_is_shown_placed_first() -> None:
    """The shard places the order, a fill on the next tick settles through the feed before
    the API's note of the placement reaches the ledger: the stream shows the order placed,
    then filled, once each; the late note records nothing; an order noted as usual is not
    shown placed twice."""
    led, user = one_account()
    raced, usual = pending(user, 4, 10 * USD), pending(user, 5, 10 * USD)
    for order in (raced, usual):
        assert led(LockMargin(MarginLock(user, 10 * USD, request_id=order.order_id,
                                         order=True))) is None
    led(Note(user, 5, ORDER_PLACED, usual))
    position = opened(user, PID, 10 * USD)
    fills = (SettlementItem(1, ended(raced, OrderStatus.FILLED, PID)),
             SettlementItem(2, ended(usual, OrderStatus.CANCELLED)))
    _, added = new_events(led, ApplySettlements(SHARD, fills, (), (position,)))
    assert [(e.kind, e.body) for e in added] == [
        (ORDER_PLACED, raced), ("orderFilled", fills[0].closed), (POSITION_OPENED, position),
        ("orderCancelled", fills[1].closed), (BALANCE, Balance(SIGNUP - 10 * USD, 10 * USD))]
    _, late = new_events(led, Note(user, 4, ORDER_PLACED, raced))
    assert late == []
    assert led.replayed().fingerprint() == led.m.fingerprint()


def test_an_older_snapshot_knows_the_placements_from_its_kept_events() -> None:
    """A snapshot written before the placements were kept: the open orders whose orderPlaced
    the kept events hold are known placed, so their ends do not show them placed again."""
    led, user = one_account()
    still_open, gone = pending(user, 4, 10 * USD), pending(user, 5, 10 * USD)
    for order in (still_open, gone):
        assert led(LockMargin(MarginLock(user, 10 * USD, request_id=order.order_id,
                                         order=True))) is None
        led(Note(user, order.order_id, ORDER_PLACED, order))
    led(ApplySettlements(SHARD, (SettlementItem(1, ended(gone, OrderStatus.CANCELLED)),)))
    arrays, meta = led.m.snapshot()
    meta = json.loads(json.dumps(meta))
    del meta["placed_orders"]
    restored = LedgerMachine.from_snapshot(SIGNUP, led.m.max_open_positions, arrays, meta)
    assert restored.fingerprint() == led.m.fingerprint()


def test_account_events_and_the_tail_answer_what_the_log_holds() -> None:
    led, user = one_account()
    other = led.account().user
    led(LockMargin(MarginLock(user, 10 * USD, request_id=1)))
    led(Note(user, 1, POSITION_OPENED, opened(user, PID, 10 * USD)))
    led(LockMargin(MarginLock(other, 20 * USD, request_id=2, order=True)))
    led(Note(other, 2, ORDER_PLACED, pending(other, 2, 20 * USD)))
    led(ApplySettlements(SHARD, (SettlementItem(1, closed(user, PID, 10 * USD, 0)),)))
    log = log_of(led)
    everything = log.kept()
    mine = [e for e in everything if e.user == user]
    theirs = [e for e in everything if e.user == other]
    assert kinds(mine) == [BALANCE, BALANCE, POSITION_OPENED, POSITION_CLOSED, BALANCE]
    assert kinds(theirs) == [BALANCE, BALANCE, ORDER_PLACED]
    assert [e.seq for e in mine] == [1, 2, 3, 4, 5] and [e.seq for e in theirs] == [1, 2, 3]
    assert led(AccountEvents(user, 0)) == (5, mine)
    assert led(AccountEvents(user, 3)) == (5, mine[3:])
    assert led(AccountEvents(user, 5)) == (5, [])
    assert led(AccountEvents(user, 6)) == (5, None)
    assert led(AccountEvents(user)) == (5, None)  # only the number asked
    assert led(AccountEvents(other, 1)) == (3, theirs[1:])
    assert led(AccountEvents(99, 0)) == (0, [])
    assert led(AccountTail(0)) == (8, everything)
    assert led(AccountTail(0, 3)) == (8, everything[:3])
    assert led(AccountTail(3, 3)) == (8, everything[3:6])
    assert led(AccountTail(8, 3)) == (8, [])
    assert led(AccountTail(9, 3)) == (8, None)
    refused = led(AccountTail("3", 3))  # type: ignore[arg-type]
    assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST


# ============================================================================ snapshots, replay
def busy_ledger() -> tuple[Recorded, int, int]:
    """Two accounts with a position noted and closed, an order placed and cancelled, a lock
    still held."""
    led, user = one_account()
    other = led.account().user
    led(LockMargin(MarginLock(user, 10 * USD, IdemKey(user, "open", "a"), request_id=1)))
    led(Note(user, 1, POSITION_OPENED, opened(user, PID, 10 * USD), IdemKey(user, "open", "a")))
    led(LockMargin(MarginLock(other, 20 * USD, request_id=2, order=True)))
    order = pending(other, 2, 20 * USD)
    led(Note(other, 2, ORDER_PLACED, order))
    led(ApplySettlements(SHARD, (SettlementItem(1, closed(user, PID, 10 * USD, 3 * USD)),
                                 SettlementItem(2, ended(order, OrderStatus.CANCELLED)))))
    led(LockMargin(MarginLock(user, 7 * USD, request_id=3)))
    return led, user, other


def test_a_snapshot_keeps_the_account_events_and_the_numbering_continues() -> None:
    led, user, other = busy_ledger()
    log = log_of(led)
    last, version = log.last_seq[user], log.version
    assert (last, log.last_seq[other], version) == (6, 5, 11)
    restored = snapshot_round_trip(led.m)
    assert restored.fingerprint() == led.m.fingerprint() and restored.check() == []
    assert restored.account_log.kept() == log.kept()
    assert restored.decide(AccountTail(0), NOW)[0] == (version, log.kept())
    led.m = restored
    _, added = new_events(led, ReleaseMargin(user, 7 * USD, 3))
    assert added == [AccountEvent(user, last + 1, version + 1, BALANCE, bal(SIGNUP + 3 * USD))]
    # a request noted before the snapshot is still noted once
    assert led(Note(user, 1, POSITION_OPENED, opened(user, PID, 10 * USD))) is None
    assert log_of(led).version == version + 1


def test_an_older_snapshot_without_account_events_numbers_from_one() -> None:
    led, user, other = busy_ledger()
    arrays, meta = led.m.snapshot()
    meta = json.loads(json.dumps(meta))
    for name in ("account_seqs", "account_events", "noted"):
        del meta[name]
    old = LedgerMachine.from_snapshot(SIGNUP, led.m.max_open_positions,
                                      {k: v.copy() for k, v in arrays.items()}, meta)
    assert old.check() == []
    assert old.account_log.kept() == [] and old.account_log.version == 0
    want = {k: v for k, v in led.m.fingerprint().items()
            if k not in ("account_seqs", "account_events", "noted")}
    assert {k: v for k, v in old.fingerprint().items() if k in want} == want
    assert old.fingerprint()["noted"] == [] and old.fingerprint()["account_seqs"] == []
    led.m = old
    _, added = new_events(led, ReleaseMargin(user, 7 * USD, 3))
    assert added == [AccountEvent(user, 1, 1, BALANCE, bal(SIGNUP + 3 * USD))]
    assert led(AccountEvents(other, 0)) == (0, [])


def test_a_snapshot_holding_the_bodies_as_json_text_restores_the_same_events() -> None:
    """The first layout of the kept events in a snapshot: ``[user, seq, kind, body]`` with the
    body as JSON text (like a message's); today's holds each event's own fields."""
    led, _, _ = busy_ledger()
    arrays, meta = led.m.snapshot()
    meta = json.loads(json.dumps(meta))
    assert all(len(row) == 5 for row in meta["account_events"])
    meta["account_events"] = [_account_event_row(e) for e in led.m.account_log.kept()]
    assert all(isinstance(row[3], str) for row in meta["account_events"])
    old = LedgerMachine.from_snapshot(SIGNUP, led.m.max_open_positions,
                                      {k: v.copy() for k, v in arrays.items()}, meta)
    assert old.account_log.kept() == led.m.account_log.kept()
    assert old.fingerprint() == led.m.fingerprint()


def test_replaying_the_journal_gives_the_same_account_events() -> None:
    led, user, other = busy_ledger()
    half = len(led.records)
    arrays, meta = led.m.snapshot()
    led(Note(user, 3, POSITION_OPENED, opened(user, PID + 1, 7 * USD)))
    led(LockMargin(MarginLock(other, 5 * USD, request_id=4, order=True)))
    led(ApplySettlements(SHARD, (SettlementItem(3, ended(pending(other, 4, 5 * USD),
                                                         OrderStatus.FILLED, PID + 2)),)))
    kept = log_of(led).kept()
    # (the order filled before its placement was noted: shown placed, then filled)
    assert [e.kind for e in kept[-2:]] == [ORDER_PLACED, "orderFilled"]
    assert len(kept) == log_of(led).version == 15
    # every account event comes from the journal: a fresh machine replaying it numbers the same
    again = led.replayed()
    assert again.account_log.kept() == kept and again.account_log.last_seq == {user: 7, other: 8}
    assert again.fingerprint() == led.m.fingerprint()
    # and so does the snapshot taken halfway plus the journal after it
    base = LedgerMachine.from_snapshot(SIGNUP, led.m.max_open_positions, arrays,
                                       json.loads(json.dumps(meta)))
    assert led.replayed(base, half).account_log.kept() == kept
    # the notes themselves are journaled (an AccountNoted each)
    noted = [e for record in led.records for e in decode_batch(record)
             if isinstance(e, AccountNoted)]
    assert [(e.user, e.request_id, e.kind) for e in noted] == [
        (user, 1, POSITION_OPENED), (other, 2, ORDER_PLACED), (user, 3, POSITION_OPENED)]


def test_a_lock_stays_open_until_its_request_completes() -> None:
    """OpenLocks lists the locks whose request has not completed, oldest first: a note, a
    release or an abandonment ends one; what stays is what a dead API process left."""
    led, user = one_account()
    for request_id in (1, 2, 3, 4):
        led(LockMargin(MarginLock(user, USD, request_id=request_id)))
    led(LockMargin(MarginLock(user, USD, request_id=5, order=True)))
    assert led(OpenLocks()) == [(1, "open"), (2, "open"), (3, "open"), (4, "open"),
                                (5, "order")]
    assert led(OpenLocks(limit=2)) == [(1, "open"), (2, "open")]
    led(Note(user, 1, POSITION_OPENED, opened(user, PID, USD)))  # the open happened
    led(ReleaseMargin(user, USD, request_id=2))  # the open was refused
    assert led(AbandonLock(3)) == (3, user, USD)  # the open never went out
    assert led(OpenLocks()) == [(4, "open"), (5, "order")]
    # the release of a lock that ended already (its request was slow, not dead) frees nothing
    margin = led.m.ledger.margin_micros(user)
    assert led(ReleaseMargin(user, USD, request_id=3)) is None
    assert led(ReleaseMargin(user, USD, request_id=1)) is None
    assert led.m.ledger.margin_micros(user) == margin == 3 * USD
    assert led(OpenLocks(limit=0)) == Rejected(Code.INVALID_REQUEST, "limit must be a positive "
                                               "integer")


def test_a_margin_removal_moves_the_balance_once_and_one_that_did_not_happen_not_at_all(
        ) -> None:
    """An announced removal (ExpectRelease) moves nothing and numbers no event; its release
    numbers one balance event; a removal that never happened (abandoned) ends its record
    without any event (it numbered an unchanged balance)."""
    led, user = one_account()
    assert led(LockMargin(MarginLock(user, 50 * USD, request_id=1))) is None
    assert led(Note(user, 1, POSITION_OPENED, opened(user, PID, 50 * USD))) is None
    for request_id in (2, 3):
        _, added = new_events(led, ExpectRelease(user, 10 * USD, request_id))
        assert added == []
    _, added = new_events(led, AbandonLock(3))  # the shard refused it
    assert added == []
    _, added = new_events(led, ReleaseMargin(user, 10 * USD, 2, counted=False))
    assert [(e.kind, e.body) for e in added] == [(BALANCE, bal(SIGNUP - 40 * USD, 40 * USD))]
    assert led(OpenLocks()) == []
