"""What a clean stop of the platform leaves in DATA_DIR (the launcher's ``Platform.stop``, as
``shardex up`` runs it on Ctrl-C / SIGTERM / SIGHUP), over a real local Ray, a real broker on
127.0.0.1 and the durable hosts of one asset:

- the shards' last prices: a price-only tick is journaled with the next change a shard makes
  (cluster.durability.runner), so the last ticks before a stop are in memory only; the stop's
  final snapshot keeps them, and what a start recovers from DATA_DIR is the price the shard held
  (and the simulated feed, which continues from the shards' prices, continues from there);
- the candle store is closed: SQLite checkpoints its WAL into the database and removes the
  ``-wal`` file, which a killed feed actor leaves behind.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from cluster.actors.launcher import hosts_made
from cluster.actors.local import LocalHosts
from cluster.config import Settings
from cluster.live.candle_store import FILE_NAME
from engine.assets import DEFAULT_ASSETS
from engine.shard_machine import LastTick
from tests.e2e.ray_platform import RayHttpPlatform

pytestmark = pytest.mark.slow

SHARD = "shard-SOL-0"
PRICES = (("100.00", "100.01"), ("100.50", "100.51"), ("101.00", "101.01"))
STOP_BUDGET_S = 30.0  # an idle platform's stop; one that takes longer is a hang


def _shard_bid(handle: Any) -> int | None:
    import ray

    tick = ray.get(handle.execute.remote([LastTick()]), timeout=10)[0]
    return None if tick is None else int(tick.bid_ticks)


@pytest.mark.timeout(180)
def test_a_clean_stop_keeps_the_shards_last_price_and_closes_the_candle_store(
        kafka_broker: str) -> None:
    settings = Settings(assets=DEFAULT_ASSETS.subset(["SOL"]))
    ray_platform = RayHttpPlatform(kafka_broker, settings, durable=True)
    try:
        ray_platform.start()
        platform = ray_platform.platform
        data_dir = ray_platform.settings.data_dir
        sol = ray_platform.settings.assets["SOL"]
        for bid, ask in PRICES:
            ray_platform.push_tick("SOL", bid, ask)
        last_bid = sol.price_to_ticks(PRICES[-1][0])
        deadline = time.monotonic() + 30
        while _shard_bid(platform.shards[SHARD]) != last_bid:
            assert time.monotonic() < deadline, "the shard never took the last tick"
            time.sleep(0.05)
        wal = data_dir / f"{FILE_NAME}-wal"
        assert wal.exists() and wal.stat().st_size > 0  # the feed wrote the ticks' candles

        started = time.monotonic()
        platform.stop()
        stop_s = time.monotonic() - started
        print(f"\nclean stop took {stop_s:.2f} s")
        assert stop_s < STOP_BUDGET_S
        # the start noted that its hosts made their journals: a later start refuses one gone
        assert hosts_made(ray_platform.settings)

        # (a) the candle store was closed: its WAL checkpointed into the database, then removed
        assert not wal.exists() or wal.stat().st_size == 0, \
            f"{wal} is left with {wal.stat().st_size} bytes: the candle store was not closed"
        # (b) what the next start recovers from DATA_DIR (read-only, as `audit --offline`)
        # holds the last price the shard took, not an older one
        hosts = LocalHosts(ray_platform.settings, str(data_dir), readonly=True)
        try:
            [recovered] = hosts.shards[SHARD].execute_blocking([LastTick()])
        finally:
            hosts.close()
        assert recovered is not None, "the shard's recovered state holds no price at all"
        assert (recovered.bid_ticks, recovered.ask_ticks) == (
            last_bid, sol.price_to_ticks(PRICES[-1][1])), \
            f"recovered {recovered}, the shard held {PRICES[-1]}"
    finally:
        ray_platform.stop()


@pytest.mark.timeout(180)
def test_a_stop_that_gives_up_on_the_api_starts_no_ray(
        kafka_broker: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A stop waits API_STOP_TIMEOUT_S for the API to go, then gives up and shuts its Ray down.
    Its thread stopping the API makes no Serve call after that: Serve's client, finding no Ray,
    would start a new local one with Ray's defaults, which nobody stops (and which a later test
    in this process would take for its own). Here the stop gives up after 1 s, while Serve is
    still deleting the API."""
    import ray
    from cluster.actors import launcher

    ray_platform = RayHttpPlatform(kafka_broker, Settings(assets=DEFAULT_ASSETS.subset(["SOL"])))
    try:
        ray_platform.start()
        assert ray_platform.platform._ray_started  # its own Ray, which its stop shuts down
        monkeypatch.setattr(launcher, "API_STOP_TIMEOUT_S", 1.0)
        with caplog.at_level(logging.WARNING, logger=launcher.__name__):
            ray_platform.stop()
        assert "the API did not stop within" in caplog.text  # the stop gave up on it
        deadline = time.monotonic() + 8  # such a Ray was connected 2-3 s after the stop
        while time.monotonic() < deadline:
            assert not ray.is_initialized(), "a Ray was started after the stop"
            time.sleep(0.05)
    finally:
        ray_platform.stop()
        if ray.is_initialized():
            ray.shutdown()
