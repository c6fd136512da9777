"""A margin lock whose answer is lost: the service abandons it, the ledger releases it once."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from cluster.ledger_core import LedgerCore
from engine.messages import IdemHit, IdemKey, MarginLock, OpenOrder, OpenPosition
from cluster.ports import LocalLedgerPort, Unavailable
from cluster.service import TradingService
from engine.orders import Side
from tests.unit.cluster.local_platform import build_platform

USD = 10**6
SIGNUP = 10_000 * USD


class LedgerLosingLockAnswers:
    """A ledger port whose next ``lock_margins`` runs (and locks) but whose answer is lost,
    like a ledger actor that dies after journaling the lock and before answering."""

    def __init__(self, inner: LocalLedgerPort, lose: int = 1) -> None:
        self.inner, self.lose = inner, lose

    async def lock_margins(self, items: Sequence[MarginLock]) -> list[object]:
        out = await self.inner.lock_margins(items)
        if self.lose:
            self.lose -= 1
            raise Unavailable("ledger", "test: died before answering")
        return out  # type: ignore[return-value]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_core_abandon_releases_a_lock_once_and_ignores_unknown_ids() -> None:
    core = LedgerCore(SIGNUP)
    user = core.create_account().user
    key = IdemKey(user, "open", "c1")
    assert core.lock_margins([MarginLock(user, 30 * USD, key, 11),
                              MarginLock(user, 70 * USD, None, 12)]) == [None, None]
    assert core.abandon_locks([999]) == []  # never locked: nothing changes
    assert core.balances_many([user]) == [(SIGNUP - 100 * USD, 100 * USD)]
    assert core.abandon_locks([11, 999]) == [(11, user, 30 * USD)]
    assert core.balances_many([user]) == [(SIGNUP - 70 * USD, 70 * USD)]
    assert core.abandon_locks([11]) == []  # exactly once
    assert core.balances_many([user]) == [(SIGNUP - 70 * USD, 70 * USD)]
    assert core.begin([key]) == [None]  # the pending clientOrderId was dropped: a retry runs
    assert core.audit({user: 70 * USD}) == []  # 12 still backs an (assumed) open position


def test_core_abandon_keeps_a_lock_whose_clientorderid_has_an_answer() -> None:
    core = LedgerCore(SIGNUP)
    user = core.create_account().user
    key = IdemKey(user, "open", "c1")
    assert core.lock_margins([MarginLock(user, 30 * USD, key, 21)]) == [None]
    core.remember([(key, "opened")])  # any stored answer: the request completed
    assert core.abandon_locks([21]) == []
    assert core.balances_many([user]) == [(SIGNUP - 30 * USD, 30 * USD)]
    assert core.lock_margins([MarginLock(user, 30 * USD, key, 22)]) == [IdemHit("opened")]


@pytest.mark.asyncio
@pytest.mark.parametrize("client_order_id", [None, "retry-me"])
async def test_lost_lock_answer_is_abandoned_exactly_once(client_order_id: str | None) -> None:
    p = build_platform()
    lossy = LedgerLosingLockAnswers(p.ledger)
    svc = TradingService(lossy, dict(p.shards), p.settings)  # type: ignore[arg-type]
    account = await svc.create_account()
    who = await svc.authenticate(account.api_key)
    assert who is not None
    await p.push_tick("SOL", "100.00", "100.01")
    order = OpenOrder("SOL", Side.LONG, 100 * USD, 10, client_order_id=client_order_id)
    with pytest.raises(Unavailable):
        await svc.open_position(who, order)
    # locked in the ledger, no position anywhere (read before the background round runs)
    assert p.ledger.core.balances_many([who.user]) == [(SIGNUP - 100 * USD, 100 * USD)]
    assert await svc.reconcile() == 0
    assert await svc.reconcile() == 0  # nothing left to abandon, nothing released twice
    assert p.ledger.core.abandon_locks(list(p.ledger.core._recent_locks)) == []
    state = await svc.state(who)
    assert (state.free_micros, state.margin_micros, state.positions) == (SIGNUP, 0, [])
    assert svc.counters["locks_released_abandoned"] == 1
    assert await p.audit() == []
    # the client's retry (same clientOrderId, if any) runs again and opens once
    pos = await svc.open_position(who, order)
    assert isinstance(pos, OpenPosition)
    state = await svc.state(who)
    assert len(state.positions) == 1 and state.margin_micros == 100 * USD
    assert await p.audit() == []
    await svc.aclose()
    for port in p.shards.values():
        port.serial.shutdown()
    p.ledger.serial.shutdown()


@pytest.mark.asyncio
async def test_a_lock_that_never_happened_is_abandoned_without_change() -> None:
    """The ledger died before the lock (nothing journaled): abandoning changes nothing."""

    class DeadLedger(LedgerLosingLockAnswers):
        async def lock_margins(self, items: Sequence[MarginLock]) -> list[object]:
            if self.lose:
                self.lose -= 1
                raise Unavailable("ledger", "test: down")
            return await self.inner.lock_margins(items)  # type: ignore[return-value]

    p = build_platform()
    svc = TradingService(DeadLedger(p.ledger), dict(p.shards), p.settings)  # type: ignore[arg-type]
    account = await svc.create_account()
    who = await svc.authenticate(account.api_key)
    assert who is not None
    await p.push_tick("SOL", "100.00", "100.01")
    with pytest.raises(Unavailable):
        await svc.open_position(who, OpenOrder("SOL", Side.LONG, 100 * USD, 10))
    assert await svc.reconcile() == 0
    assert svc.counters["locks_released_abandoned"] == 0
    assert p.ledger.core.balances_many([who.user]) == [(SIGNUP, 0)]
    assert await p.audit() == []
    await svc.aclose()
    for port in p.shards.values():
        port.serial.shutdown()
    p.ledger.serial.shutdown()
