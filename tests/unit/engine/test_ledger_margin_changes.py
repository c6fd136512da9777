"""LedgerMachine: margin added to an open position (a lock that counts no open) and margin that
leaves without ending an open (released once per request id), through replay and snapshots."""

from __future__ import annotations

from engine.events import MarginAdded
from engine.events import MarginReturned
from engine.events import decode_batch
from engine.ledger_machine import AbandonLock
from engine.ledger_machine import Begin
from engine.ledger_machine import LockMargin
from engine.ledger_machine import OpenCount
from engine.ledger_machine import ReleaseMargin
from engine.messages import IdemHit
from engine.messages import IdemKey
from engine.messages import MarginLock
from engine.results import Code
from engine.results import Rejected
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
    assert led(Begin(key, 7)) is None  # the removal's clientOrderId, reserved
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


def test_replay_and_snapshots_keep_the_lock_kinds_and_the_released_ids() -> None:
    led, user = one_account()
    led(LockMargin(MarginLock(user, 100 * USD, request_id=1)))
    led(LockMargin(MarginLock(user, 20 * USD, request_id=2, top_up=True)))
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
