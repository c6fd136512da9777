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
from engine.ledger_machine import Remember
from engine.messages import IdemHit
from engine.messages import IdemKey
from engine.messages import MarginLock
from engine.results import Code
from engine.results import Rejected
from tests.unit.engine.recorded_ledger import NOW
from tests.unit.engine.recorded_ledger import SIGNUP
from tests.unit.engine.recorded_ledger import USD
from tests.unit.engine.recorded_ledger import Recorded
from tests.unit.engine.recorded_ledger import opened
from tests.unit.engine.recorded_ledger import snapshot_round_trip


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


def test_an_account_holding_the_most_client_order_ids_is_refused_a_new_one_nothing_kept() -> None:
    """A bound of three clientOrderIds per account: with three held (answered, refused, or
    still pending), a request with a fourth is refused RATE_LIMITED, told when the oldest is
    released, and nothing is kept or locked; a retry of a held one gets its first answer, and
    requests without one, or another account's, run. Once the oldest answer's TTL passes, the
    new one takes its place. Before, every new clientOrderId was kept for the TTL, about 1 KB
    apiece, so one account sending 50 a second grew the ledger by gigabytes a day."""
    ttl_us = 60 * 10**6
    led = Recorded(max_client_order_ids=3)
    user = led.account().user
    other = led.account().user
    first, refused, pending, new = (IdemKey(user, "open", name)
                                    for name in ("first", "refused", "pending", "new"))
    assert led(LockMargin(MarginLock(user, 10 * USD, first, 1), ttl_us=ttl_us)) is None
    assert led(Note(user, 1, "positionOpened", opened(user, 1, 10 * USD), first)) is None
    assert led(Begin(refused, 2, ttl_us=ttl_us), NOW + 10**6) is None
    no = Rejected(Code.INSUFFICIENT_BALANCE, "insufficient free balance")
    assert led(Remember(refused, no, 2), NOW + 10**6) is None
    assert led(LockMargin(MarginLock(user, 20 * USD, pending, 3), ttl_us=ttl_us)) is None
    held = led.m.fingerprint()
    later = NOW + 10 * 10**6
    for command in (LockMargin(MarginLock(user, 5 * USD, new, 4), ttl_us=ttl_us),
                    Begin(new, 4, ttl_us=ttl_us),
                    ExpectRelease(user, 0, 4, new, ttl_us=ttl_us)):
        full = led(command, later)
        assert isinstance(full, Rejected) and full.code is Code.RATE_LIMITED, command
        assert full.retry_after_s == 50  # when the first answer (at NOW) expires
        assert "clientOrderIds" in full.message
    assert led.m.fingerprint() == held  # nothing reserved, locked or announced
    assert led.balances(user) == (SIGNUP - 30 * USD, 30 * USD)
    assert led(OpenCount(user)) == 2
    # a retry of a held key is answered as before; no key, or another account's, runs
    assert led(LockMargin(MarginLock(user, 10 * USD, first, 5), ttl_us=ttl_us), later) == \
        IdemHit(opened(user, 1, 10 * USD))
    assert led(Begin(refused, 6, ttl_us=ttl_us), later) == IdemHit(no)
    assert led(Begin(pending, 7, ttl_us=ttl_us), later) == IdemHit(None, 3)
    assert led(LockMargin(MarginLock(user, 1 * USD, None, 8)), later) is None
    assert led(Begin(IdemKey(other, "open", "new"), 9, ttl_us=ttl_us), later) is None
    # at the TTL itself the first answer is still kept; past it, the new key takes its place
    at_ttl = led(Begin(new, 10, ttl_us=ttl_us), NOW + ttl_us)
    assert isinstance(at_ttl, Rejected) and at_ttl.retry_after_s == 1
    past = NOW + ttl_us + 1
    assert led(LockMargin(MarginLock(user, 5 * USD, new, 11), ttl_us=ttl_us), past) is None
    assert led.balances(user) == (SIGNUP - 36 * USD, 36 * USD)
    assert led(Begin(first, 12, ttl_us=ttl_us), past) == \
        Rejected(Code.RATE_LIMITED, full.message.replace("in 50 s", "in 1 s"), 1)
    # a pending reservation dropped makes room too
    assert led(AbandonLock(3), past) == (3, user, 20 * USD)
    assert led(Begin(first, 13, ttl_us=ttl_us), past) is None
    assert snapshot_round_trip(led.m).fingerprint() == led.m.fingerprint()
    led.restarted()
    led.m._held[user] -= 1
    assert led.m.check() == ["the clientOrderIds counted per account differ from those held"]
