"""Every error over real HTTP has the SPEC shape and a 4xx status; no input gives a 5xx.
Decimal inputs are exact; an open that is already lost is refused (WOULD_LIQUIDATE)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cluster.config import Settings
from tests.e2e.api_client import error_code
from tests.e2e.api_client import signup
from tests.e2e.api_client import sol_trader
from tests.e2e.api_client import state
from tests.e2e.api_client import tick
from tests.e2e.http_platform import HttpPlatform
from tests.e2e.http_platform import LocalHttpPlatform

UNLIMITED = Settings(api_key_rate_per_s=0, signups_per_min=0,  # limits: test_api_limits.py
                     public_rate_per_s=0)


@pytest.fixture(scope="module")
def platform() -> Iterator[HttpPlatform]:
    """This module signs up hundreds of accounts from one address: rates are not limited."""
    with LocalHttpPlatform(UNLIMITED) as p:
        yield p

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


def test_two_authorization_headers_are_refused_and_act_for_nobody(
        platform: HttpPlatform, http: httpx.Client) -> None:
    """Two keys on one request ran as the first, while a proxy or a log may take the last."""
    first, second = signup(http), signup(http)
    tick(platform, http, "SOL", "100.00", "100.01")
    for keys in ((first, second), (second, first), (first, first)):
        headers = [("Authorization", k["Authorization"]) for k in keys]
        r = http.post("/api/v1/orders", headers=headers, json={
            "asset": "SOL", "type": "long", "orderType": "limit", "triggerPrice": "90",
            "margin": "5", "leverage": 2})
        assert r.status_code == 400 and error_code(r) == "INVALID_REQUEST", r.text
        r = http.get("/api/v1/state", headers=headers)
        assert r.status_code == 400 and error_code(r) == "INVALID_REQUEST", r.text
    for h in (first, second):
        assert http.get("/api/v1/orders", headers=h).json()["orders"] == []
        assert state(http, h)["balances"]["margin"] == "0.000000"


def test_a_known_key_acts_only_in_the_bearer_frame(http: httpx.Client) -> None:
    """The scheme's case is free and one or more spaces follow it (RFC 9110 11.1, RFC 6750
    2.1); the key itself is exact. A real key under another scheme, alone, cut, extended or
    upper-cased is refused as any unknown one (the other tests send keys that exist nowhere)."""
    key = signup(http)["Authorization"].removeprefix("Bearer ")
    for taken in (f"Bearer {key}", f"bearer {key}", f"BEARER {key}", f"Bearer  {key}"):
        assert http.get("/api/v1/orders", headers={"Authorization": taken}).status_code == 200
    for refused in (key, f"Basic {key}", f"Token {key}", f"Bearer{key}", f"Bearer {key[:-1]}",
                    f"Bearer {key}x", f"Bearer x{key}", f"Bearer {key} {key}",
                    f"Bearer {key.upper()}", f'Bearer "{key}"', f"Bearer\t{key}"):
        r = http.get("/api/v1/orders", headers={"Authorization": refused})
        assert r.status_code == 401 and error_code(r) == "UNAUTHORIZED", (refused, r.text)
        assert r.headers["www-authenticate"] == "Bearer", refused


def test_public_routes_need_no_key(http: httpx.Client) -> None:
    assert http.get("/api/v1/assets").status_code == 200
    assert http.get("/api/v1/prices").status_code == 200
    assert http.post("/api/v1/accounts", json={}).status_code == 201


PUBLIC = {("POST", "/api/v1/accounts"), ("GET", "/api/v1/assets"), ("GET", "/api/v1/prices"),
          ("GET", "/api/v1/klines")}  # SPEC: every other /api/v1 route needs a key


def test_the_openapi_document_names_the_bearer_scheme_exactly_where_a_key_is_needed(
        http: httpx.Client) -> None:
    """Every /api/v1 operation but the SPEC's public ones declares the bearer scheme in the
    OpenAPI document, no other operation does, and each one declaring it answers 401 without a
    key."""
    document = http.get("/openapi.json").json()
    assert document["components"]["securitySchemes"] == {"HTTPBearer": {
        "type": "http", "scheme": "bearer", "description": "Authorization: Bearer <apiKey>"}}
    operations = {(method.upper(), path): op for path, ops in document["paths"].items()
                  for method, op in ops.items()}
    secured = {key for key, op in operations.items() if "security" in op}
    assert secured == {(m, p) for m, p in operations if p.startswith("/api/v1/")} - PUBLIC
    for method, path in sorted(secured):
        assert operations[method, path]["security"] == [{"HTTPBearer": []}]
        r = http.request(method, path.replace("{orderId}", "1"),
                         json={} if method == "POST" else None)
        assert r.status_code == 401 and error_code(r) == "UNAUTHORIZED", (method, path, r.text)
        # and each documents the 400 its key given twice gets, a read's as a write's
        assert "400" in operations[method, path]["responses"], (method, path)
        r = http.request(method, path.replace("{orderId}", "1"),
                         json={} if method == "POST" else None,
                         headers=[("Authorization", "Bearer a"), ("Authorization", "Bearer b")])
        assert r.status_code == 400 and error_code(r) == "INVALID_REQUEST", (method, path, r.text)


def test_the_openapi_document_gives_every_api_error_the_spec_shape(http: httpx.Client) -> None:
    """Every error answer an /api/v1 operation documents is ``{"error":{"code","message"}}``:
    FastAPI documents a 422 the route does not name as its own ``{"detail":[...]}``, which
    this API never answers. A cancel with a clientOrderId over 64 characters is such a 422."""
    document = http.get("/openapi.json").json()
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            if not path.startswith("/api/v1/"):
                continue
            for status, response in op["responses"].items():
                if status[0] in "45":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorOut"}, \
                        (method, path, status, schema)
    r = http.delete("/api/v1/orders/1", params={"clientOrderId": "x" * 65},
                    headers=signup(http))
    assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST", r.text


def test_the_openapi_document_names_only_answers_its_routes_give(http: httpx.Client) -> None:
    """Outside /api/v1 too: no operation documents FastAPI's ``{"detail":[...]}`` (no route
    answers it), a terminal file's 404 is the error shape it really is, and the stream's plain
    HTTP route documents its 426 and no 200 (it never answers one)."""
    document = http.get("/openapi.json").json()
    text = json.dumps(document)
    assert "HTTPValidationError" not in text and '"ValidationError"' not in text
    error = {"$ref": "#/components/schemas/ErrorOut"}
    operations = {(method.upper(), path): op for path, ops in document["paths"].items()
                  for method, op in ops.items()}
    missing = operations["GET", "/static/{path}"]["responses"]["404"]
    assert missing["content"]["application/json"]["schema"] == error, missing
    r = http.get("/static/nope.js")
    assert r.status_code == 404 and error_code(r) == "NOT_FOUND", r.text
    ws = operations["GET", "/ws"]["responses"]
    assert "200" not in ws and ws["426"]["content"]["application/json"]["schema"] == error, ws
    r = http.get("/ws")
    assert r.status_code == 426 and error_code(r) == "INVALID_REQUEST", r.text


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
    ("margin exponent string", {**VALID, "margin": "1e1"}, "INVALID_REQUEST"),
    ("margin 18 decimals", {**VALID, "margin": "10.00000000000000001"}, "INVALID_REQUEST"),
    ("margin 30 decimals", {**VALID, "margin": "10." + "0" * 29 + "1"}, "INVALID_REQUEST"),
    ("margin spaces", {**VALID, "margin": " 10 "}, "INVALID_REQUEST"),
    ("margin plus", {**VALID, "margin": "+10"}, "INVALID_REQUEST"),
    ("margin underscore", {**VALID, "margin": "1_0"}, "INVALID_REQUEST"),
    ("margin unicode digits", {**VALID, "margin": "١٠"}, "INVALID_REQUEST"),
    ("margin fullwidth digits", {**VALID, "margin": "１０"}, "INVALID_REQUEST"),
    ("margin trailing point", {**VALID, "margin": "10."}, "INVALID_REQUEST"),
    ("margin leading point", {**VALID, "margin": ".5"}, "INVALID_REQUEST"),
    ("margin comma", {**VALID, "margin": "10,5"}, "INVALID_REQUEST"),
    ("margin over int64", {**VALID, "margin": "9223372036854.775808"}, "INVALID_REQUEST"),
    ("take profit over int64", {**VALID, "takeProfit": "99999999999999999999"},
     "INVALID_REQUEST"),
    ("take profit above any price", {**VALID, "takeProfit": "46116860184273879"},
     "INVALID_REQUEST"),
    ("current price over int64", {**VALID, "currentPrice": 10**25}, "INVALID_REQUEST"),
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
    ("misspelt stop loss", {**VALID, "stoploss": "5"}, "INVALID_REQUEST"),
    ("unknown field", {**VALID, "reduceOnly": True}, "INVALID_REQUEST"),
]


@pytest.mark.parametrize("name,body,code", BAD_OPEN_BODIES, ids=[b[0] for b in BAD_OPEN_BODIES])
def test_bad_open_bodies_are_4xx_with_the_error_shape(
        platform: HttpPlatform, http: httpx.Client, name: str, body: Any, code: str) -> None:
    h = sol_trader(platform, http)
    r = http.post("/api/v1/positions/open", json=body, headers=h)
    assert r.status_code == 422, r.text
    assert error_code(r) == code
    s = http.get("/api/v1/state", headers=h).json()
    assert s["positions"] == [] and s["balances"]["margin"] == "0.000000"


@pytest.mark.parametrize("field,text,code,message", [
    ("leverage", "1" + "0" * 40, "LEVERAGE_OUT_OF_RANGE", "1..10"),
    ("leverage", "9" * 5000, "LEVERAGE_OUT_OF_RANGE", "1..10"),
    ("leverage", "-" + "9" * 5000, "LEVERAGE_OUT_OF_RANGE", "1..10"),
    ("maxSlippageBps", "9" * 5000, "INVALID_REQUEST", "less than or equal to 10000"),
    ("maxSlippageBps", "-" + "9" * 45, "INVALID_REQUEST", "greater than or equal to 0"),
    # an integer's digits with a fraction, or an exponent, are still no integer
    ("leverage", "9" * 45 + ".5", "INVALID_REQUEST", "valid integer"),
    ("leverage", "1" * 45 + "e-3", "INVALID_REQUEST", "valid integer"),
])
def test_a_body_integer_of_many_digits_is_refused_by_its_range(
        platform: HttpPlatform, http: httpx.Client, field: str, text: str, code: str,
        message: str) -> None:
    """Past 40 digits an integer of the body read ``Input should be a valid integer``, which
    it is: the field's range refuses it, as it does 1000, and nothing opens."""
    h = sol_trader(platform, http)
    fields = {**VALID, field: "@"}
    raw = json.dumps(fields).replace('"@"', text).encode()
    r = http.post("/api/v1/positions/open", content=raw,
                  headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 422 and error_code(r) == code, r.text
    assert message in r.json()["error"]["message"], r.text
    assert len(r.text) < 400, r.text[:400]  # the digits are not sent back
    s = http.get("/api/v1/state", headers=h).json()
    assert s["positions"] == [] and s["balances"]["margin"] == "0.000000"


@pytest.mark.parametrize("path,body,field,hint", [
    ("/api/v1/positions/open", {**VALID, "stoploss": "9"}, "stoploss", "stopLoss"),
    ("/api/v1/positions/open", {**VALID, "take_profit": "12"}, "take_profit", "takeProfit"),
    ("/api/v1/orders", {**VALID, "orderType": "limit", "triggerPrice": "95",
                        "expiry": "2030-01-01T00:00:00Z"}, "expiry", None),
    ("/api/v1/positions/close", {"positionId": "1", "qty": "0.5"}, "qty", None),
    ("/api/v1/positions/modify", {"positionId": "1", "StopLoss": "9"}, "StopLoss", "stopLoss"),
    ("/api/v1/positions/margin", {"positionId": "1", "amount": "5", "x": 1}, "x", None),
    # another request's field: said to be none of this one's, not "did you mean" itself
    ("/api/v1/orders", {**VALID, "orderType": "limit", "triggerPrice": "95",
                        "maxSlippageBps": 50}, "maxSlippageBps", None),
    ("/api/v1/positions/close", {"positionId": "1", "amount": "5"}, "amount", None),
])
def test_a_field_a_request_does_not_know_is_refused_by_name(
        platform: HttpPlatform, http: httpx.Client, path: str, body: dict[str, Any],
        field: str, hint: str | None) -> None:
    """A misspelt protective field never opens an unprotected position: the request is refused
    naming the field (and the field it resembles), and nothing is locked or opened."""
    h = sol_trader(platform, http)
    r = http.post(path, json=body, headers=h)
    assert r.status_code == 422, r.text
    assert error_code(r) == "INVALID_REQUEST"
    message = r.json()["error"]["message"]
    assert message.startswith(f"{field}: unknown field"), message
    assert (f"did you mean {hint}?" in message) if hint else ("did you mean" not in message)
    known_elsewhere = field in {"maxSlippageBps", "amount"}
    assert message.startswith(f"{field}: unknown field of this request") == known_elsewhere
    s = http.get("/api/v1/state", headers=h).json()
    assert s["positions"] == [] and s["balances"]["margin"] == "0.000000"
    assert http.get("/api/v1/orders", headers=h).json()["orders"] == []


def test_unknown_fields_are_named_before_the_fields_they_leave_missing(
        http: httpx.Client) -> None:
    """Every key capitalised: the message's three errors were the missing fields, and the
    hint of the misspelling was cut off."""
    r = http.post("/api/v1/positions/open", headers=signup(http),
                  json={"Asset": "SOL", "Type": "long", "Margin": "10", "Leverage": 2})
    assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST", r.text
    assert r.json()["error"]["message"].split("; ") == [
        "Asset: unknown field (did you mean asset?)", "Type: unknown field (did you mean type?)",
        "Margin: unknown field (did you mean margin?)"]


@pytest.mark.parametrize("position_id", [None, True, 1.5, [1], {}, "", "1" * 40])
@pytest.mark.parametrize("path", ["/api/v1/positions/close", "/api/v1/positions/modify",
                                  "/api/v1/positions/margin"])
def test_a_position_id_of_another_type_is_refused_in_one_message(
        http: httpx.Client, path: str, position_id: Any) -> None:
    """It read ``positionId.int: Input should be a valid integer; positionId.constrained-str:
    ...``: the names of the parser's two tries."""
    body = {"positionId": position_id, **({"amount": "5"} if path.endswith("margin") else {})}
    r = http.post(path, json=body, headers=signup(http))
    assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST", r.text
    assert r.json()["error"]["message"] == ("positionId: expected the position's id: a string "
                                            "of its digits (an integer is accepted too)")


def test_a_cancel_with_a_body_is_refused_and_cancels_nothing(
        platform: HttpPlatform, http: httpx.Client) -> None:
    """A clientOrderId in a cancel's body was dropped: the cancel went through, and its retry
    was answered ORDER_NOT_OPEN, not the first answer."""
    h = sol_trader(platform, http)
    order = http.post("/api/v1/orders", headers=h, json={
        "asset": "SOL", "type": "long", "orderType": "limit", "triggerPrice": "90",
        "margin": "10", "leverage": 2}).json()
    r = http.request("DELETE", f"/api/v1/orders/{order['orderId']}", headers=h,
                     json={"clientOrderId": "del-1"})
    assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST", r.text
    assert r.json()["error"]["message"] == \
        "a cancel takes no body: give clientOrderId as ?clientOrderId="
    assert [o["orderId"] for o in http.get("/api/v1/orders", headers=h).json()["orders"]] == [
        order["orderId"]]


@pytest.mark.parametrize("compressed", [True, False])
def test_a_body_under_a_content_encoding_is_refused_and_opens_nothing(
        platform: HttpPlatform, http: httpx.Client, compressed: bool) -> None:
    """A gzip body was refused as "malformed JSON: not UTF-8", and a plain one labelled gzip
    opened a position."""
    h = sol_trader(platform, http)
    raw = json.dumps(VALID).encode()
    r = http.post("/api/v1/positions/open", content=gzip.compress(raw) if compressed else raw,
                  headers={**h, "Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert r.status_code == 400 and error_code(r) == "INVALID_REQUEST", r.text
    assert r.json()["error"]["message"] == \
        "Content-Encoding is not read: send the body uncompressed"
    assert state(http, h)["positions"] == []
    r = http.post("/api/v1/positions/open", content=raw, headers={
        **h, "Content-Type": "application/json", "Content-Encoding": "identity"})
    assert r.status_code == 201, r.text


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
    # JSON is UTF-8 (RFC 8259 8.1): a body another parser could read otherwise is refused
    ("utf-16", '{"asset":"SOL","type":"long","margin":"10","leverage":5}'.encode("utf-16"),
     "application/json"),
    ("utf-32-le", '{"asset":"SOL","type":"long","margin":"10","leverage":5}'.encode(
        "utf-32-le"), "application/json"),
    ("no content type", b"\x00\x01\x02", None),
    ("oversized", b'{"asset":"' + b"S" * 200_000 + b'"}', "application/json"),
    ("key given twice", b'{"asset":"SOL","type":"long","margin":"10","leverage":5,'
     b'"positionId":"1","positionId":"2","asset":"BTC"}', "application/json"),
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


def test_a_key_given_twice_is_refused_naming_it_and_opens_nothing(
        platform: HttpPlatform, http: httpx.Client) -> None:
    """JSON leaves a repeated key's meaning open (Python keeps the last value, other parsers
    the first): the platform refuses it rather than pick one."""
    h = {**signup(http), "Content-Type": "application/json"}
    tick(platform, http, "SOL", "100.00", "100.01")
    tick(platform, http, "BTC", "60000.0", "60000.1")
    r = http.post("/api/v1/positions/open", headers=h, content=(
        b'{"asset":"SOL","type":"long","margin":"10","leverage":5,"asset":"BTC"}'))
    assert r.status_code == 400 and error_code(r) == "INVALID_REQUEST", r.text
    assert r.json()["error"]["message"] == "malformed JSON: key 'asset' given twice"
    r = http.post("/api/v1/positions/open", headers=h, content=(
        b'{"asset":"SOL","type":"long","margin":"10","leverage":5,'
        b'"clientOrderId":"a","extra":{"x":1,"x":2}}'))  # nested, in a key nobody reads
    assert r.status_code == 400 and error_code(r) == "INVALID_REQUEST", r.text
    assert state(http, h)["positions"] == []


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


@pytest.mark.parametrize(("raw", "status"), [
    (b"[1]", 422), (b'"x"', 422), (b"12", 422),  # JSON, but not an object
    (b"nope", 400), (b"{", 400), (b'{"a":NaN}', 400), (b'{"a":1e99999999999999999999}', 400),
    (b'{"a":"\xff"}', 400),  # not JSON (or not UTF-8)
    (b"[" * 8_000 + b"]" * 8_000, 400), (b'{"a":' * 33 + b"1" + b"}" * 33, 400),  # too deep
])
def test_accounts_refuses_a_body_that_is_not_a_json_object(
        http: httpx.Client, raw: bytes, status: int) -> None:
    r = http.post("/api/v1/accounts", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status and error_code(r) == "INVALID_REQUEST", r.text


@pytest.mark.parametrize("raw", [
    b'{"a":' * 31 + b"[1]" + b"}" * 31,  # 32 levels: the limit
    b'{"a":"' + b"[" * 5_000 + b'"}',  # brackets inside a string are not nesting
    b'{"a":"\\\"[[[' + b"[" * 100 + b'"}',  # nor after escaped quotes and backslashes
    b'{"note":' + b"1" * 5_000 + b"}",  # a long number is kept exact, not an error
])
def test_accounts_accepts_any_json_object_within_the_limits(http: httpx.Client,
                                                            raw: bytes) -> None:
    r = http.post("/api/v1/accounts", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 501}, {"limit": "x"},
                                    {"before": "nope"}, {"before": "99999999"}])
def test_bad_history_queries_are_422(http: httpx.Client, params: dict[str, Any]) -> None:
    r = http.get("/api/v1/positions/history", params=params, headers=signup(http))
    assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST"


@pytest.mark.parametrize("path,query,name", [
    ("/api/v1/positions", "limit=1_0", "limit"),  # read as 10 before
    ("/api/v1/positions/history", "limit=1.0", "limit"),
    ("/api/v1/orders/history", "limit=%2B5", "limit"),  # "+5"
    ("/api/v1/klines", "asset=SOL&interval=1m&limit=%201", "limit"),  # " 1"
    ("/api/v1/klines", "asset=SOL&interval=1m&startTime=1_700_000_000", "startTime"),
    ("/api/v1/klines", "asset=SOL&interval=1m&endTime=17e8", "endTime"),
])
def test_a_query_integer_is_decimal_digits_alone(http: httpx.Client, path: str, query: str,
                                                 name: str) -> None:
    """An integer in a query is its digits: a sign, a space, a fraction or an underscore
    (which Python's int() reads as a separator) is refused, naming the parameter, not read as
    another number."""
    r = http.get(f"{path}?{query}", headers=signup(http))
    assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST", r.text
    assert r.json()["error"]["message"] == (
        f"query.{name}: Input should be an integer in decimal digits"), r.text
    digits = query.rsplit("=", 1)[0] + "=10"
    assert http.get(f"{path}?{digits}", headers=signup(http)).status_code == 200


@pytest.mark.parametrize("path,query,message", [
    ("/api/v1/positions/history", "limit=" + "9" * 23, "less than or equal to 500"),
    ("/api/v1/klines", "asset=SOL&interval=1m&endTime=" + "1" * 40, "less than or equal to"),
    ("/api/v1/orders/history", "limit=" + "0" * 30 + "7", None),  # leading zeros: 7
    ("/api/v1/positions", "limit=" + "9" * 5000, "less than or equal to 500"),
    ("/api/v1/klines", "asset=SOL&interval=1m&startTime=" + "1" * 4301, "less than or equal to"),
    ("/api/v1/orders/history", "limit=" + "0" * 5000 + "7", None),
])
def test_a_query_integer_of_many_digits_is_refused_by_its_bound(
        http: httpx.Client, path: str, query: str, message: str | None) -> None:
    """Digits past 19 were refused as not being "an integer in decimal digits", which they
    are, and past 4,300 as "exceeded maximum size": the parameter's bound refuses them,
    saying which it is."""
    r = http.get(f"{path}?{query}", headers=signup(http))
    if message is None:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST", r.text
    assert message in r.json()["error"]["message"], r.text
    assert len(r.text) < 300, r.text[:300]  # the digits are not sent back


@pytest.mark.parametrize("path,query,name,single", [
    ("/api/v1/positions", "limit=1&limit=2", "limit", "limit=1"),
    ("/api/v1/positions/history", "lim%69t=1&limit=2", "limit", "limit=1"),  # encoded
    ("/api/v1/orders/history", "before=1&limit=5&before=2", "before", "limit=5"),
    ("/api/v1/klines", "asset=SOL&interval=1m&asset=BTC", "asset", "asset=SOL&interval=1m"),
    ("/api/v1/state", "", "", ""),  # no parameter to read
])
def test_a_query_parameter_given_twice_is_refused_naming_it(
        http: httpx.Client, path: str, query: str, name: str, single: str) -> None:
    """A parameter given twice has no one meaning (the last value was taken, where a proxy or
    a log may read the first): refused like a JSON key given twice."""
    if query:
        r = http.get(f"{path}?{query}", headers=signup(http))
        assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST", r.text
        assert r.json()["error"]["message"] == f"query.{name}: given more than once", r.text
    # one the route does not read is ignored, however often it is given (README)
    r = http.get(f"{path}?x=1&{single}&x=2&x", headers=signup(http))
    assert r.status_code == 200, r.text


def test_a_cancel_naming_its_client_order_id_twice_changes_nothing(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = sol_trader(platform, http)
    order = http.post("/api/v1/orders", headers=h, json={
        "asset": "SOL", "type": "long", "orderType": "limit", "triggerPrice": "90",
        "margin": "10", "leverage": 2}).json()
    path = f"/api/v1/orders/{order['orderId']}"
    r = http.delete(f"{path}?clientOrderId=a&clientOrderId=b", headers=h)
    assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST", r.text
    assert [o["orderId"] for o in http.get("/api/v1/orders", headers=h).json()["orders"]] == [
        order["orderId"]]
    # a parameter the route does not read is ignored (README), a single one is taken
    r = http.delete(f"{path}?clientOrderId=b&note=x", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert http.delete(f"{path}?clientOrderId=b", headers=h).json() == r.json()


def test_unknown_routes_and_wrong_methods(http: httpx.Client) -> None:
    r = http.get("/api/v1/nope")
    assert r.status_code == 404 and error_code(r) == "NOT_FOUND"
    for method, path in (("GET", "/api/v1/state/"), ("POST", "/api/v1/orders/"),
                         ("DELETE", "/api/v1/orders/")):  # was a 307 to the client's Host
        r = http.request(method, path, headers={"Host": "elsewhere.example"})
        assert r.status_code == 404 and error_code(r) == "NOT_FOUND", (path, r.status_code)
    r = http.get("/api/v1/positions/open")
    assert r.status_code == 405 and error_code(r) == "METHOD_NOT_ALLOWED"
    r = http.delete("/api/v1/accounts")
    assert r.status_code == 405 and error_code(r) == "METHOD_NOT_ALLOWED"


def test_head_answers_what_get_would_without_a_body(http: httpx.Client) -> None:
    headers = signup(http)
    for path in ("/api/v1/state", "/api/v1/assets", "/healthz", "/", "/static/app.js"):
        got, head = http.get(path, headers=headers), http.head(path, headers=headers)
        assert head.status_code == got.status_code == 200, (path, head.status_code)
        assert head.content == b"", path
        assert head.headers["content-type"] == got.headers["content-type"], path
    # a HEAD needs the same key as its GET, and a POST-only route still refuses it
    r = http.head("/api/v1/state")
    assert r.status_code == 401 and r.content == b""
    r = http.head("/api/v1/positions/open", headers=headers)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = http.get("/api/v1/positions/open", headers=headers)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = http.delete("/api/v1/orders", headers=headers)
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST"
    for method, path in (("POST", "/ws"), ("DELETE", "/api/v1/state")):  # every 405 alike
        r = http.request(method, path, headers=headers)
        assert r.status_code == 405 and error_code(r) == "METHOD_NOT_ALLOWED", (path, r.text)


@pytest.mark.parametrize("range_", ["bytes=abc", "bytes=5-1", "items=0-1", "bytes=999999999-",
                                    "bytes=-0", "bytes=" + ",".join(["0-1"] * 101)])
@pytest.mark.parametrize("path", ["/", "/static/app.js"])
def test_a_range_that_cannot_be_served_is_ignored(http: httpx.Client, path: str,
                                                  range_: str) -> None:
    """The whole file, as RFC 9110 allows, not an answer outside SPEC's error shape."""
    whole = http.get(path)
    r = http.get(path, headers={"Range": range_})
    assert r.status_code == 200 and r.content == whole.content, (r.status_code, r.text[:200])
    part = http.get(path, headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == whole.content[:10]


def test_operations_endpoints(platform: HttpPlatform, http: httpx.Client) -> None:
    r = http.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert r.json()["components"]["ledger"] == "ok"
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "shardex_http_responses_total" in r.text and "shardex_open_positions" in r.text
    assert 'shardex_open_orders{shard="shard-SOL-0",asset="SOL"} ' in r.text
    # a route with a parameter is counted under its template, not as "other"
    headers = sol_trader(platform, http)
    assert http.delete("/api/v1/orders/123", headers=headers).status_code == 404
    assert http.delete("/api/v1/orders/456", headers=headers).status_code == 404
    text = http.get("/metrics").text
    assert 'method="DELETE",path="/api/v1/orders/{orderId}",status="404"} 2' in text, text
    # health shows how old each price is (SOL was just ticked) and which are too old to
    # trade: those older than MAX_PRICE_AGE_S (15 s) and those never priced
    health = http.get("/healthz").json()
    ages, stale = health["priceAgesS"], health["stalePrices"]
    assert 0 <= ages["SOL"] < 15 and "SOL" not in stale, health
    for asset in ("SOL", "BTC", "ETH"):
        assert (asset in stale) == (ages.get(asset, 1e9) > 15), (asset, health)
    spec = http.get("/openapi.json").json()
    for path in ("/api/v1/accounts", "/api/v1/state", "/api/v1/positions/open",
                 "/api/v1/positions/close", "/api/v1/positions/history", "/api/v1/assets",
                 "/api/v1/prices", "/healthz", "/metrics", "/api/v1/positions/modify",
                 "/api/v1/positions/margin", "/api/v1/orders", "/api/v1/orders/{orderId}",
                 "/api/v1/orders/history"):
        assert path in spec["paths"], path
    assert http.get("/docs").status_code == 200
    assets = http.get("/api/v1/assets").json()["assets"]
    assert {a["name"]: (a["priceStep"], a["quantityStep"], a["maxLeverage"],
                        a["maintenanceMarginRate"]) for a in assets} \
        == {"SOL": ("0.01", "0.01", 100, "0"), "BTC": ("0.1", "0.00001", 100, "0"),
            "ETH": ("0.01", "0.0001", 100, "0")}


def _open_raw(http: httpx.Client, headers: dict[str, str], fields: bytes) -> httpx.Response:
    """POST /positions/open with the JSON text ``fields`` written by hand (Python's json would
    turn these numbers into floats before sending them)."""
    raw = b'{"asset":"SOL","type":"long","leverage":1,' + fields + b"}"
    return http.post("/api/v1/positions/open", content=raw,
                     headers={**headers, "Content-Type": "application/json"})


@pytest.mark.parametrize(("fields", "margin"), [
    (b'"margin":10.000001', "10.000001"),
    (b'"margin":1e1', "10.000000"),
    (b'"margin":2500E-2', "25.000000"),
    (b'"margin":"10.000001"', "10.000001"),
    (b'"margin":10.000000', "10.000000"),  # zeros within the money step: taken
])
def test_json_numbers_are_read_exactly(platform: HttpPlatform, http: httpx.Client,
                                       fields: bytes, margin: str) -> None:
    h = sol_trader(platform, http)
    r = _open_raw(http, h, fields)
    assert r.status_code == 201, r.text
    assert r.json()["margin"] == margin


@pytest.mark.parametrize(("fields", "field"), [
    (b'"margin":10.00000000000000001', "margin"),  # a float reads 10.0 and would accept it
    (b'"margin":0.30000000000000004', "margin"),
    (b'"margin":10.' + b"0" * 29 + b"1", "margin"),  # 30 decimals: not rounded at 28 digits
    (b'"margin":1e-7', "margin"),
    (b'"margin":4611686018427.387905', "margin"),  # one micro-dollar past the int64 bound
    (b'"margin":1e999999999999999999', "margin"),
    (b'"margin":"10.0000001"', "margin"),
    # SPEC: more decimals than the step allows is a 422, zeros included (they were read as
    # 10.000001 and 5)
    (b'"margin":10.000001000000000000000000000000', "margin"),
    (b'"margin":5.0000000', "margin"),
    (b'"margin":"5.0000000"', "margin"),
    (b'"margin":10,"takeProfit":"120.000"', "takeProfit"),
    (b'"margin":10,"currentPrice":100.010', "currentPrice"),
    (b'"margin":10,"takeProfit":120.001', "takeProfit"),
    (b'"margin":10,"stopLoss":"95.5.5"', "stopLoss"),
    (b'"margin":10,"currentPrice":1e30', "currentPrice"),
])
def test_decimal_refusals_are_422_naming_the_field(platform: HttpPlatform, http: httpx.Client,
                                                   fields: bytes, field: str) -> None:
    h = sol_trader(platform, http)
    r = _open_raw(http, h, fields)
    assert r.status_code == 422 and error_code(r) == "INVALID_REQUEST", r.text
    assert r.json()["error"]["message"].startswith(f"{field}:"), r.text
    assert state(http, h)["balances"]["margin"] == "0.000000"


@pytest.mark.parametrize(("side", "bid", "ask"), [("long", "98.90", "100.00"),
                                                  ("short", "100.00", "101.10")])
def test_an_open_already_past_its_liquidation_price_is_refused(
        platform: HttpPlatform, http: httpx.Client, side: str, bid: str, ask: str) -> None:
    """100 USD at 100x: a long at the ask 100.00 would be liquidated at 99.00, above the bid
    98.90; a short at the bid 100.00 at 101.00, below the ask 101.10. Neither opens, and the
    margin is not kept."""
    h = signup(http)
    tick(platform, http, "SOL", bid, ask)
    r = http.post("/api/v1/positions/open", headers=h,
                  json={"asset": "SOL", "type": side, "margin": "100", "leverage": 100})
    assert r.status_code == 422 and error_code(r) == "WOULD_LIQUIDATE", r.text
    s = state(http, h)
    assert s["positions"] == [] and s["balances"]["margin"] == "0.000000"
    assert s["balances"]["free"] == "10000.000000"
    # a lower leverage puts the liquidation price beyond the current price: it opens
    r = http.post("/api/v1/positions/open", headers=h,
                  json={"asset": "SOL", "type": side, "margin": "100", "leverage": 10})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_json_body_sent_as_another_type_is_refused_naming_the_content_type(
        http: httpx.Client, content_type: str | None) -> None:
    """``curl -d`` sends a form type unless told otherwise: the refusal says what to send."""
    h = signup(http)
    headers = dict(h) | ({} if content_type is None else {"Content-Type": content_type})
    r = http.post("/api/v1/positions/open", headers=headers,
                  content=b'{"asset":"SOL","type":"long","margin":"10","leverage":5}')
    assert r.status_code == 422, r.text
    assert error_code(r) == "INVALID_REQUEST"
    assert "Content-Type: application/json" in r.json()["error"]["message"], r.text
    assert http.get("/api/v1/state", headers=h).json()["positions"] == []


def test_a_long_unknown_field_name_is_not_echoed_whole(http: httpx.Client) -> None:
    """The refusal names a field the body invented by its start: a 10,000-character name
    would otherwise come back whole, in every log line of the answer."""
    h = signup(http)
    name = "x" * 10_000
    r = http.post("/api/v1/positions/open", headers=h, json={**VALID, name: 1})
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert message.startswith("x" * 64) and "unknown field" in message and len(message) < 200
