"""A WebSocket client that reads nothing (SPEC "Limits": unsent messages per connection, and
"Live data": a connection that has not answered for 60 s is closed): once the server closes
it, it is dropped, and counts against its address until it is."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from collections.abc import Iterator

import httpx
import pytest
from cluster.config import Settings
from cluster.http.server import SERVER_OPTIONS
from cluster.http.server import SpecWebSocketProtocol
from tests.e2e.api_client import tick
from tests.e2e.http_platform import LocalHttpPlatform

HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
PRICES = {"SOL": 100, "ETH": 3000}  # two assets with two price decimals
STREAMS = [f"{kind}.{asset}" for asset in PRICES for kind in (
    "bookTicker", "kline.1m", "kline.5m", "kline.15m", "kline.1h", "kline.4h", "kline.1d")]


class QuickDrop(SpecWebSocketProtocol):
    """The replica's WebSocket protocol, giving a closed client 0.3 s to take its data."""

    close_flush_s = 0.3


def client_frame(text: str) -> bytes:
    """A masked text frame (key 0, so the payload goes as it is)."""
    data = text.encode()
    size = bytes([0x80 | len(data)]) if len(data) < 126 else b"\xfe" + struct.pack("!H",
                                                                                  len(data))
    return b"\x81" + size + b"\0\0\0\0" + data


def connect(port: int) -> tuple[socket.socket, bytes]:
    """A raw WebSocket client with a small receive buffer, and the handshake's answer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(HANDSHAKE)
    return sock, sock.recv(4096)


def metric(http: httpx.Client, name: str) -> int:
    for line in http.get("/metrics").text.splitlines():
        if line.split(" ")[0] in (f"shardex_{name}", f"shardex_{name}_total"):
            return int(float(line.split(" ")[1]))
    raise AssertionError(f"no metric {name}")


def fill_the_pipe(p: LocalHttpPlatform, http: httpx.Client) -> None:
    """Ticks until the server sends nothing more to the client subscribed to every stream:
    its socket's buffers are full, the server's writes wait for a read that never comes."""
    sent, i = -1, 0
    deadline = time.monotonic() + 20
    while (now_sent := metric(http, "ws_frames_sent")) != sent:
        assert time.monotonic() < deadline, "the client's buffers never filled"
        sent = now_sent
        for _ in range(200):
            i += 1
            for asset, base in PRICES.items():
                bid = base * 100 + i % 50
                p.push_tick(asset, f"{bid / 100:.2f}", f"{(bid + 1) / 100:.2f}")


PINGS = {"unsent": {},  # the replica's: none within the test
         # the first ping once the client's buffers are full (about 1.5 s), unanswered 0.5 s
         "silent": {"ws_ping_interval": 2.0, "ws_ping_timeout": 0.5}}


@pytest.fixture(params=sorted(PINGS))
def unread(request: pytest.FixtureRequest
           ) -> Iterator[tuple[LocalHttpPlatform, httpx.Client, str]]:
    """One WebSocket per address, each falling at most 30 frames behind."""
    why: str = request.param
    # market frames as fast as the ticks come (no WS_MARKET_INTERVAL_MS): the pipe fills in
    # seconds
    settings = Settings(ws_connections=1, ws_unsent=30, api_key_rate_per_s=0, signups_per_min=0,
                        ws_market_interval_ms=0)
    options = {**SERVER_OPTIONS, "ws": QuickDrop, **PINGS[why]}
    with LocalHttpPlatform(settings, server_options=options) as p, \
            httpx.Client(base_url=p.base_url, timeout=10) as http:
        for asset, base in PRICES.items():
            tick(p, http, asset, f"{base}.00", f"{base}.01")
        yield p, http, why


def test_a_client_that_reads_nothing_is_dropped_once_closed(
        unread: tuple[LocalHttpPlatform, httpx.Client, str]) -> None:
    """``unsent``: error frames queue behind the market streams' unsent values past 30 and
    the server closes the connection (1008); ``silent``: its pings go unanswered. Either way
    the close frame cannot reach a client that reads nothing, and a closed transport waits
    for its data to be read: the connection stayed open for good, with megabytes queued
    for it, and after a 1008 no longer counted, so one address could hold any number."""
    p, http, why = unread
    sock, answer = connect(p.port)
    assert answer.startswith(b"HTTP/1.1 101 "), answer
    with sock:
        sock.sendall(client_frame(json.dumps({"method": "SUBSCRIBE", "params": STREAMS})))
        fill_the_pipe(p, http)
        if why == "unsent":
            for _ in range(20):  # 20 error frames (a burst within the frame rate limit)
                sock.sendall(client_frame('{"method":"NOPE"}'))
            deadline = time.monotonic() + 5
            while metric(http, "ws_slow_closed") == 0:
                assert time.monotonic() < deadline, "not closed for its unsent frames"
                time.sleep(0.02)
            # closed, but not yet gone: it still counts against its address
            other, answer = connect(p.port)
            other.close()
            assert answer.startswith(b"HTTP/1.1 429 "), answer[:200]
        deadline = time.monotonic() + 5
        while True:  # dropped, it no longer counts: its address may connect again
            again, answer = connect(p.port)
            again.close()
            if answer.startswith(b"HTTP/1.1 101 "):
                break
            assert answer.startswith(b"HTTP/1.1 429 "), answer[:200]
            assert time.monotonic() < deadline, "a client reading nothing is never dropped"
            time.sleep(0.05)
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(65536):  # what was sent before, then the end (no close frame
                pass                 # could reach it)
