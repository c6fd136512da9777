"""The market's candles: against a candle store that refuses writes for a while (a full disk),
what was served reaches the file once the disk takes writes again; a candle whose interval has
ended by the clock is closed (REST and stream, once) without waiting for a later tick, one
restored after its interval ended comes back closed, and a tick the feed holds back keeps only
its own asset's candles from being final; a tick applied while klines reads shows the
candles as before it or as after it; a damaged candles file is set aside at a start."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from cluster.config import Settings
from cluster.live.candle_store import FILE_NAME
from cluster.live.candle_store import CandleStore
from cluster.live.candle_store import CandleStoreError
from cluster.live.market import Change
from cluster.live.market import MarketLive
from engine.candles import INTERVALS
from engine.candles import Candle
from engine.candles import CandleQuery
from engine.market import Tick
from feed.gate import TickGate

MINUTE_US = 60_000_000
T0_US = 1_700_000_040 * 1_000_000  # a minute's start
T5_US = 1_700_000_100 * 1_000_000  # a start of 5 minutes (and of a minute)


class Clock:
    """A settable clock (unix us)."""

    def __init__(self, now_us: int) -> None:
        self.now_us = now_us

    def __call__(self) -> int:
        return self.now_us


class PacedClock:
    """A clock (unix us) running at the real pace from the time it was last set to."""

    def __init__(self, now_us: int) -> None:
        self.set(now_us)

    def set(self, now_us: int) -> None:
        self.shift_us = now_us - time.time_ns() // 1000

    def __call__(self) -> int:
        return time.time_ns() // 1000 + self.shift_us


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
    clock = Clock(T0_US + 30_000_000)
    live = MarketLive(Settings().assets, tmp_path, clock)
    assert live.store is not None
    live.store.close()
    store = live.store = FullDisk(tmp_path)
    # minute 0 opens and closes while nothing can be written
    live.apply([sol(10_000, T0_US + 1, 1), sol(10_050, T0_US + 30_000_000, 2)])
    clock.now_us = T0_US + MINUTE_US + 2
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
    live = MarketLive(Settings().assets, tmp_path, Clock(T0_US + 2))
    live.apply([sol(10_000, T0_US + 1, 1), sol(10_050, T0_US + 2, 2)])
    live.close()
    restarted = MarketLive(Settings().assets, tmp_path, Clock(T0_US + 3))
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


def klines(changes: list[Change]) -> dict[str, list[Candle]]:
    """The candles among ``changes``, by stream."""
    out: dict[str, list[Candle]] = {}
    for change in changes:
        if isinstance(change.value, Candle):
            out.setdefault(change.stream, []).append(change.value)
    return out


def test_a_candle_whose_interval_ended_is_closed_without_a_later_tick_and_sent_once() -> None:
    clock = Clock(T5_US + 2)
    live = MarketLive(Settings().assets, None, clock)
    live.apply([sol(10_000, T5_US + 1, 1)])
    (minute,) = live.candles("SOL", "1m", CandleQuery())
    assert not minute.closed
    version = live.changes(0).version
    clock.now_us = T5_US + MINUTE_US  # the minute is over; no tick came
    assert live.candles("SOL", "1m", CandleQuery()) == [minute._replace(closed=True)]
    assert [c.closed for c in live.candles("SOL", "5m", CandleQuery())] == [False]
    changes = live.changes(version)
    assert klines(changes.items) == {"kline.1m.SOL": [minute._replace(closed=True)]}
    assert live.changes(changes.version).items == []  # once
    # the next minute's first tick opens its candle and does not close the last one again
    live.apply([sol(10_020, T5_US + MINUTE_US + 1, 2)])
    after = live.changes(changes.version)
    sent = klines(after.items)
    assert [(c.start_us, c.closed) for c in sent["kline.1m.SOL"]] == [
        (T5_US + MINUTE_US, False)]
    assert [c.tick_count for c in sent["kline.5m.SOL"]] == [2]
    assert [c.closed for c in live.candles("SOL", "1m", CandleQuery())] == [True, False]
    # a reader from the start sees the closed minute once, and the new one as current
    every = klines(live.changes(0).items)["kline.1m.SOL"]
    assert [(c.start_us, c.closed) for c in every] == [
        (T5_US, True), (T5_US + MINUTE_US, False)]


def test_a_reader_waiting_for_changes_is_woken_when_a_candle_s_interval_ends() -> None:
    async def scenario() -> None:
        # a clock 0.2 s before the end of T0's minute, running at the real pace
        shift_us = T5_US + MINUTE_US - 200_000 - time.time_ns() // 1000
        live = MarketLive(Settings().assets, None, lambda: time.time_ns() // 1000 + shift_us)
        live.apply([sol(10_000, T5_US + 1, 1)])
        version = live.changes(0).version
        started = time.monotonic()
        changes = await live.wait(version, timeout_s=5.0)
        assert time.monotonic() - started < 2.0
        assert [(c.start_us, c.closed) for c in klines(changes.items)["kline.1m.SOL"]] == [
            (T5_US, True)]

    asyncio.run(scenario())


def test_a_restored_candle_whose_interval_ended_comes_back_closed_and_is_sent_closed_once(
        tmp_path: Path) -> None:
    """A reader that followed the last run was sent the minute open: the restarted market's
    changes carry it closed (a hub's first read leaves closed candles out: not news to a new
    subscriber), and a second restart does not carry it again."""
    live = MarketLive(Settings().assets, tmp_path, Clock(T5_US + 2))
    live.apply([sol(10_000, T5_US + 1, 1)])
    (minute,) = live.candles("SOL", "1m", CandleQuery())
    live.close()
    # restarted two minutes later: the minute is over, the 5m candle is not
    restarted = MarketLive(Settings().assets, tmp_path, Clock(T5_US + 2 * MINUTE_US))
    try:
        assert [c.closed for c in restarted.candles("SOL", "1m", CandleQuery())] == [True]
        assert [c.closed for c in restarted.candles("SOL", "5m", CandleQuery())] == [False]
        sent = klines(restarted.changes(0).items)
        assert set(sent) == {"kline.1m.SOL", "kline.5m.SOL", "kline.15m.SOL", "kline.1h.SOL",
                             "kline.4h.SOL", "kline.1d.SOL"}
        assert sent["kline.1m.SOL"] == [minute._replace(closed=True)]
        assert all(not c.closed for s, cs in sent.items() if s != "kline.1m.SOL" for c in cs)
    finally:
        restarted.close()
    again = MarketLive(Settings().assets, tmp_path, Clock(T5_US + 3 * MINUTE_US))
    try:
        assert set(klines(again.changes(0).items)) == {
            "kline.5m.SOL", "kline.15m.SOL", "kline.1h.SOL", "kline.4h.SOL", "kline.1d.SOL"}
    finally:
        again.close()
    reopened = CandleStore(tmp_path)
    try:
        assert [c.closed for c in reopened.read("SOL", "1m", CandleQuery())] == [True]
    finally:
        reopened.close()


def test_a_candle_is_shown_closed_at_its_end_and_final_once_no_late_tick_can_come() -> None:
    """With ticks accepted up to ``late_s`` old, a candle is closed in klines when its
    interval ends, still takes a late tick of its interval, and is sent closed (final) once
    ``late_s`` more have passed."""
    clock = Clock(T5_US + 2)
    live = MarketLive(Settings().assets, None, clock, late_s=15.0)
    live.apply([sol(10_000, T5_US + 1, 1)])
    version = live.changes(0).version
    clock.now_us = T5_US + MINUTE_US + 5_000_000
    assert [c.closed for c in live.candles("SOL", "1m", CandleQuery())] == [True]
    assert live.changes(version).items == []  # not final yet: nothing sent
    live.apply([sol(10_010, T5_US + MINUTE_US - 1, 2)])  # stamped in the minute, 5 s late
    (shown,) = live.candles("SOL", "1m", CandleQuery())
    assert shown.closed and shown.tick_count == 2
    version = live.changes(version).version
    clock.now_us = T5_US + MINUTE_US + 15_000_000
    sent = klines(live.changes(version).items)
    assert sent == {"kline.1m.SOL": [shown]}
    assert live.changes(live.version).items == []


def test_a_candle_final_before_a_restart_stays_final_when_the_clock_is_behind(
        tmp_path: Path) -> None:
    """A restart whose clock reads a little earlier (stepped back, another node) than the one
    that made a candle final: the candle is not sent open again, and a tick stamped inside it
    that the feed still accepts is left out. Before, a restored candle was reopened whatever
    its stored flag, took that tick and was sent closed a second time."""
    clock = Clock(T5_US + 2)
    live = MarketLive(Settings().assets, tmp_path, clock, late_s=15.0)
    live.apply([sol(10_000, T5_US + 1, 1)])
    clock.now_us = T5_US + MINUTE_US + 15_000_000
    assert live.close_ended() >= 1
    (final,) = live.candles("SOL", "1m", CandleQuery())
    assert final.closed and final.tick_count == 1
    live.close()
    clock.now_us -= 3_000_000
    restarted = MarketLive(Settings().assets, tmp_path, clock, late_s=15.0)
    try:
        assert "kline.1m.SOL" not in klines(restarted.changes(0).items)
        restarted.apply([sol(9_000, T5_US + MINUTE_US - 2_000_000, 2)])  # 14 s old
        assert restarted.candles("SOL", "1m", CandleQuery()) == [final]
        clock.now_us += 10_000_000
        assert "kline.1m.SOL" not in klines(restarted.changes(0).items)
        assert restarted.candles("SOL", "5m", CandleQuery())[-1].tick_count == 2
    finally:
        restarted.close()
    reopened = CandleStore(tmp_path)
    try:
        assert reopened.read("SOL", "1m", CandleQuery()) == [final]
    finally:
        reopened.close()


def test_a_jump_held_for_confirmation_past_the_late_window_still_counts_in_its_candle() -> None:
    """The feed holds a tick that jumps until the next tick confirms it, however late that
    comes (SPEC): its candle is not final while it is held, and once confirmed it counts in
    its minute as in the 5m candle."""
    gate = TickGate(1_000)
    clock = Clock(T5_US + 2)
    live = MarketLive(Settings().assets, None, clock, late_s=15.0,
                      held=lambda: gate.held.values())
    live.apply(gate.admit(sol(10_000, T5_US + 1, 1)))
    jump = sol(12_000, T5_US + 2, 2)
    assert gate.admit(jump) == []  # held
    clock.now_us = T5_US + MINUTE_US + 20_000_000  # the minute's late window is over
    version = live.changes(0).version
    assert [c.closed for c in live.candles("SOL", "1m", CandleQuery())] == [True]
    # a reader's long poll waits its time: the candle past due is not about to be closed
    started = time.monotonic()
    assert asyncio.run(live.wait(version, timeout_s=0.2)).items == []
    assert time.monotonic() - started > 0.15
    confirming = sol(12_010, clock.now_us - 1, 3)
    assert gate.admit(confirming) == [jump, confirming]
    live.apply([jump, confirming])
    minute, five = (live.candles("SOL", i, CandleQuery()) for i in ("1m", "5m"))
    assert [(c.tick_count, c.high_half_ticks, c.closed) for c in minute] == [
        (2, 24_001, True), (1, 24_021, False)]
    assert [(c.tick_count, c.high_half_ticks) for c in five] == [(3, 24_021)]
    sent = klines(live.changes(version).items)["kline.1m.SOL"]
    assert [(c.start_us, c.tick_count, c.closed) for c in sent] == [
        (T5_US, 2, True), (T5_US + MINUTE_US, 1, False)]


def btc(bid: int, ts_us: int, seq: int) -> Tick:
    return Tick("BTC", bid, bid + 1, ts_us, seq, "test")


def test_a_jump_held_of_one_asset_keeps_only_that_asset_s_candles_from_being_final(
        tmp_path: Path) -> None:
    """SOL's jump stamped inside its minute is held; BTC holds none. Once ``late_s`` has
    passed after the minute, BTC's is final (stored and sent closed), SOL's not until its held
    tick is settled, here by a newer jump that drops it and is held in turn (no tick is
    accepted). Before, a held tick of any asset kept every asset's candles from being final."""
    gate = TickGate(1_000)
    clock = Clock(T5_US + 2)
    live = MarketLive(Settings().assets, tmp_path, clock, late_s=15.0,
                      held=lambda: gate.held.values())
    store = live.store
    assert store is not None
    live.apply(gate.admit_all({"SOL": sol(10_000, T5_US + 1, 1),
                               "BTC": btc(650_000, T5_US + 1, 1)}))
    assert gate.admit(sol(12_000, T5_US + 2, 2)) == []  # held
    version = live.changes(0).version
    clock.now_us = T5_US + MINUTE_US + 15_000_000  # the minute's late window is over
    # klines show both closed (their interval has ended); only BTC's is final
    assert [c.closed for c in live.candles("SOL", "1m", CandleQuery())] == [True]
    (btc_minute,) = live.candles("BTC", "1m", CandleQuery())
    assert btc_minute.closed and btc_minute.tick_count == 1
    assert store.read("BTC", "1m", CandleQuery()) == [btc_minute]
    assert [c.closed for c in store.read("SOL", "1m", CandleQuery())] == [False]
    changes = live.changes(version)
    assert klines(changes.items) == {"kline.1m.BTC": [btc_minute]}
    assert live.changes(changes.version).items == []
    # a jump from the held one is held instead (the first is dropped): SOL's minute is final
    assert gate.admit(sol(14_000, clock.now_us - 1, 3)) == [] and gate.dropped["jump"] == 1
    (sol_minute,) = live.candles("SOL", "1m", CandleQuery())
    assert sol_minute.tick_count == 1 and store.read("SOL", "1m", CandleQuery()) == [sol_minute]
    assert klines(live.changes(changes.version).items) == {"kline.1m.SOL": [sol_minute]}
    live.close()


