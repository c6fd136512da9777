"""A whole platform in one process: cores behind in-process ports, a settable clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cluster.config import Settings
from cluster.ledger_core import LedgerCore
from cluster.trading.placement import shard_layout
from cluster.ports import LocalLedgerPort, LocalShardPort, ShardPort
from cluster.service import TradingService
from cluster.shard_core import ShardCore
from engine.market import Tick

NOW_US = 1_800_000_000_000_000


@dataclass
class Clock:
    """A settable clock for the in-process shells (the cores never read one)."""

    now_us: int = NOW_US

    def __call__(self) -> int:
        return self.now_us


@dataclass
class Platform:
    settings: Settings
    clock: Clock
    ledger: LocalLedgerPort
    shards: dict[str, LocalShardPort]
    service: TradingService
    seq: int = 0

    def shard_of(self, asset: str) -> LocalShardPort:
        return next(p for p in self.shards.values() if p.core.spec.asset == asset)

    async def push_tick(self, asset: str, bid: str, ask: str, age_us: int = 0) -> int:
        """A tick for ``asset`` at decimal ``bid``/``ask`` on every split; returns closes."""
        self.seq += 1
        a = self.settings.assets[asset]
        tick = Tick(asset, a.price_to_ticks(bid), a.price_to_ticks(ask),
                    self.clock.now_us - age_us, self.seq, "test")
        closed = 0
        for port in self.shards.values():
            if port.core.spec.asset == asset:
                closed += await port.apply_ticks([tick])
        return closed

    async def audit(self) -> list[str]:
        problems, _ = await self.service.audit()
        return problems


def build_platform(settings: Settings | None = None,
                   wrap: Callable[[LocalShardPort], ShardPort] | None = None) -> Platform:
    settings = settings or Settings()
    clock = Clock()
    ledger = LedgerCore(settings.signup_balance_micros)
    ledger_port = LocalLedgerPort(ledger)
    shards = {}
    for spec in shard_layout(settings):
        core = ShardCore(spec, settings.assets[spec.asset], settings.maintenance_margin_ppm,
                         settings.max_price_age_us)
        shards[spec.name] = LocalShardPort(core, ledger_port, clock_us=clock)
    ports: dict[str, ShardPort] = dict(shards)
    if wrap is not None:
        ports = {name: wrap(port) for name, port in shards.items()}
    service = TradingService(ledger_port, ports, settings)
    return Platform(settings, clock, ledger_port, shards, service)
