"""The HTTP layer's limits without a server: token buckets (rates, Retry-After, bounded
memory), the streaming body limit, and the exact JSON reader (nesting, numbers)."""

from __future__ import annotations

import asyncio
import json
import math
from decimal import Decimal
from typing import Any

import httpx
import pytest
from cluster.config import Settings
from cluster.http.api import create_app
from cluster.http.api import key_checker
from cluster.http.errors import ApiError
from cluster.http.json_body import nests_deeper_than
from cluster.http.json_body import parse_json
from cluster.http.limits import BodySizeLimit
from cluster.http.limits import TokenBuckets
from cluster.http.limits import client_of
from cluster.http.limits import retry_after_s
from engine.messages import Principal
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from tests.unit.cluster.faulty_ports import Down
from tests.unit.cluster.local_platform import Seconds
from tests.unit.cluster.local_platform import build_platform


def test_a_bucket_grants_its_burst_then_one_request_per_interval() -> None:
    clock = Seconds()
    buckets = TokenBuckets(2, 3, clock=clock)  # 2/s, burst 3
    assert [buckets.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k") == pytest.approx(0.5)
    assert buckets.take("other") == 0.0  # every key has its own bucket
    clock.now += 0.25
    assert buckets.take("k") == pytest.approx(0.25)  # half a token saved: a refusal takes none
    clock.now += 0.25
    assert buckets.take("k") == 0.0
    clock.now += 100
    assert [buckets.take("k") for _ in range(4)][-1] > 0  # refills up to the burst, no more


@pytest.mark.parametrize("start", [1_000.0, 123_456.789, 800_000.1])
@pytest.mark.parametrize(("rate", "burst"), [(50, 100), (10 / 60, 10), (5, 50)])
def test_the_spec_limits_at_their_edges_on_a_clock_far_from_zero(
        start: float, rate: float, burst: int) -> None:
    # the defaults: requests per key (50/s, burst 100), account creations per address
    # (10/min, burst 10), unknown keys per address (a tenth of the rate, half the burst)
    clock = Seconds()
    clock.now = start
    buckets = TokenBuckets(rate, burst, clock=clock)
    assert [buckets.take("k") for _ in range(burst)] == [0.0] * burst
    wait_s = buckets.take("k")  # one more than the burst
    assert wait_s == pytest.approx(1 / rate)
    clock.now += 1 / rate  # exactly one interval: a token, whatever the clock's rounding
    assert buckets.take("k") == 0.0
    wait_s = buckets.take("k")
    assert retry_after_s(wait_s) == math.ceil(round(1 / rate, 9))  # 1 s, or 6 s at 10/min
    clock.now += retry_after_s(wait_s)  # Retry-After is honest: a request sent then passes
    assert buckets.take("k") == 0.0


def test_rate_zero_is_unlimited_and_bad_limits_are_refused() -> None:
    buckets = TokenBuckets(0, 0)
    assert all(buckets.take("k") == 0.0 for _ in range(1_000)) and len(buckets) == 0
    for rate, burst in ((-1, 1), (1, 0)):
        with pytest.raises(ValueError):
            TokenBuckets(rate, burst)


def test_idle_buckets_are_forgotten_and_memory_is_bounded() -> None:
    clock = Seconds()
    buckets = TokenBuckets(10 / 60, 10, clock=clock, max_keys=100)  # 10/min: full after 60 s
    for address in range(50):
        buckets.take(address)
    assert len(buckets) == 50
    clock.now += 59
    buckets.take("late")
    assert len(buckets) == 51  # not full again yet: remembered
    clock.now += 1
    buckets.take("later")
    assert len(buckets) == 2  # the first fifty are full again: forgotten, none the wiser
    for address in range(1_000):
        buckets.take(("many", address))
    assert len(buckets) == 100


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert [retry_after_s(w) for w in (0.001, 0.5, 1.0, 1.01, 29.9)] == [1, 1, 1, 2, 30]


_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.text("[]{}\"\\ab,:"))


@settings(max_examples=300, deadline=None)
@given(st.recursive(_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text("[]{\"\\", max_size=3), inner,
                                                 max_size=3)), max_leaves=40),
       st.integers(0, 8))
def test_nesting_is_measured_like_the_parser_sees_it(value: Any, limit: int) -> None:
    def depth(v: Any) -> int:
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        return 0

    raw = json.dumps(value).encode()
    assert nests_deeper_than(raw, limit) == (depth(value) > limit)


def test_nesting_is_checked_without_recursion_on_any_bytes() -> None:
    assert nests_deeper_than(b"[" * 1_000_000, 32)
    assert not nests_deeper_than(b'"' + b"[" * 1_000 + b'"', 32)
    assert not nests_deeper_than(b"]" * 1_000 + b"[[", 32)


