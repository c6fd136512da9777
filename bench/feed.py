"""``shardex bench feed``: Kafka -> feed actor -> shard actors, throughput and latency.

Two phases on the embedded broker (free loopback port) and a local Ray:

1. ingest: ``--ticks`` messages for 3 assets produced as fast as possible (produce rate), then
   a feed actor reads them from the beginning (``start_from="earliest"``) and conflates and
   delivers them to counting shard actors; ingest rate = messages consumed / time between the
   first and the last record the actor read.
2. latency: a steady ``--rate`` ticks/s for ``--seconds``; every message carries its produce
   time in ``ts_us`` and the shard computes ``receive - ts_us``: the time from produce to
   delivery at the shard (p50/p99 over delivered ticks; conflated ticks are not delivered).
   The broker keeps this phase's topic as short as the platform's embedded broker keeps the
   market topic (``--topic-max-records``, :data:`feed.broker.MARKET_TOPIC_MAX_RECORDS` a
   partition): Tansu lists a partition's every batch on each fetch, so on a topic left to
   grow, produce -> read grows with it, and the figure would be of a broker the platform does
   not run. The ticks neither delivered, conflated nor dropped (lost around a recreation, or
   delivered after the phase) are counted and printed.

Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import time
import uuid
from typing import Any

import ray

from bench.options import duration, nonneg_int, positive_int, rate
from cluster.actors.feed import FeedActor
from cluster.actors.host import MachineHost
from cluster.config import Settings
from engine.assets import DEFAULT_ASSETS
from engine.shard_machine import ApplyTick, Outbox, OutboxView
from feed.broker import MARKET_TOPIC_MAX_RECORDS, EmbeddedBroker, free_port
from feed.consumer import MarketDataConsumer
from feed.message import message_from_ticks
from feed.producer import MarketDataProducer
from feed.sim import SimWalk

MIN_INGEST_SPAN_S = 0.05  # the least time between the first and last read that times ingest


class _CountingShard:
    """Counts ticks and records ``now - ts_us`` (us) of each, as a shard would receive them.

    It answers the feed actor like a shard host does: ``execute`` of ``ApplyTick`` commands
    and an ``Outbox`` read (plain, or pickled as the feed actor's port sends them), one answer
    per command (0: nothing closed; an empty outbox, so no settlement is delivered).
    """

    def __init__(self, nice: int | None = 0) -> None:
        if nice is not None:
            os.setpriority(os.PRIO_PROCESS, 0, nice)  # like the feed actor; see the table note
        self.ticks = 0
        self.calls = 0
        self.latency_us: list[int] = []

    def execute(self, commands: list[ApplyTick | Outbox]) -> list[int | OutboxView]:
        now_us = time.time_ns() // 1000
        ticks = [c.tick for c in commands if isinstance(c, ApplyTick)]
        self.calls += 1
        self.ticks += len(ticks)
        self.latency_us.extend(now_us - t.ts_us for t in ticks)
        return [OutboxView([], 0) if isinstance(c, Outbox) else 0 for c in commands]

    # the host's pickled form of execute, as the feed actor's port calls it (it only needs
    # ``self.execute``)
    execute_pickled = MachineHost.execute_pickled

    def report(self) -> dict[str, Any]:
        return {"ticks": self.ticks, "calls": self.calls, "latency_us": self.latency_us}


_ray_remote: Any = ray.remote
CountingShard: Any = _ray_remote(num_cpus=0)(_CountingShard)


def _percentile(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


async def _produce_burst(bootstrap: str, topic: str, n: int) -> float:
    """Produce ``n`` ticks round-robin over the assets as fast as possible; returns seconds."""
    assets = DEFAULT_ASSETS.assets
    walk = SimWalk(DEFAULT_ASSETS, seed=1)
    producer = MarketDataProducer(bootstrap, DEFAULT_ASSETS, topic=topic, linger_ms=5)
    await producer.start()
    t0 = time.perf_counter()
    base_us = time.time_ns() // 1000
    for i in range(n):
        asset = assets[i % len(assets)]
        bid, ask = walk.next(asset)
        await producer.publish(message_from_ticks(asset, bid, ask, base_us + i, i + 1, "bench"))
    await producer.flush()
    elapsed = time.perf_counter() - t0
    await producer.stop()
    return elapsed


async def _produce_steady(bootstrap: str, topic: str, rate: float, seconds: float
                          ) -> tuple[int, int]:
    """Produce ``rate`` ticks/s for ``seconds``, each stamped with its produce time; the ticks
    handed to the producer, and the producer's send failures among them."""
    assets = DEFAULT_ASSETS.assets
    walk = SimWalk(DEFAULT_ASSETS, seed=2)
    producer = MarketDataProducer(bootstrap, DEFAULT_ASSETS, topic=topic, linger_ms=0)
    await producer.start()
    start = time.perf_counter()
    n = 0
    total = int(rate * seconds)
    while n < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        while n < due:
            asset = assets[n % len(assets)]
            bid, ask = walk.next(asset)
            n += 1
            await producer.publish(message_from_ticks(asset, bid, ask, time.time_ns() // 1000, n,
                                                      "bench"))
        await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
    await producer.flush()
    await producer.stop()
    return n, producer.errors


def latency_topic(ns: str) -> str:
    """The topic of the latency phase of the run ``ns``."""
    return f"bench-latency-{ns}"


async def _wait_consumed(feed: Any, n: int, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    stats: dict[str, Any] = await feed.stats.remote()
    while stats["consumed"] < n and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        stats = await feed.stats.remote()
    return stats


async def _run(args: argparse.Namespace, bootstrap: str, ns: str) -> dict[str, Any]:
    settings = Settings(kafka_brokers=bootstrap)
    names = [f"shard-{a.name}-0" for a in settings.assets.assets]

    # -- phase 1: ingest ------------------------------------------------------------------
    # The burst is read back from the beginning after it was produced, later than
    # MAX_PRICE_AGE_S for most of it: the decoder's age bound is widened for this phase so
    # every record goes the whole way (decode, conflate, gate, fan-out) instead of being
    # dropped as stale.
    ingest_settings = dataclasses.replace(settings, max_price_age_s=86_400.0)
    topic = f"bench-ingest-{ns}"
    produce_s = await _produce_burst(bootstrap, topic, args.ticks)
    shards = {n: CountingShard.options(name=n, namespace=ns).remote() for n in names}
    feed = FeedActor.remote(ingest_settings, bootstrap, namespace=ns, topic=topic,
                            group_id=topic, start_from="earliest")
    await feed.start.remote(30)
    stats = await _wait_consumed(feed, args.ticks, 120)
    await asyncio.sleep(0.2)
    stats = await feed.stats.remote()
    span_s = max(1e-9, (stats["last_record_s"] or 0) - (stats["first_record_s"] or 0))
    ingest = {
        "consumed": stats["consumed"], "conflated": stats["conflated"],
        "delivered": stats["delivered"], "calls": stats["calls"], "span_s": span_s,
        "dropped": stats["dropped_total"],
    }
    await feed.stop.remote()
    ray.kill(feed)
    for h in shards.values():
        ray.kill(h)

    # -- phase 2: latency at a steady rate -----------------------------------------------
    topic = latency_topic(ns)
    ns2 = ns + "-lat"
    shards = {n: CountingShard.options(name=n, namespace=ns2).remote() for n in names}
    feed = FeedActor.remote(settings, bootstrap, namespace=ns2, topic=topic, group_id=topic,
                            fetch_max_wait_ms=args.fetch_wait_ms,
                            max_in_flight_per_shard=args.in_flight)
    await feed.start.remote(30)
    await _produce_steady(bootstrap, topic, args.rate, 1.0)  # warm-up: connections, handles
    await asyncio.sleep(0.5)
    before = [await h.report.remote() for h in shards.values()]
    stats0 = await feed.stats.remote()
    sent, send_failures = await _produce_steady(bootstrap, topic, args.rate, args.seconds)
    await asyncio.sleep(1.0)
    after = [await h.report.remote() for h in shards.values()]
    lat_stats = await feed.stats.remote()
    await feed.stop.remote()
    latencies = [v for b, a in zip(before, after, strict=True)
                 for v in a["latency_us"][len(b["latency_us"]):]]
    conflated = lat_stats["conflated"] - stats0["conflated"]
    dropped = lat_stats["dropped_total"] - stats0["dropped_total"]
    return {
        "produce_s": produce_s, "ingest": ingest, "latency_sent": sent,
        "latency_delivered": len(latencies),
        "latency_calls": sum(a["calls"] - b["calls"] for b, a in zip(before, after, strict=True)),
        "latency_conflated": conflated, "latency_dropped": dropped,
        "latency_unaccounted": unaccounted(sent, len(latencies), conflated, dropped),
        "latency_send_failures": send_failures,
        "latency_repositions": lat_stats["repositions"] - stats0["repositions"],
        "read_age_ms": lat_stats["read_age_ms"] or {},
        "p50_ms": _percentile(latencies, 0.50) / 1000,
        "p99_ms": _percentile(latencies, 0.99) / 1000,
        "max_ms": (max(latencies) / 1000) if latencies else float("nan"),
    }


def unaccounted(sent: int, delivered: int, conflated: int, dropped: int) -> int:
    """Ticks of the latency phase that were neither delivered to a shard (within the phase and
    the second after it), conflated away nor dropped by the feed actor: lost (a send caught by
    a recreation of the topic) or too late for the percentiles, which leave them out. Never
    below 0 (a tick of the warm-up delivered late is counted as delivered)."""
    return max(0, sent - delivered - conflated - dropped)


INGEST_TARGET_TICKS_PER_S = 100_000


def ingest_verdict(consumed: int, produced: int, span_s: float
                   ) -> tuple[float | None, bool | None]:
    """The ingest phase's rate (ticks/s read between the first and the last record; None when
    the actor read them within MIN_INGEST_SPAN_S, too short to time) and whether it met
    INGEST_TARGET_TICKS_PER_S (None: not timed). A burst not read whole misses it: the rate of
    the part read says nothing of a feed that stalled on the rest."""
    rate = consumed / span_s if span_s >= MIN_INGEST_SPAN_S else None
    if rate is None:
        return None, None
    return rate, consumed >= produced and rate >= INGEST_TARGET_TICKS_PER_S


def paced_parser(prog: str, description: str | None, *, rate_help: str, seconds: float,
                 seconds_help: str) -> argparse.ArgumentParser:
    """The argument parser of a bench that produces ``--rate`` ticks/s (2,000 by default) for
    ``--seconds``; the bench adds its own arguments."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=rate, default=2000.0, help=rate_help)
    parser.add_argument("--seconds", type=duration, default=seconds, help=seconds_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = paced_parser("shardex bench feed", __doc__, rate_help="ticks/s of the latency phase",
                          seconds=10.0, seconds_help="length of the latency phase")
    parser.add_argument("--ticks", type=positive_int, default=300_000,
                        help="ticks of the ingest phase")
    defaults = MarketDataConsumer  # its dataclass defaults, as the platform's feed actor runs it
    parser.add_argument("--fetch-wait-ms", type=nonneg_int, default=defaults.fetch_max_wait_ms,
                        help="the feed actor's fetch_max_wait_ms while records flow")
    parser.add_argument("--in-flight", type=positive_int, default=1,
                        help="calls in flight per shard")
    parser.add_argument("--topic-max-records", type=nonneg_int, default=MARKET_TOPIC_MAX_RECORDS,
                        help="records a partition of the latency phase's topic may hold before "
                             "the embedded broker recreates it empty, as it keeps the market "
                             "topic (0: every record is kept, as Tansu itself does)")
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed)")
    args = parser.parse_args(argv or [])
    if not 0 <= args.fetch_wait_ms <= defaults.idle_fetch_max_wait_ms:
        parser.error(f"--fetch-wait-ms must lie in 0..{defaults.idle_fetch_max_wait_ms} "
                     "(the idle wait)")

    ns = uuid.uuid4().hex[:8]
    # the ingest topic is read from its beginning, so it is kept whole; the latency phase's is
    # kept as short as the platform's market topic
    broker = EmbeddedBroker("127.0.0.1", free_port(), trim={
        latency_topic(ns): args.topic_max_records} if args.topic_max_records else {}).start()
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 namespace=ns, _node_ip_address="127.0.0.1")
        r = asyncio.run(_run(args, broker.bootstrap, ns))
        r["topic_recreations"] = broker.trimmer.trims if broker.trimmer is not None else 0
    finally:
        if ray.is_initialized():
            ray.shutdown()
        broker.stop()

    ing = r["ingest"]
    # a burst the actor read in one or two fetches has no span to time it by
    ingest_rate, ingest_met = ingest_verdict(ing["consumed"], args.ticks, ing["span_s"])
    produce_rate = args.ticks / r["produce_s"]
    rows = [
        ("ticks produced (ingest phase)", f"{args.ticks:,}"),
        ("produce rate (ticks/s)", f"{produce_rate:,.0f}"),
        ("feed actor ingest (ticks/s)",
         f"{ingest_rate:,.0f}   target >= {INGEST_TARGET_TICKS_PER_S:,}"
         + ("" if ingest_met else " (missed)") if ingest_rate is not None else
         f"not timed: read within {ing['span_s'] * 1e3:.1f} ms (raise --ticks)"),
        ("  consumed / conflated / delivered / dropped",
         f"{ing['consumed']:,} / {ing['conflated']:,} / {ing['delivered']:,} / "
         f"{ing['dropped']:,} in {ing['calls']:,} calls"
         + ("" if ing["consumed"] >= args.ticks else
            f"   ONLY {ing['consumed']:,} of the {args.ticks:,} produced were read")),
        (f"steady {args.rate:,.0f} ticks/s for {args.seconds:g} s: sent / delivered",
         f"{r['latency_sent']:,} / {r['latency_delivered']:,} "
         f"({r['latency_calls']:,} calls, {r['latency_conflated']:,} conflated, "
         f"{r['latency_dropped']:,} dropped)"),
        ("  neither delivered, conflated nor dropped",
         f"{r['latency_unaccounted']:,} (send failures {r['latency_send_failures']:,}; topic "
         f"recreated {r['topic_recreations']} times, kept at "
         + (f"{args.topic_max_records:,} records a partition" if args.topic_max_records
            else "every record") + f"; partitions repositioned {r['latency_repositions']})"),
        ("produce -> feed actor read p50 / p99 (ms)",
         f"{r['read_age_ms'].get('p50', float('nan')):.2f} / "
         f"{r['read_age_ms'].get('p99', float('nan')):.2f}"),
        ("produce -> shard p50 (ms)", f"{r['p50_ms']:.2f}"),
        ("produce -> shard p99 (ms)", f"{r['p99_ms']:.2f}   target <= 20"),
        ("produce -> shard max (ms)", f"{r['max_ms']:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("shardex bench feed (embedded Tansu broker, local Ray, 3 assets, 1 shard each)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(json.dumps({
        "bench": "feed", "ticks": args.ticks,
        "produce_ticks_per_s": round(produce_rate),
        "ingest_ticks_per_s": None if ingest_rate is None else round(ingest_rate),
        "consumed": ing["consumed"], "conflated": ing["conflated"], "delivered": ing["delivered"],
        "dropped": ing["dropped"], "ingest_complete": ing["consumed"] >= args.ticks,
        "steady_rate": args.rate, "steady_sent": r["latency_sent"],
        "steady_delivered": r["latency_delivered"],
        "steady_unaccounted": r["latency_unaccounted"],
        "steady_send_failures": r["latency_send_failures"],
        "topic_max_records": args.topic_max_records,
        "topic_recreations": r["topic_recreations"],
        "deliver_p50_ms": round(r["p50_ms"], 3), "deliver_p99_ms": round(r["p99_ms"], 3),
        "deliver_max_ms": round(r["max_ms"], 3),
        "read_p50_ms": r["read_age_ms"].get("p50"), "read_p99_ms": r["read_age_ms"].get("p99"),
        "load_avg_1m": os.getloadavg()[0],
        "ingest_target_met": ingest_met,
        "latency_target_met": r["p99_ms"] <= 20,
    }))
    return 0