def test_a_reader_waiting_is_woken_when_a_candle_is_due_while_another_asset_s_jump_is_held(
        ) -> None:
    """SOL's minute is past its late window but kept open by a held jump; a long poll still
    wakes when BTC's next minute is final, not after its whole timeout."""
    async def scenario() -> None:
        gate = TickGate(1_000)
        clock = PacedClock(T5_US + 2)
        live = MarketLive(Settings().assets, None, clock, late_s=15.0,
                          held=lambda: gate.held.values())
        live.apply(gate.admit(sol(10_000, T5_US + 1, 1)))
        assert gate.admit(sol(12_000, T5_US + 2, 2)) == []  # held
        clock.set(T5_US + MINUTE_US + 2)
        live.apply(gate.admit(btc(650_000, T5_US + MINUTE_US + 1, 3)))
        clock.set(T5_US + 2 * MINUTE_US + 15_000_000 - 200_000)  # 0.2 s before BTC's is final
        version = live.changes(0).version
        assert [c.closed for c in live.candles("SOL", "1m", CandleQuery())] == [True]
        started = time.monotonic()
        changes = await live.wait(version, timeout_s=5.0)
        assert time.monotonic() - started < 2.0
        assert {stream: [(c.start_us, c.closed) for c in candles]
                for stream, candles in klines(changes.items).items()} == {
            "kline.1m.BTC": [(T5_US + MINUTE_US, True)]}

    asyncio.run(scenario())


