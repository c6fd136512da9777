"""Batch conflation and the bounded per-shard fan-out bookkeeping."""

from __future__ import annotations

from typing import NamedTuple

from engine.assets import DEFAULT_ASSETS
from engine.market import Tick
from feed.conflation import BatchConflator
from feed.conflation import ShardFanout
from feed.gate import TickGate
from feed.message import message_from_ticks


class Rec(NamedTuple):
    key: bytes | None
    value: bytes | None


def rec(asset: str, bid: int, ts: int, seq: int = 0) -> Rec:
    a = DEFAULT_ASSETS[asset]
    msg = message_from_ticks(a, bid, bid + 1, ts, seq or ts, "sim")
    return Rec(msg.key, msg.to_json_bytes())


def test_newest_per_asset_within_a_partition() -> None:
    c = BatchConflator(DEFAULT_ASSETS)
    part = [rec("SOL", 100 + i, 1000 + i) for i in range(50)]
    out = c.newest([part])
    assert out == {"SOL": Tick("SOL", 149, 150, 1049, 1049, "sim")}
    assert c.consumed == 50 and c.conflated == 49
    assert c.decoder.decoded == 1  # older records are skipped by key, never decoded


def test_malformed_newest_falls_back_to_previous_valid() -> None:
    c = BatchConflator(DEFAULT_ASSETS)
    part = [rec("SOL", 100, 1), rec("SOL", 101, 2), Rec(b"SOL_USDC", b"garbage"),
            Rec(b"SOL_USDC", rec("SOL", 102, 3).value.replace(b'"bid":"1.02"', b'"bid":"0"'))]  # type: ignore[union-attr]
    out = c.newest([part])
    assert out["SOL"].bid_ticks == 101
    assert c.decoder.dropped == {"not_json": 1, "bad_price": 1}
    assert c.conflated == 1


def test_out_of_bounds_newest_falls_back_to_previous_valid() -> None:
    now = 10**15
    c = BatchConflator(DEFAULT_ASSETS)
    part = [rec("SOL", 100, now - 1), rec("SOL", 101, now - 20_000_000),
            rec("SOL", 102, now + 60_000_000)]
    assert c.newest([part], now_us=now)["SOL"].bid_ticks == 100
    assert c.decoder.dropped == {"future": 1, "stale": 1}


def test_newest_older_than_delivered_falls_back() -> None:
    gate = TickGate(1000)
    gate.admit(Tick("SOL", 100, 101, 50, 50, "sim"))
    c = BatchConflator(DEFAULT_ASSETS, gate=gate)
    part = [rec("SOL", 101, 60), rec("SOL", 102, 40)]  # the newest offset is an older update
    assert c.newest([part])["SOL"].bid_ticks == 101
    assert gate.dropped == {"out_of_order": 1}


def test_newest_not_newer_than_the_held_jump_falls_back() -> None:
    """A jump is held; the batch holds a tick that confirms it and, read after it, an older
    update. The newest offset was taken as the asset's tick (it is not older than the last
    delivered one), the gate dropped it as out of order, and the confirming tick had been
    skipped as conflated: the held price stayed held, while the same records read one a poll
    confirmed it. The scan falls back past a tick not newer than the held one too (passed
    over for the newer one, counted as conflated)."""
    gate = TickGate(1000)
    gate.admit(Tick("SOL", 100, 101, 5, 5, "sim"))
    assert gate.admit(Tick("SOL", 150, 151, 10, 10, "sim")) == []  # +50%: held
    c = BatchConflator(DEFAULT_ASSETS, gate=gate)
    newest = c.newest([[rec("SOL", 151, 11), rec("SOL", 152, 9)]])
    assert newest == {"SOL": Tick("SOL", 151, 152, 11, 11, "sim")}
    assert gate.dropped == {} and c.conflated == 1
    assert gate.admit_all(newest) == [Tick("SOL", 150, 151, 10, 10, "sim"), newest["SOL"]]
    assert gate.confirmed == 1 and not gate.held


def test_a_batch_with_no_tick_newer_than_the_held_one_delivers_its_newest() -> None:
    """A jump stamped ahead is held; a batch of the market's updates, all stamped before it:
    its newest is the asset's tick (it drops the held one, which it cannot confirm, and
    passes), where every one was dropped as out of order until the held one's time."""
    gate = TickGate(1000)
    gate.admit(Tick("SOL", 100, 101, 5, 5, "sim"))
    assert gate.admit(Tick("SOL", 50, 51, 4_500, 4_500, "sim")) == []  # -50%: held
    c = BatchConflator(DEFAULT_ASSETS, gate=gate)
    newest = c.newest([[rec("SOL", 99, 6), rec("SOL", 98, 7)], [rec("SOL", 97, 3)]])
    assert newest == {"SOL": Tick("SOL", 98, 99, 7, 7, "sim")}
    assert c.conflated == 1 and gate.dropped == {"out_of_order": 1}  # 97: older than 100
    assert gate.admit_all(newest) == [newest["SOL"]]
    assert gate.dropped == {"out_of_order": 1, "jump": 1} and not gate.held


