"""``GET /metrics`` as Prometheus reads it, and ``GET /healthz`` naming what failed."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from cluster.actors.port import LocalPort
from cluster.actors.port import Port
from cluster.http import api
from cluster.http.api import create_app
from cluster.trading import service
from engine.messages import CloseOrder
from engine.messages import OpenPosition
from engine.shard_machine import Stats
from prometheus_client.parser import text_string_to_metric_families
from tests.unit.cluster.faulty_ports import Down
from tests.unit.cluster.faulty_ports import Wrapped
from tests.unit.cluster.local_platform import Platform
from tests.unit.cluster.local_platform import build_platform
from tests.unit.cluster.local_platform import sol_long
from tests.unit.cluster.local_platform import sol_trader

pytestmark = pytest.mark.asyncio

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# the names README gives
DOCUMENTED = ("shardex_closes_total", "shardex_http_connections_refused_total",
              "shardex_http_unread_dropped_total",
              "shardex_service_events_total", "shardex_ws_account_malformed_total",
              "shardex_ws_account_tail_missed_total", "shardex_ws_account_unauthenticated_total")
ODD_REASON = 'a "quoted"\\ reason\non two lines'  # a drop reason the feed names oddly


async def _feed_stats() -> dict[str, Any]:
    return {"dropped": {"stale": 2, ODD_REASON: 1}, "ticks_refused_by_shards": 3,
            "consumed": 40, "conflated_batch": 30, "conflated_pending": 4, "repositions": 2}


@pytest_asyncio.fixture
async def platform() -> AsyncIterator[tuple[Platform, httpx.AsyncClient]]:
    p = build_platform()
    svc = p.hosts.service(feed_stats=_feed_stats)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)),
                                 base_url="http://api") as http:
        try:
            yield p, http
        finally:
            await svc.aclose()
            await p.service.aclose()
            p.hosts.close()


def _families(text: str) -> dict[str, tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]],
                                                   float]]]:
    """family name -> (type, {(sample name, labels): value}), checked line by line first:
    each family's HELP and TYPE once, before its samples, and its samples in one group."""
    seen: dict[str, dict[str, int]] = {}
    order: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            kind, name = line.split(" ", 3)[1:3]
            assert kind in ("HELP", "TYPE") and NAME.fullmatch(name), line
            counts = seen.setdefault(name, {"HELP": 0, "TYPE": 0, "samples": 0})
            assert counts["samples"] == 0, f"{kind} of {name} after its samples"
            counts[kind] += 1
            order.append(name)
            continue
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        assert NAME.fullmatch(name), line
        assert name in seen, f"a sample of {name} with no TYPE before it"
        seen[name]["samples"] += 1
        order.append(name)
    for name, counts in seen.items():
        assert counts["HELP"] == counts["TYPE"] == 1, (name, counts)
    grouped = [name for i, name in enumerate(order) if i == 0 or order[i - 1] != name]
    assert len(grouped) == len(set(grouped)), f"a family in two groups: {grouped}"
    out: dict[str, tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for family in text_string_to_metric_families(text):
        assert family.type in ("counter", "gauge"), (family.name, family.type)
        assert family.documentation, family.name
        assert family.name not in out, family.name
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"series twice: {key}"
            if family.type == "counter":
                assert s.name.endswith("_total"), s.name
            samples[key] = s.value
        out[family.name] = (family.type, samples)
    return out


def _value(families: dict[str, Any], name: str, **labels: str) -> float:
    family = name.removesuffix("_total")
    return float(families[family][1][(name, tuple(sorted(labels.items())))])


async def _scrape(http: httpx.AsyncClient) -> dict[str, Any]:
    r = await http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return _families(r.text)


async def test_metrics_are_prometheus_text_and_count_what_happened(
        platform: tuple[Platform, httpx.AsyncClient]) -> None:
    """Every family with its HELP and TYPE, its samples in one group (the samples of the batch
    counters and of the shards came interleaved, family after family per shard: a parser takes
    each later group as a family of unknown type), label values escaped; the counters only go
    up, and a manual close counts in ``shardex_closes_total``'s ``manual``."""
    p, http = platform
    before = await _scrape(http)
    for name in DOCUMENTED:
        assert name.removesuffix("_total") in before, name
    assert _value(before, "shardex_feed_dropped_total", reason=ODD_REASON) == 1
    assert _value(before, "shardex_feed_ticks_refused_by_shards_total") == 3
    # every record read is accounted for: those passed over undecoded are not dropped ones
    assert _value(before, "shardex_feed_records_total") == 40
    assert _value(before, "shardex_feed_conflated_total", stage="batch") == 30
    assert _value(before, "shardex_feed_conflated_total", stage="pending") == 4
    # and what was never read: a partition created again (a trim) is read from its newest
    assert _value(before, "shardex_feed_partitions_restarted_total") == 2
    who = await sol_trader(p)
    pos = await p.service.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    await p.service.close_position(who, CloseOrder(pos.position_id))
    await asyncio.sleep(api.ACTORS_READ_REUSE_S)  # the shards' counters are read again
    after = await _scrape(http)
    manual = {"shard": "shard-SOL-0", "reason": "manual"}
    assert _value(after, "shardex_closes_total", **manual) \
        == _value(before, "shardex_closes_total", **manual) + 1
    for name, (kind, samples) in before.items():
        if kind == "counter":
            for key, value in samples.items():
                assert after[name][1].get(key, value) >= value, (key, value)


async def test_a_method_http_does_not_define_is_counted_as_other(
        platform: tuple[Platform, httpx.AsyncClient]) -> None:
    """Each method a client made up was a series of its own, kept for good: one label value
    per request a client sends with a new method is a replica's memory and every scrape's
    size, unbounded."""
    _, http = platform
    for method in ("FOO", "BAR", "GET"):
        await http.request(method, "/healthz")
    families = await _scrape(http)
    methods = {dict(labels)["method"] for _, labels in families["shardex_http_responses"][1]}
    assert methods == {"GET", "other"}, methods


async def test_healthz_names_exactly_the_components_that_failed_within_its_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger and a shard down, the feed hanging, the broker failing: a 503 in the error
    shape naming those four and no other, in about the health bound; HEAD answers the same."""
    monkeypatch.setattr(service, "HEALTH_TIMEOUT_S", 0.1)
    monkeypatch.setattr(api, "HEALTH_TIMEOUT_S", 0.1)
    p = build_platform()

    async def hangs() -> bool:
        await asyncio.sleep(60)
        return True

    async def fails() -> bool:
        raise ConnectionError("refused")

    def down(port: LocalPort) -> Port:
        return Down(port, down=True)

    svc = p.hosts.service(wrap=lambda port: Down(port, down="BTC" in port.name),
                          wrap_ledger=down, health_checks={"feed": hangs, "broker": fails})
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)),
                                     base_url="http://api") as http:
            r = await asyncio.wait_for(http.get("/healthz"), 1.0)
            head = await asyncio.wait_for(http.head("/healthz"), 1.0)
        assert r.status_code == head.status_code == 503 and head.content == b""
        body = r.json()
        assert body["status"] == "unavailable" and body["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert {k for k, v in body["components"].items() if v != "ok"} \
            == {"ledger", "shard-BTC-0", "feed", "broker"}, body
        assert body["error"]["message"] == ("ledger: unavailable; shard-BTC-0: unavailable; "
                                            "feed: unavailable; broker: error: ConnectionError")
    finally:
        await svc.aclose()
        await p.service.aclose()
        p.hosts.close()


class Counted(Down):
    """Counts the pings (as Down does) and the reads of the shard's counters."""

    def __init__(self, inner: Port) -> None:
        super().__init__(inner)
        self.stats_reads = 0

    async def execute(self, commands: list[Any]) -> list[Any]:
        self.stats_reads += sum(isinstance(c, Stats) for c in commands)
        return await super().execute(commands)


async def test_a_flood_of_health_and_metrics_reads_asks_the_actors_once_a_moment() -> None:
    """/healthz and /metrics ask every actor (a ping, the counters), and any client may ask:
    20 of each at once, and every one in the ACTORS_READ_REUSE_S after, cost each actor one
    ping and each shard and the feed one read of their counters; the next ones ask again.
    The prices /healthz shows are read per request: a tick within that time shows."""
    p = build_platform()
    ports: dict[str, Counted] = {}
    feed_reads = 0

    def counted(port: LocalPort) -> Port:
        ports[port.name] = Counted(port)
        return ports[port.name]

    async def feed_stats() -> dict[str, Any]:
        nonlocal feed_reads
        feed_reads += 1
        return await _feed_stats()

    svc = p.hosts.service(wrap=counted, wrap_ledger=counted, feed_stats=feed_stats)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)),
                                     base_url="http://api") as http:
            answers = await asyncio.gather(*(http.get(path)
                                             for path in ("/healthz", "/metrics") * 20))
            assert all(r.status_code == 200 for r in answers), answers
            assert (await http.get("/healthz")).json()["components"]["ledger"] == "ok"
            await p.push_tick("SOL", "100.00", "100.01")
            assert "SOL" in (await http.get("/healthz")).json()["feedSources"]
            shards = [port for name, port in ports.items() if name != "ledger"]
            assert {port.pings for port in ports.values()} == {1} and len(ports) == 4
            assert {port.stats_reads for port in shards} == {1} and feed_reads == 1
            await asyncio.sleep(api.ACTORS_READ_REUSE_S)
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/metrics")).status_code == 200
            assert {port.pings for port in ports.values()} == {2}
            assert {port.stats_reads for port in shards} == {2} and feed_reads == 2
    finally:
        await svc.aclose()
        await p.service.aclose()
        p.hosts.close()


