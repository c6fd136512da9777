"""The ledger and a shard hosted by durable Runners: exactly the acknowledged state survives any
crash (journal cut at every byte of a batch, snapshots plus tails, restarts between resends),
and a journal that cannot write stops everything that would answer from memory it lacks.

A "crash" drops the runner without its clean stop (tests/unit/durability/hosted.py). No Ray:
the machines run in-process. Commands are named by their machine: ``lm.*`` the ledger's,
``sm.*`` a shard's.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import cluster.durability.journal as journal_module
import pytest
from cluster.actors.local import LocalHosts
from cluster.config import Settings
from cluster.durability.runner import Runner
from cluster.durability.store import DurabilityError
from engine import ledger_machine as lm
from engine import shard_machine as sm
from engine.machine import run
from engine.messages import ClosedPosition
from engine.messages import IdemHit
from engine.messages import IdemKey
from engine.messages import MarginLock
from engine.messages import OpenPosition
from engine.messages import Principal
from engine.messages import SettlementItem
from engine.orders import CloseReason
from engine.orders import Side
from engine.results import Code
from engine.results import Rejected
from tests.unit.durability.hosted import NOW
from tests.unit.durability.hosted import SHARD
from tests.unit.durability.hosted import SIGNUP
from tests.unit.durability.hosted import USD
from tests.unit.durability.hosted import Clock
from tests.unit.durability.hosted import account
from tests.unit.durability.hosted import check_every_cut
from tests.unit.durability.hosted import crash
from tests.unit.durability.hosted import journal_tail
from tests.unit.durability.hosted import one
from tests.unit.durability.hosted import open_ledger
from tests.unit.durability.hosted import open_shard
from tests.unit.durability.hosted import run_python
from tests.unit.durability.hosted import shard_close
from tests.unit.durability.hosted import shard_open
from tests.unit.durability.hosted import tick

HOUR_US = 3600 * 10**6


def created(led: Runner[lm.LedgerMachine], n: int) -> lm.CreatedAccount:
    answer = one(led, lm.CreateAccount(*account(n)))
    assert isinstance(answer, lm.CreatedAccount)
    return answer


def balances(led: Runner[lm.LedgerMachine], user: int) -> tuple[int, int]:
    answer: tuple[int, int] = one(led, lm.Balances(user))
    return answer


# ----------------------------------------------------------------------------- ledger
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each cut's recovery repairs its journal with fsyncs: skipped, the disk is not the
    subject here (and a thousand of them take seconds)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def test_ledger_batches_survive_a_crash_at_every_byte(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    no_fsync(monkeypatch)
    path = tmp_path / "ledger"
    led = open_ledger(path, snapshot_every_events=10**9)
    for n in (1, 2):
        [new] = check_every_cut(path, led, [lm.CreateAccount(*account(n))], open_ledger)
        assert new == lm.CreatedAccount(n, account(n)[0], SIGNUP)
    key = IdemKey(1, "open", "c-1")
    answers = check_every_cut(path, led, [
        lm.LockMargin(MarginLock(1, 100 * USD, key)), lm.LockMargin(MarginLock(2, 20_000 * USD)),
        lm.LockMargin(MarginLock(2, 50 * USD)),
        lm.LockMargin(MarginLock(2, 10 * USD, IdemKey(2, "open", "c-2"), 77))], open_ledger)
    assert answers[0] is None and answers[2:] == [None, None]
    assert isinstance(answers[1], Rejected) and answers[1].code is Code.INSUFFICIENT_BALANCE
    opened = OpenPosition(7 << 34 | 3, 1, "SOL", Side.LONG, 10001, 999, 100 * USD, 10, 8999, 0,
                          0, NOW, -99_900)
    assert check_every_cut(path, led, [lm.ReleaseMargin(2, 50 * USD), lm.Remember(key, opened)],
                           open_ledger) == [None, None]
    closed = ClosedPosition(opened.position_id, 1, "SOL", Side.LONG, 10001, 999, 100 * USD, 10,
                            8999, 0, 0, NOW, 8999, -100 * USD, 0, 100 * USD, 0,
                            int(CloseReason.LIQUIDATION), NOW + 5, opened.position_id, 0)
    assert check_every_cut(path, led, [lm.ApplySettlements(
        SHARD, (SettlementItem(1, closed),), ((IdemKey(1, "close", "x"), closed),))],
        open_ledger) == [1]
    assert check_every_cut(path, led, [lm.Begin(IdemKey(2, "close", "y"))], open_ledger) == [None]
    assert check_every_cut(path, led, [lm.Forget(IdemKey(2, "close", "y"))], open_ledger) == [None]
    assert one(led, lm.Audit({2: 10 * USD})) == []  # the open of "c-2" is still pending
    assert one(led, lm.Begin(key)) == IdemHit(opened)
    crash(led)


def test_ledger_recovers_accounts_keys_history_and_answers_from_snapshot_and_tail(
        tmp_path: Path) -> None:
    led = open_ledger(tmp_path, snapshot_every_events=3)
    accounts = [created(led, n) for n in range(1, 5)]
    user = accounts[0].user
    key = IdemKey(user, "open", "order-1")
    assert one(led, lm.LockMargin(MarginLock(user, 250 * USD, key))) is None
    opened = OpenPosition(1 << 34 | 3, user, "SOL", Side.SHORT, 10000, 250, 250 * USD, 10,
                          10999, 0, 0, NOW, 0)
    assert one(led, lm.Remember(key, opened)) is None
    closed = ClosedPosition(opened.position_id, user, "SOL", Side.SHORT, 10000, 250, 250 * USD,
                            10, 10999, 0, 0, NOW, 9000, 250 * USD, 500 * USD, -250 * USD, 0,
                            int(CloseReason.MANUAL), NOW + 1, opened.position_id, 0)
    assert one(led, lm.ApplySettlements(SHARD, (SettlementItem(1, closed),))) == 1
    assert led.store is not None and led.store.snapshots_written >= 2
    want = led.machine.fingerprint()
    crash(led)
    again = open_ledger(tmp_path)
    assert again.store is not None and again.store.recovered is not None
    assert again.store.recovered.snapshot_seq > 0 and again.store.recovered.replayed > 0
    assert again.machine.fingerprint() == want and again.machine.check() == []
    for n, acc in enumerate(accounts, 1):  # API keys still authenticate (hashes were stored)
        assert one(again, lm.Authenticate(lm.hash_api_key(f"key-{n}"))) == \
            Principal(acc.user, acc.account_id)
    assert one(again, lm.History(user)) == [closed]
    # the clientOrderId answer survived: a retry gets the first answer, locks nothing
    assert one(again, lm.LockMargin(MarginLock(user, 250 * USD, key))) == IdemHit(opened)
    assert balances(again, user) == (SIGNUP + 250 * USD, 0)
    assert created(again, 5).user == accounts[-1].user + 1  # new users continue the numbering
    again.close()


def test_settlement_is_applied_exactly_once_under_resends_across_restarts(
        tmp_path: Path) -> None:
    clock = Clock()
    led = open_ledger(tmp_path / "ledger", clock, snapshot_every_events=5)
    shard = open_shard(tmp_path / SHARD, clock, snapshot_every_events=4)
    users = [created(led, n).user for n in range(1, 4)]
    one(shard, sm.ApplyTick(tick(10_000)))
    assert led.execute([lm.LockMargin(MarginLock(u, 100 * USD)) for u in users]) == [None] * 3
    opened = shard.execute([sm.Open(shard_open(i + 1, owner=u)) for i, u in enumerate(users)])
    assert all(isinstance(p, OpenPosition) for p in opened)
    assert one(shard, sm.ApplyTick(tick(8_000, ts_us=NOW + 1))) == 3  # all liquidated
    outbox = one(shard, sm.Outbox()).items
    assert [i.seq for i in outbox] == [1, 2, 3]
    # the ledger applies the first two, then both crash before the shard hears back
    assert one(led, lm.ApplySettlements(SHARD, tuple(outbox[:2]))) == 2
    crash(led)
    crash(shard)
    led = open_ledger(tmp_path / "ledger", clock)
    shard = open_shard(tmp_path / SHARD, clock)
    assert one(shard, sm.ResumeSeq(one(led, lm.AppliedSeq(SHARD)))) == 1
    assert [i.seq for i in one(shard, sm.Outbox()).items] == [3]
    # resend everything, twice, and out of order: each settlement lands once
    for items in (outbox[::-1], outbox, one(shard, sm.Outbox()).items):
        assert one(led, lm.ApplySettlements(SHARD, tuple(items))) == 3
    crash(led)
    led = open_ledger(tmp_path / "ledger", clock)
    assert one(led, lm.ApplySettlements(SHARD, tuple(outbox))) == 3
    assert one(led, lm.Totals())["closed_positions"] == 3
    for u in users:
        history = one(led, lm.History(u))
        assert len(history) == 1 and history[0].reason == CloseReason.LIQUIDATION
    view = one(shard, sm.AuditView())
    assert one(led, lm.Audit(view.margins, {SHARD: view.outbox}, view.positions, {})) == []
    assert led.execute([lm.Balances(u) for u in users]) == [(SIGNUP - 100 * USD, 0)] * 3
    # a new close after the restart continues the shard's numbering
    clock.now_us = NOW + 2
    one(shard, sm.ApplyTick(tick(10_000, ts_us=NOW + 2)))
    assert one(led, lm.LockMargin(MarginLock(users[0], 10 * USD))) is None
    p = one(shard, sm.Open(shard_open(99, owner=users[0], margin_usd=10)))
    assert isinstance(p, OpenPosition)
    item = one(shard, sm.Close(shard_close(0, users[0], p.position_id)))
    assert isinstance(item, SettlementItem) and item.seq == 4
    assert one(led, lm.ApplySettlements(SHARD, (item,))) == 4
    led.close()
    shard.close()


def test_reconcile_at_start_releases_orphaned_locks_and_drops_pending_reservations(
        tmp_path: Path) -> None:
    led = open_ledger(tmp_path)
    user = created(led, 1).user
    key = IdemKey(user, "open", "lost")
    # a lock whose open never reached a shard (the API process died), and one that opened
    assert led.execute([lm.LockMargin(MarginLock(user, 30 * USD, key)),
                        lm.LockMargin(MarginLock(user, 70 * USD))]) == [None, None]
    crash(led)
    led = open_ledger(tmp_path)
    assert one(led, lm.Begin(key)) == IdemHit(None)  # the reservation is durable
    assert one(led, lm.ReconcileAtStart({user: 70 * USD}, {})) == {user: 30 * USD}
    assert one(led, lm.Audit({user: 70 * USD})) == []
    crash(led)
    led = open_ledger(tmp_path)
    assert one(led, lm.Audit({user: 70 * USD})) == []
    assert one(led, lm.Begin(key)) is None  # a retry may run again
    led.close()


def test_pending_opens_are_resolved_by_their_request_id_at_start(tmp_path: Path) -> None:
    led = open_ledger(tmp_path, snapshot_every_events=4)
    user = created(led, 1).user
    opened_key, lost_key = IdemKey(user, "open", "opened"), IdemKey(user, "open", "lost")
    # two opens locked; the API process dies before it stores either answer
    assert led.execute([lm.LockMargin(MarginLock(user, 30 * USD, opened_key, 101)),
                        lm.LockMargin(MarginLock(user, 70 * USD, lost_key, 202))]) == [None, None]
    created(led, 2)  # more records: the pending opens also travel through a snapshot
    created(led, 3)
    assert led.store is not None and led.store.snapshots_written >= 1
    crash(led)
    led = open_ledger(tmp_path)
    assert led.store is not None and led.store.recovered is not None
    assert led.store.recovered.snapshot_seq > 0
    assert one(led, lm.PendingRequests()) == [101, 202]
    assert led.execute([lm.Begin(opened_key), lm.Begin(lost_key)]) == [IdemHit(None, 101),
                                                                      IdemHit(None, 202)]
    # the shards say: 101 opened (this position), 202 never arrived (now fenced)
    position = OpenPosition(5 << 34 | 3, user, "SOL", Side.LONG, 10001, 299, 30 * USD, 10,
                            9000, 0, 0, NOW, 0)
    assert one(led, lm.ReconcileAtStart({user: 30 * USD}, {}, {101: position})) == \
        {user: 70 * USD}
    assert one(led, lm.PendingRequests()) == []
    crash(led)
    led = open_ledger(tmp_path)
    # a retry of the open that happened gets its position; the other may run again
    assert one(led, lm.LockMargin(MarginLock(user, 30 * USD, opened_key, 303))) == \
        IdemHit(position)
    assert one(led, lm.Begin(lost_key)) is None
    assert one(led, lm.Audit({user: 30 * USD})) == []
    led.close()


def test_stale_pending_opens_are_settled_while_running(tmp_path: Path) -> None:
    clock = Clock()
    led = open_ledger(tmp_path, clock)
    user = created(led, 1).user
    keys = [IdemKey(user, "open", f"k{i}") for i in range(3)]
    assert led.execute([lm.LockMargin(MarginLock(user, 10 * USD, k, 500 + i))
                        for i, k in enumerate(keys)]) == [None] * 3
    assert one(led, lm.PendingRequests(HOUR_US)) == []  # all fresh
    assert one(led, lm.PendingRequests()) == [500, 501, 502]
    position = OpenPosition(9 << 34 | 3, user, "SOL", Side.SHORT, 10000, 100, 10 * USD, 1,
                            20000, 0, 0, NOW, 0)
    # 500 opened, 501 is on no shard (fenced everywhere), 502: a shard did not answer
    assert one(led, lm.SettleRequests({500: position}, (501,))) == 2
    assert one(led, lm.PendingRequests()) == [502]
    crash(led)
    led = open_ledger(tmp_path, clock)
    assert one(led, lm.PendingRequests()) == [502]
    assert one(led, lm.PendingRequests(HOUR_US)) == []  # the wait is counted from the lock
    clock.now_us += HOUR_US
    assert one(led, lm.PendingRequests(HOUR_US)) == [502]
    assert led.execute([lm.Begin(k) for k in keys]) == [IdemHit(position), None, IdemHit(None, 502)]
    led.close()


@pytest.mark.asyncio
async def test_api_keys_are_random_and_never_reach_the_disk(tmp_path: Path) -> None:
    """The service draws the keys; the ledger (memory, journal, snapshots) holds their hashes."""
    hosts = LocalHosts(Settings(), str(tmp_path), fsync=False)
    service = hosts.service()
    a, b = await service.create_account(), await service.create_account()
    assert a.user != b.user and a.account_id != b.account_id and a.api_key != b.api_key
    assert len(a.api_key) >= 43  # 32 random bytes, base64url
    assert await service.authenticate(a.api_key) == Principal(a.user, a.account_id)
    assert await service.authenticate(a.api_key + "x") is None
    ledger = hosts.ledger.runner.machine
    assert run(ledger, lm.Authenticate(lm.hash_api_key(b.api_key))) == \
        Principal(b.user, b.account_id)
    assert [run(ledger, lm.Balances(u)) for u in (a.user, b.user)] == \
        [(Settings().signup_balance_micros, 0)] * 2
    assert run(ledger, lm.Audit({})) == []
    in_memory = pickle.dumps((ledger.fingerprint(), ledger.snapshot()))
    await service.aclose()
    hosts.close()  # final snapshots
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".npz" for p in files) and any(p.suffix == ".wal" for p in files)
    for key in (a.api_key.encode(), b.api_key.encode()):
        assert key not in in_memory
        assert not [p for p in files if key in p.read_bytes()]


# ----------------------------------------------------------------------------- abandoned locks
def test_lock_journaled_answer_lost_then_abandoned_once_across_restarts(tmp_path: Path) -> None:
    led = open_ledger(tmp_path)
    user = created(led, 1).user
    key = IdemKey(user, "open", "lost")
    assert led.execute([lm.LockMargin(MarginLock(user, 30 * USD, key, 101)),
                        lm.LockMargin(MarginLock(user, 70 * USD, None, 202))]) == [None, None]
    crash(led)  # journaled, but the answer never left the process
    led = open_ledger(tmp_path)
    assert balances(led, user) == (SIGNUP - 100 * USD, 100 * USD)
    assert one(led, lm.AbandonLock(303)) is None  # unknown id: nothing changes
    assert one(led, lm.AbandonLock(101)) == (101, user, 30 * USD)
    assert one(led, lm.AbandonLock(101)) is None  # a resend after a lost answer changes nothing
    assert one(led, lm.PendingRequests()) == []
    crash(led)
    led = open_ledger(tmp_path)  # the release (and the dropped reservation) replay
    assert balances(led, user) == (SIGNUP - 70 * USD, 70 * USD)
    assert one(led, lm.AbandonLock(101)) is None
    assert one(led, lm.Begin(key)) is None  # a retry of the clientOrderId runs again
    assert one(led, lm.Audit({user: 70 * USD})) == []
    led.close()


def test_abandonable_locks_survive_a_snapshot(tmp_path: Path) -> None:
    led = open_ledger(tmp_path, snapshot_every_events=2)
    user = created(led, 1).user
    key = IdemKey(user, "open", "snap")
    assert one(led, lm.LockMargin(MarginLock(user, 40 * USD, key, 7))) is None
    created(led, 2)
    created(led, 3)  # past the snapshot cadence: the lock lives in the snapshot
    led.checkpoint()
    crash(led)
    led = open_ledger(tmp_path)
    assert led.store is not None and led.store.recovered is not None
    assert led.store.recovered.replayed == 0  # all of it from the snapshot
    assert balances(led, user) == (SIGNUP - 40 * USD, 40 * USD)
    assert one(led, lm.LockMargin(MarginLock(user, 40 * USD, key, 8))) == IdemHit(None, 7)
    assert one(led, lm.AbandonLock(7)) == (7, user, 40 * USD)
    crash(led)
    led = open_ledger(tmp_path)
    assert balances(led, user) == (SIGNUP, 0)
    assert one(led, lm.AbandonLock(7)) is None
    assert one(led, lm.Begin(key)) is None
    assert one(led, lm.Audit({})) == []
    led.close()


def test_start_reconciliation_ends_abandonable_locks(tmp_path: Path) -> None:
    led = open_ledger(tmp_path)
    user = created(led, 1).user
    assert one(led, lm.LockMargin(MarginLock(user, 25 * USD, None, 9))) is None
    assert one(led, lm.ReconcileAtStart({}, {})) == {user: 25 * USD}
    assert one(led, lm.AbandonLock(9)) is None  # already released by the reconciliation
    crash(led)
    led = open_ledger(tmp_path)  # the replay knows it too
    assert balances(led, user) == (SIGNUP, 0)
    assert one(led, lm.AbandonLock(9)) is None
    assert one(led, lm.Audit({})) == []
    led.close()


# ----------------------------------------------------------------------------- shard
def test_shard_batches_survive_a_crash_at_every_byte(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    no_fsync(monkeypatch)
    path = tmp_path / "shard"
    sh = open_shard(path, snapshot_every_events=10**9)
    assert one(sh, sm.ApplyTick(tick(10_000))) == 0  # rides along with the next commit
    answers = check_every_cut(path, sh, [
        sm.Open(shard_open(1)), sm.Open(shard_open(2, side=Side.SHORT, tp=9_000)),
        sm.Open(shard_open(3, leverage=1000)), sm.Open(shard_open(1))], open_shard)
    assert isinstance(answers[0], OpenPosition) and isinstance(answers[1], OpenPosition)
    assert isinstance(answers[2], Rejected) and answers[3] == answers[0]
    [mine] = one(sh, sm.PositionsOf((1,)))
    ids = [p.position_id for p in mine]
    assert ids == [answers[0].position_id, answers[1].position_id]
    closes = check_every_cut(path, sh, [sm.Close(shard_close(0, 1, ids[0])),
                                        sm.Close(shard_close(0, 2, ids[1]))], open_shard)
    assert isinstance(closes[0], SettlementItem)
    assert isinstance(closes[1], Rejected) and closes[1].code is Code.NOT_FOUND
    assert check_every_cut(path, sh, [sm.Resolve(1), sm.Resolve(77)], open_shard) == \
        [answers[0], None]
    # a tick batch that triggers closes is journaled before it answers
    assert check_every_cut(path, sh, [sm.ApplyTick(tick(9_500)), sm.ApplyTick(tick(8_900, 8_950))],
                           open_shard) == [0, 1]
    assert len(sh.machine.book) == 0 and [i.seq for i in one(sh, sm.Outbox()).items] == [1, 2]
    crash(sh)


def test_a_batch_over_the_record_bound_is_journaled_whole_in_several_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tick that closes more positions than one journal record holds (a million and a half
    under the real bound) is answered, its closes committed as several records that a crash
    keeps all or none of; a batch of opens split so replays the same."""
    no_fsync(monkeypatch)
    path = tmp_path / "shard"

    def reopen(at: Path) -> Runner[sm.ShardMachine]:
        return open_shard(at, snapshot_every_events=10**9, max_record_bytes=256)

    sh = reopen(path)
    one(sh, sm.ApplyTick(tick(10_000)))
    opened = sh.execute([sm.Open(shard_open(r, owner=r, margin_usd=10, leverage=50))
                         for r in range(1, 17)])
    assert all(isinstance(p, OpenPosition) and p.liq_ticks == 9_800 for p in opened)
    records = len(journal_tail(path))
    assert records > 2
    crash(sh)
    sh = reopen(path)
    assert one(sh, sm.Resolve(16)) == opened[-1]
    assert check_every_cut(path, sh, [sm.ApplyTick(tick(5_000, seq=2))], reopen) == [16]
    assert len(journal_tail(path)) - records > 1
    assert len(sh.machine.book) == 0 and len(one(sh, sm.Outbox()).items) == 16
    crash(sh)


