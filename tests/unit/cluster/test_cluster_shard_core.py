"""ShardCore: opens at the shard's own price, manual closes, sweeps, outbox sequencing."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.messages import ShardClose, ShardOpen
from cluster.trading.placement import ShardSpec
from cluster.shard_core import ShardCore, slippage_exceeded
from engine.assets import DEFAULT_ASSETS
from engine.market import Tick
from engine.orders import CloseReason, Side
from engine.results import Code, Rejected

SOL = DEFAULT_ASSETS["SOL"]
NOW = 1_800_000_000_000_000
MAX_AGE = 15_000_000


def shard(tag: int = 0) -> ShardCore:
    return ShardCore(ShardSpec("shard-SOL-0", "SOL", 0, 1, tag), SOL, 0, MAX_AGE)


def tick(bid: str, ask: str, ts_us: int = NOW, seq: int = 1) -> Tick:
    return Tick("SOL", SOL.price_to_ticks(bid), SOL.price_to_ticks(ask), ts_us, seq, "test")


def req(rid: int, owner: int = 1, side: Side = Side.LONG, margin_usd: int = 100,
        leverage: int = 10, tp: str | None = None, sl: str | None = None,
        current: str | None = None, bps: int = 100) -> ShardOpen:
    return ShardOpen(rid, owner, side, margin_usd * 10**6, leverage,
                     None if tp is None else SOL.price_to_ticks(tp),
                     None if sl is None else SOL.price_to_ticks(sl),
                     None if current is None else SOL.price_to_ticks(current), bps)


def test_long_opens_at_the_ask_with_floored_quantity_and_exact_liquidation_price() -> None:
    core = shard()
    core.apply_ticks([tick("100.00", "100.01")], NOW)
    [pos] = core.open_many([req(1)], NOW)
    assert not isinstance(pos, Rejected)
    assert pos.entry_ticks == 10001
    # quantity = floor_to_step(100 * 10 / 100.01) = 9.99
    assert pos.qty_steps == 999
    exact_liq = Fraction(10001, 100) - Fraction(100) / Fraction(999, 100)
    assert Fraction(pos.liq_ticks, 100) <= exact_liq < Fraction(pos.liq_ticks + 1, 100)
    # marked at the bid right away: (100.00 - 100.01) * 9.99 = -0.0999
    assert pos.unrealized_pnl_micros == -99_900
    assert core.positions_of(1)[0].position_id == pos.position_id
    assert core.positions_of(2) == []


def test_short_opens_at_the_bid() -> None:
    core = shard()
    core.apply_ticks([tick("100.00", "100.01")], NOW)
    [pos] = core.open_many([req(1, side=Side.SHORT)], NOW)
    assert not isinstance(pos, Rejected)
    assert pos.entry_ticks == 10000 and pos.qty_steps == 1000
    exact_liq = Fraction(100) + Fraction(100) / Fraction(10)
    assert Fraction(pos.liq_ticks - 1, 100) < exact_liq <= Fraction(pos.liq_ticks, 100)


def test_no_price_or_stale_price_refuses_opens_and_closes() -> None:
    core = shard()
    [r] = core.open_many([req(1)], NOW)
    assert isinstance(r, Rejected) and r.code is Code.PRICE_UNAVAILABLE
    core.apply_ticks([tick("100.00", "100.01", ts_us=NOW)], NOW)
    [pos] = core.open_many([req(2)], NOW + MAX_AGE)  # exactly the max age: still fresh
    assert not isinstance(pos, Rejected)
    [r] = core.open_many([req(3)], NOW + MAX_AGE + 1)
    assert isinstance(r, Rejected) and r.code is Code.PRICE_UNAVAILABLE
    [r2] = core.close_many([ShardClose(0, 1, pos.position_id, None, 100)], NOW + MAX_AGE + 1)
    assert isinstance(r2, Rejected) and r2.code is Code.PRICE_UNAVAILABLE
    assert len(core.book) == 1 and core.outbox() == []


def test_slippage_is_checked_against_the_client_price_but_never_used_as_price() -> None:
    assert not slippage_exceeded(10100, 10000, 100)
    assert slippage_exceeded(10101, 10000, 100)
    core = shard()
    core.apply_ticks([tick("100.00", "101.01")], NOW)
    [r] = core.open_many([req(1, current="100.00")], NOW)  # 101 bps away
    assert isinstance(r, Rejected) and r.code is Code.PRICE_MOVED
    [pos] = core.open_many([req(2, current="100.00", bps=200)], NOW)
    assert not isinstance(pos, Rejected) and pos.entry_ticks == 10101
    [c] = core.close_many([ShardClose(0, 1, pos.position_id, SOL.price_to_ticks("90"), 100)], NOW)
    assert isinstance(c, Rejected) and c.code is Code.PRICE_MOVED
    assert len(core.book) == 1


def test_resent_open_returns_the_first_result_and_opens_once() -> None:
    core = shard()
    core.apply_ticks([tick("100.00", "100.01")], NOW)
    [first] = core.open_many([req(7)], NOW)
    [again] = core.open_many([req(7)], NOW + 1)
    assert first == again and len(core.book) == 1


def test_resolve_opens_fences_requests_that_never_arrived() -> None:
    core = shard()
    core.apply_ticks([tick("100.00", "100.01")], NOW)
    [pos] = core.open_many([req(1)], NOW)
    assert core.resolve_opens([1, 2]) == [pos, None]
    [late] = core.open_many([req(2)], NOW)  # the lost request finally arrives: refused
    assert isinstance(late, Rejected)
    assert len(core.book) == 1


def test_close_of_unknown_or_foreign_position_is_the_same_not_found() -> None:
    core = shard()
    core.apply_ticks([tick("100.00", "100.01")], NOW)
    [pos] = core.open_many([req(1, owner=1)], NOW)
    assert not isinstance(pos, Rejected)
    foreign, unknown = core.close_many([ShardClose(0, 2, pos.position_id, None, 100),
                                        ShardClose(0, 2, pos.position_id + 256, None, 100)], NOW)
    assert foreign == unknown
    assert isinstance(foreign, Rejected) and foreign.code is Code.NOT_FOUND
    [item] = core.close_many([ShardClose(0, 1, pos.position_id, None, 100)], NOW + 5)
    assert not isinstance(item, Rejected)
    assert item.seq == 1 and item.closed.reason == CloseReason.MANUAL
    assert item.closed.exit_ticks == 10000 and item.closed.closed_ts_us == NOW + 5
    assert item.closed.pnl_micros == -99_900
    assert item.closed.payout_micros == 100_000_000 - 99_900
    assert core.outbox() == [item]


def test_liquidation_fires_on_the_exact_tick_not_one_before() -> None:
    core = shard()
    core.apply_ticks([tick("100.00", "100.01")], NOW)
    [pos] = core.open_many([req(1)], NOW)
    assert not isinstance(pos, Rejected)
    liq = pos.liq_ticks
    above = SOL.ticks_to_price(liq + 1)
    at = SOL.ticks_to_price(liq)
    assert core.apply_ticks([tick(above, above, seq=2)], NOW) == 0
    assert core.apply_ticks([tick(at, at, seq=3)], NOW) == 1
    [item] = core.outbox()
    closed = item.closed
    assert closed.reason == CloseReason.LIQUIDATION and closed.exit_ticks == liq
    assert closed.payout_micros == 0
    assert closed.house_micros == -closed.pnl_micros
    assert closed.insurance_micros == closed.margin_micros + closed.pnl_micros


def test_outbox_sequence_and_ack() -> None:
    core = shard()
    core.apply_ticks([tick("100.00", "100.01")], NOW)
    results = core.open_many([req(i, tp="101.00") for i in range(1, 4)], NOW)
    assert all(not isinstance(r, Rejected) for r in results)
    assert core.apply_ticks([tick("101.00", "101.01", seq=2)], NOW) == 3
    assert [i.seq for i in core.outbox()] == [1, 2, 3]
    assert all(i.closed.reason == CloseReason.TAKE_PROFIT for i in core.outbox())
    assert core.ack_outbox(2) == 1
    assert [i.seq for i in core.outbox()] == [3]
    assert core.ack_outbox(1) == 1  # an old ack changes nothing
    assert core.ack_outbox(3) == 0
    stats = core.stats()
    assert stats.positions == 0 and stats.closes_take_profit == 3 and stats.last_seq == 3


def test_ticks_of_other_assets_and_insane_ticks_are_ignored() -> None:
    core = shard()
    core.apply_ticks([Tick("BTC", 10, 11, NOW, 1, "test"), Tick("SOL", 0, 5, NOW, 2, "test"),
                      Tick("SOL", 6, 5, NOW, 3, "test")], NOW)
    assert core.last_tick is None


@given(st.lists(st.tuples(st.integers(1, 5), st.booleans()), min_size=1, max_size=40),
       st.lists(st.integers(0, 6), max_size=8))
@settings(max_examples=40, deadline=None)
def test_positions_of_many_matches_a_per_position_reading(
        actions: list[tuple[int, bool]], asked: list[int]) -> None:
    core = shard()
    core.apply_ticks([tick("100.00", "100.01")], NOW)
    opened: list[int] = []
    for i, (owner, close_one) in enumerate(actions):
        if close_one and opened:
            victim = core.book.get(opened.pop(0))
            assert victim is not None
            core.close_many([ShardClose(0, victim.owner, victim.position_id, None, 100)], NOW + i)
        else:
            [p] = core.open_many([req(i + 1, owner=owner, margin_usd=1, leverage=2)], NOW + i)
            assert not isinstance(p, Rejected)
            opened.append(p.position_id)
    got = core.positions_of_many(asked)
    for owner, positions in zip(asked, got, strict=True):
        records = [core.book.get(int(i)) for i in core.book.ids_of_owner(owner)]
        expected = sorted((r.opened_ts_us, r.position_id) for r in records if r is not None)
        assert [(p.opened_ts_us, p.position_id) for p in positions] == expected
        for p in positions:
            r = core.book.get(p.position_id)
            assert r is not None and (p.owner, p.entry_ticks, p.qty_steps, p.margin_micros,
                                      p.liq_ticks) == (r.owner, r.entry_ticks, r.qty_steps,
                                                       r.margin_micros, r.liq_ticks)
            assert p.unrealized_pnl_micros == int(core.book.unrealized_pnl_micros(
                np.array([p.position_id]), 10000, 10001)[0])
