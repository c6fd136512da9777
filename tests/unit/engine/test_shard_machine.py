"""ShardMachine: opens at the shard's own price, closes, sweeps, the outbox, remembered answers,
and the decide/apply contract: decide changes nothing, a journal of the applied events replays
(vectorised or not) into an equal state, and so does a snapshot plus the records after it."""

from __future__ import annotations

import struct
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from engine.assets import DEFAULT_ASSETS
from engine.events import TYPE_CODES
from engine.events import Event
from engine.events import OpenFenced
from engine.events import OutboxAcked
from engine.events import PositionClosed
from engine.events import PositionOpened
from engine.events import SeqResumed
from engine.events import TickApplied
from engine.events import decode_batch
from engine.events import encode
from engine.events import encode_batch
from engine.events import record_dtype
from engine.machine import run as run_at
from engine.machine import step
from engine.market import Tick
from engine.messages import OpenPosition
from engine.messages import SettlementItem
from engine.messages import ShardClose
from engine.messages import ShardOpen
from engine.orders import CloseReason
from engine.orders import Side
from engine.results import Code
from engine.results import Forgotten
from engine.results import Rejected
from engine.shard_machine import COUNTER_BITS
from engine.shard_machine import MIN_VECTOR_RUN
from engine.shard_machine import OPENED_RECORD
from engine.shard_machine import REMEMBERED
from engine.shard_machine import AckOutbox
from engine.shard_machine import ApplyTick
from engine.shard_machine import AuditView
from engine.shard_machine import BooksView
from engine.shard_machine import Close
from engine.shard_machine import LastTick
from engine.shard_machine import Open
from engine.shard_machine import OpenMargins
from engine.shard_machine import Outbox
from engine.shard_machine import OutboxView
from engine.shard_machine import PositionsOf
from engine.shard_machine import Resolve
from engine.shard_machine import ResumeSeq
from engine.shard_machine import ShardMachine
from engine.shard_machine import Stats
from engine.shard_machine import slippage_exceeded
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

SOL = DEFAULT_ASSETS["SOL"]
NAME = "shard-SOL-0"
NOW = 1_800_000_000_000_000
MAX_AGE = 15_000_000
USD = 10**6


def run(machine: ShardMachine, command: Any, now_us: int = NOW) -> Any:
    """engine.machine.run at ``now_us`` (by default the time of the test's first tick)."""
    return run_at(machine, command, now_us)


def shard(tag: int = 0, ppm: int = 0) -> ShardMachine:
    return ShardMachine(NAME, tag, SOL, ppm, MAX_AGE)


def tick(bid: str, ask: str, ts_us: int = NOW, seq: int = 1) -> ApplyTick:
    return ApplyTick(Tick("SOL", SOL.price_to_ticks(bid), SOL.price_to_ticks(ask), ts_us, seq,
                          "test"))


def raw_tick(bid_ticks: int, ask_ticks: int | None = None, ts_us: int = NOW) -> ApplyTick:
    ask = bid_ticks + 1 if ask_ticks is None else ask_ticks
    return ApplyTick(Tick("SOL", bid_ticks, ask, ts_us, 1, "test"))


def req(rid: int, owner: int = 1, side: Side = Side.LONG, margin_usd: int = 100,
        leverage: int = 10, tp: str | None = None, sl: str | None = None,
        current: str | None = None, bps: int = 100) -> Open:
    return Open(ShardOpen(rid, owner, side, margin_usd * USD, leverage,
                          None if tp is None else SOL.price_to_ticks(tp),
                          None if sl is None else SOL.price_to_ticks(sl),
                          None if current is None else SOL.price_to_ticks(current), bps))


def close(rid: int, owner: int, position_id: int, current: int | None = None,
          bps: int = 100) -> Close:
    return Close(ShardClose(rid, owner, position_id, current, bps))


class Host:
    """A machine and its journal: each call (a list of commands) is one record of the events
    it applied, as the durable runner writes them."""

    def __init__(self, machine: ShardMachine | None = None) -> None:
        self.machine = machine or shard()
        self.records: list[bytes] = []

    def call(self, commands: list[Any], now_us: int = NOW) -> list[Any]:
        answers: list[Any] = []
        encoded: list[bytes] = []
        for command in commands:
            stepped = step(self.machine, command, now_us)
            answers.append(stepped.answer)
            encoded.extend(stepped.encoded)
        if encoded:
            self.records.append(encode_batch(encoded))
        return answers

    def one(self, command: Any, now_us: int = NOW) -> Any:
        return self.call([command], now_us)[0]


def replay(records: list[bytes], start: ShardMachine | None = None) -> ShardMachine:
    machine = start or shard()
    for payload in records:
        machine.apply_batch(machine.decode_record(payload))
    return machine


def restored(machine: ShardMachine) -> ShardMachine:
    arrays, meta = machine.snapshot()
    return ShardMachine.from_snapshot(machine.name, machine.book_tag, machine.asset,
                                      machine.maintenance_margin_ppm, machine.max_price_age_us,
                                      arrays, meta)