def test_an_event_no_journal_record_holds_rejects_its_command_and_changes_nothing(
        tmp_path: Path) -> None:
    led = open_ledger(tmp_path, max_record_bytes=100)  # an AccountCreated is over 100 bytes
    before = led.machine.fingerprint()
    [refused, balances] = led.execute([lm.CreateAccount(*account(1)), lm.Balances(1)])
    assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST
    assert balances == (0, 0) and led.problem() is None
    assert led.machine.fingerprint() == before and journal_tail(tmp_path) == []
    led.close()


def test_big_open_batches_replay_vectorised_to_the_same_ids_rows_and_answers(
        tmp_path: Path) -> None:
    clock = Clock()
    sh = open_shard(tmp_path, clock, snapshot_every_events=10**9)
    one(sh, sm.ApplyTick(tick(10_000)))
    first = sh.execute([sm.Open(shard_open(i, owner=i % 7, side=Side(i % 2), leverage=1 + i % 40,
                                           tp=10_600 if i % 5 == 0 else None))
                        for i in range(1, 301)])
    # free some rows in the middle so the next batch reuses them before fresh rows
    ids = [p.position_id for p in first if isinstance(p, OpenPosition)]
    owners = {p.position_id: p.owner for p in first if isinstance(p, OpenPosition)}
    sh.execute([sm.Close(shard_close(0, owners[i], i)) for i in ids[50:120]])
    clock.now_us = NOW + 1
    one(sh, sm.ApplyTick(tick(10_050, ts_us=NOW + 1)))
    second = sh.execute([sm.Open(shard_open(1000 + i, owner=i % 3)) for i in range(200)])
    assert all(isinstance(p, OpenPosition) for p in second)
    want = sh.machine.fingerprint()
    crash(sh)
    again = open_shard(tmp_path, clock)
    assert again.machine.fingerprint() == want
    assert again.execute([sm.Open(shard_open(i)) for i in (1, 2, 1000, 1199)]) == \
        [first[0], first[1], second[0], second[199]]
    assert again.machine.book.check() == [] and again.machine.check() == []
    crash(again)


