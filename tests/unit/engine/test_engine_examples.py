"""Worked examples written out by hand from the SPEC, run against the fast engine and the
Fraction reference alike (``impl``)."""

from __future__ import annotations

from typing import Any

import pytest
from engine.assets import DEFAULT_ASSETS
from engine.assets import Asset
from engine.orders import NO_LEVEL
from engine.orders import CloseReason
from engine.orders import OpenPlan
from engine.orders import Side
from engine.results import Code
from engine.results import Rejected
from engine.settlement import Settlement
from engine_impls import Impl

SOL = DEFAULT_ASSETS["SOL"]  # price step 0.01, quantity step 0.01
BTC = DEFAULT_ASSETS["BTC"]  # price step 0.1, quantity step 0.00001
ETH = DEFAULT_ASSETS["ETH"]  # price step 0.01, quantity step 0.0001
USD = 1_000_000


def opened(impl: Impl, asset: Asset, side: Side, margin_usd: int, leverage: int, bid: str,
           ask: str, tp: str | None = None, sl: str | None = None, ppm: int = 0
           ) -> tuple[Any, int, OpenPlan]:
    plan = impl.plan_open(asset, side, margin_usd * USD, leverage, asset.price_to_ticks(bid),
                          asset.price_to_ticks(ask),
                          None if tp is None else asset.price_to_ticks(tp),
                          None if sl is None else asset.price_to_ticks(sl), ppm)
    assert isinstance(plan, OpenPlan), plan
    book = impl.new_book(asset)
    return book, book.open(42, plan, 1_000), plan


def swept(impl: Impl, book: Any, asset: Asset, bid: str, ask: str) -> list[CloseReason]:
    return [why for _, why in impl.sweep(book, asset.price_to_ticks(bid),
                                          asset.price_to_ticks(ask))]


def test_long_liquidated_at_90_00_not_90_01(impl: Impl) -> None:
    book, pid, plan = opened(impl, SOL, Side.LONG, 100, 10, "99.99", "100.00")
    assert plan.entry_ticks == 10_000  # a long enters at the ask
    assert plan.qty_steps == 1_000  # 100 * 10 / 100.00 = 10.00 SOL
    assert plan.liq_ticks == 9_000  # 100 - 100 / 10 = 90.00
    assert swept(impl, book, SOL, "90.01", "90.02") == []
    assert swept(impl, book, SOL, "90.00", "90.01") == [CloseReason.LIQUIDATION]
    s = impl.settle(SOL, Side.LONG, plan.entry_ticks, plan.qty_steps, plan.margin_micros,
                    9_000, CloseReason.LIQUIDATION)
    assert s == Settlement(pnl_micros=-100 * USD, payout_micros=0, house_micros=100 * USD,
                           insurance_micros=0)
    assert book.close(pid) is not None
    assert book.close(pid) is None


def test_short_liquidated_at_110_00_not_109_99(impl: Impl) -> None:
    book, _, plan = opened(impl, SOL, Side.SHORT, 100, 10, "100.00", "100.01")
    assert plan.entry_ticks == 10_000  # a short enters at the bid
    assert plan.liq_ticks == 11_000
    assert swept(impl, book, SOL, "109.98", "109.99") == []
    assert swept(impl, book, SOL, "109.99", "110.00") == [CloseReason.LIQUIDATION]
    # a short closes at the ask: loss (110.00 - 100.00) * 10 = 100
    s = impl.settle(SOL, Side.SHORT, 10_000, 1_000, 100 * USD, 11_000, CloseReason.LIQUIDATION)
    assert s == Settlement(-100 * USD, 0, 100 * USD, 0)


