"""TradingService over in-process ports: the open/close/sweep flows and their money invariants."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from cluster.actors.port import LocalPort
from cluster.actors.port import Port
from cluster.actors.port import Unavailable
from cluster.config import Settings
from cluster.trading.service import PositionsCursor
from cluster.trading.service import TradingService
from engine.ledger import AuditDifference
from engine.ledger import margin_account
from engine.ledger_machine import AbandonLock
from engine.ledger_machine import AppliedSeq
from engine.ledger_machine import ApplySettlements
from engine.ledger_machine import Audit
from engine.ledger_machine import Begin
from engine.ledger_machine import LockMargin
from engine.ledger_machine import PendingRequests
from engine.ledger_machine import Totals
from engine.market import Tick
from engine.messages import CloseOrder
from engine.messages import IdemKey
from engine.messages import MarginLock
from engine.messages import OpenOrder
from engine.messages import OpenPosition
from engine.messages import PendingOrder
from engine.messages import PlaceOrder
from engine.messages import Principal
from engine.messages import SettlementItem
from engine.order_book import OrderKind
from engine.orders import CloseReason
from engine.orders import Side
from engine.position_ids import MAX_BOOK_TAG
from engine.position_ids import make_position_id
from engine.results import Code
from engine.results import Rejected
from engine.shard_machine import ApplyTick
from engine.shard_machine import Open
from engine.shard_machine import Stats
from tests.unit.cluster.faulty_ports import Down
from tests.unit.cluster.faulty_ports import FailingBatches
from tests.unit.cluster.local_platform import SIGNUP
from tests.unit.cluster.local_platform import USD
from tests.unit.cluster.local_platform import Make
from tests.unit.cluster.local_platform import Platform
from tests.unit.cluster.local_platform import balances
from tests.unit.cluster.local_platform import signup
from tests.unit.cluster.local_platform import sol_long
from tests.unit.cluster.local_platform import sol_trader
from tests.unit.cluster.local_platform import until

pytestmark = pytest.mark.asyncio


async def test_open_state_close_history(platform: Platform) -> None:
    svc = platform.service
    who = await sol_trader(platform)
    pos = await svc.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition) and pos.entry_ticks == 10001
    state = await svc.state(who)
    assert (state.free_micros, state.margin_micros) == (SIGNUP - 100 * USD, 100 * USD)
    assert [p.position_id for p in state.positions] == [pos.position_id]
    assert state.equity_micros == SIGNUP - 99_900
    assert await platform.audit() == []
    await platform.push_tick("SOL", "102.00", "102.01")
    closed = await svc.close_position(who, CloseOrder(pos.position_id))
    assert not isinstance(closed, Rejected)
    assert closed.exit_ticks == 10200 and closed.reason == CloseReason.MANUAL
    pnl = (10200 - 10001) * 999 * 100  # ticks * steps -> micros (0.01 * 0.01 = 100 micros)
    assert closed.pnl_micros == pnl
    state = await svc.state(who)
    assert (state.free_micros, state.margin_micros, state.positions) == (SIGNUP + pnl, 0, [])
    history = await svc.history(who)
    assert isinstance(history, list) and [h.position_id for h in history] == [pos.position_id]
    assert await platform.audit() == []


async def test_unknown_key_is_none(platform: Platform) -> None:
    assert await platform.service.authenticate("nope") is None


async def test_refusals_before_the_ledger(platform: Platform) -> None:
    svc = platform.service
    who = await signup(svc)
    r = await svc.open_position(who, OpenOrder("DOGE", Side.LONG, USD, 10))
    assert isinstance(r, Rejected) and r.code is Code.UNKNOWN_ASSET
    for lev in (0, 101, 1000):
        r = await svc.open_position(who, sol_long(leverage=lev))
        assert isinstance(r, Rejected) and r.code is Code.LEVERAGE_OUT_OF_RANGE
    r = await svc.open_position(who, OpenOrder("SOL", Side.LONG, 0, 10))
    assert isinstance(r, Rejected) and r.code is Code.INVALID_REQUEST
    r = await svc.open_position(who, sol_long(margin_usd=SIGNUP))
    assert isinstance(r, Rejected) and r.code is Code.INSUFFICIENT_BALANCE


async def test_an_id_no_shard_issued_is_named_by_what_it_was_meant_to_be(
        platform: Platform) -> None:
    svc = platform.service
    who = await signup(svc)
    nobody = make_position_id(1, 0, MAX_BOOK_TAG)  # a tag no shard of the layout has
    assert svc.layout.of_position(nobody) is None
    for answer, what in (
            (await svc.close_position(who, CloseOrder(nobody)), "no such open position"),
            (await svc.set_levels(who, nobody, 100, None), "no such open position"),
            (await svc.change_margin(who, nobody, -USD), "no such open position"),
            (await svc.cancel_order(who, nobody), "no such open order")):
        assert answer == Rejected(Code.NOT_FOUND, what)


@pytest.mark.parametrize("case", ["no_price", "stale", "slippage", "bad_trigger", "tiny"])
async def test_lock_is_released_when_the_shard_refuses(platform: Platform, case: str) -> None:
    svc = platform.service
    who = await signup(svc)
    if case == "no_price":
        order, code = sol_long(), Code.PRICE_UNAVAILABLE
    elif case == "stale":
        await platform.push_tick("SOL", "100.00", "100.01", age_us=16_000_000)
        order, code = sol_long(), Code.PRICE_UNAVAILABLE
    elif case == "slippage":
        await platform.push_tick("SOL", "100.00", "100.01")
        order, code = sol_long(current_price_ticks=9000), Code.PRICE_MOVED
    elif case == "bad_trigger":
        await platform.push_tick("SOL", "100.00", "100.01")
        order, code = sol_long(tp_ticks=9000), Code.INVALID_TRIGGER
    else:
        await platform.push_tick("SOL", "100.00", "100.01")
        order, code = OpenOrder("SOL", Side.LONG, 1, 1), Code.INVALID_REQUEST
    r = await svc.open_position(who, order)
    assert isinstance(r, Rejected) and r.code is code
    state = await svc.state(who)
    assert (state.free_micros, state.margin_micros, state.positions) == (SIGNUP, 0, [])
    assert await platform.audit() == []


@pytest.mark.parametrize("case", ["levels", "size"])
async def test_an_order_no_fill_price_accepts_is_refused_before_a_lock(
        platform: Platform, case: str) -> None:
    """Its levels or its size out of bounds at every price it can fill at: refused with the
    code a fill would end it with, and nothing stays locked. An order too large at every fill
    price was placed and held its margin until a fill tick rejected it."""
    svc = platform.service
    who = await signup(svc)
    await platform.push_tick("SOL", "100.00", "100.01")
    if case == "levels":  # a limit long fills at or below 90.00, under its stop-loss
        order = PlaceOrder("SOL", Side.LONG, OrderKind.LIMIT, 9000, 100 * USD, 10, sl_ticks=9500)
        code = Code.INVALID_TRIGGER
    else:  # 5,000 USD at 100x buys 5 * 10^7 SOL at 0.01, its highest fill price
        order = PlaceOrder("SOL", Side.LONG, OrderKind.LIMIT, 1, 5_000 * USD, 100)
        code = Code.INVALID_REQUEST
    refused = await svc.place_order(who, order)
    assert isinstance(refused, Rejected) and refused.code is code, refused
    state = await svc.state(who)
    assert (state.free_micros, state.margin_micros) == (SIGNUP, 0)
    assert await svc.orders(who) == []
    assert await platform.audit() == []


async def test_users_are_isolated(platform: Platform) -> None:
    svc = platform.service
    alice, bob = await signup(svc), await signup(svc)
    await platform.push_tick("SOL", "100.00", "100.01")
    pos = await svc.open_position(alice, sol_long())
    assert isinstance(pos, OpenPosition)
    assert (await svc.state(bob)).positions == []
    theirs = await svc.close_position(bob, CloseOrder(pos.position_id))
    missing = await svc.close_position(bob, CloseOrder(pos.position_id + (1 << 34)))
    garbage = await svc.close_position(bob, CloseOrder(7))
    assert theirs == missing == garbage
    assert isinstance(theirs, Rejected) and theirs.code is Code.NOT_FOUND
    assert len((await svc.state(alice)).positions) == 1


async def test_client_order_id_makes_opens_and_closes_idempotent(platform: Platform) -> None:
    svc = platform.service
    who = await sol_trader(platform)
    order = sol_long(client_order_id="o-1")
    first = await svc.open_position(who, order)
    again = await svc.open_position(who, order)
    concurrent = await asyncio.gather(*(svc.open_position(who, order) for _ in range(5)))
    assert isinstance(first, OpenPosition)
    assert again == first and all(c == first for c in concurrent)
    state = await svc.state(who)
    assert len(state.positions) == 1 and state.margin_micros == 100 * USD
    # the same id on another account is another request
    other = await signup(svc)
    theirs = await svc.open_position(other, order)
    assert isinstance(theirs, OpenPosition) and theirs.position_id != first.position_id
    # a refused first answer is the answer
    big = sol_long(margin_usd=20_000, client_order_id="o-big")
    r1 = await svc.open_position(who, big)
    assert isinstance(r1, Rejected) and r1.code is Code.INSUFFICIENT_BALANCE
    assert await svc.open_position(who, big) == r1
    # closes
    close = CloseOrder(first.position_id, client_order_id="c-1")
    c1 = await svc.close_position(who, close)
    await platform.push_tick("SOL", "150.00", "150.01")
    c2 = await svc.close_position(who, close)
    assert not isinstance(c1, Rejected) and c1 == c2
    state = await svc.state(who)
    assert state.free_micros == SIGNUP + c1.pnl_micros and state.margin_micros == 0
    history = await svc.history(who)
    assert isinstance(history, list) and len(history) == 1
    assert await platform.audit() == []


async def test_transient_refusal_is_not_stored_as_the_first_answer(platform: Platform) -> None:
    svc = platform.service
    who = await signup(svc)
    order = sol_long(client_order_id="early")
    r = await svc.open_position(who, order)
    assert isinstance(r, Rejected) and r.code is Code.PRICE_UNAVAILABLE
    await platform.push_tick("SOL", "100.00", "100.01")
    pos = await svc.open_position(who, order)
    assert isinstance(pos, OpenPosition)
    assert await svc.open_position(who, order) == pos


async def test_sweep_settles_through_the_ledger_exactly_once(platform: Platform) -> None:
    svc = platform.service
    who = await sol_trader(platform)
    tp = await svc.open_position(who, sol_long(tp_ticks=10500))
    sl = await svc.open_position(who, sol_long(sl_ticks=9500))
    short = await svc.open_position(who, OpenOrder("SOL", Side.SHORT, 100 * USD, 50))
    assert isinstance(tp, OpenPosition) and isinstance(sl, OpenPosition)
    assert isinstance(short, OpenPosition)
    assert await platform.push_tick("SOL", "105.00", "105.01") == 2  # TP long, liquidate short
    state = await svc.state(who)
    assert [p.position_id for p in state.positions] == [sl.position_id]
    assert await platform.audit() == []
    # resend the shard's settlements (e.g. a lost ack): nothing changes
    port = platform.shard_of("SOL")
    history = await svc.history(who)
    assert isinstance(history, list) and len(history) == 2
    before = await svc.state(who)
    resend = tuple(SettlementItem(i + 1, c) for i, c in enumerate(reversed(history)))
    assert await platform.ledger.call(ApplySettlements(port.name, resend)) == 2
    assert await svc.state(who) == before
    assert (await platform.ledger.call(Totals()))["closed_positions"] == 2
    reasons = {h.position_id: CloseReason(h.reason) for h in history}
    assert reasons == {tp.position_id: CloseReason.TAKE_PROFIT,
                       short.position_id: CloseReason.LIQUIDATION}
    await platform.push_tick("SOL", "95.00", "95.01")
    assert (await svc.state(who)).positions == []
    assert await platform.audit() == []


async def test_close_waits_for_an_earlier_tick_settlement_still_in_the_outbox(
        make: Make) -> None:
    p = make()
    svc = p.service
    who = await sol_trader(p)
    a = await svc.open_position(who, sol_long(tp_ticks=10100))
    b = await svc.open_position(who, sol_long())
    assert isinstance(a, OpenPosition) and isinstance(b, OpenPosition)
    # a closes on this tick (seq 1), which nobody delivers: it stays in the shard's outbox
    asset = p.settings.assets["SOL"]
    tick = Tick("SOL", asset.price_to_ticks("101.00"), asset.price_to_ticks("101.01"),
                p.clock.now_us, 99, "test")
    assert await p.shard_of("SOL").call(ApplyTick(tick)) == 1
    assert balances(p, who) == (SIGNUP - 200 * USD, 200 * USD)
    closed = await svc.close_position(who, CloseOrder(b.position_id))  # seq 2
    assert not isinstance(closed, Rejected)
    state = await svc.state(who)
    assert state.margin_micros == 0 and state.positions == []
    history = await svc.history(who)
    assert isinstance(history, list) and len(history) == 2
    assert await p.ledger.call(AppliedSeq(p.shard_of("SOL").name)) == 2
    assert await p.audit() == []


async def test_concurrent_opens_are_micro_batched(platform: Platform) -> None:
    svc = platform.service
    users = [await signup(svc) for _ in range(20)]
    await platform.push_tick("SOL", "100.00", "100.01")
    await platform.push_tick("BTC", "60000.0", "60000.1")
    orders = [sol_long() if i % 2 else OpenOrder("BTC", Side.SHORT, 50 * USD, 5)
              for i in range(len(users))]
    sol, btc = platform.shard_of("SOL").name, platform.shard_of("BTC").name
    before = svc.batch_stats()
    assert {"ledger", sol, btc, f"positions:{sol}", f"positions:{btc}"} <= set(before)
    results = await asyncio.gather(*(svc.open_position(u, o) for u, o in zip(users, orders,
                                                                               strict=True)))
    assert all(isinstance(r, OpenPosition) for r in results)
    after = svc.batch_stats()

    def grew(name: str) -> tuple[int, int]:
        return after[name][0] - before[name][0], after[name][1] - before[name][1]

    batches, items = grew("ledger")
    # 20 locks, then 20 notes of the opened positions (account events): each phase in one
    # or two ledger round trips
    assert items == 40 and batches <= 4
    for shard in (sol, btc):
        batches, items = grew(shard)
        assert items == 10 and batches <= 2  # the opens of each shard went together
    states = await asyncio.gather(*(svc.state(u) for u in users))
    assert all(len(s.positions) == 1 for s in states)
    for shard in (sol, btc):
        batches, items = svc.batch_stats()[f"positions:{shard}"]
        assert items - before[f"positions:{shard}"][1] == 20
        assert batches - before[f"positions:{shard}"][0] <= 2
    assert await platform.audit() == []


@pytest.mark.parametrize("deliver", [False, True])
async def test_lost_reply_is_resent_with_the_same_request_id(make: Make, deliver: bool) -> None:
    flaky: list[FailingBatches] = []

    def wrap(port: LocalPort) -> Port:
        flaky.append(FailingBatches(port, Open, failures=1, deliver=deliver))
        return flaky[-1]

    p = make(wrap=wrap)
    who = await sol_trader(p)
    pos = await p.service.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    assert sum(f.failed for f in flaky) == 1 and p.service.counters["resends"] == 1
    await p.service.aclose()
    state = await p.service.state(who)
    assert [q.position_id for q in state.positions] == [pos.position_id]
    assert state.margin_micros == 100 * USD
    assert p.shard_of("SOL").execute_blocking([Stats()])[0].positions == 1  # opened once
    assert await p.audit() == []


async def open_in_doubt(make: Make, deliver: bool) -> tuple[Platform, Principal]:
    """A platform whose SOL shard loses the reply to every Open (``deliver``: it ran them) or
    the Opens themselves, and a user whose ``sol_long()`` the service gave up on: in doubt."""
    p = make(wrap=lambda port: FailingBatches(port, Open, failures=3, deliver=deliver))
    who = await sol_trader(p)
    with pytest.raises(Unavailable):
        await p.service.open_position(who, sol_long())
    return p, who


@pytest.mark.parametrize("deliver", [False, True])
async def test_open_in_doubt_keeps_the_lock_until_the_shard_answers(make: Make,
                                                                     deliver: bool) -> None:
    p, who = await open_in_doubt(make, deliver)
    svc = p.service
    # in doubt: still locked (read before the background resolution gets a turn)
    assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
    # the background round and this one run one after the other, never both on one doubt
    assert await svc.reconciler.run_once() == 0
    assert await svc.reconciler.run_once() == 0
    state = await svc.state(who)
    if deliver:  # it did open: the lock stays with the position
        assert len(state.positions) == 1 and state.margin_micros == 100 * USD
    else:  # it never arrived: released, and fenced against a late arrival
        assert state.positions == [] and (state.free_micros, state.margin_micros) == (SIGNUP, 0)
    assert svc.counters["opens_in_doubt"] == 1
    assert await p.audit() == []


async def test_a_fenced_open_that_arrives_late_is_refused(make: Make) -> None:
    p, who = await open_in_doubt(make, deliver=False)
    svc = p.service
    assert await svc.reconciler.run_once() == 0
    assert balances(p, who) == (SIGNUP, 0)
    sol = svc.shards[p.shard_of("SOL").name]
    assert isinstance(sol, FailingBatches) and len(sol.lost) == 3
    assert len({c.request.request_id for c in sol.lost}) == 1  # every resend: the same id
    # the open the shard never saw arrives now: fenced, it opens nothing
    late = await p.shard_of("SOL").call(sol.lost[0])
    assert isinstance(late, Rejected)
    assert (await svc.state(who)).positions == []
    assert await p.audit() == []


async def test_audit_reports_a_margin_without_a_position(make: Make) -> None:
    p = make()
    who = await sol_trader(p)
    assert isinstance(await p.service.open_position(who, sol_long()), OpenPosition)
    assert await p.audit() == []
    # money locked behind the service's back: the invariant no longer holds
    assert await p.ledger.call(LockMargin(MarginLock(who.user, 5 * USD))) is None
    problems, totals = await p.service.audit(attempts=2, retry_delay_s=0)
    # a lock holds a slot of the open-position limit too: both differ
    assert [d.subject for d in problems] == [margin_account(who.user),
                                             f"user:{who.user}:open_count"]
    assert f"user:{who.user}:margin" in problems[0].text
    assert totals["sum_micros"] == 0


async def test_audit_reports_only_what_differs_at_every_read(
        make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under traffic each read can catch another account between its lock and its open: those
    are not reported; a difference of the same account at every read is."""
    p = make()
    who = await sol_trader(p)
    ledger = p.service.ledger
    real, reads = ledger.call, 0

    async def call(command: object) -> object:
        nonlocal reads
        answer = await real(command)
        if isinstance(command, Audit):  # a different account caught mid-open at each read
            reads += 1
            other = margin_account(1000 + reads)
            answer = [*answer, AuditDifference(
                other, f"{other} is 1000000, open margins sum to 0")]
        return answer

    monkeypatch.setattr(ledger, "call", call)
    assert await p.service.audit(attempts=3, retry_delay_s=0) == ([], await real(Totals()))
    assert reads == 2  # the first two reads had nothing in common: no third was needed
    # money locked behind the service's back: at every read, so reported
    assert await p.ledger.call(LockMargin(MarginLock(who.user, 5 * USD))) is None
    reads = 0
    problems, _ = await p.service.audit(attempts=3, retry_delay_s=0)
    assert reads == 3
    assert problems[0].text.startswith(f"user:{who.user}:margin is "), problems
    assert [d.subject for d in problems] == [margin_account(who.user),
                                             f"user:{who.user}:open_count"]  # a lock's slot


