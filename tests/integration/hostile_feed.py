"""The machinery of the hostile market data fuzz (tests/integration/test_core_defects.py runs it
on its platform while clients trade).

A seeded :class:`Producer` writes to ``backpack-market-updates`` a mix of valid ticks that move
the prices (a random walk, moves within the jump band that liquidate, jumps beyond it that the
next tick confirms) and hostile messages (:class:`HostileMessages`): random bytes, random JSON,
JSON with fields of the wrong type, extreme numbers (huge, negative, zero, too many decimals,
exponents, NaN and Infinity as text and as JSON tokens, above the asset's bound), ``ts_us`` far
in the past, far in the future and at or beyond 2**63, crossed books, unknown symbols, deeply
nested and oversized values, empty keys and values, updates older than the last one delivered,
and jumps beyond the band that the next tick does not confirm. It counts what it sent by
category and by the reason the platform's decoder drops it for. :class:`Trader` clients trade
over HTTP meanwhile (opens and closes on every asset, long and short, leverages 1-100,
take-profits and stop-losses, the occasional invalid request) and remember every answer; the
readers below take the platform's counters from ``/metrics`` and compare what clients were
acknowledged with their books.

The seed is :data:`SEED`; ``FUZZ_SEED=N`` runs another one.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer
from engine.assets import DEFAULT_ASSETS
from engine.assets import Asset
from feed.message import TickDecoder
from feed.message import message_from_ticks
from feed.settings import MARKET_TOPIC
from feed.settings import FeedBounds
from tests.integration.up_platform import Account
from tests.integration.up_platform import books_balance
from tests.integration.up_platform import now_us

SEED = int(os.environ.get("FUZZ_SEED", "20261129"))
ASSETS = DEFAULT_ASSETS  # SOL, BTC, ETH
BASE_MID = {"SOL": 10_000, "BTC": 500_000, "ETH": 300_000}  # ticks: 100.00, 50000.0, 3000.00
BOUNDS = FeedBounds()  # the platform's defaults (MAX_PRICE_AGE_S, MAX_CLOCK_SKEW_S, band)
BAND = BOUNDS.max_tick_jump_bps / 10_000
FUZZ_S = 10.0  # trading and hostile messages
STEP_S = 0.1  # one round of valid ticks (every asset) and a few hostile messages
HOLD_S = 0.6  # from a jump beyond the band to the asset's next tick: read on its own
TRADERS = 3
TRIGGER_REASONS = {"liquidation", "take_profit", "stop_loss"}


def initial_prices() -> dict[str, tuple[str, str]]:
    return {name: (ASSETS[name].ticks_to_price(mid), ASSETS[name].ticks_to_price(mid + 1))
            for name, mid in BASE_MID.items()}


# ----------------------------------------------------------------------------- the market
class Market:
    """The test's prices (bid ticks; ask one tick above), moved by the producer, read by the
    traders for their take-profits and stop-losses."""

    def __init__(self) -> None:
        self.mid = dict(BASE_MID)

    def bid_ask(self, name: str) -> tuple[str, str]:
        asset, mid = ASSETS[name], self.mid[name]
        return asset.ticks_to_price(mid), asset.ticks_to_price(mid + 1)

    def moved(self, name: str, factor: float) -> int:
        """The bid ``factor`` times the current one, kept within 0.5-2x the start."""
        base = BASE_MID[name]
        return min(max(round(self.mid[name] * factor), base // 2), base * 2)


def message(asset: Asset, bid_ticks: int, ask_ticks: int, ts_us: int | None = None,
            **over: Any) -> dict[str, Any]:
    """A MarketDataMessage as a dict (to be spoiled)."""
    obj = message_from_ticks(asset, bid_ticks, ask_ticks, now_us() if ts_us is None else ts_us,
                             1, "fuzz").to_dict()
    obj.update(over)
    return obj


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def expected_drop(value: bytes | None, at_us: int) -> str | None:
    """The reason the platform's decoder drops ``value`` for (None: it is a valid tick)."""
    decoder = TickDecoder(ASSETS, BOUNDS)
    if decoder.decode(value, at_us) is not None:
        return None
    (reason,) = decoder.dropped
    return reason


