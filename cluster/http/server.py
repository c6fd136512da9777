"""The API replica's HTTP server (uvicorn, built by Serve): its WebSocket settings, bounds on
each request's head, and the answers it gives itself.

Serve 2.60 builds the direct-ingress server's ``uvicorn.Config`` itself and offers neither
option, so :func:`configure_uvicorn` gives this process's ``uvicorn.Config`` these defaults;
it runs in the replica, before its server starts.

- WebSocket: ``WS_SERVER_OPTIONS`` (uvicorn's own would ping within 20 s, so close after 40 s
  of silence, not SPEC's 60, and read client frames up to 16 MiB).
- The request head: uvicorn's httptools protocol reads a request line and headers of any size,
  and parsing a header takes time growing with the square of its length, all of it on the
  replica's event loop, where every other request waits (figures in the README). A head larger
  than :data:`MAX_HEAD_BYTES` is answered 431 with SPEC's error shape and the connection closed;
  one whose query has more than :data:`MAX_QUERY_PARAMETERS` parameters, 400 (parsed by the
  app a few times over, thousands of them took tens of ms of the loop per request).
- Time to send a request: uvicorn waits for a request's head and body as long as a client
  likes, and for the first request of a new connection with no limit at all, so a client
  dribbling heads could hold connections open until the replica runs out of files. A
  connection that has not sent a whole request within :data:`READ_TIMEOUT_S` of its first byte
  (or of connecting) is closed, with a 408 in SPEC's error shape when part of a request head had
  come. Between requests uvicorn's keep-alive timeout applies.
- Requests sent without reading the answers (HTTP/1.1 pipelining): uvicorn parses all that a
  read holds and queues every request behind the one being answered, thousands per read of
  small ones, so a client that never reads could grow the replica's memory as fast as it
  sends. A read is fed to the parser in slices of :data:`FEED_SLICE_BYTES`; once
  :data:`MAX_PIPELINED` requests wait, the rest of it is kept unparsed and reading stops, and
  it is parsed as answers go out.
- Answers not read: uvicorn writes an answer whole to the transport, then waits to write more
  (the next answer, a streamed one's next part) and a closed transport waits to send what it
  holds (at the keep-alive timeout, when the server stops) for as long as the client takes
  nothing, so a client asking and never reading held its connection, its file and its answers
  for good, and the server's stop waited for it. A connection whose client takes none of what
  waits for it within :data:`ANSWER_STALL_S` is dropped and counted (:data:`DROPPED`); a client
  reading however slowly is not (:class:`_StallWatch`).
- A request asking for another protocol (``CONNECT``, or an ``Upgrade`` other than websocket,
  such as ``curl --http2``'s h2c): uvicorn's parser reads nothing after its head, so one with
  a body is refused (400) and one without is answered as plain HTTP; the connection closes
  after either, since what follows on it is not read as HTTP.
- A WebSocket handshake pipelined behind requests not yet answered is refused (400) after
  their answers (upgraded at once, its 101 came first and their answers inside the WebSocket).
- A refusal of a request pipelined behind others waits for their answers (written at once, it
  took their place, and the connection closed: their requests had run, their answers were lost).
- A chunked body's trailer fields are dropped, and bound as a head is (uvicorn added them to
  the request's headers, without a bound).
- The HTTP version: a request line of any version but 1.0 and 1.1 is refused (505) and the
  connection closed; uvicorn served an HTTP/2.0 (or 0.9) one as 1.1, and refused others as
  malformed (400), as it still does a version that is no ``HTTP/<digit>.<digit>``.
- ``Host`` (RFC 9112 3.2): a request naming its host twice or not as a host[:port], or an
  HTTP/1.1 one naming none, is refused (400); uvicorn served it.
- Answers of the layers under the app, in SPEC's error shape like the app's: a WebSocket
  handshake websockets refuses (no key, an unknown version: its answer is plain text; a head
  it cannot read, such as one with a body: it neither answers nor closes) or the app refuses
  (uvicorn's is an empty 403), a handshake the app has not answered when the server stops
  (503 with ``Retry-After``, where uvicorn's is a 500), and a request target that is not a
  path (``OPTIONS *``, which Serve's router answers in plain text).
- A WebSocket the server closes (a limit, a ping unanswered) whose client takes none of what
  is sent to it within :data:`CLOSE_FLUSH_S` is dropped: its close frame waited, as every
  frame, for the client to read, and a closed transport for its buffer to drain, so a client
  that reads nothing held its connection for good.
- A WebSocket text message that is not UTF-8 fails the connection with 1007 and a reason;
  uvicorn logged it as an error, with its traceback, for every client sending one.
- Its own refusals (the 400s, 408s, 431s and 505s above) are counted (:data:`REFUSED`) by
  method, route and status as the app counts its answers; uvicorn's went uncounted.
- uvicorn logs a warning for every request its parser refuses, so any client could add log
  lines as fast as it sends: :data:`PARSER_REFUSALS` lets one through a minute, counting the
  others. Serve sets uvicorn's logger to CRITICAL (so that uvicorn adds no per-message logging
  middleware, which it does at TRACE), which silenced these warnings and uvicorn's errors:
  once uvicorn has built the app, its logger is at WARNING again.
- The client's address: ``X-Forwarded-For`` is read only from the proxies given to
  :func:`configure_uvicorn` (the API replica passes its node's addresses, where the front door
  of cluster.http.front_door runs).
- Connections per client address: uvicorn takes as many as the process may open files, so one
  client holding connections open (reading its answers slowly, or asking again within the
  keep-alive timeout) could take all of them. A client address (cluster.http.limits.client_of)
  holds at most ``HTTP_CONNECTIONS`` at once; the next is answered 429 and closed. The
  proxies' own connections carry other clients' requests and are not counted (the front door
  bounds its clients itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import re
import struct
import sys
import termios
import time
import urllib.parse
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, cast

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Response as HandshakeResponse
from websockets.server import ServerProtocol

from cluster.http.bounds import (
    MAX_HEAD_BYTES,
    MAX_QUERY_PARAMETERS,
    READ_TIMEOUT_S,
    body_too_large,
    raw_error,
)
from cluster.http.errors import INTERNAL_ERROR, METHOD_NOT_ALLOWED, error_body, error_response
from cluster.http.limits import client_of
from cluster.live.streams import WS_SERVER_OPTIONS
from engine.results import Code


def _refusal(status: str, message: str) -> bytes:
    """A whole HTTP response in SPEC's error shape (INVALID_REQUEST), closing the connection."""
    return raw_error(status, Code.INVALID_REQUEST.value, message)


