"""The WebSocket ``/ws`` over a real socket (SPEC "Live data", "Limits"): the public streams
``bookTicker.<ASSET>`` and ``kline.<interval>.<ASSET>`` follow the ticks the platform accepts;
bad frames get error frames and change nothing; connections, subscriptions and unsent frames
are bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from collections.abc import Iterator
from decimal import Decimal as D
from typing import Any

import httpx
import pytest
import websockets
from cluster.config import Settings
from cluster.live.streams import POLL_TIMEOUT_S
from cluster.live.streams import WS_SERVER_OPTIONS
from tests.e2e.api_client import clear_of_minute_end
from tests.e2e.api_client import open_position
from tests.e2e.api_client import raw_answer
from tests.e2e.api_client import signup
from tests.e2e.api_client import sol_trader
from tests.e2e.api_client import state
from tests.e2e.api_client import tick
from tests.e2e.http_platform import TRADING
from tests.e2e.http_platform import HttpPlatform
from tests.e2e.http_platform import LocalHttpPlatform

WAIT_S = 10.0


WS_UPGRADE = b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"  # a raw handshake's
WS_KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"  # headers (RFC 6455 1.3)


def ws_url(platform: HttpPlatform) -> str:
    return platform.base_url.replace("http://", "ws://") + "/ws"


async def frame(ws: Any, stream: str | None = None) -> dict[str, Any]:
    """The next frame (of ``stream``, skipping others)."""
    while True:
        data = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
        if stream is None or data.get("stream") == stream:
            return dict(data)


async def send(ws: Any, method: str, *params: Any) -> None:
    await ws.send(json.dumps({"method": method, "params": list(params)}))


def test_book_ticker_and_kline_follow_the_accepted_ticks(platform: HttpPlatform,
                                                         http: httpx.Client) -> None:
    clear_of_minute_end()  # the 1m candle below must still be current when it is read
    tick(platform, http, "SOL", "100.00", "100.01")
    tick(platform, http, "BTC", "60000.0", "60000.2")

    async def scenario() -> None:
        async with websockets.connect(ws_url(platform)) as ws:
            await send(ws, "SUBSCRIBE", "bookTicker.BTC", "kline.1m.BTC")
            # the current values at once
            first = await frame(ws, "bookTicker.BTC")
            assert set(first["data"]) == {"bid", "ask", "ts", "source"}
            await frame(ws, "kline.1m.BTC")
            await asyncio.to_thread(tick, platform, http, "BTC", "60010.0", "60010.3")
            while True:  # the new top of book (an older one may still be on its way)
                top = await frame(ws, "bookTicker.BTC")
                if top["data"]["bid"] == "60010.0":
                    break
            assert top["data"]["ask"] == "60010.3" and top["data"]["source"] == "test"
            while True:
                candle = (await frame(ws, "kline.1m.BTC"))["data"]
                if candle["close"] == "60010.15":  # the mid, exact
                    break
            assert candle["closed"] is False and D(candle["high"]) >= D("60010.15")
            assert set(candle) == {"start", "open", "high", "low", "close", "ticks", "closed"}
            await send(ws, "UNSUBSCRIBE", "bookTicker.BTC", "kline.1m.BTC")
            await send(ws, "SUBSCRIBE", "bookTicker.SOL")
            # SOL's current value comes after every frame queued before the two requests, and
            # once the server has handled them (a connection's frames are handled in order)
            await frame(ws, "bookTicker.SOL")
            await asyncio.to_thread(tick, platform, http, "BTC", "60020.0", "60020.1")
            await asyncio.to_thread(tick, platform, http, "SOL", "100.02", "100.03")
            while True:  # nothing of BTC arrives any more
                got = await frame(ws)
                assert got.get("stream") != "bookTicker.BTC", got
                if got.get("stream") == "bookTicker.SOL" and got["data"]["bid"] == "100.02":
                    break

    asyncio.run(scenario())


def test_bad_frames_get_error_frames_and_the_connection_stays(platform: HttpPlatform,
                                                              http: httpx.Client) -> None:
    key = signup(http)["Authorization"].removeprefix("Bearer ")

    async def scenario() -> None:
        async with websockets.connect(ws_url(platform)) as ws:
            for bad in ("not json", "[]", '{"method":"JUMP","params":[]}',
                        '{"method":"SUBSCRIBE","params":"bookTicker.SOL"}',
                        '{"method":"SUBSCRIBE","params":[1]}', "x" * 5000,
                        # no stream named: not a silent no-op
                        '{"method":"SUBSCRIBE"}', '{"method":"UNSUBSCRIBE","params":[]}',
                        "[" * 2000 + "]" * 2000,  # deeper than the parser recurses
                        # a lone surrogate, which the error message names
                        '{"method":"SUBSCRIBE","params":["\\ud800"]}',
                        # read as one SUBSCRIBE (the last value) by Python's json alone
                        '{"method":"JUMP","method":"SUBSCRIBE","params":["bookTicker.SOL"]}'):
                await ws.send(bad)
                error = await frame(ws)
                assert error["error"]["code"] == "INVALID_REQUEST", (bad, error)
            assert error["error"]["message"] == "not JSON: key 'method' given twice", error
            # NaN and Infinity are no JSON, as in a request's body (a PING carrying one was
            # answered PONG)
            for bad in ('{"method":"PING","x":NaN}', '{"method":"PING","x":[-Infinity]}'):
                await ws.send(bad)
                error = await frame(ws)
                assert error["error"]["code"] == "INVALID_REQUEST", (bad, error)
                assert "is not a JSON number" in error["error"]["message"], error
            await ws.send(b'{"method":"SUBSCRIBE","params":["bookTicker.SOL"]}')  # binary
            error = await frame(ws)
            assert error["error"] == {"code": "INVALID_REQUEST",
                                      "message": "binary frames are not read: send JSON text"}
            await send(ws, "SUBSCRIBE", "bookTicker.DOGE", "bookTicker.SOL")
            error = await frame(ws)
            assert "bookTicker.DOGE" in error["error"]["message"]
            await send(ws, "AUTH", "wrong-key")
            assert (await frame(ws))["error"]["code"] == "UNAUTHORIZED"
            # one key too long to be one is named so (it read "AUTH takes one API key")
            await send(ws, "AUTH", "k" * 3000)
            assert (await frame(ws))["error"] == {
                "code": "UNAUTHORIZED", "message": "not an API key: empty or over 256 characters"}
            await ws.send('{"method":"PING"}')  # a heartbeat a page can see the answer to
            assert await frame(ws) == {"method": "PONG"}
            await send(ws, "AUTH", key)  # a good key: no answer, no error
            await send(ws, "SUBSCRIBE", "bookTicker.SOL")  # the connection still serves
            assert "bid" in (await frame(ws, "bookTicker.SOL"))["data"]

    tick(platform, http, "SOL", "100.00", "100.01")
    asyncio.run(scenario())


def test_a_refused_frame_changes_nothing(platform: HttpPlatform, http: httpx.Client) -> None:
    """SUBSCRIBE of several streams is all or nothing: a frame refused for one of them (not
    authenticated, an unknown stream, a bad ``since``) subscribes none. UNSUBSCRIBE of an
    unknown stream is answered with an error frame. The frame limit counts bytes. Frames are
    answered in order, so a frame after the refused one shows what it left: had a stream been
    subscribed, its current value would come first."""
    key = signup(http)["Authorization"].removeprefix("Bearer ")

    async def next_is_only_the_answer_to_a_ping(ws: Any) -> None:
        await ws.send('{"method":"PING"}')
        answer = await frame(ws)
        assert answer == {"method": "PONG"}, answer

    async def scenario() -> None:
        async with websockets.connect(ws_url(platform)) as warm:  # the hub holds the value
            await send(warm, "SUBSCRIBE", "bookTicker.SOL")
            await frame(warm, "bookTicker.SOL")
            async with websockets.connect(ws_url(platform)) as ws:
                await send(ws, "SUBSCRIBE", "bookTicker.SOL", "account")
                assert (await frame(ws))["error"]["code"] == "UNAUTHORIZED"
                await next_is_only_the_answer_to_a_ping(ws)
                await send(ws, "AUTH", key)
                for params, since in ((["account", "bookTicker.DOGE"], None),
                                      (["account", "bookTicker.SOL"], -5),
                                      (["bookTicker.SOL", "account"], "x")):
                    await ws.send(json.dumps({"method": "SUBSCRIBE", "params": params,
                                              "since": since}))
                    error = await frame(ws)
                    assert error["error"]["code"] == "INVALID_REQUEST", (params, error)
                    await next_is_only_the_answer_to_a_ping(ws)
                for params in (["bookTicker.DOGE"], ["nonsense", "bookTicker.SOL"]):
                    await send(ws, "UNSUBSCRIBE", *params)
                    error = await frame(ws)
                    assert error["error"] == {"code": "INVALID_REQUEST", "message":
                                              f"unknown stream(s): {params[0]}"}, error
                # 2,100 two-byte characters: under 4,096 characters, over 4,096 bytes
                padded = {"method": "SUBSCRIBE", "params": ["bookTicker.SOL"], "pad": "é" * 2100}
                await ws.send(json.dumps(padded, ensure_ascii=False))
                assert (await frame(ws))["error"] == {
                    "code": "INVALID_REQUEST", "message": "frame over 4096 bytes"}
                await next_is_only_the_answer_to_a_ping(ws)
                padded["pad"] = "é" * 1900  # 3,800 bytes and more: within the limit, served
                await ws.send(json.dumps(padded, ensure_ascii=False))
                assert "bid" in (await frame(ws))["data"]
                await send(ws, "UNSUBSCRIBE", "bookTicker.SOL", "account")  # both known: quiet
                await next_is_only_the_answer_to_a_ping(ws)

    tick(platform, http, "SOL", "100.00", "100.01")
    asyncio.run(scenario())


def test_websocket_auth_shares_the_address_budget_for_unknown_keys() -> None:
    """Each unknown key costs the ledger a lookup. REST answers an address that sent too many
    429; AUTH on the WebSocket now takes from the same budget (a connection closed after six
    refusals was opened again, ten at a time, at hundreds of lookups a second). A key the
    replica knows still passes."""
    settings = Settings(api_key_rate_per_s=1, signups_per_min=0)  # 50 unknown keys, then 1/10 s
    with LocalHttpPlatform(settings) as limited, \
            httpx.Client(base_url=limited.base_url, timeout=10) as http:
        known = signup(http)
        assert http.get("/api/v1/state", headers=known).status_code == 200
        key = known["Authorization"].removeprefix("Bearer ")

        async def scenario() -> list[str]:
            codes: list[str] = []
            for _ in range(11):  # five refusals each, under the close after six
                async with websockets.connect(ws_url(limited)) as ws:
                    for attempt in range(5):
                        await send(ws, "AUTH", f"guess-{len(codes)}-{attempt}")
                        codes.append((await frame(ws))["error"]["code"])
            async with websockets.connect(ws_url(limited)) as ws:
                await send(ws, "AUTH", key)  # known here: no lookup, no refusal
                await send(ws, "SUBSCRIBE", "account")
                assert (await frame(ws, "account"))["data"]["event"] == "snapshot"
            return codes

        codes = asyncio.run(scenario())
        assert codes[:50] == ["UNAUTHORIZED"] * 50, codes
        assert codes[50:] == ["RATE_LIMITED"] * 5, codes
        refused = http.get("/api/v1/state", headers={"Authorization": "Bearer guess-rest"})
        assert refused.status_code == 429, refused.text  # REST sees the same budget spent
        assert "unknown API keys from this address" in refused.json()["error"]["message"]


def test_a_plain_http_request_to_the_stream_is_426_and_documented(http: httpx.Client) -> None:
    r = http.get("/ws")
    assert r.status_code == 426 and r.headers["upgrade"] == "websocket", r.text
    assert r.json()["error"]["code"] == "INVALID_REQUEST"
    assert "/ws" in http.get("/openapi.json").json()["paths"]


def test_refused_handshakes_answer_in_the_error_shape(platform: HttpPlatform) -> None:
    """A WebSocket handshake the server cannot take (no key, an unknown version, a path with
    no stream, a method other than GET) or a request target that is not a path is answered
    in SPEC's error shape, not in the plain text (or the empty 403) of the servers
    underneath; a 405 with METHOD_NOT_ALLOWED, as any route's (it said INVALID_REQUEST)."""
    port = int(platform.base_url.rsplit(":", 1)[1])
    upgrade, key = WS_UPGRADE, WS_KEY
    for request, status, code in (
            (b"GET /ws HTTP/1.1\r\n" + upgrade + b"Sec-WebSocket-Version: 13\r\n\r\n", 400,
             "INVALID_REQUEST"),
            (b"GET /ws HTTP/1.1\r\n" + upgrade + key + b"Sec-WebSocket-Version: 99\r\n\r\n",
             400, "INVALID_REQUEST"),
            (b"GET /api/v1/state HTTP/1.1\r\n" + upgrade + key
             + b"Sec-WebSocket-Version: 13\r\n\r\n", 404, "NOT_FOUND"),
            (b"POST /ws HTTP/1.1\r\n" + upgrade + key
             + b"Sec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n", 405,
             "METHOD_NOT_ALLOWED"),
            (b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400,
             "INVALID_REQUEST")):
        head, _, body = raw_answer(port, iter([request])).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), (request, head)
        assert b"\r\ncontent-type: application/json" in head.lower(), head
        assert json.loads(body)["error"]["code"] == code, body


