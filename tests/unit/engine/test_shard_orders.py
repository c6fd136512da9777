"""ShardMachine's pending orders (SPEC "Pending orders"): placement, the fill conditions at the
exact boundary tick and one tick before it, a stop filled through a gap, a fill refused as
WOULD_LIQUIDATE, a fill at a maintenance margin rate, expiry, cancel, the decide/apply contract
(replay and snapshot equal the live state), and runs of places and ticks at the edges checked
against a model of the SPEC's words on the slow references."""

from __future__ import annotations

import random
from typing import Any

import pytest
from engine import reference
from engine import rows
from engine import shard_machine
from engine.events import OrderEnded
from engine.events import OrderPlaced
from engine.events import PositionAmended
from engine.events import PositionOpened
from engine.market import Tick
from engine.messages import ClosedPosition
from engine.messages import EndedOrder
from engine.messages import OpenPosition
from engine.messages import PendingOrder
from engine.messages import SettlementItem
from engine.order_book import OrderKind
from engine.order_book import OrderOutcome
from engine.order_book import OrderStatus
from engine.order_book import OrderTerms
from engine.order_reference import outcome
from engine.orders import CloseReason
from engine.orders import OpenPlan
from engine.orders import Side
from engine.orders import plan_open
from engine.results import Code
from engine.results import Forgotten
from engine.results import Rejected
from engine.shard_machine import ApplyTick
from engine.shard_machine import AuditView
from engine.shard_machine import BooksView
from engine.shard_machine import Cancel
from engine.shard_machine import OpenMargins
from engine.shard_machine import OrdersOf
from engine.shard_machine import Outbox
from engine.shard_machine import Place
from engine.shard_machine import PositionsOf
from engine.shard_machine import Resolve
from engine.shard_machine import ShardMachine
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from tests.unit.engine.test_shard_machine import NOW
from tests.unit.engine.test_shard_machine import SOL
from tests.unit.engine.test_shard_machine import USD
from tests.unit.engine.test_shard_machine import Host
from tests.unit.engine.test_shard_machine import close
from tests.unit.engine.test_shard_machine import raw_tick
from tests.unit.engine.test_shard_machine import replay
from tests.unit.engine.test_shard_machine import req
from tests.unit.engine.test_shard_machine import restored
from tests.unit.engine.test_shard_machine import run
from tests.unit.engine.test_shard_machine import shard

LIMIT, STOP = OrderKind.LIMIT, OrderKind.STOP
LONG, SHORT = Side.LONG, Side.SHORT


def terms(side: Side, kind: OrderKind, trigger: int, margin_usd: int = 100, leverage: int = 10,
          tp: int = 0, sl: int = 0, expires: int = 0) -> OrderTerms:
    return OrderTerms(side, kind, trigger, margin_usd * USD, leverage, tp, sl, expires)


def place(m: ShardMachine, t: OrderTerms, owner: int = 1, rid: int = 0) -> PendingOrder:
    order = run(m, Place(owner, t, rid))
    assert isinstance(order, PendingOrder), order
    return order


def ended(m: ShardMachine) -> list[EndedOrder]:
    return [i.closed for i in run(m, Outbox()).items if isinstance(i.closed, EndedOrder)]


# (side, kind, trigger, the boundary tick's (bid, ask), one tick before it)
BOUNDARIES = [
    (LONG, LIMIT, 10000, (9999, 10000), (10000, 10001)),  # ask <= trigger
    (SHORT, LIMIT, 10000, (10000, 10001), (9999, 10000)),  # bid >= trigger
    (LONG, STOP, 10000, (9999, 10000), (9998, 9999)),  # ask >= trigger
    (SHORT, STOP, 10000, (10000, 10001), (10001, 10002)),  # bid <= trigger
]


