"""Black-box checks on one running platform: a hostile market data feed while clients trade,
the core's known defects, and ``kill -9`` of the whole platform and of its hosts.

One real ``shardex up`` process (durable: journaled ledger and shards under a temporary
DATA_DIR, its own embedded broker on a free loopback port, the API on a free port,
``FEED_SOURCE=none``, SOL, BTC and ETH; it leads a process group of its own) is shared by the
cases, which run in this order; the test alone writes prices to the market data topic.
Everything is reached from the outside: HTTP over a socket, the topic, ``shardex audit`` and
``shardex status`` as processes, and Ray only through a separate probe process connected to the
platform's Ray (``ray-address.json`` in DATA_DIR), which sends commands straight to a shard host
and reads the feed actor's counters. Processes are stopped by their pid, and only the ones this
test started (the ``shardex up`` process group, the broker it recorded as its own, actor
processes below it).

0. Hostile market data while clients trade (tests/integration/hostile_feed.py): for FUZZ_S
   seconds client tasks trade over HTTP while a seeded producer writes valid ticks that move the
   prices (moves that liquidate, jumps beyond the band that the next tick confirms) between
   hostile messages of every kind. Then the platform still answers (healthz, a fresh open and
   close), no HTTP answer was a 5xx, every account's books balance, ``shardex audit`` exits 0,
   the feed counted every kind of hostile message under the reason it is dropped for (each
   reason's count at most what was sent for it: no valid tick was dropped), ``shardex status``
   reports the same drops as ``/metrics``, and every acknowledged open and close is there. The
   prices go back to :data:`PRICES` for the cases after it. The seed is printed;
   ``FUZZ_SEED=N`` runs another one.
1. An absurd price (in the message format's range, far beyond the asset's bound) is dropped by
   the feed (``above_bound``; an in-bound jump is held and dropped as ``jump``); sent straight
   to the shard it is refused with nothing changed.
2. ``ts_us`` of 2**63 and 2**64-1: dropped by the feed (``bad_field``), no retry loop; sent
   straight to the shard, refused without closing the position the price would liquidate.
3. Clients that close their socket right after sending an open leave no margin locked without
   a position.
4. A close whose reply was lost, retried with the same clientOrderId, answers the close.

Then the whole platform is killed (``kill -9`` of the process group ``shardex up`` leads: it,
its broker, its Ray): ``shardex audit --offline`` is clean, ``shardex up`` serves again within
30 s with every account of cases 0-4 exactly as before (every open and close the fuzz's clients
were acknowledged as it was: a position a client was told is open is open, or in the history
closed by a liquidation, take-profit or stop-loss), ``shardex audit`` exits 0 again, and the
100x long of case 1 closes at the real price.

5. ``kill -9`` of the ledger and a shard host while clients trade: the API serves again within
   30 s and every acknowledged open and close is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from engine.assets import DEFAULT_ASSETS
from feed.message import MarketDataMessage
from feed.message import message_from_ticks
from feed.pipeline import DROP_REASONS
from feed.pipeline import drops_text
from tests.e2e.api_client import status_and_code
from tests.integration import hostile_feed as fuzz
from tests.integration.up_platform import REPO
from tests.integration.up_platform import Account
from tests.integration.up_platform import UpPlatform
from tests.integration.up_platform import books_balance
from tests.integration.up_platform import now_us

ASSETS = DEFAULT_ASSETS  # SOL, BTC, ETH: the fuzz trades all three, cases 1-5 SOL and BTC
SOL = ASSETS["SOL"]
# constant (equal marks) except while the fuzz moves them; its random walk starts from them
PRICES = {"SOL": ("100.00", "100.01"), "BTC": ("50000.0", "50000.1"),
          "ETH": ("3000.00", "3000.01")}
CASE_ASSETS = ("SOL", "BTC")  # what case 5's clients trade
START_BUDGET_S = 150.0
RESTART_BUDGET_S = 30.0

pytestmark = [pytest.mark.slow, pytest.mark.alone, pytest.mark.timeout(600),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


# ----------------------------------------------------------------------------- the probe
def _probe_main() -> None:
    """The probe process: connect to the platform's Ray, answer JSON commands on stdin.

    Each stdin line is ``{"op": ..., ...}``; each answer is one stdout line ``PROBE <json>``.
    """
    data_dir = Path(sys.argv[1])
    record = json.loads((data_dir / "ray-address.json").read_text())
    if record.get("ray_auth_mode"):
        os.environ.setdefault("RAY_AUTH_MODE", record["ray_auth_mode"])
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from cluster.actors.names import FEED
    from cluster.actors.names import NAMESPACE
    from engine.market import Tick
    from engine.shard_machine import ApplyTick
    from engine.shard_machine import AuditView
    from engine.shard_machine import LastTick
    from engine.shard_machine import Outbox
    from engine.shard_machine import Stats

    ray.init(address=record["ray_address"], namespace=NAMESPACE, log_to_driver=False,
             logging_level="ERROR")

    def plain(value: Any) -> Any:
        if hasattr(value, "_asdict"):
            return {k: plain(v) for k, v in value._asdict().items()}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if hasattr(value, "code") and hasattr(value, "message"):  # Rejected
            return {"rejected": str(getattr(value.code, "value", value.code)),
                    "message": str(value.message)}
        return value if isinstance(value, int | str | float | bool | type(None)) else repr(value)

    def handle(req: dict[str, Any]) -> Any:
        op = req["op"]
        if op == "feed_stats":
            return ray.get(ray.get_actor(FEED).stats.remote(), timeout=20)
        if op == "pids":
            return {name: ray.get(ray.get_actor(name).info.remote(), timeout=20)["pid"]
                    for name in req["names"]}
        if op == "shard_ticks":
            # one execute call: the reads around the ticks see exactly what the ticks changed
            reads = [LastTick(), Stats(), AuditView(), Outbox()]
            ticks = [ApplyTick(Tick(*t)) for t in req["ticks"]]
            answers = ray.get(ray.get_actor(req["shard"]).execute.remote(
                [*reads, *ticks, *reads]), timeout=30)
            n = len(reads)
            return {"before": plain(answers[:n]), "answers": plain(answers[n:-n]),
                    "after": plain(answers[-n:])}
        raise ValueError(f"unknown op {op}")

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            out: Any = {"ok": plain(handle(json.loads(line)))}
        except Exception as exc:  # reported to the test, which decides
            out = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write("PROBE " + json.dumps(out, default=str) + "\n")
        sys.stdout.flush()


class Probe:
    """A probe process (see :func:`_probe_main`) for the platform running from ``data_dir``."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("RAY_ADDRESS", None)
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.integration.test_core_defects import "
             "_probe_main; _probe_main()", str(data_dir)],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=log.open("a"), text=True)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("PROBE "):
                self._lines.put(line[6:])

    def call(self, op: str, timeout_s: float = 60.0, **kwargs: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.poll() is None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                answer = json.loads(self._lines.get(timeout=0.5))
                break
            except queue.Empty:
                assert self.proc.poll() is None and time.monotonic() < deadline, \
                    f"the probe did not answer {op}:\n{self.log.read_text()[-3000:]}"
        assert "ok" in answer, answer
        return answer["ok"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# ----------------------------------------------------------------------------- the platform
class CoreUp(UpPlatform):
    """The shared platform of these cases (SOL, BTC and ETH at the constant :data:`PRICES`
    except while the fuzz moves them), leading a process group of its own (its ``kill_9`` kills
    the group), with a probe into its Ray."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, ASSETS, PRICES, own_process_group=True)
        self._probe: Probe | None = None

    def probe(self) -> Probe:
        if self._probe is None or self._probe.proc.poll() is not None:
            self._probe = Probe(self.data_dir, self.root / "probe.log")
        return self._probe

    def close_probe(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    def kill_9(self) -> dict[str, float]:
        self.close_probe()
        return super().kill_9()

    def stop(self) -> None:
        self.close_probe()
        super().stop()

    def feed_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.probe().call("feed_stats")
        return stats

    def wait_feed(self, predicate: Any, timeout_s: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        stats = self.feed_stats()
        while not predicate(stats):
            assert time.monotonic() < deadline, stats
            time.sleep(0.2)
            stats = self.feed_stats()
        return stats


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreUp]:
    platform = CoreUp(tmp_path_factory.mktemp("core-defects"))
    try:
        took = platform.start(START_BUDGET_S)
        print(f"\nshardex up serving after {took:.1f} s")
        yield platform
    finally:
        platform.stop()



# ----------------------------------------------------------------------------- HTTP helpers
def raw_request(port: int, method: str, path: str, key: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    return head.encode() + data


async def send_and_hang_up(port: int, request: bytes, mode: str, delay_s: float = 0.0) -> None:
    """Send ``request`` and close the connection without reading the answer: ``fin`` (close
    at once), ``rst`` (abortive close once written), ``late`` (RST after ``delay_s``)."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    if mode == "fin":
        writer.close()
        return
    await writer.drain()
    if mode == "late":
        await asyncio.sleep(delay_s)
    writer.transport.abort()


class Kept:
    """What the cases leave behind for the restart to find: ``accounts`` (every account the
    cases made, checked across the kill), ``traders`` (the fuzz's clients, what they were
    acknowledged, and their accounts), ``fresh`` (the account that traded after the fuzz) and
    ``long`` (the 100x long of case 1 and its id)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.accounts: list[Account] = []
        self.traders: list[tuple[fuzz.Trader, Account]] = []
        self.fresh: Account | None = None
        self.long: tuple[Account, str] | None = None

    def account(self) -> Account:
        """A new account on the platform, kept."""
        self.accounts.append(Account(self.url))
        return self.accounts[-1]


@pytest.fixture(scope="module")
def tracked(up: CoreUp) -> Iterator[Kept]:
    kept = Kept(up.url)
    yield kept
    for account in kept.accounts:
        account.close()


def long_before_bad_ticks(up: CoreUp, tracked: Kept,
                          margin: str) -> tuple[Account, dict[str, Any], dict[str, Any]]:
    """A new account, its 100x SOL long of ``margin`` USD opened at the ticker's prices, and
    the feed's counters before the case's bad ticks."""
    up.wait_prices()
    account = tracked.account()
    position = account.open(asset="SOL", type="long", margin=margin, leverage=100)
    return account, position, up.feed_stats()


# ----------------------------------------------------------------------------- 0. hostile feed
def test_hostile_feed_while_clients_trade_is_dropped_by_reason_and_nothing_acknowledged_is_lost(
        up: CoreUp, tracked: Kept) -> None:
    """Case 0: the fuzz of the market data topic while clients trade, and what the platform
    must show after it (see the module's docstring). The kill -9 and restart after case 4
    check the fuzz's clients and their books again."""
    print(f"\nfuzz seed {fuzz.SEED} (FUZZ_SEED={fuzz.SEED} runs it again)")
    assert fuzz.initial_prices() == PRICES  # the random walk starts from the cases' prices
    rng = random.Random(fuzz.SEED)
    phases: dict[str, float] = {}
    mark = time.monotonic()

    def phase(name: str) -> None:
        nonlocal mark
        phases[name] = time.monotonic() - mark
        mark = time.monotonic()

    up.wait_prices()
    try:
        errors_before = fuzz.server_errors(up.url)
        drops_before = fuzz.feed_drops(up.url)
        accounts = [tracked.account() for _ in range(fuzz.TRADERS)]
        market = fuzz.Market()
        traders = [fuzz.Trader(up.url, a.key, random.Random(rng.getrandbits(64)), market)
                   for a in accounts]
        tracked.traders = list(zip(traders, accounts, strict=True))
        producer = fuzz.Producer(up.bootstrap, random.Random(rng.getrandbits(64)), market)

        async def run() -> None:
            await producer.start()
            try:
                until = time.monotonic() + fuzz.FUZZ_S
                await asyncio.gather(producer.run(until), *(t.run(until) for t in traders))
            finally:
                await producer.stop()

        with up.tick.paused():  # the test's producer alone writes prices meanwhile
            asyncio.run(run())
            up.tick.prices = {name: market.bid_ask(name) for name in fuzz.BASE_MID}
        up.wait_prices(15)
        sent = producer.sent
        phase("fuzz")

        # the platform still answers
        assert up.serving()
        fresh = tracked.fresh = tracked.account()
        position = fresh.open(asset="SOL", type="long", margin="10", leverage=5)
        closed = fresh.post("/api/v1/positions/close", {"positionId": position["positionId"]})
        assert closed.status_code == 200, closed.text
        failures = [f for t in traders for f in t.failures]
        answers = sum((t.answers for t in traders), Counter[str]())
        new_errors = {k: v - errors_before.get(k, 0)
                      for k, v in fuzz.server_errors(up.url).items()
                      if v != errors_before.get(k, 0)}

        # what the feed dropped, by reason
        drops = {r: n - drops_before.get(r, 0) for r, n in fuzz.feed_drops(up.url).items()}
        closes = fuzz.closes_by_reason(up.url)
        print(f"sent: {sent.valid_ticks} valid ticks ({sent.moves} moves within the band, "
              f"{sent.confirmed_jumps} jumps beyond it confirmed), {sent.spikes} unconfirmed "
              f"jumps, {sum(sent.categories.values())} hostile records "
              f"({sent.skipped_valid} spoiled values that were valid ticks not sent)")
        print(f"hostile records by category: {dict(sorted(sent.categories.items()))}")
        expected = Counter(sent.reasons)
        expected["jump"] = sent.spikes
        print(f"hostile records by the reason they are dropped for: {drops_text(expected)}")
        print(f"feed drops by reason: {drops_text(drops)}")
        for reason in DROP_REASONS:
            print(f"  {reason:<15} sent {expected[reason]:>4}  dropped {drops.get(reason, 0):>4}")
        print(f"client answers: {dict(sorted(answers.items()))}")
        print(f"closes by reason: {dict(closes)}")
        assert not failures, failures
        assert not new_errors, new_errors
        for reason in DROP_REASONS:  # every kind sent was counted; no valid tick was dropped
            assert expected[reason] > 0, f"nothing sent to be dropped as {reason}"
            assert 0 < drops.get(reason, 0) <= expected[reason], (reason, drops, expected)
        assert closes["liquidation"] > 0, closes
        assert sum(len(t.opened) for t in traders) >= 20 and \
            sum(len(t.closed) for t in traders) >= 5, answers

        # `shardex status` reports the same drops by reason as /metrics
        status = up.cli("status")
        assert status.returncode == 0, status.stdout + status.stderr
        shown = re.search(r"dropped: (.*);", status.stdout)
        assert shown is not None, status.stdout
        assert shown.group(1) == drops_text(fuzz.feed_drops(up.url)), status.stdout

        fuzz.settled([*accounts, fresh])
        up.audit()
        for (trader, _), (still_open, history, _) in zip(tracked.traders,
                                                         fuzz.books(accounts), strict=True):
            fuzz.check_acknowledged(trader, still_open, history)
        phase("checks and audit")
    finally:
        up.tick.prices = dict(PRICES)  # the cases after this one trade at the constant prices
    up.wait_prices(15)
    fuzz.settled(tracked.accounts)  # the closes the way back triggered reach the ledger
    phase("prices back")
    print("fuzz phases: " + ", ".join(f"{name} {s:.1f} s" for name, s in phases.items()))


# ----------------------------------------------------------------------------- 1. absurd price
def test_absurd_price_is_dropped_by_the_feed_and_refused_by_the_shard(
        up: CoreUp, tracked: Kept) -> None:
    alice, position, base = long_before_bad_ticks(up, tracked, "9000")
    assert position["entryPrice"] == "100.01"
    tracked.long = (alice, position["positionId"])

    # a well-formed message whose bid is 1,500,000,000 USD: beyond SOL's bound; at that bid
    # the long's PnL (~1.35e19 micro-dollars) does not fit an int64
    absurd = MarketDataMessage(SOL.symbol, "SOL", "1500000000", "1500000000.01",
                               "1500000000.005", now_us(), next(up.tick.seq), "test")
    with up.tick.paused():
        up.tick.publish(absurd)
        up.wait_feed(lambda s: s["dropped"]["above_bound"] > base["dropped"]["above_bound"])
    # a price within the bound but 10,000x the last one: held, then dropped as a jump when
    # the next (normal) tick does not confirm it
    with up.tick.paused():
        up.tick.publish(message_from_ticks(
            SOL, SOL.price_to_ticks("1000000.00"), SOL.price_to_ticks("1000000.01"), now_us(),
            next(up.tick.seq), "test"))
        stats = up.wait_feed(lambda s: s["jumps_held"] > base["jumps_held"])
        assert "SOL" in stats["held"]
    stats = up.wait_feed(lambda s: s["dropped"]["jump"] > base["dropped"]["jump"])
    drops = {r: n - base["dropped"][r] for r, n in stats["dropped"].items()
             if n != base["dropped"][r]}
    print(f"\nfeed drops by reason (absurd price): {drops}")
    assert drops == {"above_bound": 1, "jump": 1}
    prices = httpx.get(f"{up.url}/api/v1/prices", timeout=10).json()
    assert (prices["SOL"]["bid"], prices["SOL"]["ask"]) == PRICES["SOL"]
    assert Decimal(alice.state()["positions"][0]["unrealizedPnl"]) == \
        (Decimal("100.00") - Decimal("100.01")) * Decimal(position["quantity"])

    # straight to the shard, past the feed: refused, nothing changed
    bid = SOL.price_to_ticks("1500000000")
    seen = up.probe().call("shard_ticks", shard="shard-SOL-0",
                           ticks=[["SOL", bid, bid + 1, now_us(), next(up.tick.seq), "test"]])
    print(f"ApplyTick(bid {bid} ticks) straight to shard-SOL-0 answered {seen['answers']}")
    assert isinstance(seen["answers"][0], dict) and "rejected" in seen["answers"][0], \
        f"the shard took the absurd tick: {seen}"
    assert seen["after"] == seen["before"], seen
    assert books_balance(alice) == []
    up.audit()


# ----------------------------------------------------------------------------- 2. ts_us >= 2**63
def test_ts_us_beyond_int64_is_dropped_and_refused_without_closing_anything(
        up: CoreUp, tracked: Kept) -> None:
    # a 100x long: a SOL bid of 50 liquidates it, if a tick carrying it is ever applied
    bob, position, base = long_before_bad_ticks(up, tracked, "100")
    assert Decimal(position["liquidationPrice"]) > Decimal("50.00")
    crash_bid, crash_ask = SOL.price_to_ticks("50.00"), SOL.price_to_ticks("50.01")

    with up.tick.paused():
        for ts_us in (2**63, 2**64 - 1):
            up.tick.publish(message_from_ticks(SOL, crash_bid, crash_ask, ts_us,
                                               next(up.tick.seq), "test"))
        stats = up.wait_feed(
            lambda s: s["dropped"]["bad_field"] >= base["dropped"]["bad_field"] + 2)
        # nothing retries them: over 2 s with nothing produced, the counters stand still
        time.sleep(2.0)
        later = up.feed_stats()
    drops = {r: n - base["dropped"][r] for r, n in later["dropped"].items()
             if n != base["dropped"][r]}
    print(f"\nfeed drops by reason (ts_us >= 2**63): {drops}; over 2 s idle: polls "
          f"+{later['polls'] - stats['polls']}, calls +{later['calls'] - stats['calls']}")
    assert drops == {"bad_field": 2}
    for counter in ("consumed", "decoded", "dropped_total", "delivered", "calls",
                    "failed_calls", "ticks_refused_by_shards", "consumer_restarts",
                    "settlement_deliveries_failed"):
        assert later[counter] == stats[counter], (counter, stats[counter], later[counter])
    assert later["polls"] - stats["polls"] <= 60  # one poll per 100 ms fetch wait at most
    assert later["prices"]["SOL"]["bid"] == PRICES["SOL"][0]

    # straight to the shard: refused, nothing closed, nothing changed
    for ts_us in (2**63, 2**64 - 1):
        seen = up.probe().call("shard_ticks", shard="shard-SOL-0",
                               ticks=[["SOL", crash_bid, crash_ask, ts_us, 1, "test"]])
        assert isinstance(seen["answers"][0], dict) and "rejected" in seen["answers"][0], seen
        assert seen["after"] == seen["before"], seen
    assert [p["positionId"] for p in bob.state()["positions"]] == [position["positionId"]]
    assert bob.history() == []
    assert books_balance(bob) == []
    up.audit()


# ----------------------------------------------------------------------------- 3. disconnects
def test_clients_hanging_up_mid_open_leave_no_margin_locked_without_a_position(
        up: CoreUp, tracked: Kept) -> None:
    up.wait_prices()
    accounts = [tracked.account() for _ in range(6)]
    per_account = 10
    modes = ("fin", "rst", "late")
    rng = random.Random(3)

    async def storm() -> None:
        jobs = []
        for i, account in enumerate(accounts):
            for j in range(per_account):
                request = raw_request(up.port, "POST", "/api/v1/positions/open", account.key,
                                      {"asset": "SOL" if (i + j) % 2 else "BTC",
                                       "type": "long" if j % 3 else "short",
                                       "margin": "10", "leverage": 5})
                jobs.append(send_and_hang_up(up.port, request, modes[j % 3],
                                             rng.uniform(0.001, 0.05)))
        await asyncio.gather(*jobs)

    sent = time.monotonic()
    asyncio.run(storm())
    deadline = sent + 10
    problems = [books_balance(a) for a in accounts]
    while any(problems) and time.monotonic() < deadline:
        time.sleep(0.25)
        problems = [books_balance(a) for a in accounts]
    settled_s = time.monotonic() - sent
    opened = sum(len(a.state()["positions"]) for a in accounts)
    print(f"\n{len(accounts) * per_account} opens sent and hung up on: {opened} opened; "
          f"books consistent after {settled_s:.1f} s")
    assert not any(problems), problems
    up.audit()
    assert [books_balance(a) for a in accounts] == [[]] * len(accounts)


# ----------------------------------------------------------------------------- 4. lost reply
def test_a_retried_close_whose_reply_was_lost_answers_the_close(
        up: CoreUp, tracked: Kept) -> None:
    up.wait_prices()
    carol = tracked.account()
    answers = []
    for retry_at_once in (False, True):
        position = carol.open(asset="BTC", type="long", margin="50", leverage=10)
        body = {"positionId": position["positionId"],
                "clientOrderId": f"close-{position['positionId']}"}
        request = raw_request(up.port, "POST", "/api/v1/positions/close", carol.key, body)
        asyncio.run(send_and_hang_up(up.port, request, "rst"))
        if not retry_at_once:  # let the first close finish: only its answer was lost
            deadline = time.monotonic() + 10
            while carol.state()["positions"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert carol.state()["positions"] == []
        retried = carol.post("/api/v1/positions/close", body)
        assert retried.status_code == 200, retried.text
        answer = retried.json()
        again = carol.post("/api/v1/positions/close", body)
        assert again.status_code == 200 and again.json() == answer, again.text
        history = [c for c in carol.history() if c["positionId"] == position["positionId"]]
        assert len(history) == 1, history
        assert answer == history[0], (answer, history[0])
        assert answer["exitPrice"] == PRICES["BTC"][0] and answer["closeReason"] == "manual"
        answers.append(answer)
    assert len(carol.history()) == 2
    assert books_balance(carol) == []
    up.audit()
    # SPEC: a ClosedPosition carries its closeId
    for answer in answers:
        assert "closeId" in answer, f"no closeId in the ClosedPosition {answer}"


# ----------------------------------------------------------------------------- kill -9, restart
def test_kill_9_of_the_platform_then_restart_finds_everything_as_it_was(
        up: CoreUp, tracked: Kept) -> None:
    """Cases 0-4 end here: audit, kill -9 of the process group ``shardex up`` leads (it, its
    broker, its Ray), ``audit --offline``, ``shardex up`` again: within 30 s of its start it
    serves every account exactly as before (every open and close the fuzz's clients were
    acknowledged as it was), audit clean, a fresh open and close, and the 100x long the absurd
    price would have broken closes at the real price."""
    accounts = tracked.accounts
    assert accounts, "no case left an account behind"
    up.wait_prices()
    fuzz.settled(accounts)
    before = [(a.state(), a.history()) for a in accounts]
    up.audit()
    timings = up.kill_9()
    lingering = [p for p in up.started_below if p.alive()]  # outside the killed group
    offline = up.audit("--offline")
    took = up.start(RESTART_BUDGET_S + 90)  # measured here, held to the budget below
    print(f"\nprocesses of the killed run alive at the restart: "
          f"{sorted(p.cmdline[0] for p in lingering if p.cmdline)}; still alive once it "
          f"served: {sorted(p.cmdline[0] for p in lingering if p.alive() and p.cmdline)}")
    # the shards have the constant price again: every mark is the one seen before the kill
    restarted = time.monotonic()
    after = [(a.state(), a.history()) for a in accounts]
    while after != before and time.monotonic() - restarted < 15:
        time.sleep(0.25)
        after = [(a.state(), a.history()) for a in accounts]
    restart_s = took + (time.monotonic() - restarted)
    print(f"kill -9 of the process group -> journals released after "
          f"{timings['journals_released_s']:.1f} s; audit --offline totals {offline['totals']}; "
          f"restarted `shardex up` answered 200 after {took:.1f} s (healthz 200 after "
          f"{up.milestones['healthz']:.1f} s), served every account as before after "
          f"{restart_s:.1f} s")
    assert after == before
    for trader, account in tracked.traders:  # the fuzz's clients
        state, history = after[accounts.index(account)]
        fuzz.check_acknowledged(trader, {p["positionId"] for p in state["positions"]}, history)
    up.audit()
    fresh = tracked.fresh if tracked.fresh is not None else tracked.account()
    again = fresh.open(asset="ETH", type="short", margin="10", leverage=20)
    closed = fresh.post("/api/v1/positions/close", {"positionId": again["positionId"]})
    assert closed.status_code == 200, closed.text
    if tracked.long is not None:
        alice, position_id = tracked.long
        closed = alice.post("/api/v1/positions/close", {"positionId": position_id})
        assert closed.status_code == 200, closed.text
        assert closed.json()["exitPrice"] == PRICES["SOL"][0]
        assert books_balance(alice) == []
    up.audit()
    assert took <= restart_s < RESTART_BUDGET_S, \
        f"shardex up served {restart_s:.1f} s after its restart\n{up.log.read_text()[-3000:]}"


# ----------------------------------------------------------------------------- 5. kill -9 hosts
class Trader:
    """One client opening and closing in a loop; remembers what it was acknowledged."""

    def __init__(self, url: str, key: str, seed: int) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {key}"}
        self.rng = random.Random(seed)
        self.acked_opens: set[str] = set()
        self.acked_closes: set[str] = set()
        self.open_ids: dict[str, str] = {}  # acknowledged and not known closed -> asset
        self.unanswered = 0
        self.errors: Counter[str] = Counter()  # "5xx CODE" -> count
        self.unavailable_s: list[float] = []  # how long each 503 SERVICE_UNAVAILABLE took
        self.retry_after: set[str | None] = set()  # their Retry-After headers
        self.killed_at: float | None = None
        # monotonic time of the first 2xx to a SOL open or close sent after the kill: a
        # request that needs both the ledger and shard-SOL-0
        self.sol_back_at: float | None = None
        self.n = 0

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as http:
            while not stop.is_set():
                self.n += 1
                pid = ""
                if self.open_ids and self.rng.random() < 0.4:
                    pid = self.rng.choice(sorted(self.open_ids))
                    asset = self.open_ids.pop(pid)
                    path, body = "/api/v1/positions/close", {"positionId": pid}
                else:
                    asset = self.rng.choice(list(CASE_ASSETS))
                    path = "/api/v1/positions/open"
                    body = {"asset": asset, "type": "long", "margin": "20", "leverage": 3}
                body["clientOrderId"] = f"t{self.n}"
                sent = time.monotonic()
                try:
                    r: httpx.Response | None = await http.post(path, json=body,
                                                               headers=self.headers)
                except httpx.TransportError:
                    r = None
                if r is None or r.status_code >= 500:
                    self.unanswered += 1
                    if r is not None:
                        self.errors[status_and_code(r)] += 1
                        if status_and_code(r) == "503 SERVICE_UNAVAILABLE":
                            self.unavailable_s.append(time.monotonic() - sent)
                            self.retry_after.add(r.headers.get("retry-after"))
                    if pid:
                        self.open_ids[pid] = asset  # may still be open: tried again later
                    await asyncio.sleep(0.2)
                    continue
                if self.killed_at is not None and sent > self.killed_at \
                        and self.sol_back_at is None and r.status_code < 300 and asset == "SOL":
                    self.sol_back_at = time.monotonic()
                if path.endswith("open") and r.status_code == 201:
                    self.acked_opens.add(r.json()["positionId"])
                    self.open_ids[r.json()["positionId"]] = asset
                elif path.endswith("close") and r.status_code == 200:
                    self.acked_closes.add(pid)
                await asyncio.sleep(0.02)


def test_kill_9_of_ledger_and_shard_hosts_mid_traffic_loses_nothing_acknowledged(
        up: CoreUp) -> None:
    up.wait_prices()
    accounts = [Account(up.url) for _ in range(3)]
    traders = [Trader(up.url, a.key, i) for i, a in enumerate(accounts)]
    victims = ["ledger", "shard-SOL-0"]
    pids = up.probe().call("pids", names=victims)

    async def scenario() -> float:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(t.run(stop)) for t in traders]
        await asyncio.sleep(4.0)
        killed = time.monotonic()
        for trader in traders:
            trader.killed_at = killed
        for name in victims:  # actor processes below our shardex up, by the pid they gave
            os.kill(pids[name], signal.SIGKILL)
        while time.monotonic() - killed < 60 and not all(t.sol_back_at for t in traders):
            await asyncio.sleep(0.1)
        await asyncio.sleep(3.0)  # trade on the recovered hosts
        stop.set()
        await asyncio.gather(*tasks)
        return killed

    killed = asyncio.run(scenario())
    back = [t.sol_back_at - killed for t in traders if t.sol_back_at is not None]
    opens = sum(len(t.acked_opens) for t in traders)
    closes = sum(len(t.acked_closes) for t in traders)
    print(f"\nkill -9 of ledger and shard-SOL-0 (pids {pids}) mid-traffic: each client "
          f"had a SOL open or close answered again after {[round(b, 1) for b in back]} s; "
          f"acknowledged {opens} opens, "
          f"{closes} closes; {sum(t.unanswered for t in traders)} requests unanswered")
    assert len(back) == len(traders) and max(back) < RESTART_BUDGET_S, back
    # a host that does not answer is a 503 in the SPEC's shape: the outcome is unknown
    errors = sum((t.errors for t in traders), Counter[str]())
    print(f"server errors answered: {dict(errors)}")
    assert set(errors) <= {"503 SERVICE_UNAVAILABLE", "503 PRICE_UNAVAILABLE"}, errors
    # the platform's Ray fails a call to a restarting host at once (deploy.RAY_SYSTEM_CONFIG):
    # Ray's default held each such call at least a second before the API could answer 503
    waits = sorted(w for t in traders for w in t.unavailable_s)
    print(f"503 SERVICE_UNAVAILABLE answered in {[round(w * 1000) for w in waits]} ms")
    assert waits and waits[len(waits) // 2] < 0.5, waits
    assert set().union(*(t.retry_after for t in traders)) == {"1"}
    restarted = up.probe().call("pids", names=victims)
    assert all(restarted[n] != pids[n] for n in victims), (pids, restarted)
    assert opens >= 10 and closes >= 3

    deadline = time.monotonic() + 45  # an open in doubt has its lock settled meanwhile
    for account, trader in zip(accounts, traders, strict=True):
        closed = [c["positionId"] for c in account.history()]
        still_open = {p["positionId"] for p in account.state()["positions"]}
        assert len(closed) == len(set(closed)), "a position closed twice"
        assert not still_open & set(closed), still_open & set(closed)
        assert trader.acked_opens <= still_open | set(closed), \
            trader.acked_opens - still_open - set(closed)
        assert trader.acked_closes <= set(closed), trader.acked_closes - set(closed)
        problems = books_balance(account)
        while problems and time.monotonic() < deadline:
            time.sleep(0.5)
            problems = books_balance(account)
        assert problems == []
    up.audit()
    for account in accounts:
        account.close()
