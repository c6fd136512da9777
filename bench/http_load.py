"""A lean closed-loop HTTP/1.1 load generator on raw asyncio streams (loopback benchmarks).

httpx costs ~0.3 ms of client CPU per request, which on a 2-core machine is a large share of
what is being measured; this client parses only the status line, Content-Length and chunked
bodies, and keeps one persistent connection per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any


class HttpError(RuntimeError):
    """The server closed the connection or answered something this client cannot parse."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """One keep-alive HTTP/1.1 connection to ``host:port``; one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: Any = None,
                      headers: Mapping[str, str] | None = None) -> Response:
        """Send one request (``body`` is JSON-encoded unless it is bytes) and read the answer."""
        for attempt in (0, 1):
            if self._writer is None:
                await self._connect()
            try:
                return await self._roundtrip(method, path, body, headers)
            except (ConnectionError, asyncio.IncompleteReadError, HttpError):
                await self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _roundtrip(self, method: str, path: str, body: Any,
                         headers: Mapping[str, str] | None) -> Response:
        assert self._reader is not None and self._writer is not None
        payload = b"" if body is None else body if isinstance(body, bytes) else \
            json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 f"Content-Length: {len(payload)}"]
        if payload:
            lines.append("Content-Type: application/json")
        for key, value in (headers or {}).items():
            lines.append(f"{key}: {value}")
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise HttpError(f"bad status line {status_line!r}")
        fields = {}
        for line in header_lines:
            if ":" in line:
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
        if "content-length" in fields:
            data = await self._reader.readexactly(int(fields["content-length"]))
        elif fields.get("transfer-encoding", "").lower() == "chunked":
            data = await self._read_chunked()
        else:
            data = await self._reader.read()
            await self.close()
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return Response(int(parts[1]), data)

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        out = bytearray()
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")
                return bytes(out)
            out += await self._reader.readexactly(size)
            await self._reader.readexactly(2)

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


@dataclass(frozen=True, slots=True)
class LoadResult:
    """A closed-loop run: ``ops`` successful operations completed within the measured window of
    ``elapsed_s`` (``errors``: the failed ones), their latencies in ms; ``ops_done``: every
    successful operation the run completed, the warm-up's and those finishing after the window
    included (what the platform served in all: a CPU reading taken around the whole run
    divides by it)."""

    concurrency: int
    ops: int
    errors: int
    elapsed_s: float
    latencies_ms: tuple[float, ...]
    ops_done: int = -1  # -1: the same as ops

    def __post_init__(self) -> None:
        if self.ops_done < 0:
            object.__setattr__(self, "ops_done", self.ops)

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        """The ``q`` (0..100) latency percentile, nearest rank."""
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        rank = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
        return ordered[rank]


class WindowTally:
    """Counts a closed loop's operations by when they complete: those that end within
    ``[window_start, window_end]`` are the window's, whenever they started.

    Throughput is completions per second, so an operation in flight when the window opens
    counts once it ends inside it, and one in flight when it closes does not; each worker
    then contributes its whole share of the window. Counting only the operations that both
    start and end inside the window instead drops one operation per worker on average, and
    the dropped ones are the long ones (a long operation is the likelier to straddle an edge),
    which lowered ops/s by about ``concurrency`` operations and flattered the tail latency.
    """

    def __init__(self, window_start: float, window_end: float) -> None:
        self.window_start = window_start
        self.window_end = window_end
        self.latencies_ms: list[float] = []
        self.errors = 0
        self.done = 0

    def note(self, started: float, ended: float, ok: bool) -> None:
        """One operation that ran from ``started`` to ``ended`` (seconds), successfully or not."""
        if ok:
            self.done += 1
        if not self.window_start <= ended <= self.window_end:
            return
        if ok:
            self.latencies_ms.append((ended - started) * 1000.0)
        else:
            self.errors += 1

    def result(self, concurrency: int) -> LoadResult:
        return LoadResult(concurrency, len(self.latencies_ms), self.errors,
                          self.window_end - self.window_start, tuple(self.latencies_ms),
                          self.done)


Operation = Callable[[Connection, int], Awaitable[bool]]


async def closed_loop(host: str, port: int, operation: Operation, concurrency: int,
                      duration_s: float, warmup_s: float = 0.5) -> LoadResult:
    """Run ``concurrency`` workers, each repeating ``operation(conn, worker_index)`` back to back.

    ``operation`` returns True on success. The operations that complete within the ``duration_s``
    after the warm-up count (:class:`WindowTally`); no operation starts after it, and those
    still running then are finished (``ops_done`` counts them) but not counted.
    """
    start_counting = time.perf_counter() + warmup_s
    tally = WindowTally(start_counting, start_counting + duration_s)

    async def worker(index: int) -> None:
        conn = Connection(host, port)
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= tally.window_end:
                    return
                try:
                    ok = await operation(conn, index)
                except (ConnectionError, OSError, HttpError, asyncio.IncompleteReadError):
                    ok = False
                    await conn.close()
                tally.note(t0, time.perf_counter(), ok)
        finally:
            await conn.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return tally.result(concurrency)
