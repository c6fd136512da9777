"""The row store under both books: what a book must declare, a bulk insert that does not fit
changes nothing, and the free-list checks (snapshot restore and ``check()``) of each book."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from engine import rows
from engine import schema
from engine.assets import DEFAULT_ASSETS
from engine.book import PositionBook
from engine.order_book import OrderBook
from engine.order_book import OrderKind
from engine.order_book import OrderTerms
from engine.orders import MAX_COLUMN_VALUE
from engine.orders import OpenPlan
from engine.orders import Side
from engine.orders import liquidation_ticks
from engine.orders import plan_open
from engine.position_ids import row_of
from engine.rows import RowStore

SOL = DEFAULT_ASSETS["SOL"]
T0 = 1_700_000_000_000_000
_ORDER_ATTRS = {f.name: f"_{f.name}" for f in schema.ORDER_ROW}


def _plan() -> OpenPlan:
    plan = plan_open(SOL, Side.LONG, 100_000_000, 10, 10_000, 10_000, None, None)
    assert isinstance(plan, OpenPlan)
    return plan


def _order() -> OrderTerms:
    return OrderTerms(Side.LONG, OrderKind.LIMIT, 14_900, 100_000_000, 10)


# a book, how to add an item to it and remove one, and the name of its link column
BOOKS: list[Any] = [
    pytest.param(PositionBook, lambda b: b.open(1, _plan(), T0), PositionBook.close,
                 "qty_steps", id="positions"),
    pytest.param(OrderBook, lambda b: b.place(1, _order(), T0), OrderBook.remove,
                 "trigger_ticks", id="orders"),
]


def _declare(**layout: Any) -> type:
    """A RowStore subclass of ORDER_ROW declared with ``layout`` over sound defaults."""
    given: dict[str, Any] = {"columns": schema.ORDER_ROW, "attributes": _ORDER_ATTRS,
                             "record": tuple, "id_column": "order_id",
                             "link_column": "trigger_ticks", "noun": "thing", "indexes": (),
                             **layout}
    return types.new_class("Things", (RowStore,), given)


def test_a_store_declares_every_column_and_int64_bookkeeping_columns() -> None:
    assert issubclass(_declare(), RowStore)
    with pytest.raises(schema.SchemaError, match="Things's columns"):
        _declare(attributes={k: v for k, v in _ORDER_ATTRS.items() if k != "kind"})
    with pytest.raises(schema.SchemaError, match="int64 column 'side'"):
        _declare(link_column="side")  # int8: cannot hold a row number
    with pytest.raises(schema.SchemaError, match="int64 column 'nothing'"):
        _declare(id_column="nothing")


def test_a_bulk_open_that_does_not_fit_changes_nothing(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    monkeypatch.setattr(rows, "MAX_ROWS", 8)
    book = PositionBook(SOL, capacity=2)
    ids = [book.open(i, _plan(), T0) for i in range(6)]
    book.close(ids[1])
    book.close(ids[4])
    plan = _plan()
    cols = {f.name: np.full(5, getattr(plan, f.name), dtype=np.int64) for f in schema.TERMS}
    before = book.to_arrays()
    with pytest.raises(OverflowError):
        book.open_many(np.arange(5), cols, T0)  # 2 free rows + 3 new > 8 rows
    after = book.to_arrays()
    assert all(np.array_equal(before[k], after[k]) for k in before) and book.check() == []
    assert book.free_rows().tolist() == [row_of(ids[4]), row_of(ids[1])]
    book.open_many(np.arange(4), {k: v[:4] for k, v in cols.items()}, T0)
    assert len(book) == 8 and book.capacity == 8 and book.check() == []
    with pytest.raises(OverflowError):
        book.next_position_id()
    with pytest.raises(OverflowError):
        book.open(1, _plan(), T0)


@pytest.mark.parametrize(("cls", "add", "remove", "link"), BOOKS)
def test_each_book_checks_its_free_list(cls: type[PositionBook | OrderBook],
                                        add: Callable[[Any], int],
                                        remove: Callable[[Any, int], object], link: str) -> None:
    book = cls(SOL, book_tag=3)
    ids = [add(book) for _ in range(4)]
    assert remove(book, ids[1]) is not None
    good = book.to_arrays()
    assert cls.from_arrays(SOL, 3, good).check() == []
    stray = dict(good, free_head=np.array([-1]))  # row 1 is free, neither listed nor retired
    with pytest.raises(ValueError, match="neither on it nor retired"):
        cls.from_arrays(SOL, 3, stray)
    loop = {k: v.copy() for k, v in good.items()}
    loop[link][row_of(ids[1])] = row_of(ids[1])  # the free list loops on itself
    with pytest.raises(ValueError, match="corrupt free list"):
        cls.from_arrays(SOL, 3, loop)
    book.columns()[link][row_of(ids[1])] = row_of(ids[2])  # white-box: points at an open row
    assert any("free list" in p for p in book.check())


def _topped_up_position(book: PositionBook, margin: int) -> None:
    pid = book.open(1, _plan(), T0)
    liq = liquidation_ticks(SOL, Side.LONG, 10_000, _plan().qty_steps, margin, 0)
    assert book.amend(pid, margin_micros=margin, liq_ticks=liq) is not None


def _large_order(book: OrderBook, margin: int) -> None:
    book.place(1, _order()._replace(margin_micros=margin), T0)


@pytest.mark.parametrize(("cls", "add_large"), [
    pytest.param(PositionBook, _topped_up_position, id="positions"),
    pytest.param(OrderBook, _large_order, id="orders")])
def test_margins_per_owner_are_summed_exactly_beyond_int64(
        cls: type[Any], add_large: Callable[[Any, int], None]) -> None:
    # each margin fits its int64 cell (at most 2**62), their sum need not: four of them make
    # 2**64, which an int64 sum wraps to 0, and the ledger's audit and start-time
    # reconciliation compare margin accounts with this sum (and release what exceeds it)
    book = cls(SOL, book_tag=3)
    for _ in range(4):
        add_large(book, MAX_COLUMN_VALUE)
    add_large(book, 5)
    assert book.open_margin_by_owner() == {1: 4 * MAX_COLUMN_VALUE + 5}
