"""The row store both books are built on: columnar numpy arrays, one row per live item.

No Python object exists per item: an item is a row of the columns, found from its id in O(1)
(the id encodes the row, see :mod:`engine.position_ids`). A :class:`RowStore` subclass names a
schema group (engine.schema: ``BOOK_ROW`` for positions, ``ORDER_ROW`` for orders); the store
allocates one column per field, named ``Field.column`` with dtype ``Field.dtype``, ``capacity``
rows each (rows ``>= high water`` are unused), and keeps each column in a plain attribute of
the subclass's choosing, so the book's hot paths index them directly.

Two columns carry the row bookkeeping:

* the **id** column (int64): ``> 0`` a live row; ``< 0`` a free row, minus the last id it
  carried (so the next id of the row is one generation later); ``0`` never used;
* a **link** column (int64, one of the item's own columns): on a free row, the next free row
  (``-1`` ends the list) or :data:`RETIRED` (the row's generation is exhausted: its id is never
  issued again, so the row is never reused).

Freed rows form an intrusive LIFO free list through the link column, so taking and releasing a
row are O(1) amortised (columns grow by doubling), and a snapshot of the columns plus the free
list's head restores the free list and the next ids exactly.

The store also holds the book's :class:`~engine.triggers.TriggerIndex` es (their ids are
checked against the id column): the subclass names them, says which entries its rows make
(``_index_entries``) and, if a live row's keys can change, the key each row has in each index
now (``_index_keys``); the store loads them in bulk, compacts them and checks them.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, Self, TypeVar

import numpy as np

from engine import schema
from engine.assets import Asset
from engine.position_ids import (
    GEN_SHIFT,
    MAX_BOOK_TAG,
    MAX_GENERATION,
    MAX_ROWS,
    ROW_MASK,
    ROW_SHIFT,
    TAG_MASK,
)
from engine.triggers import KeyFunction, TriggerIndex

_INT64_MAX = (1 << 63) - 1
RETIRED = -2
"""The link cell of a free row whose generation is exhausted (never reused)."""
FREE_HEAD = "free_head"
"""The snapshot array (int64, shape (1,)) holding the first free row (-1: none)."""
_CHECK_ROWS = 16_384
"""Rows a restore's checks take at a time (int64 temporaries of 128 KiB)."""
_OWNED = ("owner", "margin_micros")  # columns every store has: who holds a row, what it locks
_HALF_BITS = 31  # margins are summed in halves of this many bits (open_margin_by_owner)
_HALF_MASK = (1 << _HALF_BITS) - 1


def int64_columns(columns: Mapping[str, np.ndarray], *names: str) -> list[np.ndarray]:
    """The columns ``names`` of ``columns`` (arrays by column name) as int64 arrays, in that
    order (the given array itself where it is int64 already: read them, do not write)."""
    return [np.asarray(columns[name], dtype=np.int64) for name in names]


RecordT = TypeVar("RecordT", bound=tuple[Any, ...])  # a NamedTuple of the columns' fields


