"""Abuse limits of the HTTP API (SPEC "Limits"): the request body size, whatever the transfer
encoding, token-bucket rate limits with bounded memory, and the rate of the public routes per
client address."""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from starlette.types import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
)

from cluster.http.bounds import body_too_large
from cluster.http.errors import error_body
from engine.results import Code

WHOLE_TOKEN = 1.0 - 1e-9
"""What counts as a whole token: a bucket refilled for exactly ``1 / rate_per_s`` s after its
last token holds 1.0 less the rounding of the clock's subtraction (a monotonic clock reads
~1e3..1e6 s, so 1e-14..1e-10), which must not make that request wait a whole ``Retry-After``."""

MAX_TRACKED_KEYS = 100_000
"""Most buckets one limiter keeps; past it the least recently used one is forgotten (it
comes back full, which only ever lets that client through sooner)."""


def _ip_of(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``address`` (a peer's address as text) parsed, an IPv4-mapped IPv6 address as its IPv4
    address; None for text that is no address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _network(ip: ipaddress.IPv6Address, bits: int) -> str:
    """The /``bits`` network ``ip`` lies in, as text."""
    return str(ipaddress.IPv6Network((int(ip) >> (128 - bits) << (128 - bits), bits)))


def client_of(address: str) -> str:
    """The client a limit per client address counts ``address`` (a peer's address as text) as:
    an IPv4 address itself; an IPv6 address its /64 network, since one subscriber is given a
    whole /64 (or more) and may send from any of its 2**64 addresses; an IPv4-mapped IPv6
    address its IPv4 address. Any other text (no address known: "") is itself."""
    ip = _ip_of(address)
    if ip is None:
        return address
    return _network(ip, 64) if isinstance(ip, ipaddress.IPv6Address) else str(ip)


SITE_SIGNUPS_FACTOR = 10
"""An IPv6 /48 network (:func:`site_of`) may create this many times the accounts one client
address may (``SIGNUPS_PER_MIN``)."""


def site_of(address: str) -> str | None:
    """The IPv6 /48 network of ``address`` (a site's: one holder is given a /48 and can send
    from any of its 65,536 /64s, each a client of its own for :func:`client_of`); None for an
    IPv4 address (an IPv4-mapped one too) or text that is no address."""
    ip = _ip_of(address)
    return _network(ip, 48) if isinstance(ip, ipaddress.IPv6Address) else None


class BodySizeLimit:
    """Pure-ASGI middleware: a request body larger than ``max_body_bytes`` answers 413
    INVALID_REQUEST before the app sees the request.

    A declared ``Content-Length`` over the limit is refused without reading anything; any
    other body (``Transfer-Encoding: chunked`` included) is counted as it arrives and refused
    as soon as it passes the limit, so at most ``max_body_bytes`` are ever held. The 413
    closes the connection (the rest of the body is never read). The app then receives the
    body it was allowed as one message.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        if max_body_bytes < 0:
            raise ValueError("max_body_bytes must be >= 0")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                value = value.strip(b" \t")  # whitespace around a field value is not part of it
                if not value.isdigit():
                    await _refuse(send, 400, "invalid Content-Length")
                    return
                if int(value) > self.max_body_bytes:
                    await self._too_large(send)
                    return
                break
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending: Message | None = {"type": "http.request", "body": b"".join(chunks),
                                   "more_body": False}

        async def replay() -> Message:
            nonlocal pending
            if pending is not None:
                message, pending = pending, None
                return message
            return await receive()  # after the body: disconnects

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await _refuse(send, 413, body_too_large(self.max_body_bytes))


async def _refuse(send: Send, status: int, message: str, code: Code = Code.INVALID_REQUEST,
                  headers: tuple[tuple[bytes, bytes], ...] = ((b"connection", b"close"),)
                  ) -> None:
    body = error_body(code.value, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class TokenBuckets:
    """One token bucket per key: ``rate_per_s`` tokens a second, at most ``burst`` saved up.

    A bucket untouched for ``burst / rate_per_s`` seconds is full again, exactly like a new
    one, so it is forgotten; at most ``max_keys`` buckets are kept (least recently used
    forgotten first). ``rate_per_s == 0`` disables the limit.
    """

    def __init__(self, rate_per_s: float, burst: float, *, max_keys: int = MAX_TRACKED_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s < 0 or (rate_per_s > 0 and burst < 1) or max_keys < 1:
            raise ValueError("a rate limit needs rate >= 0, burst >= 1 and max_keys >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._idle_s = burst / rate_per_s if rate_per_s > 0 else 0.0
        # key -> [tokens, last update]; ordered from least to most recently used
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: Hashable) -> float:
        """Take a token for ``key``: 0.0 if granted, else the seconds until one is available
        (nothing is taken then)."""
        if self.rate_per_s == 0:
            return 0.0
        now = self._clock()
        buckets = self._buckets
        while buckets:  # forget buckets that are full again (the oldest first)
            oldest = next(iter(buckets.values()))
            if now - oldest[1] < self._idle_s:
                break
            buckets.popitem(last=False)
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_keys:
                buckets.popitem(last=False)
            bucket = buckets[key] = [float(self.burst), now]
        else:
            buckets.move_to_end(key)
            bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate_per_s)
            bucket[1] = now
        if bucket[0] >= WHOLE_TOKEN:
            bucket[0] = max(0.0, bucket[0] - 1.0)
            return 0.0
        return (1.0 - bucket[0]) / self.rate_per_s

    def forget(self, key: Hashable) -> None:
        """Drop ``key``'s bucket (the key is gone: a bucket kept would keep the key too)."""
        self._buckets.pop(key, None)

    def give_back(self, key: Hashable) -> None:
        """Return a token :meth:`take` granted ``key`` (what it was taken for did not count)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket[0] = min(float(self.burst), bucket[0] + 1.0)


class PublicRateLimit:
    """Pure-ASGI middleware: a request to one of ``paths`` (the routes any client may read
    without a key) takes a token of its client address's bucket in ``buckets`` (the address
    as :func:`client_of` counts it: the peer, or the client a trusted proxy named); with none
    left it answers 429 RATE_LIMITED with ``Retry-After`` before the app parses anything.
    A route's cost (a thousand candles, the metrics' text) is then bounded per address, as
    the API key's bucket bounds the authenticated routes."""

    def __init__(self, app: ASGIApp, buckets: TokenBuckets, paths: frozenset[str]) -> None:
        self.app = app
        self.buckets = buckets
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            client = scope.get("client")
            wait_s = self.buckets.take(client_of(client[0] if client else ""))
            if wait_s > 0:
                await _refuse(send, 429, too_many("public requests from this address", wait_s),
                              Code.RATE_LIMITED,
                              ((b"retry-after", str(retry_after_s(wait_s)).encode()),))
                return
        await self.app(scope, receive, send)


def retry_after_s(wait_s: float) -> int:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait_s))


UNKNOWN_KEYS = "unknown API keys from this address"
"""What an address that sent too many unknown keys is refused for (REST and WebSocket)."""


def too_many(what: str, wait_s: float) -> str:
    """The message of a refusal for too many ``what``, saying when to retry."""
    return f"too many {what}; retry in {retry_after_s(wait_s)} s"
