"""Reads keep answering while a shard recovers; writes for that shard answer 503."""

from __future__ import annotations

import asyncio
from typing import TypeVar

import httpx
import pytest
from cluster.actors.port import LocalPort
from cluster.actors.port import Port
from cluster.actors.port import Unavailable
from cluster.http import api
from cluster.http.api import create_app
from cluster.http.bounds import RETRY_AFTER_S
from cluster.trading import service
from cluster.trading.service import TradingService
from engine.ledger_machine import AbandonLock
from engine.ledger_machine import Balances
from engine.ledger_machine import LockMargin
from engine.messages import MarginLock
from tests.unit.cluster.faulty_ports import Down
from tests.unit.cluster.faulty_ports import FailingBatches
from tests.unit.cluster.faulty_ports import Stuck
from tests.unit.cluster.local_platform import SIGNUP
from tests.unit.cluster.local_platform import USD
from tests.unit.cluster.local_platform import Platform
from tests.unit.cluster.local_platform import build_platform

pytestmark = pytest.mark.asyncio


W = TypeVar("W", Down, Stuck)


async def _priced_platform(kind: type[W]) -> tuple[Platform, dict[str, W]]:
    """An in-process platform whose ports are each wrapped in ``kind`` (by port name), with
    prices for SOL and BTC."""
    wrapped: dict[str, W] = {}

    def wrap(port: LocalPort) -> Port:
        wrapped[port.name] = kind(port)
        return wrapped[port.name]

    p = build_platform(wrap=wrap)
    await p.push_tick("SOL", "100.00", "100.01")
    await p.push_tick("BTC", "50000.0", "50000.1")
    return p, wrapped


async def test_state_is_partial_while_a_shard_recovers_and_its_writes_are_503() -> None:
    p, wrapped = await _priced_platform(Down)
    try:
        app = create_app(p.service)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            key = (await http.post("/api/v1/accounts", json={})).json()["apiKey"]
            auth = {"Authorization": f"Bearer {key}"}

            async def open_(asset: str) -> httpx.Response:
                return await http.post("/api/v1/positions/open", headers=auth, json={
                    "asset": asset, "type": "long", "margin": "100", "leverage": 10})

            sol, btc = await open_("SOL"), await open_("BTC")
            assert sol.status_code == btc.status_code == 201
            full = await http.get("/api/v1/state", headers=auth)
            assert full.status_code == 200 and "unavailable" not in full.json()
            assert len(full.json()["positions"]) == 2

            sol_shard = next(n for n in wrapped if "SOL" in n)
            wrapped[sol_shard].down = True
            partial = await http.get("/api/v1/state", headers=auth)
            assert partial.status_code == 200
            body = partial.json()
            assert body["unavailable"] == [sol_shard]
            assert [q["positionId"] for q in body["positions"]] == [btc.json()["positionId"]]
            # balances are the ledger's, complete; equity counts only the positions listed
            assert body["balances"]["free"] == full.json()["balances"]["free"]
            assert body["balances"]["margin"] == full.json()["balances"]["margin"] \
                == "200.000000"
            who = await p.service.authenticate(key)
            assert who is not None
            btc_pnl = (await p.service.state(who)).positions[0].unrealized_pnl_micros
            assert btc_pnl is not None
            assert body["balances"]["equity"] == f"{(SIGNUP + btc_pnl) / USD:.6f}"

            # writes for the recovering shard: 503; for the others: as usual
            closing = await http.post("/api/v1/positions/close", headers=auth,
                                      json={"positionId": sol.json()["positionId"]})
            assert closing.status_code == 503
            # SERVICE_UNAVAILABLE says when to try again: a host is back within about that
            assert closing.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
            assert closing.headers["retry-after"] == str(RETRY_AFTER_S) == "1"
            assert (await open_("SOL")).status_code == 503
            assert (await open_("BTC")).status_code == 201

            wrapped[sol_shard].down = False  # recovered: the in-doubt SOL open is resolved
            assert await p.service.reconciler.run_once() == 0
            again = await http.get("/api/v1/state", headers=auth)
            assert again.status_code == 200 and "unavailable" not in again.json()
            assert len(again.json()["positions"]) == 3
            # the SOL open that never arrived gave its margin back; the close never happened
            assert again.json()["balances"]["margin"] == "300.000000"
            assert sol.json()["positionId"] in [q["positionId"]
                                                for q in again.json()["positions"]]
        await p.service.aclose()
        assert await p.audit() == []
    finally:
        await p.service.aclose()
        p.hosts.close()


