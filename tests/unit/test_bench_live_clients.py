"""bench.live's WebSocket clients: run in a process of their own against a loopback server."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from datetime import UTC
from datetime import datetime
from typing import Any

import websockets
from bench.live import ASSET
from bench.live import with_clients
from websockets.asyncio.server import ServerConnection

FRAME_INTERVAL_S = 0.01


async def _stream(ws: ServerConnection) -> None:
    """Answer a SUBSCRIBE with a bookTicker frame every 10 ms, stamped with the time sent."""
    request = json.loads(await ws.recv())
    assert request["params"] == [f"bookTicker.{ASSET}"]
    while True:
        ts = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        await ws.send(json.dumps({"stream": f"bookTicker.{ASSET}", "data": {"ts": ts}}))
        await asyncio.sleep(FRAME_INTERVAL_S)


async def _serve_and_count(count: int, window_s: float) -> tuple[Any, Any, Any]:
    async with websockets.serve(_stream, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]

        async def work() -> list[str]:
            # the clients run while this does: in another process, not this loop
            names = [p.name for p in multiprocessing.active_children()]
            await asyncio.sleep(window_s)
            return names

        return await with_clients(f"ws://127.0.0.1:{port}/ws", count, work, timed=True)


def test_clients_count_frames_in_a_process_of_their_own() -> None:
    counts, cpu, names = asyncio.run(_serve_and_count(5, 0.5))
    assert "shardex-bench-clients" in names
    # 5 clients, a frame each per 10 ms, for 0.5 s: 250 at most; a loaded machine sends fewer
    assert 25 <= counts.frames <= 5 * (0.5 / FRAME_INTERVAL_S) * 1.5
    assert counts.failed == 0
    assert len(counts.delays_ms) == counts.frames
    assert all(-50 < d < 5_000 for d in counts.delays_ms)
    assert counts.cpu_s >= 0.0 and cpu.wall_s >= 0.5
    # the process is stopped once its counts are in
    assert not [p for p in multiprocessing.active_children() if p.name == "shardex-bench-clients"]


def test_clients_that_cannot_connect_are_reported_not_waited_for() -> None:
    async def run() -> Any:
        async with websockets.serve(_stream, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
        # the server is closed: its port refuses every client
        return await with_clients(f"ws://127.0.0.1:{port}/ws", 3,
                                  lambda: asyncio.sleep(0.1))

    start = time.monotonic()
    counts, _, _ = asyncio.run(run())
    assert counts.failed == 3 and counts.frames == 0
    assert time.monotonic() - start < 60
