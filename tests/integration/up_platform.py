"""A real ``shardex up`` process for black-box tests, and what they use to reach it.

:class:`UpPlatform` runs ``shardex up`` as a process (durable: journaled ledger and shards under
``<root>/data``, its own embedded broker on a free loopback port, the API on a free port,
``FEED_SOURCE=none``), with a :class:`Ticker` writing the test's prices to the market data topic;
``kill_9`` and ``stop`` end it by pid, and only the processes it started. :class:`Account` is a
client with an API key; :func:`books_balance` compares an account's balances with its positions
and history.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from engine.assets import AssetRegistry
from feed.broker import ProcessIdentity
from feed.broker import free_ports
from feed.broker import stop_process
from feed.message import MarketDataMessage
from feed.message import message_from_ticks
from tests.integration.processes import descendants

REPO = Path(__file__).resolve().parents[2]
SIGNUP = Decimal(10_000)  # SIGNUP_BALANCE's default
TICK_INTERVAL_S = 0.25


def now_us() -> int:
    return time.time_ns() // 1000


# ----------------------------------------------------------------------------- prices
class Ticker:
    """Produces ``prices`` (``{asset: (bid, ask)}``, read again every round: a test may change
    them) every TICK_INTERVAL_S (fresh ``ts_us``, rising ``seq``) from a thread of its own;
    ``publish`` sends one message of the test's."""

    def __init__(self, bootstrap: str, assets: AssetRegistry,
                 prices: Mapping[str, tuple[str, str]]) -> None:
        from feed.producer import MarketDataProducer

        self.assets = assets
        self.prices = dict(prices)
        self.seq = itertools.count(1)
        self.running = threading.Event()
        self.running.set()
        self._stop = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ticker",
                                        daemon=True)
        self._thread.start()
        self.producer = MarketDataProducer(bootstrap, assets, request_timeout_ms=3000)
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self._loop)

    async def _run(self) -> None:
        await self.producer.start()
        while not self._stop:
            if self.running.is_set():
                with contextlib.suppress(Exception):  # the broker may be down: retried
                    for name, (bid, ask) in list(self.prices.items()):
                        asset = self.assets[name]
                        await self.producer.publish(message_from_ticks(
                            asset, asset.price_to_ticks(bid), asset.price_to_ticks(ask),
                            now_us(), next(self.seq), "test"))
                    await asyncio.wait_for(self.producer.flush(), 5.0)
            await asyncio.sleep(TICK_INTERVAL_S)

    def publish(self, msg: MarketDataMessage) -> None:
        async def send() -> None:
            await self.producer.publish(msg)
            await asyncio.wait_for(self.producer.flush(), 10.0)

        asyncio.run_coroutine_threadsafe(send(), self._loop).result(30)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.running.clear()
        time.sleep(2 * TICK_INTERVAL_S)  # a send in progress ends
        try:
            yield
        finally:
            self.running.set()

    def stop(self) -> None:
        self._stop = True
        with contextlib.suppress(Exception):
            self._task.result(10)
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.producer.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


# ----------------------------------------------------------------------------- the platform
def journals_held(data_dir: Path) -> bool:
    """Whether some process still locks a journal under ``data_dir``."""
    for lock in data_dir.glob("*/journal/LOCK"):
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
    return False


