"""LedgerMachine: partial closes: the closed part's margin settled while the position keeps its
slot, the history paged by close id, the checks of a close's id, and the records written
before close ids existed (history snapshots, stored answers)."""

from __future__ import annotations

import json

from engine.ledger_machine import ApplySettlements
from engine.ledger_machine import History
from engine.ledger_machine import LedgerMachine
from engine.ledger_machine import LockMargin
from engine.ledger_machine import OpenCount
from engine.ledger_machine import ReconcileAtStart
from engine.ledger_machine import decode_answer
from engine.ledger_machine import encode_answer
from engine.messages import ClosedPosition
from engine.messages import MarginLock
from engine.messages import SettlementItem
from engine.position_ids import partial_close_id
from engine.results import Code
from engine.results import Rejected
from numpy.lib import recfunctions
from tests.unit.engine.recorded_ledger import SHARD
from tests.unit.engine.recorded_ledger import SIGNUP
from tests.unit.engine.recorded_ledger import USD
from tests.unit.engine.recorded_ledger import closed
from tests.unit.engine.recorded_ledger import one_account
from tests.unit.engine.recorded_ledger import snapshot_round_trip

PID = 2**34 + 3


def part(owner: int, seq: int, margin: int, pnl: int) -> ClosedPosition:
    """The closed part (``margin``) of position PID, settlement ``seq`` of book 3."""
    return closed(owner, PID, margin, pnl)._replace(close_id=partial_close_id(seq, 3),
                                                    partial=1)


def test_a_partial_close_settles_its_part_and_the_position_keeps_its_slot() -> None:
    led, user = one_account(max_open_positions=1)
    assert led(LockMargin(MarginLock(user, 100 * USD, request_id=1))) is None
    first = part(user, 1, 40 * USD, 5 * USD)  # 40 USD of margin back with 5 USD profit
    assert led(ApplySettlements(SHARD, (SettlementItem(1, first),))) == 1
    assert led.balances(user) == (SIGNUP - 100 * USD + 45 * USD, 60 * USD)
    assert led(OpenCount(user)) == 1  # the rest is open: still at the cap
    refused = led(LockMargin(MarginLock(user, USD, request_id=2)))
    assert isinstance(refused, Rejected) and refused.code is Code.TOO_MANY_POSITIONS
    assert led.audit({user: 60 * USD}) == []
    second = part(user, 2, 20 * USD, -3 * USD)
    whole = closed(user, PID, 40 * USD, 0)  # the rest, closed whole: named by the position
    assert led(ApplySettlements(SHARD, (SettlementItem(2, second),
                                        SettlementItem(3, whole)))) == 3
    assert led(OpenCount(user)) == 0 and led.balances(user) == (SIGNUP + 2 * USD, 0)
    # the history pages by close id, newest first
    assert led(History(user)) == [whole, second, first]
    assert led(History(user, 2, whole.close_id)) == [second, first]
    assert led(History(user, 5, second.close_id)) == [first]
    assert led(History(user, 5, first.close_id)) == []
    assert isinstance(led(History(user, 5, PID + 1)), Rejected)
    assert led.restarted().fingerprint() == snapshot_round_trip(led.m).fingerprint()


def test_a_close_is_named_by_its_position_and_a_partial_one_by_an_id_of_its_own() -> None:
    led, user = one_account()
    led(LockMargin(MarginLock(user, 100 * USD, request_id=1)))
    good = part(user, 1, 10 * USD, 0)
    for bad in (good._replace(partial=2), good._replace(close_id=0),
                closed(user, PID, 10 * USD, 0)._replace(close_id=PID + 1),
                good._replace(close_id=2**64)):
        refused = led(ApplySettlements(SHARD, (SettlementItem(1, bad),)))
        assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST, bad
    assert led.balances(user) == (SIGNUP - 100 * USD, 100 * USD)
    assert led(ApplySettlements(SHARD, (SettlementItem(1, good),))) == 1


def test_an_unapplied_partial_close_holds_margin_but_no_slot_at_the_start_recount() -> None:
    led, user = one_account()
    led(LockMargin(MarginLock(user, 100 * USD, request_id=1)))
    unsettled = {SHARD: [SettlementItem(1, part(user, 1, 30 * USD, 0))]}
    # the shard holds the rest (70 USD); the part waits in its outbox: nothing is released,
    # and the account holds one open (the rest), not two
    assert led(ReconcileAtStart({user: 70 * USD}, unsettled, None, {user: 1})) == {}
    assert led(OpenCount(user)) == 1 and led.balances(user)[1] == 100 * USD
    assert led.audit({user: 70 * USD}, unsettled) == []


def test_history_and_answers_stored_before_close_ids_read_as_whole_closes() -> None:
    led, user = one_account()
    led(LockMargin(MarginLock(user, 100 * USD, request_id=1)))
    close = closed(user, PID, 100 * USD, USD)
    led(ApplySettlements(SHARD, (SettlementItem(1, close),)))
    arrays, meta = led.m.snapshot()
    arrays["history"] = recfunctions.drop_fields(arrays["history"], ["close_id", "partial"],
                                                 usemask=False)
    old = LedgerMachine.from_snapshot(SIGNUP, led.m.max_open_positions, arrays,
                                      json.loads(json.dumps(meta)))
    assert old.fingerprint() == led.m.fingerprint()
    stored = json.loads(encode_answer(close))
    assert stored[-2:] == [PID, 0]
    assert decode_answer(json.dumps(stored[:-2]).encode()) == close  # the old 19 fields
    part_answer = part(user, 4, USD, 0)
    assert decode_answer(encode_answer(part_answer)) == part_answer
