"""Small HTTP helpers for the e2e scenarios (they only speak the public API)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from decimal import ROUND_FLOOR
from decimal import Decimal
from typing import Any

import httpx
from tests.e2e.http_platform import HttpPlatform

WAIT_S = 15.0
SIGNUP = Decimal("10000")  # the balance a new account starts with (SPEC)
SOL_STEP = Decimal("0.01")  # SOL's quantity step


def signup(http: httpx.Client) -> dict[str, str]:
    """A new account; returns its Authorization header."""
    r = http.post("/api/v1/accounts", json={})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['apiKey']}"}


def sol_trader(platform: HttpPlatform, http: httpx.Client) -> dict[str, str]:
    """A new account's Authorization header, SOL at 100.00/100.01."""
    headers = signup(http)
    tick(platform, http, "SOL", "100.00", "100.01")
    return headers


def tick(platform: HttpPlatform, http: httpx.Client, asset: str, bid: str, ask: str,
         age_s: float = 0.0) -> None:
    """Push a tick and wait until the shard has applied it: its price is served, with a
    timestamp no older than the push (an earlier tick may have had the same bid/ask)."""
    pushed_at = datetime.now(UTC) - timedelta(seconds=age_s, milliseconds=1)
    platform.push_tick(asset, bid, ask, age_s)
    deadline = time.monotonic() + WAIT_S
    while True:
        prices = http.get("/api/v1/prices").json()
        p = prices.get(asset)
        if p is not None and Decimal(p["bid"]) == Decimal(bid) and \
                Decimal(p["ask"]) == Decimal(ask) and \
                datetime.fromisoformat(p["ts"].replace("Z", "+00:00")) >= pushed_at:
            return
        assert time.monotonic() < deadline, f"tick {asset} {bid}/{ask} never applied"
        time.sleep(0.02)


def clear_of_minute_end(margin_s: float = 5.0) -> None:
    """Sleep into the next minute when less than ``margin_s`` of this one is left: a test that
    expects the 1m candle of its ticks to be current must read it before the clock closes it."""
    into_minute_s = time.time() % 60
    if into_minute_s > 60 - margin_s:
        time.sleep(60.1 - into_minute_s)


def open_position(http: httpx.Client, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    r = http.post("/api/v1/positions/open", json=body, headers=headers)
    assert r.status_code == 201, r.text
    return dict(r.json())


def state(http: httpx.Client, headers: dict[str, str]) -> dict[str, Any]:
    r = http.get("/api/v1/state", headers=headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


def open_ids(http: httpx.Client, headers: dict[str, str]) -> list[str]:
    return [p["positionId"] for p in state(http, headers)["positions"]]


def wait_closed(http: httpx.Client, headers: dict[str, str], position_id: str) -> dict[str, Any]:
    """The history entry of the whole close of ``position_id`` (named by the position's id)
    once it has settled (closes by ticks are async on a real cluster)."""
    return wait_in_history(http, headers, "positions", "closeId", position_id)


def wait_in_history(http: httpx.Client, headers: dict[str, str], kind: str, id_key: str,
                    item_id: str) -> dict[str, Any]:
    """The entry of ``/api/v1/<kind>/history`` whose ``id_key`` is ``item_id``, once it is
    there (an end caused by a tick settles asynchronously on a real cluster)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        r = http.get(f"/api/v1/{kind}/history", headers=headers)
        assert r.status_code == 200, r.text
        for item in r.json()[kind]:
            if item[id_key] == item_id:
                return dict(item)
        assert time.monotonic() < deadline, f"{id_key} {item_id} never reached the history"
        time.sleep(0.02)


def error_code(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["message"], str)
    return str(body["error"]["code"])


def status_and_code(r: httpx.Response) -> str:
    """``"STATUS CODE"`` of an error answer in the SPEC's shape, ``"STATUS not-json: ..."``
    of any other (for counting what a client got under faults without stopping there)."""
    try:
        return f"{r.status_code} {error_code(r)}"
    except (ValueError, AssertionError, KeyError, TypeError):
        return f"{r.status_code} not-json: {r.headers.get('content-type')} {r.text[:80]!r}"


def raw_answer(port: int, parts: Iterator[bytes]) -> bytes:
    """Send ``parts`` on one connection (stopping when the server closes it), then read the
    answer until the server closes the connection or 10 s pass."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            for part in parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while it was still being sent: the answer was written first
        try:
            while data := sock.recv(65536):
                answer += data
        except ConnectionResetError:
            pass
    return answer


def floor_to(value: Decimal, step: Decimal) -> Decimal:
    return (value / step).to_integral_value(rounding=ROUND_FLOOR) * step


def money(value: Decimal) -> Decimal:
    """Round toward minus infinity to a micro-dollar (SPEC)."""
    return floor_to(value, Decimal("0.000001"))
