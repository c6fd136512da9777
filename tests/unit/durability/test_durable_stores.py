"""DurableLedger and DurableShard: exactly the acknowledged state survives any crash.

A "crash" drops the object without its clean stop (no final snapshot, pending events lost) and
reopens the directory, as a restarted actor does. The torn-write tests cut the journal at
every byte of a call's batch record: the recovered state must be the state before the call or
after it, never a part of it. Hypothesis drives longer mixed sequences with snapshots in
between. No Ray: the cores run in-process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.journal_store import JOURNAL_DIR, DurabilityError, decode_batch, encode_batch
from cluster.ledger_core import LedgerCore
from cluster.ledger_store import DurableLedger, decode_answer, encode_answer
from engine.messages import (
    ClosedPosition,
    IdemHit,
    IdemKey,
    MarginLock,
    OpenPosition,
    SettlementItem,
    ShardClose,
    ShardOpen,
)
from cluster.trading.placement import ShardSpec
from cluster.shard_store import (
    MIN_VECTOR_RUN,
    RECOVERED_TICK_SOURCE,
    DurableShard,
    decode_shard_batch,
)
from engine.assets import DEFAULT_ASSETS
from engine.events import (
    Event,
    MarginLocked,
    OpenFenced,
    PositionClosed,
    PositionOpened,
    TickApplied,
    encode,
)
from engine.market import Tick
from engine.orders import CloseReason, Side
from engine.results import Code, Rejected

REPO = Path(__file__).resolve().parents[3]
SOL = DEFAULT_ASSETS["SOL"]
SPEC = ShardSpec("shard-SOL-0", "SOL", 0, 1, 3)
NOW = 1_800_000_000_000_000
MAX_AGE_US = 15_000_000
SIGNUP = 10_000 * 10**6
USD = 10**6


# ----------------------------------------------------------------------------- helpers
def open_ledger(path: Path, **options: Any) -> DurableLedger:
    options.setdefault("fsync", False)
    options.setdefault("background_snapshots", False)
    return DurableLedger(SIGNUP, path, **options)


def open_shard(path: Path, **options: Any) -> DurableShard:
    options.setdefault("fsync", False)
    options.setdefault("background_snapshots", False)
    return DurableShard(SPEC, SOL, 0, MAX_AGE_US, path, **options)


def crash(obj: DurableLedger | DurableShard) -> None:
    """Die without the clean stop: uncommitted events are lost, no final snapshot."""
    obj.store.wait_snapshot()
    obj.store.journal.close()


def ledger_state(led: LedgerCore) -> tuple[Any, ...]:
    return (led.ledger.accounts(), {k: v for k, v in led._applied_seq.items() if v},
            dict(led._answers),
            {u: list(h) for u, h in led._history.items()}, dict(led._account_ids),
            dict(led._users_by_key_hash), led._next_user, led._closed_count,
            dict(getattr(led, "_pending_opens", {})))


def shard_state(sh: DurableShard, acked: int = 0) -> tuple[Any, ...]:
    """What a shard acknowledged: book, owed settlements, durable open answers, numbering.
    (The last tick of a tick batch that closed nothing is deliberately not flushed.)"""
    arrays = sh.book.to_arrays()
    durable_opens = {r: a for r, a in sh._open_results.items() if not isinstance(a, Rejected)
                     or a.message.startswith("the open request was abandoned")}
    return ({k: v.tobytes() for k, v in arrays.items()}, sh._last_seq,
            [i for i in sh._outbox if i.seq > acked], durable_opens, sh.book.check())


def tick(bid_ticks: int, ask_ticks: int | None = None, ts_us: int = NOW) -> Tick:
    return Tick("SOL", bid_ticks, bid_ticks + 1 if ask_ticks is None else ask_ticks, ts_us, 1,
                "test")


def shard_open(rid: int, owner: int = 1, side: Side = Side.LONG, margin_usd: int = 100,
               leverage: int = 10, tp: int | None = None, sl: int | None = None) -> ShardOpen:
    return ShardOpen(rid, owner, side, margin_usd * USD, leverage, tp, sl, None, 100)


def segment(path: Path) -> Path:
    [seg] = sorted((path / JOURNAL_DIR).glob("*.wal"))
    return seg


def torn_copies(path: Path, start: int, end: int) -> list[tuple[int, Path]]:
    """Copies of ``path`` whose journal ends at every byte in ``start..end``."""
    copies = []
    for cut in range(start, end + 1):
        target = Path(tempfile.mkdtemp(prefix="torn-")) / "state"
        shutil.copytree(path, target)
        with open(segment(target), "r+b") as f:
            f.truncate(cut)
        copies.append((cut, target))
    return copies


def check_every_cut(path: Path, obj: Any, op: Callable[[], object],
                    state: Callable[[Any], tuple[Any, ...]],
                    reopen: Callable[[Path], Any]) -> None:
    """Run ``op`` on ``obj``; a journal torn anywhere in its record recovers to before or after."""
    before = state(obj)
    start = segment(path).stat().st_size
    op()
    after = state(obj)
    end = segment(path).stat().st_size
    assert end > start, "the call journaled nothing"
    for cut, copy in torn_copies(path, start, end):
        again = reopen(copy)
        try:
            assert state(again) == (after if cut == end else before), f"cut at byte {cut}"
        finally:
            crash(again)
            shutil.rmtree(copy.parent)


# ----------------------------------------------------------------------------- codecs
def test_batch_records_and_stored_answers_round_trip() -> None:
    events: list[Event] = [MarginLocked(1, 5, 0), TickApplied(1, 2, 3)]
    assert decode_batch(encode_batch([encode(e) for e in events])) == events
    assert decode_batch(encode(events[0])) == [events[0]]  # a bare event is a batch of one
    with pytest.raises(ValueError):
        decode_batch(encode_batch([encode(events[0])])[:-1])
    opened = OpenPosition(5, 1, "SOL", Side.SHORT, 100, 2, 3, 4, 120, 0, 110, NOW, None)
    closed = ClosedPosition(5, 1, "SOL", Side.LONG, 100, 2, 3, 4, 90, 0, 0, NOW, 95, -10, 0, 10,
                            -7, 3, NOW + 1)
    for answer in (None, Rejected(Code.INSUFFICIENT_BALANCE, "no"), opened, closed):
        back = decode_answer(encode_answer(answer))
        assert back == answer and type(back) is type(answer)
    back_open = decode_answer(encode_answer(opened))
    assert isinstance(back_open, OpenPosition) and isinstance(back_open.side, Side)


# ----------------------------------------------------------------------------- ledger
def test_ledger_batches_survive_a_crash_at_every_byte(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    led = open_ledger(path, snapshot_every_records=10**9)
    reopen = open_ledger
    check_every_cut(path, led, led.create_account, ledger_state, reopen)
    check_every_cut(path, led, led.create_account, ledger_state, reopen)
    key = IdemKey(1, "open", "c-1")
    check_every_cut(path, led, lambda: led.lock_margins([
        MarginLock(1, 100 * USD, key), MarginLock(2, 20_000 * USD), MarginLock(2, 50 * USD),
        MarginLock(2, 10 * USD, IdemKey(2, "open", "c-2"), 77)]), ledger_state, reopen)
    opened = OpenPosition(7 << 34 | 3, 1, "SOL", Side.LONG, 10001, 999, 100 * USD, 10, 8999, 0,
                          0, NOW, -99_900)
    check_every_cut(path, led, lambda: led.release_margins([(2, 50 * USD)], [(key, opened)]),
                    ledger_state, reopen)
    closed = ClosedPosition(opened.position_id, 1, "SOL", Side.LONG, 10001, 999, 100 * USD, 10,
                            8999, 0, 0, NOW, 8999, -100 * USD + 99_900 - 99_900, 0,
                            100 * USD, 0, int(CloseReason.LIQUIDATION), NOW + 5)
    closed = closed._replace(pnl_micros=-100 * USD, house_micros=100 * USD)
    check_every_cut(path, led, lambda: led.apply_settlements(
        SPEC.name, [SettlementItem(1, closed)], [(IdemKey(1, "close", "x"), closed)]),
        ledger_state, reopen)
    check_every_cut(path, led, lambda: led.begin([IdemKey(2, "close", "y")]), ledger_state,
                    reopen)
    check_every_cut(path, led, lambda: led.forget([IdemKey(2, "close", "y")]), ledger_state,
                    reopen)
    assert led.audit({2: 10 * USD}) == []  # the open of "c-2" is still pending
    crash(led)


def test_ledger_recovers_accounts_keys_history_and_answers_from_snapshot_and_tail(
        tmp_path: Path) -> None:
    led = open_ledger(tmp_path, snapshot_every_records=3)
    accounts = [led.create_account() for _ in range(4)]
    key = IdemKey(accounts[0].user, "open", "order-1")
    assert led.lock_margins([MarginLock(accounts[0].user, 250 * USD, key)]) == [None]
    opened = OpenPosition(1 << 34 | 3, accounts[0].user, "SOL", Side.SHORT, 10000, 250, 250 * USD,
                          10, 10999, 0, 0, NOW, 0)
    led.remember([(key, opened)])
    closed = ClosedPosition(opened.position_id, accounts[0].user, "SOL", Side.SHORT, 10000, 250,
                            250 * USD, 10, 10999, 0, 0, NOW, 9000, 250 * USD, 500 * USD,
                            -250 * USD, 0, int(CloseReason.MANUAL), NOW + 1)
    led.apply_settlements(SPEC.name, [SettlementItem(1, closed)])
    assert led.store.snapshots_written >= 2
    want = ledger_state(led)
    crash(led)
    again = open_ledger(tmp_path)
    assert again.recovered.snapshot_seq > 0 and again.recovered.replayed > 0
    assert ledger_state(again) == want
    for account in accounts:  # API keys still authenticate (only their hashes were stored)
        from cluster.ledger_core import hash_api_key
        principal = again.principal_of_key_hash(hash_api_key(account.api_key))
        assert principal is not None and principal.account_id == account.account_id
    assert again.history(accounts[0].user) == [closed]
    # the clientOrderId answer survived: a retry gets the first answer, locks nothing
    assert again.lock_margins([MarginLock(accounts[0].user, 250 * USD, key)]) == \
        [IdemHit(opened)]
    assert again.balances_many([accounts[0].user]) == [(SIGNUP + 250 * USD, 0)]
    # new users continue the numbering
    assert again.create_account().user == accounts[-1].user + 1
    again.close()


def test_settlement_is_applied_exactly_once_under_resends_across_restarts(
        tmp_path: Path) -> None:
    led = open_ledger(tmp_path / "ledger", snapshot_every_records=5)
    shard = open_shard(tmp_path / SPEC.name, snapshot_every_records=4)
    users = [led.create_account().user for _ in range(3)]
    shard.apply_ticks([tick(10_000)], NOW)
    assert led.lock_margins([MarginLock(u, 100 * USD) for u in users]) == [None] * 3
    opened = shard.open_many([shard_open(i + 1, owner=u) for i, u in enumerate(users)], NOW)
    assert all(isinstance(p, OpenPosition) for p in opened)
    assert shard.apply_ticks([tick(8_000, ts_us=NOW + 1)], NOW) == 3  # all liquidated
    outbox = shard.outbox()
    assert [i.seq for i in outbox] == [1, 2, 3]
    # the ledger applies the first two, then both crash before the shard hears back
    assert led.apply_settlements(SPEC.name, outbox[:2]) == 2
    crash(led)
    crash(shard)
    led = open_ledger(tmp_path / "ledger")
    shard = open_shard(tmp_path / SPEC.name)
    shard.resume_seq(led.applied_seq(SPEC.name))
    assert [i.seq for i in shard.outbox()] == [3]
    # resend everything, twice, and out of order: each settlement lands once
    for items in (list(reversed(outbox)), outbox, shard.outbox()):
        assert led.apply_settlements(SPEC.name, items) == 3
    crash(led)
    led = open_ledger(tmp_path / "ledger")
    assert led.apply_settlements(SPEC.name, outbox) == 3
    assert led.totals()["closed_positions"] == 3
    for u in users:
        history = led.history(u)
        assert isinstance(history, list) and len(history) == 1
        assert history[0].reason == CloseReason.LIQUIDATION
    assert led.audit(shard.open_margins_by_user(), {SPEC.name: shard.outbox()}) == []
    assert led.balances_many(users) == [(SIGNUP - 100 * USD, 0)] * 3
    # a new close after the restart continues the shard's numbering
    shard.apply_ticks([tick(10_000, ts_us=NOW + 2)], NOW + 2)
    led.lock_margins([MarginLock(users[0], 10 * USD)])
    [p] = shard.open_many([shard_open(99, owner=users[0], margin_usd=10)], NOW + 2)
    assert isinstance(p, OpenPosition)
    [item] = shard.close_many([ShardClose(0, users[0], p.position_id, None, 100)], NOW + 2)
    assert isinstance(item, SettlementItem) and item.seq == 4
    assert led.apply_settlements(SPEC.name, [item]) == 4
    led.close()
    shard.close()


def test_reconcile_at_start_releases_orphaned_locks_and_drops_pending_reservations(
        tmp_path: Path) -> None:
    led = open_ledger(tmp_path)
    user = led.create_account().user
    key = IdemKey(user, "open", "lost")
    # a lock whose open never reached a shard (the API process died), and one that opened
    assert led.lock_margins([MarginLock(user, 30 * USD, key), MarginLock(user, 70 * USD)]) == \
        [None, None]
    crash(led)
    led = open_ledger(tmp_path)
    assert led.begin([key]) == [IdemHit(None)]  # the reservation is durable
    released = led.reconcile_at_start({user: 70 * USD}, {})
    assert released == {user: 30 * USD}
    assert led.audit({user: 70 * USD}) == []
    crash(led)
    led = open_ledger(tmp_path)
    assert led.audit({user: 70 * USD}) == []
    assert led.begin([key]) == [None]  # a retry may run again
    led.close()


def test_pending_opens_are_resolved_by_their_request_id_at_start(tmp_path: Path) -> None:
    led = open_ledger(tmp_path, snapshot_every_records=4)
    user = led.create_account().user
    opened_key, lost_key = IdemKey(user, "open", "opened"), IdemKey(user, "open", "lost")
    # two opens locked; the API process dies before it stores either answer
    assert led.lock_margins([MarginLock(user, 30 * USD, opened_key, 101),
                             MarginLock(user, 70 * USD, lost_key, 202)]) == [None, None]
    led.create_account()  # more records: the pending opens also travel through a snapshot
    led.create_account()
    crash(led)
    led = open_ledger(tmp_path)
    assert led.pending_open_requests() == [101, 202]
    assert led.begin([opened_key, lost_key]) == [IdemHit(None), IdemHit(None)]
    # the shards say: 101 opened (this position), 202 never arrived (now fenced)
    position = OpenPosition(5 << 34 | 3, user, "SOL", Side.LONG, 10001, 299, 30 * USD, 10,
                            9000, 0, 0, NOW, 0)
    assert led.reconcile_at_start({user: 30 * USD}, {}, {101: position}) == {user: 70 * USD}
    assert led.pending_open_requests() == []
    crash(led)
    led = open_ledger(tmp_path)
    # a retry of the open that happened gets its position; the other may run again
    assert led.lock_margins([MarginLock(user, 30 * USD, opened_key, 303)]) == [IdemHit(position)]
    assert led.begin([lost_key]) == [None]
    assert led.audit({user: 30 * USD}) == []
    led.close()


def test_stale_pending_opens_are_settled_while_running(tmp_path: Path) -> None:
    led = open_ledger(tmp_path)
    user = led.create_account().user
    keys = [IdemKey(user, "open", f"k{i}") for i in range(3)]
    assert led.lock_margins([MarginLock(user, 10 * USD, k, 500 + i)
                             for i, k in enumerate(keys)]) == [None] * 3
    assert led.pending_open_requests(older_than_s=3600) == []  # all fresh
    assert led.pending_open_requests() == [500, 501, 502]
    position = OpenPosition(9 << 34 | 3, user, "SOL", Side.SHORT, 10000, 100, 10 * USD, 1,
                            20000, 0, 0, NOW, 0)
    # 500 opened, 501 is on no shard (fenced everywhere), 502: a shard did not answer
    assert led.settle_pending_opens({500: position}, [501]) == 2
    assert led.pending_open_requests() == [502]
    crash(led)
    led = open_ledger(tmp_path)
    assert led.pending_open_requests() == [502]
    assert led.begin(keys) == [IdemHit(position), None, IdemHit(None)]
    led.close()


# ----------------------------------------------------------------------------- shard
def test_shard_batches_survive_a_crash_at_every_byte(tmp_path: Path) -> None:
    path = tmp_path / "shard"
    sh = open_shard(path, snapshot_every_records=10**9)
    sh.apply_ticks([tick(10_000)], NOW)
    check_every_cut(path, sh, lambda: sh.open_many(
        [shard_open(1), shard_open(2, side=Side.SHORT, tp=9_000),
         shard_open(3, leverage=1000), shard_open(1)], NOW), shard_state, open_shard)
    ids = [p.position_id for p in sh.positions_of(1)]
    check_every_cut(path, sh, lambda: sh.close_many(
        [ShardClose(0, 1, ids[0], None, 100), ShardClose(0, 2, ids[1], None, 100)], NOW),
        shard_state, open_shard)
    check_every_cut(path, sh, lambda: sh.resolve_opens([1, 77]), shard_state, open_shard)
    # a tick batch that triggers closes is flushed before it returns
    check_every_cut(path, sh, lambda: sh.apply_ticks([tick(9_500), tick(8_900, 8_950)], NOW),
                    shard_state, open_shard)
    assert len(sh.book) == 0 and [i.seq for i in sh.outbox()] == [1, 2]
    crash(sh)


def test_shard_batches_decode_runs_of_opens_into_arrays_equal_to_the_events() -> None:
    opens = [PositionOpened(i << 34 | 3, i, i % 2, 10_000 + i, 5 + i, 10**8, 1 + i % 90,
                            9_000 - i, 0, 0, NOW + i, 5_000, 2**64 - 1 - i)
             for i in range(1, 3 * MIN_VECTOR_RUN)]
    events: list[Event] = [TickApplied(1, 2, 3), *opens[:MIN_VECTOR_RUN - 1],
                           PositionClosed(7, 3, 9_000, NOW, 1), *opens[MIN_VECTOR_RUN - 1:],
                           OpenFenced(9)]
    payload = encode_batch([encode(e) for e in events])
    items = decode_shard_batch(payload)
    flat: list[Any] = []
    for item in items:
        if isinstance(item, np.ndarray):
            flat.extend(PositionOpened(*(int(row[f]) for f in PositionOpened._fields))
                        for row in item)
        else:
            flat.append(item)
    assert flat == decode_batch(payload) == events
    # the short run stays events, the long one is one array
    assert [type(i).__name__ for i in items] == \
        ["TickApplied"] + ["PositionOpened"] * (MIN_VECTOR_RUN - 1) + \
        ["PositionClosed", "ndarray", "OpenFenced"]


def test_big_open_batches_replay_vectorised_to_the_same_ids_rows_and_answers(
        tmp_path: Path) -> None:
    sh = open_shard(tmp_path, snapshot_every_records=10**9)
    sh.apply_ticks([tick(10_000)], NOW)
    first = sh.open_many([shard_open(i, owner=i % 7, side=Side(i % 2), leverage=1 + i % 40,
                                     tp=10_600 if i % 5 == 0 else None)
                          for i in range(1, 301)], NOW)
    # free some rows in the middle so the next batch reuses them before fresh rows
    ids = [p.position_id for p in first if isinstance(p, OpenPosition)]
    sh.close_many([ShardClose(0, sh.book.get(i).owner, i, None, 100)  # type: ignore[union-attr]
                   for i in ids[50:120]], NOW)
    sh.apply_ticks([tick(10_050, ts_us=NOW + 1)], NOW + 1)
    second = sh.open_many([shard_open(1000 + i, owner=i % 3) for i in range(200)], NOW + 1)
    want = shard_state(sh)
    crash(sh)
    again = open_shard(tmp_path)
    assert shard_state(again) == want
    assert again.open_many([shard_open(i) for i in (1, 2, 1000, 1199)], NOW + 1) == \
        [first[0], first[1], second[0], second[199]]
    assert again.book.check() == []
    crash(again)


def test_open_answers_and_fences_survive_restarts_and_snapshots(tmp_path: Path) -> None:
    sh = open_shard(tmp_path, snapshot_every_records=2)
    sh.apply_ticks([tick(10_000)], NOW)
    first = sh.open_many([shard_open(11), shard_open(12, side=Side.SHORT)], NOW)
    sh.resolve_opens([13])
    sh.open_many([shard_open(14)], NOW)
    assert sh.store.snapshots_written >= 1
    crash(sh)
    sh = open_shard(tmp_path)
    assert sh.recovered.snapshot_seq > 0
    # a resend of an open that happened returns the first answer; a fenced one stays refused
    again = sh.open_many([shard_open(11), shard_open(12, side=Side.SHORT), shard_open(13)], NOW)
    assert again[:2] == first
    assert isinstance(again[2], Rejected) and again[2].code == Code.PRICE_UNAVAILABLE
    assert sh.resolve_opens([11, 13]) == [first[0], None]
    assert len(sh.book) == 3
    assert sh.last_tick is not None and sh.last_tick.bid_ticks == 10_000
    assert sh.last_tick.source in ("test", RECOVERED_TICK_SOURCE)
    sh.close()


def test_triggers_crossed_while_down_close_on_the_first_tick_after_recovery(
        tmp_path: Path) -> None:
    sh = open_shard(tmp_path, snapshot_every_records=3)
    sh.apply_ticks([tick(10_000)], NOW)
    longs = sh.open_many([shard_open(i, owner=i, tp=10_500 + i) for i in range(1, 4)], NOW)
    shorts = sh.open_many([shard_open(i, owner=i, side=Side.SHORT) for i in range(4, 9)], NOW)
    assert all(isinstance(p, OpenPosition) for p in [*longs, *shorts])
    crash(sh)
    sh = open_shard(tmp_path)
    assert sh.last_tick is not None and sh.last_tick.bid_ticks == 10_000
    # the price rose past every long's take-profit and every short's liquidation meanwhile
    assert sh.apply_ticks([tick(11_500, ts_us=NOW + 10**7)], NOW + 10**7) == 8
    reasons = sorted(i.closed.reason for i in sh.outbox())
    assert reasons == [CloseReason.TAKE_PROFIT] * 3 + [CloseReason.LIQUIDATION] * 5
    assert len(sh.book) == 0 and sh.book.check() == []
    crash(sh)
    sh = open_shard(tmp_path)
    assert len(sh.book) == 0 and len(sh.outbox()) == 8  # the closes were durable
    sh.close()


# ----------------------------------------------------------------------------- property
OPS = st.lists(st.one_of(
    st.tuples(st.just("tick"), st.integers(8_000, 12_000)),
    st.tuples(st.just("open"), st.integers(1, 3), st.sampled_from([Side.LONG, Side.SHORT]),
              st.integers(1, 400), st.integers(1, 50)),
    st.tuples(st.just("close"), st.integers(0, 20)),
    st.tuples(st.just("resend"), st.integers(0, 20)),
    st.tuples(st.just("deliver"), st.integers(0, 5)),
    st.tuples(st.just("crash"), st.sampled_from(["ledger", "shard", "both"])),
), min_size=1, max_size=40)


class Pair:
    """A ledger and a shard wired like the service does it (lock, open, release on refusal)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ledger = open_ledger(root / "ledger", snapshot_every_records=7)
        self.shard = open_shard(root / "shard", snapshot_every_records=5)
        self.users = [self.ledger.create_account().user for _ in range(3)]
        self.rid = 0
        self.opened: list[tuple[ShardOpen, OpenPosition | Rejected]] = []
        self.ts = NOW

    def restart(self, which: str) -> None:
        if which in ("ledger", "both"):
            want = ledger_state(self.ledger)
            crash(self.ledger)
            self.ledger = open_ledger(self.root / "ledger", snapshot_every_records=7)
            assert ledger_state(self.ledger) == want
        if which in ("shard", "both"):
            applied = self.ledger.applied_seq(SPEC.name)
            want = shard_state(self.shard, applied)
            crash(self.shard)
            self.shard = open_shard(self.root / "shard", snapshot_every_records=5)
            self.shard.resume_seq(applied)
            assert shard_state(self.shard, applied) == want

    def run(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        self.ts += 1000
        if kind == "tick":
            self.shard.apply_ticks([tick(op[1], ts_us=self.ts)], self.ts)
        elif kind == "open":
            user, side, margin, leverage = self.users[op[1] - 1], op[2], op[3], op[4]
            if self.ledger.lock_margins([MarginLock(user, margin * USD)]) != [None]:
                return
            self.rid += 1
            request = shard_open(self.rid, user, side, margin, leverage)
            [result] = self.shard.open_many([request], self.ts)
            if isinstance(result, Rejected):
                self.ledger.release_margins([(user, margin * USD)])
            else:
                self.opened.append((request, result))
        elif kind in ("close", "resend"):
            ids = self.shard.book.ids().tolist()
            if kind == "resend" and self.opened:
                # the answer to an open was lost: the resend gets the first answer again
                request, first = self.opened[-1 - op[1] % len(self.opened)]
                assert self.shard.open_many([request], self.ts) == [first]
            elif ids:
                pid = ids[op[1] % len(ids)]
                owner = self.shard.book.get(pid).owner  # type: ignore[union-attr]
                self.shard.close_many([ShardClose(0, owner, pid, None, 100)], self.ts)
        elif kind == "deliver":
            items = self.shard.outbox()
            applied = self.ledger.apply_settlements(SPEC.name, items[: len(items) - op[1]])
            self.shard.ack_outbox(applied)
        else:
            self.restart(op[1])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_any_sequence_with_crashes_keeps_exactly_the_acknowledged_state(
        ops: list[tuple[Any, ...]]) -> None:
    root = Path(tempfile.mkdtemp(prefix="durable-pair-"))
    pair = Pair(root)
    try:
        for op in ops:
            pair.run(op)
        pair.restart("both")
        applied = pair.ledger.apply_settlements(SPEC.name, pair.shard.outbox())
        pair.shard.ack_outbox(applied)
        assert pair.shard.outbox() == []
        assert pair.ledger.audit(pair.shard.open_margins_by_user()) == []
        closed = [c.position_id for u in pair.users
                  for c in pair.ledger.history(u, limit=500)]  # type: ignore[union-attr]
        assert len(closed) == len(set(closed)) == pair.ledger.totals()["closed_positions"]
        assert not set(closed) & set(pair.shard.book.ids().tolist())
        assert np.all(pair.shard.book.ids() > 0)
    finally:
        crash(pair.ledger)
        crash(pair.shard)
        shutil.rmtree(root)


# ----------------------------------------------------------------------------- disk failure
def break_journal(obj: DurableLedger) -> None:
    """Make the journal's next write fail like a dead disk (its fd now reads /dev/null)."""
    ro = os.open(os.devnull, os.O_RDONLY)
    os.dup2(ro, obj.store.journal._fd)
    os.close(ro)


def test_a_failed_commit_is_never_acknowledged_and_can_end_the_process(tmp_path: Path) -> None:
    led = open_ledger(tmp_path / "a")
    break_journal(led)
    with pytest.raises(DurabilityError):
        led.create_account()
    with pytest.raises(DurabilityError):  # poisoned: nothing more is answered
        led.lock_margins([MarginLock(1, USD)])
    crash(led)
    assert ledger_state(open_ledger(tmp_path / "a")) == ledger_state(LedgerCore(SIGNUP))
    # what an actor does: the process ends, so Ray restarts it and it recovers from disk
    script = (
        "import os, sys\n"
        "from cluster.ledger_store import DurableLedger\n"
        f"led = DurableLedger(1, {str(tmp_path / 'b')!r}, fsync=False, exit_on_failure=True)\n"
        "led.create_account()\n"
        "ro = os.open(os.devnull, os.O_RDONLY)\n"
        "os.dup2(ro, led.store.journal._fd)\n"
        "led.create_account()\n"
        "sys.exit(0)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == 70, proc.stderr
    again = open_ledger(tmp_path / "b")
    assert again.totals()["users"] == 1  # the acknowledged account, not the failed one
    again.close()
