"""``shardex bench latency``: the latency budget from a Backpack frame to a settled liquidation.

Runs the durable platform as ``shardex up`` runs it (local Ray, journaled ledger and shards in a
temporary DATA_DIR, the feed actor, the API; its own embedded broker on a free loopback port; no
feed source: this bench produces), bulk-loads ``--positions`` open positions into the shard
hosts (bench.api's loader: leverage-100 longs spread over entry levels), then produces
``--rate`` ticks/s round robin over the assets for ``--seconds`` (after ``--warmup-s`` that is
not counted). A ``--liquidating-share`` of each asset's ticks falls to the next liquidation
level of its positions (about ``--closes-per-tick`` closes over all shards, like
``bench api``'s tick_to_close); the others keep the bid at that level and move the ask, so
they close nothing. Every price stays within the feed's bounds (fresh ``ts_us``, moves far
below MAX_TICK_JUMP_BPS).

``--source direct`` (the default) hands each tick to the producer with ``ts_us`` = produce
time, as ``bench feed`` does. ``--source backpack`` sends each tick as a Backpack ``bookTicker``
frame from a WebSocket server on loopback that plays the exchange (``T`` = when it sends the
frame) to the feed service's own Backpack client, whose messages go to the producer as
``shardex feed`` publishes them: the first hop is measured too, but the exchange's own work
(about a third of the bench process's CPU per tick) shares the two cores with the platform.

Every timestamp is the one wall clock of the machine (``time.time_ns() // 1000``): the bench
notes when it produced each tick (and with Backpack when the frame was sent and received); the
feed actor's ring of shard calls (``FeedActor.call_timings``) says when the ticks were read,
the shard call sent and answered, and the settlement delivered; the hosts' rings
(``MachineHost.timings``: Runner.ExecuteTiming) say when each execute began, how long it
stepped (decide/sweep + apply) and committed (journal append + fdatasync), and when it ended.
A call is matched to the execute that ran inside it; the time before that execute starts is
split into waiting behind the host's previous execute (queue) and the rest (Ray's send). Both
rings are read every :data:`POLL_S` while ticks flow.

End to end, over every tick produced in the window: ``feed_deliver`` = produce -> the end of
the shard's execute that applied it, or, when the feed conflated it away, the newer tick of its
asset that replaced it (journaled; committed when it closed positions, a tick alone rides the
next commit); the same over the delivered ticks only is ``bench feed``'s figure.
``tick_to_settled`` = a liquidating tick produced -> the end of the ledger's execute that
applied and committed the closes of the level it crossed (carried by it, or by the tick that
replaced it). The hops of the price path are taken over every tick, those of the liquidation
path over the liquidating ticks; ``superseded`` is the wait of a conflated tick for the tick
that carried it. Prints the table, then one JSON line last (``hops``: the liquidation path,
``price_hops``: the price path). ``--dump`` keeps the rings and the ticks, ``--report`` prints
a dump's report again.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# bench.api's bulk loader, shared so both benches load positions the same way: _load_shard
# runs inside a shard host, _one sends one command to a host; and its reading of /proc
from bench.api import _one, descendants, load_positions, process_table
from bench.options import duration_or_zero, existing_file, new_file, nonneg_int, positive_int, share
from cluster.config import Settings
from cluster.trading.placement import ShardSpec
from feed.broker import MARKET_TOPIC_MAX_RECORDS
from feed.producer import LINGER_MS
from feed.settings import MARKET_TOPIC

HOST = "127.0.0.1"
POLL_S = 0.5  # how often the feed actor's and the hosts' timing rings are read
DRAIN_S = 2.0  # after the last tick, before the rings are read the last time
SLICE_US = 10_000_000  # the window's slices the drift of the price path is shown over
SPREAD_STEPS = 3  # a tick that closes nothing has a spread of 1..SPREAD_STEPS price steps
FEED_DELIVER_TARGET_MS = 15.0
TICK_TO_SETTLED_TARGET_MS = 30.0

# the hops of a tick, in path order: (name, what it is)
HOPS = (
    ("frame_to_receive", "Backpack frame sent (loopback exchange) -> received by the client"),
    ("receive_to_produce", "frame received -> message handed to the Kafka producer"),
    ("superseded", "produced -> the newer tick that carried it was produced (conflation)"),
    ("produce_to_read", "produced -> read and accepted by the feed actor (Kafka)"),
    ("read_to_send", "read -> shard call sent (pipeline, conflation, in-flight bound)"),
    ("shard_queue", "shard: waiting behind the host's earlier calls"),
    ("shard_send", "shard: Ray send -> execute begins"),
    ("shard_step", "shard: decide/sweep + apply (the runner's step)"),
    ("shard_commit", "shard: journal append + commit (fdatasync when positions closed)"),
    ("shard_return", "shard: execute ended -> answer at the feed actor"),
    ("settle_send", "ledger: settlement call sent -> execute begins (Ray)"),
    ("ledger_queue", "ledger: waiting behind the host's earlier calls"),
    ("ledger_step", "ledger: decide + apply of the settlements"),
    ("ledger_commit", "ledger: journal append + commit (fdatasync)"),
    ("ledger_publish", "ledger: account events handed to the publisher (after settled)"),
    ("ledger_return", "ledger: answered -> delivery done at the feed actor (after settled)"),
)


def _q(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank below, as feed.pipeline.quantiles_ms) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def summary_ms(values_us: Sequence[float]) -> dict[str, Any]:
    """``{"p50_ms", "p99_ms", "n"}`` of microsecond samples."""
    return {"p50_ms": round(_q(values_us, 0.50) / 1000, 3),
            "p99_ms": round(_q(values_us, 0.99) / 1000, 3), "n": len(values_us)}


# ---------------------------------------------------------------------- the tick plan
@dataclasses.dataclass
class AssetPlan:
    """The prices of one asset's ticks: ``levels``, its positions' distinct liquidation bids
    (highest first); ``closes_at[j]``, positions whose liquidation is at or above ``levels[j]``;
    ``floor``, the bid of the last liquidating tick (at first: the price the positions were
    opened at).

    A liquidating tick's bid is the next level; the ticks after it keep that bid and move the
    ask, so the market stays at the level it fell to: a liquidating tick the feed conflates
    away is carried by the next one, which crosses the same level (a bid that bounced back
    above the level would leave the level's positions open, and the bench would time the
    conflation's choice instead of the platform)."""

    asset: Any
    levels: np.ndarray
    closes_at: np.ndarray
    floor: int
    next_level: int = 0
    ticks: int = 0
    liquidating: int = 0

    def next_tick(self, share: float) -> tuple[int, int, bool]:
        """``(bid, ask, liquidating)`` of the asset's next tick."""
        i, self.ticks = self.ticks, self.ticks + 1
        if int((i + 1) * share) > int(i * share):
            if self.next_level >= len(self.levels):
                raise RuntimeError(f"{self.asset.name}: every liquidation level was crossed; "
                                   "load more positions or lower --liquidating-share")
            self.floor = int(self.levels[self.next_level])
            self.next_level += 1
            self.liquidating += 1
            return self.floor, self.floor + 1, True
        return self.floor, self.floor + 1 + i % SPREAD_STEPS, False


def plan_assets(settings: Settings, layout: Sequence[ShardSpec],
                liqs_by_shard: dict[str, np.ndarray], start_bids: dict[str, int]
                ) -> dict[str, AssetPlan]:
    plans = {}
    for asset in settings.assets.assets:
        liqs = np.concatenate([liqs_by_shard[s.name] for s in layout if s.asset == asset.name]
                              or [np.zeros(0, np.int64)])
        levels = np.unique(liqs)[::-1]
        ordered = np.sort(liqs)
        closes_at = len(ordered) - np.searchsorted(ordered, levels, side="left")
        plans[asset.name] = AssetPlan(asset, levels, closes_at, start_bids[asset.name])
    return plans


# ---------------------------------------------------------------------- loading


# ---------------------------------------------------------------------- the ticks' way in
class LoopbackExchange:
    """A WebSocket server on loopback that plays Backpack: once the client subscribed, each
    :meth:`send` is one ``bookTicker`` frame stamped ``T`` = ``E`` = when it is sent."""

    def __init__(self) -> None:
        self.ws: Any = None
        self.subscribed = asyncio.Event()
        self.server: Any = None
        self.url = ""

    async def start(self) -> None:
        import websockets

        from feed.broker import free_port

        port = free_port(HOST)
        self.server = await websockets.serve(self._handler, HOST, port)
        self.url = f"ws://{HOST}:{port}"

    async def _handler(self, ws: Any) -> None:
        await ws.recv()  # the SUBSCRIBE frame
        self.ws = ws
        self.subscribed.set()
        await ws.wait_closed()

    async def send(self, asset: Any, bid: int, ask: int, seq: int) -> int:
        """Send one frame; returns its ``T`` (us)."""
        sent_us = time.time_ns() // 1000
        await self.ws.send(json.dumps({"data": {
            "A": "1", "B": "1", "E": sent_us, "T": sent_us, "a": asset.ticks_to_price(ask),
            "b": asset.ticks_to_price(bid), "e": "bookTicker", "s": asset.symbol, "u": seq},
            "stream": f"bookTicker.{asset.symbol}"}, separators=(",", ":")))
        return sent_us

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclasses.dataclass
class Produced:
    """What the bench knows of one tick: its ``asset`` and ``bid`` (ticks), ``produce_us``
    (handed to the producer), whether it was a liquidating tick, and with Backpack
    ``frame_us`` (sent by the exchange) and ``receive_us`` (received by the client)."""

    asset: str
    bid: int
    produce_us: int
    liquidating: bool
    frame_us: int = 0
    receive_us: int = 0


class TickStream:
    """Produces the planned ticks to the market topic, directly or through Backpack frames."""

    def __init__(self, settings: Settings, bootstrap: str, topic: str, source: str,
                 linger_ms: int) -> None:
        from feed.producer import MarketDataProducer

        self.settings = settings
        self.source = source
        self.producer = MarketDataProducer(bootstrap, settings.assets, topic=topic,
                                           linger_ms=linger_ms)
        self.produced: dict[int, Produced] = {}  # by seq
        self.seq = 0
        self.exchange: LoopbackExchange | None = None
        self._client: Any = None
        self._relay: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        await self.producer.start()
        if self.source != "backpack":
            return
        from feed.backpack import BackpackClient

        self.exchange = LoopbackExchange()
        await self.exchange.start()
        self._client = BackpackClient(self.exchange.url, self.settings.assets,
                                      ping_interval_s=None)
        self._relay = asyncio.get_running_loop().create_task(self._relay_frames())
        await asyncio.wait_for(self.exchange.subscribed.wait(), 10.0)

    async def _relay_frames(self) -> None:
        """The feed service's loop (feed.source.run_source): client messages -> producer."""
        client = self._client
        async for msg in client.stream(self._stop):
            produced = self.produced.get(msg.seq)
            if produced is not None:
                produced.receive_us = client.last_frame_us
                produced.produce_us = time.time_ns() // 1000
            await self.producer.publish(msg)

    async def tick(self, asset: Any, bid: int, ask: int, liquidating: bool) -> None:
        from feed.message import message_from_ticks

        self.seq += 1
        if self.exchange is not None:
            produced = self.produced[self.seq] = Produced(asset.name, bid, 0, liquidating)
            produced.frame_us = await self.exchange.send(asset, bid, ask, self.seq)
            return
        now_us = time.time_ns() // 1000
        self.produced[self.seq] = Produced(asset.name, bid, now_us, liquidating)
        await self.producer.publish(message_from_ticks(asset, bid, ask, now_us, self.seq,
                                                       "bench"))

    async def stop(self) -> None:
        self._stop.set()  # the client's stream returns, then the exchange closes
        if self._relay is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._relay, 10.0)
        if self.exchange is not None:
            await self.exchange.stop()
        await self.producer.flush()
        await self.producer.stop()