HANDSHAKE = b"GET /ws HTTP/1.1\r\n" + WS_UPGRADE + WS_KEY + b"Sec-WebSocket-Version: 13\r\n"
UNREADABLE_HANDSHAKES = {  # heads the HTTP parser takes and the WebSocket library does not
    "a body": (HANDSHAKE + b"Content-Length: 2\r\n\r\n{}", 400),
    "a chunked body": (HANDSHAKE + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                       400),
    "130 headers": (HANDSHAKE + b"X-A: 1\r\n" * 130 + b"\r\n", 431),
    "a 9 KiB header": (HANDSHAKE + b"X-A: " + b"a" * 9000 + b"\r\n\r\n", 431),
    "a 9 KiB target": (HANDSHAKE.replace(b"/ws", b"/ws?" + b"a" * 9000) + b"\r\n", 414),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE_HANDSHAKES))
def test_a_handshake_the_websocket_library_cannot_read_is_refused_and_closed(
        platform: HttpPlatform, case: str) -> None:
    """Such a head was handed to the WebSocket protocol, which refused it without a word and
    without closing: the connection stayed open, past the read deadline, for ever."""
    request, status = UNREADABLE_HANDSHAKES[case]
    port = int(platform.base_url.rsplit(":", 1)[1])
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    assert json.loads(body)["error"]["code"] == "INVALID_REQUEST", body