def more_than_free_mb(directory: Path) -> int:
    """A MIN_FREE_DISK_MB the disk of ``directory`` does not have."""
    fs = os.statvfs(directory)
    return (fs.f_bavail * fs.f_frsize >> 20) + 1024


async def test_a_nearly_full_journal_disk_fails_health_and_names_the_hosts(
        make: Make, tmp_path: Path) -> None:
    """A host whose journal's disk has less than MIN_FREE_DISK_MB free says so in /healthz's
    components (it keeps trading: the floor warns before a write fails); with enough free
    space every host is ok."""
    floor = more_than_free_mb(tmp_path)
    p = make(settings=Settings(min_free_disk_mb=floor), data_dir=str(tmp_path / "low"))
    health = await p.service.health()
    assert not health.ok
    assert set(health.components) == {"ledger", *p.shards}
    for name, text in health.components.items():
        assert text.startswith("unhealthy: ") and "MiB free on the disk of" in text, text
        assert f"below MIN_FREE_DISK_MB ({floor})" in text and name in text, text
    who = await sol_trader(p)
    assert isinstance(await p.service.open_position(who, sol_long()), OpenPosition)
    roomy = make(settings=Settings(min_free_disk_mb=0), data_dir=str(tmp_path / "roomy"))
    health = await roomy.service.health()
    assert health.ok and set(health.components.values()) == {"ok"}


