"""The feed's tick logic, free of Ray and Kafka: records in, shard calls out.

One batch of Kafka records goes through, in order: the decoder (format, bounds, clock window;
``feed.message.TickDecoder``), conflation to the newest tick per asset of the
batch (``feed.conflation.BatchConflator``), the order and jump gate (``feed.gate.TickGate``), and
the per-shard fan-out (``feed.conflation.ShardFanout``: every accepted tick, in order).
``feed.consumer.MarketDataConsumer`` reads Kafka, calls :meth:`TickPipeline.ingest` and makes
the calls :meth:`TickPipeline.take_ready` hands out (through ``cluster.actors.feed``'s Ray calls).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from engine.assets import AssetRegistry
from engine.market import Tick
from feed.conflation import BatchConflator, Record, ShardFanout
from feed.gate import GATE_DROP_REASONS, TickGate
from feed.message import DECODE_DROP_REASONS, TickDecoder
from feed.settings import FeedBounds

DROP_REASONS = DECODE_DROP_REASONS + GATE_DROP_REASONS  # every reason a tick is dropped for
READ_AGE_WINDOW = 4096  # ticks whose read age the quantiles are taken over


def quantiles_ms(values_us: Iterable[int]) -> dict[str, float] | None:
    """p50/p99/max in milliseconds of microsecond samples, and their count (None when empty)."""
    ordered = sorted(values_us)
    if not ordered:
        return None
    n = len(ordered)
    return {"p50": ordered[n // 2] / 1000, "p99": ordered[min(n - 1, int(n * 0.99))] / 1000,
            "max": ordered[-1] / 1000, "n": n}


def drops_text(dropped: Mapping[str, int]) -> str:
    """Drop counts as one line for operators (``none`` or ``not_json=1 stale=3``, reasons with
    a count, in :data:`DROP_REASONS` order, then any other reason)."""
    order = [r for r in DROP_REASONS if dropped.get(r)] + sorted(
        r for r, n in dropped.items() if n and r not in DROP_REASONS)
    return " ".join(f"{r}={dropped[r]}" for r in order) or "none"


def drop_counts(dropped: Mapping[str, int]) -> list[tuple[str, int]]:
    """``(reason, count)`` of every reason of :data:`DROP_REASONS` (zeros included), in
    that order, then any other reason ``dropped`` names."""
    reasons = list(DROP_REASONS) + sorted(set(dropped) - set(DROP_REASONS))
    return [(r, int(dropped.get(r, 0))) for r in reasons]


class TickPipeline:
    """Records -> the newest acceptable tick per asset of each batch -> pending calls per shard
    (each accepted tick reaches its shards, in order).

    ``routes`` maps an asset to the names of the shards that receive its ticks;
    ``max_in_flight`` bounds the calls outstanding per shard (see :class:`ShardFanout`).
    """

    def __init__(self, assets: AssetRegistry, routes: Mapping[str, Sequence[str]],
                 bounds: FeedBounds | None = None, max_in_flight: int = 1) -> None:
        self.assets = assets
        self.bounds = bounds or FeedBounds()
        self.decoder = TickDecoder(assets, self.bounds)
        self.gate = TickGate(self.bounds.max_tick_jump_bps)
        self.conflator = BatchConflator(assets, self.decoder, self.gate)
        self.fanout = ShardFanout(routes, max_in_flight)
        # now - ts_us of each tick as it is read (produce-to-read latency when the producer
        # stamps ts_us, exchange-to-read latency for live data)
        self._read_age_us: deque[int] = deque(maxlen=READ_AGE_WINDOW)

    @property
    def last(self) -> Mapping[str, Tick]:
        """The last tick delivered per asset."""
        return self.gate.last

    def ingest(self, partitions: Iterable[Sequence[Record]], now_us: int) -> list[Tick]:
        """Take one batch (records per partition, in offset order) read at ``now_us``; returns
        the ticks accepted for delivery (already pending at their shards)."""
        newest = self.conflator.newest(partitions, now_us)
        for tick in newest.values():
            self._read_age_us.append(now_us - tick.ts_us)
        accepted = self.gate.admit_all(newest)
        self.fanout.offer(accepted)
        return accepted

    def take_ready(self, available: Iterable[str] | None = None) -> list[tuple[str, list[Tick]]]:
        """The ``(shard, ticks)`` calls to make now (see :meth:`ShardFanout.take_ready`)."""
        return self.fanout.take_ready(available)

    def done(self, shard: str, ticks: Sequence[Tick], ok: bool) -> None:
        """A call handed out by :meth:`take_ready` ended (``ok``: the shard took the ticks)."""
        self.fanout.done(shard, ticks, ok)

    def dropped(self) -> dict[str, int]:
        """Dropped messages by reason (every reason of :data:`DROP_REASONS`, zeros included)."""
        counts = Counter(self.decoder.dropped)
        counts.update(self.gate.dropped)
        return {reason: counts.get(reason, 0) for reason in DROP_REASONS}

    def prices(self) -> dict[str, dict[str, Any]]:
        """``{asset: {"bid", "ask", "ts_us", "seq", "source"}}`` of the last delivered ticks."""
        out = {}
        for name, tick in self.gate.last.items():
            asset = self.assets[name]
            out[name] = {"bid": asset.ticks_to_price(tick.bid_ticks),
                         "ask": asset.ticks_to_price(tick.ask_ticks),
                         "ts_us": tick.ts_us, "seq": tick.seq, "source": tick.source}
        return out

    def stats(self, now_us: int) -> dict[str, Any]:
        """Counters: consumed, decoded, dropped (by reason), jumps held and confirmed,
        conflation, delivery, tick ages (seconds) and read ages (ms quantiles)."""
        fanout, conflator = self.fanout, self.conflator
        return {
            "consumed": conflator.consumed,
            "decoded": self.decoder.decoded,
            "dropped": self.dropped(),
            "dropped_total": sum(self.decoder.dropped.values()) + sum(self.gate.dropped.values()),
            "jumps_held": self.gate.held_total,
            "jumps_confirmed": self.gate.confirmed,
            "held": {a: {"bid": self.assets[a].ticks_to_price(t.bid_ticks),
                         "ask": self.assets[a].ticks_to_price(t.ask_ticks)}
                     for a, t in self.gate.held.items()},
            "conflated": conflator.conflated + fanout.conflated,
            "conflated_batch": conflator.conflated,
            "conflated_pending": fanout.conflated,
            "delivered": fanout.delivered,
            "calls": fanout.calls,
            "failed_calls": fanout.failed_calls,
            "pending": fanout.pending_count(),
            "in_flight": sum(fanout.in_flight.values()),
            "tick_age_s": {a: (now_us - t.ts_us) / 1e6 for a, t in self.gate.last.items()},
            "read_age_ms": quantiles_ms(self._read_age_us),
            "prices": self.prices(),
        }
