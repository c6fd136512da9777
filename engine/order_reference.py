"""A slow, obviously-correct reference of the pending-order book, straight from the SPEC's words.

Open orders are the book's records (engine.order_book.OrderRecord) in a dict; each tick
evaluates every order's expiry and fill condition with plain ints (prices are ticks on one
grid, times microseconds, so nothing is rounded). Tests drive engine.order_book.OrderBook, its
naive sweep and this reference through the same steps and check they agree.
"""

from __future__ import annotations

from engine.order_book import (
    GOOD_TILL_CANCELLED,
    OrderKind,
    OrderOutcome,
    OrderRecord,
    OrderTerms,
    record_of_terms,
)
from engine.orders import Side
from engine.reference import ReferenceRecords


def outcome(order: OrderRecord, bid_ticks: int, ask_ticks: int, ts_us: int
            ) -> OrderOutcome | None:
    """What a tick (top of book ``bid``/``ask`` at ``ts_us``) does to an open order, or None.

    SPEC: an order whose expiry has passed is expired, not filled; otherwise a limit long
    fills when ask <= trigger, a limit short when bid >= trigger, a stop long when
    ask >= trigger, a stop short when bid <= trigger.
    """
    if order.expires_ts_us != GOOD_TILL_CANCELLED and ts_us > order.expires_ts_us:
        return OrderOutcome.EXPIRED
    trigger = order.trigger_ticks
    if order.kind == OrderKind.LIMIT:
        fills = ask_ticks <= trigger if order.side == Side.LONG else bid_ticks >= trigger
    else:
        fills = ask_ticks >= trigger if order.side == Side.LONG else bid_ticks <= trigger
    return OrderOutcome.FILL if fills else None


class ReferenceOrderBook(ReferenceRecords[OrderRecord]):
    """Open pending orders of one asset as a dict of the book's records; ids count up from 1."""

    @property
    def orders(self) -> dict[int, OrderRecord]:
        """The open orders by id."""
        return self.records

    def place(self, owner: int, terms: OrderTerms, placed_ts_us: int) -> int:
        return self._insert(record_of_terms, terms, owner, placed_ts_us)

    def remove(self, order_id: int) -> OrderRecord | None:
        return self.orders.pop(order_id, None)

    def ids_of_owner(self, owner: int) -> list[int]:
        return sorted(i for i, o in self.orders.items() if o.owner == owner)

    def sweep(self, bid_ticks: int, ask_ticks: int, ts_us: int
              ) -> list[tuple[int, OrderOutcome]]:
        """(id, outcome) of every open order this tick ends, ids ascending."""
        return self._ended(lambda o: outcome(o, bid_ticks, ask_ticks, ts_us))


__all__ = ["ReferenceOrderBook", "outcome"]
