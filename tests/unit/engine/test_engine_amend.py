"""Amending an open position in place (engine.book.PositionBook.amend): new, moved and removed
TP/SL, margin and partial-close rests, worked through exact boundary ticks, the old index entry
an amend leaves behind, and what the book refuses."""

from __future__ import annotations

import numpy as np
import pytest
from engine import reference
from engine.assets import DEFAULT_ASSETS
from engine.assets import Asset
from engine.book import PositionBook
from engine.orders import MAX_COLUMN_VALUE
from engine.orders import NO_LEVEL
from engine.orders import CloseReason
from engine.orders import OpenPlan
from engine.orders import Side
from engine.orders import liquidation_ticks
from engine.orders import plan_open
from engine.triggers import naive_sweep
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from tests.unit.engine.book_checks import assert_same_but_id
from tests.unit.engine.book_checks import checked_sweep
from tests.unit.engine.draws import buying_margins
from tests.unit.engine.draws import magnitudes

SOL = DEFAULT_ASSETS["SOL"]  # price in cents (ticks), quantity in 0.01 SOL (steps)
USD = 1_000_000
SL, TP, LIQ = CloseReason.STOP_LOSS, CloseReason.TAKE_PROFIT, CloseReason.LIQUIDATION


def plan(side: Side = Side.LONG, margin_usd: int = 100, leverage: int = 10,
         tp: int | None = None, sl: int | None = None) -> OpenPlan:
    """Opened at 100.00: a long of 10 SOL at 10x is liquidated at 90.00, a short at 110.00."""
    p = plan_open(SOL, side, margin_usd * USD, leverage, 10_000, 10_000, tp, sl)
    assert isinstance(p, OpenPlan)
    return p


def hits(book: PositionBook, bid: int, ask: int | None = None) -> list[tuple[int, CloseReason]]:
    """The sweep at ``bid``/``ask`` (checked against the naive sweep) as (id, reason)."""
    ids, reasons = checked_sweep(book, naive_sweep, bid, bid if ask is None else ask)
    return [(int(i), CloseReason(int(r))) for i, r in zip(ids, reasons, strict=True)]


@pytest.fixture(params=[False, True], ids=["pending", "merged"])
def merged(request: pytest.FixtureRequest) -> bool:
    """Whether the book merges its index entries after each change (sorted part) or leaves
    them pending (the linear scan)."""
    flag: bool = request.param
    return flag


def settle(book: PositionBook, merged: bool) -> None:
    if merged:
        book.compact()
    assert book.check() == []


def test_a_stop_loss_moved_up_then_down_fires_at_its_new_level_only(merged: bool) -> None:
    book = PositionBook(SOL, min_pending=64)
    pid = book.open(1, plan(sl=9_500), 0)
    settle(book, merged)
    moved = book.amend(pid, sl_ticks=9_700)
    assert moved is not None and moved.sl_ticks == 9_700 and moved == book.get(pid)
    settle(book, merged)
    assert hits(book, 9_701) == []  # one tick before the new level
    assert hits(book, 9_700) == [(pid, SL)]  # on it, once (the old entry is not alive)
    assert hits(book, 9_500) == [(pid, SL)]
    book.amend(pid, sl_ticks=9_300)  # below where it was first
    settle(book, merged)
    for bid in (9_701, 9_700, 9_501, 9_500, 9_301):  # both old levels and their neighbours
        assert hits(book, bid) == []
    assert hits(book, 9_300) == [(pid, SL)]
    assert hits(book, 9_000) == [(pid, SL)]  # SL wins over liquidation


@pytest.mark.parametrize(("side", "tp", "fires_at", "not_at"),
                         [(Side.LONG, 11_000, 11_000, 10_999),
                          (Side.SHORT, 9_000, 9_000, 9_001)])
