"""``shardex bench chaos --kills N``: kill -9 the platform's processes under live trading and
count what the clients saw acknowledged but the platform lost or applied twice.

The whole platform runs as in production (cluster.actors.launcher.Platform with ``durable=True``:
local Ray, the ledger and every shard in journaled MachineHost actors under DATA_DIR that Ray
restarts, the feed actor consuming Kafka, the Serve HTTP API), with the embedded broker.
While it runs:

* clients trade over HTTP: sign up, open positions (high leverage, every open with a
  clientOrderId), close some by hand; an answer they did not get (503, connection error,
  timeout) is retried later with the same clientOrderId, and any 2xx is recorded as
  acknowledged;
* a ticker produces a volatile random walk per asset to the topic, so take-profits and
  liquidations fire all the time;
* a killer sends SIGKILL to a random ledger, shard or feed actor process every
  ``--interval`` seconds (Ray restarts it; it recovers from its journal) and waits until the
  new process answers (the ledger host's ``ping``, a shard host's ``Stats`` command, the feed
  actor's ``stats``); and once, half way, to every process of the platform at the same time
  (Ray's GCS, raylet, workers, Serve); the platform is then started again on the same
  DATA_DIR, as ``shardex up`` would be.

Afterwards, from the public API and the ledger: every acknowledged open is either open or in
the history, every acknowledged close is in the history once, no position is in the history
twice or both open and closed, no clientOrderId answered two different positions, each
account's balances equal its signup money plus what its history paid out, and the audit
(ledger sums to 0, margins equal open positions) passes. ``lost`` and ``duplicated`` must be 0.

Prints a table, then one JSON line last. ``tests/integration/test_chaos.py`` runs the same
harness with fewer kills.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from bench.options import asset_list, duration, duration_or_zero, integer, nonneg_int, positive_int
from cluster.actors.launcher import Platform
from cluster.actors.names import FEED, LEDGER
from cluster.config import MARKET_TOPIC, Settings
from engine.assets import DEFAULT_ASSETS
from engine.ledger import AuditDifference
from engine.shard_machine import LastTick, Stats
from feed.broker import free_port
from feed.message import message_from_ticks

log = logging.getLogger(__name__)

SIGNUP_USD = Decimal(10_000)
RETRYABLE = (httpx.TransportError, httpx.TimeoutException)


@dataclass
class ChaosConfig:
    kills: int = 100  # single-process kills (the whole-platform kill comes on top)
    interval_s: float = 2.0  # between kills
    clients: int = 4
    assets: tuple[str, ...] = ("SOL", "BTC")
    whole_platform_kill: bool = True
    seed: int = 1
    settle_s: float = 4.0  # trading after the last kill, before the checks
    data_dir: Path | None = None
    bootstrap: str | None = None  # None: start an embedded broker


@dataclass
class ClientBook:
    """What one client was told (the truth the platform is checked against)."""

    name: str
    headers: dict[str, str] = field(default_factory=dict)
    open_ids: set[str] = field(default_factory=set)  # acked opens not known to be closed
    acked_opens: dict[str, str] = field(default_factory=dict)  # positionId -> clientOrderId
    acked_closes: set[str] = field(default_factory=set)
    answers: dict[str, str] = field(default_factory=dict)  # clientOrderId -> positionId
    unknown_opens: dict[str, dict[str, Any]] = field(default_factory=dict)  # coid -> body
    unknown_closes: set[str] = field(default_factory=set)
    conflicting_answers: int = 0


class ChaosRun:
    """One chaos run (see the module docstring); ``run()`` returns the report dict."""

    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.data_dir = config.data_dir or Path(tempfile.mkdtemp(prefix="shardex-chaos-"))
        # a DATA_DIR made here is removed after a run that lost, duplicated and unbalanced
        # nothing; one that did not is kept for a look (its path is printed)
        self._remove_data_dir = config.data_dir is None
        self._clean = False
        self.url = ""
        self.platform: Platform | None = None
        self.books = [ClientBook(f"c{i}") for i in range(config.clients)]
        self.counters: Counter[str] = Counter()
        self.kills: Counter[str] = Counter()
        self.recovery_s: list[float] = []
        self.timings: dict[str, float] = {}
        self.feed_resume_s: list[float] = []
        self.shard_priced_s: list[float] = []  # kill -> the shard's first tick produced after it
        self._feed_kills_us: list[int] = []
        self._stop = threading.Event()  # ticker
        self._clients_stop = threading.Event()
        self._broker: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-clients",
                                        daemon=True)
        self._tasks: list[concurrent.futures.Future[Any]] = []

    # ------------------------------------------------------------------ platform
    def _settings(self) -> Settings:
        assert self.config.bootstrap is not None
        return dataclasses.replace(
            Settings(), assets=DEFAULT_ASSETS.subset(list(self.config.assets)),
            port=free_port(), feed_source="none", kafka_brokers=self.config.bootstrap,
            data_dir=self.data_dir)

    def _start_platform(self) -> None:
        platform = Platform(self._settings(), with_feed=False, bootstrap=self.config.bootstrap,
                            ray_init={"num_cpus": 2}, durable=True)
        platform.start()
        self.platform = platform
        self.url = platform.url
        self.counters["released_at_start_micros"] += sum(platform.released_at_start.values())

    def _actor_pid(self, handle: Any, timeout_s: float = 60.0) -> int:
        """The pid of an actor's worker process once it is alive (from the GCS)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = ray._private.state.actors(handle._actor_id.hex())
            if info and info.get("State") == "ALIVE" and info.get("Pid"):
                return int(info["Pid"])
            time.sleep(0.05)
        raise TimeoutError("the actor did not come back")

    def _kill_one(self) -> None:
        import ray

        assert self.platform is not None
        targets = {LEDGER: self.platform.ledger, FEED: self.platform.feed,
                   **self.platform.shards}
        name = self.rng.choice(sorted(targets))
        handle = targets[name]
        pid = self._actor_pid(handle)
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        killed_us = time.time_ns() // 1000
        self.kills[name if name in (LEDGER, FEED) else "shard"] += 1
        # wait for Ray's restart and the recovery to finish before the next kill
        while time.monotonic() - started < 60.0:
            with contextlib.suppress(ray.exceptions.RayError):
                # a host answers only once it has recovered its machine from the journal
                if name == FEED:
                    ray.get(handle.stats.remote(), timeout=5.0)
                elif name == LEDGER:
                    ray.get(handle.ping.remote(), timeout=5.0)
                else:
                    ray.get(handle.execute.remote([Stats()]), timeout=5.0)
                if self._actor_pid(handle) != pid:
                    break
            time.sleep(0.05)
        self.recovery_s.append(time.monotonic() - started)
        if name == FEED:  # the price watcher times how long until prices are fresh again
            self._feed_kills_us.append(killed_us)
        elif name != LEDGER:  # until the feed gives the shard a price, it opens and sweeps nothing
            while time.monotonic() - started < 60.0:
                with contextlib.suppress(ray.exceptions.RayError):
                    tick = ray.get(handle.execute.remote([LastTick()]), timeout=5.0)[0]
                    if tick is not None and tick.ts_us > killed_us:
                        self.shard_priced_s.append(time.monotonic() - started)
                        break
                time.sleep(0.01)

    def _wait_fresh_prices(self, since_us: int, timeout_s: float = 60.0) -> float:
        """Seconds until /prices shows a tick newer than ``since_us`` for every asset."""
        from datetime import datetime

        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            with contextlib.suppress(*RETRYABLE, ValueError, KeyError):
                prices = httpx.get(self.url + "/api/v1/prices", timeout=5.0).json()
                ts = [datetime.fromisoformat(prices[a]["ts"].replace("Z", "+00:00"))
                      for a in self.config.assets]
                if all(t.timestamp() * 1e6 >= since_us for t in ts):
                    return time.monotonic() - started
            time.sleep(0.1)
        raise TimeoutError(f"no fresh prices within {timeout_s} s")

    def _kill_whole_platform(self) -> None:
        """SIGKILL every process of the Ray session at once, then start again."""
        import ray

        from cluster.actors.deploy import ray_node

        assert self.platform is not None
        self.platform._supervising.set()
        roots: list[int] = []
        node: Any = ray_node()
        for infos in node.all_processes.values():
            roots.extend(info.process.pid for info in infos)
        victims = set(roots)
        for root in roots:
            victims |= _descendants(root)
        victims.discard(os.getpid())
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.kills["whole_platform"] += 1
        started = time.monotonic()
        with contextlib.suppress(Exception):
            ray.shutdown()
        # this process stands for the killed run's driver too: the DATA_DIR lock its end
        # would have let go of is let go of here
        self.platform._release_data_dir()
        self.platform = None
        self.timings["ray_shutdown_s"] = time.monotonic() - started
        self._start_platform()
        self.recovery_s.append(time.monotonic() - started)
        self.timings["platform_restart_s"] = time.monotonic() - started
        self._wait_fresh_prices(time.time_ns() // 1000)
        self.timings["platform_restart_to_fresh_prices_s"] = time.monotonic() - started

    # ------------------------------------------------------------------ traffic
    async def _ticker(self) -> None:
        from feed.producer import MarketDataProducer

        assets = [DEFAULT_ASSETS[a] for a in self.config.assets]
        producer = MarketDataProducer(self.config.bootstrap or "", DEFAULT_ASSETS,
                                      topic=MARKET_TOPIC)
        await producer.start()
        base = {"SOL": Decimal("100.00"), "BTC": Decimal("50000.0"),
                "ETH": Decimal("3000.00")}
        mids = {a.name: float(a.price_to_ticks(str(base[a.name]))) for a in assets}
        rng = random.Random(self.config.seed + 1)
        seq = 0
        try:
            while not self._stop.is_set():
                for a in assets:
                    home = float(a.price_to_ticks(str(base[a.name])))
                    drift = 0.08 * (math.log(home) - math.log(mids[a.name]))
                    mids[a.name] *= math.exp(drift + rng.gauss(0.0, 0.004))
                    bid = max(1, int(mids[a.name]))
                    seq += 1
                    await producer.publish(message_from_ticks(
                        a, bid, bid + 1, time.time_ns() // 1000, seq, "chaos"))
                await producer.flush()
                self.counters["ticks_produced"] += len(assets)
                await asyncio.sleep(0.05)
        finally:
            await producer.stop()

    async def _price_watcher(self) -> None:
        """Time from each feed kill to the first prices newer than it for every asset."""
        from datetime import datetime

        async with httpx.AsyncClient(timeout=5.0) as http:
            while not self._stop.is_set():
                await asyncio.sleep(0.1)
                if not self._feed_kills_us:
                    continue
                with contextlib.suppress(*RETRYABLE, ValueError, KeyError):
                    prices = (await http.get(self.url + "/api/v1/prices")).json()
                    oldest_us = min(
                        datetime.fromisoformat(prices[a]["ts"].replace("Z", "+00:00"))
                        .timestamp() * 1e6 for a in self.config.assets)
                    now_us = time.time_ns() // 1000
                    while self._feed_kills_us and self._feed_kills_us[0] <= oldest_us:
                        self.feed_resume_s.append((now_us - self._feed_kills_us.pop(0)) / 1e6)

    async def _request(self, http: httpx.AsyncClient, method: str, path: str,
                       **kwargs: Any) -> httpx.Response | None:
        try:
            return await http.request(method, self.url + path, **kwargs)
        except RETRYABLE:
            self.counters["transport_errors"] += 1
            await asyncio.sleep(0.25)  # the API is down: do not spin
            return None

    async def _client(self, book: ClientBook, seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(timeout=10.0) as http:
            while not book.headers and not self._clients_stop.is_set():
                r = await self._request(http, "POST", "/api/v1/accounts", json={})
                if r is not None and r.status_code == 201:
                    book.headers = {"Authorization": f"Bearer {r.json()['apiKey']}"}
                else:
                    await asyncio.sleep(0.2)
            n = 0
            while not self._clients_stop.is_set():
                n += 1
                roll = rng.random()
                if book.unknown_opens and roll < 0.15:
                    coid = rng.choice(sorted(book.unknown_opens))
                    await self._open(http, book, coid, book.unknown_opens[coid])
                elif book.unknown_closes and roll < 0.25:
                    await self._close(http, book, rng.choice(sorted(book.unknown_closes)))
                elif len(book.open_ids) < 6 or roll < 0.6:
                    coid = f"{book.name}-o{n}"
                    body = {"asset": rng.choice(self.config.assets),
                            "type": rng.choice(["long", "short"]),
                            "margin": str(rng.randint(5, 40)),
                            "leverage": rng.choice([20, 50, 100]), "clientOrderId": coid}
                    await self._open(http, book, coid, body)
                elif book.open_ids:
                    await self._close(http, book, rng.choice(sorted(book.open_ids)))
                await asyncio.sleep(rng.uniform(0.01, 0.05))

    async def _drain(self, timeout_s: float = 45.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=10.0) as http:
            while time.monotonic() < deadline:
                for book in self.books:
                    for coid, body in sorted(book.unknown_opens.items()):
                        await self._open(http, book, coid, body)
                    for pid in sorted(book.unknown_closes):
                        await self._close(http, book, pid)
                if not any(b.unknown_opens or b.unknown_closes for b in self.books):
                    return
                await asyncio.sleep(1.0)

    async def _open(self, http: httpx.AsyncClient, book: ClientBook, coid: str,
                    body: dict[str, Any]) -> None:
        r = await self._request(http, "POST", "/api/v1/positions/open", json=body,
                                headers=book.headers)
        if r is None or r.status_code >= 500:
            book.unknown_opens[coid] = body
            self.counters["opens_unanswered"] += 1
            self.counters[f"open_{_status(r)}"] += 1
            return
        book.unknown_opens.pop(coid, None)
        if r.status_code != 201:
            self.counters[f"open_{r.status_code}"] += 1
            return
        pid = r.json()["positionId"]
        previous = book.answers.setdefault(coid, pid)
        if previous != pid:
            book.conflicting_answers += 1
        if pid not in book.acked_opens:
            book.acked_opens[pid] = coid
            book.open_ids.add(pid)
            self.counters["opens_acked"] += 1
        else:
            self.counters["open_replays_acked"] += 1

    async def _close(self, http: httpx.AsyncClient, book: ClientBook, pid: str) -> None:
        r = await self._request(http, "POST", "/api/v1/positions/close",
                                json={"positionId": pid, "clientOrderId": f"close-{pid}"},
                                headers=book.headers)
        if r is None or r.status_code >= 500:
            book.unknown_closes.add(pid)
            self.counters["closes_unanswered"] += 1
            self.counters[f"close_{_status(r)}"] += 1
            return
        book.unknown_closes.discard(pid)
        book.open_ids.discard(pid)
        if r.status_code == 200:
            book.acked_closes.add(pid)
            self.counters["closes_acked"] += 1
        else:
            self.counters[f"close_{r.status_code}"] += 1  # 404: a trigger closed it first

    # ------------------------------------------------------------------ checks
    def _get(self, path: str, headers: dict[str, str], **params: Any) -> dict[str, Any]:
        deadline = time.monotonic() + 60.0
        while True:
            with contextlib.suppress(*RETRYABLE):
                r = httpx.get(self.url + path, headers=headers, params=params, timeout=10.0)
                if r.status_code == 200:
                    return dict(r.json())
            if time.monotonic() > deadline:
                raise TimeoutError(f"GET {path} kept failing")
            time.sleep(0.2)

    def _history(self, headers: dict[str, str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        before: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 500}
            if before is not None:
                params["before"] = before
            page = self._get("/api/v1/positions/history", headers, **params)["positions"]
            out.extend(page)
            if len(page) < 500:
                return out
            # the cursor is a close id (a whole close's is its position's id, a partial
            # close's its own): the position id would page wrongly past a partial close
            before = page[-1]["closeId"]

    def _audit(self) -> tuple[list[AuditDifference], dict[str, Any]]:
        from cluster.actors.deploy import service_from_names

        assert self.platform is not None
        service = service_from_names(self.platform.settings, namespace=self.platform.namespace)
        problems, totals = asyncio.run(service.audit(attempts=10, retry_delay_s=0.5))
        return list(problems), dict(totals)

    def _check(self) -> dict[str, Any]:
        lost = duplicated = balance_mismatches = orphan_positions = 0
        reasons: Counter[str] = Counter()
        details: list[str] = []
        history_total = 0
        for book in self.books:
            if not book.headers:
                continue
            state = self._get("/api/v1/state", book.headers)
            history = self._history(book.headers)
            history_total += len(history)
            open_ids = {p["positionId"] for p in state["positions"]}
            closed = Counter(p["positionId"] for p in history)
            reasons.update(p["closeReason"] for p in history)
            twice = [pid for pid, n in closed.items() if n > 1]
            both = open_ids & set(closed)
            duplicated += len(twice) + len(both) + book.conflicting_answers
            details += [f"{book.name}: {pid} closed twice" for pid in twice]
            details += [f"{book.name}: {pid} open and closed" for pid in both]
            for pid in book.acked_opens:
                if pid not in open_ids and pid not in closed:
                    lost += 1
                    details.append(f"{book.name}: acknowledged open {pid} is gone")
            # A position no client was told about can only come from an open whose answer
            # never arrived (still unknown): one each at most. More means a clientOrderId ran
            # twice and the client only heard of one of its positions.
            orphans = (open_ids | set(closed)) - set(book.acked_opens)
            orphan_positions += len(orphans)
            hidden = max(0, len(orphans) - len(book.unknown_opens))
            duplicated += hidden
            if hidden:
                details.append(f"{book.name}: {len(orphans)} positions no answer reported, "
                               f"only {len(book.unknown_opens)} opens unanswered")
            manual = {p["positionId"] for p in history if p["closeReason"] == "manual"}
            for pid in book.acked_closes:
                if pid not in manual:
                    lost += 1
                    details.append(f"{book.name}: acknowledged close {pid} is not in history")
            paid = sum((Decimal(p["payout"]) - Decimal(p["margin"]) for p in history),
                       Decimal(0))
            balances = state["balances"]
            held = Decimal(balances["free"]) + Decimal(balances["margin"])
            if held != SIGNUP_USD + paid:
                balance_mismatches += 1
                details.append(f"{book.name}: free+margin {held} != signup + payouts "
                               f"{SIGNUP_USD + paid}")
            open_margin = sum((Decimal(p["margin"]) for p in state["positions"]), Decimal(0))
            if open_margin != Decimal(balances["margin"]):
                balance_mismatches += 1
                details.append(f"{book.name}: margin {balances['margin']} != open margins "
                               f"{open_margin}")
        problems, totals = self._audit()
        return {"lost": lost, "duplicated": duplicated, "balance_mismatches": balance_mismatches,
                "audit_ok": not problems,
                "audit_differences": [p.text for p in problems[:10]],
                "history_closes": history_total, "close_reasons": dict(reasons),
                "positions_of_unanswered_opens": orphan_positions,
                "ledger_closed_positions": totals.get("closed_positions"),
                "details": details[:20]}

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        if self.config.bootstrap is None:
            from feed.broker import EmbeddedBroker

            self._broker = EmbeddedBroker("127.0.0.1", free_port()).start()
            self.config.bootstrap = self._broker.bootstrap
        try:
            self._start_platform()
            self._thread.start()
            self._tasks.append(asyncio.run_coroutine_threadsafe(self._ticker(), self._loop))
            self._tasks.append(asyncio.run_coroutine_threadsafe(self._price_watcher(),
                                                                self._loop))
            for i, book in enumerate(self.books):
                self._tasks.append(asyncio.run_coroutine_threadsafe(
                    self._client(book, self.config.seed * 1000 + i), self._loop))
            time.sleep(2.0)  # accounts and first positions before the first kill
            whole_at = self.config.kills // 2 if self.config.whole_platform_kill else -1
            for i in range(self.config.kills):
                if i == whole_at:
                    self._kill_whole_platform()
                    time.sleep(self.config.interval_s)
                self._kill_one()
                time.sleep(self.config.interval_s)
            time.sleep(self.config.settle_s)
            self._clients_stop.set()
            for task in self._tasks[2:]:
                task.result(timeout=30.0)
            # every request that got no answer is retried with its clientOrderId until it gets
            # one (once prices are fresh): one that was executed must answer its first result
            self.timings["final_wait_for_fresh_prices_s"] = self._wait_fresh_prices(
                time.time_ns() // 1000, timeout_s=90.0)
            asyncio.run_coroutine_threadsafe(self._drain(), self._loop).result(timeout=120.0)
            self._stop.set()
            for task in self._tasks[:2]:
                task.result(timeout=30.0)
            time.sleep(1.0)  # ticks in flight reach the shards, outboxes reach the ledger
            report = self._check()
            report.update({
                "kills": sum(self.kills.values()), "kills_by_target": dict(self.kills),
                "recovery_s_max": round(max(self.recovery_s, default=0.0), 2),
                "recovery_s_mean": round(sum(self.recovery_s) / max(1, len(self.recovery_s)),
                                         2),
                "opens_acked": self.counters["opens_acked"],
                "closes_acked": self.counters["closes_acked"],
                "opens_unanswered": self.counters["opens_unanswered"],
                "closes_unanswered": self.counters["closes_unanswered"],
                "still_unknown_opens": sum(len(b.unknown_opens) for b in self.books),
                "ticks_produced": self.counters["ticks_produced"],
                "released_at_start_micros": self.counters["released_at_start_micros"],
                "open_replays_acked": self.counters["open_replays_acked"],
                "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
                "feed_resume_s_max": round(max(self.feed_resume_s, default=0.0), 2),
                "shard_priced_s": [round(x, 2) for x in self.shard_priced_s],
                "answers": {k: v for k, v in sorted(self.counters.items())
                            if k.startswith(("open_", "close_"))},
                "duration_s": round(time.monotonic() - started, 1),
            })
            self._clean = passed(report)
            return report
        finally:
            self._clients_stop.set()
            self._stop.set()
            with contextlib.suppress(Exception):
                for task in self._tasks:
                    task.result(timeout=10.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread.ident is not None:  # started: a start that failed never did
                self._thread.join(5.0)
            if self.platform is not None:
                self.platform.stop()
            if self._broker is not None:
                self._broker.stop()
            if self._remove_data_dir and (self._clean or not any(self.data_dir.iterdir())):
                shutil.rmtree(self.data_dir, ignore_errors=True)  # nothing to look at
            elif self._remove_data_dir:
                print(f"the run's DATA_DIR is kept: {self.data_dir}", flush=True)


def passed(report: dict[str, Any]) -> bool:
    """Whether a run's report shows nothing lost, duplicated or out of balance: also that the
    closes the clients' histories hold are the closes the ledger counted (a close counted but
    in no history, or shown twice to one account and once to the ledger, would pass the
    checks per account)."""
    return (report["lost"] == 0 and report["duplicated"] == 0
            and report["balance_mismatches"] == 0 and bool(report["audit_ok"])
            and report["history_closes"] == report["ledger_closed_positions"])


def _status(r: httpx.Response | None) -> str:
    """``"503_PRICE_UNAVAILABLE"``-style label of an answer (``"transport"`` for none)."""
    if r is None:
        return "transport"
    try:
        code = r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "?"
    return f"{r.status_code}_{code}"


def _descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in out:
                out.add(child)
                stack.append(child)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="shardex bench chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=nonneg_int, default=100,
                        help="single-process kills (plus one whole-platform kill)")
    parser.add_argument("--interval", type=duration, default=2.0, help="seconds between kills")
    parser.add_argument("--clients", type=positive_int, default=4)
    parser.add_argument("--seed", type=integer, default=1)
    parser.add_argument("--bootstrap", default=None,
                        help="Kafka to use (default: start an embedded broker)")
    parser.add_argument("--assets", type=asset_list, default="SOL,BTC",
                        help="assets traded (one shard each)")
    parser.add_argument("--settle", type=duration_or_zero, default=4.0,
                        help="seconds of trading after the last kill")
    parser.add_argument("--no-platform-kill", action="store_true",
                        help="skip the whole-platform kill")
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = ChaosRun(ChaosConfig(
        kills=args.kills, interval_s=args.interval, clients=args.clients, seed=args.seed,
        whole_platform_kill=not args.no_platform_kill, bootstrap=args.bootstrap,
        assets=args.assets,
        settle_s=args.settle)).run()
    rows = [("kills (single process + whole platform)", report["kills"]),
            ("  by target", report["kills_by_target"]),
            ("recovery after a kill, mean / max s",
             f"{report['recovery_s_mean']} / {report['recovery_s_max']}"),
            ("fresh prices after a feed kill, max s", report["feed_resume_s_max"]),
            ("a killed shard's first new price, s after the kill", report["shard_priced_s"]),
            ("timings s", report["timings_s"]),
            ("opens acknowledged", report["opens_acked"]),
            ("manual closes acknowledged", report["closes_acked"]),
            ("closes in history (all reasons) / counted by the ledger",
             f"{report['history_closes']} / {report['ledger_closed_positions']}"),
            ("  by reason", report["close_reasons"]),
            ("requests unanswered (503 / connection)",
             report["opens_unanswered"] + report["closes_unanswered"]),
            ("LOST acknowledged operations", report["lost"]),
            ("DUPLICATED operations", report["duplicated"]),
            ("balance mismatches", report["balance_mismatches"]),
            ("audit", "OK" if report["audit_ok"] else report["audit_differences"]),
            ("duration s", report["duration_s"])]
    for label, value in rows:
        print(f"{label:<42} {value}")
    for line in report["details"]:
        print(f"  ! {line}")
    print(json.dumps({k: v for k, v in report.items() if k != "details"}, default=str))
    return 0 if passed(report) else 1