def test_liquidation_price_off_the_tick_grid_rounds_the_safe_way(impl: Impl) -> None:
    # long: 100 - 100 / 3 = 66.666..., so 66.67 does not liquidate and 66.66 does
    book, _, plan = opened(impl, SOL, Side.LONG, 100, 3, "100.00", "100.00")
    assert plan.qty_steps == 300 and plan.liq_ticks == 6_666
    assert swept(impl, book, SOL, "66.67", "66.68") == []
    assert swept(impl, book, SOL, "66.66", "66.67") == [CloseReason.LIQUIDATION]
    # short: 100 + 33.333... = 133.333..., so 133.33 does not and 133.34 does
    book, _, plan = opened(impl, SOL, Side.SHORT, 100, 3, "100.00", "100.00")
    assert plan.liq_ticks == 13_334
    assert swept(impl, book, SOL, "133.32", "133.33") == []
    assert swept(impl, book, SOL, "133.33", "133.34") == [CloseReason.LIQUIDATION]


def test_long_take_profit_executes_at_the_bid(impl: Impl) -> None:
    book, _, plan = opened(impl, SOL, Side.LONG, 100, 10, "99.99", "100.00", tp="110.00")
    assert swept(impl, book, SOL, "109.99", "110.00") == []
    assert swept(impl, book, SOL, "110.00", "110.01") == [CloseReason.TAKE_PROFIT]
    # executes at the tick's bid, not at the TP level: a gap to 112.00 pays 12 * 10
    assert swept(impl, book, SOL, "112.00", "112.01") == [CloseReason.TAKE_PROFIT]
    s = impl.settle(SOL, Side.LONG, 10_000, plan.qty_steps, 100 * USD, 11_200,
                    CloseReason.TAKE_PROFIT)
    assert s == Settlement(120 * USD, 220 * USD, -120 * USD, 0)


def test_short_take_profit_and_stop_loss(impl: Impl) -> None:
    book, _, _ = opened(impl, SOL, Side.SHORT, 100, 10, "100.00", "100.01", tp="95.00",
                        sl="104.00")
    assert swept(impl, book, SOL, "94.99", "95.01") == []
    assert swept(impl, book, SOL, "94.99", "95.00") == [CloseReason.TAKE_PROFIT]
    assert swept(impl, book, SOL, "103.98", "103.99") == []
    assert swept(impl, book, SOL, "103.99", "104.00") == [CloseReason.STOP_LOSS]
    s = impl.settle(SOL, Side.SHORT, 10_000, 1_000, 100 * USD, 10_400, CloseReason.STOP_LOSS)
    assert s == Settlement(-40 * USD, 60 * USD, 40 * USD, 0)


def test_long_stop_loss(impl: Impl) -> None:
    book, _, _ = opened(impl, SOL, Side.LONG, 100, 10, "99.99", "100.00", sl="95.00")
    assert swept(impl, book, SOL, "95.01", "95.02") == []
    assert swept(impl, book, SOL, "95.00", "95.01") == [CloseReason.STOP_LOSS]
    s = impl.settle(SOL, Side.LONG, 10_000, 1_000, 100 * USD, 9_500, CloseReason.STOP_LOSS)
    assert s == Settlement(-50 * USD, 50 * USD, 50 * USD, 0)


def test_gap_through_the_liquidation_price(impl: Impl) -> None:
    # liquidation price 90.00, the bid gaps to 85.00: the position is closed at 85.00 and the
    # insurance fund absorbs the 50 the margin does not cover
    book, _, _ = opened(impl, SOL, Side.LONG, 100, 10, "99.99", "100.00")
    assert swept(impl, book, SOL, "85.00", "85.01") == [CloseReason.LIQUIDATION]
    s = impl.settle(SOL, Side.LONG, 10_000, 1_000, 100 * USD, 8_500, CloseReason.LIQUIDATION)
    assert s == Settlement(pnl_micros=-150 * USD, payout_micros=0, house_micros=150 * USD,
                           insurance_micros=-50 * USD)  # margin + pnl, negative


def test_stop_loss_wins_over_liquidation_in_a_gap(impl: Impl) -> None:
    book, _, _ = opened(impl, SOL, Side.LONG, 100, 10, "99.99", "100.00", sl="95.00")
    assert swept(impl, book, SOL, "85.00", "85.01") == [CloseReason.STOP_LOSS]
    s = impl.settle(SOL, Side.LONG, 10_000, 1_000, 100 * USD, 8_500, CloseReason.STOP_LOSS)
    assert s == Settlement(-150 * USD, 0, 150 * USD, -50 * USD)  # payout never negative
    book, _, _ = opened(impl, SOL, Side.SHORT, 100, 10, "100.00", "100.01", sl="105.00")
    assert swept(impl, book, SOL, "119.99", "120.00") == [CloseReason.STOP_LOSS]


