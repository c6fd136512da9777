"""The Backpack client against a real WebSocket server on loopback that plays Backpack.

The server replays the recorded fixture frames across three connections, interleaved with error
frames, garbage (deeply nested, binary, out of range), invalid bookTickers and a protocol ping,
drops the first connection abruptly and closes the second; the client must publish exactly the
valid bookTicker prices, in order, to a real (embedded) Kafka, reconnecting and resubscribing
each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import websockets
from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition
from cluster.config import Settings
from feed.backpack import BackpackClient
from feed.source import AutoSource
from feed.source import make_source
from feed.source import run_source
from websockets.asyncio.server import ServerConnection

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "backpack"
FRAMES = [ln for ln in (FIXTURES / "recorded_ws_frames.jsonl").read_text().splitlines() if ln]
ERRORS = [ln for ln in (FIXTURES / "error_frames.jsonl").read_text().splitlines() if ln]
BOOK = [json.loads(ln)["data"] for ln in FRAMES if json.loads(ln)["data"]["e"] == "bookTicker"]


def bad_book(**over: object) -> str:
    data = dict(BOOK[0])
    data.update(over)
    return json.dumps({"data": data, "stream": "bookTicker.SOL_USDC"})


class FakeBackpack:
    """Plays three connections; records every subscribe request and whether pings got pongs."""

    def __init__(self) -> None:
        self.subscribes: list[object] = []
        self.pong_ok: list[bool] = []
        self.connections = 0
        self.done = asyncio.Event()

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        n = self.connections
        self.subscribes.append(json.loads(await ws.recv()))
        if n == 1:
            await ws.send(ERRORS[1])
            await ws.send("}{ not json")
            await ws.send("[" * 100_000)  # once a RecursionError that ended the source
            await ws.send('{"data":' * 64 + "{}" + "}" * 64)
            await ws.send(bytes(range(256)) * 4)  # a binary frame of bytes, not UTF-8
            await ws.send(bad_book(T=2**64, u=BOOK[0]["u"] + 1))
            await ws.send(bad_book(a="9999999999.00", b="9999999999.00", u=BOOK[0]["u"] + 1))
            for line in FRAMES[:8]:
                await ws.send(line)
            await ws.send(bad_book(b=None, u=BOOK[3]["u"] + 1))
            await ws.send(bad_book(b="99.99", u=BOOK[3]["u"] + 1))
            pong = await ws.ping()
            try:
                await asyncio.wait_for(pong, 5)
                self.pong_ok.append(True)
            except TimeoutError:
                self.pong_ok.append(False)
            await ws.send(bad_book(u=BOOK[0]["u"] - 1))  # older update id
            await asyncio.sleep(0.3)
            ws.transport.abort()  # drop mid-stream, no close handshake
            return
        if n == 2:
            for line in FRAMES[8:14]:
                await ws.send(line)
            await ws.close(1001, "going away")
            return
        for line in FRAMES[14:]:
            await ws.send(line)
        self.done.set()
        await ws.wait_closed()


def served_client(server: Any, **options: float) -> BackpackClient:
    """A client of ``server`` (a loopback websockets server; ``options``: its backoff and
    timings)."""
    return BackpackClient(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}",
                          Settings().assets, **options)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_client_publishes_exactly_the_valid_prices_in_order(kafka_broker: str) -> None:
    fake = FakeBackpack()
    topic = f"ws-{uuid.uuid4().hex[:8]}"
    async with websockets.serve(fake.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}"
        settings = Settings(backpack_ws_url=url)
        client = BackpackClient(url, settings.assets, backoff_initial_s=0.05, backoff_max_s=0.2)
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_source(settings, stop, bootstrap=kafka_broker, topic=topic, source=client))
        await asyncio.wait_for(fake.done.wait(), 30)
        await asyncio.sleep(0.3)
        stop.set()
        result = await asyncio.wait_for(task, 10)

    assert fake.connections == 3 and client.connects == 3
    expected_sub = {"method": "SUBSCRIBE",
                    "params": ["bookTicker.SOL_USDC", "bookTicker.BTC_USDC", "bookTicker.ETH_USDC"]}
    assert fake.subscribes == [expected_sub] * 3
    assert fake.pong_ok == [True]
    stats = client.stats()
    assert stats["error_frames"] == 1
    assert stats["dropped"] == {"malformed": 3, "too_deep": 2, "above_bound": 1, "null_side": 1,
                                "crossed": 1, "stale_seq": 1}
    assert result["published"] == len(BOOK) == 13

    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_broker, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(3)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        got: list[Any] = []
        while len(got) < 13:
            batch = await consumer.getmany(timeout_ms=2000)
            assert batch, f"only {len(got)} messages on the topic"
            for records in batch.values():
                got.extend(records)
    finally:
        await consumer.stop()
    assert {r.key for r in got} == {b"SOL_USDC"}
    values = [json.loads(r.value) for r in sorted(got, key=lambda r: r.offset)]
    assert [v["seq"] for v in values] == [d["u"] for d in BOOK]
    assert [v["ts_us"] for v in values] == [d["T"] for d in BOOK]
    assert [(v["bid"], v["ask"]) for v in values] == [(d["b"], d["a"]) for d in BOOK]
    assert all(v["source"] == "backpack" and v["symbol"] == "SOL_USDC" for v in values)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("first", ["silent", "frames that are not prices"])
async def test_a_stream_that_answers_pings_but_gives_no_price_is_made_again(first: str) -> None:
    """A server that keeps the connection alive (it answers pings) but stops feeding it prices,
    sending nothing or only error frames and garbage: the client closes it after
    ``silence_s`` with no price and subscribes on a new one. Before, it waited for ever with
    no price and no word; a server sending a frame a second that was not a price kept it so.
    Its close is not held by a peer that never answers it either."""
    connections: list[int] = []

    async def handler(ws: ServerConnection) -> None:
        connections.append(len(connections) + 1)
        await ws.recv()  # the subscribe
        if len(connections) == 1:
            # pings are answered by the library meanwhile
            if first == "silent":
                await ws.wait_closed()
                return
            with contextlib.suppress(websockets.exceptions.ConnectionClosed):
                while True:
                    for frame in (ERRORS[1], "}{ not json", bad_book(b="-1")):
                        await ws.send(frame)
                        await asyncio.sleep(0.05)
            return
        for data in BOOK[:3]:
            await ws.send(json.dumps({"data": data, "stream": f"bookTicker.{data['s']}"}))
        await ws.wait_closed()

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        client = served_client(server, backoff_initial_s=0.05, backoff_max_s=0.2,
                               ping_interval_s=0.2, silence_s=1.0)
        stop = asyncio.Event()
        started = asyncio.get_running_loop().time()
        messages = client.stream(stop)
        got = [await anext(messages) for _ in range(3)]
        elapsed = asyncio.get_running_loop().time() - started
        stop.set()
        assert [m async for m in messages] == []  # it ends once stopped
    assert connections == [1, 2] and client.connects == 2
    assert client.stats()["silences"] == 1 and client.last_error == "no price in 1 s"
    assert [m.seq for m in got] == [d["u"] for d in BOOK[:3]]
    assert 1.0 <= elapsed < 10, elapsed


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_credentials_in_the_url_are_sent_but_never_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    """A source URL may carry a user and password (a proxy's): they reach the server and are
    kept out of the log lines and the stats, which show ``***`` in their place."""
    auth: list[str | None] = []

    async def handler(ws: ServerConnection) -> None:
        auth.append(ws.request.headers.get("Authorization") if ws.request else None)
        await ws.recv()  # the subscribe
        data = BOOK[len(auth) - 1]
        await ws.send(json.dumps({"data": data, "stream": f"bookTicker.{data['s']}"}))
        # the first connection ends abruptly (a lost-connection warning), the second stays
        if len(auth) == 1:
            ws.transport.abort()
        await ws.wait_closed()

    caplog.set_level("INFO", logger="feed.backpack")
    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = BackpackClient(f"ws://trader:s3cret@127.0.0.1:{port}", Settings().assets,
                                backoff_initial_s=0.05, backoff_max_s=0.2)
        stop = asyncio.Event()
        messages = client.stream(stop)
        got = [await anext(messages) for _ in range(2)]
        stop.set()
        assert [m async for m in messages] == []
    assert [m.seq for m in got] == [d["u"] for d in BOOK[:2]]
    assert auth[0] is not None and auth[0].startswith("Basic ") and len(auth) == 2
    assert client.stats()["url"] == f"ws://***@127.0.0.1:{port}"
    assert any("lost" in r.getMessage() for r in caplog.records)
    assert any("connected to ws://***@127.0.0.1" in r.getMessage() for r in caplog.records)
    assert not any("s3cret" in r.getMessage() or "trader" in r.getMessage()
                   for r in caplog.records)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_refusal_with_retry_after_is_followed_and_error_frames_do_not_flood_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """A handshake refused 429 with ``Retry-After: 2``: the client comes back no sooner (its
    own backoff would retry within 0.1 s). A server that then sends 40 error frames gets them
    counted, and logged once."""
    attempts: list[float] = []
    loop = asyncio.get_running_loop()

    def process_request(conn: ServerConnection, request: Any) -> Any:
        attempts.append(loop.time())
        if len(attempts) == 1:
            response = conn.respond(429, "slow down\n")
            response.headers["Retry-After"] = "2"
            return response
        return None

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()  # the subscribe
        for _ in range(40):
            await ws.send(ERRORS[1])
        data = BOOK[0]
        await ws.send(json.dumps({"data": data, "stream": f"bookTicker.{data['s']}"}))
        await ws.wait_closed()

    caplog.set_level("INFO", logger="feed.backpack")
    async with websockets.serve(handler, "127.0.0.1", 0, process_request=process_request) \
            as server:
        client = served_client(server, backoff_initial_s=0.05, backoff_max_s=0.1)
        stop = asyncio.Event()
        messages = client.stream(stop)
        got = await anext(messages)
        stop.set()
        assert [m async for m in messages] == []
    assert got.seq == BOOK[0]["u"]
    assert len(attempts) == 2 and attempts[1] - attempts[0] >= 2.0, attempts
    assert "429" in (client.last_error or "")
    assert client.stats()["error_frames"] == 40
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "error frame" in errors[0].getMessage(), errors


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_frames_that_are_not_prices_are_logged_by_reason_at_most_once_a_minute(
        caplog: pytest.LogCaptureFixture) -> None:
    """A server sending what cannot be a price had it counted in the source's stats alone,
    which nothing showed while the source ran: an operator saw only stale prices. The drops
    are logged by reason, the first at once, then at most once a minute."""

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()  # the subscribe
        for _ in range(2):
            for _ in range(10):
                await ws.send("}{ not json")
                await ws.send(bad_book(a="99.98", b="99.99", u=BOOK[0]["u"] + 1))  # crossed
            data = BOOK[0]
            await ws.send(json.dumps({"data": data, "stream": f"bookTicker.{data['s']}"}))
        await ws.wait_closed()

    caplog.set_level("INFO", logger="feed.backpack")
    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        client = served_client(server)
        stop = asyncio.Event()
        messages = client.stream(stop)
        await anext(messages)
        await anext(messages)  # (the second price comes after the second round of drops)
        stop.set()
        assert [m async for m in messages] == []
    assert client.stats()["dropped"] == {"malformed": 20, "crossed": 20}
    lines = [r.getMessage() for r in caplog.records if "not prices" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("backpack: dropped 1 frame from ws://127.0.0.1:"), lines
    assert "(malformed=1)" in lines[0], lines


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_server_that_closes_after_each_price_is_backed_off() -> None:
    """A server that accepts, sends one price and closes, again and again. Every price reset
    the backoff, so the client came back after the first delay each time (2 to 4 handshakes a
    second at the defaults) for as long as the server did that. A connection resets the backoff
    only once it has stayed up a while; until then the delays keep doubling."""
    connections: list[int] = []

    async def handler(ws: ServerConnection) -> None:
        connections.append(len(connections) + 1)
        await ws.recv()  # the subscribe
        data = dict(BOOK[0], u=BOOK[0]["u"] + len(connections))
        await ws.send(json.dumps({"data": data, "stream": f"bookTicker.{data['s']}"}))
        await ws.close()

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        client = served_client(server, backoff_initial_s=0.01, backoff_max_s=1.0)
        stop = asyncio.Event()
        messages = client.stream(stop)
        got = [await anext(messages) for _ in range(4)]
        stop.set()
        assert [m async for m in messages] == []
    assert len(got) == 4 and connections == [1, 2, 3, 4]
    assert client.backoff.attempt == 3  # one doubling per connection closed so far


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_stop_during_a_handshake_the_server_never_answers_ends_the_source_at_once(
        ) -> None:
    """A server that takes the connection but never answers the upgrade (a stalled proxy or
    load balancer): a stop set meanwhile waited for the whole handshake timeout (10 s, what the
    launcher allows the feed's thread to stop in), the source deaf to it."""
    asked = asyncio.Event()
    never = asyncio.Event()

    async def process_request(conn: ServerConnection, request: Any) -> Any:
        asked.set()
        await never.wait()

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with websockets.serve(handler, "127.0.0.1", 0, process_request=process_request) \
            as server:
        client = served_client(server)  # the default 10 s handshake timeout
        assert client.open_timeout_s == 10.0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        async def consume() -> list[object]:
            return [m async for m in client.stream(stop)]

        task = asyncio.create_task(consume())
        await asyncio.wait_for(asked.wait(), 10)
        stopped = loop.time()
        stop.set()
        got = await asyncio.wait_for(task, 5)
        elapsed = loop.time() - stopped
        never.set()
    assert got == [] and client.connects == 0
    assert elapsed < 1.0, elapsed


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_redirect_to_an_address_that_cannot_be_parsed_is_backed_off_and_auto_falls_back(
        ) -> None:
    """A handshake answered with a redirect to ``ws://127.0.0.1:99999/`` (a port no address
    has): the WebSocket library raises ValueError, which no reconnect caught. The Backpack
    source ended with it: run alone it was started again every second without its backoff,
    and under ``auto`` it ended the auto source before its wait was over, so the fallback to
    the simulated prices never came (the platform had no price at all)."""
    attempts: list[float] = []
    loop = asyncio.get_running_loop()

    def process_request(conn: ServerConnection, request: Any) -> Any:
        attempts.append(loop.time())
        response = conn.respond(302, "moved\n")
        response.headers["Location"] = "ws://127.0.0.1:99999/"
        return response

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with websockets.serve(handler, "127.0.0.1", 0, process_request=process_request) \
            as server:
        client = served_client(server, backoff_initial_s=0.2, backoff_max_s=10.0)
        url = client.url
        stop = asyncio.Event()
        loop.call_later(1.5, stop.set)
        assert [m async for m in client.stream(stop)] == []
        # attempts at 0, then after 0.1-0.2, 0.2-0.4 and 0.4-0.8 s more: at most four
        assert 2 <= len(attempts) <= 4, attempts
        assert "ValueError" in (client.last_error or "") and client.connects == 0

        attempts.clear()
        source = make_source(Settings(backpack_ws_url=url), "auto?wait=1&rate=20")
        assert isinstance(source, AutoSource)
        stop = asyncio.Event()
        got = []
        async for msg in source.stream(stop):
            got.append(msg)
            if len(got) == 5:
                stop.set()
    assert source.name == "sim" and {m.source for m in got} == {"sim"}
    assert attempts  # the Backpack server was asked first
