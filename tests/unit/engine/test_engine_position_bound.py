"""The largest position: a quantity above the asset's bound is refused, so every amount of an
accepted position fits the engine's int64 fields at any price the feed lets through."""

from __future__ import annotations

import numpy as np
import pytest
from engine.assets import DEFAULT_ASSETS
from engine.orders import CloseReason
from engine.orders import OpenPlan
from engine.orders import Side
from engine.orders import plan_open_arrays
from engine.results import Code
from engine.results import Rejected
from engine.settlement import settle
from engine_impls import Impl

I64 = 2**63


@pytest.mark.parametrize("name", list(DEFAULT_ASSETS))
def test_a_quantity_above_the_bound_is_refused_and_one_at_it_opens(impl: Impl, name: str) -> None:
    asset = DEFAULT_ASSETS[name]
    price = asset.max_price_ticks // 2
    mul, div = asset.notional_scale
    # margin (micros) that buys exactly ``qty`` steps at 1x: notional of qty at price
    def margin_for(qty: int) -> int:
        return -(-(price * qty * mul) // div)

    limit = asset.max_qty_steps
    over = impl.plan_open(asset, Side.LONG, margin_for(limit + 1), 1, price, price, None, None, 0)
    assert isinstance(over, Rejected) and over.code == Code.INVALID_REQUEST
    assert "too large" in over.message
    at = impl.plan_open(asset, Side.LONG, margin_for(limit), 1, price, price, None, None, 0)
    assert isinstance(at, OpenPlan) and at.qty_steps == limit


@pytest.mark.parametrize("name", list(DEFAULT_ASSETS))
def test_every_amount_of_the_largest_position_fits_int64(name: str) -> None:
    asset = DEFAULT_ASSETS[name]
    qty, top = asset.max_qty_steps, asset.max_price_ticks
    for side in (Side.LONG, Side.SHORT):
        for entry, exit_ in ((1, top), (top, 1), (top, top)):
            s = settle(asset, side, entry, qty, 2**62, exit_, CloseReason.MANUAL)
            for amount in (s.pnl_micros, s.payout_micros, s.house_micros, s.insurance_micros):
                assert -I64 < amount < I64


def test_the_vectorised_planner_refuses_the_same_quantity() -> None:
    asset = DEFAULT_ASSETS["SOL"]
    price = 10_000  # 100.00
    mul, div = asset.notional_scale
    qty = np.array([asset.max_qty_steps, asset.max_qty_steps + 1], dtype=np.int64)
    margins = -(-(price * qty * mul) // div)
    _, ok = plan_open_arrays(asset, np.zeros(2, dtype=np.int8), margins, np.ones(2, np.int64),
                             price, price, np.zeros(2, np.int64), np.zeros(2, np.int64), 0)
    assert ok.tolist() == [True, False]
