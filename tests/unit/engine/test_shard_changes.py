"""ShardMachine: changing an open position in place (SPEC "Changing an open position"): TP/SL
set, replaced or removed against the current price, margin added or removed with the
liquidation price recomputed on the grid, each refusal at its boundary, and the changes in
replay and snapshots."""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

from engine.assets import DEFAULT_ASSETS
from engine.events import PositionAmended
from engine.market import Tick
from engine.messages import OpenPosition
from engine.messages import ShardClose
from engine.messages import ShardOpen
from engine.orders import MAX_COLUMN_VALUE
from engine.orders import CloseReason
from engine.orders import Side
from engine.orders import liquidation_ticks
from engine.results import Code
from engine.results import Rejected
from engine.shard_machine import ApplyTick
from engine.shard_machine import ChangeMargin
from engine.shard_machine import Close
from engine.shard_machine import Open
from engine.shard_machine import PositionsOf
from engine.shard_machine import SetLevels
from engine.shard_machine import ShardMachine
from tests.unit.engine.test_shard_machine import MAX_AGE
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


def opened(m: ShardMachine, side: Side = Side.LONG, leverage: int = 10, sl: str | None = None,
           tp: str | None = None) -> OpenPosition:
    run(m, raw_tick(10000, 10001))
    position = run(m, req(1, side=side, leverage=leverage, sl=sl, tp=tp))
    assert isinstance(position, OpenPosition), position
    return position


def least_margin(p: OpenPosition, ok: Callable[[int], bool]) -> int:
    """The least margin (micros) of long ``p`` whose liquidation price satisfies ``ok`` (the
    liquidation price falls as the margin grows)."""
    low, high = 1, p.margin_micros
    assert ok(liquidation_ticks(SOL, Side.LONG, p.entry_ticks, p.qty_steps, high, 0))
    while low < high:
        mid = (low + high) // 2
        if ok(liquidation_ticks(SOL, Side.LONG, p.entry_ticks, p.qty_steps, mid, 0)):
            high = mid
        else:
            low = mid + 1
    return low


def refused(answer: object, code: Code) -> str:
    assert isinstance(answer, Rejected) and answer.code is code, answer
    return answer.message


def test_a_long_tp_must_be_above_the_bid_and_its_sl_between_liquidation_and_bid() -> None:
    m = shard()
    p = opened(m)  # long at 100.01, bid 100.00
    # each refusal names its bounds' prices (a trader sees neither the price the engine met
    # nor, in every view, the exact liquidation price)
    assert refused(run(m, SetLevels(1, p.position_id, 10000, None, 2)), Code.INVALID_TRIGGER) \
        == "take-profit of a long must be above the current bid (100.00)"
    changed = run(m, SetLevels(1, p.position_id, 10001, None, 3))  # one tick above the bid
    assert isinstance(changed, OpenPosition) and changed.tp_ticks == 10001
    liq = f"{p.liq_ticks // 100}.{p.liq_ticks % 100:02d}"
    assert refused(run(m, SetLevels(1, p.position_id, None, 10000, 4)), Code.INVALID_TRIGGER) \
        == f"stop-loss of a long must lie between the liquidation price ({liq}) and the bid " \
        "(100.00)"
    refused(run(m, SetLevels(1, p.position_id, None, p.liq_ticks, 5)), Code.INVALID_TRIGGER)
    changed = run(m, SetLevels(1, p.position_id, None, p.liq_ticks + 1, 6))
    assert changed.sl_ticks == p.liq_ticks + 1 and changed.tp_ticks == 10001
    assert run(m, SetLevels(1, p.position_id, None, 9999, 7)).sl_ticks == 9999  # bid - 1
    # the new levels fire, the old ones no longer
    assert run(m, raw_tick(10000, 10001)) == 0
    assert run(m, raw_tick(10001, 10002)) == 1  # bid == the new TP
    assert len(m.book) == 0


