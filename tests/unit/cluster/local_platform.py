"""A whole platform in one process: the machines behind in-process ports, a settable clock;
and what the service tests do on it (sign up, open SOL longs, read balances)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cluster.actors.local import LocalHosts
from cluster.actors.port import LocalPort
from cluster.actors.port import Port
from cluster.config import Settings
from cluster.trading.service import TradingService
from engine.ledger import AuditDifference
from engine.ledger_machine import Balances
from engine.market import Tick
from engine.messages import OpenOrder
from engine.messages import Principal
from engine.orders import Side

NOW_US = 1_800_000_000_000_000
USD = 10**6
SIGNUP = 10_000 * USD


@dataclass
class Clock:
    """A settable clock for the in-process runners (the machines never read one)."""

    now_us: int = NOW_US

    def __call__(self) -> int:
        return self.now_us


@dataclass
class Seconds:
    """A settable monotonic clock (seconds), for what times itself in seconds (a service, a
    rate limit)."""

    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now


async def until(check: Callable[[], bool], within_s: float = 5.0) -> None:
    """Wait on this event loop (where the service's background tasks run) until ``check()``;
    fails the test after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"not within {within_s} s"
        await asyncio.sleep(0.05)


@dataclass
class Platform:
    settings: Settings
    clock: Clock
    hosts: LocalHosts
    service: TradingService
    seq: int = 0

    @property
    def ledger(self) -> LocalPort:
        return self.hosts.ledger

    @property
    def shards(self) -> dict[str, LocalPort]:
        return self.hosts.shards

    def shard_of(self, asset: str) -> LocalPort:
        return self.shards[self.hosts.layout.of_asset(asset)[0].name]

    async def push_tick(self, asset: str, bid: str, ask: str, age_us: int = 0) -> int:
        """A tick for ``asset`` at decimal ``bid``/``ask`` on every split, then the
        settlements to the ledger (what the feed actor does); returns closes."""
        self.seq += 1
        a = self.settings.assets[asset]
        tick = Tick(asset, a.price_to_ticks(bid), a.price_to_ticks(ask),
                    self.clock.now_us - age_us, self.seq, "test")
        return await self.hosts.apply_ticks([tick])

    async def audit(self) -> list[AuditDifference]:
        problems, _ = await self.service.audit()
        return problems


def build_platform(settings: Settings | None = None,
                   wrap: Callable[[LocalPort], Port] | None = None,
                   data_dir: str | None = None) -> Platform:
    settings = settings or Settings()
    clock = Clock()
    hosts = LocalHosts(settings, data_dir, clock_us=clock)
    return Platform(settings, clock, hosts, hosts.service(wrap))


class Make:
    """``make(**kw)``: build_platform(**kw); ``make.service(p, ...)``: another service over
    ``p``'s ports (or wrappers of them). Everything made is closed by ``close()``."""

    def __init__(self) -> None:
        self.built: list[Platform] = []
        self.services: list[TradingService] = []

    def __call__(self, **kw: Any) -> Platform:
        self.built.append(build_platform(**kw))
        self.services.append(self.built[-1].service)
        return self.built[-1]

    def service(self, p: Platform, ledger: Port | None = None,
                shards: dict[str, Port] | None = None, **options: Any) -> TradingService:
        svc = TradingService(ledger or p.ledger, shards or dict(p.shards), p.settings,
                             **options)
        self.services.append(svc)
        return svc

    async def close(self) -> None:
        for svc in self.services:
            await svc.aclose()
        for p in self.built:
            p.hosts.close()


async def signup(svc: TradingService) -> Principal:
    """A new account, authenticated by its API key."""
    account = await svc.create_account()
    who = await svc.authenticate(account.api_key)
    assert who is not None and who.account_id == account.account_id
    return who


async def sol_trader(p: Platform, svc: TradingService | None = None) -> Principal:
    """A new account (through ``svc``, by default ``p``'s service), SOL at 100.00/100.01."""
    who = await signup(svc or p.service)
    await p.push_tick("SOL", "100.00", "100.01")
    return who


def sol_long(margin_usd: int = 100, leverage: int = 10, **kw: Any) -> OpenOrder:
    return OpenOrder("SOL", Side.LONG, margin_usd * USD, leverage, **kw)


def balances(p: Platform, who: Principal) -> tuple[int, int]:
    """``who``'s (free, margin) read from the ledger's runner."""
    [answer] = p.ledger.execute_blocking([Balances(who.user)])
    return answer  # type: ignore[no-any-return]
