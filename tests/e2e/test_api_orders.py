"""Pending limit and stop orders over real HTTP (SPEC "Pending orders"): placement locks the
margin, the fill is a market open at the triggering tick's price, cancel, rejection and expiry
release the margin, and every end is in the order history.

Expectations are computed here from the SPEC with Decimal, independently of the engine. Fills,
rejections and expiries happen on ticks, asynchronously on a real cluster: ``wait_ended``
waits until the order's end has reached the history.
"""

from __future__ import annotations

import re
import time
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from decimal import Decimal as D
from typing import Any

import httpx
from cluster.config import Settings
from tests.e2e.api_client import SIGNUP
from tests.e2e.api_client import SOL_STEP
from tests.e2e.api_client import error_code
from tests.e2e.api_client import floor_to
from tests.e2e.api_client import signup
from tests.e2e.api_client import sol_trader
from tests.e2e.api_client import state
from tests.e2e.api_client import tick
from tests.e2e.api_client import wait_in_history
from tests.e2e.http_platform import HttpPlatform
from tests.e2e.http_platform import LocalHttpPlatform


def place(http: httpx.Client, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    r = http.post("/api/v1/orders", json=body, headers=headers)
    assert r.status_code == 201, r.text
    return dict(r.json())


def open_orders(http: httpx.Client, headers: dict[str, str]) -> list[dict[str, Any]]:
    r = http.get("/api/v1/orders", headers=headers)
    assert r.status_code == 200, r.text
    return list(r.json()["orders"])


def wait_ended(http: httpx.Client, headers: dict[str, str], order_id: str) -> dict[str, Any]:
    """The order history entry of ``order_id`` once its end has settled."""
    return wait_in_history(http, headers, "orders", "orderId", order_id)


def balances(http: httpx.Client, headers: dict[str, str]) -> dict[str, D]:
    return {k: D(v) for k, v in state(http, headers)["balances"].items()}


def test_a_limit_long_fills_on_the_boundary_tick_as_a_market_open_there(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = sol_trader(platform, http)  # SOL 100.00 / 100.01
    order = place(http, h, asset="SOL", type="long", orderType="limit", triggerPrice="99",
                  margin="100", leverage=10, takeProfit="105", stopLoss="95")
    assert {k: order[k] for k in ("asset", "type", "orderType", "status", "positionId",
                                  "rejectReason", "expiresAt")} == {
        "asset": "SOL", "type": "long", "orderType": "limit", "status": "open",
        "positionId": None, "rejectReason": None, "expiresAt": None}
    assert D(order["triggerPrice"]) == 99 and D(order["margin"]) == 100
    assert D(order["takeProfit"]) == 105 and D(order["stopLoss"]) == 95
    assert order["createdAt"] == order["updatedAt"]
    assert balances(http, h) == {"free": SIGNUP - 100, "margin": D(100), "equity": SIGNUP}
    assert open_orders(http, h) == [order]
    tick(platform, http, "SOL", "99.00", "99.01")  # one step above the trigger: no fill
    assert open_orders(http, h) == [order] and state(http, h)["positions"] == []
    tick(platform, http, "SOL", "98.98", "99.00")  # ask == trigger: fills at 99.00
    filled = wait_ended(http, h, order["orderId"])
    assert filled["status"] == "filled" and filled["positionId"] is not None
    assert open_orders(http, h) == []
    [position] = state(http, h)["positions"]
    assert position["positionId"] == filled["positionId"]
    qty = floor_to(D(100) * 10 / D(99), SOL_STEP)
    assert D(position["entryPrice"]) == 99 and D(position["quantity"]) == qty
    assert D(position["takeProfit"]) == 105 and D(position["stopLoss"]) == 95
    liq = D(position["liquidationPrice"])
    assert liq <= D(99) - D(100) / qty < liq + SOL_STEP
    b = balances(http, h)
    assert b["free"] == SIGNUP - 100 and b["margin"] == 100  # the order's margin, the position's


def test_a_stop_short_fills_through_a_gap_at_the_worse_bid(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = sol_trader(platform, http)
    order = place(http, h, asset="SOL", type="short", orderType="stop", triggerPrice="95.00",
                  margin="50", leverage=5)
    tick(platform, http, "SOL", "95.01", "95.02")  # one step above: a stop short waits
    assert [o["orderId"] for o in open_orders(http, h)] == [order["orderId"]]
    tick(platform, http, "SOL", "93.50", "93.52")  # gapped through 95.00
    filled = wait_ended(http, h, order["orderId"])
    assert filled["status"] == "filled"
    [position] = state(http, h)["positions"]
    assert position["type"] == "short" and D(position["entryPrice"]) == D("93.50")
    assert D(position["quantity"]) == floor_to(D(50) * 5 / D("93.50"), SOL_STEP)
    tick(platform, http, "SOL", "100.00", "100.01")  # leave SOL where the others expect it


def test_cancel_releases_the_margin_once_and_a_second_cancel_is_order_not_open(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h, other = sol_trader(platform, http), signup(http)
    order = place(http, h, asset="SOL", type="long", orderType="limit", triggerPrice="90",
                  margin="250", leverage=2, clientOrderId="o-1")
    # the same clientOrderId: the first answer, nothing locked twice
    assert place(http, h, asset="SOL", type="long", orderType="limit", triggerPrice="90",
                 margin="250", leverage=2, clientOrderId="o-1") == order
    assert balances(http, h)["margin"] == 250
    r = http.delete(f"/api/v1/orders/{order['orderId']}", headers=other)
    assert r.status_code == 404 and error_code(r) == "NOT_FOUND", r.text
    r = http.delete(f"/api/v1/orders/{order['orderId']}", headers=h)
    assert r.status_code == 200, r.text
    cancelled = r.json()
    assert cancelled["status"] == "cancelled" and cancelled["orderId"] == order["orderId"]
    assert cancelled["createdAt"] == order["createdAt"]
    assert balances(http, h) == {"free": SIGNUP, "margin": D(0), "equity": SIGNUP}
    r = http.delete(f"/api/v1/orders/{order['orderId']}", headers=h)
    assert r.status_code == 409 and error_code(r) == "ORDER_NOT_OPEN", r.text
    assert balances(http, h)["free"] == SIGNUP
    assert wait_ended(http, h, order["orderId"]) == cancelled
    r = http.delete("/api/v1/orders/123456789", headers=h)
    assert r.status_code == 404 and error_code(r) == "NOT_FOUND", r.text
    r = http.delete("/api/v1/orders/not-an-id", headers=h)
    assert r.status_code == 404 and error_code(r) == "NOT_FOUND", r.text


def test_a_fill_that_would_liquidate_is_rejected_and_releases_the_margin(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = sol_trader(platform, http)
    order = place(http, h, asset="SOL", type="long", orderType="limit", triggerPrice="100",
                  margin="100", leverage=100)
    # ask 100.00 meets the trigger, but with the bid 2% lower a 100x long is already lost
    tick(platform, http, "SOL", "98.00", "100.00")
    rejected = wait_ended(http, h, order["orderId"])
    assert rejected["status"] == "rejected" and rejected["rejectReason"] == "WOULD_LIQUIDATE"
    assert rejected["positionId"] is None
    assert balances(http, h) == {"free": SIGNUP, "margin": D(0), "equity": SIGNUP}
    assert state(http, h)["positions"] == [] and open_orders(http, h) == []
    tick(platform, http, "SOL", "100.00", "100.01")


def test_an_order_expires_on_the_first_tick_after_its_time_not_filled(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = sol_trader(platform, http)
    expires = datetime.now(UTC) + timedelta(seconds=1)
    order = place(http, h, asset="SOL", type="long", orderType="limit", triggerPrice="99",
                  margin="10", leverage=1, expiresAt=expires.isoformat())
    assert datetime.fromisoformat(order["expiresAt"].replace("Z", "+00:00")) == expires
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.05)
    tick(platform, http, "SOL", "98.00", "98.01")  # would fill, but its time has passed
    expired = wait_ended(http, h, order["orderId"])
    assert expired["status"] == "expired" and expired["positionId"] is None
    assert balances(http, h)["free"] == SIGNUP and state(http, h)["positions"] == []
    tick(platform, http, "SOL", "100.00", "100.01")


def test_bad_orders_are_refused_and_lock_nothing(platform: HttpPlatform,
                                                  http: httpx.Client) -> None:
    h = sol_trader(platform, http)
    good = {"asset": "SOL", "type": "long", "orderType": "limit", "triggerPrice": "99",
            "margin": "10", "leverage": 2}
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    for change, status, code in (
            ({"orderType": "market"}, 422, "INVALID_REQUEST"),
            ({"triggerPrice": "99.001"}, 422, "INVALID_REQUEST"),  # off the price step
            ({"triggerPrice": "0"}, 422, "INVALID_REQUEST"),
            ({"margin": "-1"}, 422, "INVALID_REQUEST"),
            ({"leverage": 1000}, 422, "LEVERAGE_OUT_OF_RANGE"),
            ({"asset": "NOPE"}, 422, "UNKNOWN_ASSET"),
            ({"expiresAt": "tomorrow"}, 422, "INVALID_REQUEST"),
            ({"expiresAt": past}, 422, "INVALID_REQUEST"),
            # the epoch is 0, which would mean "no expiry"; past year 9999 in UTC no answer
            # could write the time back (the order was placed, then answered 500)
            ({"expiresAt": "1970-01-01T00:00:00Z"}, 422, "INVALID_REQUEST"),
            ({"expiresAt": "1970-01-01T01:00:00+01:00"}, 422, "INVALID_REQUEST"),
            ({"expiresAt": "9999-12-31T23:59:59-01:00"}, 422, "INVALID_REQUEST"),
            # one form only: fromisoformat alone reads these as 2030-01-01
            ({"expiresAt": "2030-01-01T00:00:00\u0000"}, 422, "INVALID_REQUEST"),
            ({"expiresAt": "2030-01-01T00:00:00\nZ"}, 422, "INVALID_REQUEST"),
            ({"expiresAt": "2030-W01-3T00:00:00"}, 422, "INVALID_REQUEST"),
            ({"expiresAt": "20300101T000000Z"}, 422, "INVALID_REQUEST"),
            # an offset's minutes are 00-59: fromisoformat reads +00:99 as 1 h 39 min
            ({"expiresAt": "2030-01-01T00:00:00+00:60"}, 422, "INVALID_REQUEST"),
            ({"expiresAt": "2030-01-01T00:00:00-00:99"}, 422, "INVALID_REQUEST"),
            ({"expiresAt": "2030-01-01T00:00:00+24:00"}, 422, "INVALID_REQUEST"),
            # take-profit and stop-loss that no fill price could accept: refused up front
            # (a limit long fills at 99 or below; a stop long at 101 or above)
            ({"stopLoss": "99"}, 422, "INVALID_TRIGGER"),
            ({"orderType": "stop", "triggerPrice": "101", "takeProfit": "100"}, 422,
             "INVALID_TRIGGER"),
            ({"takeProfit": "98", "stopLoss": "98"}, 422, "INVALID_TRIGGER"),
            ({"margin": "20000"}, 409, "INSUFFICIENT_BALANCE")):
        r = http.post("/api/v1/orders", json={**good, **change}, headers=h)
        assert r.status_code == status and error_code(r) == code, (change, r.text)
    assert balances(http, h) == {"free": SIGNUP, "margin": D(0), "equity": SIGNUP}
    assert open_orders(http, h) == []
    r = http.get("/api/v1/orders/history?before=123", headers=h)
    assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST", r.text
    r = http.get("/api/v1/orders/history?before=9999999999999999999", headers=h)  # > int64
    assert r.json()["error"]["message"] == "before: not an order id", r.text
    assert http.get("/api/v1/orders").status_code == 401
    for text, shown in (("2030-01-01T00:00Z", "2030-01-01T00:00:00.000000Z"),  # no seconds
                        ("2030-01-01T01:30+01:00", "2030-01-01T00:30:00.000000Z"),
                        ("2030-01-01T05:44:59.5+05:45", "2029-12-31T23:59:59.500000Z"),
                        ("2030-01-01T00:00:07.5", "2030-01-01T00:00:07.500000Z")):  # UTC
        placed = place(http, h, **good, expiresAt=text)
        assert placed["expiresAt"] == shown, (text, placed)
        r = http.delete(f"/api/v1/orders/{placed['orderId']}", headers=h)
        assert r.status_code == 200, r.text
    # of the form, a field past its range: said which (it read "not an ISO-8601 time")
    for text, said in (("2030-13-01T00:00:00Z", "month must be in 1..12"),
                       ("2030-02-30T00:00:00Z", "day is out of range for month"),
                       ("2030-01-01T24:00:00Z", "hour must be in 0..23"),
                       ("2030-01-01T00:60Z", "minute must be in 0..59"),
                       ("2030-06-30T23:59:60Z", "second must be in 0..59"),
                       # an offset of 24 h or more is out of the form, its hint given (it
                       # read "offset must be a timedelta strictly between -timedelta(...")
                       ("2030-01-01T00:00:00+25:00", "then Z or +HH:MM"),
                       ("2030-01-01T00:00:00-24:00", "then Z or +HH:MM")):
        r = http.post("/api/v1/orders", json={**good, "expiresAt": text}, headers=h)
        assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST", r.text
        assert said in r.json()["error"]["message"], r.text
    # no time, no minutes, a one-digit second
    for text in ("2030-01-01", "2030-01-01T00Z", "2030-01-01T00:00:7Z"):
        r = http.post("/api/v1/orders", json={**good, "expiresAt": text}, headers=h)
        assert r.status_code == 422 and "expiresAt" in r.json()["error"]["message"], r.text
    # the OpenAPI document's pattern says which texts those are, for a client to check first
    schema = http.get("/openapi.json").json()["components"]["schemas"]["OrderBody"]
    pattern = re.compile(next(s["pattern"] for s in schema["properties"]["expiresAt"]["anyOf"]
                              if "pattern" in s))
    for text in ("2030-01-01T00:00Z", "2030-01-01T01:30+01:00", "2030-01-01T00:00:07.5",
                 "9999-12-31T23:59:59.999999Z"):
        assert pattern.search(text), text
    for text in ("tomorrow", "0000000000", "2030-01-01", "2030-01-01T00Z",
                 "2030-01-01T00:00:7Z", "20300101T000000Z", "2030-W01-3T00:00:00",
                 "2030-01-01T00:00:00\nZ", "2030-01-01T00:00:00+00:60"):
        assert not pattern.search(text), text
    last = place(http, h, **good, expiresAt="9999-12-31T23:59:59.999999Z")  # the last one
    assert last["expiresAt"] == "9999-12-31T23:59:59.999999Z"
    assert [o["orderId"] for o in open_orders(http, h)] == [last["orderId"]]
    r = http.delete(f"/api/v1/orders/{last['orderId']}", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text


def test_open_orders_per_account_are_limited_and_reserve_a_position_slot() -> None:
    """MAX_OPEN_ORDERS=2, MAX_OPEN_POSITIONS=3: a third order answers 409 TOO_MANY_ORDERS; an
    open order holds a position slot, so with two orders only one open fits; a cancel makes
    room again."""
    settings = Settings(max_open_orders=2, max_open_positions=3, api_key_rate_per_s=0,
                        signups_per_min=0)
    with LocalHttpPlatform(settings) as p, httpx.Client(base_url=p.base_url, timeout=10) as c:
        h = sol_trader(p, c)
        order = {"asset": "SOL", "type": "long", "orderType": "limit", "triggerPrice": "90",
                 "margin": "10", "leverage": 2}
        first, _ = place(c, h, **order), place(c, h, **order)
        r = c.post("/api/v1/orders", json=order, headers=h)
        assert r.status_code == 409 and error_code(r) == "TOO_MANY_ORDERS", r.text
        opened = {"asset": "SOL", "type": "long", "margin": "10", "leverage": 2}
        assert c.post("/api/v1/positions/open", json=opened, headers=h).status_code == 201
        r = c.post("/api/v1/positions/open", json=opened, headers=h)
        assert r.status_code == 409 and error_code(r) == "TOO_MANY_POSITIONS", r.text
        assert c.delete(f"/api/v1/orders/{first['orderId']}", headers=h).status_code == 200
        assert c.post("/api/v1/orders", json=order, headers=h).status_code == 201
        assert balances(c, h)["margin"] == 30
        assert p.audit() == []


def test_a_fill_that_makes_the_last_open_position_is_one_no_open_passes() -> None:
    """MAX_OPEN_POSITIONS=2: one position and one order fill the slots; the order fills into
    the second position, and neither another open nor another order passes after it (409
    TOO_MANY_POSITIONS, nothing locked)."""
    settings = Settings(max_open_positions=2, api_key_rate_per_s=0, signups_per_min=0)
    with LocalHttpPlatform(settings) as p, httpx.Client(base_url=p.base_url, timeout=10) as c:
        h = sol_trader(p, c)
        opened = {"asset": "SOL", "type": "long", "margin": "10", "leverage": 2}
        order = {**opened, "orderType": "limit", "triggerPrice": "90"}
        assert c.post("/api/v1/positions/open", json=opened, headers=h).status_code == 201
        placed = place(c, h, **order)
        r = c.post("/api/v1/positions/open", json=opened, headers=h)
        assert r.status_code == 409 and error_code(r) == "TOO_MANY_POSITIONS", r.text
        tick(p, c, "SOL", "89.99", "90.00")  # the order fills
        assert wait_ended(c, h, placed["orderId"])["status"] == "filled"
        assert len(state(c, h)["positions"]) == 2
        for path, body in (("/api/v1/positions/open", opened), ("/api/v1/orders", order)):
            r = c.post(path, json=body, headers=h)
            assert r.status_code == 409 and error_code(r) == "TOO_MANY_POSITIONS", r.text
        assert balances(c, h)["margin"] == 20 and open_orders(c, h) == []
        assert p.audit() == []