@pytest.mark.parametrize(("side", "kind", "trigger", "hit", "before"), BOUNDARIES)
def test_fills_on_the_boundary_tick_not_one_tick_before(
        side: Side, kind: OrderKind, trigger: int, hit: tuple[int, int],
        before: tuple[int, int]) -> None:
    m = shard()
    run(m, raw_tick(9000, 9001))
    order = place(m, terms(side, kind, trigger))
    assert run(m, raw_tick(*before)) == 0
    assert len(m.orders) == 1 and len(m.book) == 0
    assert run(m, raw_tick(*hit)) == 0  # no position closed; the order filled
    assert len(m.orders) == 0 and len(m.book) == 1
    [fill] = ended(m)
    assert fill.order_id == order.order_id and fill.status == OrderStatus.FILLED
    [[position]] = run(m, PositionsOf((1,)))
    assert fill.position_id == position.position_id
    # filled at the tick's opening-side price, exactly as a market open there
    bid, ask = hit
    assert position.entry_ticks == (ask if side is LONG else bid)
    plan = plan_open(SOL, side, 100 * USD, 10, bid, ask, None, None)
    assert not isinstance(plan, Rejected)
    assert (position.qty_steps, position.liq_ticks, position.margin_micros) == \
        (plan.qty_steps, plan.liq_ticks, plan.margin_micros)
    assert m.check() == []


def test_a_stop_fills_through_a_gap_at_the_worse_price() -> None:
    m = shard()
    run(m, raw_tick(9000, 9001))
    place(m, terms(LONG, STOP, 10000))
    place(m, terms(SHORT, STOP, 8000), owner=2)
    run(m, raw_tick(10499, 10500))  # the ask gapped from 90.01 past 100.00
    [[long_pos]] = run(m, PositionsOf((1,)))
    assert long_pos.entry_ticks == 10500
    run(m, raw_tick(7500, 7501))  # the bid gapped from 104.99 past 80.00 (and liquidates 1)
    [[short_pos]] = run(m, PositionsOf((2,)))
    assert short_pos.entry_ticks == 7500


def test_a_limit_never_fills_worse_than_its_trigger() -> None:
    m = shard()
    run(m, raw_tick(10500, 10501))
    place(m, terms(LONG, LIMIT, 10000))
    run(m, raw_tick(9499, 9500))  # gapped down through the trigger: fills at the better ask
    [[position]] = run(m, PositionsOf((1,)))
    assert position.entry_ticks == 9500


def test_a_fill_that_would_liquidate_is_rejected_and_opens_nothing() -> None:
    m = shard()
    run(m, raw_tick(10000, 10001))
    order = place(m, terms(LONG, LIMIT, 10000, leverage=100))
    # a 2% spread at the fill: at 100x the bid is already below the liquidation price
    assert run(m, raw_tick(9800, 10000)) == 0
    [rejected] = ended(m)
    assert rejected.order_id == order.order_id and rejected.status == OrderStatus.REJECTED
    assert rejected.reject_code == Code.WOULD_LIQUIDATE.value and rejected.position_id == 0
    assert len(m.book) == 0 and len(m.orders) == 0
    assert run(m, OpenMargins()) == {}  # the ledger releases its margin when it applies this


def test_an_invalid_tp_at_the_fill_price_rejects_the_order() -> None:
    m = shard()
    run(m, raw_tick(10500, 10501))
    place(m, terms(LONG, LIMIT, 10000, tp=9900))  # a TP below the fill price
    run(m, raw_tick(9999, 10000))
    [rejected] = ended(m)
    assert rejected.status == OrderStatus.REJECTED
    assert rejected.reject_code == Code.INVALID_TRIGGER.value


def test_a_fill_opens_at_the_shards_maintenance_margin_rate_like_a_market_open() -> None:
    """At a 1% rate a 50x long of 100 USD at 100.00 holds 50 SOL with a maintenance margin of
    50 USD: liquidated at 99.00 (98.00 at rate 0). A fill on a bid of 99.00 would be liquidated
    at once; one on 99.01 opens, exactly as a market open on that tick; at 100x the margin
    equals the maintenance margin, which no price can open."""
    m = shard(ppm=10_000)
    run(m, raw_tick(10500, 10501))
    early = place(m, terms(LONG, LIMIT, 10000, leverage=50))
    # at rate 0 this fill would open: the rate is what refuses it
    assert isinstance(plan_open(SOL, LONG, 100 * USD, 50, 9900, 10000, None, None), OpenPlan)
    run(m, raw_tick(9900, 10000))
    [rejected] = ended(m)
    assert (rejected.order_id, rejected.status, rejected.reject_code) == \
        (early.order_id, OrderStatus.REJECTED, Code.WOULD_LIQUIDATE.value)
    assert rejected.margin_micros == 100 * USD and len(m.book) == 0
    fills = place(m, terms(LONG, LIMIT, 10000, leverage=50))
    never = place(m, terms(LONG, LIMIT, 10000, leverage=100), owner=2)
    run(m, raw_tick(9901, 10000, ts_us=NOW + 1))
    ends = {o.order_id: (o.status, o.reject_code) for o in ended(m)[1:]}
    assert ends == {fills.order_id: (OrderStatus.FILLED, ""),
                    never.order_id: (OrderStatus.REJECTED, Code.WOULD_LIQUIDATE.value)}
    [[position]] = run(m, PositionsOf((1,)))
    assert (position.entry_ticks, position.qty_steps, position.liq_ticks) == (10000, 5000, 9900)
    market = run(m, req(9, owner=1, leverage=50))  # on the fill's tick
    assert isinstance(market, OpenPosition)
    assert market._replace(position_id=0) == position._replace(position_id=0)