def test_maintenance_margin_rate_moves_the_liquidation_price(impl: Impl) -> None:
    # rate 0.5%: mm = 0.005 * 100.00 * 10 = 5, liq = 100 - (100 - 5) / 10 = 90.50
    book, _, plan = opened(impl, SOL, Side.LONG, 100, 10, "99.99", "100.00", ppm=5_000)
    assert plan.mm_micros == 5 * USD and plan.liq_ticks == 9_050
    assert swept(impl, book, SOL, "90.51", "90.52") == []
    assert swept(impl, book, SOL, "90.50", "90.51") == [CloseReason.LIQUIDATION]
    # liquidated with equity left: 100 - 95 = 5 goes to the insurance fund, the user gets 0
    s = impl.settle(SOL, Side.LONG, 10_000, 1_000, 100 * USD, 9_050, CloseReason.LIQUIDATION)
    assert s == Settlement(-95 * USD, 0, 95 * USD, 5 * USD)
    book, _, plan = opened(impl, SOL, Side.SHORT, 100, 10, "100.00", "100.01", ppm=5_000)
    assert plan.liq_ticks == 10_950  # 100 + 95 / 10
    assert swept(impl, book, SOL, "109.48", "109.49") == []
    assert swept(impl, book, SOL, "109.49", "109.50") == [CloseReason.LIQUIDATION]


def test_btc_steps(impl: Impl) -> None:
    # qty = floor_to(0.00001, 100 * 10 / 60000.0) = 0.01666; liq = 60000 - 100 / 0.01666
    # = 53997.599..., floored to the 0.1 grid: 53997.5
    book, _, plan = opened(impl, BTC, Side.LONG, 100, 10, "59999.9", "60000.0")
    assert (plan.entry_ticks, plan.qty_steps, plan.liq_ticks) == (600_000, 1_666, 539_975)
    assert swept(impl, book, BTC, "53997.6", "53997.7") == []
    assert swept(impl, book, BTC, "53997.5", "53997.6") == [CloseReason.LIQUIDATION]
    # pnl = (53997.5 - 60000.0) * 0.01666 = -100.00165: a 0.00165 shortfall for the fund
    s = impl.settle(BTC, Side.LONG, 600_000, 1_666, 100 * USD, 539_975, CloseReason.LIQUIDATION)
    assert s == Settlement(-100_001_650, 0, 100_001_650, -1_650)
    _, _, short = opened(impl, BTC, Side.SHORT, 100, 10, "60000.0", "60000.1")
    assert short.liq_ticks == 660_025  # 66002.4009... ceiled to 66002.5


def test_eth_steps(impl: Impl) -> None:
    # qty = floor_to(0.0001, 50 * 7 / 3000.00) = 0.1166; liq = 3000 - 50 / 0.1166 = 2571.1835...
    book, _, plan = opened(impl, ETH, Side.LONG, 50, 7, "2999.99", "3000.00", tp="3100.00")
    assert (plan.qty_steps, plan.liq_ticks) == (1_166, 257_118)
    assert swept(impl, book, ETH, "3099.99", "3100.00") == []
    assert swept(impl, book, ETH, "3100.00", "3100.01") == [CloseReason.TAKE_PROFIT]
    s = impl.settle(ETH, Side.LONG, 300_000, 1_166, 50 * USD, 310_000, CloseReason.TAKE_PROFIT)
    assert s == Settlement(11_660_000, 61_660_000, -11_660_000, 0)