# ----------------------------------------------------------------------------- opens
def test_long_opens_at_the_ask_with_floored_quantity_and_exact_liquidation_price() -> None:
    m = shard()
    run(m, tick("100.00", "100.01"), NOW)
    pos = run(m, req(1), NOW)
    assert isinstance(pos, OpenPosition)
    assert pos.entry_ticks == 10001
    # quantity = floor_to_step(100 * 10 / 100.01) = 9.99
    assert pos.qty_steps == 999
    exact_liq = Fraction(10001, 100) - Fraction(100) / Fraction(999, 100)
    assert Fraction(pos.liq_ticks, 100) <= exact_liq < Fraction(pos.liq_ticks + 1, 100)
    # marked at the bid right away: (100.00 - 100.01) * 9.99 = -0.0999
    assert pos.unrealized_pnl_micros == -99_900
    [mine, other] = run(m, PositionsOf((1, 2)))
    assert [p.position_id for p in mine] == [pos.position_id] and other == []
    assert mine[0] == pos


def test_short_opens_at_the_bid() -> None:
    m = shard()
    run(m, tick("100.00", "100.01"))
    pos = run(m, req(1, side=Side.SHORT))
    assert isinstance(pos, OpenPosition)
    assert pos.entry_ticks == 10000 and pos.qty_steps == 1000
    exact_liq = Fraction(100) + Fraction(100) / Fraction(10)
    assert Fraction(pos.liq_ticks - 1, 100) < exact_liq <= Fraction(pos.liq_ticks, 100)


def test_the_position_id_is_decided_before_the_book_issues_it() -> None:
    m = shard(tag=7)
    run(m, tick("100.00", "100.01"))
    ids = []
    for rid in range(1, 6):
        want = m.book.next_position_id()
        answer, events = m.decide(req(rid), NOW)
        assert m.book.next_position_id() == want  # deciding issued nothing
        assert isinstance(events[0], PositionOpened) and events[0].position_id == want
        assert run(m, req(rid)) == answer and answer.position_id == want
        ids.append(want)
    run(m, close(10, 1, ids[1]))
    run(m, close(11, 1, ids[3]))
    # freed rows are reused newest first, with the next generation
    assert m.book.free_rows().tolist() == [3, 1]
    assert m.book.next_position_id() == (2 << 34) | (3 << 8) | 7
    assert run(m, req(6)).position_id == (2 << 34) | (3 << 8) | 7


def test_no_price_or_stale_price_refuses_opens_and_closes() -> None:
    m = shard()
    r = run(m, req(1), NOW)
    assert isinstance(r, Rejected) and r.code is Code.PRICE_UNAVAILABLE
    run(m, tick("100.00", "100.01", ts_us=NOW), NOW)
    pos = run(m, req(2), NOW + MAX_AGE)  # exactly the max age: still fresh
    assert isinstance(pos, OpenPosition)
    r = run(m, req(3), NOW + MAX_AGE + 1)
    assert isinstance(r, Rejected) and r.code is Code.PRICE_UNAVAILABLE
    r2 = run(m, close(9, 1, pos.position_id), NOW + MAX_AGE + 1)
    assert isinstance(r2, Rejected) and r2.code is Code.PRICE_UNAVAILABLE
    assert len(m.book) == 1 and run(m, Outbox()) == OutboxView([], 0)
    # a refusal is not remembered: the same request may succeed once the price is fresh
    assert isinstance(run(m, req(3), NOW), OpenPosition)


def test_a_price_stamped_ahead_of_a_clock_stepped_back_refuses_opens_and_closes() -> None:
    """A wall clock stepped back (NTP, a VM's clock) leaves the last tick stamped ahead of the
    shard's clock, and the feed drops every newer tick until the clock passes it again. Counted
    as fresh, that frozen price took opens and closes for the whole step and MAX_PRICE_AGE_S
    after it; past the clock skew the feed allows, it is refused as no price is."""
    m = ShardMachine(NAME, 0, SOL, 0, MAX_AGE, max_clock_skew_us=5_000_000)
    run(m, tick("100.00", "100.01", ts_us=NOW), NOW)
    pos = run(m, req(1), NOW - 5_000_000)  # exactly the skew: still taken
    assert isinstance(pos, OpenPosition)
    stepped = NOW - 10 * 60_000_000  # ten minutes back
    for command in (req(2), close(3, 1, pos.position_id)):
        refused = run(m, command, stepped)
        assert isinstance(refused, Rejected) and refused.code is Code.PRICE_UNAVAILABLE
        assert "600.0 s ahead" in refused.message
    assert len(m.book) == 1 and run(m, Outbox()) == OutboxView([], 0)
    # a newer tick stamped by the stepped clock is older than the price: the shard keeps it
    assert run(m, tick("99.00", "99.01", ts_us=stepped + 1), stepped + 1) == 0
    refused = run(m, req(4), stepped + 1)
    assert isinstance(refused, Rejected) and refused.code is Code.PRICE_UNAVAILABLE
    # the default is MAX_CLOCK_SKEW_S' own (5 s)
    m = shard()
    run(m, tick("100.00", "100.01", ts_us=NOW), NOW)
    assert isinstance(run(m, req(1), NOW - 5_000_000), OpenPosition)
    refused = run(m, req(2), NOW - 5_000_001)
    assert isinstance(refused, Rejected) and refused.code is Code.PRICE_UNAVAILABLE
    with pytest.raises(ValueError, match="max_clock_skew_us"):
        ShardMachine(NAME, 0, SOL, 0, MAX_AGE, max_clock_skew_us=-1)