class TickDuringRead(CandleStore):
    """The real store, with ``tick`` applied (by the feed's thread, say) just ``before`` or
    after its next read."""

    tick: tuple[MarketLive, Tick] | None = None
    before = True

    def read(self, asset: str, interval: str, query: CandleQuery) -> list[Candle]:
        pending, self.tick = self.tick, None
        if pending is not None and self.before:
            pending[0].apply([pending[1]])
        answer = super().read(asset, interval, query)
        if pending is not None and not self.before:
            pending[0].apply([pending[1]])
        return answer


@pytest.mark.parametrize("before", [True, False])
def test_a_tick_applied_while_klines_reads_never_shows_a_stale_candle_before_a_newer_one(
        tmp_path: Path, before: bool) -> None:
    """A tick that starts minute 1 arrives while klines reads the store: the answer is the
    candles before it or after it, never minute 0 still open (and short of that tick's
    change) followed by minute 1. Before, the book's memory was read first and the store
    after, so the store could hold newer versions than the memory merge preferred."""
    live = MarketLive(Settings().assets, tmp_path, Clock(T0_US + 30_000_000))
    assert live.store is not None
    live.store.close()
    store = live.store = TickDuringRead(tmp_path)
    store.before = before
    try:
        live.apply([sol(10_000, T0_US + 1, 1)])
        earlier = live.candles("SOL", "1m", CandleQuery())
        store.tick = (live, sol(10_020, T0_US + MINUTE_US + 1, 2))
        answer = live.candles("SOL", "1m", CandleQuery())
        later = live.candles("SOL", "1m", CandleQuery())
        assert [(c.start_us, c.closed) for c in earlier] == [(T0_US, False)]
        assert [(c.start_us, c.closed) for c in later] == [(T0_US, True),
                                                           (T0_US + MINUTE_US, False)]
        assert answer in (earlier, later), answer
    finally:
        live.close()


