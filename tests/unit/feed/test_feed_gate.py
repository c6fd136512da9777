"""The order and jump gate: out-of-order updates, jumps held, confirmed or dropped."""

from __future__ import annotations

import pytest
from engine.market import Tick
from feed.gate import TickGate
from feed.gate import within_band


def tick(mid: int, ts: int, asset: str = "SOL", seq: int = 0) -> Tick:
    return Tick(asset, mid, mid, ts, seq or ts, "test")


def test_band_is_exact_on_the_mid() -> None:
    ref = tick(10_000, 1)
    assert within_band(tick(11_000, 2), ref, 1000)  # +10.00% is inside a 1000 bp band
    assert not within_band(tick(11_001, 2), ref, 1000)
    assert within_band(tick(9_000, 2), ref, 1000)
    assert not within_band(tick(8_999, 2), ref, 1000)
    # the mid of 9999/10001 is 10000: the spread itself is not a move
    assert within_band(Tick("SOL", 9_999, 10_001, 2, 2, "t"), ref, 1)


def test_first_tick_and_small_moves_pass() -> None:
    gate = TickGate(1000)
    assert gate.admit(tick(100, 1)) == [tick(100, 1)]
    assert gate.admit(tick(105, 2)) == [tick(105, 2)]
    assert gate.last["SOL"] == tick(105, 2) and not gate.dropped


def test_older_update_is_dropped_equal_and_newer_pass() -> None:
    gate = TickGate(1000)
    gate.admit(tick(100, 10, seq=5))
    assert gate.admit(tick(100, 9, seq=50)) == []  # older ts_us
    assert gate.admit(tick(100, 10, seq=4)) == []  # same ts_us, older seq
    assert gate.admit(tick(101, 10, seq=5)) == [tick(101, 10, seq=5)]  # the same update again
    assert gate.admit(tick(102, 11, seq=1)) == [tick(102, 11, seq=1)]
    assert gate.dropped == {"out_of_order": 2}


def test_jump_held_then_confirmed() -> None:
    gate = TickGate(1000)
    gate.admit(tick(100, 1))
    assert gate.admit(tick(150, 2)) == []  # +50%: held
    assert gate.held["SOL"] == tick(150, 2) and gate.last["SOL"] == tick(100, 1)
    # within 10% of the held one: confirmed, and the held price is delivered before it (SPEC:
    # the held tick is accepted; a position it crosses closes at it)
    assert gate.admit(tick(152, 3)) == [tick(150, 2), tick(152, 3)]
    assert gate.last["SOL"] == tick(152, 3) and not gate.held
    assert gate.confirmed == 1 and gate.held_total == 1 and not gate.dropped


def test_jump_dropped_when_the_next_tick_returns() -> None:
    gate = TickGate(1000)
    gate.admit(tick(100, 1))
    assert gate.admit(tick(1, 2)) == []  # -99%: held
    assert gate.admit(tick(101, 3)) == [tick(101, 3)]  # back near the last accepted: bad print
    assert gate.dropped == {"jump": 1} and gate.confirmed == 0 and not gate.held


def test_jump_replaced_by_another_jump() -> None:
    gate = TickGate(1000)
    gate.admit(tick(100, 1))
    assert gate.admit(tick(200, 2)) == []
    assert gate.admit(tick(400, 3)) == []  # neither near 100 nor near 200: 200 is dropped
    assert gate.held["SOL"] == tick(400, 3) and gate.dropped == {"jump": 1}
    assert gate.admit(tick(410, 4)) == [tick(400, 3), tick(410, 4)]  # confirms 400
    assert gate.confirmed == 1 and gate.held_total == 2


def test_assets_are_independent() -> None:
    gate = TickGate(1000)
    gate.admit(tick(100, 1, "SOL"))
    gate.admit(tick(5000, 1, "BTC"))
    assert gate.admit(tick(300, 2, "SOL")) == []
    assert gate.admit(tick(5100, 2, "BTC")) == [tick(5100, 2, "BTC")]
    assert gate.admit_all({"SOL": tick(310, 3, "SOL"), "BTC": tick(5000, 1, "BTC")}) == [
        tick(300, 2, "SOL"), tick(310, 3, "SOL")]
    assert gate.dropped == {"out_of_order": 1}