def test_slippage_is_checked_against_the_client_price_but_never_used_as_price() -> None:
    assert not slippage_exceeded(10100, 10000, 100)
    assert slippage_exceeded(10101, 10000, 100)
    m = shard()
    run(m, tick("100.00", "101.01"))
    r = run(m, req(1, current="100.00"))  # 101 bps away
    assert isinstance(r, Rejected) and r.code is Code.PRICE_MOVED
    pos = run(m, req(2, current="100.00", bps=200))
    assert isinstance(pos, OpenPosition) and pos.entry_ticks == 10101
    c = run(m, close(3, 1, pos.position_id, SOL.price_to_ticks("90")))
    assert isinstance(c, Rejected) and c.code is Code.PRICE_MOVED
    assert len(m.book) == 1


def test_resent_open_returns_the_first_result_and_opens_once() -> None:
    m = shard()
    run(m, tick("100.00", "100.01"))
    first = run(m, req(7))
    answer, events = m.decide(req(7), NOW + 1)
    assert answer == first and events == ()
    assert run(m, req(7), NOW + 1) == first and len(m.book) == 1


def test_resolve_fences_requests_that_never_arrived() -> None:
    m = shard()
    run(m, tick("100.00", "100.01"))
    pos = run(m, req(1))
    assert [run(m, Resolve(1)), run(m, Resolve(2))] == [pos, None]
    late = run(m, req(2))  # the lost request finally arrives: refused
    assert isinstance(late, Rejected) and late.code is Code.PRICE_UNAVAILABLE
    assert run(m, Resolve(2)) is None and len(m.book) == 1
    # a fenced close request is refused the same way
    assert run(m, Resolve(3)) is None
    refused = run(m, close(3, 1, pos.position_id))
    assert refused == late and len(m.book) == 1
    # resolving a fenced id again journals nothing more; 0 names no request
    assert step(m, Resolve(2), NOW).encoded == []
    assert step(m, Resolve(0), NOW) == (None, [], False)


def test_a_request_whose_answer_was_forgotten_is_neither_fenced_nor_run_again() -> None:
    """An open whose answer left the window (REMEMBERED newer answers: here the fences of
    another API process's requests) may have run: resolving it must not report it absent,
    which freed the margin of a position that exists, and a late resend must not open it
    twice. A request of the same process newer than every forgotten one still fences."""
    host = Host()
    host.one(raw_tick(10_000))
    mine, other = 7 << COUNTER_BITS, 9 << COUNTER_BITS
    pos = host.one(req(mine | 5))
    assert isinstance(pos, OpenPosition)
    host.call([Resolve(other | n) for n in range(1, REMEMBERED + 1)])
    m = host.machine
    assert step(m, Resolve(mine | 5), NOW) == (Forgotten(mine | 5), [], False)
    assert step(m, req(mine | 5), NOW) == (Forgotten(mine | 5), [], False)
    assert step(m, req(mine | 4), NOW).answer == Forgotten(mine | 4)  # slower still
    assert len(m.book) == 1 and m.check() == []
    assert host.one(Resolve(mine | 6)) is None  # never seen, newer: fenced as before
    late = host.one(req(mine | 6))
    assert isinstance(late, Rejected) and late.code is Code.PRICE_UNAVAILABLE
    # replay and a snapshot know the same
    again = replay(host.records)
    for machine in (again, restored(again)):
        assert machine.fingerprint()["forgotten"] == [(7, 5), (9, 1)]
        assert machine.decide(Resolve(mine | 5), NOW) == (Forgotten(mine | 5), ())


# ----------------------------------------------------------------------------- closes
def test_close_of_unknown_or_foreign_position_is_the_same_not_found() -> None:
    m = shard()
    run(m, tick("100.00", "100.01"))
    pos = run(m, req(1, owner=1))
    assert isinstance(pos, OpenPosition)
    foreign = run(m, close(2, 2, pos.position_id))
    unknown = run(m, close(3, 2, pos.position_id + 256))
    assert foreign == unknown
    assert isinstance(foreign, Rejected) and foreign.code is Code.NOT_FOUND
    item = run(m, close(4, 1, pos.position_id), NOW + 5)
    assert isinstance(item, SettlementItem)
    assert item.seq == 1 and item.closed.reason == CloseReason.MANUAL
    assert item.closed.exit_ticks == 10000 and item.closed.closed_ts_us == NOW + 5
    assert item.closed.pnl_micros == -99_900
    assert item.closed.payout_micros == 100_000_000 - 99_900
    assert run(m, Outbox()) == OutboxView([item], 1)


def test_a_retried_close_returns_the_first_settlement_also_after_a_restart() -> None:
    host = Host()
    host.one(tick("100.00", "100.01"))
    pos = host.one(req(1))
    first = host.one(close(50, 1, pos.position_id), NOW + 5)
    assert isinstance(first, SettlementItem)
    # the reply was lost; the retry (same request id) gets the first answer, not NOT_FOUND
    assert host.one(close(50, 1, pos.position_id), NOW + 9) == first
    assert run(host.machine, Resolve(50)) == first
    host.one(AckOutbox(1))  # delivered: the answer outlives the outbox entry
    assert run(host.machine, Outbox()) == OutboxView([], 1)
    for again in (replay(host.records), restored(host.machine)):
        assert again.fingerprint() == host.machine.fingerprint()
        assert run(again, close(50, 1, pos.position_id), NOW + 20) == first
        assert run(again, Stats()).closes_manual == 1


