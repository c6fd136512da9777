"""LedgerMachine and pending orders (SPEC "Pending orders", "Limits", "Ledger invariant"): a
placement locks the order's margin and counts an open order and an open-position slot; the
order's end, delivered in a shard's outbox among its closes, moves nothing for a fill and
releases exactly the margin otherwise; order history, stored answers, the audit and the
start-time recount know them; replay and snapshots give back an equal state."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from engine.account_events import ORDER_PLACED
from engine.events import MarginReleased
from engine.events import OrderCountSet
from engine.events import OrderLocked
from engine.events import OrderSettled
from engine.events import decode_batch
from engine.ledger_machine import DEFAULT_MAX_OPEN_ORDERS
from engine.ledger_machine import AbandonLock
from engine.ledger_machine import AppliedSeq
from engine.ledger_machine import ApplySettlements
from engine.ledger_machine import Begin
from engine.ledger_machine import History
from engine.ledger_machine import LedgerMachine
from engine.ledger_machine import LockMargin
from engine.ledger_machine import Note
from engine.ledger_machine import OpenCount
from engine.ledger_machine import OrderCount
from engine.ledger_machine import OrderHistory
from engine.ledger_machine import ReconcileAtStart
from engine.ledger_machine import ReleaseMargin
from engine.ledger_machine import Remember
from engine.ledger_machine import SettleRequests
from engine.ledger_machine import decode_answer
from engine.ledger_machine import encode_answer
from engine.messages import EndedOrder
from engine.messages import IdemHit
from engine.messages import IdemKey
from engine.messages import MarginLock
from engine.messages import PendingOrder
from engine.messages import SettlementItem
from engine.order_book import OrderKind
from engine.order_book import OrderStatus
from engine.orders import CloseReason
from engine.orders import Side
from engine.results import Code
from engine.results import Rejected
from tests.unit.engine.recorded_ledger import NOW
from tests.unit.engine.recorded_ledger import SHARD
from tests.unit.engine.recorded_ledger import SIGNUP
from tests.unit.engine.recorded_ledger import USD
from tests.unit.engine.recorded_ledger import Recorded
from tests.unit.engine.recorded_ledger import closed
from tests.unit.engine.recorded_ledger import older_answers_layout

ORDERS = DEFAULT_MAX_OPEN_ORDERS
FILLED, CANCELLED, EXPIRED, REJECTED = (OrderStatus.FILLED, OrderStatus.CANCELLED,
                                        OrderStatus.EXPIRED, OrderStatus.REJECTED)
RELEASING = (CANCELLED, EXPIRED, REJECTED)


def pending(owner: int, order_id: int, margin: int = USD) -> PendingOrder:
    """A SOL limit long of ``margin`` at 95.00, placed at NOW."""
    return PendingOrder(order_id, owner, "SOL", Side.LONG, OrderKind.LIMIT, 9500, margin, 10, 0,
                        0, 0, NOW)


def ended(order: PendingOrder, status: OrderStatus, position_id: int = 0) -> EndedOrder:
    """``order`` ended with ``status`` a second after it was placed (a fill opened
    ``position_id``; a rejection says why)."""
    code = Code.WOULD_LIQUIDATE.value if status == REJECTED else ""
    return EndedOrder(**order._asdict(), status=status, position_id=position_id,
                      ended_ts_us=NOW + 1_000_000, reject_code=code)


class Orders(Recorded):
    """A Recorded ledger with both caps, that numbers its locks' request ids (1, 2, ...; an
    order's id is its placement's request id) and the outbox items of SHARD (seq 1, 2, ...)."""

    def __init__(self, max_open_positions: int = 2 * ORDERS,
                 max_open_orders: int = ORDERS) -> None:
        super().__init__(max_open_positions)
        self.m = self.fresh(max_open_orders)
        self.rid = 0
        self.seq = 0

    def fresh(self, max_open_orders: int | None = None) -> LedgerMachine:
        return LedgerMachine(SIGNUP, self.m.max_open_positions,
                             max_open_orders or self.m.max_open_orders)

    def lock(self, user: int, margin: int = USD, key: IdemKey | None = None,
             order: bool = False) -> Any:
        self.rid += 1
        return self(LockMargin(MarginLock(user, margin, key, self.rid, order)))

    def place(self, user: int, margin: int = USD, key: IdemKey | None = None) -> PendingOrder:
        """An order placed (its lock accepted)."""
        assert self.lock(user, margin, key, order=True) is None
        return pending(user, self.rid, margin)

    def items(self, *records: Any) -> tuple[SettlementItem, ...]:
        """``records`` as the next items of SHARD's outbox (not delivered)."""
        first = self.seq + 1
        self.seq += len(records)
        return tuple(SettlementItem(first + i, r) for i, r in enumerate(records))

    def deliver(self, *records: Any, answers: tuple[tuple[IdemKey, object], ...] = ()) -> None:
        assert self(ApplySettlements(SHARD, self.items(*records), answers)) == self.seq

    def counts(self, user: int) -> tuple[int, int]:
        """(opens holding margin, open orders) of ``user``."""
        return self(OpenCount(user)), self(OrderCount(user))

    def events(self) -> list[Any]:
        """The events of the newest journal record."""
        return decode_batch(self.records[-1])

    def same_after_replay_and_snapshot(self) -> None:
        want = self.m.fingerprint()
        assert self.replayed(self.fresh()).fingerprint() == want
        arrays, meta = self.m.snapshot()
        meta = json.loads(json.dumps(meta))
        again = LedgerMachine.from_snapshot(SIGNUP, self.m.max_open_positions,
                                            self.m.max_open_orders,
                                            {k: v.copy() for k, v in arrays.items()}, meta)
        assert again.fingerprint() == want and again.check() == []
        assert again.max_open_orders == self.m.max_open_orders


