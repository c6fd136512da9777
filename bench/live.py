"""``shardex bench live``: candles and the WebSocket streams, measured.

1. ``candles``: the cost of building candles per tick, in this process: the candle book alone
   (engine.candles.CandleBook, 6 intervals) and cluster.live.market.MarketLive with its SQLite
   store, one transaction per tick (the feed's worst case: a poll that read one tick) and per
   100 ticks.
2. The platform (local Ray, its own embedded broker, no feed source, Serve on a free port,
   WebSocket connection limits lifted); this process produces the ticks to the topic and runs
   the REST load, the WebSocket clients run in a process of their own (spawned per phase;
   all of them share the machine's cores with the platform):
   a. ``fanout``: ``--clients`` WebSocket clients subscribed to ``bookTicker.SOL`` while SOL
      ticks are produced at ``--rate`` per second for ``--duration-s``: frames received per
      client per second and in total (the stream is conflated: a client gets the newest price
      at most once per poll of the feed actor, never a backlog). The platform's CPU seconds per
      second (its processes' user + system time, from /proc) with the same ticks and no
      clients, then with them: the difference is what the fan-out costs it.
   b. ``latency``: 100 clients, 20 ticks per second: each frame's receipt time minus its
      tick's production time (the tick's ``ts``), p50/p99.
   c. ``rest``: the open/close closed loop of ``shardex bench api`` at concurrency 64 for
      ``--duration-s`` while ticks flow at ``--rate``, without WebSocket clients, then with the
      ``--clients`` connected: API ops/s of each and their ratio, and the CPU seconds per
      second of the platform, this process and the client process.

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.options import duration, positive_int, rate

HOST = "127.0.0.1"
ASSET = "SOL"
LATENCY_CLIENTS = 100
LATENCY_RATE = 20


# ---------------------------------------------------------------------- 1. candles
def candle_costs(ticks: int) -> dict[str, float]:
    """Microseconds per tick of building candles: the book alone, and with the store."""
    from cluster.live.market import MarketLive
    from engine.assets import DEFAULT_ASSETS
    from engine.candles import CandleBook
    from engine.market import Tick

    rng = random.Random(7)
    bid = 10_000
    start_us = 1_800_000_000_000_000
    stream = []
    for i in range(ticks):
        bid = max(100, bid + rng.randint(-3, 3))
        stream.append(Tick(ASSET, bid, bid + 1, start_us + i * 50_000, i + 1, "bench"))
    out: dict[str, float] = {}
    book = CandleBook([a.name for a in DEFAULT_ASSETS.assets])
    t0 = time.perf_counter()
    for tick in stream:
        book.apply(tick)
    out["book_us"] = (time.perf_counter() - t0) / ticks * 1e6
    for batch in (1, 100):
        with tempfile.TemporaryDirectory(prefix="shardex-bench-candles-") as tmp:
            # its clock at the stream's start: on the wall clock, once past the stream's time,
            # every candle would start closed and take no later tick (a cheaper path)
            market = MarketLive(DEFAULT_ASSETS, Path(tmp), clock_us=lambda: start_us)
            t0 = time.perf_counter()
            for i in range(0, ticks, batch):
                market.apply(stream[i:i + batch])
            out[f"stored_batch{batch}_us"] = (time.perf_counter() - t0) / ticks * 1e6
            market.close()
    return out


# ---------------------------------------------------------------------- 2. the platform
class Producer:
    """SOL ticks to the topic at a rate, a small random walk, each stamped when produced."""

    def __init__(self, bootstrap: str, settings: Any, topic: str) -> None:
        from feed.producer import MarketDataProducer

        self.settings = settings
        self.producer = MarketDataProducer(bootstrap, settings.assets, topic=topic)
        self.bid = 10_000
        self.seq = 0
        self.rng = random.Random(11)

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    async def one(self) -> None:
        from feed.message import message_from_ticks

        self.seq += 1
        self.bid = max(1_000, self.bid + self.rng.choice((-2, -1, 1, 2)))
        await self.producer.publish(message_from_ticks(
            self.settings.assets[ASSET], self.bid, self.bid + 1, time.time_ns() // 1000,
            self.seq, "bench"))

    async def run(self, rate: float, duration_s: float,
                  until: asyncio.Event | None = None) -> int:
        """Produce at ``rate`` per second for ``duration_s``, or with ``until`` until it is
        set; the ticks produced."""
        start = time.perf_counter()
        sent = 0
        while True:
            elapsed = time.perf_counter() - start
            if until.is_set() if until is not None else elapsed >= duration_s:
                break
            due = int(elapsed * rate) + 1
            while sent < due:
                await self.one()
                sent += 1
            await self.producer.flush()
            await asyncio.sleep(min(0.005, 1 / rate))
        return sent


@dataclasses.dataclass
class Clients:
    """WebSocket clients subscribed to ``bookTicker.SOL``: frames counted, and with
    ``timed`` each frame's delay from its tick's ``ts``."""

    url: str
    count: int
    timed: bool = False
    frames: int = 0
    delays_ms: list[float] = dataclasses.field(default_factory=list)
    counting: bool = False
    failed: int = 0

    async def run(self, ready: asyncio.Event, stop: asyncio.Event) -> None:
        import websockets

        connected = 0

        async def one() -> None:
            nonlocal connected
            async with websockets.connect(self.url, compression=None, max_queue=None,
                                          open_timeout=60) as ws:
                await ws.send(json.dumps({"method": "SUBSCRIBE",
                                          "params": [f"bookTicker.{ASSET}"]}))
                connected += 1
                if connected + self.failed == self.count:
                    ready.set()
                reader = asyncio.ensure_future(self._read(ws))
                await stop.wait()
                reader.cancel()

        async def counted() -> None:
            try:
                await one()
            except Exception:
                # a client that never connects must not keep the others from being ready
                self.failed += 1
                if connected + self.failed == self.count:
                    ready.set()
                raise

        results = await asyncio.gather(*(counted() for _ in range(self.count)),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)
                  and not isinstance(r, asyncio.CancelledError)]
        if failed:
            print(f"  ({len(failed)} clients failed: {failed[0]!r})", file=sys.stderr)

    async def _read(self, ws: Any) -> None:
        async for message in ws:
            if not self.counting:
                continue
            self.frames += 1
            if self.timed:
                data = json.loads(message).get("data", {})
                if "ts" in data:
                    sent = datetime.fromisoformat(data["ts"].replace("Z", "+00:00"))
                    self.delays_ms.append(time.time() * 1e3 - sent.timestamp() * 1e3)


# the client process: its own interpreter and event loop, so the frames it parses take no time
# from the bench's REST load generator (in one loop, 1,000 clients starved it)
def client_process(url: str, count: int, timed: bool, conn: Any) -> None:
    """Entry of the client process: connect ``count`` clients, send ``("ready", failed)``;
    count from a ``"count"`` message until a ``"stop"`` one, then send ``("done", frames,
    delays_ms, cpu_s)`` (``cpu_s``: this process's CPU seconds while counting) and disconnect.
    ``conn``: one end of a ``multiprocessing.Pipe``."""
    asyncio.run(_client_main(url, count, timed, conn))


async def _client_main(url: str, count: int, timed: bool, conn: Any) -> None:
    clients = Clients(url, count, timed)
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.ensure_future(clients.run(ready, stop))
    try:
        await asyncio.wait_for(ready.wait(), 120)
        await asyncio.sleep(0.5)  # the subscriptions' first frames are not the stream's
        conn.send(("ready", clients.failed))
        message = await asyncio.to_thread(conn.recv)
        if message == "count":
            cpu0 = time.process_time()
            clients.counting = True
            message = await asyncio.to_thread(conn.recv)
            clients.counting = False
            cpu_s = time.process_time() - cpu0
        else:
            cpu_s = 0.0
        conn.send(("done", clients.frames, clients.delays_ms, cpu_s))
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@dataclasses.dataclass
class ClientCounts:
    """What the client process counted: frames, delays (with ``timed``), its CPU seconds
    while counting, and the clients that failed to connect."""

    frames: int
    delays_ms: list[float]
    cpu_s: float
    failed: int


@dataclasses.dataclass
class Cpu:
    """CPU seconds over a window of ``wall_s`` seconds: the platform's processes, and this (the
    bench's) one."""

    platform_s: float
    bench_s: float
    wall_s: float


async def cpu_during(work: Any, exclude: frozenset[int] = frozenset()) -> tuple[Cpu, Any]:
    """``work()``'s result and the CPU seconds spent while it ran."""
    platform0, bench0, wall0 = platform_cpu_s(exclude), time.process_time(), time.monotonic()
    result = await work()
    return Cpu(platform_cpu_s(exclude) - platform0, time.process_time() - bench0,
               time.monotonic() - wall0), result


async def with_clients(url: str, count: int, work: Any, timed: bool = False
                       ) -> tuple[ClientCounts, Cpu, Any]:
    """Connect ``count`` clients in a process of their own, run ``work()`` while they count
    frames, stop them; their counts, the CPU spent by the rest meanwhile, ``work()``'s
    result."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=client_process, args=(url, count, timed, theirs),
                       name="shardex-bench-clients", daemon=True)
    proc.start()
    theirs.close()
    try:
        if not await asyncio.to_thread(ours.poll, 180):
            raise TimeoutError(f"{count} WebSocket clients not connected within 180 s")
        _, failed = ours.recv()
        ours.send("count")
        try:
            cpu, result = await cpu_during(work, frozenset({proc.pid or 0}))
        finally:
            ours.send("stop")
        if not await asyncio.to_thread(ours.poll, 60):
            raise TimeoutError("the client process did not report its counts within 60 s")
        _, frames, delays_ms, cpu_s = ours.recv()
        await asyncio.to_thread(proc.join, 60)
        return ClientCounts(frames, delays_ms, cpu_s, failed), cpu, result
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        ours.close()


# ---------------------------------------------------------------------- CPU time from /proc
def platform_cpu_s(exclude: frozenset[int] = frozenset()) -> float:
    """CPU seconds so far of this process's descendants (Ray's processes, the broker), less
    ``exclude`` and theirs; 0.0 without /proc."""
    import os

    from bench.api import descendants, process_table

    table = process_table()
    skipped = set(exclude).union(*(descendants(table, pid) for pid in exclude))
    return sum(table[pid][2] for pid in descendants(table, os.getpid()) if pid not in skipped)


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(settings: Any, bootstrap: str, topic: str, clients: int, rate: float,
                  duration_s: float) -> dict[str, Any]:
    from bench.api import _wait_prices, drive

    url = f"ws://{HOST}:{settings.port}/ws"
    producer = Producer(bootstrap, settings, topic)
    await producer.start()
    try:
        await producer.run(50, 1.0)
        await _wait_prices(settings.port, [ASSET])
        out: dict[str, Any] = {}
        # a. fan-out to the clients; the platform's CPU with the same ticks and no clients
        # first, so the difference is what the fan-out costs it
        idle_cpu, _ = await cpu_during(lambda: producer.run(rate, duration_s))
        fan, fan_cpu, produced = await with_clients(url, clients,
                                                    lambda: producer.run(rate, duration_s))
        out["fanout_clients"] = clients
        out["fanout_produced_per_s"] = produced / duration_s
        out["fanout_frames_per_s"] = fan.frames / duration_s
        out["fanout_frames_per_client_per_s"] = fan.frames / duration_s / clients
        out["fanout_failed_clients"] = fan.failed
        out["ticks_platform_cpu_s_per_s"] = idle_cpu.platform_s / idle_cpu.wall_s
        out["fanout_platform_cpu_s_per_s"] = fan_cpu.platform_s / fan_cpu.wall_s
        out["fanout_clients_cpu_s_per_s"] = fan.cpu_s / fan_cpu.wall_s
        # b. latency at 100 clients
        timed, _, _ = await with_clients(url, LATENCY_CLIENTS,
                                         lambda: producer.run(LATENCY_RATE, duration_s),
                                         timed=True)
        out["latency_samples"] = len(timed.delays_ms)
        out["latency_p50_ms"] = quantile(timed.delays_ms, 0.5)
        out["latency_p99_ms"] = quantile(timed.delays_ms, 0.99)
        # c. the REST loop while ticks flow, without and with the clients
        async def loaded() -> Any:
            # the ticks flow until the loop is over: its sign-ups and warm-up come before its
            # window, so a fixed length of ticks could end before the window does
            done = asyncio.Event()
            ticks = asyncio.ensure_future(producer.run(rate, 0.0, until=done))
            try:
                return await drive(settings.port, 64, duration_s)
            finally:
                done.set()
                await ticks

        alone_cpu, alone = await cpu_during(loaded)
        busy_clients, busy_cpu, busy = await with_clients(url, clients, loaded)
        out["rest_ops_per_s"] = alone.ops_per_s
        out["rest_with_ws_ops_per_s"] = busy.ops_per_s
        out["rest_ratio"] = busy.ops_per_s / alone.ops_per_s if alone.ops_per_s else None
        out["rest_errors"] = alone.errors + busy.errors
        out["rest_with_ws_frames"] = busy_clients.frames
        # CPU seconds per second of each window (sign-ups and warm-up included): the
        # platform's processes, the bench's (REST generator and producer), the clients'
        out["rest_platform_cpu_s_per_s"] = alone_cpu.platform_s / alone_cpu.wall_s
        out["rest_bench_cpu_s_per_s"] = alone_cpu.bench_s / alone_cpu.wall_s
        out["rest_with_ws_platform_cpu_s_per_s"] = busy_cpu.platform_s / busy_cpu.wall_s
        out["rest_with_ws_bench_cpu_s_per_s"] = busy_cpu.bench_s / busy_cpu.wall_s
        out["rest_with_ws_clients_cpu_s_per_s"] = busy_clients.cpu_s / busy_cpu.wall_s
        return out
    finally:
        await producer.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardex bench live", description=__doc__)
    parser.add_argument("--clients", type=positive_int, default=1000)
    parser.add_argument("--rate", type=rate, default=200.0, help="SOL ticks per second")
    parser.add_argument("--duration-s", type=duration, default=8.0)
    parser.add_argument("--candle-ticks", type=positive_int, default=20_000)
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed)")
    args = parser.parse_args(argv)

    from bench.api import _free_port, _settings
    from cluster.actors.launcher import Platform
    from feed.broker import EmbeddedBroker

    candles = candle_costs(args.candle_ticks)
    data_dir = tempfile.mkdtemp(prefix="shardex-bench-live-")
    settings = dataclasses.replace(
        _settings(_free_port(), data_dir), feed_source="none",
        ws_connections=max(10, args.clients + LATENCY_CLIENTS + 10),
        max_tick_jump_bps=1_000_000)
    broker = EmbeddedBroker(HOST, _free_port()).start()
    platform = Platform(settings, with_feed=False, bootstrap=broker.bootstrap)
    try:
        platform.start()
        live = asyncio.run(measure(settings, broker.bootstrap, platform.topic, args.clients,
                                   args.rate, args.duration_s))
    finally:
        platform.stop()
        broker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)

    print(f"candles per tick: book {candles['book_us']:.1f} us; with the SQLite store "
          f"{candles['stored_batch1_us']:.1f} us (a transaction per tick), "
          f"{candles['stored_batch100_us']:.1f} us (per 100 ticks)")
    print(f"fan-out: {live['fanout_clients']} clients, {live['fanout_produced_per_s']:.0f} "
          f"ticks/s produced: {live['fanout_frames_per_s']:.0f} frames/s delivered, "
          f"{live['fanout_frames_per_client_per_s']:.1f} per client (conflated)")
    print(f"tick produced -> frame received, {LATENCY_CLIENTS} clients, {LATENCY_RATE} ticks/s: "
          f"p50 {live['latency_p50_ms']:.1f} ms, p99 {live['latency_p99_ms']:.1f} ms "
          f"({live['latency_samples']} frames)")
    print(f"REST open/close at concurrency 64 with {args.rate:.0f} ticks/s: "
          f"{live['rest_ops_per_s']:.0f} ops/s without WebSocket clients, "
          f"{live['rest_with_ws_ops_per_s']:.0f} ops/s with {args.clients} "
          f"(ratio {live['rest_ratio']:.2f}; the clients in a process of their own)")
    fanout_us = ((live["fanout_platform_cpu_s_per_s"] - live["ticks_platform_cpu_s_per_s"])
                 / max(live["fanout_frames_per_s"], 1) * 1e6)
    print(f"CPU s/s: fan-out, platform {live['fanout_platform_cpu_s_per_s']:.2f} with "
          f"{args.clients} clients vs {live['ticks_platform_cpu_s_per_s']:.2f} without "
          f"({fanout_us:.0f} us per frame delivered), client process "
          f"{live['fanout_clients_cpu_s_per_s']:.2f}; REST, platform "
          f"{live['rest_platform_cpu_s_per_s']:.2f} and bench "
          f"{live['rest_bench_cpu_s_per_s']:.2f} without clients, platform "
          f"{live['rest_with_ws_platform_cpu_s_per_s']:.2f}, bench "
          f"{live['rest_with_ws_bench_cpu_s_per_s']:.2f} and client process "
          f"{live['rest_with_ws_clients_cpu_s_per_s']:.2f} with them")
    live["fanout_platform_us_per_frame"] = fanout_us
    out = {"bench": "live", **{k: round(v, 2) for k, v in candles.items()},
           **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in live.items()}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
