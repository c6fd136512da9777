"""A loopback relay between the browser and the platform that can fail as a network does: hold
the answers of chosen requests, WebSocket handshakes among them (the request reaches the
platform, its answer does not come back), cut WebSockets off without a close (a half-open
connection), or refuse WebSocket handshakes. Everything else passes through byte for byte.

It reads the requests of a connection one at a time (browsers do not pipeline HTTP/1.1) and
relays a WebSocket's bytes unread once its handshake went through.
"""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import Callable
from collections.abc import Coroutine
from typing import Any
from typing import TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


class _Link:
    """One browser connection and the platform connection it is relayed to."""

    def __init__(self, browser: asyncio.StreamWriter, platform: asyncio.StreamWriter) -> None:
        self.browser = browser
        self.platform = platform
        self.silent = False  # relays nothing either way, and closes nothing
        self.holding = False  # the answer now coming is kept from the browser
        self.withheld = bytearray()
        self.texts: list[str] = []  # the text frames the browser sent on a WebSocket
        self._unread = bytearray()
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)  # permessage-deflate's
        self.ended = False  # the platform closed its side

    def read_frames(self, data: bytes) -> None:
        """Note the whole text frames among the bytes the browser sent (RFC 6455: masked,
        compressed when RSV1 is set); its pongs and other control frames aside."""
        buf = self._unread
        buf += data
        while len(buf) >= 2:
            size, at = buf[1] & 0x7F, 2
            if size >= 126:
                width = 2 if size == 126 else 8
                if len(buf) < at + width:
                    return
                size, at = int.from_bytes(buf[at:at + width], "big"), at + width
            if len(buf) < at + 4 + size:
                return
            mask, payload = buf[at:at + 4], buf[at + 4:at + 4 + size]
            if buf[0] & 0x0F == 1:
                text = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                if buf[0] & 0x40:
                    text = self._inflate.decompress(text + b"\x00\x00\xff\xff")
                self.texts.append(text.decode(errors="replace"))
            del buf[:at + 4 + size]

    def abort(self) -> None:
        for writer in (self.browser, self.platform):
            writer.transport.abort()


class Relay:
    """``url``: the platform's address at this relay (``start`` first, ``stop`` at the end)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.url = ""
        self.requests: list[str] = []  # "GET /api/v1/state" of every request relayed
        self.sockets: list[_Link] = []  # every WebSocket relayed
        self.withheld = 0  # held answers that arrived from the platform
        self._holds: dict[str, int] = {}  # "GET /path" -> how many more answers to hold
        self._refusing = False
        self._links: set[_Link] = set()
        self._held: list[_Link] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> str:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self.url

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for link in list(self._links):
                link.abort()
        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def _run(self, fn: Callable[[], None]) -> None:
        async def run() -> None:
            fn()
        self._call(run())

    # -- what the network does ---------------------------------------------------------------
    def hold(self, method: str, path: str, count: int = 1) -> None:
        """The answers of the next ``count`` requests ``method path`` (query aside) are kept
        from the browser until :meth:`release`; the requests themselves reach the platform."""
        self._run(lambda: self._holds.update({f"{method} {path}": count}))

    def release(self) -> None:
        """The answers held so far reach the browser."""
        def release() -> None:
            for link in self._held:
                link.holding = False
                link.browser.write(bytes(link.withheld))
                link.withheld.clear()
                if link.ended:
                    link.browser.close()
            self._held.clear()
        self._run(release)

    def silence_sockets(self) -> None:
        """Every open WebSocket carries nothing more either way, and neither end is told."""
        def silence() -> None:
            for link in self.sockets:
                link.silent = True
        self._run(silence)

    def refuse_sockets(self, refusing: bool) -> None:
        """While refusing: every open WebSocket is cut (no close frame), as is every new
        handshake."""
        def refuse() -> None:
            self._refusing = refusing
            if refusing:
                for link in self.sockets:
                    if not link.silent:
                        link.abort()
        self._run(refuse)

    # -- relaying ----------------------------------------------------------------------------
    async def _serve(self, browser_in: asyncio.StreamReader,
                     browser_out: asyncio.StreamWriter) -> None:
        try:
            platform_in, platform_out = await asyncio.open_connection(self.host, self.port)
        except OSError:
            browser_out.transport.abort()
            return
        link = _Link(browser_out, platform_out)
        self._links.add(link)
        requests = asyncio.ensure_future(self._requests(browser_in, link))
        answers = asyncio.ensure_future(self._answers(platform_in, link))
        try:
            await asyncio.wait([requests, answers], return_when=asyncio.FIRST_COMPLETED)
            if not requests.done() and (link.silent or link.holding):
                link.ended = True  # the browser, still waiting, is not told: it ends the link
                await asyncio.wait([requests])
        finally:
            self._links.discard(link)
            link.abort()
            for task in (requests, answers):
                task.cancel()
                if task.done() and not task.cancelled():
                    task.exception()  # a connection reset: nothing to report

    async def _requests(self, reader: asyncio.StreamReader, link: _Link) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target = lines[0].split(" ")[:2]
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            request = f"{method} {target.split('?')[0]}"
            self.requests.append(request)
            if headers.get("upgrade", "").lower() == "websocket":
                if self._refusing:
                    link.abort()
                    return
                self.sockets.append(link)
                self._take_hold(request, link)  # a held handshake: its 101 never comes
                link.platform.write(head + body)
                while data := await reader.read(65536):
                    link.read_frames(data)
                    if not link.silent:
                        link.platform.write(data)
                return
            self._take_hold(request, link)
            link.platform.write(head + body)
            await link.platform.drain()

    def _take_hold(self, request: str, link: _Link) -> None:
        """Keep the answer to ``request`` from the browser if a hold asks for it."""
        if self._holds.get(request):
            self._holds[request] -= 1
            link.holding = True
            self._held.append(link)

    async def _answers(self, reader: asyncio.StreamReader, link: _Link) -> None:
        while data := await reader.read(65536):
            if link.silent:
                continue
            if link.holding:
                self.withheld += not link.withheld
                link.withheld += data
                continue
            link.browser.write(data)
            await link.browser.drain()
