"""The WebSocket ``/ws`` (SPEC "Live data"): the public market streams of one API replica.

Client frames: ``{"method":"SUBSCRIBE","params":[...]}``, ``{"method":"UNSUBSCRIBE",
"params":[...]}``, ``{"method":"AUTH","params":["<apiKey>"]}``, ``{"method":"PING"}`` (answered
``{"method":"PONG"}``). Server frames:
``{"stream":"<name>","data":{...}}``, and errors in the API's shape
``{"error":{"code","message"}}`` (a bad frame is answered, never fatal). Streams:
``bookTicker.<ASSET>`` (the newest top of book) and ``kline.<interval>.<ASSET>`` (the current
candle on every change, a closed one once with ``closed: true``), both conflated, and after
``AUTH`` the private ``account`` (cluster.live.account_stream; ``SUBSCRIBE`` may carry
``"since": <seq>``, and one naming it restarts a running account stream from there).

One :class:`StreamHub` per replica reads the market data's changes with one long poll at a time
(cluster.live.market.MarketSource.wait), renders each change once and hands the frame to the
connections subscribed to its stream. Each connection has its own bounded queue of unsent
frames and a task that sends them. A stream's newest value replaces its unsent one in place,
so a client that falls behind gets the newest prices and candles, not a backlog of old ones;
one whose queue still fills (account events, closed candles, error frames) is closed with code
1008, so it can never make the replica's memory grow. Limits (SPEC "Limits"):
connections per client address and per API key, subscriptions per connection.

When the platform stops, :meth:`StreamHub.going_away` closes every connection with code 1001
("going away") once what is queued for it is sent, and any connection opened after that at
once: clients learn the server is going, instead of seeing their connection cut.

Heartbeats are the WebSocket protocol's ping frames, sent by the HTTP server (uvicorn, with
:data:`WS_SERVER_OPTIONS`, which also bounds a client frame's size); browsers answer them
without the page seeing them, so a page that checks its connection sends ``{"method":"PING"}``,
answered ``{"method":"PONG"}`` like any frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from cluster.http.errors import error_body, error_response
from cluster.http.json_body import unique_keys
from cluster.http.limits import UNKNOWN_KEYS, TokenBuckets, client_of, too_many
from cluster.live.account_stream import ACCOUNT_STREAM, AccountStreams, Subscription, stream_frame
from cluster.live.market import Change, MarketSource
from engine.results import Code
from feed.payload import refuse_constant

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 4096  # a client frame larger than this is refused (an error frame)
POLL_TIMEOUT_S = 1.0  # the long poll's length
RETRY_S = 0.5  # after a failed poll (the feed restarting)
POLICY_VIOLATION = 1008  # WebSocket close code: a limit exceeded
GOING_AWAY = 1001  # WebSocket close code: the server is stopping
STOPPING = "the server is stopping"  # the reason sent with GOING_AWAY
PONG = '{"method":"PONG"}'  # the answer to a client's {"method":"PING"}
MAX_AUTH_FAILURES = 5  # refused AUTHs a connection may send; the next one closes it (1008)
MESSAGES_PER_S = 10.0  # client frames a connection may send a second, on average ...
MESSAGE_BURST = 20  # ... and at once; more closes it (1008): each SUBSCRIBE answers with
# every stream's current value, so a flood of them was a flood of work for the replica
WS_SERVER_OPTIONS: Mapping[str, float] = MappingProxyType({
    "ws_ping_interval": 20.0,  # SPEC: the server pings every 20 s
    "ws_ping_timeout": 40.0,  # and closes a connection silent for 60 s (a ping unanswered 40 s)
    "ws_max_size": 16 * 1024,  # a larger client frame closes the connection (1009) unread
})
"""The HTTP server's WebSocket settings (uvicorn.Config keyword arguments)."""


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """SPEC "Limits": connections per API key or client address, subscriptions per
    connection, unsent frames per connection; ``interval_s``: the least time between two
    rounds of market frames (WS_MARKET_INTERVAL_MS; 0: a round as each poll returns)."""

    connections: int = 10
    subscriptions: int = 50
    unsent: int = 1000
    interval_s: float = 0.0


