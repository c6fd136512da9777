"""Hypothesis strategies shared by the engine's tests."""

from __future__ import annotations

from engine.amounts import MONEY_DECIMALS
from engine.assets import Asset
from hypothesis import strategies as st


def magnitudes(low: int, top: int) -> st.SearchStrategy[int]:
    """Integers in ``low..top`` (``1 <= low <= top``) spread evenly over their binary orders of
    magnitude (``st.integers`` over a wide range mostly draws small values)."""
    return st.integers(low.bit_length(), top.bit_length()).flatmap(
        lambda bits: st.integers(max(low, 1 << (bits - 1)), min(top, (1 << bits) - 1)))


def _quantity_ratio(asset: Asset, leverage: int) -> tuple[int, int]:
    """``(num, unit)``: a margin buys ``margin * num // (entry_ticks * unit)`` quantity steps
    at ``leverage`` (engine.orders.quantity_steps)."""
    shift = asset.price_decimals + asset.qty_decimals - MONEY_DECIMALS
    return leverage * 10 ** max(shift, 0), 10 ** max(-shift, 0)


def dearest_entry(asset: Asset, leverage: int, margin_micros: int) -> int:
    """The highest entry price (ticks) at which ``margin_micros`` buys a quantity step."""
    num, unit = _quantity_ratio(asset, leverage)
    return margin_micros * num // unit


def buying_margins(asset: Asset, leverage: int, entry_ticks: int, low: int, top: int
                   ) -> st.SearchStrategy[int]:
    """The margins (micro-dollars) in ``low..top`` that buy ``1..asset.max_qty_steps``
    quantity steps at ``leverage`` (``>= 1``) and ``entry_ticks``: those ``plan_open`` does not
    refuse as less than a step or too large. Drawn directly, as most of ``low..top`` buys no
    step at a high price or a low leverage. An empty range raises ValueError (an entry above
    ``dearest_entry(asset, leverage, top)`` is one)."""
    num, unit = _quantity_ratio(asset, leverage)
    den = entry_ticks * unit
    first = max(low, -(-den // num))
    last = min(top, ((asset.max_qty_steps + 1) * den - 1) // num)
    if first > last:
        raise ValueError("no margin in range buys a quantity the planner takes")
    return st.integers(first, last)
