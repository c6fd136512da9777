"""No open that is already lost (SPEC "Trading rules"): an open whose liquidation price is
already crossed by the current closing-side price is refused with WOULD_LIQUIDATE, by the fast
engine, the Fraction reference and the vectorised planner alike."""

from __future__ import annotations

import numpy as np
import pytest
from engine.assets import DEFAULT_ASSETS
from engine.book import PositionBook
from engine.orders import NO_LEVEL
from engine.orders import CloseReason
from engine.orders import OpenPlan
from engine.orders import Side
from engine.orders import liquidation_ticks
from engine.orders import maintenance_margin_micros
from engine.orders import plan_open
from engine.orders import plan_open_arrays
from engine.orders import quantity_steps
from engine.results import Code
from engine.results import Rejected
from engine_impls import Impl
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from tests.unit.engine.draws import buying_margins

SOL = DEFAULT_ASSETS["SOL"]  # price step 0.01, quantity step 0.01
USD = 1_000_000


def _plan(impl: Impl, side: Side, leverage: int, bid: str, ask: str,
          ppm: int = 0) -> OpenPlan | Rejected:
    result: OpenPlan | Rejected = impl.plan_open(
        SOL, side, 100 * USD, leverage, SOL.price_to_ticks(bid), SOL.price_to_ticks(ask),
        None, None, ppm)
    return result


@pytest.mark.parametrize(("side", "bid", "ask"), [
    # 100 USD at 100x at the ask 100.00: quantity 100.00, liquidation 100.00 - 100/100 = 99.00,
    # above or at the bid
    (Side.LONG, "98.90", "100.00"), (Side.LONG, "99.00", "100.00"),
    # 100 USD at 100x at the bid 100.00: quantity 100.00, liquidation 100.00 + 100/100 = 101.00,
    # below or at the ask
    (Side.SHORT, "100.00", "101.10"), (Side.SHORT, "100.00", "101.00"),
], ids=["long-above-the-bid", "long-at-the-bid", "short-below-the-ask", "short-at-the-ask"])
def test_an_open_whose_liquidation_price_the_closing_price_reached_is_refused(
        impl: Impl, side: Side, bid: str, ask: str) -> None:
    result = _plan(impl, side, 100, bid, ask)
    assert isinstance(result, Rejected) and result.code == Code.WOULD_LIQUIDATE


@pytest.mark.parametrize(("side", "bid", "ask", "liquidation"), [
    (Side.LONG, "99.01", "100.00", "99.00"),  # below the bid
    (Side.SHORT, "100.00", "100.99", "101.00"),  # above the ask
], ids=["long", "short"])
def test_an_open_whose_liquidation_price_is_beyond_the_closing_price_opens(
        impl: Impl, side: Side, bid: str, ask: str, liquidation: str) -> None:
    plan = _plan(impl, side, 100, bid, ask)
    assert isinstance(plan, OpenPlan) and plan.liq_ticks == SOL.price_to_ticks(liquidation)


def test_maintenance_margin_moves_the_liquidation_price_closer(impl: Impl) -> None:
    # 0.5% maintenance margin: liquidation 100.00 - (100 - 50) / 100 = 99.50
    assert isinstance(_plan(impl, Side.LONG, 100, "99.51", "100.00", 5_000), OpenPlan)
    refused = _plan(impl, Side.LONG, 100, "99.50", "100.00", 5_000)
    assert isinstance(refused, Rejected) and refused.code == Code.WOULD_LIQUIDATE


def test_a_long_without_a_positive_liquidation_price_always_opens(impl: Impl) -> None:
    plan = _plan(impl, Side.LONG, 1, "0.01", "100.00")  # 1x: liquidation price 0
    assert isinstance(plan, OpenPlan) and plan.liq_ticks == 0


def test_the_vectorised_planner_refuses_the_same_opens() -> None:
    side = np.array([Side.LONG, Side.LONG, Side.SHORT, Side.SHORT])
    bid = np.array([9_890, 9_901, 10_000, 10_000])
    ask = np.array([10_000, 10_000, 10_110, 10_099])
    margin = np.full(4, 100 * USD)
    leverage = np.full(4, 100)
    zeros = np.zeros(4, dtype=np.int64)
    _, ok = plan_open_arrays(SOL, side, margin, leverage, bid, ask, zeros, zeros)
    assert ok.tolist() == [False, True, False, True]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([Side.LONG, Side.SHORT]), st.integers(1, 100), st.integers(1, 10**6),
       st.integers(0, 5_000), st.sampled_from([0, 5_000, 100_000]), st.data())