MALFORMED = "malformed HTTP request"
TOO_LARGE = _refusal("431 Request Header Fields Too Large",
                     f"request line and headers over {MAX_HEAD_BYTES} bytes")
MANY_PARAMETERS = _refusal("400 Bad Request", "a query of more than "
                           f"{MAX_QUERY_PARAMETERS} parameters")
UNSUPPORTED_CODING = _refusal("400 Bad Request", f"{MALFORMED}: Transfer-Encoding other than "
                              "chunked (no other coding is applied)")
PIPELINED_HANDSHAKE = _refusal("400 Bad Request",
                               "a WebSocket handshake sent behind requests not yet answered: "
                               "send it after their answers, or on a connection of its own")
HANDSHAKE_OF_1_0 = _refusal("400 Bad Request",
                            f"{MALFORMED}: a WebSocket handshake is an HTTP/1.1 request")
UPGRADE_WITH_BODY = _refusal("400 Bad Request",
                             "a request asking for another protocol (CONNECT, or an Upgrade "
                             "other than websocket) cannot carry a body; send it without")

SPOKEN_VERSIONS = ("1.0", "1.1")
"""The HTTP versions served; a request of another is answered 505 (:func:`_unspoken`)."""
BAD_VERSION = "Invalid HTTP version"
"""The parser's error for a version it read as two digits and does not take (llhttp's
``HPE_INVALID_VERSION``; a version that is no ``<digit>.<digit>`` is another error)."""


def _unspoken(version: str) -> bytes:
    """The refusal of a request of HTTP ``version`` (``"2.0"``), one not in
    :data:`SPOKEN_VERSIONS`."""
    return _refusal("505 HTTP Version Not Supported",
                    f"HTTP version {version} not supported (HTTP/1.0 and 1.1 are)")


HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})+)"
                  rb"(?::[0-9]*)?")
"""A ``Host`` value (RFC 9110 7.2): an IPv6 literal, or a name or IPv4 address (RFC 3986's
reg-name, never empty in an http URI), and an optional port."""
HOST_OPTIONAL = ("1.0",)
"""HTTP versions whose requests may name no host (HTTP/1.1 made ``Host`` required)."""