def test_liquidation_fires_on_the_exact_tick_not_one_before() -> None:
    m = shard()
    run(m, tick("100.00", "100.01"))
    pos = run(m, req(1))
    liq = pos.liq_ticks
    above = SOL.ticks_to_price(liq + 1)
    at = SOL.ticks_to_price(liq)
    assert run(m, tick(above, above, seq=2)) == 0
    assert run(m, tick(at, at, seq=3)) == 1
    [item] = run(m, Outbox()).items
    closed = item.closed
    assert closed.reason == CloseReason.LIQUIDATION and closed.exit_ticks == liq
    assert closed.payout_micros == 0
    assert closed.house_micros == -closed.pnl_micros
    assert closed.insurance_micros == closed.margin_micros + closed.pnl_micros


def test_outbox_sequence_and_ack() -> None:
    m = shard()
    run(m, tick("100.00", "100.01"))
    results = [run(m, req(i, tp="101.00")) for i in range(1, 4)]
    assert all(isinstance(r, OpenPosition) for r in results)
    assert run(m, tick("101.00", "101.01", seq=2)) == 3
    items = run(m, Outbox()).items
    assert [i.seq for i in items] == [1, 2, 3]
    assert all(i.closed.reason == CloseReason.TAKE_PROFIT for i in items)
    assert run(m, AckOutbox(2)) == 1
    assert [i.seq for i in run(m, Outbox()).items] == [3]
    assert step(m, AckOutbox(1), NOW) == (1, [], False)  # an old ack changes nothing
    acked = step(m, AckOutbox(5), NOW)  # beyond the last seq: up to it
    assert acked.answer == 0 and acked.urgent is False  # OutboxAcked is volatile
    assert run(m, AckOutbox(3)) == 0 and run(m, Outbox()) == OutboxView([], 3)
    stats = run(m, Stats())
    assert stats.positions == 0 and stats.closes_take_profit == 3 and stats.last_seq == 3
    assert stats.outbox_len == 0 and stats.ticks_applied == 2 and stats.opens == 3
    assert m.check() == []


def test_a_shard_that_lost_its_memory_resumes_after_the_ledger_applied_seq() -> None:
    m = shard()
    run(m, tick("100.00", "100.01"))
    assert step(m, ResumeSeq(0), NOW).encoded == []
    resumed = step(m, ResumeSeq(41), NOW)
    assert resumed.answer == 0 and resumed.urgent  # numbering must be durable before closes
    assert run(m, Outbox()) == OutboxView([], 41)
    pos = run(m, req(1))
    item = run(m, close(2, 1, pos.position_id))
    assert item.seq == 42
    # at a later start the ledger has applied 42 already: it leaves the outbox
    assert run(m, ResumeSeq(42)) == 0 and run(m, Outbox()) == OutboxView([], 42)
    # a close numbered below a ledger that applied more (a shard that lost its memory again):
    # renumbered after it, and still to be delivered
    pos = run(m, req(3))
    assert run(m, close(4, 1, pos.position_id)).seq == 43
    assert run(m, ResumeSeq(50)) == 1
    assert [i.seq for i in run(m, Outbox()).items] == [51]
    assert m.check() == []


def test_ticks_of_other_assets_and_insane_ticks_are_ignored() -> None:
    m = shard()
    for t in (Tick("BTC", 10, 11, NOW, 1, "test"), Tick("SOL", 0, 5, NOW, 2, "test"),
              Tick("SOL", 6, 5, NOW, 3, "test")):
        assert step(m, ApplyTick(t), NOW) == (0, [], False)
    assert run(m, LastTick()) is None


def test_a_tick_older_than_the_last_one_closes_nothing_and_changes_nothing() -> None:
    # a feed that restarted may read the topic again: an older tick's price is superseded, and
    # a position opened since was checked against the newer one
    m = shard()
    run(m, tick("100.00", "100.01", ts_us=NOW + 1_000, seq=7))
    pos = run(m, req(1, tp="101.00"))
    before = m.fingerprint()
    for older in (tick("102.00", "102.01", ts_us=NOW, seq=9),
                  tick("102.00", "102.01", ts_us=NOW + 1_000, seq=6)):
        assert step(m, older, NOW) == (0, [], False)
    assert m.fingerprint() == before
    assert run(m, LastTick()).bid_ticks == 10_000
    # the same moment with a newer update id, or a later moment, is applied
    assert run(m, tick("100.50", "100.51", ts_us=NOW + 1_000, seq=8)) == 0
    assert run(m, tick("102.00", "102.01", ts_us=NOW + 2_000, seq=1)) == 1
    assert m.book.get(pos.position_id) is None


