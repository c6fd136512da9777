"""DurableLedger.abandon_locks: journaled, exactly once across crashes, snapshots and replays."""

from __future__ import annotations

from pathlib import Path

from cluster.ledger_store import DurableLedger
from engine.messages import IdemHit, IdemKey, MarginLock
from tests.unit.durability.test_durable_stores import SIGNUP, USD, crash, open_ledger


def balances(led: DurableLedger, user: int) -> tuple[int, int]:
    return led.balances_many([user])[0]


def test_lock_journaled_answer_lost_then_abandoned_once_across_restarts(tmp_path: Path) -> None:
    led = open_ledger(tmp_path)
    user = led.create_account().user
    key = IdemKey(user, "open", "lost")
    assert led.lock_margins([MarginLock(user, 30 * USD, key, 101),
                             MarginLock(user, 70 * USD, None, 202)]) == [None, None]
    crash(led)  # journaled, but the answer never left the process
    led = open_ledger(tmp_path)
    assert balances(led, user) == (SIGNUP - 100 * USD, 100 * USD)
    assert led.abandon_locks([303]) == []  # unknown id: nothing changes
    assert led.abandon_locks([101]) == [(101, user, 30 * USD)]
    assert led.abandon_locks([101]) == []  # a resend after a lost answer changes nothing
    assert led.pending_open_requests() == []
    crash(led)
    led = open_ledger(tmp_path)  # the release (and the dropped reservation) replay
    assert balances(led, user) == (SIGNUP - 70 * USD, 70 * USD)
    assert led.abandon_locks([101]) == []
    assert led.begin([key]) == [None]  # a retry of the clientOrderId runs again
    assert led.audit({user: 70 * USD}) == []
    led.close()


def test_abandonable_locks_survive_a_snapshot(tmp_path: Path) -> None:
    led = open_ledger(tmp_path, snapshot_every_records=2)
    user = led.create_account().user
    key = IdemKey(user, "open", "snap")
    assert led.lock_margins([MarginLock(user, 40 * USD, key, 7)]) == [None]
    led.create_account()
    led.create_account()  # past the snapshot cadence: the lock lives in the snapshot
    led.checkpoint()
    crash(led)
    led = open_ledger(tmp_path)
    assert balances(led, user) == (SIGNUP - 40 * USD, 40 * USD)
    assert led.lock_margins([MarginLock(user, 40 * USD, key, 8)]) == [IdemHit(None)]
    assert led.abandon_locks([7]) == [(7, user, 40 * USD)]
    crash(led)
    led = open_ledger(tmp_path)
    assert balances(led, user) == (SIGNUP, 0)
    assert led.abandon_locks([7]) == []
    assert led.begin([key]) == [None]
    assert led.audit({}) == []
    led.close()


def test_start_reconciliation_ends_abandonable_locks(tmp_path: Path) -> None:
    led = open_ledger(tmp_path)
    user = led.create_account().user
    assert led.lock_margins([MarginLock(user, 25 * USD, None, 9)]) == [None]
    assert led.reconcile_at_start({}, {}) == {user: 25 * USD}
    assert led.abandon_locks([9]) == []  # already released by the reconciliation
    crash(led)
    led = open_ledger(tmp_path)  # the replay knows it too
    assert balances(led, user) == (SIGNUP, 0)
    assert led.abandon_locks([9]) == []
    assert led.audit({}) == []
    led.close()
