"""The pending-order book of one asset: columnar numpy arrays, one row per open limit or stop
entry order, and the per-tick sweep that finds the orders a tick fills or expires.

The layout is engine.book.PositionBook's: no Python object per order, an id that encodes its
row (:mod:`engine.position_ids`), an intrusive free list (the ``trigger_ticks`` cell of a free
row holds the next free row, its ``order_id`` cell the negated last id), so place and remove
are O(1) amortised and a snapshot of the columns restores the free list and the next ids
exactly.

Columns (capacity rows each; rows ``>= high water`` are unused): the fields of
engine.schema.ORDER_ROW, each named ``Field.column`` with dtype ``Field.dtype``::

    order_id      int64  > 0 open; < 0 free (minus the row's last id)
    owner         int64  user id (>= 0)
    side          int8   Side (0 long, 1 short)
    kind          int8   OrderKind (0 limit, 1 stop)
    trigger_ticks int64  trigger price (next free row on a free row, -1 = end, -2 = retired)
    margin_micros int64  margin locked while the order is open
    leverage      int32
    tp_ticks      int64  take-profit of the position it opens (NO_LEVEL = 0: none)
    sl_ticks      int64  stop-loss of the position it opens   (NO_LEVEL = 0: none)
    expires_ts_us int64  0 = good till cancelled
    placed_ts_us  int64

Ids: the layout of engine.position_ids (generation, row, book_tag), issued by this book alone.
An order id is never issued twice by one book, and books with different tags never issue the
same id; but a shard's order book and position book count independently, so an order id may
equal a position id. Ids are told apart by what they name (an order, a position), never by
value.

The sweep uses five :class:`~engine.triggers.TriggerIndex` (an entry is hit at ``x`` exactly
when ``key <= x``), so a tick costs O(log n + k), k the orders it reports:

    index        fills when          key         hit at
    limit long   ask <= trigger      -trigger    -ask
    limit short  bid >= trigger      trigger     bid
    stop long    ask >= trigger      trigger     ask
    stop short   bid <= trigger      -trigger    -bid
    expiry       ts_us > expires     expires     ts_us - 1   (orders with an expiry only)

Expiry wins over a fill (SPEC: an order whose expiry has passed is expired, not filled). Like
the position sweep, a sweep changes no order: the caller removes each order it reports, so a
replayed journal sweeps to the same answers.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import numpy as np

from engine import schema
from engine.assets import Asset
from engine.orders import MAX_COLUMN_VALUE, NO_LEVEL, Side
from engine.position_ids import (
    GEN_SHIFT,
    MAX_BOOK_TAG,
    MAX_GENERATION,
    MAX_ROWS,
    ROW_MASK,
    ROW_SHIFT,
    TAG_MASK,
)
from engine.triggers import TriggerIndex

_INT64_MAX = (1 << 63) - 1
_MAX_LEVERAGE = (1 << 31) - 1  # the int32 column
GOOD_TILL_CANCELLED = 0
"""``expires_ts_us`` of an order without an expiry."""
_RETIRED = -2  # trigger_ticks of a free row whose generation is exhausted (never reused)


class OrderKind(IntEnum):
    """What fills a pending order; the int value is the book's ``kind`` column (int8)."""

    LIMIT = 0  # a better price than the trigger: long ask <= trigger, short bid >= trigger
    STOP = 1  # a worse price than the trigger (stop-market): long ask >= trigger, short bid <=

    @property
    def label(self) -> str:
        return "limit" if self is OrderKind.LIMIT else "stop"

    @classmethod
    def parse(cls, text: str) -> OrderKind:
        """``"limit"``/``"stop"`` (case-insensitive) -> OrderKind; ValueError otherwise."""
        lowered = text.strip().lower() if isinstance(text, str) else ""
        for k in cls:
            if k.label == lowered:
                return k
        raise ValueError(f"order type must be 'limit' or 'stop', got {text!r}")


class OrderOutcome(IntEnum):
    """What a tick does to an open order; the int value is what sweeps return (int8)."""

    FILL = 0  # the fill condition holds: open at the tick's opening-side price
    EXPIRED = 1  # the tick is later than the order's expiry (wins over a fill)


