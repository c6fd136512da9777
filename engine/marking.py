"""Vectorised mark-to-market: unrealized PnL of many positions at one bid/ask.

Arrays are one entry per position: ``sides`` int8 (:class:`~engine.orders.Side` values),
``entry_ticks`` and ``qty_steps`` int64. Results are int64 micro-dollars floored toward minus
infinity, bit-for-bit what :func:`engine.settlement.pnl_micros` gives one position at a time.
When the products could leave int64 (absurd prices or sizes) the computation falls back to
exact Python ints instead of overflowing silently.
"""

from __future__ import annotations

import numpy as np

from engine.amounts import MONEY_DECIMALS
from engine.assets import Asset

_INT64_SAFE = float(2**62)


def atom_decimals(asset: Asset) -> int:
    """Decimals of the finest money unit in which every PnL of ``asset`` is an exact integer:
    micro-dollars (6) unless ``price_decimals + qty_decimals`` is larger."""
    return max(MONEY_DECIMALS, asset.price_decimals + asset.qty_decimals)


def _signed_moves(sides: np.ndarray, entry_ticks: np.ndarray, bid_ticks: int,
                  ask_ticks: int) -> np.ndarray:
    """Per position, the favourable price move in ticks: ``bid - entry`` for a long (side 0),
    ``entry - ask`` for a short (int64, a new array)."""
    return np.where(sides == 0, np.int64(bid_ticks) - entry_ticks,
                    entry_ticks - np.int64(ask_ticks))


def _magnitude(values: np.ndarray) -> float:
    return max(abs(float(values.max())), abs(float(values.min())))


def _scaled_product(entry_ticks: np.ndarray, moves: np.ndarray, qty_steps: np.ndarray,
                    mul: int, div: int, price_bound: int) -> np.ndarray:
    """``floor(moves * qty * mul / div)`` as int64, exact (Python ints when int64 could
    overflow). ``moves`` is overwritten."""
    if moves.size == 0:
        return np.zeros(0, dtype=np.int64)
    # |move| <= max(|entry|, |bid|, |ask|), so two cheap reductions bound every product
    bound = (max(_magnitude(entry_ticks), float(price_bound)) * 2.0 * _magnitude(qty_steps)
             * float(mul))
    if bound < _INT64_SAFE:
        out = np.multiply(moves, qty_steps, out=moves)
        if mul != 1:
            out *= mul
        if div != 1:
            out //= div  # numpy integer floor division rounds toward minus infinity
        return out
    exact = [(int(m) * int(q) * mul) // div for m, q in zip(moves.tolist(), qty_steps.tolist(),
                                                             strict=True)]
    return np.array(exact, dtype=np.int64)  # raises OverflowError if a result cannot fit


def unrealized_pnl_micros(asset: Asset, sides: np.ndarray, entry_ticks: np.ndarray,
                          qty_steps: np.ndarray, bid_ticks: int, ask_ticks: int) -> np.ndarray:
    """Unrealized PnL (int64 micro-dollars, floored) of each position at ``bid``/``ask``:
    long ``(bid - entry) * qty``, short ``(entry - ask) * qty``."""
    entry = np.asarray(entry_ticks, dtype=np.int64)
    moves = _signed_moves(np.asarray(sides), entry, bid_ticks, ask_ticks)
    mul, div = asset.notional_scale
    return _scaled_product(entry, moves, np.asarray(qty_steps, dtype=np.int64), mul, div,
                           max(abs(bid_ticks), abs(ask_ticks)))


def unrealized_pnl_atoms(asset: Asset, sides: np.ndarray, entry_ticks: np.ndarray,
                         qty_steps: np.ndarray, bid_ticks: int, ask_ticks: int) -> np.ndarray:
    """Unrealized PnL in exact atoms (``10**-atom_decimals(asset)`` USD), int64, no rounding."""
    entry = np.asarray(entry_ticks, dtype=np.int64)
    moves = _signed_moves(np.asarray(sides), entry, bid_ticks, ask_ticks)
    mul = 10 ** (atom_decimals(asset) - asset.price_decimals - asset.qty_decimals)
    return _scaled_product(entry, moves, np.asarray(qty_steps, dtype=np.int64), mul, 1,
                           max(abs(bid_ticks), abs(ask_ticks)))


def equity_micros(margin_micros: np.ndarray, pnl_micros: np.ndarray) -> np.ndarray:
    """Per-position equity ``margin + pnl`` (int64 micro-dollars)."""
    return np.asarray(margin_micros, dtype=np.int64) + pnl_micros


__all__ = ["atom_decimals", "equity_micros", "unrealized_pnl_atoms", "unrealized_pnl_micros"]