def test_expiry_wins_over_a_fill_after_its_time_and_not_at_it() -> None:
    m = shard()
    run(m, raw_tick(10500, 10501))
    expires = NOW + 1_000_000
    place(m, terms(LONG, LIMIT, 10000, expires=expires))
    place(m, terms(LONG, LIMIT, 10000, expires=expires), owner=2)
    run(m, raw_tick(10400, 10401, ts_us=expires))  # at its expiry: still open, no fill
    assert len(m.orders) == 2
    run(m, raw_tick(9999, 10000, ts_us=expires + 1))  # fillable, but later than its expiry
    assert [o.status for o in ended(m)] == [OrderStatus.EXPIRED] * 2
    assert len(m.book) == 0 and len(m.orders) == 0


def test_an_expiry_in_the_past_or_bad_terms_are_refused() -> None:
    m = shard()
    refused = run(m, Place(1, terms(LONG, LIMIT, 10000, expires=NOW), 0))
    assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST
    refused = run(m, Place(1, terms(LONG, LIMIT, 0), 0))
    assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST
    refused = run(m, Place(1, terms(LONG, LIMIT, 10000, leverage=SOL.max_leverage + 1), 0))
    assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST
    # a stop-loss no fill price can accept: a limit long fills at or below its trigger
    refused = run(m, Place(1, terms(LONG, LIMIT, 10000, sl=10000), 0))
    assert isinstance(refused, Rejected) and refused.code is Code.INVALID_TRIGGER
    # a position too large at every fill price (it was placed, its margin held until a fill
    # tick rejected it)
    refused = run(m, Place(1, terms(LONG, LIMIT, 50, margin_usd=500_000, leverage=100), 0))
    assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST
    assert "too large" in refused.message
    assert len(m.orders) == 0 and run(m, Outbox()).items == []


def test_cancel_then_cancel_again_and_cancel_after_fill() -> None:
    m = shard()
    run(m, raw_tick(10500, 10501))
    a = place(m, terms(LONG, LIMIT, 10000), rid=1)
    b = place(m, terms(LONG, LIMIT, 10400), rid=2)
    assert run(m, OrdersOf((1, 2))) == [[a, b], []]
    assert run(m, OpenMargins()) == {1: 200 * USD}
    assert run(m, AuditView()) == BooksView({1: 200 * USD}, [], {}, {1: 2})
    assert isinstance(run(m, Cancel(2, a.order_id, 0)), Rejected)  # not the caller's
    item = run(m, Cancel(1, a.order_id, 10))
    assert isinstance(item, SettlementItem) and isinstance(item.closed, EndedOrder)
    assert item.closed.status == OrderStatus.CANCELLED and item.closed.margin_micros == 100 * USD
    assert run(m, Cancel(1, a.order_id, 10)) == item  # a resend: the first answer
    again = run(m, Cancel(1, a.order_id, 11))
    assert isinstance(again, Rejected) and again.code is Code.ORDER_NOT_OPEN
    run(m, raw_tick(10399, 10400))  # fills b
    after_fill = run(m, Cancel(1, b.order_id, 12))
    assert isinstance(after_fill, Rejected) and after_fill.code is Code.ORDER_NOT_OPEN
    other = run(m, Cancel(2, b.order_id, 13))  # another user learns nothing
    assert isinstance(other, Rejected) and other.code is Code.NOT_FOUND
    unknown = run(m, Cancel(1, 12345, 14))
    assert isinstance(unknown, Rejected) and unknown.code is Code.NOT_FOUND
    assert [i.seq for i in run(m, Outbox()).items] == [1, 2]
    view = run(m, AuditView())
    assert view.margins == {1: 100 * USD} and len(view.outbox) == 2
    assert (view.positions, view.orders) == ({1: 1}, {})  # b's position


