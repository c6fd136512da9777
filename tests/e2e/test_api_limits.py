"""SPEC "Limits" over a real socket: the body size whatever the transfer encoding, the rate
limits (per API key, and account creations per client address) with ``Retry-After``, and the
open positions per account."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cluster.config import Settings
from cluster.http.limits import SITE_SIGNUPS_FACTOR
from tests.e2e.api_client import error_code
from tests.e2e.api_client import open_ids
from tests.e2e.api_client import open_position
from tests.e2e.api_client import raw_answer
from tests.e2e.api_client import signup
from tests.e2e.api_client import state
from tests.e2e.api_client import tick
from tests.e2e.http_platform import LocalHttpPlatform

LIMIT = 16 * 1024  # the SPEC default
HEAD_LIMIT = 64 * 1024  # a request line and headers (cluster.http.server)
OPEN = b'{"asset":"SOL","type":"long","margin":"10","leverage":2}'


@pytest.fixture(scope="module")
def unlimited_rates() -> Iterator[LocalHttpPlatform]:
    """Default body and depth limits; rates unlimited (their tests have their own platform)."""
    with LocalHttpPlatform(Settings(api_key_rate_per_s=0, signups_per_min=0,
                                    public_rate_per_s=0)) as p:
        yield p


@pytest.fixture
def client(unlimited_rates: LocalHttpPlatform) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=unlimited_rates.base_url, timeout=10) as c:
        yield c


def padded(size: int) -> bytes:
    """The open body padded with JSON whitespace to exactly ``size`` bytes."""
    return OPEN[:-1] + b" " * (size - len(OPEN)) + b"}"


def chunks(body: bytes, size: int = 1000) -> Iterator[bytes]:
    """``body`` as an iterator, which httpx sends with ``Transfer-Encoding: chunked``."""
    for i in range(0, len(body), size):
        yield body[i:i + size]


def test_a_body_at_the_limit_is_read_in_either_encoding(
        unlimited_rates: LocalHttpPlatform, client: httpx.Client) -> None:
    h = {**signup(client), "Content-Type": "application/json"}
    tick(unlimited_rates, client, "SOL", "100.00", "100.01")
    r = client.post("/api/v1/positions/open", content=padded(LIMIT), headers=h)
    assert r.status_code == 201, r.text
    r = client.post("/api/v1/positions/open", content=chunks(padded(LIMIT)), headers=h)
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("path", ["/api/v1/positions/open", "/api/v1/accounts"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_413(client: httpx.Client, path: str, chunked: bool) -> None:
    h = {**signup(client), "Content-Type": "application/json"}
    body = padded(LIMIT + 1)
    r = client.post(path, content=chunks(body) if chunked else body, headers=h)
    assert r.status_code == 413 and error_code(r) == "INVALID_REQUEST", r.text
    assert r.headers["connection"] == "close"


def test_a_chunked_body_is_refused_while_it_arrives_and_before_authentication(
        unlimited_rates: LocalHttpPlatform) -> None:
    """Chunks past the limit, no API key, and a body that never ends: the 413 comes as soon as
    the limit is passed (the server does not wait for the end, nor read the rest)."""
    host, port = "127.0.0.1", int(unlimited_rates.base_url.rsplit(":", 1)[1])
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /api/v1/positions/open HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1024, b" " * 1024)
        for _ in range(LIMIT // 1024 + 1):  # one KiB past the limit, and no last chunk
            sock.sendall(chunk)
        answer = b""
        while not answer.endswith(b"}}"):  # the whole error body, sent before any close
            data = sock.recv(65536)
            assert data, f"connection closed without a whole answer: {answer!r}"
            answer += data
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'{"error":{"code":"INVALID_REQUEST","message":' in answer


def test_a_trailer_field_is_not_read_as_a_header(unlimited_rates: LocalHttpPlatform,
                                                  client: httpx.Client) -> None:
    """A chunked body's trailer fields come after it: RFC 9110 6.5.1 forbids merging them into
    the headers (a proxy in front checks the headers, not the trailers). An API key sent as
    one authenticated the request."""
    key = signup(client)["Authorization"].encode()
    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    answer = raw_answer(port, iter([b"GET /api/v1/state HTTP/1.1\r\nHost: x\r\nConnection: "
                                    b"close\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
                                    b"Authorization: " + key + b"\r\n\r\n"]))
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:300]


TRAILERS = {  # after the last chunk; the answer comes once 64 KiB have arrived
    "many fields": [b"X-T: " + b"a" * 4000 + b"\r\n"] * 20,
    "one field never ended": [b"X-T: "] + [b"a" * 4096] * 20,  # (the parser joins its parts
}                                                               # in time growing as its square)


@pytest.mark.parametrize("case", sorted(TRAILERS))
def test_trailer_fields_over_64_kib_are_431_and_the_connection_closed(
        unlimited_rates: LocalHttpPlatform, case: str) -> None:
    """Trailer fields were kept with the headers, without a bound: one connection sending
    them grew the server by 1.7 GB in 5 s. They are bound as a request head is."""
    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    answer = raw_answer(port, iter([b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n",
                                    *TRAILERS[case]]))
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 1, answer


def test_a_declared_length_over_the_limit_is_refused_unread(
        unlimited_rates: LocalHttpPlatform) -> None:
    host, port = "127.0.0.1", int(unlimited_rates.base_url.rsplit(":", 1)[1])
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


@pytest.mark.parametrize("declared", [LIMIT, LIMIT + 1])
def test_a_declared_length_is_refused_from_one_byte_over_the_limit(
        unlimited_rates: LocalHttpPlatform, declared: int) -> None:
    """A ``Content-Length`` of the limit is read; one byte more is 413 at once."""
    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    answer = raw_answer(port, iter([b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\n"
                                    b"Connection: close\r\nContent-Length: %d\r\n\r\n" % declared,
                                    b"{}" + b" " * (LIMIT - 2)]))
    assert answer.startswith(b"HTTP/1.1 201 " if declared == LIMIT else b"HTTP/1.1 413 "), \
        answer[:200]


def mixed(depth: int) -> bytes:
    """A JSON object ``depth`` levels deep, objects and arrays in turn, with brackets in its
    strings (which are not nesting)."""
    text = b'"[{\\"[{"'  # a string: [{\"[{
    for level in range(depth - 1):
        text = b'{"a[":%s}' % text if level % 2 else b"[%s,{}]" % text if level else \
            b"[%s]" % text  # (an empty object beside the string would be a level deeper)
    return b'{"x":%s}' % text


@pytest.mark.parametrize(("depth", "status"), [(32, 201), (33, 400)])
def test_json_nesting_mixing_arrays_and_objects_is_refused_from_one_level_over(
        client: httpx.Client, depth: int, status: int) -> None:
    body = mixed(depth)
    assert json.loads(body) and not _deeper(json.loads(body), depth)
    assert _deeper(json.loads(body), depth - 1)
    r = client.post("/api/v1/accounts", content=body,
                    headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    if status == 400:
        assert error_code(r) == "INVALID_REQUEST"
        assert r.json()["error"]["message"] == "JSON nested deeper than 32 levels"


def _deeper(value: Any, depth: int) -> bool:
    """Whether ``value`` nests arrays and objects deeper than ``depth`` (by Python's reading)."""
    if isinstance(value, dict | list):
        items = value.values() if isinstance(value, dict) else value
        return depth < 1 or any(_deeper(v, depth - 1) for v in items)
    return False


HEAD_CASES = {  # request heads over 64 KiB, sent in 4 KiB pieces
    "one header": b"GET /api/v1/assets HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (HEAD_LIMIT + 1),
    "many headers": b"GET /api/v1/assets HTTP/1.1\r\nHost: x\r\n"
                    + b"X-N: 0123456789012345678901234567890123456789\r\n" * (HEAD_LIMIT // 40),
    "long url": b"GET /api/v1/assets?" + b"a=1&" * (HEAD_LIMIT // 4) + b" HTTP/1.1\r\n",
}


@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_a_request_head_over_64_kib_is_431_and_the_connection_closed(
        unlimited_rates: LocalHttpPlatform, case: str) -> None:
    """The head never ends (no blank line): the answer comes once 64 KiB have arrived."""
    head = HEAD_CASES[case]
    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    answer = raw_answer(port, (head[i:i + 4096] for i in range(0, len(head), 4096)))
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert answer.endswith(b'{"error":{"code":"INVALID_REQUEST","message":"request line and '
                           b'headers over 65536 bytes"}}'), answer[-200:]


def test_a_query_of_more_than_64_parameters_is_refused_before_it_is_parsed(
        unlimited_rates: LocalHttpPlatform, client: httpx.Client) -> None:
    """Parsing a query costs about a microsecond a field, a few times over: 15,000 fields (a
    60 kB head, under its bound) took 14-30 ms of the replica's CPU to answer a 401, so one
    client without a key asking 60 times a second kept every other client waiting."""
    most = "&".join(f"p{i}=1" for i in range(64))
    assert client.get(f"/api/v1/assets?{most}").status_code == 200
    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    for query in (most.encode() + b"&p64=1", b"x=1&" * 15000):
        answer = raw_answer(port, iter([b"GET /api/v1/state?" + query
                                          + b" HTTP/1.1\r\nHost: x\r\n\r\n"]))
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert answer.endswith(b'{"error":{"code":"INVALID_REQUEST","message":"a query of more '
                               b'than 64 parameters"}}'), answer[-200:]


def test_a_head_under_the_limit_and_pipelined_requests_with_bodies_are_served(
        unlimited_rates: LocalHttpPlatform, client: httpx.Client) -> None:
    """A 60 KiB head is served; so are 40 requests of a 30 KiB head and a 16 KiB body each,
    written at once on one connection while the server is busy: its reads are then large (up
    to 256 KiB), end inside a head, and hold the end of earlier requests."""
    assert client.get("/api/v1/assets", headers={"X-Big": "a" * (60 * 1024)}).status_code == 200
    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    body = padded(LIMIT)
    one = (b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"X-Pad: %s\r\nContent-Length: %d\r\n\r\n%s" % (b"p" * 30 * 1024, len(body), body))
    last = b"GET /api/v1/assets HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    def parts() -> Iterator[bytes]:
        unlimited_rates.loop.call_soon_threadsafe(time.sleep, 0.3)  # the server's loop waits
        yield one * 40 + last

    answer = raw_answer(port, parts())
    assert answer.count(b"HTTP/1.1 201 ") == 40 and answer.count(b"HTTP/1.1 200 ") == 1, \
        answer[:300]


def test_requests_sent_without_reading_the_answers_wait_parsed_a_few_at_a_time(
        unlimited_rates: LocalHttpPlatform) -> None:
    """50,000 small requests (2 MB) written on one connection whose answers are not read: the
    server parses only a bounded number of them ahead (a parsed request costs its memory), not
    all that each read holds. 1,000 written at once and then read are all answered, in order."""
    import gc
    import threading

    from cluster.http.server import FEED_SLICE_BYTES
    from cluster.http.server import MAX_PIPELINED
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    def parsed() -> int:
        return sum(1 for o in gc.get_objects() if type(o) is RequestResponseCycle)

    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    one = b"GET /api/v1/assets HTTP/1.1\r\nHost: x\r\n\r\n"
    bound = MAX_PIPELINED + FEED_SLICE_BYTES // len(one) + 2
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # answers back up soon

        def flood() -> None:
            with contextlib.suppress(OSError):  # shut down while it still sends
                sock.sendall(one * 50_000)

        threading.Thread(target=flood, daemon=True).start()
        most = 0
        for _ in range(20):  # 2 s
            time.sleep(0.1)
            most = max(most, parsed())
        assert most <= bound, most
        sock.shutdown(socket.SHUT_RDWR)
    last = one.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    answer = raw_answer(port, iter([one * 999 + last]))
    assert answer.count(b"HTTP/1.1 200 ") == 1000, answer.count(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("length", [b"2 ", b"2\t", b" 2"])
def test_a_content_length_with_whitespace_around_it_is_read(
        unlimited_rates: LocalHttpPlatform, length: bytes) -> None:
    """RFC 9110 5.5: the whitespace around a field value is not part of it."""
    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    answer = raw_answer(port, iter([b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\n"
                                    b"Connection: close\r\nContent-Length:" + length +
                                    b"\r\n\r\n{}"]))
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]


WS_HANDSHAKE = (b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")
MALFORMED_HTTP = {
    "two lengths": b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                   b"Content-Length: 5\r\n\r\n{}",
    "length and chunked": b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "folded header": b"GET /api/v1/assets HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n",
    # a coding other than chunked, which the parser would ignore and a proxy might not
    "gzip then chunked": b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "two codings headers": b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: x"
                           b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "chunked twice": b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\n"
                     b"Transfer-Encoding: chunked, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "no request line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS hello
    "a version that is no number": b"GET /api/v1/assets HTTP/x\r\nHost: x\r\n\r\n",
    # RFC 9112 3.2: an HTTP/1.1 request names its host, once, and any request at most once
    "no Host": b"GET /api/v1/assets HTTP/1.1\r\n\r\n",
    "two Hosts": b"GET /api/v1/assets HTTP/1.1\r\nHost: x\r\nHost: x\r\n\r\n",
    "two Hosts in HTTP/1.0": b"GET /api/v1/assets HTTP/1.0\r\nHost: x\r\nHost: y\r\n\r\n",
    "a Host with a path": b"GET /api/v1/assets HTTP/1.1\r\nHost: x/y\r\n\r\n",
    "a Host with a space": b"GET /api/v1/assets HTTP/1.1\r\nHost: x y\r\n\r\n",
    "an empty Host": b"GET /api/v1/assets HTTP/1.1\r\nHost: \r\n\r\n",
    "a Host whose port is not a number": b"GET /api/v1/assets HTTP/1.1\r\nHost: x:y\r\n\r\n",
    "a WebSocket handshake without Host": WS_HANDSHAKE + b"\r\n",
    "a WebSocket handshake with gzip": WS_HANDSHAKE + b"Host: x\r\n"
                                       b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(MALFORMED_HTTP))
def test_a_request_the_http_parser_refuses_is_400_in_the_error_shape(
        unlimited_rates: LocalHttpPlatform, case: str, caplog: pytest.LogCaptureFixture) -> None:
    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    users = unlimited_rates.totals()["users"]
    # a signup written after it in the same packet is neither answered nor executed
    signup_after = b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    answer = raw_answer(port, iter([MALFORMED_HTTP[case] + signup_after]))
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert unlimited_rates.totals()["users"] == users
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "INVALID_REQUEST", body
    assert body["error"]["message"].startswith("malformed HTTP request: "), body
    # (a WebSocket handshake refused as its head ended was then upgraded, and failed)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0", b"HTTP/1.2", b"HTTP/0.9"])
def test_a_request_of_another_http_version_is_505_and_the_connection_closed(
        unlimited_rates: LocalHttpPlatform, version: bytes) -> None:
    """Only HTTP/1.0 and 1.1 are spoken here. Before, an HTTP/2.0 (or 0.9) request line was
    served as if it were 1.1, and HTTP/3.0 or 1.2 were 400 as malformed."""
    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    users = unlimited_rates.totals()["users"]
    signup_after = b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    answer = raw_answer(port, iter([b"GET /api/v1/assets " + version + b"\r\nHost: x\r\n\r\n"
                                    + signup_after]))
    assert answer.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n"), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert b"\r\nconnection: close\r\n" in answer, answer
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body == {"error": {"code": "INVALID_REQUEST", "message": f"HTTP version "
                              f"{version.decode()[5:]} not supported (HTTP/1.0 and 1.1 are)"}}
    assert unlimited_rates.totals()["users"] == users


def test_requests_the_parser_refuses_are_logged_once_a_minute_with_a_count(
        unlimited_rates: LocalHttpPlatform, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn logs a warning for each request its parser refuses: a client sending them could
    add log lines as fast as it sends. One a minute is logged, the next telling how many were
    left out."""
    from cluster.http import server

    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    monkeypatch.setattr(server.PARSER_REFUSALS, "next_s", 0.0)  # whatever earlier tests sent
    monkeypatch.setattr(server.PARSER_REFUSALS, "left_out", 0)

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.getMessage().startswith(server.PARSER_REFUSALS.message)]

    with caplog.at_level(logging.WARNING):
        for _ in range(20):
            answer = raw_answer(port, iter([MALFORMED_HTTP["two lengths"]]))
            assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert logged() == ["Invalid HTTP request received."]
        monkeypatch.setattr(server.PARSER_REFUSALS, "next_s", 0.0)  # as if a minute passed
        assert raw_answer(port, iter([MALFORMED_HTTP["folded header"]])).startswith(
            b"HTTP/1.1 400 ")
        assert logged()[1:] == [
            "Invalid HTTP request received. (19 more left out of this log before)"]


@pytest.mark.parametrize("case", sorted(MALFORMED_HTTP))
def test_a_refused_request_does_not_take_the_place_of_the_answers_before_it(
        unlimited_rates: LocalHttpPlatform, case: str) -> None:
    """A signup and then a request the server refuses, pipelined in one packet: the signup is
    answered (201), then the refusal (400), and the connection closes. Before, the refusal
    was written at once and the connection closed: the signup ran, its answer never came."""
    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    users = unlimited_rates.totals()["users"]
    signup = b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    answer = raw_answer(port, iter([signup + MALFORMED_HTTP[case] + signup]))
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 2, answer
    refusal = answer[answer.index(b"HTTP/1.1 ", 1):]
    assert refusal.startswith(b"HTTP/1.1 400 "), refusal[:200]
    assert b'"code":"INVALID_REQUEST"' in refusal, refusal
    assert unlimited_rates.totals()["users"] == users + 1


def test_a_websocket_handshake_behind_unanswered_requests_is_400_after_their_answers(
        unlimited_rates: LocalHttpPlatform) -> None:
    """A signup and a WebSocket handshake in one packet: the signup is answered (201), then the
    handshake refused (400), and the connection closes. Before, the connection became a
    WebSocket at once: its 101 went out first and the signup's answer, API key and all, came
    after it inside the WebSocket's stream, where the client reads it as broken frames."""
    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    users = unlimited_rates.totals()["users"]
    signup = b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(signup + WS_HANDSHAKE + b"Host: x\r\n\r\n")
        with contextlib.suppress(TimeoutError):  # (a WebSocket stays open)
            while data := sock.recv(65536):
                answer += data
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 2, answer
    refusal = answer[answer.index(b"HTTP/1.1 ", 1):]
    assert refusal.startswith(b"HTTP/1.1 400 "), refusal[:200]
    assert json.loads(refusal.partition(b"\r\n\r\n")[2])["error"]["code"] == "INVALID_REQUEST"
    assert unlimited_rates.totals()["users"] == users + 1
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:  # sent after it:
        sock.sendall(signup)                                                # taken
        assert sock.recv(65536).startswith(b"HTTP/1.1 201 ")
        sock.sendall(WS_HANDSHAKE + b"Host: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 101 ")


HOSTS_SERVED = {
    "a name and a port": b"GET /api/v1/assets HTTP/1.1\r\nhost: api.example-1.com:8000 \r\n",
    "an IPv4 address": b"GET /api/v1/assets HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    "an IPv6 address": b"GET /api/v1/assets HTTP/1.1\r\nHost: [::1]:8000\r\n",
    "HTTP/1.0 without Host": b"GET /api/v1/assets HTTP/1.0\r\n",
}


@pytest.mark.parametrize("case", sorted(HOSTS_SERVED))
def test_a_request_naming_its_host_once_or_an_http_1_0_one_naming_none_is_served(
        unlimited_rates: LocalHttpPlatform, case: str) -> None:
    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    answer = raw_answer(port, iter([HOSTS_SERVED[case] + b"Connection: close\r\n\r\n"]))
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"SOL"' in answer, answer[:300]


OTHER_PROTOCOL = {
    "h2c": b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"  # as curl --http2 sends
           b"HTTP2-Settings: AAMAAABkAAQCAAAA\r\n",
    "unknown": b"Connection: upgrade\r\nUpgrade: something/1\r\n",
}
THEN = b"GET /api/v1/assets HTTP/1.1\r\nHost: x\r\n\r\n"  # pipelined after such a request


@pytest.mark.parametrize("case", sorted(OTHER_PROTOCOL))
def test_a_request_asking_for_another_protocol_is_not_misread(
        unlimited_rates: LocalHttpPlatform, case: str) -> None:
    """The parser reads nothing after the head of a request with an Upgrade other than
    websocket (or CONNECT). Without a body it is answered as plain HTTP; with one (its body
    would be lost and read as the next request) it is refused 400. Either way the connection
    closes after the answer, and what was pipelined after it gets no answer of its own."""
    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    plain = raw_answer(port, iter([b"GET /api/v1/assets HTTP/1.1\r\nHost: x\r\n"
                                   + OTHER_PROTOCOL[case] + b"\r\n" + THEN]))
    assert plain.startswith(b"HTTP/1.1 200 ") and plain.count(b"HTTP/1.1 ") == 1, plain[:300]
    assert b"connection: close" in plain.lower(), plain[:300]
    for parts in ([OPEN], [b"", OPEN + THEN]):  # the body with the head, or after it
        head = (b"POST /api/v1/positions/open HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k"
                b"\r\nContent-Type: application/json\r\n" + OTHER_PROTOCOL[case]
                + b"Content-Length: %d\r\n\r\n" % len(OPEN))
        answer = raw_answer(port, iter([head + parts[0], *parts[1:]]))
        assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1, answer
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "INVALID_REQUEST", body
        assert "another protocol" in body["error"]["message"], body


def test_connect_is_405_and_closes_the_connection(unlimited_rates: LocalHttpPlatform) -> None:
    """CONNECT (no route takes it) is 405 in the error shape; its body, which the parser would
    not read, makes it a 400; nothing after it on the connection is read as a request."""
    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    answer = raw_answer(port, iter([b"CONNECT /api/v1/assets HTTP/1.1\r\nHost: x\r\n\r\n"
                                    + THEN]))
    assert answer.startswith(b"HTTP/1.1 405 ") and answer.count(b"HTTP/1.1 ") == 1, answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "METHOD_NOT_ALLOWED"
    answer = raw_answer(port, iter([b"CONNECT /api/v1/assets HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: 2\r\n\r\n", b"{}" + THEN]))
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1, answer


@pytest.fixture
def read_timeout_1s(monkeypatch: pytest.MonkeyPatch) -> float:
    """The request read deadline of the servers in this process, 1 s instead of 30 s."""
    from cluster.http import server

    monkeypatch.setattr(server, "READ_TIMEOUT_S", 1.0)
    return 1.0


def _closed_after(sock: socket.socket) -> tuple[bytes, float]:
    """What the server sends until it closes ``sock``, and the seconds that took."""
    start, answer = time.monotonic(), b""
    sock.settimeout(10)
    while data := sock.recv(65536):
        answer += data
    return answer, time.monotonic() - start


def test_a_request_not_sent_within_the_read_deadline_is_closed(
        unlimited_rates: LocalHttpPlatform, read_timeout_1s: float) -> None:
    """A head begun and left unfinished, or a body stopped in the middle, gets a 408; a
    connection that sends nothing is closed; a request sent slowly within the deadline is
    served."""
    port = int(unlimited_rates.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /api/v1/assets HTTP/1.1\r\nHost: x\r\n")
        answer, took = _closed_after(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert answer.endswith(b'{"error":{"code":"INVALID_REQUEST","message":"request not '
                           b'received within 1 s"}}'), answer[-200:]
    assert read_timeout_1s - 0.1 < took < read_timeout_1s + 3, took
    with socket.create_connection(("127.0.0.1", port)) as sock:
        assert _closed_after(sock)[0] == b""  # nothing sent: closed without an answer
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        answer, took = _closed_after(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b" 201 " not in answer and took < read_timeout_1s + 3, (answer[:200], took)

    def slowly() -> Iterator[bytes]:
        for part in (b"GET /api/v1/assets HTTP/1.1\r\n", b"Host: x\r\n", b"X-A: 1\r\n",
                     b"Connection: close\r\n", b"\r\n"):
            yield part
            time.sleep(0.15)

    assert raw_answer(port, slowly()).startswith(b"HTTP/1.1 200 ")


def test_pipelined_requests_held_behind_slow_answers_are_not_timed_out(
        read_timeout_1s: float) -> None:
    """60 POSTs written at once to a server whose app takes 70 ms an answer: those it holds
    unread behind the first ones wait 1.5 s, longer than the read deadline, on the server's
    account, not the client's; every one is answered 200."""
    import threading

    import uvicorn
    from cluster.http.server import BoundedHeadProtocol
    from feed.broker import free_port

    async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await asyncio.sleep(0.07)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(slow, host="127.0.0.1", port=port, lifespan="off",
                                           log_level="warning", http=BoundedHeadProtocol))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        post = b"POST /y HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"a" * 100
        answer = raw_answer(port, iter([post * 59 + post.replace(
            b"Host: x", b"Host: x\r\nConnection: close")]))
    finally:
        server.should_exit = True
        thread.join(10)
    assert answer.count(b"HTTP/1.1 200 ") == 60 and b" 408 " not in answer, answer[-300:]


def test_a_websocket_outlives_the_read_deadline(
        unlimited_rates: LocalHttpPlatform, read_timeout_1s: float) -> None:
    """The deadline is the request's; an upgraded connection is the WebSocket's."""
    import asyncio

    import websockets

    url = unlimited_rates.base_url.replace("http://", "ws://") + "/ws"

    async def scenario() -> None:
        async with websockets.connect(url) as ws:
            await asyncio.sleep(read_timeout_1s + 1.0)
            await ws.send('{"method":"JUMP","params":[]}')
            error = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert error["error"]["code"] == "INVALID_REQUEST", error

    asyncio.run(scenario())


def test_the_body_limit_is_configurable() -> None:
    settings = Settings(max_body_bytes=1024, api_key_rate_per_s=0, signups_per_min=0)
    with LocalHttpPlatform(settings) as p, httpx.Client(base_url=p.base_url, timeout=10) as c:
        assert c.post("/api/v1/accounts", content=b"{}" + b" " * 1022).status_code == 201
        r = c.post("/api/v1/accounts", content=b"{}" + b" " * 1023)
        assert r.status_code == 413 and error_code(r) == "INVALID_REQUEST"


def test_the_nesting_limit_is_configurable() -> None:
    settings = Settings(max_json_depth=2, api_key_rate_per_s=0, signups_per_min=0)
    with LocalHttpPlatform(settings) as p, httpx.Client(base_url=p.base_url, timeout=10) as c:
        assert c.post("/api/v1/accounts", json={"a": [1]}).status_code == 201
        r = c.post("/api/v1/accounts", json={"a": [[1]]})
        assert r.status_code == 400 and error_code(r) == "INVALID_REQUEST"


def retry_after(r: httpx.Response) -> int:
    assert r.status_code == 429 and error_code(r) == "RATE_LIMITED", r.text
    value = r.headers["retry-after"]
    assert value.isdigit(), value
    return int(value)


def test_requests_per_api_key_are_limited() -> None:
    """Burst 3 at 1 request/s: three at once pass, the fourth waits about a second; every
    authenticated route counts, another key has its own bucket, and a refused request changes
    nothing."""
    settings = Settings(api_key_rate_per_s=1, api_key_burst=3, signups_per_min=0)
    with LocalHttpPlatform(settings) as p, httpx.Client(base_url=p.base_url, timeout=10) as c:
        h, other = signup(c), signup(c)
        assert c.get("/api/v1/state", headers=h).status_code == 200
        assert c.get("/api/v1/positions/history", headers=h).status_code == 200
        r = c.post("/api/v1/positions/close", json={"positionId": "1"}, headers=h)
        assert r.status_code == 404
        r = c.post("/api/v1/positions/open", headers=h,
                   json={"asset": "SOL", "type": "long", "margin": "10", "leverage": 2})
        assert retry_after(r) == 1
        assert c.get("/api/v1/state", headers=other).status_code == 200
        assert c.get("/api/v1/assets").status_code == 200  # public routes are not keyed
        assert c.get("/api/v1/state", headers={"Authorization": "Bearer nope"}).status_code == 401
        time.sleep(1.1)
        r = c.get("/api/v1/state", headers=h)
        assert r.status_code == 200 and r.json()["balances"]["margin"] == "0.000000"


def test_unknown_api_keys_per_address_are_limited() -> None:
    """Each unknown key costs the ledger a lookup: an address past its burst of them is
    answered 429 without one until its bucket refills (a tenth of the per-key rate, half its
    burst), while the keys it used before still pass."""
    settings = Settings(api_key_rate_per_s=10, api_key_burst=6, signups_per_min=0)
    with LocalHttpPlatform(settings) as p, httpx.Client(base_url=p.base_url, timeout=10) as c:
        h = signup(c)
        assert c.get("/api/v1/state", headers=h).status_code == 200  # known here from now on
        guess = {"Authorization": "Bearer guess"}
        for _ in range(3):
            assert c.get("/api/v1/state", headers=guess).status_code == 401
        r = c.get("/api/v1/state", headers=guess)
        assert retry_after(r) == 1 and r.json()["error"]["code"] == "RATE_LIMITED", r.text
        assert c.get("/api/v1/state", headers=h).status_code == 200
        time.sleep(1.1)  # one unknown key a second
        assert c.get("/api/v1/state", headers=guess).status_code == 401
        assert c.get("/api/v1/state", headers=guess).status_code == 429


def test_unknown_api_keys_sent_at_once_are_limited_as_one_by_one() -> None:
    """Many connections of one address each sending an unknown key at once: only its burst
    of them (3) costs the ledger a lookup, the rest are 429, as when sent one after another."""
    settings = Settings(api_key_rate_per_s=10, api_key_burst=6, signups_per_min=0)

    async def guesses(base_url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=base_url, timeout=10,
                                     limits=httpx.Limits(max_connections=40)) as c:
            answers = await asyncio.gather(*(
                c.get("/api/v1/state", headers={"Authorization": f"Bearer guess-{n}"})
                for n in range(40)))
        return sorted(r.status_code for r in answers)

    with LocalHttpPlatform(settings) as p:
        assert asyncio.run(guesses(p.base_url)) == [401] * 3 + [429] * 37


def test_account_creations_per_address_are_limited() -> None:
    with LocalHttpPlatform(Settings(signups_per_min=2)) as p, \
            httpx.Client(base_url=p.base_url, timeout=10) as c:
        assert c.post("/api/v1/accounts", json={}).status_code == 201
        assert c.post("/api/v1/accounts", json={}).status_code == 201
        r = c.post("/api/v1/accounts", json={})
        assert 25 <= retry_after(r) <= 30  # one creation every 30 s
        assert c.get("/api/v1/prices").status_code == 200  # only creations are limited here


@pytest.mark.parametrize("replicas", [1, 2])
def test_only_a_front_door_names_the_client_with_x_forwarded_for(replicas: int) -> None:
    """A replica behind the front door (``API_REPLICAS`` 2) takes the client's address from
    X-Forwarded-For when the request comes from this node; a single replica, which its
    clients reach directly, from no one: a client on this node sending the header with
    another address each time passed every limit per address (here account creations)."""
    from cluster.actors.serve_app import front_door_sources
    from cluster.http.server import server_options

    settings = Settings(signups_per_min=1, api_key_rate_per_s=0, api_replicas=replicas)
    proxies = front_door_sources(settings.host, "10.0.0.5", settings.replica_slots)
    with LocalHttpPlatform(settings, server_options=server_options(
            settings.http_connections, proxies)) as p:
        made = []
        for n in range(3):
            with httpx.Client(base_url=p.base_url, timeout=10,
                              headers={"X-Forwarded-For": f"10.9.0.{n}"}) as c:
                made.append(c.post("/api/v1/accounts", json={}).status_code)
    assert made == ([201, 429, 429] if replicas == 1 else [201, 201, 201])


def test_account_creations_per_ipv6_network_are_limited_too() -> None:
    """An IPv6 /48's holder has 65,536 /64s, each a client address of its own: ten times the
    per-address budget, over all of them, then 429 naming the network; a /64 of another /48
    still creates (the addresses as the trusted proxy on this node names them). Before, every
    /64 had the whole budget: accounts without end, each kept by the ledger for good."""
    with LocalHttpPlatform(Settings(signups_per_min=1, api_key_rate_per_s=0)) as p:
        def create(forwarded: str) -> httpx.Response:
            with httpx.Client(base_url=p.base_url, timeout=10,
                              headers={"X-Forwarded-For": forwarded}) as c:
                return c.post("/api/v1/accounts", json={})

        made = [create(f"2001:db8:7:{n:x}::1").status_code for n in range(SITE_SIGNUPS_FACTOR)]
        assert made == [201] * SITE_SIGNUPS_FACTOR
        refused = create(f"2001:db8:7:{SITE_SIGNUPS_FACTOR:x}::1")
        assert retry_after(refused) > 0
        assert refused.json()["error"]["message"].startswith(
            "too many account creations from this network (/48)")
        assert create("2001:db8:8::1").status_code == 201  # another /48
        again = create("2001:db8:7::2")  # the first /64: its own budget is used up too
        assert again.json()["error"]["message"].startswith(
            "too many account creations from this address")


def _responses(c: httpx.Client, path: str, status: int) -> int:
    """shardex_http_responses_total of GET ``path`` with ``status`` (0: none yet)."""
    label = f'{{method="GET",path="{path}",status="{status}"}} '
    line = next((x for x in c.get("/metrics").text.splitlines()
                 if x.startswith("shardex_http_responses_total" + label)), None)
    return 0 if line is None else int(float(line.split()[1]))


def test_public_reads_per_client_address_are_limited() -> None:
    """``PUBLIC_RATE_PER_S`` 1, ``PUBLIC_BURST`` 3: three reads of public routes from
    127.0.0.3 pass, the fourth (any public route) is 429 with ``Retry-After`` and counted in
    /metrics; that address's authenticated requests, another address, and a client a trusted
    proxy names (127.0.0.1 with X-Forwarded-For) each keep their own budget; a second later
    one more read passes."""
    settings = Settings(public_rate_per_s=1, public_burst=3, api_key_rate_per_s=0,
                        signups_per_min=0)
    with LocalHttpPlatform(settings) as p, \
            httpx.Client(base_url=p.base_url, timeout=10,
                         transport=httpx.HTTPTransport(local_address="127.0.0.3")) as c, \
            httpx.Client(base_url=p.base_url, timeout=10,
                         transport=httpx.HTTPTransport(local_address="127.0.0.4")) as other:
        h = signup(c)
        tick(p, other, "SOL", "100.00", "100.01")  # its reads of the price: 127.0.0.4's budget
        assert c.get("/api/v1/assets").status_code == 200
        assert c.get("/api/v1/prices").status_code == 200
        assert c.get("/api/v1/klines", params={"asset": "SOL", "interval": "1m"}).status_code \
            == 200
        for path in ("/api/v1/klines", "/healthz", "/metrics", "/openapi.json"):
            r = c.get(path, params={"asset": "SOL", "interval": "1m"})
            assert retry_after(r) == 1, path
            assert r.json()["error"]["message"] == \
                "too many public requests from this address; retry in 1 s"
        assert c.get("/api/v1/state", headers=h).status_code == 200
        for forwarded in ("10.0.0.1", "10.0.0.2"):
            with httpx.Client(base_url=p.base_url, timeout=10,
                              headers={"X-Forwarded-For": forwarded}) as proxied:
                assert [proxied.get("/api/v1/assets").status_code for _ in range(4)] == \
                    [200, 200, 200, 429]
        with httpx.Client(base_url=p.base_url, timeout=10,
                          transport=httpx.HTTPTransport(local_address="127.0.0.5")) as third:
            assert _responses(third, "/api/v1/klines", 429) == 1
        time.sleep(1.1)
        assert c.get("/api/v1/prices").status_code == 200
        assert c.get("/api/v1/prices").status_code == 429


def test_open_positions_per_account_are_limited() -> None:
    """MAX_OPEN_POSITIONS=3: the fourth open answers 409 TOO_MANY_POSITIONS in the SPEC error
    shape and locks nothing (a clientOrderId keeps that first answer); once one is closed an
    open is accepted again. Another account has its own limit."""
    settings = Settings(max_open_positions=3, api_key_rate_per_s=0, signups_per_min=0)
    with LocalHttpPlatform(settings) as p, httpx.Client(base_url=p.base_url, timeout=10) as c:
        h, other = signup(c), signup(c)
        tick(p, c, "SOL", "100.00", "100.01")
        order = {"asset": "SOL", "type": "long", "margin": "10", "leverage": 2}
        ids = [open_position(c, h, **order)["positionId"] for _ in range(3)]
        r = c.post("/api/v1/positions/open", json=order, headers=h)
        assert r.status_code == 409, r.text
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        assert body["error"]["code"] == "TOO_MANY_POSITIONS"
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        keyed = {**order, "clientOrderId": "one-too-many"}
        r = c.post("/api/v1/positions/open", json=keyed, headers=h)
        assert r.status_code == 409 and error_code(r) == "TOO_MANY_POSITIONS", r.text
        account = state(c, h)
        assert account["balances"]["margin"] == "30.000000"
        assert sorted(open_ids(c, h)) == sorted(ids)
        assert open_position(c, other, **order)["positionId"] not in ids
        r = c.post("/api/v1/positions/close", json={"positionId": ids[0]}, headers=h)
        assert r.status_code == 200, r.text
        assert open_position(c, h, **order)["positionId"] not in ids
        r = c.post("/api/v1/positions/open", json=order, headers=h)
        assert r.status_code == 409 and error_code(r) == "TOO_MANY_POSITIONS", r.text
        r = c.post("/api/v1/positions/close", json={"positionId": ids[1]}, headers=h)
        assert r.status_code == 200, r.text
        # the clientOrderId's first answer stays; a new request opens
        r = c.post("/api/v1/positions/open", json=keyed, headers=h)
        assert r.status_code == 409 and error_code(r) == "TOO_MANY_POSITIONS", r.text
        assert open_position(c, h, **order)["positionId"] not in ids
        assert len(open_ids(c, h)) == 3
        doc = c.get("/openapi.json").json()
        answers = doc["paths"]["/api/v1/positions/open"]["post"]["responses"]
        assert "TOO_MANY_POSITIONS" in answers["409"]["description"]
        assert p.audit() == []


def test_client_order_ids_held_per_account_are_limited() -> None:
    """MAX_CLIENT_ORDER_IDS=2: with two clientOrderIds held, an open with a third answers 429
    RATE_LIMITED with Retry-After (until the oldest expires: the TTL, a day) and locks nothing;
    a retry of a held one gets its first answer, an open without one is served, and another
    account has its own bound. Before, every new clientOrderId was kept for the TTL."""
    settings = Settings(max_client_order_ids=2, api_key_rate_per_s=0, signups_per_min=0,
                        public_rate_per_s=0)
    with LocalHttpPlatform(settings) as p, httpx.Client(base_url=p.base_url, timeout=10) as c:
        h, other = signup(c), signup(c)
        tick(p, c, "SOL", "100.00", "100.01")
        order = {"asset": "SOL", "type": "long", "margin": "10", "leverage": 2}
        first = open_position(c, h, **order, clientOrderId="a")
        open_position(c, h, **order, clientOrderId="b")
        r = c.post("/api/v1/positions/open", json={**order, "clientOrderId": "c"}, headers=h)
        assert 86_000 <= retry_after(r) <= 86_400, r.headers
        assert "clientOrderIds" in r.json()["error"]["message"]
        assert state(c, h)["balances"]["margin"] == "20.000000"
        assert len(open_ids(c, h)) == 2
        r = c.post("/api/v1/positions/open", json={**order, "clientOrderId": "a"}, headers=h)
        assert r.is_success and r.json() == first, r.text  # its first answer
        open_position(c, h, **order)
        open_position(c, other, **order, clientOrderId="c")
        assert state(c, h)["balances"]["margin"] == "30.000000"
        assert p.audit() == []



GET_ASSETS = b"GET /api/v1/assets HTTP/1.1\r\nHost: x\r\n\r\n"


def _connect(port: int, client: str) -> socket.socket:
    """A connection to ``port`` from the loopback address ``client``."""
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(client, 0))


def _served(sock: socket.socket) -> bool:
    """Whether a GET of the assets on ``sock`` (kept open) is answered 200."""
    sock.sendall(GET_ASSETS)
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
        data = sock.recv(65536)
        if not data:
            break
        answer += data
    return answer.startswith(b"HTTP/1.1 200 ")


def _refused_count(port: int) -> int:
    """shardex_http_connections_refused_total, asked from 127.0.0.1 (a proxy's address)."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        text = http.get("/metrics").text
    line = next(x for x in text.splitlines()
                if x.startswith("shardex_http_connections_refused_total "))
    return int(float(line.split()[1]))


def test_http_connections_per_client_address_are_bounded() -> None:
    """``HTTP_CONNECTIONS`` (3 here): with three open from 127.0.0.3, a fourth from it is
    answered 429 in the error shape (read whole, though the client sent its request at once),
    closed and counted in /metrics; the three are served on, and so is another address; once
    one of the three closes, a new one is taken. 127.0.0.1 is the replica's proxy (its node's
    address): its connections carry other clients' requests and are not counted."""
    with LocalHttpPlatform(Settings(http_connections=3)) as p:
        port = int(p.base_url.rsplit(":", 1)[1])
        held = [_connect(port, "127.0.0.3") for _ in range(3)]
        proxied = [_connect(port, "127.0.0.1") for _ in range(5)]
        try:
            assert all(_served(s) for s in held + proxied)
            before = _refused_count(port)
            with _connect(port, "127.0.0.3") as sock:
                sock.sendall(GET_ASSETS)
                answer = b""
                while data := sock.recv(65536):
                    answer += data
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 429 "), answer[:300]
            assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower()
            assert json.loads(body) == {"error": {
                "code": "RATE_LIMITED", "message": "at most 3 HTTP connections per client "
                "address; send requests over the ones open"}}
            assert _refused_count(port) == before + 1
            assert all(_served(s) for s in held + proxied)
            with _connect(port, "127.0.0.4") as sock:
                assert _served(sock)
            held.pop().close()
            deadline = time.monotonic() + 10
            while True:  # taken once the server has seen the close
                with _connect(port, "127.0.0.3") as sock:
                    if _served(sock):
                        break
                assert time.monotonic() < deadline, "no connection taken after one closed"
                time.sleep(0.05)
        finally:
            for s in held + proxied:
                s.close()


def test_a_websocket_is_not_counted_as_an_http_connection() -> None:
    """A connection upgraded to a WebSocket leaves the HTTP count of its address (2 here):
    three WebSockets at once from 127.0.0.3 are taken (``WS_CONNECTIONS`` counts those), and
    after they close, two HTTP connections from it are served."""
    import websockets

    with LocalHttpPlatform(Settings(http_connections=2)) as p:
        port = int(p.base_url.rsplit(":", 1)[1])

        async def three_websockets() -> None:
            sockets = [await websockets.connect(f"ws://127.0.0.1:{port}/ws",
                                                local_addr=("127.0.0.3", 0))
                       for _ in range(3)]
            for ws in sockets:  # each served: an unknown method gets an error frame
                await ws.send('{"method":"JUMP","params":[]}')
                error = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert error["error"]["code"] == "INVALID_REQUEST", error
            for ws in sockets:
                await ws.close()

        asyncio.run(three_websockets())
        held = [_connect(port, "127.0.0.3") for _ in range(2)]
        try:
            assert all(_served(s) for s in held)
        finally:
            for s in held:
                s.close()
