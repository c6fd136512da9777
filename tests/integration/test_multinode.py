"""Scale-out: three Ray nodes on this machine (head + 2 workers), shards on different nodes,
and the whole API flow across them over real HTTP (Serve), prices through Kafka.

The cluster must be a fresh Ray of its own, so the scenario runs in a child process (this
pytest process may already hold a Ray driver from other tests).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run_scenario(name: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for var in ("RAY_ADDRESS", "KAFKA_BROKERS", "PORT", "SHARDS", "ASSETS", "API_REPLICAS"):
        env.pop(var, None)
    # Ray rewrites a loopback bootstrap address to the host's first interface unless told this
    # is a single-host cluster; every node here is on this machine, so keep it all on 127.0.0.1.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    proc = subprocess.run([sys.executable, "-m", "tests.integration.test_multinode", name],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout[-6000:] + "\n--- stderr ---\n" + proc.stderr[-6000:]
    assert proc.returncode == 0, output
    assert "MULTINODE OK" in proc.stdout, output


# Each scenario, by what it shows (its id) and the function below that runs it.
SCENARIOS = [
    pytest.param("spread", id="three_node_cluster_spreads_shards_and_serves_the_api"),
    pytest.param("replicas",
                 id="two_api_replicas_behind_the_front_door_lose_nothing_when_one_is_killed"),
    pytest.param("rejoin",
                 id="a_joined_up_killed_with_kill_9_is_started_again_without_hand_work"),
    pytest.param("pinned", id="hosts_pinned_to_their_nodes_run_and_restart_only_there"),
]


@pytest.mark.slow
@pytest.mark.timeout(330)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_multinode(scenario: str) -> None:
    _run_scenario(scenario)


@contextlib.contextmanager
def _on_three_nodes(settings: Any, resources: list[dict[str, float]] | None = None,
                    durable: bool = False) -> Iterator[Any]:
    """A RayHttpPlatform of ``settings`` started on a fresh 3-node cluster with its own broker;
    everything stopped after. ``resources``: each node's custom resources (head first)."""
    import dataclasses

    import ray
    from feed.broker import EmbeddedBroker
    from feed.broker import free_port
    from ray.cluster_utils import Cluster
    from tests.e2e.ray_platform import RayHttpPlatform

    assert not ray.is_initialized()
    resources = resources or [{}, {}, {}]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1",
        "resources": resources[0]})
    for extra in resources[1:]:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources=extra)
    cluster.wait_for_nodes()
    broker = EmbeddedBroker("127.0.0.1", free_port()).start()
    platform = RayHttpPlatform(broker.bootstrap, dataclasses.replace(
        settings, ray_address=cluster.address), durable=durable)
    try:
        platform.start()
        yield platform
    finally:
        platform.stop()
        broker.stop()
        ray.shutdown()
        cluster.shutdown()


def _audit_clean(platform: Any, within_s: float) -> float:
    """Seconds until the ledger audit of ``platform`` reports nothing (fails after
    ``within_s``)."""
    start = time.monotonic()
    while (problems := platform.audit()) and time.monotonic() < start + within_s:
        time.sleep(0.2)
    assert problems == [], problems
    return time.monotonic() - start


def _spread_scenario() -> None:
    import httpx
    import ray
    from cluster.config import Settings
    from tests.e2e.api_client import open_position
    from tests.e2e.api_client import signup
    from tests.e2e.api_client import state
    from tests.e2e.api_client import tick
    from tests.e2e.api_client import wait_closed

    # the scenario jumps the price to a liquidation at once: no jump band (it has its own tests)
    with _on_three_nodes(Settings(max_tick_jump_bps=1_000_000)) as platform:
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
            _a_second_platform_is_refused_and_the_first_serves_on(platform, http)
        _audit_clean(platform, 10)
        totals = platform.totals()
        assert totals["sum_micros"] == 0 and totals["closed_positions"] == 3
        print("MULTINODE OK", flush=True)