def trader(max_open_positions: int = 2 * ORDERS, max_open_orders: int = ORDERS
           ) -> tuple[Orders, int]:
    led = Orders(max_open_positions, max_open_orders)
    return led, led.account().user


# ----------------------------------------------------------------------------- placement
def test_a_placement_locks_its_margin_and_counts_an_open_and_an_order() -> None:
    led, user = trader()
    key = IdemKey(user, "order", "o-1")
    led.place(user, 30 * USD, key)
    assert led.events()[0] == OrderLocked(user, 30 * USD, 1)
    assert led.balances(user) == (SIGNUP - 30 * USD, 30 * USD)
    assert led.counts(user) == (1, 1)
    assert led(Begin(key)) == IdemHit(None, 1)  # reserved, pending with its request id
    # a market open's lock counts an open, not an order
    assert led.lock(user, 10 * USD) is None
    assert led.counts(user) == (2, 1)
    assert led.audit({user: 40 * USD}) == []
    led.same_after_replay_and_snapshot()


def test_the_200th_order_is_accepted_and_the_201st_refused_with_nothing_changed() -> None:
    led, user = trader()
    other = led.account().user
    for _ in range(ORDERS):
        led.place(user)
    assert led.counts(user) == (ORDERS, ORDERS)
    before, records = led.m.fingerprint(), len(led.records)
    refused = led.lock(user, USD, None, order=True)  # the 201st
    assert refused == Rejected(Code.TOO_MANY_ORDERS, f"at most {ORDERS} open orders per account")
    assert led.m.fingerprint() == before and len(led.records) == records
    # with a clientOrderId the refusal is its first answer, and still nothing is locked
    key = IdemKey(user, "order", "one-too-many")
    assert led.lock(user, USD, key, order=True) == refused
    assert led(Begin(key)) == IdemHit(refused)
    assert led.balances(user) == (SIGNUP - ORDERS * USD, ORDERS * USD)
    # a market open still has room (positions have their own cap), another account too
    assert led.lock(user) is None and led.counts(user) == (ORDERS + 1, ORDERS)
    led.place(other)
    assert led.counts(other) == (1, 1)
    led.same_after_replay_and_snapshot()


@pytest.mark.parametrize("ending", ["cancel", "expiry", "rejection", "fill", "refused",
                                    "abandoned"])