# ----------------------------------------------------------------------------- hostile values
def _text(rng: random.Random, n: int) -> str:
    alphabet = "abcXYZ019 _.-\"\\/\u0000\u001f\u00e9\u2028\ud7ff\U0001f680{}[]:,"
    return "".join(rng.choice(alphabet) for _ in range(n))


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["null", "bool", "int", "float", "str"] + (["list", "dict"] * 2 if depth < 5 else [])
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 1, 2**63, -(2**70), 10**40, rng.randint(-10**9, 10**9)])
    if kind == "float":
        return rng.choice([0.0, -0.0, 1e308, -1e-308, float("nan"), float("inf"),
                           rng.uniform(-1e6, 1e6)])
    if kind == "str":
        return _text(rng, rng.randint(0, 24))
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["symbol", "bid", "ask", "price", "ts_us", "seq", "source", "v", "asset"]
    out: dict[str, Any] = {}
    for _ in range(rng.randint(0, 6)):
        key = rng.choice(keys) if rng.random() < 0.7 else _text(rng, rng.randint(0, 8))
        out[key] = (rng.choice([a.symbol for a in ASSETS.assets])
                    if key == "symbol" and rng.random() < 0.5 else random_json(rng, depth + 1))
    return out


WRONG_TYPED: dict[str, list[Any]] = {
    "bid": [None, True, [], {}, ["100.00"], {"v": "100.00"}, "", " 100.00", "100,00", "0x10",
            "1_000", "१००"],
    "ask": [None, False, [1], {}, "", "100.00 ", "+100.00"],
    "price": [None, True, [], {}, "", "abc", "--1"],
    "ts_us": ["1700000000000000", None, True, [], {}, 1.7e15, "now"],
    "seq": ["1", -1, 1.5, 2**63, True, [], {}],
    "symbol": [None, 5, [], {}, True, ["SOL_USDC"]],
    "source": ["s" * 65, "\u00e9" * 200],
}
EXTREME_TEXT = ["1e308", "-1e308", "1E2", "1e-2", "-0", "0", "0.00", "-100.00", "100.001",
                "100.0000000000000000001", "9" * 30, "99999999999.99", "NaN", "nan", "Infinity",
                "-Infinity", "inf", "1e999999999", "1e-999999999", "0e0", "1" + "0" * 40,
                "0.0000001", "-0.01", "4e18", "18446744073709551616"]
EXTREME_TOKENS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-5", "0", "-0.0",
                  "123456789012345678901234567890", "100.001", "1e999999999", "-1"]
UNKNOWN_SYMBOLS = ["DOGE_USDC", "", "sol_usdc", "SOL_USDC ", "SOL", "BTC_USDT", "SOL\u0000USDC",
                   "\U0001f680", "SOL_USDC" * 50, "ETH-USDC"]


@dataclass
class Hostile:
    """One hostile record: its category, key, value, the asset whose partition it goes to
    (None: any), and the reason it must be dropped for."""

    category: str
    key: bytes | None
    value: bytes | None
    asset: str | None
    reason: str


