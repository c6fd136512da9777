"""Every error over real HTTP has the SPEC shape and a 4xx status; no input gives a 5xx."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.e2e.api_client import error_code, signup, tick
from tests.e2e.http_platform import HttpPlatform

AUTHED = [("GET", "/api/v1/state", None),
          ("POST", "/api/v1/positions/open",
           {"asset": "SOL", "type": "long", "margin": "1", "leverage": 1}),
          ("POST", "/api/v1/positions/close", {"positionId": "1"}),
          ("GET", "/api/v1/positions/history", None)]


@pytest.mark.parametrize("method,path,body", AUTHED)
@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer wrong-key",
                                           "Basic dXNlcjpwYXNz", "Bearer " + "x" * 5000])
def test_missing_or_wrong_key_is_401(http: httpx.Client, method: str, path: str,
                                     body: dict[str, Any] | None,
                                     authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    r = http.request(method, path, json=body, headers=headers)
    assert r.status_code == 401, r.text
    assert error_code(r) == "UNAUTHORIZED"


def test_public_routes_need_no_key(http: httpx.Client) -> None:
    assert http.get("/api/v1/assets").status_code == 200
    assert http.get("/api/v1/prices").status_code == 200
    assert http.post("/api/v1/accounts", json={}).status_code == 201


VALID = {"asset": "SOL", "type": "long", "margin": "10", "leverage": 5}
BAD_OPEN_BODIES: list[tuple[str, Any, str]] = [
    ("negative margin", {**VALID, "margin": "-10"}, "INVALID_REQUEST"),
    ("zero margin", {**VALID, "margin": 0}, "INVALID_REQUEST"),
    ("zero margin string", {**VALID, "margin": "0.000000"}, "INVALID_REQUEST"),
    ("leverage 0", {**VALID, "leverage": 0}, "LEVERAGE_OUT_OF_RANGE"),
    ("leverage 1000", {**VALID, "leverage": 1000}, "LEVERAGE_OUT_OF_RANGE"),
    ("leverage negative", {**VALID, "leverage": -3}, "LEVERAGE_OUT_OF_RANGE"),
    ("leverage float", {**VALID, "leverage": 2.5}, "INVALID_REQUEST"),
    ("leverage string", {**VALID, "leverage": "5"}, "INVALID_REQUEST"),
    ("leverage bool", {**VALID, "leverage": True}, "INVALID_REQUEST"),
    ("unknown asset", {**VALID, "asset": "DOGE"}, "UNKNOWN_ASSET"),
    ("asset wrong type", {**VALID, "asset": 5}, "INVALID_REQUEST"),
    ("bad type", {**VALID, "type": "sideways"}, "INVALID_REQUEST"),
    ("margin NaN string", {**VALID, "margin": "NaN"}, "INVALID_REQUEST"),
    ("margin Infinity string", {**VALID, "margin": "Infinity"}, "INVALID_REQUEST"),
    ("margin too many decimals", {**VALID, "margin": "1.0000001"}, "INVALID_REQUEST"),
    ("margin number too many decimals", {**VALID, "margin": 1.0000001}, "INVALID_REQUEST"),
    ("margin not a number", {**VALID, "margin": "ten"}, "INVALID_REQUEST"),
    ("margin bool", {**VALID, "margin": True}, "INVALID_REQUEST"),
    ("margin list", {**VALID, "margin": [1]}, "INVALID_REQUEST"),
    ("margin null", {**VALID, "margin": None}, "INVALID_REQUEST"),
    ("margin huge", {**VALID, "margin": 10**30}, "INVALID_REQUEST"),
    ("margin huge string", {**VALID, "margin": "1e40"}, "INVALID_REQUEST"),
    ("margin exponent", {**VALID, "margin": "1e-30"}, "INVALID_REQUEST"),
    ("take profit too many decimals", {**VALID, "takeProfit": "120.001"}, "INVALID_REQUEST"),
    ("take profit on the loss side", {**VALID, "takeProfit": "50"}, "INVALID_TRIGGER"),
    ("stop loss above entry", {**VALID, "stopLoss": "150"}, "INVALID_TRIGGER"),
    ("stop loss zero", {**VALID, "stopLoss": 0}, "INVALID_REQUEST"),
    ("slippage negative", {**VALID, "maxSlippageBps": -1}, "INVALID_REQUEST"),
    ("slippage huge", {**VALID, "maxSlippageBps": 10**12}, "INVALID_REQUEST"),
    ("client order id empty", {**VALID, "clientOrderId": ""}, "INVALID_REQUEST"),
    ("client order id long", {**VALID, "clientOrderId": "x" * 65}, "INVALID_REQUEST"),
    ("missing margin", {k: v for k, v in VALID.items() if k != "margin"}, "INVALID_REQUEST"),
    ("array body", [VALID], "INVALID_REQUEST"),
    ("string body", "SOL", "INVALID_REQUEST"),
    ("empty object", {}, "INVALID_REQUEST"),
]


@pytest.mark.parametrize("name,body,code", BAD_OPEN_BODIES, ids=[b[0] for b in BAD_OPEN_BODIES])
def test_bad_open_bodies_are_4xx_with_the_error_shape(
        platform: HttpPlatform, http: httpx.Client, name: str, body: Any, code: str) -> None:
    h = signup(http)
    tick(platform, http, "SOL", "100.00", "100.01")
    r = http.post("/api/v1/positions/open", json=body, headers=h)
    assert r.status_code == 422, r.text
    assert error_code(r) == code
    s = http.get("/api/v1/state", headers=h).json()
    assert s["positions"] == [] and s["balances"]["margin"] == "0.000000"


RAW_BODIES: list[tuple[str, bytes, str | None]] = [
    ("empty", b"", "application/json"),
    ("whitespace", b"   ", "application/json"),
    ("not json", b"margin=10", "application/json"),
    ("truncated", b'{"asset": "SOL"', "application/json"),
    ("NaN literal", b'{"asset":"SOL","type":"long","margin":NaN,"leverage":5}', "application/json"),
    ("Infinity literal", b'{"asset":"SOL","type":"long","margin":Infinity,"leverage":5}',
     "application/json"),
    ("1e999", b'{"asset":"SOL","type":"long","margin":1e999,"leverage":5}', "application/json"),
    ("giant integer", b'{"asset":"SOL","type":"long","margin":' + b"9" * 5000 + b',"leverage":5}',
     "application/json"),
    ("deep nesting", b"[" * 10000 + b"]" * 10000, "application/json"),
    ("invalid utf-8", b'{"asset":"\xff\xfe","type":"long","margin":1,"leverage":5}',
     "application/json"),
    ("form encoded", b"asset=SOL&type=long&margin=10&leverage=5",
     "application/x-www-form-urlencoded"),
    ("text/plain", b'{"asset":"SOL","type":"long","margin":"10","leverage":5}', "text/plain"),
    ("no content type", b"\x00\x01\x02", None),
    ("oversized", b'{"asset":"' + b"S" * 200_000 + b'"}', "application/json"),
]


@pytest.mark.parametrize("name,raw,content_type", RAW_BODIES, ids=[b[0] for b in RAW_BODIES])
@pytest.mark.parametrize("path", ["/api/v1/positions/open", "/api/v1/positions/close"])
def test_malformed_bodies_are_4xx_with_the_error_shape(
        http: httpx.Client, name: str, raw: bytes, content_type: str | None, path: str) -> None:
    h = signup(http)
    headers = dict(h)
    if content_type is not None:
        headers["Content-Type"] = content_type
    r = http.post(path, content=raw, headers=headers)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert error_code(r) == "INVALID_REQUEST"


@pytest.mark.parametrize("body", [{"positionId": None}, {"positionId": [1]},
                                  {"positionId": "1", "maxSlippageBps": -5},
                                  {"positionId": "x" * 100}, {}])
def test_bad_close_bodies_are_422(http: httpx.Client, body: dict[str, Any]) -> None:
    r = http.post("/api/v1/positions/close", json=body, headers=signup(http))
    assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST"


@pytest.mark.parametrize("position_id", ["abc", "-5", "0", "1.5", str(2**64), 2**70, -1, "٣"])
def test_ids_that_cannot_exist_are_404(http: httpx.Client, position_id: Any) -> None:
    r = http.post("/api/v1/positions/close", json={"positionId": position_id},
                  headers=signup(http))
    assert r.status_code == 404 and error_code(r) == "NOT_FOUND"


def test_accounts_refuses_a_non_object_body(http: httpx.Client) -> None:
    for raw in (b"[1]", b"nope", b'"x"'):
        r = http.post("/api/v1/accounts", content=raw,
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST"


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 501}, {"limit": "x"},
                                    {"before": "nope"}, {"before": "99999999"}])
def test_bad_history_queries_are_422(http: httpx.Client, params: dict[str, Any]) -> None:
    r = http.get("/api/v1/positions/history", params=params, headers=signup(http))
    assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST"


def test_unknown_routes_and_wrong_methods(http: httpx.Client) -> None:
    r = http.get("/api/v1/nope")
    assert r.status_code == 404 and error_code(r) == "NOT_FOUND"
    r = http.get("/api/v1/positions/open")
    assert r.status_code == 405 and error_code(r) == "METHOD_NOT_ALLOWED"
    r = http.delete("/api/v1/accounts")
    assert r.status_code == 405 and error_code(r) == "METHOD_NOT_ALLOWED"


def test_operations_endpoints(http: httpx.Client) -> None:
    r = http.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert r.json()["components"]["ledger"] == "ok"
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "shardex_http_responses_total" in r.text and "shardex_open_positions" in r.text
    spec = http.get("/openapi.json").json()
    for path in ("/api/v1/accounts", "/api/v1/state", "/api/v1/positions/open",
                 "/api/v1/positions/close", "/api/v1/positions/history", "/api/v1/assets",
                 "/api/v1/prices", "/healthz", "/metrics"):
        assert path in spec["paths"], path
    assert http.get("/docs").status_code == 200
    assets = http.get("/api/v1/assets").json()["assets"]
    assert {a["name"]: (a["priceStep"], a["quantityStep"], a["maxLeverage"]) for a in assets} \
        == {"SOL": ("0.01", "0.01", 100), "BTC": ("0.1", "0.00001", 100),
            "ETH": ("0.01", "0.0001", 100)}
