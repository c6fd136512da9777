"""How the API replica's HTTP server (cluster.http.server) puts answers on the wire, over a real
socket: a response's head and body leave in one write; an interim ``100 Continue`` still comes
before the body is sent; a HEAD is answered with its head alone."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from tests.e2e.http_platform import HttpPlatform

REQUESTS = 200


@pytest.fixture
def sock(platform: HttpPlatform) -> Iterator[socket.socket]:
    port = int(platform.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        yield s


def read_answer(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One whole answer with a Content-Length, and the size of each read that brought it."""
    data, reads = b"", []
    while b"\r\n\r\n" not in data or len(data) < _answer_length(data):
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed mid-answer: {data[:200]!r}"
        data += chunk
        reads.append(len(chunk))
    return data, reads


def _answer_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(value)
    raise AssertionError(f"no Content-Length: {head!r}")


def test_each_answer_arrives_whole_in_one_read(sock: socket.socket) -> None:
    """The client waits in recv while the server answers: had the head and the body been two
    sends, a read woken by the first would see the head alone (on two cores, often)."""
    request = b"GET /api/v1/assets HTTP/1.1\r\nHost: x\r\n\r\n"
    split = 0
    for _ in range(REQUESTS):
        sock.sendall(request)
        answer, reads = read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert b'"SOL"' in answer
        split += len(reads) > 1
    assert split == 0, f"{split} of {REQUESTS} answers came in more than one read"


def test_an_error_answer_arrives_whole_in_one_read(sock: socket.socket) -> None:
    for _ in range(REQUESTS // 4):
        sock.sendall(b"GET /api/v1/positions HTTP/1.1\r\nHost: x\r\n\r\n")
        answer, reads = read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        assert b'"error"' in answer
        assert len(reads) == 1, reads


def test_a_100_continue_comes_before_the_body_is_sent(sock: socket.socket) -> None:
    body = b"{}"
    sock.sendall(b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    interim = sock.recv(65536)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
    sock.sendall(body)
    answer, _ = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]


def test_a_head_request_is_answered_with_its_head_and_the_connection_serves_on(
        sock: socket.socket) -> None:
    sock.sendall(b"HEAD /api/v1/assets HTTP/1.1\r\nHost: x\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n"), head
    sock.sendall(b"GET /api/v1/assets HTTP/1.1\r\nHost: x\r\n\r\n")
    answer, _ = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"SOL"' in answer, answer[:200]