# ---------------------------------------------------------------------- the rings
class Rings:
    """Reads the feed actor's call timings and every host's execute timings as they come."""

    def __init__(self, platform: Any) -> None:
        self.feed = platform.feed
        self.hosts = {"ledger": platform.ledger, **platform.shards}
        self.calls: list[Any] = []
        self.executes: dict[str, list[Any]] = {name: [] for name in self.hosts}
        self._since: dict[str, int] = {}
        self.missed = 0  # entries a slow read let the rings drop

    @classmethod
    def recorded(cls, calls: list[Any], executes: dict[str, list[Any]]) -> Rings:
        """Rings read before (a dumped run), to analyse."""
        rings = cls.__new__(cls)
        rings.calls, rings.executes, rings.missed = calls, executes, 0
        return rings

    async def read(self) -> None:
        names = ["feed", *self.hosts]
        refs = [self.feed.call_timings.remote(self._since.get("feed", 0)),
                *(h.timings.remote(self._since.get(n, 0)) for n, h in self.hosts.items())]
        for name, (count, entries) in zip(names, await asyncio.gather(*refs), strict=True):
            since = self._since.get(name)
            if since is not None:
                self.missed += max(0, count - since - len(entries))
            self._since[name] = count
            if since is None:
                continue  # the first read only positions the cursors
            (self.calls if name == "feed" else self.executes[name]).extend(entries)

    async def follow(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.read()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)