async def test_an_open_past_the_ledgers_locks_under_way_is_503_and_keeps_nothing() -> None:
    """The ledger tracks a bounded number of locks under way (by request id): an open past
    that bound answers 503 SERVICE_UNAVAILABLE with Retry-After, locks nothing and keeps no
    answer for its clientOrderId, so its retry opens once a lock under way ended."""
    p = build_platform()
    try:
        await p.push_tick("SOL", "100.00", "100.01")
        p.hosts.ledger.runner.machine.max_recent_locks = 1  # (the default is 65,536)
        transport = httpx.ASGITransport(app=create_app(p.service))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            key = (await http.post("/api/v1/accounts", json={})).json()["apiKey"]
            auth = {"Authorization": f"Bearer {key}"}
            who = await p.service.authenticate(key)
            assert who is not None
            # the one lock under way: a request whose API process died after its lock
            assert await p.ledger.call(LockMargin(MarginLock(who.user, 5 * USD, None, 77))) \
                is None

            async def open_() -> httpx.Response:
                return await http.post("/api/v1/positions/open", headers=auth, json={
                    "asset": "SOL", "type": "long", "margin": "100", "leverage": 10,
                    "clientOrderId": "past-the-bound"})

            refused = await open_()
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
            assert refused.headers["retry-after"] == str(RETRY_AFTER_S)
            assert await p.ledger.call(Balances(who.user)) == (SIGNUP - 5 * USD, 5 * USD)
            assert await p.ledger.call(AbandonLock(77)) == (77, who.user, 5 * USD)
            assert (await open_()).status_code == 201
            assert await p.ledger.call(Balances(who.user)) == (SIGNUP - 100 * USD, 100 * USD)
        assert await p.audit() == []
    finally:
        await p.service.aclose()
        p.hosts.close()


async def test_state_needs_the_ledger() -> None:
    p = build_platform()
    svc = TradingService(FailingBatches(p.ledger, Balances, failures=None), dict(p.shards),
                         p.settings)
    try:
        account = await p.service.create_account()
        who = await p.service.authenticate(account.api_key)
        assert who is not None
        with pytest.raises(Unavailable):
            await svc.state(who)
    finally:
        await svc.aclose()
        p.hosts.close()


async def test_healthz_answers_in_its_bound_while_a_shard_does_not_answer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard that neither answers nor fails (busy with a long call, cut off) is named in
    /healthz's 503 within the health bound, its asset listed stale; the price read behind the
    answer waited for it as long as a trading call does (30 s on the cluster)."""
    monkeypatch.setattr(service, "HEALTH_TIMEOUT_S", 0.2)
    monkeypatch.setattr(api, "HEALTH_TIMEOUT_S", 0.2)
    p, wrapped = await _priced_platform(Stuck)
    try:
        app = create_app(p.service)
        btc_shard = next(n for n in wrapped if "BTC" in n)
        wrapped[btc_shard].stuck = True
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            r = await asyncio.wait_for(http.get("/healthz"), 1.0)
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["components"][btc_shard] == "unavailable", body
        assert body["stalePrices"] == ["BTC", "ETH"] and "SOL" in body["priceAgesS"], body
    finally:
        for port in wrapped.values():
            port.released.set()
        await p.service.aclose()
        p.hosts.close()
