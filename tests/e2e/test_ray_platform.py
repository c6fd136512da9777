"""The platform on Ray over real HTTP: Serve (direct ingress), Kafka-driven prices, actors.

A smoke scenario (account -> open -> liquidation by a produced tick -> history -> audit), then
the whole SPEC trading, order, position-change, candle and stream scenario suites
(``test_api_trading``, ``test_api_orders``, ``test_api_position_changes``, ``test_api_klines``,
``test_api_streams``) run again against this platform (the same test functions, collected here
with this module's ``platform`` fixture).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import socket
import time
from collections.abc import Callable
from collections.abc import Iterator
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from aiokafka import AIOKafkaConsumer
from aiokafka import AIOKafkaProducer
from cluster.live.topic_auth import MAC_HEADER
from cluster.live.topic_auth import new_secret
from cluster.live.topic_auth import sign
from engine.account_events import BALANCE
from engine.account_events import AccountEvent
from engine.account_events import Balance
from engine.ledger_machine import encode_account_events
from tests.e2e import test_api_errors as _errors
from tests.e2e import test_api_klines as _klines
from tests.e2e import test_api_limits as _limits
from tests.e2e import test_api_orders as _orders
from tests.e2e import test_api_position_changes as _changes
from tests.e2e import test_api_streams as _streams
from tests.e2e import test_api_trading as _trading
from tests.e2e.api_client import open_position
from tests.e2e.api_client import raw_answer
from tests.e2e.api_client import signup
from tests.e2e.api_client import state
from tests.e2e.api_client import tick
from tests.e2e.api_client import wait_closed
from tests.e2e.ray_platform import RayHttpPlatform

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def platform(kafka_broker: str) -> Iterator[RayHttpPlatform]:
    p = RayHttpPlatform(kafka_broker, topic=f"ray-e2e-{os.getpid()}",
                        ray_init={"_node_ip_address": "127.0.0.1"})
    p.start()
    try:
        yield p
    finally:
        p.stop()


def test_smoke_open_liquidate_history_audit_through_serve_and_kafka(
        platform: RayHttpPlatform, http: httpx.Client) -> None:
    health = http.get("/healthz")
    assert health.status_code == 200, health.text
    assert set(health.json()["components"]) >= {"ledger", "feed", "broker", "shard-SOL-0"}
    h = signup(http)
    tick(platform, http, "SOL", "200.00", "200.02")  # produced to Kafka, via the feed actor
    p = open_position(http, h, asset="SOL", type="long", margin="50", leverage=20)
    assert D(p["entryPrice"]) == D("200.02")
    sources = http.get("/healthz").json()["feedSources"]
    assert sources["SOL"] == http.get("/api/v1/prices").json()["SOL"]["source"]
    liq = D(p["liquidationPrice"])
    s = state(http, h)
    assert D(s["balances"]["margin"]) == 50 and len(s["positions"]) == 1
    started = time.monotonic()
    tick(platform, http, "SOL", str(liq), str(liq + D("0.01")))
    closed = wait_closed(http, h, p["positionId"])
    assert closed["closeReason"] == "liquidation"
    assert D(closed["exitPrice"]) == liq and D(closed["payout"]) == 0
    assert time.monotonic() - started < 10
    history = http.get("/api/v1/positions/history", headers=h).json()["positions"]
    assert [c["positionId"] for c in history] == [p["positionId"]]
    s = state(http, h)
    assert s["positions"] == [] and D(s["balances"]["margin"]) == 0
    assert D(s["balances"]["free"]) == D("10000") - 50
    assert platform.audit() == []
    totals = platform.totals()
    assert totals["sum_micros"] == 0 and int(str(totals["closed_positions"])) >= 1


def test_account_events_are_published_to_their_topic_keyed_by_account(
        platform: RayHttpPlatform, http: httpx.Client) -> None:
    """What the account stream carries is on the Kafka topic every replica follows: the
    account's events all under one key, numbered 1, 2, 3... in order, the open among them."""
    h = signup(http)
    tick(platform, http, "SOL", "200.00", "200.02")
    p = open_position(http, h, asset="SOL", type="long", margin="40", leverage=10)

    async def read() -> list[tuple[bytes, dict[str, Any]]]:
        consumer = AIOKafkaConsumer(platform.settings.account_topic,
                                    bootstrap_servers=platform.bootstrap, group_id=None,
                                    auto_offset_reset="earliest")
        await consumer.start()
        messages: list[tuple[bytes, dict[str, Any]]] = []
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    messages.extend((r.key, event) for r in records
                                    for event in json.loads(r.value))
                if any(m["kind"] == "positionOpened" and p["positionId"] in str(m["body"])
                       for _, m in messages):
                    break
        finally:
            await consumer.stop()
        return messages

    messages = asyncio.run(read())
    user = next(m["user"] for _, m in messages
                if m["kind"] == "positionOpened" and p["positionId"] in str(m["body"]))
    mine = [(k, m) for k, m in messages if m["user"] == user]
    assert [m["seq"] for _, m in mine] == list(range(1, len(mine) + 1))
    assert [m["kind"] for _, m in mine] == ["balance", "balance", "positionOpened"]
    assert {k for k, _ in mine} == {f"accounts-{user % 16}".encode()}


