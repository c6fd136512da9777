"""SPEC "Limits": open positions per account. The ledger counts, per user, the opens that hold
margin (locks not ended, positions not settled closed), from its events alone; one open past
``max_open_positions`` is refused with TOO_MANY_POSITIONS and changes nothing. Replay, snapshots
and the start-time reconciliation give the same count; nothing drives it below zero."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from cluster.actors.host import host_specs
from cluster.config import Settings
from engine.events import MarginReleased
from engine.events import OpenCountSet
from engine.events import decode
from engine.events import encode
from engine.ledger import AuditDifference
from engine.ledger_machine import DEFAULT_MAX_OPEN_POSITIONS
from engine.ledger_machine import START_RECONCILED
from engine.ledger_machine import AbandonLock
from engine.ledger_machine import ApplySettlements
from engine.ledger_machine import Audit
from engine.ledger_machine import Balances
from engine.ledger_machine import Begin
from engine.ledger_machine import LedgerMachine
from engine.ledger_machine import LockMargin
from engine.ledger_machine import OpenCount
from engine.ledger_machine import ReconcileAtStart
from engine.ledger_machine import ReleaseMargin
from engine.ledger_machine import Remember
from engine.machine import run
from engine.messages import ClosedPosition
from engine.messages import IdemHit
from engine.messages import IdemKey
from engine.messages import MarginLock
from engine.messages import OpenPosition
from engine.messages import SettlementItem
from engine.orders import CloseReason
from engine.results import Code
from engine.results import Rejected
from tests.unit.cluster.local_platform import balances
from tests.unit.cluster.local_platform import build_platform
from tests.unit.cluster.local_platform import sol_long
from tests.unit.cluster.local_platform import sol_trader
from tests.unit.engine.recorded_ledger import SHARD
from tests.unit.engine.recorded_ledger import SIGNUP
from tests.unit.engine.recorded_ledger import USD
from tests.unit.engine.recorded_ledger import Recorded
from tests.unit.engine.recorded_ledger import closed
from tests.unit.engine.recorded_ledger import opened
from tests.unit.engine.recorded_ledger import snapshot_round_trip

CAP = DEFAULT_MAX_OPEN_POSITIONS


class Journaled(Recorded):
    """A Recorded ledger that numbers its locks' request ids (1, 2, ...) and the settlements
    it applies from SHARD (seq 1, 2, ...)."""

    def __init__(self, cap: int = CAP) -> None:
        super().__init__(cap)
        self.rid = 0
        self.seq = 0

    def lock(self, user: int, margin: int = USD, key: IdemKey | None = None) -> Any:
        self.rid += 1
        return self(LockMargin(MarginLock(user, margin, key, self.rid)))

    def count(self, user: int) -> int:
        n: int = self(OpenCount(user))
        return n

    def settle(self, c: ClosedPosition) -> None:
        self.seq += 1
        assert self(ApplySettlements(SHARD, (SettlementItem(self.seq, c),))) == self.seq

    def same_after_replay_and_snapshot(self) -> None:
        want = self.m.fingerprint()
        assert self.replayed().fingerprint() == want
        restored = snapshot_round_trip(self.m)
        assert restored.fingerprint() == want and restored.check() == []


def full(cap: int = CAP) -> tuple[Journaled, int]:
    """A ledger and a user holding margin for ``cap`` opens (request ids 1..cap)."""
    led = Journaled(cap)
    user = led.account().user
    for _ in range(cap):
        assert led.lock(user) is None
    assert led.count(user) == cap
    return led, user


def refused(led: Journaled, user: int, key: IdemKey | None = None) -> Rejected:
    answer = led.lock(user, USD, key)
    assert isinstance(answer, Rejected) and answer.code is Code.TOO_MANY_POSITIONS, answer
    return answer


# ----------------------------------------------------------------------------- the boundary
def test_the_200th_open_is_accepted_and_the_201st_refused_with_nothing_changed() -> None:
    led = Journaled()
    user, other = led.account().user, led.account().user
    for _ in range(1, CAP):
        assert led.lock(user) is None
    assert led.count(user) == CAP - 1
    assert led.lock(user) is None  # the 200th
    assert led.count(user) == CAP
    before, records = led.m.fingerprint(), len(led.records)
    answer = refused(led, user)  # the 201st
    assert answer.message == f"at most {CAP} open positions per account (each pending order " \
                             "holds one)"
    assert led.m.fingerprint() == before and len(led.records) == records
    assert led(Balances(user)) == (SIGNUP - CAP * USD, CAP * USD)
    # with a clientOrderId the refusal is its first answer, and still nothing is locked
    key = IdemKey(user, "open", "one-too-many")
    assert refused(led, user, key) == answer
    assert led(Begin(key)) == IdemHit(answer)
    assert led(Balances(user)) == (SIGNUP - CAP * USD, CAP * USD)
    assert led.count(user) == CAP
    # another account has its own count
    assert led.lock(other) is None and led.count(other) == 1
    led.same_after_replay_and_snapshot()


@pytest.mark.parametrize("ending", ["release", "abandon", "close", "liquidation"])
def test_a_released_lock_or_a_settled_close_makes_room(ending: str) -> None:
    led, user = full()
    if ending == "release":  # the shard refused the open
        assert led(ReleaseMargin(user, USD, 1)) is None
    elif ending == "abandon":  # the open never went out
        assert led(AbandonLock(1)) == (1, user, USD)
        assert led(AbandonLock(1)) is None  # once
    else:
        reason = CloseReason.MANUAL if ending == "close" else CloseReason.LIQUIDATION
        pnl = 0 if ending == "close" else -USD  # a liquidation loses the whole margin
        led.settle(closed(user, 7, USD, pnl, reason))
        # a resend of the same settlement applies nothing, and frees nothing more
        assert led(ApplySettlements(SHARD, (SettlementItem(1, closed(user, 7, USD, 0)),))) == 1
    assert led.count(user) == CAP - 1
    assert led.lock(user) is None
    refused(led, user)
    led.same_after_replay_and_snapshot()


def test_an_open_that_happened_keeps_counting_until_its_close_settles() -> None:
    """The reconciler's paths: an open resolved as made keeps its lock (now its position); an
    abandon of a lock whose clientOrderId has the position is refused; its close frees it."""
    led = Journaled(2)
    user = led.account().user
    key = IdemKey(user, "open", "k")
    assert led.lock(user, 5 * USD, key) is None
    assert led.lock(user) is None
    assert led(Remember(key, opened(user, 9, 5 * USD))) is None
    assert led(AbandonLock(1)) is None
    assert led.count(user) == 2
    refused(led, user)
    led.settle(closed(user, 9, 5 * USD, 0))
    assert led.count(user) == 1
    assert led.lock(user) is None
    led.same_after_replay_and_snapshot()


def test_the_count_never_goes_below_zero() -> None:
    led = Journaled()
    user = led.account().user
    assert led(ReleaseMargin(user, 0)) is None  # a release that ended no lock
    assert led.count(user) == 0
    assert led.lock(user, 3 * USD) is None
    # more releases than locks (commands the service does not send, but valid transfers)
    assert led(ReleaseMargin(user, USD)) is None and led.count(user) == 0
    assert led(ReleaseMargin(user, USD)) is None and led.count(user) == 0
    assert led(Balances(user)) == (SIGNUP - USD, USD)
    led.settle(closed(user, 3, USD, 0))  # a position the count did not know of
    assert led.count(user) == 0
    led.same_after_replay_and_snapshot()


def test_a_user_without_margin_holds_no_open() -> None:
    led = Journaled()
    user = led.account().user
    assert led.lock(user, 2 * USD) is None
    assert led.lock(user, 3 * USD) is None
    assert led(ReleaseMargin(user, 5 * USD, 1)) is None  # both amounts at once
    assert led(Balances(user)) == (SIGNUP, 0)
    assert led.count(user) == 0
    led.same_after_replay_and_snapshot()


# ----------------------------------------------------------------------------- the start
def test_the_start_reconciliation_counts_from_the_shards_and_replays() -> None:
    """Three locks nobody ended (their API process died), two positions, one close the
    ledger has not applied yet: after the reconciliation the user holds three."""
    led = Journaled(6)
    user, other = led.account().user, led.account().user
    for _ in range(3):
        assert led.lock(user, USD) is None  # orphans
    for _ in range(3):
        assert led.lock(user, 5 * USD) is None  # two positions, and one closed since
    assert led.count(user) == 6
    refused(led, user)
    assert led.lock(other, 2 * USD) is None  # a position, counted right already
    led.account()  # a third account, nothing open
    item = SettlementItem(1, closed(user, 11, 5 * USD, 0))  # closed on the shard, not applied
    released = led(ReconcileAtStart({user: 10 * USD, other: 2 * USD}, {SHARD: [item]}, None,
                                    {user: 2, other: 1}))
    assert released == {user: 3 * USD}
    assert led.count(user) == 3 and led.count(other) == 1
    led.same_after_replay_and_snapshot()
    assert led(AbandonLock(1)) is None  # every lock ended at the start
    # the close arrives: two positions left; the user may open four more
    led.settle(item.closed)
    assert led.count(user) == 2
    for _ in range(4):
        assert led.lock(user) is None
    refused(led, user)
    # a second start where every count is right changes none
    assert led(ReconcileAtStart({user: 14 * USD, other: 2 * USD}, {}, None,
                                {user: 6, other: 1})) == {}
    assert led.count(user) == 6 and led.count(other) == 1
    assert not any(isinstance(e, OpenCountSet) or (isinstance(e, MarginReleased)
                                                   and e.request_id != START_RECONCILED)
                   for e in led.m.decode_record(led.records[-1]))
    led.same_after_replay_and_snapshot()


def test_the_start_reconciliation_sets_a_count_without_releasing() -> None:
    """Counts too low (an older snapshot) or too high are set even when no margin is in
    excess; without counts, a user left without margin holds none."""
    led = Journaled()
    user, other = led.account().user, led.account().user
    assert led.lock(user, 4 * USD) is None
    assert led.lock(other, 4 * USD) is None
    assert led(ReconcileAtStart({user: 4 * USD, other: 4 * USD}, {}, None,
                                {user: 2, other: 1})) == {}
    assert led.count(user) == 2 and led.count(other) == 1
    assert led(ReconcileAtStart({user: 4 * USD}, {})) == {other: 4 * USD}
    assert led.count(user) == 2 and led.count(other) == 0
    led.same_after_replay_and_snapshot()
    for bad in ({user: -1}, {user: "2"}, {"u": 1}, {user: 1 << 63}):
        before = led.m.fingerprint()
        answer = led(ReconcileAtStart({user: 4 * USD}, {}, None, bad))
        assert isinstance(answer, Rejected) and answer.code is Code.INVALID_REQUEST
        assert led.m.fingerprint() == before


def test_an_older_snapshot_without_counts_restores_and_the_start_counts_again() -> None:
    led, user = full(3)
    arrays, meta = led.m.snapshot()
    meta = json.loads(json.dumps(meta))
    del meta["open_counts"]
    old = LedgerMachine.from_snapshot(SIGNUP, 3, arrays, meta)
    assert old.check() == [] and run(old, OpenCount(user)) == 0
    assert run(old, ReconcileAtStart({user: 3 * USD}, {}, None, {user: 3})) == {}
    assert run(old, OpenCount(user)) == 3
    assert isinstance(run(old, LockMargin(MarginLock(user, USD, None, 99))), Rejected)


def test_a_recount_is_its_own_event_and_request_ids_keep_their_range() -> None:
    led = Journaled()
    user = led.account().user
    assert led(LockMargin(MarginLock(user, USD, None, START_RECONCILED - 1))) is None
    recount = OpenCountSet(user, 7)
    assert decode(encode(recount)) == recount
    led.m.apply(recount)
    assert led.count(user) == 7
    led.m.apply(OpenCountSet(user, 0))
    assert led.count(user) == 0


def test_the_audit_compares_the_counts_with_the_shards() -> None:
    """A count the limits are enforced with that differs from the shards' books (plus what
    their unapplied items will end) is a difference of its own, even when every margin agrees:
    too high refuses opens the account may make, too low lets it past the limit."""
    led, user = full(3)
    item = SettlementItem(1, closed(user, 11, USD, 0))  # closed on the shard, not applied
    books = ({user: 2 * USD}, {SHARD: [item]})  # margins and outboxes as the shards have them
    assert led(Audit(*books, {user: 2}, {})) == []
    assert led(Audit(*books)) == []  # counts not given: not compared
    led(ReconcileAtStart(*books, None, {user: 4}, {}))  # a count set too high
    assert led.count(user) == 5
    assert led(Audit(*books, {user: 2}, {})) == [AuditDifference(
        f"user:{user}:open_count",
        f"user {user}'s open_count (for the limits) is 5, the shards' books make it 3")]
    assert led(Audit(*books, {user: 4}, {})) == []
    # an open order holds a slot and an order count; the order count differs
    assert led(Audit(*books, {user: 4}, {user: 1})) == [AuditDifference(
        f"user:{user}:order_count",
        f"user {user}'s order_count (for the limits) is 0, the shards' books make it 1")]
    for bad in ({user: -1}, {user: "2"}, {"u": 1}):
        answer = led(Audit(*books, bad, {}))
        assert isinstance(answer, Rejected) and answer.code is Code.INVALID_REQUEST


def test_check_reports_a_count_without_margin() -> None:
    led = Journaled()
    user = led.account().user
    led.m._open_counts[user] = 1
    assert led.m.check() == [f"user {user} counts 1 open positions without margin"]


# ----------------------------------------------------------------------------- configuration
def test_the_limit_reaches_the_ledger_from_the_settings() -> None:
    with pytest.raises(ValueError):
        LedgerMachine(SIGNUP, 0)
    assert LedgerMachine(SIGNUP).max_open_positions == DEFAULT_MAX_OPEN_POSITIONS
    spec = host_specs(Settings(max_open_positions=3))[0]
    fresh = spec.build(None)
    assert fresh.max_open_positions == 3
    arrays, meta = fresh.snapshot()
    assert spec.build(SimpleNamespace(arrays=arrays, meta=meta)).max_open_positions == 3
    assert LedgerMachine.from_snapshot(SIGNUP, arrays, meta).max_open_positions == \
        DEFAULT_MAX_OPEN_POSITIONS


@pytest.mark.asyncio
async def test_the_service_is_refused_at_the_cap_and_the_start_counts_again() -> None:
    """Through the service: the refusal locks nothing; a lock nobody ended (an API process
    that died) counts until the start-time reconciliation releases it and counts again."""
    p = build_platform(Settings(max_open_positions=3))
    try:
        svc = p.service
        who = await sol_trader(p)
        first = await svc.open_position(who, sol_long(10))
        assert isinstance(first, OpenPosition)
        assert isinstance(await svc.open_position(who, sol_long(10)), OpenPosition)
        # a price that moved: the shard refuses, the lock is released
        moved = await svc.open_position(who, sol_long(10, current_price_ticks=1))
        assert isinstance(moved, Rejected) and moved.code is Code.PRICE_MOVED
        assert await p.ledger.call(LockMargin(MarginLock(who.user, USD, None, 77))) is None
        answer = await svc.open_position(who, sol_long(10))
        assert isinstance(answer, Rejected) and answer.code is Code.TOO_MANY_POSITIONS
        assert balances(p, who) == (SIGNUP - 21 * USD, 21 * USD)
        assert await svc.reconciler.at_start() == {who.user: USD}
        assert await p.ledger.call(OpenCount(who.user)) == 2
        assert isinstance(await svc.open_position(who, sol_long(10)), OpenPosition)
        answer = await svc.open_position(who, sol_long(10))
        assert isinstance(answer, Rejected) and answer.code is Code.TOO_MANY_POSITIONS
        assert await p.audit() == []
        # a count gone wrong (set here by a start told too few) is named though margins agree
        v = await svc.reconciler.shard_views()
        assert (v.slots, v.orders) == ({who.user: 3}, {})
        assert await p.ledger.call(ReconcileAtStart(v.margins, v.unsettled, None,
                                                    {who.user: 1}, v.orders)) == {}
        assert [d.subject for d in await p.audit()] == [f"user:{who.user}:open_count"]
    finally:
        await p.service.aclose()
        p.hosts.close()
