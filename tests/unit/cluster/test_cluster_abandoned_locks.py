"""A margin lock whose answer is lost: the service abandons it, the ledger releases it once.

The service runs over the in-process runners (cluster.actors.local.LocalHosts); the ledger's
side of it (AbandonLock) is tested on the machine in tests/unit/engine/test_ledger_machine.py
and across restarts in tests/unit/durability/test_durable_machines.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from cluster.actors.local import LocalHosts
from cluster.actors.port import CommandFailed
from cluster.actors.port import LocalPort
from cluster.actors.port import Unavailable
from cluster.config import Settings
from cluster.trading.service import RequestIds
from cluster.trading.service import TradingService
from engine.ledger import AuditDifference
from engine.ledger_machine import AbandonLock
from engine.ledger_machine import Balances
from engine.ledger_machine import LockMargin
from engine.machine import run
from engine.market import Tick
from engine.messages import OpenOrder
from engine.messages import OpenPosition
from engine.orders import Side
from engine.shard_machine import COUNTER_BITS
from tests.unit.cluster.local_platform import USD
from tests.unit.cluster.local_platform import signup
from tests.unit.cluster.local_platform import until

NOW_US = 1_800_000_000_000_000


class Clock:
    """The runners' clock, fixed: the test's ticks are always fresh."""

    def __call__(self) -> int:
        return NOW_US


class LedgerLosingLockAnswers:
    """A ledger port whose next ``LockMargin`` runs (and locks) but whose answer is lost, like a
    ledger actor that dies after journaling the lock and before answering. ``runs=False``: the
    ledger died before the lock (nothing journaled)."""

    def __init__(self, inner: LocalPort, lose: int = 1, runs: bool = True) -> None:
        self.inner, self.lose, self.runs = inner, lose, runs
        self.lost: list[int] = []  # request ids of the locks whose answer was lost

    async def call(self, command: Any) -> Any:
        if isinstance(command, LockMargin) and self.lose:
            self.lose -= 1
            self.lost.append(command.lock.request_id)
            if self.runs:
                await self.inner.call(command)
            raise Unavailable("ledger", "test: died before answering")
        return await self.inner.call(command)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def platform(runs: bool) -> tuple[LocalHosts, LedgerLosingLockAnswers, TradingService]:
    settings = Settings()
    hosts = LocalHosts(settings, clock_us=Clock())
    lossy = LedgerLosingLockAnswers(hosts.ledger, runs=runs)
    service = TradingService(lossy, dict(hosts.shards), settings)  # type: ignore[arg-type]
    return hosts, lossy, service


async def push_tick(hosts: LocalHosts, bid: str, ask: str) -> None:
    sol = hosts.settings.assets["SOL"]
    await hosts.apply_ticks([Tick("SOL", sol.price_to_ticks(bid), sol.price_to_ticks(ask),
                                  NOW_US, 1, "test")])


async def audit(service: TradingService) -> list[AuditDifference]:
    problems, _ = await service.audit()
    return problems


@pytest.mark.asyncio
@pytest.mark.parametrize("client_order_id", [None, "retry-me"])
async def test_lost_lock_answer_is_abandoned_exactly_once(client_order_id: str | None) -> None:
    hosts, lossy, svc = platform(runs=True)
    funded = hosts.settings.signup_balance_micros
    who = await signup(svc)
    await push_tick(hosts, "100.00", "100.01")
    order = OpenOrder("SOL", Side.LONG, 100 * USD, 10, client_order_id=client_order_id)
    with pytest.raises(Unavailable):
        await svc.open_position(who, order)
    # locked in the ledger, no position anywhere (read before the background round runs)
    assert run(hosts.ledger.runner.machine, Balances(who.user)) == \
        (funded - 100 * USD, 100 * USD)
    assert await svc.reconciler.run_once() == 0
    assert await svc.reconciler.run_once() == 0  # nothing left to abandon, nothing released twice
    [lost] = lossy.lost
    remembered = [lock[0] for lock in hosts.ledger.runner.machine.fingerprint()["recent_locks"]]
    assert hosts.ledger.execute_blocking([AbandonLock(r) for r in [lost, *remembered]]) == \
        [None] * (1 + len(remembered))
    state = await svc.state(who)
    assert (state.free_micros, state.margin_micros, state.positions) == (funded, 0, [])
    assert svc.counters["locks_released_abandoned"] == 1
    assert await audit(svc) == []
    # the client's retry (same clientOrderId, if any) runs again and opens once
    pos = await svc.open_position(who, order)
    assert isinstance(pos, OpenPosition)
    state = await svc.state(who)
    assert len(state.positions) == 1 and state.margin_micros == 100 * USD
    assert await audit(svc) == []
    await svc.aclose()
    hosts.close()


@pytest.mark.asyncio
async def test_a_lock_that_never_happened_is_abandoned_without_change() -> None:
    """The ledger died before the lock (nothing journaled): abandoning changes nothing."""
    hosts, _, svc = platform(runs=False)
    funded = hosts.settings.signup_balance_micros
    who = await signup(svc)
    await push_tick(hosts, "100.00", "100.01")
    with pytest.raises(Unavailable):
        await svc.open_position(who, OpenOrder("SOL", Side.LONG, 100 * USD, 10))
    assert await svc.reconciler.run_once() == 0
    assert svc.counters["locks_released_abandoned"] == 0
    assert run(hosts.ledger.runner.machine, Balances(who.user)) == (funded, 0)
    assert await audit(svc) == []
    await svc.aclose()
    hosts.close()


class AbandonFails(LedgerLosingLockAnswers):
    """Also: every ``AbandonLock`` fails there (its command raised, as a bug would make it)
    until ``healed``; ``failed`` counts them."""

    healed = False
    failed = 0

    async def call(self, command: Any) -> Any:
        if isinstance(command, AbandonLock) and not self.healed:
            self.failed += 1
            raise CommandFailed("test: abandoning this lock failed")
        return await super().call(command)


@pytest.mark.asyncio
async def test_a_round_that_fails_is_tried_again_later() -> None:
    settings = Settings()
    hosts = LocalHosts(settings, clock_us=Clock())
    failing = AbandonFails(hosts.ledger)
    svc = TradingService(failing, dict(hosts.shards), settings)  # type: ignore[arg-type]
    funded = settings.signup_balance_micros
    who = await signup(svc)
    await push_tick(hosts, "100.00", "100.01")
    with pytest.raises(Unavailable):  # locked, its answer lost: queued to be abandoned
        await svc.open_position(who, OpenOrder("SOL", Side.LONG, 100 * USD, 10))
    await until(lambda: failing.failed >= 2)  # the background rounds go on after one failed
    assert run(hosts.ledger.runner.machine, Balances(who.user)) == \
        (funded - 100 * USD, 100 * USD)
    failing.healed = True
    await until(lambda: svc.reconciler.outstanding == 0)  # the next round releases it
    assert run(hosts.ledger.runner.machine, Balances(who.user)) == (funded, 0)
    assert svc.counters["round_errors"] >= 2 and await audit(svc) == []
    await svc.aclose()
    hosts.close()


def test_request_ids_count_up_under_a_prefix_and_take_a_new_one_when_used_up() -> None:
    """A shard judges a forgotten answer by the counter under its prefix: the counter must
    never wrap into the prefix, nor start over under it."""
    last = (1 << COUNTER_BITS) - 1
    ids = RequestIds(first=last - 1)
    first, second, third, fourth = (ids() for _ in range(4))
    assert [first & last, second & last, third & last, fourth & last] == [last - 1, last, 1, 2]
    assert first >> COUNTER_BITS == second >> COUNTER_BITS
    assert third >> COUNTER_BITS == fourth >> COUNTER_BITS < 1 << 30