def _a_second_platform_is_refused_and_the_first_serves_on(platform: Any, http: Any) -> None:
    """A ``shardex up`` joining a cluster where a platform runs stops at once, naming it,
    and leaves that platform's API alone (stopping a half-started platform removed the
    cluster's Serve app: the first platform's port refused every connection)."""
    import tempfile

    from feed.broker import free_ports

    port = free_ports(2)  # the API's and the broker's, never one port twice
    with tempfile.TemporaryDirectory(prefix="shardex-second-") as data_dir:
        env = {**os.environ, "PYTHONPATH": str(REPO),
               "RAY_ADDRESS": platform.settings.ray_address, "PORT": str(port),
               "FEED_SOURCE": "none", "DATA_DIR": data_dir}
        second = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "up", "--broker-port", str(port + 1)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode != 0, second.stdout + second.stderr
    assert "a platform already runs on the Ray cluster" in second.stderr, second.stderr[-3000:]
    assert http.get("/healthz").status_code == 200
    assert http.get("/api/v1/assets").status_code == 200


def _replicas_scenario() -> None:
    """API_REPLICAS=2 on three nodes: HAProxy on the port in front of two replicas, each
    also on its own port. Accounts made through one replica trade through the other and
    through the front door; then one replica is killed (SIGKILL) while clients keep opening
    positions with clientOrderIds through the front door: every open that was answered 201
    exists, a retry of each unanswered one (same clientOrderId) opens it at most once, and
    the ledger audit is clean."""
    import collections
    import concurrent.futures
    import signal
    import threading

    import httpx
    from bench.cpu_split import listener_pid
    from cluster.actors.serve_app import api_replicas
    from cluster.actors.serve_app import front_files
    from cluster.config import Settings
    from tests.e2e.api_client import open_position
    from tests.e2e.api_client import signup
    from tests.e2e.api_client import state
    from tests.e2e.api_client import status_and_code
    from tests.e2e.api_client import tick

    settings = Settings(max_tick_jump_bps=1_000_000, api_key_rate_per_s=0, signups_per_min=2,
                        public_rate_per_s=0, max_open_positions=100_000, api_replicas=2)
    with _on_three_nodes(settings) as platform:
        port = platform.settings.port
        direct = [f"http://127.0.0.1:{port + i}" for i in (1, 2)]
        with httpx.Client(base_url=direct[0], timeout=20) as one, \
                httpx.Client(base_url=direct[1], timeout=20) as two, \
                httpx.Client(base_url=platform.base_url, timeout=20) as front:
            h = signup(one)
            tick(platform, front, "SOL", "100.00", "100.01")
            opened = open_position(two, h, asset="SOL", type="long", margin="100",
                                   leverage=10, clientOrderId="first")
            again = two.post("/api/v1/positions/open", headers=h, json={
                "asset": "SOL", "type": "long", "margin": "100", "leverage": 10,
                "clientOrderId": "first"})
            assert again.status_code == 201 and again.json() == opened, again.text
            r = one.post("/api/v1/positions/open", headers=h, json={
                "asset": "SOL", "type": "long", "margin": "100", "leverage": 10,
                "clientOrderId": "first"})  # the other replica: the same first answer
            assert r.status_code == 201 and r.json() == opened, r.text
            assert [p["positionId"] for p in state(front, h)["positions"]] == \
                [opened["positionId"]]
            r = one.post("/api/v1/positions/close", headers=h,
                         json={"positionId": opened["positionId"]})
            assert r.status_code == 200, r.text
            assert state(two, h)["positions"] == []

            assert api_replicas() == ("RUNNING", {"RUNNING": 2})  # what `status` prints

            victim = listener_pid(port + 1)  # the replica on the first replica port
            # the limits per client address count each client behind the front door, not
            # HAProxy's address: two signups from each of eight addresses (a limit of 2 a
            # minute per address and replica), all through the front door
            traders = []
            for i in range(8):
                with httpx.Client(base_url=platform.base_url, timeout=20, transport=(
                        httpx.HTTPTransport(local_address=f"127.0.0.{10 + i}"))) as client:
                    traders.append(signup(client))
                    signup(client)
            answered: dict[str, str] = {}  # clientOrderId -> positionId answered 201
            unanswered: list[tuple[int, str]] = []
            failed: collections.Counter[str] = collections.Counter()  # "status code" -> count
            stop = threading.Event()

            def trade(i: int) -> None:
                n = 0
                with httpx.Client(base_url=platform.base_url, timeout=20) as http:
                    while not stop.is_set():
                        n += 1
                        key = f"t{i}-{n}"
                        try:
                            r = http.post("/api/v1/positions/open", headers=traders[i], json={
                                "asset": "SOL", "type": "long", "margin": "1",
                                "leverage": 2, "clientOrderId": key})
                        except httpx.HTTPError:
                            unanswered.append((i, key))
                            continue
                        if r.status_code == 201:
                            answered[key] = r.json()["positionId"]
                        else:
                            failed[status_and_code(r)] += 1
                            unanswered.append((i, key))

            # daemon threads, stopped in a finally: a failure of this thread must not leave
            # them trading against a stopped platform until the scenario's timeout
            workers = [threading.Thread(target=trade, args=(i,), daemon=True)
                       for i in range(len(traders))]
            try:
                for w in workers:
                    w.start()
                time.sleep(2.0)
                os.kill(victim, signal.SIGKILL)
                print("killed replica pid", victim, flush=True)
                time.sleep(4.0)
            finally:
                stop.set()
                for w in workers:
                    w.join(30)
            assert not any(w.is_alive() for w in workers), "a trader did not stop"
            print(f"answered {len(answered)}, unanswered {len(unanswered)}, statuses of the "
                  f"unanswered: {dict(failed)}", flush=True)
            assert len(answered) > 50, len(answered)
            # a request caught by the kill is answered as the API answers a component that
            # did not answer (HAProxy's own 502/503/504 included), never a bare 500
            assert set(failed) <= {"503 SERVICE_UNAVAILABLE", "503 PRICE_UNAVAILABLE"}, failed
            # a retry of every unanswered open gets its first answer or runs it now; one
            # that was under way in the killed replica is settled at the shards by the retry
            # once it has waited the service's idempotency wait for it
            # (each unanswered open retried by a client of its own, all at once: a client
            # retries as soon as it likes, and each may wait out that wait)
            seen: collections.Counter[str] = collections.Counter()
            seen_lock = threading.Lock()

            def retry(i: int, key: str) -> None:
                deadline = time.monotonic() + 90
                with httpx.Client(base_url=platform.base_url, timeout=20) as http:
                    while True:
                        r = http.post("/api/v1/positions/open", headers=traders[i], json={
                            "asset": "SOL", "type": "long", "margin": "1", "leverage": 2,
                            "clientOrderId": key})
                        if r.status_code == 201:
                            answered[key] = r.json()["positionId"]
                            return
                        error = status_and_code(r)
                        with seen_lock:
                            seen[error] += 1
                        assert error.split()[0] in ("409", "503") and "not-json" not in error, \
                            error
                        assert time.monotonic() < deadline, (r.text, seen)
                        if error == "503 PRICE_UNAVAILABLE":  # the retries outlived the price
                            tick(platform, http, "SOL", "100.00", "100.01")
                        time.sleep(0.5)

            retries_from = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(max(1, len(unanswered))) as pool:
                for done in [pool.submit(retry, i, key) for i, key in unanswered]:
                    done.result()  # a failed assertion of any retry fails here
            print(f"retries answered in {time.monotonic() - retries_from:.1f} s:", dict(seen),
                  flush=True)
            held: set[str] = set()
            for headers in traders:
                cursor = None
                while True:
                    r = front.get("/api/v1/positions", headers=headers, params={
                        "limit": 500, **({"cursor": cursor} if cursor else {})})
                    assert r.status_code == 200, r.text
                    held.update(p["positionId"] for p in r.json()["positions"])
                    if (cursor := r.json()["next"]) is None:
                        break
            assert set(answered.values()) == held, (len(answered), len(held))

            # HAProxy killed: the replicas go on serving on their own ports, and Serve's
            # controller, which health-checks it every PROXY_HEALTH_CHECK_PERIOD_S, starts it
            # again (at Serve's default period of 10 s that took 31-32 s)
            haproxy = listener_pid(port)
            os.kill(haproxy, signal.SIGKILL)
            killed = time.monotonic()
            assert two.get("/healthz").status_code == 200
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if front.get("/healthz").status_code == 200:
                        break
                assert time.monotonic() - killed < 25, "the front door is not back 25 s " \
                    "after HAProxy was killed"
                time.sleep(0.2)
            print(f"front door back {time.monotonic() - killed:.1f} s after HAProxy's kill",
                  flush=True)
            assert listener_pid(port) != haproxy
        # a lock the killed replica made for an open it never sent is ended by the sweeps of
        # the replica that leads (ORPHAN_ROUNDS of them, 10 s apart)
        print(f"audit clean after {_audit_clean(platform, 90):.1f} s", flush=True)
        files = Path(front_files(port))
        assert list(files.glob("*/haproxy.cfg")), list(files.rglob("*"))  # one dir a node
    assert not files.exists(), list(files.rglob("*"))  # HAProxy's files went with the stop
    print("MULTINODE OK", flush=True)