def _inside(executes: list[Any], starts: list[int], sent_us: int, answered_us: int
            ) -> tuple[Any, Any] | None:
    """The execute that ran inside ``[sent_us, answered_us]`` and the one before it."""
    i = bisect.bisect_left(starts, sent_us)
    if i >= len(executes) or executes[i].end_us > answered_us:
        return None
    return executes[i], executes[i - 1] if i > 0 else None


def _split(execute: Any, before: Any, sent_us: int) -> tuple[int, int]:
    """(queue, send): the time from ``sent_us`` to ``execute``'s start spent while the host
    still ran ``before``, and the rest."""
    waited = execute.start_us - sent_us
    queue = 0
    if before is not None:
        queue = max(0, min(before.end_us + before.after_us, execute.start_us) - sent_us)
    return queue, waited - queue


@dataclasses.dataclass
class Carried:
    """A shard call as the analysis sees it: the newest tick it carried (``seq``, its
    ``read_us``), the call's own hops (us), when the shard's execute ended (``applied_us``),
    and for a call that closed positions, its settlement's hops and when the ledger's execute
    ended (``settled_us``, 0: none)."""

    seq: int
    read_us: int
    hops: dict[str, int]
    applied_us: int
    closed: int
    settle_hops: dict[str, int]
    settled_us: int