class SparseLog(logging.Filter):
    """Lets through one record of ``message`` per ``every_s`` seconds; the next one let
    through tells how many were left out since."""

    def __init__(self, message: str, every_s: float) -> None:
        super().__init__()
        self.message = message
        self.every_s = every_s
        self.next_s = 0.0  # monotonic time from which one is let through again
        self.left_out = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.message:
            return True
        now_s = time.monotonic()
        if now_s < self.next_s:
            self.left_out += 1
            return False
        self.next_s = now_s + self.every_s
        if self.left_out:
            record.msg = f"{self.message} ({self.left_out} more left out of this log before)"
            self.left_out = 0
        return True


PARSER_REFUSALS = SparseLog("Invalid HTTP request received.", every_s=60.0)
"""uvicorn's warning for each request its parser refuses (the request is answered 400)."""


MAX_PIPELINED = 32
"""Most requests a connection may have parsed and waiting behind the one being answered."""
FEED_SLICE_BYTES = 4096
"""A read is parsed in slices of this size while requests wait (each slice may add a few
dozen small requests to the wait)."""


ANSWER_STALL_S = 10.0
"""How long a client may take none of the answers waiting for it (in this process's buffer, or
the kernel's unacknowledged) before its connection is dropped; checked every as long, so a
connection goes 10-20 s after the client's last read."""
DROPPED: Counter[str] = Counter()
"""Connections this process's server dropped, by why (``unread``: answers not taken;
``per_address``: over the connections a client address may hold)."""

REFUSED: dict[int | None, Counter[tuple[str, str, int]]] = {}
"""Requests this process's servers refused themselves, before any app saw them (400, 408, 431,
505): per server, by the port it serves (an app shows those of the server it is asked through,
not another's in the process), then by method, route and status as :data:`refusal_labels`
names them."""


def _unnamed(method: str, path: str) -> tuple[str, str]:
    return "other", "other"


refusal_labels: Callable[[str, str], tuple[str, str]] = _unnamed
"""``(method, path) -> (method, route)``: the labels of a refused request, as the app served in
this process labels its own answers (cluster.http.api.create_app sets them), from a bounded
set: a client makes up as many methods and paths as it likes. ``""``: not read (or no path)."""

REFUSED_LINGER_S = 1.0
"""How long a connection refused for its address waits for its client to close after the
answer: closed at once, a request already received would make the kernel reset the
connection, and the client could lose the answer; held longer, refused connections would
hold files themselves."""
_HELD: weakref.WeakKeyDictionary[Any, Counter[str]] = weakref.WeakKeyDictionary()
"""Per server (its uvicorn ``ServerState``): the HTTP connections open per client address."""


