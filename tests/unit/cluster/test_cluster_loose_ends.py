"""Requests cut off halfway, through the service over in-process ports: a client that goes away
mid-open, a release or a close reply that is lost, a settlement batch with a bad item, a retry
of a request whose API process stalled or died. Money ends where the state machines say,
exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cluster.actors.host import host_specs
from cluster.actors.local import LocalHosts
from cluster.actors.port import LocalPort
from cluster.actors.port import Port
from cluster.actors.port import Unavailable
from cluster.durability.runner import Failed
from cluster.trading.courier import Courier
from cluster.trading.courier import SettlementRefused
from cluster.trading.reconciler import ORPHAN_BATCH
from cluster.trading.reconciler import ORPHAN_ROUNDS
from cluster.trading.reconciler import Reconciler
from cluster.trading.service import TradingService
from engine.account_events import ORDER_PLACED
from engine.account_events import POSITION_OPENED
from engine.account_events import POSITION_UPDATED
from engine.ledger_machine import AppliedSeq
from engine.ledger_machine import ApplySettlements
from engine.ledger_machine import History
from engine.ledger_machine import LockMargin
from engine.ledger_machine import Note
from engine.ledger_machine import OpenLocks
from engine.ledger_machine import PendingRequests
from engine.ledger_machine import ReleaseMargin
from engine.ledger_machine import Totals
from engine.market import Tick
from engine.messages import ClosedPosition
from engine.messages import CloseOrder
from engine.messages import MarginLock
from engine.messages import OpenPosition
from engine.messages import PlaceOrder
from engine.messages import Principal
from engine.messages import SettlementItem
from engine.order_book import OrderKind
from engine.orders import Side
from engine.results import OUTCOME_UNKNOWN
from engine.results import Code
from engine.results import Rejected
from engine.shard_machine import COUNTER_BITS
from engine.shard_machine import REMEMBERED
from engine.shard_machine import ApplyTick
from engine.shard_machine import ChangeMargin
from engine.shard_machine import Close
from engine.shard_machine import Open
from engine.shard_machine import OrdersOf
from engine.shard_machine import Outbox
from engine.shard_machine import OutboxView
from engine.shard_machine import PositionsOf
from engine.shard_machine import Resolve
from engine.shard_machine import SetLevels
from engine.shard_machine import Stats
from tests.unit.cluster.faulty_ports import Down
from tests.unit.cluster.faulty_ports import FailingBatches
from tests.unit.cluster.faulty_ports import Gated
from tests.unit.cluster.faulty_ports import HeldReplies
from tests.unit.cluster.faulty_ports import Wrapped
from tests.unit.cluster.local_platform import SIGNUP
from tests.unit.cluster.local_platform import USD
from tests.unit.cluster.local_platform import Make
from tests.unit.cluster.local_platform import Platform
from tests.unit.cluster.local_platform import balances
from tests.unit.cluster.local_platform import sol_long
from tests.unit.cluster.local_platform import sol_trader

pytestmark = pytest.mark.asyncio
SETTLED_WITHIN_S = 5.0


def shard_positions(p: Platform, asset: str) -> int:
    [stats] = p.shard_of(asset).execute_blocking([Stats()])
    return int(stats.positions)


async def eventually(check: Callable[[], Awaitable[bool]],
                     within_s: float = SETTLED_WITHIN_S) -> float:
    """Seconds until ``check()`` holds; fails after ``within_s``."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < within_s, f"not settled within {within_s} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def with_gated_opens(make: Make) -> tuple[Platform, dict[str, Gated]]:
    """A platform whose shard ports hold every batch with an ``Open`` at a gate (by name)."""
    gates: dict[str, Gated] = {}

    def wrap(port: LocalPort) -> Port:
        gates[port.name] = Gated(port, Open)
        return gates[port.name]

    return make(wrap=wrap), gates


# --------------------------------------------------------------------------- 1. disconnects
@pytest.mark.parametrize("client_order_id", [None, "d-1"])
@pytest.mark.parametrize("lost", [False, True], ids=["open-arrives", "open-lost"])
@pytest.mark.parametrize("cut_at", ["open", "lock"])
async def test_a_client_that_disconnects_mid_open_leaves_no_orphaned_margin(
        make: Make, cut_at: str, lost: bool, client_order_id: str | None) -> None:
    gates: dict[str, Gated] = {}

    def wrap(port: LocalPort) -> Port:
        gates[port.name] = Gated(port, Open, lose=lost)
        return gates[port.name]

    p = make(wrap=wrap)
    gate = gates[p.shard_of("SOL").name]
    svc = p.service
    if cut_at == "lock":  # cut while the lock itself is on its way to the ledger
        gate.opened.set()
        lock_gate = Gated(p.ledger, LockMargin)
        svc = make.service(p, ledger=lock_gate, shards=dict(gates))
        gate = lock_gate
    who = await sol_trader(p, svc)
    order = sol_long(client_order_id=client_order_id)
    client = asyncio.create_task(svc.open_position(who, order))
    await asyncio.wait_for(gate.reached.wait(), 5)
    if cut_at == "open":  # the lock was made, the open is held on its way to the shard
        assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
    client.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await client
    gate.opened.set()

    async def settled() -> bool:
        free, margin = balances(p, who)
        if lost:  # never opened: the margin is back in free, released by the reconciler
            return (free, margin) == (SIGNUP, 0) and \
                svc.counters["locks_released_abandoned"] == 1
        state = await svc.state(who)  # opened: the position holds the margin
        return margin == 100 * USD and [q.margin_micros for q in state.positions] == [100 * USD]

    took = await eventually(settled)
    assert took < SETTLED_WITHIN_S
    await asyncio.sleep(0.3)  # and it stays so
    assert await settled()
    assert shard_positions(p, "SOL") == (0 if lost else 1)
    state = await svc.state(who)
    assert await svc.reconciler.run_once() == 0
    assert (await svc.audit())[0] == []
    if client_order_id is not None:  # the client comes back with the same clientOrderId
        gates[p.shard_of("SOL").name].lose = False
        retry = await svc.open_position(who, order)
        assert isinstance(retry, OpenPosition)
        if state.positions:
            assert retry.position_id == state.positions[0].position_id
        assert shard_positions(p, "SOL") == 1 and balances(p, who)[1] == 100 * USD
        assert (await svc.audit())[0] == []


async def test_a_duplicate_of_a_request_whose_client_went_away_gets_its_answer(
        make: Make) -> None:
    p, gates = with_gated_opens(make)
    gate = gates[p.shard_of("SOL").name]
    svc = p.service
    who = await sol_trader(p)
    order = sol_long(client_order_id="dup")
    first = asyncio.create_task(svc.open_position(who, order))
    await asyncio.wait_for(gate.reached.wait(), 5)
    second = asyncio.create_task(svc.open_position(who, order))  # the same request, again
    await asyncio.sleep(0.05)
    first.cancel()  # only the first client went away
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.opened.set()
    answer = await asyncio.wait_for(second, 5)
    assert isinstance(answer, OpenPosition)
    assert await svc.open_position(who, order) == answer
    assert shard_positions(p, "SOL") == 1 and balances(p, who)[1] == 100 * USD
    assert (await svc.audit())[0] == []


@pytest.mark.parametrize("client_order_id", [None, "gone-1"])
async def test_a_request_whose_client_went_away_leaves_no_failure_unread(
        make: Make, client_order_id: str | None) -> None:
    """A client goes away from an open whose every send to the shard is then lost: its
    outcome is unknown (Unavailable) and the reconciler settles it. Nobody reads that
    Unavailable any more, and asyncio reported each such request at collection as an error
    never retrieved, with its traceback: an error log for what is handled."""
    p = make(wrap=lambda port: FailingBatches(port, Open, failures=3))
    svc = p.service
    sol = svc.shards[p.shard_of("SOL").name]
    assert isinstance(sol, FailingBatches)
    who = await sol_trader(p)
    loop = asyncio.get_running_loop()
    unread: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unread.append(context))
    try:
        client = asyncio.create_task(svc.open_position(
            who, sol_long(client_order_id=client_order_id)))
        while not sol.failed:  # under way: its first send to the shard lost
            await asyncio.sleep(0)
        client.cancel()
        await asyncio.gather(client, return_exceptions=True)
        del client  # its cancellation's traceback holds the request's frames

        async def settled() -> bool:
            return svc.counters["opens_in_doubt"] == 1 and not svc.reconciler.outstanding

        await eventually(settled)
        assert balances(p, who) == (SIGNUP, 0)
        gc.collect()  # a task is reported when it is collected with its exception unread
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert unread == []
    assert (await svc.audit())[0] == []


