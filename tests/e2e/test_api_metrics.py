"""``GET /metrics`` over a real socket, as a Prometheus server scrapes it: the text its parser
reads, one series per route (whatever paths and methods clients make up), counters that only
go up."""

from __future__ import annotations

import contextlib
import socket
import urllib.parse

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tests.e2e.http_platform import HttpPlatform

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(http: httpx.Client) -> Series:
    """Every sample of /metrics, ``(name, sorted labels) -> value``, as Prometheus parses it."""
    r = http.get("/metrics")
    assert r.status_code == 200, r.text
    out: Series = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"series twice: {key}"
            out[key] = s.value
    return out


def responses(series: Series) -> dict[tuple[str, str, str], float]:
    """``shardex_http_responses_total`` by (method, path, status)."""
    out = {}
    for (name, labels), value in series.items():
        if name == "shardex_http_responses_total":
            shown = dict(labels)
            out[(shown["method"], shown["path"], shown["status"])] = value
    return out


def port_of(platform: HttpPlatform) -> int:
    """The loopback port ``platform`` serves on."""
    port = urllib.parse.urlsplit(platform.base_url).port
    assert port is not None
    return port


def ask(port: int, method: str, target: str) -> bytes:
    """The status line of ``method target`` sent as written (no client reshapes it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                     .encode())
        answer = b""
        while b"\r\n" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


def test_every_route_is_counted_under_its_own_template(http: httpx.Client) -> None:
    """The terminal's page and files, ``/docs`` and ``/ws`` asked without an upgrade each
    count under their route. The routes were taken for the counter before these were added,
    so all of them counted as ``other``, among the 404s of paths no route serves."""
    before = responses(scrape(http))
    asked = {("GET", "/", "200"): http.get("/"),
             ("GET", "/docs", "200"): http.get("/docs"),
             ("GET", "/static/{path:path}", "200"): http.get("/static/app.js"),
             ("GET", "/static/{path:path}", "404"): http.get("/static/no-such-file.js"),
             ("GET", "/ws", "426"): http.get("/ws")}
    after = responses(scrape(http))
    for key, r in asked.items():
        assert str(r.status_code) == key[2], (key, r.status_code)
        assert after.get(key, 0) == before.get(key, 0) + 1, (key, after)
    assert after.get(("GET", "other", "200"), 0) == before.get(("GET", "other", "200"), 0)


def test_paths_and_methods_clients_make_up_add_no_series(platform: HttpPlatform,
                                                         http: httpx.Client) -> None:
    """Hundreds of distinct paths (quotes, backslashes and newlines among them, escaped in the
    target) and every method the parser takes add at most one series per status under
    ``other``; the text stays one Prometheus parses, and no counter goes down."""
    http.get("/healthz")
    scrape(http)  # (a scrape counts once answered: run first, the next one showed its series)
    before = scrape(http)
    for i in range(300):
        http.get(f"/made-up/{i}")
        http.get(f"/api/v1/orders/{i}")  # one route: its template, whatever the id
    for target in ('/%22%0A%5C"', "/a%0d%0ashardex_fake 1", '/x"}', "/metrics%0A"):
        ask(port_of(platform), "GET", target)
    for method in ("PROPFIND", "MKCOL", "PURGE", "SEARCH", "LOCK", "REPORT"):
        ask(port_of(platform), method, "/healthz")
    after = scrape(http)
    new = set(responses(after)) - set(responses(before))
    assert {path for _, path, _ in new} <= {"other", "/healthz", "/api/v1/orders/{orderId}"}, new
    assert {method for method, _, _ in new} <= {"GET", "other"}, new
    assert len(new) <= 5, new
    assert not [key for key in after if key[0].startswith("shardex_fake")], after
    for key, value in before.items():
        if key[0].endswith("_total"):
            assert after.get(key, value) >= value, (key, value, after.get(key))


def answer_to(port: int, request: bytes) -> bytes:
    """The status line of the answer to ``request``, sent as written on a connection of its
    own, read until the server closes it."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer.split(b"\r\n", 1)[0]


def test_a_body_too_large_is_counted_under_its_route(platform: HttpPlatform,
                                                     http: httpx.Client) -> None:
    """The 413 comes before the router matches the path, so a route with an id in its path
    was counted under ``other``."""
    before = responses(scrape(http))
    status = answer_to(port_of(platform), b"DELETE /api/v1/orders/7 HTTP/1.1\r\nHost: x\r\n"
                                          b"Content-Length: 100000\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413 "), status
    after = responses(scrape(http))
    key = ("DELETE", "/api/v1/orders/{orderId}", "413")
    assert after.get(key, 0) == before.get(key, 0) + 1, after
    assert after.get(("DELETE", "other", "413"), 0) == before.get(("DELETE", "other", "413"), 0)


def test_the_servers_own_refusals_are_counted_under_their_route(platform: HttpPlatform,
                                                                http: httpx.Client) -> None:
    """What the HTTP server refuses before the app sees it (a request line or head it cannot
    read, a head over 64 KiB, another HTTP version) counts under its route and status, or under
    ``other``; hundreds of made-up paths and methods add a few series at most. None of these
    was counted."""
    port = port_of(platform)
    before = responses(scrape(http))
    asked = {("GET", "/api/v1/orders/{orderId}", "505"): b"GET /api/v1/orders/5 HTTP/2.0\r\n"
                                                         b"Host: x\r\n\r\n",
             ("GET", "/api/v1/assets", "505"): b"GET /api/v1/assets HTTP/3.0\r\nHost: x\r\n\r\n",
             ("POST", "/api/v1/accounts", "400"): b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\n"
                                                 b"Content-Length: 2\r\nContent-Length: 5\r\n\r\n",
             ("GET", "/healthz", "400"): b"GET /healthz HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
             ("GET", "/api/v1/prices", "431"): b"GET /api/v1/prices HTTP/1.1\r\nHost: x\r\n"
                                               b"X-Big: " + b"a" * (70 * 1024),
             ("other", "other", "400"): b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"}
    for key, request in asked.items():
        status = answer_to(port, request)
        assert status.startswith(f"HTTP/1.1 {key[2]} ".encode()), (key, status)
    after = responses(scrape(http))
    for key in asked:
        assert after.get(key, 0) == before.get(key, 0) + 1, (key, after)
    for i in range(200):
        answer_to(port, f"GET /made-up/{i} HTTP/2.0\r\nHost: x\r\n\r\n".encode())
        answer_to(port, f"MKCOL /made-up/{i}\"x\" HTTP/1.1\r\n\r\n".encode())
        answer_to(port, f"FOO{i} /made-up/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    new = set(responses(scrape(http))) - set(after)
    assert new <= {("GET", "other", "505"), ("other", "other", "400")}, new