def _carried(rings: Rings) -> tuple[dict[str, list[Carried]], int]:
    """Each shard's calls in the order they were made, matched to the executes that ran them;
    and how many could not be matched."""
    hosts = {n: (e, [x.start_us for x in e]) for n, e in rings.executes.items()}
    ledger, ledger_starts = hosts["ledger"]
    out: dict[str, list[Carried]] = {}
    unmatched = 0
    for call in sorted(rings.calls, key=lambda c: c.sent_us):
        if not call.ticks:
            continue
        executes, starts = hosts[call.shard]
        shard = _inside(executes, starts, call.sent_us, call.answered_us)
        if shard is None:
            unmatched += 1
            continue
        ex, before = shard
        queue, send = _split(ex, before, call.sent_us)
        _ts_us, seq, read_us = max(call.ticks, key=lambda t: t[1])
        hops = {"shard_queue": queue, "shard_send": send, "shard_step": ex.step_us,
                "shard_commit": ex.commit_us, "shard_return": call.answered_us - ex.end_us}
        settle_hops: dict[str, int] = {}
        settled_us = 0
        if call.closed and call.settled_us:
            settle = _inside(ledger, ledger_starts, call.settle_us, call.settled_us)
            if settle is None:
                unmatched += 1
            else:
                lx, lbefore = settle
                lqueue, lsend = _split(lx, lbefore, call.settle_us)
                settle_hops = {
                    "settle_send": lsend,
                    "ledger_queue": lqueue, "ledger_step": lx.step_us,
                    "ledger_commit": lx.commit_us, "ledger_publish": lx.after_us,
                    "ledger_return": call.settled_us - lx.end_us - lx.after_us}
                settled_us = lx.end_us
        out.setdefault(call.shard, []).append(Carried(
            seq, read_us, {"read_to_send": call.sent_us - read_us if read_us else -1, **hops},
            ex.end_us, call.closed, settle_hops, settled_us))
    return out, unmatched


def in_window(tick: Produced, window_start_us: int) -> bool:
    """Whether ``tick`` belongs to the measured window: produced from ``window_start_us`` on, or
    with Backpack, never produced but its frame sent from then on (a frame lost on its way)."""
    return (tick.produce_us or tick.frame_us) >= window_start_us


def settled_everywhere(closing: Sequence[Carried | None]) -> bool:
    """Whether a liquidating tick can be timed from ``closing``, the first call to each shard
    of its asset that crossed its level: every shard had such a call, at least one closed
    positions, and every one that closed positions has its settlement followed to the ledger.
    A sample is the slowest shard's: taking it from the shards that were followed alone would
    time the fastest ones, and say nothing of the one whose settlement was not seen."""
    if any(c is None for c in closing):
        return False
    closed = [c for c in closing if c is not None and c.closed]
    return bool(closed) and all(c.settled_us for c in closed)