def _account_counter(http: httpx.Client, name: str) -> int:
    """``shardex_ws_account_<name>_total`` of ``/metrics``."""
    line = f"shardex_ws_account_{name}_total "
    text = http.get("/metrics").text
    return int(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])


Record = tuple[bytes, bytes, list[tuple[str, bytes]]]  # key, value, headers


def _dropped_before_the_next_events(platform: RayHttpPlatform, http: httpx.Client,
                                    h: dict[str, str], counter: str,
                                    records: Callable[[int, int], list[Record]]
                                    ) -> list[dict[str, Any]]:
    """Produce ``records(user, seq)`` (``seq``: the newest of ``h``'s stream) to the account
    topic, then open a position: the stream's next frames are the ledger's (its ``balance``,
    then ``positionOpened``) and ``shardex_ws_account_<counter>_total`` rises by one per
    record. Returns those two frames' data."""
    from cluster.actors.deploy import service_from_names

    service = service_from_names(platform.settings, namespace=platform.platform.namespace)

    async def scenario() -> list[dict[str, Any]]:
        who = await service.authenticate(_streams.api_key(h))
        assert who is not None
        async with _streams.account_stream(platform, h) as ws:
            (snap,) = await _streams.account_frames(ws, 1)
            before = await asyncio.to_thread(_account_counter, http, counter)
            sent = records(who.user, snap["seq"])
            producer = AIOKafkaProducer(bootstrap_servers=platform.bootstrap)
            await producer.start()
            try:
                for key, value, headers in sent:
                    await producer.send_and_wait(platform.settings.account_topic, value,
                                                 key=key, headers=headers)
            finally:
                await producer.stop()
            opened = await asyncio.to_thread(open_position, http, h, asset="SOL",
                                             type="short", margin="5", leverage=2)
            got = await _streams.account_frames(ws, 2)
            assert [(g["seq"], g["event"]) for g in got] == [
                (snap["seq"] + 1, "balance"), (snap["seq"] + 2, "positionOpened")]
            assert got[1]["positionId"] == opened["positionId"]
            deadline = time.monotonic() + 10
            while await asyncio.to_thread(_account_counter, http, counter) < before + len(sent):
                assert time.monotonic() < deadline, f"the {counter} messages were not counted"
                await asyncio.sleep(0.1)
            return got

    return asyncio.run(scenario())


