"""An order's take-profit and stop-loss (engine.order_book.impossible_levels), and the size of
the position it opens (impossible_size), are refused at placement when no price the order can
fill at would accept them, and only then: checked against engine.orders.plan_open, the very
check a fill runs."""

from __future__ import annotations

from engine.assets import DEFAULT_ASSETS
from engine.assets import Asset
from engine.order_book import OrderKind
from engine.order_book import OrderTerms
from engine.order_book import impossible_levels
from engine.order_book import impossible_size
from engine.order_book import placement_refusal
from engine.orders import MAX_COLUMN_VALUE
from engine.orders import NO_LEVEL
from engine.orders import OpenPlan
from engine.orders import Side
from engine.orders import plan_open
from engine.results import Code
from engine.results import Rejected
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


SIZE_REFUSALS = ("position too large", "buys less than one step")


def size_refused(asset: Asset, terms: OrderTerms, entry: int) -> bool:
    """Whether a fill of ``terms`` at ``entry`` (bid = ask) is refused for its quantity."""
    plan = plan_open(asset, terms.side, terms.margin_micros, terms.leverage, entry, entry,
                     None, None)
    return isinstance(plan, Rejected) and any(why in plan.message for why in SIZE_REFUSALS)


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(sorted(DEFAULT_ASSETS)), side=st.sampled_from(Side),
       kind=st.sampled_from(OrderKind), data=st.data(),
       trigger=st.one_of(st.integers(1, 10_000), st.integers(1, MAX_COLUMN_VALUE)),
       margin=st.one_of(st.integers(1, 1_000), st.integers(1, 10**9),
                        st.integers(1, MAX_COLUMN_VALUE)))
def test_refused_at_placement_only_when_no_fill_price_gives_a_quantity_in_bounds(
        name: str, side: Side, kind: OrderKind, data: st.DataObject, trigger: int,
        margin: int) -> None:
    asset = DEFAULT_ASSETS[name]
    leverage = data.draw(st.integers(1, asset.max_leverage))
    terms = OrderTerms(side, kind, trigger, margin, leverage, NO_LEVEL, NO_LEVEL)
    # the prices it can fill at: a tick above max_price_ticks never comes (the feed drops it)
    top = asset.max_price_ticks
    at_or_below = (side == Side.LONG and kind == OrderKind.LIMIT) or \
        (side == Side.SHORT and kind == OrderKind.STOP)
    low, high = (1, min(trigger, top)) if at_or_below else (trigger, top)
    if impossible_size(asset, terms) is not None:
        assert placement_refusal(asset, terms) == Rejected(
            Code.INVALID_REQUEST, impossible_size(asset, terms) or "")
        if low <= high:  # any fill price, the ends among them, is refused for its size
            for entry in (low, high, data.draw(st.integers(low, high))):
                assert size_refused(asset, terms, entry), (terms, entry)
        return
    assert placement_refusal(asset, terms) is None
    # some fill price gives a quantity in bounds: the quantity falls as the price rises, so
    # the lowest price whose quantity is not too large is the one to try
    assert low <= high, terms
    lo, hi = low, high
    while lo < hi:
        mid = (lo + hi) // 2
        plan = plan_open(asset, side, margin, leverage, mid, mid, None, None)
        if isinstance(plan, Rejected) and "position too large" in plan.message:
            lo = mid + 1
        else:
            hi = mid
    assert not size_refused(asset, terms, lo), (terms, lo)


def test_size_worked_examples() -> None:
    # 500,000 USD at 100x buys 10^8 SOL at a limit long's highest fill price, 0.50: above the
    # bound of about 1.5 million SOL at any price it fills at; at 1x, 10^6 SOL is within it
    huge = OrderTerms(Side.LONG, OrderKind.LIMIT, 50, 500_000 * 10**6, 100, NO_LEVEL, NO_LEVEL)
    assert placement_refusal(SOL, huge) == Rejected(
        Code.INVALID_REQUEST, "position too large at every price the order can fill at")
    assert placement_refusal(SOL, huge._replace(leverage=1)) is None
    # an open of that size names it and the bound (it read "position too large" alone)
    assert plan_open(SOL, Side.LONG, 500_000 * 10**6, 100, 50, 50, None, None) == Rejected(
        Code.INVALID_REQUEST, "position too large: 100000000.00 SOL at this price, at most "
        f"{SOL.steps_to_qty(SOL.max_qty_steps)}")
    # a stop long fills at or above its trigger: above the largest price, never
    above = huge._replace(kind=OrderKind.STOP, trigger_ticks=SOL.max_price_ticks + 1,
                          margin_micros=100_000 * 10**6)
    assert "above the largest price" in str(placement_refusal(SOL, above))
    assert placement_refusal(SOL, above._replace(trigger_ticks=SOL.max_price_ticks)) is None
    # a limit short too: 1 micro-dollar buys less than a step at its lowest fill price
    tiny = above._replace(side=Side.SHORT, kind=OrderKind.LIMIT, trigger_ticks=10_000,
                          margin_micros=1)
    assert "less than one step" in str(placement_refusal(SOL, tiny))
    # levels are decided first, with their own code
    assert placement_refusal(SOL, huge._replace(sl_ticks=60)) == Rejected(
        Code.INVALID_TRIGGER, impossible_levels(huge._replace(sl_ticks=60)) or "")
