"""The money of SPEC's trading rules to the micro-dollar and the price step, over real HTTP.

Every expected figure is computed here by hand from SPEC's formulas with Fractions (quantity
floored to the step, liquidation price ``entry -/+ (margin - mm) / quantity`` floored for a long
and ceiled for a short to the grid, PnL floored to a micro-dollar, the settlement split), never
by the engine's code, and compared exactly with the API's answers and the ledger's totals. The
values sit on rounding edges: quantities exactly on a step and one micro-dollar of margin below,
liquidation prices one step from the price, leverage 1 and 100, losses equal to and larger than
the margin, both sides. The platforms are this module's own, so the ledger totals move only by
what these scenarios do.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from fractions import Fraction as F
from typing import Any

import httpx
import pytest
from engine.assets import Asset
from engine.assets import AssetRegistry
from tests.e2e.api_client import error_code
from tests.e2e.api_client import signup
from tests.e2e.api_client import state
from tests.e2e.api_client import tick
from tests.e2e.api_client import wait_closed
from tests.e2e.api_client import wait_in_history
from tests.e2e.http_platform import TRADING
from tests.e2e.http_platform import LocalHttpPlatform

MICRO = F(1, 10**6)
SIGNUP = F(10_000)
# DOGE: an asset of this module's own whose PnL can be finer than a micro-dollar
PRICE_STEP = {"SOL": F("0.01"), "BTC": F("0.1"), "ETH": F("0.01"), "DOGE": F("0.00001")}
QTY_STEP = {"SOL": F("0.01"), "BTC": F("0.00001"), "ETH": F("0.0001"), "DOGE": F("0.01")}


# ------------------------------------------------------------------ SPEC, by hand
def floor_to(x: F, step: F) -> F:
    return math.floor(x / step) * step


def ceil_to(x: F, step: F) -> F:
    return math.ceil(x / step) * step


def quantity(asset: str, margin: str, leverage: int, entry: str) -> F:
    """SPEC: ``floor_to_step(margin * leverage / entry_price)``."""
    return floor_to(F(margin) * leverage / F(entry), QTY_STEP[asset])


def liquidation(asset: str, side: str, entry: str, qty: F, margin: F | str,
                rate: F = F(0)) -> F | None:
    """SPEC ``entry -/+ (margin - mm) / quantity``, ``mm = rate * entry * quantity``, on the
    grid as README has it (a long's floored, a short's ceiled; a long's at or below 0: None)."""
    mm = rate * F(entry) * qty
    distance = (F(margin) - mm) / qty
    if side == "long":
        liq = floor_to(F(entry) - distance, PRICE_STEP[asset])
        return liq if liq > 0 else None
    return ceil_to(F(entry) + distance, PRICE_STEP[asset])


def pnl(side: str, entry: str | F, exit_: str | F, qty: F) -> F:
    """SPEC: long ``(exit - entry) * quantity``, short ``(entry - exit) * quantity``, floored
    to a micro-dollar."""
    move = F(exit_) - F(entry) if side == "long" else F(entry) - F(exit_)
    return floor_to(move * qty, MICRO)


def settlement(margin: F | str, p: F, liquidated: bool) -> tuple[F, F, F]:
    """SPEC: ``(payout, house, insurance)`` of a close with realized PnL ``p``."""
    payout = F(0) if liquidated else max(F(0), F(margin) + p)
    return payout, -p, F(margin) + p - payout


# ------------------------------------------------------------------ reading answers
def text(price: F, asset: str) -> str:
    """``price`` (on ``asset``'s price step, positive) as decimal text."""
    step = PRICE_STEP[asset]
    decimals = len(str(step.denominator)) - 1
    ticks = price / step
    assert ticks.denominator == 1 and ticks > 0
    whole, frac = divmod(ticks.numerator, 10**decimals)
    return f"{whole}.{frac:0{decimals}d}"


def num(text: str | None) -> F | None:
    return None if text is None else F(text)


def balances(http: httpx.Client, h: dict[str, str]) -> tuple[F, F, F]:
    b = state(http, h)["balances"]
    return F(b["free"]), F(b["margin"]), F(b["equity"])


def post(http: httpx.Client, h: dict[str, str], path: str, status: int,
         **body: Any) -> dict[str, Any]:
    r = http.post(f"/api/v1/{path}", json=body, headers=h)
    assert r.status_code == status, r.text
    return dict(r.json())


def refused(http: httpx.Client, h: dict[str, str], path: str, status: int, code: str,
            **body: Any) -> None:
    r = http.post(f"/api/v1/{path}", json=body, headers=h)
    assert r.status_code == status and error_code(r) == code, r.text


def opened(http: httpx.Client, h: dict[str, str], **body: Any) -> dict[str, Any]:
    return post(http, h, "positions/open", 201, **body)


def terms(p: dict[str, Any]) -> tuple[F | None, ...]:
    """A position's money and prices: (entry, quantity, margin, liquidation price)."""
    return (num(p["entryPrice"]), num(p["quantity"]), num(p["margin"]),
            num(p["liquidationPrice"]))


def moved(platform: LocalHttpPlatform, before: dict[str, Any]) -> tuple[F, F]:
    """How much the house and the insurance fund got since ``before`` (USD)."""
    after = platform.totals()
    assert after["sum_micros"] == 0
    return (F(after["house_micros"] - before["house_micros"]) * MICRO,
            F(after["insurance_micros"] - before["insurance_micros"]) * MICRO)


@pytest.fixture(scope="module")
def platform() -> Iterator[LocalHttpPlatform]:
    """This module's own (the conftest's ``http`` client, and its audit, use it)."""
    with LocalHttpPlatform(TRADING) as p:
        yield p


# ------------------------------------------------------------------ scenarios
def test_open_quantities_on_a_step_and_one_micro_dollar_below(
        platform: LocalHttpPlatform, http: httpx.Client) -> None:
    """margin x leverage / entry exactly on a quantity step gives that step; one micro-dollar
    of margin less gives one step less; less than one step is refused; a 1x long whose
    liquidation price is at or below 0 shows none."""
    h = signup(http)
    tick(platform, http, "SOL", "100.00", "100.01")
    tick(platform, http, "ETH", "3000.00", "3000.05")
    cases = [("SOL", "long", "10.001", 10, "100.01"),  # 100.01 / 100.01: 1.00 exactly
             ("SOL", "long", "10.000999", 10, "100.01"),  # 0.99
             ("ETH", "short", "300", 7, "3000.00"),  # 2100 / 3000: 0.7000 exactly
             ("ETH", "short", "299.999999", 7, "3000.00"),  # 0.6999
             ("SOL", "long", "1.0001", 1, "100.01")]  # one step; liquidation price 0: none
    expected_qty = [F("1"), F("0.99"), F("0.7"), F("0.6999"), F("0.01")]
    locked = F(0)
    for (asset, side, margin, leverage, entry), qty in zip(cases, expected_qty, strict=True):
        assert quantity(asset, margin, leverage, entry) == qty
        p = opened(http, h, asset=asset, type=side, margin=margin, leverage=leverage)
        liq = liquidation(asset, side, entry, qty, margin)
        assert terms(p) == (F(entry), qty, F(margin), liq), p
        assert int(p["leverage"]) == leverage
        locked += F(margin)
    assert [liquidation(*c[:2], c[4], q, c[2]) for c, q in zip(cases, expected_qty,
                                                                 strict=True)] == \
        [F("90.00"), F("89.90"), F("3428.58"), F("3428.64"), None]
    # one micro-dollar short of one step
    r = http.post("/api/v1/positions/open", headers=h, json={
        "asset": "SOL", "type": "long", "margin": "1.000099", "leverage": 1})
    assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST", r.text
    free, margin_, equity = balances(http, h)
    upnl = sum((pnl(c[1], c[4], "100.00" if c[0] == "SOL" else "3000.05", q)
                for c, q in zip(cases, expected_qty, strict=True)), F(0))
    assert (free, margin_, equity) == (SIGNUP - locked, locked, SIGNUP + upnl)
    for p in state(http, h)["positions"]:
        post(http, h, "positions/close", 200, positionId=p["positionId"])
    assert balances(http, h) == (SIGNUP + upnl, 0, SIGNUP + upnl)


def test_leverage_100_is_refused_on_its_liquidation_price_and_liquidated_there(
        platform: LocalHttpPlatform, http: httpx.Client) -> None:
    """A 100x open whose liquidation price the closing-side price reaches is refused
    (WOULD_LIQUIDATE); one step away it opens. The short is then liquidated on the tick whose
    ask reaches its (ceiled) liquidation price: payout 0, the house takes -pnl, the insurance
    fund margin + pnl (negative: the grid put the level past the exact price)."""
    h = signup(http)
    # long: entry 100.01, qty floor(1000 / 100.01) = 9.99, liq floor(100.01 - 10 / 9.99)
    qty = quantity("SOL", "10", 100, "100.01")
    liq = liquidation("SOL", "long", "100.01", qty, "10")
    assert (qty, liq) == (F("9.99"), F("99.00"))
    tick(platform, http, "SOL", "99.00", "100.01")
    refused(http, h, "positions/open", 422, "WOULD_LIQUIDATE", asset="SOL", type="long",
            margin="10", leverage=100)
    tick(platform, http, "SOL", "99.01", "100.01")
    long_ = opened(http, h, asset="SOL", type="long", margin="10", leverage=100)
    assert terms(long_) == (F("100.01"), qty, F(10), liq)
    assert F(long_["unrealizedPnl"]) == pnl("long", "100.01", "99.01", qty)
    post(http, h, "positions/close", 200, positionId=long_["positionId"])

    # short: entry at the bid 50.00, margin 7.777777: qty floor(777.7777 / 50) = 15.55
    qty = quantity("SOL", "7.777777", 100, "50.00")
    liq = liquidation("SOL", "short", "50.00", qty, "7.777777")
    assert (qty, liq) == (F("15.55"), F("50.51"))  # 50 + 0.50017858...: ceiled
    tick(platform, http, "SOL", "50.00", "50.51")
    refused(http, h, "positions/open", 422, "WOULD_LIQUIDATE", asset="SOL", type="short",
            margin="7.777777", leverage=100)
    tick(platform, http, "SOL", "50.00", "50.50")
    short = opened(http, h, asset="SOL", type="short", margin="7.777777", leverage=100)
    assert terms(short) == (F("50.00"), qty, F("7.777777"), liq)
    before = platform.totals()
    tick(platform, http, "SOL", "50.40", "50.50")  # at 50.50 the short still stands
    assert [p["positionId"] for p in state(http, h)["positions"]] == [short["positionId"]]
    tick(platform, http, "SOL", "50.41", "50.51")
    closed = wait_closed(http, h, short["positionId"])
    p = pnl("short", "50.00", "50.51", qty)
    payout, house, insurance = settlement("7.777777", p, liquidated=True)
    assert p == F("-7.9305") and insurance < 0
    assert (closed["closeReason"], F(closed["exitPrice"]), F(closed["realizedPnl"]),
            F(closed["payout"]), F(closed["margin"]), F(closed["quantity"])) == \
        ("liquidation", F("50.51"), p, payout, F("7.777777"), qty)
    assert moved(platform, before) == (house, insurance)
    long_pnl = pnl("long", "100.01", "99.01", F("9.99"))
    assert balances(http, h) == (SIGNUP + long_pnl - F("7.777777"), 0,
                                 SIGNUP + long_pnl - F("7.777777"))


def test_a_stop_loss_at_exactly_the_margin_and_one_gapped_past_it(
        platform: LocalHttpPlatform, http: httpx.Client) -> None:
    """A long's SL hit by a gap to its exact liquidation price loses exactly the margin:
    payout 0, the insurance fund 0. A short's SL gapped past its liquidation price loses more
    than the margin: payout 0 (not negative), the insurance fund pays the shortfall."""
    h = signup(http)
    tick(platform, http, "SOL", "99.99", "100.00")
    # long: entry 100.00, qty 10.00, liquidation price exactly 90.00
    long_ = opened(http, h, asset="SOL", type="long", margin="100", leverage=10,
                   stopLoss="95.00")
    assert terms(long_) == (F(100), F(10), F(100), F(90))
    short = opened(http, h, asset="SOL", type="short", margin="33.3", leverage=3,
                   stopLoss="120.00", takeProfit="80")
    s_qty = quantity("SOL", "33.3", 3, "99.99")
    s_liq = liquidation("SOL", "short", "99.99", s_qty, "33.3")
    assert terms(short) == (F("99.99"), s_qty, F("33.3"), s_liq) and s_liq == F("133.63")
    before = platform.totals()
    tick(platform, http, "SOL", "90.00", "90.01")
    closed = wait_closed(http, h, long_["positionId"])
    assert closed["closeReason"] == "stop_loss" and F(closed["exitPrice"]) == 90
    assert (F(closed["realizedPnl"]), F(closed["payout"])) == (F(-100), F(0))
    assert moved(platform, before) == (F(100), F(0))

    before = platform.totals()
    tick(platform, http, "SOL", "140.00", "140.03")  # past the SL and the liquidation price
    closed = wait_closed(http, h, short["positionId"])
    p = pnl("short", "99.99", "140.03", s_qty)
    payout, house, insurance = settlement("33.3", p, liquidated=False)
    assert p < -F("33.3") and payout == 0
    assert (closed["closeReason"], F(closed["exitPrice"]), F(closed["realizedPnl"]),
            F(closed["payout"])) == ("stop_loss", F("140.03"), p, payout)
    assert moved(platform, before) == (house, insurance)
    assert balances(http, h) == (SIGNUP - 100 - F("33.3"), 0, SIGNUP - 100 - F("33.3"))


def test_a_short_take_profit_fires_on_the_ask_and_closes_at_it(
        platform: LocalHttpPlatform, http: httpx.Client) -> None:
    h = signup(http)
    tick(platform, http, "ETH", "2500.00", "2500.07")
    short = opened(http, h, asset="ETH", type="short", margin="123.456789", leverage=9,
                   takeProfit="2400.00")
    qty = quantity("ETH", "123.456789", 9, "2500.00")
    assert qty == F("0.4444")
    assert terms(short) == (F(2500), qty, F("123.456789"),
                            liquidation("ETH", "short", "2500.00", qty, "123.456789"))
    tick(platform, http, "ETH", "2399.90", "2400.01")  # the bid is past it, the ask is not
    assert [p["positionId"] for p in state(http, h)["positions"]] == [short["positionId"]]
    before = platform.totals()
    tick(platform, http, "ETH", "2390.00", "2390.13")
    closed = wait_closed(http, h, short["positionId"])
    p = pnl("short", "2500.00", "2390.13", qty)
    payout, house, insurance = settlement("123.456789", p, liquidated=False)
    assert (p, insurance) == (F("48.826228"), 0)
    assert (closed["closeReason"], F(closed["exitPrice"]), F(closed["realizedPnl"]),
            F(closed["payout"])) == ("take_profit", F("2390.13"), p, payout)
    assert moved(platform, before) == (house, insurance)
    assert balances(http, h) == (SIGNUP + p, 0, SIGNUP + p)


def test_a_partial_close_of_a_short_with_an_odd_margin_then_the_rest_liquidated(
        platform: LocalHttpPlatform, http: httpx.Client) -> None:
    """The closed part's margin is ``floor(margin * q / Q)``, its PnL at the ask; the rest
    keeps the remainder, its liquidation price recomputed (ceiled), and is liquidated on the
    tick that reaches it."""
    h = signup(http)
    tick(platform, http, "SOL", "100.00", "100.03")
    margin, qty = F("77.777777"), quantity("SOL", "77.777777", 13, "100.00")
    assert qty == F("10.11")
    short = opened(http, h, asset="SOL", type="short", margin="77.777777", leverage=13)
    assert terms(short) == (F(100), qty, margin,
                            liquidation("SOL", "short", "100.00", qty, margin))
    pid = short["positionId"]
    tick(platform, http, "SOL", "98.50", "98.57")
    part_qty = F("3.37")
    part_margin = floor_to(margin * part_qty / qty, MICRO)
    assert part_margin == F("25.925925")  # 77.777777 * 3.37 / 10.11 = 25.9259256...
    before = platform.totals()
    part = post(http, h, "positions/close", 200, positionId=pid, quantity="3.37")
    p = pnl("short", "100.00", "98.57", part_qty)
    payout, house, insurance = settlement(part_margin, p, liquidated=False)
    assert (part["partial"], part["closeReason"], F(part["quantity"]), F(part["margin"]),
            F(part["exitPrice"]), F(part["realizedPnl"]), F(part["payout"])) == \
        (True, "manual", part_qty, part_margin, F("98.57"), p, payout)
    assert moved(platform, before) == (house, insurance)
    rest_qty, rest_margin = qty - part_qty, margin - part_margin
    rest_liq = liquidation("SOL", "short", "100.00", rest_qty, rest_margin)
    assert rest_liq == F("107.70")  # 100 + 51.851852 / 6.74 = 107.6931...: ceiled
    [rest] = state(http, h)["positions"]
    assert terms(rest) == (F(100), rest_qty, rest_margin, rest_liq)
    assert F(rest["unrealizedPnl"]) == pnl("short", "100.00", "98.57", rest_qty)
    assert balances(http, h)[:2] == (SIGNUP - margin + payout, rest_margin)

    tick(platform, http, "SOL", "107.60", "107.69")
    assert [x["positionId"] for x in state(http, h)["positions"]] == [pid]
    before = platform.totals()
    tick(platform, http, "SOL", "107.61", "107.70")
    closed = wait_closed(http, h, pid)
    q = pnl("short", "100.00", "107.70", rest_qty)
    _, house, insurance = settlement(rest_margin, q, liquidated=True)
    assert (closed["partial"], closed["closeReason"], F(closed["quantity"]),
            F(closed["margin"]), F(closed["realizedPnl"]), F(closed["payout"])) == \
        (False, "liquidation", rest_qty, rest_margin, q, F(0))
    assert moved(platform, before) == (house, insurance)
    history = http.get("/api/v1/positions/history", headers=h).json()["positions"]
    assert [(F(c["margin"]), F(c["realizedPnl"])) for c in history] == \
        [(rest_margin, q), (part_margin, p)]
    assert balances(http, h) == (SIGNUP - margin + payout, 0, SIGNUP - margin + payout)


def test_a_limit_short_and_a_stop_long_fill_at_the_ticks_opening_side_price(
        platform: LocalHttpPlatform, http: httpx.Client) -> None:
    """A limit short fills when the bid reaches its trigger, at that bid (better, through a
    gap); a stop long when the ask reaches its trigger, at that ask (worse, through a gap);
    each is then a market open there: quantity and liquidation price from the fill price."""
    h = signup(http)
    tick(platform, http, "BTC", "60000.0", "60000.5")
    limit = post(http, h, "orders", 201, asset="BTC", type="short", orderType="limit",
                 triggerPrice="61000.0", margin="99.999999", leverage=50)
    stop = post(http, h, "orders", 201, asset="BTC", type="long", orderType="stop",
                triggerPrice="61000.0", margin="250.000001", leverage=3)
    assert balances(http, h) == (SIGNUP - F(350), F(350), SIGNUP)
    tick(platform, http, "BTC", "60999.9", "60999.9")  # neither reached
    assert len(http.get("/api/v1/orders", headers=h).json()["orders"]) == 2
    tick(platform, http, "BTC", "61200.0", "61200.7")  # both, through a gap
    filled = {o["orderId"]: wait_in_history(http, h, "orders", "orderId", o["orderId"])
              for o in (limit, stop)}
    assert {o["status"] for o in filled.values()} == {"filled"}
    by_id = {p["positionId"]: p for p in state(http, h)["positions"]}
    short = by_id[filled[limit["orderId"]]["positionId"]]
    long_ = by_id[filled[stop["orderId"]]["positionId"]]
    s_qty = quantity("BTC", "99.999999", 50, "61200.0")
    l_qty = quantity("BTC", "250.000001", 3, "61200.7")
    assert (s_qty, l_qty) == (F("0.08169"), F("0.01225"))
    assert terms(short) == (F("61200.0"), s_qty, F("99.999999"),
                            liquidation("BTC", "short", "61200.0", s_qty, "99.999999"))
    assert terms(long_) == (F("61200.7"), l_qty, F("250.000001"),
                            liquidation("BTC", "long", "61200.7", l_qty, "250.000001"))
    tick(platform, http, "BTC", "61100.0", "61100.4")
    upnl = pnl("short", "61200.0", "61100.4", s_qty) + pnl("long", "61200.7", "61100.0",
                                                            l_qty)
    assert balances(http, h) == (SIGNUP - F(350), F(350), SIGNUP + upnl)
    for p in (short, long_):
        post(http, h, "positions/close", 200, positionId=p["positionId"])
    assert balances(http, h) == (SIGNUP + upnl, 0, SIGNUP + upnl)


def test_margin_removal_down_to_exactly_the_maximum_leverage_and_the_level_bounds(
        platform: LocalHttpPlatform, http: httpx.Client) -> None:
    """A removal that leaves ``entry * quantity`` exactly ``margin * max leverage`` is taken;
    one whose new liquidation price the bid reaches, or that puts it on the SL, is refused; a
    top-up of exactly the free balance is taken."""
    h = signup(http)
    tick(platform, http, "SOL", "100.00", "100.01")
    p = opened(http, h, asset="SOL", type="long", margin="100", leverage=10)
    pid, qty = p["positionId"], F(p["quantity"])
    assert qty == F("9.99")
    least = F("100.01") * qty / 100  # 9.990999: the notional at 100x
    # to 20.00 of margin the liquidation price is floor(100.01 - 20 / 9.99) = 98.00
    assert liquidation("SOL", "long", "100.01", qty, F(20)) == F("98.00")
    tick(platform, http, "SOL", "98.00", "100.01")  # the bid on that price: refused
    body = post(http, h, "positions/margin", 422, positionId=pid, amount="-80")
    assert body["error"]["code"] == "INVALID_REQUEST", body
    tick(platform, http, "SOL", "98.01", "100.01")
    to_20 = post(http, h, "positions/margin", 200, positionId=pid, amount="-80")
    assert terms(to_20) == (F("100.01"), qty, F(20), F("98.00"))
    post(http, h, "positions/margin", 200, positionId=pid, amount="80")
    tick(platform, http, "SOL", "100.00", "100.01")
    levels = post(http, h, "positions/modify", 200, positionId=pid, stopLoss="99.00")
    assert F(levels["stopLoss"]) == F("99.00")
    # down to 10.00: liquidation price floor(100.01 - 10 / 9.99) = 99.00, on the SL: refused
    assert liquidation("SOL", "long", "100.01", qty, F(10)) == F("99.00")
    body = post(http, h, "positions/margin", 422, positionId=pid, amount="-90")
    assert body["error"]["code"] == "INVALID_REQUEST", body
    post(http, h, "positions/modify", 200, positionId=pid, stopLoss=None)
    amount = -(100 - least)
    assert amount == F("-90.009001")
    last = post(http, h, "positions/margin", 200, positionId=pid, amount="-90.009001")
    assert terms(last) == (F("100.01"), qty, least,
                           liquidation("SOL", "long", "100.01", qty, least))
    assert F(last["liquidationPrice"]) == F("99.00")  # 100.01 - 1.0001: floored
    assert balances(http, h)[:2] == (SIGNUP - least, least)
    # a top-up of all the free balance is taken, one micro-dollar more is not; with it the
    # liquidation price falls below 0: none
    body = post(http, h, "positions/margin", 409, positionId=pid, amount="9990.009002")
    assert body["error"]["code"] == "INSUFFICIENT_BALANCE", body
    full = post(http, h, "positions/margin", 200, positionId=pid, amount="9990.009001")
    assert terms(full) == (F("100.01"), qty, SIGNUP, None)
    assert balances(http, h)[:2] == (0, SIGNUP)
    closed = post(http, h, "positions/close", 200, positionId=pid)
    p_ = pnl("long", "100.01", "100.00", qty)
    assert (F(closed["margin"]), F(closed["realizedPnl"]), F(closed["payout"])) == \
        (SIGNUP, p_, SIGNUP + p_)
    assert balances(http, h) == (SIGNUP + p_, 0, SIGNUP + p_)


def test_slippage_of_exactly_the_bound_is_taken_and_one_step_more_refused(
        platform: LocalHttpPlatform, http: httpx.Client) -> None:
    """SPEC: refused when the execution price differs from ``currentPrice`` by more than
    ``maxSlippageBps`` (of the price the client saw): 101.00 from 100.00 is 100 bps."""
    h = signup(http)
    tick(platform, http, "SOL", "100.99", "101.01")
    open_body = {"asset": "SOL", "type": "long", "margin": "50", "leverage": 2,
                 "currentPrice": "100.00"}
    r = http.post("/api/v1/positions/open", json=open_body, headers=h)
    assert r.status_code == 409 and error_code(r) == "PRICE_MOVED", r.text
    tick(platform, http, "SOL", "100.99", "101.00")
    p = opened(http, h, **open_body)
    qty = quantity("SOL", "50", 2, "101.00")
    assert terms(p) == (F(101), qty, F(50), liquidation("SOL", "long", "101.00", qty, "50"))
    # closed at the bid 99.00: 100 bps below 100.00 when seen, one step more not
    tick(platform, http, "SOL", "98.99", "99.10")
    close_body = {"positionId": p["positionId"], "currentPrice": "100.00",
                  "maxSlippageBps": 100}
    r = http.post("/api/v1/positions/close", json=close_body, headers=h)
    assert r.status_code == 409 and error_code(r) == "PRICE_MOVED", r.text
    tick(platform, http, "SOL", "99.00", "99.10")
    closed = post(http, h, "positions/close", 200, **close_body)
    p_ = pnl("long", "101.00", "99.00", qty)
    assert (F(closed["exitPrice"]), F(closed["realizedPnl"]), F(closed["payout"])) == \
        (F(99), p_, 50 + p_)


def test_a_maintenance_margin_rate_moves_the_levels_and_leaves_equity_to_the_fund() -> None:
    """With MAINTENANCE_MARGIN_RATE 1%: a 100x open whose margin equals its maintenance margin
    is refused, one micro-dollar more opens with its liquidation price one step under the
    entry; ``equity = free + margin + unrealized`` (a long's at the bid, a short's at the ask,
    an open order's margin in ``margin``); a liquidation on the level leaves margin + pnl
    (positive) to the insurance fund."""
    rate = F(1, 100)
    settings = dataclasses.replace(TRADING, maintenance_margin_ppm=10_000)
    with LocalHttpPlatform(settings) as platform, \
            httpx.Client(base_url=platform.base_url, timeout=10) as http:
        h = signup(http)
        # the rate is told with the assets (the terminal's ticket estimates by it)
        assert {a["maintenanceMarginRate"] for a in
                http.get("/api/v1/assets").json()["assets"]} == {"0.01"}
        tick(platform, http, "SOL", "100.01", "100.01")
        tick(platform, http, "ETH", "3000.00", "3000.02")
        # qty floor(1000.1 / 100.01) = 10.00, mm = 1% of 1000.1 = 10.001 = the margin
        r = http.post("/api/v1/positions/open", headers=h, json={
            "asset": "SOL", "type": "long", "margin": "10.001", "leverage": 100})
        assert r.status_code == 422 and error_code(r) == "WOULD_LIQUIDATE", r.text
        liq = liquidation("SOL", "long", "100.01", F(10), "10.001001", rate)
        assert liq == F("100.00")  # 100.01 - 0.000001 / 10: floored
        thin = opened(http, h, asset="SOL", type="long", margin="10.001001", leverage=100)
        assert terms(thin) == (F("100.01"), F(10), F("10.001001"), liq)
        e_qty = quantity("ETH", "500.5", 20, "3000.00")
        e_liq = liquidation("ETH", "short", "3000.00", e_qty, "500.5", rate)
        assert (e_qty, e_liq) == (F("3.3366"), F("3120.01"))
        short = opened(http, h, asset="ETH", type="short", margin="500.5", leverage=20)
        assert terms(short) == (F(3000), e_qty, F("500.5"), e_liq)
        order = post(http, h, "orders", 201, asset="ETH", type="long", orderType="limit",
                     triggerPrice="2000.00", margin="0.000003", leverage=100)
        locked = F("10.001001") + F("500.5") + F("0.000003")
        tick(platform, http, "ETH", "2987.65", "2987.66")
        e_upnl = pnl("short", "3000.00", "2987.66", e_qty)
        s = state(http, h)
        assert {p["positionId"]: F(p["unrealizedPnl"]) for p in s["positions"]} == {
            thin["positionId"]: 0, short["positionId"]: e_upnl}
        assert balances(http, h) == (SIGNUP - locked, locked, SIGNUP + e_upnl)

        # a partial close: the rest's liquidation price counts the rest's maintenance margin
        part_margin = floor_to(F("500.5") * F("1.1111") / e_qty, MICRO)
        assert part_margin == F("166.66833")  # 556.10555 / 3.3366 = 166.6683300...
        part = post(http, h, "positions/close", 200, positionId=short["positionId"],
                    quantity="1.1111")
        p = pnl("short", "3000.00", "2987.66", F("1.1111"))
        assert (F(part["margin"]), F(part["realizedPnl"]), F(part["payout"])) == \
            (part_margin, p, part_margin + p)
        rest_qty, rest_margin = e_qty - F("1.1111"), F("500.5") - part_margin
        e_liq = liquidation("ETH", "short", "3000.00", rest_qty, rest_margin, rate)
        assert e_liq == F("3120.01")  # 3000 + (333.83167 - 66.765) / 2.2255 = 3120.0029...
        [rest] = [x for x in state(http, h)["positions"] if x["asset"] == "ETH"]
        assert terms(rest) == (F(3000), rest_qty, rest_margin, e_liq)
        locked -= part_margin
        free = SIGNUP - locked - part_margin + F(part["payout"])
        assert balances(http, h)[:2] == (free, locked)

        # liquidated on the exact level with equity left: margin + pnl goes to the fund
        for asset, position, side, entry, margin, bid, ask in (
                ("SOL", thin, "long", "100.01", F("10.001001"), "100.00", "100.01"),
                ("ETH", rest, "short", "3000.00", rest_margin,
                 text(e_liq - F("0.05"), "ETH"), text(e_liq, "ETH"))):
            before = platform.totals()
            qty = F(position["quantity"])
            p = pnl(side, entry, bid if side == "long" else ask, qty)
            _, house, insurance = settlement(margin, p, liquidated=True)
            assert insurance > 0
            tick(platform, http, asset, bid, ask)
            closed = wait_closed(http, h, position["positionId"])
            assert (closed["closeReason"], F(closed["realizedPnl"]), F(closed["payout"])) \
                == ("liquidation", p, F(0))
            assert moved(platform, before) == (house, insurance)
        r = http.delete(f"/api/v1/orders/{order['orderId']}", headers=h)
        assert r.status_code == 200, r.text
        free += F("0.000003")
        assert balances(http, h) == (free, 0, free)
        assert platform.audit() == []


def test_a_pnl_finer_than_a_micro_dollar_is_floored_toward_minus_infinity() -> None:
    """An asset whose price and quantity steps multiply below a micro-dollar (a price step of
    0.00001 and a quantity step of 0.01): realized and unrealized PnL are floored, so a loss
    of 0.0000101 is -0.000011 and a gain of 0.0000909 is 0.000090, and equity and the ledger
    take exactly those."""
    doge = Asset("DOGE", "DOGE_USDC", price_decimals=5, qty_decimals=2, max_leverage=20)
    settings = dataclasses.replace(TRADING, assets=AssetRegistry([doge]))
    with LocalHttpPlatform(settings) as platform, \
            httpx.Client(base_url=platform.base_url, timeout=10) as http:
        h = signup(http)
        tick(platform, http, "DOGE", "0.12344", "0.12345")
        qty = quantity("DOGE", "0.012469", 10, "0.12345")
        assert qty == F("1.01")  # 0.12469 / 0.12345 = 1.01004...
        long_ = opened(http, h, asset="DOGE", type="long", margin="0.012469", leverage=10)
        short = opened(http, h, asset="DOGE", type="short", margin="0.012469", leverage=10)
        s_qty = quantity("DOGE", "0.012469", 10, "0.12344")
        assert terms(long_) == (F("0.12345"), qty, F("0.012469"),
                                liquidation("DOGE", "long", "0.12345", qty, "0.012469"))
        assert terms(short) == (F("0.12344"), s_qty, F("0.012469"),
                                liquidation("DOGE", "short", "0.12344", s_qty, "0.012469"))
        l_upnl, s_upnl = (pnl("long", "0.12345", "0.12344", qty),
                          pnl("short", "0.12344", "0.12345", s_qty))
        assert l_upnl == F("-0.000011")  # -0.0000101
        s = state(http, h)
        assert [F(p["unrealizedPnl"]) for p in s["positions"]] == [l_upnl, s_upnl]
        locked = 2 * F("0.012469")
        assert balances(http, h) == (SIGNUP - locked, locked, SIGNUP + l_upnl + s_upnl)
        tick(platform, http, "DOGE", "0.12354", "0.12355")
        before = platform.totals()
        closed = [post(http, h, "positions/close", 200, positionId=p["positionId"])
                  for p in (long_, short)]
        l_pnl, s_pnl = (pnl("long", "0.12345", "0.12354", qty),
                        pnl("short", "0.12344", "0.12355", s_qty))
        assert l_pnl == F("0.000090")  # 0.0000909
        assert [F(c["realizedPnl"]) for c in closed] == [l_pnl, s_pnl]
        assert [F(c["payout"]) for c in closed] == [F("0.012469") + l_pnl,
                                                    F("0.012469") + s_pnl]
        assert moved(platform, before) == (-l_pnl - s_pnl, F(0))
        assert balances(http, h) == (SIGNUP + l_pnl + s_pnl, 0, SIGNUP + l_pnl + s_pnl)
        assert platform.audit() == []
