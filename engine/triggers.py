"""The per-tick trigger sweep: sorted trigger indexes, and the naive full sweep it replaces.

Liquidation, take-profit and stop-loss levels are fixed when a position opens, so a tick only
needs the positions whose level it crossed. A :class:`TriggerIndex` keeps position ids ordered
by an int64 key such that "triggered at ``x``" is always ``key <= x`` (levels crossed from
above are stored negated), so the triggered entries are a prefix found by one binary search.
Positions opened since the last merge sit in a small unsorted pending buffer that every sweep
scans linearly; it is merged into the sorted arrays when it exceeds a fraction of the index.

Closing a position does not touch the arrays: an index holds ids, and an id whose row now holds
another id (or none) is dead. Dead entries are skipped by each sweep and dropped when they
exceed a fraction of the index (compaction). A sweep never consumes live entries: a triggered
position stays reported until it is closed, so a sweep is a pure function of the open
positions and the prices (what journal replay needs).

:func:`naive_sweep` recomputes every unrealized PnL and compares it with margin - maintenance
margin, TP and SL: the straightforward implementation, kept for the benchmark and as an oracle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from engine.assets import Asset
from engine.marking import atom_decimals, unrealized_pnl_atoms
from engine.orders import PPM, CloseReason
from engine.position_ids import ROW_MASK, ROW_SHIFT

if TYPE_CHECKING:
    from engine.book import PositionBook

_INT64_MAX = (1 << 63) - 1
# A pending buffer is merged once it holds more than this many entries, or 1/2**_PENDING_SHIFT
# of the index, whichever is larger: the per-sweep linear scan stays a small fraction of the
# book while each O(n) merge is paid for by many opens.
_MIN_PENDING = 1024
_PENDING_SHIFT = 5
# Dead entries are compacted away once they exceed this many, or a quarter of the live ones.
_MIN_DEAD = 4096
_DEAD_SHIFT = 2
_EMPTY = np.zeros(0, dtype=np.int64)


def alive_mask(ids: np.ndarray, id_column: np.ndarray) -> np.ndarray:
    """bool mask: which of ``ids`` (int64) are still the id stored in their row."""
    return id_column[(ids >> ROW_SHIFT) & ROW_MASK] == ids


class TriggerIndex:
    """Ids of open positions ordered by an int64 trigger key; an entry is triggered at ``x``
    exactly when ``key <= x``.

    Storage: ``keys``/``ids`` sorted by key (int64, 16 bytes per entry), a head offset before
    which every entry is dead, and pending ``keys``/``ids`` buffers for recent additions.
    """

    __slots__ = ("_entries", "_head", "_ids", "_keys", "_live", "_min_dead", "_min_pending",
                 "_pend_ids", "_pend_keys", "_pend_min", "_pend_n")

    def __init__(self, min_pending: int = _MIN_PENDING, min_dead: int = _MIN_DEAD) -> None:
        """``min_pending``/``min_dead``: floors of the merge and compaction thresholds (tests
        use tiny ones to exercise merges on small books)."""
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

    def add_many(self, keys: np.ndarray, ids: np.ndarray, id_column: np.ndarray) -> None:
        """Add live entries in bulk (int64 arrays of equal length) straight into the sorted
        part."""
        self.merge(id_column, extra=(keys.astype(np.int64), ids.astype(np.int64)))

    def discard(self, id_column: np.ndarray) -> None:
        """Note that one live entry died (its position closed); compacts when dead entries
        pile up. Call after the row's id changed."""
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
            keep = alive_mask(ids, id_column)
            keys, ids = keys[keep], ids[keep]
        pk = self._pend_keys[:self._pend_n]
        pi = self._pend_ids[:self._pend_n]
        if pi.size:
            keep = alive_mask(pi, id_column)
            pk, pi = pk[keep], pi[keep]
        if extra is not None:
            pk = np.concatenate([pk, extra[0]])
            pi = np.concatenate([pi, extra[1]])
            self._live += int(extra[1].size)
        if pk.size:
            order = np.argsort(pk, kind="stable")
            pk, pi = pk[order], pi[order]
            at = np.searchsorted(keys, pk, side="right")
            keys = np.insert(keys, at, pk)
            ids = np.insert(ids, at, pi)
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
            alive = id_column[(cand >> ROW_SHIFT) & ROW_MASK] == cand
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
                pend = pend[id_column[(pend >> ROW_SHIFT) & ROW_MASK] == pend]
                found = pend if found is None else np.concatenate([found, pend])
        if found is None or found.size == 0:
            return None
        return found

    def live_ids(self, id_column: np.ndarray) -> np.ndarray:
        """All live ids in the index (int64, unordered), for checks and tests."""
        ids = np.concatenate([self._ids[self._head:], self._pend_ids[:self._pend_n]])
        return ids[alive_mask(ids, id_column)]


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
    pnl = unrealized_pnl_atoms(asset, sides, entry, qty, bid_ticks, ask_ticks)
    atoms = atom_decimals(asset)
    margin = cols["margin_micros"]
    equity = pnl + (margin if atoms == 6 else margin * 10 ** (atoms - 6))
    ppm = cols["mm_ppm"]
    if ppm.any():
        mm = _maintenance_atoms(asset, entry, qty, ppm)
        liquidated = equity <= mm
    else:
        liquidated = equity <= 0
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


def _maintenance_atoms(asset: Asset, entry: np.ndarray, qty: np.ndarray,
                       ppm: np.ndarray) -> np.ndarray:
    """Maintenance margin ``ppm * entry * qty`` in atoms, floored, without int64 overflow."""
    longs = np.zeros(entry.shape, dtype=np.int8)
    # the notional in atoms is the PnL of a long entered at -entry and marked at 0
    notional = unrealized_pnl_atoms(asset, longs, -entry, qty, 0, 0)
    whole, part = np.divmod(notional, PPM)
    return whole * ppm + (part * ppm) // PPM


__all__ = ["TriggerIndex", "alive_mask", "naive_sweep"]
