"""ShardMachine: partial closes (SPEC "Partial close"): the closed part's margin floored in
proportion and settled like a close of that part, the rest open under the same id with its
liquidation price recomputed on the grid, the close's own id, and all of it through replay,
resends and snapshots (old snapshots without close ids too)."""

from __future__ import annotations

from fractions import Fraction

from engine.events import PositionReduced
from engine.messages import ClosedPosition
from engine.messages import OpenPosition
from engine.messages import SettlementItem
from engine.messages import ShardClose
from engine.orders import CloseReason
from engine.orders import Side
from engine.orders import liquidation_ticks
from engine.position_ids import PARTIAL_CLOSE_FLAG
from engine.position_ids import book_tag_of
from engine.results import Code
from engine.results import Rejected
from engine.shard_machine import Close
from engine.shard_machine import Outbox
from engine.shard_machine import PositionsOf
from engine.shard_machine import ShardMachine
from numpy.lib import recfunctions
from tests.unit.engine.test_shard_machine import NOW
from tests.unit.engine.test_shard_machine import SOL
from tests.unit.engine.test_shard_machine import USD
from tests.unit.engine.test_shard_machine import Host
from tests.unit.engine.test_shard_machine import raw_tick
from tests.unit.engine.test_shard_machine import replay
from tests.unit.engine.test_shard_machine import req
from tests.unit.engine.test_shard_machine import restored
from tests.unit.engine.test_shard_machine import run
from tests.unit.engine.test_shard_machine import shard

PPM = 5_000  # maintenance margin 0.5%


def part(rid: int, position_id: int, qty_steps: int, owner: int = 1) -> Close:
    return Close(ShardClose(rid, owner, position_id, None, 100, qty_steps))


def closed_of(answer: object) -> ClosedPosition:
    assert isinstance(answer, SettlementItem) and isinstance(answer.closed, ClosedPosition), \
        answer
    return answer.closed


def rest_of(m: ShardMachine, owner: int = 1) -> OpenPosition:
    [[rest]] = run(m, PositionsOf((owner,)))
    assert isinstance(rest, OpenPosition)
    return rest


def exact_long_liq(entry_ticks: int, qty_steps: int, margin_micros: int) -> Fraction:
    """entry - (margin - mm) / quantity, in USD (SOL: 2 price and 2 quantity decimals)."""
    entry, qty = Fraction(entry_ticks, 100), Fraction(qty_steps, 100)
    mm = Fraction(PPM, 10**6) * entry * qty
    return entry - (Fraction(margin_micros, USD) - mm) / qty


def test_a_partial_close_floors_the_closed_margin_and_recomputes_the_rests_liquidation() -> None:
    m = shard(ppm=PPM)
    run(m, raw_tick(10000, 10001))
    p = run(m, req(1, leverage=10))  # long 9.99 SOL at 100.01 with 100 USD
    assert (p.qty_steps, p.margin_micros) == (999, 100 * USD)
    closed = closed_of(run(m, part(2, p.position_id, 333)))  # close 3.33 SOL at the bid 100.00
    # margin floor(100 * 333 / 999) USD = 33.333333; PnL (100.00 - 100.01) * 3.33 = -0.0333
    assert (closed.qty_steps, closed.margin_micros) == (333, 33_333_333)
    assert (closed.exit_ticks, closed.pnl_micros, closed.payout_micros) == (10000, -33_300,
                                                                            33_300_033)
    assert (closed.house_micros, closed.insurance_micros) == (33_300, 0)
    assert closed.partial == 1 and closed.reason == CloseReason.MANUAL
    assert closed.close_id == PARTIAL_CLOSE_FLAG | 1 << 8 | 0  # settlement 1 of book 0
    assert closed.close_id != p.position_id and book_tag_of(closed.close_id) == m.book_tag
    # the rest: same id, entry, leverage; 6.66 SOL with the other 66.666667 USD
    rest = rest_of(m)
    assert (rest.position_id, rest.entry_ticks, rest.leverage) == (p.position_id, 10001, 10)
    assert (rest.qty_steps, rest.margin_micros) == (666, 66_666_667)
    exact = exact_long_liq(10001, 666, 66_666_667)
    assert Fraction(rest.liq_ticks, 100) <= exact < Fraction(rest.liq_ticks + 1, 100)
    assert rest.liq_ticks == liquidation_ticks(SOL, Side.LONG, 10001, 666, 66_666_667, PPM)
    assert m.check() == []
    # one tick above the rest's liquidation price nothing happens; at it the rest goes
    assert run(m, raw_tick(rest.liq_ticks + 1, rest.liq_ticks + 2)) == 0
    assert run(m, raw_tick(rest.liq_ticks, rest.liq_ticks + 1)) == 1
    view = run(m, Outbox())
    liquidated = view.items[-1].closed
    assert liquidated.reason == CloseReason.LIQUIDATION and liquidated.partial == 0
    assert (liquidated.qty_steps, liquidated.margin_micros) == (666, 66_666_667)
    assert liquidated.close_id == p.position_id and liquidated.payout_micros == 0
    assert len(m.book) == 0 and m.check() == []