async def test_a_dead_shard_hides_only_its_own_asset_and_fails_health(make: Make) -> None:
    p = make(wrap=lambda port: Down(port, down="BTC" in port.name))
    await p.push_tick("SOL", "100.00", "100.01")
    prices = await p.service.prices()
    assert list(prices) == ["SOL"]
    health = await p.service.health()
    assert not health.ok and health.components["shard-BTC-0"] == "unavailable"
    assert health.components["shard-SOL-0"] == "ok"
    assert health.components["ledger"] == "ok"
    who = await signup(p.service)
    with pytest.raises(Unavailable):
        await p.service.open_position(who, OpenOrder("BTC", Side.LONG, 100 * USD, 2))
    assert await p.service.reconciler.run_once() == 1  # BTC's outcome stays unknown, its lock kept
    assert balances(p, who) == (SIGNUP - 100 * USD, 100 * USD)
    pos = await p.service.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    state = await p.service.state(who)
    assert state.unavailable == ("shard-BTC-0",)
    assert [q.position_id for q in state.positions] == [pos.position_id]
    assert state.margin_micros == 200 * USD  # the BTC lock is kept while its outcome is unknown


async def test_a_close_whose_settlement_is_lost_still_settles_once(make: Make) -> None:
    p = make()
    who = await sol_trader(p)
    pos = await p.service.open_position(who, sol_long())
    assert isinstance(pos, OpenPosition)
    # a ledger that loses every settlement sent to it (reachable for everything else)
    ledger = FailingBatches(p.ledger, ApplySettlements, failures=None)
    flaky = TradingService(ledger, dict(p.shards), p.settings, idem_wait_s=0.3)
    try:
        order = CloseOrder(pos.position_id, client_order_id="lost")
        closed = await flaky.close_position(who, order)
        # the ledger fails every batch that carries a settlement, and a background round's
        # resend could share a batch with a read or a retry below: rounds run by hand here
        await flaky.reconciler.aclose()
        assert not isinstance(closed, Rejected)  # the close happened: the caller gets it
        assert flaky.counters["settlements_deferred"] == 1
        assert (await flaky.state(who)).margin_micros == 100 * USD  # not settled yet
        with pytest.raises(Unavailable, match="clientOrderId is still in progress"):
            # its answer waits for its settlement
            await flaky.close_position(who, order)
        ledger.failures = 0  # the ledger is back: the close settles with its answer
        assert await flaky.reconciler.run_once() == 0
        assert await flaky.close_position(who, order) == closed  # the answer was kept
        state = await flaky.state(who)
        assert state.margin_micros == 0 and state.free_micros == SIGNUP + closed.pnl_micros
        await p.push_tick("SOL", "100.00", "100.02")  # later deliveries change nothing
        assert await flaky.state(who) == state
        assert (await p.ledger.call(Totals()))["closed_positions"] == 1
        assert await p.audit() == []
    finally:
        await flaky.aclose()