class HostileMessages:
    """Seeded hostile records; ``make(category, market)`` builds one (None when the spoiled
    value happened to be a valid tick: such values are not sent)."""

    CATEGORIES = ("random_bytes", "random_json", "wrong_types", "extreme_numbers", "far_past_ts",
                  "far_future_ts", "ts_beyond_int64", "crossed_book", "unknown_symbol",
                  "deeply_nested", "oversized", "empty_key_or_value", "out_of_order")

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.made: Counter[str] = Counter()

    def key(self, asset: Asset, guaranteed: bool) -> bytes | None:
        """A record key: none, empty or junk keys are read whatever follows them; a symbol key
        lets a newer record of the same key in one batch supersede it unread."""
        choices: list[bytes | None] = [None, b"", b"\x00" * 8, self.rng.randbytes(12)]
        if not guaranteed:
            choices += [asset.symbol.encode()] * 3 + [b"DOGE_USDC"]
        return self.rng.choice(choices)

    def make(self, category: str, market: Market) -> Hostile | None:
        rng = self.rng
        name = rng.choice(list(BASE_MID))
        asset = ASSETS[name]
        mid = market.mid[name]
        now = now_us()
        guaranteed = self.made[category] < 3  # the first ones of a category are read for sure
        key = self.key(asset, guaranteed)
        value: bytes | None
        if category == "random_bytes":
            value = rng.randbytes(rng.randint(1, 700))
            if rng.random() < 0.3:
                value = b'{"symbol":"' + asset.symbol.encode() + b'","bid":"' + value
        elif category == "random_json":
            value = json.dumps(random_json(rng)).encode()  # NaN/Infinity tokens included
        elif category == "wrong_types":
            field_name = rng.choice(list(WRONG_TYPED))
            value = dumps(message(asset, mid, mid + 1,
                                  **{field_name: rng.choice(WRONG_TYPED[field_name])}))
        elif category == "extreme_numbers":
            obj = message(asset, mid, mid + 1)
            if rng.random() < 0.2:  # on the price step, above the asset's bound
                top = asset.max_price_ticks + rng.choice([1, 10**3, 10**9])
                obj.update(bid=asset.ticks_to_price(top), ask=asset.ticks_to_price(top + 1),
                           price=asset.ticks_to_price(top))
                value = dumps(obj)
            else:
                fields = rng.sample(["bid", "ask", "price"], rng.randint(1, 3))
                text = json.dumps(obj, separators=(",", ":"))
                for f in fields:
                    raw = (json.dumps(rng.choice(EXTREME_TEXT)) if rng.random() < 0.6
                           else rng.choice(EXTREME_TOKENS))
                    text = re.sub(rf'"{f}":"[^"]*"', f'"{f}":{raw}', text)
                value = text.encode()
        elif category == "far_past_ts":
            ts = rng.choice([1, 0, -1, -now, now - rng.randint(16, 10**6) * 1_000_000,
                             now - 86_400_000_000 * rng.randint(1, 20_000)])
            value = dumps(message(asset, mid, mid + 1, ts_us=ts))
        elif category == "far_future_ts":
            # a minute ahead at least: still beyond MAX_CLOCK_SKEW_S when the feed reads it
            ts = rng.choice([2**63 - 1, now + rng.randint(60, 10**9) * 1_000_000,
                             now + 86_400_000_000 * 365 * rng.randint(1, 1000)])
            value = dumps(message(asset, mid, mid + 1, ts_us=ts))
        elif category == "ts_beyond_int64":
            ts = rng.choice([2**63, 2**63 + 1, 2**64 - 1, 2**64, 10**30, 2**1000,
                             2**63 + rng.randint(0, 2**62)])
            value = dumps(message(asset, mid, mid + 1, ts_us=ts))
        elif category == "crossed_book":
            gap = rng.choice([1, 2, 100, mid // 2])
            value = dumps(message(asset, mid + gap, mid, price=asset.ticks_to_price(mid)))
        elif category == "unknown_symbol":
            value = dumps(message(asset, mid, mid + 1, symbol=rng.choice(UNKNOWN_SYMBOLS)))
        elif category == "deeply_nested":
            n = rng.choice([33, 40, 100, 1000])
            shape = rng.randrange(4)
            if shape == 0:
                value = b"[" * n + b"]" * n
            elif shape == 1:
                value = b'{"symbol":' * n + b"1" + b"}" * n
            elif shape == 2:  # a valid message buried deep
                value = b"[" * n + dumps(message(asset, mid, mid + 1)) + b"]" * n
            else:  # never closed
                value = b"{" * n
        elif category == "oversized":
            obj = message(asset, mid, mid + 1, pad="x" * rng.randint(4200, 60_000))
            value = dumps(obj) if rng.random() < 0.5 else b"[" * rng.randint(5000, 100_000)
        elif category == "empty_key_or_value":
            key, value = rng.choice([(b"", b""), (asset.symbol.encode(), b""),
                                     (asset.symbol.encode(), None), (b"", None),
                                     (b"", b"{}"), (None, b"{}"), (None, b" "), (b"", b"null")])
            if key == asset.symbol.encode() and guaranteed:
                key = b""
        elif category == "out_of_order":
            # valid, but older than the ticks delivered in the last few seconds
            ts = now - rng.randint(2_000_000, 5_000_000)
            self.made[category] += 1
            return Hostile(category, self.key(asset, True), dumps(message(asset, mid, mid + 1,
                                                                          ts_us=ts)),
                           name, "out_of_order")
        else:
            raise AssertionError(category)
        reason = expected_drop(value, now)
        if reason is None:
            return None
        self.made[category] += 1
        return Hostile(category, key, value, None, reason)


# ----------------------------------------------------------------------------- the producer
@dataclass
class Sent:
    """What the producer sent: hostile records by category and by the reason they are dropped
    for, jumps beyond the band (confirmed or not), moves within it, valid ticks."""

    categories: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    valid_ticks: int = 0
    moves: int = 0
    spikes: int = 0
    confirmed_jumps: int = 0
    skipped_valid: int = 0


class Producer:
    """Valid ticks of every asset each STEP_S, hostile records between them, and a planned
    sequence of price events: ``spike`` (a jump beyond the band the next tick does not
    confirm), ``jump`` (one it confirms) and ``move`` (a move within the band, 3-6 %)."""

    def __init__(self, bootstrap: str, rng: random.Random, market: Market) -> None:
        self.bootstrap = bootstrap
        self.raw: AIOKafkaProducer | None = None
        self.rng = rng
        self.market = market
        self.hostile = HostileMessages(rng)
        self.sent = Sent()
        self.seq = 10**12
        self.partitions = 1
        # asset -> (monotonic time of its next tick, the bid that tick carries)
        self.held: dict[str, tuple[float, int]] = {}

    async def start(self) -> None:
        self.raw = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=0,
                                    request_timeout_ms=10_000, max_request_size=1 << 20)
        await self.raw.start()
        self.partitions = max(1, len(await self.raw.partitions_for(MARKET_TOPIC) or ()))

    @property
    def kafka(self) -> AIOKafkaProducer:
        assert self.raw is not None
        return self.raw

    async def stop(self) -> None:
        if self.raw is not None:
            await self.raw.stop()

    def partition(self, asset: str | None) -> int:
        if asset is None:
            return self.rng.randrange(self.partitions)
        return ASSETS[asset].index % self.partitions

    async def tick(self, name: str, bid: int) -> None:
        asset = ASSETS[name]
        self.seq += 1
        msg = message_from_ticks(asset, bid, bid + 1, now_us(), self.seq, "fuzz")
        await self.kafka.send(MARKET_TOPIC, msg.to_json_bytes(), key=msg.key,
                              partition=self.partition(name))

    async def send_hostile(self, record: Hostile) -> None:
        key = record.key
        asset = record.asset
        if asset is None and key is not None:  # a symbol key goes where its producer puts it
            hinted = ASSETS.by_symbol(key.decode(errors="replace"))
            asset = hinted.name if hinted is not None else None
        await self.kafka.send(MARKET_TOPIC, record.value, key=key, partition=self.partition(asset))
        self.sent.categories[record.category] += 1
        self.sent.reasons[record.reason] += 1

    def plan(self, steps: int) -> dict[int, list[tuple[str, str]]]:
        """Step -> the price events that start there (spread over the run, every kind on
        every asset at least once where the run is long enough)."""
        events = ["spike"] * 6 + ["jump"] * 6 + ["move"] * 12
        names = list(BASE_MID)
        out: dict[int, list[tuple[str, str]]] = {}
        for i, kind in enumerate(events):
            step = self.rng.randint(8, max(9, steps - 12))
            out.setdefault(step, []).append((kind, names[i % len(names)]))
        return out

    async def run(self, until: float) -> None:
        steps = int((until - time.monotonic()) / STEP_S)
        plan = self.plan(steps)
        backlog: list[tuple[str, str]] = []
        step = 0
        categories = list(HostileMessages.CATEGORIES)
        # every category early on (read for sure), then a random mix
        order = categories + [self.rng.choice(categories) for _ in range(10_000)]
        k = 0
        while time.monotonic() < until:
            started = time.monotonic()
            backlog += plan.get(step, [])
            waiting: list[tuple[str, str]] = []
            for kind, name in backlog:
                if name in self.held:
                    waiting.append((kind, name))
                else:
                    await self.event(kind, name)
            backlog = waiting
            for name in BASE_MID:
                await self.step_asset(name)
            for _ in range(self.rng.randint(1, 4)):
                record = None
                while record is None:
                    record = self.hostile.make(order[k], self.market)
                    if record is None:
                        self.sent.skipped_valid += 1
                    k += 1
                await self.send_hostile(record)
            await self.kafka.flush()
            step += 1
            await asyncio.sleep(max(0.0, STEP_S - (time.monotonic() - started)))
        await self.settle()

    async def event(self, kind: str, name: str) -> None:
        rng, market = self.rng, self.market
        mid = market.mid[name]
        # towards the start when away from it, else either way while the jump fits the range
        up = mid < BASE_MID[name] or (rng.random() < 0.5 and mid * 13 < BASE_MID[name] * 20)
        if kind == "move":  # within the band: delivered at once, liquidates high leverage
            size = rng.uniform(0.03, 0.06)  # with the steps after it, still within the band
            market.mid[name] = market.moved(name, 1 + size if up else 1 - size)
            self.sent.moves += 1
            await self.tick(name, market.mid[name])
        elif kind == "jump":  # beyond the band, confirmed by the asset's next tick
            size = rng.uniform(BAND + 0.02, BAND + 0.15)
            bid = market.moved(name, 1 + size if up else 1 / (1 + size))
            if abs(bid - mid) * 10_000 <= BOUNDS.max_tick_jump_bps * mid:
                return  # clamped into the band: nothing to confirm
            market.mid[name] = bid
            self.sent.confirmed_jumps += 1
            await self.tick(name, bid)
            self.held[name] = (time.monotonic() + HOLD_S, bid + rng.randint(-2, 2))
        else:  # a spike beyond the band that the next tick (the old price) does not confirm
            asset = ASSETS[name]
            factor = rng.choice([rng.uniform(1.15, 3.0), rng.uniform(0.05, 0.85), 1000.0])
            bid = min(max(1, round(mid * factor)), asset.max_price_ticks - 1)
            self.sent.spikes += 1
            await self.tick(name, bid)
            self.held[name] = (time.monotonic() + HOLD_S, mid)

    async def step_asset(self, name: str) -> None:
        """The asset's tick of this step: the one after a jump once HOLD_S passed, nothing
        while it waits, else a small random move (pulled back towards the start)."""
        market = self.market
        if name in self.held:
            at, bid = self.held[name]
            if time.monotonic() < at:
                return
            del self.held[name]
            market.mid[name] = bid
        else:
            pull = (BASE_MID[name] - market.mid[name]) / BASE_MID[name] * 0.005
            market.mid[name] = market.moved(name, 1 + self.rng.gauss(pull, 0.001))
        self.sent.valid_ticks += 1
        await self.tick(name, market.mid[name])

    async def settle(self) -> None:
        """End with every asset's tick delivered: what waits after a jump is sent now."""
        while self.held:
            await asyncio.sleep(max(0.0, min(at for at, _ in self.held.values())
                                    - time.monotonic()))
            for name in list(self.held):
                await self.step_asset(name)
        await self.kafka.flush()


# ----------------------------------------------------------------------------- the clients
class Trader:
    """One client trading over HTTP; remembers what it was acknowledged and every answer."""

    def __init__(self, url: str, key: str, rng: random.Random, market: Market) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {key}"}
        self.rng = rng
        self.market = market
        self.opened: dict[str, dict[str, Any]] = {}  # positionId -> the open's answer
        self.closed: dict[str, dict[str, Any]] = {}  # positionId -> the close's answer
        self.open_ids: list[str] = []  # acknowledged, not known closed
        self.answers: Counter[str] = Counter()  # "open 201", "close 404", ...
        self.failures: list[str] = []  # 5xx answers, requests without an answer
        self.n = 0

    def open_body(self) -> dict[str, Any]:
        rng = self.rng
        name = rng.choice(list(BASE_MID))
        asset = ASSETS[name]
        side = rng.choice(["long", "short"])
        body: dict[str, Any] = {
            "asset": name, "type": side,
            "margin": rng.choice(["5", "10", "25", "50", "100", "150.5", "12.345678"]),
            "leverage": rng.choice([1, 2, 3, 5, 10, 20, 25, 50, 75, 100])}
        mid = self.market.mid[name]
        sign = 1 if side == "long" else -1
        if rng.random() < 0.4:
            body["takeProfit"] = asset.ticks_to_price(
                round(mid * (1 + sign * rng.uniform(0.002, 0.04))))
        if rng.random() < 0.4:
            body["stopLoss"] = asset.ticks_to_price(
                round(mid * (1 - sign * rng.uniform(0.002, 0.04))))
        if rng.random() < 0.1:
            body["currentPrice"] = asset.ticks_to_price(mid)
            body["maxSlippageBps"] = rng.choice([1, 50, 500])
        if rng.random() < 0.05:  # refused: 4xx
            body[rng.choice(["leverage", "asset", "margin"])] = rng.choice(
                [0, 1000, "DOGE", "-5", "abc"])
        return body

    async def request(self, http: httpx.AsyncClient, what: str, path: str,
                      body: dict[str, Any] | None = None) -> httpx.Response | None:
        try:
            if body is None:
                r = await http.get(path, headers=self.headers)
            else:
                r = await http.post(path, json=body, headers=self.headers)
        except httpx.HTTPError as exc:
            self.failures.append(f"{what} {path} {body}: no answer ({exc!r})")
            return None
        self.answers[f"{what} {r.status_code}"] += 1
        if r.status_code >= 500:
            self.failures.append(f"{what} {path} {body}: {r.status_code} {r.text[:300]}")
        return r

    async def run(self, until: float) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as http:
            while time.monotonic() < until:
                self.n += 1
                roll = self.rng.random()
                if self.open_ids and roll < 0.35:
                    pid = self.open_ids.pop(self.rng.randrange(len(self.open_ids)))
                    r = await self.request(http, "close", "/api/v1/positions/close",
                                           {"positionId": pid, "clientOrderId": f"c{self.n}"})
                    if r is not None and r.status_code == 200:
                        self.closed[pid] = r.json()
                elif roll < 0.45:
                    await self.request(http, "state", "/api/v1/state")
                else:
                    body = self.open_body()
                    body["clientOrderId"] = f"o{self.n}"
                    r = await self.request(http, "open", "/api/v1/positions/open", body)
                    if r is not None and r.status_code == 201:
                        self.opened[r.json()["positionId"]] = r.json()
                        self.open_ids.append(r.json()["positionId"])
                await asyncio.sleep(self.rng.uniform(0.03, 0.12))


# ----------------------------------------------------------------------------- reading
def metric_values(url: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of the Prometheus counter ``name`` at ``/metrics``."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf"^{name}\{{(.*)\}} (\S+)$", text, re.MULTILINE)}


def feed_drops(url: str) -> dict[str, int]:
    """``shardex_feed_dropped_total`` by reason (retried while the feed does not answer)."""
    deadline = time.monotonic() + 20
    while True:
        values = metric_values(url, "shardex_feed_dropped_total")
        if values:
            return {re.sub(r'reason="(.*)"', r"\1", k): int(v) for k, v in values.items()}
        assert time.monotonic() < deadline, "no feed drop counters in /metrics"
        time.sleep(0.5)


def server_errors(url: str) -> dict[str, float]:
    """HTTP answers with a 5xx status, by route and status, as the API counted them."""
    return {k: v for k, v in metric_values(url, "shardex_http_responses_total").items()
            if re.search(r'status="5\d\d"', k)}


def closes_by_reason(url: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for labels, n in metric_values(url, "shardex_closes_total").items():
        reason = re.search(r'reason="(\w+)"', labels)
        assert reason is not None
        out[reason.group(1)] += int(n)
    return out


def books(accounts: list[Account]) -> list[tuple[set[str], list[dict[str, Any]],
                                                 dict[str, Any]]]:
    """Per account: the open position ids, the history, the balances."""
    out = []
    for account in accounts:
        state = account.state()
        out.append(({p["positionId"] for p in state["positions"]}, account.history(),
                    state["balances"]))
    return out


def check_acknowledged(trader: Trader, still_open: set[str],
                       history: list[dict[str, Any]]) -> None:
    """Every acknowledged open is open or closed (by its client, or by a trigger), and every
    acknowledged close is in the history, as it was answered."""
    closed = {c["positionId"]: c for c in history}
    assert len(closed) == len(history), "a position closed twice"
    assert not still_open & set(closed), still_open & set(closed)
    lost = set(trader.opened) - still_open - set(closed)
    assert not lost, f"acknowledged opens gone: {sorted(lost)}"
    for pid, answer in trader.closed.items():
        assert pid in closed, f"acknowledged close {pid} not in the history"
        assert closed[pid] == answer, (answer, closed[pid])
        assert answer["closeReason"] == "manual"
    for pid in set(trader.opened) & set(closed) - set(trader.closed):
        assert closed[pid]["closeReason"] in TRIGGER_REASONS, closed[pid]


def settled(accounts: list[Account], timeout_s: float = 20.0) -> None:
    """Until every account's books balance (closes by a tick reach the ledger through the
    courier, a little after the shard closed them)."""
    deadline = time.monotonic() + timeout_s
    problems = [books_balance(a) for a in accounts]
    while any(problems) and time.monotonic() < deadline:
        time.sleep(0.25)
        problems = [books_balance(a) for a in accounts]
    assert not any(problems), problems


