"""Snapshot + journal tail rebuilds exactly the acknowledged state of a real book and ledger.

A small driver plays a shard (engine.book.PositionBook, settlement outbox) and the ledger
(engine.ledger.Ledger, per-shard applied seq) the way the actors do: perform an operation,
journal its event, group-commit per command. Hypothesis draws the commands, including
checkpoints and crashes; every recovery (from snapshot + tail, and a full replay of a twin
journal that was never truncated) must equal the live state.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cluster.durability.journal import Journal
from cluster.durability.recovery import RecoveryError
from cluster.durability.recovery import recover
from cluster.durability.recovery import trim_journal
from cluster.durability.snapshot import Snapshot
from cluster.durability.snapshot import list_snapshots
from cluster.durability.snapshot import load_latest_snapshot
from cluster.durability.snapshot import prune_snapshots
from cluster.durability.snapshot import snapshot_path
from cluster.durability.snapshot import write_snapshot
from engine.assets import DEFAULT_ASSETS
from engine.book import PositionBook
from engine.events import AccountCreated
from engine.events import ClientOrderStored
from engine.events import Event
from engine.events import MarginLocked
from engine.events import MarginReleased
from engine.events import OpenFenced
from engine.events import PositionClosed
from engine.events import PositionOpened
from engine.events import SettlementApplied
from engine.events import TickApplied
from engine.events import encode
from engine.ledger import Ledger
from engine.orders import CloseReason
from engine.orders import OpenPlan
from engine.orders import Side
from engine.orders import plan_open
from engine.settlement import Settlement
from engine.settlement import exit_price_ticks
from engine.settlement import settle
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

ASSET = DEFAULT_ASSETS["SOL"]
SHARD = "SOL-0"
BOOK_TAG = 3
MM_PPM = 5_000
OUTBOX_FIELDS = ("seq", "position_id", "owner", "side", "entry_ticks", "qty_steps",
                 "margin_micros", "leverage", "liq_ticks", "tp_ticks", "sl_ticks",
                 "opened_ts_us", "exit_ticks", "pnl_micros", "payout_micros", "house_micros",
                 "insurance_micros", "reason", "closed_ts_us")


def checkpoint(journal: Journal, snapshot_dir: Path, arrays: dict[str, np.ndarray],
               meta: dict[str, Any]) -> Path:
    """The recipe of a checkpoint (cluster.durability.store.JournalStore does the same): commit
    first (a snapshot must never hold a change whose record could still be lost), snapshot at
    that seq, keep the newest snapshots, drop the journal segments none of them needs."""
    seq = journal.commit()
    path = write_snapshot(snapshot_dir, seq, arrays, meta)
    prune_snapshots(snapshot_dir)
    trim_journal(journal, snapshot_dir)
    return path


# ----------------------------------------------------------------------------- shard state
@dataclass
class ShardState:
    book: PositionBook = field(default_factory=lambda: PositionBook(ASSET, BOOK_TAG, 4))
    settlement_seq: int = 0
    outbox: list[tuple[int, ...]] = field(default_factory=list)
    last_tick: tuple[int, int, int] | None = None
    fenced: set[int] = field(default_factory=set)

    @staticmethod
    def restore(snapshot: Snapshot | None) -> ShardState:
        if snapshot is None:
            return ShardState()
        arrays, meta = snapshot.arrays, snapshot.meta
        book = PositionBook.from_arrays(ASSET, BOOK_TAG,
                                        {k: v for k, v in arrays.items() if k != "outbox"})
        outbox = [tuple(int(x) for x in row) for row in arrays["outbox"].tolist()]
        tick = meta["last_tick"]
        return ShardState(book, meta["settlement_seq"], outbox,
                          None if tick is None else (tick[0], tick[1], tick[2]),
                          set(meta["fenced"]))

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = self.book.to_arrays()
        arrays["outbox"] = np.array(self.outbox, dtype=np.int64).reshape(-1, len(OUTBOX_FIELDS))
        meta = {"settlement_seq": self.settlement_seq, "fenced": sorted(self.fenced),
                "last_tick": None if self.last_tick is None else list(self.last_tick)}
        return arrays, meta

    def apply(self, event: Event) -> None:
        """What a shard does with each of its journaled events (live and in replay)."""
        if isinstance(event, PositionOpened):
            plan = OpenPlan(Side(event.side), event.entry_ticks, event.qty_steps,
                            event.margin_micros, event.leverage, event.liq_ticks, event.tp_ticks,
                            event.sl_ticks, 0, event.maintenance_margin_ppm)
            position_id = self.book.open(event.owner, plan, event.opened_ts_us)
            assert position_id == event.position_id, "replay must issue the same ids"
        elif isinstance(event, PositionClosed):
            record = self.book.close(event.position_id)
            assert record is not None and event.settlement_seq == self.settlement_seq + 1
            s = settle(ASSET, record.side, record.entry_ticks, record.qty_steps,
                       record.margin_micros, event.exit_ticks, CloseReason(event.reason))
            self.settlement_seq = event.settlement_seq
            self.outbox.append((event.settlement_seq, record.position_id, record.owner,
                                int(record.side), record.entry_ticks, record.qty_steps,
                                record.margin_micros, record.leverage, record.liq_ticks,
                                record.tp_ticks, record.sl_ticks, record.opened_ts_us,
                                event.exit_ticks, s.pnl_micros, s.payout_micros, s.house_micros,
                                s.insurance_micros, event.reason, event.ts_us))
        elif isinstance(event, TickApplied):
            self.last_tick = (event.bid_ticks, event.ask_ticks, event.ts_us)
        elif isinstance(event, OpenFenced):
            self.fenced.add(event.request_id)
        else:
            raise AssertionError(f"not a shard event: {event!r}")


# ----------------------------------------------------------------------------- ledger state
@dataclass
class LedgerState:
    ledger: Ledger = field(default_factory=Ledger)
    applied: dict[str, int] = field(default_factory=dict)
    accounts: dict[int, tuple[str, str]] = field(default_factory=dict)
    answers: dict[tuple[int, str, str], bytes] = field(default_factory=dict)
    history: list[tuple[int, ...]] = field(default_factory=list)

    @staticmethod
    def restore(snapshot: Snapshot | None) -> LedgerState:
        if snapshot is None:
            return LedgerState()
        m = snapshot.meta
        return LedgerState(
            Ledger.from_state(m["ledger"]), dict(m["applied"]),
            {int(u): (a, k) for u, (a, k) in m["accounts"].items()},
            {(u, kind, c): bytes.fromhex(r) for u, kind, c, r in m["answers"]},
            [tuple(int(x) for x in row) for row in snapshot.arrays["history"].tolist()])

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        meta = {"ledger": self.ledger.to_state(), "applied": self.applied,
                "accounts": {str(u): list(v) for u, v in self.accounts.items()},
                "answers": [[u, k, c, r.hex()] for (u, k, c), r in self.answers.items()]}
        history = np.array(self.history, dtype=np.int64).reshape(-1, len(OUTBOX_FIELDS))
        return {"history": history}, meta

    def apply(self, event: Event) -> None:
        """What the ledger does with each of its journaled events (live and in replay)."""
        if isinstance(event, AccountCreated):
            self.ledger.open_user(event.user, event.deposit_micros)
            self.accounts[event.user] = (event.account_id, event.key_hash)
        elif isinstance(event, MarginLocked):
            assert self.ledger.lock_margin(event.user, event.amount_micros) is None
        elif isinstance(event, MarginReleased):
            self.ledger.release_margin(event.user, event.amount_micros)
        elif isinstance(event, SettlementApplied):
            assert event.seq == self.applied.get(event.shard, 0) + 1, "exactly once, in order"
            self.ledger.settle(event.owner, event.margin_micros,
                               Settlement(event.pnl_micros, event.payout_micros,
                                          event.house_micros, event.insurance_micros))
            self.applied[event.shard] = event.seq
            self.history.append((event.seq, event.position_id, event.owner, event.side,
                                 event.entry_ticks, event.qty_steps, event.margin_micros,
                                 event.leverage, event.liq_ticks, event.tp_ticks, event.sl_ticks,
                                 event.opened_ts_us, event.exit_ticks, event.pnl_micros,
                                 event.payout_micros, event.house_micros,
                                 event.insurance_micros, event.reason, event.closed_ts_us))
        elif isinstance(event, ClientOrderStored):
            self.answers.setdefault((event.user, event.kind, event.client_order_id),
                                    event.response)
        else:
            raise AssertionError(f"not a ledger event: {event!r}")


def assert_same_shard(a: ShardState, b: ShardState, ledger_applied: int) -> None:
    arrays_a, arrays_b = a.book.to_arrays(), b.book.to_arrays()
    assert arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:
        assert arrays_a[name].dtype == arrays_b[name].dtype, name
        assert np.array_equal(arrays_a[name], arrays_b[name]), name
    assert len(a.book) == len(b.book) and b.book.check() == []
    assert a.book.open_margin_by_owner() == b.book.open_margin_by_owner()
    assert (a.settlement_seq, a.last_tick, a.fenced) == (b.settlement_seq, b.last_tick, b.fenced)
    # acknowledgements are not journaled: a recovered outbox may hold settlements the ledger
    # already applied, which it ignores by seq; what is still owed must be identical
    assert [x for x in a.outbox if x[0] > ledger_applied] == \
        [x for x in b.outbox if x[0] > ledger_applied]


def assert_same_ledger(a: LedgerState, b: LedgerState) -> None:
    assert a.ledger.accounts() == b.ledger.accounts()
    assert (a.applied, a.accounts, a.answers, a.history) == \
        (b.applied, b.accounts, b.answers, b.history)


# ----------------------------------------------------------------------------- the driver
class Platform:
    """One shard and the ledger with their journals, snapshots and never-truncated twins."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.shard = ShardState()
        self.ledger = LedgerState()
        self.users: list[int] = []
        self.request_id = 0
        self.now_us = 1_700_000_000_000_000
        self._open_journals()
        self.crashes = 0
        self.checkpoints = 0

    def _open_journals(self) -> None:
        # small segments, so checkpoints really delete files
        self.shard_journal = Journal(self.root / "shard" / "journal", fsync=False,
                                     segment_bytes=512)
        self.ledger_journal = Journal(self.root / "ledger" / "journal", fsync=False,
                                      segment_bytes=512)
        self.shard_twin = Journal(self.root / "twin-shard", fsync=False)
        self.ledger_twin = Journal(self.root / "twin-ledger", fsync=False)

    def _close_journals(self) -> None:
        for j in (self.shard_journal, self.ledger_journal, self.shard_twin, self.ledger_twin):
            j.close()

    # every change goes through here: apply live, journal, (commit at the end of the command)
    def shard_event(self, event: Event) -> None:
        self.shard.apply(event)
        self._journal_shard(event)

    def _journal_shard(self, event: Event) -> None:
        payload = encode(event)
        self.shard_journal.append(payload)
        self.shard_twin.append(payload)

    def ledger_event(self, event: Event) -> None:
        self.ledger.apply(event)
        payload = encode(event)
        self.ledger_journal.append(payload)
        self.ledger_twin.append(payload)

    def commit(self) -> None:
        for j in (self.shard_journal, self.ledger_journal, self.shard_twin, self.ledger_twin):
            j.commit()
        assert self.shard_journal.durable_seq == self.shard_twin.durable_seq
        assert self.ledger_journal.durable_seq == self.ledger_twin.durable_seq

    # --- commands -------------------------------------------------------------------------
    def run(self, command: tuple[Any, ...]) -> None:
        self.now_us += 1_000
        getattr(self, "do_" + command[0])(*command[1:])
        self.commit()

    def do_signup(self, deposit_usd: int) -> None:
        user = len(self.users) + 1
        self.users.append(user)
        self.ledger_event(AccountCreated(user, deposit_usd * 10**6, f"acc_{user:024x}",
                                         f"{user * 7919:064x}"))

    def do_tick(self, move: int, spread: int) -> None:
        bid = max(100, (self.shard.last_tick or (10_000, 0, 0))[0] + move)
        ask = bid + spread
        self.shard_event(TickApplied(bid, ask, self.now_us))
        ids, reasons = self.shard.book.sweep(bid, ask)
        for position_id, reason in zip(ids.tolist(), reasons.tolist(), strict=True):
            record = self.shard.book.get(position_id)
            assert record is not None
            self.shard_event(PositionClosed(position_id, reason,
                                            exit_price_ticks(record.side, bid, ask),
                                            self.now_us, self.shard.settlement_seq + 1))

    def do_open(self, who: int, side: Side, margin_pct: int, leverage: int,
                tp_off: int | None, sl_off: int | None, refused: bool) -> None:
        if not self.users or self.shard.last_tick is None:
            return
        user = self.users[who % len(self.users)]
        margin = self.ledger.ledger.free_micros(user) * margin_pct // 100
        bid, ask, _ = self.shard.last_tick
        entry = ask if side == Side.LONG else bid
        sign = 1 if side == Side.LONG else -1
        tp = None if tp_off is None else entry + sign * tp_off
        sl = None if sl_off is None else entry - sign * sl_off
        plan = plan_open(ASSET, side, margin, leverage, bid, ask, tp, sl, MM_PPM)
        if not isinstance(plan, OpenPlan):
            return
        self.request_id += 1
        self.ledger_event(MarginLocked(user, margin, self.request_id))
        if refused:  # the shard refused (or the caller gave up): undo the lock, fence the id
            self.shard_event(OpenFenced(self.request_id))
            self.ledger_event(MarginReleased(user, margin, self.request_id))
            return
        # the real actor's order: operate on the book, then journal the result
        position_id = self.shard.book.open(user, plan, self.now_us)
        self._journal_shard(PositionOpened(position_id, user, plan.side, plan.entry_ticks,
                                           plan.qty_steps, plan.margin_micros, plan.leverage,
                                           plan.liq_ticks, plan.tp_ticks, plan.sl_ticks,
                                           self.now_us, plan.maintenance_margin_ppm,
                                           self.request_id))

    def do_close(self, pick: int) -> None:
        ids = self.shard.book.ids()
        if not len(ids) or self.shard.last_tick is None:
            return
        record = self.shard.book.get(int(ids[pick % len(ids)]))
        assert record is not None
        bid, ask, _ = self.shard.last_tick
        self.shard_event(PositionClosed(record.position_id, int(CloseReason.MANUAL),
                                        exit_price_ticks(record.side, bid, ask), self.now_us,
                                        self.shard.settlement_seq + 1))

    def do_deliver(self, count: int) -> None:
        """The shard sends its outbox; the ledger applies what is new; the shard drops acks."""
        applied = self.ledger.applied.get(SHARD, 0)
        for item in [x for x in self.shard.outbox if x[0] > applied][:count]:
            seq, pid, owner, side, *rest = item
            self.ledger_event(SettlementApplied(SHARD, seq, pid, owner, ASSET.name, side, *rest))
        self.commit()  # the ledger acknowledges only what is durable
        applied = self.ledger.applied.get(SHARD, 0)
        self.shard.outbox = [x for x in self.shard.outbox if x[0] > applied]

    def do_client_order(self, who: int, response: bytes) -> None:
        if self.users:
            user = self.users[who % len(self.users)]
            self.ledger_event(ClientOrderStored(user, "open", f"co-{len(response)}", response))

    def do_checkpoint_shard(self) -> None:
        arrays, meta = self.shard.snapshot()
        checkpoint(self.shard_journal, self.root / "shard" / "snapshots", arrays, meta)
        self.checkpoints += 1

    def do_checkpoint_ledger(self) -> None:
        arrays, meta = self.ledger.snapshot()
        checkpoint(self.ledger_journal, self.root / "ledger" / "snapshots", arrays, meta)
        self.checkpoints += 1

    def do_crash(self) -> None:
        """kill -9 of both actors after their last acknowledged batch, then recovery."""
        self._close_journals()
        shard, ledger = self.recover()
        assert_same_ledger(self.ledger, ledger)
        assert_same_shard(self.shard, shard, self.ledger.applied.get(SHARD, 0))
        self.shard, self.ledger = shard, ledger
        self._open_journals()
        self.crashes += 1

    def recover(self) -> tuple[ShardState, LedgerState]:
        with Journal(self.root / "shard" / "journal", fsync=False) as sj:
            shard = recover(sj, load_latest_snapshot(self.root / "shard" / "snapshots"),
                            ShardState.restore, ShardState.apply).state
        with Journal(self.root / "ledger" / "journal", fsync=False) as lj:
            ledger = recover(lj, load_latest_snapshot(self.root / "ledger" / "snapshots"),
                             LedgerState.restore, LedgerState.apply).state
        return shard, ledger

    def full_replay(self) -> tuple[ShardState, LedgerState]:
        with Journal(self.root / "twin-shard", readonly=True) as sj, \
                Journal(self.root / "twin-ledger", readonly=True) as lj:
            shard = recover(sj, load_latest_snapshot(self.root / "no-snapshots"),
                            ShardState.restore, ShardState.apply)
            ledger = recover(lj, load_latest_snapshot(self.root / "no-snapshots"),
                             LedgerState.restore, LedgerState.apply)
        assert shard.snapshot_seq == ledger.snapshot_seq == 0
        return shard.state, ledger.state


