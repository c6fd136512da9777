"""The ledger and two shards, each on a durable Runner, driven the way the service drives them:
accounts, margin locks, opens, closes, ticks that take profits, stop losses and liquidate,
pending limit and stop orders placed (margin locked first, like an open) and cancelled (settled
through the courier, like a close) and ended by ticks (filled, expired, or rejected when the
position cannot open at the fill price), open positions changed one by one and in batches
(margin added is locked first, like an open; a TP/SL set, replaced or removed and margin
removed go to the shard first, like a close, the removed margin then released at the ledger
once per request id), settlements delivered shard -> ledger (Outbox -> ApplySettlements ->
AckOutbox), retries with the same request id or the same clientOrderId, answers lost and
settled by the reconciler's rules, and crashes anywhere (a crash reopens a runner from its
directory, dropping its memory).

After every step the invariants hold: each machine's ``check()``, the ledger's sum 0, its audit
against the shards' open margins (positions and orders) and outboxes, its count of each
account's opens (positions, orders, unapplied closes and unapplied ends of orders that did not
fill: the SPEC limit, small in some runs) and of its open orders (orders and unapplied ended
orders: the other SPEC limit, small in some runs) against the shards' books and outboxes, and
each runner's state equals its journal replayed (a machine fed each record the runner
journaled, but for the volatile events not committed yet). After every crash the recovered
state is the live one (but for those volatile events), and equals a full replay of the journal.
At the end every journal, replayed into a fresh machine, gives the live state field by field: a
twin of each journal keeps every record its runner wrote (the journal itself drops the ones a
snapshot covers, and must hold exactly the twin's tail).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from cluster.durability.runner import Runner
from cluster.durability.snapshot import Snapshot
from engine.account_events import POSITION_UPDATED
from engine.book import PositionRecord
from engine.ledger_machine import DEFAULT_MAX_OPEN_ORDERS
from engine.ledger_machine import DEFAULT_MAX_OPEN_POSITIONS
from engine.ledger_machine import AbandonLock
from engine.ledger_machine import AppliedSeq
from engine.ledger_machine import ApplySettlements
from engine.ledger_machine import Audit
from engine.ledger_machine import Balances
from engine.ledger_machine import Begin
from engine.ledger_machine import CreateAccount
from engine.ledger_machine import CreatedAccount
from engine.ledger_machine import ExpectRelease
from engine.ledger_machine import Forget
from engine.ledger_machine import History
from engine.ledger_machine import LedgerMachine
from engine.ledger_machine import LockMargin
from engine.ledger_machine import Note
from engine.ledger_machine import OpenCount
from engine.ledger_machine import OrderCount
from engine.ledger_machine import OrderHistory
from engine.ledger_machine import PendingRequests
from engine.ledger_machine import ReconcileAtStart
from engine.ledger_machine import ReleaseMargin
from engine.ledger_machine import Remember
from engine.ledger_machine import Totals
from engine.market import Tick
from engine.messages import ClosedPosition
from engine.messages import EndedOrder
from engine.messages import IdemHit
from engine.messages import IdemKey
from engine.messages import MarginLock
from engine.messages import OpenPosition
from engine.messages import PendingOrder
from engine.messages import SettlementItem
from engine.messages import ShardClose
from engine.messages import ShardOpen
from engine.order_book import OrderKind
from engine.order_book import OrderStatus
from engine.order_book import OrderTerms
from engine.orders import Side
from engine.results import Code
from engine.results import Rejected
from engine.shard_machine import MIN_VECTOR_RUN
from engine.shard_machine import AckOutbox
from engine.shard_machine import ApplyTick
from engine.shard_machine import AuditView
from engine.shard_machine import Cancel
from engine.shard_machine import ChangeMargin
from engine.shard_machine import Close
from engine.shard_machine import Open
from engine.shard_machine import OrdersOf
from engine.shard_machine import Outbox
from engine.shard_machine import Place
from engine.shard_machine import PositionsOf
from engine.shard_machine import Resolve
from engine.shard_machine import ResumeSeq
from engine.shard_machine import SetLevels
from engine.shard_machine import Stats
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from tests.unit.durability.hosted import MAX_AGE_US
from tests.unit.durability.hosted import SIGNUP
from tests.unit.durability.hosted import SOL
from tests.unit.durability.hosted import USD
from tests.unit.durability.hosted import VOLATILE_FIELDS
from tests.unit.durability.hosted import Clock
from tests.unit.durability.hosted import account
from tests.unit.durability.hosted import assert_same
from tests.unit.durability.hosted import crash
from tests.unit.durability.hosted import journal_tail
from tests.unit.durability.hosted import one
from tests.unit.durability.hosted import open_shard
from tests.unit.durability.hosted import replay
from tests.unit.durability.hosted import shard_builder

LEDGER = "ledger"
SHARDS = {"shard-SOL-0": 3, "shard-SOL-1": 4}
NAMES = list(SHARDS)
MM_PPM = 5_000
KEYS = 3  # clientOrderIds per user and kind: reuse (a retry) is frequent
STEP_US = 1_000  # the clock's advance per step
FENCED = Rejected(Code.PRICE_UNAVAILABLE, "the request was abandoned after a timeout")
# Orders triggered near the price, so that ticks fill limit and stop orders of both sides; at
# a high leverage a wide spread makes the fill WOULD_LIQUIDATE; a TP/SL offset from the trigger
# that is negative, small (a stop filled through a gap) or past the liquidation price makes it
# INVALID_TRIGGER; an expiry a few steps ahead expires (0 steps: now, the shard refuses it).
OFFSETS = (-400, -150, -60, -20, -5, 0, 5, 20, 60, 150, 400)  # trigger - bid
LEVERAGES = (1, 5, 20, 50, 100, 100)
LEVELS = (None, None, None, -40, 10, 60, 200)  # TP/SL from the trigger, to the profit side
EXPIRIES = (None, None, 0, 2, 4, 8)  # steps ahead
# A TP/SL change sets a level (or removes it: OFF) this far from the current closing-side
# price, to the position's profit side for a TP and its loss side for an SL: an offset of 0
# or less is on the wrong side, a wide SL one past a leveraged position's liquidation price
# (INVALID_TRIGGER).
OFF = "off"
MOVES: tuple[int | str, ...] = (OFF, -40, 0, 10, 60, 300, 1_500, 4_000)
Moves = tuple[int | str | None, int | str | None]  # (TP, SL)
# The leverage (notional / margin) a removal leaves: a low one passes (a position above it
# already gives up 1 micro); a high one leaves the notional above margin x max leverage (100)
# or the margin not above the maintenance margin (at 200), or else, when the price moved
# against the position, makes it liquidatable at the current price, or leaves its SL not
# beyond the liquidation price (INVALID_REQUEST).
REMOVALS_TO_LEVERAGE = (2, 10, 40, 70, 85, 95, 120, 150, 400)
TOP_UPS_USD = (1, 20, 300, 4_000, 50_000)  # the last is more than any free balance
# what a shard may refuse of each request that ends or changes something here: a close, only
# at a stale price; a cancel, only an order that ended already
REFUSALS: dict[type, tuple[Code, ...]] = {
    Close: (Code.PRICE_UNAVAILABLE,), Cancel: (Code.ORDER_NOT_OPEN,),
    SetLevels: (Code.INVALID_TRIGGER, Code.NOT_FOUND, Code.PRICE_UNAVAILABLE),
    ChangeMargin: (Code.INVALID_REQUEST, Code.NOT_FOUND, Code.PRICE_UNAVAILABLE)}
Read = type[PositionsOf] | type[OrdersOf]
Ending = Close | Cancel | SetLevels | ChangeMargin


class Platform:
    """The three runners in ``root`` and what the clients were answered."""

    def __init__(self, root: Path, cap: int = DEFAULT_MAX_OPEN_POSITIONS,
                 max_orders: int = DEFAULT_MAX_OPEN_ORDERS) -> None:
        self.root = root
        self.clock = Clock()
        self.twins: dict[str, list[bytes]] = {LEDGER: [], **{name: [] for name in SHARDS}}

        def build_ledger(snapshot: Snapshot | None) -> LedgerMachine:
            return LedgerMachine.restore(SIGNUP, snapshot, cap, max_orders)

        self.builds: dict[str, Callable[[Snapshot | None], Any]] = {
            LEDGER: build_ledger,
            **{name: shard_builder(name, tag, MM_PPM) for name, tag in SHARDS.items()}}
        self.runners: dict[str, Runner[Any]] = {name: self.open(name) for name in self.builds}
        # per runner, a fresh machine fed every record of its twin so far, in order
        self.shadows: dict[str, Any] = {name: build(None) for name, build in self.builds.items()}
        self.shadowed = dict.fromkeys(self.builds, 0)  # how many records each one was fed
        self.users: list[int] = []
        self.rid = 0
        self.tick_seq = 0
        self.bid = 10_000
        self.last_tick: Tick | None = None
        self.answered: dict[IdemKey, object] = {}  # the stored first answer of each key
        # (shard, request, first answer) of what a shard made of a request a lock pays for (a
        # position, an order, a position's margin added) and of one that ends something (a
        # close, a cancel)
        self.opens: list[tuple[str, Open | Place | ChangeMargin,
                               OpenPosition | PendingOrder]] = []
        self.closes: list[tuple[str, Close | Cancel, SettlementItem]] = []
        # (shard, request, first answer, clientOrderId, (user, micros) released) of the TP/SL
        # changes and margin removals that happened and were settled at the ledger
        self.changes: list[tuple[str, SetLevels | ChangeMargin, OpenPosition, IdemKey | None,
                                 tuple[int, int] | None]] = []
        self.in_flight: dict[int, IdemKey] = {}  # request id -> key, of requests cut off
        self.crashes = 0
        self.cap = cap
        self.max_orders = max_orders

    # ----------------------------------------------------------------- plumbing
    def open(self, name: str) -> Runner[Any]:
        runner: Runner[Any]
        if name == LEDGER:
            runner = Runner.open(self.root / name, self.builds[name], self.clock, fsync=False,
                                 background_snapshots=False, snapshot_every_events=7)
        else:
            runner = open_shard(self.root / name, self.clock, self.builds[name],
                                snapshot_every_events=5)
        assert runner.store is not None
        journal = runner.store.journal
        append, twin = journal.append, self.twins[name]

        def tapped(payload: bytes) -> int:  # the store appends a record only to commit it
            twin.append(bytes(payload))
            return append(payload)

        journal.append = tapped  # type: ignore[method-assign]
        return runner

    def replayed(self, name: str) -> dict[str, Any]:
        """The fingerprint of a fresh machine that replayed everything ``name`` journaled;
        the journal on disk holds exactly the newest records of it."""
        twin = self.twins[name]
        tail = journal_tail(self.root / name)
        assert [payload for _, payload in tail] == twin[len(twin) - len(tail):]
        assert not tail or tail[-1][0] == len(twin)
        fingerprint: dict[str, Any] = replay(twin, self.builds[name]).fingerprint()
        return fingerprint

    def ask(self, name: str, command: Any) -> Any:
        return one(self.runners[name], command)

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def check(self) -> None:
        """The invariants, after every step."""
        assert self.runners[LEDGER].machine.check() == []
        assert self.ask(LEDGER, Totals())["sum_micros"] == 0
        for name in NAMES:
            assert self.runners[name].machine.check() == []
        margins, unsettled, slots, open_orders = self.views()
        # the counts the shards' AuditView gives are those of their listings
        assert (slots, open_orders) == (self.counts(PositionsOf, self.counts(OrdersOf)),
                                        self.counts(OrdersOf))
        assert self.ask(LEDGER, Audit(margins, unsettled, slots, open_orders)) == []
        # an account holds a slot of its open-position limit for each open position and order
        # and each close or end of an unfilled order the ledger has not applied (a fill's slot
        # is its position's now), and one of its order limit for each open order and each
        # ended order the ledger has not applied
        orders = self.counts(OrdersOf)
        opens = self.counts(PositionsOf, orders)
        for name, outbox in unsettled.items():
            applied = self.ask(LEDGER, AppliedSeq(name))
            for item in outbox:
                if item.seq <= applied:
                    continue
                owner = item.closed.owner
                if isinstance(item.closed, ClosedPosition) and item.closed.partial:
                    continue  # the rest stays open: its slot is counted with the positions
                if isinstance(item.closed, EndedOrder):
                    orders[owner] = orders.get(owner, 0) + 1
                    if item.closed.status == OrderStatus.FILLED:
                        continue
                opens[owner] = opens.get(owner, 0) + 1
        reads = [read(user) for user in self.users for read in (OpenCount, OrderCount)]
        assert self.runners[LEDGER].execute(reads) == [
            counts.get(user, 0) for user in self.users for counts in (opens, orders)]
        for name in self.runners:
            self.replays_to_live(name)

    def views(self) -> tuple[dict[int, int], dict[str, list[SettlementItem]], dict[int, int],
                             dict[int, int]]:
        """The shards' ``AuditView``s merged: per user summed over the shards, open margins
        (positions and orders), open positions plus open orders, open orders; and each
        shard's outbox (second)."""
        margins: dict[int, int] = {}
        unsettled: dict[str, list[SettlementItem]] = {}
        slots: dict[int, int] = {}
        orders: dict[int, int] = {}
        for name in NAMES:
            view = self.ask(name, AuditView())
            unsettled[name] = view.outbox
            for total, part in ((margins, view.margins), (slots, view.positions),
                                (slots, view.orders), (orders, view.orders)):
                for user, n in part.items():
                    total[user] = total.get(user, 0) + n
        return margins, unsettled, slots, orders

    def counts(self, read: Read, add: dict[int, int] | None = None) -> dict[int, int]:
        """Open positions (``read=PositionsOf``) or orders (``OrdersOf``) per user on all
        shards, as the reconciler counts them, plus the counts ``add``."""
        counts = dict(add or {})
        for name in NAMES:
            for user, held in zip(self.users, self.ask(name, read(tuple(self.users))),
                                  strict=True):
                if held:
                    counts[user] = counts.get(user, 0) + len(held)
        return counts

    def replays_to_live(self, name: str) -> None:
        """``name``'s shadow, fed the records journaled since, holds the live state but for
        the volatile events not committed yet (checked when there are new records: a change
        journaled nowhere would still differ then)."""
        shadow, twin = self.shadows[name], self.twins[name]
        if self.shadowed[name] == len(twin):
            return
        for payload in twin[self.shadowed[name]:]:
            shadow.apply_batch(shadow.decode_record(payload))
        self.shadowed[name] = len(twin)
        runner = self.runners[name]
        assert runner.store is not None
        assert_same(shadow.fingerprint(), runner.machine.fingerprint(),
                    skip=VOLATILE_FIELDS if runner.store.pending else ())

    def crash(self, names: list[str]) -> None:
        """Kill and reopen: the recovered state is the live one but for uncommitted volatile
        events, and a full replay of the journal (no snapshot) agrees."""
        for name in names:
            runner = self.runners[name]
            assert runner.store is not None
            live, pending = runner.machine.fingerprint(), runner.store.pending
            crash(runner)
            again = self.runners[name] = self.open(name)
            got = again.machine.fingerprint()
            assert_same(got, live, skip=VOLATILE_FIELDS if pending else ())
            assert_same(self.replayed(name), got)
            if name != LEDGER and self.last_tick is not None:
                self.ask(name, ApplyTick(self.last_tick))  # the feed sends the newest again
        self.crashes += 1

    def answer_is_stored(self, key: IdemKey, answer: object) -> None:
        assert key not in self.answered
        self.answered[key] = answer

    def seen_before(self, key: IdemKey, hit: object) -> None:
        """A clientOrderId used again gets its first answer."""
        assert isinstance(hit, IdemHit) and key in self.answered, hit
        assert hit.answer == self.answered[key]

    # ----------------------------------------------------------------- the courier
    def deliver(self, name: str,
                answer: tuple[IdemKey, ClosedPosition | EndedOrder] | None = None,
                skip: int = 0, reverse: bool = False, lose_ack: bool = False) -> None:
        """Send the outbox (``skip``: leave out its first items, a gap unless applied), store
        ``answer`` with it, acknowledge what the ledger applied."""
        view = self.ask(name, Outbox())
        items, last_seq = view.items, view.last_seq
        sent = items[skip:][::-1] if reverse else items[skip:]
        applied = self.ask(LEDGER, ApplySettlements(name, tuple(sent),
                                                    () if answer is None else (answer,)))
        assert isinstance(applied, int) and applied <= last_seq
        if answer is not None and answer[0] not in self.answered:
            self.answer_is_stored(*answer)
        if not skip and not reverse:
            assert applied == last_seq  # the whole outbox, in order: all of it applies
        if lose_ack:
            self.crash([name])
            return
        if last_seq < applied:
            self.ask(name, ResumeSeq(applied))
        if sent:
            assert self.ask(name, AckOutbox(applied)) == last_seq - applied

    # ----------------------------------------------------------------- the reconciler
    def restart_platform(self, released: dict[int, int] | None = None) -> None:
        """Every runner crashes; at start: deliver every outbox, resolve the pending
        clientOrderIds against every shard, release the margin nothing backs, count each
        account's opens (positions and orders: an order holds a position's slot) and orders
        again."""
        self.crash([LEDGER, *NAMES])
        for name in NAMES:
            self.deliver(name)
        pending = self.ask(LEDGER, PendingRequests(0))
        assert sorted(pending) == sorted(self.in_flight)
        opened: dict[int, Any] = {}
        for name in NAMES:
            for rid, result in zip(pending, self.runners[name].execute(
                    [Resolve(r) for r in pending]), strict=True):
                if isinstance(result, OpenPosition | PendingOrder):
                    opened[rid] = result
                elif isinstance(result, SettlementItem):
                    opened[rid] = result.closed
        margins, unsettled, slots, orders = self.views()  # as the reconciler's start reads them
        assert self.ask(LEDGER, ReconcileAtStart(margins, unsettled, opened, slots,
                                                 orders)) == (released or {})
        for rid, key in self.in_flight.items():
            if rid in opened:
                self.answer_is_stored(key, opened[rid])
        self.in_flight.clear()

    # ----------------------------------------------------------------- operations
    def do_account(self) -> None:
        n = len(self.users) + 1
        created = self.ask(LEDGER, CreateAccount(*account(n)))
        assert isinstance(created, CreatedAccount) and created.user == n
        self.users.append(created.user)

    def do_tick(self, move: int, spread: int, deliver: bool) -> None:
        self.bid = min(max(5_000, self.bid + move), 20_000)
        self.tick_seq += 1
        tick = Tick("SOL", self.bid, self.bid + spread, self.clock.now_us, self.tick_seq, "sim")
        self.last_tick = tick
        for name in NAMES:
            assert isinstance(self.ask(name, ApplyTick(tick)), int)
            if deliver:
                self.deliver(name)

    def do_open(self, who: int, where: int, side: Side, margin_usd: int, leverage: int,
                tp_off: int | None, sl_off: int | None, k: int | None, stage: str) -> None:
        user = self.users[who % len(self.users)]
        key = None if k is None else IdemKey(user, "open", f"o{k}")
        rid = self.next_rid()
        sign = 1 if side == Side.LONG else -1
        entry = self.bid + 1 if side == Side.LONG else self.bid
        tp = None if tp_off is None else entry + sign * tp_off
        sl = None if sl_off is None else entry - sign * sl_off
        margin = margin_usd * USD
        request = Open(ShardOpen(rid, user, side, margin, leverage, tp, sl, None, 100))
        self.lock_and_send(NAMES[where], MarginLock(user, margin, key, rid), request, stage)

    def do_place(self, who: int, where: int, side: Side, kind: OrderKind, offset: int,
                 margin_usd: int, leverage: int, tp_off: int | None, sl_off: int | None,
                 expiry_steps: int | None, k: int | None, stage: str) -> None:
        user = self.users[who % len(self.users)]
        key = None if k is None else IdemKey(user, "order", f"p{k}")
        rid = self.next_rid()
        terms = self.order_terms(side, kind, offset, margin_usd, leverage, tp_off, sl_off,
                                 expiry_steps)
        self.lock_and_send(NAMES[where], MarginLock(user, terms.margin_micros, key, rid,
                                                    order=True), Place(user, terms, rid), stage)

    def order_terms(self, side: Side, kind: OrderKind, offset: int, margin_usd: int,
                    leverage: int, tp_off: int | None, sl_off: int | None,
                    expiry_steps: int | None) -> OrderTerms:
        """An order triggered ``offset`` from the bid, its TP/SL ``tp_off``/``sl_off`` from
        the trigger (a negative one on the wrong side), expiring ``expiry_steps`` steps from
        now (0: now, which the shard refuses)."""
        sign = 1 if side == Side.LONG else -1
        trigger = self.bid + offset
        tp = 0 if tp_off is None else trigger + sign * tp_off
        sl = 0 if sl_off is None else trigger - sign * sl_off
        expires = 0 if expiry_steps is None else self.clock.now_us + expiry_steps * STEP_US
        return OrderTerms(side, kind, trigger, margin_usd * USD, leverage, tp, sl, expires)

    def lock_and_send(self, name: str, lock: MarginLock, request: Open | Place | ChangeMargin,
                      stage: str) -> None:
        """Lock the margin, then send the open, placement or top-up (``lock.top_up``) to shard
        ``name``, as the service does; ``stage`` says where it is cut off."""
        user, margin, key, rid = lock.user, lock.margin_micros, lock.idem_key, lock.request_id
        made = PendingOrder if lock.order else OpenPosition
        locked = self.ask(LEDGER, LockMargin(lock))
        if isinstance(locked, IdemHit):
            assert key is not None
            self.seen_before(key, locked)
            return
        if stage == "lock_lost":  # the answer never came: the service abandons the lock
            abandoned = self.ask(LEDGER, AbandonLock(rid))
            assert abandoned == ((rid, user, margin) if locked is None else None)
        if isinstance(locked, Rejected):
            assert locked.code in (Code.INSUFFICIENT_BALANCE,
                                   *(() if lock.top_up else (Code.TOO_MANY_POSITIONS,)),
                                   *((Code.TOO_MANY_ORDERS,) if lock.order else ()))
            if locked.code is Code.TOO_MANY_POSITIONS:
                assert self.ask(LEDGER, OpenCount(user)) >= self.cap
            if locked.code is Code.TOO_MANY_ORDERS:
                assert self.ask(LEDGER, OrderCount(user)) >= self.max_orders
            if key is not None:
                self.answer_is_stored(key, locked)
            return
        assert locked is None
        if stage == "lock_lost":
            return
        if stage == "died_after_lock":  # the API process died: the next start settles it
            if key is not None:
                self.in_flight[rid] = key
            self.restart_platform({user: margin})
            return
        result = self.ask(name, request)
        assert isinstance(result, made | Rejected)
        if isinstance(result, made):
            self.opens.append((name, request, result))
        elif lock.top_up:  # the position is gone, or the price stale
            assert isinstance(result, Rejected)
            assert result.code in (Code.NOT_FOUND, Code.PRICE_UNAVAILABLE)
        if stage == "died_after_send":
            if key is not None:
                self.in_flight[rid] = key
            self.restart_platform({} if isinstance(result, made) else {user: margin})
            return
        if stage == "lost":  # in doubt: the shard says what became of it (and fences it)
            resolved = self.ask(name, Resolve(rid))
            if isinstance(result, made):
                assert resolved == result
                if key is not None:
                    assert self.ask(LEDGER, Remember(key, result)) is None
                    self.answer_is_stored(key, result)
            else:  # a refusal is not remembered: the request is fenced, its lock abandoned
                assert resolved is None
                assert self.ask(LEDGER, AbandonLock(rid)) == (rid, user, margin)
                assert self.ask(name, request) == FENCED
            return
        if isinstance(result, made):
            if key is not None:
                assert self.ask(LEDGER, Remember(key, result)) is None
                self.answer_is_stored(key, result)
            return
        transient = result.code is Code.PRICE_UNAVAILABLE
        stored = None if key is None or transient else (key, result)
        assert self.ask(LEDGER, ReleaseMargin(user, margin, rid, stored,
                                              counted=not lock.top_up)) is None
        if stored is not None:
            self.answer_is_stored(*stored)
        elif key is not None:
            assert self.ask(LEDGER, Forget(key)) is None

    def do_bulk(self, where: int, count: int, seed: int) -> None:
        """One batch of opens per runner (a micro-batch): long runs replay vectorised."""
        rng = np.random.default_rng(seed)
        requests = [ShardOpen(self.next_rid(), self.users[int(rng.integers(len(self.users)))],
                              Side(int(rng.integers(2))), int(rng.integers(1, 6)) * USD,
                              int(rng.integers(1, 60)), None, None, None, 100)
                    for _ in range(count)]
        self.send_batch(NAMES[where], [
            (MarginLock(r.owner, r.margin_micros, None, r.request_id), Open(r))
            for r in requests])

    def do_orders(self, where: int, count: int, seed: int) -> None:
        """One batch of placements (a micro-batch), their terms drawn from a ``place``'s
        choices: many orders for the ticks to fill, expire and reject."""
        rng = np.random.default_rng(seed)

        def draw(options: Sequence[Any]) -> Any:
            return options[int(rng.integers(len(options)))]

        batch: list[tuple[MarginLock, Open | Place]] = []
        for _ in range(count):
            user, rid = draw(self.users), self.next_rid()
            terms = self.order_terms(draw(list(Side)), draw(list(OrderKind)), draw(OFFSETS),
                                     int(rng.integers(5, 400)), draw(LEVERAGES), draw(LEVELS),
                                     draw(LEVELS), draw(EXPIRIES))
            batch.append((MarginLock(user, terms.margin_micros, None, rid, order=True),
                          Place(user, terms, rid)))
        self.send_batch(NAMES[where], batch)

    def send_batch(self, name: str, batch: list[tuple[MarginLock, Open | Place]]) -> None:
        """Lock every margin, send what was locked to shard ``name`` and release the locks
        of what it refused, each as one batch (micro-batches of the service's calls)."""
        locks = self.runners[LEDGER].execute([LockMargin(lock) for lock, _ in batch])
        sent = [sent for sent, locked in zip(batch, locks, strict=True) if locked is None]
        results = self.runners[name].execute([request for _, request in sent])
        assert all(isinstance(r, OpenPosition | PendingOrder | Rejected) for r in results)
        refused = [ReleaseMargin(lock.user, lock.margin_micros, lock.request_id)
                   for (lock, _), result in zip(sent, results, strict=True)
                   if isinstance(result, Rejected)]
        assert self.runners[LEDGER].execute(refused) == [None] * len(refused)
        self.opens.extend((name, request, made) for (_, request), made
                          in zip(sent, results, strict=True) if not isinstance(made, Rejected))

    def do_close(self, pick: int, k: int | None, stage: str, quarters: int = 0) -> None:
        """Close a position: all of it, or ``quarters`` quarters of it (a partial close when
        that is at least a step and not all)."""
        target = self.target(pick, "open", "close", k)
        if target is not None:
            name, record, rid, key = target
            self.send_end(name, Close(ShardClose(rid, record.owner, record.position_id, None,
                                                 100, record.qty_steps * quarters // 4)),
                          rid, key, stage)

    def target(self, pick: int, among: str, kind: str, k: int | None
               ) -> tuple[str, PositionRecord | OpenPosition, int, IdemKey | None] | None:
        """The shard and position a request of ``kind`` names, ``among`` the open ones
        (``open``), those with a stop-loss (``stopped``), or any one an open or a top-up
        made, closed since or not (``made``: NOT_FOUND); with the request's id and its
        clientOrderId (``k``); None when there is none."""
        found: list[tuple[str, PositionRecord | OpenPosition]] = []
        if among == "made":
            found = [(name, p) for name, _, p in self.opens if isinstance(p, OpenPosition)]
        else:
            held = [(name, pid) for name in NAMES
                    for pid in self.runners[name].machine.book.ids().tolist()]
            if among == "open" and held:  # only the one picked is read
                held = [held[pick % len(held)]]
            found = [(name, r) for name, r in ((name, self.runners[name].machine.book.get(pid))
                                               for name, pid in held)
                     if r is not None and (among == "open" or r.sl_ticks)]
        if not found:
            return None
        name, position = found[pick % len(found)]
        key = None if k is None else IdemKey(position.owner, kind, f"{kind[0]}{k}")
        return name, position, self.next_rid(), key

    def do_modify(self, pick: int, among: str, moves: Moves, k: int | None,
                  stage: str) -> None:
        target = self.target(pick, among, "modify", k)
        if target is not None:
            name, position, rid, key = target
            # announced at the ledger first, as a removal is, with nothing to release
            self.send_end(name, self.levels(position, moves, rid), rid, key, stage,
                          (position.owner, 0))

    def levels(self, position: PositionRecord | OpenPosition, moves: Moves,
               rid: int) -> SetLevels:
        """The change of ``position``'s TP and SL, each ``moves`` from the current price (see
        MOVES; None: kept)."""
        assert self.last_tick is not None
        long = position.side == Side.LONG
        price = self.last_tick.bid_ticks if long else self.last_tick.ask_ticks

        def level(move: int | str | None, toward: int) -> int | None:
            return None if move is None else 0 if move == OFF else price + toward * int(move)

        sign = 1 if long else -1
        return SetLevels(position.owner, position.position_id, level(moves[0], sign),
                         level(moves[1], -sign), rid)

    @staticmethod
    def removal(position: PositionRecord | OpenPosition, leverage: int,
                rid: int) -> ChangeMargin:
        """The removal of ``position``'s margin above what leaves it at ``leverage`` (at least
        1 micro)."""
        notional = position.entry_ticks * position.qty_steps * USD \
            // 10 ** (SOL.price_decimals + SOL.qty_decimals)
        micros = max(1, position.margin_micros + (-notional // leverage))
        return ChangeMargin(position.owner, position.position_id, -micros, rid)

    def do_top_up(self, pick: int, among: str, usd: int, k: int | None, stage: str) -> None:
        target = self.target(pick, among, "margin", k)
        if target is not None:
            name, position, rid, key = target
            lock = MarginLock(position.owner, usd * USD, key, rid, top_up=True)
            self.lock_and_send(name, lock, ChangeMargin(position.owner, position.position_id,
                                                        usd * USD, rid), stage)

    def do_remove(self, pick: int, among: str, leverage: int, k: int | None,
                  stage: str) -> None:
        target = self.target(pick, among, "margin", k)
        if target is not None:
            name, position, rid, key = target
            request = self.removal(position, leverage, rid)
            self.send_end(name, request, rid, key, stage, (position.owner, -request.delta_micros))

    def do_changes(self, where: int, count: int, seed: int) -> None:
        """One batch of TP/SL changes and margin removals (a micro-batch) of positions on
        shard ``where``, drawn from a ``modify``'s and a ``remove``'s choices (many outcomes
        of each), then one batch of the releases of the margin the removals freed."""
        name = NAMES[where]
        book = self.runners[name].machine.book
        held = book.ids().tolist()
        rng = np.random.default_rng(seed)
        requests: list[SetLevels | ChangeMargin] = []
        choices = (*MOVES, None)
        for _ in range(count if held else 0):
            position = book.get(held[int(rng.integers(len(held)))])
            assert position is not None
            tp, sl = (choices[int(i)] for i in rng.integers(len(choices), size=2))
            leverage = REMOVALS_TO_LEVERAGE[int(rng.integers(len(REMOVALS_TO_LEVERAGE)))]
            rid = self.next_rid()
            requests.append(self.removal(position, leverage, rid) if rng.integers(2)
                            else self.levels(position, (tp, sl), rid))
        removals = [r for r in requests if isinstance(r, ChangeMargin)]
        assert self.runners[LEDGER].execute([
            ExpectRelease(r.owner, -r.delta_micros, r.request_id) for r in removals]) == \
            [None] * len(removals)
        results = self.runners[name].execute(requests)
        releases: dict[int, tuple[int, int]] = {}  # request id -> (user, micros)
        refused: list[AbandonLock] = []
        for request, result in zip(requests, results, strict=True):
            if isinstance(result, Rejected):
                assert result.code in REFUSALS[type(request)]
                if isinstance(request, ChangeMargin):
                    refused.append(AbandonLock(request.request_id))
                continue
            assert isinstance(result, OpenPosition)
            if isinstance(request, ChangeMargin):
                releases[request.request_id] = (request.owner, -request.delta_micros)
            self.changes.append((name, request, result, None, releases.get(request.request_id)))
        assert self.runners[LEDGER].execute(refused) == [None] * len(refused)
        users = sorted({user for user, _ in releases.values()})
        before = self.runners[LEDGER].execute([Balances(user) for user in users])
        assert self.runners[LEDGER].execute([
            ReleaseMargin(user, micros, rid, counted=False)
            for rid, (user, micros) in releases.items()]) == [None] * len(releases)
        for user, (free, margin) in zip(users, before, strict=True):
            freed = sum(micros for owner, micros in releases.values() if owner == user)
            assert self.ask(LEDGER, Balances(user)) == (free + freed, margin - freed)

    def do_cancel(self, pick: int, placed: bool, k: int | None, stage: str) -> None:
        """Cancel an open order, or (``placed``) any order ever placed: most have ended."""
        orders = [(name, order) for name, _, order in self.opens
                  if isinstance(order, PendingOrder)] if placed else [
            (name, order) for name in NAMES
            for listed in self.ask(name, OrdersOf(tuple(self.users))) for order in listed]
        if not orders:
            return
        name, order = orders[pick % len(orders)]
        rid = self.next_rid()
        key = None if k is None else IdemKey(order.owner, "cancel", f"x{k}")
        self.send_end(name, Cancel(order.owner, order.order_id, rid), rid, key, stage)

    def send_end(self, name: str, request: Ending, rid: int, key: IdemKey | None, stage: str,
                 release: tuple[int, int] | None = None) -> None:
        """Send the close, cancel, TP/SL change or margin removal to shard ``name``, then
        what it did to the ledger, as the service does: a settlement through the courier, a
        change's answer and ``release`` ``(user, micros)``, the margin a removal frees
        (:meth:`settle_change`); ``stage`` says where it is cut off."""
        # the key reserved, with the release a removal will owe (if any) remembered first
        seen = (self.ask(LEDGER, ExpectRelease(*release, rid, key)) if release is not None
                else None if key is None else self.ask(LEDGER, Begin(key, rid)))
        if seen is not None:
            assert key is not None, seen
            self.seen_before(key, seen)
            return
        result = self.ask(name, request)
        if stage == "resent":  # the answer was lost: sent again, the same request id
            assert self.ask(name, request) == result
        if release is not None and isinstance(result, Rejected) and stage != "died_after_send":
            assert self.ask(LEDGER, AbandonLock(rid)) is None  # nothing owed: nothing freed
        if stage == "died_swept" and release is not None and key is None:
            self.swept_removal(name, request, result, release)
            return
        if isinstance(request, Close | Cancel):
            assert isinstance(result, SettlementItem | Rejected)
            if isinstance(result, SettlementItem):
                self.closes.append((name, request, result))
        else:
            assert isinstance(result, OpenPosition | Rejected)
        if isinstance(result, Rejected):
            assert result.code in REFUSALS[type(request)]
        if stage == "died_after_send":
            if key is not None:
                self.in_flight[rid] = key
            # the start-time reconciliation releases the margin a removal freed
            self.restart_platform(dict([release]) if release is not None and release[1]
                                  and isinstance(result, OpenPosition) else None)
            return
        if stage == "lost":  # in doubt: resolve it on the shard
            resolved = self.ask(name, Resolve(rid))
            if isinstance(result, Rejected):
                assert resolved is None  # fenced: a late arrival is refused
                assert self.ask(name, request) == FENCED
            else:
                assert resolved == result
        if isinstance(result, SettlementItem):
            self.deliver(name, None if key is None else (key, result.closed))
        elif isinstance(result, OpenPosition):
            assert isinstance(request, SetLevels | ChangeMargin)
            self.settle_change(name, request, result, key, release, stage)
        elif key is not None:
            # a refusal that would be the same again is the answer; in doubt, or transient,
            # the reservation is dropped and a retry runs again
            if stage != "lost" and result.code is not Code.PRICE_UNAVAILABLE:
                assert self.ask(LEDGER, Remember(key, result)) is None
                self.answer_is_stored(key, result)
            else:
                assert self.ask(LEDGER, Forget(key)) is None

    def swept_removal(self, name: str, request: Ending, result: object,
                      release: tuple[int, int]) -> None:
        """The API process died after the shard answered a removal (or a TP/SL change, which
        frees nothing), before the ledger freed its margin: another process's sweep of
        orphaned locks resolves the request at the shard and notes the change, which frees
        the margin (a refused removal was abandoned above and frees nothing); the dead
        process's release, should it come after all, frees nothing twice."""
        user, micros = release
        free, margin = self.ask(LEDGER, Balances(user))
        freed = 0
        if isinstance(result, OpenPosition):
            assert self.ask(name, Resolve(request.request_id)) == result
            assert self.ask(LEDGER, Note(user, request.request_id, POSITION_UPDATED, result,
                                         None)) is None
            freed = micros
            assert isinstance(request, ChangeMargin | SetLevels)
            self.changes.append((name, request, result, None, release))
        assert self.ask(LEDGER, Balances(user)) == (free + freed, margin - freed)
        assert self.ask(LEDGER, ReleaseMargin(user, micros, request.request_id,
                                              counted=False)) is None
        assert self.ask(LEDGER, Balances(user)) == (free + freed, margin - freed)

    def settle_change(self, name: str, request: SetLevels | ChangeMargin,
                      position: OpenPosition, key: IdemKey | None,
                      release: tuple[int, int] | None, stage: str) -> None:
        """Record at the ledger what a change of ``position`` did, as the reconciler's
        ``settle_change``: free the margin a removal took off it (``release``, once per
        request id) and store the answer. When that call is cut off (``stage``
        ``settle_lost``: the ledger applied it and died before answering; ``settle_cut``: it
        never arrived) the reconciler resolves the request on the shard and makes it again."""
        answer = None if key is None else (key, position)
        settle: ReleaseMargin | Remember | None = None if answer is None else Remember(*answer)
        if release is not None:
            settle = ReleaseMargin(*release, request.request_id, answer, counted=False)
        if settle is not None:
            free, margin = self.ask(LEDGER, Balances(position.owner))
            if stage == "settle_lost":
                assert self.ask(LEDGER, settle) is None
                self.crash([LEDGER])
            if stage in ("settle_lost", "settle_cut"):  # the reconciler's round
                assert self.ask(name, Resolve(request.request_id)) == position
            again = self.ask(LEDGER, settle)
            assert again is None
            # the margin is freed once, whatever was sent again
            freed = 0 if release is None else release[1]
            assert self.ask(LEDGER, Balances(position.owner)) == (free + freed, margin - freed)
        if answer is not None:
            self.answer_is_stored(*answer)
        self.changes.append((name, request, position, key, release))

    def do_retry_change(self, pick: int) -> None:
        """A change resent (its answer was lost): the first answer, from the shard and for its
        clientOrderId; a removal's release resent (a second reconciler round): nothing freed
        twice."""
        if not self.changes:
            return
        name, request, first, key, release = self.changes[pick % len(self.changes)]
        assert self.ask(name, request) == first
        if key is not None:
            self.seen_before(key, self.ask(LEDGER, Begin(key, self.next_rid())))
        if release is not None:
            user, micros = release
            before = self.ask(LEDGER, Balances(user))
            again = self.ask(LEDGER, ReleaseMargin(user, micros, request.request_id,
                                                   counted=False))
            assert again is None  # released before: the first answer, nothing freed
            assert self.ask(LEDGER, Balances(user)) == before

    def do_retry_open(self, pick: int) -> None:
        if not self.opens:
            return
        name, request, first = self.opens[pick % len(self.opens)]
        assert self.ask(name, request) == first  # same request id: the first answer
        key = next((k for k, a in self.answered.items() if a == first), None)
        if key is not None:  # same clientOrderId: the first answer, nothing locked
            self.seen_before(key, self.ask(LEDGER, LockMargin(MarginLock(
                key.user, first.margin_micros, key, self.next_rid()))))

    def do_retry_close(self, pick: int) -> None:
        if not self.closes:
            return
        name, request, first = self.closes[pick % len(self.closes)]
        assert self.ask(name, request) == first
        key = next((k for k, a in self.answered.items() if a == first.closed), None)
        if key is not None:
            self.seen_before(key, self.ask(LEDGER, Begin(key, self.next_rid())))

    def do_deliver(self, where: int, skip: int, reverse: bool, lose_ack: bool) -> None:
        self.deliver(NAMES[where], skip=skip, reverse=reverse, lose_ack=lose_ack)

    def do_crash(self, which: str) -> None:
        self.crash([LEDGER, *NAMES] if which == "all" else [which])

    def do_restart(self) -> None:
        self.restart_platform()

    def do_snapshot(self, which: str) -> None:
        self.runners[which].checkpoint()

    def do_wait(self, us: int) -> None:
        self.clock.now_us += us

    def run(self, op: tuple[Any, ...]) -> None:
        self.clock.now_us += STEP_US
        kind, *args = op
        getattr(self, f"do_{kind}")(*args)
        self.check()

    # ----------------------------------------------------------------- the end
    def finish(self) -> None:
        """Every journal replays into the live state; then everything is delivered and the
        money adds up."""
        for name, runner in self.runners.items():
            assert runner.store is not None
            runner.store.commit()  # what rides along with the next commit
            assert_same(self.replayed(name), runner.machine.fingerprint())
        for name in NAMES:
            self.deliver(name)
            assert self.ask(name, Outbox()).items == []
        margins, _, slots, orders = self.views()
        assert self.ask(LEDGER, Audit(margins, None, slots, orders)) == []
        totals = self.ask(LEDGER, Totals())
        assert totals["sum_micros"] == 0
        # every close once in its owner's history: a whole close named by its position, which
        # is no longer open; a partial close by an id of its own, its position open or closed
        history = [c for u in self.users for c in self.history(u)]
        close_ids = [c.close_id for c in history]
        assert len(close_ids) == len(set(close_ids)) == totals["closed_positions"]
        closed = [c.position_id for c in history if not c.partial]
        assert closed == [c.close_id for c in history if not c.partial]
        assert {c.closed.close_id for _, _, c in self.closes
                if isinstance(c.closed, ClosedPosition)} <= set(close_ids)
        held = {pid for name in NAMES for pid in self.runners[name].machine.book.ids().tolist()}
        assert not set(closed) & held and all(pid > 0 for pid in held)
        assert {c.position_id for c in history if c.partial} <= held | set(closed)
        # every order placed is open or in its owner's order history, once; a cancel's there
        # too, and a fill's position is open or closed
        ended = [o for u in self.users for o in self.history(u, OrderHistory)]
        ended_ids = {o.order_id for o in ended}
        open_ids = {o.order_id for name in NAMES
                    for listed in self.ask(name, OrdersOf(tuple(self.users))) for o in listed}
        assert len(ended_ids) == len(ended) and not ended_ids & open_ids
        assert ended_ids | open_ids == {o.order_id for _, _, o in self.opens
                                        if isinstance(o, PendingOrder)}
        assert {c.closed.order_id for _, _, c in self.closes
                if isinstance(c.closed, EndedOrder)} <= ended_ids
        positions = held | set(closed)
        assert all((o.status == OrderStatus.FILLED) == (o.position_id in positions)
                   for o in ended)
        self.restart_platform()
        self.check()

    def history(self, user: int, read: type[History] = History) -> list[Any]:
        """All of ``user``'s closed positions (``read=OrderHistory``: ended orders), page
        after page."""
        cursor = "order_id" if read is OrderHistory else "close_id"
        out: list[Any] = []
        while True:
            page = self.ask(LEDGER, read(user, 500, getattr(out[-1], cursor) if out else None))
            out.extend(page)
            if len(page) < 500:
                return out

    def close(self) -> None:
        for runner in self.runners.values():
            crash(runner)


# ----------------------------------------------------------------------------- the property
WHO = st.integers(0, 7)
KEY = st.none() | st.integers(0, KEYS - 1)
# where a request a lock pays for (an open, a placement) and one that ends something (a close,
# a cancel) is cut off
LOCKED = st.sampled_from(["done"] * 4 + ["lock_lost", "lost", "died_after_lock",
                                         "died_after_send"])
ENDING = st.sampled_from(["done"] * 3 + ["lost", "died_after_send"])
OPEN = st.tuples(st.just("open"), WHO, st.integers(0, 1), st.sampled_from(Side),
                 st.integers(5, 400), st.sampled_from([1, 2, 5, 10, 20, 100]),
                 st.none() | st.sampled_from([5, 20, 50, 100, 200]),
                 st.none() | st.sampled_from([5, 20, 50, 100, 200]), KEY, LOCKED)
# all of a position, or one to three quarters of it
CLOSE = st.tuples(st.just("close"), st.integers(0, 10**6), KEY, ENDING,
                  st.sampled_from([0, 0, 1, 2, 3]))
LEVEL = st.sampled_from(LEVELS)
PLACE = st.tuples(st.just("place"), WHO, st.integers(0, 1), st.sampled_from(Side),
                  st.sampled_from(OrderKind), st.sampled_from(OFFSETS), st.integers(5, 400),
                  st.sampled_from(LEVERAGES), LEVEL, LEVEL, st.sampled_from(EXPIRIES), KEY,
                  LOCKED)
# an open order, or any order placed (most have ended: ORDER_NOT_OPEN)
CANCEL = st.tuples(st.just("cancel"), st.integers(0, 10**6), st.booleans(), KEY, ENDING)
# where a TP/SL change or a margin removal is cut off: the shard's answer lost (resolved on the
# shard) or resent, the ledger's answer to what settles it lost or that call never made (the
# reconciler settles it again), the API process died after the send
CHANGING = st.sampled_from(["done"] * 2 + ["lost", "resent", "settle_lost", "settle_cut",
                                           "died_after_send", "died_swept"])
# the positions one is picked among (Platform.target): "made" ones may be closed (NOT_FOUND)
AMONG = st.sampled_from(["open", "open", "stopped", "made"])
MOVE = st.sampled_from(MOVES)
# the TP, the SL or both changed (the other kept)
MODIFY = st.tuples(st.just("modify"), st.integers(0, 10**6), AMONG,
                   st.tuples(MOVE, st.none()) | st.tuples(st.none(), MOVE) | st.tuples(MOVE, MOVE),
                   KEY, CHANGING)
# a top-up is cut off where an open is (LOCKED's stages, each as often)
TOP_UP = st.tuples(st.just("top_up"), st.integers(0, 10**6), AMONG,
                   st.sampled_from(TOP_UPS_USD), KEY,
                   st.sampled_from(["done", "lock_lost", "lost", "died_after_lock",
                                    "died_after_send"]))
REMOVE = st.tuples(st.just("remove"), st.integers(0, 10**6), AMONG,
                   st.sampled_from(REMOVALS_TO_LEVERAGE), KEY, CHANGING)
ORDERS = st.tuples(st.just("orders"), st.integers(0, 1), st.integers(4, 16), st.integers(0, 2**32))
CHANGES = st.tuples(st.just("changes"), st.integers(0, 1), st.integers(4, 16),
                    st.integers(0, 2**32))
TICK = st.tuples(st.just("tick"), st.sampled_from([-300, -150, -60, -20, 0, 20, 60, 150, 300]),
                 st.integers(1, 5) | st.sampled_from([80, 200]), st.booleans())
RUNNER = st.sampled_from([LEDGER, *NAMES])
# each branch drawn as often as it is listed (st.one_of keeps one of equal branches)
OPS = st.lists(st.sampled_from([
    OPEN, OPEN, OPEN, OPEN, TICK, TICK, TICK, TICK, TICK, CLOSE, CLOSE, CLOSE, PLACE, PLACE,
    PLACE, CANCEL, CANCEL, ORDERS, ORDERS, MODIFY, MODIFY, MODIFY, MODIFY, TOP_UP, TOP_UP,
    TOP_UP, REMOVE, REMOVE, REMOVE, REMOVE, CHANGES, CHANGES, CHANGES,
    st.tuples(st.just("account")),
    st.tuples(st.just("bulk"), st.integers(0, 1), st.integers(MIN_VECTOR_RUN, MIN_VECTOR_RUN + 8),
              st.integers(0, 2**32)),
    st.tuples(st.just("retry_open"), st.integers(0, 10**6)),
    st.tuples(st.just("retry_close"), st.integers(0, 10**6)),
    st.tuples(st.just("retry_change"), st.integers(0, 10**6)),
    st.tuples(st.just("deliver"), st.integers(0, 1), st.integers(0, 3), st.booleans(),
              st.booleans()),
    st.tuples(st.just("crash"), st.sampled_from([LEDGER, *NAMES, "all"])),
    st.tuples(st.just("restart")),
    st.tuples(st.just("snapshot"), RUNNER),
    st.tuples(st.just("wait"), st.sampled_from([0, MAX_AGE_US // 2, MAX_AGE_US + 1])),
]).flatmap(lambda op: op), min_size=15, max_size=45)


# open positions per account: a small limit is reached often (a large one lets bulk opens
# make the long runs that replay vectorised); open orders per account likewise
CAPS = st.sampled_from([2, DEFAULT_MAX_OPEN_POSITIONS])
ORDER_CAPS = st.sampled_from([1, 2, DEFAULT_MAX_OPEN_ORDERS])
# the first steps: a price, and positions of a second account on both sides, with stop-losses,
# for changes to work on from the start (the first account keeps its whole limit); the price
# then falls 0.8%: a removal leaving the long at leverage 95 makes it liquidatable, one
# leaving it at 40 or 70 (or the short at 95) leaves its SL not beyond the liquidation price
START: list[tuple[Any, ...]] = [
    ("account",), ("tick", 0, 1, False), ("account",),
    ("open", 1, 0, Side.LONG, 100, 10, None, 300, None, "done"),
    ("open", 1, 1, Side.SHORT, 100, 10, None, 300, None, "done"),
    ("tick", -80, 1, False)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, CAPS, ORDER_CAPS)
def test_any_run_with_crashes_replays_to_the_live_state_and_keeps_the_books(
        ops: list[tuple[Any, ...]], cap: int, max_orders: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="core-replay-"))
    # fsync=False leaves the journal's data unflushed; the flushes of directories and
    # snapshot files go too (the disk is not the subject here, and they take most of the time)
    with mock.patch.object(os, "fsync", lambda fd: None):
        platform = Platform(root, cap, max_orders)
        try:
            for op in [*START, *ops]:
                platform.run(op)
            platform.finish()
        finally:
            platform.close()
            shutil.rmtree(root)


SCRIPT: list[tuple[Any, ...]] = [
    ("account",),
    ("account",),
    ("open", 0, 0, Side.LONG, 100, 10, 50, None, None, "done"),  # take-profit 50 above
    ("open", 1, 1, Side.SHORT, 100, 10, None, 50, 0, "done"),  # stop-loss 50 above
    ("open", 0, 0, Side.LONG, 100, 100, None, None, 1, "done"),  # liquidated 1% below
    ("open", 1, 1, Side.LONG, 50, 5, None, None, None, "done"),
    ("retry_open", 1),
    ("open", 1, 1, Side.SHORT, 7, 3, None, None, 0, "done"),  # key 0 again: first answer
    ("tick", 60, 1, True),
    ("tick", -300, 1, False),
    ("deliver", 0, 1, True, True),
    ("bulk", 1, MIN_VECTOR_RUN, 7),
    ("open", 0, 0, Side.LONG, 20, 2, None, None, 2, "lock_lost"),
    ("open", 0, 1, Side.SHORT, 20, 2, None, None, None, "lock_lost"),
    ("open", 1, 0, Side.LONG, 20, 2, None, None, 2, "lost"),
    ("open", 0, 1, Side.LONG, 20, 2, None, None, 1, "died_after_lock"),
    ("open", 1, 0, Side.SHORT, 20, 2, None, None, 1, "died_after_send"),
    ("snapshot", NAMES[0]),
    ("close", 0, 0, "lost"),
    ("close", 1, 1, "died_after_send"),
    ("close", 2, None, "done"),
    ("close", 3, 2, "done"),
    ("retry_close", 0),
    ("retry_close", 2),
    ("close", 3, 2, "done"),  # key 2 again: first answer
    ("wait", MAX_AGE_US + 1),
    ("close", 4, None, "done"),  # stale price: refused
    ("open", 1, 1, Side.LONG, 20, 2, None, None, None, "lost"),  # refused, then fenced
    ("open", 0, 0, Side.LONG, 20, 2, None, None, 2, "died_after_send"),  # refused: released
    ("crash", "all"),
    ("tick", 20, 2, False),
    ("close", 5, 0, "lost"),
    ("close", 6, None, "done", 2),  # half of a position: the rest stays open
    ("close", 6, None, "died_after_send", 3),
    ("retry_close", -1),
    ("snapshot", LEDGER),
    ("deliver", 1, 0, False, True),
    ("restart",),
    ("tick", -20, 1, True),
    # pending orders, the bid at 9760 (three open orders per account at most)
    ("account",),
    ("place", 0, 0, Side.LONG, OrderKind.LIMIT, -20, 100, 10, None, None, None, 0, "done"),
    ("place", 0, 1, Side.SHORT, OrderKind.STOP, -20, 100, 10, 10, None, None, None, "done"),
    ("place", 0, 0, Side.LONG, OrderKind.LIMIT, -400, 20, 2, None, None, None, 1, "lock_lost"),
    ("place", 0, 1, Side.LONG, OrderKind.LIMIT, -400, 20, 2, None, None, None, 1,
     "died_after_lock"),
    ("place", 0, 1, Side.LONG, OrderKind.STOP, 300, 20, 2, None, None, None, None, "done"),
    ("place", 0, 0, Side.LONG, OrderKind.STOP, 300, 20, 2, None, None, None, 2, "done"),  # a 4th
    ("place", 1, 1, Side.LONG, OrderKind.STOP, 20, 50, 100, None, None, None, None, "done"),
    ("place", 1, 0, Side.SHORT, OrderKind.LIMIT, 200, 20, 2, None, None, 3, 0, "done"),
    ("place", 2, 1, Side.SHORT, OrderKind.LIMIT, 400, 20, 2, None, None, None, 0, "lost"),
    ("place", 2, 0, Side.LONG, OrderKind.LIMIT, -400, 20, 2, None, None, 0, 1, "done"),  # now
    ("place", 2, 0, Side.LONG, OrderKind.LIMIT, -400, 20, 2, None, None, None, 2,
     "died_after_send"),
    ("place", 1, 0, Side.SHORT, OrderKind.LIMIT, -5, 20, 2, None, None, None, 1, "done"),
    ("retry_open", -1),
    ("cancel", 5, False, 0, "done"),  # the stop at 10060
    ("tick", 20, 80, True),  # the stop at 9780 would liquidate; the limit at 9755 fills; expiry
    ("tick", -120, 1, True),  # the limit at 9740 fills; the stop at 9740 gaps past its TP
    ("cancel", 1, False, None, "lost"),
    ("cancel", 2, False, 1, "died_after_send"),
    ("retry_close", -1),
    ("cancel", 0, True, 2, "done"),  # filled already
    ("orders", 1, 12, 3),
    ("tick", 150, 200, True),
]


def test_a_scripted_run_takes_every_path() -> None:
    root = Path(tempfile.mkdtemp(prefix="core-replay-"))
    with mock.patch.object(os, "fsync", lambda fd: None):
        platform = Platform(root, max_orders=3)
        try:
            platform.run(("tick", 0, 1, False))
            for op in SCRIPT:
                platform.run(op)
            stats = [platform.ask(name, Stats()) for name in NAMES]
            assert sum(s.closes_take_profit for s in stats) >= 1
            assert sum(s.closes_stop_loss for s in stats) >= 1
            assert sum(s.closes_liquidation for s in stats) >= 1
            assert sum(s.closes_manual for s in stats) >= 3
            assert platform.crashes >= 5 and len(platform.answered) >= 5
            platform.finish()
            ended = {(o.side, o.kind, o.status, o.reject_code) for u in platform.users
                     for o in platform.history(u, OrderHistory)}
            assert {(Side.LONG, OrderKind.LIMIT, OrderStatus.FILLED, ""),
                    (Side.SHORT, OrderKind.LIMIT, OrderStatus.FILLED, ""),
                    (Side.SHORT, OrderKind.LIMIT, OrderStatus.EXPIRED, ""),
                    (Side.LONG, OrderKind.STOP, OrderStatus.CANCELLED, ""),
                    (Side.SHORT, OrderKind.LIMIT, OrderStatus.CANCELLED, ""),
                    (Side.LONG, OrderKind.STOP, OrderStatus.REJECTED, "WOULD_LIQUIDATE"),
                    (Side.SHORT, OrderKind.STOP, OrderStatus.REJECTED, "INVALID_TRIGGER"),
                    } <= ended
            partial = [c for u in platform.users for c in platform.history(u) if c.partial]
            assert len(partial) >= 2
            refused = {a.code for a in platform.answered.values() if isinstance(a, Rejected)}
            assert {Code.TOO_MANY_ORDERS, Code.ORDER_NOT_OPEN, Code.INVALID_REQUEST} <= refused
        finally:
            platform.close()
            shutil.rmtree(root)


# One position changed step by step, each step with the position's margin after it (micros):
# a long at 10001, 9.99 SOL (notional 999.0999), margin 100, liquidation 9050; the bid at 10000.
# The clientOrderIds are m0, m1, ... of each kind (a top-up and a removal share one).
STEPS: list[tuple[tuple[Any, ...], int]] = [
    (("open", 0, 0, Side.LONG, 100, 10, None, None, None, "done"), 100 * USD),
    (("modify", 0, "open", (300, 350), 0, "done"), 100 * USD),  # TP 10300, SL 9650
    (("modify", 0, "open", (None, -40), 1, "done"), 100 * USD),  # SL above the bid: refused
    (("modify", 0, "open", (400, None), 2, "settle_cut"), 100 * USD),  # TP 10400, stored late
    (("top_up", 0, "open", 20, 0, "done"), 120 * USD),
    (("top_up", 0, "open", 30, 1, "lost"), 150 * USD),  # the shard's answer lost: resolved
    (("top_up", 0, "open", 30, None, "died_after_lock"), 150 * USD),  # released at the start
    (("remove", 0, "open", 10, 2, "done"), 99_909_990),  # down to leverage 10
    (("remove", 0, "open", 20, 3, "resent"), 49_954_995),  # the reply lost; liquidation 9550
    (("remove", 0, "open", 40, 4, "done"), 49_954_995),  # liquidation 9800 past the SL: refused
    (("remove", 0, "open", 150, 5, "done"), 49_954_995),  # notional > margin x 100: refused
    (("modify", 0, "open", (None, OFF), 3, "done"), 49_954_995),  # the SL removed
    (("tick", -80, 1, False), 49_954_995),  # bid 9920
    (("remove", 0, "open", 95, 6, "done"), 49_954_995),  # liquidation 9945 >= bid: refused
    (("remove", 0, "open", 30, 7, "lost"), 33_303_330),  # the shard's answer lost: resolved
    (("remove", 0, "open", 40, 8, "settle_lost"), 24_977_498),  # the ledger died answering
    (("retry_change", -1), 24_977_498),  # that removal and its release sent again: nothing
    (("crash", "all"), 24_977_498),
    (("remove", 0, "open", 50, 9, "settle_cut"), 19_981_998),  # released by the reconciler
    (("remove", 0, "open", 60, None, "died_after_send"), 16_651_665),  # released at the start
    (("modify", 0, "open", (500, None), 4, "lost"), 16_651_665),  # TP 10420: resolved
    (("modify", 0, "open", (600, None), 5, "resent"), 16_651_665),  # TP 10520
    (("modify", 0, "open", (None, 20), 6, "settle_lost"), 16_651_665),  # SL 9900
    (("modify", 0, "open", (OFF, None), 7, "died_after_send"), 16_651_665),  # the TP removed
    (("top_up", 0, "open", 10, 11, "lock_lost"), 16_651_665),  # abandoned: returned
    (("top_up", 0, "open", 10, 12, "died_after_send"), 26_651_665),
    (("wait", MAX_AGE_US + 1), 26_651_665),  # the price stale: each refused, none stored
    (("modify", 0, "open", (OFF, None), 8, "done"), 26_651_665),
    (("top_up", 0, "open", 10, 13, "done"), 26_651_665),
    (("remove", 0, "open", 100, 14, "done"), 26_651_665),
    (("tick", 0, 1, False), 26_651_665),
    (("top_up", 0, "open", 50_000, 10, "done"), 26_651_665),  # more than the free balance
    # the API process died before the release: the sweep's note frees the margin
    (("remove", 0, "open", 40, None, "died_swept"), 24_977_498),
    (("remove", 0, "open", 150, None, "died_swept"), 24_977_498),  # refused: nothing freed
]


def summary(answer: object) -> tuple[Any, ...]:
    """A change's answer as ``(margin, TP, SL, liquidation price)``, or a refusal as ``(code,
    the word of its message that says why)``."""
    if isinstance(answer, OpenPosition):
        return answer.margin_micros, answer.tp_ticks, answer.sl_ticks, answer.liq_ticks
    assert isinstance(answer, Rejected)
    return answer.code, next(word for word in ("stop-loss", "notional", "liquidated", "balance")
                             if word in answer.message)


def test_one_position_changed_step_by_step() -> None:
    """A position's TP/SL set, replaced, removed and refused, margin added, removed and
    refused (a removal for each of its three reasons, both at a stale price, a top-up beyond
    the free balance), through every cut-off: the shard's answer lost (resolved, or the request
    resent with its id), the ledger's answer to a release lost as it died (sent again: nothing
    freed twice), a call that never reached the ledger, the API process dying. After each step
    the ledger locks exactly the position's margin and the rest is free, and the audit and
    replay hold (``Platform.run``)."""
    root = Path(tempfile.mkdtemp(prefix="core-replay-"))
    with mock.patch.object(os, "fsync", lambda fd: None):
        platform = Platform(root)
        try:
            platform.run(("account",))
            platform.run(("tick", 0, 1, False))
            user = platform.users[0]
            for op, margin in STEPS:
                platform.run(op)
                [[position]] = platform.ask(NAMES[0], PositionsOf((user,)))
                assert position.margin_micros == margin
                assert platform.ask(LEDGER, Balances(user)) == (SIGNUP - margin, margin)
            said = {(k.kind, k.client_order_id): summary(a) for k, a in platform.answered.items()}
            levels = (10_400, 9_650)  # TP, SL
            assert said == {
                ("modify", "m0"): (100 * USD, 10_300, 9_650, 9_050),
                ("modify", "m1"): (Code.INVALID_TRIGGER, "stop-loss"),
                ("modify", "m2"): (100 * USD, *levels, 9_050),
                ("margin", "m0"): (120 * USD, *levels, 8_849),
                ("margin", "m1"): (150 * USD, *levels, 8_549),
                ("margin", "m2"): (99_909_990, *levels, 9_050),
                ("margin", "m3"): (49_954_995, *levels, 9_550),
                ("margin", "m4"): (Code.INVALID_REQUEST, "stop-loss"),
                ("margin", "m5"): (Code.INVALID_REQUEST, "notional"),
                ("modify", "m3"): (49_954_995, 10_400, 0, 9_550),
                ("margin", "m6"): (Code.INVALID_REQUEST, "liquidated"),
                ("margin", "m7"): (33_303_330, 10_400, 0, 9_717),
                ("margin", "m8"): (24_977_498, 10_400, 0, 9_800),
                ("margin", "m9"): (19_981_998, 10_400, 0, 9_850),
                ("margin", "m10"): (Code.INSUFFICIENT_BALANCE, "balance"),
                ("modify", "m4"): (16_651_665, 10_420, 0, 9_884),
                ("modify", "m5"): (16_651_665, 10_520, 0, 9_884),
                ("modify", "m6"): (16_651_665, 10_520, 9_900, 9_884),
                ("modify", "m7"): (16_651_665, 0, 9_900, 9_884),
                ("margin", "m12"): (26_651_665, 0, 9_900, 9_784)}
            assert platform.crashes == 7
            platform.finish()
        finally:
            platform.close()
            shutil.rmtree(root)