def test_json_numbers_are_exact_and_constants_refused() -> None:
    parsed = parse_json(b'{"a":100.00000000000000001,"b":1e-7,"c":12,"d":' + b"9" * 50
                        + b"}", 32)
    assert parsed == {"a": Decimal("100.00000000000000001"), "b": Decimal("1e-7"), "c": 12,
                      "d": Decimal("9" * 50)}
    assert type(parsed["c"]) is int and not any(isinstance(v, float) for v in parsed.values())
    for raw in (b"NaN", b"[Infinity]", b"-Infinity", b"{", b"\xff", b"1e99999999999999999999",
                b"[[[1]]]", b'{"a":1,"a":1}', b'{"a":{"b":1,"c":2,"b":3}}'):
        with pytest.raises(ApiError) as refused:
            parse_json(raw, 2)
        assert refused.value.status_code == 400


def _run_body_limit(messages: list[dict[str, Any]], limit: int,
                    headers: list[tuple[bytes, bytes]] | None = None
                    ) -> tuple[list[dict[str, Any]], bytes | None, int]:
    """Drive BodySizeLimit with ``messages``; returns what it sent, the body the app read
    (None if the app never ran) and how many messages were received."""
    received = 0
    sent: list[dict[str, Any]] = []
    seen: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        return messages[received - 1]

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers or []}
    asyncio.run(BodySizeLimit(app, limit)(scope, receive, send))  # type: ignore[arg-type]
    return sent, seen[0] if seen else None, received


def test_the_body_limit_counts_chunks_as_they_arrive() -> None:
    chunk = {"type": "http.request", "body": b"x" * 10, "more_body": True}
    last = {"type": "http.request", "body": b"y", "more_body": False}
    sent, body, received = _run_body_limit([chunk, chunk, last], 21)
    assert body == b"x" * 20 + b"y" and sent[0]["status"] == 200
    sent, body, received = _run_body_limit([chunk] * 100 + [last], 25)
    assert body is None and sent[0]["status"] == 413 and received == 3  # stopped at 30 bytes
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "INVALID_REQUEST"


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    sent, body, received = _run_body_limit([], 100, [(b"content-length", b"101")])
    assert body is None and received == 0 and sent[0]["status"] == 413
    sent, body, received = _run_body_limit([], 100, [(b"content-length", b"-1")])
    assert body is None and received == 0 and sent[0]["status"] == 400


class Lookups:
    """A service's key lookups as the key checker sees them: ``valid`` is a key of user 1;
    every lookup waits for ``answer`` (so that requests meet while one is under way)."""

    def __init__(self, valid: str) -> None:
        self.valid = valid
        self.cached: dict[str, Principal] = {}
        self.lookups = 0
        self.answer = asyncio.Event()

    def known(self, api_key: str) -> Principal | None:
        return self.cached.get(api_key)

    async def authenticate(self, api_key: str) -> Principal | None:
        self.lookups += 1
        await self.answer.wait()
        if api_key != self.valid:
            return None
        who = self.cached[api_key] = Principal(1, "acc_1")
        return who


def test_a_key_not_seen_here_may_send_its_burst_at_once() -> None:
    """SPEC: an API key may send its burst (100) at once. On a replica that has not seen the
    key yet (restarted, or the account made on another) its requests sent at once each took a
    token of the address's unknown-key budget (half that burst) before their lookups, so past
    that budget they were refused 429 as unknown keys. Its lookup is made once for them all;
    unknown keys sent at once are still limited one token each."""
    async def scenario() -> None:
        lookups = Lookups("valid")
        check = key_checker(lookups, TokenBuckets(5, 3, clock=Seconds()))  # type: ignore[arg-type]
        valid = [asyncio.ensure_future(check("valid", "10.0.0.1")) for _ in range(10)]
        unknown = [asyncio.ensure_future(check(f"guess-{n}", "10.0.0.1")) for n in range(4)]
        await asyncio.sleep(0)
        lookups.answer.set()
        assert await asyncio.gather(*valid) == [Principal(1, "acc_1")] * 10
        answers = await asyncio.gather(*unknown)
        assert answers[:2] == [None, None] and all(isinstance(a, float) for a in answers[2:])
        assert lookups.lookups == 3  # the valid key once, and two guesses
        # the valid key's lookup gave its token back (the clock stands still): one more guess
        assert await check("guess-4", "10.0.0.1") is None
        assert isinstance(await check("guess-5", "10.0.0.1"), float)
        assert lookups.lookups == 4

    asyncio.run(scenario())


@pytest.mark.parametrize(("address", "client"), [
    ("10.0.0.1", "10.0.0.1"),
    ("2001:db8::1", "2001:db8::/64"),
    ("2001:db8::ffff:ffff:ffff:ffff", "2001:db8::/64"),
    ("2001:DB8:0:0:1::", "2001:db8::/64"),
    ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
    ("::ffff:10.0.0.1", "10.0.0.1"),  # an IPv4 client of a dual-stack socket
    ("fe80::1%eth0", "fe80::/64"),
    ("", ""),  # no address known
    ("testclient", "testclient"),
])
def test_a_limit_per_address_counts_an_ipv6_client_by_its_64(address: str, client: str) -> None:
    assert client_of(address) == client
    assert client_of(client) == client  # what the limits keep is its own client