def test_malformed_messages_on_the_account_topic_are_dropped_and_counted(
        platform: RayHttpPlatform, http: httpx.Client) -> None:
    """Messages on the account topic that are not account events (signed with the run's
    secret, as only the ledger's host could) change no stream: they are dropped and counted,
    and the account's own events still arrive, in order."""
    h = signup(http)
    tick(platform, http, "SOL", "200.00", "200.02")
    garbage = [b"not json", b"{}", b'[{"kind":"balance","user":"1","seq":1,"version":1}]',
               b'[{"kind":"positionOpened","user":1,"seq":-5,"version":1,"body":[]}]',
               b'[{"kind":"exploded","user":1,"seq":1,"version":1,"body":[1,2]}]',
               b'[{"kind":"balance","user":1,"seq":1,"version":1,"body":["a","b"]}]']
    secret = platform.platform.account_secret
    _dropped_before_the_next_events(platform, http, h, "malformed", lambda user, seq: [
        (b"accounts-1", value, [(MAC_HEADER, sign(secret, b"accounts-1", value))])
        for value in garbage])


def test_account_events_not_signed_by_the_ledger_never_reach_a_stream(
        platform: RayHttpPlatform, http: httpx.Client) -> None:
    """Anyone who can produce to the Kafka can write to the account topic: well-formed events
    with the account's next seqs, unsigned or signed with another secret, are dropped and
    counted, and the ledger's own events with those seqs reach the stream instead."""
    h = signup(http)
    tick(platform, http, "SOL", "200.00", "200.02")

    def forged(user: int, seq: int) -> list[Record]:
        fake = Balance(10**15, 0)
        [(key, value)] = encode_account_events(
            [AccountEvent(user, seq + n, 1, BALANCE, fake) for n in (1, 2)])
        return [(key, value, []),
                (key, value, [(MAC_HEADER, sign(new_secret(), key, value))])]

    got = _dropped_before_the_next_events(platform, http, h, "unauthenticated", forged)
    balances = state(http, h)["balances"]
    assert (D(got[0]["free"]), D(got[0]["margin"])) == (D(balances["free"]), 5)


def test_metrics_count_the_feed_drops_by_reason(platform: RayHttpPlatform,
                                                http: httpx.Client) -> None:
    def dropped(reason: str) -> int:
        text = http.get("/metrics").text
        line = f'shardex_feed_dropped_total{{reason="{reason}"}} '
        return int(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])

    before = dropped("stale")
    platform.produce_stale("SOL")  # a well-formed message an hour old, through Kafka
    deadline = time.monotonic() + 10
    while dropped("stale") == before:
        assert time.monotonic() < deadline, "the stale message was not counted"
        time.sleep(0.1)


def test_state_reads_come_from_the_replicas_view_marked_at_the_feeds_newest_price(
        platform: RayHttpPlatform, http: httpx.Client) -> None:
    def served(event: str) -> int:
        line = f'shardex_service_events_total{{event="{event}"}} '
        text = http.get("/metrics").text
        return int(next((x for x in text.splitlines() if x.startswith(line)), line + "0")
                   .split()[-1])

    h = signup(http)
    tick(platform, http, "ETH", "3000.00", "3000.02")
    p = open_position(http, h, asset="ETH", type="short", margin="100", leverage=10)
    state(http, h)  # the first read loads the replica's view of the account
    views = served("view_reads")
    tick(platform, http, "ETH", "2990.00", "2990.02")
    # the replica's view answers once it has the feed's newest prices (a long poll of the feed
    # actor, started by the first read that needed them), marked as the shard marks
    expected = ((D(p["entryPrice"]) - D("2990.02")) * D(p["quantity"])).quantize(D("0.000001"))
    deadline = time.monotonic() + 5
    while True:
        s = state(http, h)
        answered_by_view = served("view_reads") > views  # (one client: this read's count)
        if answered_by_view and D(s["positions"][0]["unrealizedPnl"]) == expected:
            break
        views = served("view_reads")
        assert time.monotonic() < deadline, (s, expected, views)
        time.sleep(0.05)
    assert D(s["balances"]["equity"]) == D("10000") + expected
    closed = http.post("/api/v1/positions/close", json={"positionId": p["positionId"]},
                       headers=h)
    assert closed.status_code == 200, closed.text
    s = state(http, h)  # the client's own write, read back at once
    assert s["positions"] == [] and D(s["balances"]["margin"]) == 0