def test_a_shard_restored_from_its_snapshot_file_grows_as_the_live_one_did(
        tmp_path: Path) -> None:
    """A book of more rows than a fresh one allocates is restored from the snapshot file into
    the snapshot's own columns (no room to spare), and the journal tail's opens grow it; then
    it answers, opens and sweeps as the live shard does."""
    clock = Clock()
    live = open_shard(tmp_path / "live", clock, snapshot_every_events=10**9)
    one(live, sm.ApplyTick(tick(10_000)))
    first = live.execute([sm.Open(shard_open(i, owner=i % 9, side=Side(i % 2),
                                             leverage=1 + i % 30,
                                             tp=10_700 if i % 2 == 0 else 9_300,
                                             sl=9_900 if i % 2 == 0 else 10_100))
                          for i in range(1, 1_801)])
    assert all(isinstance(p, OpenPosition) for p in first)
    live.execute([sm.Close(shard_close(0, p.owner, p.position_id)) for p in first[400:500]])
    live.checkpoint()  # 1,800 rows, 100 of them free
    tail = live.execute([sm.Open(shard_open(5_000 + i, owner=i % 4)) for i in range(400)])
    shutil.copytree(tmp_path / "live", tmp_path / "restored")  # what a crash leaves on disk
    restored = open_shard(tmp_path / "restored", clock)
    assert restored.store is not None and restored.store.recovered is not None
    assert restored.store.recovered.snapshot_seq > 0 and restored.store.recovered.replayed == 1
    assert restored.machine.fingerprint() == live.machine.fingerprint()
    assert restored.machine.book.capacity >= 2_100  # grown past the snapshot's 1,800 rows
    assert restored.machine.book.check() == [] and restored.machine.check() == []
    clock.now_us = NOW + 1
    for commands in ([sm.Open(shard_open(i)) for i in (1, 1_800, 5_000, 5_399)],
                     [sm.Open(shard_open(9_000 + i, owner=2)) for i in range(300)],
                     [sm.ApplyTick(tick(9_250, ts_us=NOW + 1))],
                     [sm.ApplyTick(tick(10_750, ts_us=NOW + 2, seq=2))]):
        assert restored.execute(commands) == live.execute(commands)
        assert restored.machine.fingerprint() == live.machine.fingerprint()
    assert len(live.machine.book) < 2_400  # the ticks closed positions: SLs and TPs crossed
    assert first[0] == restored.execute([sm.Open(shard_open(1))])[0]
    assert tail[399] == restored.execute([sm.Open(shard_open(5_399))])[0]
    crash(live)
    crash(restored)