def test_an_order_that_ends_makes_room_for_another(ending: str) -> None:
    led, user = trader()
    orders = [led.place(user) for _ in range(ORDERS)]
    first = orders[0]
    if ending == "refused":  # the shard refused the placement: released by its request id
        key = IdemKey(user, "order", "refused")
        answer = Rejected(Code.INVALID_TRIGGER, "trigger off the price step")
        assert led(ReleaseMargin(user, USD, first.order_id, (key, answer))) is None
        assert isinstance(led.events()[0], MarginReleased)
    elif ending == "abandoned":  # the placement never reached a shard
        assert led(AbandonLock(first.order_id)) == (first.order_id, user, USD)
        assert led(AbandonLock(first.order_id)) is None  # once
    else:
        status = {"cancel": CANCELLED, "expiry": EXPIRED, "rejection": REJECTED,
                  "fill": FILLED}[ending]
        led.deliver(ended(first, status, 77 if status == FILLED else 0))
        assert isinstance(led.events()[0], OrderSettled)
        # a resend applies nothing more
        assert led(ApplySettlements(SHARD, (SettlementItem(1, ended(first, status, 77)),))) == 1
    opens = ORDERS if ending == "fill" else ORDERS - 1  # a fill's slot is its position's
    assert led.counts(user) == (opens, ORDERS - 1)
    led.place(user)
    assert led.counts(user) == (opens + 1, ORDERS)
    assert led.lock(user, USD, None, order=True).code is Code.TOO_MANY_ORDERS
    led.same_after_replay_and_snapshot()


def test_orders_take_open_position_slots_so_a_fill_never_exceeds_the_cap() -> None:
    led, user = trader(max_open_positions=3)
    assert led.lock(user) is None  # a market open
    a, b = led.place(user), led.place(user)
    assert led.counts(user) == (3, 2)
    for order in (True, False):  # positions + orders = the cap: neither fits
        answer = led.lock(user, USD, None, order)
        assert isinstance(answer, Rejected) and answer.code is Code.TOO_MANY_POSITIONS
    # a fill keeps its slot (now the position's): still full
    led.deliver(ended(a, FILLED, 501))
    assert led.counts(user) == (3, 1)
    assert led.lock(user, USD, None, order=True).code is Code.TOO_MANY_POSITIONS
    # the filled position's close frees it; so does a cancel
    led.deliver(closed(user, 501, USD, 0))
    assert led.counts(user) == (2, 1)
    led.deliver(ended(b, CANCELLED))
    assert led.counts(user) == (1, 0)
    led.place(user)
    led.place(user)
    assert led.counts(user) == (3, 2)
    led.same_after_replay_and_snapshot()


# ----------------------------------------------------------------------------- ends
def test_a_fill_keeps_the_margin_locked_and_moves_nothing() -> None:
    led, user = trader()
    order = led.place(user, 40 * USD)
    accounts = led.m.ledger.accounts()
    led.deliver(ended(order, FILLED, 900))
    assert led.m.ledger.accounts() == accounts  # the position holds the margin now
    assert led.balances(user) == (SIGNUP - 40 * USD, 40 * USD)
    assert led.counts(user) == (1, 0)
    assert led.audit({user: 40 * USD}) == []  # the shard's position
    assert led(OrderHistory(user)) == [ended(order, FILLED, 900)]
    # the position's close settles like any other
    led.deliver(closed(user, 900, 40 * USD, 5 * USD))
    assert led.balances(user) == (SIGNUP + 5 * USD, 0) and led.counts(user) == (0, 0)
    led.same_after_replay_and_snapshot()


@pytest.mark.parametrize("status", RELEASING)
def test_a_cancel_expiry_or_rejection_releases_exactly_the_margin(status: OrderStatus) -> None:
    led, user = trader()
    kept = led.place(user, 7 * USD)
    assert led.lock(user, 11 * USD) is None  # a market open's lock
    accounts = led.m.ledger.accounts()
    order = led.place(user, 25 * USD + 3)
    led.deliver(ended(order, status))
    assert led.m.ledger.accounts() == accounts  # the house and insurance funds untouched too
    assert led.balances(user) == (SIGNUP - 18 * USD, 18 * USD)
    assert led.counts(user) == (2, 1)
    [entry] = led(OrderHistory(user))
    assert entry.status == status and entry.position_id == 0
    assert entry.reject_code == ("WOULD_LIQUIDATE" if status == REJECTED else "")
    assert led(History(user)) == []  # an order is not a closed position
    led.deliver(ended(kept, status))
    assert led.balances(user) == (SIGNUP - 11 * USD, 11 * USD) and led.counts(user) == (1, 0)
    led.same_after_replay_and_snapshot()


