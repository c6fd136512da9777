"""A whole platform in one process: the machines behind in-process ports, a settable clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cluster.actors.local import LocalHosts
from cluster.actors.port import LocalPort, Port
from cluster.config import Settings
from cluster.trading.service import TradingService
from engine.market import Tick

NOW_US = 1_800_000_000_000_000


@dataclass
class Clock:
    """A settable clock for the in-process runners (the machines never read one)."""

    now_us: int = NOW_US

    def __call__(self) -> int:
        return self.now_us


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

    async def audit(self) -> list[str]:
        problems, _ = await self.service.audit()
        return problems


def build_platform(settings: Settings | None = None,
                   wrap: Callable[[LocalPort], Port] | None = None,
                   data_dir: str | None = None) -> Platform:
    settings = settings or Settings()
    clock = Clock()
    hosts = LocalHosts(settings, data_dir, clock_us=clock)
    return Platform(settings, clock, hosts, hosts.service(wrap))
