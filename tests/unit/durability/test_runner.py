"""Runner: a batch is stepped command by command, journaled as one record and committed once
before it is answered; volatile events ride along with the next commit; a failing decide fails
its command only, a failing apply or commit stops the runner; ``Runner.open`` recovers the
same state after a clean stop and after a crash."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cluster.durability import store as store_module
from cluster.durability.journal import HEADER
from cluster.durability.journal import HEADER_BYTES
from cluster.durability.journal import Journal
from cluster.durability.journal import JournalDamagedError
from cluster.durability.journal import JournalLockedError
from cluster.durability.recovery import RecoveryError
from cluster.durability.runner import MAX_PENDING_EVENTS
from cluster.durability.runner import Failed
from cluster.durability.runner import Runner
from cluster.durability.runner import collector_paused
from cluster.durability.snapshot import Snapshot
from cluster.durability.snapshot import list_snapshots
from cluster.durability.snapshot import read_snapshot
from cluster.durability.snapshot import snapshot_path
from cluster.durability.snapshot import write_snapshot
from cluster.durability.store import JOURNAL_DIR
from cluster.durability.store import SNAPSHOT_DIR
from cluster.durability.store import DurabilityError
from engine.events import BATCH_TAG
from engine.events import AccountCreated
from engine.events import ClientOrderStoredAt
from engine.events import Event
from engine.events import EventError
from engine.events import MarginLocked
from engine.events import OpenFenced
from engine.events import OutboxAcked
from engine.events import PositionClosed
from engine.events import PositionOpened
from engine.events import TickApplied
from engine.events import decode_batch
from engine.ledger_machine import AbandonLock
from engine.ledger_machine import Balances
from engine.ledger_machine import Begin
from engine.ledger_machine import CreateAccount
from engine.ledger_machine import CreatedAccount
from engine.ledger_machine import ExpireAnswers
from engine.ledger_machine import LedgerMachine
from engine.ledger_machine import LockMargin
from engine.ledger_machine import Remember
from engine.ledger_machine import Totals
from engine.machine import StateCorrupted
from engine.market import Tick
from engine.messages import IdemHit
from engine.messages import IdemKey
from engine.messages import MarginLock
from engine.messages import OpenPosition
from engine.messages import SettlementItem
from engine.orders import Side
from engine.results import Code
from engine.results import Rejected
from engine.shard_machine import AckOutbox
from engine.shard_machine import ApplyTick
from engine.shard_machine import Close
from engine.shard_machine import LastTick
from engine.shard_machine import Open
from engine.shard_machine import Outbox
from engine.shard_machine import OutboxView
from engine.shard_machine import Resolve
from tests.unit.durability.hosted import NOW
from tests.unit.durability.hosted import SIGNUP
from tests.unit.durability.hosted import USD
from tests.unit.durability.hosted import VOLATILE_FIELDS
from tests.unit.durability.hosted import Clock
from tests.unit.durability.hosted import account
from tests.unit.durability.hosted import assert_same
from tests.unit.durability.hosted import build_ledger
from tests.unit.durability.hosted import crash
from tests.unit.durability.hosted import journal_records
from tests.unit.durability.hosted import one
from tests.unit.durability.hosted import open_ledger
from tests.unit.durability.hosted import open_shard
from tests.unit.durability.hosted import replayed
from tests.unit.durability.hosted import run_python
from tests.unit.durability.hosted import segment
from tests.unit.durability.hosted import shard_builder
from tests.unit.durability.hosted import shard_close
from tests.unit.durability.hosted import shard_open
from tests.unit.durability.hosted import tick


def record_types(record: bytes) -> list[type]:
    return [type(e) for e in decode_batch(record)]


def durable_seq(runner: Runner[Any]) -> int:
    assert runner.store is not None
    return runner.store.journal.durable_seq


# ----------------------------------------------------------------------------- group commit
def test_a_batch_is_one_record_committed_once_before_it_is_answered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncs: list[int]) -> None:
    led = open_ledger(tmp_path, fsync=True)
    assert led.store is not None
    on_disk: list[int] = []  # records a reader finds on disk, before and after the commit
    real_commit = led.store.commit

    def commit() -> int:
        on_disk.append(len(journal_records(tmp_path)))
        seq = real_commit()
        on_disk.append(len(journal_records(tmp_path)))
        return seq

    monkeypatch.setattr(led.store, "commit", commit)
    answers = led.execute([CreateAccount(*account(1)), CreateAccount(*account(2)),
                           LockMargin(MarginLock(1, 6_000 * USD)),
                           LockMargin(MarginLock(1, 6_000 * USD)),
                           LockMargin(MarginLock(1, 4_000 * USD)), Balances(1)])
    # each command decided after the ones before it in the batch
    assert answers[:2] == [CreatedAccount(1, account(1)[0], SIGNUP),
                           CreatedAccount(2, account(2)[0], SIGNUP)]
    assert answers[2] is None and answers[4] is None and answers[5] == (0, SIGNUP)
    assert isinstance(answers[3], Rejected) and answers[3].code is Code.INSUFFICIENT_BALANCE
    assert on_disk == [0, 1] and len(syncs) == 1  # one record, one flush, then the answers
    [record] = journal_records(tmp_path)
    assert record_types(record) == [AccountCreated, AccountCreated, MarginLocked, MarginLocked]
    # a batch of reads touches no disk
    assert led.execute([Balances(1), Balances(2)]) == [(0, SIGNUP), (SIGNUP, 0)]
    assert on_disk == [0, 1] and len(syncs) == 1
    assert (led.commands, led.batches) == (8, 2)
    crash(led)


def test_a_batch_decides_at_one_reading_of_the_clock(tmp_path: Path) -> None:
    readings: list[int] = []

    def clock() -> int:
        readings.append(NOW + len(readings))
        return readings[-1]

    led = open_ledger(tmp_path, clock)
    one(led, CreateAccount(*account(1)))
    led.execute([Begin(IdemKey(1, "close", "a"), 5), Begin(IdemKey(1, "close", "b"), 6)])
    assert len(readings) == 2
    stored = decode_batch(journal_records(tmp_path)[-1])
    assert [e.ts_us for e in stored if isinstance(e, ClientOrderStoredAt)] == [readings[1]] * 2
    crash(led)


def test_an_urgent_event_commits_volatile_ones_ride_along_with_the_next_commit(
        tmp_path: Path) -> None:
    clock = Clock()
    sh = open_shard(tmp_path, clock)
    assert sh.store is not None
    assert one(sh, ApplyTick(tick(10_000))) == 0
    assert durable_seq(sh) == 0 and sh.store.pending == 1  # not committed on its own
    pos = one(sh, Open(shard_open(1)))
    assert isinstance(pos, OpenPosition) and durable_seq(sh) == 1 and sh.store.pending == 0
    assert record_types(journal_records(tmp_path)[0]) == [TickApplied, PositionOpened]
    item = one(sh, Close(shard_close(2, 1, pos.position_id)))
    assert isinstance(item, SettlementItem) and durable_seq(sh) == 2
    assert one(sh, AckOutbox(1)) == 0
    assert one(sh, ApplyTick(tick(10_010, seq=2))) == 0
    assert durable_seq(sh) == 2 and sh.store.pending == 2
    # a crash now loses exactly the volatile events: the price and the acknowledgement
    live = sh.machine.fingerprint()
    crash(sh)
    sh = open_shard(tmp_path, clock)
    recovered = sh.machine.fingerprint()
    assert_same(recovered, live, skip=VOLATILE_FIELDS)
    assert one(sh, LastTick()) == tick(10_000) and one(sh, Outbox()) == OutboxView([item], 1)
    # the same again, then an urgent event: all of them land in its record
    assert sh.execute([AckOutbox(1), ApplyTick(tick(10_010, seq=2))]) == [0, 0]
    assert durable_seq(sh) == 2
    assert one(sh, Resolve(99)) is None  # fenced: urgent
    assert durable_seq(sh) == 3 and sh.store is not None and sh.store.pending == 0
    assert record_types(journal_records(tmp_path)[-1]) == [OutboxAcked, TickApplied, OpenFenced]
    now = sh.machine.fingerprint()
    assert_same(now, live, skip=("results",))
    assert now["results"] == [*live["results"], (99, ("rejected", "PRICE_UNAVAILABLE",
                                                      "the request was abandoned after a "
                                                      "timeout"))]
    # a tick that closes positions is urgent itself
    pos = one(sh, Open(shard_open(3, tp=10_100)))
    assert durable_seq(sh) == 4
    assert one(sh, ApplyTick(tick(10_200, seq=3))) == 1 and durable_seq(sh) == 5
    assert record_types(journal_records(tmp_path)[-1]) == [TickApplied, PositionClosed]
    live = sh.machine.fingerprint()
    crash(sh)
    assert open_shard(tmp_path, clock).machine.fingerprint() == live


def test_volatile_events_are_committed_on_their_own_once_max_pending_wait(
        tmp_path: Path) -> None:
    """A shard nobody trades on only ever applies ticks: their events do not wait in memory
    for an urgent one without end (memory grew with every tick, and the first open after
    enough of them made a record over the journal's bound); a crash then loses at most the
    newest MAX_PENDING_EVENTS - 1 prices."""
    sh = open_shard(tmp_path)
    assert sh.store is not None
    ticks = [tick(10_000 + i % 7, ts_us=NOW + i, seq=i + 1) for i in range(MAX_PENDING_EVENTS)]
    for t in ticks[:-1]:
        sh.execute([ApplyTick(t)])
    assert durable_seq(sh) == 0 and sh.store.pending == MAX_PENDING_EVENTS - 1
    sh.execute([ApplyTick(ticks[-1])])
    assert durable_seq(sh) == 1 and sh.store.pending == 0
    assert record_types(journal_records(tmp_path)[0]) == [TickApplied] * MAX_PENDING_EVENTS
    sh.execute([ApplyTick(tick(10_020, ts_us=NOW + MAX_PENDING_EVENTS, seq=10**6))])
    live = sh.machine.fingerprint()
    crash(sh)
    sh = open_shard(tmp_path)
    assert one(sh, LastTick()) == ticks[-1]
    assert_same(sh.machine.fingerprint(), live, skip=VOLATILE_FIELDS)


# ----------------------------------------------------------------------------- failures
def test_a_record_over_the_journals_bound_fails_the_commit_and_answers_nothing_more(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The events are applied when their record turns out too large to write: memory holds
    what the disk does not, so the runner stops as after a failed write (the host ends the
    process, recovery reads the disk)."""
    import cluster.durability.journal as journal_module

    led = open_ledger(tmp_path)
    assert one(led, CreateAccount(*account(1))).user == 1
    monkeypatch.setattr(journal_module, "MAX_RECORD_BYTES", 16)
    with pytest.raises(DurabilityError):
        led.execute([CreateAccount(*account(2))])
    with pytest.raises(DurabilityError):
        led.execute([Totals()])
    crash(led)
    monkeypatch.undo()
    again = open_ledger(tmp_path)
    assert one(again, Totals())["users"] == 1
    again.close()


def test_a_decide_that_raises_fails_that_command_only(tmp_path: Path) -> None:
    led = open_ledger(tmp_path)
    answers = led.execute([CreateAccount(*account(1)), object(),
                           Remember(IdemKey(1, "open", "x"), "not an answer"),
                           CreateAccount(*account(2))])
    assert answers[0].user == 1 and answers[3].user == 2
    for failed in answers[1:3]:
        assert isinstance(failed, Failed) and failed.error.startswith("TypeError")
    assert durable_seq(led) == 1
    live = led.machine.fingerprint()
    crash(led)
    again = open_ledger(tmp_path)
    assert again.machine.fingerprint() == live
    assert one(again, Totals())["users"] == 2
    assert one(again, Begin(IdemKey(1, "open", "x"))) is None  # nothing was stored
    again.close()


class LockFailsToApply(LedgerMachine):
    """A ledger whose apply of MarginLocked fails (a bug)."""

    def apply(self, event: Event) -> None:
        if isinstance(event, MarginLocked):
            raise RuntimeError("bug in apply")
        super().apply(event)


def failing_ledger(snapshot: Snapshot | None) -> LedgerMachine:
    if snapshot is None:
        return LockFailsToApply(SIGNUP)
    return LockFailsToApply.from_snapshot(SIGNUP, snapshot.arrays, snapshot.meta)


def broken_runner(path: Path) -> tuple[Runner[LedgerMachine], dict[str, Any]]:
    """A runner whose apply failed in its second batch, and the state its journal holds."""
    led: Runner[LedgerMachine] = Runner.open(path, failing_ledger, Clock(), fsync=False)
    assert one(led, CreateAccount(*account(1))).user == 1
    durable = led.machine.fingerprint()
    with pytest.raises(StateCorrupted):
        led.execute([CreateAccount(*account(2)), LockMargin(MarginLock(1, USD))])
    assert durable_seq(led) == 1  # nothing of the batch was journaled
    return led, durable


def test_an_apply_that_raises_breaks_the_runner(tmp_path: Path) -> None:
    led, durable = broken_runner(tmp_path)
    with pytest.raises(DurabilityError):  # the state in memory is not trusted any more
        led.execute([Balances(1)])
    with pytest.raises(DurabilityError):
        led.execute([CreateAccount(*account(3))])
    led.close()  # no final snapshot
    assert list_snapshots(tmp_path / SNAPSHOT_DIR) == []
    again = open_ledger(tmp_path)
    assert again.machine.fingerprint() == durable
    again.close()


def test_a_broken_runner_writes_no_snapshot_of_its_memory(tmp_path: Path) -> None:
    led, durable = broken_runner(tmp_path)
    with pytest.raises(DurabilityError):
        led.checkpoint()
    led.close()
    assert list_snapshots(tmp_path / SNAPSHOT_DIR) == []
    again = open_ledger(tmp_path)
    assert again.machine.fingerprint() == durable  # not account 2, whose batch failed
    again.close()


def test_an_apply_that_raises_ends_the_process_when_asked(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from cluster.durability.runner import Runner\n"
        "from engine.events import MarginLocked\n"
        "from engine.ledger_machine import CreateAccount, LedgerMachine, LockMargin\n"
        "from engine.messages import MarginLock\n"
        "class Broken(LedgerMachine):\n"
        "    def apply(self, event):\n"
        "        if isinstance(event, MarginLocked):\n"
        "            raise RuntimeError('bug in apply')\n"
        "        super().apply(event)\n"
        f"led = Runner.open({str(tmp_path)!r}, lambda s: Broken({SIGNUP}), fsync=False,\n"
        "                  exit_on_failure=True)\n"
        "led.execute([CreateAccount('acc_1', 'h1')])\n"
        "led.execute([LockMargin(MarginLock(1, 5))])\n"
        "sys.exit(0)\n")
    proc = run_python(script)
    assert proc.returncode == 70, proc.stderr
    again = open_ledger(tmp_path)
    assert one(again, Totals())["users"] == 1 and one(again, Balances(1)) == (SIGNUP, 0)
    again.close()


def test_a_snapshot_that_fails_after_the_commit_fails_only_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    led = open_ledger(tmp_path, Clock(), snapshot_every_events=1)

    def no_memory() -> Any:
        raise MemoryError("copying the state")

    with monkeypatch.context() as patched, caplog.at_level(logging.ERROR):
        patched.setattr(led.machine, "snapshot", no_memory)
        created = one(led, CreateAccount(*account(1)))  # committed, then the snapshot fails
    assert isinstance(created, CreatedAccount)
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert led.problem() is None and list_snapshots(tmp_path / SNAPSHOT_DIR) == []
    one(led, CreateAccount(*account(2)))  # the next due batch snapshots
    assert len(list_snapshots(tmp_path / SNAPSHOT_DIR)) == 1
    live = led.machine.fingerprint()
    crash(led)
    assert open_ledger(tmp_path, Clock()).machine.fingerprint() == live


def test_a_quiet_host_snapshots_once_its_interval_has_passed(tmp_path: Path) -> None:
    """Far fewer events than ``snapshot_every_events``: a snapshot is written by the first batch
    once ``snapshot_every_s`` has passed since the last one, not before, and the interval then
    starts again (so a quiet host's replay stays bounded too)."""
    now_s = [0.0]
    led = Runner.open(tmp_path, build_ledger, Clock(), fsync=False, background_snapshots=False,
                      snapshot_every_events=10**9, snapshot_every_s=60.0,
                      clock=lambda: now_s[0])
    written = []
    for n, at_s in enumerate((1.0, 59.9, 60.0, 61.0, 119.9, 120.0), start=1):
        now_s[0] = at_s
        one(led, CreateAccount(*account(n)))
        written.append(len(list_snapshots(tmp_path / SNAPSHOT_DIR)))
    assert written == [0, 0, 1, 1, 1, 2]
    live = led.machine.fingerprint()
    crash(led)
    assert open_ledger(tmp_path, Clock()).machine.fingerprint() == live


@pytest.mark.parametrize("background", [False, True])
def test_snapshots_failing_in_a_row_are_reported_until_one_is_written(
        tmp_path: Path, background: bool) -> None:
    """A file where the snapshot directory belongs: every snapshot fails. Nothing is lost, but
    the journal is no longer trimmed; from the third failure in a row the host's problem (its
    ping: /healthz, status) says so. Before, only a log line did. One written clears it."""
    led = open_ledger(tmp_path, Clock(), snapshot_every_events=1,
                      background_snapshots=background)
    assert not (tmp_path / SNAPSHOT_DIR).exists()  # made by the first snapshot
    (tmp_path / SNAPSHOT_DIR).write_bytes(b"in the way")
    assert led.store is not None
    for n in range(1, 4):
        assert led.problem() is None
        one(led, CreateAccount(*account(n)))  # committed, then its snapshot fails
        led.store.wait_snapshot()
    problem = led.problem()
    assert problem is not None and "the last 3 snapshots" in problem \
        and "FileExistsError" in problem, problem
    assert one(led, Totals())["users"] == 3  # trading goes on
    (tmp_path / SNAPSHOT_DIR).unlink()
    one(led, CreateAccount(*account(4)))
    # clear as soon as that one is written, with no commit after it (a background one was
    # reported failing until the host's next write)
    deadline = time.monotonic() + 10
    while led.problem() is not None:
        assert time.monotonic() < deadline, led.problem()
        time.sleep(0.01)
    led.store.wait_snapshot()
    assert led.problem() is None and list_snapshots(tmp_path / SNAPSHOT_DIR)
    live = led.machine.fingerprint()
    crash(led)
    assert open_ledger(tmp_path, Clock()).machine.fingerprint() == live


@pytest.mark.parametrize("failure", ["a dead disk", "no memory for the record"])
def test_a_failed_commit_answers_nothing_more_not_even_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """The next write fails like a dead disk, or encoding the batch's record runs out of memory
    after its events were applied and taken from the store's buffer. Before, only a journal
    error stopped the runner: on the second it went on answering from a memory that held an
    account the disk did not, and journaled later events on top of it, which a replay then
    applies to a state without it."""
    led = open_ledger(tmp_path)
    assert one(led, CreateAccount(*account(1))).user == 1
    assert led.store is not None
    if failure == "a dead disk":
        ro = os.open(os.devnull, os.O_RDONLY)
        os.dup2(ro, led.store.journal._fd)
        os.close(ro)
    else:
        def no_memory(*_: object) -> list[bytes]:
            raise MemoryError("encoding the record")

        monkeypatch.setattr(store_module, "encode_batches", no_memory)
    with pytest.raises(DurabilityError):
        led.execute([CreateAccount(*account(2))])
    # memory holds an account the disk does not: nothing may be answered from it
    with pytest.raises(DurabilityError):
        led.execute([Totals()])
    monkeypatch.undo()
    crash(led)
    again = open_ledger(tmp_path)
    assert one(again, Totals())["users"] == 1
    again.close()


def test_a_command_whose_event_does_not_encode_is_rejected_and_changes_nothing(
        tmp_path: Path) -> None:
    clock = Clock()
    led = open_ledger(tmp_path / "ledger", clock)
    user = one(led, CreateAccount(*account(1))).user
    before, journal = led.machine.fingerprint(), segment(tmp_path / "ledger").read_bytes()
    answers = led.execute([CreateAccount("a" * 300, "h"), Begin(IdemKey(user, "k" * 300, "x"))])
    clock.now_us = 2**63  # a time no event can carry
    answers.append(one(led, Begin(IdemKey(user, "open", "x"), 7)))
    for refused in answers:
        assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST
    assert led.machine.fingerprint() == before
    assert segment(tmp_path / "ledger").read_bytes() == journal
    assert led.store is not None and led.store.pending == 0
    # beside a command that does change the state: only that one is journaled
    clock.now_us = NOW
    answers = led.execute([CreateAccount("a" * 300, "h"), LockMargin(MarginLock(user, USD))])
    assert isinstance(answers[0], Rejected) and answers[1] is None
    assert replayed(tmp_path / "ledger", build_ledger).fingerprint() == \
        led.machine.fingerprint()
    crash(led)
    # a shard: a tick that would liquidate, stamped with a seq its event cannot carry
    sh = open_shard(tmp_path / "shard")
    one(sh, ApplyTick(tick(10_000)))
    assert isinstance(one(sh, Open(shard_open(1))), OpenPosition)
    before, journal = sh.machine.fingerprint(), segment(tmp_path / "shard").read_bytes()
    refused = one(sh, ApplyTick(Tick("SOL", 5_000, 5_001, NOW, -1, "test")))
    assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST
    assert sh.machine.fingerprint() == before and len(sh.machine.book) == 1
    assert segment(tmp_path / "shard").read_bytes() == journal
    crash(sh)


# ----------------------------------------------------------------------------- recovery
def test_open_recovers_the_same_state_after_a_clean_stop_and_after_a_crash(
        tmp_path: Path) -> None:
    clock = Clock()
    led = open_ledger(tmp_path / "ledger", clock)
    sh = open_shard(tmp_path / "shard", clock)
    users = [one(led, CreateAccount(*account(n))).user for n in (1, 2, 3)]
    one(sh, ApplyTick(tick(10_000)))
    key = IdemKey(users[0], "open", "k")
    assert led.execute([LockMargin(MarginLock(u, 100 * USD, key if u == users[0] else None,
                                              10 + u)) for u in users]) == [None] * 3
    opened = sh.execute([Open(shard_open(10 + u, owner=u, side=Side(u % 2),
                                         tp=None if u % 2 else 10_300)) for u in users])
    assert one(led, Remember(key, opened[0])) is None
    assert all(isinstance(p, OpenPosition) for p in opened)
    ledger_live, shard_live = led.machine.fingerprint(), sh.machine.fingerprint()
    led.close()
    sh.close()
    led = open_ledger(tmp_path / "ledger", clock)
    sh = open_shard(tmp_path / "shard", clock)
    for runner in (led, sh):  # all of it from the final snapshot
        assert runner.store is not None and runner.store.recovered is not None
        assert runner.store.recovered.replayed == 0
        assert runner.store.recovered.snapshot_seq == durable_seq(runner) > 0
    assert led.machine.fingerprint() == ledger_live
    assert sh.machine.fingerprint() == shard_live
    # more, then a crash: snapshot plus journal tail
    assert one(sh, ApplyTick(tick(10_400, seq=2))) == 1  # the long's take-profit
    assert one(led, AbandonLock(11)) is None  # its clientOrderId has an answer: kept
    assert one(led, Begin(IdemKey(users[1], "close", "c"), 99)) is None
    ledger_live, shard_live = led.machine.fingerprint(), sh.machine.fingerprint()
    crash(led)
    crash(sh)
    led = open_ledger(tmp_path / "ledger", clock)
    sh = open_shard(tmp_path / "shard", clock)
    for runner in (led, sh):
        assert runner.store is not None and runner.store.recovered is not None
        assert runner.store.recovered.snapshot_seq > 0 and runner.store.recovered.replayed > 0
    assert led.machine.fingerprint() == ledger_live
    assert sh.machine.fingerprint() == shard_live
    led.close()
    sh.close()


def test_a_read_only_runner_recovers_the_same_state_and_writes_nothing(
        tmp_path: Path) -> None:
    """``readonly=True``: the same recovery (a torn tail is skipped, not cut off), commands
    step in memory only, no snapshot at close, no file touched."""
    clock = Clock()
    led = open_ledger(tmp_path, clock, snapshot_every_events=2)
    user = one(led, CreateAccount(*account(1))).user
    one(led, CreateAccount(*account(2)))
    assert one(led, LockMargin(MarginLock(user, 40 * USD, None, 7))) is None
    live = led.machine.fingerprint()
    crash(led)
    with open(segment(tmp_path), "ab") as f:
        f.write(b"\x40\x00\x00\x00torn")  # a record a kill cut in the middle
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    reader = open_ledger(tmp_path, clock, readonly=True)
    assert reader.machine.fingerprint() == live
    assert reader.store is not None and reader.store.recovered is not None
    assert reader.store.recovered.snapshot_seq > 0 and reader.store.recovered.replayed > 0
    with pytest.raises(JournalLockedError):  # a writer cannot start while it reads
        open_ledger(tmp_path, clock)
    assert reader.execute([AbandonLock(7), Balances(user)]) == [(7, user, 40 * USD),
                                                                (SIGNUP, 0)]
    with pytest.raises(DurabilityError):
        reader.checkpoint()
    reader.close()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    led = open_ledger(tmp_path, clock)  # the lock went with it; the release never happened
    assert led.machine.fingerprint() == live
    assert one(led, Balances(user)) == (SIGNUP - 40 * USD, 40 * USD)
    led.close()


def test_opening_a_torn_journal_is_logged_and_a_damaged_one_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A torn last record is cut with an INFO line, garbage after the last record with a
    warning; a damaged record that acknowledged records follow is refused with one line
    naming the file and the byte, and nothing is changed (before, it was cut off with a
    warning, and the accounts after it were gone)."""
    def reopened(path: Path) -> list[logging.LogRecord]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="cluster.durability.store"):
            open_ledger(path, Clock()).close()
        return list(caplog.records)

    for path in (tmp_path / "torn", tmp_path / "garbage", tmp_path / "damaged"):
        led = open_ledger(path, Clock())
        for n in (1, 2, 3):
            one(led, CreateAccount(*account(n)))
        crash(led)
    with open(segment(tmp_path / "torn"), "ab") as f:
        f.write(b"\x40\x00\x00\x00torn")  # a record a kill cut in the middle
    [record] = reopened(tmp_path / "torn")
    assert record.levelno == logging.INFO and "torn" in record.getMessage()
    with open(segment(tmp_path / "garbage"), "ab") as f:
        f.write(b"\xff" * 30)  # no record has such a length
    [record] = reopened(tmp_path / "garbage")
    assert record.levelno == logging.WARNING and "damaged" in record.getMessage()
    assert "recovered to seq 3" in record.getMessage()
    damaged = bytearray(segment(tmp_path / "damaged").read_bytes())
    damaged[HEADER_BYTES + 2] ^= 0xFF  # a payload byte of the first of three records
    segment(tmp_path / "damaged").write_bytes(bytes(damaged))
    files = {p: p.read_bytes() for p in (tmp_path / "damaged").rglob("*") if p.is_file()}
    with pytest.raises(JournalDamagedError,
                       match=f"{segment(tmp_path / 'damaged')} is damaged at byte 0 "):
        open_ledger(tmp_path / "damaged", Clock())
    assert {p: p.read_bytes() for p in (tmp_path / "damaged").rglob("*") if p.is_file()} == files


def _ten_accounts_then_damage(tmp_path: Path, seq: int) -> dict[str, Any]:
    """:func:`_ten_accounts`, then one payload byte of record ``seq`` flipped."""
    live = _ten_accounts(tmp_path)
    damaged = bytearray(segment(tmp_path).read_bytes())
    damaged[_record_at(damaged, seq) + HEADER_BYTES + 10] ^= 0xFF
    segment(tmp_path).write_bytes(bytes(damaged))
    return live


def _record_at(journal: bytes, seq: int) -> int:
    """The byte where record ``seq`` begins in the segment of :func:`_ten_accounts`."""
    at = 0
    for _ in range(4, seq):
        at += HEADER_BYTES + HEADER.unpack_from(journal, at)[0]
    return at


def _ten_accounts(tmp_path: Path) -> dict[str, Any]:
    """A ledger under ``tmp_path`` with snapshots at seq 3 and 6 and accounts journaled as
    seq 1..10, crashed (the journal keeps 4.. for the snapshot at 3); the live state's
    fingerprint before the crash."""
    led = open_ledger(tmp_path, Clock())
    for n in range(1, 4):
        one(led, CreateAccount(*account(n)))  # seq 1..3
    assert led.checkpoint() == 3
    for n in range(4, 7):
        one(led, CreateAccount(*account(n)))  # seq 4..6
    assert led.checkpoint() == 6  # the journal keeps 4.. for the snapshot at 3
    for n in range(7, 11):
        one(led, CreateAccount(*account(n)))  # seq 7..10, acknowledged
    live = led.machine.fingerprint()
    crash(led)
    return live


def _ten_accounts_then_covered_damage(tmp_path: Path) -> dict[str, Any]:
    """:func:`_ten_accounts_then_damage` of seq 4, which both snapshots cover."""
    return _ten_accounts_then_damage(tmp_path, 4)


def test_damage_after_the_snapshot_with_records_after_it_is_refused(tmp_path: Path) -> None:
    """Record 8, after the newest snapshot, damaged, and 9 and 10 acknowledged after it:
    before, the journal was cut at 8 with a warning and the host served without them."""
    _ten_accounts_then_damage(tmp_path, 8)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for readonly in (False, True):
        with pytest.raises(JournalDamagedError, match=r"is damaged at byte \d+ \(record 8\)"):
            open_ledger(tmp_path, Clock(), readonly=readonly)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


def test_a_damaged_record_the_snapshot_holds_costs_no_record_after_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The journal keeps the records the older of two snapshots needs; one of them damaged
    must not end the journal before the acknowledged records after the newer snapshot."""
    live = _ten_accounts_then_covered_damage(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cluster.durability.store"):
        again = open_ledger(tmp_path, Clock())
    assert again.store is not None and again.store.recovered is not None
    assert (again.store.recovered.snapshot_seq, again.store.recovered.last_seq) == (6, 10)
    assert again.machine.fingerprint() == live
    assert "resumed at seq 7" in caplog.text
    assert one(again, CreateAccount(*account(11))).user == 11
    crash(again)
    assert open_ledger(tmp_path, Clock()).machine.check() == []


def test_a_read_only_runner_reads_past_a_damaged_record_the_snapshot_holds(
        tmp_path: Path) -> None:
    """The offline audit recovers what a writer would: past a damaged record the snapshot
    holds it reads on from the record after the snapshot, touching nothing (it stopped at the
    damage and audited the snapshot's state, without the acknowledged records after it)."""
    live = _ten_accounts_then_covered_damage(tmp_path)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    reader = open_ledger(tmp_path, Clock(), readonly=True)
    assert reader.store is not None and reader.store.recovered is not None
    assert (reader.store.recovered.snapshot_seq, reader.store.recovered.last_seq) == (6, 10)
    assert reader.machine.fingerprint() == live
    reader.close()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


def test_an_in_memory_runner_steps_the_same_way_without_a_disk() -> None:
    led: Runner[LedgerMachine] = Runner(LedgerMachine(SIGNUP), clock_us=Clock())
    assert led.execute([CreateAccount(*account(1)), LockMargin(MarginLock(1, USD)),
                        Balances(1)])[1:] == [None, (SIGNUP - USD, USD)]
    assert (led.checkpoint(), led.journal_bytes(), led.recovery_s()) == (0, 0, 0.0)
    led.close()
    sh = Runner(shard_builder()(None), clock_us=Clock())
    assert sh.execute([ApplyTick(tick(10_000)), LastTick()]) == [0, tick(10_000)]


def test_an_open_that_fails_to_recover_lets_go_of_the_journal(tmp_path: Path) -> None:
    """A record that does not decode fails the recovery; the store opened for it kept the
    journal's lock and files open, so every later open in that process was refused as held
    by another writer, even once the record was set aside."""
    led = open_ledger(tmp_path, Clock())
    one(led, CreateAccount(*account(1)))
    crash(led)
    with Journal(tmp_path / JOURNAL_DIR, fsync=False) as journal:
        journal.append(bytes((BATCH_TAG,)) + (1).to_bytes(4, "little") + b"\xff")
        journal.commit()
    for readonly in (False, True):
        with pytest.raises(RecoveryError, match=r"record 2 .*unknown event type byte 0xff") \
                as refused:
            open_ledger(tmp_path, Clock(), readonly=readonly)
        assert isinstance(refused.value.__cause__, EventError)
    with Journal(tmp_path / JOURNAL_DIR) as journal:  # the lock is free again
        assert journal.durable_seq == 2


def test_a_segment_of_another_hosts_journal_is_refused_naming_it(tmp_path: Path) -> None:
    """Records carry no owner: a ledger's segment copied over a shard's frames and checks
    out. Its first record stops the start with one line naming the journal and the record;
    before, the shard's own error escaped without either (``not a shard event: ...``)."""
    led = open_ledger(tmp_path / "ledger", Clock())
    one(led, CreateAccount(*account(1)))
    crash(led)
    crash(open_shard(tmp_path / "shard", Clock()))
    shard_journal = tmp_path / "shard" / JOURNAL_DIR
    shutil.copy(segment(tmp_path / "ledger"), shard_journal)
    files = {p: p.read_bytes() for p in shard_journal.iterdir()}
    for readonly in (False, True):
        with pytest.raises(RecoveryError) as refused:
            open_shard(tmp_path / "shard", Clock(), readonly=readonly)
        assert str(refused.value).startswith(f"journal {shard_journal}: record 1 does not "
                                             "replay (ShardStateError: not a shard event")
        assert "\n" not in str(refused.value)
    assert {p: p.read_bytes() for p in shard_journal.iterdir()} == files


@pytest.mark.parametrize("readonly", [False, True])
def test_a_snapshot_the_state_refuses_falls_back_to_the_one_before(
        tmp_path: Path, readonly: bool, caplog: pytest.LogCaptureFixture) -> None:
    """The newest snapshot's checksums hold, but the state's own checks refuse its content (a
    free list that leaves the book's rows). Before, no start (nor offline audit) was possible
    until it was removed by hand, though the snapshot before it and the journal kept for that
    one hold every record."""
    clock = Clock()
    sh = open_shard(tmp_path, clock)
    one(sh, ApplyTick(tick(10_000)))
    one(sh, Open(shard_open(1)))
    older = sh.checkpoint()
    one(sh, Open(shard_open(2, owner=2)))
    newest = sh.checkpoint()
    one(sh, Open(shard_open(3, owner=3)))
    live = sh.machine.fingerprint()
    crash(sh)
    snapshots = tmp_path / SNAPSHOT_DIR
    refused = read_snapshot(snapshot_path(snapshots, newest))
    write_snapshot(snapshots, newest, {**refused.arrays, "free_head": np.array([10**6])},
                   refused.meta)
    with caplog.at_level(logging.WARNING, logger="cluster.durability.store"):
        again = open_shard(tmp_path, clock, readonly=readonly)
    assert again.store is not None and again.store.recovered is not None
    assert again.store.recovered.snapshot_seq == older
    assert again.machine.fingerprint() == live
    assert snapshot_path(snapshots, newest).name in caplog.text
    crash(again)


def test_a_skipped_snapshot_covering_more_than_the_journal_is_logged_as_a_loss(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The newest snapshot (seq 6) damaged, and the journal torn within record 5: recovery
    falls back to the snapshot at 3 and ends at seq 4, without what only the damaged snapshot
    held. That was only a warning about the skipped file; it is an error saying what is lost.
    The same damaged snapshot with the journal whole loses nothing and says nothing of it."""
    for case, cut in (("whole", False), ("torn", True)):
        path = tmp_path / case
        _ten_accounts(path)
        newest = snapshot_path(path / SNAPSHOT_DIR, 6)
        newest.write_bytes(newest.read_bytes()[:-7])
        if cut:
            journal = segment(path).read_bytes()
            segment(path).write_bytes(journal[:_record_at(journal, 5) + HEADER_BYTES + 3])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cluster.durability.store"):
            again = open_ledger(path, Clock())
        assert again.store is not None and again.store.recovered is not None
        assert (again.store.recovered.snapshot_seq, again.store.recovered.last_seq) == (
            (3, 4) if cut else (3, 10))
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == ([f"{path}: the snapshot {newest.name} was skipped and the journal "
                           "ends at seq 4: what it held of seq 5..6 is lost (the file is kept "
                           "as *.corrupt)"] if cut else [])
        crash(again)


def test_a_skipped_snapshot_no_longer_counts_among_the_two_kept(tmp_path: Path) -> None:
    """A start skipped the damaged newest snapshot, but the file kept its name and counted as
    one of the two snapshots kept: the next snapshot deleted the valid one before it and the
    journal it needs, so when the newest was damaged in turn no start was possible (two
    snapshots kept are meant to survive the loss of one)."""
    snapshots = tmp_path / SNAPSHOT_DIR

    def damage(seq: int) -> None:
        path = snapshot_path(snapshots, seq)
        path.write_bytes(path.read_bytes()[:-7])

    led = open_ledger(tmp_path, Clock())
    for n in (1, 2, 3):
        one(led, CreateAccount(*account(n)))
    assert led.checkpoint() == 3
    for n in (4, 5, 6):
        one(led, CreateAccount(*account(n)))
    assert led.checkpoint() == 6
    one(led, CreateAccount(*account(7)))
    crash(led)
    damage(6)
    led = open_ledger(tmp_path, Clock())
    assert led.store is not None and led.store.recovered is not None
    assert led.store.recovered.snapshot_seq == 3
    assert list(snapshots.glob("*.corrupt")) == [snapshots / f"{6:020d}.npz.corrupt"]
    one(led, CreateAccount(*account(8)))
    assert led.checkpoint() == 8
    one(led, CreateAccount(*account(9)))
    live = led.machine.fingerprint()
    crash(led)
    damage(8)
    again = open_ledger(tmp_path, Clock())
    assert again.store is not None and again.store.recovered is not None
    assert again.store.recovered.snapshot_seq == 3
    assert again.machine.fingerprint() == live
    again.close()


def test_a_start_removes_the_snapshot_file_a_dead_writer_left_half_written(
        tmp_path: Path) -> None:
    """A host that ends while its snapshot is written (its journal's disk full, the copy
    itself filling it) leaves the temporary file under its own process id. Before, only the
    next snapshot written removed it: on a disk it had filled, every later one failed, and the
    file kept its space for good. A start removes it (it holds the journal's lock: no writer
    of the directory is alive); an inspection, which writes nothing, leaves it."""
    led = open_ledger(tmp_path, Clock())
    one(led, CreateAccount(*account(1)))
    live = led.machine.fingerprint()
    crash(led)
    (tmp_path / SNAPSHOT_DIR).mkdir()
    left = tmp_path / SNAPSHOT_DIR / f".{snapshot_path(tmp_path, 1).name}.99999.tmp"
    left.write_bytes(b"\0" * 4096)
    inspected = open_ledger(tmp_path, Clock(), readonly=True)
    inspected.close()
    assert left.exists()
    again = open_ledger(tmp_path, Clock())
    assert not left.exists() and again.machine.fingerprint() == live
    again.close()


# ----------------------------------------------------------------------------- answers table
def test_held_answers_survive_restarts_from_an_answers_rows_file_written_by_its_new_bytes(
        tmp_path: Path) -> None:
    """A ledger's answered clientOrderIds go to the snapshots' answers rows file, each
    snapshot appending the answers given since; expired ones are skipped, and a restart from
    the snapshot and the journal after it answers every retry as first answered."""
    clock = Clock()
    led = open_ledger(tmp_path, clock)
    one(led, CreateAccount(*account(1)))
    first: dict[IdemKey, Any] = {}

    def answer(name: str) -> None:
        key = IdemKey(1, "open", name)
        margin = 2 * SIGNUP if name.endswith("!") else USD  # (refused: more than it holds)
        locked = one(led, LockMargin(MarginLock(1, margin, key, 0), b"terms-" + name.encode()))
        if locked is None:
            position = OpenPosition(len(first) + 1, 1, "SOL", Side.LONG, 10_000, 100, USD, 10,
                                    9_000, 0, 0, NOW, None)
            one(led, Remember(key, position))
            locked = position
        first[key] = locked

    def rows_bytes() -> int:
        return sum(p.stat().st_size for p in (tmp_path / SNAPSHOT_DIR).glob("answers.*.rows"))

    for n in range(40):
        answer(f"a{n}" + "!" * (n % 5 == 0))
        clock.now_us += 1_000
    led.checkpoint()
    answer("b0")
    led.checkpoint()  # the two kept snapshots, a rows file each
    whole = rows_bytes()
    answer("b1")
    led.checkpoint()  # extends the file of the one it pushes out: by b0's and b1's entries
    assert 0 < rows_bytes() - whole < 2 * 250
    clock.now_us += 10**6
    assert one(led, ExpireAnswers(10**6 + 35_000)) == 5  # the five oldest
    expired = list(first)[:5]
    first = {k: v for k, v in first.items() if k not in expired}
    led.checkpoint()
    answer("b2")  # in the journal only
    crash(led)
    led = open_ledger(tmp_path, clock)
    for key, answered in first.items():
        retry = LockMargin(MarginLock(1, USD, key, 0), b"terms-" + key.client_order_id.encode())
        assert one(led, retry) == IdemHit(answered)
    assert expired[0].client_order_id == "a0!"  # expired: the id runs anew
    assert one(led, LockMargin(MarginLock(1, USD, expired[0], 0))) is None
    led.close()


def test_a_recovery_runs_with_the_cycle_collector_paused(tmp_path: Path) -> None:
    seen: list[bool] = []

    def build(snapshot: Snapshot | None) -> LedgerMachine:
        seen.append(gc.isenabled())
        return build_ledger(snapshot)

    assert gc.isenabled()
    led = Runner.open(tmp_path, build, Clock(), fsync=False, background_snapshots=False)
    led.close()
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a failed recovery")
    assert gc.isenabled()


def test_an_actors_recovered_state_is_out_of_the_collectors_generations(
        tmp_path: Path) -> None:
    """A full collection walks every object in its generations: the restored state of a
    process that is its machine's (an actor's store ends the process on a failure), millions
    of objects kept for its life, is frozen out of them once it is built; a runner opened in
    a process that may open it again is not."""
    def generations() -> set[int]:
        return {id(o) for generation in range(3) for o in gc.get_objects(generation)}

    led = Runner.open(tmp_path / "a", build_ledger, Clock(), fsync=False,
                      background_snapshots=False)
    try:
        assert gc.is_tracked(led.machine) and id(led.machine) in generations()
    finally:
        led.close()
    frozen = gc.get_freeze_count()
    led = Runner.open(tmp_path / "b", build_ledger, Clock(), fsync=False,
                      background_snapshots=False, exit_on_failure=True)
    try:
        assert gc.get_freeze_count() > frozen
        assert gc.is_tracked(led.machine) and id(led.machine) not in generations()
        assert gc.isenabled()
    finally:
        led.close()
        gc.unfreeze()  # (this process opens more)