def test_order_history_is_newest_first_with_a_before_cursor() -> None:
    led, user = trader()
    other = led.account().user
    mine = [led.place(user) for _ in range(5)]
    theirs = led.place(other)
    statuses = [FILLED, CANCELLED, EXPIRED, REJECTED, CANCELLED]
    led.deliver(*(ended(o, s, 100 + o.order_id if s == FILLED else 0)
                  for o, s in zip(mine, statuses, strict=True)), ended(theirs, EXPIRED))
    ids = [o.order_id for o in mine]
    for _ in range(2):  # live, then recovered from a snapshot
        assert [o.order_id for o in led(OrderHistory(user, limit=2))] == ids[:2:-1]
        assert [o.order_id for o in led(OrderHistory(user, 2, ids[3]))] == ids[2:0:-1]
        assert [o.order_id for o in led(OrderHistory(user, 10, ids[1]))] == ids[:1]
        assert led(OrderHistory(user, before=ids[0])) == []
        foreign = led(OrderHistory(user, before=theirs.order_id))
        assert foreign == led(OrderHistory(user, before=12345))
        assert isinstance(foreign, Rejected) and foreign.code is Code.INVALID_REQUEST
        assert [o.status for o in led(OrderHistory(user, limit=0))] == [CANCELLED]  # clamped
        assert led(OrderHistory(user, limit=10**9)) == [
            ended(o, s, 100 + o.order_id if s == FILLED else 0)
            for o, s in zip(mine[::-1], statuses[::-1], strict=True)]
        assert led(OrderHistory(other)) == [ended(theirs, EXPIRED)]
        assert led(History(user)) == []
        led.same_after_replay_and_snapshot()
        led.m = led.m.from_snapshot(SIGNUP, *led.m.snapshot())


# ----------------------------------------------------------------------------- answers
def test_order_and_cancel_answers_are_stored_and_resolved_by_kind() -> None:
    led, user = trader()
    order = pending(user, 1, 20 * USD)._replace(side=Side.SHORT, kind=OrderKind.STOP,
                                               tp_ticks=9000, sl_ticks=9900,
                                               expires_ts_us=NOW + 60_000_000)
    cancel = ended(order, CANCELLED)
    for answer, kind in ((order, "order"), (cancel, "ended_order"),
                         (ended(order, REJECTED), "ended_order")):
        data = encode_answer(answer)
        assert json.loads(data)[0] == kind
        assert decode_answer(data) == answer and type(decode_answer(data)) is type(answer)
    with pytest.raises(ValueError):
        decode_answer(json.dumps(["order", *json.loads(encode_answer(order))[1:-1]]).encode())
    # a placement's clientOrderId keeps the PendingOrder, a cancel's the EndedOrder
    place_key = IdemKey(user, "order", "p")
    assert led.place(user, 20 * USD, place_key) == pending(user, 1, 20 * USD)
    assert led(Remember(place_key, order)) is None
    assert led(Begin(place_key)) == IdemHit(order)
    cancel_key = IdemKey(user, "cancel", "c")
    assert led(Begin(cancel_key, 50)) is None
    led.deliver(cancel, answers=((cancel_key, cancel),))
    assert led(Begin(cancel_key)) == IdemHit(cancel)
    # lost answers are resolved by request id, only with a record of the key's kind
    lost_place, lost_cancel = IdemKey(user, "order", "lost"), IdemKey(user, "cancel", "lost")
    led.place(user, 5 * USD, lost_place)  # request id 2
    assert led(Begin(lost_cancel, 3)) is None  # the cancel of request id 3
    placed, cancelled = pending(user, 2, 5 * USD), ended(pending(user, 2, 5 * USD), CANCELLED)
    assert led(SettleRequests({2: cancelled, 3: placed})) == 0  # wrong kinds: not stored
    assert led(SettleRequests({2: placed, 3: cancelled})) == 2
    assert led(Begin(lost_place)) == IdemHit(placed)
    assert led(Begin(lost_cancel)) == IdemHit(cancelled)
    led.same_after_replay_and_snapshot()