def test_open_answers_and_fences_survive_restarts_and_snapshots(tmp_path: Path) -> None:
    sh = open_shard(tmp_path, snapshot_every_events=2)
    one(sh, sm.ApplyTick(tick(10_000)))
    first = sh.execute([sm.Open(shard_open(11)), sm.Open(shard_open(12, side=Side.SHORT))])
    assert one(sh, sm.Resolve(13)) is None
    one(sh, sm.Open(shard_open(14)))
    assert sh.store is not None and sh.store.snapshots_written >= 1
    crash(sh)
    sh = open_shard(tmp_path)
    assert sh.store is not None and sh.store.recovered is not None
    assert sh.store.recovered.snapshot_seq > 0
    # a resend of an open that happened returns the first answer; a fenced one stays refused
    again = sh.execute([sm.Open(shard_open(11)), sm.Open(shard_open(12, side=Side.SHORT)),
                        sm.Open(shard_open(13))])
    assert again[:2] == first
    assert isinstance(again[2], Rejected) and again[2].code == Code.PRICE_UNAVAILABLE
    assert sh.execute([sm.Resolve(11), sm.Resolve(13)]) == [first[0], None]
    assert len(sh.machine.book) == 3
    # the last tick keeps where it came from (TickApplied carries its seq and source)
    assert one(sh, sm.LastTick()) == tick(10_000)
    sh.close()


