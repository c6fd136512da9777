"""Conflation and fan-out bookkeeping of the feed actor, free of Ray and Kafka (unit-testable).

Only the newest price of an asset matters to the engine: a shard that gets a batch of 100 SOL
ticks would sweep its book 100 times to end at the state the last tick alone gives (closes are
decided per tick, but an intermediate tick the shard never saw cannot be told apart from one the
exchange never sent: the feed is a sample of the market, not the market). So a batch read from
Kafka collapses to one tick per asset, and while a shard is busy its pending work collapses too.
"""

from __future__ import annotations

from collections import Counter
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
    ``conflated`` without being decoded (their key, the symbol, tells their asset). A newest
    record that is malformed, out of bounds (counted by the decoder) or older than the last tick
    delivered for its asset (counted by ``gate``) is dropped and the scan falls back to the one
    before it. Across partitions the tick with the larger ``(ts_us, seq)`` wins.
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
        for records in partitions:
            self.consumed += len(records)
            found: set[str] = set()
            i = len(records) - 1
            while i >= 0:
                rec = records[i]
                i -= 1
                key = rec.key
                hinted = asset_of_key.get(key) if isinstance(key, bytes) else None
                if hinted is not None and hinted in found:
                    self.conflated += 1
                    continue
                tick = decode(rec.value, now_us)
                if tick is None or (is_older is not None and is_older(tick)):
                    continue
                if tick.asset in found:
                    self.conflated += 1
                    continue
                found.add(tick.asset)
                prev = out.get(tick.asset)
                if prev is None or (tick.ts_us, tick.seq) > (prev.ts_us, prev.seq):
                    out[tick.asset] = tick
                if prev is not None:
                    self.conflated += 1
                if len(found) == n_assets:
                    self.conflated += i + 1  # everything older in this partition is superseded
                    break
        return out


class ShardFanout:
    """Per-shard pending ticks (newest per asset) and a bound on calls in flight per shard.

    ``routes`` maps an asset to the names of the shards that receive its ticks. ``offer`` merges
    ticks into every routed shard's pending map (a replaced pending tick counts as
    ``conflated``); ``take_ready`` hands out the pending ticks of every shard with fewer than
    ``max_in_flight`` calls outstanding; ``done`` ends a call, and a failed call's ticks go back
    to pending unless a newer tick of the same asset is already there. Memory is bounded by
    ``shards * (assets + max_in_flight * assets)`` ticks, however slow a shard is.
    """

    def __init__(self, routes: Mapping[str, Sequence[str]], max_in_flight: int = 1) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.routes = {asset: tuple(names) for asset, names in routes.items()}
        self.max_in_flight = max_in_flight
        self.shards = sorted({n for names in self.routes.values() for n in names})
        self.pending: dict[str, dict[str, Tick]] = {n: {} for n in self.shards}
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
                pending = self.pending[name]
                if tick.asset in pending:
                    self.conflated += 1
                pending[tick.asset] = tick

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
            calls.append((name, list(pending.values())))
        return calls

    def done(self, shard: str, ticks: Sequence[Tick], ok: bool) -> None:
        self.in_flight[shard] -= 1
        if ok:
            self.delivered += len(ticks)
            return
        self.failed_calls += 1
        pending = self.pending[shard]
        for tick in ticks:
            pending.setdefault(tick.asset, tick)

    def pending_count(self) -> int:
        return sum(len(p) for p in self.pending.values())