def test_a_record_keyed_with_another_assets_symbol_is_dropped_in_any_poll() -> None:
    """A BTC message under the key SOL_USDC, then a SOL one: read in one poll the BTC tick was
    skipped unread as an older SOL record (counted conflated), read alone it was BTC's price.
    Whether it counted depended on the poll; it is dropped either way now, and a key that is no
    symbol of ``ASSETS`` (none, junk) still leaves the value to tell the asset."""
    miskeyed = Rec(b"SOL_USDC", rec("BTC", 600_000, 3).value)
    together = BatchConflator(DEFAULT_ASSETS)
    assert together.newest([[miskeyed, rec("SOL", 100, 5)]]).keys() == {"SOL"}
    alone = BatchConflator(DEFAULT_ASSETS)
    assert alone.newest([[miskeyed]]) == {} and alone.newest([[rec("SOL", 100, 5)]]).keys() == {
        "SOL"}
    assert alone.decoder.dropped == {"unknown_symbol": 1}
    for key in (None, b"", b"DOGE_USDC", b"\xff"):
        assert BatchConflator(DEFAULT_ASSETS).newest([[Rec(key, miskeyed.value)]]).keys() == {
            "BTC"}


def test_several_assets_and_partitions() -> None:
    c = BatchConflator(DEFAULT_ASSETS)
    p0 = [rec("SOL", 1, 1), rec("BTC", 5, 2), rec("SOL", 2, 3)]
    p1 = [rec("ETH", 9, 4), rec("SOL", 7, 1)]  # an older SOL tick in another partition loses
    out = c.newest([p0, p1])
    assert {k: v.bid_ticks for k, v in out.items()} == {"SOL": 2, "BTC": 5, "ETH": 9}
    assert c.consumed == 5 and c.conflated == 2


def test_early_stop_counts_the_rest_as_conflated() -> None:
    c = BatchConflator(DEFAULT_ASSETS)
    part = [rec(a, 10 + i, i) for i in range(300) for a in ("SOL", "BTC", "ETH")]
    c.newest([part])
    assert c.decoder.decoded == 3 and c.conflated == 897


def tick(asset: str, ts: int) -> Tick:
    return Tick(asset, ts, ts + 1, ts, ts, "sim")


def test_fanout_bounds_in_flight_and_delivers_every_waiting_tick_in_order() -> None:
    f = ShardFanout({"SOL": ["s0", "s1"], "BTC": ["s1"]}, max_in_flight=1, max_pending=50)
    f.offer([tick("SOL", 1), tick("BTC", 1)])
    calls = dict(f.take_ready())
    assert calls == {"s0": [tick("SOL", 1)], "s1": [tick("SOL", 1), tick("BTC", 1)]}
    # both busy: newer ticks wait in order, up to max_pending of an asset; the oldest go beyond
    for ts in range(2, 100):
        f.offer([tick("SOL", ts)])
        assert f.take_ready() == []
    assert f.pending_count() == 2 * 50 and f.conflated == 2 * 48
    f.done("s0", calls["s0"], ok=True)
    waiting = [tick("SOL", ts) for ts in range(50, 100)]
    assert f.take_ready() == [("s0", waiting)]
    # failed: both go back before what waits; SOL 1 is the oldest of 51, beyond max_pending
    f.done("s1", calls["s1"], ok=False)
    assert f.conflated == 2 * 48 + 1
    assert f.take_ready() == [("s1", [*waiting, tick("BTC", 1)])]
    assert f.delivered == 1 and f.failed_calls == 1
    f.offer([tick("SOL", 100)])  # arrives while the call is out
    f.done("s1", [*waiting, tick("BTC", 1)], ok=False)  # every tick goes again, in order
    assert f.take_ready() == [("s1", [*waiting[1:], tick("SOL", 100), tick("BTC", 1)])]
    assert f.conflated == 2 * 48 + 2 and f.failed_calls == 2


def test_fanout_sends_every_tick_of_a_failed_call_again_before_newer_ones() -> None:
    # a dip that touched a liquidation price, then a recovery, sent to a shard that died before
    # answering: the dip must reach it again, not only the recovered price
    f = ShardFanout({"SOL": ["s0"], "BTC": ["s0"]}, max_in_flight=1, max_pending=50)
    f.offer([tick("SOL", 1), tick("SOL", 2), tick("BTC", 1)])
    [(name, sent)] = f.take_ready()
    f.offer([tick("SOL", 3)])
    f.done(name, sent, ok=False)
    assert f.take_ready() == [("s0", [tick("SOL", 1), tick("SOL", 2), tick("SOL", 3),
                                      tick("BTC", 1)])]
    assert f.conflated == 0 and f.pending_count() == 0


def test_fanout_resends_two_failed_calls_in_flight_in_tick_order() -> None:
    f = ShardFanout({"SOL": ["s0"]}, max_in_flight=2, max_pending=50)
    f.offer([tick("SOL", 1), tick("SOL", 2)])
    [(_, first)] = f.take_ready()
    f.offer([tick("SOL", 3), tick("SOL", 4)])
    [(_, second)] = f.take_ready()
    f.offer([tick("SOL", 5)])
    f.done("s0", first, ok=False)
    f.done("s0", second, ok=False)  # its ticks go back after the first call's did
    assert f.take_ready() == [("s0", [tick("SOL", ts) for ts in range(1, 6)])]


def test_fanout_only_to_available_shards() -> None:
    f = ShardFanout({"SOL": ["s0"], "ETH": ["s2"]}, max_in_flight=2)
    f.offer([tick("SOL", 1), tick("ETH", 1), tick("DOGE", 1)])
    assert f.take_ready(available=["s2"]) == [("s2", [tick("ETH", 1)])]
    assert f.unrouted == 1
    f.offer([tick("ETH", 2)])
    assert f.take_ready(available=["s2"]) == [("s2", [tick("ETH", 2)])]  # second slot
    f.offer([tick("ETH", 3)])
    assert f.take_ready(available=["s2"]) == []  # bound reached