def _kernel_unacked(transport: asyncio.BaseTransport) -> int:
    """Bytes written to the transport's socket that the client's TCP has not acknowledged
    (Linux's SIOCOUTQ); 0 where that cannot be asked."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    with contextlib.suppress(OSError, ValueError):
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                  bytes(4)))[0])
    return 0


class _StallWatch:
    """A connection's transport that drops the connection when its client takes nothing of
    what waits for it within ``stall_s``: asyncio's write, and its close, wait for the client
    for ever, holding the connection, its file and what is queued for it. Everything else is
    the transport's.

    Watched while something waits in asyncio's buffer: from the first write that leaves some
    there (``from_writes``, plain HTTP), or from the close only (a WebSocket, which bounds
    what it queues itself). Taken is what was written less what waits in asyncio's buffer and
    in the kernel's: the kernel takes from asyncio's buffer only once a third of its own
    (megabytes) is free, so a client reading slowly may see asyncio's buffer unchanged for
    long. A drop is counted in :data:`DROPPED` under ``counted`` (None: not counted).
    """

    def __init__(self, transport: asyncio.Transport, stall_s: float, from_writes: bool,
                 counted: str | None = None) -> None:
        self.transport = transport
        self._stall_s = stall_s
        self._armed = from_writes
        self._counted = counted
        self._written = 0  # bytes, since the connection began
        self._taken = 0  # bytes taken at the last check
        self._timer: asyncio.TimerHandle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.transport.write(data)
        except RuntimeError:
            if not self.transport.is_closing():
                raise
            # closed (dropped here, or its client gone) while an answer was still being
            # made: uvloop refuses the write, which asyncio drops; the answer has nowhere to
            # go, and its request must not fail for it (an error and a traceback logged for
            # every connection a client left unread)
            return
        self._written += len(data)
        self._watch()

    def close(self) -> None:
        self.transport.close()
        self._armed = True
        self._watch()

    def stop(self) -> None:
        """The connection ended (or is handed on): no drop is due."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _watch(self) -> None:
        if self._armed and self._timer is None and self.transport.get_write_buffer_size():
            self._taken = self._taken_now()
            self._timer = asyncio.get_running_loop().call_later(self._stall_s, self._check)

    def _taken_now(self) -> int:
        return (self._written - self.transport.get_write_buffer_size()
                - _kernel_unacked(self.transport))

    def _check(self) -> None:
        self._timer = None
        # all taken, or the connection gone (asyncio's abort of a transport its client
        # ended raises: its loop is gone)
        if not self.transport.get_write_buffer_size():
            return
        taken = self._taken_now()
        if taken <= self._taken:
            if self._counted is not None:
                DROPPED[self._counted] += 1
            self.transport.abort()
            return
        self._taken = taken
        self._timer = asyncio.get_running_loop().call_later(self._stall_s, self._check)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request head passes
    :data:`MAX_HEAD_BYTES` (with a 431) or whose request does not arrive within
    :data:`READ_TIMEOUT_S` (with a 408 if its head had begun).

    The parser tells when a head ends, not where, so a head is counted in the slices a read is
    parsed in (:data:`FEED_SLICE_BYTES`): each slice that leaves a head unfinished adds its
    size, and a slice in which a head ended starts the count of the next (pipelined) one at
    zero. A valid request is never refused, and the parser gathers at most
    ``MAX_HEAD_BYTES`` plus two slices of a head.

    Pipelined requests wait at most :data:`MAX_PIPELINED` (plus one slice's) at a time: what
    follows them stays unparsed (``_unparsed``, at most one read) with reading paused, and is
    parsed as their answers complete.

    Answers the client takes none of within ``answer_stall_s`` drop the connection
    (:class:`_StallWatch`).
    """

    answer_stall_s = ANSWER_STALL_S
    per_address = 0
    """Most HTTP connections a client address may hold open (0: any number); see
    :func:`server_options`."""
    proxies: frozenset[str] = frozenset()
    """Addresses whose connections are not counted: proxies, carrying other clients'."""
    max_body_bytes: int | None = None
    """A request declaring a longer body is answered 413 as its head ends (None: the app's
    limit alone)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._address: str | None = None  # the client address this connection is counted by
        self.logger.addFilter(PARSER_REFUSALS)  # (once: a filter is added only if absent)
        self._head_open = True  # a request's head is being read
        self._head_ended = False  # a head ended during the current read
        self._head_begun = False  # a byte of the head being read has come
        self._head_bytes = 0
        self._reading_since: float | None = None  # loop time the request being read began
        self._timer: asyncio.TimerHandle | None = None  # checks _reading_since (lazily)
        self._unparsed = b""  # received behind MAX_PIPELINED waiting requests
        # a refusal of a pipelined request, held until the requests before it are answered
        # (written at once, it took the place of their answers, lost though they had run)
        self._refusal: bytes | None = None
        # the newest cycle when the request being read began: one refused before it has its own
        self._before: RequestResponseCycle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # every write (the cycles', refusals') goes through the watch; reading, its flow
        # control, is the transport's
        self._watch = _StallWatch(transport, self.answer_stall_s, from_writes=True,
                                  counted="unread")
        self.transport = cast(asyncio.Transport, self._watch)
        if not self._count_address():
            DROPPED["per_address"] += 1
            # nothing the client sends is read
            self._refusal = raw_error(
                "429 Too Many Requests", Code.RATE_LIMITED.value,
                f"at most {self.per_address} HTTP connections per client address; "
                "send requests over the ones open", headers={"retry-after": "1"})
            self.transport.write(self._refusal)
            self.transport.write_eof()
            self.loop.call_later(REFUSED_LINGER_S, self.transport.abort)
            return
        self._arm()

    def _count_address(self) -> bool:
        """Count this connection by its client's address: False if that holds
        :attr:`per_address` already."""
        if not self.per_address or self.client is None:
            return True
        host = self.client[0]
        address = client_of(host)
        if host in self.proxies or address in self.proxies:
            return True
        held = _HELD.setdefault(self.server_state, Counter())
        if held[address] >= self.per_address:
            return False
        held[address] += 1
        self._address = address
        return True

    def _release_address(self) -> None:
        if self._address is not None:
            held = _HELD[self.server_state]
            held[self._address] -= 1
            if not held[self._address]:
                del held[self._address]
            self._address = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._release_address()
        self._watch.stop()
        self._disarm()
        self._unparsed = b""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:  # nothing after a refused request is read
            return
        if self._unparsed:  # a read that came before reading paused
            self._unparsed += data
            return
        for start in range(0, len(data), FEED_SLICE_BYTES):
            if len(self.pipeline) >= MAX_PIPELINED:
                self._unparsed = data[start:]
                self.flow.pause_reading()
                return
            self._feed(data[start:start + FEED_SLICE_BYTES])  # (a read within one slice: itself)
            if self._stopped() or self.transport.get_protocol() is not self:
                return  # refused, or upgraded to a WebSocket (the rest is not HTTP)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the next waiting request, resumes reading
        if self._refusal is not None and not self._answering():
            refusal, self._refusal = self._refusal, None
            self._refuse(refusal)
            return
        if self._unparsed and not self.transport.is_closing():
            unparsed, self._unparsed = self._unparsed, b""
            if self._reading_since is not None:  # the deadline counts from here again
                self._reading_since = self.loop.time()
            self.data_received(unparsed)  # before any later read: the loop calls those

    def _feed(self, data: bytes) -> None:
        self._head_ended = False
        super().data_received(data)
        if not self._head_open or self._head_ended or self._stopped():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(TOO_LARGE)

    def _declared_body(self) -> int:
        """The request's ``Content-Length`` (0 without one: a chunked body is counted as it
        comes, by the app's limit; one the parser took is digits alone)."""
        for name, value in self.headers:
            if name == b"content-length" and value.strip().isdigit():
                return int(value)
        return 0

    def send_400_response(self, msg: str) -> None:
        """A request the parser refuses (two Content-Lengths, both Content-Length and chunked,
        a folded header...): uvicorn's plain-text 400, in SPEC's error shape; a 505 for a
        version the parser does not take (uvicorn calls this while handling its error)."""
        error = sys.exc_info()[1]
        if error is not None and str(error) == BAD_VERSION:
            self._refuse(_unspoken(self.parser.get_http_version()))
            return
        self._refuse(_refusal("400 Bad Request", f"{MALFORMED}: {msg}"))

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # a target that is not a path ("OPTIONS *"): Serve's router answers it in plain text
        if not cycle.scope["path"].startswith("/"):
            app = _NOT_A_PATH
        if cycle.scope["method"] != "HEAD":  # a HEAD's answer has no body to join its head to
            cycle.transport = _HeadWithBody(self.transport, cycle)  # type: ignore[assignment]
        super()._start_asgi_task(cycle, app)

    def on_message_begin(self) -> None:
        if self._refusal is not None:  # a request after one refused in the same read
            return
        self._before = self.cycle
        super().on_message_begin()
        self._head_open = self._head_begun = True
        self._arm()

    def on_headers_complete(self) -> None:
        if self._stopped():  # a request after one refused in the same read
            return
        self._head_open = False
        self._head_ended = True
        self._head_begun = False
        self._head_bytes = 0
        # the parser takes 0.9 and 2.0 too, read then as 1.1 (a version before Host's rules)
        if (version := self.parser.get_http_version()) not in SPOKEN_VERSIONS:
            self._refuse(_unspoken(version))
            return
        if version == "1.0" and self.parser.should_upgrade() and self._should_upgrade():
            self._refuse(HANDSHAKE_OF_1_0)  # RFC 6455 4.1 (one was upgraded, 101)
            return
        if (fault := self._host_fault()) is not None:
            self._refuse(_refusal("400 Bad Request", f"{MALFORMED}: {fault}"))
            return
        if self.url.partition(b"?")[2].count(b"&") >= MAX_QUERY_PARAMETERS:
            self._refuse(MANY_PARAMETERS)  # before anything parses them
            return
        if self.max_body_bytes is not None and self._declared_body() > self.max_body_bytes:
            # here, not only in the app: Serve's ingress reads a body before the app sees
            # it, which tells a client that sent `Expect: 100-continue` to go on (100
            # Continue) and the 413 came once it had begun to send what is refused
            self._refuse(_refusal("413 Request Entity Too Large",
                                  body_too_large(self.max_body_bytes)))
            return
        codings = [c.strip().lower() for name, value in self.headers
                   if name == b"transfer-encoding" for c in value.split(b",")]
        if codings and codings != [b"chunked"]:
            # the parser reads any list ending in chunked as chunked and ignores the rest
            # (RFC 9112 6.1 asks to refuse a coding the server does not apply): a proxy in
            # front that reads the list otherwise would see another body than this server
            self._refuse(UNSUPPORTED_CODING)
            return
        if not self.parser.should_upgrade() or self._should_upgrade():
            super().on_headers_complete()  # plain HTTP, or a WebSocket handshake
            return
        # CONNECT, or an Upgrade other than websocket (h2c...): the parser reads nothing after
        # this head, taking the rest of the connection for the other protocol, so a body
        # would be lost and anything after it read as a new request
        if any(name == b"transfer-encoding" or (name == b"content-length" and value.strip()
                                                 not in (b"", b"0"))
               for name, value in self.headers):
            self._refuse(UPGRADE_WITH_BODY)
            return
        super().on_headers_complete()  # served as plain HTTP (its cycle made there) ...
        self.cycle.keep_alive = False  # ... then the connection closes

    def _host_fault(self) -> str | None:
        """Why the request's ``Host`` headers break RFC 9112 3.2 (a server MUST answer 400:
        which host a request is for must not depend on who reads it), or None."""
        hosts = [value for name, value in self.headers if name == b"host"]
        if not hosts:
            if self.parser.get_http_version() in HOST_OPTIONAL:
                return None
            return "no Host header (required since HTTP/1.1)"
        if len(hosts) > 1:
            return "more than one Host header"
        if not HOST.fullmatch(hosts[0].strip(b" \t")):
            return "the Host header is not a host[:port]"
        return None

    def handle_websocket_upgrade(self) -> None:
        # the parser reports the upgrade of a handshake refused as its head ended too: uvicorn
        # handed it to the WebSocket protocol, failing on the scope it never made (logged as
        # a fatal error of the connection)
        if self._stopped():
            return
        if self._answering():
            # behind requests still being answered: upgraded at once, its 101 and its frames
            # went out before their answers, which then came inside the WebSocket's stream
            # (RFC 9112 9.3.2: answers go in the order of the requests)
            self._refuse(PIPELINED_HANDSHAKE)
            return
        self._watch.stop()  # the WebSocket has its own bounds on what it leaves unsent
        self.transport = self._watch.transport
        self._release_address()  # WebSockets are counted by the app (WS_CONNECTIONS)
        super().handle_websocket_upgrade()

    def on_chunk_header(self) -> None:
        # after a last chunk the parser reads trailer fields as headers: RFC 9110 6.5.1 forbids
        # merging them into the request's (uvicorn did: an API key in one authenticated the
        # request, past a proxy's view of the headers), so they go to a list nobody reads,
        # and are bound as a head is (uvicorn kept any amount)
        self.headers = []
        self._head_open = True  # until this chunk's data, or its end
        self._head_bytes = 0

    def on_chunk_complete(self) -> None:
        self._head_open = False

    def on_body(self, body: bytes) -> None:
        self._head_open = False  # a chunk's data (see on_chunk_header)
        if not self._stopped():  # not the body of a request after a refused one
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()  # also before an upgrade: the WebSocket is not bound by the deadline
        self._before = self.cycle  # what follows is another request (or bytes that are none)
        if not self._stopped():  # not a request refused as its head ended
            super().on_message_complete()

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn logs each request with an unsupported Upgrade: it is answered here
        (:meth:`on_headers_complete`), and any client can send as many."""

    # One timer per connection, not per request: a request's start and end only set and clear
    # _reading_since; the timer, when it fires, waits again for what is left of the deadline.
    def _arm(self) -> None:
        self._reading_since = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_later(READ_TIMEOUT_S, self._check)

    def _disarm(self) -> None:
        self._reading_since = None

    def _check(self) -> None:
        self._timer = None
        if self._reading_since is None or self.transport.is_closing():
            return
        left = self._reading_since + READ_TIMEOUT_S - self.loop.time()
        if self._unparsed or self.flow.read_paused:
            # the rest of the request waits on this side, behind the answers to the requests
            # before it: the time is the server's, not the client's
            self._reading_since = self.loop.time()
            left = READ_TIMEOUT_S
        if left > 0:
            self._timer = self.loop.call_later(left, self._check)
            return
        cycle = self.cycle
        if self._head_begun:  # a new head: the answer to the one before may be under way
            answer = cycle is None or cycle.response_complete
        else:  # nothing came, or a head came whole and its body did not (none of its answer
            # has gone: the app waits for the body)
            answer = cycle is not None and not cycle.response_started
        if answer:
            self._refuse(_refusal("408 Request Timeout",
                                  f"request not received within {READ_TIMEOUT_S:g} s"))
        else:
            self.transport.close()

    def _refuse(self, answer: bytes) -> None:
        """Answer ``answer`` and close: at once, or, for a request that was refused before it
        had a cycle of its own, once the requests pipelined before it are answered."""
        self._head_open = False
        self._disarm()
        if self.cycle is self._before and self._answering():
            self._refusal = answer
            return
        if not self.transport.is_closing():
            port = self.server[1] if self.server else None
            REFUSED.setdefault(port, Counter())[(*self._refused_labels(), int(answer[9:12]))] += 1
            self.transport.write(answer)
            self.transport.close()

    def _refused_labels(self) -> tuple[str, str]:
        """:data:`refusal_labels` of the request being refused: its method and path as far as
        the parser read them (as uvicorn reads a path; a target cut by the head's bound is
        what came of it)."""
        url = getattr(self, "url", b"")  # (set as a request begins, its target as it comes)
        if not url:  # no target read: the method may not be either (the parser's is stale)
            return refusal_labels("", "")
        try:
            path = (httptools.parse_url(url).path or b"").decode("ascii")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            path = ""
        return refusal_labels(self.parser.get_method().decode("ascii"),
                              urllib.parse.unquote(path) if "%" in path else path)

    def _answering(self) -> bool:
        """Whether an answer to a request read before is still to be written in full."""
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def _stopped(self) -> bool:
        """A request was refused: the connection reads nothing more as HTTP."""
        return self._refusal is not None or self.transport.is_closing()


class _HeadWithBody:
    """The connection as one response cycle writes to it: the response's status line and
    headers (the cycle's first write once the response has started) are held, and go out in
    one write with the first body bytes, or alone when the cycle closes the connection first.

    uvicorn writes a response's head and its body apart: two sends, two TCP segments, and on a
    loopback client two wake-ups, per response. A body write always follows the head (an
    empty body included) except in the answer to a HEAD, which is given none of this. A
    ``100 Continue`` is written before the response starts, so it is never held.
    """

    __slots__ = ("_cycle", "_head", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self._transport = transport
        self._cycle: RequestResponseCycle | None = cycle  # until the head is held
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head + data)
        elif self._cycle is not None and self._cycle.response_started:
            self._head = data
            self._cycle = None  # nothing later is held; and no reference cycle to collect
        else:
            self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        if self._head is not None:  # the app failed after starting its answer
            self._transport.write(self._head)
            self._head = None
        self._transport.close()


# the answer to a request whose target is not a path (a Starlette Response is an ASGI app)
_NOT_A_PATH = error_response(400, Code.INVALID_REQUEST.value,
                             f"{MALFORMED}: the request target must be a path")


class _SpecHandshake(ServerProtocol):
    """websockets' server side, refusing a handshake in SPEC's error shape (its own refusals
    are plain text: a bad ``Sec-WebSocket-Key``, an unknown version, the app refusing)."""

    def reject(self, status: Any, text: str) -> HandshakeResponse:
        response = super().reject(status, text)
        status = response.status_code
        code = (Code.SERVICE_UNAVAILABLE.value if status == 503 else INTERNAL_ERROR
                if status >= 500 else METHOD_NOT_ALLOWED if status == 405
                else Code.INVALID_REQUEST.value)
        body = error_body(code, text.strip() or "the WebSocket handshake was refused")
        del response.headers["Content-Type"], response.headers["Content-Length"]
        response.headers["Content-Type"] = "application/json"
        response.headers["Content-Length"] = str(len(body))
        response.body = body
        return response


MAX_UNREAD_WS_BYTES = 1 << 20
"""Most bytes a WebSocket client may leave unread when it pings (the app's own frames wait for
the buffer to drain; a pong is written at once)."""
CLOSE_FLUSH_S = 10.0
"""How long a WebSocket client the server closes may take nothing of what is still buffered
for it (its close frame included), as long as uvicorn gives it to answer the close; then it is
dropped."""


class SpecWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol (websockets, sans-I/O) refusing handshakes with
    :class:`_SpecHandshake`, dropping a client that pings while it leaves more than
    :data:`MAX_UNREAD_WS_BYTES` unread, and one the server closes that does not take what is
    sent to it within ``close_flush_s``."""

    close_flush_s = CLOSE_FLUSH_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _SpecHandshake(extensions=self.conn.available_extensions,
                                   max_size=self.config.ws_max_size, logger=self.conn.logger)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # dropped once closed if its client takes nothing of what is still queued for it
        self._dropping = _StallWatch(cast(asyncio.Transport, self.transport),
                                     self.close_flush_s, from_writes=False)
        self.transport = cast(asyncio.Transport, self._dropping)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # (which closes the transport again)
        self._dropping.stop()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and (exc := self.conn.handshake_exc) is not None:
            # websockets refused the head uvicorn handed over (a body, over 128 headers, a
            # line over 8 KiB): uvicorn sees no request, so it neither wrote the answer
            # websockets made (if any) nor closed the connection, held open for ever
            answer = b"".join(self.conn.data_to_send()) or self.conn.reject(
                400, f"Failed to open a WebSocket connection: {exc.__cause__ or exc}.").serialize()
            self.transport.write(answer)
            self.transport.close()

    def shutdown(self) -> None:
        if self.handshake_complete or self.close_sent or self.initial_response is not None:
            super().shutdown()
            return
        # the server stops while the app has not yet answered the handshake: uvicorn answered
        # 500, as if something had failed; the client is to connect again, as after a 503
        self.stop_keepalive()
        response = self.conn.reject(503, "the server is shutting down; connect again")
        response.headers["Retry-After"] = "1"
        self.conn.send_response(response)
        self.queue.put_nowait({"type": "websocket.disconnect", "code": 1006})
        self.close_sent = self.handshake_complete = True  # as after the app's own refusal
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()

    def handle_ping(self) -> None:
        # uvicorn writes each pong straight to the socket, past the flow control the app's
        # frames wait on, and pings never reach the app's frame limits: a client pinging
        # without reading would grow the write buffer as fast as it sends. It is as gone as
        # a client too slow for its frames, and a close frame could not reach it.
        if self.transport.get_write_buffer_size() > MAX_UNREAD_WS_BYTES:
            self.transport.abort()
            return
        super().handle_ping()

    def send_receive_event_to_app(self) -> None:
        # a text message that is not UTF-8 is the client's fault (RFC 6455 8.1: fail with
        # 1007), but uvicorn logged it as an error with its traceback and closed without a
        # reason: a client opening connections one after another added 400 KB of log a second
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError as exc:
                self.frames = []
                self.conn.fail(1007, f"invalid UTF-8 in a text message at byte {exc.start}")
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    async def send(self, message: Any) -> None:
        if message["type"] == "websocket.close" and not self.writable.is_set():
            # the close frame waits, as every frame, for the client to read what is before it:
            # one that reads nothing held its connection, and the app's close, for ever
            try:
                await asyncio.wait_for(self.writable.wait(), self.close_flush_s)
            except TimeoutError:
                self.transport.abort()  # the send below is then refused: the client is gone
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            # the app answered the handshake over HTTP (a denial): uvicorn's sansio protocol
            # would log that it "returned without completing handshake"
            self.handshake_complete = True


SERVER_OPTIONS: dict[str, Any] = {
    **WS_SERVER_OPTIONS,
    "http": BoundedHeadProtocol,
    "ws": SpecWebSocketProtocol,
    "h11_max_incomplete_event_size": MAX_HEAD_BYTES,  # the same bound if h11 were chosen
}


def server_options(per_address: int, proxies: Sequence[str],
                   max_body_bytes: int | None = None) -> dict[str, Any]:
    """:data:`SERVER_OPTIONS` with ``X-Forwarded-For`` read from ``proxies`` only, at most
    ``per_address`` HTTP connections open per client address other than those (0: any), and
    a declared body over ``max_body_bytes`` (None: any) refused as its head ends."""
    http = type(BoundedHeadProtocol.__name__, (BoundedHeadProtocol,),
                {"per_address": per_address, "proxies": frozenset(proxies),
                 "max_body_bytes": max_body_bytes})
    return {**SERVER_OPTIONS, "http": http, "forwarded_allow_ips": ",".join(dict.fromkeys(proxies))}


def configure_uvicorn(per_address: int, proxies: Sequence[str] = ("127.0.0.1",),
                      max_body_bytes: int | None = None) -> None:
    """Make :func:`server_options` the defaults of this process's ``uvicorn.Config``
    (``proxies``: the addresses of this node, where the front door of
    cluster.http.front_door runs; uvicorn's own default is 127.0.0.1)."""
    import uvicorn

    options = server_options(per_address, proxies, max_body_bytes)
    base: Any = uvicorn.Config
    if getattr(base, "server_options", None) is not None:  # configured before in this process
        base = base.__mro__[1]

    class Config(base):
        server_options = options

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            for name, value in options.items():
                kwargs.setdefault(name, value)
            super().__init__(*args, **kwargs)

        def load(self) -> None:
            super().load()
            logging.getLogger("uvicorn.error").setLevel(logging.WARNING)

    uvicorn.Config = Config  # type: ignore[misc]
