"""The columnar position book: ids, slot reuse, growth, bulk loads, snapshots, vectorised
reads, and the trigger indexes' bookkeeping."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from engine.assets import DEFAULT_ASSETS
from engine.assets import Asset
from engine.book import COLUMN_NAMES
from engine.book import PositionBook
from engine.book import PositionRecord
from engine.book import book_tag_of
from engine.orders import MAX_COLUMN_VALUE
from engine.orders import OpenPlan
from engine.orders import Side
from engine.orders import plan_open
from engine.orders import plan_open_arrays
from engine.position_ids import MAX_GENERATION
from engine.position_ids import generation_of
from engine.position_ids import is_position_id
from engine.position_ids import make_position_id
from engine.position_ids import row_of
from engine.position_ids import rows_of
from engine.triggers import naive_sweep

SOL = DEFAULT_ASSETS["SOL"]
USD = 1_000_000


def plan(side: Side = Side.LONG, margin_usd: int = 100, leverage: int = 10, price: int = 10_000,
         tp: int | None = None, sl: int | None = None) -> OpenPlan:
    p = plan_open(SOL, side, margin_usd * USD, leverage, price, price, tp, sl)
    assert isinstance(p, OpenPlan)
    return p


def test_open_get_close_round_trip() -> None:
    book = PositionBook(SOL, book_tag=5)
    p = plan(tp=11_000, sl=9_500)
    pid = book.open(77, p, 123)
    assert pid > 0 and book_tag_of(pid) == 5 and pid in book and len(book) == 1
    want = PositionRecord(pid, 77, Side.LONG, 10_000, 1_000, 100 * USD, 10, 9_000, 11_000,
                          9_500, 123, 0)
    assert book.get(pid) == want
    assert book.close(pid) == want
    assert book.get(pid) is None and book.close(pid) is None and pid not in book
    assert len(book) == 0 and book.check() == []


@pytest.mark.parametrize("bad", [0, -1, 2**63, 12345, "x", None, 1.5, True])
def test_unknown_ids_are_none(bad: object) -> None:
    book = PositionBook(SOL, book_tag=1)
    book.open(1, plan(), 0)
    assert book.get(bad) is None  # type: ignore[arg-type]
    assert book.close(bad) is None  # type: ignore[arg-type]


def test_ids_of_another_book_are_not_found_here() -> None:
    a = PositionBook(SOL, book_tag=1)
    b = PositionBook(SOL, book_tag=2)
    pa, pb = a.open(1, plan(), 0), b.open(1, plan(), 0)
    assert pa != pb and book_tag_of(pa) == 1 and book_tag_of(pb) == 2
    assert row_of(pa) == row_of(pb) == 0
    assert b.get(pa) is None and b.close(pa) is None and a.get(pa) is not None


def test_slot_reuse_bumps_the_generation_and_never_repeats_an_id() -> None:
    book = PositionBook(SOL, capacity=2)
    seen = set()
    pid = book.open(1, plan(), 0)
    for _ in range(50):
        seen.add(pid)
        assert book.close(pid) is not None
        new = book.open(1, plan(), 0)
        assert new not in seen and row_of(new) == row_of(pid)
        assert generation_of(new) == generation_of(pid) + 1
        pid = new
    assert book.capacity == 2 and book.check() == []


def test_exhausted_row_is_retired() -> None:
    book = PositionBook(SOL, capacity=4)
    pid = book.open(1, plan(), 0)
    # pretend the row was reused to the last generation
    last = make_position_id(MAX_GENERATION, row_of(pid), 0)
    book._pid[row_of(pid)] = last  # white-box: set up an exhausted row
    assert book.close(last) is not None
    fresh = book.open(1, plan(), 0)
    assert row_of(fresh) != row_of(last)
    restored = PositionBook.from_arrays(SOL, 0, book.to_arrays())
    assert row_of(restored.open(1, plan(), 0)) != row_of(last)


def test_free_list_is_lifo_and_growth_keeps_rows() -> None:
    book = PositionBook(SOL, capacity=1)
    ids = [book.open(i, plan(), i) for i in range(100)]
    assert book.capacity >= 100
    assert [r.owner if r else None for r in map(book.get, ids)] == list(range(100))
    book.close(ids[10])
    book.close(ids[20])
    assert row_of(book.open(0, plan(), 0)) == 20
    assert row_of(book.open(0, plan(), 0)) == 10
    assert row_of(book.open(0, plan(), 0)) == 100
    assert book.check() == []


def test_open_rejects_an_inconsistent_plan() -> None:
    book = PositionBook(SOL)
    good = plan(sl=9_500)
    for bad in (good._replace(liq_ticks=8_999),
                good._replace(sl_ticks=9_000),
                good._replace(tp_ticks=9_999),
                good._replace(qty_steps=0),
                good._replace(leverage=101)):
        with pytest.raises(ValueError):
            book.open(1, bad, 0)
    with pytest.raises(ValueError):
        book.open(-1, good, 0)
    assert len(book) == 0 and book.check() == []


def test_open_many_refuses_a_row_whose_liquidation_price_lies_past_int64() -> None:
    """A short of one step at 1.0000 holding MAX_COLUMN_VALUE of margin, with 4 + 4 decimals:
    its liquidation price is about 4.6e20 ticks, so no stored one matches it. The load is
    refused as inconsistent (ValueError, nothing opened), as a single open of it is."""
    fine = Asset("FINE", "FINE_USDC", price_decimals=4, qty_decimals=4, max_leverage=100)
    row = OpenPlan(Side.SHORT, 10_000, 1, MAX_COLUMN_VALUE, 1, MAX_COLUMN_VALUE, 0, 0, 0)
    book = PositionBook(fine)
    with pytest.raises(ValueError):
        book.open(1, row, 0)
    columns = {f: np.array([getattr(row, f)]) for f in ("side", "entry_ticks", "qty_steps",
                                                        "margin_micros", "leverage",
                                                        "liq_ticks", "tp_ticks", "sl_ticks")}
    with pytest.raises(ValueError):
        book.open_many(np.array([1]), columns, 0)
    assert len(book) == 0 and book.check() == []


def test_owner_reads_and_margins() -> None:
    book = PositionBook(SOL)
    a = [book.open(1, plan(margin_usd=10), 0) for _ in range(3)]
    b = book.open(2, plan(Side.SHORT, margin_usd=7), 0)
    book.close(a[1])
    assert book.ids_of_owner(1).tolist() == sorted([a[0], a[2]])
    assert book.ids_of_owner(2).tolist() == [b]
    assert book.ids_of_owner(3).tolist() == []
    assert book.open_margin_by_owner() == {1: 20 * USD, 2: 7 * USD}
    assert book.ids().tolist() == sorted([a[0], a[2], b])


def test_unrealized_pnl_matches_the_scalar_formula() -> None:
    book = PositionBook(SOL)
    long = book.open(1, plan(Side.LONG), 0)
    short = book.open(1, plan(Side.SHORT), 0)
    pnl = book.unrealized_pnl_micros(np.array([long, short]), 10_050, 10_060)
    assert pnl.dtype == np.int64
    assert pnl.tolist() == [50 * 10 * 10_000, -60 * 10 * 10_000]  # 0.50 * 10, -0.60 * 10
    book.close(short)
    with pytest.raises(KeyError):
        book.unrealized_pnl_micros(np.array([short]), 1, 1)


def test_sweep_rejects_an_impossible_top_of_book() -> None:
    book = PositionBook(SOL)
    for bid, ask in ((0, 1), (5, 4), (-3, 10)):
        with pytest.raises(ValueError):
            book.sweep(bid, ask)


def test_sweep_keeps_reporting_until_closed_and_skips_closed() -> None:
    book = PositionBook(SOL, min_pending=1)
    ids = [book.open(1, plan(leverage=lev), 0) for lev in (10, 20, 50)]  # liq 90, 95, 98
    for _ in range(3):
        assert book.sweep(9_800, 9_801)[0].tolist() == [ids[2]]
    assert book.sweep(9_500, 9_501)[0].tolist() == ids[1:]
    book.close(ids[2])
    assert book.sweep(9_500, 9_501)[0].tolist() == [ids[1]]
    assert book.sweep(9_999, 10_000)[0].tolist() == []  # each tick is judged on its own
    assert book.sweep(9_400, 9_401)[0].tolist() == [ids[1]]
    assert book.check() == []


def test_merge_and_compaction_keep_the_indexes_exact() -> None:
    book = PositionBook(SOL, min_pending=4, min_dead=4)
    rng = np.random.default_rng(3)
    live: list[int] = []
    for _ in range(500):
        if live and rng.random() < 0.45:
            live.remove(pid := live[int(rng.integers(len(live)))])
            assert book.close(pid) is not None
        else:
            p = plan(Side(int(rng.integers(2))), int(rng.integers(1, 500)),
                     int(rng.integers(1, 101)), int(rng.integers(9_000, 11_000)))
            live.append(book.open(1, p, 0))
    sizes = book.index_sizes()
    assert all(pending <= max(4, live_n // 32) for live_n, pending, _ in sizes.values())
    assert all(dead <= max(4, live_n // 4) for live_n, _, dead in sizes.values())
    assert book.check() == []
    before = [book.sweep(bid, bid + 2) for bid in range(8_000, 12_000, 97)]
    for (ids, reasons), bid in zip(before, range(8_000, 12_000, 97), strict=True):
        naive = naive_sweep(book, bid, bid + 2)
        assert np.array_equal(ids, naive[0]) and np.array_equal(reasons, naive[1])
    book.compact()
    assert all(pending == dead == 0 for _, pending, dead in book.index_sizes().values())
    after = [book.sweep(bid, bid + 2) for bid in range(8_000, 12_000, 97)]
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
               for a, b in zip(before, after, strict=True))
    assert book.check() == []


def test_open_many_equals_single_opens() -> None:
    rng = np.random.default_rng(11)
    n = 300
    side = rng.integers(0, 2, n)
    margin = rng.integers(1, 10**9, n)
    lev = rng.integers(1, 101, n)
    zeros = np.zeros(n, dtype=np.int64)
    plans, ok = plan_open_arrays(SOL, side, margin, lev, 10_000, 10_001, zeros, zeros)
    cols = {k: v[ok] for k, v in plans.items()}
    owners = np.arange(int(ok.sum()))
    bulk = PositionBook(SOL, book_tag=4)
    single = PositionBook(SOL, book_tag=4)
    bulk_ids = bulk.open_many(owners, cols, 99)
    def row_plan(i: int) -> OpenPlan:
        fields: dict[str, Any] = {f: int(cols[f][i]) for f in cols}
        return OpenPlan(**{**fields, "side": Side(fields["side"])})

    single_ids = [single.open(int(o), row_plan(i), 99) for i, o in enumerate(owners)]
    assert bulk_ids.tolist() == single_ids
    for a, b in zip(bulk.to_arrays().values(), single.to_arrays().values(), strict=True):
        assert np.array_equal(a, b)
    # reuse freed rows first, like single opens
    bulk.close(int(bulk_ids[5]))
    again = bulk.open_many(owners[:2], {k: v[:2] for k, v in cols.items()}, 1)
    assert row_of(int(again[0])) == 5 and bulk.check() == []
    bad = dict(cols)
    bad["liq_ticks"] = cols["liq_ticks"] + 1
    with pytest.raises(ValueError):
        bulk.open_many(owners, bad, 1)


def test_snapshot_round_trip_restores_ids_free_list_and_triggers() -> None:
    book = PositionBook(SOL, book_tag=8, capacity=3)
    ids = [book.open(i, plan(leverage=10 + i, tp=10_500 + i), i) for i in range(10)]
    for pid in ids[::3]:
        book.close(pid)
    arrays = book.to_arrays()
    assert set(arrays) == {*COLUMN_NAMES, "free_head"}
    copy = PositionBook.from_arrays(SOL, 8, arrays)
    assert copy.check() == [] and len(copy) == len(book)
    assert [copy.get(i) for i in ids] == [book.get(i) for i in ids]
    for bid in (9_000, 9_150, 10_505, 10_000):
        assert np.array_equal(copy.sweep(bid, bid)[0], book.sweep(bid, bid)[0])
    # the next ids are the same as the original book's would have been
    assert [copy.open(1, plan(), 0) for _ in range(5)] == [book.open(1, plan(), 0)
                                                          for _ in range(5)]
    with pytest.raises(ValueError):
        PositionBook.from_arrays(SOL, 9, arrays)  # wrong book_tag
    broken = dict(arrays)
    broken["free_head"] = np.array([int(row_of(ids[1]))])  # a live row
    with pytest.raises(ValueError):
        PositionBook.from_arrays(SOL, 8, broken)


def _large_book(n: int) -> tuple[PositionBook, np.ndarray]:
    """A book of ``n`` positions with TP and SL (more rows than a restore checks at a time),
    every fifth closed; (book, the ids opened)."""
    rng = np.random.default_rng(3)
    side = rng.integers(0, 2, n)
    tp = np.where(side == 0, 10_900, 9_100)
    sl = np.where(side == 0, 9_800, 10_200)
    plans, ok = plan_open_arrays(SOL, side, rng.integers(10**6, 10**9, n),
                                 rng.integers(1, 5, n), 10_000, 10_001, tp, sl)
    assert ok.all()
    book = PositionBook(SOL, book_tag=8)
    ids = book.open_many(rng.integers(1, 50, n), plans, 7)
    for pid in ids[::5].tolist():
        book.close(pid)
    return book, ids


def test_a_restore_without_copy_takes_the_columns_and_checks_every_row() -> None:
    """``copy=False`` (a snapshot read for the book) makes the given columns the book's own;
    the checks walk the rows in blocks, so a bad row in a late block is refused as one in
    the first is."""
    book, ids = _large_book(40_000)
    arrays, given = book.to_arrays(), book.to_arrays()
    copied = PositionBook.from_arrays(SOL, 8, arrays)
    taken = PositionBook.from_arrays(SOL, 8, given, copy=False)
    for name, column in copied.columns().items():
        assert not np.shares_memory(column, arrays[name])
        assert np.shares_memory(taken.columns()[name], given[name])
    for restored in (copied, taken):
        assert restored.check() == [] and len(restored) == len(book) == 32_000
        assert [restored.get(i) for i in ids[:50].tolist()] == [book.get(i)
                                                               for i in ids[:50].tolist()]
        for bid in (9_000, 9_800, 10_000, 10_200, 10_900):
            assert np.array_equal(restored.sweep(bid, bid)[0], book.sweep(bid, bid)[0])
    # the taken columns grow like any others, and the ids go on as the original book's
    assert [taken.open(1, plan(), 0) for _ in range(8_005)] == \
        [book.open(1, plan(), 0) for _ in range(8_005)]
    assert taken.capacity > 40_000 and taken.check() == []

    # one array given for two columns is taken for one of them at most
    flat, flat_ids = PositionBook(SOL, book_tag=8), []
    for _ in range(1_500):
        flat_ids.append(flat.open(1, plan(), 0))
    shared = flat.to_arrays()
    assert not shared["sl_ticks"].any()
    shared["sl_ticks"] = shared["tp_ticks"]
    one = PositionBook.from_arrays(SOL, 8, shared, copy=False)
    record = one.amend(flat_ids[0], tp_ticks=10_500)
    assert record is not None and (record.tp_ticks, record.sl_ticks) == (10_500, 0)
    assert one.check() == []

    late = 35_001  # live (not a multiple of 5): third block of rows, second of live ones
    assert PositionBook.from_arrays(SOL, 8, arrays).get(int(ids[late])) is not None
    for name, value in (("position_id", ids[late] + 1), ("liq_ticks", 1), ("owner", -1),
                        ("leverage", 0)):
        broken = {k: v.copy() for k, v in arrays.items()}
        broken[name][late] = value
        for copy in (True, False):
            with pytest.raises(ValueError):
                PositionBook.from_arrays(SOL, 8, {k: v.copy() for k, v in broken.items()},
                                         copy=copy)


def test_nbytes_counts_columns_and_indexes() -> None:
    book = PositionBook(SOL, capacity=1000)
    empty = book.nbytes
    assert empty >= 1000 * 81
    for _ in range(100):
        book.open(1, plan(tp=11_000), 0)
    assert book.nbytes > empty


def test_position_id_helpers() -> None:
    pid = make_position_id(3, 1234, 200)
    assert (generation_of(pid), row_of(pid), book_tag_of(pid)) == (3, 1234, 200)
    assert rows_of(np.array([pid], dtype=np.int64)).tolist() == [1234]
    assert is_position_id(pid) and is_position_id(np.int64(pid))
    for bad in (0, -pid, True, "1", 2**63, 255):
        assert not is_position_id(bad)
    for args in ((0, 0, 0), (1, -1, 0), (1, 0, 256), (MAX_GENERATION + 1, 0, 0)):
        with pytest.raises(ValueError):
            make_position_id(*args)
    with pytest.raises(ValueError):
        PositionBook(SOL, book_tag=256)


def test_replay_is_deterministic_whatever_the_index_maintenance() -> None:
    """The same operations give the same ids and the same sweeps whether the indexes merge
    eagerly, lazily, or the book was restored from a snapshot half way (journal replay)."""
    rng = np.random.default_rng(5)
    eager = PositionBook(SOL, 2, min_pending=1, min_dead=1)
    lazy = PositionBook(SOL, 2)
    books = [eager, lazy]
    live: list[int] = []
    for step in range(1_500):
        if step == 700:
            books.append(PositionBook.from_arrays(SOL, 2, lazy.to_arrays()))
        r = rng.random()
        if r < 0.5:
            p = plan(Side(int(rng.integers(2))), int(rng.integers(1, 500)),
                     int(rng.integers(1, 101)), int(rng.integers(9_500, 10_500)))
            owner = int(rng.integers(5))
            ids = {b.open(owner, p, step) for b in books}
            assert len(ids) == 1
            live.append(ids.pop())
        elif r < 0.8 and live:
            pid = live.pop(int(rng.integers(len(live))))
            assert len({b.close(pid) for b in books}) == 1
        else:
            bid = int(rng.integers(9_000, 11_000))
            results = [b.sweep(bid, bid + 1) for b in books]
            for ids, reasons in results[1:]:
                assert np.array_equal(ids, results[0][0])
                assert np.array_equal(reasons, results[0][1])
            for pid in results[0][0].tolist():
                assert len({b.close(pid) for b in books}) == 1
                live.remove(pid)
    assert all(b.check() == [] for b in books)
