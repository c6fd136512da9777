"""What a message on the market topic names as its ``source`` reaches the API's answers and
``shardex status``."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from cluster.actors.launcher import _shown
from cluster.http.api import create_app
from engine.market import Tick
from feed.message import TickDecoder
from tests.unit.cluster.local_platform import Platform


@pytest.mark.asyncio
async def test_a_source_with_a_lone_surrogate_does_not_break_prices_or_health(
        platform: Platform) -> None:
    """The decoder took a ``source`` written ``"\\ud800"`` (JSON text, a lone surrogate once
    parsed; the journal writes it), and the shards held it with their price. The API encoded
    its answers as strict UTF-8, which cannot carry it: one such message on the topic made
    ``GET /api/v1/prices`` and ``GET /healthz`` answer 500 until the next tick of the asset.
    The decoder drops such a source now (``bad_field``), but a shard journal written before
    holds its ticks: the API still answers them."""
    now_us = platform.clock.now_us
    value = ('{"symbol":"SOL_USDC","bid":"100.00","ask":"100.01","price":"100.005",'
             f'"ts_us":{now_us},"seq":1,"source":"x\\ud800"}}').encode()
    decoder = TickDecoder(platform.settings.assets)
    assert decoder.decode(value, now_us) is None and decoder.dropped == {"bad_field": 1}
    tick = Tick("SOL", 10000, 10001, now_us, 1, "x\ud800")  # as such a journal replays it
    await platform.hosts.apply_ticks([tick])
    app = create_app(platform.service)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://api") as http:
        prices = await http.get("/api/v1/prices")
        assert prices.status_code == 200
        assert json.loads(prices.content)["SOL"]["source"] == "x\ud800"
        health = await http.get("/healthz")
        assert health.status_code in (200, 503)
        assert json.loads(health.content)["feedSources"] == {"SOL": "x\ud800"}


@pytest.mark.parametrize(("source", "shown"), [
    ("backpack", "backpack"), ("b\u00e9", "b\u00e9"), ("x\ud800", "x\\ud800"),
    ("\x1b[2Jx", "\\x1b[2Jx"), ("a\nb", "a\\nb")])
def test_status_shows_any_source_as_printable_text(source: str, shown: str) -> None:
    """``shardex status`` printed the source as it came: a lone surrogate made the print raise
    (reported as "feed: not available", exit 1), a control character reached the terminal."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    print(f"source {_shown(source)}", file=out)
    out.flush()
    assert out.buffer.getvalue().decode() == f"source {shown}\n"