def test_a_handshake_unanswered_when_the_server_stops_is_503_with_retry_after() -> None:
    """The server stops (a replica shut down) while the app has not answered a handshake:
    uvicorn answered 500, as if something had failed. It is 503 SERVICE_UNAVAILABLE with
    ``Retry-After``, which a client takes as "connect again"; the app sees the disconnect."""
    import threading

    import uvicorn
    from cluster.http.server import SERVER_OPTIONS
    from feed.broker import free_port

    waiting, seen = threading.Event(), []

    async def never_answers(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        assert (await receive())["type"] == "websocket.connect"
        waiting.set()
        seen.append((await receive())["type"])  # the server stopping

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(never_answers, host="127.0.0.1", port=port,
                                           lifespan="off", log_level="warning",
                                           **SERVER_OPTIONS))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
            sock.sendall(HANDSHAKE + b"\r\n")
            assert waiting.wait(WAIT_S)
            server.should_exit = True
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while data := sock.recv(65536):
                    answer += data
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
    assert not thread.is_alive()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), head
    assert b"\r\nretry-after: 1" in head.lower(), head
    assert json.loads(body)["error"]["code"] == "SERVICE_UNAVAILABLE", body
    assert seen == ["websocket.disconnect"]


def test_a_connection_guessing_keys_is_closed_after_five_refusals(
        platform: HttpPlatform) -> None:
    async def scenario() -> None:
        async with websockets.connect(ws_url(platform)) as ws:
            for attempt in range(5):
                await send(ws, "AUTH", f"guess-{attempt}")
                assert (await frame(ws))["error"]["code"] == "UNAUTHORIZED"
            await send(ws, "AUTH", "guess-5")
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), WAIT_S)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            assert closed.value.rcvd.reason == "more than 5 refused AUTH frames"

    asyncio.run(scenario())


def test_a_frame_over_16_kib_closes_only_its_connection(platform: HttpPlatform,
                                                        http: httpx.Client) -> None:
    tick(platform, http, "SOL", "100.00", "100.01")

    async def scenario() -> None:
        async with websockets.connect(ws_url(platform)) as ws, \
                websockets.connect(ws_url(platform)) as other:
            await ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["x" * 20_000]}))
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), WAIT_S)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
            await send(other, "SUBSCRIBE", "bookTicker.SOL")
            assert "bid" in (await frame(other, "bookTicker.SOL"))["data"]

    asyncio.run(scenario())


def test_a_connection_flooding_frames_is_closed_and_others_are_served(
        platform: HttpPlatform, http: httpx.Client) -> None:
    """Each SUBSCRIBE answers with every named stream's current value: a client may send 20
    frames at once and 10 a second, and one that sends more is closed with 1008."""
    tick(platform, http, "SOL", "100.00", "100.01")

    async def scenario() -> None:
        async with websockets.connect(ws_url(platform)) as flood, \
                websockets.connect(ws_url(platform)) as other:
            for _ in range(40):
                await send(flood, "SUBSCRIBE", "bookTicker.SOL")
                await send(flood, "UNSUBSCRIBE", "bookTicker.SOL")
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(flood.recv(), WAIT_S)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            assert closed.value.rcvd.reason == "more than 20 frames at once or 10 a second"
            await send(other, "SUBSCRIBE", "bookTicker.SOL")
            assert "bid" in (await frame(other, "bookTicker.SOL"))["data"]

    asyncio.run(scenario())