def test_triggers_crossed_while_down_close_on_the_first_tick_after_recovery(
        tmp_path: Path) -> None:
    clock = Clock()
    sh = open_shard(tmp_path, clock, snapshot_every_events=3)
    one(sh, sm.ApplyTick(tick(10_000)))
    longs = sh.execute([sm.Open(shard_open(i, owner=i, tp=10_500 + i)) for i in range(1, 4)])
    shorts = sh.execute([sm.Open(shard_open(i, owner=i, side=Side.SHORT)) for i in range(4, 9)])
    assert all(isinstance(p, OpenPosition) for p in [*longs, *shorts])
    crash(sh)
    sh = open_shard(tmp_path, clock)
    last = one(sh, sm.LastTick())
    assert last is not None and last.bid_ticks == 10_000
    # the price rose past every long's take-profit and every short's liquidation meanwhile
    clock.now_us = NOW + 10**7
    assert one(sh, sm.ApplyTick(tick(11_500, ts_us=NOW + 10**7))) == 8
    reasons = sorted(i.closed.reason for i in one(sh, sm.Outbox()).items)
    assert reasons == [CloseReason.TAKE_PROFIT] * 3 + [CloseReason.LIQUIDATION] * 5
    assert len(sh.machine.book) == 0 and sh.machine.check() == []
    crash(sh)
    sh = open_shard(tmp_path, clock)
    assert len(sh.machine.book) == 0 and len(one(sh, sm.Outbox()).items) == 8  # durable closes
    assert one(sh, sm.OpenMargins()) == {}
    sh.close()