def _rejoin_scenario() -> None:
    """``shardex up`` joined to a cluster (RAY_ADDRESS) and killed with ``kill -9``: its actors
    go with it, but Serve's (the API app and its replica on PORT) outlive it on the cluster.
    The next joined ``up`` with the same DATA_DIR removes that API, serves on the same PORT with
    the acknowledged position, and a Ctrl-C stops it and frees the port."""
    import json
    import signal
    import tempfile

    import httpx
    from feed.broker import ProcessIdentity
    from feed.broker import accepts_connections
    from feed.broker import free_ports
    from feed.broker import stop_process
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    root = Path(tempfile.mkdtemp(prefix="shardex-rejoin-"))
    port = free_ports(2)  # the API's and the broker's, never one port twice
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": cluster.address,
           "PORT": str(port), "FEED_SOURCE": "sim", "DATA_DIR": str(root / "data"),
           "ASSETS": "SOL", "SIGNUPS_PER_MIN": "0", "API_KEY_RATE_PER_S": "0",
           "PUBLIC_RATE_PER_S": "0"}
    command = [sys.executable, "-m", "cluster.cli", "up", "--broker-port", str(port + 1)]
    log = root / "up.log"
    runs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        runs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("ab"),
                                     stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert runs[-1].poll() is None, log.read_text()[-4000:]
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if "SOL" in httpx.get(f"http://127.0.0.1:{port}/api/v1/prices",
                                      timeout=3).json():
                    return runs[-1]
            time.sleep(0.3)
        raise AssertionError(f"not serving within 120 s\n{log.read_text()[-4000:]}")

    try:
        first = start()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
            key = http.post("/api/v1/accounts", json={}).json()["apiKey"]
            h = {"Authorization": f"Bearer {key}"}
            opened = http.post("/api/v1/positions/open", headers=h, json={
                "asset": "SOL", "type": "long", "margin": "100", "leverage": 2})
            assert opened.status_code == 201, opened.text
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        time.sleep(2.0)
        # the killed run's API still holds the port: before, the next `up` stopped at
        # "port ... is already in use" until it was removed by hand
        assert accepts_connections("127.0.0.1", port), "nothing was left holding the port"
        start()
        assert "removing the API that a platform which did not stop left" in log.read_text()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
            held = http.get("/api/v1/positions", headers=h)
            assert held.status_code == 200, held.text
            assert [p["positionId"] for p in held.json()["positions"]] == \
                [opened.json()["positionId"]]
        runs[-1].send_signal(signal.SIGINT)
        assert runs[-1].wait(90) == 0, log.read_text()[-4000:]
        assert not accepts_connections("127.0.0.1", port), "the stopped run left the port held"
        # the cluster runs on without a platform: one line each, where `status` printed Ray's
        # "Failed to look up actor" for every actor and `audit` for the ledger
        for cli, code in (("status", 1), ("audit", 2)):
            done = subprocess.run([sys.executable, "-m", "cluster.cli", cli], cwd=REPO,
                                  env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == code and done.stdout == "", (cli, done)
            assert done.stderr.strip().splitlines()[-1] == (
                f"shardex {cli}: no platform runs on the Ray cluster at {cluster.address} "
                f"(namespace shardex): start one there with RAY_ADDRESS={cluster.address} "
                "shardex up"), done.stderr
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait(10)
        broker = root / "data" / "embedded-broker.json"
        if broker.exists():  # left only when a run did not stop
            stop_process(ProcessIdentity.from_json(json.loads(broker.read_text())["broker"]))
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)  # up.log's tail is in any failure's message
    print("MULTINODE OK", flush=True)


