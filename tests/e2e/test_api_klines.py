"""Candles over real HTTP (SPEC "Live data", ``GET /api/v1/klines``): built from the ticks the
platform accepts, mid prices as exact decimal strings, oldest first, the current candle
included, and closed once its interval has ended, with or without a later tick; public; bad
parameters are 422."""

from __future__ import annotations

import time
from datetime import UTC
from datetime import datetime
from decimal import Decimal as D

import httpx
from tests.e2e.api_client import clear_of_minute_end
from tests.e2e.api_client import tick
from tests.e2e.http_platform import TRADING
from tests.e2e.http_platform import HttpPlatform
from tests.e2e.http_platform import LocalHttpPlatform

INTERVAL_S = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "4h": 14_400, "1d": 86_400}


def klines(http: httpx.Client, status: int = 200, **params: object) -> list[dict[str, object]]:
    r = http.get("/api/v1/klines", params=params)
    assert r.status_code == status, r.text
    return list(r.json()["klines"]) if status == 200 else [r.json()]


def test_the_current_candle_follows_the_mid_price_of_accepted_ticks(
        platform: HttpPlatform, http: httpx.Client) -> None:
    clear_of_minute_end()
    tick(platform, http, "ETH", "3000.00", "3000.01")
    before = klines(http, asset="ETH", interval="1m")[-1]
    tick(platform, http, "ETH", "3010.00", "3010.03")  # mid 3010.015: half a step
    tick(platform, http, "ETH", "2990.00", "2990.02")
    tick(platform, http, "ETH", "3001.00", "3001.00")
    now = klines(http, asset="ETH", interval="1m")[-1]
    start = datetime.fromisoformat(str(now["start"]).replace("Z", "+00:00"))
    assert start.second == 0 and start.microsecond == 0 and start.tzinfo == UTC
    assert now["closed"] is False
    if now["start"] == before["start"]:  # the same minute: three more ticks in that candle
        assert D(str(now["high"])) == max(D(str(before["high"])), D("3010.015"))
        assert D(str(now["low"])) == min(D(str(before["low"])), D("2990.01"))
        assert now["close"] == "3001.00" and now["open"] == before["open"]
        assert now["ticks"] == int(str(before["ticks"])) + 3
    else:  # a new minute began between them: the new candle opened on one of them
        assert D(str(now["close"])) == D("3001.00")
    for interval in ("5m", "15m", "1h", "4h", "1d"):
        [current] = klines(http, asset="ETH", interval=interval, limit=1)
        assert current["close"] == "3001.00" and current["closed"] is False
        assert D(str(current["high"])) >= D("3010.015")
    # a range that ends before the first candle holds none
    assert klines(http, asset="ETH", interval="1d", endTime=0) == []


def test_a_candle_whose_interval_has_ended_is_closed_without_a_later_tick() -> None:
    """A quiet market: the last tick five minutes ago. Its 1m candle ended long since, and
    says so; each longer one is closed exactly when its interval has ended too. (Local only:
    a tick that old is dropped by the feed as stale.)"""
    with LocalHttpPlatform(TRADING) as platform, httpx.Client(
            base_url=platform.base_url, timeout=10) as http:
        platform.push_tick("ETH", "3000.00", "3000.02", age_s=300)
        for interval, length_s in INTERVAL_S.items():
            before_s = time.time()
            [candle] = klines(http, asset="ETH", interval=interval)
            after_s = time.time()
            start_s = datetime.fromisoformat(str(candle["start"]).replace("Z", "+00:00")
                                             ).timestamp()
            if before_s < start_s + length_s <= after_s:
                continue  # its interval ended while the request ran: either answer is right
            assert candle["closed"] is (start_s + length_s <= before_s), (interval, candle)
            if interval == "1m":
                assert candle["closed"] is True and candle["close"] == "3000.01"


def test_bad_parameters_are_422_and_no_key_is_needed(http: httpx.Client) -> None:
    for asset in ("DOGE", "sol", "SOL\u0000"):  # as an open or an order with it is answered
        [body] = klines(http, 422, asset=asset, interval="1m")
        assert body["error"]["code"] == "UNKNOWN_ASSET", (asset, body)  # type: ignore[index]
    for params in ({"asset": "SOL", "interval": "2m"},
                   {"asset": "SOL", "interval": "1m", "limit": 0},
                   {"asset": "SOL", "interval": "1m", "limit": 1001},
                   {"asset": "SOL", "interval": "1m", "startTime": 10, "endTime": 5},
                   {"asset": "SOL", "interval": "1m", "startTime": -1},
                   {"asset": "SOL"}):
        [body] = klines(http, 422, **params)
        assert body["error"]["code"] == "INVALID_REQUEST", params  # type: ignore[index]
        # the message names the query's own parameters
        assert "start_s" not in body["error"]["message"], body  # type: ignore[index]
    [body] = klines(http, 422, asset="SOL", interval="1m", startTime=10, endTime=5)
    assert body["error"]["message"] == "startTime must not be after endTime"  # type: ignore[index]
    r = http.get("/api/v1/klines", params={"asset": "SOL", "interval": "1h"})
    assert r.status_code == 200, r.text


def test_the_terminal_and_its_files_are_served_and_nothing_outside_them(
        http: httpx.Client) -> None:
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "static/app.js" in page.text and page.headers["cache-control"] == "no-cache"
    script = http.get("/static/app.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    for bad in ("/static/../api.py", "/static/%2e%2e/terminal.py", "/static/", "/static/js",
                "/static/.hidden", "/static/nope.js", "/static//etc/passwd",
                "/static/%00", "/static/a%00.js", "/static/" + "a" * 256,
                "/static/js/" + "b/" * 3000):
        r = http.get(bad)
        assert r.status_code == 404, (bad, r.status_code)