async def test_an_in_doubt_open_that_never_arrived_is_released_once_despite_a_lost_reply(
        make: Make) -> None:
    p, who = await open_in_doubt(make, deliver=False)
    svc = p.service
    await svc.aclose()  # drive the rounds by hand
    # the ledger releases the lock but its reply is lost, once
    lost = FailingBatches(p.ledger, AbandonLock, failures=1, deliver=True)
    svc.reconciler.ledger = lost
    assert await svc.reconciler.run_once() == 1  # released, but the service did not hear it
    assert lost.failed == 1
    assert await svc.reconciler.run_once() == 0  # the resend finds nothing left to release
    assert balances(p, who) == (SIGNUP, 0)
    assert await p.audit() == []


async def test_a_client_order_id_is_forgotten_after_its_ttl(make: Make) -> None:
    from cluster.config import Settings

    p = make(settings=Settings(client_order_id_ttl_s=60))
    svc = p.service
    who = await sol_trader(p)
    order = sol_long(client_order_id="o-ttl")
    first = await svc.open_position(who, order)
    assert isinstance(first, OpenPosition)
    p.clock.now_us += 59_000_000
    await p.push_tick("SOL", "100.00", "100.01")
    await svc.reconciler.sweep()  # what the service's background watch runs every 10 s
    assert await svc.open_position(who, order) == first  # within the TTL: the first answer
    p.clock.now_us += 2_000_000
    await p.push_tick("SOL", "100.00", "100.01")
    await svc.reconciler.sweep()
    assert svc.counters["client_order_ids_expired"] == 1
    second = await svc.open_position(who, order)  # after it: the id is a new request
    assert isinstance(second, OpenPosition) and second.position_id != first.position_id
    assert len((await svc.state(who)).positions) == 2
    assert await p.audit() == []