def test_a_placement_is_remembered_by_request_id_and_resolvable() -> None:
    m = shard()
    order = place(m, terms(SHORT, STOP, 9000), rid=7)  # no price needed to place
    assert run(m, Place(1, terms(SHORT, STOP, 9000), 7)) == order
    assert run(m, Resolve(7)) == order
    assert len(m.orders) == 1


def test_closes_and_fills_of_one_tick_share_the_numbering_and_reuse_freed_rows() -> None:
    m = shard()
    run(m, raw_tick(10000, 10001))
    p1 = run(m, req(1, leverage=50))
    p2 = run(m, req(2, leverage=50))
    assert isinstance(p1, OpenPosition) and isinstance(p2, OpenPosition)
    place(m, terms(LONG, LIMIT, 9500))
    place(m, terms(SHORT, STOP, 9600))
    place(m, terms(LONG, STOP, 20000))  # stays open
    # one tick liquidates both positions and fills two orders into their freed rows
    assert run(m, raw_tick(9400, 9401)) == 2
    items = run(m, Outbox()).items
    assert [i.seq for i in items] == [1, 2, 3, 4]
    opened = [i.closed.position_id for i in items if isinstance(i.closed, EndedOrder)]
    assert sorted(opened) == sorted(p.position_id for p in run(m, PositionsOf((1,)))[0])
    assert {pid & 0xFFFFFF00 for pid in opened} != {0}
    assert len(m.orders) == 1 and len(m.book) == 2 and m.check() == []
    # the closes of this tick did not sweep the positions its fills opened
    assert all(isinstance(i.closed, EndedOrder) or i.closed.position_id in
               (p1.position_id, p2.position_id) for i in items)


def test_a_tick_sent_again_fills_nothing_placed_after_it() -> None:
    m = shard()
    first = ApplyTick(Tick("SOL", 9760, 9761, NOW, 7, "test"))
    run(m, first)
    order = place(m, terms(SHORT, LIMIT, 9755))  # bid 97.60 >= 97.55 already
    assert run(m, first, NOW + 5_000) == 0  # the same tick again (its answer was lost)
    assert len(m.orders) == 1 and len(m.book) == 0
    run(m, ApplyTick(Tick("SOL", 9760, 9761, NOW + 1, 8, "test")), NOW + 6_000)
    [filled] = ended(m)
    assert filled.order_id == order.order_id and filled.status == OrderStatus.FILLED
    assert filled.ended_ts_us == NOW + 6_000  # when the engine filled it, not the tick's time


def test_a_tick_sent_again_does_not_sweep_the_position_its_first_delivery_filled() -> None:
    """A position a fill opens is first swept on the next tick; the fill's tick sent again
    (its answer was lost) is not a next tick. It closed the new position by its stop-loss at
    the fill tick's own bid, where the next real tick might have left it open."""
    m = shard()
    run(m, raw_tick(10000, 10010, ts_us=NOW))
    place(m, terms(LONG, STOP, 10050, sl=10045))
    fill = ApplyTick(Tick("SOL", 10040, 10060, NOW + 1_000, 2, "test"))
    assert run(m, fill, NOW + 1_000) == 0
    [filled] = ended(m)
    assert filled.status == OrderStatus.FILLED and len(m.book) == 1
    assert run(m, fill, NOW + 2_000) == 0  # the same tick again: nothing closes
    assert len(m.book) == 1 and m.check() == []
    assert [i.closed.position_id for i in run(m, Outbox()).items] == [filled.position_id]
    # the next tick sweeps it: at its stop-loss
    assert run(m, raw_tick(10044, 10064, ts_us=NOW + 2_000), NOW + 3_000) == 1


