"""The SPEC's trading rules over real HTTP: entries, quantities, liquidation, TP/SL, payouts.

Every expectation is computed here from the SPEC formulas with Decimal, independently of the
engine. Positions close asynchronously on a real cluster, hence ``tick`` (wait until the shard
applied the price) and ``wait_closed`` (wait until the close settled into the history).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from decimal import Decimal as D
from typing import Any

import httpx
import pytest
from feed.gate import TickGate
from tests.e2e.api_client import SIGNUP
from tests.e2e.api_client import SOL_STEP
from tests.e2e.api_client import error_code
from tests.e2e.api_client import floor_to
from tests.e2e.api_client import money
from tests.e2e.api_client import open_ids
from tests.e2e.api_client import open_position
from tests.e2e.api_client import signup
from tests.e2e.api_client import sol_trader
from tests.e2e.api_client import state
from tests.e2e.api_client import tick
from tests.e2e.api_client import wait_closed
from tests.e2e.http_platform import TRADING
from tests.e2e.http_platform import HttpPlatform
from tests.e2e.http_platform import LocalHttpPlatform


@pytest.fixture(scope="module")
def platform() -> Iterator[LocalHttpPlatform]:
    """This module's own (the conftest's ``http`` client, and its audit, use it): the gap test
    counts what the house and the insurance fund got from one tick, and on the platform the
    modules share its tick also liquidated what another module had left open (once seen: a
    long of 7.49 SOL from 100.01, 149.8749 more to the house)."""
    with LocalHttpPlatform(TRADING) as p:
        yield p


def test_signup_gives_the_demo_balance(http: httpx.Client) -> None:
    r = http.post("/api/v1/accounts", json={})
    assert r.status_code == 201
    body = r.json()
    assert set(body) == {"accountId", "apiKey", "balance"} and D(body["balance"]) == SIGNUP
    assert len(body["apiKey"]) >= 22  # >= 128 bits in base64url
    headers = {"Authorization": f"Bearer {body['apiKey']}"}
    s = state(http, headers)
    assert s["accountId"] == body["accountId"] and s["positions"] == []
    assert {k: D(v) for k, v in s["balances"].items()} == {"free": SIGNUP, "margin": 0,
                                                            "equity": SIGNUP}
    assert http.post("/api/v1/accounts").status_code == 201  # an empty body is {}


def test_long_enters_at_the_ask_and_is_liquidated_on_the_exact_tick(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = sol_trader(platform, http)
    p = open_position(http, h, asset="SOL", type="long", margin="100", leverage=10)
    entry = D("100.01")
    qty = floor_to(D(100) * 10 / entry, SOL_STEP)
    assert D(p["entryPrice"]) == entry and D(p["quantity"]) == qty == D("9.99")
    exact_liq = entry - D(100) / qty
    liq = D(p["liquidationPrice"])
    assert liq <= exact_liq < liq + SOL_STEP
    s = state(http, h)
    assert D(s["balances"]["free"]) == SIGNUP - 100 and D(s["balances"]["margin"]) == 100
    # one tick above the liquidation price: still open
    above = liq + SOL_STEP
    tick(platform, http, "SOL", str(above), str(above + SOL_STEP))
    assert open_ids(http, h) == [p["positionId"]]
    tick(platform, http, "SOL", str(liq), str(liq + SOL_STEP))
    closed = wait_closed(http, h, p["positionId"])
    assert closed["closeReason"] == "liquidation" and D(closed["exitPrice"]) == liq
    assert D(closed["realizedPnl"]) == money((liq - entry) * qty)
    assert D(closed["payout"]) == 0
    s = state(http, h)
    assert s["positions"] == [] and D(s["balances"]["margin"]) == 0
    assert D(s["balances"]["free"]) == SIGNUP - 100


def test_short_enters_at_the_bid_and_is_liquidated_when_the_ask_reaches_it(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = sol_trader(platform, http)
    p = open_position(http, h, asset="SOL", type="short", margin="100", leverage=10)
    entry = D("100.00")
    qty = floor_to(D(1000) / entry, SOL_STEP)
    assert D(p["entryPrice"]) == entry and D(p["quantity"]) == qty == D("10.00")
    liq = D(p["liquidationPrice"])
    assert liq == entry + D(100) / qty == D("110.00")
    tick(platform, http, "SOL", "109.98", "109.99")
    assert open_ids(http, h) == [p["positionId"]]
    tick(platform, http, "SOL", "109.99", "110.00")
    closed = wait_closed(http, h, p["positionId"])
    assert closed["closeReason"] == "liquidation" and D(closed["exitPrice"]) == D("110.00")
    assert D(closed["realizedPnl"]) == D(-100) and D(closed["payout"]) == 0


def test_take_profit_executes_at_the_tick_price_not_the_level(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = sol_trader(platform, http)
    p = open_position(http, h, asset="SOL", type="long", margin=100, leverage=10,
                      takeProfit="105", stopLoss="95.5")
    assert D(p["takeProfit"]) == 105 and D(p["stopLoss"]) == D("95.5")
    tick(platform, http, "SOL", "104.99", "105.00")
    assert open_ids(http, h) == [p["positionId"]]
    tick(platform, http, "SOL", "106.00", "106.01")  # gaps past the TP
    closed = wait_closed(http, h, p["positionId"])
    pnl = money((D("106.00") - D("100.01")) * D("9.99"))
    assert closed["closeReason"] == "take_profit" and D(closed["exitPrice"]) == D("106.00")
    assert D(closed["realizedPnl"]) == pnl and D(closed["payout"]) == 100 + pnl
    assert D(state(http, h)["balances"]["free"]) == SIGNUP + pnl


def test_stop_loss_of_a_short_closes_at_the_ask(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = sol_trader(platform, http)
    p = open_position(http, h, asset="SOL", type="short", margin="100", leverage=10,
                      stopLoss="103", takeProfit="90")
    tick(platform, http, "SOL", "102.98", "102.99")
    assert open_ids(http, h) == [p["positionId"]]
    tick(platform, http, "SOL", "102.99", "103.00")
    closed = wait_closed(http, h, p["positionId"])
    assert closed["closeReason"] == "stop_loss" and D(closed["exitPrice"]) == D("103.00")
    assert D(closed["realizedPnl"]) == D(-30) and D(closed["payout"]) == D(70)
    assert D(state(http, h)["balances"]["free"]) == SIGNUP - 30


def test_gap_through_the_liquidation_price_charges_the_insurance_fund(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = sol_trader(platform, http)
    p = open_position(http, h, asset="SOL", type="long", margin="100", leverage=10)
    before = platform.totals()
    tick(platform, http, "SOL", "80.00", "80.01")
    closed = wait_closed(http, h, p["positionId"])
    pnl = money((D("80.00") - D("100.01")) * D("9.99"))
    assert closed["closeReason"] == "liquidation" and D(closed["exitPrice"]) == D("80.00")
    assert D(closed["realizedPnl"]) == pnl and D(closed["payout"]) == 0
    after = platform.totals()
    micros = D("1000000")
    assert after["house_micros"] - before["house_micros"] == int(-pnl * micros)
    # margin + pnl - payout: negative, the shortfall the insurance fund absorbs
    assert after["insurance_micros"] - before["insurance_micros"] == int((100 + pnl) * micros)
    assert after["sum_micros"] == 0


def test_stop_loss_wins_over_liquidation_on_the_same_tick(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = sol_trader(platform, http)
    p = open_position(http, h, asset="SOL", type="long", margin="100", leverage=10,
                      stopLoss="90.00")
    tick(platform, http, "SOL", "85.00", "85.01")
    closed = wait_closed(http, h, p["positionId"])
    assert closed["closeReason"] == "stop_loss" and D(closed["exitPrice"]) == D("85.00")
    pnl = money((D("85.00") - D("100.01")) * D("9.99"))
    assert D(closed["payout"]) == max(D(0), 100 + pnl)


def test_manual_close_pays_margin_plus_pnl(platform: HttpPlatform, http: httpx.Client) -> None:
    h = signup(http)
    tick(platform, http, "BTC", "60000.0", "60000.5")
    p = open_position(http, h, asset="BTC", type="long", margin="250.5", leverage=20)
    qty = floor_to(D("250.5") * 20 / D("60000.5"), D("0.00001"))
    assert D(p["quantity"]) == qty
    tick(platform, http, "BTC", "60500.0", "60500.5")
    s = state(http, h)
    unrealized = money((D("60500.0") - D("60000.5")) * qty)
    assert D(s["positions"][0]["unrealizedPnl"]) == unrealized
    assert D(s["balances"]["equity"]) == SIGNUP + unrealized
    r = http.post("/api/v1/positions/close", json={"positionId": p["positionId"]}, headers=h)
    assert r.status_code == 200, r.text
    closed = r.json()
    assert closed["closeReason"] == "manual" and D(closed["exitPrice"]) == D("60500.0")
    assert D(closed["payout"]) == D("250.5") + unrealized
    s = state(http, h)
    assert s["positions"] == [] and D(s["balances"]["free"]) == SIGNUP + unrealized
    again = http.post("/api/v1/positions/close", json={"positionId": p["positionId"]}, headers=h)
    assert again.status_code == 404 and error_code(again) == "NOT_FOUND"


def test_client_order_id_retries_return_the_first_answer(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = signup(http)
    tick(platform, http, "ETH", "3000.00", "3000.01")
    body = {"asset": "ETH", "type": "short", "margin": "10", "leverage": 5,
            "clientOrderId": "retry-me"}
    first = http.post("/api/v1/positions/open", json=body, headers=h)
    tick(platform, http, "ETH", "3100.00", "3100.01")
    second = http.post("/api/v1/positions/open", json=body, headers=h)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    s = state(http, h)
    assert len(s["positions"]) == 1 and D(s["balances"]["margin"]) == 10
    close = {"positionId": first.json()["positionId"], "clientOrderId": "close-1"}
    c1 = http.post("/api/v1/positions/close", json=close, headers=h)
    c2 = http.post("/api/v1/positions/close", json=close, headers=h)
    assert c1.status_code == c2.status_code == 200 and c1.json() == c2.json()
    history = http.get("/api/v1/positions/history", headers=h).json()["positions"]
    assert len(history) == 1
    assert D(state(http, h)["balances"]["free"]) == SIGNUP + D(c1.json()["realizedPnl"])


def refused(r: httpx.Response) -> None:
    """``r`` is the refusal of a clientOrderId used again for another request."""
    assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST", r.text
    assert "clientOrderId" in r.json()["error"]["message"], r.text


def answered_once(http: httpx.Client, h: dict[str, str], path: str, body: dict[str, Any],
                  other: dict[str, Any], status: int) -> httpx.Response:
    """POST ``body`` to ``path`` (answered ``status``), then its clientOrderId with ``other``
    changed (refused as another request), then ``body`` again (a retry: the first answer);
    the first answer."""
    first = http.post(path, json=body, headers=h)
    assert first.status_code == status, first.text
    refused(http.post(path, json={**body, **other}, headers=h))
    retry = http.post(path, json=body, headers=h)
    assert retry.status_code == status and retry.json() == first.json(), retry.text
    return first


def test_a_client_order_id_used_again_for_another_request_is_refused_and_changes_nothing(
        platform: HttpPlatform, http: httpx.Client) -> None:
    """A clientOrderId names one request: a retry repeating it gets the first answer, written
    with its own asset's steps; the same id with another asset, position or order is a
    different request and answers 422 INVALID_REQUEST, opening, closing or cancelling
    nothing (it was once answered as the first request, so a BTC open "succeeded" with a
    SOL position)."""
    h = signup(http)
    tick(platform, http, "SOL", "100.00", "100.01")
    tick(platform, http, "BTC", "60000.0", "60000.1")

    body = {"asset": "SOL", "type": "long", "margin": "10", "leverage": 5, "clientOrderId": "o"}
    first = http.post("/api/v1/positions/open", json=body, headers=h)
    assert first.status_code == 201 and D(first.json()["entryPrice"]) == D("100.01"), first.text
    retry = http.post("/api/v1/positions/open", json=body, headers=h)
    assert retry.status_code == 201 and retry.json() == first.json(), retry.text
    for other in ({"asset": "BTC"}, {"type": "short"}, {"margin": "11"}, {"leverage": 4},
                  {"stopLoss": "90"}):
        refused(http.post("/api/v1/positions/open", json={**body, **other}, headers=h))
    btc = open_position(http, h, asset="BTC", type="long", margin="10", leverage=5)
    answered_once(http, h, "/api/v1/positions/close",
                  {"positionId": first.json()["positionId"], "clientOrderId": "c"},
                  {"positionId": btc["positionId"]}, 200)
    order = {"asset": "SOL", "type": "long", "orderType": "limit", "triggerPrice": "90",
             "margin": "10", "leverage": 2, "clientOrderId": "p"}
    placed = http.post("/api/v1/orders", json=order, headers=h)
    assert placed.status_code == 201, placed.text
    refused(http.post("/api/v1/orders", headers=h,
                      json={**order, "asset": "BTC", "triggerPrice": "50000.0"}))
    refused(http.post("/api/v1/orders", headers=h, json={**order, "triggerPrice": "89"}))
    retry = http.post("/api/v1/orders", json=order, headers=h)
    assert retry.status_code == 201 and retry.json() == placed.json(), retry.text
    cancelled = http.delete(f"/api/v1/orders/{placed.json()['orderId']}?clientOrderId=q",
                            headers=h)
    assert cancelled.status_code == 200, cancelled.text
    other = http.post("/api/v1/orders", headers=h, json={
        **order, "asset": "BTC", "triggerPrice": "50000.0", "clientOrderId": "r"}).json()
    refused(http.delete(f"/api/v1/orders/{other['orderId']}?clientOrderId=q", headers=h))
    s = state(http, h)
    assert [p["positionId"] for p in s["positions"]] == [btc["positionId"]]
    orders = http.get("/api/v1/orders", headers=h).json()["orders"]
    assert [o["orderId"] for o in orders] == [other["orderId"]]
    assert D(s["balances"]["margin"]) == 20  # the BTC position and the BTC order


def test_a_client_order_id_used_again_with_other_terms_or_after_a_refusal_is_refused(
        platform: HttpPlatform, http: httpx.Client) -> None:
    """The terms a clientOrderId was first used with are kept with it: the same id with
    another close quantity, other levels, another margin amount, or on another position after
    a refusal is a different request (422 INVALID_REQUEST, nothing changed). It was answered
    with the first answer: a close of all "succeeded" with the first call's partial close, a
    margin removal with the earlier addition, and a close of an open position with the 404 a
    closed one had got."""
    h = signup(http)
    tick(platform, http, "SOL", "100.00", "100.01")

    p = open_position(http, h, asset="SOL", type="long", margin="100", leverage=10)
    assert D(p["quantity"]) == D("9.99"), p
    part = {"positionId": p["positionId"], "quantity": "1", "clientOrderId": "c"}
    first = http.post("/api/v1/positions/close", json=part, headers=h)
    assert first.status_code == 200 and first.json()["partial"] is True, first.text
    refused(http.post("/api/v1/positions/close", json={**part, "quantity": "2"}, headers=h))
    refused(http.post("/api/v1/positions/close", headers=h,
                      json={"positionId": p["positionId"], "clientOrderId": "c"}))
    retry = http.post("/api/v1/positions/close", json=part, headers=h)
    assert retry.status_code == 200 and retry.json() == first.json(), retry.text
    levels = {"positionId": p["positionId"], "takeProfit": "120", "clientOrderId": "m"}
    modified = http.post("/api/v1/positions/modify", json=levels, headers=h)
    assert modified.status_code == 200, modified.text
    refused(http.post("/api/v1/positions/modify", json={**levels, "takeProfit": "130"},
                      headers=h))
    refused(http.post("/api/v1/positions/modify", json={**levels, "stopLoss": "90"},
                      headers=h))
    added = {"positionId": p["positionId"], "amount": "10", "clientOrderId": "g"}
    topped = http.post("/api/v1/positions/margin", json=added, headers=h)
    assert topped.status_code == 200, topped.text
    refused(http.post("/api/v1/positions/margin", json={**added, "amount": "-10"}, headers=h))
    [now] = state(http, h)["positions"]
    assert D(now["quantity"]) == D("8.99") and D(now["takeProfit"]) == D("120"), now
    assert now.get("stopLoss") is None and now["margin"] == topped.json()["margin"], now

    # a refusal is the first answer of its request only
    other = open_position(http, h, asset="SOL", type="long", margin="10", leverage=10)
    gone = http.post("/api/v1/positions/close", json={"positionId": other["positionId"]},
                     headers=h)
    assert gone.status_code == 200, gone.text
    answered_once(http, h, "/api/v1/positions/close",
                  {"positionId": other["positionId"], "clientOrderId": "x"},
                  {"positionId": p["positionId"]}, 404)
    big = {"asset": "SOL", "type": "long", "margin": "999999", "leverage": 10,
           "clientOrderId": "o"}
    poor = http.post("/api/v1/positions/open", json=big, headers=h)
    assert poor.status_code == 409 and error_code(poor) == "INSUFFICIENT_BALANCE", poor.text
    refused(http.post("/api/v1/positions/open", json={**big, "margin": "10"}, headers=h))
    assert [x["positionId"] for x in state(http, h)["positions"]] == [p["positionId"]]
    assert platform.audit() == []
    # closed, so the ticks of later tests on a shared platform move no account of this one
    done = http.post("/api/v1/positions/close", json={"positionId": p["positionId"]}, headers=h)
    assert done.status_code == 200, done.text


def test_stale_price_refuses_opens_and_closes_with_503() -> None:
    # a price goes stale when no newer tick comes for MAX_PRICE_AGE_S (a tick older than the
    # shard's is ignored): a platform of its own with a bound of 1 s, so the test waits 1 s
    settings = dataclasses.replace(TRADING, max_price_age_s=1.0)
    with LocalHttpPlatform(settings) as platform, \
            httpx.Client(base_url=platform.base_url, timeout=10) as http:
        h = signup(http)
        tick(platform, http, "ETH", "3000.00", "3000.01")
        p = open_position(http, h, asset="ETH", type="long", margin="10", leverage=2)
        deadline = time.monotonic() + 10
        while "ETH" not in http.get("/healthz").json()["stalePrices"]:
            assert time.monotonic() < deadline, "the ETH price never went stale"
            time.sleep(0.05)
        r = http.post("/api/v1/positions/open", headers=h,
                      json={"asset": "ETH", "type": "long", "margin": "10", "leverage": 2})
        assert r.status_code == 503 and error_code(r) == "PRICE_UNAVAILABLE"
        r = http.post("/api/v1/positions/close", json={"positionId": p["positionId"]},
                      headers=h)
        assert r.status_code == 503 and error_code(r) == "PRICE_UNAVAILABLE"
        s = state(http, h)
        assert len(s["positions"]) == 1 and D(s["balances"]["margin"]) == 10
        assert D(s["balances"]["free"]) == SIGNUP - 10
        tick(platform, http, "ETH", "3000.00", "3000.01")
        r = http.post("/api/v1/positions/close", json={"positionId": p["positionId"]},
                      headers=h)
        assert r.status_code == 200
        assert platform.audit() == []


def test_slippage_beyond_the_limit_is_409_and_changes_nothing(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = signup(http)
    tick(platform, http, "SOL", "100.00", "102.00")
    r = http.post("/api/v1/positions/open", headers=h, json={
        "asset": "SOL", "type": "long", "margin": "100", "leverage": 10,
        "currentPrice": "100.00"})  # ask is 200 bps away, default limit 100
    assert r.status_code == 409 and error_code(r) == "PRICE_MOVED"
    s = state(http, h)
    assert s["positions"] == [] and D(s["balances"]["free"]) == SIGNUP
    ok = open_position(http, h, asset="SOL", type="long", margin="100", leverage=10,
                       currentPrice="100.00", maxSlippageBps=200)
    assert D(ok["entryPrice"]) == D("102.00")  # the engine's price, never the client's


def test_insufficient_balance_is_409(platform: HttpPlatform, http: httpx.Client) -> None:
    h = sol_trader(platform, http)
    r = http.post("/api/v1/positions/open", headers=h, json={
        "asset": "SOL", "type": "long", "margin": "10000.000001", "leverage": 1})
    assert r.status_code == 409 and error_code(r) == "INSUFFICIENT_BALANCE"
    open_position(http, h, asset="SOL", type="long", margin="10000", leverage=1)
    assert D(state(http, h)["balances"]["free"]) == 0


def test_another_users_position_is_404_like_a_missing_one(
        platform: HttpPlatform, http: httpx.Client) -> None:
    alice, bob = signup(http), signup(http)
    tick(platform, http, "SOL", "100.00", "100.01")
    p = open_position(http, alice, asset="SOL", type="long", margin="100", leverage=10)
    assert state(http, bob)["positions"] == []
    theirs = http.post("/api/v1/positions/close", json={"positionId": p["positionId"]},
                       headers=bob)
    missing = http.post("/api/v1/positions/close", json={"positionId": "123456789012345"},
                        headers=bob)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json() == missing.json()
    assert open_ids(http, alice) == [p["positionId"]]
    r = http.post("/api/v1/positions/close", json={"positionId": p["positionId"]}, headers=alice)
    assert r.status_code == 200
    r = http.get("/api/v1/positions/history", headers=bob,
                 params={"before": p["positionId"]})
    assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST"
    assert http.get("/api/v1/positions/history", headers=bob).json() == {"positions": []}


def test_another_accounts_ids_are_answered_as_ids_never_issued(
        platform: HttpPlatform, http: httpx.Client) -> None:
    """Every request naming an id (close, modify, margin, cancel, the paging cursors) answers
    byte for byte as for an id of the same shard that was never issued, whether the other
    account's position or order is open or has ended; and changes nothing of it."""
    alice, bob = signup(http), signup(http)
    tick(platform, http, "SOL", "100.00", "100.01")
    live = open_position(http, alice, asset="SOL", type="long", margin="100", leverage=10,
                         stopLoss="95")["positionId"]
    ended = open_position(http, alice, asset="SOL", type="long", margin="10",
                          leverage=2)["positionId"]
    assert http.post("/api/v1/positions/close", headers=alice,
                     json={"positionId": ended}).status_code == 200
    order = {"asset": "SOL", "type": "long", "orderType": "limit", "triggerPrice": "90",
             "margin": "5", "leverage": 2}
    waiting = http.post("/api/v1/orders", headers=alice, json=order).json()["orderId"]
    cancelled = http.post("/api/v1/orders", headers=alice, json=order).json()["orderId"]
    assert http.delete(f"/api/v1/orders/{cancelled}", headers=alice).status_code == 200
    before = state(http, alice), http.get("/api/v1/orders", headers=alice).json()

    def answers(item_id: str) -> list[tuple[int, str]]:
        out = []
        for method, path, body in (
                ("POST", "/api/v1/positions/close", {"positionId": item_id}),
                ("POST", "/api/v1/positions/close", {"positionId": item_id, "quantity": "1"}),
                ("POST", "/api/v1/positions/modify", {"positionId": item_id, "stopLoss": "50"}),
                ("POST", "/api/v1/positions/margin", {"positionId": item_id, "amount": "-90"}),
                ("POST", "/api/v1/positions/margin", {"positionId": item_id, "amount": "99999"}),
                ("DELETE", f"/api/v1/orders/{item_id}", None),
                ("GET", f"/api/v1/positions?cursor={item_id}", None),
                ("GET", f"/api/v1/positions/history?before={item_id}", None),
                ("GET", f"/api/v1/orders/history?before={item_id}", None)):
            r = http.request(method, path, json=body, headers=bob)
            out.append((r.status_code, r.text))
        return out

    for theirs in (live, ended, waiting, cancelled):
        never = str(int(theirs) + (1 << 50))  # same shard and row, a generation not reached
        assert answers(theirs) == answers(never), theirs
    assert (state(http, alice), http.get("/api/v1/orders", headers=alice).json()) == before
    # nothing left open for the scenarios after it on the same platform (a later tick would
    # close or fill these, and their money would show in another scenario's totals)
    assert http.post("/api/v1/positions/close", headers=alice,
                     json={"positionId": live}).status_code == 200
    assert http.delete(f"/api/v1/orders/{waiting}", headers=alice).status_code == 200