def test_a_removed_take_profit_never_fires_and_one_set_back_fires_once(
        merged: bool, side: Side, tp: int, fires_at: int, not_at: int) -> None:
    book = PositionBook(SOL, min_pending=64)
    pid = book.open(1, plan(side, tp=tp), 0)
    other = book.open(2, plan(side, tp=tp), 0)
    settle(book, merged)
    assert book.amend(pid, tp_ticks=NO_LEVEL) is not None
    settle(book, merged)
    index = "long_tp" if side == Side.LONG else "short_tp"
    assert book.index_sizes()[index][0] == 1
    far = 2 * tp if side == Side.LONG else 1
    for price in (fires_at, far):
        assert hits(book, price) == [(other, TP)]
    # set back to the same level: the old entry, if still stored, is the live one again
    assert book.amend(pid, tp_ticks=tp) is not None
    settle(book, merged)
    assert book.index_sizes()[index][0] == 2
    assert hits(book, not_at) == []
    assert hits(book, fires_at) == sorted([(pid, TP), (other, TP)])


@pytest.mark.parametrize(("side", "old_liq", "new_liq"), [(Side.LONG, 9_000, 8_500),
                                                         (Side.SHORT, 11_000, 11_500)])
def test_added_margin_moves_the_liquidation_trigger_away(merged: bool, side: Side,
                                                         old_liq: int, new_liq: int) -> None:
    book = PositionBook(SOL, min_pending=64)
    pid = book.open(1, plan(side), 0)
    p = book.get(pid)
    assert p is not None and p.liq_ticks == old_liq and p.qty_steps == 1_000
    liq = liquidation_ticks(SOL, side, p.entry_ticks, p.qty_steps, 150 * USD, 0)
    assert liq == new_liq  # $150 over 10 SOL: 15.00 from the entry
    amended = book.amend(pid, margin_micros=150 * USD, liq_ticks=liq)
    assert amended == p._replace(margin_micros=150 * USD, liq_ticks=new_liq)
    settle(book, merged)
    step = -1 if side == Side.LONG else 1  # one tick towards the loss
    for price in (old_liq, old_liq + step, new_liq - step):
        assert hits(book, price) == []
    assert hits(book, new_liq) == [(pid, LIQ)]
    # margin taken out again moves it back past where it began
    liq = liquidation_ticks(SOL, side, p.entry_ticks, p.qty_steps, 60 * USD, 0)
    book.amend(pid, margin_micros=60 * USD, liq_ticks=liq)
    settle(book, merged)
    assert hits(book, liq - step) == [] and hits(book, liq) == [(pid, LIQ)]


def test_a_partial_close_rest_keeps_its_id_levels_and_liquidation_price() -> None:
    book = PositionBook(SOL)
    pid = book.open(1, plan(tp=11_000, sl=9_500), 0)
    # 6 of 10 SOL closed with 6/10 of the margin: the rest keeps the liquidation price
    rest = book.amend(pid, qty_steps=400, margin_micros=40 * USD, liq_ticks=9_000)
    assert rest is not None and (rest.position_id, rest.tp_ticks, rest.sl_ticks) == \
        (pid, 11_000, 9_500)
    assert book.unrealized_pnl_micros(np.array([pid]), 10_100, 10_100).tolist() == [4 * USD]
    assert hits(book, 9_500) == [(pid, SL)] and hits(book, 11_000) == [(pid, TP)]
    assert book.open_margin_by_owner() == {1: 40 * USD} and book.check() == []


def test_levels_past_the_entry_are_the_callers_rule_not_the_books() -> None:
    """After the price moved, an SL may lock in profit and a TP may lie on the loss side of
    the entry (SPEC, changing a position): the book keeps them, sweeps them and restores them
    from a snapshot."""
    book = PositionBook(SOL)
    rose = book.open(1, plan(Side.LONG), 0)  # the price rose past 102.00: profit locked in
    fell = book.open(1, plan(Side.LONG), 0)  # the price fell below 98.00: loss capped
    short = book.open(1, plan(Side.SHORT), 0)  # the price fell below 98.00: profit locked in
    assert book.amend(rose, sl_ticks=10_200, tp_ticks=10_400) is not None
    assert book.amend(fell, tp_ticks=9_800) is not None
    assert book.amend(short, sl_ticks=9_800, tp_ticks=9_500) is not None
    restored = PositionBook.from_arrays(SOL, 0, book.to_arrays())
    assert restored.check() == [] and book.check() == []
    for b in (book, restored):
        reasons = {price: dict(hits(b, price)) for price in
                   (10_400, 10_399, 10_201, 10_200, 9_800, 9_799, 9_501, 9_500)}
        assert [reasons[p].get(rose) for p in (10_400, 10_399, 10_201, 10_200)] == \
            [TP, None, None, SL]
        assert [reasons[p].get(fell) for p in (9_800, 9_799)] == [TP, None]
        assert [reasons[p].get(short) for p in (9_800, 9_799, 9_501, 9_500)] == \
            [SL, None, None, TP]


