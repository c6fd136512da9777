"""Changing an open position over real HTTP (SPEC "Changing an open position"): TP/SL set,
replaced or removed against the current price, and margin added or removed with the
liquidation price recomputed; every expectation computed here from the SPEC with Decimal."""

from __future__ import annotations

import asyncio
from decimal import ROUND_CEILING
from decimal import Decimal as D
from typing import Any

import httpx
from tests.e2e.api_client import SIGNUP
from tests.e2e.api_client import SOL_STEP
from tests.e2e.api_client import error_code
from tests.e2e.api_client import floor_to
from tests.e2e.api_client import open_position
from tests.e2e.api_client import signup
from tests.e2e.api_client import sol_trader
from tests.e2e.api_client import state
from tests.e2e.api_client import tick
from tests.e2e.api_client import wait_closed
from tests.e2e.http_platform import HttpPlatform


def post(http: httpx.Client, headers: dict[str, str], path: str, status: int,
         **body: Any) -> dict[str, Any]:
    r = http.post(f"/api/v1/positions/{path}", json=body, headers=headers)
    assert r.status_code == status, r.text
    return dict(r.json())


def test_tp_and_sl_are_set_replaced_and_removed_against_the_current_price(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h, other = sol_trader(platform, http), signup(http)  # SOL 100.00 / 100.01
    p = open_position(http, h, asset="SOL", type="long", margin="100", leverage=10,
                      takeProfit="110")
    pid = p["positionId"]
    body = post(http, h, "modify", 422, positionId=pid, takeProfit="100.00")  # == the bid
    assert body["error"]["code"] == "INVALID_TRIGGER"
    changed = post(http, h, "modify", 200, positionId=pid, takeProfit="100.01")
    assert D(changed["takeProfit"]) == D("100.01") and changed["stopLoss"] is None
    assert {k: changed[k] for k in ("positionId", "entryPrice", "quantity", "margin")} == \
        {k: p[k] for k in ("positionId", "entryPrice", "quantity", "margin")}
    liq = D(p["liquidationPrice"])
    r = http.post("/api/v1/positions/modify", json={"positionId": pid, "stopLoss": str(liq)},
                  headers=h)
    assert r.status_code == 422 and error_code(r) == "INVALID_TRIGGER", r.text
    # a stop-loss only: the take-profit stays; then null removes the take-profit
    changed = post(http, h, "modify", 200, positionId=pid, stopLoss=str(liq + SOL_STEP))
    assert D(changed["takeProfit"]) == D("100.01") and D(changed["stopLoss"]) == liq + SOL_STEP
    changed = post(http, h, "modify", 200, positionId=pid, takeProfit=None, stopLoss="99.50",
                   clientOrderId="levels-1")
    assert changed["takeProfit"] is None and D(changed["stopLoss"]) == D("99.50")
    again = post(http, h, "modify", 200, positionId=pid, takeProfit=None, stopLoss="99.50",
                 clientOrderId="levels-1")
    assert again == changed  # a retry: the first answer, nothing changed
    # the same clientOrderId with other levels is another request: refused, nothing changed
    other_levels = post(http, h, "modify", 422, positionId=pid, stopLoss="99.00",
                        clientOrderId="levels-1")
    assert other_levels["error"]["code"] == "INVALID_REQUEST", other_levels
    r = http.post("/api/v1/positions/modify", json={"positionId": pid, "stopLoss": "99"},
                  headers=other)
    assert r.status_code == 404 and error_code(r) == "NOT_FOUND", r.text
    [listed] = state(http, h)["positions"]
    assert listed["takeProfit"] is None and D(listed["stopLoss"]) == D("99.50")
    tick(platform, http, "SOL", "99.50", "99.51")  # the new stop-loss, at the bid
    closed = wait_closed(http, h, pid)
    assert closed["closeReason"] == "stop_loss" and D(closed["exitPrice"]) == D("99.50")
    tick(platform, http, "SOL", "100.00", "100.01")


def test_margin_added_and_removed_moves_the_balances_and_the_liquidation_price(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = sol_trader(platform, http)
    p = open_position(http, h, asset="SOL", type="short", margin="100", leverage=20)
    pid, entry, qty = p["positionId"], D(p["entryPrice"]), D(p["quantity"])

    def short_liq(margin: D) -> D:  # SPEC: entry + margin / quantity, ceiled to the step
        return ((entry + margin / qty) / SOL_STEP).to_integral_value(ROUND_CEILING) * SOL_STEP

    added = post(http, h, "margin", 200, positionId=pid, amount="50", clientOrderId="more-1")
    assert D(added["margin"]) == 150 and D(added["liquidationPrice"]) == short_liq(D(150))
    b = state(http, h)["balances"]
    assert (D(b["free"]), D(b["margin"])) == (SIGNUP - 150, D(150))
    removed = post(http, h, "margin", 200, positionId=pid, amount="-30.5",
                   clientOrderId="less-1")
    assert D(removed["margin"]) == D("119.5")
    assert D(removed["liquidationPrice"]) == short_liq(D("119.5"))
    assert post(http, h, "margin", 200, positionId=pid, amount="-30.5",
                clientOrderId="less-1") == removed  # a retry releases nothing twice
    b = state(http, h)["balances"]
    assert (D(b["free"]), D(b["margin"])) == (SIGNUP - D("119.5"), D("119.5"))
    notional = entry * qty  # more than margin x 100 after this removal: refused
    too_much = floor_to(D("119.5") - notional / 100, D("0.000001")) + D("0.000001")
    body = post(http, h, "margin", 422, positionId=pid, amount=str(-too_much))
    assert body["error"]["code"] == "INVALID_REQUEST" and "leverage" in body["error"]["message"]
    body = post(http, h, "margin", 409, positionId=pid, amount="20000")
    assert body["error"]["code"] == "INSUFFICIENT_BALANCE"
    # a position that is not the user's is not found, whether or not the balance would do
    other = signup(http)
    for amount in ("20000", "5"):
        body = post(http, other, "margin", 404, positionId=pid, amount=amount)
        assert body["error"]["code"] == "NOT_FOUND", amount
    b = state(http, other)["balances"]
    assert (D(b["free"]), D(b["margin"])) == (SIGNUP, 0)
    for amount in ("0", "-0", "1.0000001", "abc"):
        body = post(http, h, "margin", 422, positionId=pid, amount=amount)
        assert body["error"]["code"] == "INVALID_REQUEST", amount
        if amount in ("0", "-0"):  # not "greater than zero": a negative amount is allowed
            assert body["error"]["message"] == "amount: amount must not be zero", body
    b = state(http, h)["balances"]
    assert (D(b["free"]), D(b["margin"])) == (SIGNUP - D("119.5"), D("119.5"))
    closed = post(http, h, "close", 200, positionId=pid)
    assert D(closed["margin"]) == D("119.5")
    assert D(state(http, h)["balances"]["margin"]) == 0
    # a retry gets its first answer, though the position is gone since
    assert post(http, h, "margin", 200, positionId=pid, amount="50",
                clientOrderId="more-1") == added
    body = post(http, h, "margin", 404, positionId=pid, amount="50", clientOrderId="more-2")
    assert body["error"]["code"] == "NOT_FOUND"
    assert post(http, h, "margin", 404, positionId=pid, amount="50",
                clientOrderId="more-2") == body
    b = state(http, h)["balances"]  # nothing locked by the refused top-ups
    assert (D(b["free"]), D(b["margin"])) == (SIGNUP + D(closed["realizedPnl"]), 0)


def test_a_partial_close_splits_the_margin_and_leaves_the_rest_open(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = sol_trader(platform, http)  # SOL 100.00 / 100.01
    p = open_position(http, h, asset="SOL", type="long", margin="100", leverage=10,
                      stopLoss="95")
    pid, qty = p["positionId"], D(p["quantity"])
    assert qty == D("9.99")
    for quantity in ("3.331", "0", "-1", "9.999", "10", "abc"):
        body = post(http, h, "close", 422, positionId=pid, quantity=quantity)
        assert body["error"]["code"] == "INVALID_REQUEST", quantity
    part = post(http, h, "close", 200, positionId=pid, quantity="3.33", clientOrderId="part-1")
    # SPEC: margin floor(100 * 3.33 / 9.99) to the micro-dollar, settled like a close of it
    assert (part["positionId"], part["partial"], part["closeReason"]) == (pid, True, "manual")
    assert (D(part["quantity"]), D(part["margin"])) == (D("3.33"), D("33.333333"))
    assert D(part["exitPrice"]) == D("100.00") and D(part["realizedPnl"]) == D("-0.0333")
    assert D(part["payout"]) == D("33.333333") - D("0.0333")
    assert part["closeId"] != pid
    assert post(http, h, "close", 200, positionId=pid, quantity="3.33",
                clientOrderId="part-1") == part  # a retry: the first answer
    other_quantity = post(http, h, "close", 422, positionId=pid, quantity="1",
                          clientOrderId="part-1")  # another request: nothing closed
    assert other_quantity["error"]["code"] == "INVALID_REQUEST", other_quantity
    [rest] = state(http, h)["positions"]
    assert (rest["positionId"], D(rest["quantity"]), D(rest["margin"])) == \
        (pid, D("6.66"), D("66.666667"))
    assert D(rest["stopLoss"]) == D("95") and D(rest["entryPrice"]) == D("100.01")
    # the rest's liquidation price: entry - margin / quantity, floored to the step
    exact = D("100.01") - D("66.666667") / D("6.66")
    assert D(rest["liquidationPrice"]) == floor_to(exact, SOL_STEP)
    b = state(http, h)["balances"]
    assert D(b["margin"]) == D("66.666667")
    assert D(b["free"]) == SIGNUP - 100 + D(part["payout"])
    whole = post(http, h, "close", 200, positionId=pid)
    assert (whole["closeId"], whole["partial"], D(whole["quantity"])) == (pid, False, D("6.66"))
    r = http.get("/api/v1/positions/history", params={"limit": 1}, headers=h)
    assert r.status_code == 200 and r.json()["positions"] == [whole], r.text
    r = http.get("/api/v1/positions/history", params={"before": whole["closeId"]}, headers=h)
    assert r.status_code == 200 and r.json()["positions"][0] == part, r.text
    r = http.get("/api/v1/positions/history", params={"before": part["closeId"]}, headers=h)
    assert r.status_code == 200 and part not in r.json()["positions"], r.text
    assert D(state(http, h)["balances"]["margin"]) == 0


def test_changes_sent_at_once_to_one_position_show_the_last_one_applied(
        platform: HttpPlatform, http: httpx.Client) -> None:
    """A margin top-up, a removal and a TP change sent at once to one position: the shard
    applies them in some order, and ``GET /state`` (the account's events) must then show the
    position as the shard holds it (``GET /positions``), not the body of a change the shard
    applied earlier whose account event happened to be numbered last."""
    h = sol_trader(platform, http)
    p = open_position(http, h, asset="SOL", type="long", margin="100", leverage=10)
    pid = p["positionId"]

    async def burst(client: httpx.AsyncClient, round_: int) -> None:
        answers = await asyncio.gather(
            client.post("/api/v1/positions/margin", headers=h,
                        json={"positionId": pid, "amount": "7"}),
            client.post("/api/v1/positions/margin", headers=h,
                        json={"positionId": pid, "amount": "-5"}),
            client.post("/api/v1/positions/modify", headers=h,
                        json={"positionId": pid, "takeProfit": str(200 + round_)}))
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]

    async def rounds() -> None:
        async with httpx.AsyncClient(base_url=platform.base_url, timeout=10) as client:
            for round_ in range(20):
                await burst(client, round_)
                shown = state(http, h)["positions"]
                held = http.get("/api/v1/positions", headers=h).json()["positions"]
                fields = ("margin", "liquidationPrice", "takeProfit", "quantity")
                assert [{f: q[f] for f in fields} for q in shown] == \
                    [{f: q[f] for f in fields} for q in held], round_

    asyncio.run(rounds())
    assert D(state(http, h)["positions"][0]["margin"]) == 100 + 20 * 2
    post(http, h, "close", 200, positionId=pid)  # the platform is shared with later tests
