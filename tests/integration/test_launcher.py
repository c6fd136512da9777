"""``shardex up`` as a user runs it, over one life of the platform in one DATA_DIR
(``FEED_SOURCE=sim``, its own embedded broker on a free loopback port, the API on a free port).
The module's platform is started once and restarted once; its phases run in this order:

1. It runs in the foreground with one banner and serves prices; ``status`` and ``audit --json``
   answer against it from other processes. ``kill -9`` of its embedded broker alone: it starts
   the broker again by itself, and prices and trading resume within seconds.
2. ``kill -9`` of the ``shardex up`` process alone, with clients connected (one with a
   keep-alive connection and an acknowledged open, one idle, one the server hung up on): nothing
   it started outlives it for long (the embedded broker dies with it, Ray's processes follow),
   and the next ``shardex up`` in the same DATA_DIR serves again within 30 s with every
   acknowledged change, without anyone freeing ports or killing leftovers by hand.
3. Ctrl-C stops that second run cleanly (exit 0, its records gone, the API port free again), and
   ``audit --offline`` over the journaled state it left in DATA_DIR is clean with every open
   position in it.
4. A third run in a session of its own is stopped as a service manager stops a unit: SIGTERM to
   its process group and to every process it started (Ray's own, its workers, the broker): it
   stops without waiting for an API that cannot answer any more, and leaves no process behind.
5. A fourth run gets a SIGTERM while it still starts (its Ray up, its hosts and API not yet):
   it stops as it does after the start, exit 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from datetime import UTC
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from feed.broker import ProcessIdentity
from feed.broker import free_port
from feed.broker import stop_process
from tests.integration.processes import descendants
from tests.integration.processes import listening_addresses
from tests.integration.processes import loopback
from tests.integration.processes import ray_processes
from tests.integration.processes import stop_child
from websockets.sync.client import connect as ws_connect

REPO = Path(__file__).resolve().parents[2]
START_BUDGET_S = 120.0
RESTART_BUDGET_S = 30.0
BROKER_RESTART_BUDGET_S = 30.0
ACCOUNT_EVENT_BUDGET_S = 10.0  # an account event's frame after the broker's restart
GIVE_UP_S = 150.0  # the start waits out TIME_WAIT leftovers (~60 s) if it must
TCP_TIME_WAIT = "06"  # a socket's state in /proc/net/tcp

# starts and restarts held to budgets measured with the machine to itself
pytestmark = [pytest.mark.slow, pytest.mark.alone]


def tcp_sockets_on(port: int) -> list[tuple[str, int]]:
    """(state, peer port) of every TCP socket whose local port is ``port`` (Linux
    ``/proc/net/tcp``; none elsewhere)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, peer, state = row.split()[1:4]
            if int(local.rsplit(":", 1)[1], 16) == port:
                found.append((state, int(peer.rsplit(":", 1)[1], 16)))
    return found


