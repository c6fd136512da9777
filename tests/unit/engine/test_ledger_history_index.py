"""The ledger's history index: a user's record id -> its place, asked by every note of an open
(has the position closed?) and every page with a ``before`` cursor. Checked against a plain
list of the records added, across snapshots (``table``), a restore (``load``) and the index
sorting its newer ids in again; and for what it costs: 16 bytes a record, not a dict entry."""

from __future__ import annotations

import random

import numpy as np
import pytest
from engine.ledger_machine import _HISTORY_ROW
from engine.ledger_machine import _INDEX_NEWER_MIN
from engine.ledger_machine import _INTEGERS
from engine.ledger_machine import HISTORY_DTYPE
from engine.ledger_machine import _History
from engine.ledger_machine import _IdIndex
from tests.unit.engine.recorded_ledger import closed

USERS = (1, 2)


def _close(owner: int, close_id: int) -> object:
    return closed(owner, close_id, 1_000_000, 0)._replace(close_id=close_id)


def _check(history: _History, added: dict[int, list[int]]) -> None:
    """Every id of every user found at its last place, pages before it as the list says,
    ids no record has (and ones no uint64 is) not found; the index's own check passes."""
    for user, ids in added.items():
        last = {rid: place for place, rid in enumerate(ids)}
        for rid, place in last.items():
            assert history.has(user, rid)
            page = history.page(user, 3, rid)
            assert page is not None
            assert [r.close_id for r in page] == ids[max(0, place - 3):place][::-1]
        for absent in (0, max(ids) + 1, -1, 1 << 64, 1 << 70, "7", 1.0):
            if absent not in last:
                assert not history.has(user, absent)
                assert history.page(user, 10, absent) is None  # type: ignore[arg-type]
    assert history.problems() == []


def test_the_index_finds_each_id_across_snapshots_a_restore_and_its_sorting_in_again() -> None:
    rng = random.Random(7)
    history = _History("history", "close_id")
    added: dict[int, list[int]] = {user: [] for user in USERS}
    unused = rng.sample(range(1, 1 << 40), 6000)
    for step in range(5000):
        user = rng.choice(USERS)
        # now and then an id the user has (the index keeps its last place)
        rid = rng.choice(added[user]) if added[user] and rng.random() < 0.01 else unused.pop()
        history.add(_close(user, rid))
        added[user].append(rid)
        if step in (10, 1500):
            _check(history, added)  # builds both users' indexes
        if step % 700 == 699:
            history.table(HISTORY_DTYPE, _INTEGERS, ("asset",), _HISTORY_ROW)
    _check(history, added)
    # sorted in again whenever the newer ids passed the bound: never more than that
    for user in USERS:
        index = history._index[user]
        assert len(index.newer) <= max(_INDEX_NEWER_MIN, index.ids.size >> 3)
        assert index.ids.size > _INDEX_NEWER_MIN  # (so the sorting in again did happen)

    table, (assets,) = history.table(HISTORY_DTYPE, _INTEGERS, ("asset",), _HISTORY_ROW)
    restored = _History("history", "close_id")
    restored.load(table.copy(), _INTEGERS, _HISTORY_ROW, {"asset": assets})
    _check(restored, added)


def test_an_index_takes_16_bytes_a_record() -> None:
    ids = np.random.default_rng(3).permutation(1 << 20).astype(np.uint64) + 1
    index = _IdIndex(ids)
    assert index.ids.nbytes + index.places.nbytes == 16 * ids.size
    assert index.place(int(ids[12345])) == 12345
    assert index.place(0) is None


def test_the_check_finds_an_index_that_does_not_match_the_records() -> None:
    history = _History("history", "close_id")
    for rid in (11, 22, 33):
        history.add(_close(1, rid))
    assert history.has(1, 22) and history.problems() == []
    index = history._index[1]
    index.places[[0, 1]] = index.places[[1, 0]]
    assert history.problems() == ["history index of user 1 is inconsistent"]
    history._index[1] = _IdIndex(np.array([11, 22, 33], dtype=np.uint64))
    history._index[1].newer[44] = 1  # a place the sorted ids cover
    assert history.problems() == ["history index of user 1 is inconsistent"]


@pytest.mark.parametrize("cursor", [-1, 1 << 64, True])
def test_a_cursor_no_uint64_id_can_be_is_unknown(cursor: int) -> None:
    history = _History("history", "close_id")
    history.add(_close(1, 1))
    assert history.page(1, 10, cursor) is None and not history.has(1, cursor)


def test_ids_above_2_to_the_53_are_told_apart() -> None:
    # (searched for as a Python int, numpy compares uint64 ids as float64, where these are one)
    history = _History("history", "close_id")
    big = 1 << 60
    for rid in (big, big + 1, big + 3):
        history.add(_close(1, rid))
    history.table(HISTORY_DTYPE, _INTEGERS, ("asset",), _HISTORY_ROW)
    assert all(history.has(1, rid) for rid in (big, big + 1, big + 3))
    assert not history.has(1, big + 2)
    page = history.page(1, 10, big + 1)
    assert page is not None and [r.close_id for r in page] == [big]
    assert history.page(1, 10, big + 2) is None


@pytest.mark.parametrize("kind", [np.int64, np.uint64, np.int32])
def test_a_numpy_int_id_is_the_int_it_is(kind: type) -> None:
    # (as the machine takes numpy ints in commands, and as a dict of the ids found them)
    history = _History("history", "close_id")
    for rid in (5, 7, 9):
        history.add(_close(1, rid))
    history.table(HISTORY_DTYPE, _INTEGERS, ("asset",), _HISTORY_ROW)
    history.add(_close(1, 11))
    for rid, older in ((7, [5]), (11, [9, 7, 5])):  # in the sorted ids, among the newer ones
        assert history.has(1, kind(rid))
        page = history.page(1, 10, kind(rid))
        assert page is not None and [r.close_id for r in page] == older
    assert not history.has(1, kind(8)) and history.page(1, 10, kind(8)) is None


def test_the_check_reports_an_index_of_more_ids_than_the_user_has_records() -> None:
    history = _History("history", "close_id")
    for rid in (11, 22, 33):
        history.add(_close(1, rid))
    history._index[1] = _IdIndex(np.array([11, 22, 33, 44], dtype=np.uint64))
    assert history.problems() == ["history index of user 1 is inconsistent"]