def test_a_short_sl_may_lock_in_profit_and_removing_a_level_disarms_it() -> None:
    m = shard()
    p = opened(m, Side.SHORT, tp="95")  # short at the bid 100.00, ask 100.01
    liq = f"{p.liq_ticks // 100}.{p.liq_ticks % 100:02d}"
    assert refused(run(m, SetLevels(1, p.position_id, None, 10001, 2)), Code.INVALID_TRIGGER) \
        == f"stop-loss of a short must lie between the ask (100.01) and the liquidation price " \
        f"({liq})"  # == ask
    assert refused(run(m, SetLevels(1, p.position_id, 10001, None, 3)), Code.INVALID_TRIGGER) \
        == "take-profit of a short must be below the current ask (100.01)"
    # price fell: an SL below the entry (locks in profit) is valid above the ask
    run(m, raw_tick(9800, 9801))
    locked = run(m, SetLevels(1, p.position_id, 0, 9900, 4))  # TP removed, SL 99.00
    assert locked.tp_ticks == 0 and locked.sl_ticks == 9900
    assert run(m, raw_tick(9400, 9401)) == 0  # the removed TP (95.00) no longer fires
    assert run(m, raw_tick(9899, 9900)) == 1  # ask == SL
    [item] = [i for i in m._outbox]
    assert item.closed.reason == 2 and item.closed.exit_ticks == 9900  # stop_loss at the ask


def test_adding_margin_lowers_a_longs_liquidation_price_on_the_grid() -> None:
    m = shard()
    p = opened(m, leverage=20)
    bigger = run(m, ChangeMargin(1, p.position_id, 50 * USD, 2))
    assert isinstance(bigger, OpenPosition) and bigger.margin_micros == 150 * USD
    exact = Fraction(p.entry_ticks, 100) - Fraction(150) / Fraction(p.qty_steps, 100)
    assert Fraction(bigger.liq_ticks, 100) <= exact < Fraction(bigger.liq_ticks + 1, 100)
    assert bigger.liq_ticks < p.liq_ticks and bigger.qty_steps == p.qty_steps
    # the old liquidation price no longer liquidates; the new one does
    assert run(m, raw_tick(p.liq_ticks, p.liq_ticks + 1)) == 0
    assert run(m, raw_tick(bigger.liq_ticks, bigger.liq_ticks + 1)) == 1


