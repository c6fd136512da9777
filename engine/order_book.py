"""The pending-order book of one asset: columnar numpy arrays, one row per open limit or stop
entry order, and the per-tick sweep that finds the orders a tick fills or expires.

The rows are an :class:`engine.rows.RowStore`, like engine.book.PositionBook's: no Python
object per order, an id that encodes its row, an intrusive free list (through the
``trigger_ticks`` cell of a free row), so place and remove are O(1) amortised and a snapshot of
the columns restores the free list and the next ids exactly.

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
from enum import IntEnum

import numpy as np

from engine import schema
from engine.assets import Asset
from engine.orders import MAX_COLUMN_VALUE, NO_LEVEL, Side, quantity_steps
from engine.position_ids import ROW_MASK, ROW_SHIFT
from engine.results import Code, Rejected
from engine.rows import RowStore, int64_columns

_INT64_MAX = (1 << 63) - 1
_MAX_LEVERAGE = (1 << 31) - 1  # the int32 column
GOOD_TILL_CANCELLED = 0
"""``expires_ts_us`` of an order without an expiry."""


class OrderKind(schema.Labelled, field=schema.kind, noun="order type"):
    """What fills a pending order; the int value is the book's ``kind`` column (int8)."""

    LIMIT = 0  # a better price than the trigger: long ask <= trigger, short bid >= trigger
    STOP = 1  # a worse price than the trigger (stop-market): long ask >= trigger, short bid <=


class OrderOutcome(IntEnum):
    """What a tick does to an open order; the int value is what sweeps return (int8)."""

    FILL = 0  # the fill condition holds: open at the tick's opening-side price
    EXPIRED = 1  # the tick is later than the order's expiry (wins over a fill)


class OrderStatus(schema.Labelled, field=schema.status):
    """Where an order is in its life (SPEC "Pending orders"); the int value is
    engine.schema.status's."""

    OPEN = 0
    FILLED = 1  # a position was opened from it (its ``position_id``)
    CANCELLED = 2  # by its owner
    EXPIRED = 3  # a tick later than its expiry came first
    REJECTED = 4  # its fill could not open (``reject_code``), its margin released


OrderTerms = schema.record(
    "OrderTerms", schema.ORDER_TERMS, __name__, enums={"side": Side, "kind": OrderKind},
    zero_default=("tp_ticks", "sl_ticks", "expires_ts_us"),
    doc="""What placing a pending order fixes: the fields of engine.schema.ORDER_TERMS.
    ``trigger_ticks`` is on the asset's price grid; ``tp_ticks``/``sl_ticks`` are ``NO_LEVEL``
    (0, their default) when not set and are validated against the fill price when the order
    fills; ``expires_ts_us`` is a time in microseconds or :data:`GOOD_TILL_CANCELLED` (0, its
    default).""")
_TERM_NAMES = schema.names(schema.ORDER_TERMS)


OrderRecord = schema.record(
    "OrderRecord", schema.ORDER_ROW, __name__, enums={"side": Side, "kind": OrderKind},
    doc="""One open (or just removed) order as plain ints, read out of the book's columns: the
    fields of engine.schema.ORDER_ROW.""")
_COLUMNS = schema.ORDER_ROW
COLUMN_NAMES = tuple(f.column for f in _COLUMNS)
"""The order book's column names (and snapshot array names), in schema order."""
_ATTR_OF = {"order_id": "_oid", "owner": "_owner", "side": "_side", "kind": "_kind",
            "trigger_ticks": "_trig", "margin_micros": "_margin", "leverage": "_lev",
            "tp_ticks": "_tp", "sl_ticks": "_sl", "expires_ts_us": "_exp",
            "placed_ts_us": "_ts"}
_RECORD = schema.builder(OrderRecord, _COLUMNS,
                         casts={"side": (Side.LONG, Side.SHORT).__getitem__,
                                "kind": (OrderKind.LIMIT, OrderKind.STOP).__getitem__})
record_of_terms = schema.builder(OrderRecord, schema.ORDER_TERMS, attributes=True,
                                 given=("order_id", "owner", "placed_ts_us"),
                                 casts={"side": Side, "kind": OrderKind})
"""``(terms, order_id, owner, placed_ts_us) -> OrderRecord``: the row a placement adds."""
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


def impossible_levels(terms: OrderTerms) -> str | None:
    """Why the take-profit or stop-loss of ``terms`` is valid at no fill price (so the order
    could only end rejected), or None. A limit long fills at an ask <= its trigger, a stop long
    at an ask >= it; a short at the bid, mirrored. A long's TP must lie above its entry and its
    SL below it; a short's the other way round (engine.orders.plan_open)."""
    tp, sl, trigger = terms.tp_ticks, terms.sl_ticks, terms.trigger_ticks
    long = terms.side == Side.LONG
    if tp != NO_LEVEL and sl != NO_LEVEL and ((sl >= tp - 1) if long else (tp >= sl - 1)):
        return "no entry price lies strictly between its stop-loss and its take-profit"
    if (tp if long else sl) == 1:  # the entry would have to lie below one price step
        return f"a {'long' if long else 'short'}'s {'take-profit' if long else 'stop-loss'} " \
            "must lie above the smallest price"
    limit = terms.kind == OrderKind.LIMIT
    if limit and sl != NO_LEVEL and ((sl >= trigger) if long else (sl <= trigger)):
        return (f"a limit {'long' if long else 'short'} fills at or {'below' if long else 'above'}"
                f" its trigger: its stop-loss must lie {'below' if long else 'above'} the trigger")
    if not limit and tp != NO_LEVEL and ((tp <= trigger) if long else (tp >= trigger)):
        return (f"a stop {'long' if long else 'short'} fills at or {'above' if long else 'below'}"
                f" its trigger: its take-profit must lie {'above' if long else 'below'} the "
                "trigger")
    return None