def test_the_last_tick_keeps_its_source_through_replay_and_snapshots() -> None:
    host = Host()
    t = Tick("SOL", 10_000, 10_001, NOW, 987_654, "backpack")
    stepped = step(host.machine, ApplyTick(t), NOW)
    assert stepped.answer == 0 and not stepped.urgent  # TickApplied rides along
    host.records.append(encode_batch(stepped.encoded))
    assert run(host.machine, LastTick()) == t
    assert run(replay(host.records), LastTick()) == t
    assert run(restored(host.machine), LastTick()) == t


# ----------------------------------------------------------------------------- out of range
def big_long(m: ShardMachine, rid: int, tp: str | None) -> OpenPosition:
    """A 100x long so large that its PnL at an absurd price does not fit an i64."""
    pos = run(m, Open(ShardOpen(rid, 1, Side.LONG, 10**12, 100,
                                None if tp is None else SOL.price_to_ticks(tp), None, None, 100)))
    assert isinstance(pos, OpenPosition)
    return pos


def test_an_absurd_price_whose_settlement_overflows_is_refused_and_changes_nothing() -> None:
    m = shard()
    run(m, raw_tick(10_000))
    pos = big_long(m, 1, tp="200.00")
    absurd = raw_tick(1_500_000_000, ts_us=NOW + 1)
    exit_pnl = (1_500_000_000 - pos.entry_ticks) * pos.qty_steps * 100
    assert exit_pnl >= 2**63  # the take-profit fires, and its PnL needs more than 64 bits
    before = m.fingerprint()
    stepped = step(m, absurd, NOW + 1)
    assert isinstance(stepped.answer, Rejected) and stepped.answer.code is Code.INVALID_REQUEST
    assert stepped.encoded == [] and m.fingerprint() == before and m.check() == []
    # without a take-profit the tick would close nothing, and it is refused all the same: a
    # price above the asset's bound never becomes the last tick (reads and closes at it could
    # not be computed in 64 bits)
    m2 = shard()
    run(m2, raw_tick(10_000))
    pos2 = big_long(m2, 1, tp=None)
    assert absurd.tick.ask_ticks > SOL.max_price_ticks
    before = m2.fingerprint()
    refused = step(m2, absurd, NOW + 1)
    assert isinstance(refused.answer, Rejected) and refused.answer.code is Code.INVALID_REQUEST
    assert refused.encoded == [] and m2.fingerprint() == before
    assert isinstance(run(m2, close(2, 1, pos2.position_id), NOW + 2), SettlementItem)


def test_a_tick_stamped_beyond_i64_is_refused_and_closes_nothing() -> None:
    m = shard()
    run(m, raw_tick(10_000))
    assert isinstance(run(m, req(1)), OpenPosition)
    before = m.fingerprint()
    for ts in (2**63, 2**64 + 5, -(2**63) - 1):
        # the price would liquidate the long: nothing may close in memory
        stepped = step(m, raw_tick(5_000, ts_us=ts), NOW)
        assert isinstance(stepped.answer, Rejected)
        assert stepped.answer.code is Code.INVALID_REQUEST and stepped.encoded == []
        assert m.fingerprint() == before
    assert len(m.book) == 1 and run(m, Outbox()).items == []


def test_values_that_do_not_fit_the_events_are_refused() -> None:
    m = shard()
    run(m, raw_tick(10_000))
    for bad in (Open(ShardOpen(2**64, 1, Side.LONG, 100 * USD, 10, None, None, None, 100)),
                Open(ShardOpen(1, 2**63, Side.LONG, 100 * USD, 10, None, None, None, 100))):
        stepped = step(m, bad, NOW)
        assert isinstance(stepped.answer, Rejected) and stepped.encoded == []
    assert len(m.book) == 0
    huge_seq = step(m, ApplyTick(Tick("SOL", 10_000, 10_001, NOW, -1, "test")), NOW)
    assert isinstance(huge_seq.answer, Rejected) and huge_seq.encoded == []
    with pytest.raises(TypeError):
        m.decide(object(), NOW)


# ----------------------------------------------------------------------------- reads
def test_reads_answer_without_events() -> None:
    m = shard()
    run(m, tick("100.00", "100.01"))
    pos = run(m, req(1, owner=4))
    item = run(m, close(2, 4, run(m, req(3, owner=4)).position_id))
    for command in (Outbox(), PositionsOf((4,)), LastTick(), OpenMargins(), AuditView(),
                    Stats()):
        assert m.decide(command, NOW)[1] == ()
    assert run(m, OpenMargins()) == {4: pos.margin_micros}
    assert run(m, AuditView()) == BooksView({4: pos.margin_micros}, [item], {4: 1}, {})


@given(st.lists(st.tuples(st.integers(1, 5), st.booleans()), min_size=1, max_size=40),
       st.lists(st.integers(0, 6), max_size=8))
