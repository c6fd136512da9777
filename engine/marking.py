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
    ``entry - ask`` for a short (int64)."""
    long = sides == 0
    exit_ticks = np.where(long, np.int64(bid_ticks), np.int64(ask_ticks))
    move = exit_ticks - entry_ticks
    return np.where(long, move, -move)


def _scaled_product(moves: np.ndarray, qty_steps: np.ndarray, mul: int, div: int) -> np.ndarray:
    """``floor(moves * qty * mul / div)`` as int64, exact (Python ints when int64 could
    overflow)."""
    if moves.size == 0:
        return np.zeros(0, dtype=np.int64)
    bound = float(np.max(np.abs(moves))) * float(np.max(qty_steps)) * float(mul)
    if bound < _INT64_SAFE:
        out = moves * qty_steps
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
    moves = _signed_moves(np.asarray(sides), np.asarray(entry_ticks, dtype=np.int64),
                          bid_ticks, ask_ticks)
    mul, div = asset.notional_scale
    return _scaled_product(moves, np.asarray(qty_steps, dtype=np.int64), mul, div)


def unrealized_pnl_atoms(asset: Asset, sides: np.ndarray, entry_ticks: np.ndarray,
                         qty_steps: np.ndarray, bid_ticks: int, ask_ticks: int) -> np.ndarray:
    """Unrealized PnL in exact atoms (``10**-atom_decimals(asset)`` USD), int64, no rounding."""
    moves = _signed_moves(np.asarray(sides), np.asarray(entry_ticks, dtype=np.int64),
                          bid_ticks, ask_ticks)
    mul = 10 ** (atom_decimals(asset) - asset.price_decimals - asset.qty_decimals)
    return _scaled_product(moves, np.asarray(qty_steps, dtype=np.int64), mul, 1)


def equity_micros(margin_micros: np.ndarray, pnl_micros: np.ndarray) -> np.ndarray:
    """Per-position equity ``margin + pnl`` (int64 micro-dollars)."""
    return np.asarray(margin_micros, dtype=np.int64) + pnl_micros


__all__ = ["atom_decimals", "equity_micros", "unrealized_pnl_atoms", "unrealized_pnl_micros"]