def test_the_replicas_http_server_refuses_a_request_head_over_64_kib(
        platform: RayHttpPlatform, http: httpx.Client) -> None:
    """Serve builds the replica's server; the platform's settings reach it
    (cluster.http.server): an endless header is answered 431 once 64 KiB have arrived."""
    head = _limits.HEAD_CASES["one header"]
    port = int(platform.base_url.rsplit(":", 1)[1])
    answer = raw_answer(port, (head[i:i + 4096] for i in range(0, len(head), 4096)))
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b'{"error":{"code":"INVALID_REQUEST"' in answer, answer[-200:]
    assert http.get("/api/v1/assets").status_code == 200


def test_the_replicas_server_logs_a_request_its_parser_refuses(platform: RayHttpPlatform) -> None:
    """Serve sets uvicorn's logger to CRITICAL before it builds the replica's server, which
    silenced the warning for a request the parser refuses (and uvicorn's errors): the log had
    none of the one a minute cluster.http.server lets through. It is in the replica's
    ``.err`` file among the Ray session's logs."""
    port = int(platform.base_url.rsplit(":", 1)[1])
    answer = raw_answer(port, iter([_limits.MALFORMED_HTTP["two lengths"]]))
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())

    def logged() -> bool:
        return any("Invalid HTTP request received." in err.read_text(errors="replace")
                   for err in logs.glob("worker-*.err"))

    deadline = time.monotonic() + 10  # Ray's log files are written by the process itself
    while not logged():
        assert time.monotonic() < deadline, sorted(p.name for p in logs.glob("worker-*.err"))
        time.sleep(0.2)


def test_a_declared_body_over_the_limit_is_refused_before_the_client_is_told_to_send_it(
        platform: RayHttpPlatform) -> None:
    """Serve's ingress reads a body before the app sees it, so a client that sent `Expect:
    100-continue` with a length over the limit was told to go on (100 Continue), and the 413
    came once it had begun to send what is refused; the replica's server now answers it as
    the head ends."""
    port = int(platform.base_url.rsplit(":", 1)[1])
    answer = raw_answer(port, iter([
        b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: 100000000\r\n\r\n"]))
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert answer.endswith(b'{"error":{"code":"INVALID_REQUEST","message":"request body '
                           b'larger than 16384 bytes"}}'), answer[-200:]


# Serve's replica server, not the app, decides that a HEAD answer has no body
test_head_answers_what_get_would_without_a_body_on_ray = \
    _errors.test_head_answers_what_get_would_without_a_body


def test_requests_stalled_in_their_bodies_hold_no_other_request_back(
        platform: RayHttpPlatform, http: httpx.Client) -> None:
    """4,200 requests whose bodies never come (each counts as a request in flight from the end
    of its head until the read deadline, 30 s, closes it) are more than Serve's default
    bound on requests in flight of 4,096; another client is still answered at once. They come
    from 21 loopback addresses, 200 each: a client address holds at most HTTP_CONNECTIONS
    (256), and a single replica counts 127.0.0.1's too (no front door in front of it)."""
    port = int(platform.base_url.rsplit(":", 1)[1])
    stalled: list[socket.socket] = []
    try:
        for n in range(4200):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                            source_address=(f"127.0.1.{n // 200 + 1}", 0))
            stalled.append(sock)
            sock.sendall(b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(1.0)  # the replica reads every head meanwhile
        start = time.monotonic()
        r = http.get("/api/v1/assets", timeout=25)
        took = time.monotonic() - start
        assert r.status_code == 200, r.text
        assert took < 10, f"answered after {took:.1f} s: it waited behind the stalled requests"
    finally:
        for sock in stalled:
            sock.close()


# The SPEC trading, order, position-change, candle and stream scenarios, again on Ray (same
# functions; this module's `platform` fixture, prices produced to the topic, candles built by
# the feed actor, streams through Serve's direct ingress); those that start a platform of their
# own stay local.
for _module in (_trading, _orders, _changes, _klines, _streams):
    for _name in dir(_module):
        _test = getattr(_module, _name)
        if _name.startswith("test_") and {"platform", "http"} & set(
                inspect.signature(_test).parameters):
            globals()[f"{_name}_on_ray"] = _test
del _module, _name, _test