class UpPlatform:
    """``shardex up`` as a process, with the ticker feeding it ``prices`` (``{asset: (bid,
    ask)}``; the assets traded). ``env`` adds to or overrides its environment; with
    ``own_process_group`` it leads a process group of its own (see :meth:`kill_9`)."""

    def __init__(self, root: Path, assets: AssetRegistry, prices: Mapping[str, tuple[str, str]],
                 env: Mapping[str, str] | None = None, own_process_group: bool = False) -> None:
        self.root = root
        self.assets = assets
        self.prices = dict(prices)
        self.data_dir = root / "data"
        # two ports picked apart could be the same one (1 in 10,000: it happened)
        self.port = free_ports(2)
        self.broker_port = self.port + 1
        self.url = f"http://127.0.0.1:{self.port}"
        self.bootstrap = f"127.0.0.1:{self.broker_port}"
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "PORT": str(self.port),
                    "FEED_SOURCE": "none", "DATA_DIR": str(self.data_dir),
                    "ASSETS": ",".join(self.prices),
                    "SIGNUPS_PER_MIN": "0", "API_KEY_RATE_PER_S": "0", "PUBLIC_RATE_PER_S": "0",
                    **(env or {})}
        for name in ("RAY_ADDRESS", "KAFKA_BROKERS"):
            self.env.pop(name, None)
        self.own_process_group = own_process_group
        self.log = root / "up.log"
        self.proc: subprocess.Popen[str] | None = None
        self.started_below: list[ProcessIdentity] = []
        self.ticker: Ticker | None = None
        self.milestones: dict[str, float] = {}

    # -- lifetime
    def start(self, budget_s: float) -> float:
        """Start ``shardex up``; returns the seconds until it served (healthz 200 and a price
        of every asset); ``milestones["healthz"]`` is the seconds until healthz first answered
        200."""
        started = time.monotonic()
        self.milestones = {}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "up", "--broker-port", str(self.broker_port)],
            cwd=REPO, env=self.env, stdout=self.log.open("a"), stderr=subprocess.STDOUT,
            text=True, start_new_session=self.own_process_group)
        if self.ticker is None:
            self.ticker = Ticker(self.bootstrap, self.assets, self.prices)
        while time.monotonic() - started < budget_s:
            assert self.proc.poll() is None, self.log.read_text()[-4000:]
            healthy, priced = self._poll()
            if healthy and "healthz" not in self.milestones:
                self.milestones["healthz"] = time.monotonic() - started
            if healthy and priced:
                return time.monotonic() - started
            time.sleep(0.2)
        raise AssertionError(f"not serving within {budget_s} s\n{self.log.read_text()[-4000:]}")

    def _poll(self) -> tuple[bool, bool]:
        """(/healthz answers 200, /api/v1/prices has a price of every asset)."""
        try:
            with httpx.Client(base_url=self.url, timeout=3) as client:
                if client.get("/healthz").status_code != 200:
                    return False, False
                prices = client.get("/api/v1/prices")
                if prices.status_code != 200:
                    return True, False
                body = prices.json()
        except (httpx.HTTPError, ValueError):
            return False, False
        return True, all(name in body for name in self.prices)

    def serving(self) -> bool:
        """Whether /healthz answers 200 and /api/v1/prices has a price of every asset."""
        return all(self._poll())

    @property
    def tick(self) -> Ticker:
        assert self.ticker is not None
        return self.ticker

    def kill_9(self) -> dict[str, float]:
        """SIGKILL the ``shardex up`` process (its whole process group with
        ``own_process_group``) and the broker it recorded as its own; wait until its actor
        processes let go of the journals. Returns timings."""
        assert self.proc is not None
        record = json.loads((self.data_dir / "embedded-broker.json").read_text())
        broker = ProcessIdentity.from_json(record["broker"])
        assert record["owner"]["pid"] == self.proc.pid, record  # the broker is ours
        self.started_below += descendants(self.proc.pid)
        assert broker in self.started_below
        killed = time.monotonic()
        if self.own_process_group:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this process leads
        else:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        stop_process(broker)
        while journals_held(self.data_dir) and time.monotonic() - killed < 60:
            time.sleep(0.1)
        released = time.monotonic() - killed
        assert not journals_held(self.data_dir), "journals still locked 60 s after kill -9"
        return {"journals_released_s": released}

    def stop(self) -> None:
        if self.ticker is not None:  # first: it would only retry against a stopped broker
            self.ticker.stop()
            self.ticker = None
        if self.proc is not None and self.proc.poll() is None:
            self.started_below += descendants(self.proc.pid)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        for leftover in self.started_below:  # only processes of our runs, by identity
            stop_process(leftover)

    # -- views
    def cli(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO,
                              env=self.env, capture_output=True, text=True, timeout=timeout_s)

    def audit(self, *flags: str) -> dict[str, Any]:
        """``shardex audit --json`` (plus ``flags``); asserts exit 0 and a clean report."""
        done = self.cli("audit", "--json", *flags)
        assert done.returncode == 0, done.stdout + done.stderr
        report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["ok"] is True and report["totals"]["sum_micros"] == 0, report
        return report

    def wait_prices(self, timeout_s: float = 10.0) -> None:
        """Until every shard's last tick is the ticker's (a case before may have left another
        one in a shard for a moment)."""
        deadline = time.monotonic() + timeout_s
        body: Any = None
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                body = httpx.get(f"{self.url}/api/v1/prices", timeout=3).json()
                if all((body[a]["bid"], body[a]["ask"]) == p
                       for a, p in self.tick.prices.items()):
                    return
            assert time.monotonic() < deadline, f"prices are not the ticker's: {body}"
            time.sleep(0.1)


# ----------------------------------------------------------------------------- HTTP helpers
class Account:
    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=30)
        created = self.client.post("/api/v1/accounts", json={})
        assert created.status_code == 201, created.text
        self.key = created.json()["apiKey"]
        self.headers = {"Authorization": f"Bearer {self.key}"}

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return self.client.post(path, json=body, headers=self.headers)

    def get(self, path: str) -> Any:
        r = self.client.get(path, headers=self.headers)
        assert r.status_code == 200, r.text
        return r.json()

    def open(self, **body: Any) -> dict[str, Any]:
        r = self.post("/api/v1/positions/open", body)
        assert r.status_code == 201, r.text
        out: dict[str, Any] = r.json()
        return out

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = self.get("/api/v1/state")
        return out

    def history(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        before = ""
        while True:
            page = self.get(f"/api/v1/positions/history?limit=500{before}")["positions"]
            out += page
            if len(page) < 500:
                return out
            before = f"&before={page[-1]['closeId']}"  # SPEC: history pages by closeId

    def close(self) -> None:
        self.client.close()


def books_balance(account: Account) -> list[str]:
    """Differences between the account's balances and what its positions, orders and history
    say: margin = the open positions' and open orders' margins; free + margin = signup +
    sum(payout - margin) over the closes."""
    state = account.state()
    history = account.history()
    orders = account.get("/api/v1/orders")["orders"]
    free, margin = Decimal(state["balances"]["free"]), Decimal(state["balances"]["margin"])
    open_margin = sum((Decimal(p["margin"]) for p in [*state["positions"], *orders]),
                      Decimal(0))
    settled = sum((Decimal(c["payout"]) - Decimal(c["margin"]) for c in history), Decimal(0))
    problems = []
    if margin != open_margin:
        problems.append(f"margin {margin} != open positions' and orders' {open_margin}")
    if free + margin != SIGNUP + settled:
        problems.append(f"free {free} + margin {margin} != {SIGNUP} + settled {settled}")
    return problems