@pytest.mark.parametrize("damage", ["junk", "page"])
def test_a_damaged_candle_file_is_set_aside_and_new_candles_begin(tmp_path: Path,
                                                                  damage: str) -> None:
    """A candles file SQLite finds damaged (not a database, a malformed page) no longer keeps
    the market from starting, and with it the feed actor that prices every shard: the file is
    moved aside whole for inspection, counted, and new candles begin. Before, MarketLive
    raised, so a damaged chart history stopped trading until someone deleted it by hand."""
    live = MarketLive(Settings().assets, tmp_path, Clock(T0_US + 2))
    for n in range(300):  # enough rows for pages past SQLite's first few
        live.apply([sol(10_000 + n % 5, T0_US + n * MINUTE_US, n + 1)])
    live.close()
    path = tmp_path / FILE_NAME
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = bytearray(path.read_bytes())
    if damage == "junk":
        data[:100] = b"not a database, " * 6 + b"junk"
    else:
        data[3 * 4096:6 * 4096] = b"\x5a" * (3 * 4096)
    path.write_bytes(bytes(data))
    clock = Clock(T0_US + 400 * MINUTE_US)
    restarted = MarketLive(Settings().assets, tmp_path, clock)
    try:
        assert restarted.store_errors == 1
        assert (tmp_path / f"{FILE_NAME}.1.corrupt").read_bytes() == bytes(data)
        assert restarted.candles("SOL", "1m", CandleQuery()) == []
        restarted.apply([sol(10_000, T0_US + 400 * MINUTE_US, 1)])
        assert [c.tick_count for c in restarted.candles("SOL", "1m", CandleQuery())] == [1]
    finally:
        restarted.close()
    with CandleStore(tmp_path) as store:  # the new file holds the new candles
        assert [c.start_us for c in store.read("SOL", "1m", CandleQuery())] == [
            T0_US + 400 * MINUTE_US]
    # a second damaged file is set aside beside the first, which stays as it was
    path.write_bytes(b"junk" * 2048)
    MarketLive(Settings().assets, tmp_path, clock).close()
    assert (tmp_path / f"{FILE_NAME}.2.corrupt").read_bytes() == b"junk" * 2048
    assert (tmp_path / f"{FILE_NAME}.1.corrupt").read_bytes() == bytes(data)