def test_pnl_rounds_toward_minus_infinity(impl: Impl) -> None:
    # 4 price + 4 quantity decimals: one tick times one step is 1e-8 USD
    fine = Asset("FINE", "FINE_USDC", price_decimals=4, qty_decimals=4, max_leverage=100)
    assert impl.pnl_micros(fine, Side.LONG, 10_000, 1, 9_999) == -1  # -0.00000001 -> -0.000001
    assert impl.pnl_micros(fine, Side.LONG, 10_000, 1, 10_001) == 0
    assert impl.pnl_micros(fine, Side.SHORT, 10_000, 150, 10_001) == -2  # -1.5 micros
    assert impl.pnl_micros(fine, Side.SHORT, 10_000, 150, 9_999) == 1  # +1.5 micros


def test_leverage_one_long_never_liquidates(impl: Impl) -> None:
    book, _, plan = opened(impl, SOL, Side.LONG, 100, 1, "99.99", "100.00")
    assert plan.liq_ticks == 0
    assert swept(impl, book, SOL, "0.01", "0.02") == []


@pytest.mark.parametrize(
    ("side", "leverage", "margin", "bid", "ask", "tp", "sl", "code"),
    [
        (Side.LONG, 0, 100 * USD, 10_000, 10_000, None, None, Code.LEVERAGE_OUT_OF_RANGE),
        (Side.LONG, 101, 100 * USD, 10_000, 10_000, None, None, Code.LEVERAGE_OUT_OF_RANGE),
        (Side.LONG, 10, 0, 10_000, 10_000, None, None, Code.INVALID_REQUEST),
        (Side.LONG, 10, -5, 10_000, 10_000, None, None, Code.INVALID_REQUEST),
        (Side.LONG, 1, 99, 10_000, 10_000, None, None, Code.INVALID_REQUEST),  # < 0.01 SOL
        (Side.LONG, 10, 100 * USD, 0, 10_000, None, None, Code.PRICE_UNAVAILABLE),
        (Side.LONG, 10, 100 * USD, 10_001, 10_000, None, None, Code.PRICE_UNAVAILABLE),
        (Side.LONG, 10, 100 * USD, 9_999, 10_000, 10_000, None, Code.INVALID_TRIGGER),
        (Side.LONG, 10, 100 * USD, 9_999, 10_000, None, 10_000, Code.INVALID_TRIGGER),
        (Side.LONG, 10, 100 * USD, 9_999, 10_000, None, 9_000, Code.INVALID_TRIGGER),  # = liq
        (Side.LONG, 10, 100 * USD, 9_999, 10_000, 0, None, Code.INVALID_TRIGGER),
        (Side.SHORT, 10, 100 * USD, 10_000, 10_001, 10_000, None, Code.INVALID_TRIGGER),
        (Side.SHORT, 10, 100 * USD, 10_000, 10_001, None, 10_000, Code.INVALID_TRIGGER),
        (Side.SHORT, 10, 100 * USD, 10_000, 10_001, None, 11_000, Code.INVALID_TRIGGER),
        (Side.SHORT, 10, 100 * USD, 10_000, 10_001, None, -1, Code.INVALID_TRIGGER),
    ],
)
def test_rejections(impl: Impl, side: Side, leverage: int, margin: int, bid: int, ask: int,
                    tp: int | None, sl: int | None, code: Code) -> None:
    result = impl.plan_open(SOL, side, margin, leverage, bid, ask, tp, sl)
    assert isinstance(result, Rejected) and result.code == code


def test_levels_just_inside_are_accepted(impl: Impl) -> None:
    long = impl.plan_open(SOL, Side.LONG, 100 * USD, 10, 9_999, 10_000, 10_001, 9_001)
    assert isinstance(long, OpenPlan) and (long.tp_ticks, long.sl_ticks) == (10_001, 9_001)
    short = impl.plan_open(SOL, Side.SHORT, 100 * USD, 10, 10_000, 10_001, 9_999, 10_999)
    assert isinstance(short, OpenPlan) and short.tp_ticks == 9_999
    plain = impl.plan_open(SOL, Side.SHORT, 100 * USD, 10, 10_000, 10_001, None, None)
    assert isinstance(plain, OpenPlan) and plain.tp_ticks == plain.sl_ticks == NO_LEVEL
