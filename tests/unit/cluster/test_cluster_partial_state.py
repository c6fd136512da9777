"""Reads keep answering while a shard recovers; writes for that shard answer 503."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from cluster.api import create_app
from cluster.ports import LocalShardPort, Unavailable
from cluster.service import TradingService
from tests.unit.cluster.local_platform import build_platform

pytestmark = pytest.mark.asyncio
USD = 10**6
SIGNUP = 10_000 * USD


class RecoveringShard:
    """A shard port that answers normally until ``down`` is set, then raises Unavailable on
    every call (a shard actor being restarted)."""

    def __init__(self, inner: LocalShardPort) -> None:
        self.inner, self.name, self.down = inner, inner.name, False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def call(*args: Any) -> Any:
            if self.down:
                raise Unavailable(self.name, "test: recovering")
            return await method(*args)
        return call


async def test_state_is_partial_while_a_shard_recovers_and_its_writes_are_503() -> None:
    wrapped: dict[str, RecoveringShard] = {}

    def wrap(port: LocalShardPort) -> RecoveringShard:
        wrapped[port.name] = RecoveringShard(port)
        return wrapped[port.name]

    p = build_platform(wrap=wrap)
    app = create_app(p.service)
    await p.push_tick("SOL", "100.00", "100.01")
    await p.push_tick("BTC", "50000.0", "50000.1")
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
        assert body["balances"]["margin"] == full.json()["balances"]["margin"] == "200.000000"
        who = await p.service.authenticate(key)
        assert who is not None
        btc_pnl = (await p.service.state(who)).positions[0].unrealized_pnl_micros
        assert btc_pnl is not None
        assert body["balances"]["equity"] == f"{(SIGNUP + btc_pnl) / USD:.6f}"

        # writes for the recovering shard: 503; for the others: as usual
        closing = await http.post("/api/v1/positions/close", headers=auth,
                                  json={"positionId": sol.json()["positionId"]})
        assert closing.status_code == 503
        assert (await open_("SOL")).status_code == 503
        assert (await open_("BTC")).status_code == 201

        wrapped[sol_shard].down = False  # recovered: the in-doubt SOL open is resolved
        assert await p.service.reconcile() == 0
        again = await http.get("/api/v1/state", headers=auth)
        assert again.status_code == 200 and "unavailable" not in again.json()
        assert len(again.json()["positions"]) == 3
    await p.service.aclose()
    assert await p.audit() == []


async def test_state_needs_the_ledger() -> None:
    class NoBalances:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def balances_many(self, users: Any) -> Any:
            raise Unavailable("ledger", "test")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    p = build_platform()
    account = await p.service.create_account()
    who = await p.service.authenticate(account.api_key)
    assert who is not None
    svc = TradingService(NoBalances(p.ledger), dict(p.shards), p.settings)
    with pytest.raises(Unavailable):
        await svc.state(who)
