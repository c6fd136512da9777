"""The whole platform on Ray for e2e tests: launcher pieces, a Kafka broker, Serve over HTTP.

``RayHttpPlatform`` offers the same members as ``tests.e2e.http_platform.HttpPlatform``
(``base_url``, ``push_tick``, ``audit``, ``totals``). Prices travel the production path: a
MarketDataMessage produced to the topic, consumed by the feed actor, fanned out to the shard
actors. A tick with ``age_s > 0`` is the exception: the feed actor drops ticks older than the
newest it delivered (by design), so an aged tick is handed to the shard actors directly, which
is what "the last price the shard saw is this old" means.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cluster.actors.launcher import Platform
from cluster.config import Settings
from engine.ledger import AuditDifference
from engine.market import Tick
from engine.shard_machine import ApplyTick
from tests.e2e.http_platform import make_tick


def free_ports(count: int) -> int:
    from feed.broker import free_ports as _free_ports

    return _free_ports(count, "127.0.0.1")


class RayHttpPlatform:
    """``start()`` brings up Ray (or joins ``settings.ray_address``), the actors and Serve."""

    def __init__(self, bootstrap: str, settings: Settings | None = None,
                 topic: str | None = None, ray_init: dict[str, Any] | None = None,
                 durable: bool = False) -> None:
        # the scenarios jump prices at will (liquidations) and sign up many accounts from one
        # address: the jump band and the limits have their own tests
        base = settings or Settings(max_tick_jump_bps=1_000_000, api_key_rate_per_s=0,
                                    signups_per_min=0, public_rate_per_s=0)
        data_dir = Path(tempfile.mkdtemp(prefix="shardex-e2e-"))
        # a topic of account events per platform: platforms sharing a broker number their
        # accounts alike
        self.settings = dataclasses.replace(
            # the API's port and those after it (one per replica, HAProxy's two listeners,
            # Serve's fallback proxy): all free, and none an outgoing connection may take
            base, port=free_ports(base.replica_slots + 4), feed_source="none",
            kafka_brokers=bootstrap,
            data_dir=data_dir, account_topic=f"account-events-{data_dir.name}")
        self.bootstrap = bootstrap
        options: dict[str, Any] = {"num_cpus": 2}
        options.update(ray_init or {})
        # durable: journaled hosts that Ray restarts after a kill, as `shardex up` runs them
        self.platform = Platform(self.settings, with_feed=False, bootstrap=bootstrap,
                                 ray_init=options, durable=durable)
        if topic:
            self.platform.topic = topic
        self.base_url = ""
        self._seq = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="e2e-producer",
                                        daemon=True)
        self._producer: Any = None

    def start(self) -> RayHttpPlatform:
        from feed.producer import MarketDataProducer

        try:
            self.platform.start()
            self.base_url = self.platform.url
            self._thread.start()
            self._producer = MarketDataProducer(self.bootstrap, self.settings.assets,
                                                topic=self.platform.topic)
            self._run(self._producer.start())
        except BaseException:  # a start that failed leaves no process and no DATA_DIR
            self.stop()
            raise
        return self

    def _run(self, coro: Any, timeout_s: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def stop(self) -> None:
        if self._producer is not None:
            self._run(self._producer.stop())
            self._producer = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self.platform.stop()
        shutil.rmtree(self.settings.data_dir, ignore_errors=True)

    def push_tick(self, asset: str, bid: str, ask: str, age_s: float = 0.0) -> None:
        self._seq += 1
        tick = make_tick(self.settings, asset, bid, ask, age_s, self._seq)
        if age_s > 0:
            import ray

            # the feed drops a stale tick, so it goes to the shards directly
            ray.get([h.execute.remote([ApplyTick(tick)])
                     for spec, h in self._shards_of(asset)], timeout=30)
            return
        self._produce(tick)

    def produce_stale(self, asset: str, age_s: float = 3600.0) -> None:
        """Produce a well-formed message ``age_s`` old to the topic (the feed must drop it)."""
        self._seq += 1
        ts_us = time.time_ns() // 1000 - int(age_s * 1_000_000)
        self._produce(Tick(asset, 100, 101, ts_us, self._seq, "test"))

    def _produce(self, tick: Tick) -> None:
        """``tick`` as a MarketDataMessage to the topic, flushed."""
        from feed.message import message_from_ticks

        msg = message_from_ticks(self.settings.assets[tick.asset], tick.bid_ticks,
                                 tick.ask_ticks, tick.ts_us, tick.seq, tick.source)

        async def send() -> None:
            await self._producer.publish(msg)
            await self._producer.flush()

        self._run(send())

    def _shards_of(self, asset: str) -> list[tuple[Any, Any]]:
        return [(spec, self.platform.shards[spec.name]) for spec in self.platform.layout
                if spec.asset == asset]

    def _audit(self) -> tuple[list[AuditDifference], dict[str, Any]]:
        from cluster.actors.deploy import service_from_names

        service = service_from_names(self.settings, namespace=self.platform.namespace)
        problems, totals = asyncio.run(service.audit())
        return list(problems), dict(totals)

    def audit(self) -> list[AuditDifference]:
        return self._audit()[0]

    def totals(self) -> dict[str, Any]:
        return self._audit()[1]

    def shard_nodes(self) -> dict[str, str]:
        return self.platform.shard_nodes()
