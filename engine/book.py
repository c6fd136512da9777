"""The position book of one asset: columnar numpy arrays, one row per open position.

No Python object exists per position: a position is a row of the columns below, found from its
id in O(1) (the id encodes the row, see :mod:`engine.position_ids`). Closed rows go on an
intrusive free list (the ``qty_steps`` cell of a free row holds the next free row, its
``position_id`` cell the negated last id), so open and close are O(1) amortised and a snapshot
of the columns restores the free list and the next ids exactly.

Columns (capacity rows each; rows ``>= high water`` are unused): the fields of
engine.schema.BOOK_ROW, each named ``Field.column`` with dtype ``Field.dtype``::

    position_id  int64   > 0 open; < 0 free (minus the row's last id)
    owner        int64   user id (>= 0)
    side         int8    Side (0 long, 1 short)
    entry_ticks  int64   entry price
    qty_steps    int64   quantity (next free row on a free row, -1 = end)
    margin_micros int64  locked margin
    leverage     int32
    liq_ticks    int64   liquidation price (0: a long never liquidated at a positive price)
    tp_ticks     int64   take-profit (NO_LEVEL = 0: none)
    sl_ticks     int64   stop-loss   (NO_LEVEL = 0: none)
    opened_ts_us int64
    mm_ppm       int32   maintenance margin rate the position was opened under

Four :class:`~engine.triggers.TriggerIndex` make the per-tick sweep proportional to what
triggers: long stop (``max(liq, SL)``, hit when ``bid <= level``), long TP (``bid >= TP``),
short stop (``min(liq, SL)``, ``ask >= level``), short TP (``ask <= TP``). SL lies strictly
between liquidation and entry, so a position with an SL reports ``stop_loss`` from its stop
entry and one without reports ``liquidation``.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from engine import schema
from engine.assets import Asset
from engine.marking import unrealized_pnl_micros as _pnl_kernel
from engine.orders import (
    MAX_COLUMN_VALUE,
    NO_LEVEL,
    PPM,
    CloseReason,
    OpenPlan,
    Side,
    check_plan,
    liquidation_ticks_array,
)
from engine.position_ids import (
    GEN_SHIFT,
    MAX_BOOK_TAG,
    MAX_GENERATION,
    MAX_ROWS,
    ROW_MASK,
    ROW_SHIFT,
    TAG_MASK,
    book_tag_of,
)
from engine.triggers import TriggerIndex, naive_sweep

_INT64_MAX = (1 << 63) - 1
_COLUMNS = schema.BOOK_ROW
COLUMN_NAMES = tuple(f.column for f in _COLUMNS)
"""The book's column names (and snapshot array names), in schema order."""
# the attribute holding each field's column (the hot paths below name them directly)
_ATTR_OF = {"position_id": "_pid", "owner": "_owner", "side": "_side", "entry_ticks": "_entry",
            "qty_steps": "_qty", "margin_micros": "_margin", "leverage": "_lev",
            "liq_ticks": "_liq", "tp_ticks": "_tp", "sl_ticks": "_sl", "opened_ts_us": "_ts",
            "maintenance_margin_ppm": "_ppm"}
schema.check_names("PositionBook's columns", tuple(_ATTR_OF), schema.names(_COLUMNS))
_ATTRS = tuple(_ATTR_OF[f.name] for f in _COLUMNS)
_SIDES = (Side.LONG, Side.SHORT)
_SL = np.int8(CloseReason.STOP_LOSS)
_LIQ = np.int8(CloseReason.LIQUIDATION)
_TP = np.int8(CloseReason.TAKE_PROFIT)


class PositionRecord(NamedTuple):
    """One open (or just closed) position as plain ints, read out of the book's columns: the
    fields of engine.schema.BOOK_ROW (checked at import)."""

    position_id: int
    owner: int
    side: Side
    entry_ticks: int
    qty_steps: int
    margin_micros: int
    leverage: int
    liq_ticks: int
    tp_ticks: int
    sl_ticks: int
    opened_ts_us: int
    maintenance_margin_ppm: int = 0


schema.check_fields(PositionRecord, schema.BOOK_ROW)
_RECORD = schema.builder(PositionRecord, _COLUMNS, casts={"side": _SIDES.__getitem__})


