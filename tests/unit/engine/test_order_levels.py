"""An order's take-profit and stop-loss are refused at placement (engine.order_book.
impossible_levels) when no price the order can fill at would accept them, and only then:
checked against engine.orders.plan_open, the very check a fill runs."""

from __future__ import annotations

from engine.assets import DEFAULT_ASSETS
from engine.order_book import OrderKind
from engine.order_book import OrderTerms
from engine.order_book import impossible_levels
from engine.orders import NO_LEVEL
from engine.orders import OpenPlan
from engine.orders import Side
from engine.orders import plan_open
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

SOL = DEFAULT_ASSETS["SOL"]  # price step 0.01
MARGIN = 100 * 1_000_000  # 100 USD at leverage 1: a quantity at every entry up to 4,000 ticks
levels = st.one_of(st.just(NO_LEVEL), st.integers(1, 3_000))


def fill_range(terms: OrderTerms) -> range:
    """Every entry (ticks, up to 4,000) the order can fill at: a limit long at an ask <= its
    trigger, a stop long at an ask >= it; a short mirrored (engine.order_book.fill_price)."""
    long, limit = terms.side == Side.LONG, terms.kind == OrderKind.LIMIT
    at_or_below = limit == long
    return range(1, terms.trigger_ticks + 1) if at_or_below \
        else range(terms.trigger_ticks, 4_001)


def plan_at(terms: OrderTerms, entry: int, levels: bool = True) -> OpenPlan:
    plan = plan_open(SOL, terms.side, MARGIN, 1, entry, entry,
                     None if terms.tp_ticks == NO_LEVEL or not levels else terms.tp_ticks,
                     None if terms.sl_ticks == NO_LEVEL or not levels else terms.sl_ticks)
    return plan  # type: ignore[return-value]  # a Rejected is no OpenPlan: see opens_at


def opens_at(terms: OrderTerms, entry: int) -> bool:
    return isinstance(plan_at(terms, entry), OpenPlan)


@settings(max_examples=400, deadline=None)
# a short limit at one tick with its stop at two: only the fill at one tick has the stop above
# it, and there the stop is the liquidation price
@example(side=Side.SHORT, kind=OrderKind.LIMIT, trigger=1, tp=NO_LEVEL, sl=2)
@given(side=st.sampled_from(Side), kind=st.sampled_from(OrderKind),
       trigger=st.integers(1, 3_000), tp=levels, sl=levels)
def test_refused_at_placement_only_when_no_fill_price_accepts_the_levels(
        side: Side, kind: OrderKind, trigger: int, tp: int, sl: int) -> None:
    terms = OrderTerms(side, kind, trigger, MARGIN, 1, tp, sl)
    fills = fill_range(terms)
    possible = any(opens_at(terms, entry) for entry in fills)
    if impossible_levels(terms) is not None:
        assert not possible, terms  # never refuses an order that could fill
    elif not possible:
        # not refused, yet no fill opens: only because a short's stop-loss lies at or beyond
        # the liquidation price of every fill whose levels lie on the right sides of it (that
        # bound depends on leverage and the maintenance margin, so the fill decides it)
        assert side == Side.SHORT and sl != NO_LEVEL, terms
        sided = [entry for entry in fills if tp < entry < sl]  # NO_LEVEL (0) is below any entry
        assert sided, terms  # some fill has its levels on the right sides, or it was refused
        assert all(sl >= plan_at(terms, entry, levels=False).liq_ticks for entry in sided), terms


def test_worked_examples() -> None:
    # a limit long at 95.00 with its stop at 96.00: it fills at or below 95, under its stop
    assert impossible_levels(OrderTerms(Side.LONG, OrderKind.LIMIT, 9_500, MARGIN, 5, NO_LEVEL,
                                        9_600)) is not None
    assert impossible_levels(OrderTerms(Side.LONG, OrderKind.LIMIT, 9_500, MARGIN, 5, NO_LEVEL,
                                        9_400)) is None
    # a stop long's take-profit must be above its trigger; a limit long's need not be
    assert impossible_levels(OrderTerms(Side.LONG, OrderKind.STOP, 9_500, MARGIN, 5, 9_500,
                                        NO_LEVEL)) is not None
    assert impossible_levels(OrderTerms(Side.LONG, OrderKind.LIMIT, 9_500, MARGIN, 5, 9_000,
                                        NO_LEVEL)) is None
    # a short mirrored; a stop-loss one tick from the take-profit leaves no entry between
    assert impossible_levels(OrderTerms(Side.SHORT, OrderKind.LIMIT, 9_500, MARGIN, 5, NO_LEVEL,
                                        9_500)) is not None
    assert impossible_levels(OrderTerms(Side.SHORT, OrderKind.STOP, 9_500, MARGIN, 5, 9_000,
                                        9_001)) is not None
    assert impossible_levels(OrderTerms(Side.SHORT, OrderKind.STOP, 9_500, MARGIN, 5, 9_000,
                                        9_002)) is None