def test_what_a_tick_ends_is_stamped_with_the_engines_time_not_the_ticks() -> None:
    # a tick is a little old when it arrives: stamped with its time, a position it closes
    # could end before it opened, and an order it fills before it was placed
    m = shard()
    run(m, raw_tick(10000, 10001, ts_us=NOW))
    pos = run(m, req(1, tp="101.00"), NOW + 300)
    order = run(m, Place(1, terms(SHORT, LIMIT, 10150), 2), NOW + 300)
    assert pos.opened_ts_us == NOW + 300 and order.placed_ts_us == NOW + 300
    # the next tick, stamped 100 us after the first, arrives 500 us after it
    assert run(m, raw_tick(10150, 10151, ts_us=NOW + 100), NOW + 500) == 1
    closes = run(m, Outbox()).items
    [closed] = [i.closed for i in closes if not isinstance(i.closed, EndedOrder)]
    [filled] = [i.closed for i in closes if isinstance(i.closed, EndedOrder)]
    assert closed.position_id == pos.position_id and closed.closed_ts_us == NOW + 500
    assert filled.order_id == order.order_id and filled.ended_ts_us == NOW + 500
    [opened] = [p for p in run(m, PositionsOf((1,)))[0] if p.position_id == filled.position_id]
    assert opened.opened_ts_us == NOW + 500


def test_a_position_a_fill_opened_is_swept_by_the_next_tick() -> None:
    m = shard()
    run(m, raw_tick(10500, 10501))
    place(m, terms(LONG, LIMIT, 10000, leverage=20, sl=9800))
    run(m, raw_tick(9999, 10000))
    [[position]] = run(m, PositionsOf((1,)))
    assert position.sl_ticks == 9800
    assert run(m, raw_tick(9800, 9801)) == 1  # its stop-loss, on the next tick
    assert len(m.book) == 0