if schema.kind.enum != tuple(k.label for k in OrderKind):
    raise schema.SchemaError("engine.schema's kind labels differ from OrderKind")


@dataclass(frozen=True, slots=True)
class OrderTerms:
    """What placing a pending order fixes: the fields of engine.schema.ORDER_TERMS (checked at
    import). ``trigger_ticks`` is on the asset's price grid; ``tp_ticks``/``sl_ticks`` are
    ``NO_LEVEL`` when not set and are validated against the fill price when the order fills;
    ``expires_ts_us`` is :data:`GOOD_TILL_CANCELLED` or a time in microseconds."""

    side: Side
    kind: OrderKind
    trigger_ticks: int
    margin_micros: int
    leverage: int
    tp_ticks: int = NO_LEVEL
    sl_ticks: int = NO_LEVEL
    expires_ts_us: int = GOOD_TILL_CANCELLED


schema.check_fields(OrderTerms, schema.ORDER_TERMS)
_TERM_NAMES = schema.names(schema.ORDER_TERMS)


class OrderRecord(NamedTuple):
    """One open (or just removed) order as plain ints, read out of the book's columns: the
    fields of engine.schema.ORDER_ROW (checked at import)."""

    order_id: int
    owner: int
    side: Side
    kind: OrderKind
    trigger_ticks: int
    margin_micros: int
    leverage: int
    tp_ticks: int
    sl_ticks: int
    expires_ts_us: int
    placed_ts_us: int


schema.check_fields(OrderRecord, schema.ORDER_ROW)
_COLUMNS = schema.ORDER_ROW
COLUMN_NAMES = tuple(f.column for f in _COLUMNS)
"""The order book's column names (and snapshot array names), in schema order."""
_ATTR_OF = {"order_id": "_oid", "owner": "_owner", "side": "_side", "kind": "_kind",
            "trigger_ticks": "_trig", "margin_micros": "_margin", "leverage": "_lev",
            "tp_ticks": "_tp", "sl_ticks": "_sl", "expires_ts_us": "_exp",
            "placed_ts_us": "_ts"}
schema.check_names("OrderBook's columns", tuple(_ATTR_OF), schema.names(_COLUMNS))
_ATTRS = tuple(_ATTR_OF[f.name] for f in _COLUMNS)
_RECORD = schema.builder(OrderRecord, _COLUMNS,
                         casts={"side": (Side.LONG, Side.SHORT).__getitem__,
                                "kind": (OrderKind.LIMIT, OrderKind.STOP).__getitem__})
# fill index slot of an order: 2 * kind + side; whether its key is the negated trigger
_SLOT_NAMES = ("limit_long", "limit_short", "stop_long", "stop_short")
_NEGATED = (True, False, False, True)
_FILL = np.int8(OrderOutcome.FILL)
_EXPIRED = np.int8(OrderOutcome.EXPIRED)
_NO_IDS = np.zeros(0, dtype=np.int64)
_NO_OUTCOMES = np.zeros(0, dtype=np.int8)


def fill_price(side: Side | int, bid_ticks: int, ask_ticks: int) -> int:
    """The price (ticks) a filled order opens at: the triggering tick's opening-side price, the
    ask for a long and the bid for a short (never worse than the trigger for a limit order,
    possibly worse for a stop filled through a gap). The open itself is a market open at this
    price (engine.orders.plan_open)."""
    return ask_ticks if side == Side.LONG else bid_ticks