def test_a_client_pinging_without_reading_the_pongs_is_dropped(platform: HttpPlatform) -> None:
    """Pongs are written at once, whatever the client reads: one sending 64 MB of pings and
    reading nothing is dropped once 1 MiB waits unread, not held in the replica's memory."""
    ping = b"\x89\xfd\x00\x00\x00\x00" + b"p" * 125  # FIN + PING, masked (key 0), 125 bytes
    with socket.create_connection(("127.0.0.1", int(platform.base_url.rsplit(":", 1)[1])),
                                  timeout=WAIT_S) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /ws HTTP/1.1\r\n" + WS_UPGRADE + WS_KEY
                     + b"Sec-WebSocket-Version: 13\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
        burst, sent = ping * 8000, 0  # 1 MB a write
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            while sent < 64_000_000:
                sock.sendall(burst)
                sent += len(burst)
    assert sent < 64_000_000, sent


def test_a_handshake_of_http_1_0_is_refused_400_in_the_error_shape(
        platform: HttpPlatform) -> None:
    """RFC 6455 4.1: the opening handshake is an HTTP/1.1 request. One of HTTP/1.0 was
    upgraded (101) before; it is refused as malformed, and the connection closed."""
    port = int(platform.base_url.rsplit(":", 1)[1])
    answer = raw_answer(port, iter([b"GET /ws HTTP/1.0\r\n" + WS_UPGRADE + WS_KEY
                                    + b"Sec-WebSocket-Version: 13\r\n\r\n"]))
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:200]
    assert b"\r\nconnection: close\r\n" in answer, answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"error": {
        "code": "INVALID_REQUEST",
        "message": "malformed HTTP request: a WebSocket handshake is an HTTP/1.1 request"}}


def test_a_text_message_that_is_not_utf8_is_closed_1007_without_an_error_logged(
        platform: HttpPlatform, caplog: pytest.LogCaptureFixture) -> None:
    """RFC 6455 8.1: the connection fails with 1007, saying why. It is the client's fault, not
    the server's: uvicorn logged an error with its traceback for each, 400 KB of log a second
    from one client opening connections one after another."""
    port = int(platform.base_url.rsplit(":", 1)[1])
    for message in (b"\x81\x82\x00\x00\x00\x00{\xff",  # one frame, masked (key 0)
                    # a character split over two fragments and left unfinished
                    b"\x01\x82\x00\x00\x00\x00{\xe2" + b"\x80\x81\x00\x00\x00\x00\x82"):
        answer = b""
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
            sock.sendall(b"GET /ws HTTP/1.1\r\n" + WS_UPGRADE + WS_KEY
                         + b"Sec-WebSocket-Version: 13\r\n\r\n")
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(4096)
            head, _, answer = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 "), head
            sock.sendall(message)
            while data := sock.recv(4096):  # the close frame, then the end
                answer += data
        assert answer[0] == 0x88 and answer[1] == len(answer) - 2, answer  # a close frame
        assert int.from_bytes(answer[2:4], "big") == 1007, answer
        assert answer[4:].startswith(b"invalid UTF-8"), answer
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture(scope="module")
def tight() -> Iterator[LocalHttpPlatform]:
    """A platform whose WebSocket limits are small: 2 connections per address or key, 3
    subscriptions per connection, 1 unsent frame."""
    with LocalHttpPlatform(Settings(ws_connections=2, ws_subscriptions=3, ws_unsent=1,
                                    api_key_rate_per_s=0, signups_per_min=0)) as p:
        yield p


def test_connections_subscriptions_and_unsent_frames_are_bounded(
        tight: LocalHttpPlatform) -> None:
    with httpx.Client(base_url=tight.base_url, timeout=10) as http:
        for asset, bid, ask in (("SOL", "100.00", "100.01"), ("BTC", "60000.0", "60000.1"),
                                ("ETH", "3000.00", "3000.01")):
            tick(tight, http, asset, bid, ask)

    async def scenario() -> None:
        url = ws_url(tight)
        async with websockets.connect(url) as one, websockets.connect(url) as two:
            with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
                async with websockets.connect(url):
                    pass  # the third from this address is refused
            answer = refused.value.response
            assert answer.status_code == 429, answer
            assert answer.headers["Content-Type"] == "application/json"
            assert json.loads(answer.body) == {"error": {"code": "RATE_LIMITED", "message": (
                "at most 2 WebSocket connections per client address")}}
            assert answer.headers["Retry-After"] == "1"  # SPEC: a 429 says when to retry
            await send(one, "SUBSCRIBE", "kline.1m.SOL", "kline.5m.SOL", "kline.15m.SOL",
                       "kline.1h.SOL")
            error = await frame(one)
            assert "at most 3" in error["error"]["message"]
            await send(two, "PING-ME")
            assert (await frame(two))["error"]["code"] == "INVALID_REQUEST"
        # a client that falls more than one frame behind is closed with 1008: three current
        # values at once, before the first is sent
        async with websockets.connect(url) as slow:
            await send(slow, "SUBSCRIBE", "bookTicker.SOL", "bookTicker.BTC", "bookTicker.ETH")
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(slow.recv(), WAIT_S)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            assert closed.value.rcvd.reason == ("unsent frames over the limit of 1: the client "
                                                "reads too slowly")
        # the closed connections were forgotten: two new ones are served
        async with websockets.connect(url) as again, websockets.connect(url):
            await send(again, "SUBSCRIBE", "bookTicker.SOL")
            assert "bid" in (await frame(again, "bookTicker.SOL"))["data"]

    asyncio.run(scenario())