def test_many_amends_of_one_position_keep_the_index_within_its_compaction_bound() -> None:
    min_pending, min_dead = 4, 8
    book = PositionBook(SOL, min_pending=min_pending, min_dead=min_dead)
    others = [book.open(2, plan(sl=9_100 + i), 0) for i in range(40)]
    pid = book.open(1, plan(sl=9_500), 0)
    book.compact()
    base = book.nbytes  # every entry sorted, none dead; the pending buffers never grow here
    for i in range(5_000):
        # new levels every time, then two levels taken in turn (old entries revived)
        level = 9_001 + i % 990 if i < 4_000 else (9_400 if i % 2 else 9_600)
        book.amend(pid, sl_ticks=level)
        live, pending, dead = book.index_sizes()["long_stop"]
        assert live == 41
        assert pending <= max(min_pending, live >> 5) and dead <= max(min_dead, live >> 2)
        assert book.nbytes <= base + 16 * dead  # 16 bytes per stored entry
    assert book.check() == []
    final = book.get(pid)
    assert final is not None and final.sl_ticks == 9_400
    assert hits(book, 9_600) == [] and hits(book, 9_400) == [(pid, SL)]
    assert hits(book, 9_100) == sorted([(o, SL) for o in others] + [(pid, SL)])


def test_a_refused_amend_changes_nothing() -> None:
    book = PositionBook(SOL, min_pending=1, min_dead=1)
    pid = book.open(1, plan(tp=11_000, sl=9_500), 0)
    arrays, sizes = book.to_arrays(), book.index_sizes()
    for bad in ({"margin_micros": 150 * USD},  # the liquidation price must follow the margin
                {"liq_ticks": 8_999},
                {"sl_ticks": 9_000},  # on the liquidation price, not beyond it
                {"tp_ticks": 9_500},  # on the stop loss, not beyond it
                {"sl_ticks": 11_000},  # the TP would not lie beyond it
                {"margin_micros": 40 * USD, "liq_ticks": 9_600},  # the SL would not lie beyond
                {"qty_steps": 0}, {"margin_micros": 0, "liq_ticks": 10_000},
                {"tp_ticks": -1}, {"sl_ticks": 2**63}):
        with pytest.raises(ValueError):
            book.amend(pid, **bad)
    with pytest.raises(TypeError):
        book.amend(pid, tp_ticks=1.5)  # type: ignore[arg-type]
    after = book.to_arrays()
    assert all(np.array_equal(after[name], a) for name, a in arrays.items())
    assert book.index_sizes() == sizes and book.check() == []
    assert book.amend(pid) == book.get(pid)  # nothing asked, nothing changed
    book.close(pid)
    assert book.amend(pid, tp_ticks=12_000) is None and book.amend(12345, sl_ticks=1) is None


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 12), st.integers(0, 12), st.data())
def test_a_margin_far_past_the_notional_is_refused_by_both_books(
        price_decimals: int, qty_decimals: int, data: st.DataObject) -> None:
    """A short's margin amended up to MAX_COLUMN_VALUE, its quantity down to a few steps, its
    stored liquidation price kept or one in range: with 9 or more decimals in all its true
    liquidation price then lies past int64. Both books refuse such an amend (ValueError,
    nothing changed) or make the same row."""
    asset = Asset("STEP", "STEP_USDC", price_decimals, qty_decimals, max_leverage=10)
    entry = max(1, asset.max_price_ticks // 4)
    opened = data.draw(buying_margins(asset, 10, entry, 1, MAX_COLUMN_VALUE >> 10),
                       label="margin opened")
    short = plan_open(asset, Side.SHORT, opened, 10, entry, entry, None, None)
    assert isinstance(short, OpenPlan)
    fast, ref = PositionBook(asset, min_pending=1, min_dead=1), reference.ReferenceBook(asset)
    fid, rid = fast.open(1, short, 0), ref.open(1, short, 0)
    qty = data.draw(st.integers(1, min(3, short.qty_steps)), label="qty")
    margin = data.draw(magnitudes(MAX_COLUMN_VALUE >> 8, MAX_COLUMN_VALUE), label="margin")
    liq = liquidation_ticks(asset, Side.SHORT, short.entry_ticks, qty, margin, 0)
    changes = {"qty_steps": qty, "margin_micros": margin}
    if data.draw(st.booleans(), label="liquidation price given"):
        changes["liq_ticks"] = data.draw(st.sampled_from(
            [short.liq_ticks, MAX_COLUMN_VALUE, *([liq] if liq <= MAX_COLUMN_VALUE else [])]))
    before = fast.to_arrays()
    try:
        want = ref.amend(rid, **changes)
    except ValueError:
        with pytest.raises(ValueError):
            fast.amend(fid, **changes)
        after = fast.to_arrays()
        assert all(np.array_equal(after[name], a) for name, a in before.items())
        assert fast.check() == []
    else:
        assert_same_but_id(fast.amend(fid, **changes), want, "position_id")


def test_the_reference_book_amends_like_the_fast_one() -> None:
    fast = PositionBook(SOL)
    ref = reference.ReferenceBook(SOL)
    fid, rid = fast.open(1, plan(sl=9_500), 0), ref.open(1, plan(sl=9_500), 0)
    for changes in ({"sl_ticks": 10_100}, {"tp_ticks": 10_200}, {"sl_ticks": NO_LEVEL},
                    {"margin_micros": 150 * USD, "liq_ticks": 8_500}):
        assert_same_but_id(fast.amend(fid, **changes), ref.amend(rid, **changes),
                           "position_id")
    assert dict(ref.sweep(8_500, 8_500)) == {rid: LIQ} and ref.sweep(8_501, 8_501) == []
    assert hits(fast, 8_500) == [(fid, LIQ)]
    for bad in ({"tp_ticks": 8_500}, {"liq_ticks": 8_501}, {"qty_steps": 0}):
        with pytest.raises(ValueError):
            fast.amend(fid, **bad)
        with pytest.raises(ValueError):
            ref.amend(rid, **bad)
    assert ref.amend(999, tp_ticks=1) is None


@pytest.mark.parametrize("min_dead", [1, 2, 4096])
def test_a_level_set_back_and_forth_revives_its_old_entry(min_dead: int) -> None:
    """Back to a level whose entry is still stored: that entry is the live one again, counted
    before the entry left behind is discarded (a compaction in between counts exactly), so
    the index neither grows nor loses track."""
    book = PositionBook(SOL, min_pending=1, min_dead=min_dead)
    other = book.open(2, plan(sl=9_100), 0)
    pid = book.open(1, plan(sl=9_500), 0)
    for i in range(20):  # no sweep in between, which could step over the stale entry
        book.amend(pid, sl_ticks=9_300 if i % 2 == 0 else 9_500)
        live, _, dead = book.index_sizes()["long_stop"]
        assert (live, dead) == (2, 1) and book.check() == []
    assert hits(book, 9_501) == [] and hits(book, 9_500) == [(pid, SL)]
    assert hits(book, 9_100) == sorted([(pid, SL), (other, SL)])


def test_an_entry_the_sweep_stepped_over_is_added_anew_when_its_level_returns() -> None:
    book = PositionBook(SOL, min_pending=64)
    pid = book.open(1, plan(sl=9_500), 0)
    book.compact()  # the SL entry sorted
    book.amend(pid, sl_ticks=9_300)  # the old entry now leads the sorted part, dead
    assert hits(book, 9_500) == []  # the sweep steps over it for good
    assert book.index_sizes()["long_stop"] == (1, 1, 0)
    book.amend(pid, sl_ticks=9_500)
    assert book.check() == [] and book.index_sizes()["long_stop"] == (1, 2, 1)  # stored anew
    assert hits(book, 9_501) == [] and hits(book, 9_500) == [(pid, SL)]
    book.compact()
    assert book.index_sizes()["long_stop"] == (1, 0, 0) and book.check() == []
