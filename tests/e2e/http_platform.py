"""The platform behind a real HTTP socket, for the e2e tests.

``LocalHttpPlatform``: create_app(TradingService over in-process ports) served by uvicorn on
127.0.0.1 in a background thread; prices are driven by ``push_tick`` (ticks to the candles and
the shard machines, then their settlements to the ledger, as the feed actor does). A Ray/Kafka
variant only has to offer the same four members: ``base_url``, ``push_tick``, ``audit``,
``totals``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any
from typing import Protocol

import uvicorn
from cluster.actors.local import LocalHosts
from cluster.actors.port import Port
from cluster.config import Settings
from cluster.http.api import create_app
from cluster.http.server import server_options as replica_options
from cluster.live.market import MarketLive
from engine.ledger import AuditDifference
from engine.market import Tick
from feed.broker import free_port

# the trading scenarios sign up many accounts from one address; the limits have their own tests
# (test_api_limits.py)
TRADING = Settings(api_key_rate_per_s=0, signups_per_min=0, public_rate_per_s=0)


class HttpPlatform(Protocol):
    base_url: str

    def push_tick(self, asset: str, bid: str, ask: str, age_s: float = 0.0) -> None:
        """Publish a top of book for ``asset`` (decimal strings), ``age_s`` seconds old."""

    def audit(self) -> list[AuditDifference]:
        """Ledger invariant differences once every tick pushed so far has settled ([] = ok)."""

    def totals(self) -> dict[str, Any]:
        """The ledger totals (house_micros, insurance_micros, sum_micros, ...)."""


def make_tick(settings: Settings, asset: str, bid: str, ask: str, age_s: float,
              seq: int) -> Tick:
    """A tick of ``asset`` at decimal ``bid``/``ask``, stamped ``age_s`` seconds ago."""
    a = settings.assets[asset]
    ts_us = time.time_ns() // 1000 - int(age_s * 1_000_000)
    return Tick(asset, a.price_to_ticks(bid), a.price_to_ticks(ask), ts_us, seq, "test")


class LocalHttpPlatform:
    """``with LocalHttpPlatform(settings) as p``: started, and stopped afterwards.
    ``server_options`` replace some of the replica's uvicorn settings
    (cluster.http.server.server_options, with 127.0.0.1 as the proxy); ``new_loop`` makes the
    server's event loop (a Serve replica's is uvloop's)."""

    def __init__(self, settings: Settings | None = None,
                 server_options: dict[str, Any] | None = None,
                 wrap_ledger: Callable[[Port], Port] | None = None,
                 new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
                 ) -> None:
        self.settings = settings or Settings()
        self.hosts = LocalHosts(self.settings)
        self.market = MarketLive(self.settings.assets, None,
                                 late_s=self.settings.max_price_age_s)  # as the feed actor
        self.service = self.hosts.service(wrap_ledger=wrap_ledger, market=self.market)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(self.service)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off", access_log=False,
                                # the replica's (cluster.http.server)
                                **{**replica_options(self.settings.http_connections,
                                                    ("127.0.0.1",),
                                                    self.settings.max_body_bytes),
                                   **(server_options or {})})
        self.server = uvicorn.Server(config)
        self.loop = new_loop()
        self.thread = threading.Thread(target=self._run, name="uvicorn", daemon=True)
        self._seq = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())

    def start(self) -> LocalHttpPlatform:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.hosts.close()

    def __enter__(self) -> LocalHttpPlatform:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def push_tick(self, asset: str, bid: str, ask: str, age_s: float = 0.0) -> None:
        self.deliver([self.next_tick(asset, bid, ask, age_s)])

    def next_tick(self, asset: str, bid: str, ask: str, age_s: float = 0.0) -> Tick:
        """A tick of ``asset`` after every one made here (:func:`make_tick`)."""
        self._seq += 1
        return make_tick(self.settings, asset, bid, ask, age_s, self._seq)

    def deliver(self, ticks: list[Tick]) -> None:
        """Hand ``ticks`` to the candles and the shards, as the feed actor does."""
        self.market.apply(ticks)
        # on the server's loop: the ports' batchers and futures belong to one loop, and a
        # delivery on a loop of its own, while the server's loop was calling the same port
        # (a background sweep), waited on a future that loop never woke
        self._on_loop(self.hosts.apply_ticks(ticks), timeout_s=60)

    def _on_loop(self, coro: Any, timeout_s: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def audit(self) -> list[AuditDifference]:
        problems, _ = self._on_loop(self.service.audit())
        return list(problems)

    def totals(self) -> dict[str, Any]:
        _, totals = self._on_loop(self.service.audit())
        return dict(totals)