opens = st.tuples(st.just("open"), st.integers(0, 50), st.sampled_from(Side),
                  st.integers(1, 40), st.sampled_from([1, 5, 20, 50, 100]),
                  st.none() | st.integers(1, 800), st.none() | st.integers(1, 60),
                  st.integers(0, 4).map(lambda x: x == 0))
ticks = st.tuples(st.just("tick"), st.integers(-250, 250), st.integers(1, 5))
# Repeating a strategy in one_of weights it: mostly opens and ticks, so books fill and close.
commands = st.one_of(
    opens, opens, opens, ticks, ticks,
    st.tuples(st.just("signup"), st.integers(10, 100_000)),
    st.tuples(st.just("close"), st.integers(0, 1000)),
    st.tuples(st.just("deliver"), st.integers(1, 5)),
    st.tuples(st.just("client_order"), st.integers(0, 50), st.binary(max_size=40)),
    st.tuples(st.just("checkpoint_shard")),
    st.tuples(st.just("checkpoint_ledger")),
    st.tuples(st.just("crash")),
)
# Start every run with users and a price, so most drawn opens can happen.
PRELUDE = [("signup", 5_000), ("signup", 50_000), ("tick", 0, 1)]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(commands, min_size=20, max_size=60))
def test_snapshot_plus_tail_equals_full_replay_equals_live(script: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Platform(Path(tmp))
        for command in [*PRELUDE, *script]:
            p.run(command)
        p._close_journals()
        applied = p.ledger.applied.get(SHARD, 0)
        shard, ledger = p.recover()
        full_shard, full_ledger = p.full_replay()
        assert_same_shard(p.shard, shard, applied)
        assert_same_ledger(p.ledger, ledger)
        assert_same_shard(p.shard, full_shard, applied)
        assert_same_ledger(p.ledger, full_ledger)
        # the money invariant holds for the recovered state as for the live one
        in_flight: dict[int, int] = {}
        for item in shard.outbox:
            if item[0] > applied:
                in_flight[item[2]] = in_flight.get(item[2], 0) + item[6]
        margins = shard.book.open_margin_by_owner()
        for owner, margin in in_flight.items():
            margins[owner] = margins.get(owner, 0) + margin
        assert ledger.ledger.audit(margins) == []


def scripted_platform(root: Path) -> Platform:
    p = Platform(root)
    script: list[tuple[Any, ...]] = [*PRELUDE]
    for i in range(30):
        script.append(("open", i, Side(i % 2), 5, 50 + i % 51, None, None, False))
        script.append(("tick", (-1) ** i * (i * 37 % 400), 2))
        if i % 4 == 3:
            script.append(("deliver", 3))
        if i % 10 == 9:
            script.append(("checkpoint_shard",))
            script.append(("checkpoint_ledger",))
    for command in script:
        p.run(command)
    assert p.shard.settlement_seq > 0 and len(p.shard.book) > 0
    return p


def test_corrupt_newest_snapshot_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    p = scripted_platform(tmp_path)
    p._close_journals()
    snaps = list_snapshots(tmp_path / "shard" / "snapshots")
    assert len(snaps) == 2
    newest = snaps[0][1]
    newest.write_bytes(newest.read_bytes()[:-100])
    with Journal(tmp_path / "shard" / "journal", fsync=False) as sj:
        # the journal was kept back to the older snapshot, so its tail is still there
        assert sj.first_seq <= snaps[1][0] + 1
        result = recover(sj, load_latest_snapshot(tmp_path / "shard" / "snapshots"),
                         ShardState.restore, ShardState.apply)
    assert result.snapshot_seq == snaps[1][0]
    assert result.replayed == result.last_seq - snaps[1][0] > 0
    assert_same_shard(p.shard, result.state, p.ledger.applied.get(SHARD, 0))


def test_journal_behind_its_snapshot_moves_forward(tmp_path: Path) -> None:
    p = scripted_platform(tmp_path)
    p.do_checkpoint_ledger()
    p._close_journals()
    seq = list_snapshots(tmp_path / "ledger" / "snapshots")[0][0]
    for segment in (tmp_path / "ledger" / "journal").glob("*.wal"):
        segment.unlink()  # the journal is lost, the snapshot holds everything
    with Journal(tmp_path / "ledger" / "journal", fsync=False) as lj:
        result = recover(lj, load_latest_snapshot(tmp_path / "ledger" / "snapshots"),
                         LedgerState.restore, LedgerState.apply)
        assert (result.snapshot_seq, result.replayed, result.last_seq) == (seq, 0, seq)
        assert lj.append(b"next") == seq + 1  # never reuses a seq the snapshot covers
    assert_same_ledger(p.ledger, result.state)


def test_missing_records_after_the_snapshot_are_an_error(tmp_path: Path) -> None:
    p = scripted_platform(tmp_path)
    p._close_journals()
    snaps = list_snapshots(tmp_path / "shard" / "snapshots")
    for _, path in snaps:
        path.unlink()  # snapshots gone, journal already truncated: records are missing
    with Journal(tmp_path / "shard" / "journal", fsync=False) as sj:
        assert sj.first_seq > 1
        with pytest.raises(RecoveryError):
            recover(sj, load_latest_snapshot(tmp_path / "shard" / "snapshots"),
                    ShardState.restore, ShardState.apply)


def test_fresh_start_without_anything(tmp_path: Path) -> None:
    with Journal(tmp_path / "j") as j:
        result = recover(j, load_latest_snapshot(tmp_path / "snaps"),
                         ShardState.restore, ShardState.apply)
    assert (result.snapshot_seq, result.replayed, result.last_seq) == (0, 0, 0)
    assert len(result.state.book) == 0
    assert not snapshot_path(tmp_path / "snaps", 0).exists()


def test_a_replay_that_ends_early_is_an_error(tmp_path: Path) -> None:
    with Journal(tmp_path / "j", fsync=False) as j:
        for i in range(5):
            j.append(encode(OpenFenced(i)))
        j.commit()
    reader = Journal(tmp_path / "j", readonly=True)
    assert reader.durable_seq == 5
    (segment,) = (tmp_path / "j").glob("*.wal")
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF  # damaged after the reader opened: the last record no longer checks out
    segment.write_bytes(bytes(data))
    with pytest.raises(RecoveryError, match="stopped at 4"):
        recover(reader, load_latest_snapshot(tmp_path / "snaps"),
                ShardState.restore, ShardState.apply)


def test_snapshot_written_off_thread_while_the_actor_keeps_journaling(tmp_path: Path) -> None:
    p = scripted_platform(tmp_path)
    for i in range(10):  # records after the last checkpoint, so this snapshot is a new one
        p.run(("open", i, Side(i % 2), 3, 60, None, None, False))
        p.run(("tick", (-1) ** i * 120, 1))
    journal = p.shard_journal
    seq = journal.commit()
    assert seq > list_snapshots(tmp_path / "shard" / "snapshots")[0][0]
    arrays, meta = p.shard.snapshot()  # a copy: the live state may move on
    snaps = tmp_path / "shard" / "snapshots"

    def write() -> None:
        write_snapshot(snaps, seq, arrays, meta)
        prune_snapshots(snaps)

    worker = threading.Thread(target=write)
    worker.start()
    for i in range(20):  # the actor goes on serving while the snapshot is written
        p.run(("open", i, Side(i % 2), 3, 50 + i, None, None, False))
        p.run(("tick", (-1) ** i * 150, 1))
    worker.join()
    assert trim_journal(journal, snaps) > 0  # the segments only the pruned snapshot needed
    assert journal.first_seq <= min(s for s, _ in list_snapshots(snaps)) + 1
    p._close_journals()
    shard, ledger = p.recover()
    assert shard.settlement_seq >= 1 and list_snapshots(snaps)[0][0] == seq
    assert_same_shard(p.shard, shard, p.ledger.applied.get(SHARD, 0))
    assert_same_ledger(p.ledger, ledger)
