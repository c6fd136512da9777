"""A slow, obviously-correct reference of the trading rules, straight from the SPEC formulas.

Prices, quantities and money are :class:`fractions.Fraction` in USD and asset units; nothing is
rounded except where the SPEC says so (quantity floored to a step, realized PnL floored to a
micro-dollar). Positions are the book's records (engine.book.PositionRecord) in a dict, each
with its exact liquidation price; the sweep compares that price with the bid/ask. Tests run the
fast kernels and this reference through the same cases and check they agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any, Generic, Protocol, TypeVar

from engine.assets import Asset
from engine.book import PositionRecord, record_of_plan
from engine.orders import NO_LEVEL, CloseReason, OpenPlan, Side
from engine.results import Code, Rejected
from engine.settlement import Settlement

MICRO = Fraction(1, 10**6)


def _price(asset: Asset, ticks: int) -> Fraction:
    return Fraction(ticks, 10**asset.price_decimals)


def _qty(asset: Asset, steps: int) -> Fraction:
    return Fraction(steps, 10**asset.qty_decimals)


def exact_liquidation_price(asset: Asset, side: Side, entry_ticks: int, qty_steps: int,
                            margin_micros: int, maintenance_margin_ppm: int) -> Fraction:
    """SPEC: long ``entry - (margin - mm) / quantity``, short ``entry + (margin - mm) /
    quantity``, ``mm = rate * entry * quantity`` (USD)."""
    entry = _price(asset, entry_ticks)
    qty = _qty(asset, qty_steps)
    mm = Fraction(maintenance_margin_ppm, 10**6) * entry * qty
    distance = (margin_micros * MICRO - mm) / qty
    return entry - distance if side == Side.LONG else entry + distance


def liquidation_ticks(asset: Asset, side: Side, liq_price: Fraction) -> int:
    """The tick the book stores for an exact liquidation price (USD): floored for a long, and
    at least 0, ceiled for a short, so a tick price crosses one exactly when it crosses the
    other."""
    in_ticks = liq_price / _price(asset, 1)
    return max(0, math.floor(in_ticks)) if side == Side.LONG else math.ceil(in_ticks)


def plan_open(asset: Asset, side: Side, margin_micros: int, leverage: int, bid_ticks: int,
              ask_ticks: int, tp_ticks: int | None, sl_ticks: int | None,
              maintenance_margin_ppm: int = 0) -> OpenPlan | Rejected:
    """Reference of :func:`engine.orders.plan_open` (same answers, Fractions inside)."""
    if not 0 <= maintenance_margin_ppm < 10**6:
        raise ValueError("maintenance_margin_ppm must be in 0..999999")
    side = Side(side)
    if isinstance(leverage, bool) or not isinstance(leverage, int) \
            or not 1 <= leverage <= asset.max_leverage:
        return Rejected(Code.LEVERAGE_OUT_OF_RANGE, "leverage out of range")
    if margin_micros <= 0 or margin_micros > 2**62:
        return Rejected(Code.INVALID_REQUEST, "bad margin")
    if not 0 < bid_ticks <= ask_ticks or ask_ticks > 2**60:
        return Rejected(Code.PRICE_UNAVAILABLE, "no valid price")
    entry_ticks = ask_ticks if side == Side.LONG else bid_ticks
    entry = _price(asset, entry_ticks)
    margin = margin_micros * MICRO
    qty_steps = math.floor(margin * leverage / entry / _qty(asset, 1))
    if qty_steps < 1:
        return Rejected(Code.INVALID_REQUEST, "less than one step")
    if qty_steps > asset.max_qty_steps:
        return Rejected(Code.INVALID_REQUEST, "position too large")
    qty = _qty(asset, qty_steps)
    mm = Fraction(maintenance_margin_ppm, 10**6) * entry * qty
    if margin <= mm:
        return Rejected(Code.WOULD_LIQUIDATE, "margin does not exceed the maintenance margin")
    liq = exact_liquidation_price(asset, side, entry_ticks, qty_steps, margin_micros,
                                  maintenance_margin_ppm)
    liq_ticks = liquidation_ticks(asset, side, liq)
    closing = _price(asset, bid_ticks if side == Side.LONG else ask_ticks)
    if (closing <= liq) if side == Side.LONG else (closing >= liq):
        return Rejected(Code.WOULD_LIQUIDATE, "liquidation price already crossed")
    if (tp_ticks is not None and tp_ticks <= 0) or (sl_ticks is not None and sl_ticks <= 0):
        return Rejected(Code.INVALID_TRIGGER, "levels must be positive")
    if max(tp_ticks or 0, sl_ticks or 0) > 2**62:
        return Rejected(Code.INVALID_TRIGGER, "level too large")
    tp = None if tp_ticks is None else _price(asset, tp_ticks)
    sl = None if sl_ticks is None else _price(asset, sl_ticks)
    if side == Side.LONG:
        if tp is not None and not tp > entry:
            return Rejected(Code.INVALID_TRIGGER, "TP not above entry")
        if sl is not None and not liq < sl < entry:
            return Rejected(Code.INVALID_TRIGGER, "SL not between liquidation and entry")
    else:
        if tp is not None and not tp < entry:
            return Rejected(Code.INVALID_TRIGGER, "TP not below entry")
        if sl is not None and not entry < sl < liq:
            return Rejected(Code.INVALID_TRIGGER, "SL not between entry and liquidation")
    return OpenPlan(side=side, entry_ticks=entry_ticks, qty_steps=qty_steps,
                    margin_micros=margin_micros, leverage=leverage, liq_ticks=liq_ticks,
                    tp_ticks=tp_ticks or NO_LEVEL, sl_ticks=sl_ticks or NO_LEVEL,
                    mm_micros=math.floor(mm / MICRO),
                    maintenance_margin_ppm=maintenance_margin_ppm)


def pnl_micros(asset: Asset, side: Side, entry_ticks: int, qty_steps: int,
               exit_ticks: int) -> int:
    """SPEC: long ``(exit - entry) * quantity``, short ``(entry - exit) * quantity``, in
    micro-dollars rounded toward minus infinity."""
    move = _price(asset, exit_ticks) - _price(asset, entry_ticks)
    pnl = move * _qty(asset, qty_steps) if side == Side.LONG else -move * _qty(asset, qty_steps)
    return math.floor(pnl / MICRO)


def settle(asset: Asset, side: Side, entry_ticks: int, qty_steps: int, margin_micros: int,
           exit_ticks: int, reason: CloseReason) -> Settlement:
    """SPEC settlement of a close."""
    pnl = pnl_micros(asset, side, entry_ticks, qty_steps, exit_ticks)
    payout = 0 if reason == CloseReason.LIQUIDATION else max(0, margin_micros + pnl)
    return Settlement(pnl, payout, -pnl, margin_micros + pnl - payout)


class _Owned(Protocol):
    @property
    def owner(self) -> int: ...

    @property
    def margin_micros(self) -> int: ...


RecordT = TypeVar("RecordT", bound=_Owned)
OutcomeT = TypeVar("OutcomeT")


class ReferenceRecords(Generic[RecordT]):
    """A reference book's live items: their records (those of the fast book,
    engine.rows.RowStore) in a dict by id; ids count up from 1."""

    def __init__(self) -> None:
        self.records: dict[int, RecordT] = {}
        self._next_id = 1

    def __len__(self) -> int:
        return len(self.records)

    def _insert(self, build: Callable[[Any, int, int, int], RecordT], terms: Any, owner: int,
                ts_us: int) -> int:
        """Add ``build(terms, id, owner, ts_us)`` under the next id; returns the id."""
        item_id = self._next_id
        self._next_id += 1
        self.records[item_id] = build(terms, item_id, owner, ts_us)
        return item_id

    def get(self, item_id: int) -> RecordT | None:
        return self.records.get(item_id)

    def _ended(self, outcome_of: Callable[[RecordT], OutcomeT | None]
               ) -> list[tuple[int, OutcomeT]]:
        """(id, outcome) of every item whose ``outcome_of`` is not None, ids ascending."""
        out = []
        for item_id in sorted(self.records):
            what = outcome_of(self.records[item_id])
            if what is not None:
                out.append((item_id, what))
        return out

    def open_margin_by_owner(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in self.records.values():
            out[r.owner] = out.get(r.owner, 0) + r.margin_micros
        return out

    def open_count_by_owner(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in self.records.values():
            out[r.owner] = out.get(r.owner, 0) + 1
        return out


class ReferenceBook(ReferenceRecords[PositionRecord]):
    """Open positions of one asset as a dict of the book's records
    (:class:`engine.book.PositionRecord`), each with its exact liquidation price beside it;
    ids count up from 1."""

    def __init__(self, asset: Asset, book_tag: int = 0, capacity: int = 0) -> None:
        del capacity
        super().__init__()
        self.asset = asset
        self.book_tag = book_tag
        self.liq_prices: dict[int, Fraction] = {}  # exact, USD, by position id

    @property
    def positions(self) -> dict[int, PositionRecord]:
        """The open positions by id."""
        return self.records

    def open(self, owner: int, plan: OpenPlan, opened_ts_us: int) -> int:
        pid = self._insert(record_of_plan, plan, owner, opened_ts_us)
        self.liq_prices[pid] = exact_liquidation_price(
            self.asset, plan.side, plan.entry_ticks, plan.qty_steps, plan.margin_micros,
            plan.maintenance_margin_ppm)
        return pid

    def close(self, position_id: int) -> PositionRecord | None:
        self.liq_prices.pop(position_id, None)
        return self.positions.pop(position_id, None)

    def amend(self, position_id: int, *, margin_micros: int | None = None,
              liq_ticks: int | None = None, tp_ticks: int | None = None,
              sl_ticks: int | None = None, qty_steps: int | None = None
              ) -> PositionRecord | None:
        """Reference of :meth:`engine.book.PositionBook.amend`: the position with the given
        fields replaced (None: unchanged, NO_LEVEL: level removed) and its exact liquidation
        price recomputed, or None if it is not open. ValueError, nothing changed, unless every
        value is in ``0..2**62``, quantity and margin are positive, ``liq_ticks`` is that price
        in ticks, the SL lies beyond that price and the TP beyond the SL (else that price)."""
        p = self.positions.get(position_id)
        if p is None:
            return None
        given = {"margin_micros": margin_micros, "liq_ticks": liq_ticks, "tp_ticks": tp_ticks,
                 "sl_ticks": sl_ticks, "qty_steps": qty_steps}
        changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if not all(0 <= value <= 2**62 for value in changes.values()):
            raise ValueError("out of range")
        new = p._replace(**changes)
        if new.qty_steps <= 0 or new.margin_micros <= 0:
            raise ValueError("quantity and margin must be positive")
        liq = exact_liquidation_price(self.asset, new.side, new.entry_ticks, new.qty_steps,
                                      new.margin_micros, new.maintenance_margin_ppm)
        if new.liq_ticks != liquidation_ticks(self.asset, new.side, liq):
            raise ValueError("liquidation price does not match")
        sl = _price(self.asset, new.sl_ticks) if new.sl_ticks else None
        tp = _price(self.asset, new.tp_ticks) if new.tp_ticks else None
        stop = liq if sl is None else sl
        # a long's levels rise liquidation < SL < TP, a short's fall in that order
        sign = 1 if new.side == Side.LONG else -1
        if sl is not None and not sign * sl > sign * liq:
            raise ValueError("SL not beyond the liquidation price")
        if tp is not None and not sign * tp > sign * stop:
            raise ValueError("TP not beyond the stop")
        self.positions[position_id] = new
        self.liq_prices[position_id] = liq
        return new

    def reason(self, position: PositionRecord, bid_ticks: int, ask_ticks: int
               ) -> CloseReason | None:
        """Why this tick closes the position (TP/SL before liquidation), or None."""
        p = position
        liq_price = self.liq_prices[p.position_id]
        if p.side == Side.LONG:
            price = _price(self.asset, bid_ticks)
            if p.tp_ticks and price >= _price(self.asset, p.tp_ticks):
                return CloseReason.TAKE_PROFIT
            if p.sl_ticks and price <= _price(self.asset, p.sl_ticks):
                return CloseReason.STOP_LOSS
            if price <= liq_price:
                return CloseReason.LIQUIDATION
        else:
            price = _price(self.asset, ask_ticks)
            if p.tp_ticks and price <= _price(self.asset, p.tp_ticks):
                return CloseReason.TAKE_PROFIT
            if p.sl_ticks and price >= _price(self.asset, p.sl_ticks):
                return CloseReason.STOP_LOSS
            if price >= liq_price:
                return CloseReason.LIQUIDATION
        return None

    def sweep(self, bid_ticks: int, ask_ticks: int) -> list[tuple[int, CloseReason]]:
        """(id, reason) of every position this tick closes, ids ascending."""
        return self._ended(lambda p: self.reason(p, bid_ticks, ask_ticks))

    def unrealized_pnl_micros(self, position_id: int, bid_ticks: int, ask_ticks: int) -> int:
        p = self.positions[position_id]
        exit_ticks = bid_ticks if p.side == Side.LONG else ask_ticks
        return pnl_micros(self.asset, p.side, p.entry_ticks, p.qty_steps, exit_ticks)


__all__ = [
    "ReferenceBook",
    "ReferenceRecords",
    "exact_liquidation_price",
    "liquidation_ticks",
    "plan_open",
    "pnl_micros",
    "settle",
]