def _pinned_scenario() -> None:
    """``DATA_DIR`` on each node's own disk: every node pins the stateful hosts whose
    directories it holds (custom resources ``shardex-host:<name>``). Each host runs on the
    node that pins it; a shard killed with kill -9 comes back on that node with its position;
    a layout with a host no node pins is refused before any host of it starts."""
    import dataclasses
    import signal

    import httpx
    import ray
    from cluster.actors.deploy import start_hosts
    from cluster.config import Settings
    from tests.e2e.api_client import open_position
    from tests.e2e.api_client import signup
    from tests.e2e.api_client import state
    from tests.e2e.api_client import tick

    pins = [{"shardex-host:ledger": 1, "shardex-host:shard-ETH-0": 1},
            {"shardex-host:shard-SOL-0": 1}, {"shardex-host:shard-BTC-0": 1}]
    settings = Settings(max_tick_jump_bps=1_000_000)
    with _on_three_nodes(settings, pins, durable=True) as platform:
        pinned_on = {key.removeprefix("shardex-host:"): n["NodeID"] for n in ray.nodes()
                     if n["Alive"] for key in n["Resources"] if key.startswith("shardex-host:")}
        print("pins:", pinned_on, flush=True)
        assert len(set(pinned_on.values())) == 3
        where = platform.shard_nodes()
        assert where == {name: pinned_on[name] for name in where}, (where, pinned_on)
        assert _node_of(platform.platform.ledger) == pinned_on["ledger"]
        with httpx.Client(base_url=platform.base_url, timeout=20) as http:
            h = signup(http)
            tick(platform, http, "SOL", "100.00", "100.01")
            sol = open_position(http, h, asset="SOL", type="long", margin="100", leverage=2)
            shard = platform.platform.shards["shard-SOL-0"]
            victim = ray.get(shard.info.remote(), timeout=30)["pid"]
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(Exception):
                    if ray.get(shard.info.remote(), timeout=5)["pid"] != victim:
                        break
                assert time.monotonic() < deadline, "shard-SOL-0 not back within 60 s"
                time.sleep(0.3)
            assert _node_of(shard) == pinned_on["shard-SOL-0"]  # where its directory is
            assert [p["positionId"] for p in state(http, h)["positions"]] == \
                [sol["positionId"]]
        # a second SOL shard no node pins: refused before any host starts
        split = dataclasses.replace(platform.settings, shards={"SOL": 2})
        try:
            start_hosts(split, "pin-refusal", None, 30)
        except ValueError as exc:
            assert "none pins shard-SOL-1" in str(exc), exc
        else:
            raise AssertionError("a layout with an unpinned host was started")
        named = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "pin-refusal"}
        assert named == set(), named
        _audit_clean(platform, 10)
    print("MULTINODE OK", flush=True)


def _node_of(handle: Any) -> str:
    from cluster.actors.launcher import _actor_node

    return _actor_node(handle)


if __name__ == "__main__":
    {"spread": _spread_scenario, "replicas": _replicas_scenario,
     "rejoin": _rejoin_scenario, "pinned": _pinned_scenario}[sys.argv[1]]()