def test_an_acknowledgement_lost_in_a_crash_only_resends_applied_settlements(
        tmp_path: Path) -> None:
    clock = Clock()
    led = open_ledger(tmp_path / "ledger", clock)
    sh = open_shard(tmp_path / SHARD, clock)
    user = created(led, 1).user
    one(sh, sm.ApplyTick(tick(10_000)))
    assert one(led, lm.LockMargin(MarginLock(user, 100 * USD))) is None
    pos = one(sh, sm.Open(shard_open(1, owner=user)))
    item = one(sh, sm.Close(shard_close(2, user, pos.position_id)))
    assert one(led, lm.ApplySettlements(SHARD, (item,))) == 1
    assert one(sh, sm.AckOutbox(1)) == 0  # OutboxAcked rides along with the next commit
    assert one(sh, sm.Outbox()) == sm.OutboxView([], 1)
    crash(sh)
    sh = open_shard(tmp_path / SHARD, clock)
    view = one(sh, sm.Outbox())
    assert view == sm.OutboxView([item], 1)  # the acknowledgement was lost, the close was not
    before = led.machine.fingerprint()
    assert one(led, lm.ApplySettlements(SHARD, tuple(view.items))) == 1  # ignored by seq
    assert led.machine.fingerprint() == before
    assert one(sh, sm.ResumeSeq(1)) == 0 and one(sh, sm.Outbox()) == sm.OutboxView([], 1)
    assert one(sh, sm.Close(shard_close(2, user, pos.position_id))) == item  # first answer
    led.close()
    sh.close()