def test_the_last_subscription_is_taken_and_the_next_refused_subscribing_nothing(
        tight: LocalHttpPlatform) -> None:
    """WS_SUBSCRIPTIONS=3: a third stream is taken, a stream followed already is not a
    fourth, and a fourth gets an error frame and none of its values; once one goes, it fits.
    With one unsent frame allowed, no two frames may be due at once: no candle closes while it
    runs, and every tick is read by the streams before the next stream is subscribed."""
    clear_of_minute_end()  # a 1m candle closed by the clock is a frame no request asked for
    with httpx.Client(base_url=tight.base_url, timeout=10) as http:
        tick(tight, http, "SOL", "100.02", "100.03")  # prices no other test of `tight` sends
        tick(tight, http, "BTC", "60000.2", "60000.3")

    async def scenario() -> None:
        async with websockets.connect(ws_url(tight)) as ws:
            # the streams read ticks a round at a time: a round holding both ticks, read after
            # the three subscriptions below, would be three frames at once; the BTC tick came
            # last, so once its value is here the streams have read both
            await send(ws, "SUBSCRIBE", "bookTicker.BTC")
            while (await frame(ws, "bookTicker.BTC"))["data"]["bid"] != "60000.2":
                pass  # a value held from an earlier test (one unsent value replaces the next)
            for stream in ("bookTicker.SOL", "kline.1m.SOL"):
                await send(ws, "SUBSCRIBE", stream)  # one at a time: one unsent frame at most
                assert (await frame(ws))["stream"] == stream
            await send(ws, "SUBSCRIBE", "bookTicker.SOL", "kline.1m.SOL")  # followed already
            await send(ws, "SUBSCRIBE", "kline.1m.BTC")
            refused = await frame(ws)
            assert refused == {"error": {"code": "INVALID_REQUEST",
                                         "message": "at most 3 subscriptions per connection"}}
            await send(ws, "UNSUBSCRIBE", "kline.1m.SOL")
            await ws.send('{"method":"PING"}')
            assert await frame(ws) == {"method": "PONG"}  # no value of kline.1m.BTC came
            await send(ws, "SUBSCRIBE", "kline.1m.BTC")
            assert (await frame(ws))["stream"] == "kline.1m.BTC"

    asyncio.run(scenario())


IDLE_TEST_S = 12  # the next test takes a few seconds: this leaves room to spare


def test_a_subscriber_after_an_idle_time_gets_the_values_of_its_own_time(
        platform: HttpPlatform, http: httpx.Client) -> None:
    """Nobody connected for a while: the next subscriber's first frames are the current top
    of book and the current candle, not what the streams held when the last client left."""
    # every tick below in one 1m candle: one that closes while the subscriber listens is sent
    # closed, rightly, which the last assertion would take for a stale candle
    into_minute_s = time.time() % 60
    if into_minute_s > 60 - IDLE_TEST_S:
        time.sleep(60.5 - into_minute_s)
    tick(platform, http, "ETH", "3000.00", "3000.02")

    async def listen_then_leave() -> None:
        async with websockets.connect(ws_url(platform)) as ws:
            await send(ws, "SUBSCRIBE", "bookTicker.ETH", "kline.1m.ETH")
            while (await frame(ws, "bookTicker.ETH"))["data"]["bid"] != "3000.00":
                pass  # an older top of book may come first
            while (await frame(ws, "kline.1m.ETH"))["data"]["close"] != "3000.01":
                pass

    asyncio.run(listen_then_leave())
    time.sleep(3 * POLL_TIMEOUT_S)  # the hub's last poll ends: nobody listens
    tick(platform, http, "ETH", "3100.00", "3100.02")

    async def come_back() -> list[dict[str, Any]]:
        async with websockets.connect(ws_url(platform)) as ws:
            await send(ws, "SUBSCRIBE", "bookTicker.ETH", "kline.1m.ETH")
            first = [await frame(ws), await frame(ws)]
            await asyncio.to_thread(tick, platform, http, "ETH", "3101.00", "3101.02")
            while (got := await frame(ws))["stream"] != "bookTicker.ETH" or \
                    got["data"]["bid"] != "3101.00":
                first.append(got)  # every frame before the next tick's
            return first

    frames = asyncio.run(come_back())
    by_stream = {f["stream"]: f["data"] for f in frames[:2]}
    assert by_stream["bookTicker.ETH"]["bid"] == "3100.00", frames
    assert by_stream["kline.1m.ETH"]["close"] == "3100.01", frames
    # the candle the first tick was in is not sent closed: it did not close, or it closed while
    # nobody listened (then it is history: /klines)
    assert not [f for f in frames if f["data"].get("closed")], frames