async def _receive(socket: WebSocket) -> str | bytes:
    """The client's next frame: text, or the bytes of a binary frame (which
    ``receive_text`` would fail on with a KeyError); WebSocketDisconnect when it went away."""
    message = await socket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    text = message.get("text")
    return text if text is not None else message.get("bytes") or b""


async def refuse(socket: WebSocket, status: int, code: Code, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
    """Refuse ``socket``'s handshake with an HTTP answer in SPEC's error shape (a server
    without the denial-response extension: a close before accepting, which it answers 403)."""
    try:
        await socket.send_denial_response(error_response(status, code.value, message, headers))
    except RuntimeError:
        await socket.close(code=POLICY_VIOLATION, reason=message[:120])


@dataclass(eq=False, slots=True)
class _Slot:
    """A place in a connection's queue holding a stream's newest unsent frame."""

    stream: str
    frame: str


@dataclass(eq=False, slots=True)
class _AccountFrame:
    """A place in a connection's queue holding a frame of its account stream (None: dropped,
    the stream it belonged to ended unsent)."""

    frame: str | None


@dataclass(eq=False)
class Connection:
    """One client: its subscriptions and its queue of frames to send (None: the end)."""

    socket: WebSocket
    address: str
    limit: int
    streams: set[str] = field(default_factory=set)
    key: str | None = None
    principal: Any = None  # the account AUTH named (engine.messages.Principal)
    account: Subscription | None = None  # its account stream, once subscribed

    @property
    def following_account(self) -> bool:
        """Whether its account stream runs (subscribed, not ended)."""
        return self.account is not None and self.account.active
    # frames to send, in order: a frame, or a stream's slot holding its newest unsent value;
    # None ends the sending (the connection closes once what is before it is sent)
    queue: asyncio.Queue[str | _Slot | _AccountFrame | None] = field(
        default_factory=asyncio.Queue)  # bounded by offer
    slots: dict[str, _Slot] = field(default_factory=dict)  # each stream's unsent slot
    # its account stream's unsent frames, oldest first (dropped when the stream ends)
    account_unsent: deque[_AccountFrame] = field(default_factory=deque)
    # why the server closes it: "slow", "auth", "flood" (code 1008), "stopping" (1001)
    closing: str | None = None
    auth_failures: int = 0
    sender: asyncio.Task[None] | None = None  # the task sending the queue
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set once it is closed

    def reject(self, code: Code, message: str) -> None:
        """Queue an error frame in SPEC's error shape (the connection stays open)."""
        self.offer(error_body(code.value, message).decode())

    def offer(self, frame: str, newest_of: str | None = None, ends: str | None = None) -> None:
        """Queue ``frame``; a full queue closes the connection (the client is too slow).

        ``newest_of``: the frame is that stream's newest value; it replaces the stream's
        unsent one in place, so a client that falls behind gets the newest top of book and
        current candle, never a backlog of old ones. ``ends``: the frame closes what that
        stream's unsent value was (a closed candle): later values come after it."""
        if self.closing is not None:
            return
        if newest_of is None:
            if self._room():
                if ends is not None:
                    self.slots.pop(ends, None)
                self.queue.put_nowait(frame)
        elif (slot := self.slots.get(newest_of)) is not None:
            slot.frame = frame
        elif self._room():
            self.queue.put_nowait(slot := _Slot(newest_of, frame))
            self.slots[newest_of] = slot

    def offer_account(self, frame: str) -> None:
        """Queue a frame of its account stream, as :meth:`offer` does; it is dropped unsent
        if that stream ends first (:meth:`drop_account`)."""
        if self.closing is None and self._room():
            self.queue.put_nowait(item := _AccountFrame(frame))
            self.account_unsent.append(item)

    def _room(self) -> bool:
        """Whether the queue takes one more frame; a full one closes the connection (the
        client is too slow)."""
        if self.queue.qsize() >= self.limit:
            self.close("slow")
            return False
        return True

    def drop_account(self) -> None:
        """Its account stream ended: what it left unsent is not sent (a stream started again
        sends it again, or a snapshot in its place), so a client that restarts the stream
        without reading holds no more than one stream's frames (each start may queue a
        snapshot: the account's whole state). Each keeps its place, empty, in the count."""
        for item in self.account_unsent:
            item.frame = None
        self.account_unsent.clear()

    async def next_frame(self) -> str | None:
        """The next frame to send (waits for one); None: nothing more is sent."""
        while True:
            item = await self.queue.get()
            if item is None or isinstance(item, str):
                return item
            if isinstance(item, _Slot):
                if self.slots.get(item.stream) is item:
                    del self.slots[item.stream]
                return item.frame
            if self.account_unsent and self.account_unsent[0] is item:
                self.account_unsent.popleft()
            if item.frame is not None:
                return item.frame

    def close(self, why: str) -> None:
        """Close it now, what is queued dropped (code 1008); ``why`` names the limit."""
        if self.closing is None:
            self.closing = why
            if self.sender is not None:
                self.sender.cancel()  # ends serve's wait: the socket is closed there

    def finish(self) -> None:
        """Close it with code 1001 once what is queued is sent (nothing more is queued)."""
        if self.closing is None:
            self.closing = "stopping"
            self.queue.put_nowait(None)  # past the queue's bound: offer queues nothing more

    @property
    def close_code(self) -> int:
        """The code its close frame carries."""
        if self.closing is None:
            return 1000
        return GOING_AWAY if self.closing == "stopping" else POLICY_VIOLATION

    @property
    def close_reason(self) -> str | None:
        """The reason its close frame carries: which limit the client exceeded (a close code
        alone leaves its developer guessing), or that the server stops."""
        return {"stopping": STOPPING,
                "slow": f"unsent frames over the limit of {self.limit}: the client reads too "
                        "slowly",
                "flood": f"more than {MESSAGE_BURST} frames at once or {MESSAGES_PER_S:g} a "
                         "second",
                "auth": f"more than {MAX_AUTH_FAILURES} refused AUTH frames",
                }.get(self.closing or "")


class StreamHub:
    """The public streams of one replica. ``market``: a callable giving the market data
    source (None: none here); ``render(change)`` -> the frame's ``data``; ``streams``: every
    stream name a client may subscribe to; ``authenticate(key, client_address)`` -> the key's
    Principal, None for an unknown key, or the seconds to wait when the address sent too many
    unknown keys (cluster.http.api.key_checker, the REST API's own check); ``accounts``: the
    private account streams (None: not offered)."""

    def __init__(self, market: Callable[[], MarketSource | None],
                 render: Callable[[Change], dict[str, Any]], streams: Iterable[str],
                 authenticate: Callable[[str, str], Awaitable[Any]],
                 limits: StreamLimits = StreamLimits(),
                 accounts: AccountStreams | None = None) -> None:
        self.market = market
        self.render = render
        self.streams = frozenset(streams)
        self.authenticate = authenticate
        self.limits = limits
        self.accounts = accounts
        self.connections: set[Connection] = set()
        # stream -> the connections subscribed to it: a change is handed to those alone, so a
        # tick costs its subscribers, not every connection of the replica
        self.subscribers: dict[str, set[Connection]] = {}
        self.by_address: Counter[str] = Counter()
        self.by_key: Counter[str] = Counter()
        self.version = 0
        self.source: int | None = None  # the market source self.version counts in
        self.latest: dict[str, str] = {}  # stream -> its newest frame (sent on subscribe)
        self._poller: asyncio.Task[None] | None = None
        self.frames_sent = 0
        self.slow_closed = 0
        self.flood_closed = 0
        self.frames = TokenBuckets(MESSAGES_PER_S, MESSAGE_BURST)  # client frames, per connection
        self.poll_failures = 0
        self.stopping = False  # going_away ran: every connection is closed with 1001

    # -- the market data -------------------------------------------------------------------
    def _ensure_polling(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """Follow the market data while anyone is connected. The first read gives each
        stream's current value only: a candle that closed while nobody listened is history
        (``GET /api/v1/klines``), not news. When the last connection goes, what the hub holds
        goes stale, so it is dropped: the next subscriber gets the values of its own time."""
        fresh = True
        loop = asyncio.get_running_loop()
        published = -math.inf  # loop time of the last round that had frames
        try:
            while self.connections:
                # each frame of a round is a send per subscriber (a system call each, most of
                # a replica's cost at 1,000 clients): rounds at most every interval_s bound
                # it, the newest values still going out at the next round
                wait_s = published + self.limits.interval_s - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                    continue  # (everyone may have gone meanwhile)
                market = self.market()
                if market is None:
                    return
                try:
                    changes = await market.wait(self.version, POLL_TIMEOUT_S)
                except Exception as exc:  # the feed restarting: try again shortly
                    self.poll_failures += 1
                    log.info("streams: market data poll failed: %s", exc)
                    await asyncio.sleep(RETRY_S)
                    continue
                if changes.source != self.source:  # the first read, or a restarted source
                    self.source = changes.source
                    if self.version:  # read after a version of another source: from its start
                        self.version = 0
                        continue
                self.version = changes.version
                items = changes.items
                if fresh:
                    items = [c for c in items if not getattr(c.value, "closed", False)]
                    fresh = False
                self.publish(items)
                if items:  # a poll that brought nothing sent nothing: the next change goes at once
                    published = loop.time()
        finally:
            if not self.connections:
                self.latest.clear()
                self.version = 0

    def publish(self, changes: Iterable[Change]) -> None:
        """Hand each change, rendered once, to the connections subscribed to its stream; keep
        each stream's newest frame for those that subscribe later (a closed candle is sent
        once, never as the newest: until its stream's next candle there is none). A frame
        equal to its stream's newest is not sent again: a restarted source's first read gives
        every current value anew, most of them what each subscriber already has."""
        for change in changes:
            stream = change.stream
            frame = stream_frame(stream, self.render(change))
            if getattr(change.value, "closed", False):
                newest_of, ends = None, stream
                self.latest.pop(stream, None)
            else:
                if self.latest.get(stream) == frame:
                    continue
                self.latest[stream] = frame
                newest_of, ends = stream, None
            for connection in self.subscribers.get(stream, ()):
                connection.offer(frame, newest_of, ends)

    # -- a connection ----------------------------------------------------------------------
    async def serve(self, socket: WebSocket) -> None:
        """Run one client's connection until it closes."""
        address = client_of(socket.client.host if socket.client is not None else "")
        if self.by_address[address] >= self.limits.connections:
            await refuse(socket, 429, Code.RATE_LIMITED, f"at most {self.limits.connections} "
                         "WebSocket connections per client address", {"Retry-After": "1"})
            return
        # counted before the accept, which may wait (a proxy relays it): handshakes arriving
        # together would all pass the check above before any was counted
        self.by_address[address] += 1
        try:
            await socket.accept()
        except BaseException:
            _release(self.by_address, address)
            raise
        if self.stopping:  # accepted only to say why it closes at once
            _release(self.by_address, address)
            with contextlib.suppress(Exception):
                await socket.close(code=GOING_AWAY, reason=STOPPING)
            return
        connection = Connection(socket, address, self.limits.unsent)
        self.connections.add(connection)
        sender = connection.sender = asyncio.get_running_loop().create_task(
            self._send(connection))
        receiving: asyncio.Future[str | bytes] | None = None
        try:
            self._ensure_polling()
            while not sender.done():
                receiving = asyncio.ensure_future(_receive(socket))
                done, _ = await asyncio.wait({receiving, sender},
                                             return_when=asyncio.FIRST_COMPLETED)
                if receiving not in done:
                    receiving.cancel()
                    with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect,
                                             RuntimeError):
                        await receiving
                    break
                received = receiving.result()
                if self.frames.take(connection) > 0:
                    connection.close("flood")
                    break
                if isinstance(received, str):
                    await self._handle(connection, received)
                else:
                    connection.reject(Code.INVALID_REQUEST,
                                      "binary frames are not read: send JSON text")
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client went away
        finally:
            self._forget(connection)
            # its bucket held the connection, its socket and its queue until another client's
            # frame came after the bucket was full again: a quiet replica kept every one
            self.frames.forget(connection)
            self.slow_closed += connection.closing == "slow"
            self.flood_closed += connection.closing == "flood"
            try:
                # this handler may itself be cancelled (Serve cancels a request whose client
                # went away) while both wait: a read left behind would end in the client's
                # disconnect with no one to take it, and asyncio logs that as an error for
                # every such client
                for task in (sender, receiving):
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await task
                if socket.application_state != WebSocketState.DISCONNECTED:
                    with contextlib.suppress(Exception):
                        await socket.close(code=connection.close_code,
                                           reason=connection.close_reason)
            finally:
                # counted until closed: the close of a client that reads slowly (or not at
                # all) waits for it, up to the server's bound, and its address or key must
                # not open more meanwhile
                _release(self.by_address, connection.address)
                if connection.key is not None:
                    _release(self.by_key, connection.key)
                connection.ended.set()

    def _forget(self, connection: Connection) -> None:
        """Stop sending to ``connection`` (its counts are released once it is closed)."""
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        self._unsubscribe(connection, connection.streams)
        self._end_account(connection)

    def _unsubscribe(self, connection: Connection, streams: Iterable[str]) -> None:
        """Stop handing ``connection`` the changes of ``streams``."""
        for stream in tuple(streams):
            connection.streams.discard(stream)
            subscribed = self.subscribers.get(stream)
            if subscribed is not None:
                subscribed.discard(connection)
                if not subscribed:
                    del self.subscribers[stream]

    def _end_account(self, connection: Connection) -> None:
        account = connection.account
        if account is not None and account.active and self.accounts is not None:
            self.accounts.unsubscribe(account)
            connection.drop_account()
        connection.account = None

    async def _send(self, connection: Connection) -> None:
        while (frame := await connection.next_frame()) is not None:
            await connection.socket.send_text(frame)
            self.frames_sent += 1

    async def going_away(self, timeout_s: float) -> int:
        """The server is stopping: close every connection with code 1001 once what is queued
        for it is sent, and each one opened from now on at once. Waits until they are closed:
        after ``timeout_s`` what is still queued is dropped (a client that does not read),
        and at most about ``timeout_s`` more for their close. Returns how many were open."""
        self.stopping = True
        connections = list(self.connections)
        for connection in connections:
            connection.finish()
        for drop_queued in (False, True):
            waits = [asyncio.ensure_future(c.ended.wait()) for c in connections
                     if not c.ended.is_set()]
            if not waits:
                break
            if drop_queued:
                for connection in connections:
                    if connection.sender is not None:
                        connection.sender.cancel()  # serve closes the socket (1001)
            _, late = await asyncio.wait(waits, timeout=timeout_s)
            for wait in late:
                wait.cancel()
        return len(connections)

    async def _handle(self, connection: Connection, text: str) -> None:
        """Answer one client frame: do all it asks, or answer an error frame and change
        nothing."""
        # bytes, as the limit says (a character takes up to 4 of them in UTF-8)
        if len(text) > MAX_FRAME_BYTES or (len(text) > MAX_FRAME_BYTES // 4 and len(
                text.encode("utf-8", "surrogatepass")) > MAX_FRAME_BYTES):
            connection.reject(Code.INVALID_REQUEST, f"frame over {MAX_FRAME_BYTES} bytes")
            return
        try:
            frame = json.loads(text, object_pairs_hook=unique_keys,
                               parse_constant=refuse_constant)
        except ValueError as exc:
            connection.reject(Code.INVALID_REQUEST, f"not JSON: {exc}"[:200])
            return
        except RecursionError:  # ~1,000 brackets deep fit in a frame
            connection.reject(Code.INVALID_REQUEST, "not JSON: nested too deeply")
            return
        method = frame.get("method") if isinstance(frame, dict) else None
        if method == "PING":  # a heartbeat a page can send: it never sees the protocol's pings
            connection.offer(PONG)
            return
        params = frame.get("params") if isinstance(frame, dict) else None
        if method not in ("SUBSCRIBE", "UNSUBSCRIBE", "AUTH") or not isinstance(params, list) \
                or not params or not all(isinstance(p, str) for p in params):
            connection.reject(Code.INVALID_REQUEST, 'expected {"method": "SUBSCRIBE" | '
                              '"UNSUBSCRIBE" | "AUTH", "params": [text]} or '
                              '{"method": "PING"}')
            return
        if method == "AUTH":
            await self._auth(connection, params)
            return
        unknown = [p for p in params if p not in self.streams
                   and (p != ACCOUNT_STREAM or self.accounts is None)]
        if unknown:
            connection.reject(Code.INVALID_REQUEST,
                              f"unknown stream(s): {', '.join(unknown[:5])[:200]}")
        elif method == "SUBSCRIBE":
            self._subscribe(connection, params, frame.get("since"))
        else:
            if ACCOUNT_STREAM in params:
                self._end_account(connection)
            self._unsubscribe(connection, params)

    async def _auth(self, connection: Connection, params: list[str]) -> None:
        if len(params) != 1:
            connection.reject(Code.UNAUTHORIZED, "AUTH takes one API key")
            return
        if not params[0] or len(params[0]) > 256:
            connection.reject(Code.UNAUTHORIZED, "not an API key: empty or over 256 characters")
            return
        key = params[0]
        if connection.key == key:
            return
        if connection.key is not None:
            # one connection, one account: its account stream must not change owner unseen
            # (said of any other key, known or not: an unknown one logs nobody out)
            connection.reject(Code.INVALID_REQUEST, "this connection is "
                              "authenticated already: open another for another key")
            return
        try:
            principal = await self.authenticate(key, connection.address)
        except Exception:
            connection.reject(Code.SERVICE_UNAVAILABLE, "cannot check the key now")
            return
        if isinstance(principal, float):  # the address sent too many unknown keys
            connection.reject(Code.RATE_LIMITED, too_many(UNKNOWN_KEYS, principal))
            return
        if principal is None:
            # each refused key costs the ledger a lookup: a connection guessing keys is closed
            connection.auth_failures += 1
            if connection.auth_failures > MAX_AUTH_FAILURES:
                connection.close("auth")
                return
            connection.reject(Code.UNAUTHORIZED, "unknown API key")
            return
        if self.by_key[key] >= self.limits.connections:
            connection.reject(Code.RATE_LIMITED, "too many connections for this key")
            return
        connection.key = key
        connection.principal = principal
        self.by_key[key] += 1

    def _subscribe(self, connection: Connection, params: list[str], since: object) -> None:
        """Subscribe ``connection`` to ``params`` (known streams), the account stream among
        them from ``since``; an error frame and nothing subscribed when one cannot be."""
        account = ACCOUNT_STREAM in params
        markets = [p for p in params if p != ACCOUNT_STREAM]
        if account and connection.principal is None:
            connection.reject(Code.UNAUTHORIZED,
                              'send {"method":"AUTH","params":["<apiKey>"]} first')
            return
        if account and since is not None and (
                type(since) is not int or not 0 <= since < 1 << 63):
            connection.reject(Code.INVALID_REQUEST,
                              "since must be an account event seq (an integer >= 0)")
            return
        if len(connection.streams.union(markets)) + (
                account or connection.following_account) > self.limits.subscriptions:
            connection.reject(Code.INVALID_REQUEST,
                              f"at most {self.limits.subscriptions} subscriptions per connection")
            return
        # a repeated SUBSCRIBE leaves a running stream's cursor alone, unless it names
        # ``since``: then the stream starts again from there, as a first one would
        if account and (since is not None or not connection.following_account):
            assert self.accounts is not None  # an unknown stream otherwise (_handle)
            self._end_account(connection)
            start = since if isinstance(since, int) else None  # (an int when given: above)
            connection.account = self.accounts.subscribe(connection.principal, start,
                                                         connection.offer_account)
        for stream in markets:
            if stream not in connection.streams:
                connection.streams.add(stream)
                self.subscribers.setdefault(stream, set()).add(connection)
                frame = self.latest.get(stream)
                if frame is not None:  # the stream's current value at once
                    connection.offer(frame, newest_of=stream)
        self._ensure_polling()

    def stats(self) -> dict[str, int]:
        return {"ws_connections": len(self.connections), "ws_frames_sent": self.frames_sent,
                "ws_slow_closed": self.slow_closed,
                "ws_flood_closed": self.flood_closed, "ws_poll_failures": self.poll_failures,
                **(self.accounts.stats() if self.accounts is not None else {})}


def _release(counts: Counter[str], name: str) -> None:
    """One connection fewer for ``name`` (an address or a key); none left: forgotten."""
    counts[name] -= 1
    if counts[name] <= 0:
        del counts[name]


__all__ = ["MAX_FRAME_BYTES", "WS_SERVER_OPTIONS", "Connection",
           "StreamHub", "StreamLimits"]