def test_a_damaged_candle_file_is_set_aside_with_its_wal(tmp_path: Path) -> None:
    """A feed actor killed leaves its newest candles in the ``-wal``, not yet in the file. A
    file then found damaged is set aside with it, both as they were (``<aside>-wal``: SQLite
    opens the file set aside with it). Before, the store's close after the failed read
    deleted the WAL, and only the file was set aside."""
    live = MarketLive(Settings().assets, tmp_path, Clock(T0_US + 2))
    for n in range(300):
        live.apply([sol(10_000 + n % 5, T0_US + n * MINUTE_US, n + 1)])
    live.close()
    path, wal_path = tmp_path / FILE_NAME, tmp_path / f"{FILE_NAME}-wal"
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_autocheckpoint = 0")
    with con:  # the newest candle changed in the WAL only, as when its writer was killed
        con.execute("UPDATE candles SET tick_count = tick_count + 1 "
                    "WHERE start_us = (SELECT max(start_us) FROM candles)")
    data, wal = bytearray(path.read_bytes()), wal_path.read_bytes()
    con.close()  # (a close checkpoints the WAL and deletes it: it is written back below)
    assert wal and not wal_path.exists()
    data[3 * 4096:6 * 4096] = b"\x5a" * (3 * 4096)  # pages the WAL does not hold
    path.write_bytes(bytes(data))
    wal_path.write_bytes(wal)
    restarted = MarketLive(Settings().assets, tmp_path, Clock(T0_US + 400 * MINUTE_US))
    try:
        assert restarted.store_errors == 1
        assert restarted.candles("SOL", "1m", CandleQuery()) == []
    finally:
        restarted.close()
    assert (tmp_path / f"{FILE_NAME}.1.corrupt").read_bytes() == bytes(data)
    assert (tmp_path / f"{FILE_NAME}.1.corrupt-wal").read_bytes() == wal