def check_terms(asset: Asset, terms: OrderTerms) -> None:
    """Raise ValueError unless ``terms`` fit the book: side and kind known, a positive trigger
    and margin in range, leverage in ``1..asset.max_leverage``, TP/SL unset or positive and in
    range, expiry unset or positive. Whether the position it opens is valid is decided at the
    fill, against the fill price."""
    try:
        values = [operator.index(getattr(terms, name)) for name in _TERM_NAMES]
    except TypeError:
        raise ValueError("order terms must be integers") from None
    if isinstance(terms.side, bool) or isinstance(terms.kind, bool) \
            or values[0] not in (Side.LONG, Side.SHORT) \
            or values[1] not in (OrderKind.LIMIT, OrderKind.STOP):
        raise ValueError("bad side or order kind")
    if not (0 < terms.trigger_ticks <= MAX_COLUMN_VALUE
            and 0 < terms.margin_micros <= MAX_COLUMN_VALUE):
        raise ValueError("trigger price and margin must be positive and in range")
    if not 1 <= terms.leverage <= min(asset.max_leverage, _MAX_LEVERAGE):
        raise ValueError("leverage out of range")
    if not (0 <= terms.tp_ticks <= MAX_COLUMN_VALUE and 0 <= terms.sl_ticks <= MAX_COLUMN_VALUE):
        raise ValueError("take-profit or stop-loss out of range")
    if not 0 <= terms.expires_ts_us <= _INT64_MAX:
        raise ValueError("expiry out of range")