def test_a_margin_removal_is_refused_by_each_of_its_three_conditions() -> None:
    # 1. the notional may not exceed margin x max leverage (SOL: 100x)
    m = shard()
    p = opened(m, leverage=10)  # 100 USD margin, notional 999 USD
    notional_micros = p.entry_ticks * p.qty_steps * USD // 10**4
    floor = -(-notional_micros // SOL.max_leverage)  # the least margin that passes
    message = refused(run(m, ChangeMargin(1, p.position_id, floor - 1 - p.margin_micros, 2)),
                      Code.INVALID_REQUEST)
    assert message == "the notional would exceed the margin times the maximum leverage (100): " \
        f"the margin must stay at least {floor // USD}.{floor % USD:06d} USD"
    # 2. not liquidatable at the current price: after the bid fell, a removal that leaves
    # the liquidation price at the bid is refused, one tick below it is accepted
    run(m, raw_tick(9500, 9501))
    margin = least_margin(p, lambda liq: liq < 9500)  # liquidation price below the bid
    message = refused(run(m, ChangeMargin(1, p.position_id, margin - 1 - p.margin_micros, 3)),
                      Code.INVALID_REQUEST)
    assert "liquidated" in message
    ok = run(m, ChangeMargin(1, p.position_id, margin - p.margin_micros, 4))
    assert isinstance(ok, OpenPosition) and ok.liq_ticks < 9500 <= liquidation_ticks(
        SOL, Side.LONG, p.entry_ticks, p.qty_steps, margin - 1, 0)
    # 3. the SL must stay beyond the liquidation price
    m = shard()
    p = opened(m, leverage=10, sl="95")
    margin = least_margin(p, lambda liq: liq < 9500)  # below the SL: the removal is fine
    message = refused(run(m, ChangeMargin(1, p.position_id, margin - 1 - p.margin_micros, 5)),
                      Code.INVALID_REQUEST)
    assert "stop-loss" in message
    assert isinstance(run(m, ChangeMargin(1, p.position_id, margin - p.margin_micros, 6)),
                      OpenPosition)


def test_a_margin_change_that_leaves_no_margin_says_why() -> None:
    m = shard()
    p = opened(m, leverage=10)  # 100 USD margin
    before = m.fingerprint()
    assert refused(run(m, ChangeMargin(1, p.position_id, 0, 2)), Code.INVALID_REQUEST) == \
        "the margin change must not be zero"
    for delta in (-p.margin_micros, -p.margin_micros - 1):
        assert refused(run(m, ChangeMargin(1, p.position_id, delta, 3)), Code.INVALID_REQUEST) \
            == "a removal must leave some margin: the position holds 100.000000"
    message = refused(run(m, ChangeMargin(1, p.position_id, MAX_COLUMN_VALUE, 4)),
                      Code.INVALID_REQUEST)
    assert message.startswith("the margin would exceed the most a position may hold (")
    assert m.fingerprint() == before


def test_a_margin_that_would_move_a_liquidation_price_out_of_range_is_refused() -> None:
    # a short's liquidation price lies above its entry by margin / quantity: a BTC short of one
    # quantity step (0.00001) given the largest margin would liquidate above the book's range
    btc = DEFAULT_ASSETS["BTC"]
    m = ShardMachine("s", 0, btc, 0, 15_000_000)
    run(m, ApplyTick(Tick("BTC", 1_000_000, 1_000_001, NOW, 1, "test")))
    p = run(m, Open(ShardOpen(1, 7, Side.SHORT, USD, 1, None, None, None, 100)))
    assert isinstance(p, OpenPosition) and p.qty_steps == 1
    before = m.fingerprint()
    message = refused(run(m, ChangeMargin(7, p.position_id, MAX_COLUMN_VALUE - USD, 2)),
                      Code.INVALID_REQUEST)
    assert "liquidation price" in message
    assert m.fingerprint() == before
    largest = run(m, ChangeMargin(7, p.position_id, 10**12 * USD, 3))  # still in range
    assert isinstance(largest, OpenPosition) and largest.liq_ticks > p.liq_ticks


def test_changes_need_the_owner_a_fresh_price_and_an_open_position() -> None:
    m = shard()
    p = opened(m)
    refused(run(m, SetLevels(2, p.position_id, 10100, None, 2)), Code.NOT_FOUND)
    refused(run(m, ChangeMargin(2, p.position_id, USD, 3)), Code.NOT_FOUND)
    refused(run(m, ChangeMargin(1, 12345, USD, 4)), Code.NOT_FOUND)
    refused(run(m, SetLevels(1, p.position_id, 10100, None, 5), NOW + 16_000_000),
            Code.PRICE_UNAVAILABLE)
    refused(run(m, ChangeMargin(1, p.position_id, -p.margin_micros, 6)), Code.INVALID_REQUEST)
    refused(run(m, ChangeMargin(1, p.position_id, 0, 7)), Code.INVALID_REQUEST)


def test_changes_are_remembered_by_request_id_and_replay_into_an_equal_state() -> None:
    host = Host()
    host.one(raw_tick(10000, 10001))
    p = host.one(req(1, leverage=20))
    first = host.one(SetLevels(1, p.position_id, 10500, 9800, 2))
    assert host.one(SetLevels(1, p.position_id, 10600, None, 2)) == first  # a resend
    answer, events = host.machine.decide(ChangeMargin(1, p.position_id, 10 * USD, 3), NOW)
    assert isinstance(events[0], PositionAmended) and events[0].margin_micros == 110 * USD
    assert host.one(ChangeMargin(1, p.position_id, 10 * USD, 3)) == answer
    host.one(ChangeMargin(1, p.position_id, -5 * USD, 4))
    host.one(raw_tick(10100, 10101))
    live = host.machine.fingerprint()
    assert replay(host.records).fingerprint() == live
    assert restored(host.machine).fingerprint() == live
    assert host.machine.check() == []
    [[now]] = run(host.machine, PositionsOf((1,)))
    assert (now.margin_micros, now.tp_ticks, now.sl_ticks) == (105 * USD, 10500, 9800)


def sweeps_agree(m: ShardMachine, bid_ticks: int, ask_ticks: int) -> None:
    """The book's indexed sweep and the full one find the same positions at this price."""
    fast, full = m.book.sweep(bid_ticks, ask_ticks), m.book.naive_sweep(bid_ticks, ask_ticks)
    assert [a.tolist() for a in fast] == [a.tolist() for a in full]


def test_a_short_tp_must_be_below_the_ask_and_its_sl_below_the_liquidation_price() -> None:
    m = shard()
    p = opened(m, Side.SHORT)  # 10.00 SOL short at the bid 100.00, ask 100.01, 100 USD
    assert (p.qty_steps, p.liq_ticks) == (1000, 11000)  # 100.00 + 100 / 10.00
    refused(run(m, SetLevels(1, p.position_id, 10001, None, 2)), Code.INVALID_TRIGGER)  # == ask
    refused(run(m, SetLevels(1, p.position_id, None, 11000, 3)), Code.INVALID_TRIGGER)  # == liq
    changed = run(m, SetLevels(1, p.position_id, 10000, 10999, 4))  # a tick inside each
    assert isinstance(changed, OpenPosition) and (changed.tp_ticks, changed.sl_ticks) == \
        (10000, 10999)
    for bid, ask in ((10000, 10001), (9999, 10000), (10997, 10998), (10998, 10999)):
        sweeps_agree(m, bid, ask)
    assert run(m, raw_tick(10997, 10998)) == 0
    assert run(m, raw_tick(10998, 10999)) == 1  # the ask on the new SL, short of liquidation
    [item] = list(m._outbox)
    assert (item.closed.reason, item.closed.exit_ticks) == (2, 10999)  # stop_loss at the ask


def test_a_removal_to_exactly_the_maximum_leverage_is_taken_and_one_micro_more_is_not() -> None:
    m = shard()
    p = opened(m, leverage=10)  # 9.99 SOL at 100.01: notional 999.0999 USD
    least = p.entry_ticks * p.qty_steps * USD // 10**4 // SOL.max_leverage
    assert least * SOL.max_leverage == p.entry_ticks * p.qty_steps * USD // 10**4  # exact
    down = ChangeMargin(1, p.position_id, least - p.margin_micros, 2)
    refused(run(m, down, NOW + MAX_AGE + 1), Code.PRICE_UNAVAILABLE)  # the price is stale
    taken = run(m, down, NOW + MAX_AGE)
    assert isinstance(taken, OpenPosition) and taken.margin_micros == least == 9_990_999
    assert taken.liq_ticks == 9900  # floor(100.01 - 9.990999 / 9.99) = floor(99.0099)
    before = m.fingerprint()
    message = refused(run(m, ChangeMargin(1, p.position_id, -1, 3)), Code.INVALID_REQUEST)
    assert "leverage" in message and m.fingerprint() == before


def test_a_shorts_removal_stops_at_its_sl_and_at_the_ask_to_the_micro_dollar() -> None:
    m = shard()
    p = opened(m, Side.SHORT)  # 10.00 SOL short at 100.00 with 100 USD: liquidation 110.00
    run(m, raw_tick(10400, 10401))
    run(m, SetLevels(1, p.position_id, None, 10500, 2))
    # to 50 USD the liquidation price is 100 + 50 / 10 = 105.00, on the SL: refused; a
    # micro-dollar more margin ceils it to 105.01, beyond the SL
    before = m.fingerprint()
    message = refused(run(m, ChangeMargin(1, p.position_id, -50 * USD, 3)),
                      Code.INVALID_REQUEST)
    assert "stop-loss" in message and m.fingerprint() == before
    kept = run(m, ChangeMargin(1, p.position_id, -50 * USD + 1, 4))
    assert isinstance(kept, OpenPosition) and kept.liq_ticks == 10501
    for ask in (10499, 10500, 10501):
        sweeps_agree(m, ask - 1, ask)
    run(m, SetLevels(1, p.position_id, None, 0, 5))  # the SL removed: liquidation guards it
    # to 40.10 USD the liquidation price is 104.01, the ask: refused; a micro-dollar more
    # ceils it to 104.02
    before = m.fingerprint()
    message = refused(run(m, ChangeMargin(1, p.position_id, 40_100_000 - kept.margin_micros,
                                          6)), Code.INVALID_REQUEST)
    assert "liquidated" in message and m.fingerprint() == before
    last = run(m, ChangeMargin(1, p.position_id, 40_100_001 - kept.margin_micros, 7))
    assert isinstance(last, OpenPosition) and last.liq_ticks == 10402
    for ask in (10401, 10402):
        sweeps_agree(m, ask - 1, ask)
    assert run(m, raw_tick(10400, 10401)) == 0
    assert run(m, raw_tick(10401, 10402)) == 1  # the ask on the new liquidation price
    [item] = list(m._outbox)
    assert (item.closed.reason, item.closed.margin_micros, item.closed.payout_micros) == \
        (int(CloseReason.LIQUIDATION), 40_100_001, 0)


def test_a_maintenance_margin_is_no_removal_limit_of_its_own_but_a_partial_closes() -> None:
    # a rate of 1 / max leverage: the margin at the leverage bound is the maintenance margin
    m = shard(ppm=10_000)
    p = opened(m, leverage=10)  # 9.99 SOL at 100.01: notional 999.0999 USD, mm 9.990999
    run(m, raw_tick(10100, 10101))  # in profit: the bid above the entry
    up = run(m, ChangeMargin(1, p.position_id, 9_991_000 - p.margin_micros, 2))  # mm + 1e-6
    assert isinstance(up, OpenPosition)
    # a third closed: floor(9.991 * 333 / 999) = 3.330333 USD; the rest's 6.660667 USD is a
    # micro-dollar above its maintenance margin (0.01 * 100.01 * 6.66): taken
    part = run(m, Close(ShardClose(3, 1, p.position_id, None, 100, 333)))
    assert part.closed.margin_micros == 3_330_333
    # down to the maximum leverage, 6.660666 USD, which is the maintenance margin: the
    # liquidation price is the entry, below the bid; SPEC refuses none of it
    at_bound = run(m, ChangeMargin(1, p.position_id, -1, 4))
    assert isinstance(at_bound, OpenPosition), at_bound
    assert (at_bound.margin_micros, at_bound.liq_ticks) == (6_660_666, 10001)
    refused(run(m, ChangeMargin(1, p.position_id, -1, 5)), Code.INVALID_REQUEST)  # 1e-6 more
    # a half closed would leave 3.330333 USD, exactly the rest's maintenance margin: refused
    before = m.fingerprint()
    message = refused(run(m, Close(ShardClose(6, 1, p.position_id, None, 100, 333))),
                      Code.INVALID_REQUEST)
    assert "maintenance" in message and m.fingerprint() == before
    for bid in (10001, 10002):
        sweeps_agree(m, bid, bid + 1)
    assert run(m, raw_tick(10002, 10003)) == 0
    assert run(m, raw_tick(10001, 10002)) == 1  # liquidated on its entry price
    assert m.check() == []