# ------------------------------------------------------------------ the account stream
def api_key(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


async def account_frames(ws: Any, count: int) -> list[dict[str, Any]]:
    """The next ``count`` account frames' data (other streams skipped; an error fails)."""
    out = []
    while len(out) < count:
        got = await frame(ws)
        assert "error" not in got, got
        if got.get("stream") == "account":
            out.append(got["data"])
    return out


@contextlib.asynccontextmanager
async def account_stream(platform: HttpPlatform, headers: dict[str, str],
                         since: int | None = None) -> AsyncIterator[Any]:
    """A connection to ``/ws`` subscribed (after ``since``, if given) to the account whose
    Authorization header is ``headers``."""
    async with websockets.connect(ws_url(platform)) as ws:
        await send(ws, "AUTH", api_key(headers))
        request: dict[str, Any] = {"method": "SUBSCRIBE", "params": ["account"]}
        if since is not None:
            request["since"] = since
        await ws.send(json.dumps(request))
        yield ws


def test_the_account_stream_carries_each_event_once_in_order(platform: HttpPlatform,
                                                             http: httpx.Client) -> None:
    h = sol_trader(platform, http)

    async def scenario() -> None:
        async with account_stream(platform, h) as ws:
            (snap,) = await account_frames(ws, 1)  # the state first, with its seq
            assert snap["event"] == "snapshot" and snap["seq"] == 1  # the signup's balance
            assert D(snap["balances"]["free"]) == 10000 and snap["positions"] == []
            assert snap["orders"] == []
            p = await asyncio.to_thread(open_position, http, h, asset="SOL", type="long",
                                        margin="50", leverage=20)
            locked, opened = await account_frames(ws, 2)
            assert (locked["event"], locked["seq"]) == ("balance", 2)
            assert D(locked["free"]) == 9950 and D(locked["margin"]) == 50
            assert (opened["event"], opened["seq"]) == ("positionOpened", 3)
            assert {k: opened[k] for k in p} == p  # the REST API's fields of the position
            r = await asyncio.to_thread(http.post, "/api/v1/positions/modify",
                                        json={"positionId": p["positionId"],
                                              "takeProfit": "120"}, headers=h)
            assert r.status_code == 200, r.text
            (updated,) = await account_frames(ws, 1)
            assert (updated["event"], updated["seq"]) == ("positionUpdated", 4)
            assert D(updated["takeProfit"]) == 120
            order = await asyncio.to_thread(
                lambda: http.post("/api/v1/orders", headers=h, json={
                    "asset": "SOL", "type": "long", "orderType": "limit",
                    "triggerPrice": "90", "margin": "10", "leverage": 5}).json())
            locked, placed = await account_frames(ws, 2)
            assert (locked["event"], placed["event"]) == ("balance", "orderPlaced")
            assert placed["orderId"] == order["orderId"] and placed["status"] == "open"
            r = await asyncio.to_thread(http.delete, f"/api/v1/orders/{order['orderId']}",
                                        headers=h)
            assert r.status_code == 200, r.text
            cancelled, released = await account_frames(ws, 2)
            assert cancelled["event"] == "orderCancelled" and released["event"] == "balance"
            assert D(released["margin"]) == 50
            liq = D(p["liquidationPrice"])
            await asyncio.to_thread(tick, platform, http, "SOL", str(liq), str(liq + D("0.01")))
            closed, after = await account_frames(ws, 2)
            assert closed["event"] == "positionClosed"
            assert closed["closeReason"] == "liquidation"
            assert closed["positionId"] == p["positionId"] and closed["partial"] is False
            assert (after["event"], D(after["margin"])) == ("balance", 0)
            seqs = [locked["seq"], placed["seq"], cancelled["seq"], released["seq"],
                    closed["seq"], after["seq"]]
            assert seqs == list(range(5, 11))

    asyncio.run(scenario())


def test_the_account_stream_resumes_after_a_seq_without_a_gap_or_a_duplicate(
        platform: HttpPlatform, http: httpx.Client) -> None:
    h = sol_trader(platform, http)

    async def scenario() -> None:
        async with account_stream(platform, h) as ws:
            (snap,) = await account_frames(ws, 1)
        # while nobody listens: two opens and a close (six events)
        first = await asyncio.to_thread(open_position, http, h, asset="SOL", type="long",
                                        margin="20", leverage=5)
        await asyncio.to_thread(open_position, http, h, asset="SOL", type="short",
                                margin="30", leverage=5)
        r = await asyncio.to_thread(http.post, "/api/v1/positions/close",
                                    json={"positionId": first["positionId"]}, headers=h)
        assert r.status_code == 200, r.text
        async with account_stream(platform, h, since=snap["seq"]) as ws:
            missed = await account_frames(ws, 6)
            assert [m["seq"] for m in missed] == list(range(snap["seq"] + 1, snap["seq"] + 7))
            assert [m["event"] for m in missed] == [
                "balance", "positionOpened", "balance", "positionOpened", "positionClosed",
                "balance"]
            assert missed[4]["positionId"] == first["positionId"]
            # then live, numbered on
            await asyncio.to_thread(open_position, http, h, asset="SOL", type="long",
                                    margin="5", leverage=2)
            live = await account_frames(ws, 2)
            assert [m["seq"] for m in live] == [snap["seq"] + 7, snap["seq"] + 8]
            # a seq this account never reached: the state instead
            await ws.send(json.dumps({"method": "UNSUBSCRIBE", "params": ["account"]}))
            await ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["account"],
                                      "since": 10**6}))
            (again,) = await account_frames(ws, 1)
            assert again["event"] == "snapshot" and again["seq"] == snap["seq"] + 8
            assert len(again["positions"]) == 2

    asyncio.run(scenario())


def test_the_account_stream_needs_auth_and_shows_only_its_own_account(
        platform: HttpPlatform, http: httpx.Client) -> None:
    mine, other = signup(http), signup(http)
    tick(platform, http, "SOL", "100.00", "100.01")

    async def scenario() -> None:
        async with websockets.connect(ws_url(platform)) as ws:
            await send(ws, "SUBSCRIBE", "account")
            assert (await frame(ws))["error"]["code"] == "UNAUTHORIZED"
            await send(ws, "AUTH", api_key(mine))
            for since in ("1", -1, True, 1.5, 2**63):
                await ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["account"],
                                          "since": since}))
                assert (await frame(ws))["error"]["code"] == "INVALID_REQUEST", since
            await ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["account"],
                                      "since": 1}))
            await asyncio.to_thread(open_position, http, other, asset="SOL", type="long",
                                    margin="10", leverage=2)
            await asyncio.to_thread(open_position, http, mine, asset="SOL", type="short",
                                    margin="7", leverage=2)
            got = await account_frames(ws, 2)  # the other account's open is not among them
            assert [g["seq"] for g in got] == [2, 3]
            assert D(got[0]["margin"]) == 7 and got[1]["type"] == "short"
            # one connection, one account: another key is refused with an error frame, and
            # this account's stream goes on, still with nothing of the other account
            await send(ws, "AUTH", api_key(other))
            refused = await frame(ws)
            assert refused["error"]["code"] == "INVALID_REQUEST", refused
            assert "authenticated already" in refused["error"]["message"]
            # and so is a key that opens no account: it read UNAUTHORIZED, as if it had logged
            # this connection out, which it had not
            await send(ws, "AUTH", "not-a-key")
            refused = await frame(ws)
            assert refused["error"]["code"] == "INVALID_REQUEST", refused
            assert "authenticated already" in refused["error"]["message"]
            await asyncio.to_thread(open_position, http, other, asset="SOL", type="long",
                                    margin="4", leverage=2)
            await asyncio.to_thread(open_position, http, mine, asset="SOL", type="long",
                                    margin="3", leverage=2)
            got = await account_frames(ws, 2)
            assert [g["seq"] for g in got] == [4, 5]
            assert D(got[0]["margin"]) == 10 and got[1]["type"] == "long"
            assert D(got[1]["margin"]) == 3

    asyncio.run(scenario())