class Faulty(Wrapped):
    """While ``faulty`` is set, every batch raises an error of the host's own (a bug: Ray
    passes it on as a RayTaskError, which is no Unavailable)."""

    def __init__(self, inner: Port) -> None:
        super().__init__(inner)
        self.faulty = True

    async def execute(self, commands: list[Any]) -> list[Any]:
        if self.faulty:
            raise RuntimeError("a bug in the host")
        return await self.inner.execute(commands)


async def test_a_shard_failing_with_its_own_error_is_down_in_metrics_not_a_500() -> None:
    """The SOL shard's every call raising: /metrics answers, the shard's ``shardex_shard_up``
    0 and the others' 1. Its counters' read raised through the route, so one shard with a
    bug was a 500 and every other figure of the replica went unscraped."""
    p = build_platform()
    ports: dict[str, Faulty] = {}

    def faulty(port: LocalPort) -> Port:
        if "SOL" not in port.name:
            return port
        ports[port.name] = Faulty(port)
        return ports[port.name]

    svc = p.hosts.service(wrap=faulty)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)),
                                     base_url="http://api") as http:
            families = await _scrape(http)
        up = {dict(labels)["shard"]: value
              for (_, labels), value in families["shardex_shard_up"][1].items()}
        assert up == {"shard-SOL-0": 0, "shard-BTC-0": 1, "shard-ETH-0": 1}, up
    finally:
        await svc.aclose()
        await p.service.aclose()
        p.hosts.close()


async def test_an_internal_error_is_counted_as_a_500_response() -> None:
    """A request that ends in an error nothing handles (a shard's bug under
    ``/api/v1/prices``) is answered 500 and counted under its route with status 500; the 500
    was sent outside the counter, so the responses operators alert on were never counted."""
    p = build_platform()
    ports: list[Faulty] = []

    def faulty(port: LocalPort) -> Port:
        ports.append(Faulty(port))
        return ports[-1]

    svc = p.hosts.service(wrap=faulty)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(
                app=create_app(svc), raise_app_exceptions=False), base_url="http://api") as http:
            assert (await http.get("/api/v1/prices")).status_code == 500
            for port in ports:
                port.faulty = False
            families = await _scrape(http)
        assert _value(families, "shardex_http_responses_total", method="GET",
                      path="/api/v1/prices", status="500") == 1
    finally:
        await svc.aclose()
        await p.service.aclose()
        p.hosts.close()