class Up:
    """The module's ``shardex up``: ``start`` runs it again in the same DATA_DIR
    (``<root>/data``), with the same API and broker ports; ``runs`` are every process started,
    the last one current. What a phase leaves for the next ones: ``open_margins`` (the margin,
    in micro-dollars, of every position acknowledged open) and ``started_below`` (the processes
    the killed run started, stopped by identity at the end)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.port, self.broker_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # what marks every process the module's runs start, a Ray they start included
        run_mark = uuid.uuid4().hex
        self.mark = f"SHARDEX_TEST_RUN={run_mark}"
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "PORT": str(self.port),
                    "FEED_SOURCE": "sim", "DATA_DIR": str(self.data_dir),
                    "SHARDEX_TEST_RUN": run_mark}
        for name in ("RAY_ADDRESS", "KAFKA_BROKERS"):
            self.env.pop(name, None)
        self.log = root / "up.log"
        self.runs: list[subprocess.Popen[str]] = []
        self.open_margins: dict[str, int] = {}
        self.started_below: list[ProcessIdentity] = []

    @property
    def proc(self) -> subprocess.Popen[str]:
        assert self.runs, "shardex up never started"
        return self.runs[-1]

    def start(self, new_session: bool = False) -> subprocess.Popen[str]:
        self.runs.append(subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "up", "--broker-port", str(self.broker_port)],
            cwd=REPO, env=self.env, stdout=self.log.open("a"), stderr=subprocess.STDOUT,
            text=True, start_new_session=new_session))
        return self.runs[-1]

    def output(self) -> str:
        return self.log.read_text()

    @staticmethod
    def wait_exit(run: subprocess.Popen[str], timeout_s: float) -> int:
        """``run``'s exit status (killed, and the test failed, after ``timeout_s``)."""
        try:
            return run.wait(timeout_s)
        except subprocess.TimeoutExpired:
            run.kill()
            raise

    def wait_gone(self, below: list[ProcessIdentity]) -> None:
        """Every process of ``below`` (what a stopped run had started) gone within 30 s."""
        deadline = time.monotonic() + 30
        while left := [p for p in below if p.alive()]:
            if time.monotonic() > deadline:
                self.started_below += left  # stopped by identity at the end
                raise AssertionError(f"left running after the stop: {left}")
            time.sleep(0.2)

    def prices(self) -> dict[str, object]:
        """``/api/v1/prices`` (empty while it does not answer 200)."""
        try:
            r = httpx.get(f"{self.url}/api/v1/prices", timeout=2)
            body: dict[str, object] = r.json() if r.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return {}
        return body

    def wait_prices(self, timeout_s: float) -> dict[str, object]:
        """Until the current run serves a price of SOL, BTC and ETH; asserts it does within
        ``timeout_s``."""
        started = time.monotonic()
        prices = self.prices()
        while not {"SOL", "BTC", "ETH"} <= set(prices) and time.monotonic() - started < timeout_s:
            assert self.proc.poll() is None, self.output()
            time.sleep(0.25)
            prices = self.prices()
        assert {"SOL", "BTC", "ETH"} <= set(prices), \
            f"no prices within {timeout_s} s\n{self.output()}"
        return prices

    def cli(self, *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO,
                              env=self.env, capture_output=True, text=True, timeout=timeout_s)

    def stop_all(self) -> None:
        """Whatever still runs: a clean stop of a live run (takes its Ray down whole), else a
        kill; then the processes of the killed run that are left, by identity."""
        for proc in reversed(self.runs):
            if proc.poll() is None:
                stop_child(proc, signal.SIGINT, 60)
        for leftover in self.started_below:
            stop_process(leftover)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """``shardex up`` started, serving prices within START_BUDGET_S."""
    platform = Up(tmp_path_factory.mktemp("up"))
    try:
        started = time.monotonic()
        platform.start()
        platform.wait_prices(START_BUDGET_S)
        print(f"\nshardex up serving prices after {time.monotonic() - started:.1f} s")
        yield platform
    finally:
        platform.stop_all()


# ----------------------------------------------------------------------------- 1. serving
@pytest.mark.timeout(300)
def test_up_serves_prices_reports_status_and_audit(up: Up) -> None:
    """One banner, prices served, ``status`` and ``audit --json`` from other processes."""
    assert {"SOL", "BTC", "ETH"} <= set(up.prices()), up.output()
    out = up.output()
    assert out.count("shardex is up") == 1 and up.url in out
    assert "feed source: sim" in out and "shard-SOL-0" in out

    # HOST is 127.0.0.1: nothing the platform started listens on another interface (Serve's
    # replica started its inter-deployment gRPC server, which unpickles requests, on [::])
    listening = listening_addresses([up.proc.pid, *(p.pid for p in descendants(up.proc.pid))])
    assert any(port == up.port and loopback(address) for address, port in listening), listening
    exposed = {address: Path(f"/proc/{pid}/comm").read_text().strip()
               for address, pid in listening.items() if not loopback(address[0])}
    assert not exposed, exposed

    status = up.cli("status")
    assert status.returncode == 0, status.stdout + status.stderr
    for name in ("shard-SOL-0", "shard-BTC-0", "shard-ETH-0"):
        assert name in status.stdout
    assert "tick_age=" in status.stdout and "feed: node" in status.stdout
    assert "\napi: running, replicas running=1\n" in status.stdout, status.stdout
    # the feed's drops by reason (the sim source sends none: "none" until one is dropped)
    assert re.search(r"dropped: (none|[a-z_]+=\d+)", status.stdout), status.stdout
    # a reader that went away (`shardex status | head -1`): a quiet exit, no stack trace
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        cut = subprocess.run([sys.executable, "-m", "cluster.cli", "status"], cwd=REPO,
                             env=up.env, stdout=write_end, stderr=subprocess.PIPE, text=True,
                             timeout=90)
    finally:
        os.close(write_end)
    assert cut.returncode == 128 + signal.SIGPIPE and cut.stderr == "", cut.stderr
    # `up` plays its own source into its broker: a `shardex feed` beside it would be a second
    second = up.cli("feed", timeout_s=30)
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"pid {up.proc.pid} " in second.stderr and "(sim)" in second.stderr, second.stderr

    base = f"{up.url}/api/v1"
    key = httpx.post(f"{base}/accounts", json={}, timeout=10).json()["apiKey"]
    opened = httpx.post(f"{base}/positions/open", timeout=10,
                        headers={"Authorization": f"Bearer {key}"},
                        json={"asset": "BTC", "type": "long", "margin": "25", "leverage": 3})
    assert opened.status_code == 201, opened.text
    up.open_margins["phase 1: BTC long"] = 25_000_000

    audit = up.cli("audit", "--json")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    report = json.loads(audit.stdout.strip().splitlines()[-1])
    assert report["ok"] is True and report["totals"]["sum_micros"] == 0
    assert report["totals"]["users_margin_micros"] == 25_000_000


