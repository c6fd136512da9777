"""The position book of one asset: columnar numpy arrays, one row per open position.

No Python object exists per position: a position is a row of the columns below, found from its
id in O(1), and :meth:`PositionBook.amend` changes its margin, quantity and levels in place.
The rows, ids, free list (through the ``qty_steps`` cell of a free row), growth and snapshots
are :class:`engine.rows.RowStore`'s, so open and close are O(1) amortised and a snapshot of the
columns restores the free list and the next ids exactly.

Columns (capacity rows each; rows ``>= high water`` are unused): the fields of
engine.schema.BOOK_ROW, each named ``Field.column`` with dtype ``Field.dtype``::

    position_id  int64   > 0 open; < 0 free (minus the row's last id)
    owner        int64   user id (>= 0)
    side         int8    Side (0 long, 1 short)
    entry_ticks  int64   entry price
    qty_steps    int64   quantity (next free row on a free row, -1 = end, -2 = retired)
    margin_micros int64  locked margin
    leverage     int32
    liq_ticks    int64   liquidation price (0: a long never liquidated at a positive price)
    tp_ticks     int64   take-profit (NO_LEVEL = 0: none)
    sl_ticks     int64   stop-loss   (NO_LEVEL = 0: none)
    opened_ts_us int64
    mm_ppm       int32   maintenance margin rate the position was opened under

Four :class:`~engine.triggers.TriggerIndex` make the per-tick sweep proportional to what
triggers: long stop (``max(liq, SL)``, hit when ``bid <= level``), long TP (``bid >= TP``),
short stop (``min(liq, SL)``, ``ask >= level``), short TP (``ask <= TP``). Every row keeps its
SL strictly beyond its liquidation price and its TP strictly beyond its stop level, so a
position with an SL reports ``stop_loss`` from its stop entry, one without ``liquidation``, and
no tick hits both of a position's entries. An amended level leaves its old entry in the index:
the indexes hold an entry alive only while its key is the one its row gives now.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import numpy as np

from engine import schema
from engine.assets import Asset
from engine.marking import unrealized_pnl_micros as _pnl_kernel
from engine.orders import (
    MAX_COLUMN_VALUE,
    PPM,
    CloseReason,
    OpenPlan,
    Side,
    check_plan,
    liquidation_ticks_array,
)
from engine.position_ids import ROW_MASK, ROW_SHIFT, book_tag_of
from engine.rows import RowStore, int64_columns
from engine.triggers import KeyFunction, naive_sweep

_COLUMNS = schema.BOOK_ROW
COLUMN_NAMES = tuple(f.column for f in _COLUMNS)
"""The book's column names (and snapshot array names), in schema order."""
# the attribute holding each field's column (the hot paths below name them directly)
_ATTR_OF = {"position_id": "_pid", "owner": "_owner", "side": "_side", "entry_ticks": "_entry",
            "qty_steps": "_qty", "margin_micros": "_margin", "leverage": "_lev",
            "liq_ticks": "_liq", "tp_ticks": "_tp", "sl_ticks": "_sl", "opened_ts_us": "_ts",
            "maintenance_margin_ppm": "_ppm"}
_INDEX_NAMES = ("long_stop", "long_tp", "short_stop", "short_tp")
_SIDES = (Side.LONG, Side.SHORT)
_SL = np.int8(CloseReason.STOP_LOSS)
_LIQ = np.int8(CloseReason.LIQUIDATION)
_TP = np.int8(CloseReason.TAKE_PROFIT)
_AMENDABLE = ("qty_steps", "margin_micros", "liq_ticks", "tp_ticks", "sl_ticks")


PositionRecord = schema.record(
    "PositionRecord", schema.BOOK_ROW, __name__, enums={"side": Side},
    zero_default=("maintenance_margin_ppm",),
    doc="""One open (or just closed) position as plain ints, read out of the book's columns: the
    fields of engine.schema.BOOK_ROW.""")
_RECORD = schema.builder(PositionRecord, _COLUMNS, casts={"side": _SIDES.__getitem__})
record_of_plan = schema.builder(PositionRecord, schema.PLAN, attributes=True,
                                given=("position_id", "owner", "opened_ts_us"),
                                casts={"side": Side})
"""``(plan, position_id, owner, opened_ts_us) -> PositionRecord``: the row an open adds."""


