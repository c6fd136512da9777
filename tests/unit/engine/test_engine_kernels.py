"""Vectorised kernels against their scalar definitions, and the scalar kernels against the
Fraction reference: open plans, liquidation prices, PnL, settlement."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from engine import reference
from engine.assets import DEFAULT_ASSETS
from engine.assets import Asset
from engine.marking import unrealized_pnl_atoms
from engine.marking import unrealized_pnl_micros
from engine.orders import MAX_COLUMN_VALUE
from engine.orders import CloseReason
from engine.orders import OpenPlan
from engine.orders import Side
from engine.orders import liquidation_ticks
from engine.orders import liquidation_ticks_array
from engine.orders import plan_open
from engine.orders import plan_open_arrays
from engine.results import Rejected
from engine.settlement import exit_price_ticks
from engine.settlement import pnl_micros
from engine.settlement import settle
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from tests.unit.engine.draws import buying_margins
from tests.unit.engine.draws import dearest_entry
from tests.unit.engine.draws import magnitudes

ASSETS = [*DEFAULT_ASSETS.assets,
          Asset("FINE", "FINE_USDC", price_decimals=4, qty_decimals=4, max_leverage=100),
          Asset("COARSE", "COARSE_USDC", price_decimals=0, qty_decimals=0, max_leverage=20)]
SETTINGS = settings(max_examples=200, deadline=None)
sides = st.sampled_from([Side.LONG, Side.SHORT])
ticks = st.one_of(st.integers(1, 10**7), st.integers(1, 2**60))


@SETTINGS
@given(st.sampled_from(ASSETS), sides, st.integers(1, 10**13), st.integers(-5, 120), ticks,
       st.integers(0, 10), st.one_of(st.none(), ticks), st.one_of(st.none(), ticks),
       st.sampled_from([0, 1, 4_999, 5_000, 100_000, 999_999]))
def test_plan_open_equals_reference(asset: Asset, side: Side, margin: int, leverage: int,
                                    bid: int, spread: int, tp: int | None, sl: int | None,
                                    ppm: int) -> None:
    fast = plan_open(asset, side, margin, leverage, bid, bid + spread, tp, sl, ppm)
    slow = reference.plan_open(asset, side, margin, leverage, bid, bid + spread, tp, sl, ppm)
    if isinstance(fast, Rejected):
        assert isinstance(slow, Rejected) and fast.code == slow.code
    else:
        assert fast == slow


@SETTINGS
@given(st.sampled_from(ASSETS), sides, st.data())
def test_plan_open_equals_reference_near_the_trigger_boundaries(
        asset: Asset, side: Side, data: st.DataObject) -> None:
    """TP and SL one tick around the entry and the liquidation price of an open the planner
    takes: a leverage in range, a price (1..10**6 ticks) and a margin (1..10**9 micro-dollars)
    buying a quantity there, drawn as such (a plain draw was refused before its levels
    mattered in two examples of three)."""
    leverage = data.draw(st.integers(1, asset.max_leverage), label="leverage")
    price = data.draw(st.integers(1, min(10**6, dearest_entry(asset, leverage, 10**9))),
                      label="price")
    margin = data.draw(buying_margins(asset, leverage, price, 1, 10**9), label="margin")
    base = plan_open(asset, side, margin, leverage, price, price, None, None)
    assert isinstance(base, OpenPlan), base
    near = st.sampled_from(sorted({max(1, v + d) for v in (base.liq_ticks, base.entry_ticks)
                                   for d in (-1, 0, 1)}))
    tp, sl = data.draw(near), data.draw(near)
    fast = plan_open(asset, side, margin, leverage, price, price, tp, sl)
    slow = reference.plan_open(asset, side, margin, leverage, price, price, tp, sl)
    assert fast == slow or (isinstance(fast, Rejected) and isinstance(slow, Rejected)
                            and fast.code == slow.code)


@SETTINGS
@given(st.sampled_from(ASSETS), sides, ticks, st.integers(1, 10**12), ticks,
       st.integers(0, 10**13), st.sampled_from(list(CloseReason)))
def test_settle_equals_reference(asset: Asset, side: Side, entry: int, qty: int, exit_: int,
                                 margin: int, reason: CloseReason) -> None:
    fast = settle(asset, side, entry, qty, margin, exit_, reason)
    assert fast == reference.settle(asset, side, entry, qty, margin, exit_, reason)
    assert fast.payout_micros >= 0
    assert fast.payout_micros + fast.house_micros + fast.insurance_micros == margin
    if reason == CloseReason.LIQUIDATION:
        assert fast.payout_micros == 0
    assert exit_price_ticks(side, 5, 7) == (5 if side == Side.LONG else 7)


@SETTINGS
@given(st.sampled_from(ASSETS), st.integers(0, 40), st.booleans(), st.data())
def test_vectorised_pnl_equals_scalar(asset: Asset, n: int, huge: bool,
                                      data: st.DataObject) -> None:
    top = 2**61 if huge else 10**7  # huge values take the exact Python-int path
    bid = data.draw(st.integers(1, top))
    ask = bid + data.draw(st.integers(0, 100))
    entries, qtys = st.integers(1, top), st.integers(1, top)
    if huge:  # also entries near the price and moderate sizes: PnLs that still fit int64
        entries = st.one_of(entries, st.integers(max(1, bid - 10**6), bid + 10**6))
        qtys = st.one_of(qtys, st.integers(1, 2**32))
    entry = data.draw(st.lists(entries, min_size=n, max_size=n))
    qty = data.draw(st.lists(qtys, min_size=n, max_size=n))
    side = data.draw(st.lists(sides, min_size=n, max_size=n))
    want = [pnl_micros(asset, s, e, q, bid if s == Side.LONG else ask)
            for s, e, q in zip(side, entry, qty, strict=True)]
    arrays = (np.array(side, dtype=np.int8), np.array(entry, dtype=np.int64),
              np.array(qty, dtype=np.int64))
    if not all(-(2**63) <= w < 2**63 for w in want):
        with pytest.raises(OverflowError):  # not representable as int64: never wrapped
            unrealized_pnl_micros(asset, *arrays, bid, ask)
        return
    got = unrealized_pnl_micros(asset, *arrays, bid, ask)
    assert got.dtype == np.int64 and got.tolist() == want


def test_pnl_atoms_are_exact_for_fine_assets() -> None:
    fine = ASSETS[3]
    got = unrealized_pnl_atoms(fine, np.array([0, 1], dtype=np.int8),
                               np.array([10_000, 10_000]), np.array([3, 3]), 9_999, 10_001)
    assert got.tolist() == [-3, -3]  # in 1e-8 USD
    micros = unrealized_pnl_micros(fine, np.array([0, 1], dtype=np.int8),
                                   np.array([10_000, 10_000]), np.array([3, 3]), 9_999, 10_001)
    assert micros.tolist() == [-1, -1]  # -3e-8 USD floored to a micro-dollar


@SETTINGS
@given(st.sampled_from(ASSETS), st.integers(1, 30), st.booleans(), st.data())
def test_vectorised_liquidation_equals_scalar(asset: Asset, n: int, huge: bool,
                                              data: st.DataObject) -> None:
    top = 2**60 if huge else 10**8
    draw = data.draw
    side = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    entry = np.array(draw(st.lists(st.integers(1, top), min_size=n, max_size=n)))
    qty = np.array(draw(st.lists(st.integers(1, top), min_size=n, max_size=n)))
    margin = np.array(draw(st.lists(st.integers(1, top), min_size=n, max_size=n)))
    ppm = np.array(draw(st.lists(st.integers(0, 999_999), min_size=n, max_size=n)))
    want = [liquidation_ticks(asset, Side(int(s)), int(e), int(q), int(m), int(p))
            for s, e, q, m, p in zip(side, entry, qty, margin, ppm, strict=True)]
    if any(abs(w) >= 2**63 for w in want):
        return
    got = liquidation_ticks_array(asset, side, entry, qty, margin, ppm)
    assert got.tolist() == want


@SETTINGS
@given(st.sampled_from(ASSETS), st.integers(1, 30), st.integers(1, 10**6),
       st.integers(0, 3), st.sampled_from([0, 5_000]), st.booleans(), st.data())
def test_plan_open_arrays_equals_plan_open(asset: Asset, n: int, bid: int, spread: int,
                                           ppm: int, huge: bool, data: st.DataObject) -> None:
    draw = data.draw
    side = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    lev = draw(st.lists(st.integers(-1, 3 if huge else 120), min_size=n, max_size=n))
    margins = st.integers(-2, 10**10)
    if huge:
        # the four decades of margin below what buys the largest position at 1x (as far as
        # the planner takes them): there margin * 10**(pd+qd) leaves int64
        mul, div = asset.notional_scale
        shift = asset.price_decimals + asset.qty_decimals - 6
        top = min(2**61 // (3 * 10**max(0, shift) * max(1, ppm)),
                  (asset.max_qty_steps + 1) * (bid + 50 + spread) * mul // div)
        margins = magnitudes(max(1, top // 10**4), top)
    margin = draw(st.lists(margins, min_size=n, max_size=n))
    per_row = data.draw(st.booleans())  # one top of book, or one per request
    bids = [bid + data.draw(st.integers(0, 50)) if per_row else bid for _ in range(n)]
    # a level anywhere, or one tick around the row's entry or liquidation price, where each
    # side of a strict inequality is decided (drawn at random, ties are almost never hit)
    tp, sl = [], []
    for i in range(n):
        entry = bids[i] + spread if side[i] == 0 else bids[i]
        edges = [entry]
        base = plan_open(asset, Side(side[i]), margin[i], lev[i], bids[i], bids[i] + spread,
                         None, None, ppm)
        if isinstance(base, OpenPlan):
            edges.append(base.liq_ticks)
        level = st.one_of(st.just(0), st.integers(1, 2 * bid + 10),
                          st.sampled_from(sorted({max(1, e + d) for e in edges
                                                  for d in (-1, 0, 1)})))
        tp.append(draw(level))
        sl.append(draw(level))
    plans, ok = plan_open_arrays(asset, np.array(side), np.array(margin), np.array(lev),
                                 np.array(bids) if per_row else bid,
                                 np.array(bids) + spread if per_row else bid + spread,
                                 np.array(tp), np.array(sl), ppm)
    for i in range(n):
        want = plan_open(asset, Side(side[i]), margin[i], lev[i], bids[i], bids[i] + spread,
                         tp[i] or None, sl[i] or None, ppm)
        assert bool(ok[i]) == isinstance(want, OpenPlan)
        if isinstance(want, OpenPlan):
            fields: dict[str, Any] = {f: int(v[i]) for f, v in plans.items()}
            got = OpenPlan(**{**fields, "side": Side(fields["side"])})
            assert got == want


def test_plan_open_arrays_takes_a_margin_whose_products_leave_int64() -> None:
    """$10,000,000 at 1x on BTC at 60000.0 (and short on it, with a maintenance margin):
    ``margin * 10**(pd+qd)`` is 10**19, past int64, and the vectorised planner still gives
    plan_open's answer and plan."""
    btc = DEFAULT_ASSETS["BTC"]
    for side, ppm in ((Side.LONG, 0), (Side.SHORT, 5_000)):
        want = plan_open(btc, side, 10**13, 1, 600_000, 600_000, None, None, ppm)
        assert isinstance(want, OpenPlan)
        plans, ok = plan_open_arrays(btc, np.array([side]), np.array([10**13]), np.array([1]),
                                     600_000, 600_000, np.array([0]), np.array([0]), ppm)
        assert ok.tolist() == [True]
        fields: dict[str, Any] = {f: int(v[0]) for f, v in plans.items()}
        assert OpenPlan(**{**fields, "side": Side(fields["side"])}) == want