# --------------------------------------------------------------------------- 2. lost release
@pytest.mark.parametrize("client_order_id", [None, "r-1"])
@pytest.mark.parametrize("deliver", [False, True], ids=["request-lost", "reply-lost"])
async def test_a_release_after_a_refusal_that_fails_is_queued_and_released_once(
        make: Make, deliver: bool, client_order_id: str | None) -> None:
    p = make()
    ledger = FailingBatches(p.ledger, ReleaseMargin, failures=1, deliver=deliver)
    svc = make.service(p, ledger=ledger)
    who = await sol_trader(p, svc)
    held = await svc.open_position(who, sol_long())  # a position whose margin must stay
    assert isinstance(held, OpenPosition)
    order = sol_long(50, current_price_ticks=9000, client_order_id=client_order_id)
    refused = await svc.open_position(who, order)
    assert isinstance(refused, Rejected) and refused.code is Code.PRICE_MOVED
    # queued once: abandoned, or (with a clientOrderId, whose answer it stores) sent again
    queued = "locks_abandoned" if client_order_id is None else "releases_resent"
    assert ledger.failed == 1 and svc.counters[queued] == 1

    async def released() -> bool:
        return balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)

    await eventually(released)
    assert await svc.reconciler.run_once() == 0
    # released once: by the reconciler when the release was lost, else by the release itself
    assert svc.counters["locks_released_abandoned"] == \
        (0 if deliver or client_order_id is not None else 1)
    await asyncio.sleep(0.3)  # no second release comes later
    assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
    state = await svc.state(who)
    assert [q.position_id for q in state.positions] == [held.position_id]
    assert (await svc.audit())[0] == []
    if client_order_id is not None:  # a retry is refused the same way, and locks nothing
        assert await svc.open_position(who, order) == refused
        assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
        assert (await svc.audit())[0] == []


async def test_a_refusal_whose_release_was_lost_stays_the_answer_after_the_price_moved(
        make: Make) -> None:
    """The shard refuses an open (PRICE_MOVED) and the release that would store the refusal
    as its clientOrderId's answer is lost on its way to the ledger. The client was answered
    PRICE_MOVED; once the price has come to the client's, a retry must get that answer again,
    not open the position."""
    p = make()
    ledger = FailingBatches(p.ledger, ReleaseMargin, failures=1)
    svc = make.service(p, ledger=ledger)
    who = await sol_trader(p, svc)  # SOL 100.00/100.01
    order = sol_long(current_price_ticks=9801, max_slippage_bps=0, client_order_id="m-1")
    refused = await svc.open_position(who, order)
    assert isinstance(refused, Rejected) and refused.code is Code.PRICE_MOVED
    assert ledger.failed == 1
    await eventually(lambda: _no_doubt(svc))
    assert balances(p, who) == (SIGNUP, 0)
    await p.push_tick("SOL", "98.00", "98.01")  # the price the client asked for
    assert await svc.open_position(who, order) == refused
    assert balances(p, who) == (SIGNUP, 0) and shard_positions(p, "SOL") == 0
    assert await p.audit() == []


# --------------------------------------------------------------------------- 2b. lost note
@pytest.mark.parametrize("client_order_id", [None, "n-1"])
@pytest.mark.parametrize("deliver", [False, True], ids=["request-lost", "reply-lost"])
async def test_an_open_whose_note_the_ledger_did_not_take_reaches_the_account_events(
        make: Make, deliver: bool, client_order_id: str | None) -> None:
    """The ledger is away when an open that happened is noted: the client still gets its
    position, and the account's ``positionOpened`` follows within seconds (once, also when
    the first note did arrive), ending the open's lock; a retry gets the same position."""
    p = make()
    ledger = FailingBatches(p.ledger, Note, failures=1, deliver=deliver)
    svc = make.service(p, ledger=ledger)
    who = await sol_trader(p, svc)
    since, _ = await svc.account_events(who.user, None)
    order = sol_long(client_order_id=client_order_id)
    pos = await svc.open_position(who, order)
    assert isinstance(pos, OpenPosition) and ledger.failed == 1

    async def noted() -> bool:
        return not p.ledger.execute_blocking([OpenLocks()])[0]

    await eventually(noted)
    assert await svc.reconciler.run_once() == 0
    await asyncio.sleep(0.3)  # no second note comes later
    _, events = await svc.account_events(who.user, since)
    assert events is not None
    opened = [e.body for e in events if e.kind == POSITION_OPENED]
    assert opened == [pos]
    assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
    if client_order_id is not None:
        assert await svc.open_position(who, order) == pos
        assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
    assert (await svc.audit())[0] == []


# --------------------------------------------------------------------------- 3. lost close reply
@pytest.mark.parametrize("shard_answers_meanwhile", [True, False])
async def test_a_retried_close_whose_reply_was_lost_gets_the_first_close(
        make: Make, shard_answers_meanwhile: bool) -> None:
    flaky: dict[str, FailingBatches] = {}
    # the shard runs every Close, then its reply is lost; Resolve too while the shard is
    # still unreachable (its answer is lost as well)
    kind = Close if shard_answers_meanwhile else (Close, Resolve)

    def wrap(port: LocalPort) -> Port:
        flaky[port.name] = FailingBatches(port, kind, failures=None, deliver=True)
        return flaky[port.name]

    p = make(wrap=wrap)
    svc = make.service(p, shards=dict(flaky), idem_wait_s=1.0)
    who = await sol_trader(p, svc)
    pos = await svc.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    await p.push_tick("SOL", "101.00", "101.01")
    order = CloseOrder(pos.position_id, client_order_id="c-lost")
    with pytest.raises(Unavailable):  # the service gave up: its resends all lost their reply
        await svc.close_position(who, order)
    shard = flaky[p.shard_of("SOL").name]
    closes = [c for c in shard.lost if isinstance(c, Close)]
    assert len(closes) == 3 and len({c.request.request_id for c in closes}) == 1
    assert shard_positions(p, "SOL") == 0  # it did close, once
    [first] = p.shard_of("SOL").execute_blocking([Resolve(closes[0].request.request_id)])
    assert isinstance(first, SettlementItem)
    if not shard_answers_meanwhile:
        # the outcome cannot be learned yet: a retry waits for it, never runs again
        with pytest.raises(Unavailable):
            await svc.close_position(who, order)
        await p.push_tick("SOL", "102.00", "102.01")  # the feed's delivery settles it
        shard.kind = Close  # the shard answers again: a round learns the outcome
        assert await svc.reconciler.run_once() == 0
    retry = await svc.close_position(who, order)
    assert isinstance(retry, ClosedPosition), retry
    assert retry == first.closed
    assert await svc.close_position(who, order) == retry
    assert await svc.reconciler.run_once() == 0
    await p.push_tick("SOL", "103.00", "103.01")
    # the ledger applied it once
    totals = await p.ledger.call(Totals())
    assert totals["closed_positions"] == 1
    assert await p.ledger.call(AppliedSeq(shard.name)) == 1
    history = await p.ledger.call(History(who.user))
    assert history == [retry]
    assert balances(p, who) == (SIGNUP + retry.pnl_micros, 0)
    assert (await svc.audit())[0] == []