def _price_times(url: str) -> dict[str, datetime]:
    """When each asset's price served by ``/api/v1/prices`` was quoted (empty on failure)."""
    try:
        body = httpx.get(f"{url}/api/v1/prices", timeout=2).json()
        return {name: datetime.fromisoformat(p["ts"].replace("Z", "+00:00"))
                for name, p in body.items()}
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return {}


@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_embedded_broker_is_started_again_and_trading_resumes(up: Up) -> None:
    """``kill -9`` of the embedded broker only: ``shardex up`` starts it again on its port, and
    prices quoted after the kill are served and traded on, with no one restarting anything; an
    account stream subscribed before the kill is sent what the account does after it."""
    record_path = up.data_dir / "embedded-broker.json"
    record = json.loads(record_path.read_text())
    broker = ProcessIdentity.from_json(record["broker"])
    assert record["owner"]["pid"] == up.proc.pid and broker.alive(), record
    key = httpx.post(f"{up.url}/api/v1/accounts", json={}, timeout=10).json()["apiKey"]
    with ws_connect(up.url.replace("http://", "ws://") + "/ws", open_timeout=10) as stream:
        stream.send(json.dumps({"method": "AUTH", "params": [key]}))
        stream.send(json.dumps({"method": "SUBSCRIBE", "params": ["account"]}))
        assert _next_account_frame(stream, time.monotonic() + 10)["event"] == "snapshot"

        before_kill = datetime.now()  # local and naive, as Ray's worker logs stamp it
        os.kill(broker.pid, signal.SIGKILL)
        killed_at = datetime.now(UTC)
        killed = time.monotonic()
        while not any(t > killed_at for t in _price_times(up.url).values()):
            # until then every price served is older than the kill: a dead broker's
            assert time.monotonic() - killed < BROKER_RESTART_BUDGET_S, \
                f"no price quoted after the broker was killed\n{up.output()[-3000:]}"
            assert up.proc.poll() is None, up.output()
            time.sleep(0.2)
        # and then every asset's: a read that failed, or that left an asset out (its shard not
        # answering), holds no such price (all() over them was true of an empty answer)
        while not ((times := _price_times(up.url)).keys() >= {"SOL", "BTC", "ETH"}
                   and all(t > killed_at for t in times.values())):
            assert time.monotonic() - killed < BROKER_RESTART_BUDGET_S, times
            time.sleep(0.2)
        resumed_s = time.monotonic() - killed
        print(f"\nprices again {resumed_s:.1f} s after the broker's kill -9")

        rewritten = json.loads(record_path.read_text())
        again = ProcessIdentity.from_json(rewritten["broker"])
        assert again.pid != broker.pid and again.alive() and not broker.alive()
        assert rewritten["source"] == record["source"] == "sim"  # a feed beside it is refused
        assert again.cmdline == broker.cmdline  # the same port, the same memory-only broker
        assert f"exited (code -{int(signal.SIGKILL)}): starting it again" in up.output()
        opened = httpx.post(f"{up.url}/api/v1/positions/open", timeout=10,
                            headers={"Authorization": f"Bearer {key}"},
                            json={"asset": "ETH", "type": "short", "margin": "30", "leverage": 2})
        assert opened.status_code == 201, opened.text
        up.open_margins["phase 1: ETH short after the broker's restart"] = 30_000_000
        assert datetime.fromisoformat(
            opened.json()["openedAt"].replace("Z", "+00:00")) > killed_at
        sent = time.monotonic()
        deadline = sent + ACCOUNT_EVENT_BUDGET_S
        frame = _next_account_frame(stream, deadline)
        while frame["event"] != "positionOpened":  # (the balance comes first)
            frame = _next_account_frame(stream, deadline)
        assert frame["positionId"] == opened.json()["positionId"], frame
        print(f"positionOpened on the account stream {time.monotonic() - sent:.2f} s after the 201")
    # the API replica's own warnings are written to its log: its account topic reader's Kafka
    # client logged losing this broker (Serve's stderr redirect dropped them before). Which line
    # it logs depends on what the client was doing at the kill: a request in flight names the
    # broker's address ("Connection at 127.0.0.1:PORT closed"), an idle connection only the
    # refused reconnect ("Unable connect to node with id N"); either is stamped after the kill.
    deadline = time.monotonic() + ACCOUNT_EVENT_BUDGET_S
    while not (lines := _replica_kafka_lines_since(before_kill, up.mark)):
        assert time.monotonic() < deadline, "no API replica log has a Kafka line after the kill"
        time.sleep(0.2)
    assert any(f"127.0.0.1:{up.broker_port}" in line or "Unable connect to node" in line
               for line in lines), lines[:10]