@pytest.mark.parametrize("band", [0, -5])
def test_band_must_be_positive(band: int) -> None:
    with pytest.raises(ValueError):
        TickGate(band)


def test_a_tick_not_newer_than_the_held_one_neither_confirms_nor_passes_it() -> None:
    """An update older than the held jump would, confirming it, go out after it: older after
    newer (the shards drop it, the quote shows it). It does not confirm it: the held one is
    dropped as a jump, and the update is judged on its own (here a jump from the last
    delivered one too: held in its place). The held one sent again is out of order."""
    gate = TickGate(1000)
    gate.admit(tick(100, 5))
    assert gate.admit(tick(150, 10)) == []  # held
    assert gate.admit(tick(150, 10)) == []  # the held one again
    assert gate.dropped == {"out_of_order": 1} and gate.held["SOL"] == tick(150, 10)
    assert gate.admit(tick(151, 9)) == []  # older than the held one, near it
    assert gate.dropped == {"out_of_order": 1, "jump": 1} and gate.held["SOL"] == tick(151, 9)
    assert gate.last["SOL"] == tick(100, 5) and gate.confirmed == 0
    assert gate.admit(tick(152, 11)) == [tick(151, 9), tick(152, 11)]
    assert gate.last["SOL"] == tick(152, 11) and gate.confirmed == 1


def test_a_jump_stamped_ahead_holds_back_no_update_after_it() -> None:
    """A bad print stamped seconds ahead (within the clock skew the feed allows) is held as a
    jump. The market's next updates, stamped before it, were dropped as out of order until its
    time came, one such print every two seconds freezing the asset's price for good though
    each ended dropped. The next update drops it and passes; so do the ones after it."""
    gate = TickGate(1000)
    assert gate.admit(tick(100, 5)) == [tick(100, 5)]
    assert gate.admit(tick(50, 4_500)) == []  # held
    assert gate.admit(tick(99, 6)) == [tick(99, 6)]
    assert gate.held == {} and gate.dropped == {"jump": 1}
    assert gate.admit(tick(200, 4_600)) == []  # the next such print
    assert gate.admit(tick(98, 7)) == [tick(98, 7)]
    assert gate.admit(tick(97, 8)) == [tick(97, 8)]
    assert gate.dropped == {"jump": 2} and gate.last["SOL"] == tick(97, 8)


def test_a_move_of_exactly_the_band_passes_one_step_more_is_held() -> None:
    for mid, delivered in ((11_000, True), (11_001, False), (9_000, True), (8_999, False)):
        gate = TickGate(1000)
        gate.admit(tick(10_000, 1))
        assert gate.admit(tick(mid, 2)) == ([tick(mid, 2)] if delivered else []), mid
        assert gate.held == ({} if delivered else {"SOL": tick(mid, 2)}), mid


@pytest.mark.parametrize(("mid", "confirms"), [(22_000, True), (22_001, False),
                                               (18_000, True), (17_999, False)])
def test_the_next_tick_confirms_a_jump_up_to_the_held_ones_band_edge(mid: int,
                                                                     confirms: bool) -> None:
    gate = TickGate(1000)
    gate.admit(tick(10_000, 1))
    assert gate.admit(tick(20_000, 2)) == []  # held
    if confirms:
        assert gate.admit(tick(mid, 3)) == [tick(20_000, 2), tick(mid, 3)]
        assert gate.last["SOL"] == tick(mid, 3) and not gate.held and not gate.dropped
    else:  # a second jump: the first is dropped, the second held in its place
        assert gate.admit(tick(mid, 3)) == []
        assert gate.held == {"SOL": tick(mid, 3)} and gate.dropped == {"jump": 1}
        assert gate.last["SOL"] == tick(10_000, 1)