def test_history_is_newest_first_with_limit_and_before(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = sol_trader(platform, http)
    ids = []
    for _ in range(4):
        p = open_position(http, h, asset="SOL", type="long", margin="10", leverage=2)
        r = http.post("/api/v1/positions/close", json={"positionId": p["positionId"]}, headers=h)
        assert r.status_code == 200
        ids.append(p["positionId"])
    page = http.get("/api/v1/positions/history", headers=h, params={"limit": 3}).json()
    assert [p["positionId"] for p in page["positions"]] == ids[::-1][:3]
    rest = http.get("/api/v1/positions/history", headers=h,
                    params={"limit": 3, "before": ids[1]}).json()
    assert [p["positionId"] for p in rest["positions"]] == [ids[0]]


def test_a_confirmed_jump_is_swept_at_the_price_it_gapped_to() -> None:
    """SPEC: a jump beyond MAX_TICK_JUMP_BPS is held and accepted if the next tick confirms
    it. The held price is then swept before the confirming one: a long whose liquidation price
    the gap crossed closes at the gap's bid, though the confirming tick is back above it.
    Before, only the confirming tick was delivered and the position survived the gap. The
    ticks pass the feed's own gate (feed.gate.TickGate, as the feed actor's pipeline does)."""
    with LocalHttpPlatform(TRADING) as platform, \
            httpx.Client(base_url=platform.base_url, timeout=10) as http:
        gate = TickGate(platform.settings.feed.bounds.max_tick_jump_bps)

        def through_gate(bid: str, ask: str) -> list[str]:
            accepted = gate.admit_all({"SOL": platform.next_tick("SOL", bid, ask)})
            platform.deliver(accepted)
            return [platform.settings.assets["SOL"].ticks_to_price(t.bid_ticks)
                    for t in accepted]

        assert through_gate("100.00", "100.01") == ["100.00"]
        h = signup(http)
        p = open_position(http, h, asset="SOL", type="long", margin="100", leverage=7)
        liq = D(p["liquidationPrice"])
        assert D("80.00") < liq < D("88.00"), liq
        assert through_gate("80.00", "80.01") == []  # a 20% gap: held
        assert open_ids(http, h) == [p["positionId"]]
        # back within the band of 80 and above the liquidation price: the gap is confirmed,
        # and 80.00 is swept first
        assert through_gate("88.00", "88.01") == ["80.00", "88.00"]
        closed = wait_closed(http, h, p["positionId"])
        assert closed["closeReason"] == "liquidation", closed
        assert D(closed["exitPrice"]) == D("80.00"), closed
        assert platform.audit() == []