LOG_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ aiokafka")


def _replica_kafka_lines_since(since: datetime, mark: str) -> list[str]:
    """The ``aiokafka`` lines stamped at or after ``since`` (local, naive) in the ``.err`` logs
    under Ray's session directories of the API replicas whose environment holds ``mark`` (a
    worker's log is named ``worker-<id>-<job>-<pid>.err``): a replica of another test's Ray
    logs its own Kafka client's losses."""
    floor = since.replace(microsecond=since.microsecond // 1000 * 1000)
    pids = {str(process.pid) for process in ray_processes(mark)}
    found = []
    for path in Path("/tmp/ray").glob("session_*/logs/worker-*.err"):
        if path.stem.rsplit("-", 1)[-1] not in pids:
            continue
        with contextlib.suppress(OSError):
            content = path.read_text(errors="replace")
            if ":actor_name:ServeReplica:" not in content[:300]:
                continue
            for line in content.splitlines():
                stamp = LOG_STAMP.match(line)
                if stamp and datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f") >= floor:
                    found.append(line)
    return found


def _next_account_frame(stream: Any, deadline: float) -> dict[str, Any]:
    """The data of ``stream``'s next ``account`` frame, by ``deadline`` (``time.monotonic``; an
    error frame fails the test)."""
    while True:
        try:
            got = json.loads(stream.recv(timeout=max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            raise AssertionError("no account frame in time") from None
        assert "error" not in got, got
        if got.get("stream") == "account":
            data: dict[str, Any] = got["data"]
            return data


# ----------------------------------------------------------------------------- 2. kill -9
def _account_frames(url: str, key: str, count: int, since: int | None = None
                    ) -> list[dict[str, Any]]:
    """The first ``count`` frames of ``key``'s account stream (after ``since``)."""
    request: dict[str, Any] = {"method": "SUBSCRIBE", "params": ["account"]}
    if since is not None:
        request["since"] = since
    frames: list[dict[str, Any]] = []
    with ws_connect(url.replace("http://", "ws://") + "/ws", open_timeout=10) as ws:
        ws.send(json.dumps({"method": "AUTH", "params": [key]}))
        ws.send(json.dumps(request))
        while len(frames) < count:
            frames.append(_next_account_frame(ws, time.monotonic() + 10))
    return frames


def _serving_with(url: str, key: str, position_id: str) -> dict[str, object] | None:
    """The account's state once /healthz answers 200 and the position is in it, else None."""
    try:
        with httpx.Client(base_url=url, timeout=2) as client:
            if client.get("/healthz").status_code != 200:
                return None
            state = client.get("/api/v1/state", headers={"Authorization": f"Bearer {key}"})
            if state.status_code != 200:
                return None
            body: dict[str, object] = state.json()
    except (httpx.HTTPError, ValueError):
        return None
    positions = body.get("positions") or []
    assert isinstance(positions, list)
    return body if any(p.get("positionId") == position_id for p in positions) else None


@pytest.mark.timeout(420)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_up_serves_again_within_30_s_after_kill_9_with_clients_connected(up: Up) -> None:
    """``kill -9`` of ``shardex up`` alone with clients connected; the next ``shardex up``
    serves within 30 s of the kill with every acknowledged change, and nothing the killed run
    started outlives it for long."""
    first = up.proc
    assert first.poll() is None, up.output()
    port, data_dir = up.port, up.data_dir
    # a client with a keep-alive connection open, and an acknowledged position
    client = httpx.Client(base_url=up.url, timeout=10)
    account = client.post("/api/v1/accounts", json={})
    assert account.status_code == 201, account.text
    key = account.json()["apiKey"]
    opened = client.post("/api/v1/positions/open", headers={"Authorization": f"Bearer {key}"},
                         json={"asset": "SOL", "type": "long", "margin": "100",
                               "leverage": 5, "clientOrderId": "before-the-crash"})
    assert opened.status_code == 201, opened.text
    position_id = opened.json()["positionId"]
    up.open_margins["phase 2: SOL long opened before the crash"] = 100_000_000
    # an account stream client that saw the events up to this open, then went away
    (snapshot,) = _account_frames(up.url, key, 1)
    assert snapshot["event"] == "snapshot" and snapshot["seq"] == 3  # signup, lock, open
    # and an open it has not seen yet
    unseen = client.post("/api/v1/positions/open", headers={"Authorization": f"Bearer {key}"},
                         json={"asset": "SOL", "type": "short", "margin": "10",
                               "leverage": 2})
    assert unseen.status_code == 201, unseen.text
    up.open_margins["phase 2: SOL short opened before the crash"] = 10_000_000
    idle = socket.create_connection(("127.0.0.1", port))  # a second client, idle
    idle.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert idle.recv(1 << 16).startswith(b"HTTP/1.1 200")
    # and one the server closes after its answer (an HTTP/1.0 client, curl -0)
    once = socket.create_connection(("127.0.0.1", port))
    once.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
    while once.recv(1 << 16):
        pass
    once.close()

    candles = client.get("/api/v1/klines", params={"asset": "SOL", "interval": "1m",
                                                   "limit": 1000})
    assert candles.status_code == 200 and candles.json()["klines"], candles.text
    before_kill = candles.json()["klines"]

    record = json.loads((data_dir / "embedded-broker.json").read_text())
    broker = ProcessIdentity.from_json(record["broker"])
    assert record["owner"]["pid"] == first.pid and broker.alive()
    assert json.loads((data_dir / "ray-address.json").read_text())["pid"] == first.pid
    started_below = descendants(first.pid)
    up.started_below += started_below
    assert broker in started_below

    broker_log = data_dir / "embedded-broker.log"
    logged = broker_log.read_text()  # this run's broker output, after earlier runs' and starts'
    assert f"listening on: tcp://{record['bootstrap']}" in logged, logged[-2000:]
    first.send_signal(signal.SIGKILL)  # only the shardex process itself
    first.wait(10)
    killed = time.monotonic()
    # the idle client learns of the crash when the server's side closes, as a browser does
    idle.settimeout(30)
    while idle.recv(1 << 16):  # the rest of its last answer, then the end
        pass
    idle.close()
    client.close()

    second = up.start()
    state = None
    while time.monotonic() - killed < GIVE_UP_S and state is None:
        assert second.poll() is None, up.output()
        state = _serving_with(up.url, key, position_id)
        if state is None:
            time.sleep(0.2)
    restart_s = time.monotonic() - killed
    print(f"\nrestart after kill -9: serving with the position after {restart_s:.1f} s")
    assert state is not None, up.output()
    balances = state["balances"]
    assert isinstance(balances, dict)
    assert balances["margin"] == "110.000000" and balances["free"] == "9890.000000"

    # what the killed run started is gone: the broker at once (it dies with its parent),
    # and what its Ray left running, ended by the restart: workers (actors, the API replica)
    # noticed their raylet's end only a moment later, Ray's two node agents about two
    # minutes later, and the dashboard agent held Ray's fixed agent port meanwhile, which
    # the new Ray's agent retried for 3-4 s, then ran without
    assert not broker.alive(), "the old broker outlived its shardex up"
    # its output stays in DATA_DIR, followed by the new broker's (no temp file per crash)
    after = broker_log.read_text()
    assert after.startswith(logged) and after[len(logged):].count("tansu broker") == 1, \
        after[len(logged) - 500:]
    lingering = [p for p in started_below if p.alive()]
    assert not lingering, [(p.pid, p.cmdline[:1]) for p in lingering]
    assert "processes the killed run's Ray left running" in up.output(), up.output()
    session = json.loads((data_dir / "ray-address.json").read_text())["ray_session_dir"]
    agent_log = (Path(session) / "logs" / "dashboard_agent.log").read_text()
    assert "failed to bind" not in agent_log.lower(), agent_log[-2000:]
    # the simulated market goes on from the prices the shards saw last, not from the walk's
    # start (a jump no market made)
    deadline = time.monotonic() + 30
    while up.output().count("shardex is up") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    banner = up.output().rsplit("shardex is up", 1)[-1]
    resumed = re.search(r"feed source: sim \(continuing from SOL ([0-9.]+)[,)]", banner)
    assert resumed is not None, banner
    last_close = Decimal(before_kill[-1]["close"])
    assert abs(Decimal(resumed[1]) - last_close) < last_close / 100, (resumed[1], last_close)
    # the retried open is answered from the journal, not opened twice
    again = httpx.post(f"{up.url}/api/v1/positions/open", timeout=10,
                       headers={"Authorization": f"Bearer {key}"},
                       json={"asset": "SOL", "type": "long", "margin": "100",
                             "leverage": 5, "clientOrderId": "before-the-crash"})
    assert again.status_code == 201 and again.json()["positionId"] == position_id
    # the account stream resumes after the seq the client saw: the open before the crash it
    # missed, then a change made after the restart, each once, numbered on
    deadline = time.monotonic() + 30
    while True:  # a change needs a fresh price: the feed's first ticks after the restart
        changed = httpx.post(f"{up.url}/api/v1/positions/modify", timeout=10,
                             headers={"Authorization": f"Bearer {key}"},
                             json={"positionId": position_id, "takeProfit": "1000"})
        if changed.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert changed.status_code == 200, changed.text
    resumed = _account_frames(up.url, key, 3, since=snapshot["seq"])
    assert [(f["seq"], f["event"]) for f in resumed] == [
        (4, "balance"), (5, "positionOpened"), (6, "positionUpdated")], resumed
    assert resumed[1]["positionId"] == unseen.json()["positionId"]
    assert resumed[2]["positionId"] == position_id
    assert resumed[2]["takeProfit"] == changed.json()["takeProfit"]
    # every candle served before the kill is still served: a closed one unchanged, the one
    # that was current with its open and at least its ticks
    after = httpx.get(f"{up.url}/api/v1/klines", timeout=10,
                      params={"asset": "SOL", "interval": "1m", "limit": 1000})
    assert after.status_code == 200, after.text
    by_start = {c["start"]: c for c in after.json()["klines"]}
    for candle in before_kill:
        now = by_start.get(candle["start"])
        assert now is not None, (candle, after.text)
        if candle["closed"]:
            assert now == candle
        else:
            assert now["open"] == candle["open"] and now["ticks"] >= candle["ticks"]

    # the second run's banner says where its start went (a failure names the slow phase)
    phases = [line.strip() for line in up.output().splitlines() if "started in" in line]
    assert restart_s < RESTART_BUDGET_S, (round(restart_s, 1), phases[-1:])


# ----------------------------------------------------------------------------- 3. Ctrl-C
@pytest.mark.timeout(300)
def test_up_stops_cleanly_on_ctrl_c_and_its_state_audits_offline(up: Up) -> None:
    """Ctrl-C: exit 0, ``shardex: stopped``, its records gone from DATA_DIR, the API port free
    again; ``audit --offline`` of the journaled state is clean with every open position."""
    proc = up.proc
    assert proc.poll() is None, up.output()
    # connections the killed run's server had when it died (phase 2) stay on the API port as
    # the kernel's TIME_WAIT records for 60 s: older than the stop, they are not its doing
    older = {peer for state, peer in tcp_sockets_on(up.port) if state == TCP_TIME_WAIT}
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out = up.output()
    assert code == 0, out
    assert "shardex: stopped" in out.rsplit("shardex is up", 1)[-1], out
    assert not (up.data_dir / "embedded-broker.json").exists()
    assert not (up.data_dir / "ray-address.json").exists()
    # the API port is free again: the stop left nothing on it, no listener, no connection, no
    # TIME_WAIT record. Records older than the stop may remain: they refuse a plain bind until
    # they expire, not one with SO_REUSEADDR (how the API binds), which a listener refuses
    held = tcp_sockets_on(up.port)
    print(f"\nsockets on the API port after the stop: {held} ({len(older)} TIME_WAIT before it)")
    assert all(state == TCP_TIME_WAIT and peer in older for state, peer in held), (held, older)
    with socket.socket() as s:
        if held:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", up.port))
    # the journaled state left in DATA_DIR audits clean offline, with the open positions in it
    offline = up.cli("audit", "--offline", "--json")
    assert offline.returncode == 0, offline.stdout + offline.stderr
    report = json.loads(offline.stdout.strip().splitlines()[-1])
    assert report["ok"] is True
    assert report["totals"]["users_margin_micros"] == sum(up.open_margins.values()), \
        (report["totals"], up.open_margins)


@pytest.mark.timeout(120)
def test_up_refuses_a_data_dir_whose_journal_another_process_holds(up: Up) -> None:
    """After the clean stop: while another process (here this one, as an offline ``shardex
    audit`` does) holds the ledger's journal, ``up`` stops before it starts anything, naming
    that process, instead of failing in the ledger's host with a Ray traceback."""
    from cluster.durability.journal import Journal

    assert up.proc.poll() is not None, "the previous test stops the platform"
    with Journal(up.data_dir / "ledger" / "journal", readonly=True, lock_shared=True):
        refused = up.cli("up", "--broker-port", str(up.broker_port), timeout_s=60)
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0, out
    assert re.search(r"shardex: cannot start: \S+/ledger/journal/LOCK is locked by "
                     rf"pid {os.getpid()} \(", out), out
    assert "Traceback" not in out, out
    assert not (up.data_dir / "ray-address.json").exists()  # nothing was started


# ----------------------------------------------------------------------------- 4. SIGTERM to all
@pytest.mark.timeout(300)
def test_up_stops_on_a_sigterm_to_every_process_it_started(up: Up) -> None:
    """SIGTERM to the process group of ``shardex up`` (``kill -TERM -- -PGID``) and to every
    process below it, as systemd's default ``KillMode=control-group`` stops a unit: Ray's GCS
    and raylet share the group and exit at once, so the stop must not spend its API budget
    waiting for replicas that can no longer answer. Exit 0, ``shardex: stopped``, its records
    gone, every process it started gone, and the state audits clean offline."""
    assert up.proc.poll() is not None, "the previous tests stop the platform"
    run = up.start(new_session=True)
    up.wait_prices(START_BUDGET_S)
    while "shardex is up" not in up.output().rsplit("shardex: stopped", 1)[-1]:
        assert run.poll() is None, up.output()  # signal handlers are its own once it says so
        time.sleep(0.1)
    below = descendants(run.pid)
    assert below, "shardex up started no process"
    rays_before = ray_processes(up.mark)
    os.killpg(run.pid, signal.SIGTERM)
    for process in below:  # the workers and the broker, in groups of their own
        with contextlib.suppress(ProcessLookupError):
            if process.alive():
                os.kill(process.pid, signal.SIGTERM)
    code = up.wait_exit(run, 60)
    out = up.output().rsplit("shardex is up", 1)[-1]
    assert code == 0, out
    assert "shardex: stopped" in out, out
    assert "did not stop within" not in out, out
    assert "Ray's own processes got the stop signal too" in out, out
    assert not (up.data_dir / "embedded-broker.json").exists()
    assert not (up.data_dir / "ray-address.json").exists()
    up.wait_gone(below)
    # nor did the stop start a Ray again (Serve's client calls ray.init when it finds none)
    started = [p for p in ray_processes(up.mark) - rays_before if p.alive()]
    up.started_below += started
    assert not started, f"Ray processes started during the stop: {started}"
    offline = up.cli("audit", "--offline", "--json")
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert json.loads(offline.stdout.strip().splitlines()[-1])["ok"] is True


def run_until(up: Up, reached: Callable[[subprocess.Popen[str], Path], bool],
              what: str) -> tuple[subprocess.Popen[str], int, Path]:
    """A new run of ``up``, in a session of its own, once ``reached(run, its record of its
    Ray)``: ``(run, where its output starts in the log, that record)``."""
    assert up.proc.poll() is not None, "the previous tests stop the platform"
    logged = len(up.output())
    address = up.data_dir / "ray-address.json"
    run = up.start(new_session=True)
    deadline = time.monotonic() + START_BUDGET_S
    while not reached(run, address):
        assert run.poll() is None, up.output()[logged:]
        assert time.monotonic() < deadline, f"no {what}: " + up.output()[logged:]
        time.sleep(0.02)
    return run, logged, address


def started_to_ray(up: Up) -> tuple[subprocess.Popen[str], int, Path]:
    """A new run once its Ray is up (its record written, right after its ray.init)."""
    return run_until(up, lambda _run, address: address.exists(), "Ray started")


def stopped_cleanly(up: Up, run: subprocess.Popen[str], logged: int, address: Path,
                    below: list[ProcessIdentity]) -> str:
    """``run``, sent a stop signal, exits 0 with ``shardex: stopped`` and no traceback, its
    records (``address``, the broker's) gone, and every process of ``below`` gone; its output
    (from ``logged`` on)."""
    code = up.wait_exit(run, 120)
    out = up.output()[logged:]
    assert code == 0, out
    assert "shardex: stopped" in out, out
    assert "Traceback" not in out, out
    assert not address.exists()
    assert not (up.data_dir / "embedded-broker.json").exists()
    up.wait_gone(below)
    return out


# ----------------------------------------------------------------- 5. SIGTERM during a start
@pytest.mark.timeout(300)
def test_up_stops_on_a_sigterm_during_its_start(up: Up) -> None:
    """A SIGTERM once the run's Ray is up and before it serves (ray.init installs a handler of
    its own that exits at once, with 15): the run stops as a SIGTERM after the start stops it,
    exit 0, ``shardex: stopped``, its records gone, nothing it started left running."""
    run, logged, address = started_to_ray(up)
    assert "shardex is up" not in up.output()[logged:]  # still starting
    below = descendants(run.pid)
    run.send_signal(signal.SIGTERM)
    stopped_cleanly(up, run, logged, address, below)


# ---------------------------------------------------- 6. SIGTERM to the group during a start
@pytest.mark.timeout(300)
def test_up_stops_on_a_sigterm_to_its_group_during_its_start(up: Up) -> None:
    """A SIGTERM to the process group while the run starts reaches Ray's own processes too:
    the Ray call the start waits in then waited 60 s for the GCS and ended the process with
    exit 1, its records left. The start is given up where it is, as a stop after the start
    gives up Ray's actors: exit 0, ``shardex: stopped``, its records gone, what it started
    gone, and the next start needs no hand work."""
    run, logged, address = started_to_ray(up)
    time.sleep(1.0)  # (into the start of its hosts)
    assert "shardex is up" not in up.output()[logged:]  # still starting
    below = descendants(run.pid)
    os.killpg(run.pid, signal.SIGTERM)
    out = stopped_cleanly(up, run, logged, address, below)
    assert "Failed to connect to GCS" not in out, out
    again = up.start()
    up.wait_prices(START_BUDGET_S)
    again.send_signal(signal.SIGINT)
    assert up.wait_exit(again, 60) == 0, up.output()[logged:]


# ------------------------------------------------ 7. a stop signal within the start's ray.init
def within_ray_init(up: Up) -> tuple[subprocess.Popen[str], int, Path]:
    """A new run while its ray.init runs: Ray's raylet, a child of the run started once Ray's
    GCS listens, is up; the run's record of its Ray, written after ray.init, is not."""

    def reached(run: subprocess.Popen[str], address: Path) -> bool:
        assert not address.exists(), "the run's ray.init ended first"
        return any(p.cmdline and Path(p.cmdline[0]).name == "raylet"
                   for p in descendants(run.pid))

    return run_until(up, reached, "raylet started")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("to_group", [False, True], ids=["to_it", "to_its_group"])
def test_up_stops_on_a_sigterm_within_its_ray_init(up: Up, to_group: bool) -> None:
    """ray.init installed a SIGTERM handler of its own for its whole call, which ended the
    run with exit 15 and no stop (to the run alone: once ray.init's call returned; to its
    group, which Ray's processes share: up to 30 s later, once the call ray.init waited in gave
    up). The run now stops as after any stop signal during its start: exit 0, ``shardex:
    stopped``, its records gone, nothing it started left running."""
    run, logged, address = within_ray_init(up)
    below = descendants(run.pid)
    if to_group:
        os.killpg(run.pid, signal.SIGTERM)
    else:
        run.send_signal(signal.SIGTERM)
    stopped_cleanly(up, run, logged, address, below)
