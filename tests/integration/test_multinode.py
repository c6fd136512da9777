"""Scale-out: three Ray nodes on this machine (head + 2 workers), shards on different nodes,
and the whole API flow across them over real HTTP (Serve), prices through Kafka.

The cluster must be a fresh Ray of its own, so the scenario runs in a child process (this
pytest process may already hold a Ray driver from other tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from decimal import Decimal as D
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_three_node_cluster_spreads_shards_and_serves_the_api() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for var in ("RAY_ADDRESS", "KAFKA_BROKERS", "PORT", "SHARDS", "ASSETS"):
        env.pop(var, None)
    # Ray rewrites a loopback bootstrap address to the host's first interface unless told this
    # is a single-host cluster; every node here is on this machine, so keep it all on 127.0.0.1.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    proc = subprocess.run([sys.executable, "-m", "tests.integration.test_multinode"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout[-6000:] + "\n--- stderr ---\n" + proc.stderr[-6000:]
    assert proc.returncode == 0, output
    assert "MULTINODE OK" in proc.stdout, output


def _scenario() -> None:
    import dataclasses

    import httpx
    import ray
    from ray.cluster_utils import Cluster

    from cluster.config import Settings
    from feed.broker import EmbeddedBroker, free_port
    from tests.e2e.api_client import open_position, signup, state, tick, wait_closed
    from tests.e2e.ray_platform import RayHttpPlatform

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    for _ in range(2):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    broker = EmbeddedBroker("127.0.0.1", free_port()).start()
    # the scenario jumps the price to a liquidation at once: no jump band (it has its own tests)
    settings = dataclasses.replace(Settings(max_tick_jump_bps=1_000_000),
                                   ray_address=cluster.address)
    platform = RayHttpPlatform(broker.bootstrap, settings)
    try:
        platform.start()
        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        assert len(alive) == 3, alive
        where = platform.shard_nodes()
        print("shard placement:", where, flush=True)
        assert set(where) == {"shard-SOL-0", "shard-BTC-0", "shard-ETH-0"}
        assert len(set(where.values())) == 3, f"shards not spread over the nodes: {where}"
        assert set(where.values()) <= set(alive)

        with httpx.Client(base_url=platform.base_url, timeout=20) as http:
            h = signup(http)
            tick(platform, http, "SOL", "100.00", "100.01")
            tick(platform, http, "BTC", "50000.0", "50000.1")
            tick(platform, http, "ETH", "2000.00", "2000.01")
            sol = open_position(http, h, asset="SOL", type="long", margin="100", leverage=10)
            btc = open_position(http, h, asset="BTC", type="short", margin="200", leverage=5,
                                takeProfit="49000")
            eth = open_position(http, h, asset="ETH", type="long", margin="50", leverage=2)
            s = state(http, h)
            assert len(s["positions"]) == 3 and D(s["balances"]["margin"]) == 350
            # manual close on one node
            tick(platform, http, "ETH", "2100.00", "2100.01")
            r = http.post("/api/v1/positions/close", json={"positionId": eth["positionId"]},
                          headers=h)
            assert r.status_code == 200, r.text
            assert r.json()["closeReason"] == "manual" and D(r.json()["realizedPnl"]) > 0
            # take-profit on another node
            tick(platform, http, "BTC", "48999.9", "49000.0")
            assert wait_closed(http, h, btc["positionId"])["closeReason"] == "take_profit"
            # liquidation on the third
            liq = D(sol["liquidationPrice"])
            tick(platform, http, "SOL", str(liq), str(liq + D("0.01")))
            assert wait_closed(http, h, sol["positionId"])["closeReason"] == "liquidation"
            s = state(http, h)
            assert s["positions"] == [] and D(s["balances"]["margin"]) == 0
            history = http.get("/api/v1/positions/history", headers=h).json()["positions"]
            assert {p["closeReason"] for p in history} == {"manual", "take_profit",
                                                          "liquidation"}
            assert http.get("/healthz").status_code == 200
        deadline = time.monotonic() + 10
        while (problems := platform.audit()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert problems == [], problems
        totals = platform.totals()
        assert totals["sum_micros"] == 0 and totals["closed_positions"] == 3
        print("MULTINODE OK", flush=True)
    finally:
        platform.stop()
        broker.stop()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    _scenario()
