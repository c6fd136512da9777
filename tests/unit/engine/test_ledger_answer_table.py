"""The answered clientOrderIds in a snapshot's append-only table (engine.answer_log): a
snapshot encodes only the answers given since the one before, a table mostly expired is written
anew, and every table restores the state it was taken of."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from engine.answer_log import _places
from engine.events import ClientOrderAsked
from engine.ledger_machine import Begin
from engine.ledger_machine import ExpireAnswers
from engine.ledger_machine import LedgerMachine
from engine.ledger_machine import LockMargin
from engine.ledger_machine import Remember
from engine.messages import IdemHit
from engine.messages import IdemKey
from engine.messages import MarginLock
from engine.results import Code
from engine.results import Rejected
from tests.unit.engine.recorded_ledger import SIGNUP
from tests.unit.engine.recorded_ledger import USD
from tests.unit.engine.recorded_ledger import Recorded
from tests.unit.engine.recorded_ledger import older_answers_layout
from tests.unit.engine.recorded_ledger import one_account
from tests.unit.engine.recorded_ledger import opened
from tests.unit.engine.recorded_ledger import snapshot_round_trip


def answer(led: Recorded, user: int, name: str, asked: bytes = b"") -> IdemKey:
    """An open answered under clientOrderId ``name`` (a refusal for names ending in "!")."""
    key = IdemKey(user, "open", name)
    if name.endswith("!"):
        assert isinstance(led(LockMargin(MarginLock(user, 2 * SIGNUP, key, 0), asked)), Rejected)
        return key
    assert led(LockMargin(MarginLock(user, USD, key, 0), asked)) is None
    led(Remember(key, opened(user, 1 << 34 | sum(name.encode()), USD)))
    return key


def lines(table: np.ndarray) -> list[str]:
    return bytes(table).decode("ascii").split("\n")[:-1]


def test_a_snapshot_encodes_only_the_answers_given_since_the_one_before() -> None:
    led, user = one_account()
    tables = []
    for n in range(5):
        for k in range(3):
            answer(led, user, f"r{n}-{k}" + "!" * (k == 2), asked=b"terms")
        arrays, meta = led.m.snapshot()
        assert meta["pending_answers"] == [] and "answers" not in meta
        assert meta["answer_log"] == {"entries": 3 * (n + 1), "dropped": 0}
        tables.append(arrays["answers"])
    # each table is the one before with the new answers after it, in the same memory: the
    # bytes already handed to the writer are neither copied nor changed
    assert all(np.shares_memory(a, b) for a, b in itertools.pairwise(tables))
    assert all(b[:len(a)].tobytes() == a.tobytes() for a, b in itertools.pairwise(tables))
    assert not tables[-1].flags.writeable
    got = lines(tables[-1])
    assert len(got) == 30
    assert json.loads(got[0])[:3] == [user, "open", "r0-0"] and \
        json.loads(got[0])[4] == b"terms".hex()
    assert json.loads(got[5])[0] == "rejected"
    # a snapshot with nothing new gives the same table again
    again, _ = led.m.snapshot()
    assert again["answers"].tobytes() == tables[-1].tobytes()
    restored = snapshot_round_trip(led.m)
    assert restored.fingerprint() == led.m.fingerprint() and restored.check() == []
    retry = LockMargin(MarginLock(user, USD, IdemKey(user, "open", "r0-0"), 0), b"terms")
    assert restored.decide(retry, 0)[0] == led.m.decide(retry, 0)[0] == IdemHit(
        opened(user, 1 << 34 | sum(b"r0-0"), USD))


def test_expired_answers_are_skipped_then_a_table_half_expired_is_written_anew() -> None:
    led, user = one_account()
    for n in range(10):
        answer(led, user, f"k{n}")
        led.now_us += 10
    table, meta = led.m.snapshot()
    assert meta["answer_log"] == {"entries": 10, "dropped": 0}
    # the 4 oldest expire: the next table is the same bytes, its first 4 entries dropped
    assert led(ExpireAnswers(65)) == 4  # (answered 0, 10, ... 90 us after the first)
    kept, meta = led.m.snapshot()
    assert meta["answer_log"] == {"entries": 10, "dropped": 4}
    assert kept["answers"].tobytes() == table["answers"].tobytes()
    restored = snapshot_round_trip(led.m)
    assert restored.fingerprint() == led.m.fingerprint() and restored.check() == []
    # the restored one extends what it loaded, and expires in the same order
    restored_led = Recorded()
    restored_led.m, restored_led.now_us, restored_led.accounts = restored, led.now_us, 1
    for each in (led, restored_led):
        answer(each, user, "later")
        assert each(ExpireAnswers(35)) == 3  # 7 of the 11 are gone now
    assert restored_led.m.fingerprint() == led.m.fingerprint()
    anew, meta = led.m.snapshot()
    assert meta["answer_log"] == {"entries": 4, "dropped": 0}  # written anew
    assert [json.loads(line)[2] for line in lines(anew["answers"])[0::2]] == [
        "k7", "k8", "k9", "later"]
    assert not np.shares_memory(anew["answers"], kept["answers"])
    for m in (led.m, restored_led.m):
        assert snapshot_round_trip(m).fingerprint() == led.m.fingerprint()
    # an id whose answer expired answers anew, and both tables hold it once, as held
    assert led(Begin(IdemKey(user, "open", "k0"), 0)) is None
    assert snapshot_round_trip(led.m).fingerprint() == led.m.fingerprint()


def test_terms_recorded_after_an_answer_write_the_table_anew() -> None:
    # not a sequence the platform makes: the table cannot follow it by appending, so the next
    # snapshot writes every answer again, and what it restores is what is held
    led, user = one_account()
    first = answer(led, user, "first", asked=b"one")
    answer(led, user, "second")
    led.m.snapshot()
    led.m.apply(ClientOrderAsked(*first, b"two"))
    assert led.m.check() == []
    arrays, meta = led.m.snapshot()
    assert meta["answer_log"] == {"entries": 2, "dropped": 0}
    assert json.loads(lines(arrays["answers"])[0])[4] == b"two".hex()
    assert snapshot_round_trip(led.m).fingerprint() == led.m.fingerprint()


@pytest.mark.parametrize("damage", ["line", "not one value", "values across lines", "head",
                                    "twice", "ascii", "counts", "pending too", "no table"])
def test_a_table_that_is_not_one_is_refused(damage: str) -> None:
    led, user = one_account()
    for name in ("a", "b", "c!"):
        answer(led, user, name)
    assert led(Begin(IdemKey(user, "open", "waiting"), 9)) is None
    arrays, meta = led.m.snapshot()
    meta = json.loads(json.dumps(meta))
    text = lines(arrays["answers"])
    if damage == "line":
        text = text[:-1]
    elif damage == "not one value":
        text[1] = "1,2"
    elif damage == "values across lines":
        # as many values as lines, but a's answer and b's key on one line and b's answer on
        # two: each answer's place would be another line's bytes
        text[1:4] = [f"{text[1]},{text[2]}", *text[3].split(",", 1)]
    elif damage == "head":
        text[2] = json.dumps(json.loads(text[2])[:4])
    elif damage == "twice":
        text[4:6] = text[0:2]
    elif damage == "ascii":
        text[0] = text[0].replace('"a"', '"\u00e4"')
    elif damage == "counts":
        meta["answer_log"]["dropped"] = 4
    else:
        meta["pending_answers"].append([user, "open", "a", "", 0, ""])
    table = np.frombuffer("".join(f"{line}\n" for line in text).encode(), dtype=np.uint8)
    given = {**arrays, "answers": table}
    if damage == "no table":  # (its meta says it has one)
        del given["answers"]
    with pytest.raises(ValueError):
        LedgerMachine.from_snapshot(SIGNUP, led.m.max_open_positions, given, meta)


def test_a_held_answer_costs_its_place_not_its_text_once_written() -> None:
    led, user = one_account()
    key = IdemKey(user, "open", "no")
    refused = led(LockMargin(MarginLock(user, 2 * SIGNUP, key, 0)))
    assert isinstance(refused, Rejected) and refused.code is Code.INSUFFICIENT_BALANCE
    assert isinstance(led.m._answers[key], str)
    led.m.snapshot()
    assert type(led.m._answers[key]) is int  # its text is the table's
    assert led(Begin(key)) == IdemHit(refused)


def test_a_snapshot_of_a_release_before_the_table_restores_and_the_next_writes_them_all(
) -> None:
    led, user = one_account()
    for name in ("a", "b!", "c"):
        answer(led, user, name, asked=name.encode())
    assert led(Begin(IdemKey(user, "open", "waiting"), 9)) is None
    older = older_answers_layout(*led.m.snapshot())
    assert "answers" not in older[0] and len(older[1]["answers"]) == 4
    restored = LedgerMachine.from_snapshot(SIGNUP, led.m.max_open_positions, *older)
    assert restored.fingerprint() == led.m.fingerprint() and restored.check() == []
    arrays, meta = restored.snapshot()
    assert meta["answer_log"] == {"entries": 3, "dropped": 0}
    assert len(meta["pending_answers"]) == 1
    assert arrays["answers"].tobytes() == led.m.snapshot()[0]["answers"].tobytes()


def test_the_places_of_a_table_past_2_gib_are_its_lines() -> None:
    # (11 million answers held): a place is an int of 64 bits or more past 2**31 bytes
    ends = np.array([10, 20, 2**31 + 5, 2**31 + 100, 2**32 + 7, 2**32 + 50], dtype=np.intp)
    assert _places(ends) == [11 << 32 | 9, (2**31 + 6) << 32 | 94, (2**32 + 8) << 32 | 42]
    assert _places(ends[:2]) == [11 << 32 | 9] and _places(ends[:0]) == []