def test_unknown_keys_from_one_ipv6_64_share_one_budget() -> None:
    """Before, each IPv6 address had a budget of its own: a client holding a /64 (every
    subscriber does) sent unlimited guesses by changing the address of each."""
    async def scenario() -> None:
        lookups = Lookups("valid")
        lookups.answer.set()
        check = key_checker(lookups, TokenBuckets(5, 3, clock=Seconds()))  # type: ignore[arg-type]
        answers = [await check(f"guess-{n}", f"2001:db8::{n + 1:x}") for n in range(4)]
        assert answers[:3] == [None] * 3 and isinstance(answers[3], float)
        assert await check("guess-4", "2001:db8:0:1::1") is None  # another /64
        assert await check("guess-5", "::ffff:10.0.0.1") is None
        assert isinstance(await check("guess-6", "2001:db8::ffff"), float)
        assert lookups.lookups == 5

    asyncio.run(scenario())


def test_signups_from_one_ipv6_64_share_the_addresses_limit() -> None:
    """SIGNUPS_PER_MIN counts a client of an IPv6 /64 as one address, through the app."""
    async def scenario() -> None:
        p = build_platform(Settings(signups_per_min=2))
        svc = p.hosts.service()
        app = create_app(svc)

        async def signup(address: str) -> int:
            transport = httpx.ASGITransport(app=app, client=(address, 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
                return (await http.post("/api/v1/accounts")).status_code

        try:
            assert [await signup(f"2001:db8::{n}") for n in (1, 2, 3)] == [201, 201, 429]
            assert await signup("2001:db8:0:1::3") == 201
            assert await signup("10.0.0.1") == 201
        finally:
            await svc.aclose()
            await p.service.aclose()
            p.hosts.close()

    asyncio.run(scenario())


def test_websockets_from_one_ipv6_64_share_the_addresses_limit() -> None:
    """WS_CONNECTIONS counts a client of an IPv6 /64 as one address: the app's ASGI WebSocket
    handshakes, each from its own address, the first two kept open."""
    async def scenario() -> None:
        p = build_platform(Settings(ws_connections=2))
        svc = p.hosts.service()
        app = create_app(svc)
        open_sockets: list[tuple[asyncio.Task[None], asyncio.Queue[dict[str, Any]]]] = []

        async def handshake(address: str) -> str:
            """The app's first answer to a handshake from ``address``: accept or a status."""
            incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            scope = {"type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws",
                     "path": "/ws", "raw_path": b"/ws", "root_path": "", "query_string": b"",
                     "headers": [], "client": (address, 40000), "server": ("api", 80),
                     "subprotocols": [], "extensions": {"websocket.http.response": {}}}
            await incoming.put({"type": "websocket.connect"})
            task = asyncio.ensure_future(app(scope, incoming.get, answers.put))
            first = await asyncio.wait_for(answers.get(), 5)
            if first["type"] == "websocket.accept":
                open_sockets.append((task, incoming))
                return "accept"
            await asyncio.wait_for(task, 5)
            return str(first.get("status"))

        try:
            assert [await handshake(f"2001:db8::{n}") for n in (1, 2, 3)] == \
                ["accept", "accept", "429"]
            assert await handshake("2001:db8:0:1::1") == "accept"
        finally:
            for task, incoming in open_sockets:
                await incoming.put({"type": "websocket.disconnect", "code": 1000})
                await asyncio.wait_for(task, 5)
            await svc.aclose()
            await p.service.aclose()
            p.hosts.close()

    asyncio.run(scenario())


def test_a_signup_the_ledger_could_not_answer_takes_no_signup() -> None:
    """A 503 (the ledger restarting) gives the address's token back: a client that retries
    after Retry-After is not refused 429 for account creations it never got."""
    async def scenario() -> None:
        p = build_platform(Settings(signups_per_min=2))
        ledger = Down(p.hosts.ledger)
        svc = p.hosts.service(wrap_ledger=lambda port: ledger)
        app = create_app(svc)
        transport = httpx.ASGITransport(app=app, client=("10.0.0.1", 40000))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
                ledger.down = True
                assert [(await http.post("/api/v1/accounts")).status_code
                        for _ in range(3)] == [503] * 3
                ledger.down = False
                assert [(await http.post("/api/v1/accounts")).status_code
                        for _ in range(3)] == [201, 201, 429]
        finally:
            await svc.aclose()
            await p.service.aclose()
            p.hosts.close()

    asyncio.run(scenario())