async def test_a_partial_close_settled_after_its_reply_was_lost_notes_the_rest(
        make: Make) -> None:
    flaky: dict[str, FailingBatches] = {}

    def wrap(port: LocalPort) -> Port:
        flaky[port.name] = FailingBatches(port, Close, failures=None, deliver=True)
        return flaky[port.name]

    p = make(wrap=wrap)
    svc = make.service(p, shards=dict(flaky))
    who = await sol_trader(p, svc)
    pos = await svc.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    await p.push_tick("SOL", "101.00", "101.01")
    since, _ = await svc.account_events(who.user, None)
    with pytest.raises(Unavailable):  # the shard closed part of it; every reply was lost
        await svc.close_position(who, CloseOrder(pos.position_id, qty_steps=pos.qty_steps // 4))
    flaky[p.shard_of("SOL").name].kind = ()  # it answers again: a round learns the outcome
    assert await svc.reconciler.run_once() == 0
    _, events = await svc.account_events(who.user, since)
    assert events is not None
    kinds = [e.kind for e in events]
    assert kinds[-1] == POSITION_UPDATED, kinds
    assert "positionClosed" in kinds[:-1]
    page = await svc.positions(who, 10)
    assert not isinstance(page, Rejected)
    [rest] = page[0]
    assert events[-1].body == rest
    assert rest.qty_steps == pos.qty_steps - pos.qty_steps // 4
    assert (await svc.audit())[0] == []



@pytest.mark.parametrize("change", ["modify", "top-up"])
async def test_a_partial_close_during_a_change_of_its_position_is_noted_after_it(
        make: Make, change: str) -> None:
    """A TP change (or a margin top-up) the shard made, its reply slow, and a partial close of
    the same position sent meanwhile: the close waits for the change's turn, so the account's
    last event shows the rest as the shard holds it, not the change's body with the quantity
    the close took off."""
    p = make()
    who = await sol_trader(p)  # SOL 100.00/100.01
    pos = await p.service.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    sol = p.shard_of("SOL")
    held = HeldReplies(sol, SetLevels if change == "modify" else ChangeMargin)
    svc = make.service(p, shards={**p.shards, sol.name: held})
    since, _ = await svc.account_events(who.user, None)
    try:
        changing = asyncio.create_task(
            svc.set_levels(who, pos.position_id, 10500, None) if change == "modify"
            else svc.change_margin(who, pos.position_id, 10 * USD))
        await asyncio.wait_for(held.reached.wait(), SETTLED_WITHIN_S)  # the shard made it
        closing = asyncio.create_task(svc.close_position(
            who, CloseOrder(pos.position_id, qty_steps=pos.qty_steps // 4)))
        await asyncio.wait({closing}, timeout=0.3)
        held.opened.set()
        changed, closed = await changing, await closing
    finally:
        held.opened.set()
    assert isinstance(changed, OpenPosition) and isinstance(closed, ClosedPosition)
    _, events = await svc.account_events(who.user, since)
    assert events is not None
    page = await svc.positions(who, 10)
    assert not isinstance(page, Rejected)
    [rest] = page[0]
    assert rest.qty_steps == pos.qty_steps - pos.qty_steps // 4
    assert [e.body for e in events if e.kind == POSITION_UPDATED][-1] == rest
    assert (await svc.audit())[0] == []

async def position_events(svc: TradingService, who: Principal, since: int,
                          position_id: int) -> list[OpenPosition]:
    """The bodies of ``who``'s positionOpened/positionUpdated events of ``position_id`` after
    ``since``, oldest first."""
    _, events = await svc.account_events(who.user, since)
    assert events is not None
    return [e.body for e in events if isinstance(e.body, OpenPosition)
            and e.kind in (POSITION_OPENED, POSITION_UPDATED)
            and e.body.position_id == position_id]


async def held_position(svc: TradingService, who: Principal) -> OpenPosition:
    page = await svc.positions(who, 10)
    assert not isinstance(page, Rejected)
    [held] = page[0]
    return held


@pytest.mark.parametrize("lost", ["note", "rest", "settlement"],
                         ids=["ledger-away", "shard-away", "settlement-deferred"])
async def test_the_rest_of_a_partial_close_is_noted_when_its_first_note_could_not_be(
        make: Make, lost: str) -> None:
    """A partial close (without a clientOrderId) the shard made, and the note of what stays
    open could not be made then: the ledger did not take it, the shard did not tell the rest,
    or the ledger did not take the close's settlement (the client is still answered). It is
    made by the reconciler's rounds, once, after the close's own events, with the rest as
    the shard holds it. Before, it was lost for good, and the client's stream showed the
    position at its size before the close."""
    p = make()
    sol = p.shard_of("SOL")
    ledger = FailingBatches(p.ledger, ApplySettlements if lost == "settlement" else Note,
                            failures=0)
    shard = FailingBatches(sol, PositionsOf, failures=0)
    svc = make.service(p, ledger=ledger, shards={**p.shards, sol.name: shard})
    who = await sol_trader(p, svc)
    pos = await svc.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    since, _ = await svc.account_events(who.user, None)
    (ledger if lost == "note" else shard).failures = 1
    closed = await svc.close_position(who, CloseOrder(pos.position_id,
                                                      qty_steps=pos.qty_steps // 4))
    assert isinstance(closed, ClosedPosition) and closed.partial
    assert ledger.failed + shard.failed == 1

    async def noted() -> bool:
        return bool(await position_events(svc, who, since, pos.position_id))

    await eventually(noted)
    assert await svc.reconciler.run_once() == 0
    await asyncio.sleep(0.3)  # and only once
    rest = await held_position(svc, who)
    assert rest.qty_steps == pos.qty_steps - pos.qty_steps // 4
    assert await position_events(svc, who, since, pos.position_id) == [rest]
    _, events = await svc.account_events(who.user, since)
    assert events is not None and events[-1].kind == POSITION_UPDATED
    assert (await svc.audit())[0] == []


async def first_change(svc: TradingService, who: Principal, op: str, pos: OpenPosition | None,
                       client_order_id: str | None) -> OpenPosition | Rejected:
    if pos is None:
        return await svc.open_position(who, sol_long(client_order_id=client_order_id))
    if op == "modify":
        return await svc.set_levels(who, pos.position_id, 10500, None, client_order_id)
    delta = 10 * USD if op == "top-up" else -10 * USD
    return await svc.change_margin(who, pos.position_id, delta, client_order_id)


async def test_a_round_asks_a_part_that_does_not_answer_once_for_all_the_notes_it_owes(
        make: Make) -> None:
    """Notes of several positions owed while the ledger is away: a round sends the first,
    and leaves the rest for a later round once the ledger does not take it, instead of
    asking it once for each note (each ask may wait for a call's timeout, and the round
    holds up every other loose end meanwhile). Back, the next round sends them all."""
    p = make()
    ledger = FailingBatches(p.ledger, Note, failures=0)
    svc = make.service(p, ledger=ledger)
    who = await sol_trader(p, svc)
    since, _ = await svc.account_events(who.user, None)
    ledger.failures = None  # the ledger takes no note now
    opened = [await svc.open_position(who, sol_long()) for _ in range(4)]
    assert all(isinstance(o, OpenPosition) for o in opened)
    await svc.reconciler.aclose()  # its own rounds stop: this test runs them
    asked = ledger.failed
    assert await svc.reconciler.run_once() == 4
    assert ledger.failed == asked + 1
    ledger.failures = 0
    assert await svc.reconciler.run_once() == 0
    for o in opened:
        assert isinstance(o, OpenPosition)
        assert len(await position_events(svc, who, since, o.position_id)) == 1


@pytest.mark.parametrize("client_order_id", [None, "late-1"])
@pytest.mark.parametrize("op", ["open", "modify", "top-up", "removal"])
async def test_a_note_that_waited_for_the_ledger_shows_no_older_position_than_a_later_change(
        make: Make, op: str, client_order_id: str | None) -> None:
    """An open or a change of a position whose note the ledger did not take (it was away),
    then another change of the position once it is back: the first note, sent again by the
    reconciler, comes after the second change's event, and shows the position as the shard
    holds it then. Before, it showed what the first request made, so the account's last
    event (and the read models that follow it) had the later change undone. A retry of the
    first request still gets what that request made."""
    p = make()
    ledger = FailingBatches(p.ledger, Note, failures=0)
    svc = make.service(p, ledger=ledger)
    who = await sol_trader(p, svc)
    pos = await svc.open_position(who, sol_long()) if op != "open" else None
    assert not isinstance(pos, Rejected)
    since, _ = await svc.account_events(who.user, None)
    ledger.failures = None  # the ledger takes no note now
    made = await first_change(svc, who, op, pos, client_order_id)
    assert isinstance(made, OpenPosition), made
    await svc.reconciler.aclose()  # its rounds wait (the ledger is away for them too)
    ledger.failures = 0  # back
    later = await svc.set_levels(who, made.position_id, 10800, None)
    assert isinstance(later, OpenPosition) and later.tp_ticks == 10800
    assert await svc.reconciler.run_once() == 0
    held = await held_position(svc, who)
    bodies = await position_events(svc, who, since, made.position_id)
    assert len(bodies) == 2 and bodies[-1] == held, bodies
    if op in ("top-up", "removal"):
        assert held.margin_micros == (110 if op == "top-up" else 90) * USD
        assert balances(p, who) == (SIGNUP - held.margin_micros, held.margin_micros)
    if client_order_id is not None:  # a retry gets what the first request made
        assert await first_change(svc, who, op, pos, client_order_id) == made
    assert (await svc.audit())[0] == []


async def test_a_note_sent_again_waits_for_a_change_of_its_position_under_way(
        make: Make) -> None:
    """The reconciler sends a change's note again (the ledger was away) while another change
    of the same position runs in this replica: it reads the position and notes it in the
    position's turn, so the change that ran meanwhile is not shown undone by an older read."""
    p = make()
    ledger = FailingBatches(p.ledger, Note, failures=0)
    sol = p.shard_of("SOL")
    shard = HeldReplies(sol, PositionsOf)
    shard.opened.set()
    svc = make.service(p, ledger=ledger, shards={**p.shards, sol.name: shard})
    who = await sol_trader(p, svc)
    pos = await svc.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    since, _ = await svc.account_events(who.user, None)
    ledger.failures = None
    assert isinstance(await svc.set_levels(who, pos.position_id, 10500, None), OpenPosition)
    await svc.reconciler.aclose()
    ledger.failures = 0
    shard.opened.clear()  # the round's read of the position waits for its reply
    shard.reached.clear()
    rounds = asyncio.ensure_future(svc.reconciler.run_once())
    try:
        await asyncio.wait_for(shard.reached.wait(), SETTLED_WITHIN_S)
        later = asyncio.ensure_future(svc.set_levels(who, pos.position_id, 10800, None))
        await asyncio.wait({later}, timeout=0.3)
    finally:
        shard.opened.set()
    assert await rounds == 0
    assert isinstance(await later, OpenPosition)
    held = await held_position(svc, who)
    assert held.tp_ticks == 10800
    assert (await position_events(svc, who, since, pos.position_id))[-1] == held
    assert (await svc.audit())[0] == []


# --------------------------------------------------------------------------- 4. a bad item
def forge(item: SettlementItem, seq: int, how: str, owner: int) -> SettlementItem:
    c = item.closed
    if how == "margin":  # more margin than the owner has locked, balanced
        m = c.margin_micros * 10
        c = c._replace(margin_micros=m, payout_micros=m, house_micros=0, insurance_micros=0)
    elif how == "unbalanced":  # pays out more than the margin
        c = c._replace(payout_micros=c.payout_micros + USD)
    elif how == "stranger":  # an owner with no account
        c = c._replace(owner=owner + 1000)
    else:  # not an int64
        c = c._replace(pnl_micros=1 << 70)
    return SettlementItem(seq, c)


async def outbox_of_two_closes(p: Platform, who: Principal) -> tuple[str, list[SettlementItem]]:
    """Two TP closes on the SOL shard that nobody delivered (still in its outbox)."""
    for _ in range(2):
        assert isinstance(await p.service.open_position(who, sol_long(tp_ticks=10100)),
                          OpenPosition)
    shard = p.shard_of("SOL")
    asset = p.settings.assets["SOL"]
    tick = Tick("SOL", asset.price_to_ticks("101.00"), asset.price_to_ticks("101.01"),
                p.clock.now_us, 10_000, "test")
    assert await shard.call(ApplyTick(tick)) == 2
    view = await shard.call(Outbox())
    assert [i.seq for i in view.items] == [1, 2]
    return shard.name, view.items


@pytest.mark.parametrize("how", ["margin", "unbalanced", "stranger", "range"])
async def test_a_settlement_batch_with_a_bad_later_item_applies_nothing(make: Make,
                                                                        how: str) -> None:
    p = make()
    who = await sol_trader(p)
    name, items = await outbox_of_two_closes(p, who)
    before = (balances(p, who), await p.ledger.call(Totals()))
    bad = forge(items[1], 3, how, who.user)
    refused = await p.ledger.call(ApplySettlements(name, (*items, bad)))
    assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST
    assert "settlement 3" in refused.message
    assert (balances(p, who), await p.ledger.call(Totals())) == before  # nothing applied
    assert await p.ledger.call(AppliedSeq(name)) == 0
    assert await p.ledger.call(History(who.user)) == []
    # the valid items alone: applied, exactly once however often they are sent
    for _ in range(3):
        assert await p.ledger.call(ApplySettlements(name, tuple(items))) == 2
    totals = await p.ledger.call(Totals())
    assert totals["closed_positions"] == 2 and totals["sum_micros"] == 0
    payouts = sum(i.closed.payout_micros for i in items)
    assert balances(p, who) == (SIGNUP - 200 * USD + payouts, 0)
    assert [h.position_id for h in await p.ledger.call(History(who.user))] == \
        [i.closed.position_id for i in reversed(items)]
    await p.hosts.courier.deliver(name)  # acknowledged: the outbox empties
    assert (await p.shard_of("SOL").call(Outbox())).items == []
    assert await p.audit() == []


class ForgingOutbox(Wrapped):
    """A shard port whose Outbox answers carry one forged item after the real ones (while
    ``forging``)."""

    def __init__(self, inner: Port, owner: int) -> None:
        super().__init__(inner)
        self.owner, self.forging = owner, True

    async def execute(self, commands: list[Any]) -> list[Any]:
        answers = await self.inner.execute(commands)
        if not self.forging:
            return answers
        out = []
        for command, answer in zip(commands, answers, strict=True):
            if isinstance(command, Outbox) and answer.items:
                bad = forge(answer.items[-1], answer.last_seq + 1, "margin", self.owner)
                answer = OutboxView([*answer.items, bad], answer.last_seq + 1)
            out.append(answer)
        return out


async def test_the_courier_delivers_nothing_of_a_batch_with_a_bad_item(make: Make) -> None:
    p = make()
    who = await sol_trader(p)
    name, items = await outbox_of_two_closes(p, who)
    forging = ForgingOutbox(p.shards[name], who.user)
    courier = Courier(p.ledger, {name: forging})
    before = balances(p, who)
    with pytest.raises(SettlementRefused):
        await courier.deliver(name)
    assert balances(p, who) == before and await p.ledger.call(AppliedSeq(name)) == 0
    assert [i.seq for i in (await p.shards[name].call(Outbox())).items] == [1, 2]  # kept
    forging.forging = False  # the valid items alone
    assert await courier.deliver(name) == 2
    assert await courier.deliver(name) == 2
    totals = await p.ledger.call(Totals())
    assert totals["closed_positions"] == 2
    assert balances(p, who) == (SIGNUP - 200 * USD + sum(i.closed.payout_micros
                                                        for i in items), 0)
    assert (await p.shards[name].call(Outbox())).items == []
    assert await p.audit() == []


# --------------------------------------------------------------------------- the reconciler
async def test_stopping_the_reconciler_mid_round_keeps_the_doubt_queued(make: Make) -> None:
    flaky: dict[str, FailingBatches] = {}

    def wrap(port: LocalPort) -> Port:
        flaky[port.name] = FailingBatches(port, Open, failures=3)
        return flaky[port.name]

    p = make(wrap=wrap)
    svc = p.service
    who = await sol_trader(p)
    held = Gated(flaky[p.shard_of("SOL").name], Resolve)  # the round's Resolve waits here
    svc.shards[held.name] = svc.reconciler.shards[held.name] = held
    with pytest.raises(Unavailable):
        await svc.open_position(who, sol_long())
    await asyncio.wait_for(held.reached.wait(), 5)
    await svc.reconciler.aclose()  # stopped while the round waits for the shard
    assert svc.reconciler.outstanding == 1
    assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
    held.opened.set()
    assert await svc.reconciler.run_once() == 0
    assert balances(p, who) == (SIGNUP, 0)
    assert (await svc.audit())[0] == []


class FailsToResolve(Wrapped):
    """The first request id a ``Resolve`` asks about fails there (its command raised, as a
    bug would make it), every time, until ``healed``."""

    def __init__(self, inner: Port) -> None:
        super().__init__(inner)
        self.bad: int | None = None
        self.healed = False

    async def execute(self, commands: list[Any]) -> list[Any]:
        answers = await self.inner.execute(commands)
        for i, c in enumerate(commands):
            if isinstance(c, Resolve) and not self.healed:
                self.bad = c.request_id if self.bad is None else self.bad
                if c.request_id == self.bad:
                    answers[i] = Failed("test: resolving this request failed")
        return answers


async def test_an_in_doubt_request_whose_resolution_fails_holds_up_no_other(make: Make) -> None:
    p = make(wrap=lambda port: FailingBatches(port, Open, failures=None))  # every open lost
    svc = p.service
    who = await sol_trader(p)
    broken = FailsToResolve(svc.shards[p.shard_of("SOL").name])
    svc.shards[broken.name] = svc.reconciler.shards[broken.name] = broken
    for _ in range(2):
        with pytest.raises(Unavailable):
            await svc.open_position(who, sol_long())
    assert balances(p, who) == (SIGNUP - 200 * USD, 200 * USD)

    async def other_settled() -> bool:  # the other open never happened: its lock is freed
        # and the round that freed it has taken it off the queue (it does so once the
        # ledger's release returns to it: read before, the queue still held both)
        return balances(p, who) == (SIGNUP - 100 * USD, 100 * USD) \
            and svc.reconciler.outstanding == 1

    await eventually(other_settled)
    assert svc.reconciler.outstanding == 1 and svc.counters["in_doubt_errors"] >= 1
    broken.healed = True  # the bad one is still queued: it settles once it resolves
    assert await svc.reconciler.run_once() == 0
    assert balances(p, who) == (SIGNUP, 0)
    assert (await svc.audit())[0] == []


# --------------------------------------------------------------------------- a fresh shard
async def test_a_close_on_a_shard_that_restarted_empty_reaches_the_ledger(make: Make) -> None:
    p = make()
    svc = p.service
    who = await sol_trader(p)
    first = await svc.open_position(who, sol_long(tp_ticks=10100))
    assert isinstance(first, OpenPosition)
    assert await p.push_tick("SOL", "101.00", "101.01") == 1
    name = p.shard_of("SOL").name
    assert await p.ledger.call(AppliedSeq(name)) == 1
    # the shard restarts empty (in memory): its numbering starts again below the ledger's
    port = p.shards[name]
    port.runner = host_specs(p.settings)[1][name].runner()
    port.runner.clock_us = p.clock
    await svc.courier.resume(name)  # what a host that starts does before it serves
    asset = p.settings.assets["SOL"]
    tick = Tick("SOL", asset.price_to_ticks("100.00"), asset.price_to_ticks("100.01"),
                p.clock.now_us, 10_000, "test")
    assert await port.call(ApplyTick(tick)) == 0  # closes nothing: the feed delivers nothing
    pos = await svc.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    closed = await svc.close_position(who, CloseOrder(pos.position_id))
    assert isinstance(closed, ClosedPosition)
    # the close the client was given is settled in the ledger, after the ledger's numbering
    assert await p.ledger.call(AppliedSeq(name)) == 2
    history = await p.ledger.call(History(who.user))
    assert [h.position_id for h in history] == [pos.position_id, first.position_id]
    assert balances(p, who)[1] == 0
    assert await p.audit() == []


# --------------------------------------------------------------------------- 6. a dead API process
async def dies_at(gate: Gated, dying: TradingService, request: Awaitable[object]) -> None:
    """Send ``request`` through ``dying``; once it reached ``gate``, the process dies: its
    work ends where it is, and the client's call with it."""
    client = asyncio.ensure_future(request)
    await asyncio.wait_for(gate.reached.wait(), 5)
    for task in list(dying._tasks):
        task.cancel()
    await dying.reconciler.aclose()
    with pytest.raises(asyncio.CancelledError):
        await client


async def swept(make: Make, p: Platform) -> Reconciler:
    """Another process's sweeps over ``p``, as many as end every orphaned lock; no lock is
    left open at the ledger after them. Returns that process's reconciler."""
    sweeper = make.service(p).reconciler
    await sweeper.settle_pending(older_than_s=0)
    for _ in range(ORPHAN_ROUNDS):
        await sweeper.end_orphaned_locks()
    [open_locks] = p.ledger.execute_blocking([OpenLocks()])
    assert open_locks == []
    return sweeper


async def dies_changing(make: Make, p: Platform, shard_kind: type, ledger_kind: type,
                        cut_at_shard: bool, change: Callable[[TradingService], Awaitable[object]]
                        ) -> Gated:
    """``change`` sent through a service over ``p`` whose batches to the SOL shard carrying
    ``shard_kind``, and to the ledger carrying ``ledger_kind``, wait at gates; the process
    dies once it reached the shard's gate (``cut_at_shard``: it never arrives) or the
    ledger's (the shard made it). Returns the shard's gate."""
    shard = p.shard_of("SOL")
    shard_gate = Gated(shard, shard_kind)
    ledger_gate = Gated(p.ledger, ledger_kind)
    dying = make.service(p, ledger=ledger_gate, shards={**p.shards, shard.name: shard_gate})
    if not cut_at_shard:
        shard_gate.opened.set()
    await dies_at(shard_gate if cut_at_shard else ledger_gate, dying, change(dying))
    return shard_gate


@pytest.mark.parametrize("cut_at", ["open", "note"])
async def test_the_locks_of_an_api_process_that_died_end_within_a_few_sweeps(
        make: Make, cut_at: str) -> None:
    """An API process dies after a lock, with the open held on its way to the shard (it never
    happens) or with the open made and its note on the way. Another process's sweeps end the
    lock after ORPHAN_ROUNDS of them: abandoned (the margin is free again) or noted (the
    position keeps it), once; the open that arrives after all is refused, fenced."""
    p, gates = with_gated_opens(make)
    shard_gate = gates[p.shard_of("SOL").name]
    note_gate = Gated(p.ledger, Note)
    dying = make.service(p, ledger=note_gate, shards=dict(gates))
    who = await sol_trader(p, dying)
    if cut_at == "note":
        shard_gate.opened.set()
        gate: Gated = note_gate
    else:
        gate = shard_gate
    await dies_at(gate, dying, dying.open_position(who, sol_long()))
    assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)

    sweeper = make.service(p).reconciler
    for _ in range(ORPHAN_ROUNDS - 1):
        await sweeper.end_orphaned_locks()
        assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)  # too young to tell
    abandoned = await sweeper.end_orphaned_locks()
    if cut_at == "open":
        assert abandoned == 1 and balances(p, who) == (SIGNUP, 0)
        shard_gate.opened.set()  # the open arrives after all: fenced, refused
        await asyncio.sleep(0.05)
        assert shard_positions(p, "SOL") == 0
    else:
        assert abandoned == 0 and balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
        assert shard_positions(p, "SOL") == 1
    [open_locks] = p.ledger.execute_blocking([OpenLocks()])
    assert open_locks == []
    for _ in range(ORPHAN_ROUNDS + 1):  # nothing more happens
        assert await sweeper.end_orphaned_locks() == 0
    assert balances(p, who)[0] == (SIGNUP if cut_at == "open" else SIGNUP - 100 * USD)
    assert (await p.audit()) == []


@pytest.mark.parametrize("client_order_id", [None, "f-1"])
async def test_an_open_whose_answer_its_shard_forgot_keeps_its_margin_through_the_sweeps(
        make: Make, client_order_id: str | None) -> None:
    """An API process dies with an open made and its note on the way; before the sweeps
    resolve it, its shard answers REMEMBERED newer requests (here the fences of another
    process's) and forgets its answer. The sweeps must not take that for an open that never
    arrived: the margin stays with the position (before, it was freed: the position's margin
    a second time, and the audit failed). With a clientOrderId, the key is answered that the
    outcome is unknown; a retry gets that, and opens nothing."""
    p, gates = with_gated_opens(make)
    sol = p.shard_of("SOL")
    gates[sol.name].opened.set()
    note_gate = Gated(p.ledger, Note)
    dying = make.service(p, ledger=note_gate, shards=dict(gates))
    who = await sol_trader(p, dying)
    order = sol_long(client_order_id=client_order_id)
    await dies_at(note_gate, dying, dying.open_position(who, order))
    assert shard_positions(p, "SOL") == 1
    other = 3 << COUNTER_BITS
    sol.execute_blocking([Resolve(other | n) for n in range(1, REMEMBERED + 1)])

    sweeper = make.service(p).reconciler
    await sweeper.settle_pending(older_than_s=0)
    for _ in range(ORPHAN_ROUNDS + 1):
        assert await sweeper.end_orphaned_locks() == 0
    assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
    assert shard_positions(p, "SOL") == 1
    assert sweeper.counters["outcomes_forgotten"] >= 1
    [open_locks] = p.ledger.execute_blocking([OpenLocks()])
    assert len(open_locks) == (client_order_id is None)  # (left for the next start)
    if client_order_id is not None:
        assert await p.service.open_position(who, order) == OUTCOME_UNKNOWN
        assert shard_positions(p, "SOL") == 1
    assert await p.audit() == []
    await p.service.reconciler.at_start()  # the next start keeps it too
    assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
    assert await p.audit() == []


async def test_locks_whose_outcome_is_forgotten_do_not_keep_the_sweeps_from_newer_ones(
        make: Make) -> None:
    """More than a sweep's batch of locks whose requests their shards answer Forgotten stay
    open until the next start: the sweeps must still reach a newer orphaned lock behind
    them and free its margin (before, they looked at those oldest locks alone, every time,
    and counted each as forgotten again)."""
    p = make()
    who = await sol_trader(p)
    dead = 5 << COUNTER_BITS  # an API process that died with its top-ups under way
    p.ledger.execute_blocking([LockMargin(MarginLock(who.user, USD, request_id=dead | n,
                                                     top_up=True))
                               for n in range(1, ORPHAN_BATCH + 2)])
    for shard in p.shards.values():  # each forgot a later answer of that process's
        shard.execute_blocking([Resolve(dead | ORPHAN_BATCH + 10)])
        shard.execute_blocking([Resolve(3 << COUNTER_BITS | n) for n in range(1, REMEMBERED + 1)])
    orphan = 9 << COUNTER_BITS | 1  # another process's, cut off before its request went out
    p.ledger.execute_blocking([LockMargin(MarginLock(who.user, 7 * USD, request_id=orphan,
                                                     top_up=True))])
    sweeper = make.service(p).reconciler
    for _ in range(2 * ORPHAN_ROUNDS):
        await sweeper.end_orphaned_locks()
    [open_locks] = p.ledger.execute_blocking([OpenLocks(2 * ORPHAN_BATCH)])
    assert orphan not in dict(open_locks) and len(open_locks) == ORPHAN_BATCH + 1
    assert balances(p, who) == (SIGNUP - (ORPHAN_BATCH + 1) * USD, (ORPHAN_BATCH + 1) * USD)
    assert sweeper.counters["outcomes_forgotten"] == ORPHAN_BATCH + 1


@pytest.mark.parametrize("op", ["open", "order", "top-up", "modify"])
async def test_a_keyed_request_whose_api_process_died_before_its_note_is_noted_by_the_sweeps(
        make: Make, op: str) -> None:
    """An API process dies after the shard did a request with a clientOrderId (an open, a
    placement, a top-up, a TP/SL change), its note held on the way to the ledger. Another
    process's sweeps store what the request made as the key's answer, ending its lock, and
    number its account event once, as they do for a request without one (but a TP/SL
    change: nothing at the ledger knows of one without a key): the account's stream, and
    the read models that follow it, show it."""
    p = make()
    who = await sol_trader(p)
    pos = await p.service.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    since, _ = await p.service.account_events(who.user, None)
    order = PlaceOrder("SOL", Side.LONG, OrderKind.LIMIT, 9000, 50 * USD, 10,
                       client_order_id="d-1")
    kind = {"open": POSITION_OPENED, "order": ORDER_PLACED}.get(op, POSITION_UPDATED)

    def request(svc: TradingService) -> Awaitable[object]:
        if op == "open":
            return svc.open_position(who, sol_long(client_order_id="d-1"))
        if op == "order":
            return svc.place_order(who, order)
        if op == "modify":  # (a TP/SL change without one leaves the sweeps nothing to find)
            return svc.set_levels(who, pos.position_id, 10500, None, "d-1")
        return svc.change_margin(who, pos.position_id, 10 * USD, "d-1")

    note_gate = Gated(p.ledger, Note)
    dying = make.service(p, ledger=note_gate)
    await dies_at(note_gate, dying, request(dying))

    await swept(make, p)
    _, events = await p.service.account_events(who.user, since)
    assert events is not None
    [made] = [e.body for e in events if e.kind == kind]
    assert await request(p.service) == made  # a retry gets what it made
    assert await p.audit() == []


@pytest.mark.parametrize("client_order_id", [None, "s-1"])
@pytest.mark.parametrize("op", ["open", "order", "top-up", "removal"])
async def test_a_request_whose_api_process_died_before_its_note_is_noted_once_at_the_next_start(
        make: Make, tmp_path: Path, op: str, client_order_id: str | None) -> None:
    """An API process dies after the shard did an open, a placement or a margin change (with
    a clientOrderId or without: its lock is all the ledger has of it), its note held on the
    way to the ledger, and the platform stops. The next start's reconciliation numbers the
    account's event of what the request made, as the sweeps would, once: a second start or a
    sweep after it adds nothing. Before, the start ended the request's lock or reservation
    without it, and a client resuming its account stream never saw the position, the order
    or the margin."""
    p = make(data_dir=str(tmp_path))
    who = await sol_trader(p)
    pos = await p.service.open_position(who, sol_long()) if op in ("top-up", "removal") else None
    since, _ = await p.service.account_events(who.user, None)
    kind, read = {"open": (POSITION_OPENED, PositionsOf), "order": (ORDER_PLACED, OrdersOf)
                  }.get(op, (POSITION_UPDATED, PositionsOf))

    def request(svc: TradingService) -> Awaitable[object]:
        if op == "open":
            return svc.open_position(who, sol_long(client_order_id=client_order_id))
        if op == "order":
            return svc.place_order(who, PlaceOrder("SOL", Side.LONG, OrderKind.LIMIT, 9000,
                                                   50 * USD, 10, client_order_id=client_order_id))
        assert isinstance(pos, OpenPosition)
        return svc.change_margin(who, pos.position_id, 10 * USD if op == "top-up" else -10 * USD,
                                 client_order_id)

    note_gate = Gated(p.ledger, Note)
    dying = make.service(p, ledger=note_gate)
    await dies_at(note_gate, dying, request(dying))
    p.hosts.close()  # the platform stops, and starts again from its data
    p.hosts = LocalHosts(p.settings, str(tmp_path), clock_us=p.clock)
    svc = make.service(p)
    [[made]] = p.shard_of("SOL").execute_blocking([read((who.user,))])

    async def noted() -> list[object]:
        _, events = await svc.account_events(who.user, since)
        assert events is not None
        return [e.body for e in events if e.kind == kind]

    await svc.reconciler.at_start()
    assert await noted() == made
    await svc.reconciler.at_start()  # a second start, and sweeps, add nothing
    await svc.reconciler.settle_pending(older_than_s=0)
    for _ in range(ORPHAN_ROUNDS):
        await svc.reconciler.end_orphaned_locks()
    assert await noted() == made
    [open_locks] = p.ledger.execute_blocking([OpenLocks()])
    assert open_locks == []
    if client_order_id is not None:  # a retry gets what it made
        assert [await request(svc)] == made
    problems, _ = await svc.audit()
    assert problems == []


async def test_a_lock_the_start_cannot_end_is_left_to_its_recount(make: Make) -> None:
    """A lock whose abandon the ledger refuses (less margin is locked than it holds: released
    behind its back) stays open after the start tried it once; the start goes on, and the
    recount ends it with the margin nothing backs."""
    p = make()
    who = await sol_trader(p)
    assert p.ledger.execute_blocking([LockMargin(MarginLock(who.user, 30 * USD,
                                                            request_id=77))]) == [None]
    assert p.ledger.execute_blocking([ReleaseMargin(who.user, 20 * USD, counted=False)]) == \
        [None]
    released = await asyncio.wait_for(make.service(p).reconciler.at_start(), SETTLED_WITHIN_S)
    assert released == {who.user: 10 * USD}
    [open_locks] = p.ledger.execute_blocking([OpenLocks()])
    assert open_locks == [] and balances(p, who) == (SIGNUP, 0)
    assert await p.audit() == []


@pytest.mark.parametrize("client_order_id", [None, "less-2"])
async def test_a_margin_removal_whose_api_process_died_before_its_note_is_noted_by_the_sweeps(
        make: Make, client_order_id: str | None) -> None:
    """An API process dies during a margin removal the shard made, its note held on the way
    to the ledger. The sweeps free the margin once and number the account's positionUpdated:
    a release that reached the ledger without its note left nothing for them to find, and the
    account's stream, and the read models that follow it, kept the old margin."""
    p = make()
    who = await sol_trader(p)
    pos = await p.service.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    since, _ = await p.service.account_events(who.user, None)
    note_gate = Gated(p.ledger, Note)
    dying = make.service(p, ledger=note_gate)
    await dies_at(note_gate, dying, dying.change_margin(who, pos.position_id, -10 * USD,
                                                        client_order_id))
    sweeper = make.service(p).reconciler
    await sweeper.settle_pending(older_than_s=0)
    for _ in range(ORPHAN_ROUNDS):
        await sweeper.end_orphaned_locks()
    assert balances(p, who) == (SIGNUP - 90 * USD, 90 * USD)
    _, events = await p.service.account_events(who.user, since)
    assert events is not None
    [updated] = [e.body for e in events if e.kind == POSITION_UPDATED]
    assert updated.margin_micros == 90 * USD
    assert await p.audit() == []


@pytest.mark.parametrize("client_order_id", [None, "less-1"])
@pytest.mark.parametrize("cut_at", ["shard", "release"])
async def test_a_margin_removal_whose_api_process_died_is_released_within_a_few_sweeps(
        make: Make, cut_at: str, client_order_id: str | None) -> None:
    """An API process dies during a margin removal: with the removal held on its way to the
    shard (it never happens), or after the shard took the margin off with the release held on
    its way to the ledger. Another process's sweeps settle it after ORPHAN_ROUNDS of them: the
    margin the shard took off is freed, once; one that never happened frees nothing, and
    arrives fenced. Before, nothing at the ledger knew of the removal: the margin stayed
    locked, and the audit failed, until the next platform start."""
    p = make()
    who = await sol_trader(p)
    pos = await p.service.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    shard = p.shard_of("SOL")
    shard_gate = await dies_changing(make, p, ChangeMargin, ReleaseMargin, cut_at == "shard",
                                     lambda svc: svc.change_margin(who, pos.position_id,
                                                                   -10 * USD, client_order_id))
    assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)  # nothing freed yet
    taken = 10 * USD if cut_at == "release" else 0  # what the shard took off the position

    sweeper = make.service(p).reconciler
    # a clientOrderId's reservation is settled first: a removal that happened is freed with
    # its answer (a retry given the answer finds the margin freed); without one, the lock's
    # sweeps free it
    await sweeper.settle_pending(older_than_s=0)
    freed = taken if client_order_id is not None else 0
    assert balances(p, who) == (SIGNUP - 100 * USD + freed, 100 * USD - freed)
    for _ in range(ORPHAN_ROUNDS):
        await sweeper.end_orphaned_locks()
    assert balances(p, who) == (SIGNUP - 100 * USD + taken, 100 * USD - taken)
    [open_locks] = p.ledger.execute_blocking([OpenLocks()])
    assert open_locks == []
    if cut_at == "shard":
        shard_gate.opened.set()  # the removal arrives after all: fenced, refused
        await asyncio.sleep(0.05)
    [[mine]] = shard.execute_blocking([PositionsOf((who.user,))])
    assert [q.margin_micros for q in mine] == [100 * USD - taken]
    for _ in range(ORPHAN_ROUNDS + 1):  # nothing more happens
        await sweeper.end_orphaned_locks()
    assert balances(p, who) == (SIGNUP - 100 * USD + taken, 100 * USD - taken)
    if client_order_id is not None:  # a retry gets what happened (or runs, if nothing did)
        again = await p.service.change_margin(who, pos.position_id, -10 * USD, client_order_id)
        assert isinstance(again, OpenPosition)
        assert again.margin_micros == 90 * USD
        assert balances(p, who) == (SIGNUP - 90 * USD, 90 * USD)
    assert await p.audit() == []


@pytest.mark.parametrize("client_order_id", [None, "levels-1"])
@pytest.mark.parametrize("cut_at", ["shard", "note"])
async def test_a_tp_sl_change_whose_api_process_died_is_noted_by_the_sweeps(
        make: Make, cut_at: str, client_order_id: str | None) -> None:
    """An API process dies during a TP/SL change: held on its way to the shard (it never
    happens, and arrives fenced), or made there with its note held on the way to the ledger.
    The sweeps number the account's positionUpdated with the new levels once for one that
    happened, and nothing for one that did not. Before, a change sent without a clientOrderId
    left the ledger nothing to find: the account's stream, and the read models that follow
    it, kept the old TP/SL until the position's next event."""
    p = make()
    who = await sol_trader(p)
    pos = await p.service.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    since, _ = await p.service.account_events(who.user, None)
    shard = p.shard_of("SOL")
    shard_gate = await dies_changing(make, p, SetLevels, Note, cut_at == "shard",
                                     lambda svc: svc.set_levels(who, pos.position_id, 12_000,
                                                                None, client_order_id))

    async def updated() -> list[object]:
        _, events = await p.service.account_events(who.user, since)
        assert events is not None
        return [e.body for e in events if e.kind == POSITION_UPDATED]

    sweeper = await swept(make, p)
    if cut_at == "shard":
        shard_gate.opened.set()  # the change arrives after all: fenced, refused
        await asyncio.sleep(0.05)
    [[mine]] = shard.execute_blocking([PositionsOf((who.user,))])
    made = cut_at == "note"
    assert [q.tp_ticks for q in mine] == [12_000 if made else pos.tp_ticks]
    assert await updated() == (mine if made else [])
    for _ in range(ORPHAN_ROUNDS + 1):  # nothing more happens
        await sweeper.end_orphaned_locks()
    assert await updated() == (mine if made else [])
    assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
    assert await p.audit() == []


# ----------------------------------------------------------------------------- waited retries
# A retry of a request whose API process died or stalled mid-way (another replica's, here
# another service over the same hosts): after its idempotency wait the retry settles the first
# request at the shards itself, instead of answering "still in progress" until the sweep of
# stale reservations (STALE_PENDING_S) does. The first request, should it go on after all,
# changes nothing.
IDEM_WAIT_S = 0.2
RETRIED = sol_long(client_order_id="c-1")  # the open whose first attempt stalls


@contextlib.asynccontextmanager
async def stalled_open(make: Make, gate: Gated | HeldReplies, shards_down: bool = False
                       ) -> AsyncIterator[tuple[Platform, Principal, TradingService,
                                                asyncio.Task[OpenPosition | Rejected]]]:
    """A platform whose trader's open :data:`RETRIED` went through a service whose calls to
    the SOL shard stop at ``gate(SOL shard)`` (its process stalled there), once it got there,
    and a service to retry it (with ``shards_down`` its SOL shard does not answer):
    ``(platform, trader, retrying service, the first open's task)``. The gate opens on the way
    out whatever happened (a stalled request would hold the service's close)."""
    p = make()
    who = await sol_trader(p)
    stall = gate(p.shard_of("SOL"), Open)
    first = asyncio.create_task(make.service(p, shards={**p.shards, stall.name: stall})
                                .open_position(who, RETRIED))
    down = Down(p.shard_of("SOL"), down=shards_down)
    retrying = make.service(p, shards={**p.shards, down.name: down}, idem_wait_s=IDEM_WAIT_S)
    try:
        await stall.reached.wait()
        yield p, who, retrying, first
    finally:
        stall.opened.set()


async def open_ids(p: Platform, who: Principal) -> list[int]:
    return [q.position_id for q in (await p.service.state(who)).positions]


@pytest.mark.parametrize("op", ["close", "modify"])
async def test_a_late_refusal_of_a_settled_request_is_not_the_answer_its_retry_got(
        make: Make, op: str) -> None:
    """A request refused at its shard whose reply stalls (its API process slow) is settled by
    a retry (fenced: a shard keeps nothing of a refusal), the price moves, and the retry runs
    and succeeds. The first request's late refusal, arriving while the retry holds the
    clientOrderId, is not stored as its answer: a third try gets the retry's answer."""
    p = make()
    who = await sol_trader(p)  # SOL 100.00/100.01
    pos = await p.service.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    sol = p.shard_of("SOL")
    kind = Close if op == "close" else SetLevels
    held, gate = HeldReplies(sol, kind), Gated(sol, kind)
    slow = make.service(p, shards={**p.shards, sol.name: held})
    retrying = make.service(p, shards={**p.shards, sol.name: gate}, idem_wait_s=0.2)

    async def run(svc: TradingService) -> object:
        if op == "close":  # the client saw 101.00 with no slippage: refused at 100.00
            return await svc.close_position(who, CloseOrder(
                pos.position_id, current_price_ticks=10100, max_slippage_bps=0,
                client_order_id="c-1"))
        # a take-profit of 99.50, refused while the bid is 100.00, taken at 99.00
        return await svc.set_levels(who, pos.position_id, 9950, None, "c-1")

    try:
        first = asyncio.create_task(run(slow))
        await asyncio.wait_for(held.reached.wait(), SETTLED_WITHIN_S)
        await p.push_tick("SOL", *(("101.00", "101.01") if op == "close"
                                   else ("99.00", "99.01")))
        second = asyncio.create_task(run(retrying))
        await asyncio.wait_for(gate.reached.wait(), SETTLED_WITHIN_S)  # it settled the first
        held.opened.set()
        late = await first
        assert isinstance(late, Rejected), late
        gate.opened.set()
        retried = await second
        assert not isinstance(retried, Rejected), retried
    finally:
        held.opened.set()
        gate.opened.set()
    await eventually(lambda: _no_doubt(retrying))
    assert await run(p.service) == retried
    assert await p.audit() == []


async def _no_doubt(svc: TradingService) -> bool:
    return not svc.reconciler.outstanding


async def test_a_retry_runs_an_open_whose_first_attempt_never_reached_its_shard(
        make: Make) -> None:
    async with stalled_open(make, Gated) as (p, who, retrying, first):
        # its margin locked, its open on the way to the shard
        assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
        pos = await retrying.open_position(who, RETRIED)
        assert isinstance(pos, OpenPosition)
        assert retrying.counters["reservations_settled_for_retry"] == 1
        # the first lock was freed (its request fenced at every shard), the retry's backs pos
        assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
        assert await open_ids(p, who) == [pos.position_id]
        assert await p.ledger.call(PendingRequests()) == []
    # the stalled first request reaches the shard after all: refused
    late = await first
    assert isinstance(late, Rejected) and late.code is Code.PRICE_UNAVAILABLE
    # and its release and Forget touched neither the margin nor the retry's answer
    assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
    assert await retrying.open_position(who, RETRIED) == pos
    assert await p.service.open_position(who, RETRIED) == pos
    assert await open_ids(p, who) == [pos.position_id]
    assert await p.audit() == []


async def test_a_retry_gets_the_position_a_first_attempt_opened_before_it_stalled(
        make: Make) -> None:
    async with stalled_open(make, HeldReplies) as (p, who, retrying, first):
        # opened at the shard; nothing after it happened
        pos = await retrying.open_position(who, RETRIED)
        assert isinstance(pos, OpenPosition) and await open_ids(p, who) == [pos.position_id]
        assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)  # one lock, backing pos
        assert await p.ledger.call(OpenLocks(10)) == []  # the lock ended with the answer
        _, events = await retrying.account_events(who.user, 0)
        assert events is not None
        assert [e.body.position_id for e in events if e.kind == POSITION_OPENED] == \
            [pos.position_id]  # noted, though its own process never noted it
    # the stalled process answers after all: the same position, noted once
    assert await first == pos
    assert (await retrying.account_events(who.user, 0))[1] == events
    assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
    assert await p.audit() == []


async def test_a_retry_waits_while_the_shard_that_would_settle_it_is_down(make: Make) -> None:
    """Without the shard's word the first request's outcome is unknown: the retry is told to
    come back, and nothing is settled or freed."""
    async with stalled_open(make, Gated, shards_down=True) as (p, who, retrying, first):
        with pytest.raises(Unavailable, match="still in progress"):
            await retrying.open_position(who, RETRIED)
        assert retrying.counters["reservations_settled_for_retry"] == 0
        assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
        assert len(await p.ledger.call(PendingRequests())) == 1
    # the first request completes: its answer is the one
    pos = await first
    assert isinstance(pos, OpenPosition)
    assert await p.service.open_position(who, RETRIED) == pos
    assert await p.audit() == []


@pytest.mark.parametrize("client_order_id", [None, "part-1"])
@pytest.mark.parametrize("cut_at", ["settlement", "note"])
async def test_the_rest_of_a_partial_close_whose_api_process_died_is_noted_with_its_close(
        make: Make, cut_at: str, client_order_id: str | None) -> None:
    """An API process dies during a partial close the shard made: with its settlement held on
    the way to the ledger (the feed's delivery settles it), or settled, with the note of what
    stays open held. The account's events show the rest, as the shard holds it, right after
    the close's own events, once. Before, only the close's process noted it: the stream (and a
    client following it) kept the position at its size, margin and liquidation price before
    the close."""
    p = make()
    who = await sol_trader(p)
    first = await p.service.open_position(who, sol_long())
    pos = await p.service.open_position(who, sol_long())
    assert isinstance(first, OpenPosition) and isinstance(pos, OpenPosition)
    gate = Gated(p.ledger, ApplySettlements if cut_at == "settlement" else Note)
    dying = make.service(p, ledger=gate)
    if cut_at == "note":  # a courier that delivered before settles a close by itself
        gate.opened.set()
        assert isinstance(await dying.close_position(who, CloseOrder(first.position_id)),
                          ClosedPosition)
        gate.opened.clear()
    since, _ = await p.service.account_events(who.user, None)
    await dies_at(gate, dying, dying.close_position(
        who, CloseOrder(pos.position_id, qty_steps=pos.qty_steps // 4,
                        client_order_id=client_order_id)))
    await p.push_tick("SOL", "100.00", "100.01")  # the feed delivers the shard's outbox
    await swept(make, p)
    rest = next(q for q in await positions_held(p, who) if q.position_id == pos.position_id)
    assert rest.qty_steps == pos.qty_steps - pos.qty_steps // 4
    _, events = await p.service.account_events(who.user, since)
    assert events is not None
    mine = [e for e in events if getattr(e.body, "position_id", None) == pos.position_id]
    assert [e.kind for e in mine] == ["positionClosed", POSITION_UPDATED]
    assert mine[-1].body == rest and mine[-1].seq == mine[0].seq + 2  # after close, balance
    assert await p.audit() == []


async def positions_held(p: Platform, who: Principal) -> list[OpenPosition]:
    [[held]] = p.shard_of("SOL").execute_blocking([PositionsOf((who.user,))])
    return list(held)
