"""LedgerMachine histories across snapshots: a snapshot's history tables become the live
machine's own, so the live machine after any number of snapshots (interleaved with whole and
partial closes and ended orders of several users and assets, texts first seen after one)
equals one never snapshotted and one restored, and a table handed to the writer never
changes."""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
from engine.ledger_machine import _V1_HISTORY
from engine.ledger_machine import Audit
from engine.ledger_machine import History
from engine.ledger_machine import LedgerMachine
from engine.ledger_machine import OrderHistory
from engine.machine import run
from engine.messages import ClosedPosition
from engine.messages import EndedOrder
from engine.order_book import OrderStatus
from engine.position_ids import partial_close_id
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from numpy.lib import recfunctions
from tests.unit.engine.recorded_ledger import NOW
from tests.unit.engine.recorded_ledger import SIGNUP
from tests.unit.engine.recorded_ledger import USD
from tests.unit.engine.recorded_ledger import closed
from tests.unit.engine.test_ledger_orders import Orders
from tests.unit.engine.test_ledger_orders import ended

ASSETS = ("SOL", "BTC", "ETH", "DOGE")
CODES = ("WOULD_LIQUIDATE", "PRICE_MOVED", "INSUFFICIENT_BALANCE")
USERS = 3


def _restored(m: LedgerMachine, layout: int = 0) -> LedgerMachine:
    """``m`` through a snapshot as a file stores it (JSON meta, arrays copied), its closes
    in the ``layout`` of today (0), before close ids (1) or the first int64 one (2): those
    hold whole closes only."""
    arrays, meta = m.snapshot()
    arrays = {k: v.copy() for k, v in arrays.items()}
    if layout:
        assert not arrays["history"]["partial"].any()
        arrays["history"] = recfunctions.drop_fields(arrays["history"], ["close_id", "partial"],
                                                     usemask=False)
    if layout == 2:
        arrays["history"] = np.array([[int(row[n]) for n in _V1_HISTORY]
                                      for row in arrays["history"]], dtype=np.int64)
    return LedgerMachine.from_snapshot(SIGNUP, m.max_open_positions, m.max_open_orders,
                                       arrays, json.loads(json.dumps(meta)))


def _pages(m: LedgerMachine, users: list[int]) -> str:
    """Every user's pages of both histories: from the newest and before each record id (and
    before an id that is none of them), at a few limits; as repr, so that each value's type
    counts too."""
    out: list[Any] = []
    for user in users:
        for kind, id_of in ((History, lambda r: r.close_id), (OrderHistory, lambda r: r.order_id)):
            everything = run(m, kind(user, 500), NOW)
            out.append(everything)
            for before in [None, 12345, *map(id_of, everything)]:
                for limit in (1, 2, 500):
                    out.append(run(m, kind(user, limit, before), NOW))
    return repr(out)


ops = st.lists(st.tuples(st.sampled_from(("open", "part", "close", "order", "snap", "restart")),
                         st.integers(0, USERS - 1), st.integers(0, 100)),
               min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_snapshots_at_any_point_leave_the_histories_as_never_snapshotted(
        steps: list[tuple[str, int, int]]) -> None:
    led = Orders(200, 100)
    users = [led.account().user for _ in range(USERS)]
    opened: dict[int, tuple[int, int, str]] = {}  # position id -> (user, margin left, asset)
    parts = 0
    handed: list[tuple[np.ndarray, np.ndarray]] = []  # (table given, its bytes then)
    for op, who, pick in steps:
        user = users[who]
        asset = ASSETS[pick % len(ASSETS)]
        if op == "open":
            led.lock(user, 3 * USD)
            opened[led.rid << 8 | 3] = (user, 3 * USD, asset)
        elif op in ("part", "close") and opened:
            pid = sorted(opened)[pick % len(opened)]
            owner, left, at = opened[pid]
            pnl = pick % 3 - 1
            if op == "part" and left > USD:
                parts += 1
                record: ClosedPosition = closed(owner, pid, USD, pnl)._replace(
                    asset=at, close_id=partial_close_id(parts, 3), partial=1)
                opened[pid] = (owner, left - USD, at)
            else:
                record = closed(owner, pid, left, pnl)._replace(asset=at)
                del opened[pid]
            led.deliver(record)
        elif op == "order":
            order = led.place(user, USD)._replace(asset=asset)
            status = (OrderStatus.FILLED, OrderStatus.CANCELLED, OrderStatus.EXPIRED,
                      OrderStatus.REJECTED)[pick % 4]
            pid = led.rid << 8 | 3 if status == OrderStatus.FILLED else 0
            end: EndedOrder = ended(order, status, pid)
            if status == OrderStatus.REJECTED:
                end = end._replace(reject_code=CODES[pick % len(CODES)] + asset)
            if pid and pick % 2:  # the position closed in the same delivery
                led.deliver(end, closed(user, pid, USD, 0)._replace(asset=asset))
            else:
                led.deliver(end)
                if pid:
                    opened[pid] = (user, USD, asset)
        elif op == "snap":
            arrays, _ = led.m.snapshot()
            handed.extend((table, table.copy()) for table in arrays.values())
        elif op == "restart":
            led.m = _restored(led.m, 0 if parts else pick % 3)
        assert led.m.check() == []
    never = led.replayed(led.fresh())
    want = never.fingerprint()
    assert led.m.fingerprint() == want
    assert _pages(led.m, users) == _pages(never, users)
    again = _restored(led.m)
    assert again.fingerprint() == want and _pages(again, users) == _pages(never, users)
    margins: dict[int, int] = {}
    for owner, left, _ in opened.values():
        margins[owner] = margins.get(owner, 0) + left
    assert led.audit(margins) == [] and run(never, Audit(margins), NOW) == []
    for table, then in handed:  # what the writer was given never changed
        assert table.tobytes() == then.tobytes()
    # and the next snapshot, with nothing added, is the same again
    first, meta = led.m.snapshot()
    second, meta_again = led.m.snapshot()
    assert meta == meta_again
    assert all(first[name].tobytes() == second[name].tobytes() for name in first)
    assert led.m.fingerprint() == want


def test_a_snapshot_writes_only_the_closes_added_since_the_one_before() -> None:
    led = Orders(200, 100)
    user = led.account().user
    tables = []
    for _ in range(5):
        led.lock(user, 3 * USD)
        led.deliver(closed(user, led.rid << 8 | 3, 3 * USD, 0))
        arrays, _ = led.m.snapshot()
        tables.append(arrays["history"])
    # each table is the one before with the new close after it, in the same memory: the
    # rows already handed to the writer are neither copied nor changed
    assert [len(t) for t in tables] == [1, 2, 3, 4, 5]
    assert all(np.shares_memory(a, b) for a, b in itertools.pairwise(tables))
    assert all(b[:len(a)].tobytes() == a.tobytes() for a, b in itertools.pairwise(tables))
    assert LedgerMachine.APPEND_ONLY == ("history", "order_history", "answers")
