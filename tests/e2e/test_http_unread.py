"""An HTTP client that asks for answers and does not read them (cluster.http.server): once its
socket's buffers are full, a connection whose client takes nothing of what waits for it within
the bound is dropped, also while the server stops; a client reading slowly is served whole."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import uvloop
from cluster.http.server import SERVER_OPTIONS
from cluster.http.server import BoundedHeadProtocol
from tests.e2e.http_platform import TRADING
from tests.e2e.http_platform import LocalHttpPlatform
from tests.e2e.test_http_framing import read_answer
from tests.e2e.test_ws_unread import metric

ANSWERS = 100  # of about 50 kB each: more than the kernel's buffers take (4 MiB by default)
REQUEST = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"


class QuickStall(BoundedHeadProtocol):
    """The replica's HTTP protocol, giving a client 0.5 s to take some of its answers."""

    answer_stall_s = 0.5


@pytest.fixture
def served() -> Iterator[LocalHttpPlatform]:
    with LocalHttpPlatform(TRADING, server_options={**SERVER_OPTIONS, "http": QuickStall}) as p:
        yield p


def dropped(p: LocalHttpPlatform) -> int:
    """Connections the server has dropped for answers left unread (its /metrics)."""
    with httpx.Client(base_url=p.base_url, timeout=10) as http:
        return metric(http, "http_unread_dropped")


def dropped_reaching(p: LocalHttpPlatform, count: int, timeout_s: float = 15.0) -> int:
    """:func:`dropped`, once it reaches ``count`` or after ``timeout_s``: a connection is
    dropped once the answers made for it have filled the buffers and then the bound passed,
    a second or two on a busy machine (eight clients: 800 answers of about 50 kB to make)."""
    deadline = time.monotonic() + timeout_s
    while (now := dropped(p)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


def asking(p: LocalHttpPlatform) -> tuple[socket.socket, int]:
    """A client with a small receive buffer that has asked for ANSWERS answers, and their
    total size (bytes, heads included)."""
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as one:
        one.sendall(REQUEST)
        answer, _ = read_answer(one)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", p.port))
    sock.sendall(REQUEST * ANSWERS)
    return sock, len(answer) * ANSWERS


def read_to_end(sock: socket.socket) -> int:
    """Bytes read until the server ends the connection."""
    got = 0
    try:
        while chunk := sock.recv(1 << 16):
            got += len(chunk)
    except ConnectionResetError:
        pass
    return got


def test_a_client_that_reads_nothing_is_dropped(served: LocalHttpPlatform) -> None:
    """uvicorn waited for ever to write (the keep-alive timeout is for idle connections, the
    read deadline for requests), so the connection, its file and its queued answer stayed for
    good, and a client could hold any number of them."""
    before = dropped(served)
    sock, total = asking(served)
    with sock:
        assert dropped_reaching(served, before + 1) == before + 1
        sock.settimeout(2)  # dropped: what the kernel holds comes, then the end
        assert read_to_end(sock) < total


def test_answers_to_a_dropped_connection_go_nowhere_without_an_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """On uvloop, a Serve replica's loop, the transport of a dropped connection refuses the
    writes of the answers still being made for it (asyncio's drops them): each connection
    dropped so failed a request, its error logged with its traceback (about 6 kB), as fast as
    clients left their answers unread."""
    caplog.set_level(logging.WARNING)
    with LocalHttpPlatform(TRADING, server_options={**SERVER_OPTIONS, "http": QuickStall},
                           new_loop=uvloop.new_event_loop) as p:
        before = dropped(p)
        socks = [asking(p)[0] for _ in range(8)]
        # the buffers fill, then each connection is dropped
        assert dropped_reaching(p, before + len(socks)) == before + len(socks)
        for sock in socks:
            sock.close()
        time.sleep(0.5)  # (what the app still answered for them)
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures]


def test_the_server_stops_with_a_client_that_reads_nothing() -> None:
    """A stop waited for the connection's answer to go out: for ever."""
    p = LocalHttpPlatform(TRADING, server_options={**SERVER_OPTIONS, "http": QuickStall})
    p.start()
    sock, _ = asking(p)
    with sock:
        time.sleep(0.5)
        started = time.monotonic()
        p.stop()  # (gives up waiting after 10 s)
        assert not p.thread.is_alive()
        assert time.monotonic() - started < 3


def test_a_client_reading_slowly_gets_every_answer(served: LocalHttpPlatform) -> None:
    """Its buffers full, the client takes a few kB every 0.1 s for 2 s (a slow link): each
    check sees some taken, though asyncio's buffer does not shrink (the kernel takes more of it
    only once a third of its own buffer, megabytes here, is free)."""
    before = dropped(served)
    sock, total = asking(served)
    with sock:
        time.sleep(0.2)  # (the buffers fill)
        got = 0
        for _ in range(20):
            got += len(sock.recv(4096))
            time.sleep(0.1)
        sock.settimeout(1)  # then the rest quickly, and the connection stays open
        while got < total:
            chunk = sock.recv(1 << 16)
            assert chunk, f"closed after {got} of {total} bytes"
            got += len(chunk)
        assert got == total
    assert dropped(served) == before
