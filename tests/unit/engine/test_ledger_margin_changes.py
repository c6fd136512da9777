"""LedgerMachine: margin added to an open position (a lock that counts no open) and margin that
leaves without ending an open (released once per request id), through replay and snapshots."""

from __future__ import annotations

from engine.events import MarginAdded
from engine.events import MarginReturned
from engine.events import decode_batch
from engine.ledger_machine import RECENT_LOCKS_MAX
from engine.ledger_machine import AbandonLock
from engine.ledger_machine import Begin
from engine.ledger_machine import ExpectRelease
from engine.ledger_machine import LockMargin
from engine.ledger_machine import OpenCount
from engine.ledger_machine import OpenLocks
from engine.ledger_machine import ReleaseMargin
from engine.machine import run
from engine.messages import IdemHit
from engine.messages import IdemKey
from engine.messages import MarginLock
from engine.results import Code
from engine.results import Rejected
from tests.unit.engine.recorded_ledger import NOW
from tests.unit.engine.recorded_ledger import SIGNUP
from tests.unit.engine.recorded_ledger import USD
from tests.unit.engine.recorded_ledger import one_account
from tests.unit.engine.recorded_ledger import opened
from tests.unit.engine.recorded_ledger import snapshot_round_trip


def test_a_top_up_needs_free_balance_only_and_counts_no_open() -> None:
    led, user = one_account(max_open_positions=1)
    assert led(LockMargin(MarginLock(user, 100 * USD, request_id=1))) is None  # the open
    assert led(OpenCount(user)) == 1
    # at the position cap, a top-up of that position is still allowed and counts nothing
    assert led(LockMargin(MarginLock(user, 50 * USD, request_id=2, top_up=True))) is None
    assert led(OpenCount(user)) == 1 and led.balances(user) == (SIGNUP - 150 * USD, 150 * USD)
    assert isinstance(decode_batch(led.records[-1])[0], MarginAdded)
    short = led(LockMargin(MarginLock(user, SIGNUP, request_id=3, top_up=True)))
    assert isinstance(short, Rejected) and short.code is Code.INSUFFICIENT_BALANCE
    # a top-up the shard never applied is abandoned: returned, still no open uncounted
    assert led(AbandonLock(2)) == (2, user, 50 * USD)
    assert isinstance(decode_batch(led.records[-1])[0], MarginReturned)
    assert led(OpenCount(user)) == 1 and led.balances(user) == (SIGNUP - 100 * USD, 100 * USD)
    assert led(AbandonLock(2)) is None  # once
    assert led.audit({user: 100 * USD}) == []


def test_margin_removed_from_a_position_is_released_once_per_request_id() -> None:
    led, user = one_account()
    led(LockMargin(MarginLock(user, 100 * USD, request_id=1)))
    key = IdemKey(user, "margin", "less-1")
    # the removal announced (as the service does before the shard acts), its key reserved
    assert led(ExpectRelease(user, 30 * USD, 7, key)) is None
    position = opened(user, 5, 70 * USD)  # the position as the shard left it
    assert led(ReleaseMargin(user, 30 * USD, 7, (key, position), counted=False)) is None
    assert led.balances(user) == (SIGNUP - 70 * USD, 70 * USD)
    assert led(OpenCount(user)) == 1  # the position is still open
    assert led(Begin(key, 8)) == IdemHit(position)  # a retry gets the first answer
    records = len(led.records)
    # the same request again (its reply was lost, or the reconciler resolved it): nothing
    assert led(ReleaseMargin(user, 30 * USD, 7, (key, position), counted=False)) is None
    assert len(led.records) == records and led.balances(user)[1] == 70 * USD
    assert led.audit({user: 70 * USD}) == []
    # a counted release (an open that did not happen) ends the open as before
    assert led(ReleaseMargin(user, 70 * USD, 1)) is None
    assert led(OpenCount(user)) == 0 and led.balances(user) == (SIGNUP, 0)
    # the removal's release sent once more, now that less is locked than it freed: still its
    # first answer, and nothing moves
    assert led(ReleaseMargin(user, 30 * USD, 7, (key, position), counted=False)) is None
    assert led.balances(user) == (SIGNUP, 0)