def impossible_size(asset: Asset, terms: OrderTerms) -> str | None:
    """Why the position ``terms`` open is out of bounds at every price the order can fill at
    (so it could only end rejected), or None. Fills lie within ``1..asset.max_price_ticks``
    (a tick above it is dropped), at or below the trigger for a limit long and a stop short,
    at or above it otherwise; the quantity margin * leverage buys falls as the price rises,
    and an open takes ``1..asset.max_qty_steps`` of it (engine.orders.plan_open)."""
    top = asset.max_price_ticks
    at_or_below = (terms.side == Side.LONG) == (terms.kind == OrderKind.LIMIT)
    low, high = (1, min(terms.trigger_ticks, top)) if at_or_below else (terms.trigger_ticks, top)
    if low > high:
        return f"it fills at or above its trigger, above the largest price " \
            f"{asset.ticks_to_price(top)}"
    if quantity_steps(asset, terms.margin_micros, terms.leverage, high) > asset.max_qty_steps:
        return "position too large at every price the order can fill at"
    if quantity_steps(asset, terms.margin_micros, terms.leverage, low) < 1:
        return f"margin * leverage buys less than one step ({asset.qty_step}) at every " \
            "price the order can fill at"
    return None


def placement_refusal(asset: Asset, terms: OrderTerms) -> Rejected | None:
    """Why an order of ``terms`` (checked with :func:`check_terms`) is refused at placement,
    could it only end rejected (:func:`impossible_levels`, :func:`impossible_size`), or None."""
    problem = impossible_levels(terms)
    if problem is not None:
        return Rejected(Code.INVALID_TRIGGER, problem)
    problem = impossible_size(asset, terms)
    return None if problem is None else Rejected(Code.INVALID_REQUEST, problem)


class OrderBook(RowStore[OrderRecord], columns=_COLUMNS, attributes=_ATTR_OF,
                record=_RECORD, id_column="order_id", link_column="trigger_ticks", noun="order",
                indexes=(*_SLOT_NAMES, "expiry")):
    """Open pending orders of one asset (see the module docstring for the layout).

    ``book_tag`` (0..255) goes into every id this book issues. ``capacity``: rows allocated up
    front (grows by doubling); ``min_pending`` and ``min_dead`` floor the indexes' merge and
    compaction thresholds.
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

    def _name_indexes(self) -> None:
        self._fills = self._indexes[:len(_SLOT_NAMES)]  # by slot 2 * kind + side
        self._expiry = self._indexes[len(_SLOT_NAMES)]

    # -- single-order API ----------------------------------------------------------------
    def next_order_id(self) -> int:
        """The id the next :meth:`place` will issue (the same id :meth:`place_many` gives its
        first order); changes nothing. OverflowError when the book has no row left."""
        return self._next_id()

    def place(self, owner: int, terms: OrderTerms, placed_ts_us: int) -> int:
        """Add an open order (terms checked with :func:`check_terms`; ValueError if they do not
        fit) and return its id (int > 0). O(1) amortised."""
        check_terms(self.asset, terms)
        oid = self._insert(record_of_terms, terms, owner, placed_ts_us).order_id
        slot = 2 * terms.kind + terms.side
        trigger = terms.trigger_ticks
        self._fills[slot].add(-trigger if _NEGATED[slot] else trigger, oid, self._oid)
        if terms.expires_ts_us != GOOD_TILL_CANCELLED:
            self._expiry.add(terms.expires_ts_us, oid, self._oid)
        return oid

    def remove(self, order_id: int) -> OrderRecord | None:
        """Remove an open order, whatever ended it (cancelled, filled, expired, rejected), and
        return it as it was; None if it is not open here."""
        record = self._remove(order_id)
        if record is None:
            return None
        self._fills[2 * record.kind + record.side].discard(self._oid)
        if record.expires_ts_us != GOOD_TILL_CANCELLED:
            self._expiry.discard(self._oid)
        return record

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

    # -- bulk load -----------------------------------------------------------------------
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
        cols["owner"] = owners
        cols["placed_ts_us"] = ts
        return self._insert_many(cols)

    def _index_entries(self, rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        oids = self._oid[rows]
        slots = 2 * self._kind[rows].astype(np.int64) + self._side[rows]
        trigger = self._trig[rows]
        entries = []
        for slot in range(len(_SLOT_NAMES)):
            sel = slots == slot
            entries.append((-trigger[sel] if _NEGATED[slot] else trigger[sel], oids[sel]))
        expires = self._exp[rows]
        sel = expires != GOOD_TILL_CANCELLED
        entries.append((expires[sel], oids[sel]))
        return entries

    def _check_terms(self, columns: Mapping[str, np.ndarray]) -> None:
        _check_term_columns(self.asset, columns)


def _check_term_columns(asset: Asset, cols: Mapping[str, np.ndarray]) -> None:
    """Vectorised :func:`check_terms` over column arrays (ValueError on the first problem)."""
    side, kind, trigger, margin, lev, tp, sl, expires = int64_columns(
        cols, "side", "kind", "trigger_ticks", "margin_micros", "leverage", "tp_ticks",
        "sl_ticks", "expires_ts_us")
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
    "impossible_levels",
    "impossible_size",
    "naive_sweep",
    "placement_refusal",
    "record_of_terms",
]
