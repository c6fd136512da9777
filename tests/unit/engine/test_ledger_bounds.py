"""LedgerMachine at its bounds: what it remembers by request id is never dropped while a
request may still end it; a command that would need more room is refused, nothing kept."""

from __future__ import annotations

from engine.ledger_machine import AbandonLock
from engine.ledger_machine import Begin
from engine.ledger_machine import ExpectRelease
from engine.ledger_machine import LockMargin
from engine.ledger_machine import Note
from engine.ledger_machine import OpenCount
from engine.ledger_machine import OpenLocks
from engine.ledger_machine import ReleaseMargin
from engine.messages import IdemKey
from engine.messages import MarginLock
from engine.results import Code
from engine.results import Rejected
from tests.unit.engine.recorded_ledger import SIGNUP
from tests.unit.engine.recorded_ledger import USD
from tests.unit.engine.recorded_ledger import Recorded
from tests.unit.engine.recorded_ledger import opened


def _busy(answer: object) -> bool:
    return isinstance(answer, Rejected) and answer.code is Code.SERVICE_UNAVAILABLE


def test_a_lock_past_the_bound_is_refused_and_the_locks_under_way_still_end() -> None:
    """Two locks under way fill a bound of two: a third is refused (SERVICE_UNAVAILABLE, its
    clientOrderId not kept, so its retry runs), and the oldest, whose open the shard refused,
    is still freed by its own release. Evicting it instead made that release free nothing:
    its margin stayed locked and counted, unswept (OpenLocks no longer listed it), and the
    audit failed until the next platform start."""
    led = Recorded(max_recent_locks=2)
    user = led.account().user
    key = IdemKey(user, "open", "third")
    assert led(LockMargin(MarginLock(user, 30 * USD, None, 1))) is None
    assert led(LockMargin(MarginLock(user, 20 * USD, None, 2))) is None
    refused = led(LockMargin(MarginLock(user, 10 * USD, key, 3)))
    assert _busy(refused)
    assert led.balances(user) == (SIGNUP - 50 * USD, 50 * USD)
    assert led(OpenCount(user)) == 2
    assert led(OpenLocks()) == [(1, "open"), (2, "open")]
    # an announced removal needs the same room, and is refused the same way
    removal = IdemKey(user, "margin", "removal")
    assert _busy(led(ExpectRelease(user, 5 * USD, 4, removal)))
    assert led(Begin(removal, 5)) is None  # nothing was reserved for request 4
    assert led(ReleaseMargin(user, 30 * USD, 1)) is None  # the shard refused open 1
    assert led.balances(user) == (SIGNUP - 20 * USD, 20 * USD)
    assert led(OpenCount(user)) == 1
    assert led.audit({user: 20 * USD}) == []  # open 2's position
    assert led(LockMargin(MarginLock(user, 10 * USD, key, 3))) is None  # the retry runs
    assert led.balances(user) == (SIGNUP - 30 * USD, 30 * USD)
    led.restarted()


def test_a_full_bound_empties_as_requests_end_and_an_abandon_still_frees_the_oldest() -> None:
    """A lock whose request was cut off stays listed for the sweep while the bound is full,
    and the sweep's abandon frees it; a noted request makes room too."""
    led = Recorded(max_recent_locks=2)
    user = led.account().user
    assert led(LockMargin(MarginLock(user, 30 * USD, None, 1))) is None  # cut off
    assert led(LockMargin(MarginLock(user, 20 * USD, None, 2))) is None
    assert _busy(led(LockMargin(MarginLock(user, 5 * USD, None, 3, top_up=True))))
    assert led(AbandonLock(1)) == (1, user, 30 * USD)
    assert led(LockMargin(MarginLock(user, 5 * USD, None, 3, top_up=True))) is None
    assert _busy(led(LockMargin(MarginLock(user, 7 * USD, None, 4))))
    assert led(Note(user, 2, "positionOpened", opened(user, 9, 20 * USD))) is None
    assert led(LockMargin(MarginLock(user, 7 * USD, None, 4))) is None
    assert led(OpenLocks()) == [(3, "margin"), (4, "open")]
    assert led.balances(user) == (SIGNUP - 32 * USD, 32 * USD)
    led.restarted()