def test_plan_open_arrays_refuses_a_level_plan_open_finds_too_large() -> None:
    """A long's take-profit above MAX_COLUMN_VALUE (up to the int64 column's limit): plan_open
    refuses it (INVALID_TRIGGER), so the vectorised planner must not mark it accepted (the
    book's bulk open then refused the whole load)."""
    sol = DEFAULT_ASSETS["SOL"]
    tps = [MAX_COLUMN_VALUE, MAX_COLUMN_VALUE + 1, 2**63 - 1]
    _, ok = plan_open_arrays(sol, np.zeros(3, dtype=np.int64), np.full(3, 100 * 10**6),
                             np.full(3, 10), 10_000, 10_001, np.array(tps),
                             np.zeros(3, dtype=np.int64))
    want = [isinstance(plan_open(sol, Side.LONG, 100 * 10**6, 10, 10_000, 10_001, tp, None),
                       OpenPlan) for tp in tps]
    assert want == [True, False, False]
    assert ok.tolist() == want


@SETTINGS
@given(st.integers(0, 12), st.integers(0, 12), sides, st.integers(1, 4), magnitudes(1, 10**6),
       st.integers(0, 1), st.sampled_from([0, 1]), st.data())
def test_plan_open_arrays_takes_every_step_a_registry_allows(
        price_decimals: int, qty_decimals: int, side: Side, margin: int, bid: int,
        spread: int, ppm: int, data: st.DataObject) -> None:
    """Steps of up to 12 decimals each (what engine.assets.AssetRegistry allows), with
    ``margin * leverage`` within the planner's bound (at most 4 micro-dollars at 12 + 12
    decimals): where ``10**(pd+qd)``, the maintenance margin's divisor, is past int64 the
    answer is still plan_open's, with levels one tick around the entry and the liquidation
    price."""
    asset = Asset("STEP", "STEP_USDC", price_decimals, qty_decimals, max_leverage=4)
    leverage = data.draw(st.integers(1, 4 // margin), label="leverage")
    ask = bid + spread
    base = plan_open(asset, side, margin, leverage, bid, ask, None, None, ppm)
    edges = {ask if side == Side.LONG else bid}
    if isinstance(base, OpenPlan):
        edges.add(base.liq_ticks)
    level = st.one_of(st.just(0), st.sampled_from(sorted({max(1, e + d) for e in edges
                                                          for d in (-1, 0, 1)})))
    tp, sl = data.draw(level, label="tp"), data.draw(level, label="sl")
    want = plan_open(asset, side, margin, leverage, bid, ask, tp or None, sl or None, ppm)
    plans, ok = plan_open_arrays(asset, np.array([side]), np.array([margin]),
                                 np.array([leverage]), bid, ask, np.array([tp]),
                                 np.array([sl]), ppm)
    assert ok.tolist() == [isinstance(want, OpenPlan)]
    if isinstance(want, OpenPlan):
        fields: dict[str, Any] = {f: int(v[0]) for f, v in plans.items()}
        assert OpenPlan(**{**fields, "side": Side(fields["side"])}) == want


@SETTINGS
@given(st.sampled_from([a for a in ASSETS if a.price_decimals + a.qty_decimals < 6]), sides,
       st.data())
def test_plan_open_arrays_equals_plan_open_where_the_quantity_divisor_leaves_int64(
        asset: Asset, side: Side, data: st.DataObject) -> None:
    """Below 6 decimals in all a quantity is ``margin * leverage // (entry * 10**(6-pd-qd))``,
    and that divisor leaves int64 at a price the planner takes (up to 2**60 ticks). Prices
    are drawn where it wraps past a multiple of 2**64 to a small number (a plain draw of a
    price almost never lands there), so a wrapped divisor would buy a quantity."""
    unit = 10 ** (6 - asset.price_decimals - asset.qty_decimals)
    laps = data.draw(st.integers(1, (2**60 * unit) >> 64), label="laps")
    price = min(2**60, -(-(laps << 64) // unit) + data.draw(st.integers(0, 3), label="past"))
    leverage = data.draw(st.integers(1, asset.max_leverage), label="leverage")
    margin = data.draw(magnitudes(1, 10**13), label="margin")
    want = plan_open(asset, side, margin, leverage, price, price, None, None)
    plans, ok = plan_open_arrays(asset, np.array([side]), np.array([margin]),
                                 np.array([leverage]), price, price, np.array([0]),
                                 np.array([0]))
    assert ok.tolist() == [isinstance(want, OpenPlan)]
    if isinstance(want, OpenPlan):
        fields: dict[str, Any] = {f: int(v[0]) for f, v in plans.items()}
        assert OpenPlan(**{**fields, "side": Side(fields["side"])}) == want
