"""The ledger and every shard in this process: runners behind LocalPorts.

What the unit and e2e tests and the no-Ray benchmark baseline run: the same machines, runners,
ports, courier and service as the Ray platform, minus Ray. ``data_dir`` makes the runners
durable (journals under ``data_dir/<name>``), as the actors are under ``shardex up``; with
``readonly=True`` among the store options they recover from it and never write to it
(``shardex audit --offline``; cluster.durability.runner).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from cluster.actors.host import host_specs
from cluster.actors.port import LocalPort, Port
from cluster.config import Settings
from cluster.durability.runner import wall_clock_us
from cluster.trading.courier import Courier
from cluster.trading.placement import Layout
from cluster.trading.service import TradingService
from engine.ledger_machine import AppliedSeq
from engine.market import Tick
from engine.shard_machine import ApplyTick, ResumeSeq


class LocalHosts:
    """Ports over in-process runners; ``clock_us`` is the runners' clock (tests set it)."""

    def __init__(self, settings: Settings, data_dir: str | None = None, *,
                 clock_us: Callable[[], int] = wall_clock_us, made: bool = False,
                 **store_options: Any) -> None:
        self.settings = settings
        self.layout = Layout(settings)
        ledger_spec, shard_specs = host_specs(settings, data_dir, store_options, made=made)
        self.ledger = LocalPort(ledger_spec.name, ledger_spec.runner())
        self.shards = {name: LocalPort(name, spec.runner()) for name, spec in shard_specs.items()}
        for port in [self.ledger, *self.shards.values()]:
            port.runner.clock_us = clock_us
        self.courier = Courier(self.ledger, self.shards)
        for name, shard in self.shards.items():
            # what Courier.resume does, without an event loop: a shard continues the numbering
            # the ledger knows
            [applied] = self.ledger.execute_blocking([AppliedSeq(name)])
            shard.execute_blocking([ResumeSeq(applied)])

    def service(self, wrap: Callable[[LocalPort], Port] | None = None,
                wrap_ledger: Callable[[LocalPort], Port] | None = None,
                **options: Any) -> TradingService:
        """A TradingService over these ports (``wrap`` may stand in front of each shard,
        ``wrap_ledger`` in front of the ledger, as the service sees them)."""
        shards: dict[str, Port] = {name: port if wrap is None else wrap(port)
                                   for name, port in self.shards.items()}
        ledger = self.ledger if wrap_ledger is None else wrap_ledger(self.ledger)
        return TradingService(ledger, shards, self.settings, **options)

    async def apply_ticks(self, ticks: Iterable[Tick]) -> int:
        """Every tick to every shard of its asset, then their settlements to the ledger (what
        the feed actor does); returns how many positions closed."""
        closed = 0
        for name, batch in self._route(ticks).items():
            counts = await self.shards[name].call_many([ApplyTick(t) for t in batch])
            closed += sum(c for c in counts if isinstance(c, int))
            await self.courier.deliver(name)
        return closed

    def _route(self, ticks: Iterable[Tick]) -> dict[str, list[Tick]]:
        routed: dict[str, list[Tick]] = {}
        for tick in ticks:
            for spec in self.layout.of_asset(tick.asset):
                routed.setdefault(spec.name, []).append(tick)
        return routed

    def close(self) -> None:
        """Final snapshots (durable runners, unless read-only) and the worker threads."""
        for port in [self.ledger, *self.shards.values()]:
            # the worker first: a batch under way (or queued) on it finishes, and only then is
            # the state snapshotted and the journal closed, not beneath the batch
            port.shutdown()
            port.runner.close()