def test_more_missed_account_events_than_a_connection_may_hold_unsent_come_as_a_snapshot(
        tight: LocalHttpPlatform) -> None:
    """Resuming far behind would overflow the connection's unsent frames (it would be closed
    as slow): the server sends the state instead; one missed event is sent as it is."""
    with httpx.Client(base_url=tight.base_url, timeout=10) as http:
        h = sol_trader(tight, http)
        for margin in ("10", "20"):  # four events after the signup's
            open_position(http, h, asset="SOL", type="long", margin=margin, leverage=2)

        async def scenario() -> None:
            async with account_stream(tight, h, since=1) as ws:
                (snap,) = await account_frames(ws, 1)
                assert snap["event"] == "snapshot" and snap["seq"] == 5
                assert len(snap["positions"]) == 2
            async with account_stream(tight, h, since=4) as ws:
                (missed,) = await account_frames(ws, 1)
                assert (missed["event"], missed["seq"]) == ("positionOpened", 5)

        asyncio.run(scenario())


def test_a_partial_close_is_followed_by_the_part_that_stays_open(platform: HttpPlatform,
                                                                 http: httpx.Client) -> None:
    """A partial close: ``positionClosed`` (``partial: true``) and the balance, then
    ``positionUpdated`` with what stays open under the same id (its quantity, margin and
    liquidation price now), as ``GET /api/v1/state`` shows it."""
    h = sol_trader(platform, http)

    async def scenario() -> None:
        async with account_stream(platform, h) as ws:
            await account_frames(ws, 1)  # the snapshot
            p = await asyncio.to_thread(open_position, http, h, asset="SOL", type="long",
                                        margin="100", leverage=10)
            await account_frames(ws, 2)  # the lock's balance, positionOpened
            r = await asyncio.to_thread(http.post, "/api/v1/positions/close", headers=h,
                                        json={"positionId": p["positionId"],
                                              "quantity": "2.5"})
            assert r.status_code == 200 and r.json()["partial"] is True, r.text
            closed, balance, rest = await account_frames(ws, 3)
            assert (closed["event"], closed["partial"]) == ("positionClosed", True)
            assert D(closed["quantity"]) == D("2.5")
            assert balance["event"] == "balance"
            assert rest["event"] == "positionUpdated" and rest["seq"] == balance["seq"] + 1
            [now] = (await asyncio.to_thread(state, http, h))["positions"]
            assert rest["positionId"] == now["positionId"] == p["positionId"]
            assert D(rest["quantity"]) == D(p["quantity"]) - D("2.5") == D(now["quantity"])
            assert D(rest["margin"]) == D(p["margin"]) - D(closed["margin"]) == D(now["margin"])
            assert rest["liquidationPrice"] == now["liquidationPrice"]

    asyncio.run(scenario())


def test_a_filled_order_is_followed_by_the_position_it_opened(platform: HttpPlatform,
                                                              http: httpx.Client) -> None:
    h = sol_trader(platform, http)

    async def scenario() -> None:
        async with account_stream(platform, h) as ws:
            (snap,) = await account_frames(ws, 1)
            r = await asyncio.to_thread(http.post, "/api/v1/orders", headers=h, json={
                "asset": "SOL", "type": "long", "orderType": "limit", "triggerPrice": "99",
                "margin": "25", "leverage": 4})
            assert r.status_code == 201, r.text
            order = r.json()
            locked, placed = await account_frames(ws, 2)
            assert (locked["event"], placed["event"]) == ("balance", "orderPlaced")
            await asyncio.to_thread(tick, platform, http, "SOL", "98.99", "99.00")
            filled, opened = await account_frames(ws, 2)  # a fill moves no money: no balance
            assert (filled["event"], filled["orderId"]) == ("orderFilled", order["orderId"])
            assert (opened["event"], opened["positionId"]) == ("positionOpened",
                                                               filled["positionId"])
            assert D(opened["entryPrice"]) == 99 and D(opened["margin"]) == 25
            assert [f["seq"] for f in (locked, placed, filled, opened)] == list(
                range(snap["seq"] + 1, snap["seq"] + 5))

    asyncio.run(scenario())


def test_a_fill_whose_position_closed_on_the_next_tick_of_the_same_call_is_still_opened(
        ) -> None:
    """Ticks that waited behind a shard call go in one call: the first fills a limit order,
    the second hits the position's take-profit. The stream still shows the position opened
    between its fill and its close. (Its own platform: two ticks in one shard call.)"""
    with LocalHttpPlatform(TRADING) as platform, \
            httpx.Client(base_url=platform.base_url, timeout=10) as http:
        h = sol_trader(platform, http)

        async def scenario() -> None:
            async with account_stream(platform, h) as ws:
                await account_frames(ws, 1)
                r = await asyncio.to_thread(http.post, "/api/v1/orders", headers=h, json={
                    "asset": "SOL", "type": "long", "orderType": "limit", "triggerPrice": "99",
                    "margin": "25", "leverage": 4, "takeProfit": "101"})
                assert r.status_code == 201, r.text
                await account_frames(ws, 2)  # balance, orderPlaced
                await asyncio.to_thread(platform.deliver, [
                    platform.next_tick("SOL", "98.99", "99.00"),
                    platform.next_tick("SOL", "101.00", "101.01")])
                frames = await account_frames(ws, 4)
                assert [f["event"] for f in frames] == [
                    "orderFilled", "positionOpened", "positionClosed", "balance"], frames
                filled, opened, closed, _ = frames
                assert filled["positionId"] == opened["positionId"] == closed["positionId"]
                assert closed["closeReason"] == "take_profit"
                for name in ("entryPrice", "quantity", "margin", "leverage", "takeProfit",
                             "liquidationPrice", "openedAt"):
                    assert opened[name] == closed[name], name

        asyncio.run(scenario())