class PositionBook:
    """Open positions of one asset (see the module docstring for the layout).

    ``book_tag`` (0..255) goes into every id this book issues, so ids are unique across the
    books of a cluster; :func:`book_tag_of` reads it back.
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

    def __init__(self, asset: Asset, book_tag: int = 0, capacity: int = 1024, *,
                 min_pending: int = 1024, min_dead: int = 4096) -> None:
        """``capacity``: rows allocated up front (grows by doubling). ``min_pending`` and
        ``min_dead`` floor the trigger indexes' merge and compaction thresholds."""
        if not 0 <= book_tag <= MAX_BOOK_TAG:
            raise ValueError(f"book_tag must be in 0..{MAX_BOOK_TAG}")
        self.asset = asset
        self.book_tag = book_tag
        capacity = min(max(1, int(capacity)), MAX_ROWS)
        self._cap = capacity
        for f, attr in zip(_COLUMNS, _ATTRS, strict=True):
            setattr(self, attr, np.zeros(capacity, dtype=f.dtype))
        self._cols = tuple(getattr(self, attr) for attr in _ATTRS)  # schema order
        self._hw = 0  # rows ever used
        self._live = 0
        self._free_head = -1
        self._free_count = 0
        tuning = {"min_pending": min_pending, "min_dead": min_dead}
        self._long_stop = TriggerIndex(**tuning)  # key -level: bid <= level <=> -level <= -bid
        self._long_tp = TriggerIndex(**tuning)  # key level: bid >= level <=> level <= bid
        self._short_stop = TriggerIndex(**tuning)  # key level: ask >= level
        self._short_tp = TriggerIndex(**tuning)  # key -level: ask <= level

    # -- size ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._live

    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def nbytes(self) -> int:
        """Every byte the book holds: all columns at full capacity plus the trigger indexes
        (sorted arrays and pending buffers). The free list lives inside the columns."""
        cols = sum(getattr(self, attr).nbytes for attr in _ATTRS)
        return int(cols + sum(ix.nbytes for ix in self._indexes()))

    def _indexes(self) -> tuple[TriggerIndex, TriggerIndex, TriggerIndex, TriggerIndex]:
        return (self._long_stop, self._long_tp, self._short_stop, self._short_tp)

    def _grow(self, rows: int) -> None:
        if rows > MAX_ROWS:
            raise OverflowError(f"a book holds at most {MAX_ROWS} rows")
        cap = min(MAX_ROWS, max(rows, self._cap * 2))
        for attr in _ATTRS:
            old = getattr(self, attr)
            new = np.zeros(cap, dtype=old.dtype)
            new[: self._hw] = old[: self._hw]
            setattr(self, attr, new)
        self._cols = tuple(getattr(self, attr) for attr in _ATTRS)
        self._cap = cap

    # -- rows ----------------------------------------------------------------------------
    def _take_row(self) -> tuple[int, int]:
        """A free row and the generation its next id gets."""
        row = self._free_head
        if row >= 0:
            self._free_head = int(self._qty[row])
            self._free_count -= 1
            return row, ((-int(self._pid[row])) >> GEN_SHIFT) + 1
        row = self._hw
        if row == self._cap:
            self._grow(row + 1)
        self._hw = row + 1
        return row, 1

    def _release_row(self, row: int, position_id: int) -> None:
        self._pid[row] = -position_id
        if (position_id >> GEN_SHIFT) < MAX_GENERATION:
            self._qty[row] = self._free_head
            self._free_head = row
            self._free_count += 1
        else:
            self._qty[row] = -2  # generation exhausted: retire the row, never reuse the id

    def _row(self, position_id: int) -> int:
        """Row of an open position, or -1."""
        try:
            pid = operator.index(position_id)
        except TypeError:
            return -1
        if pid <= 0 or pid > _INT64_MAX or (pid & TAG_MASK) != self.book_tag:
            return -1
        row = (pid >> ROW_SHIFT) & ROW_MASK
        if row >= self._hw or int(self._pid[row]) != pid:
            return -1
        return row

    def _record(self, row: int) -> PositionRecord:
        result: PositionRecord = _RECORD([col.item(row) for col in self._cols])
        return result

    # -- single-position API -------------------------------------------------------------------
    def open(self, owner: int, plan: OpenPlan, opened_ts_us: int) -> int:
        """Add a position from a plan (checked with :func:`check_plan`; ValueError if
        inconsistent) and return its id (int > 0). O(1) amortised."""
        check_plan(self.asset, plan)
        if not 0 <= owner <= _INT64_MAX or not -_INT64_MAX <= opened_ts_us <= _INT64_MAX:
            raise ValueError("owner or timestamp out of range")
        row, gen = self._take_row()
        pid = (gen << GEN_SHIFT) | (row << ROW_SHIFT) | self.book_tag
        self._pid[row] = pid
        self._owner[row] = owner
        self._side[row] = plan.side
        self._entry[row] = plan.entry_ticks
        self._qty[row] = plan.qty_steps
        self._margin[row] = plan.margin_micros
        self._lev[row] = plan.leverage
        self._liq[row] = plan.liq_ticks
        self._tp[row] = plan.tp_ticks
        self._sl[row] = plan.sl_ticks
        self._ts[row] = opened_ts_us
        self._ppm[row] = plan.maintenance_margin_ppm
        self._live += 1
        ids = self._pid
        if plan.side == Side.LONG:
            stop = plan.sl_ticks or plan.liq_ticks
            if stop > 0:
                self._long_stop.add(-stop, pid, ids)
            if plan.tp_ticks != NO_LEVEL:
                self._long_tp.add(plan.tp_ticks, pid, ids)
        else:
            self._short_stop.add(plan.sl_ticks or plan.liq_ticks, pid, ids)
            if plan.tp_ticks != NO_LEVEL:
                self._short_tp.add(-plan.tp_ticks, pid, ids)
        return pid

    def next_position_id(self) -> int:
        """The id the next :meth:`open` will issue (the same id :meth:`open_many` gives its
        first position); changes nothing. OverflowError when the book has no row left."""
        row = self._free_head
        if row >= 0:
            gen = ((-int(self._pid[row])) >> GEN_SHIFT) + 1
        else:
            row = self._hw
            if row >= MAX_ROWS:
                raise OverflowError(f"a book holds at most {MAX_ROWS} rows")
            gen = 1
        return (gen << GEN_SHIFT) | (row << ROW_SHIFT) | self.book_tag

    def close(self, position_id: int) -> PositionRecord | None:
        """Remove an open position and return it as it was; None if it is not open here."""
        row = self._row(position_id)
        if row < 0:
            return None
        record = self._record(row)
        self._release_row(row, record.position_id)
        self._live -= 1
        ids = self._pid
        if record.side == Side.LONG:
            if (record.sl_ticks or record.liq_ticks) > 0:
                self._long_stop.discard(ids)
            if record.tp_ticks != NO_LEVEL:
                self._long_tp.discard(ids)
        else:
            self._short_stop.discard(ids)
            if record.tp_ticks != NO_LEVEL:
                self._short_tp.discard(ids)
        return record

    def get(self, position_id: int) -> PositionRecord | None:
        """The open position with this id, or None."""
        row = self._row(position_id)
        return None if row < 0 else self._record(row)

    def __contains__(self, position_id: object) -> bool:
        return isinstance(position_id, int | np.integer) and self._row(int(position_id)) >= 0

    # -- vectorised reads ----------------------------------------------------------------------
    def live_rows(self) -> np.ndarray:
        """Rows (int64, ascending) of the open positions."""
        return np.flatnonzero(self._pid[: self._hw] > 0)

    def free_rows(self) -> np.ndarray:
        """Rows (int64) on the free list, in the order opens reuse them."""
        rows: list[int] = []
        row = self._free_head
        while row >= 0:
            rows.append(row)
            row = int(self._qty[row])
        return np.array(rows, dtype=np.int64)

    def ids(self) -> np.ndarray:
        """Ids (int64, ascending) of all open positions."""
        pids = self._pid[: self._hw]
        return np.sort(pids[pids > 0])

    def ids_of_owner(self, owner: int) -> np.ndarray:
        """Ids (int64, ascending) of ``owner``'s open positions: one vectorised scan."""
        hw = self._hw
        pids = self._pid[:hw]
        return np.sort(pids[(self._owner[:hw] == owner) & (pids > 0)])

    def unrealized_pnl_micros(self, ids: np.ndarray, bid_ticks: int, ask_ticks: int
                              ) -> np.ndarray:
        """Unrealized PnL (int64 micro-dollars, floored) of the open positions ``ids``
        (int64 array) at ``bid``/``ask``; KeyError if an id is not open in this book."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = self._rows_checked(ids)
        return _pnl_kernel(self.asset, self._side[rows], self._entry[rows], self._qty[rows],
                           bid_ticks, ask_ticks)

    def _rows_checked(self, ids: np.ndarray) -> np.ndarray:
        rows = (ids >> ROW_SHIFT) & ROW_MASK
        ok = (ids > 0) & ((ids & TAG_MASK) == self.book_tag) & (rows < self._hw)
        if not ok.all() or not (self._pid[rows] == ids).all():
            raise KeyError("position id not open in this book")
        return rows

    def open_margin_by_owner(self) -> dict[int, int]:
        """Sum of open margins per owner (exact ints); owners without positions are absent."""
        hw = self._hw
        live = self._pid[:hw] > 0
        owners = self._owner[:hw][live]
        if owners.size == 0:
            return {}
        margins = self._margin[:hw][live]
        order = np.argsort(owners, kind="stable")
        owners, margins = owners[order], margins[order]
        starts = np.flatnonzero(np.concatenate([[True], owners[1:] != owners[:-1]]))
        sums = np.add.reduceat(margins, starts)
        return {int(o): int(s) for o, s in zip(owners[starts].tolist(), sums.tolist(),
                                                 strict=True)}

    def columns(self) -> dict[str, np.ndarray]:
        """Views (not copies; do not write) of every column over the used rows, including
        free ones (``position_id <= 0``)."""
        hw = self._hw
        return {name: getattr(self, attr)[:hw] for name, attr in zip(COLUMN_NAMES, _ATTRS,
                                                                     strict=True)}

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

    def compact(self) -> None:
        """Merge every pending trigger entry and drop every dead one now (O(N)); opens and
        closes do this on their own in small doses, a caller may prefer an idle moment."""
        for index in self._indexes():
            index.merge(self._pid, compact=True)

    def index_sizes(self) -> dict[str, tuple[int, int, int]]:
        """Per trigger index: (live entries, pending entries, dead entries), for tests and
        metrics."""
        names = ("long_stop", "long_tp", "short_stop", "short_tp")
        return {n: (len(ix), ix.pending, ix.dead) for n, ix in zip(names, self._indexes(),
                                                                  strict=True)}

    # -- bulk load and snapshots ---------------------------------------------------------------
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
        if (owners < 0).any():
            raise ValueError("owners must be >= 0")
        reuse = min(n, self._free_count)
        rows = np.empty(n, dtype=np.int64)
        gens = np.ones(n, dtype=np.int64)
        for i in range(reuse):
            row, gen = self._take_row()
            rows[i] = row
            gens[i] = gen
        fresh = n - reuse
        if fresh:
            if self._hw + fresh > self._cap:
                self._grow(self._hw + fresh)
            rows[reuse:] = np.arange(self._hw, self._hw + fresh, dtype=np.int64)
            self._hw += fresh
        pids = (gens << GEN_SHIFT) | (rows << ROW_SHIFT) | self.book_tag
        cols["position_id"] = pids
        cols["owner"] = owners
        cols["opened_ts_us"] = ts
        for f, attr in zip(_COLUMNS, _ATTRS, strict=True):
            getattr(self, attr)[rows] = cols[f.column]
        self._live += n
        self._index_rows(rows)
        return pids

    def _index_rows(self, rows: np.ndarray) -> None:
        """Put the positions in ``rows`` (int64) into the trigger indexes in bulk."""
        pids = self._pid[rows]
        side = self._side[rows]
        stop = np.where(self._sl[rows] != 0, self._sl[rows], self._liq[rows])
        tp = self._tp[rows]
        long = side == 0
        short = ~long
        sel = long & (stop > 0)
        self._long_stop.add_many(-stop[sel], pids[sel], self._pid)
        sel = long & (tp != 0)
        self._long_tp.add_many(tp[sel], pids[sel], self._pid)
        self._short_stop.add_many(stop[short], pids[short], self._pid)
        sel = short & (tp != 0)
        self._short_tp.add_many(-tp[sel], pids[sel], self._pid)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """A copy of the book's state: every column over the used rows (free rows included,
        so ids and the free list restore exactly) and ``free_head`` (int64, shape (1,))."""
        out = {name: col.copy() for name, col in self.columns().items()}
        out["free_head"] = np.array([self._free_head], dtype=np.int64)
        return out

    @classmethod
    def from_arrays(cls, asset: Asset, book_tag: int, arrays: Mapping[str, np.ndarray], *,
                    min_pending: int = 1024, min_dead: int = 4096) -> PositionBook:
        """Rebuild a book from :meth:`to_arrays`; ValueError if the arrays are inconsistent."""
        missing = [n for n in (*COLUMN_NAMES, "free_head") if n not in arrays]
        if missing:
            raise ValueError(f"missing arrays: {missing}")
        hw = int(np.asarray(arrays["position_id"]).size)
        book = cls(asset, book_tag, capacity=max(hw, 1024), min_pending=min_pending,
                   min_dead=min_dead)
        for name, attr in zip(COLUMN_NAMES, _ATTRS, strict=True):
            col = np.asarray(arrays[name])
            if col.shape != (hw,):
                raise ValueError(f"array {name} has shape {col.shape}, expected ({hw},)")
            getattr(book, attr)[:hw] = col
        book._hw = hw
        pids = book._pid[:hw]
        rows = np.arange(hw, dtype=np.int64)
        used = pids != 0
        absolute = np.abs(pids)
        if (used != (rows < hw)).any() or ((absolute >> ROW_SHIFT) & ROW_MASK != rows).any() \
                or ((absolute & TAG_MASK) != book_tag).any():
            raise ValueError("position ids do not match their rows or book_tag")
        live_rows = np.flatnonzero(pids > 0)
        book._live = int(live_rows.size)
        # walk the free list: every free row must be on it once, or be retired
        free_head = int(np.asarray(arrays["free_head"]).reshape(-1)[0])
        seen = 0
        row = free_head
        on_list = np.zeros(hw, dtype=bool)
        while row != -1:
            if not 0 <= row < hw or on_list[row] or pids[row] >= 0:
                raise ValueError("corrupt free list")
            on_list[row] = True
            seen += 1
            row = int(book._qty[row])
        book._free_head = free_head
        book._free_count = seen
        if live_rows.size:
            cols = {name: getattr(book, attr)[live_rows]
                    for name, attr in zip(COLUMN_NAMES, _ATTRS, strict=True)}
            _check_plan_columns(asset, cols)
            book._index_rows(live_rows)
        return book

    def check(self) -> list[str]:
        """Internal consistency problems ([] when sound): live counts, free list, indexes
        hold exactly the live positions. O(N); for tests and audits."""
        problems: list[str] = []
        pids = self._pid[: self._hw]
        live = int((pids > 0).sum())
        if live != self._live:
            problems.append(f"live count {self._live} != {live} live rows")
        live_ids = np.sort(pids[pids > 0])
        rows = self.live_rows()
        side = self._side[rows]
        stop = np.where(self._sl[rows] != 0, self._sl[rows], self._liq[rows])
        expect = {
            "long_stop": pids[rows][(side == 0) & (stop > 0)],
            "long_tp": pids[rows][(side == 0) & (self._tp[rows] != 0)],
            "short_stop": pids[rows][side == 1],
            "short_tp": pids[rows][(side == 1) & (self._tp[rows] != 0)],
        }
        names = ("long_stop", "long_tp", "short_stop", "short_tp")
        for name, ix in zip(names, self._indexes(), strict=True):
            got = np.sort(ix.live_ids(self._pid))
            if not np.array_equal(got, np.sort(expect[name])):
                problems.append(f"index {name} does not hold exactly its live positions")
            if len(ix) != got.size:
                problems.append(f"index {name} counts {len(ix)} live, holds {got.size}")
        del live_ids
        return problems


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


def _check_plan_columns(asset: Asset, cols: Mapping[str, np.ndarray]) -> None:
    """Vectorised :func:`check_plan` over column arrays (ValueError on the first problem)."""
    side = cols["side"].astype(np.int64)
    entry = cols["entry_ticks"].astype(np.int64)
    qty = cols["qty_steps"].astype(np.int64)
    margin = cols["margin_micros"].astype(np.int64)
    lev = cols["leverage"].astype(np.int64)
    liq = cols["liq_ticks"].astype(np.int64)
    tp = cols["tp_ticks"].astype(np.int64)
    sl = cols["sl_ticks"].astype(np.int64)
    ppm = cols[_RATE.column].astype(np.int64)
    if not ((side == 0) | (side == 1)).all():
        raise ValueError("bad side")
    if not ((entry > 0) & (qty > 0) & (margin > 0) & (entry <= MAX_COLUMN_VALUE)
            & (qty <= MAX_COLUMN_VALUE) & (margin <= MAX_COLUMN_VALUE)).all():
        raise ValueError("entry, quantity and margin must be positive and in range")
    if not ((lev >= 1) & (lev <= min(asset.max_leverage, 2**31 - 1))).all():
        raise ValueError("leverage out of range")
    if not ((ppm >= 0) & (ppm < PPM)).all():
        raise ValueError("maintenance margin rate out of range")
    if not np.array_equal(liquidation_ticks_array(asset, side, entry, qty, margin, ppm), liq):
        raise ValueError("liquidation prices do not match the plans")
    long = side == 0
    tp_ok = (tp == 0) | np.where(long, tp > entry, (tp > 0) & (tp < entry))
    sl_ok = (sl == 0) | np.where(long, (sl > liq) & (sl < entry), (sl > entry) & (sl < liq))
    if not (tp_ok & sl_ok & (tp >= 0) & (sl >= 0)).all():
        raise ValueError("take-profit or stop-loss on the wrong side")


__all__ = ["COLUMN_NAMES", "PositionBook", "PositionRecord", "book_tag_of"]
