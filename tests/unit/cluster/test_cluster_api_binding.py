"""create_app without a service (as a Serve ingress is built) answers 503 until bound."""

from __future__ import annotations

import httpx
import pytest

from cluster.api import bind_service, create_app
from engine.assets import DEFAULT_ASSETS
from tests.unit.cluster.local_platform import build_platform


@pytest.mark.asyncio
async def test_unbound_app_is_503_until_a_service_is_bound() -> None:
    app = create_app(assets=DEFAULT_ASSETS)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        r = await http.post("/api/v1/accounts", json={})
        assert r.status_code == 503 and r.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert (await http.get("/api/v1/assets")).status_code == 200
        bind_service(app, build_platform().service)
        r = await http.post("/api/v1/accounts", json={})
        assert r.status_code == 201
        key = r.json()["apiKey"]
        r = await http.get("/api/v1/state", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["positions"] == []


def test_create_app_needs_a_service_or_assets() -> None:
    with pytest.raises(ValueError):
        create_app()
    with pytest.raises(ValueError):
        bind_service(create_app(assets=DEFAULT_ASSETS.subset(["SOL"])), build_platform().service)