@settings(max_examples=40, deadline=None)
def test_positions_of_many_matches_a_per_position_reading(
        actions: list[tuple[int, bool]], asked: list[int]) -> None:
    m = shard()
    run(m, tick("100.00", "100.01"))
    opened: list[int] = []
    for i, (owner, close_one) in enumerate(actions):
        if close_one and opened:
            victim = m.book.get(opened.pop(0))
            assert victim is not None
            run(m, close(1000 + i, victim.owner, victim.position_id), NOW + i)
        else:
            p = run(m, req(i + 1, owner=owner, margin_usd=1, leverage=2), NOW + i)
            assert isinstance(p, OpenPosition)
            opened.append(p.position_id)
    got = run(m, PositionsOf(tuple(asked)))
    for owner, positions in zip(asked, got, strict=True):
        records = [m.book.get(int(i)) for i in m.book.ids_of_owner(owner)]
        expected = sorted((r.opened_ts_us, r.position_id) for r in records if r is not None)
        assert [(p.opened_ts_us, p.position_id) for p in positions] == expected
        for p in positions:
            r = m.book.get(p.position_id)
            assert r is not None and (p.owner, p.entry_ticks, p.qty_steps, p.margin_micros,
                                      p.liq_ticks) == (r.owner, r.entry_ticks, r.qty_steps,
                                                       r.margin_micros, r.liq_ticks)
            assert p.unrealized_pnl_micros == int(m.book.unrealized_pnl_micros(
                np.array([p.position_id]), 10000, 10001)[0])


# ----------------------------------------------------------------------------- journal records
def test_the_vectorised_record_dtype_follows_the_event_layout() -> None:
    dtype = record_dtype(PositionOpened)
    assert dtype == OPENED_RECORD
    assert dtype.names == ("length", "type", *PositionOpened._fields)
    event = PositionOpened(2**34 + 256 + 3, 42, 1, 9897, 1010, 100 * USD, 10, 10_887, 9000,
                           10_500, NOW, 5000, 2**64 - 1)
    payload = encode_batch([encode(event)])
    [row] = np.frombuffer(payload, dtype, offset=1)
    assert row["length"] == len(encode(event)) and row["type"] == TYPE_CODES[PositionOpened]
    assert tuple(int(row[f]) for f in PositionOpened._fields) == event
    with pytest.raises(ValueError):
        record_dtype(TickApplied)  # a variable-length layout has no fixed record


def test_records_decode_runs_of_opens_into_arrays_equal_to_the_events() -> None:
    opens = [PositionOpened(i << 34 | 3, i, i % 2, 10_000 + i, 5 + i, 10**8, 1 + i % 90,
                            9_000 - i, 0, 0, NOW + i, 5_000, 2**64 - 1 - i)
             for i in range(1, 3 * MIN_VECTOR_RUN)]
    events: list[Event] = [TickApplied(1, 2, 3, 4, "sim"), *opens[:MIN_VECTOR_RUN - 1],
                           PositionClosed(7, 3, 9_000, NOW, 1, 77),
                           *opens[MIN_VECTOR_RUN - 1:], OpenFenced(9), OutboxAcked(1),
                           SeqResumed(5)]
    payload = encode_batch([encode(e) for e in events])
    items = shard().decode_record(payload)
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
        ["PositionClosed", "ndarray", "OpenFenced", "OutboxAcked", "SeqResumed"]
    assert shard().decode_record(encode(OpenFenced(3))) == [OpenFenced(3)]  # a bare event
    with pytest.raises(ValueError):
        shard().decode_record(payload[:-1])


def test_old_layouts_of_closes_and_ticks_still_replay() -> None:
    host = Host()
    host.one(raw_tick(10_000))
    pos = host.one(req(1))
    old_tick = struct.pack("<Bqqq", 0x13, 9_000, 9_001, NOW + 1)
    old_close = struct.pack("<BQBqqQ", 0x12, pos.position_id, 0, 9_000, NOW + 1, 1)
    m = replay([*host.records, encode_batch([old_tick, old_close])])
    [item] = run(m, Outbox()).items
    assert item.closed.exit_ticks == 9_000 and item.seq == 1
    tick_now = run(m, LastTick())
    assert (tick_now.bid_ticks, tick_now.seq, tick_now.source) == (9_000, 0, "journal")
    assert m.check() == []


def test_big_open_batches_replay_vectorised_to_the_same_ids_rows_and_answers() -> None:
    host = Host()
    host.one(raw_tick(10_000))
    first = host.call([req(i, owner=i % 7, side=Side(i % 2), leverage=1 + i % 40,
                           tp="106.00" if i % 10 == 0 else None) for i in range(1, 301)])
    assert all(isinstance(p, OpenPosition) for p in first)
    ids = [p.position_id for p in first]
    # free rows in the middle, so the next batch reuses them before fresh rows
    host.call([close(5000 + i, first[i].owner, ids[i]) for i in range(50, 120)])
    host.one(raw_tick(10_050, ts_us=NOW + 1), NOW + 1)
    second = host.call([req(1000 + i, owner=i % 3) for i in range(200)], NOW + 1)
    assert any(isinstance(item, np.ndarray)
               for item in host.machine.decode_record(host.records[-1]))
    again = replay(host.records)
    assert again.fingerprint() == host.machine.fingerprint() and again.check() == []
    assert [run(again, req(i), NOW + 1) for i in (1, 2, 1000, 1199)] == \
        [first[0], first[1], second[0], second[199]]
    # a snapshot taken mid-way plus the records after it gives the same state
    cut = 2
    middle = replay(host.records[:cut])
    assert replay(host.records[cut:], restored(middle)).fingerprint() == \
        host.machine.fingerprint()