@pytest.mark.parametrize("change", [
    "start_us = start_us + 1",  # no longer aligned to its interval
    "close_ts_us = close_ts_us + 3600000000",  # its newest tick past its interval's end
])
def test_a_candles_file_holding_a_row_no_book_could_build_is_set_aside(tmp_path: Path,
                                                                       change: str) -> None:
    """SQLite's pages carry no checksum: a flipped bit in a row's value is no damage it sees,
    and its table's checks do not say everything a candle is. A stored candle the book
    refuses is damage too: the file is moved aside whole, counted, and new candles begin.
    Before, the book's ValueError ended every start of the market, and of the feed actor."""
    live = MarketLive(Settings().assets, tmp_path, Clock(T0_US + 2))
    live.apply([sol(10_000, T0_US + 1, 1)])
    live.close()
    con = sqlite3.connect(tmp_path / FILE_NAME)
    with con:
        con.execute(f"UPDATE candles SET {change} WHERE interval = '1m'")
    con.close()
    restarted = MarketLive(Settings().assets, tmp_path, Clock(T0_US + 3))
    try:
        assert restarted.store_errors == 1
        assert (tmp_path / f"{FILE_NAME}.1.corrupt").exists()
        assert restarted.candles("SOL", "1h", CandleQuery()) == []
    finally:
        restarted.close()


def test_a_candle_file_of_another_schema_version_is_still_refused(tmp_path: Path) -> None:
    """A file a newer version wrote is not damage: it is refused and left where it is."""
    con = sqlite3.connect(tmp_path / FILE_NAME)
    con.execute("PRAGMA user_version = 7")
    con.close()
    with pytest.raises(CandleStoreError, match="schema version 7"):
        MarketLive(Settings().assets, tmp_path, Clock(T0_US))
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME]


def restarted_after(data_dir: Path, ticks: list[Tick]) -> tuple[MarketLive,
                                                               dict[str, list[Candle]]]:
    """A market that applied ``ticks`` under ``data_dir``, closed and started again (at the
    clock after them), and the SOL candles per interval it held as it closed."""
    live = MarketLive(Settings().assets, data_dir, Clock(T0_US + 3))
    live.apply(ticks)
    before = {i: live.candles("SOL", i, CandleQuery()) for i in INTERVALS}
    live.close()
    return MarketLive(Settings().assets, data_dir, Clock(T0_US + 4)), before


def test_the_newest_tick_read_again_after_a_restart_is_not_counted_twice(
        tmp_path: Path) -> None:
    """A feed starting again reads each partition's newest message again (the shards get a
    price at once), and its gate, new, lets it through: the restored candles already hold
    it, so they stay as they were and go on as a market that never stopped. Before, every
    candle of its asset counted that tick twice. It is still the asset's top of book."""
    assets = Settings().assets
    ticks = [sol(10_000, T0_US + 1, 1), sol(10_050, T0_US + 2, 2)]
    later = [sol(10_020, T0_US + 3, 3), sol(10_020, T0_US + 3, 4)]  # same time and price
    uninterrupted = MarketLive(assets, None, Clock(T0_US + 4))
    uninterrupted.apply(ticks + later)
    restarted, before = restarted_after(tmp_path, ticks)
    try:
        restarted.apply([ticks[-1]])  # the newest message, read again
        assert {i: restarted.candles("SOL", i, CandleQuery()) for i in INTERVALS} == before
        assert restarted.newest("SOL") == ticks[-1]
        restarted.apply(later)
        for interval in INTERVALS:
            assert restarted.candles("SOL", interval, CandleQuery()) == \
                uninterrupted.candles("SOL", interval, CandleQuery()), interval
    finally:
        restarted.close()


def test_ticks_read_again_before_the_newest_do_not_let_the_newest_count_twice(
        tmp_path: Path) -> None:
    """A feed that reads a partition from further back than its newest message (from its
    beginning, ``start_from="earliest"``) meets older ticks first; the restored candles
    ignore those as older, and still hold the newest when it comes. Before, the first tick
    read after the start, older, used up the check, and the newest counted twice."""
    ticks = [sol(10_000, T0_US + 1, 1), sol(10_050, T0_US + 2, 2)]
    restarted, before = restarted_after(tmp_path, ticks)
    try:
        restarted.apply(ticks)  # the partition read again from its beginning
        assert {i: restarted.candles("SOL", i, CandleQuery()) for i in INTERVALS} == before
    finally:
        restarted.close()