class OrderBook:
    """Open pending orders of one asset (see the module docstring for the layout).

    ``book_tag`` (0..255) goes into every id this book issues.
    """

    _oid: np.ndarray
    _owner: np.ndarray
    _side: np.ndarray
    _kind: np.ndarray
    _trig: np.ndarray
    _margin: np.ndarray
    _lev: np.ndarray
    _tp: np.ndarray
    _sl: np.ndarray
    _exp: np.ndarray
    _ts: np.ndarray

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
        # by slot 2 * kind + side: limit long, limit short, stop long, stop short
        self._fills = tuple(TriggerIndex(**tuning) for _ in _SLOT_NAMES)
        self._expiry = TriggerIndex(**tuning)

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

    def _indexes(self) -> tuple[TriggerIndex, ...]:
        return (*self._fills, self._expiry)

    def _grow(self, rows: int) -> None:
        if rows > MAX_ROWS:
            raise OverflowError(f"an order book holds at most {MAX_ROWS} rows")
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
            self._free_head = int(self._trig[row])
            self._free_count -= 1
            return row, ((-int(self._oid[row])) >> GEN_SHIFT) + 1
        row = self._hw
        if row == self._cap:
            self._grow(row + 1)
        self._hw = row + 1
        return row, 1

    def _release_row(self, row: int, order_id: int) -> None:
        self._oid[row] = -order_id
        if (order_id >> GEN_SHIFT) < MAX_GENERATION:
            self._trig[row] = self._free_head
            self._free_head = row
            self._free_count += 1
        else:
            self._trig[row] = _RETIRED  # generation exhausted: never reuse the id

    def _row(self, order_id: int) -> int:
        """Row of an open order, or -1."""
        try:
            oid = operator.index(order_id)
        except TypeError:
            return -1
        if oid <= 0 or oid > _INT64_MAX or (oid & TAG_MASK) != self.book_tag:
            return -1
        row = (oid >> ROW_SHIFT) & ROW_MASK
        if row >= self._hw or int(self._oid[row]) != oid:
            return -1
        return row

    def _record(self, row: int) -> OrderRecord:
        result: OrderRecord = _RECORD([col.item(row) for col in self._cols])
        return result

    # -- single-order API ----------------------------------------------------------------
    def next_order_id(self) -> int:
        """The id the next :meth:`place` will issue (the same id :meth:`place_many` gives its
        first order); changes nothing. OverflowError when the book has no row left."""
        row = self._free_head
        if row >= 0:
            gen = ((-int(self._oid[row])) >> GEN_SHIFT) + 1
        else:
            row = self._hw
            if row >= MAX_ROWS:
                raise OverflowError(f"an order book holds at most {MAX_ROWS} rows")
            gen = 1
        return (gen << GEN_SHIFT) | (row << ROW_SHIFT) | self.book_tag

    def place(self, owner: int, terms: OrderTerms, placed_ts_us: int) -> int:
        """Add an open order (terms checked with :func:`check_terms`; ValueError if they do not
        fit) and return its id (int > 0). O(1) amortised."""
        check_terms(self.asset, terms)
        if not 0 <= owner <= _INT64_MAX or not -_INT64_MAX <= placed_ts_us <= _INT64_MAX:
            raise ValueError("owner or timestamp out of range")
        row, gen = self._take_row()
        oid = (gen << GEN_SHIFT) | (row << ROW_SHIFT) | self.book_tag
        self._oid[row] = oid
        self._owner[row] = owner
        self._side[row] = terms.side
        self._kind[row] = terms.kind
        self._trig[row] = terms.trigger_ticks
        self._margin[row] = terms.margin_micros
        self._lev[row] = terms.leverage
        self._tp[row] = terms.tp_ticks
        self._sl[row] = terms.sl_ticks
        self._exp[row] = terms.expires_ts_us
        self._ts[row] = placed_ts_us
        self._live += 1
        slot = 2 * terms.kind + terms.side
        trigger = terms.trigger_ticks
        self._fills[slot].add(-trigger if _NEGATED[slot] else trigger, oid, self._oid)
        if terms.expires_ts_us != GOOD_TILL_CANCELLED:
            self._expiry.add(terms.expires_ts_us, oid, self._oid)
        return oid

    def remove(self, order_id: int) -> OrderRecord | None:
        """Remove an open order, whatever ended it (cancelled, filled, expired, rejected), and
        return it as it was; None if it is not open here."""
        row = self._row(order_id)
        if row < 0:
            return None
        record = self._record(row)
        self._release_row(row, record.order_id)
        self._live -= 1
        self._fills[2 * record.kind + record.side].discard(self._oid)
        if record.expires_ts_us != GOOD_TILL_CANCELLED:
            self._expiry.discard(self._oid)
        return record

    def get(self, order_id: int) -> OrderRecord | None:
        """The open order with this id, or None (also for an id whose row was reused)."""
        row = self._row(order_id)
        return None if row < 0 else self._record(row)

    def __contains__(self, order_id: object) -> bool:
        return isinstance(order_id, int | np.integer) and self._row(int(order_id)) >= 0

    # -- vectorised reads ----------------------------------------------------------------
    def ids(self) -> np.ndarray:
        """Ids (int64, ascending) of all open orders."""
        oids = self._oid[: self._hw]
        return np.sort(oids[oids > 0])

    def ids_of_owner(self, owner: int) -> np.ndarray:
        """Ids (int64, ascending) of ``owner``'s open orders: one vectorised scan."""
        hw = self._hw
        oids = self._oid[:hw]
        return np.sort(oids[(self._owner[:hw] == owner) & (oids > 0)])

    def free_rows(self) -> np.ndarray:
        """Rows (int64) on the free list, in the order places reuse them."""
        rows: list[int] = []
        row = self._free_head
        while row >= 0:
            rows.append(row)
            row = int(self._trig[row])
        return np.array(rows, dtype=np.int64)

    def open_margin_by_owner(self) -> dict[int, int]:
        """Sum of the margins locked by open orders per owner (exact ints); owners without
        orders are absent."""
        hw = self._hw
        live = self._oid[:hw] > 0
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
        free ones (``order_id <= 0``)."""
        hw = self._hw
        return {name: getattr(self, attr)[:hw] for name, attr in zip(COLUMN_NAMES, _ATTRS,
                                                                     strict=True)}

    # -- the sweep -----------------------------------------------------------------------
    def sweep(self, bid_ticks: int, ask_ticks: int, ts_us: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """Open orders this tick (top of book ``bid``/``ask`` at time ``ts_us``) ends: ids
        (int64, ascending) and outcomes (int8 :class:`OrderOutcome`): EXPIRED when the order
        has an expiry and ``ts_us > expires_ts_us``, else FILL when its fill condition holds.
        The book is not changed; the caller removes each id. ValueError unless
        ``0 < bid <= ask`` and ``ts_us`` is an int64 above its minimum."""
        bid = operator.index(bid_ticks)
        ask = operator.index(ask_ticks)
        ts = operator.index(ts_us)
        if not 0 < bid <= ask <= MAX_COLUMN_VALUE:
            raise ValueError(f"invalid top of book bid={bid} ask={ask}")
        if not -_INT64_MAX <= ts <= _INT64_MAX:
            raise ValueError(f"tick time {ts} out of range")
        idc = self._oid
        found: list[np.ndarray] = []
        for index, at in zip(self._fills, (-ask, bid, ask, -bid), strict=True):
            hits = index.triggered(at, idc)
            if hits is not None:
                found.append(hits)
        expired = self._expiry.triggered(ts - 1, idc)
        if found:
            fills = np.concatenate(found) if len(found) > 1 else found[0]
            expires = self._exp[(fills >> ROW_SHIFT) & ROW_MASK]
            # an expired order is reported once, by the expiry index, as EXPIRED
            fills = fills[(expires == GOOD_TILL_CANCELLED) | (expires >= ts)]
        else:
            fills = _NO_IDS
        if expired is None:
            if fills.size == 0:
                return _NO_IDS.copy(), _NO_OUTCOMES.copy()
            return np.sort(fills), np.zeros(fills.size, dtype=np.int8)
        ids = np.concatenate([fills, expired])
        outcomes = np.concatenate([np.full(fills.size, _FILL), np.full(expired.size, _EXPIRED)])
        order = np.argsort(ids, kind="stable")
        return ids[order], outcomes[order]

    def compact(self) -> None:
        """Merge every pending index entry and drop every dead one now (O(N)); places and
        removes do this on their own in small doses, a caller may prefer an idle moment."""
        for index in self._indexes():
            index.merge(self._oid, compact=True)

    def index_sizes(self) -> dict[str, tuple[int, int, int]]:
        """Per index: (live entries, pending entries, dead entries), for tests and metrics."""
        names = (*_SLOT_NAMES, "expiry")
        return {n: (len(ix), ix.pending, ix.dead) for n, ix in zip(names, self._indexes(),
                                                                  strict=True)}

    # -- bulk load and snapshots ---------------------------------------------------------
    def place_many(self, owners: np.ndarray, terms: Mapping[str, np.ndarray],
                   placed_ts_us: int | np.ndarray) -> np.ndarray:
        """Place many orders at once (bulk loads, benchmarks); returns their ids (int64).

        ``terms`` maps :class:`OrderTerms` field names (engine.schema.ORDER_TERMS) to
        equal-length int arrays, checked vectorised as :func:`check_terms` would
        (ValueError). Free rows are reused first, as single places would.
        """
        owners = np.asarray(owners, dtype=np.int64)
        n = int(owners.size)
        cols: dict[str, np.ndarray] = {}
        for f in schema.ORDER_TERMS:
            if f.name not in terms:
                raise ValueError(f"terms lacks {f.name!r}")
            col = np.asarray(terms[f.name], dtype=np.int64)
            if col.shape != (n,):
                raise ValueError(f"terms[{f.name!r}] has shape {col.shape}, expected ({n},)")
            cols[f.column] = col
        ts = np.broadcast_to(np.asarray(placed_ts_us, dtype=np.int64), (n,))
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        _check_term_columns(self.asset, cols)
        if (owners < 0).any():
            raise ValueError("owners must be >= 0")
        reuse = min(n, self._free_count)
        if self._hw + (n - reuse) > MAX_ROWS:
            raise OverflowError(f"an order book holds at most {MAX_ROWS} rows")
        rows = np.empty(n, dtype=np.int64)
        gens = np.ones(n, dtype=np.int64)
        for i in range(reuse):
            rows[i], gens[i] = self._take_row()
        fresh = n - reuse
        if fresh:
            if self._hw + fresh > self._cap:
                self._grow(self._hw + fresh)
            rows[reuse:] = np.arange(self._hw, self._hw + fresh, dtype=np.int64)
            self._hw += fresh
        oids = (gens << GEN_SHIFT) | (rows << ROW_SHIFT) | self.book_tag
        cols["order_id"] = oids
        cols["owner"] = owners
        cols["placed_ts_us"] = ts
        for f, attr in zip(_COLUMNS, _ATTRS, strict=True):
            getattr(self, attr)[rows] = cols[f.column]
        self._live += n
        self._index_rows(rows)
        return oids

    def _index_rows(self, rows: np.ndarray) -> None:
        """Put the orders in ``rows`` (int64) into the indexes in bulk."""
        oids = self._oid[rows]
        slots = 2 * self._kind[rows].astype(np.int64) + self._side[rows]
        trigger = self._trig[rows]
        for slot, index in enumerate(self._fills):
            sel = slots == slot
            if sel.any():
                keys = -trigger[sel] if _NEGATED[slot] else trigger[sel]
                index.add_many(keys, oids[sel], self._oid)
        expires = self._exp[rows]
        sel = expires != GOOD_TILL_CANCELLED
        if sel.any():
            self._expiry.add_many(expires[sel], oids[sel], self._oid)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """A copy of the book's state: every column over the used rows (free rows included,
        so ids and the free list restore exactly) and ``free_head`` (int64, shape (1,))."""
        out = {name: col.copy() for name, col in self.columns().items()}
        out["free_head"] = np.array([self._free_head], dtype=np.int64)
        return out

    @classmethod
    def from_arrays(cls, asset: Asset, book_tag: int, arrays: Mapping[str, np.ndarray], *,
                    min_pending: int = 1024, min_dead: int = 4096) -> OrderBook:
        """Rebuild a book from :meth:`to_arrays`; ValueError if the arrays are inconsistent."""
        missing = [n for n in (*COLUMN_NAMES, "free_head") if n not in arrays]
        if missing:
            raise ValueError(f"missing arrays: {missing}")
        hw = int(np.asarray(arrays["order_id"]).size)
        if hw > MAX_ROWS:
            raise ValueError(f"an order book holds at most {MAX_ROWS} rows")
        book = cls(asset, book_tag, capacity=max(hw, 1024), min_pending=min_pending,
                   min_dead=min_dead)
        for name, attr in zip(COLUMN_NAMES, _ATTRS, strict=True):
            col = np.asarray(arrays[name])
            if col.shape != (hw,):
                raise ValueError(f"array {name} has shape {col.shape}, expected ({hw},)")
            getattr(book, attr)[:hw] = col
        book._hw = hw
        oids = book._oid[:hw]
        absolute = np.abs(oids)
        if (oids == 0).any() or ((absolute >> ROW_SHIFT) & ROW_MASK
                                 != np.arange(hw, dtype=np.int64)).any() \
                or ((absolute & TAG_MASK) != book_tag).any():
            raise ValueError("order ids do not match their rows or book_tag")
        live_rows = np.flatnonzero(oids > 0)
        book._live = int(live_rows.size)
        # walk the free list: every free row is on it once, or retired (generation exhausted)
        free_head = int(np.asarray(arrays["free_head"]).reshape(-1)[0])
        on_list = np.zeros(hw, dtype=bool)
        seen = 0
        row = free_head
        while row != -1:
            if not 0 <= row < hw or on_list[row] or oids[row] >= 0 \
                    or (-int(oids[row])) >> GEN_SHIFT >= MAX_GENERATION:
                raise ValueError("corrupt free list")
            on_list[row] = True
            seen += 1
            row = int(book._trig[row])
        off_list = (oids < 0) & ~on_list
        if off_list.any() and (((-oids[off_list]) >> GEN_SHIFT) != MAX_GENERATION).any():
            raise ValueError("a free row is neither on the free list nor retired")
        book._free_head = free_head
        book._free_count = seen
        if live_rows.size:
            _check_term_columns(asset, {name: getattr(book, attr)[live_rows] for name, attr
                                        in zip(COLUMN_NAMES, _ATTRS, strict=True)})
            if (book._owner[live_rows] < 0).any():
                raise ValueError("owners must be >= 0")
            book._index_rows(live_rows)
        return book

    def check(self) -> list[str]:
        """Internal consistency problems ([] when sound): live and free counts, the free
        list, each index holds exactly its live orders, every open order's terms fit. O(N);
        for tests and audits."""
        problems: list[str] = []
        oids = self._oid[: self._hw]
        live_rows = np.flatnonzero(oids > 0)
        if live_rows.size != self._live:
            problems.append(f"live count {self._live} != {live_rows.size} live rows")
        free: list[int] = []
        row = self._free_head
        while 0 <= row < self._hw and len(free) <= self._hw:  # bounded: the list may loop
            free.append(row)
            row = int(self._trig[row])
        if row != -1 or len(set(free)) != len(free) or (oids[free] >= 0).any():
            problems.append("the free list loops, leaves the used rows or holds an open row")
        elif len(free) != self._free_count:
            problems.append(f"free count {self._free_count} != {len(free)} rows on the list")
        live = oids[live_rows]
        slots = 2 * self._kind[live_rows].astype(np.int64) + self._side[live_rows]
        expect = [live[slots == slot] for slot in range(len(_SLOT_NAMES))]
        expect.append(live[self._exp[live_rows] != GOOD_TILL_CANCELLED])
        for name, ix, want in zip((*_SLOT_NAMES, "expiry"), self._indexes(), expect,
                                  strict=True):
            got = np.sort(ix.live_ids(self._oid))
            if not np.array_equal(got, np.sort(want)):
                problems.append(f"index {name} does not hold exactly its open orders")
            if len(ix) != got.size:
                problems.append(f"index {name} counts {len(ix)} live, holds {got.size}")
        if live_rows.size:
            try:
                _check_term_columns(self.asset, {name: getattr(self, attr)[live_rows]
                                                 for name, attr in zip(COLUMN_NAMES, _ATTRS,
                                                                       strict=True)})
            except ValueError as exc:
                problems.append(f"an open order's terms do not fit: {exc}")
        return problems


def _check_term_columns(asset: Asset, cols: Mapping[str, np.ndarray]) -> None:
    """Vectorised :func:`check_terms` over column arrays (ValueError on the first problem)."""
    side = cols["side"].astype(np.int64)
    kind = cols["kind"].astype(np.int64)
    trigger = cols["trigger_ticks"].astype(np.int64)
    margin = cols["margin_micros"].astype(np.int64)
    lev = cols["leverage"].astype(np.int64)
    tp = cols["tp_ticks"].astype(np.int64)
    sl = cols["sl_ticks"].astype(np.int64)
    expires = cols["expires_ts_us"].astype(np.int64)
    if not (((side == 0) | (side == 1)) & ((kind == 0) | (kind == 1))).all():
        raise ValueError("bad side or order kind")
    if not ((trigger > 0) & (trigger <= MAX_COLUMN_VALUE) & (margin > 0)
            & (margin <= MAX_COLUMN_VALUE)).all():
        raise ValueError("trigger price and margin must be positive and in range")
    if not ((lev >= 1) & (lev <= min(asset.max_leverage, _MAX_LEVERAGE))).all():
        raise ValueError("leverage out of range")
    if not ((tp >= 0) & (tp <= MAX_COLUMN_VALUE) & (sl >= 0) & (sl <= MAX_COLUMN_VALUE)).all():
        raise ValueError("take-profit or stop-loss out of range")
    if not (expires >= 0).all():
        raise ValueError("expiry out of range")


def naive_sweep(book: OrderBook, bid_ticks: int, ask_ticks: int, ts_us: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Full sweep: every row's fill condition and expiry evaluated over the whole columns.

    Returns the same as :meth:`OrderBook.sweep`: ids (int64, ascending) and outcomes (int8),
    expiry winning over a fill. O(book rows) per call.
    """
    cols = book.columns()
    ids = cols["order_id"]
    long = cols["side"] == Side.LONG
    trigger = cols["trigger_ticks"]
    expires = cols["expires_ts_us"]
    limit_fill = np.where(long, ask_ticks <= trigger, bid_ticks >= trigger)
    stop_fill = np.where(long, ask_ticks >= trigger, bid_ticks <= trigger)
    fills = np.where(cols["kind"] == OrderKind.LIMIT, limit_fill, stop_fill)
    expired = (expires != GOOD_TILL_CANCELLED) & (ts_us > expires)
    rows = np.flatnonzero((ids > 0) & (fills | expired))
    out_ids = ids[rows]
    outcomes = np.where(expired[rows], _EXPIRED, _FILL).astype(np.int8)
    order = np.argsort(out_ids, kind="stable")
    return out_ids[order], outcomes[order]


__all__ = [
    "COLUMN_NAMES",
    "GOOD_TILL_CANCELLED",
    "OrderBook",
    "OrderKind",
    "OrderOutcome",
    "OrderRecord",
    "OrderTerms",
    "check_terms",
    "fill_price",
    "naive_sweep",
]