class RowStore(ABC, Generic[RecordT]):
    """Live rows of one asset's book, records of type ``RecordT`` (see the module docstring).

    A subclass declares its layout as class keywords::

        class PositionBook(RowStore[PositionRecord], columns=schema.BOOK_ROW,
                           attributes={"position_id": "_pid", ...}, record=...,
                           id_column="position_id", link_column="qty_steps",
                           noun="position", indexes=("long_stop", ...)):

    ``attributes`` maps every field name of ``columns`` (in order) to the attribute holding its
    column; ``record`` builds a ``RecordT`` from a row's values (Python ints, schema order);
    ``id_column``/``link_column`` name the bookkeeping columns (int64); ``noun`` names an item
    in messages; ``indexes`` names the trigger indexes, created in that order in
    ``self._indexes``. The group must have ``owner`` and ``margin_micros`` columns.

    ``book_tag`` (0..255) goes into every id the store issues, so ids are unique across the
    books of a cluster.
    """

    _COLUMNS: ClassVar[schema.Group]
    _ATTRS: ClassVar[tuple[str, ...]]  # attribute of each column, schema order
    _BUILD: ClassVar[Callable[[Sequence[Any]], Any]]  # a row's values -> its record
    _COLUMN_NAMES: ClassVar[tuple[str, ...]]
    _ID_AT: ClassVar[int]  # where the id column is in schema order
    _LINK_AT: ClassVar[int]
    _OWNER_AT: ClassVar[int]
    _MARGIN_AT: ClassVar[int]
    _NOUN: ClassVar[str]
    _INDEX_NAMES: ClassVar[tuple[str, ...]]

    _ids: np.ndarray  # the id column
    _links: np.ndarray  # the link column
    _cols: tuple[np.ndarray, ...]  # every column, schema order
    _indexes: tuple[TriggerIndex, ...]

    def __init_subclass__(cls, *, columns: schema.Group, attributes: Mapping[str, str],
                          record: Callable[[Sequence[Any]], Any], id_column: str,
                          link_column: str, noun: str, indexes: Sequence[str],
                          **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        schema.check_names(f"{cls.__name__}'s columns", tuple(attributes), schema.names(columns))
        names = tuple(f.column for f in columns)
        for name in (id_column, link_column, *_OWNED):
            if name not in names or np.dtype(columns[names.index(name)].dtype) != np.int64:
                raise schema.SchemaError(f"{cls.__name__} needs an int64 column {name!r}")
        cls._COLUMNS = columns
        cls._ATTRS = tuple(attributes[f.name] for f in columns)
        cls._BUILD = record
        cls._COLUMN_NAMES = names
        cls._ID_AT = names.index(id_column)
        cls._LINK_AT = names.index(link_column)
        cls._OWNER_AT, cls._MARGIN_AT = (names.index(n) for n in _OWNED)
        cls._NOUN = noun
        cls._INDEX_NAMES = tuple(indexes)

    def __init__(self, asset: Asset, book_tag: int = 0, capacity: int = 1024, *,
                 min_pending: int = 1024, min_dead: int = 4096) -> None:
        """``capacity``: rows allocated up front (grows by doubling). ``min_pending`` and
        ``min_dead`` floor the trigger indexes' merge and compaction thresholds."""
        if not 0 <= book_tag <= MAX_BOOK_TAG:
            raise ValueError(f"book_tag must be in 0..{MAX_BOOK_TAG}")
        self.asset = asset
        self.book_tag = book_tag
        self._cap = min(max(1, int(capacity)), MAX_ROWS)
        self._bind([np.zeros(self._cap, dtype=f.dtype) for f in self._COLUMNS])
        self._hw = 0  # rows ever used (high water)
        self._live = 0
        self._free_head = -1
        self._free_count = 0
        self._indexes = tuple(TriggerIndex(min_pending=min_pending, min_dead=min_dead,
                                           current_keys=keys) for keys in self._index_keys())
        self._name_indexes()

    def _bind(self, columns: Sequence[np.ndarray]) -> None:
        """Make ``columns`` (schema order) the store's columns, under every name it uses."""
        for attr, col in zip(self._ATTRS, columns, strict=True):
            setattr(self, attr, col)
        self._cols = tuple(columns)
        self._ids = columns[self._ID_AT]
        self._links = columns[self._LINK_AT]

    # -- what a book adds --------------------------------------------------------------------
    @abstractmethod
    def _index_entries(self, rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per index, in ``indexes`` order: the (keys, ids) (int64) the live ``rows`` put in
        it."""

    def _name_indexes(self) -> None:
        """Bind the indexes (``self._indexes``) to the names the book's hot paths use; called
        once, by ``__init__``. The default binds none."""

    def _index_keys(self) -> tuple[KeyFunction | None, ...]:
        """Per index, in ``indexes`` order: rows -> the key each row's live item has in it now
        (see :class:`~engine.triggers.TriggerIndex`), or None where a live row's key never
        changes. The default: no key ever changes."""
        return (None,) * len(self._INDEX_NAMES)

    @abstractmethod
    def _check_terms(self, columns: Mapping[str, np.ndarray]) -> None:
        """ValueError unless live rows' columns (by column name) hold valid items."""

    # -- size --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._live

    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def nbytes(self) -> int:
        """Every byte the book holds: all columns at full capacity plus the trigger indexes
        (sorted arrays and pending buffers). The free list lives inside the columns."""
        cols = sum(col.nbytes for col in self._cols)
        return int(cols + sum(ix.nbytes for ix in self._indexes))

    def _grow(self, rows: int) -> None:
        if rows > MAX_ROWS:
            raise OverflowError(f"{self._NOUN} books hold at most {MAX_ROWS} rows")
        cap = min(MAX_ROWS, max(rows, self._cap * 2))
        grown = []
        for old in self._cols:
            new = np.zeros(cap, dtype=old.dtype)
            new[: self._hw] = old[: self._hw]
            grown.append(new)
        self._bind(grown)
        self._cap = cap

    # -- rows --------------------------------------------------------------------------------
    def _record(self, row: int) -> RecordT:
        """The live row ``row`` as a record."""
        record: RecordT = type(self)._BUILD([col.item(row) for col in self._cols])
        return record

    def _insert(self, build: Callable[[Any, int, int, int], RecordT], terms: Any, owner: int,
                ts_us: int) -> RecordT:
        """Add one live row: ``build(terms, id, owner, ts_us)``, the record of the id
        :meth:`_take_row` gives it, written into its cells; returns that record. ValueError
        (nothing taken) unless ``owner`` is in ``0..2**63-1`` and ``ts_us`` an int64 above its
        minimum. O(1) amortised."""
        if not 0 <= owner <= _INT64_MAX or not -_INT64_MAX <= ts_us <= _INT64_MAX:
            raise ValueError("owner or timestamp out of range")
        row, new_id = self._take_row()
        record = build(terms, new_id, owner, ts_us)
        for col, value in zip(self._cols, record, strict=True):
            col[row] = value
        return record

    def _remove(self, item_id: int) -> RecordT | None:
        """Release the live row of ``item_id`` and return its record as it was; None if it is
        not live here."""
        row = self._row(item_id)
        if row < 0:
            return None
        record = self._record(row)
        self._release_row(row, int(self._ids[row]))
        return record

    def _take_row(self) -> tuple[int, int]:
        """Take the first free row (or a new one), give it its next id and count it live;
        returns (row, id). O(1) amortised."""
        row = self._free_head
        if row >= 0:
            self._free_head = int(self._links[row])
            self._free_count -= 1
            gen = ((-int(self._ids[row])) >> GEN_SHIFT) + 1
        else:
            row = self._hw
            if row == self._cap:
                self._grow(row + 1)
            self._hw = row + 1
            gen = 1
        new_id = (gen << GEN_SHIFT) | (row << ROW_SHIFT) | self.book_tag
        self._ids[row] = new_id
        self._live += 1
        return row, new_id

    def _release_row(self, row: int, item_id: int) -> None:
        """Free the live row ``row`` holding ``item_id``: onto the free list, or retired
        when its generation is exhausted."""
        self._ids[row] = -item_id
        if (item_id >> GEN_SHIFT) < MAX_GENERATION:
            self._links[row] = self._free_head
            self._free_head = row
            self._free_count += 1
        else:
            self._links[row] = RETIRED
        self._live -= 1

    def _take_rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Take ``n`` rows as ``n`` calls of :meth:`_take_row` would, without counting them
        live: (rows, ids), int64. OverflowError (nothing taken) when they do not fit."""
        reuse = min(n, self._free_count)
        if self._hw + (n - reuse) > MAX_ROWS:
            raise OverflowError(f"{self._NOUN} books hold at most {MAX_ROWS} rows")
        rows = np.empty(n, dtype=np.int64)
        gens = np.ones(n, dtype=np.int64)
        row = self._free_head
        for i in range(reuse):
            rows[i] = row
            gens[i] = ((-int(self._ids[row])) >> GEN_SHIFT) + 1
            row = int(self._links[row])
        self._free_head = row
        self._free_count -= reuse
        fresh = n - reuse
        if fresh:
            if self._hw + fresh > self._cap:
                self._grow(self._hw + fresh)
            rows[reuse:] = np.arange(self._hw, self._hw + fresh, dtype=np.int64)
            self._hw += fresh
        return rows, (gens << GEN_SHIFT) | (rows << ROW_SHIFT) | self.book_tag

    def _insert_many(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """Insert rows whose columns (every column but the id, by column name, equal-length
        and already checked but for owners) are ``columns``, into free rows first, and index
        them; returns their ids (int64). ValueError if an owner is negative."""
        owners = columns[self._COLUMN_NAMES[self._OWNER_AT]]
        if (owners < 0).any():
            raise ValueError("owners must be >= 0")
        rows, ids = self._take_rows(int(owners.size))
        columns[self._COLUMN_NAMES[self._ID_AT]] = ids
        for name, col in zip(self._COLUMN_NAMES, self._cols, strict=True):
            col[rows] = columns[name]
        self._live += int(rows.size)
        self._index_rows(rows)
        return ids

    def _next_id(self) -> int:
        """The id the next :meth:`_take_row` issues; changes nothing. OverflowError when the
        book has no row left."""
        row = self._free_head
        if row >= 0:
            gen = ((-int(self._ids[row])) >> GEN_SHIFT) + 1
        else:
            row = self._hw
            if row >= MAX_ROWS:
                raise OverflowError(f"{self._NOUN} books hold at most {MAX_ROWS} rows")
            gen = 1
        return (gen << GEN_SHIFT) | (row << ROW_SHIFT) | self.book_tag

    def next_ids(self, count: int, released: Sequence[int] = (), *,
                 fitting: bool = False) -> list[int]:
        """The ids ``count`` single inserts would issue after the live items ``released`` are
        removed in that order (a tick's closes, then its fills); changes nothing.
        OverflowError when they do not fit; with ``fitting``, the ids of the first inserts
        that fit instead (fewer than ``count`` when the book runs out of rows)."""
        freed: list[tuple[int, int]] = []  # (row, last id): the free list's new head last
        for item_id in released:
            if (item_id >> GEN_SHIFT) < MAX_GENERATION:
                freed.append((self._row(item_id), item_id))
        out: list[int] = []
        row, hw = self._free_head, self._hw
        while len(out) < count:
            if freed:
                row_of, last = freed.pop()
            elif row >= 0:
                row_of, last = row, -int(self._ids[row])
                row = int(self._links[row])
            else:
                if hw >= MAX_ROWS:
                    if fitting:
                        break
                    raise OverflowError(f"{self._NOUN} books hold at most {MAX_ROWS} rows")
                row_of, last, hw = hw, 0, hw + 1
            gen = (last >> GEN_SHIFT) + 1
            out.append((gen << GEN_SHIFT) | (row_of << ROW_SHIFT) | self.book_tag)
        return out

    def _row(self, item_id: int) -> int:
        """Row of a live id, or -1 (any other value, a stale id of a reused row included)."""
        try:
            iid = operator.index(item_id)
        except TypeError:
            return -1
        if iid <= 0 or iid > _INT64_MAX or (iid & TAG_MASK) != self.book_tag:
            return -1
        row = (iid >> ROW_SHIFT) & ROW_MASK
        if row >= self._hw or int(self._ids[row]) != iid:
            return -1
        return row

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows (int64) of live ``ids`` (int64 array); KeyError if one is not live here."""
        rows = (ids >> ROW_SHIFT) & ROW_MASK
        ok = (ids > 0) & ((ids & TAG_MASK) == self.book_tag) & (rows < self._hw)
        if not ok.all() or not (self._ids[rows] == ids).all():
            raise KeyError(f"{self._NOUN} id not open in this book")
        return rows

    def get(self, item_id: int) -> RecordT | None:
        """The open item with this id, or None (also for an id whose row was reused)."""
        row = self._row(item_id)
        return None if row < 0 else self._record(row)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, int | np.integer) and self._row(int(item_id)) >= 0

    # -- vectorised reads --------------------------------------------------------------------
    def live_rows(self) -> np.ndarray:
        """Rows (int64, ascending) of the open items."""
        return np.flatnonzero(self._ids[: self._hw] > 0)

    def free_rows(self) -> np.ndarray:
        """Rows (int64) on the free list, in the order they are reused."""
        rows: list[int] = []
        row = self._free_head
        while row >= 0:
            rows.append(row)
            row = int(self._links[row])
        return np.array(rows, dtype=np.int64)

    def ids(self) -> np.ndarray:
        """Ids (int64, ascending) of all open items."""
        ids = self._ids[: self._hw]
        return np.sort(ids[ids > 0])

    def ids_of_owner(self, owner: int) -> np.ndarray:
        """Ids (int64, ascending) of ``owner``'s open items: one vectorised scan."""
        hw = self._hw
        ids = self._ids[:hw]
        return np.sort(ids[(self._cols[self._OWNER_AT][:hw] == owner) & (ids > 0)])

    def open_margin_by_owner(self) -> dict[int, int]:
        """Sum of the margins locked by open items per owner (exact ints); owners without
        open items are absent."""
        hw = self._hw
        live = self._ids[:hw] > 0
        owners = self._cols[self._OWNER_AT][:hw][live]
        if owners.size == 0:
            return {}
        margins = self._cols[self._MARGIN_AT][:hw][live]
        order = np.argsort(owners, kind="stable")
        owners, margins = owners[order], margins[order]
        starts = np.flatnonzero(np.concatenate([[True], owners[1:] != owners[:-1]]))
        # A margin fits int64 but an owner's sum need not (four of 2**62 wrap to 0): sum the
        # high and low 31 bits apart (each sum stays below 2**31 * MAX_ROWS) and join them
        # as Python ints.
        high = np.add.reduceat(margins >> _HALF_BITS, starts).tolist()
        low = np.add.reduceat(margins & _HALF_MASK, starts).tolist()
        return {int(o): (h << _HALF_BITS) + lo for o, h, lo in zip(owners[starts].tolist(), high,
                                                                   low, strict=True)}

    def open_count_by_owner(self) -> dict[int, int]:
        """How many open items each owner has; owners without open items are absent."""
        hw = self._hw
        owners, counts = np.unique(self._cols[self._OWNER_AT][:hw][self._ids[:hw] > 0],
                                   return_counts=True)
        return dict(zip(owners.tolist(), counts.tolist(), strict=True))

    def columns(self) -> dict[str, np.ndarray]:
        """Views (not copies; do not write) of every column over the used rows, including
        free ones (id ``<= 0``), by column name in schema order."""
        hw = self._hw
        return {name: col[:hw] for name, col in zip(self._COLUMN_NAMES, self._cols,
                                                    strict=True)}

    # -- trigger indexes ---------------------------------------------------------------------
    def _index_rows(self, rows: np.ndarray) -> None:
        """Put the live ``rows`` (int64) into the trigger indexes in bulk."""
        for index, (keys, ids) in zip(self._indexes, self._index_entries(rows), strict=True):
            if ids.size:
                index.add_many(keys, ids, self._ids)

    def compact(self) -> None:
        """Merge every pending trigger entry and drop every dead one now (O(N)); single
        inserts and removals do this on their own in small doses, a caller may prefer an idle
        moment."""
        for index in self._indexes:
            index.merge(self._ids, compact=True)

    def index_sizes(self) -> dict[str, tuple[int, int, int]]:
        """Per trigger index: (live entries, pending entries, dead entries), for tests and
        metrics."""
        return {n: (len(ix), ix.pending, ix.dead) for n, ix in zip(self._INDEX_NAMES,
                                                                  self._indexes, strict=True)}

    # -- snapshots and checks ----------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """A copy of the book's state: every column over the used rows (free rows included,
        so ids and the free list restore exactly) and ``free_head`` (int64, shape (1,))."""
        out = {name: col.copy() for name, col in self.columns().items()}
        out[FREE_HEAD] = np.array([self._free_head], dtype=np.int64)
        return out

    @classmethod
    def from_arrays(cls, asset: Asset, book_tag: int, arrays: Mapping[str, np.ndarray], *,
                    copy: bool = True, min_pending: int = 1024, min_dead: int = 4096) -> Self:
        """Rebuild a book from :meth:`to_arrays`; ValueError if the arrays are inconsistent
        (ids that do not match their rows or ``book_tag``, a corrupt free list, an open item
        that is not valid). ``copy=False``: the book takes each given column that already has
        its dtype, and shares no memory with another, as its own (the caller must not use it
        again), so a snapshot read for it is not copied a second time."""
        missing = [n for n in (*cls._COLUMN_NAMES, FREE_HEAD) if n not in arrays]
        if missing:
            raise ValueError(f"missing arrays: {missing}")
        hw = int(np.asarray(arrays[cls._COLUMN_NAMES[cls._ID_AT]]).size)
        if hw > MAX_ROWS:
            raise ValueError(f"{cls._NOUN} books hold at most {MAX_ROWS} rows")
        store = cls(asset, book_tag, capacity=max(hw, 1024), min_pending=min_pending,
                    min_dead=min_dead)
        columns = list(store._cols)
        for i, name in enumerate(cls._COLUMN_NAMES):
            given = np.asarray(arrays[name])
            if given.shape != (hw,):
                raise ValueError(f"array {name} has shape {given.shape}, expected ({hw},)")
            if not copy and hw == store._cap and given.dtype == columns[i].dtype \
                    and given.flags.c_contiguous and given.flags.writeable \
                    and not any(np.may_share_memory(given, c) for c in columns[:i]):
                columns[i] = given
            else:
                columns[i][:hw] = given
        store._bind(columns)
        store._hw = hw
        # the checks walk the rows in blocks: their temporaries stay small and are reused,
        # where whole-column ones would each map (and fault in) fresh memory
        used = store._ids[:hw]
        for start in range(0, hw, _CHECK_ROWS):
            ids = used[start:start + _CHECK_ROWS]
            absolute = np.abs(ids)
            if (ids == 0).any() or ((absolute >> ROW_SHIFT) & ROW_MASK != np.arange(
                    start, start + ids.size, dtype=np.int64)).any() \
                    or ((absolute & TAG_MASK) != book_tag).any():
                raise ValueError(f"{cls._NOUN} ids do not match their rows or book_tag")
        live_rows = store.live_rows()
        store._live = int(live_rows.size)
        store._free_head = int(np.asarray(arrays[FREE_HEAD]).reshape(-1)[0])
        problem, store._free_count = store._walk_free_list()
        if problem:
            raise ValueError(problem)
        if live_rows.size:
            for start in range(0, live_rows.size, _CHECK_ROWS):
                store._check_terms(store._live_columns(live_rows[start:start + _CHECK_ROWS]))
            store._index_rows(live_rows)
        return store

    def _live_columns(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Every column at the live ``rows`` (ascending), by column name, to read (views when
        the rows are consecutive, as in a full book; copies otherwise); ValueError if an owner
        is negative."""
        if rows.size and int(rows[-1]) - int(rows[0]) + 1 == rows.size:
            at: slice | np.ndarray = slice(int(rows[0]), int(rows[-1]) + 1)
        else:
            at = rows
        cols = {name: col[at] for name, col in zip(self._COLUMN_NAMES, self._cols,
                                                   strict=True)}
        if (cols[self._COLUMN_NAMES[self._OWNER_AT]] < 0).any():
            raise ValueError("owners must be >= 0")
        return cols

    def _walk_free_list(self) -> tuple[str, int]:
        """Walk the free list from its head: (what is wrong with it or "", rows on it). It
        must visit free rows with a generation left, each once, and every other free row must
        be retired. O(N)."""
        hw = self._hw
        ids = self._ids[:hw]
        on_list = np.zeros(hw, dtype=bool)
        seen = 0
        row = self._free_head
        while row != -1:
            if not 0 <= row < hw or on_list[row] or ids[row] >= 0 \
                    or (-int(ids[row])) >> GEN_SHIFT >= MAX_GENERATION:
                return ("corrupt free list: it loops, leaves the used rows or holds an open "
                        "or retired row", seen)
            on_list[row] = True
            seen += 1
            row = int(self._links[row])
        off_list = (ids < 0) & ~on_list
        if off_list.any() and (((-ids[off_list]) >> GEN_SHIFT) != MAX_GENERATION).any():
            return "corrupt free list: a free row is neither on it nor retired", seen
        return "", seen

    def check(self) -> list[str]:
        """Internal consistency problems ([] when sound): live and free counts, the free
        list, each trigger index holds exactly its open items (each once, at its current key)
        and counts its live and dead entries right, every open item is valid. O(N); for tests
        and audits."""
        problems: list[str] = []
        live_rows = self.live_rows()
        if live_rows.size != self._live:
            problems.append(f"live count {self._live} != {live_rows.size} live rows")
        problem, seen = self._walk_free_list()
        if problem:
            problems.append(problem)
        elif seen != self._free_count:
            problems.append(f"free count {self._free_count} != {seen} rows on the list")
        entries = self._index_entries(live_rows)
        for name, index, (_, want) in zip(self._INDEX_NAMES, self._indexes, entries,
                                          strict=True):
            got = np.sort(index.live_ids(self._ids))
            if not np.array_equal(got, np.sort(want)):
                problems.append(f"index {name} does not hold exactly its open {self._NOUN}s")
            problems += [f"index {name}: {p}" for p in index.problems(self._ids)]
        if live_rows.size:
            try:
                self._check_terms(self._live_columns(live_rows))
            except ValueError as exc:
                problems.append(f"an open {self._NOUN}'s terms do not fit: {exc}")
        return problems


__all__ = ["FREE_HEAD", "RETIRED", "RowStore", "int64_columns"]
