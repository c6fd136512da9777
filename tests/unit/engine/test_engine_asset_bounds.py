"""Per-asset price and quantity bounds: every price * quantity the engine computes fits int64."""

from __future__ import annotations

from engine.amounts import MAX_UNITS
from engine.assets import DEFAULT_ASSETS
from engine.assets import MAX_NOTIONAL_MICROS
from engine.assets import Asset
from engine.orders import MAX_COLUMN_VALUE
from engine.orders import Side
from engine.orders import liquidation_ticks
from engine.settlement import pnl_micros
from hypothesis import given
from hypothesis import strategies as st

INT64_MAX = 2**63 - 1


def test_default_bounds_leave_real_prices_far_below() -> None:
    bounds = {a.name: (a.ticks_to_price(a.max_price_ticks), a.steps_to_qty(a.max_qty_steps))
              for a in DEFAULT_ASSETS.assets}
    assert bounds == {"SOL": ("1518500.24", "1518500.25"),
                      "BTC": ("151850024.9", "15185.00250"),
                      "ETH": ("15185002.49", "151850.0250")}


@given(st.integers(0, 12), st.integers(0, 12), st.integers(1, 1000))
def test_bounds_hold_for_any_steps(price_decimals: int, qty_decimals: int, lev: int) -> None:
    asset = Asset("X", "X_USDC", price_decimals, qty_decimals, lev)
    p, q = asset.max_price_ticks, asset.max_qty_steps
    assert p >= 1 and q >= 1 and p <= MAX_COLUMN_VALUE // 4 and q <= MAX_UNITS
    assert asset.notional_micros(p, q) <= MAX_NOTIONAL_MICROS


@given(st.sampled_from(DEFAULT_ASSETS.assets), st.integers(1, 10**18), st.integers(1, 10**18),
       st.integers(1, 10**18), st.sampled_from([Side.LONG, Side.SHORT]))
def test_worst_position_at_bounded_prices_fits(asset: Asset, entry: int, exit_: int, qty: int,
                                               side: Side) -> None:
    entry = 1 + entry % asset.max_price_ticks
    exit_ = 1 + exit_ % asset.max_price_ticks
    qty = 1 + qty % asset.max_qty_steps
    notional = asset.notional_micros(entry, qty)
    pnl = pnl_micros(asset, side, entry, qty, exit_)
    assert notional <= MAX_NOTIONAL_MICROS and abs(pnl) <= MAX_NOTIONAL_MICROS
    margin = max(1, notional // asset.max_leverage)
    assert margin + abs(pnl) <= INT64_MAX  # settlement sums: margin + pnl
    liq = liquidation_ticks(asset, side, entry, qty, margin, 0)
    assert 0 <= liq <= MAX_COLUMN_VALUE
