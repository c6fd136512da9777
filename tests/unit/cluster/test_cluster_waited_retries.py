"""A retry of a request whose API process died or stalled mid-way (another replica's, here
another service over the same hosts): after its idempotency wait the retry settles the first
request at the shards itself, instead of answering "still in progress" until the sweep of
stale reservations (STALE_PENDING_S) does. The first request, should it go on after all,
changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from cluster.actors.port import Unavailable
from engine import account_events
from engine.ledger_machine import OpenLocks, PendingRequests
from engine.messages import OpenOrder, OpenPosition, Principal
from engine.results import Code, Rejected
from engine.shard_machine import Open
from tests.unit.cluster.faulty_ports import Down, Gated, HeldReplies
from tests.unit.cluster.local_platform import (
    SIGNUP,
    USD,
    Make,
    Platform,
    balances,
    sol_long,
    sol_trader,
)

pytestmark = pytest.mark.asyncio

WAIT_S = 0.2


@contextlib.asynccontextmanager
async def stalled_open(make: Make, p: Platform, gate: Gated | HeldReplies, who: Principal,
                       order: OpenOrder) -> AsyncIterator[asyncio.Task[OpenPosition | Rejected]]:
    """``order`` opened by a service whose calls to the SOL shard stop at ``gate`` (its process
    stalled there), once it got there; the gate opens on the way out whatever happened (a
    stalled request would hold the service's close)."""
    svc = make.service(p, shards={**p.shards, gate.name: gate})
    first = asyncio.create_task(svc.open_position(who, order))
    try:
        await gate.reached.wait()
        yield first
    finally:
        gate.opened.set()


async def positions(p: Platform, who: Principal) -> list[OpenPosition]:
    return (await p.service.state(who)).positions


async def test_a_retry_runs_an_open_whose_first_attempt_never_reached_its_shard(
        make: Make) -> None:
    p = make()
    who = await sol_trader(p)
    order = sol_long(client_order_id="c-1")
    gate = Gated(p.shard_of("SOL"), Open)
    retrying = make.service(p, idem_wait_s=WAIT_S)
    async with stalled_open(make, p, gate, who, order) as first:
        # its margin locked, its open on the way to the shard
        assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
        pos = await retrying.open_position(who, order)
        assert isinstance(pos, OpenPosition)
        assert retrying.counters["reservations_settled_for_retry"] == 1
        # the first lock was freed (its request fenced at every shard), the retry's backs pos
        assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
        assert [q.position_id for q in await positions(p, who)] == [pos.position_id]
        assert await p.ledger.call(PendingRequests()) == []
    # the stalled first request reaches the shard after all: refused
    late = await first
    assert isinstance(late, Rejected) and late.code is Code.PRICE_UNAVAILABLE
    # and its release and Forget touched neither the margin nor the retry's answer
    assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
    assert await retrying.open_position(who, order) == pos
    assert await p.service.open_position(who, order) == pos
    assert [q.position_id for q in await positions(p, who)] == [pos.position_id]
    assert await p.audit() == []


async def test_a_retry_gets_the_position_a_first_attempt_opened_before_it_stalled(
        make: Make) -> None:
    p = make()
    who = await sol_trader(p)
    order = sol_long(client_order_id="c-2")
    held = HeldReplies(p.shard_of("SOL"), Open)
    retrying = make.service(p, idem_wait_s=WAIT_S)
    async with stalled_open(make, p, held, who, order) as first:
        # opened at the shard; nothing after it happened
        pos = await retrying.open_position(who, order)
        assert isinstance(pos, OpenPosition)
        assert [q.position_id for q in await positions(p, who)] == [pos.position_id]
        assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)  # one lock, backing pos
        assert await p.ledger.call(OpenLocks(10)) == []  # the lock ended with the answer
        _, events = await retrying.account_events(who.user, 0)
        assert events is not None
        assert [e.body.position_id for e in events
                if e.kind == account_events.POSITION_OPENED] == [pos.position_id]
    # the stalled process answers after all: the same position, noted once
    assert await first == pos
    _, again = await retrying.account_events(who.user, 0)
    assert again == events  # noted once
    assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
    assert await p.audit() == []


async def test_a_retry_waits_while_the_shard_that_would_settle_it_is_down(make: Make) -> None:
    """Without the shard's word the first request's outcome is unknown: the retry is told to
    come back, and nothing is settled or freed."""
    p = make()
    who = await sol_trader(p)
    order = sol_long(client_order_id="c-3")
    gate = Gated(p.shard_of("SOL"), Open)
    down = Down(p.shard_of("SOL"), down=True)
    retrying = make.service(p, shards={**p.shards, down.name: down}, idem_wait_s=WAIT_S)
    async with stalled_open(make, p, gate, who, order) as first:
        with pytest.raises(Unavailable, match="still in progress"):
            await retrying.open_position(who, order)
        assert retrying.counters["reservations_settled_for_retry"] == 0
        assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
        assert len(await p.ledger.call(PendingRequests())) == 1
    # the first request completes: its answer is the one
    pos = await first
    assert isinstance(pos, OpenPosition)
    assert await p.service.open_position(who, order) == pos
    assert await p.audit() == []
