"""Conflation and fan-out bookkeeping of the feed actor, free of Ray and Kafka (unit-testable).

A batch read from Kafka collapses to one tick per asset (an intermediate tick of one read
cannot be told apart from one the exchange never sent: the feed is a sample of the market, not
the market). Every tick that batch accepts is a price the platform shows (the candles are built
from them), so each one reaches the shards, in order: while a shard is busy its ticks wait,
up to :data:`MAX_PENDING_PER_ASSET` of an asset (a sweep is far shorter than the time that
many ticks take to arrive; only a shard that far behind loses its oldest waiting ticks).
Otherwise a price the chart shows crossing an order's trigger or a stop-loss would have been
skipped by the shard.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from engine.assets import AssetRegistry
from engine.market import Tick
from feed.gate import TickGate
from feed.message import TickDecoder


class Record(Protocol):
    """What the conflator needs of a Kafka record (``aiokafka.ConsumerRecord`` fits)."""

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...


class BatchConflator:
    """Reduce a batch of MarketDataMessage records to the newest valid tick per asset.

    Each partition's records are scanned newest first and only decoded until every asset the
    partition carries has a valid tick; older records of an asset already found are counted as
    ``conflated`` without being decoded (their key, the symbol, tells their asset; a record
    whose key is another asset's symbol than its own is dropped as ``unknown_symbol``). A newest
    record that is malformed, out of bounds (counted by the decoder) or older than the last
    tick delivered for its asset (counted by ``gate``) is dropped and the scan falls back to
    the one before it. So does one not newer than the tick held for its asset, which cannot
    confirm that one: it is taken only if the partition holds no newer tick of its asset, so a
    tick that may confirm the held one is not hidden by an older one read after it. Across
    partitions the tick with the larger ``(ts_us, seq)`` wins.
    """

    def __init__(self, assets: AssetRegistry, decoder: TickDecoder | None = None,
                 gate: TickGate | None = None) -> None:
        self.assets = assets
        self.decoder = decoder or TickDecoder(assets)
        self.gate = gate
        self._asset_of_key = {a.symbol.encode(): a.name for a in assets.assets}
        self.conflated = 0
        self.consumed = 0

    def newest(self, partitions: Iterable[Sequence[Record]],
               now_us: int | None = None) -> dict[str, Tick]:
        """The newest valid tick per asset of ``partitions`` (each in offset order); ``now_us``
        enables the decoder's clock checks."""
        out: dict[str, Tick] = {}
        n_assets = len(self.assets)
        asset_of_key = self._asset_of_key
        decode = self.decoder.decode
        is_older = self.gate.is_older if self.gate is not None else None
        behind_held = self.gate.behind_held if self.gate is not None else None
        for records in partitions:
            self.consumed += len(records)
            found: set[str] = set()
            behind: dict[str, Tick] = {}  # the newest tick of an asset not newer than its held
            i = len(records) - 1
            while i >= 0:
                rec = records[i]
                i -= 1
                key = rec.key
                hinted = asset_of_key.get(key) if isinstance(key, bytes) else None
                if hinted is not None and hinted in found:
                    self.conflated += 1
                    continue
                tick = decode(rec.value, now_us, hinted)
                if tick is None or (is_older is not None and is_older(tick)):
                    continue
                if tick.asset in found:
                    self.conflated += 1
                    continue
                if behind_held is not None and behind_held(tick):
                    if tick.asset in behind:
                        self.conflated += 1
                    else:
                        behind[tick.asset] = tick
                    continue
                self._take(out, found, tick)
                if len(found) == n_assets:
                    self.conflated += i + 1  # everything older in this partition is superseded
                    break
            for tick in behind.values():
                if tick.asset in found:
                    self.conflated += 1  # a newer tick of its asset came before it
                else:
                    self._take(out, found, tick)
        return out

    def _take(self, out: dict[str, Tick], found: set[str], tick: Tick) -> None:
        """``tick`` as its partition's for its asset; the newer of it and another partition's
        as the batch's."""
        found.add(tick.asset)
        prev = out.get(tick.asset)
        if prev is None or (tick.ts_us, tick.seq) > (prev.ts_us, prev.seq):
            out[tick.asset] = tick
        if prev is not None:
            self.conflated += 1


MAX_PENDING_PER_ASSET = 256
"""Ticks of one asset waiting for one shard; beyond it the oldest waiting one is dropped
(counted ``conflated``)."""


def _tick_order(tick: Tick) -> tuple[int, int]:
    return tick.ts_us, tick.seq


class ShardFanout:
    """Per-shard pending ticks (every accepted tick per asset, in order, up to
    ``max_pending``) and a bound on calls in flight per shard.

    ``routes`` maps an asset to the names of the shards that receive its ticks. ``offer``
    appends ticks to every routed shard's pending queue of their asset (one pushed out at the
    bound counts as ``conflated``); ``take_ready`` hands out the pending ticks of every shard
    with fewer than ``max_in_flight`` calls outstanding (per asset in order); ``done`` ends a
    call, and every tick of a failed call goes back to pending, before the newer ticks of its
    asset waiting there (the shard ignores those it applied before it failed, as older than the
    price it holds; one it never saw may be the only tick that touched a liquidation price), the
    oldest beyond ``max_pending`` counted as ``conflated``. Memory is bounded by
    ``shards * assets * (max_pending + max_in_flight * max_pending)`` ticks, however slow a
    shard is.
    """

    def __init__(self, routes: Mapping[str, Sequence[str]], max_in_flight: int = 1,
                 max_pending: int = MAX_PENDING_PER_ASSET) -> None:
        if max_in_flight < 1 or max_pending < 1:
            raise ValueError("max_in_flight and max_pending must be >= 1")
        self.routes = {asset: tuple(names) for asset, names in routes.items()}
        self.max_in_flight = max_in_flight
        self.max_pending = max_pending
        self.shards = sorted({n for names in self.routes.values() for n in names})
        self.pending: dict[str, dict[str, deque[Tick]]] = {n: {} for n in self.shards}
        self.in_flight: Counter[str] = Counter()
        self.conflated = 0
        self.delivered = 0
        self.calls = 0
        self.failed_calls = 0
        self.unrouted = 0

    def offer(self, ticks: Iterable[Tick]) -> None:
        for tick in ticks:
            names = self.routes.get(tick.asset)
            if not names:
                self.unrouted += 1
                continue
            for name in names:
                queue = self.pending[name].get(tick.asset)
                if queue is None:
                    queue = self.pending[name][tick.asset] = deque(maxlen=self.max_pending)
                elif len(queue) == self.max_pending:
                    self.conflated += 1  # the oldest waiting tick goes
                queue.append(tick)

    def take_ready(self, available: Iterable[str] | None = None) -> list[tuple[str, list[Tick]]]:
        """``(shard, ticks)`` calls to make now (only shards in ``available`` if given)."""
        allowed = None if available is None else set(available)
        calls: list[tuple[str, list[Tick]]] = []
        for name in self.shards:
            pending = self.pending[name]
            if not pending or self.in_flight[name] >= self.max_in_flight:
                continue
            if allowed is not None and name not in allowed:
                continue
            self.pending[name] = {}
            self.in_flight[name] += 1
            self.calls += 1
            calls.append((name, [tick for queue in pending.values() for tick in queue]))
        return calls

    def done(self, shard: str, ticks: Sequence[Tick], ok: bool) -> None:
        self.in_flight[shard] -= 1
        if ok:
            self.delivered += len(ticks)
            return
        self.failed_calls += 1
        pending = self.pending[shard]
        again: dict[str, list[Tick]] = {}
        for tick in ticks:
            again.setdefault(tick.asset, []).append(tick)
        for asset, failed in again.items():
            # in tick order: with calls in flight side by side, a later call's ticks may have
            # gone back first
            ordered = sorted((*failed, *pending.get(asset, ())), key=_tick_order)
            self.conflated += max(0, len(ordered) - self.max_pending)
            pending[asset] = deque(ordered, maxlen=self.max_pending)

    def pending_count(self) -> int:
        return sum(len(queue) for p in self.pending.values() for queue in p.values())
