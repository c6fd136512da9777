"""The fast engine and the Fraction reference behind one interface, so the same test cases run
against both (see the ``impl`` fixture in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine import reference
from engine import settlement
from engine.assets import Asset
from engine.book import PositionBook
from engine.orders import CloseReason
from engine.orders import plan_open


@dataclass(frozen=True)
class Impl:
    name: str
    plan_open: Callable[..., Any]
    settle: Callable[..., Any]
    pnl_micros: Callable[..., int]
    new_book: Callable[[Asset], Any]

    def sweep(self, book: Any, bid_ticks: int, ask_ticks: int) -> list[tuple[int, CloseReason]]:
        """(id, reason) pairs, ids ascending, whatever the implementation returns."""
        if isinstance(book, PositionBook):
            ids, reasons = book.sweep(bid_ticks, ask_ticks)
            return [(int(i), CloseReason(int(r))) for i, r in zip(ids, reasons, strict=True)]
        return list(book.sweep(bid_ticks, ask_ticks))


FAST = Impl("fast", plan_open, settlement.settle, settlement.pnl_micros,
            lambda asset: PositionBook(asset, book_tag=3, capacity=2, min_pending=2,
                                       min_dead=2))
REFERENCE = Impl("reference", reference.plan_open, reference.settle, reference.pnl_micros,
                 lambda asset: reference.ReferenceBook(asset))

IMPLS = (FAST, REFERENCE)