# ----------------------------------------------------------------------------- replay
order_command = st.one_of(
    st.builds(lambda side, kind, trig, lev, exp: ("place", terms(side, kind, trig, 10, lev,
                                                                 expires=exp)),
              st.sampled_from([LONG, SHORT]), st.sampled_from([LIMIT, STOP]),
              st.integers(9000, 11000), st.integers(1, 50),
              st.sampled_from([0, NOW + 3_000_000, NOW + 9_000_000])),
    st.builds(lambda bid, spread: ("tick", bid, spread), st.integers(8500, 11500),
              st.integers(1, 300)),
    st.builds(lambda n: ("cancel", n), st.integers(0, 20)),
    st.builds(lambda n: ("open", n), st.integers(1, 100)),
    st.builds(lambda n: ("close", n), st.integers(0, 20)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(order_command, min_size=1, max_size=40), st.integers(0, 40))
def test_any_run_of_orders_replays_and_restores_into_an_equal_state(
        commands: list[tuple[Any, ...]], cut: int) -> None:
    host = Host()
    now = NOW
    host.one(raw_tick(10000, 10001), now)
    placed: list[int] = []
    snapshots: list[tuple[int, ShardMachine]] = []
    for rid, command in enumerate(commands, start=1):
        now += 500_000
        if command[0] == "place":
            answer = host.one(Place(1 + rid % 2, command[1], rid), now)
            if isinstance(answer, PendingOrder):
                placed.append(answer.order_id)
        elif command[0] == "tick":
            host.one(raw_tick(command[1], command[1] + command[2], ts_us=now), now)
        elif command[0] == "cancel" and placed:
            host.one(Cancel(1 + command[1] % 2, placed[command[1] % len(placed)], rid), now)
        elif command[0] == "open":
            host.one(req(rid, owner=1, leverage=command[1]), now)
        elif command[0] == "close":
            mine = host.machine.book.ids_of_owner(1).tolist()
            if mine:
                host.one(close(rid, 1, mine[command[1] % len(mine)]), now)
        assert host.machine.check() == []
        if len(snapshots) < 1 and len(host.records) >= cut:
            snapshots.append((len(host.records), restored(host.machine)))
    live = host.machine.fingerprint()
    assert replay(host.records).fingerprint() == live
    assert restored(host.machine).fingerprint() == live
    for at, middle in snapshots:
        assert replay(host.records[at:], middle).fingerprint() == live
    # every order the shard ever held is open, or ended exactly once in the outbox
    ends = [i.closed.order_id for i in run(host.machine, Outbox()).items
            if isinstance(i.closed, EndedOrder)]
    assert len(ends) == len(set(ends))
    assert sorted([*ends, *host.machine.orders.ids().tolist()]) == sorted(placed)


def test_decide_changes_nothing_and_the_events_name_the_ids_the_books_issue() -> None:
    m = shard()
    run(m, raw_tick(10500, 10501))
    place(m, terms(LONG, LIMIT, 10000))
    before = m.fingerprint()
    answer, events = m.decide(raw_tick(9999, 10000), NOW)
    assert m.fingerprint() == before and answer == 0
    ended_event, opened = events[1], events[2]
    assert isinstance(ended_event, OrderEnded) and isinstance(opened, PositionOpened)
    assert ended_event.position_id == opened.position_id == m.book.next_position_id()
    answer, events = m.decide(Place(3, terms(SHORT, STOP, 9000), 5), NOW)
    assert isinstance(events[0], OrderPlaced) and events[0].order_id == answer.order_id
    assert m.fingerprint() == before
    assert isinstance(run(m, close(1, 1, 999)), Rejected)


def test_the_ticks_of_one_call_are_swept_in_order_each_at_its_own_price() -> None:
    """The feed sends a shard every tick it has not seen yet in one call (feed.conflation): a
    middle tick that crosses a trigger fills the order at its own price, and the position it
    opens is swept by the tick after it, as if each tick had come alone."""
    host = Host()
    host.one(raw_tick(10340, 10342))
    order = host.one(Place(1, terms(LONG, LIMIT, 10100, tp=10300), 0))
    assert isinstance(order, PendingOrder)
    answers = host.call([raw_tick(10340, 10342, NOW + 1), raw_tick(10093, 10095, NOW + 2),
                         raw_tick(10340, 10342, NOW + 3)])
    assert answers == [0, 0, 1]  # the third tick closes what the second opened
    items = run(host.machine, Outbox()).items
    [fill] = [i.closed for i in items if isinstance(i.closed, EndedOrder)]
    [closed] = [i.closed for i in items if not isinstance(i.closed, EndedOrder)]
    assert fill.order_id == order.order_id and fill.status == OrderStatus.FILLED
    assert fill.position_id == closed.position_id
    assert (closed.entry_ticks, closed.exit_ticks, closed.reason) == \
        (10095, 10340, CloseReason.TAKE_PROFIT)
    assert replay(host.records).fingerprint() == host.machine.fingerprint()


def test_a_restored_shard_answers_resends_and_forgets_as_the_original_did(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The answers a snapshot held are built one by one when asked for; a restored machine
    still gives each resend its first answer, forgets the oldest first, and writes them all
    to its own snapshot."""
    monkeypatch.setattr(shard_machine, "REMEMBERED", 6)
    original = shard()
    run(original, raw_tick(10_000))
    first = run(original, req(1, owner=1))
    assert isinstance(first, OpenPosition)
    sent: dict[int, Any] = {
        2: req(2, owner=2),
        3: close(3, 1, first.position_id),
        4: Place(1, terms(LONG, LIMIT, 9_000), 4),
    }
    answers = {rid: run(original, command) for rid, command in sent.items()}
    order = answers[4]
    assert isinstance(order, PendingOrder)
    sent[5] = Cancel(1, order.order_id, 5)
    answers[5] = run(original, sent[5])
    assert run(original, Resolve(6)) is None  # fenced: remembered as such
    sent[7] = req(7, owner=3)
    answers[7] = run(original, sent[7])  # the 7th answer: request 1's is forgotten
    assert isinstance(answers[3], SettlementItem) and isinstance(answers[5], SettlementItem)

    again = restored(original)
    for rid, command in sent.items():
        assert run(again, command) == answers[rid]
    assert run(again, Resolve(6)) is None
    # forgotten by both: not known to be absent, so neither fences it
    assert run(again, Resolve(1)) == Forgotten(1) == run(original, Resolve(1))
    assert run(again, req(1, owner=1)) == Forgotten(1)  # nor runs it again
    assert again.fingerprint() == original.fingerprint()

    later = restored(original)  # nothing asked of it yet
    for machine in (original, later):
        for rid in (8, 9, 10):
            assert isinstance(run(machine, req(rid, owner=4)), OpenPosition)
    assert later.fingerprint() == original.fingerprint()
    # an event answering a remembered request again (no decide makes one: a journal could)
    # changes its answer where it stands
    held = answers[7]
    assert isinstance(held, OpenPosition)
    record = original.book.get(held.position_id)
    assert record is not None
    again_7 = PositionAmended(held.position_id, record.qty_steps, record.margin_micros,
                              record.liq_ticks, 0, 0, 7)
    for machine in (original, later):
        machine.apply(again_7)
    assert later.fingerprint() == original.fingerprint()
    answers[7] = run(original, sent[7])
    # remembered now: 5, 6 (fenced), 7, 8, 9, 10; request 11 pushes 5's answer out
    assert run(later, sent[7]) == answers[7]
    assert isinstance(run(later, req(11, owner=4)), OpenPosition)
    assert run(later, Resolve(5)) == Forgotten(5)  # it ran: never reported absent
    assert run(later, sent[5]) == Forgotten(5)  # nor is a resend run again
    assert restored(later).fingerprint() == later.fingerprint() and later.check() == []


def test_fills_the_book_has_no_row_for_are_rejected_and_the_tick_still_liquidates(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rows, "MAX_ROWS", 4)
    m = shard()
    run(m, raw_tick(10000, 10001))
    doomed = run(m, req(1, leverage=10))  # liquidated at 90.00
    for rid in (2, 3, 4):  # the book's other rows: liquidated near 50
        assert isinstance(run(m, req(rid, leverage=2)), OpenPosition)
    first = place(m, terms(LONG, LIMIT, 9500, leverage=2))
    second = place(m, terms(LONG, LIMIT, 9500, leverage=2))
    # the tick liquidates one position and fills both orders: one row frees, two are wanted
    assert run(m, raw_tick(8999, 9000)) == 1
    closes = [i.closed for i in run(m, Outbox()).items if isinstance(i.closed, ClosedPosition)]
    assert [(c.position_id, c.reason) for c in closes] == \
        [(doomed.position_id, CloseReason.LIQUIDATION)]
    filled, rejected = ended(m)
    assert (filled.order_id, filled.status) == (first.order_id, OrderStatus.FILLED)
    assert (rejected.order_id, rejected.status, rejected.position_id) == \
        (second.order_id, OrderStatus.REJECTED, 0)
    assert rejected.reject_code == Code.INVALID_REQUEST.value
    assert len(m.book) == 4 and len(m.orders) == 0 and m.check() == []


# ----------------------------------------------------------------------------- reference
class SpecModel:
    """SPEC "Pending orders" in its own words, on the slow references: a tick newer (by
    ``(ts_us, seq)``) than the last one first closes the positions it crosses
    (engine.reference.ReferenceBook), then ends each order placed before it
    (engine.order_reference.outcome): expired, or opened at the tick's price exactly like a
    market open (engine.reference.plan_open, Fractions), else rejected with the reason."""

    def __init__(self, ppm: int) -> None:
        self.ppm = ppm
        self.positions = reference.ReferenceBook(SOL)
        self.orders: dict[int, PendingOrder] = {}
        self.last: Tick | None = None

    def tick(self, tick: Tick) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """The closes (sorted) and order ends (ids ascending) ``tick`` makes."""
        if self.last is not None and (tick.ts_us, tick.seq) <= (self.last.ts_us, self.last.seq):
            return [], []
        self.last = tick
        bid, ask = tick.bid_ticks, tick.ask_ticks
        closes = []
        for position_id, reason in self.positions.sweep(bid, ask):
            p = self.positions.close(position_id)
            assert p is not None
            closes.append((p.side, p.entry_ticks, p.qty_steps, int(reason),
                           bid if p.side == LONG else ask))
        ends = []
        for order_id in sorted(self.orders):
            order = self.orders[order_id]
            what = outcome(order, bid, ask, tick.ts_us)  # type: ignore[arg-type]
            if what is None:
                continue
            del self.orders[order_id]
            if what == OrderOutcome.EXPIRED:
                ends.append((order_id, OrderStatus.EXPIRED, "", order.margin_micros))
                continue
            plan = reference.plan_open(SOL, order.side, order.margin_micros, order.leverage, bid,
                                       ask, order.tp_ticks or None, order.sl_ticks or None,
                                       self.ppm)
            if isinstance(plan, Rejected):
                ends.append((order_id, OrderStatus.REJECTED, plan.code.value,
                             order.margin_micros))
            else:
                ends.append((order_id, OrderStatus.FILLED, "", order.margin_micros))
                self.positions.open(order.owner, plan, 0)
        return sorted(closes), ends

    def open_positions(self) -> list[tuple[int, ...]]:
        return sorted((p.side, p.entry_ticks, p.qty_steps, p.margin_micros, p.leverage,
                       p.liq_ticks, p.tp_ticks, p.sl_ticks)
                      for p in self.positions.positions.values())


def edge_tick(rnd: random.Random, model: SpecModel, ts_us: int, seq: int) -> Tick:
    """A tick whose bid or ask lies on (or one step off) an order's trigger or a position's
    TP, SL or liquidation price, at (or a microsecond off) an order's expiry; or anywhere. A
    wide spread makes a high-leverage fill liquidatable at once."""
    levels = [o.trigger_ticks for o in model.orders.values()]
    levels += [level for p in model.positions.positions.values()
               for level in (p.liq_ticks, p.tp_ticks, p.sl_ticks) if level]
    spread = rnd.randint(0, 3) if rnd.random() < 0.5 else rnd.randint(0, 150)  # to 1.5%
    if levels and rnd.random() < 0.8:
        level = rnd.choice(levels) + rnd.randint(-1, 1)
        bid = level - spread if rnd.random() < 0.5 else level
    else:
        bid = 10_000 + rnd.randint(-300, 300)
    expiries = [o.expires_ts_us for o in model.orders.values() if o.expires_ts_us]
    if expiries and rnd.random() < 0.3:
        ts_us = rnd.choice(expiries) + rnd.randint(-1, 1)
    return Tick("SOL", max(1, bid), max(1, bid) + spread, ts_us, seq, "test")


@pytest.mark.parametrize("seed", range(16))
def test_runs_of_places_and_edge_ticks_end_orders_as_the_spec_model_does(seed: int) -> None:
    """After every place or tick the shard's closes, order ends (status, reason, the margin
    released) and open positions (quantity, liquidation price, TP/SL) are the model's. Ticks
    land on the edges: a level or one step off it, an expiry or one microsecond off it, the
    last tick again, an older one or one of the same time; TP/SL near the trigger, so fills
    are rejected as INVALID_TRIGGER and WOULD_LIQUIDATE too; at rates 0 and 0.5%."""
    rnd = random.Random(seed)
    ppm = (0, 5_000)[seed % 2]
    m = shard(ppm=ppm)
    model = SpecModel(ppm)
    now, ts, seq = NOW, NOW, 1
    delivered = 0
    for _ in range(40):
        now += 1_000
        if rnd.random() < 0.4:
            trigger = 10_000 + rnd.randint(-200, 200)
            levels = [rnd.choice((0, trigger + rnd.randint(-150, 150))) for _ in range(2)]
            expires = rnd.choice((0, 0, now + rnd.randint(1, 20_000)))
            order = run(m, Place(rnd.randint(1, 3), terms(
                rnd.choice((LONG, SHORT)), rnd.choice((LIMIT, STOP)), trigger,
                rnd.randint(1, 500), rnd.randint(1, SOL.max_leverage), *levels, expires)), now)
            if isinstance(order, PendingOrder):
                model.orders[order.order_id] = order
        else:
            kind = rnd.random()
            if kind < 0.1 and model.last is not None:
                tick = model.last  # sent again
            elif kind < 0.25 and model.last is not None:  # older, or as old by its time
                tick = edge_tick(rnd, model, model.last.ts_us - rnd.randint(0, 1),
                                 model.last.seq - 1)
            else:  # a newer one, at times of the same microsecond
                ts, seq = ts + rnd.choice((0, 1_000)), seq + 1
                tick = edge_tick(rnd, model, ts, seq)
                ts = max(ts, tick.ts_us)
            run(m, ApplyTick(tick), now)
            want_closes, want_ends = model.tick(tick)
            items = run(m, Outbox()).items[delivered:]
            delivered += len(items)
            closes = sorted((c.side, c.entry_ticks, c.qty_steps, int(c.reason), c.exit_ticks)
                            for c in (i.closed for i in items)
                            if isinstance(c, ClosedPosition))
            ends = [(c.order_id, c.status, c.reject_code, c.margin_micros)
                    for c in (i.closed for i in items) if isinstance(c, EndedOrder)]
            assert (closes, ends) == (want_closes, want_ends), tick
        assert sorted(m.orders.ids().tolist()) == sorted(model.orders)
        assert sorted((p.side, p.entry_ticks, p.qty_steps, p.margin_micros, p.leverage,
                       p.liq_ticks, p.tp_ticks, p.sl_ticks)
                      for p in map(m.book.get, m.book.ids().tolist()) if p is not None) \
            == model.open_positions()
    assert m.check() == []