def test_an_order_filled_before_its_placement_reached_the_ledger_is_shown_placed_first(
        ) -> None:
    """The API's note of a placement is held on its way to the ledger while the next tick
    fills the order and its settlement reaches the ledger first: the stream still shows
    orderPlaced, then orderFilled and positionOpened, once each."""
    from engine.ledger_machine import Note
    from tests.unit.cluster.faulty_ports import Gated

    gates: list[Gated] = []

    def gated(port: Any) -> Gated:
        gates.append(Gated(port, Note))
        return gates[-1]

    with LocalHttpPlatform(TRADING, wrap_ledger=gated) as p, \
            httpx.Client(base_url=p.base_url, timeout=10) as http:
        h = sol_trader(p, http)
        [gate] = gates

        async def scenario() -> None:
            async with account_stream(p, h) as ws:
                await account_frames(ws, 1)
                placing = asyncio.create_task(asyncio.to_thread(
                    http.post, "/api/v1/orders", headers=h, json={
                        "asset": "SOL", "type": "long", "orderType": "limit",
                        "triggerPrice": "100.05", "margin": "25", "leverage": 4}))
                while not gate.reached.is_set():  # the shard placed it; its note waits
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(p.push_tick, "SOL", "100.00", "100.01")  # fills it
                p.loop.call_soon_threadsafe(gate.opened.set)
                r = await placing
                assert r.status_code == 201, r.text
                frames = await account_frames(ws, 4)
                assert [f["event"] for f in frames] == [
                    "balance", "orderPlaced", "orderFilled", "positionOpened"], frames
                assert frames[1]["orderId"] == frames[2]["orderId"] == r.json()["orderId"]
                with pytest.raises(asyncio.TimeoutError):  # and the late note adds nothing
                    await asyncio.wait_for(ws.recv(), 0.5)

        asyncio.run(scenario())


def test_a_stopping_replica_closes_every_connection_with_1001_after_its_queued_frames() -> None:
    """What an API replica does when the platform stops (cluster.actors.serve_app.stop_api): each
    connection is sent what was queued for it, then a close frame 1001 with a reason; one opened
    after that is closed with 1001 at once."""
    with LocalHttpPlatform() as stopping:
        stopping.push_tick("SOL", "100.00", "100.01")
        hub = stopping.app.state.streams
        last = json.dumps({"stream": "test", "data": {"last": True}})

        async def going_away() -> int:
            for connection in hub.connections:
                connection.offer(last)  # queued in the same turn as the stop: sent before it
            opened: int = await hub.going_away(WAIT_S)
            return opened

        async def scenario() -> None:
            url = ws_url(stopping)
            async with websockets.connect(url) as market, websockets.connect(url) as quiet:
                await send(market, "SUBSCRIBE", "bookTicker.SOL")
                await frame(market, "bookTicker.SOL")
                await send(quiet, "SUBSCRIBE", "kline.1m.SOL")
                await frame(quiet, "kline.1m.SOL")
                opened = await asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(going_away(), stopping.loop))
                assert opened == 2
                for ws in (market, quiet):
                    assert await frame(ws, "test") == json.loads(last)
                    with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                        await asyncio.wait_for(ws.recv(), WAIT_S)
                    assert closed.value.rcvd is not None, closed.value
                    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                        1001, "the server is stopping")
            async with websockets.connect(url) as late:
                with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                    await asyncio.wait_for(late.recv(), WAIT_S)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            assert hub.stats()["ws_connections"] == 0

        asyncio.run(scenario())


async def _raw_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next frame a server sent (unmasked, RFC 6455 5.2): its opcode and payload."""
    head = await reader.readexactly(2)
    assert not head[1] & 0x80, "a server's frames are not masked"
    size = head[1] & 0x7F
    if size >= 126:
        size = int.from_bytes(await reader.readexactly(2 if size == 126 else 8), "big")
    return head[0] & 0x0F, await reader.readexactly(size)


def test_the_server_pings_and_closes_a_connection_that_stops_answering() -> None:
    """SPEC: the server pings every 20 s and closes a connection that has not answered for 60 s.
    The replica's settings say so; the same server (its WebSocket protocol class included)
    runs here with both times divided by 40. A client that never answers is pinged after the
    interval and closed (1011) once the ping went unanswered for the timeout, and its place in
    the hub is freed; a client that answers (as browsers and websockets do by themselves) stays
    past several such times."""
    interval_s = WS_SERVER_OPTIONS["ws_ping_interval"]
    timeout_s = WS_SERVER_OPTIONS["ws_ping_timeout"]
    assert (interval_s, interval_s + timeout_s) == (20.0, 60.0)
    interval_s, timeout_s = interval_s / 40, timeout_s / 40
    with LocalHttpPlatform(server_options={"ws_ping_interval": interval_s,
                                           "ws_ping_timeout": timeout_s}) as quick:
        quick.push_tick("SOL", "100.00", "100.01")
        hub = quick.app.state.streams

        async def silent() -> list[tuple[int, bytes, float]]:
            """Every frame the server sends a client that answers nothing, with when it came
            (seconds after the handshake), until the server closes the socket."""
            reader, writer = await asyncio.open_connection("127.0.0.1", quick.port)
            writer.write(b"GET /ws HTTP/1.1\r\n" + WS_UPGRADE + WS_KEY
                         + b"Sec-WebSocket-Version: 13\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
            assert head.startswith(b"HTTP/1.1 101 "), head
            start = time.monotonic()
            frames = []
            with contextlib.suppress(asyncio.IncompleteReadError):
                while True:
                    opcode, payload = await asyncio.wait_for(_raw_frame(reader), WAIT_S)
                    frames.append((opcode, payload, time.monotonic() - start))
            writer.close()
            return frames

        async def answering(ws: Any) -> dict[str, Any]:
            """A bookTicker frame on ``ws`` after four ping intervals and timeouts."""
            await asyncio.sleep(4 * (interval_s + timeout_s))
            await send(ws, "SUBSCRIBE", "bookTicker.SOL")
            return await frame(ws, "bookTicker.SOL")

        async def scenario() -> list[tuple[int, bytes, float]]:
            async with websockets.connect(ws_url(quick), ping_interval=None) as ws:
                frames, ticker = await asyncio.gather(silent(), answering(ws))
                assert ticker["data"]["bid"] == "100.00"
                deadline = time.monotonic() + WAIT_S
                while hub.stats()["ws_connections"] != 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert hub.stats()["ws_connections"] == 1  # the answering one
            return frames

        frames = asyncio.run(scenario())
    opcodes = [opcode for opcode, _, _ in frames]
    assert opcodes == [0x9, 0x8], frames  # a ping, then the close
    (_, _, pinged_s), (_, close, closed_s) = frames
    assert pinged_s >= interval_s * 0.9
    assert closed_s - pinged_s >= timeout_s * 0.9
    assert int.from_bytes(close[:2], "big") == 1011, close