def test_a_long_replay_remembers_only_the_newest_answers() -> None:
    opens = []
    for rid in range(1, REMEMBERED + 2 * MIN_VECTOR_RUN + 1):
        pid = (1 << 34) | ((rid - 1) << 8)
        opens.append(encode(PositionOpened(pid, rid, 0, 10_001, 999, 100 * USD, 10, 8_999, 0,
                                           0, NOW, 0, rid)))
    head, tail = opens[:MIN_VECTOR_RUN], opens[MIN_VECTOR_RUN:]
    records = [encode_batch([encode(TickApplied(10_000, 10_001, NOW))]), encode_batch(head),
               encode_batch([encode(OpenFenced(10**9))]), encode_batch(tail)]
    vector = replay(records)
    one_by_one = shard()
    for payload in records:
        for event in decode_batch(payload):
            one_by_one.apply(event)
    assert vector.fingerprint() == one_by_one.fingerprint()
    assert vector.check() == [] and len(vector.fingerprint()["results"]) == REMEMBERED
    # forgotten: whether request 1 ran is no longer known, so it is neither fenced nor run
    assert vector.decide(Resolve(1), NOW) == (Forgotten(1), ())
    assert vector.fingerprint()["forgotten"] == [(0, 10**9)]
    newest = run(vector, Resolve(len(opens)))
    assert isinstance(newest, OpenPosition) and newest.owner == len(opens)


def test_triggers_crossed_while_down_close_on_the_first_tick_after_recovery() -> None:
    host = Host()
    host.one(raw_tick(10_000))
    longs = host.call([req(i, owner=i, tp=f"{105 + i}.00") for i in range(1, 4)])
    shorts = host.call([req(i, owner=i, side=Side.SHORT) for i in range(4, 9)])
    assert all(isinstance(p, OpenPosition) for p in [*longs, *shorts])
    m = replay(host.records[1:], restored(replay(host.records[:1])))
    assert run(m, LastTick()).bid_ticks == 10_000
    # the price rose past every long's take-profit and every short's liquidation meanwhile
    assert run(m, raw_tick(11_500, ts_us=NOW + 10**7), NOW + 10**7) == 8
    reasons = sorted(i.closed.reason for i in run(m, Outbox()).items)
    assert reasons == [CloseReason.TAKE_PROFIT] * 3 + [CloseReason.LIQUIDATION] * 5
    assert len(m.book) == 0 and m.check() == []


def test_snapshots_of_the_durable_shard_still_restore() -> None:
    m = shard(tag=3)
    run(m, raw_tick(10_000))
    pos = run(m, req(11))
    run(m, Resolve(13))
    arrays, meta = m.snapshot()
    old = {k: v for k, v in arrays.items() if k not in ("results", "result_ids")}
    old["open_results"] = np.array(
        [(11, 1, 1, *pos[:2], *pos[3:12], pos.unrealized_pnl_micros), (13, 2, *[0] * 13)],
        dtype=np.int64)
    again = ShardMachine.from_snapshot(NAME, 3, SOL, 0, MAX_AGE, old, meta)
    assert again.fingerprint() == m.fingerprint()


# ----------------------------------------------------------------------------- property
OPS = st.lists(st.one_of(
    st.tuples(st.just("tick"), st.integers(-150, 150), st.integers(1, 5)),
    st.tuples(st.just("tick"), st.integers(-150, 150), st.integers(1, 5)),
    st.tuples(st.just("tick"), st.integers(-600, 600), st.integers(1, 5)),
    st.tuples(st.just("open"), st.integers(1, 4), st.sampled_from([Side.LONG, Side.SHORT]),
              st.integers(1, 500), st.sampled_from([1, 5, 20, 50, 100]),
              st.none() | st.integers(1, 200), st.none() | st.integers(1, 100)),
    st.tuples(st.just("open"), st.integers(1, 4), st.sampled_from([Side.LONG, Side.SHORT]),
              st.integers(1, 500), st.sampled_from([1, 5, 20, 50]),
              st.integers(1, 200), st.integers(1, 60)),
    st.tuples(st.just("bulk"), st.integers(MIN_VECTOR_RUN, MIN_VECTOR_RUN + 40),
              st.integers(0, 1000)),
    st.tuples(st.just("close"), st.integers(0, 1000)),
    st.tuples(st.just("resend_open"), st.integers(0, 1000)),
    st.tuples(st.just("resend_close"), st.integers(0, 1000)),
    st.tuples(st.just("resolve"), st.integers(0, 1000), st.booleans()),
    st.tuples(st.just("ack"), st.integers(0, 4)),
    st.tuples(st.just("resume"), st.integers(0, 3)),
    st.tuples(st.just("snapshot"),),
), min_size=1, max_size=40)


