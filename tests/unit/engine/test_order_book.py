"""The pending-order book: worked examples of each fill condition at its boundary tick and one
tick before it, stops filled through a gap, expiry against tick time, cancel and stale ids;
then Hypothesis: the indexed sweep, the naive full sweep and the plain-int reference agree
after every step of random places, removes and ticks, through row reuse, index merges and
compactions, bulk loads and snapshot round trips."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from engine import schema
from engine.assets import DEFAULT_ASSETS
from engine.order_book import COLUMN_NAMES
from engine.order_book import GOOD_TILL_CANCELLED
from engine.order_book import OrderBook
from engine.order_book import OrderKind
from engine.order_book import OrderOutcome
from engine.order_book import OrderTerms
from engine.order_book import check_terms
from engine.order_book import fill_price
from engine.order_book import naive_sweep
from engine.order_reference import ReferenceOrderBook
from engine.orders import NO_LEVEL
from engine.orders import Side
from engine.position_ids import MAX_GENERATION
from engine.position_ids import book_tag_of
from engine.position_ids import generation_of
from engine.position_ids import make_position_id
from engine.position_ids import row_of
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from tests.unit.engine.book_checks import assert_same_but_id
from tests.unit.engine.book_checks import checked_sweep

SOL = DEFAULT_ASSETS["SOL"]  # price step 0.01: 150.00 is 15000 ticks
LONG, SHORT = Side.LONG, Side.SHORT
LIMIT, STOP = OrderKind.LIMIT, OrderKind.STOP
FILL, EXPIRED = OrderOutcome.FILL, OrderOutcome.EXPIRED
T0 = 1_700_000_000_000_000
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def terms(side: Side = LONG, kind: OrderKind = LIMIT, trigger: int = 14_900, *,
          expires: int = GOOD_TILL_CANCELLED, margin: int = 100_000_000, leverage: int = 10,
          tp: int = NO_LEVEL, sl: int = NO_LEVEL) -> OrderTerms:
    return OrderTerms(side, kind, trigger, margin, leverage, tp, sl, expires)


def swept(book: OrderBook, bid: int, ask: int, ts_us: int = T0) -> dict[int, OrderOutcome]:
    """The fast sweep as {id: outcome}, checked against the naive sweep on the way."""
    ids, outcomes = book.sweep(bid, ask, ts_us)
    assert ids.dtype == np.int64 and outcomes.dtype == np.int8
    naive_ids, naive_outcomes = naive_sweep(book, bid, ask, ts_us)
    assert np.array_equal(ids, naive_ids) and np.array_equal(outcomes, naive_outcomes)
    return {int(i): OrderOutcome(int(o)) for i, o in zip(ids, outcomes, strict=True)}


# ------------------------------------------------------------------ worked examples
# (side, kind, trigger, the tick that fills it (bid, ask), the tick one price step before)
BOUNDARIES = [
    pytest.param(LONG, LIMIT, 14_900, (14_899, 14_900), (14_900, 14_901), id="limit-long"),
    pytest.param(SHORT, LIMIT, 15_100, (15_100, 15_101), (15_099, 15_100), id="limit-short"),
    pytest.param(LONG, STOP, 15_100, (15_099, 15_100), (15_098, 15_099), id="stop-long"),
    pytest.param(SHORT, STOP, 14_900, (14_900, 14_901), (14_901, 14_902), id="stop-short"),
]


@pytest.mark.parametrize(("side", "kind", "trigger", "at", "before"), BOUNDARIES)
def test_each_fill_condition_at_its_boundary_tick_and_one_tick_before(
        side: Side, kind: OrderKind, trigger: int, at: tuple[int, int],
        before: tuple[int, int]) -> None:
    book = OrderBook(SOL, book_tag=5)
    reference = ReferenceOrderBook()
    oid = book.place(7, terms(side, kind, trigger), T0)
    rid = reference.place(7, terms(side, kind, trigger), T0)
    assert swept(book, *before) == {} and reference.sweep(*before, T0) == []
    assert swept(book, *at) == {oid: FILL} and reference.sweep(*at, T0) == [(rid, FILL)]
    # the opening-side price of the tick, which for a limit order at its boundary is the trigger
    assert fill_price(side, *at) == trigger
    assert len(book) == 1  # a sweep changes nothing; the caller removes what filled
    assert swept(book, *at) == {oid: FILL}


@pytest.mark.parametrize(("side", "better"), [(LONG, (14_700, 14_701)),
                                              (SHORT, (15_300, 15_301))])
def test_a_limit_order_fills_at_a_better_price_than_its_trigger(
        side: Side, better: tuple[int, int]) -> None:
    book = OrderBook(SOL)
    trigger = 14_900 if side == LONG else 15_100
    oid = book.place(1, terms(side, LIMIT, trigger), T0)
    assert swept(book, *better) == {oid: FILL}
    price = fill_price(side, *better)
    assert price < trigger if side == LONG else price > trigger


@pytest.mark.parametrize(("side", "trigger", "gap"), [(LONG, 15_100, (15_249, 15_250)),
                                                      (SHORT, 14_900, (14_700, 14_701))])
def test_a_stop_filled_through_a_gap_opens_at_the_tick_price_worse_than_its_trigger(
        side: Side, trigger: int, gap: tuple[int, int]) -> None:
    book = OrderBook(SOL)
    oid = book.place(1, terms(side, STOP, trigger), T0)
    assert swept(book, 14_999, 15_000) == {}
    assert swept(book, *gap) == {oid: FILL}
    price = fill_price(side, *gap)
    assert price == (15_250 if side == LONG else 14_700)
    assert price > trigger if side == LONG else price < trigger


def test_expiry_is_checked_against_tick_time_and_wins_over_a_fill() -> None:
    book = OrderBook(SOL)
    reference = ReferenceOrderBook()
    deadline = T0 + 60_000_000
    oid = book.place(1, terms(LONG, LIMIT, 14_900, expires=deadline), T0)
    gtc = book.place(1, terms(LONG, LIMIT, 14_900), T0)
    rid = reference.place(1, terms(LONG, LIMIT, 14_900, expires=deadline), T0)
    rgtc = reference.place(1, terms(LONG, LIMIT, 14_900), T0)
    no_fill, fill = (15_000, 15_001), (14_899, 14_900)
    # at exactly expires_ts_us the order is still open: it fills if the price says so
    assert swept(book, *no_fill, deadline) == {}
    assert swept(book, *fill, deadline) == {oid: FILL, gtc: FILL}
    assert reference.sweep(*fill, deadline) == [(rid, FILL), (rgtc, FILL)]
    # one microsecond later it is expired, even on a tick that would fill it
    assert swept(book, *no_fill, deadline + 1) == {oid: EXPIRED}
    assert swept(book, *fill, deadline + 1) == {oid: EXPIRED, gtc: FILL}
    assert reference.sweep(*fill, deadline + 1) == [(rid, EXPIRED), (rgtc, FILL)]
    # good till cancelled never expires
    assert swept(book, *no_fill, 2**63 - 1) == {oid: EXPIRED}


def test_a_cancelled_order_is_not_swept_and_cannot_be_cancelled_twice() -> None:
    book = OrderBook(SOL, book_tag=9)
    keep = book.place(1, terms(LONG, LIMIT, 14_900), T0)
    gone = book.place(2, terms(LONG, LIMIT, 14_950, expires=T0 + 5), T0 + 1)
    record = book.remove(gone)
    assert record is not None
    assert record == (gone, 2, LONG, LIMIT, 14_950, 100_000_000, 10, NO_LEVEL, NO_LEVEL,
                      T0 + 5, T0 + 1)
    assert record._asdict() == {f.name: getattr(record, f.name) for f in schema.ORDER_ROW}
    assert book.remove(gone) is None and book.get(gone) is None and gone not in book
    assert swept(book, 14_800, 14_801, T0 + 10) == {keep: FILL}
    assert len(book) == 1 and book.check() == []


def test_a_stale_id_is_not_found_after_its_row_is_reused() -> None:
    book = OrderBook(SOL, book_tag=3, capacity=1)
    old = book.place(1, terms(LONG, STOP, 15_100), T0)
    assert book.remove(old) is not None
    assert book.next_order_id() == make_position_id(2, row_of(old), 3)
    new = book.place(2, terms(SHORT, STOP, 14_900), T0)
    assert row_of(new) == row_of(old) and generation_of(new) == generation_of(old) + 1
    assert new != old and book_tag_of(new) == 3
    assert book.get(old) is None and old not in book and book.remove(old) is None
    got = book.get(new)
    assert got is not None and got.owner == 2 and got.side == SHORT and got.kind == STOP
    # the old order's index entry is dead: the new order's tick reports only the new id
    assert swept(book, 14_900, 15_200) == {new: FILL}
    assert book.check() == []


@pytest.mark.parametrize("bad", [0, -1, 2**63, 1.5, "1", None, True,
                                 make_position_id(1, 0, 4)])
def test_ids_that_are_not_open_here_are_not_found(bad: Any) -> None:
    book = OrderBook(SOL, book_tag=3)
    book.place(1, terms(), T0)
    assert book.get(bad) is None and book.remove(bad) is None and bad not in book
    assert len(book) == 1


def test_ids_of_owner_margins_and_columns() -> None:
    book = OrderBook(SOL, capacity=2)
    a = book.place(1, terms(margin=5), T0)
    b = book.place(2, terms(margin=7), T0)
    c = book.place(1, terms(margin=11), T0)
    assert book.ids_of_owner(1).tolist() == [a, c] and book.ids_of_owner(3).size == 0
    assert book.open_margin_by_owner() == {1: 16, 2: 7}
    book.remove(a)
    assert book.open_margin_by_owner() == {1: 11, 2: 7}
    assert book.ids().tolist() == sorted([b, c]) and book.free_rows().tolist() == [row_of(a)]
    cols = book.columns()
    assert tuple(cols) == COLUMN_NAMES == schema.names(schema.ORDER_ROW)
    assert {name: col.dtype for name, col in cols.items()} == \
        {f.column: f.dtype for f in schema.ORDER_ROW}
    # after a compaction each index holds 16 bytes per open order it indexes, plus its
    # (smallest, 64-entry) pending buffer; no order here has an expiry
    book.compact()
    row_bytes = schema.dtype(schema.ORDER_ROW, wire=False).itemsize
    assert book.nbytes == row_bytes * book.capacity + 16 * len(book) + 5 * 64 * 16


@pytest.mark.parametrize("bad", [
    terms(trigger=0), terms(trigger=2**62 + 1), terms(margin=0), terms(leverage=0),
    terms(leverage=SOL.max_leverage + 1), terms(tp=-1), terms(sl=-1), terms(expires=-1),
    OrderTerms(2, LIMIT, 1, 1, 1), OrderTerms(LONG, 2, 1, 1, 1),  # type: ignore[arg-type]
    OrderTerms(True, LIMIT, 1, 1, 1), OrderTerms(LONG, LIMIT, 1.5, 1, 1),  # type: ignore[arg-type]
])
def test_place_refuses_terms_that_do_not_fit(bad: OrderTerms) -> None:
    book = OrderBook(SOL)
    with pytest.raises(ValueError):
        check_terms(SOL, bad)
    with pytest.raises(ValueError):
        book.place(1, bad, T0)
    assert len(book) == 0 and book.next_order_id() == make_position_id(1, 0, 0)
    with pytest.raises(ValueError):
        book.place(-1, terms(), T0)


@pytest.mark.parametrize(("bid", "ask", "ts"), [(0, 1, T0), (2, 1, T0), (1, 2**62 + 1, T0),
                                                 (1, 1, -(2**63)), (1, 1, 2**63)])
def test_sweep_refuses_an_impossible_tick(bid: int, ask: int, ts: int) -> None:
    with pytest.raises(ValueError):
        OrderBook(SOL).sweep(bid, ask, ts)


def test_kind_and_outcome_labels() -> None:
    assert OrderKind.parse(" Stop ") is STOP and OrderKind.parse("limit") is LIMIT
    with pytest.raises(ValueError):
        OrderKind.parse("market")
    assert schema.kind.enum == ("limit", "stop")
    assert [int(o) for o in OrderOutcome] == [0, 1]


def test_place_many_equals_single_places() -> None:
    rng = np.random.default_rng(4)
    n = 300
    cols = {"side": rng.integers(0, 2, n), "kind": rng.integers(0, 2, n),
            "trigger_ticks": rng.integers(14_800, 15_200, n),
            "margin_micros": rng.integers(1, 10**9, n), "leverage": rng.integers(1, 51, n),
            "tp_ticks": np.zeros(n, dtype=np.int64), "sl_ticks": np.zeros(n, dtype=np.int64),
            "expires_ts_us": np.where(rng.random(n) < 0.5, 0, T0 + rng.integers(0, 100, n))}
    owners = rng.integers(0, 20, n)
    single = OrderBook(SOL, 2, capacity=1, min_pending=4, min_dead=4)
    bulk = OrderBook(SOL, 2, capacity=1, min_pending=4, min_dead=4)
    for book in (single, bulk):  # some free rows to reuse first
        for oid in [book.place(0, terms(), T0) for _ in range(10)][::2]:
            book.remove(oid)
    ids = [single.place(int(owners[i]), OrderTerms(
        Side(int(cols["side"][i])), OrderKind(int(cols["kind"][i])),
        *(int(cols[f][i]) for f in ("trigger_ticks", "margin_micros", "leverage", "tp_ticks",
                                    "sl_ticks", "expires_ts_us"))), T0) for i in range(n)]
    assert bulk.place_many(owners, cols, T0).tolist() == ids
    for name, col in single.to_arrays().items():
        assert np.array_equal(col, bulk.to_arrays()[name]), name
    for tick in range(14_700, 15_300, 7):
        assert swept(single, tick, tick + 2, T0 + tick % 120) \
            == swept(bulk, tick, tick + 2, T0 + tick % 120)
    assert single.check() == [] and bulk.check() == []
    bad = dict(cols, leverage=np.zeros(n, dtype=np.int64))
    with pytest.raises(ValueError):
        bulk.place_many(owners, bad, T0)
    with pytest.raises(ValueError):
        bulk.place_many(owners, {k: v for k, v in cols.items() if k != "kind"}, T0)


def test_snapshot_round_trip_restores_ids_free_list_and_indexes() -> None:
    book = OrderBook(SOL, book_tag=6, capacity=2, min_pending=2, min_dead=2)
    ids = [book.place(i % 3, terms(Side(i % 2), OrderKind(i // 2 % 2), 14_900 + 10 * i,
                                   expires=T0 + i if i % 3 else 0), T0) for i in range(20)]
    for oid in ids[3::4]:
        book.remove(oid)
    arrays = book.to_arrays()
    restored = OrderBook.from_arrays(SOL, 6, arrays)
    assert restored.check() == [] and len(restored) == len(book)
    assert restored.free_rows().tolist() == book.free_rows().tolist()
    assert restored.next_order_id() == book.next_order_id()
    for name, col in restored.to_arrays().items():
        assert np.array_equal(col, arrays[name]), name
    for tick in range(14_850, 15_150, 5):
        assert swept(restored, tick, tick + 1, T0 + tick % 25) \
            == swept(book, tick, tick + 1, T0 + tick % 25)
    assert restored.place(1, terms(), T0) == book.place(1, terms(), T0)


def test_from_arrays_refuses_inconsistent_arrays() -> None:
    book = OrderBook(SOL, book_tag=1)
    ids = [book.place(1, terms(), T0) for _ in range(4)]
    book.remove(ids[1])
    good = book.to_arrays()

    def broken(**changes: Any) -> dict[str, np.ndarray]:
        arrays = {k: v.copy() for k, v in good.items()}
        for name, (row, value) in changes.items():
            arrays[name][row] = value
        return arrays

    with pytest.raises(ValueError, match="book_tag"):
        OrderBook.from_arrays(SOL, 2, good)
    cases = [
        broken(order_id=(2, ids[3])),  # an id in another row
        broken(free_head=(0, 0)),  # the free list starts at an open row
        broken(free_head=(0, -1)),  # a free row neither on the list nor retired
        broken(trigger_ticks=(1, 1)),  # the free list loops back into an open row
        broken(leverage=(0, 0)),  # an open order whose terms do not fit
        broken(kind=(0, 2)),
        {k: v for k, v in good.items() if k != "expires_ts_us"},
        dict(good, side=good["side"][:-1]),
    ]
    for arrays in cases:
        with pytest.raises(ValueError):
            OrderBook.from_arrays(SOL, 1, arrays)


def test_a_row_whose_generation_is_exhausted_is_retired() -> None:
    book = OrderBook(SOL, book_tag=4)
    oid = book.place(1, terms(), T0)
    arrays = book.to_arrays()
    last = make_position_id(MAX_GENERATION, row_of(oid), 4)
    arrays["order_id"][row_of(oid)] = last  # as if the row had been reused to its last id
    book = OrderBook.from_arrays(SOL, 4, arrays)
    assert book.remove(last) is not None and book.check() == []
    assert book.free_rows().size == 0 and row_of(book.next_order_id()) != row_of(last)
    restored = OrderBook.from_arrays(SOL, 4, book.to_arrays())
    assert restored.check() == [] and row_of(restored.place(1, terms(), T0)) != row_of(last)


def test_check_reports_a_broken_book() -> None:
    book = OrderBook(SOL)
    ids = [book.place(1, terms(), T0) for _ in range(3)]
    book.remove(ids[0])
    book.remove(ids[1])
    assert book.check() == []
    book._trig[row_of(ids[0])] = row_of(ids[1])  # white-box: a free list that loops
    assert any("free list" in p for p in book.check())
    book._trig[row_of(ids[0])] = -1
    book._live += 1  # white-box: a miscount
    assert any("live count" in p for p in book.check())


# ------------------------------------------------------------------ Hypothesis
class Trio:
    """The fast book and the reference driven in lockstep (the naive sweep reads the fast
    book's columns); fast ids mapped to reference ids."""

    def __init__(self, book_tag: int, min_pending: int, min_dead: int) -> None:
        self.tuning = {"min_pending": min_pending, "min_dead": min_dead}
        self.fast = OrderBook(SOL, book_tag, capacity=1, **self.tuning)
        self.ref = ReferenceOrderBook()
        self.to_ref: dict[int, int] = {}
        self.issued: set[int] = set()

    def place(self, owner: int, order: OrderTerms, ts_us: int) -> None:
        expected = self.fast.next_order_id()
        fid = self.fast.place(owner, order, ts_us)
        assert fid == expected and fid not in self.issued, "an order id was issued twice"
        self.issued.add(fid)
        self.to_ref[fid] = self.ref.place(owner, order, ts_us)

    def place_many(self, owners: list[int], orders: list[OrderTerms], ts_us: int) -> None:
        cols = {f: np.array([getattr(o, f) for o in orders], dtype=np.int64)
                for f in schema.names(schema.ORDER_TERMS)}
        expected = self.fast.next_order_id()
        fids = self.fast.place_many(np.array(owners, dtype=np.int64), cols, ts_us).tolist()
        assert not fids or fids[0] == expected
        assert not set(fids) & self.issued and len(set(fids)) == len(fids)
        self.issued.update(fids)
        for fid, owner, order in zip(fids, owners, orders, strict=True):
            self.to_ref[fid] = self.ref.place(owner, order, ts_us)

    def remove(self, fid: int) -> None:
        got = self.fast.remove(fid)
        want = self.ref.remove(self.to_ref.pop(fid))
        assert_same_but_id(got, want, "order_id")
        assert self.fast.get(fid) is None and self.fast.remove(fid) is None

    def sweep(self, bid: int, ask: int, ts_us: int) -> list[int]:
        ids, outcomes = checked_sweep(self.fast, naive_sweep, bid, ask, ts_us)
        fast = [(self.to_ref[int(i)], OrderOutcome(int(o)))
                for i, o in zip(ids, outcomes, strict=True)]
        assert sorted(fast) == self.ref.sweep(bid, ask, ts_us)
        return [int(i) for i in ids]

    def agree(self) -> None:
        """The books hold the same orders, and the fast one is sound."""
        assert len(self.fast) == len(self.ref)
        assert self.fast.ids().tolist() == sorted(self.to_ref)
        for fid, rid in self.to_ref.items():
            assert_same_but_id(self.fast.get(fid), self.ref.get(rid), "order_id")
        for owner in range(4):
            mapped = [self.to_ref[int(i)] for i in self.fast.ids_of_owner(owner)]
            assert sorted(mapped) == self.ref.ids_of_owner(owner)
        assert self.fast.open_margin_by_owner() == self.ref.open_margin_by_owner()
        assert self.fast.open_count_by_owner() == self.ref.open_count_by_owner()
        assert self.fast.check() == []

    def restore(self) -> None:
        """Replace the fast book by its snapshot's restoration (ids, free list, indexes)."""
        arrays = self.fast.to_arrays()
        restored = OrderBook.from_arrays(SOL, self.fast.book_tag, arrays, **self.tuning)
        assert restored.next_order_id() == self.fast.next_order_id()
        assert restored.check() == self.fast.check() == []
        for name, col in restored.to_arrays().items():
            assert np.array_equal(col, arrays[name]), name
        self.fast = restored


# one draw per order: side, kind, trigger offset, expiry offset (None: good till cancelled),
# margin, leverage, TP and SL (per mille of the mid; 0: none)
_ORDER = st.tuples(st.sampled_from([LONG, SHORT]), st.sampled_from([LIMIT, STOP]),
                   st.integers(-20, 20), st.one_of(st.none(), st.integers(-3, 30)),
                   st.integers(1, 10**9), st.integers(1, SOL.max_leverage),
                   st.one_of(st.just(0), st.integers(1, 2000)),
                   st.one_of(st.just(0), st.integers(1, 2000)))


def order_terms(draw: Any, mid: int, now: int) -> OrderTerms:
    side, kind, offset, expires, margin, leverage, tp, sl = draw(_ORDER)
    return OrderTerms(side, kind, max(1, mid + offset), margin, leverage,
                      max(1, tp * mid // 1000) if tp else NO_LEVEL,
                      max(1, sl * mid // 1000) if sl else NO_LEVEL,
                      GOOD_TILL_CANCELLED if expires is None else max(1, now + expires))


class Drawn:
    """Choices drawn by Hypothesis (shrinkable)."""

    def __init__(self, draw: Any) -> None:
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return int(self.draw(st.integers(lo, hi)))

    def choice(self, items: list[Any]) -> Any:
        return self.draw(st.sampled_from(items))


class Seeded:
    """The same choices from a seeded generator: the probe tick after every step would
    otherwise spend most of the test's time drawing."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd

    def integer(self, lo: int, hi: int) -> int:
        return self.rnd.randint(lo, hi)

    def choice(self, items: list[Any]) -> Any:
        return self.rnd.choice(items)


def tick(pick: Drawn | Seeded, trio: Trio, mid: int, now: int) -> tuple[int, int, int]:
    """A tick: often with the bid or the ask right at (or one step off) an open order's
    trigger, and its time often right at (or one microsecond off) an order's expiry."""
    spread = pick.integer(0, 3)
    orders = list(trio.ref.orders.values())
    if orders and pick.integer(0, 3):
        level = pick.choice(orders).trigger_ticks + pick.integer(-1, 1)
        if pick.integer(0, 1):  # the ask on the level
            bid, ask = max(1, level - spread), max(1, level)
        else:
            bid, ask = max(1, level), max(1, level) + spread
    else:
        bid = max(1, mid + pick.integer(-40, 40))
        ask = bid + spread
    expiries = sorted({o.expires_ts_us for o in orders if o.expires_ts_us})
    if expiries and pick.integer(0, 1):
        return bid, ask, pick.choice(expiries) + pick.integer(-1, 1)
    return bid, ask, now


@SETTINGS
@given(st.data())
def test_fast_sweep_equals_naive_and_reference_after_every_step(data: st.DataObject) -> None:
    draw = data.draw
    drawn = Drawn(draw)
    seeded = Seeded(draw(st.randoms(use_true_random=True)))
    mid = draw(st.integers(50, 10**6))
    trio = Trio(draw(st.integers(0, 255)), draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    now = T0
    for _ in range(draw(st.integers(1, 40))):
        action = draw(st.sampled_from(["place", "place", "place", "bulk", "remove", "tick",
                                       "tick", "restore"]))
        if action == "place":
            trio.place(draw(st.integers(0, 3)), order_terms(draw, mid, now), now)
        elif action == "bulk":
            k = draw(st.integers(0, 12))
            trio.place_many([seeded.integer(0, 3) for _ in range(k)],
                            [order_terms(draw, mid, now) for _ in range(k)], now)
        elif action == "remove" and trio.to_ref:
            trio.remove(draw(st.sampled_from(sorted(trio.to_ref))))
        elif action == "restore":
            trio.restore()
        elif action == "tick":
            bid, ask, ts = tick(drawn, trio, mid, now)
            hit = trio.sweep(bid, ask, ts)
            now = max(now, ts)
            if draw(st.booleans()):  # the shard removes what filled or expired (usually)
                for fid in hit:
                    trio.remove(fid)
        # after every step, a probe tick on which all three agree
        trio.sweep(*tick(seeded, trio, mid, now))
        trio.agree()
    trio.restore()
    trio.agree()
    trio.sweep(*tick(seeded, trio, mid, now))