class PositionBook(RowStore[PositionRecord], columns=_COLUMNS, attributes=_ATTR_OF,
                   record=_RECORD, id_column="position_id", link_column="qty_steps",
                   noun="position", indexes=_INDEX_NAMES):
    """Open positions of one asset (see the module docstring for the layout).

    ``book_tag`` (0..255) goes into every id this book issues, so ids are unique across the
    books of a cluster; :func:`book_tag_of` reads it back. ``capacity``: rows allocated up
    front (grows by doubling); ``min_pending`` and ``min_dead`` floor the trigger indexes'
    merge and compaction thresholds.
    """

    _pid: np.ndarray
    _owner: np.ndarray
    _side: np.ndarray
    _entry: np.ndarray
    _qty: np.ndarray
    _margin: np.ndarray
    _lev: np.ndarray
    _liq: np.ndarray
    _tp: np.ndarray
    _sl: np.ndarray
    _ts: np.ndarray
    _ppm: np.ndarray

    def _name_indexes(self) -> None:
        # keys: long stop -level (bid <= level <=> -level <= -bid), long TP level (bid >=
        # level), short stop level (ask >= level), short TP -level (ask <= level)
        self._long_stop, self._long_tp, self._short_stop, self._short_tp = self._indexes
        # by side: the (stop, TP) indexes a position's _trigger_keys go to
        self._by_side = ((self._long_stop, self._long_tp), (self._short_stop, self._short_tp))

    # -- single-position API -------------------------------------------------------------------
    def open(self, owner: int, plan: OpenPlan, opened_ts_us: int) -> int:
        """Add a position from a plan (checked with :func:`check_plan`; ValueError if
        inconsistent) and return its id (int > 0). O(1) amortised."""
        check_plan(self.asset, plan)
        pid = self._insert(record_of_plan, plan, owner, opened_ts_us).position_id
        ids = self._pid
        stop_index, tp_index = self._by_side[plan.side]
        stop, tp = _trigger_keys(plan.side, plan.liq_ticks, plan.tp_ticks, plan.sl_ticks)
        if stop:
            stop_index.add(stop, pid, ids)
        if tp:
            tp_index.add(tp, pid, ids)
        return pid

    def next_position_id(self) -> int:
        """The id the next :meth:`open` will issue (the same id :meth:`open_many` gives its
        first position); changes nothing. OverflowError when the book has no row left."""
        return self._next_id()

    def close(self, position_id: int) -> PositionRecord | None:
        """Remove an open position and return it as it was; None if it is not open here."""
        record = self._remove(position_id)
        if record is None:
            return None
        ids = self._pid
        stop_index, tp_index = self._by_side[record.side]
        stop, tp = _trigger_keys(record.side, record.liq_ticks, record.tp_ticks, record.sl_ticks)
        if stop:
            stop_index.discard(ids)
        if tp:
            tp_index.discard(ids)
        return record

    def amend(self, position_id: int, *, margin_micros: int | None = None,
              liq_ticks: int | None = None, tp_ticks: int | None = None,
              sl_ticks: int | None = None, qty_steps: int | None = None
              ) -> PositionRecord | None:
        """Change an open position in place, keeping its id, and return it as it is now; None
        if it is not open here. A None argument leaves its field as it is; ``tp_ticks`` or
        ``sl_ticks`` ``NO_LEVEL`` removes that level.

        ValueError, and nothing changes, unless the result is a valid row: values in range,
        ``liq_ticks`` the liquidation price of the resulting margin and quantity
        (:func:`~engine.orders.liquidation_ticks`), SL strictly beyond it, TP strictly beyond
        the stop level (SL, else liquidation). Where the levels lie against the entry or the
        current price is the caller's rule to check. O(log n) amortised, plus the entries at
        a level the position held before.
        """
        row = self._row(position_id)
        if row < 0:
            return None
        old = self._record(row)
        given = dict(zip(_AMENDABLE, (qty_steps, margin_micros, liq_ticks, tp_ticks, sl_ticks),
                         strict=True))
        changes: dict[str, Any] = {name: operator.index(v) for name, v in given.items()
                                   if v is not None}
        if not all(0 <= v <= MAX_COLUMN_VALUE for v in changes.values()):
            raise ValueError("amended values out of range")
        new = old._replace(**changes)
        _check_row_columns(self.asset, {f.column: np.array([v], dtype=np.int64)
                                        for f, v in zip(_COLUMNS, new, strict=True)})
        self._qty[row] = new.qty_steps
        self._margin[row] = new.margin_micros
        self._liq[row] = new.liq_ticks
        self._tp[row] = new.tp_ticks
        self._sl[row] = new.sl_ticks
        ids = self._pid
        was = _trigger_keys(old.side, old.liq_ticks, old.tp_ticks, old.sl_ticks)
        now = _trigger_keys(new.side, new.liq_ticks, new.tp_ticks, new.sl_ticks)
        for index, before, after in zip(self._by_side[new.side], was, now, strict=True):
            if after != before:
                # the new entry first: an old one at that key it revives must be counted
                # before the discard may compact (which counts the live entries)
                if after:
                    index.add_again(after, new.position_id, ids)
                if before:
                    index.discard(ids)
        return new

    # -- vectorised reads ----------------------------------------------------------------------
    def unrealized_pnl_micros(self, ids: np.ndarray, bid_ticks: int, ask_ticks: int
                              ) -> np.ndarray:
        """Unrealized PnL (int64 micro-dollars, floored) of the open positions ``ids``
        (int64 array) at ``bid``/``ask``; KeyError if an id is not open in this book."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = self._rows_of(ids)
        return _pnl_kernel(self.asset, self._side[rows], self._entry[rows], self._qty[rows],
                           bid_ticks, ask_ticks)

    # -- the sweep -----------------------------------------------------------------------------
    def sweep(self, bid_ticks: int, ask_ticks: int) -> tuple[np.ndarray, np.ndarray]:
        """Open positions this top of book triggers: ids (int64, ascending) and reasons (int8
        :class:`CloseReason`). SL/TP win over liquidation. The book is not changed; the caller
        closes each id. ValueError unless ``0 < bid <= ask``."""
        bid = operator.index(bid_ticks)
        ask = operator.index(ask_ticks)
        if not 0 < bid <= ask <= MAX_COLUMN_VALUE:
            raise ValueError(f"invalid top of book bid={bid} ask={ask}")
        idc = self._pid
        found: list[np.ndarray] = []
        why: list[np.ndarray] = []
        hits = self._long_stop.triggered(-bid, idc)
        if hits is not None:
            found.append(hits)
            why.append(np.where(self._sl[(hits >> ROW_SHIFT) & ROW_MASK] != 0, _SL, _LIQ))
        hits = self._long_tp.triggered(bid, idc)
        if hits is not None:
            found.append(hits)
            why.append(np.full(hits.size, _TP))
        hits = self._short_stop.triggered(ask, idc)
        if hits is not None:
            found.append(hits)
            why.append(np.where(self._sl[(hits >> ROW_SHIFT) & ROW_MASK] != 0, _SL, _LIQ))
        hits = self._short_tp.triggered(-ask, idc)
        if hits is not None:
            found.append(hits)
            why.append(np.full(hits.size, _TP))
        if not found:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int8)
        ids = np.concatenate(found) if len(found) > 1 else found[0]
        reasons = np.concatenate(why) if len(why) > 1 else why[0]
        order = np.argsort(ids, kind="stable")
        return ids[order], reasons[order].astype(np.int8, copy=False)

    def naive_sweep(self, bid_ticks: int, ask_ticks: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`engine.triggers.naive_sweep` of this book (same answer, O(N))."""
        return naive_sweep(self, bid_ticks, ask_ticks)

    # -- bulk load -----------------------------------------------------------------------------
    def open_many(self, owners: np.ndarray, plans: Mapping[str, np.ndarray],
                  opened_ts_us: int | np.ndarray) -> np.ndarray:
        """Open many positions at once (benchmarks, bulk loads); returns their ids (int64).

        ``plans`` maps :class:`OpenPlan` field names (engine.schema.TERMS: ``side``,
        ``entry_ticks``, ``qty_steps``, ``margin_micros``, ``leverage``, ``liq_ticks``,
        ``tp_ticks``, ``sl_ticks``; optional ``maintenance_margin_ppm``) to equal-length int
        arrays; ``mm_micros`` is ignored. The rows are checked vectorised as
        :func:`check_plan` would (ValueError). Free rows are reused first, as single opens
        would.
        """
        owners = np.asarray(owners, dtype=np.int64)
        n = int(owners.size)
        cols = _plan_columns(self.asset, plans, n)
        ts = np.broadcast_to(np.asarray(opened_ts_us, dtype=np.int64), (n,))
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        cols["owner"] = owners
        cols["opened_ts_us"] = ts
        return self._insert_many(cols)

    # -- trigger keys: what _trigger_keys gives one position, for many rows (0: no entry) --------
    def _short_stop_keys(self, rows: np.ndarray) -> np.ndarray:
        sl = self._sl[rows]
        return np.where(sl != 0, sl, self._liq[rows])

    def _long_stop_keys(self, rows: np.ndarray) -> np.ndarray:
        return -self._short_stop_keys(rows)

    def _long_tp_keys(self, rows: np.ndarray) -> np.ndarray:
        return self._tp[rows]

    def _short_tp_keys(self, rows: np.ndarray) -> np.ndarray:
        return -self._tp[rows]

    def _index_keys(self) -> tuple[KeyFunction, ...]:
        return (self._long_stop_keys, self._long_tp_keys, self._short_stop_keys,
                self._short_tp_keys)

    def _index_entries(self, rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        pids = self._pid[rows]
        long = self._side[rows] == 0
        out = []
        for keys_of, side in zip(self._index_keys(), (long, long, ~long, ~long), strict=True):
            keys = keys_of(rows)
            mine = side & (keys != 0)
            out.append((keys[mine], pids[mine]))
        return out

    def _check_terms(self, columns: Mapping[str, np.ndarray]) -> None:
        _check_row_columns(self.asset, columns)


def _trigger_keys(side: int, liq_ticks: int, tp_ticks: int, sl_ticks: int) -> tuple[int, int]:
    """A position's keys in its side's stop and TP indexes, 0 where it has no entry: no
    entry's key is 0, as every level is > 0 (a long's liquidation price of 0 means it is
    never liquidated)."""
    stop = sl_ticks or liq_ticks
    return (-stop, tp_ticks) if side == Side.LONG else (stop, -tp_ticks)


_RATE = schema.maintenance_margin_ppm


def _plan_columns(asset: Asset, plans: Mapping[str, np.ndarray], n: int
                  ) -> dict[str, np.ndarray]:
    """Plan arrays renamed to column names and checked."""
    cols: dict[str, np.ndarray] = {}
    for f in schema.TERMS:
        if f.name not in plans:
            raise ValueError(f"plans lacks {f.name!r}")
        cols[f.column] = np.asarray(plans[f.name], dtype=np.int64)
    ppm = plans.get(_RATE.name)
    cols[_RATE.column] = (np.zeros(n, dtype=np.int64) if ppm is None
                          else np.asarray(ppm, dtype=np.int64))
    for name, col in cols.items():
        if col.shape != (n,):
            raise ValueError(f"plans[{name!r}] has shape {col.shape}, expected ({n},)")
    _check_plan_columns(asset, cols)
    return cols


def _check_row_columns(asset: Asset, cols: Mapping[str, np.ndarray]) -> None:
    """ValueError (on the first problem) unless the rows (int arrays by column name) are valid
    open positions: what :func:`check_plan` checks but for the levels' side of the entry, an
    open's rule that an amended position need not keep (an SL may lock in profit). SL and TP
    must still lie beyond the liquidation price and the stop level, as the sweep needs."""
    side, entry, qty, margin, lev, liq, tp, sl, ppm = int64_columns(
        cols, "side", "entry_ticks", "qty_steps", "margin_micros", "leverage", "liq_ticks",
        "tp_ticks", "sl_ticks", _RATE.column)
    if not ((side == 0) | (side == 1)).all():
        raise ValueError("bad side")
    if not ((entry > 0) & (qty > 0) & (margin > 0) & (entry <= MAX_COLUMN_VALUE)
            & (qty <= MAX_COLUMN_VALUE) & (margin <= MAX_COLUMN_VALUE)).all():
        raise ValueError("entry, quantity and margin must be positive and in range")
    if not ((lev >= 1) & (lev <= min(asset.max_leverage, 2**31 - 1))).all():
        raise ValueError("leverage out of range")
    if not ((ppm >= 0) & (ppm < PPM)).all():
        raise ValueError("maintenance margin rate out of range")
    try:
        exact = liquidation_ticks_array(asset, side, entry, qty, margin, ppm)
    except OverflowError:  # one lies past int64 (a margin far above its notional): no stored
        exact = None  # price is it
    if exact is None or not np.array_equal(exact, liq):
        raise ValueError("liquidation prices do not match the plans")
    if not ((tp >= 0) & (sl >= 0) & (tp <= MAX_COLUMN_VALUE) & (sl <= MAX_COLUMN_VALUE)).all():
        raise ValueError("trigger levels out of range")
    long = side == 0
    stop = np.where(sl != 0, sl, liq)
    if not ((sl == 0) | np.where(long, sl > liq, sl < liq)).all():
        raise ValueError("stop-loss not beyond the liquidation price")
    if not ((tp == 0) | np.where(long, tp > stop, (tp > 0) & (tp < stop))).all():
        raise ValueError("take-profit not beyond the stop-loss or liquidation price")


def _check_plan_columns(asset: Asset, cols: Mapping[str, np.ndarray]) -> None:
    """Vectorised :func:`check_plan` over column arrays (ValueError on the first problem)."""
    _check_row_columns(asset, cols)
    entry, tp, sl = cols["entry_ticks"], cols["tp_ticks"], cols["sl_ticks"]
    long = cols["side"] == 0
    tp_ok = (tp == 0) | np.where(long, tp > entry, tp < entry)
    sl_ok = (sl == 0) | np.where(long, sl < entry, sl > entry)
    if not (tp_ok & sl_ok).all():
        raise ValueError("take-profit or stop-loss on the wrong side of the entry")


__all__ = ["COLUMN_NAMES", "PositionBook", "PositionRecord", "book_tag_of", "record_of_plan"]