async def test_the_sweep_forgets_expired_client_order_ids_while_a_shard_is_away(
        make: Make) -> None:
    """A reservation left pending (its API process died) is settled against every shard; with
    BTC's away that part of the sweep fails until it is back, and the ids past their TTL are
    forgotten all the same (each one's answer otherwise held in the ledger's memory and
    snapshots for as long as the shard is away)."""
    p = make(settings=Settings(client_order_id_ttl_s=60),
             wrap=lambda port: Down(port) if "BTC" in port.name else port)
    svc = p.service
    who = await sol_trader(p)
    assert isinstance(await svc.open_position(who, sol_long(client_order_id="o-1")), OpenPosition)
    assert await p.ledger.call(Begin(IdemKey(who.user, "close", "c-dead"), 77)) is None
    p.clock.now_us += 61_000_000
    btc = svc.shards["shard-BTC-0"]
    assert isinstance(btc, Down)
    btc.down = True
    with pytest.raises(Unavailable):
        await svc.reconciler.sweep()
    assert svc.counters["client_order_ids_expired"] == 1
    btc.down = False
    await svc.reconciler.sweep()
    assert await p.ledger.call(PendingRequests()) == []


async def test_a_client_order_id_is_free_past_its_ttl_before_any_sweep(make: Make) -> None:
    from cluster.config import Settings

    p = make(settings=Settings(client_order_id_ttl_s=60))
    svc = p.service
    who = await sol_trader(p)
    first = await svc.open_position(who, sol_long(client_order_id="o-ttl"))
    assert isinstance(first, OpenPosition)
    p.clock.now_us += 60_000_000  # exactly the TTL: remembered
    await p.push_tick("SOL", "100.00", "100.01")
    assert await svc.open_position(who, sol_long(client_order_id="o-ttl")) == first
    p.clock.now_us += 1  # past it, no sweep yet: the id is a new request, other terms too
    await p.push_tick("SOL", "100.00", "100.01")
    second = await svc.open_position(who, sol_long(margin_usd=50, client_order_id="o-ttl"))
    assert isinstance(second, OpenPosition) and second.margin_micros == 50 * USD
    assert await svc.open_position(who, sol_long(margin_usd=50, client_order_id="o-ttl")) == \
        second
    assert balances(p, who)[1] == 150 * USD and await p.audit() == []


