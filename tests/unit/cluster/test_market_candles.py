"""The market's candles against a candle store that refuses writes for a while (a full disk):
what was served reaches the file once the disk takes writes again."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from cluster.config import Settings
from cluster.live.candle_store import CandleStore
from cluster.live.market import MarketLive
from engine.candles import Candle
from engine.candles import CandleQuery
from engine.market import Tick

MINUTE_US = 60_000_000
T0_US = 1_700_000_040 * 1_000_000  # a minute's start


class FullDisk(CandleStore):
    """The real store, refusing every write as SQLite does on a full disk while ``full``."""

    full = True
    refused = 0

    def upsert(self, candles: Iterable[Candle]) -> int:
        if self.full:
            self.refused += 1
            raise sqlite3.OperationalError("database or disk is full")
        return super().upsert(candles)


def sol(bid: int, ts_us: int, seq: int) -> Tick:
    return Tick("SOL", bid, bid + 1, ts_us, seq, "test")


def test_candles_a_full_disk_refused_are_written_once_it_takes_writes(tmp_path: Path) -> None:
    live = MarketLive(Settings().assets, tmp_path)
    assert live.store is not None
    live.store.close()
    store = live.store = FullDisk(tmp_path)
    # minute 0 opens and closes while nothing can be written
    live.apply([sol(10_000, T0_US + 1, 1), sol(10_050, T0_US + 30_000_000, 2)])
    live.apply([sol(9_990, T0_US + MINUTE_US + 1, 3)])
    assert store.refused == 2 and live.store_errors == 2
    store.full = False
    live.apply([sol(10_010, T0_US + MINUTE_US + 2, 4)])  # another tick of minute 1
    served = {i: live.candles("SOL", i, CandleQuery()) for i in ("1m", "5m", "1h", "1d")}
    assert [c.start_us for c in served["1m"]] == [T0_US, T0_US + MINUTE_US]
    assert served["1m"][0].closed and served["1m"][0].tick_count == 2
    assert served["1d"][-1].tick_count == 4
    live.close()
    reopened = CandleStore(tmp_path)  # what a restart reads
    try:
        for interval, candles in served.items():
            assert reopened.read("SOL", interval, CandleQuery()) == candles, interval
    finally:
        reopened.close()


def test_a_restored_current_candle_is_a_change_for_a_reader_from_the_start(
        tmp_path: Path) -> None:
    """After a restart, a stream subscriber (the hub reads from version 0) gets the current
    candles the store restored, as the REST klines show them, before any new tick. Before,
    they sat at version 0 and were never sent until the next tick."""
    live = MarketLive(Settings().assets, tmp_path)
    live.apply([sol(10_000, T0_US + 1, 1), sol(10_050, T0_US + 2, 2)])
    live.close()
    restarted = MarketLive(Settings().assets, tmp_path)
    try:
        changes = restarted.changes(0)
        served = {c.stream: c.value for c in changes.items}
        assert changes.version == restarted.version == 1
        for interval in ("1m", "5m", "1h", "1d"):
            candle = served[f"kline.{interval}.SOL"]
            assert candle == restarted.candles("SOL", interval, CandleQuery())[-1]
            assert isinstance(candle, Candle) and candle.tick_count == 2
        assert not any(s.startswith("bookTicker.") or s.endswith((".BTC", ".ETH"))
                       for s in served)  # no tick is restored, nor a candle never made
        assert restarted.changes(changes.version).items == []
        restarted.apply([sol(10_020, T0_US + 3, 3)])  # the next tick: a newer version
        after = restarted.changes(changes.version)
        assert after.version == 2 and {c.stream for c in after.items} >= {"bookTicker.SOL"}
    finally:
        restarted.close()
    empty = MarketLive(Settings().assets, tmp_path / "new")
    assert empty.version == 0 and empty.changes(0).items == []
    empty.close()