class Driver:
    """A live machine and a twin built only from the live one's journal records."""

    def __init__(self) -> None:
        self.live = shard(tag=5, ppm=5_000)
        self.twin = shard(tag=5, ppm=5_000)
        self.now = NOW
        self.bid = 10_000
        self.rid = 0
        self.opens: list[tuple[Open, Any]] = []
        self.closes: list[tuple[Close, Any]] = []

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def call(self, commands: list[Any]) -> list[Any]:
        answers: list[Any] = []
        encoded: list[bytes] = []
        for command in commands:
            before = self.live.fingerprint()
            self.live.decide(command, self.now)
            assert self.live.fingerprint() == before, "decide changed the state"
            stepped = step(self.live, command, self.now)
            answers.append(stepped.answer)
            encoded.extend(stepped.encoded)
            assert stepped.urgent == any(not isinstance(e, TickApplied | OutboxAcked)
                                         for e in decode_batch(encode_batch(stepped.encoded)))
        if encoded:
            self.twin.apply_batch(self.twin.decode_record(encode_batch(encoded)))
        assert self.twin.fingerprint() == self.live.fingerprint()
        assert self.live.check() == [] and self.twin.check() == []
        return answers

    def open_command(self, owner: int, side: Side, margin_usd: int, leverage: int,
                     tp_off: int | None, sl_off: int | None) -> Open:
        sign = 1 if side == Side.LONG else -1
        entry = self.bid + 1 if side == Side.LONG else self.bid
        tp = None if tp_off is None else entry + sign * tp_off
        sl = None if sl_off is None else entry - sign * sl_off
        return Open(ShardOpen(self.next_rid(), owner, side, margin_usd * USD, leverage, tp, sl,
                              None, 100))

    def run(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        self.now += 1_000
        if kind == "tick":
            self.bid = max(100, self.bid + op[1])
            assert isinstance(self.call([raw_tick(self.bid, self.bid + op[2], self.now)])[0],
                              int)
        elif kind == "open":
            command = self.open_command(*op[1:])
            [answer] = self.call([command])
            self.opens.append((command, answer))
        elif kind == "bulk":
            rng = np.random.default_rng(op[2])
            commands = [self.open_command(int(rng.integers(1, 5)), Side(int(rng.integers(0, 2))),
                                          int(rng.integers(1, 300)), int(rng.integers(1, 60)),
                                          None, None) for _ in range(op[1])]
            for command, answer in zip(commands, self.call(commands), strict=True):
                self.opens.append((command, answer))
        elif kind == "close":
            ids = self.live.book.ids().tolist()
            if ids:
                record = self.live.book.get(ids[op[1] % len(ids)])
                assert record is not None
                closing = Close(ShardClose(self.next_rid(), record.owner, record.position_id,
                                           None, 100))
                [answer] = self.call([closing])
                assert isinstance(answer, SettlementItem | Rejected)
                self.closes.append((closing, answer))
        elif kind in ("resend_open", "resend_close"):
            sent: list[tuple[Any, Any]] = [*(self.opens if kind == "resend_open"
                                              else self.closes)]
            done = [(c, a) for c, a in sent if not isinstance(a, Rejected)]
            if done:
                again, first = done[op[1] % len(done)]
                assert self.call([again]) == [first]
        elif kind == "resolve":
            rids = [c.request.request_id for c, _ in self.opens]
            rids += [c.request.request_id for c, _ in self.closes]
            if op[2] or not rids:
                rid = self.next_rid()  # never sent: fenced, and refused if it comes later
                assert self.call([Resolve(rid)]) == [None]
                if self.opens:
                    late = Open(self.opens[0][0].request._replace(request_id=rid))
                    [refused] = self.call([late])
                    assert isinstance(refused, Rejected)
                    assert refused.code is Code.PRICE_UNAVAILABLE
            else:
                self.call([Resolve(rids[op[1] % len(rids)])])
        elif kind == "ack":
            view = run(self.live, Outbox())
            self.call([AckOutbox(view.last_seq - op[1])])
        elif kind == "resume":
            view = run(self.live, Outbox())
            self.call([ResumeSeq(view.last_seq + op[1] - 1)])
        else:
            again = restored(self.live)
            assert again.fingerprint() == self.live.fingerprint() and again.check() == []
            self.live = again  # a restored machine decides as the original would


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_any_sequence_replays_from_its_journal_into_an_equal_state(
        ops: list[tuple[Any, ...]]) -> None:
    driver = Driver()
    driver.call([raw_tick(driver.bid, driver.bid + 1, driver.now)])
    for op in ops:
        driver.run(op)
    # a full replay of a fresh machine, and a snapshot of the replayed one, agree at the end
    assert restored(driver.twin).fingerprint() == driver.live.fingerprint()


def test_a_scripted_sequence_hits_every_close_reason() -> None:
    driver = Driver()
    driver.call([raw_tick(driver.bid, driver.bid + 1, driver.now)])
    ops: list[tuple[Any, ...]] = [
        ("open", 1, Side.LONG, 100, 50, 100, 50), ("open", 2, Side.SHORT, 100, 50, 100, 50),
        ("open", 3, Side.LONG, 100, 100, None, None), ("bulk", MIN_VECTOR_RUN + 3, 7),
        ("tick", 150, 1), ("tick", -300, 1), ("tick", 400, 1), ("close", 3),
        ("resend_close", 0), ("resend_open", 2), ("resolve", 0, True), ("snapshot",),
        ("ack", 1), ("resume", 0), ("tick", -2_000, 1), ("tick", 4_000, 1), ("snapshot",),
        ("resume", 3), ("close", 0),
    ]
    for op in ops:
        driver.run(op)
    stats = run(driver.live, Stats())
    assert stats.closes_take_profit and stats.closes_stop_loss and stats.closes_liquidation
    assert stats.closes_manual