def test_an_accepted_open_is_not_liquidated_by_the_tick_it_opened_on(
        side: Side, leverage: int, bid: int, spread: int, ppm: int,
        data: st.DataObject) -> None:
    """Any margin in 1..10**10 micro-dollars that buys a quantity (the others are refused
    before the liquidation price is known, which was most of a plain draw): an accepted open is
    not liquidated by the tick it opened on, and one refused WOULD_LIQUIDATE would be."""
    ask = bid + spread
    entry = ask if side == Side.LONG else bid
    margin = data.draw(buying_margins(SOL, leverage, entry, 1, 10**10), label="margin")
    result = plan_open(SOL, side, margin, leverage, bid, ask, None, None, ppm)
    if isinstance(result, OpenPlan):
        plan = result
    else:
        assert result.code == Code.WOULD_LIQUIDATE, result
        # the same position let into the book
        qty = quantity_steps(SOL, margin, leverage, entry)
        plan = OpenPlan(side, entry, qty, margin, leverage,
                        liquidation_ticks(SOL, side, entry, qty, margin, ppm), NO_LEVEL,
                        NO_LEVEL, maintenance_margin_micros(SOL, entry, qty, ppm), ppm)
    book = PositionBook(SOL, book_tag=1)
    book.open(7, plan, 0)
    _, reasons = book.sweep(bid, ask)
    closed = [CloseReason(int(r)) for r in reasons]
    if isinstance(result, Rejected):
        assert closed == [CloseReason.LIQUIDATION]
    else:
        assert CloseReason.LIQUIDATION not in closed


@pytest.mark.parametrize("side", [Side.LONG, Side.SHORT])
@pytest.mark.parametrize("leverage", [11, 50, 100])
def test_an_open_whose_margin_does_not_exceed_the_maintenance_margin_would_liquidate(
        impl: Impl, side: Side, leverage: int) -> None:
    """A 10% maintenance margin and a leverage above 10: the margin is at most the maintenance
    margin, so the liquidation price lies at or beyond the entry, which every closing price
    crosses. SPEC's rule names that WOULD_LIQUIDATE (it was INVALID_REQUEST); at 10x the margin
    is just above it, and the liquidation price is crossed by the spread alone."""
    result = _plan(impl, side, leverage, "100.00", "100.01", ppm=100_000)
    assert isinstance(result, Rejected) and result.code == Code.WOULD_LIQUIDATE, result
    at_ten = _plan(impl, side, 10, "100.00", "100.01", ppm=100_000)
    assert isinstance(at_ten, Rejected) and at_ten.code == Code.WOULD_LIQUIDATE, at_ten


@pytest.mark.parametrize(("side", "tp", "sl", "message"), [
    (Side.LONG, "100.01", None, "take-profit of a long must be above the entry price (100.01)"),
    (Side.LONG, None, "100.01", "stop-loss of a long must lie between the liquidation price "
                                "(89.99) and the entry (100.01)"),
    (Side.SHORT, "100.00", None, "take-profit of a short must be below the entry price "
                                 "(100.00)"),
    (Side.SHORT, None, "110.00", "stop-loss of a short must lie between the entry (100.00) "
                                 "and the liquidation price (110.00)"),
])
def test_a_refused_take_profit_or_stop_loss_names_the_prices_it_must_lie_beyond(
        side: Side, tp: str | None, sl: str | None, message: str) -> None:
    """The entry is the fill's price, which the client did not know: the refusal read "must be
    above the entry price" and named none."""
    result = plan_open(SOL, side, 100 * USD, 10, SOL.price_to_ticks("100.00"),
                       SOL.price_to_ticks("100.01"),
                       None if tp is None else SOL.price_to_ticks(tp),
                       None if sl is None else SOL.price_to_ticks(sl))
    assert result == Rejected(Code.INVALID_TRIGGER, message)