def test_the_floor_leaves_the_rest_at_least_its_share_so_its_liquidation_never_worsens() -> None:
    m = shard(ppm=PPM)
    run(m, raw_tick(10000, 10001))
    p = run(m, req(1, margin_usd=7, leverage=100))  # a position near its liquidation price
    for rid, qty in enumerate((p.qty_steps // 3, 1, p.qty_steps // 5), start=2):
        before = rest_of(m)
        closed = closed_of(run(m, part(rid, p.position_id, qty)))
        rest = rest_of(m)
        assert closed.margin_micros == before.margin_micros * qty // before.qty_steps
        assert closed.margin_micros + rest.margin_micros == before.margin_micros
        assert rest.qty_steps == before.qty_steps - qty
        assert rest.liq_ticks <= before.liq_ticks  # a long's: never closer to the price
    assert m.check() == []


def test_the_rest_keeps_its_take_profit_and_stop_loss() -> None:
    m = shard()
    run(m, raw_tick(10000, 10001))
    p = run(m, req(1, side=Side.SHORT, tp="95", sl="105"))  # short at the bid 100.00
    closed = closed_of(run(m, part(2, p.position_id, 100)))
    assert (closed.tp_ticks, closed.sl_ticks) == (9500, 10500)
    rest = rest_of(m)
    assert (rest.tp_ticks, rest.sl_ticks) == (9500, 10500)
    assert rest.qty_steps == p.qty_steps - 100
    assert run(m, raw_tick(9499, 9501)) == 0  # the ask one tick above the TP
    assert run(m, raw_tick(9499, 9500)) == 1  # the ask at the TP
    tp = run(m, Outbox()).items[-1].closed
    assert tp.reason == CloseReason.TAKE_PROFIT and tp.qty_steps == rest.qty_steps
    assert tp.exit_ticks == 9500 and not tp.partial


def test_the_quantity_must_be_a_part_and_all_of_it_is_a_whole_close() -> None:
    m = shard()
    run(m, raw_tick(10000, 10001))
    p = run(m, req(1))
    held = f"{p.qty_steps // 100}.{p.qty_steps % 100:02d}"  # SOL: 2 quantity decimals
    for rid, qty in ((2, p.qty_steps + 1), (3, -1), (4, 2**70)):
        refused = run(m, part(rid, p.position_id, qty))
        assert isinstance(refused, Rejected) and refused.code is Code.INVALID_REQUEST, refused
        if rid == 2:  # what may be closed is named
            assert refused.message == \
                f"quantity must be above zero and at most the position's ({held})", refused
    assert rest_of(m).qty_steps == p.qty_steps
    assert isinstance(run(m, part(5, p.position_id, 1, owner=2)), Rejected)  # not the owner's
    whole = closed_of(run(m, part(6, p.position_id, p.qty_steps)))
    assert whole.partial == 0 and whole.close_id == p.position_id
    assert whole.qty_steps == p.qty_steps and whole.margin_micros == p.margin_micros
    assert len(m.book) == 0


def test_each_close_has_its_own_id_and_the_last_one_is_the_positions() -> None:
    m = shard(tag=7)
    run(m, raw_tick(10000, 10001))
    p = run(m, req(1))
    ids = [closed_of(run(m, part(rid, p.position_id, 100))).close_id for rid in (2, 3, 4)]
    ids.append(closed_of(run(m, part(5, p.position_id, 0))).close_id)  # the rest, whole
    assert ids == [PARTIAL_CLOSE_FLAG | seq << 8 | 7 for seq in (1, 2, 3)] + [p.position_id]
    assert [item.closed.partial for item in run(m, Outbox()).items] == [1, 1, 1, 0]
    assert sum(item.closed.qty_steps for item in run(m, Outbox()).items) == p.qty_steps


def test_partial_closes_are_remembered_replayed_and_restored_from_old_snapshots() -> None:
    host = Host(shard(ppm=PPM))
    host.one(raw_tick(10000, 10001))
    p = host.one(req(1, leverage=20))
    answer, events = host.machine.decide(part(2, p.position_id, 250), NOW)
    assert [type(e) for e in events] == [PositionReduced]
    first = host.one(part(2, p.position_id, 250))
    assert first == answer
    assert host.one(part(2, p.position_id, 400)) == first  # a resend: the first answer
    host.one(part(3, p.position_id, 100))
    host.one(raw_tick(10100, 10101))
    live = host.machine.fingerprint()
    assert replay(host.records, shard(ppm=PPM)).fingerprint() == live
    assert restored(host.machine).fingerprint() == live
    # a snapshot written before close ids: whole closes only, each named by its position
    m = shard()
    m_host = Host(m)
    m_host.one(raw_tick(10000, 10001))
    q = m_host.one(req(1))
    m_host.one(Close(ShardClose(9, 1, q.position_id, None, 100)))
    arrays, meta = m.snapshot()
    for name in ("outbox", "results"):
        arrays[name] = recfunctions.drop_fields(arrays[name], ["close_id", "partial"],
                                                usemask=False)
    old = ShardMachine.from_snapshot(m.name, m.book_tag, m.asset, m.maintenance_margin_ppm,
                                     m.max_price_age_us, arrays, meta)
    assert old.fingerprint() == m.fingerprint()
    assert closed_of(run(old, Close(ShardClose(9, 1, q.position_id, None, 100)))).close_id \
        == q.position_id