# ----------------------------------------------------------------------------- disk failure
def break_journal(runner: Runner[lm.LedgerMachine]) -> None:
    """Make the journal's next write fail like a dead disk (its fd now reads /dev/null)."""
    assert runner.store is not None
    ro = os.open(os.devnull, os.O_RDONLY)
    os.dup2(ro, runner.store.journal._fd)
    os.close(ro)


def test_a_failed_commit_is_never_acknowledged_and_can_end_the_process(tmp_path: Path) -> None:
    led = open_ledger(tmp_path / "a")
    break_journal(led)
    with pytest.raises(DurabilityError):
        one(led, lm.CreateAccount(*account(1)))
    with pytest.raises(DurabilityError):  # poisoned: nothing more is answered
        one(led, lm.LockMargin(MarginLock(1, USD)))
    crash(led)
    led = open_ledger(tmp_path / "a")
    assert led.machine.fingerprint() == lm.LedgerMachine(SIGNUP).fingerprint()
    crash(led)
    # what an actor does: the process ends, so Ray restarts it and it recovers from disk
    script = (
        "import os, sys\n"
        "from cluster.durability.runner import Runner\n"
        "from engine.ledger_machine import CreateAccount, LedgerMachine\n"
        f"led = Runner.open({str(tmp_path / 'b')!r}, lambda s: LedgerMachine.restore(1, s),\n"
        "                  fsync=False, exit_on_failure=True)\n"
        "led.execute([CreateAccount('acc_1', 'h1')])\n"
        "ro = os.open(os.devnull, os.O_RDONLY)\n"
        "os.dup2(ro, led.store.journal._fd)\n"
        "led.execute([CreateAccount('acc_2', 'h2')])\n"
        "sys.exit(0)\n")
    proc = run_python(script)
    assert proc.returncode == 70, proc.stderr
    again = open_ledger(tmp_path / "b")
    assert one(again, lm.Totals())["users"] == 1  # the acknowledged account, not the failed one
    again.close()


def test_a_failed_fsync_poisons_the_journal(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    led = open_ledger(tmp_path, fsync=True)
    assert created(led, 1).user == 1
    acknowledged = led.machine.fingerprint()

    def dead_disk(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(journal_module, "_fdatasync", dead_disk)
    with pytest.raises(DurabilityError):
        one(led, lm.CreateAccount(*account(2)))
    monkeypatch.undo()  # the disk answers again: the journal stays poisoned all the same
    with pytest.raises(DurabilityError):
        one(led, lm.LockMargin(MarginLock(1, USD)))
    with pytest.raises(DurabilityError):
        led.checkpoint()
    crash(led)
    again = open_ledger(tmp_path)
    # the unacknowledged account may or may not have reached the disk: never a part of it
    fingerprint = again.machine.fingerprint()
    assert fingerprint == acknowledged or fingerprint["next_user"] == 3
    assert again.machine.check() == []
    again.close()
