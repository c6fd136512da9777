"""The per-tick trigger sweep: sorted trigger indexes, and the naive full sweep it replaces.

Liquidation, take-profit and stop-loss levels are set when a position opens and change only
when it is amended, so a tick only needs the positions whose level it crossed. A
:class:`TriggerIndex` keeps position ids ordered by an int64 key such that "triggered at ``x``"
is always ``key <= x`` (levels crossed from above are stored negated), so the triggered entries
are a prefix found by one binary search.
Positions opened since the last merge sit in a small unsorted pending buffer that every sweep
scans linearly; it is merged into the sorted arrays when it exceeds a fraction of the index.

Closing a position does not touch the arrays: an index holds ids, and an id whose row now holds
another id (or none) is dead. An index built with ``current_keys`` (the position book's, whose
levels can be amended) also holds an entry dead while its key is not the key its position has
in the index now, so an amend leaves the old entry behind without searching for it (and an
amend back to that key finds it alive again, see :meth:`TriggerIndex.add_again`).
Dead entries are skipped by each sweep and dropped when they exceed a fraction of the index
(compaction). A sweep never consumes live entries: a triggered position stays reported until it
is closed, so a sweep is a pure function of the open positions and the prices (what journal
replay needs).

:func:`naive_sweep` recomputes every unrealized PnL and compares it with margin - maintenance
margin, TP and SL: the straightforward implementation, kept for the benchmark and as an oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from engine.amounts import MONEY_DECIMALS
from engine.assets import Asset
from engine.marking import atom_decimals, unrealized_pnl_atoms
from engine.orders import PPM, CloseReason
from engine.position_ids import ROW_MASK, ROW_SHIFT

if TYPE_CHECKING:
    from engine.book import PositionBook

_INT64_MAX = (1 << 63) - 1
_INT64_SAFE = float(2**62)
# A pending buffer is merged once it holds more than this many entries, or 1/2**_PENDING_SHIFT
# of the index, whichever is larger: the per-sweep linear scan stays a small fraction of the
# book while each O(n) merge is paid for by many opens.
_MIN_PENDING = 1024
_PENDING_SHIFT = 5
# Dead entries are compacted away once they exceed this many, or a quarter of the live ones.
_MIN_DEAD = 4096
_DEAD_SHIFT = 2
_EMPTY = np.zeros(0, dtype=np.int64)

KeyFunction = Callable[[np.ndarray], np.ndarray]
"""rows (int64) -> the key (int64) each row's live item has in an index now, or a value no entry
of that index ever has when the item has none there."""


class TriggerIndex:
    """Ids of open positions ordered by an int64 trigger key; an entry is triggered at ``x``
    exactly when ``key <= x``, and alive while its id is its row's id (and, with
    ``current_keys``, its key the row's key in this index now).

    Storage: ``keys``/``ids`` sorted by key (int64, 16 bytes per entry), a head offset before
    which every entry is dead, and pending ``keys``/``ids`` buffers for recent additions.
    """

    __slots__ = ("_current_keys", "_entries", "_head", "_ids", "_keys", "_live", "_min_dead",
                 "_min_pending", "_pend_ids", "_pend_keys", "_pend_min", "_pend_n")

    def __init__(self, min_pending: int = _MIN_PENDING, min_dead: int = _MIN_DEAD,
                 current_keys: KeyFunction | None = None) -> None:
        """``min_pending``/``min_dead``: floors of the merge and compaction thresholds (tests
        use tiny ones to exercise merges on small books). ``current_keys``: for items whose
        key can change, the key each row's item has now; an entry is then alive only while
        its key is that one. None: keys never change, an entry is alive while its id is."""
        self._current_keys = current_keys
        self._min_pending = max(1, min_pending)
        self._min_dead = max(1, min_dead)
        self._keys = _EMPTY
        self._ids = _EMPTY
        self._head = 0
        self._pend_keys = np.zeros(64, dtype=np.int64)
        self._pend_ids = np.zeros(64, dtype=np.int64)
        self._pend_n = 0
        self._pend_min = _INT64_MAX  # lower bound of pending keys: most sweeps skip the scan
        self._live = 0  # live entries (sorted part after head, plus pending)
        self._entries = 0  # all entries after head, plus pending

    # -- bookkeeping -------------------------------------------------------------------------
    def __len__(self) -> int:
        """Live entries."""
        return self._live

    @property
    def nbytes(self) -> int:
        return int(self._keys.nbytes + self._ids.nbytes + self._pend_keys.nbytes
                   + self._pend_ids.nbytes)

    @property
    def pending(self) -> int:
        return self._pend_n

    @property
    def dead(self) -> int:
        return self._entries - self._live

    def add(self, key: int, position_id: int, id_column: np.ndarray) -> None:
        """Add one live entry (O(1) amortised; may merge the pending buffer)."""
        n = self._pend_n
        if n == self._pend_keys.shape[0]:
            self._pend_keys = np.concatenate([self._pend_keys, np.zeros_like(self._pend_keys)])
            self._pend_ids = np.concatenate([self._pend_ids, np.zeros_like(self._pend_ids)])
        self._pend_keys[n] = key
        self._pend_ids[n] = position_id
        self._pend_n = n + 1
        if key < self._pend_min:
            self._pend_min = key
        self._live += 1
        self._entries += 1
        if self._pend_n > max(self._min_pending, self._live >> _PENDING_SHIFT):
            self.merge(id_column)

    def add_again(self, key: int, position_id: int, id_column: np.ndarray) -> None:
        """Add a live entry for an item whose key in this index has just become ``key`` (its
        row already says so). An entry it had at ``key`` before, still stored, is alive again
        and is counted instead of stored twice. O(log n + entries at ``key`` + pending)."""
        lo = max(self._head, int(self._keys.searchsorted(key, side="left")))
        hi = int(self._keys.searchsorted(key, side="right"))
        n = self._pend_n
        if (self._ids[lo:hi] == position_id).any() or (
                (self._pend_keys[:n] == key) & (self._pend_ids[:n] == position_id)).any():
            self._live += 1
        else:
            self.add(key, position_id, id_column)

    def add_many(self, keys: np.ndarray, ids: np.ndarray, id_column: np.ndarray) -> None:
        """Add live entries in bulk (int64 arrays of equal length) straight into the sorted
        part."""
        self.merge(id_column, extra=(keys.astype(np.int64), ids.astype(np.int64)))

    def discard(self, id_column: np.ndarray) -> None:
        """Note that one live entry died (its position closed, or its key changed); compacts
        when dead entries pile up. Call after the row changed, and after :meth:`add_again` of
        the item's new key (an entry it revives must be counted before a compaction counts)."""
        self._live -= 1
        if self._entries - self._live > max(self._min_dead, self._live >> _DEAD_SHIFT):
            self.merge(id_column, compact=True)

    def merge(self, id_column: np.ndarray, *, compact: bool = False,
              extra: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Move the live pending entries (and ``extra``) into the sorted arrays; with
        ``compact`` also drop dead sorted entries. O(index size)."""
        keys = self._keys[self._head:]
        ids = self._ids[self._head:]
        if compact and ids.size:
            keep = self._alive(keys, ids, id_column)
            keys, ids = keys[keep], ids[keep]
        pk = self._pend_keys[:self._pend_n]
        pi = self._pend_ids[:self._pend_n]
        if pi.size:
            keep = self._alive(pk, pi, id_column)
            pk, pi = pk[keep], pi[keep]
        if extra is not None:
            pk = np.concatenate([pk, extra[0]])
            pi = np.concatenate([pi, extra[1]])
            self._live += int(extra[1].size)
        if pk.size:
            # entries of equal keys may lie in any order (every reader of a triggered prefix
            # treats it as a set), so the faster unstable sort: on keys in no particular
            # order a stable one costs several times more
            order = np.argsort(pk)
            pk, pi = pk[order], pi[order]
            if keys.size:
                at = np.searchsorted(keys, pk, side="right")
                keys = np.insert(keys, at, pk)
                ids = np.insert(ids, at, pi)
            else:  # a bulk load into an empty index (a restore): nothing to insert into
                keys, ids = pk, pi
        else:
            keys, ids = keys.copy(), ids.copy()  # drop the dead prefix's memory
        self._keys, self._ids = keys, ids
        self._head = 0
        self._pend_n = 0
        self._pend_min = _INT64_MAX
        if self._pend_keys.shape[0] > 4 * max(64, self._min_pending, self._live >> _PENDING_SHIFT):
            # the pending buffer only needs to hold up to the merge threshold
            self._pend_keys = np.zeros(64, dtype=np.int64)
            self._pend_ids = np.zeros(64, dtype=np.int64)
        self._entries = int(ids.size)
        if compact and self._entries != self._live:
            raise AssertionError(f"trigger index lost track: {self._entries} entries alive, "
                                 f"{self._live} expected")

    # -- the sweep ---------------------------------------------------------------------------
    def triggered(self, x: int, id_column: np.ndarray) -> np.ndarray | None:
        """Live ids (int64, unordered) whose key is ``<= x``, or None when there are none.

        Costs one binary search plus work proportional to the triggered (and just-closed)
        entries and, only when a pending key could be ``<= x``, a scan of the pending buffer.
        """
        found = None
        head = self._head
        end = int(self._keys.searchsorted(x, side="right"))
        if end > head:
            cand = self._ids[head:end]
            alive = self._alive(self._keys[head:end], cand, id_column)
            if not alive[0]:
                # entries closed since the last sweep lead the prefix: step over them for good
                skip = int(alive.argmax()) if alive.any() else int(alive.size)
                self._head = head + skip
                self._entries -= skip
            found = cand[alive]
        if self._pend_n and self._pend_min <= x:
            sel = np.flatnonzero(self._pend_keys[:self._pend_n] <= x)
            if sel.size:
                pend = self._pend_ids[sel]
                pend = pend[self._alive(self._pend_keys[sel], pend, id_column)]
                found = pend if found is None else np.concatenate([found, pend])
        if found is None or found.size == 0:
            return None
        return found

    def _alive(self, keys: np.ndarray, ids: np.ndarray, id_column: np.ndarray) -> np.ndarray:
        """bool mask: which entries (``keys``/``ids``, int64, equal length) are alive."""
        rows = (ids >> ROW_SHIFT) & ROW_MASK
        alive = id_column[rows] == ids
        if self._current_keys is not None:
            alive &= self._current_keys(rows) == keys
        return alive

    def _stored(self) -> tuple[np.ndarray, np.ndarray]:
        """Every entry still stored (sorted part after the head, then pending): keys, ids."""
        return (np.concatenate([self._keys[self._head:], self._pend_keys[:self._pend_n]]),
                np.concatenate([self._ids[self._head:], self._pend_ids[:self._pend_n]]))

    def live_ids(self, id_column: np.ndarray) -> np.ndarray:
        """All live ids in the index (int64, unordered), for checks and tests."""
        keys, ids = self._stored()
        return ids[self._alive(keys, ids, id_column)]

    def problems(self, id_column: np.ndarray) -> list[str]:
        """What is wrong with the index's own bookkeeping ([] when sound): the live and entry
        counts against the stored entries, no item alive twice, the sorted part in order and
        the pending keys' lower bound. O(n); for checks and tests."""
        keys, ids = self._stored()
        live = ids[self._alive(keys, ids, id_column)]
        out = []
        if live.size != self._live or ids.size != self._entries:
            out.append(f"counts {self._live} live of {self._entries} entries, holds "
                       f"{live.size} of {ids.size}")
        if np.unique(live).size != live.size:
            out.append("an item is alive twice")
        if (np.diff(self._keys[self._head:]) < 0).any():
            out.append("sorted keys out of order")
        if self._pend_n and self._pend_keys[:self._pend_n].min() < self._pend_min:
            out.append("a pending key is below the pending lower bound")
        return out


def naive_sweep(book: PositionBook, bid_ticks: int, ask_ticks: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Full sweep: recompute every unrealized PnL (exact, in atoms) and compare equity with
    the maintenance margin, and the closing price with TP and SL.

    Returns the same as :meth:`PositionBook.sweep`: ids (int64, ascending) and reasons (int8),
    SL/TP winning over liquidation. O(book capacity) per call.
    """
    asset = book.asset
    cols = book.columns()
    ids = cols["position_id"]
    sides = cols["side"]
    entry = cols["entry_ticks"]
    qty = cols["qty_steps"]
    liquidated = _liquidated(asset, sides, entry, qty, cols["margin_micros"], cols["mm_ppm"],
                             bid_ticks, ask_ticks)
    long = sides == 0
    tp = cols["tp_ticks"]
    sl = cols["sl_ticks"]
    tp_hit = (tp != 0) & np.where(long, bid_ticks >= tp, ask_ticks <= tp)
    sl_hit = (sl != 0) & np.where(long, bid_ticks <= sl, ask_ticks >= sl)
    hit = (ids > 0) & (tp_hit | sl_hit | liquidated)
    rows = np.flatnonzero(hit)
    out_ids = ids[rows]
    reasons = np.where(tp_hit[rows], np.int8(CloseReason.TAKE_PROFIT),
                       np.where(sl_hit[rows], np.int8(CloseReason.STOP_LOSS),
                                np.int8(CloseReason.LIQUIDATION))).astype(np.int8)
    order = np.argsort(out_ids, kind="stable")
    return out_ids[order], reasons[order]


def _liquidated(asset: Asset, sides: np.ndarray, entry: np.ndarray, qty: np.ndarray,
                margin: np.ndarray, ppm: np.ndarray, bid_ticks: int, ask_ticks: int
                ) -> np.ndarray:
    """Per row (bool): equity, margin + unrealized PnL, at or below the maintenance margin,
    all in exact atoms: on int64 when every amount provably fits, else on Python ints (in
    atoms of ``10**-(pd+qd)`` USD a PnL, a margin or their sum can leave int64)."""
    if entry.size == 0:
        return np.zeros(0, dtype=bool)
    atoms = atom_decimals(asset)
    margin_mul = 10 ** (atoms - MONEY_DECIMALS)
    # |PnL| <= max(entry, bid, ask) * qty in ticks * steps, and the notional (so the
    # maintenance margin) <= entry * qty
    pnl_mul = 10 ** (atoms - asset.price_decimals - asset.qty_decimals)
    price = max(float(np.abs(entry).max()), float(abs(bid_ticks)), float(abs(ask_ticks)))
    bound = (price * float(np.abs(qty).max()) * pnl_mul * 2.0
             + float(np.abs(margin).max()) * margin_mul)
    if bound < _INT64_SAFE:
        pnl = unrealized_pnl_atoms(asset, sides, entry, qty, bid_ticks, ask_ticks)
        equity = pnl + (margin if margin_mul == 1 else margin * margin_mul)
        if ppm.any():
            return equity <= _maintenance_atoms(asset, entry, qty, ppm)
        return equity <= 0
    out = []
    for s, e, q, m, p in zip(sides.tolist(), entry.tolist(), qty.tolist(), margin.tolist(),
                             ppm.tolist(), strict=True):
        move = bid_ticks - e if s == 0 else e - ask_ticks
        out.append(move * q * pnl_mul + m * margin_mul <= (p * e * q * pnl_mul) // PPM)
    return np.array(out, dtype=bool)


def _maintenance_atoms(asset: Asset, entry: np.ndarray, qty: np.ndarray,
                       ppm: np.ndarray) -> np.ndarray:
    """Maintenance margin ``ppm * entry * qty`` in atoms, floored, without int64 overflow."""
    longs = np.zeros(entry.shape, dtype=np.int8)
    # the notional in atoms is the PnL of a long entered at -entry and marked at 0
    notional = unrealized_pnl_atoms(asset, longs, -entry, qty, 0, 0)
    whole, part = np.divmod(notional, PPM)
    return whole * ppm + (part * ppm) // PPM


__all__ = ["KeyFunction", "TriggerIndex", "naive_sweep"]