# ----------------------------------------------------------------------------- batches
def test_a_batch_of_closes_and_ended_orders_applies_all_or_nothing() -> None:
    led, user = trader()
    assert led.lock(user, 50 * USD) is None  # a market open: position 300
    fill, cancel, expiry = led.place(user, 10 * USD), led.place(user, 20 * USD), \
        led.place(user, 30 * USD)
    good = (closed(user, 300, 50 * USD, -8 * USD), ended(fill, FILLED, 301),
            closed(user, 301, 10 * USD, 2 * USD), ended(cancel, CANCELLED))
    close_key, cancel_key = IdemKey(user, "close", "x"), IdemKey(user, "cancel", "y")
    assert led(Begin(close_key, 50)) is None and led(Begin(cancel_key, 51)) is None
    answers = ((close_key, good[0]), (cancel_key, good[3]))
    cancelled = ended(expiry, CANCELLED)
    bad_orders = {  # why each is refused
        "status 0 is not": cancelled._replace(status=OrderStatus.OPEN),
        "status 9 is not": cancelled._replace(status=9),
        "has 30000000 margin locked, cannot release 30000001":
            cancelled._replace(margin_micros=30 * USD + 1),
        "user 99 has no account": ended(pending(99, 9, USD), CANCELLED),
        "unknown side 7": cancelled._replace(side=7),
        "unknown order kind 5": cancelled._replace(kind=5),
        "margin must be >= 0": ended(expiry, FILLED, 9)._replace(margin_micros=-1),
        "order_id must be a u64": cancelled._replace(order_id=-1),
        "leverage must be a u16": cancelled._replace(leverage=1 << 16),
        "ended_ts_us must be an int64": cancelled._replace(ended_ts_us=1 << 63),
        "tp_ticks must be an int64": cancelled._replace(tp_ticks=True),
        "trigger_ticks must be an int64": cancelled._replace(trigger_ticks=9500.0),
        "must be text": cancelled._replace(reject_code=None),
    }
    before, records = led.m.fingerprint(), len(led.records)
    seq = led.seq
    for why, bad in bad_orders.items():
        led.seq = seq
        refused = led(ApplySettlements(SHARD, led.items(*good, bad), answers))
        assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST, why
        assert refused.message.startswith(f"settlement {seq + 5} of {SHARD}: "), why
        assert why in refused.message, refused.message
        assert led.m.fingerprint() == before and len(led.records) == records, why
    # cancels are counted within the batch: two releases of more than is left locked
    led.seq = seq
    both = led.items(ended(cancel, CANCELLED), ended(expiry, EXPIRED)._replace(
        margin_micros=110 * USD - 20 * USD + 1))
    assert isinstance(led(ApplySettlements(SHARD, both)), Rejected)
    assert led.m.fingerprint() == before
    # numpy ints are ints; the good run applies (the fill's margin is its position's close's)
    led.seq = seq
    led.deliver(*good[:3], good[3]._replace(margin_micros=np.int64(20 * USD)), answers=answers)
    # (the position the fill opened, closed in the same run, is noted opened after the fill)
    assert [type(e).__name__ for e in led.events()] == [
        "SettlementApplied", "OrderSettled", "AccountNoted", "SettlementApplied", "OrderSettled",
        "ClientOrderStoredAt", "ClientOrderStoredAt"]
    # locked 110: the close pays out 42, the fill's close 12, the cancel releases 20
    assert led.balances(user) == (SIGNUP - 110 * USD + 42 * USD + 12 * USD + 20 * USD, 30 * USD)
    assert led.counts(user) == (1, 1)
    assert led(Begin(close_key)) == IdemHit(good[0])
    assert led(Begin(cancel_key)) == IdemHit(good[3])
    # resends change nothing; closes and orders share one numbering
    assert led(ApplySettlements(SHARD, led.items())) == 4 == led(AppliedSeq(SHARD))
    assert led(ApplySettlements(SHARD, (SettlementItem(2, good[0]),))) == 4
    led.deliver(ended(expiry, EXPIRED))
    assert led(AppliedSeq(SHARD)) == 5 and led.balances(user)[1] == 0
    led.same_after_replay_and_snapshot()