def test_a_removal_announced_with_its_key_reserves_the_key_in_the_same_batch() -> None:
    """``ExpectRelease`` with the request's clientOrderId: the key is reserved and the release
    remembered in one journal record; a key held or answered gets that answer, and a refused
    announcement reserves nothing."""
    led, user = one_account()
    led(LockMargin(MarginLock(user, 100 * USD, request_id=1)))
    key = IdemKey(user, "margin", "less-2")
    records = len(led.records)
    assert led(ExpectRelease(user, 30 * USD, 7, key)) is None
    assert len(led.records) == records + 1
    assert [type(e).__name__ for e in decode_batch(led.records[-1])] == [
        "ClientOrderStoredAt", "ReleaseExpected"]
    assert (7, "margin") in led(OpenLocks())
    assert led(Begin(key, 8)) == IdemHit(None, 7)  # pending, held by request 7
    # a second request with the key: its answer (pending), nothing remembered for it
    assert led(ExpectRelease(user, 30 * USD, 9, key)) == IdemHit(None, 7)
    assert (9, "margin") not in led(OpenLocks()) and len(led.records) == records + 1
    position = opened(user, 5, 70 * USD)
    assert led(ReleaseMargin(user, 30 * USD, 7, (key, position), counted=False)) is None
    assert led(ExpectRelease(user, 30 * USD, 10, key)) == IdemHit(position)
    # refused (no such account): the key is not reserved
    other = IdemKey(user, "margin", "less-3")
    refused = led(ExpectRelease(user + 1000, 30 * USD, 11, other))
    assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST
    assert led(Begin(other, 12)) is None
    assert led.replayed().fingerprint() == led.m.fingerprint()


def test_replay_and_snapshots_keep_the_lock_kinds_and_the_released_ids() -> None:
    led, user = one_account()
    led(LockMargin(MarginLock(user, 100 * USD, request_id=1)))
    led(LockMargin(MarginLock(user, 20 * USD, request_id=2, top_up=True)))
    led(ExpectRelease(user, 5 * USD, 3))
    led(ReleaseMargin(user, 5 * USD, 3, None, counted=False))
    live = led.m.fingerprint()
    again = snapshot_round_trip(led.m)
    assert again.fingerprint() == live
    assert led.replayed().fingerprint() == live
    # the restored machine still knows the top-up's kind and the released request id
    led.m = again
    assert led(ReleaseMargin(user, 5 * USD, 3, None, counted=False)) is None
    assert led.balances(user) == (SIGNUP - 115 * USD, 115 * USD)
    assert led(AbandonLock(2)) == (2, user, 20 * USD)
    assert led(OpenCount(user)) == 1


def test_a_removal_resent_after_many_other_returns_frees_nothing_twice() -> None:
    """A removal's release resent late (its first send was taken, its reply lost, and the
    resend waited for the shard to resolve it) frees nothing again, however many requests
    returned margin meanwhile: the release is owed while the announcement is under way, not
    while its id is among the newest returned."""
    led, user = one_account()
    led(LockMargin(MarginLock(user, 100 * USD, request_id=1)))  # the position's margin
    assert led(ExpectRelease(user, 30 * USD, 7)) is None
    release = ReleaseMargin(user, 30 * USD, 7, None, counted=False)
    assert led(release) is None
    assert led.balances(user) == (SIGNUP - 70 * USD, 70 * USD)
    # TP/SL changes elsewhere meanwhile, each announced and ended (a return of 0)
    m = led.m
    for rid in range(100, 100 + RECENT_LOCKS_MAX):
        run(m, ExpectRelease(user, 0, rid), NOW)
        run(m, ReleaseMargin(user, 0, rid, None, counted=False), NOW)
    assert led(release) is None
    assert led.balances(user) == (SIGNUP - 70 * USD, 70 * USD)
    assert led.audit({user: 70 * USD}) == []
