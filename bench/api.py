"""``shardex bench api``: the HTTP API through Ray Serve vs the same engine without Ray.

1. Starts the platform as ``shardex up`` does (local Ray, journaled ledger and shards in a temp
   DATA_DIR unless ``--no-durable``, its own embedded broker, sim prices, Serve on a free port)
   and drives a closed loop over HTTP: every worker has its own account and alternates
   ``POST /positions/open`` and ``POST /positions/close`` (one op = one request) at concurrency
   1 and 64. With ``--replicas 1,2`` once per API_REPLICAS value, each on a platform of its
   own (``serve_ops_per_s_by_replicas``).
2. The same loop against the baseline: the same machines, runners, ports and service
   (cluster.actors.local.LocalHosts(...).service(), in memory) behind a plain FastAPI +
   uvicorn process, no Ray.
3. ``tick_to_close``: ``--positions`` open positions (leverage 100, entries spread over a band
   of prices) are bulk-loaded into the shard hosts, the sim source is stopped, and ``--ticks``
   falling ticks are produced to the topic, each liquidating the next slice; the time from
   producing a tick to the ledger counting all of that tick's closes is one sample.

   The bulk load runs inside each shard host (``__ray_call__``) through the host's own
   ``Runner.execute``, in batches of ``LOAD_BATCH`` commands: one ``Open`` command per
   position (decided, encoded, applied one by one like an API open; journaled, each
   batch is one journal record and one fdatasync), and before the opens of each entry level
   an ``ApplyTick`` one tick above the previous one sets the price they open at (rising ticks
   trigger nothing: every position is a long without take-profit). The margins are locked in
   the ledger with one ``LockMargin`` per user.

The rate limits of the API (API_KEY_RATE_PER_S, SIGNUPS_PER_MIN) are off in both servers
unless ``--default-limits`` (then only SIGNUPS_PER_MIN is lifted): the loop measures
throughput, not the limiter. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

from bench import cpu_split, wrk
from bench.http_load import Connection, LoadResult, closed_loop
from bench.options import duration, int_list, nonneg_int, positive_int
from bench.wrk import WrkResult
from cluster.config import Settings
from cluster.trading.placement import ShardSpec

HOST = "127.0.0.1"
OPEN_BODY = {"asset": "SOL", "type": "long", "margin": "10", "leverage": 2}
SIGNUP_USD = 10_000


def _free_port() -> int:
    from feed.broker import free_port

    return free_port(HOST)


# ---------------------------------------------------------------------- the HTTP loop
async def _wait_prices(port: int, assets: list[str], timeout_s: float = 60.0) -> None:
    conn = Connection(HOST, port)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ConnectionError):
                r = await conn.request("GET", "/api/v1/prices")
                if r.status == 200 and all(a in r.json() for a in assets):
                    return
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    raise TimeoutError(f"no prices for {assets} on port {port} within {timeout_s} s")


async def _accounts(port: int, n: int) -> list[dict[str, str]]:
    conn = Connection(HOST, port)
    try:
        out = []
        for _ in range(n):
            r = await conn.request("POST", "/api/v1/accounts", {})
            if r.status != 201:
                raise RuntimeError(f"account creation failed: {r.status} {r.body[:200]!r}")
            out.append({"Authorization": f"Bearer {r.json()['apiKey']}"})
        return out
    finally:
        await conn.close()


async def drive(port: int, concurrency: int, duration_s: float) -> LoadResult:
    """Closed loop of open/close requests; each worker owns one account."""
    headers = await _accounts(port, concurrency)
    pending: list[str | None] = [None] * concurrency
    failures: dict[str, int] = {}

    async def op(conn: Connection, i: int) -> bool:
        pid = pending[i]
        if pid is None:
            r = await conn.request("POST", "/api/v1/positions/open", OPEN_BODY, headers[i])
            if r.status == 201:
                pending[i] = r.json()["positionId"]
                return True
        else:
            r = await conn.request("POST", "/api/v1/positions/close", {"positionId": pid},
                                   headers[i])
            if r.status == 200:
                pending[i] = None
                return True
            if r.status == 404:
                pending[i] = None
        key = f"{r.status}"
        failures[key] = failures.get(key, 0) + 1
        return False

    result = await closed_loop(HOST, port, op, concurrency, duration_s)
    if failures:
        print(f"  (failed requests at concurrency {concurrency}: {failures})", file=sys.stderr)
    return result


@dataclasses.dataclass(frozen=True, slots=True)
class Costs:
    """What one op cost at one concurrency: ``host_calls``, actor calls (batches) the ledger
    and shard hosts ran (the feed's tick calls meanwhile included); ``cpu_ms``, CPU of every
    process of the platform (Ray's own, the actors, the broker; not the load generator).
    Both are read before and after the whole run (the workers' sign-ups, the warm-up, the
    window, the operations finishing after it), so they are divided by every successful op
    of the run (``ops_done``), not by the window's alone."""

    host_calls: float
    cpu_ms: float


Probe = Callable[[], Awaitable[tuple[int, float]]]  # -> (host calls so far, platform CPU s)


def per_op_costs(before: tuple[int, float], after: tuple[int, float], ops_done: int) -> Costs:
    """:class:`Costs` from two probe readings (host calls, platform CPU seconds) taken around
    a run that completed ``ops_done`` successful ops."""
    return Costs((after[0] - before[0]) / ops_done, (after[1] - before[1]) * 1000 / ops_done)


Result = LoadResult | WrkResult


async def drive_with(client: str, port: int, concurrency: int, duration_s: float,
                     loop: str = "open-close") -> Result:
    """``loop`` ("open-close", or "state": ``GET /state``) at ``concurrency`` for
    ``duration_s``, driven by ``client``: "wrk" or "python" (:func:`drive`)."""
    if client == "python" and loop == "open-close":
        return await drive(port, concurrency, duration_s)
    headers = await _accounts(port, concurrency)
    keys = [h["Authorization"].removeprefix("Bearer ") for h in headers]
    if client == "wrk":
        return await asyncio.to_thread(wrk.run, port, keys, duration_s, loop, OPEN_BODY)

    async def get_state(conn: Connection, i: int) -> bool:
        r = await conn.request("GET", "/api/v1/state", None, headers[i])
        return r.status == 200

    return await closed_loop(HOST, port, get_state, concurrency, duration_s)


async def drive_all(port: int, concurrencies: list[int], duration_s: float, assets: list[str],
                    probe: Probe | None = None, client: str = "python"
                    ) -> tuple[dict[int, Result], dict[int, Costs]]:
    """The closed loop at each concurrency, and with ``probe`` what an op cost at each."""
    await _wait_prices(port, assets)
    await drive(port, 4, 1.0)  # warm up routes, batchers and actor connections
    results: dict[int, Result] = {}
    costs: dict[int, Costs] = {}
    for c in concurrencies:
        before = await probe() if probe is not None else None
        results[c] = r = await drive_with(client, port, c, duration_s)
        if probe is not None and before is not None and r.ops_done:
            calls, cpu_s = await probe()
            costs[c] = per_op_costs(before, (calls, cpu_s), r.ops_done)
    return results, costs


def process_table() -> dict[int, tuple[int, str, float]]:
    """``{pid: (parent pid, program, CPU seconds so far)}`` of every living process, ``program``
    the first word of its command line (a Ray worker's names its actor), CPU user + system
    (Linux /proc; empty elsewhere)."""
    table: dict[int, tuple[int, str, float]] = {}
    tick_s = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.0
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    title = f.read().split(b"\0")[0].decode(errors="replace")
                table[int(entry)] = (int(fields[1]), title,
                                     (int(fields[11]) + int(fields[12])) * tick_s)
    return table


def descendants(table: dict[int, tuple[int, str, float]], root_pid: int) -> list[int]:
    """The pids of ``table`` (:func:`process_table`) descending from ``root_pid``."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _title, _cpu_s) in table.items():
        children.setdefault(parent, []).append(pid)
    found: list[int] = []
    todo = [root_pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def descendants_cpu_s(root_pid: int) -> float:
    """CPU seconds (user + system) used so far by the living processes descending from
    ``root_pid`` (Linux /proc; 0.0 where there is none)."""
    table = process_table()
    return sum(table[pid][2] for pid in descendants(table, root_pid))


def platform_probe(platform: Any) -> Probe:
    """A probe of ``platform``: the batches its ledger and shard hosts ran so far, and the CPU
    seconds of this process's descendants (the platform it started, the broker)."""
    hosts = [platform.ledger, *platform.shards.values()]

    async def probe() -> tuple[int, float]:
        infos = await asyncio.gather(*(h.info.remote() for h in hosts))
        return sum(int(i["batches"]) for i in infos), descendants_cpu_s(os.getpid())

    return probe


# ---------------------------------------------------------------------- baseline server
def serve_baseline(port: int) -> None:
    """The no-Ray baseline: create_app(LocalHosts(settings).service()) under uvicorn.

    Prices: a tick per asset every 250 ms at a fixed book, applied to the shards (their
    settlements delivered to the ledger) the way the feed actor does.
    """
    import uvicorn

    from cluster.actors.local import LocalHosts
    from cluster.durability.runner import wall_clock_us
    from cluster.http.api import create_app
    from engine.market import Tick

    settings = unthrottled(Settings.from_env())
    hosts = LocalHosts(settings)
    app = create_app(hosts.service())
    books = {"SOL": ("150.00", "150.01"), "BTC": ("100000.0", "100000.1"),
             "ETH": ("3500.00", "3500.01")}

    async def ticker() -> None:
        seq = 0
        while True:
            seq += 1
            ticks = []
            for asset in settings.assets.assets:
                bid, ask = books.get(asset.name, ("100.00", "100.01"))
                ticks.append(Tick(asset.name, asset.price_to_ticks(bid),
                                  asset.price_to_ticks(ask), wall_clock_us(), seq, "bench"))
            await hosts.apply_ticks(ticks)
            await asyncio.sleep(0.25)

    async def run() -> None:
        config = uvicorn.Config(app, host=HOST, port=port, log_level="warning",
                                access_log=False, lifespan="off")
        server = uvicorn.Server(config)
        task = asyncio.create_task(ticker())
        try:
            await server.serve()
        finally:
            task.cancel()

    try:
        asyncio.run(run())
    finally:
        hosts.close()


def _start_baseline(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "bench.api", "--serve-baseline", str(port)],
                            cwd=str(Path(__file__).resolve().parents[1]),
                            stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------------- tick -> close
LOAD_BATCH = 20_000  # commands per Runner.execute of the bulk load (one journal record each)
LOAD_REQUEST_IDS = 1 << 62  # request ids of the bulk load's opens (the service's are below)
BULK_LOAD = ("Open commands through each shard host's Runner.execute in batches of "
             f"{LOAD_BATCH:,} (an ApplyTick per entry level sets the entry price)")


def _load_shard(host: Any, owners_by_level: list[list[int]], entries: list[int],
                margin_micros: int, first_request_id: int) -> dict[str, Any]:
    """Runs inside a shard host (``__ray_call__``): for each entry level, lowest price first,
    an ``ApplyTick`` whose ask is that entry, then one ``Open`` (long, leverage 100, no
    take-profit or stop-loss) per owner listed for the level; everything through the host's
    ``Runner.execute`` in batches of LOAD_BATCH commands. Returns the liquidation tick of
    every position opened (the driver computes from them how many each tick closes)."""
    import numpy as np

    from engine.market import Tick
    from engine.messages import OpenPosition, ShardOpen
    from engine.orders import Side
    from engine.shard_machine import ApplyTick, Open

    runner = host.runner
    asset = runner.machine.asset
    commands: list[Any] = []
    liqs: list[int] = []
    refused: dict[str, int] = {}
    triggered = 0
    request_id = first_request_id

    def flush() -> None:
        nonlocal triggered
        for answer in runner.execute(commands):
            if isinstance(answer, OpenPosition):
                liqs.append(answer.liq_ticks)
            elif isinstance(answer, int) and not isinstance(answer, bool):
                triggered += answer
            else:
                text = str(getattr(answer, "message", answer))
                refused[text] = refused.get(text, 0) + 1
        commands.clear()

    started = time.perf_counter()
    order = sorted(range(len(entries)), key=lambda level: entries[level])
    for seq, level in enumerate(order, start=1):
        entry = entries[level]
        commands.append(ApplyTick(Tick(asset.name, entry - 1, entry, time.time_ns() // 1000,
                                       seq, "bench-load")))
        for owner in owners_by_level[level]:
            request_id += 1
            commands.append(Open(ShardOpen(request_id, owner, Side.LONG, margin_micros, 100,
                                           None, None, None, 0)))
        if len(commands) >= LOAD_BATCH:
            flush()
    flush()
    return {"liqs": np.asarray(liqs, dtype=np.int64), "refused": refused,
            "triggered": triggered, "load_s": time.perf_counter() - started,
            "journal_bytes": runner.journal_bytes()}


async def _one(handle: Any, command: Any) -> Any:
    """The answer of one command sent to a MachineHost."""
    [answer] = await handle.execute.remote([command])
    return answer


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What :func:`load_positions` loaded: each shard's liquidation ticks (one per position),
    the seconds from the first lock to the last shard's answer (``load_s``) and to the locks'
    answer (``lock_s``), and each shard's own report (``_load_shard``)."""

    liqs_by_shard: dict[str, Any]  # int64 arrays
    load_s: float
    lock_s: float
    results: list[dict[str, Any]]


async def load_positions(platform: Any, positions: int, closes_per_tick: int,
                         levels_min: int) -> Loaded:
    """Open ``positions`` leverage-100 longs spread over the shards, entry levels one price step
    apart below each shard's last ask (at least ``levels_min + 2`` levels, about
    ``closes_per_tick`` positions over all shards per level), each through the shard host's
    runner (``_load_shard``), their margins locked in the ledger first."""
    import secrets

    from engine.ledger_machine import CreateAccount, LockMargin, hash_api_key
    from engine.messages import MarginLock
    from engine.shard_machine import LastTick

    layout: tuple[ShardSpec, ...] = platform.layout
    ledger = platform.ledger
    margin_micros = 1_000_000  # 1 USD at leverage 100 = 100 USD notional
    per_user = SIGNUP_USD // 2  # positions per user (half its balance locked)
    users_needed = max(len(layout), -(-positions // per_user))
    created = await ledger.execute.remote([
        CreateAccount(f"acc_bench_{i}_{secrets.token_hex(6)}",
                      hash_api_key(secrets.token_urlsafe(24)))
        for i in range(users_needed)])
    users = [int(a.user) for a in created]
    # one entry level per tick step: each falling tick crosses the next level on every shard,
    # closing ~closes_per_tick positions in all
    per_level = max(1, closes_per_tick // len(layout))
    n_shard = positions // len(layout)
    levels = max(levels_min + 2, n_shard // per_level)
    t0 = time.perf_counter()
    locks: list[LockMargin] = []
    loads = []
    for i, spec in enumerate(layout):
        last = await _one(platform.shards[spec.name], LastTick())  # the sim's last book
        if last is None:
            raise RuntimeError(f"{spec.name} has no price yet")
        owners = users[i::len(layout)]
        per_owner = max(1, n_shard // max(1, len(owners)))
        # position k of the shard belongs to owners[k // per_owner], at entry level k % levels
        owners_by_level: list[list[int]] = [[] for _ in range(levels)]
        for k in range(len(owners) * per_owner):
            owners_by_level[k % levels].append(owners[k // per_owner])
        entries = [last.ask_ticks - level for level in range(levels)]
        locks.extend(LockMargin(MarginLock(u, per_owner * margin_micros)) for u in owners)
        loads.append((spec.name, owners_by_level, entries, LOAD_REQUEST_IDS + i * 10**12))
    refused = [r for r in await ledger.execute.remote(locks) if r is not None]
    if refused:
        raise RuntimeError(f"margin locks refused: {refused[:3]}")
    lock_s = time.perf_counter() - t0
    results = await asyncio.gather(*(
        platform.shards[name].__ray_call__.remote(_load_shard, by_level, entries,
                                                  margin_micros, first)
        for name, by_level, entries, first in loads))
    for (name, *_), result in zip(loads, results, strict=True):
        if result["refused"] or result["triggered"]:
            raise RuntimeError(f"{name}: bulk load refused {result['refused']}, "
                               f"triggered {result['triggered']}")
    return Loaded({name: r["liqs"] for (name, *_), r in zip(loads, results, strict=True)},
                  time.perf_counter() - t0, lock_s, list(results))


def levels_short(levels: dict[str, int], ticks: int, step: int) -> dict[str, int]:
    """The shards (name: distinct liquidation levels) with fewer levels than ``ticks`` falling
    ticks of ``step`` levels each cross: from one of those ticks on, that shard closes
    nothing."""
    return {name: n for name, n in levels.items() if n < ticks * step}


async def tick_to_close(platform: Any, bootstrap: str, positions: int, ticks: int,
                        closes_per_tick: int = 300) -> dict[str, Any]:
    import numpy as np

    from engine.ledger_machine import Totals
    from feed.message import message_from_ticks
    from feed.producer import MarketDataProducer

    settings: Settings = platform.settings
    layout: tuple[ShardSpec, ...] = platform.layout
    loaded = await load_positions(platform, positions, closes_per_tick, ticks)
    liqs_by_shard = loaded.liqs_by_shard
    ledger = platform.ledger

    # falling ticks: tick j crosses the next `step` liquidation levels on every shard
    producer = MarketDataProducer(bootstrap, settings.assets, topic=platform.topic)
    await producer.start()
    samples_ms: list[float] = []
    closed_total = 0
    try:
        base = int((await _one(ledger, Totals()))["closed_positions"])
        sorted_liqs = {n: np.sort(np.asarray(v, dtype=np.int64))[::-1]
                       for n, v in liqs_by_shard.items()}
        distinct = {n: np.unique(v)[::-1] for n, v in sorted_liqs.items()}
        step = 1
        short = levels_short({n: len(v) for n, v in distinct.items()}, ticks, step)
        if short:
            # past its last level a shard's tick would close nothing more, and the tick would
            # be timed for the other shards' closes alone (or for none)
            raise RuntimeError(f"too few liquidation levels for {ticks} ticks: {short}; load "
                               "more positions or time fewer ticks")
        seq = 10**12
        for j in range(ticks):
            expected = 0
            msgs = []
            for spec in layout:
                levels_desc = distinct[spec.name]
                bid = int(levels_desc[min(len(levels_desc) - 1, (j + 1) * step - 1)])
                expected += int((sorted_liqs[spec.name] >= bid).sum())
                seq += 1
                asset = settings.assets[spec.asset]
                msgs.append(message_from_ticks(asset, bid, bid + 1, time.time_ns() // 1000, seq,
                                               "bench"))
            target = base + expected
            start = time.perf_counter()
            for msg in msgs:
                await producer.publish(msg)
            await producer.flush()
            while True:
                done = int((await _one(ledger, Totals()))["closed_positions"])
                if done >= target:
                    break
                if time.perf_counter() - start > 30:
                    raise TimeoutError(f"tick {j}: {done - base} of {expected} closes after 30 s")
            samples_ms.append((time.perf_counter() - start) * 1000)
            closed_total = done - base
    finally:
        await producer.stop()
    samples_ms.sort()
    p99 = samples_ms[min(len(samples_ms) - 1, max(0, -(-99 * len(samples_ms) // 100) - 1))]
    return {"positions": sum(len(v) for v in liqs_by_shard.values()),
            "load_s": loaded.load_s, "lock_s": loaded.lock_s,
            "shard_load_s": max(r["load_s"] for r in loaded.results),
            "load_journal_bytes": sum(int(r["journal_bytes"]) for r in loaded.results),
            "ticks": ticks, "closed": closed_total,
            "p50_ms": samples_ms[len(samples_ms) // 2], "p99_ms": p99, "max_ms": samples_ms[-1]}


# ---------------------------------------------------------------------- main
DEFAULT_LIMITS_ENV = "SHARDEX_BENCH_DEFAULT_LIMITS"  # set by --default-limits (and inherited)


def unthrottled(settings: Settings) -> Settings:
    """``settings`` without the limits per client address (every client of a benchmark
    connects from 127.0.0.1: its signups, and its HTTP connections, which a single replica
    counts) and, unless ``--default-limits``, without the per-key request limit."""
    per_key = settings.api_key_rate_per_s if os.environ.get(DEFAULT_LIMITS_ENV) == "1" else 0
    return dataclasses.replace(settings, api_key_rate_per_s=per_key, signups_per_min=0,
                               http_connections=0)


def _settings(port: int, data_dir: str) -> Settings:
    base = unthrottled(Settings.from_env())
    return dataclasses.replace(base, port=port, feed_source="sim", data_dir=Path(data_dir),
                               kafka_brokers=None, ray_address=base.ray_address)


Measured = tuple[dict[int, Result], dict[int, Costs], Result]


def _measure_serve(args: argparse.Namespace, levels: list[int], replicas: int, positions: int,
                   profile: bool = False
                   ) -> tuple[float, Measured, dict[str, Any], CpuSplit | None]:
    """One platform with ``replicas`` API replicas on its own broker: (start seconds, the
    closed loop's results and costs by concurrency and GET /state at the top one,
    tick_to_close over ``positions``, with ``profile`` the CPU split of _cpu_split)."""
    from cluster.actors.launcher import Platform
    from feed.broker import EmbeddedBroker, free_ports

    data_dir = tempfile.mkdtemp(prefix="shardex-bench-")
    # the API's port and the replicas', HAProxy's and Serve's fallback proxy's after it
    port = free_ports(replicas + 4, HOST)
    settings = dataclasses.replace(_settings(port, data_dir), api_replicas=replicas)
    assets = [a.name for a in settings.assets.assets]
    broker = EmbeddedBroker(HOST, _free_port()).start()
    sweep: dict[str, Any] = {}
    split: CpuSplit | None = None
    t0 = time.perf_counter()
    # durable: journaled hosts in DATA_DIR that Ray restarts, reconciled at start (`shardex up`)
    platform = Platform(settings, with_feed=True, bootstrap=broker.bootstrap,
                        direct_ingress=not args.proxy, durable=args.durable)
    try:
        platform.start()
        startup_s = time.perf_counter() - t0
        results, costs = asyncio.run(drive_all(settings.port, levels, args.duration_s,
                                               assets, platform_probe(platform), args.client))
        state = asyncio.run(drive_with(args.client, settings.port, max(levels),
                                       args.duration_s, "state"))
        if profile:
            split = _cpu_split(platform, settings, max(levels), args.duration_s, args.client)
        if positions > 0:
            platform.stop_feed_source()
            sweep = asyncio.run(tick_to_close(platform, broker.bootstrap, positions,
                                              args.ticks, args.closes_per_tick))
    finally:
        platform.stop()
        broker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return startup_s, (results, costs, state), sweep, split


class CpuSplit(NamedTuple):
    """CPU ms per request: ``layers`` by process role and layer (py-spy samples,
    bench.cpu_split), ``measured`` by process role (the process's user + system time)."""

    layers: dict[str, dict[str, float]]
    measured: dict[str, float]


def _cpu_split(platform: Any, settings: Settings, concurrency: int, duration_s: float,
               client: str) -> CpuSplit:
    """The open/close loop once more at ``concurrency`` while py-spy samples the API replica,
    the ledger and the shard hosts: CPU ms per request, by process role and layer."""
    import ray

    def pid(handle: Any) -> int:
        return int(ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30))

    pids = {"api": cpu_split.listener_pid(settings.port), "ledger": pid(platform.ledger)}
    pids.update({name: pid(h) for name, h in platform.shards.items()})

    async def run() -> tuple[Result, dict[str, list[str]]]:
        sampled = asyncio.create_task(asyncio.to_thread(cpu_split.record, pids, duration_s))
        result = await drive_with(client, settings.port, concurrency, duration_s)
        return result, await sampled

    before = process_table()
    result, stacks = asyncio.run(run())
    after = process_table()
    # py-spy's samples give the shares; /proc gives each process's CPU itself (a thread py-spy
    # takes for busy may be waiting, for the GIL among others)
    # /proc is read around the whole run (sign-ups, warm-up, the operations finishing after
    # the window): its CPU is divided by every op the run completed
    measured = {role: round((after[pid][2] - before[pid][2]) * 1000
                            / max(1, result.ops_done), 3)
                for role, pid in pids.items() if pid in before and pid in after}
    return CpuSplit({role: cpu_split.per_request_ms(cpu_split.split(lines), result.ops)
                     for role, lines in stacks.items()}, measured)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardex bench api", description=__doc__)
    parser.add_argument("--duration-s", type=duration, default=8.0, help="per concurrency level")
    parser.add_argument("--concurrency", type=int_list, default="1,64",
                        help="comma-separated levels")
    parser.add_argument("--positions", type=nonneg_int, default=1_000_000,
                        help="open positions for tick_to_close (0 skips it)")
    parser.add_argument("--ticks", type=positive_int, default=30, help="liquidating ticks to time")
    parser.add_argument("--closes-per-tick", type=positive_int, default=300,
                        help="positions each liquidating tick closes (over all shards)")
    parser.add_argument("--durable", action=argparse.BooleanOptionalAction, default=True,
                        help="journaled ledger and shards in a temp DATA_DIR, as `shardex up` "
                             "(the default); --no-durable: in-memory actors")
    parser.add_argument("--replicas", type=int_list, default="1",
                        help="comma-separated API_REPLICAS values, each measured on a platform "
                             "of its own (more than 1: HAProxy in front, as `shardex up`)")
    parser.add_argument("--proxy", action="store_true",
                        help="serve through Serve's proxy instead of direct ingress (comparison)")
    parser.add_argument("--default-limits", action="store_true",
                        help="keep every API limit at its default (API_KEY_RATE_PER_S 50/s, "
                             "burst 100, body and depth limits) in both servers; only "
                             "SIGNUPS_PER_MIN is lifted, the workers' accounts all come from "
                             "127.0.0.1")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator: wrk (Debian package; `make bench` installs it), "
                             "the Python client, or auto: wrk when installed")
    parser.add_argument("--cpu-split", action="store_true",
                        help="one more run at the top concurrency while py-spy samples the "
                             "API replica, the ledger and the shards: CPU per request by "
                             "process and layer (HTTP, validation, service, Ray, journal...)")
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed)")
    parser.add_argument("--serve-baseline", type=nonneg_int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.default_limits:
        os.environ[DEFAULT_LIMITS_ENV] = "1"  # the baseline process inherits it
    if args.serve_baseline:
        serve_baseline(args.serve_baseline)
        return 0
    levels = args.concurrency
    top = max(levels)
    replica_counts = args.replicas
    if args.client == "auto":
        args.client = "wrk" if wrk.wrk_path() else "python"
        if args.client == "python":
            print("wrk is not installed: the Python client drives the load (it shares the "
                  "cores with the platform)", file=sys.stderr)

    by_replicas: dict[int, Measured] = {}
    sweep: dict[str, Any] = {}
    split: CpuSplit | None = None
    startup_s = 0.0
    for n, replicas in enumerate(replica_counts):
        # the first platform also times tick -> close (it does not depend on the replicas)
        started_s, by_replicas[replicas], measured, profiled = _measure_serve(
            args, levels, replicas, args.positions if n == 0 else 0,
            profile=args.cpu_split and n == 0)
        if n == 0:
            startup_s, sweep, split = started_s, measured, profiled
    serve_results, serve_costs, serve_state = by_replicas[replica_counts[0]]
    assets = [a.name for a in Settings.from_env().assets.assets]

    port = _free_port()
    proc = _start_baseline(port)
    try:
        base_results, _ = asyncio.run(drive_all(port, levels, args.duration_s, assets,
                                                client=args.client))
        base_state = asyncio.run(drive_with(args.client, port, top, args.duration_s, "state"))
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()

    print(f"platform start: {startup_s:.1f} s; one op = one HTTP request (open or close); "
          "API limits: " + ("defaults (SIGNUPS_PER_MIN lifted)" if args.default_limits
                            else "off") + f"; load from {args.client}")
    print(f"{'path':<52}{'conc':>6}{'ops/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    serve_path = ("proxy" if args.proxy else "direct ingress") + \
        (", journaled" if args.durable else ", in memory")
    rows = [(f"ray serve ({serve_path}" + (f", {r} replicas" if r > 1 else "") + ")",
             {**res, "GET /state": state}) for r, (res, _, state) in by_replicas.items()]
    failed_timed = 0
    for name, results in (*rows, ("baseline uvicorn, no ray",
                                  {**base_results, "GET /state": base_state})):
        for c, r in results.items():
            label = f"{name} {c}" if isinstance(c, str) else name
            conc = top if isinstance(c, str) else c
            print(f"{label:<52}{conc:>6}{r.ops_per_s:>10.0f}{r.percentile_ms(50):>10.2f}"
                  f"{r.percentile_ms(99):>10.2f}{r.errors:>8}")
            failed_timed += r.errors if isinstance(r, WrkResult) else 0
    if failed_timed:
        print(f"  (ops/s count successful requests only; wrk's p50 and p99 time every request, "
              f"the {failed_timed:,} failed ones included)")
    for c, cost in serve_costs.items():
        print(f"ray serve at concurrency {c}: {cost.host_calls:.2f} actor calls (ledger and "
              f"shard hosts, feed ticks included) and {cost.cpu_ms:.2f} ms of platform CPU "
              f"per op")
    if sweep:
        journaled = (f", {sweep['load_journal_bytes'] / 1e6:.0f} MB journaled"
                     if args.durable else "")
        print(f"bulk load: {BULK_LOAD}; margins locked with one LockMargin per user"
              f"{journaled}")
        print(f"tick -> close visible in ledger: {sweep['positions']:,} positions "
              f"(loaded in {sweep['load_s']:.1f} s), {sweep['ticks']} ticks, "
              f"{sweep['closed']:,} closes: p50 {sweep['p50_ms']:.1f} ms, "
              f"p99 {sweep['p99_ms']:.1f} ms, max {sweep['max_ms']:.1f} ms")
    if split:
        print(f"CPU per request at concurrency {top} (ms: the process's CPU time, then "
              "py-spy's samples by layer, which count waits some threads make as busy):")
        for role, layers in split.layers.items():
            print(f"  {role:<14} {split.measured.get(role, float('nan')):6.3f}  "
                  f"sampled {sum(layers.values()):6.3f}: " + ", ".join(
                      f"{layer} {ms:.3f}" for layer, ms in layers.items()))
    s, b = serve_results[top], base_results[top]
    out = {
        "bench": "api",
        "concurrency": top,
        "serve_path": serve_path,
        "limits": "defaults (signups lifted)" if args.default_limits else "off",
        "serve_ops_per_s": round(s.ops_per_s, 1),
        "serve_p50_ms": round(s.percentile_ms(50), 2),
        "serve_p99_ms": round(s.percentile_ms(99), 2),
        "serve_c1_ops_per_s": round(serve_results[min(levels)].ops_per_s, 1),
        "serve_c1_p50_ms": round(serve_results[min(levels)].percentile_ms(50), 2),
        "serve_host_calls_per_op": round(serve_costs[top].host_calls, 3)
        if top in serve_costs else None,
        "serve_cpu_ms_per_op": round(serve_costs[top].cpu_ms, 3) if top in serve_costs else None,
        "baseline_ops_per_s": round(b.ops_per_s, 1),
        "baseline_p50_ms": round(b.percentile_ms(50), 2),
        "baseline_p99_ms": round(b.percentile_ms(99), 2),
        "ratio_vs_baseline": round(s.ops_per_s / b.ops_per_s, 3) if b.ops_per_s else None,
        "sweep_positions": sweep.get("positions", 0),
        "sweep_load_s": round(sweep["load_s"], 1) if sweep else None,
        "sweep_load": BULK_LOAD if sweep else None,
        "tick_to_close_p50_ms": round(sweep["p50_ms"], 2) if sweep else None,
        "tick_to_close_p99_ms": round(sweep["p99_ms"], 2) if sweep else None,
        # every row of the table: each concurrency, GET /state, every replica count, baseline
        "errors": sum(r.errors for results, _, state in by_replicas.values()
                      for r in (*results.values(), state))
        + sum(r.errors for r in (*base_results.values(), base_state)),
        "serve_ops_per_s_by_replicas": {str(r): round(res[top].ops_per_s, 1)
                                        for r, (res, _, _) in by_replicas.items()},
        "serve_state_per_s": round(serve_state.ops_per_s, 1),
        "serve_state_p99_ms": round(serve_state.percentile_ms(99), 2),
        "baseline_state_per_s": round(base_state.ops_per_s, 1),
        "client": args.client,
        "cpu_split_ms_per_op": split.layers if split else None,
        "cpu_ms_per_op_by_process": split.measured if split else None,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