# ----------------------------------------------------------------------------- audit, start
def test_the_audit_counts_what_unapplied_ended_orders_still_hold() -> None:
    led, user = trader()
    fill, cancel, still_open = led.place(user, 10 * USD), led.place(user, 20 * USD), \
        led.place(user, 40 * USD)
    for order in (fill, cancel, still_open):  # each placed at the shard: its lock ended
        led(Note(user, order.order_id, ORDER_PLACED, order, None))
    outbox = list(led.items(ended(fill, FILLED, 600), ended(cancel, CANCELLED)))
    shards = {user: 10 * USD + 40 * USD}  # the filled position and the open order
    assert led.audit(shards, {SHARD: outbox}) == []
    assert led.audit(shards) != []  # the cancel's margin is still locked here
    assert led.audit({user: 10 * USD + 20 * USD + 40 * USD}, {SHARD: outbox}) != []
    assert led(ApplySettlements(SHARD, tuple(outbox))) == 2
    assert led.audit(shards) == [] and led.audit(shards, {SHARD: outbox}) == []
    assert led.counts(user) == (2, 1)
    led.deliver(ended(still_open, EXPIRED))
    assert led.audit({user: 10 * USD}) == [] and led.counts(user) == (1, 0)
    led.same_after_replay_and_snapshot()


def test_the_audit_reports_an_outbox_that_skips_a_number() -> None:
    """An outbox whose fill is missing (it holds no margin) and holds the close of the
    position the fill opened: the margins agree, but the ledger waits for the fill's number
    and takes none of the closes after it."""
    led, user = trader()
    order = led.place(user, 10 * USD)
    fill, close = led.items(ended(order, FILLED, 600), closed(user, 600, 10 * USD, 2 * USD))
    assert led.audit({}, {SHARD: [fill, close]}) == []
    assert led(ApplySettlements(SHARD, (close,))) == 0
    problems = led.audit({}, {SHARD: [close]})
    assert [p.subject for p in problems] == [f"settlements:{SHARD}"]
    assert "settlement 1 of" in problems[0].text and "(from 2)" in problems[0].text


def test_the_start_recounts_orders_and_opens_from_the_shards_and_their_outboxes() -> None:
    led, user = trader()
    other = led.account().user
    fill, cancel, still_open = led.place(user, 10 * USD), led.place(user, 20 * USD), \
        led.place(user, 40 * USD)
    led.place(user, 5 * USD)  # the placement never reached a shard: orphaned
    assert led.lock(user, 3 * USD) is None  # an open never sent: orphaned
    led.place(other, 6 * USD)  # the other's order is open on the shard
    assert led.counts(user) == (5, 4) and led.counts(other) == (1, 1)
    outbox = {SHARD: list(led.items(ended(fill, FILLED, 600), ended(cancel, CANCELLED)))}
    margins = {user: 10 * USD + 40 * USD, other: 6 * USD}
    # the shards: user has a position (the fill's) and an open order, other an open order
    positions_and_orders = {user: 2, other: 1}
    open_orders = {user: 1, other: 1}
    for bad in ({user: -1}, {user: 1.5}):
        before = led.m.fingerprint()
        answer = led(ReconcileAtStart(margins, outbox, None, positions_and_orders, bad))
        assert isinstance(answer, Rejected) and answer.code is Code.INVALID_REQUEST
        assert led.m.fingerprint() == before
    released = led(ReconcileAtStart(margins, outbox, None, positions_and_orders, open_orders))
    assert released == {user: 8 * USD}
    recounts = [e for e in led.events() if isinstance(e, OrderCountSet)]
    assert recounts == [OrderCountSet(user, 3)]  # 1 open + 2 unapplied ends; other unchanged
    # the open count: 2 + the cancel (a fill adds nothing: its slot is the position's)
    assert led.counts(user) == (3, 3) and led.counts(other) == (1, 1)
    assert led(AbandonLock(4)) is None  # every lock ended
    assert led(ApplySettlements(SHARD, tuple(outbox[SHARD]))) == 2
    assert led.counts(user) == (2, 1)  # the position and the open order
    assert led.balances(user) == (SIGNUP - 50 * USD, 50 * USD)
    assert led.audit(margins) == []
    led.deliver(ended(still_open, CANCELLED))
    assert led.counts(user) == (1, 0)
    led.same_after_replay_and_snapshot()


