"""The Backpack WebSocket client: subscribe to bookTicker, validate, reconnect forever.

Protocol pings from the server are answered by the ``websockets`` library itself (it replies to
every Ping with a Pong while the connection is read), so the 120 s pong deadline is met as long
as the read loop runs; we also send our own pings so a silently dead socket is noticed, and a
connection that answers pings but gives no price for ``silence_s`` (a stream the server stopped
feeding, or feeds with error frames or what cannot be a price) is closed and made again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator

import websockets
from websockets.asyncio.client import ClientConnection

from engine.assets import AssetRegistry
from feed.frames import ErrorFrame, FrameNormalizer, subscribe_request
from feed.message import MarketDataMessage
from feed.pipeline import drops_text
from feed.settings import redacted_url

log = logging.getLogger(__name__)

SILENCE_S = 30.0  # no price for this long: the stream is dead, whatever pings or frames say
CLOSE_TIMEOUT_S = 2.0  # a peer that does not answer our close does not hold a stop longer
MAX_RETRY_AFTER_S = 300.0  # a server's Retry-After is followed up to this long
ERROR_LOG_EVERY_S = 60.0  # error frames after the first are logged at most this often
# A connection whose prices came this long resets the backoff; one that a server closes after
# a price or two does not, or such a server would be asked again every initial delay for ever.
STABLE_S = 10.0
# What a lost or refused connection raises; anything else is logged with its traceback too.
NETWORK_ERRORS = (OSError, TimeoutError, websockets.exceptions.WebSocketException)


def retry_after_s(exc: BaseException) -> float | None:
    """The delay a refused handshake (429 or 503) asks for in its ``Retry-After`` header, in
    seconds (at most :data:`MAX_RETRY_AFTER_S`); None when it asks for none (an HTTP date, or
    more than one ``Retry-After``, is not followed: the backoff applies)."""
    response = getattr(exc, "response", None)
    if not isinstance(exc, websockets.exceptions.InvalidStatus) or response is None \
            or response.status_code not in (429, 503):
        return None
    # get_all, not get: get raises on a repeated header, and that error escaped the source's
    # reconnect loop (restarted every second, neither backing off nor falling back to sim)
    values = response.headers.get_all("Retry-After")
    if len(values) != 1:
        return None
    value = values[0].strip()
    if not value.isascii() or not value.isdigit():
        return None
    return min(float(value), MAX_RETRY_AFTER_S)


async def _discard(opening: asyncio.Future[ClientConnection]) -> None:
    """Cancel a connection still opening (the library aborts a handshake cancelled midway) or
    abort the one it opened."""
    opening.cancel()  # a no-op once done
    try:
        ws = await opening
    except (asyncio.CancelledError, Exception):
        return
    ws.transport.abort()


class Backoff:
    """Jittered exponential backoff: ``initial_s * 2**attempt`` capped at ``max_s``, "full jitter"
    in ``[delay/2, delay]`` so many clients do not reconnect in lockstep."""

    def __init__(self, initial_s: float = 0.5, max_s: float = 30.0,
                 rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay_s(self) -> float:
        delay = min(self.max_s, self.initial_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return delay / 2 + self._rng.random() * delay / 2

    def reset(self) -> None:
        self.attempt = 0


class BackpackClient:
    """Stream validated bookTicker updates of ``assets`` from ``url``.

    ``stream(stop)`` yields :class:`MarketDataMessage` until ``stop`` is set; after any close or
    error it waits a jittered backoff (reset by a price on a connection up for
    :data:`STABLE_S`), reconnects and resubscribes. Counters: ``connects``,
    ``disconnects``, ``error_frames`` and the normaliser's drop counts (``stats()``);
    ``last_frame_us``: wall clock (microseconds since the epoch) when the newest frame was
    received, so the message just yielded was received then (the first hop of the latency
    budget, ``shardex bench latency``).
    """

    name = "backpack"

    def __init__(self, url: str, assets: AssetRegistry, *, backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 30.0, open_timeout_s: float = 10.0,
                 ping_interval_s: float | None = 20.0, rng: random.Random | None = None,
                 silence_s: float = SILENCE_S) -> None:
        self.url = url
        self.shown_url = redacted_url(url)  # for logs and stats
        self.assets = assets
        self.normalizer = FrameNormalizer(assets, source="backpack")
        self.backoff = Backoff(backoff_initial_s, backoff_max_s, rng)
        self.open_timeout_s = open_timeout_s
        self.ping_interval_s = ping_interval_s
        self.silence_s = silence_s
        self.silences = 0  # connections closed for giving no price for silence_s
        self.connects = 0
        self.disconnects = 0
        self.connected = False
        self.last_error: str | None = None
        self.last_frame_us = 0
        self._errors_logged_at = -ERROR_LOG_EVERY_S  # monotonic; error frames since then:
        self._errors_unlogged = 0
        self._drops_logged_at = -ERROR_LOG_EVERY_S  # monotonic; the drops counted then:
        self._drops_logged: Counter[str] = Counter()

    def stats(self) -> dict[str, object]:
        return {
            "url": self.shown_url,
            "connected": self.connected,
            "connects": self.connects,
            "disconnects": self.disconnects,
            "last_error": self.last_error,
            "silences": self.silences,
            **self.normalizer.stats(),
        }

    async def stream(self, stop: asyncio.Event) -> AsyncIterator[MarketDataMessage]:
        while not stop.is_set():
            asked_s: float | None = None
            try:
                opened = await self._open(stop)
                if opened is None:  # stopped during the handshake
                    return
                async with opened as ws:
                    self.connects += 1
                    self.connected = True
                    self.normalizer.reset_sequences()
                    await ws.send(json.dumps(subscribe_request(self.assets)))
                    log.info("backpack: connected to %s, subscribed %d bookTicker streams",
                             self.shown_url, len(self.assets))
                    opened_s = time.monotonic()
                    async for msg in self._frames(ws, stop):
                        if time.monotonic() - opened_s >= STABLE_S:
                            self.backoff.reset()
                        yield msg
            except Exception as exc:
                # Whatever a connection fails with is a failed connection, backed off: the
                # library also raises ValueError (a redirect to an address it cannot parse),
                # which ended the source, so a restart every second skipped the backoff and
                # ``auto`` never fell back to sim.
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("backpack: connection to %s lost: %s", self.shown_url,
                            self.last_error, exc_info=not isinstance(exc, NETWORK_ERRORS))
                asked_s = retry_after_s(exc)
            finally:
                if self.connected:
                    self.disconnects += 1
                self.connected = False
            if stop.is_set():
                return
            delay = self.backoff.next_delay_s()
            if asked_s is not None:  # the server said when to come back: not sooner
                delay = max(delay, asked_s)
            log.info("backpack: reconnecting in %.2f s", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _open(self, stop: asyncio.Event) -> ClientConnection | None:
        """A new connection (its handshake bounded by ``open_timeout_s``), or None when ``stop``
        is set first: a stop does not wait for a server that does not answer the upgrade."""
        opening = asyncio.ensure_future(websockets.connect(
            self.url,
            open_timeout=self.open_timeout_s,
            ping_interval=self.ping_interval_s,
            close_timeout=CLOSE_TIMEOUT_S,
            max_size=2**22,
        ))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({opening, stopper}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled: nothing is left open behind
            await _discard(opening)
            raise
        finally:
            stopper.cancel()
        if opening.done():
            return opening.result()
        await _discard(opening)
        return None

    async def _frames(self, ws: ClientConnection,
                      stop: asyncio.Event) -> AsyncIterator[MarketDataMessage]:
        """Messages of one connection; returns when the server closes or ``stop`` is set."""
        stopper = asyncio.create_task(stop.wait())
        recv: asyncio.Task[str | bytes] | None = None
        # a price is due by then (monotonic s): frames that are not prices do not keep a
        # connection, or a server sending only those would hold every price stale for ever
        price_by = time.monotonic() + self.silence_s
        try:
            while True:
                recv = asyncio.create_task(ws.recv())
                done, _ = await asyncio.wait({recv, stopper},
                                             timeout=max(0.0, price_by - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    self.silences += 1
                    self.last_error = f"no price in {self.silence_s:g} s"
                    log.warning("backpack: %s from %s: connecting again", self.last_error,
                                self.shown_url)
                    return
                if recv not in done:
                    return
                raw = recv.result()  # raises ConnectionClosed when the socket closed
                self.last_frame_us = time.time_ns() // 1000
                out = self.normalizer.feed(raw)
                if isinstance(out, MarketDataMessage):
                    yield out
                    # (from when the next is asked for: the time the caller took is not ours)
                    price_by = time.monotonic() + self.silence_s
                elif isinstance(out, ErrorFrame):
                    self._log_error_frame(out)
                elif time.monotonic() - self._drops_logged_at >= ERROR_LOG_EVERY_S:
                    self._log_drops()
        finally:
            stopper.cancel()
            if recv is not None:  # collected, so that its end is never reported as lost
                recv.cancel()  # (a no-op once it is done)
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await recv

    def _log_drops(self) -> None:
        """Log the frames dropped (by reason) since the last such line, if any: a server
        sending what cannot be a price is otherwise seen only as stale prices. Called at most
        every :data:`ERROR_LOG_EVERY_S`, on a frame that was not a price."""
        new = self.normalizer.dropped - self._drops_logged
        if not new:
            return
        count = new.total()
        log.warning("backpack: dropped %d %s from %s that are not prices (%s)%s", count,
                    "frame" if count == 1 else "frames", self.shown_url, drops_text(new),
                    "" if self._drops_logged else "; logged at most once a minute")
        self._drops_logged_at = time.monotonic()
        self._drops_logged = Counter(self.normalizer.dropped)

    def _log_error_frame(self, frame: ErrorFrame) -> None:
        """Log an error frame; a server sending many is logged at most every
        :data:`ERROR_LOG_EVERY_S` (each is counted in ``error_frames``)."""
        now = time.monotonic()
        if now - self._errors_logged_at < ERROR_LOG_EVERY_S:
            self._errors_unlogged += 1
            return
        more = f" ({self._errors_unlogged} more since the last logged)" \
            if self._errors_unlogged else ""
        log.error("backpack: error frame %s: %.200s%s", frame.code, frame.message, more)
        self._errors_logged_at, self._errors_unlogged = now, 0