async def test_open_positions_page_across_shards_while_positions_close_between_pages(
        platform: Platform) -> None:
    """Positions of three shards, some opened at the same microsecond, paged two at a time
    while positions close between pages (the one a cursor names, one not yet read, one already
    listed, a partial close): every position open all along is listed once, in (openedAt,
    positionId) order, and none is listed twice."""
    svc = platform.service
    who = await sol_trader(platform)
    await platform.push_tick("BTC", "60000.0", "60000.1")
    await platform.push_tick("ETH", "3000.00", "3000.01")
    opened: list[OpenPosition] = []
    for n, asset in enumerate(["SOL", "BTC", "ETH", "BTC", "SOL", "ETH", "ETH", "SOL"]):
        platform.clock.now_us += 0 if n % 3 == 1 else 1  # ties in time across shards
        pos = await svc.open_position(who, OpenOrder(asset, Side.LONG, 50 * USD, 5))
        assert isinstance(pos, OpenPosition), pos
        opened.append(pos)
    order = sorted(opened, key=lambda p: (p.opened_ts_us, p.position_id))
    assert len({p.opened_ts_us for p in order}) < len(order)  # ties, on different shards

    async def page(after: PositionsCursor | None) -> tuple[list[int], PositionsCursor | None]:
        answer = await svc.positions(who, 2, after)
        assert not isinstance(answer, Rejected), answer
        return [p.position_id for p in answer[0]], answer[1]

    ids = [p.position_id for p in order]
    listed, cursor = await page(None)
    assert listed == ids[:2]
    closing = [ids[1], ids[3], ids[0]]  # the cursor's own, one unread, one listed
    for position_id in closing:
        closed = await svc.close_position(who, CloseOrder(position_id))
        assert not isinstance(closed, Rejected), closed
    part = next(p for p in order[4:] if p.qty_steps > 1)
    assert not isinstance(await svc.close_position(
        who, CloseOrder(part.position_id, qty_steps=part.qty_steps // 2)), Rejected)
    while cursor is not None:
        more, cursor = await page(cursor)
        listed += more
    assert len(listed) == len(set(listed))
    assert listed == [i for i in ids if i not in closing[1:2]]


async def test_each_assets_opens_and_orders_go_round_robin_over_its_splits(make: Make) -> None:
    """SHARDS=SOL=2,BTC=2 and a client that alternates the assets and opens with orders: the
    opens of each asset take its splits in turn (0, 1, 0, 1), and so do its orders."""
    p = make(settings=Settings(shards={"SOL": 2, "BTC": 2}))
    svc = p.service
    who = await sol_trader(p)
    await p.push_tick("BTC", "60000.0", "60000.1")
    below = {"SOL": 9_000, "BTC": 500_000}  # 90.00 and 50000.0: the orders wait
    splits: dict[tuple[str, str], list[int]] = {}
    for _ in range(4):
        for asset in ("SOL", "BTC"):
            pos = await svc.open_position(who, OpenOrder(asset, Side.LONG, 10 * USD, 10))
            assert isinstance(pos, OpenPosition), pos
            order = await svc.place_order(who, PlaceOrder(
                asset, Side.LONG, OrderKind.LIMIT, below[asset], 10 * USD, 10))
            assert isinstance(order, PendingOrder), order
            for kind, item_id in (("open", pos.position_id), ("order", order.order_id)):
                spec = svc.layout.of_position(item_id)
                assert spec is not None and spec.asset == asset
                splits.setdefault((asset, kind), []).append(spec.split)
    assert splits == {(asset, kind): [0, 1, 0, 1]
                      for asset in ("SOL", "BTC") for kind in ("open", "order")}
    assert await p.audit() == []


async def test_the_sweeps_go_on_after_asking_who_leads_failed(
        platform: Platform, caplog: pytest.LogCaptureFixture) -> None:
    """The question of which replica sweeps (Serve's rank, which a replica may not have) fails
    once: that round is skipped and reported, and the next ones sweep. Before, the failure
    ended the sweeps of that process for good, with nothing said (the task held it unread)."""
    asked = 0

    def leading() -> bool:
        nonlocal asked
        asked += 1
        if asked == 1:
            raise AttributeError("'NoneType' object has no attribute 'rank'")
        return True

    reconciler = platform.service.reconciler
    watching = asyncio.ensure_future(reconciler.watch_pending(0.01, leading))
    try:
        await until(lambda: "client_order_ids_expired" in reconciler.counters, 5)
        assert not watching.done()
        assert "asking which replica sweeps failed" in caplog.text
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