def test_the_start_drops_counts_of_a_user_left_without_margin() -> None:
    led, user = trader()
    led.place(user)
    led.place(user)
    assert led(ReconcileAtStart({}, {}, None, None, None)) == {user: 2 * USD}
    assert led.counts(user) == (0, 0)  # kept counts, but nothing holds margin
    led.place(user)
    assert led(ReconcileAtStart({user: USD}, {}, None, {user: 1}, {user: 1})) == {}
    assert led.counts(user) == (1, 1)
    led.same_after_replay_and_snapshot()


# ----------------------------------------------------------------------------- replay, state
def test_a_run_replays_and_restores_to_an_equal_state() -> None:
    led, user = trader(max_open_positions=5, max_open_orders=3)
    other = led.account().user
    orders = [led.place(user, (i + 1) * USD, IdemKey(user, "order", f"o{i}")) for i in range(3)]
    assert led.lock(user, USD, None, order=True).code is Code.TOO_MANY_ORDERS
    for i, o in enumerate(orders[:2]):
        led(Remember(IdemKey(user, "order", f"o{i}"), o))
    assert led.lock(user, 4 * USD) is None  # a market open
    led.place(other, 9 * USD)
    led.deliver(ended(orders[0], FILLED, 70), ended(orders[1], EXPIRED))
    assert led(AbandonLock(orders[2].order_id)) == (orders[2].order_id, user, 3 * USD)
    # the placements answered keep their locks (their answers back them)
    assert led(AbandonLock(orders[1].order_id)) is None
    led.deliver(closed(user, 70, USD, -USD, CloseReason.LIQUIDATION))
    assert led.counts(user) == (1, 0) and led.counts(other) == (1, 1)
    assert led.balances(user) == (SIGNUP - 5 * USD, 4 * USD)
    led.same_after_replay_and_snapshot()
    # a journal replayed from a snapshot taken halfway gives the same state too
    half = Orders(5, 3)
    half.account()
    half.place(1, USD)
    arrays, meta = half.m.snapshot()
    start = len(half.records)
    half.deliver(ended(pending(1, 1), CANCELLED))
    base = LedgerMachine.from_snapshot(SIGNUP, 5, 3, arrays, meta)
    assert half.replayed(base, start).fingerprint() == half.m.fingerprint()


def test_restore_takes_both_caps_and_older_snapshots_read_no_orders() -> None:
    with pytest.raises(ValueError):
        LedgerMachine(SIGNUP, 5, 0)
    led, user = trader(max_open_positions=4, max_open_orders=2)
    key = IdemKey(user, "order", "k")
    led.place(user, 3 * USD, key)
    assert led.lock(user, USD) is None
    arrays, meta = led.m.snapshot()

    class Loaded:
        def __init__(self, arrays: Any, meta: Any) -> None:
            self.arrays, self.meta = arrays, meta

    restored = LedgerMachine.restore(SIGNUP, Loaded(arrays, meta), 4, 2)
    assert restored.fingerprint() == led.m.fingerprint() and restored.max_open_orders == 2
    fresh = LedgerMachine.restore(SIGNUP, None, 4, 2)
    assert (fresh.max_open_positions, fresh.max_open_orders) == (4, 2)
    assert LedgerMachine.from_snapshot(SIGNUP, arrays, meta).max_open_orders == ORDERS
    # an older snapshot: locks without the order flag (not an order's), no order counts or
    # order history
    old_meta = older_answers_layout(arrays, meta)[1]  # (its answers in the meta too)
    old_meta["recent_locks"] = [row[:4] for row in old_meta["recent_locks"]]
    for name in ("order_counts", "order_history_assets", "order_history_reject_codes"):
        del old_meta[name]
    old = LedgerMachine.from_snapshot(SIGNUP, 4, 2, {"history": arrays["history"]}, old_meta)
    assert old.check() == [] and old.fingerprint()["recent_locks"] == [
        (1, user, 3 * USD, tuple(key), False), (2, user, USD, None, False)]
    assert old.decide(OrderCount(user), NOW)[0] == 0


def test_check_reports_an_order_count_without_margin() -> None:
    led, user = trader()
    led.m._order_counts[user] = 2
    assert led.m.check() == [f"user {user} counts 2 open orders without margin"]