def analyse(rings: Rings, produced: dict[int, Produced], window_start_us: int,
            shards_of: dict[str, list[str]]) -> dict[str, Any]:
    """End-to-end and per-hop samples (us) of the ticks produced from ``window_start_us``.

    A tick the feed conflated away is followed to the first call to its shard that carried
    it or a newer tick of its asset (``superseded``: from its produce to that tick's); a
    liquidating tick to the first call whose tick crossed its level (its own, or a later one
    at or below it) and that call's settlement. With several shards per asset a sample is
    the slowest shard's.
    """
    calls, unmatched = _carried(rings)
    seqs = {name: [c.seq for c in cs] for name, cs in calls.items()}
    price_hops: dict[str, list[int]] = {name: [] for name, _ in HOPS}
    liquidation_hops: dict[str, list[int]] = {name: [] for name, _ in HOPS}
    deliver: list[int] = []
    delivered_own: list[int] = []
    settled: list[int] = []
    frame_settled: list[int] = []
    # per SLICE_S of the window: feed_deliver and produce_to_read samples (how they drift)
    slices: dict[int, tuple[list[int], list[int]]] = {}
    unapplied = unsettled = 0

    def carrier(shard: str, seq: int, bid: int | None) -> Carried | None:
        """The first call to ``shard`` carrying ``seq`` or newer (and with ``bid``: a tick at
        or below it)."""
        i = bisect.bisect_left(seqs.get(shard, []), seq)
        for c in calls.get(shard, [])[i:]:
            if bid is None or produced[c.seq].bid <= bid:
                return c
        return None

    def note(tick: Produced, c: Carried, keys: Iterable[str],
             hops: dict[str, list[int]]) -> None:
        carrier_tick = produced[c.seq]
        if tick.frame_us:
            hops["frame_to_receive"].append(tick.receive_us - tick.frame_us)
            hops["receive_to_produce"].append(tick.produce_us - tick.receive_us)
        hops["superseded"].append(carrier_tick.produce_us - tick.produce_us)
        if c.read_us:
            hops["produce_to_read"].append(c.read_us - carrier_tick.produce_us)
        for key in keys:
            value = c.hops[key] if key in c.hops else c.settle_hops[key]
            if value >= 0:
                hops[key].append(value)

    feed_keys = ("read_to_send", "shard_queue", "shard_send", "shard_step", "shard_commit",
                 "shard_return")
    settle_keys = ("settle_send", "ledger_queue", "ledger_step",
                   "ledger_commit", "ledger_publish", "ledger_return")
    window = sorted((seq, t) for seq, t in produced.items() if in_window(t, window_start_us))
    for seq, tick in window:
        if not tick.produce_us:  # a Backpack frame the client never handed to the producer
            unapplied += 1
            continue
        carriers = [(name, carrier(name, seq, None)) for name in shards_of[tick.asset]]
        if any(c is None for _, c in carriers):
            unapplied += 1
            continue
        _, slowest = max(((n, c) for n, c in carriers if c is not None),
                         key=lambda nc: nc[1].applied_us)
        deliver.append(slowest.applied_us - tick.produce_us)
        part = slices.setdefault((tick.produce_us - window_start_us) // SLICE_US, ([], []))
        part[0].append(slowest.applied_us - tick.produce_us)
        if slowest.read_us:
            part[1].append(slowest.read_us - produced[slowest.seq].produce_us)
        if slowest.seq == seq:
            delivered_own.append(slowest.applied_us - tick.produce_us)
        note(tick, slowest, feed_keys, price_hops)
    for seq, tick in window:
        if not tick.liquidating:
            continue
        closing = [carrier(name, seq, tick.bid) for name in shards_of[tick.asset]]
        if not settled_everywhere(closing) or not tick.produce_us:
            unsettled += 1
            continue
        done = [c for c in closing if c is not None and c.closed]
        last = max(done, key=lambda c: c.settled_us)
        note(tick, last, feed_keys + settle_keys, liquidation_hops)
        settled.append(last.settled_us - tick.produce_us)
        if tick.frame_us:
            frame_settled.append(last.settled_us - tick.frame_us)
    return {"price_hops": price_hops, "liquidation_hops": liquidation_hops,
            "deliver": deliver, "delivered_own": delivered_own, "settled": settled,
            "frame_settled": frame_settled, "unmatched": unmatched, "unapplied": unapplied,
            "unsettled": unsettled, "slices": [slices[k] for k in sorted(slices)],
            "calls": sum(len(cs) for cs in calls.values()),
            "closes": sum(c.closed for cs in calls.values() for c in cs)}


# ---------------------------------------------------------------------- where the CPU went
def cpu_by_process(root_pid: int) -> dict[int, tuple[str, float]]:
    """``{pid: (title, CPU seconds so far)}`` of ``root_pid`` and the living processes that
    descend from it (Linux /proc; empty elsewhere). A Ray worker's title names its actor."""
    table = process_table()
    return {pid: table[pid][1:] for pid in [root_pid, *descendants(table, root_pid)]
            if pid in table}


def cpu_shares(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
               seconds: float, names: dict[int, str]) -> dict[str, float]:
    """CPU per process between two :func:`cpu_by_process` readings, as cores (1.0 = one core
    busy the whole time), the busiest first, named by ``names`` (pid: name) or else by their
    program (a Ray worker by its title); processes under 1% of a core are summed as
    ``other``."""
    shares: dict[str, float] = {}
    for pid, (title, cpu_s) in after.items():
        used = (cpu_s - before.get(pid, (title, 0.0))[1]) / seconds
        name = names.get(pid) or os.path.basename(title.split(" ")[0])
        if used < 0.01:
            name = "other"
        shares[name] = shares.get(name, 0.0) + used
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------------- the run
async def _wait_prices(platform: Any, timeout_s: float = 30.0) -> None:
    from engine.shard_machine import LastTick

    deadline = time.monotonic() + timeout_s
    for name, handle in platform.shards.items():
        while await _one(handle, LastTick()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} got no price within {timeout_s} s")
            await asyncio.sleep(0.1)


async def run(platform: Any, bootstrap: str, args: argparse.Namespace,
              broker_pid: int | None = None) -> dict[str, Any]:
    """Load, produce, read the rings; returns what was recorded (:func:`report` reads it)."""
    from engine.ledger_machine import Totals
    from feed.sim import START_PRICES

    settings: Settings = platform.settings
    assets = settings.assets.assets
    stream = TickStream(settings, bootstrap, platform.topic, args.source, args.linger_ms)
    await stream.start()
    try:
        # a first price per asset: the positions open at it
        start_bids = {}
        for asset in assets:
            bid = asset.price_to_ticks(START_PRICES.get(asset.name, "100"))
            start_bids[asset.name] = bid
            await stream.tick(asset, bid, bid + 1, False)
        await stream.producer.flush()
        await _wait_prices(platform)
        total_s = args.warmup_s + args.seconds
        per_asset = int(args.rate * total_s / len(assets)) + 1
        loaded = await load_positions(platform, args.positions, args.closes_per_tick,
                                            int(per_asset * args.liquidating_share) + 2)
        hosts = [platform.ledger, *platform.shards.values()]
        # the load leaves a snapshot due: taken now, not in the middle of the measurement
        await asyncio.gather(*(h.checkpoint.remote() for h in hosts))
        liqs = loaded.liqs_by_shard
        plans = plan_assets(settings, platform.layout, liqs, start_bids)
        closed_before = int((await _one(platform.ledger, Totals()))["closed_positions"])
        rings = Rings(platform)
        await rings.read()
        stop = asyncio.Event()
        follower = asyncio.get_running_loop().create_task(rings.follow(stop))
        stats0 = await platform.feed.stats.remote()
        start = time.perf_counter()
        window_start_us = time.time_ns() // 1000 + int(args.warmup_s * 1e6)
        total = int(args.rate * total_s)
        n = 0
        cpu0: dict[int, tuple[str, float]] | None = None
        cpu0_at = start
        while n < total:
            if cpu0 is None and time.perf_counter() - start >= args.warmup_s:
                cpu0, cpu0_at = cpu_by_process(os.getpid()), time.perf_counter()
            due = min(total, int((time.perf_counter() - start) * args.rate) + 1)
            while n < due:
                plan = plans[assets[n % len(assets)].name]
                bid, ask, liquidating = plan.next_tick(args.liquidating_share)
                await stream.tick(plan.asset, bid, ask, liquidating)
                n += 1
            await asyncio.sleep(max(0.0, start + n / args.rate - time.perf_counter()))
        cpu_s = time.perf_counter() - cpu0_at
        cpu1 = cpu_by_process(os.getpid())
        await stream.producer.flush()
        await asyncio.sleep(DRAIN_S)
        stop.set()
        await follower
        await rings.read()
        stats1 = await platform.feed.stats.remote()
        names = {os.getpid(): "bench (driver, producer)", int(stats1["pid"]): "feed actor"}
        for name, info in zip(rings.hosts, await asyncio.gather(
                *(h.info.remote() for h in rings.hosts.values())), strict=True):
            names[int(info["pid"])] = name
        if broker_pid is not None:
            names[broker_pid] = "broker (Tansu)"
        cpu = cpu_shares(cpu0 or {}, cpu1, cpu_s, names)
        closed_after = int((await _one(platform.ledger, Totals()))["closed_positions"])
    finally:
        await stream.stop()
    return {
        "args": {k: v for k, v in vars(args).items() if k not in ("dump", "report")},
        "window_start_us": window_start_us,
        "calls": [list(c) for c in rings.calls],
        "executes": {name: [list(e) for e in es] for name, es in rings.executes.items()},
        "produced": {str(seq): dataclasses.astuple(p) for seq, p in stream.produced.items()},
        "shards_of": {a.name: [s.name for s in platform.layout if s.asset == a.name]
                      for a in assets},
        "positions": int(sum(len(v) for v in liqs.values())), "load_s": loaded.load_s,
        "conflated": stats1["conflated"] - stats0["conflated"],
        "dropped": {k: v - stats0["dropped"].get(k, 0) for k, v in stats1["dropped"].items()
                    if v - stats0["dropped"].get(k, 0)},
        "ledger_closed": closed_after - closed_before, "ring_missed": rings.missed,
        "load_avg_1m": os.getloadavg()[0], "cpu_cores": cpu,
        # a recreated market topic (the embedded broker trims it) shows in these
        "send_failures": stream.producer.errors, "producer_recoveries": stream.producer.recoveries,
        "repositions": stats1.get("repositions", 0) - stats0.get("repositions", 0),
    }


def _settings(port: int, data_dir: str) -> Settings:
    base = Settings.from_env()
    return dataclasses.replace(base, port=port, feed_source="none", data_dir=Path(data_dir),
                               kafka_brokers=None)


def report(raw: dict[str, Any]) -> dict[str, Any]:
    """Print the tables of a run :func:`run` recorded; returns the JSON line's content."""
    from cluster.actors.feed import CallTiming
    from cluster.durability.runner import ExecuteTiming

    args = argparse.Namespace(**raw["args"])
    produced = {int(seq): Produced(*row) for seq, row in raw["produced"].items()}
    rings = Rings.recorded([CallTiming(*c) for c in raw["calls"]],
                           {n: [ExecuteTiming(*e) for e in es]
                            for n, es in raw["executes"].items()})
    r = analyse(rings, produced, raw["window_start_us"], raw["shards_of"])
    window = [p for p in produced.values() if in_window(p, raw["window_start_us"])]
    price = {name: summary_ms(r["price_hops"][name]) for name, _ in HOPS
             if r["price_hops"][name]}
    liquidation = {name: summary_ms(r["liquidation_hops"][name]) for name, _ in HOPS
                   if r["liquidation_hops"][name]}
    deliver, settled = summary_ms(r["deliver"]), summary_ms(r["settled"])
    own = summary_ms(r["delivered_own"])
    print(f"shardex bench latency: durable platform, {raw['positions']:,} positions (loaded in "
          f"{raw['load_s']:.1f} s), {args.rate:,.0f} ticks/s for {args.seconds:g} s "
          f"(+{args.warmup_s:g} s warm-up), source {args.source} (producer linger "
          f"{args.linger_ms} ms), {args.liquidating_share:.1%} of ticks liquidating")
    print(f"  ticks produced {len(window):,} (liquidating "
          f"{sum(1 for p in window if p.liquidating):,}), shard calls {r['calls']:,} "
          f"({r['closes']:,} closes), conflated {raw['conflated']:,}, dropped "
          f"{raw['dropped'] or 'none'}; the ledger counted {raw['ledger_closed']:,} closes "
          f"over the warm-up and the run; not followed: {r['unapplied']} ticks, "
          f"{r['unsettled']} liquidations, {r['unmatched']} calls; ring entries missed "
          f"{raw['ring_missed']}; producer send failures {raw.get('send_failures', '?')}, "
          f"recoveries {raw.get('producer_recoveries', '?')}; partitions repositioned by the "
          f"feed actor {raw.get('repositions', '?')}")
    print(f"  {'hop (ms)':<20}{'price p50':>10}{'p99':>9}{'liq. p50':>10}{'p99':>9}  what")
    for name, what in HOPS:
        if name in price or name in liquidation:
            a = price.get(name, {"p50_ms": float("nan"), "p99_ms": float("nan")})
            b = liquidation.get(name, {"p50_ms": float("nan"), "p99_ms": float("nan")})
            print(f"  {name:<20}{a['p50_ms']:>10.2f}{a['p99_ms']:>9.2f}{b['p50_ms']:>10.2f}"
                  f"{b['p99_ms']:>9.2f}  {what}")
    print(f"  {'feed_deliver':<20}{deliver['p50_ms']:>10.2f}{deliver['p99_ms']:>9.2f}"
          f"{'':>19}  every tick: produce -> the shard applied it or a newer one "
          f"({deliver['n']:,}; target p99 <= {FEED_DELIVER_TARGET_MS:g})")
    print(f"  {'  delivered ticks':<20}{own['p50_ms']:>10.2f}{own['p99_ms']:>9.2f}"
          f"{'':>19}  the ticks not conflated away only ({own['n']:,}; bench feed's figure)")
    print(f"  {'tick_to_settled':<20}{'':>19}{settled['p50_ms']:>10.2f}{settled['p99_ms']:>9.2f}"
          f"  liquidating tick produced -> its level's closes committed in the ledger "
          f"({settled['n']:,}; target p99 <= {TICK_TO_SETTLED_TARGET_MS:g})")
    drift = [{"feed_deliver": summary_ms(d), "produce_to_read": summary_ms(k)}
             for d, k in r["slices"]]
    print("  price path per " + f"{SLICE_US // 1_000_000} s of the window, p50/p99 ms: "
          + "; ".join(f"deliver {d['feed_deliver']['p50_ms']:.1f}/{d['feed_deliver']['p99_ms']:.1f}"
                      f" read {d['produce_to_read']['p50_ms']:.1f}/"
                      f"{d['produce_to_read']['p99_ms']:.1f}" for d in drift))
    cpu = raw.get("cpu_cores", {})
    print("  CPU over the window, in cores (2 in all): " + ", ".join(
        f"{name} {cores:.2f}" for name, cores in cpu.items()) + f"; total {sum(cpu.values()):.2f}")
    out = {
        "bench": "latency", "positions": raw["positions"], "rate": args.rate,
        "seconds": args.seconds, "source": args.source, "linger_ms": args.linger_ms,
        "liquidating_share": args.liquidating_share, "closes_per_tick": args.closes_per_tick,
        "tick_to_settled_p50_ms": settled["p50_ms"], "tick_to_settled_p99_ms": settled["p99_ms"],
        "tick_to_settled_n": settled["n"],
        "feed_deliver_p50_ms": deliver["p50_ms"], "feed_deliver_p99_ms": deliver["p99_ms"],
        "feed_deliver_n": deliver["n"],
        "feed_deliver_delivered_p50_ms": own["p50_ms"],
        "feed_deliver_delivered_p99_ms": own["p99_ms"],
        "hops": liquidation, "price_hops": price, "price_by_slice": drift,
        "produced": len(window), "shard_calls": r["calls"], "conflated": raw["conflated"],
        "dropped": raw["dropped"], "closes": r["closes"], "unmatched": r["unmatched"],
        "ring_missed": raw["ring_missed"], "load_s": round(raw["load_s"], 1),
        "load_avg_1m": raw["load_avg_1m"],
        "cpu_cores": {name: round(cores, 3) for name, cores in cpu.items()},
        # the percentiles are over the ticks followed to the end: a tick never applied (nor
        # replaced) or a liquidation never settled is a miss, not a sample left out
        "unapplied": r["unapplied"], "unsettled": r["unsettled"],
        "feed_deliver_target_met": (deliver["p99_ms"] <= FEED_DELIVER_TARGET_MS
                                    and r["unapplied"] == 0),
        "tick_to_settled_target_met": (settled["p99_ms"] <= TICK_TO_SETTLED_TARGET_MS
                                       and r["unsettled"] == 0),
    }
    if r["frame_settled"]:
        frame = summary_ms(r["frame_settled"])
        print(f"  {'frame_to_settled':<20}{'':>19}{frame['p50_ms']:>10.2f}"
              f"{frame['p99_ms']:>9.2f}  Backpack frame sent -> its level's closes committed")
        out["frame_to_settled_p50_ms"] = frame["p50_ms"]
        out["frame_to_settled_p99_ms"] = frame["p99_ms"]
    return out




def main(argv: list[str] | None = None) -> int:
    from bench.feed import paced_parser

    parser = paced_parser("shardex bench latency", __doc__, rate_help="ticks/s over all assets",
                          seconds=30.0, seconds_help="measured seconds")
    parser.add_argument("--positions", type=positive_int, default=1_000_000, help="open positions")
    parser.add_argument("--warmup-s", type=duration_or_zero, default=3.0,
                        help="ticks before the window")
    parser.add_argument("--liquidating-share", type=share, default=0.005,
                        help="share of each asset's ticks that liquidate positions (0.005 at "
                             "2,000 ticks/s: 10 a second, about 1,000 closes/s)")
    parser.add_argument("--closes-per-tick", type=positive_int, default=300,
                        help="positions a liquidating tick of each asset closes, over all shards")
    parser.add_argument("--source", choices=("direct", "backpack"), default="direct",
                        help="direct: ticks to the producer, ts_us = produce time; backpack: "
                             "as Backpack frames from a loopback exchange through the feed's "
                             "Backpack client (adds the first hop, and the exchange's own CPU)")
    parser.add_argument("--linger-ms", type=nonneg_int, default=LINGER_MS,
                        help="the producer's linger (default: what shardex up's feed source "
                             "publishes with, feed.source.run_source's)")
    parser.add_argument("--topic-max-records", type=nonneg_int, default=MARKET_TOPIC_MAX_RECORDS,
                        help="records a partition of the market topic may hold before the "
                             "embedded broker recreates it empty (0: every record is kept, "
                             "as Tansu itself does)")
    parser.add_argument("--dump", metavar="PATH", type=new_file,
                        help="also write what was recorded (the rings, the ticks) as JSON")
    parser.add_argument("--report", metavar="PATH", type=existing_file,
                        help="print the report of a run --dump wrote, without running")
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed)")
    args = parser.parse_args(argv or [])
    if args.report:
        try:
            recorded = json.loads(Path(args.report).read_text())
            if not isinstance(recorded, dict) or not isinstance(recorded.get("args"), dict):
                raise ValueError("no args recorded")
        except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError too
            parser.error(f"--report {args.report}: not a run --dump wrote ({exc})")
        print(json.dumps(report(recorded)))
        return 0
    if not 0 < args.liquidating_share <= 1 or args.rate <= 0 or args.positions <= 0:
        parser.error("--liquidating-share must be in (0, 1], --rate and --positions > 0")
    if args.topic_max_records < 0:
        parser.error("--topic-max-records must be >= 0")

    from cluster.actors.launcher import Platform
    from feed.broker import EmbeddedBroker, free_port

    data_dir = tempfile.mkdtemp(prefix="shardex-bench-latency-")
    broker = EmbeddedBroker(HOST, free_port(HOST), trim={MARKET_TOPIC: args.topic_max_records}
                            if args.topic_max_records else {}).start()
    platform = Platform(_settings(free_port(HOST), data_dir), with_feed=False,
                        bootstrap=broker.bootstrap, durable=True)
    try:
        platform.start()
        raw = asyncio.run(run(platform, broker.bootstrap, args, broker.pid))
    finally:
        platform.stop()
        broker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    if args.dump:
        Path(args.dump).write_text(json.dumps(raw))
    print(json.dumps(report(raw)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
