"""The candle store on a real SQLite file: round trip of a book's candles and the query rules,
one transaction per batch (the last version of a candle wins, bad input writes nothing),
restart continuity (a second store on the same file lets a restored book continue the
current candles exactly), and ``kill -9``: a writer process is killed by its pid while it
writes, again and again, each one continuing from what the previous one committed; every batch
it reported as committed is read back, and the file equals an uninterrupted run's candles."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster.live.candle_store import FILE_NAME
from cluster.live.candle_store import CandleStore
from cluster.live.candle_store import CandleStoreError
from engine.candles import INTERVALS
from engine.candles import MAX_LIMIT
from engine.candles import Candle
from engine.candles import CandleBook
from engine.candles import CandleQuery
from engine.candles import select
from engine.market import Tick

REPO = Path(__file__).resolve().parents[2]
ASSETS = ("SOL", "BTC")
MINUTE = 60_000_000
T0 = 1_699_920_000 * 10**6  # 2023-11-14 00:00 UTC
STEP_US = 3_700_000  # between two ticks: a new minute every ~16 ticks, a new hour every ~1000
BATCH = 40  # ticks per upsert in the writer process


def nth_tick(n: int) -> Tick:
    """The n-th tick of a fixed sequence (any process computes the same one)."""
    bid = 10_000 + (n * 7_919) % 997
    return Tick(ASSETS[n % 3 == 0], bid, bid + n % 3, T0 + n * STEP_US, n, "sim")


def run(book: CandleBook, first: int, last: int) -> list[Candle]:
    """Apply ticks ``first..last-1``; every change, in order."""
    return [c for n in range(first, last) for c in book.apply(nth_tick(n))]


def final_versions(changes: list[Candle]) -> dict[tuple[str, str, int], Candle]:
    return {(c.asset, c.interval, c.start_us): c for c in changes}


def stored(store: CandleStore) -> dict[tuple[str, str, int], Candle]:
    """Every candle in the store (the test's candles fit one read per key)."""
    out = {}
    for asset in ASSETS:
        for interval in INTERVALS:
            candles = store.read(asset, interval, CandleQuery(limit=MAX_LIMIT))
            assert len(candles) < MAX_LIMIT
            out.update(final_versions(candles))
    return out


def test_round_trip_and_queries(tmp_path: Path) -> None:
    book = CandleBook(ASSETS)
    changes = run(book, 0, 500)
    with CandleStore(tmp_path) as store:
        assert store.upsert(changes) == len(final_versions(changes))
        everything = final_versions(changes)
        assert stored(store) == everything
        t0_s = T0 // 10**6
        for query in (CandleQuery(), CandleQuery(limit=3), CandleQuery(start_s=t0_s + 125),
                      CandleQuery(limit=4, start_s=t0_s + 120), CandleQuery(end_s=t0_s + 600),
                      CandleQuery(limit=2, start_s=t0_s, end_s=t0_s + 300),
                      CandleQuery(start_s=t0_s + 10**6)):
            for asset in ASSETS:
                for interval in INTERVALS:
                    all_of_key = sorted((c for k, c in everything.items()
                                         if k[:2] == (asset, interval)),
                                        key=lambda c: c.start_us)
                    assert store.read(asset, interval, query) == select(all_of_key, query)
        # the newest candle of every key is the current one, still open
        newest = store.latest(ASSETS)
        assert newest == [book.current(a, i) for a in ASSETS for i in INTERVALS]
        assert all(not c.closed for c in newest)
        three = store.latest(ASSETS, ["1m"], per_key=3)
        assert three == [*book.recent("SOL", "1m")[-3:], *book.recent("BTC", "1m")[-3:]]
        assert store.latest(["ETH"]) == [] and store.upsert([]) == 0
        with pytest.raises(ValueError):
            store.latest(ASSETS, per_key=0)
    assert (tmp_path / FILE_NAME).exists()


def test_a_batch_writes_the_last_version_of_each_candle(tmp_path: Path) -> None:
    book = CandleBook(["SOL"], ["1m"])
    versions = [c for n in range(5) for c in book.apply(Tick("SOL", 10 + n, 10 + n,
                                                               T0 + n, n, "sim"))]
    with CandleStore(tmp_path) as store:
        assert store.upsert(versions) == 1
        assert store.read("SOL", "1m", CandleQuery()) == [versions[-1]]
        assert versions[-1].tick_count == 5
        # a later batch updates the row in place
        more = book.apply(Tick("SOL", 99, 99, T0 + MINUTE, 5, "sim"))
        assert store.upsert(more) == 2
        assert store.read("SOL", "1m", CandleQuery()) == more


def test_bad_input_raises_and_writes_nothing(tmp_path: Path) -> None:
    good = run(CandleBook(ASSETS), 0, 50)
    with CandleStore(tmp_path) as store:
        store.upsert(good)
        before = stored(store)
        fresh = Candle("SOL", "1m", T0 + 100 * MINUTE, 4, 5, 3, 4, 1, T0 + 100 * MINUTE, False)
        for bad in (fresh._replace(low_half_ticks=0), fresh._replace(start_us=T0 + 1),
                    fresh._replace(interval="2m"), fresh._replace(high_half_ticks=2**63),
                    fresh._replace(tick_count="1"),  # type: ignore[arg-type]
                    ("SOL", "1m")):
            with pytest.raises(ValueError):
                store.upsert([fresh, bad])  # type: ignore[list-item]
            assert stored(store) == before
    # a row that slips past the checks (written by another program) is refused by the table
    conn = sqlite3.connect(tmp_path / FILE_NAME)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO candles VALUES ('SOL', '1m', 0, 5, 4, 3, 4, 1, 0, 0)")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO candles VALUES ('SOL', '1m', 0, 'x', 4, 3, 4, 1, 0, 0)")
    conn.close()
    with CandleStore(tmp_path) as store:
        assert stored(store) == before


def test_a_file_that_is_not_a_candle_store_is_refused_and_left_alone(tmp_path: Path) -> None:
    junk = tmp_path / FILE_NAME
    junk.write_bytes(b"not a database, " * 100)
    with pytest.raises(sqlite3.DatabaseError):
        CandleStore(tmp_path)
    assert junk.read_bytes() == b"not a database, " * 100
    other = tmp_path / "other"
    other.mkdir()
    conn = sqlite3.connect(other / FILE_NAME)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    with pytest.raises(CandleStoreError, match="schema version 7"):
        CandleStore(other)


def test_the_file_is_in_wal_mode(tmp_path: Path) -> None:
    CandleStore(tmp_path).close()
    conn = sqlite3.connect(tmp_path / FILE_NAME)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_a_second_store_on_the_same_file_continues_the_current_candles(tmp_path: Path) -> None:
    uninterrupted = CandleBook(ASSETS)
    changes = run(uninterrupted, 0, 700)
    with CandleStore(tmp_path) as store:
        store.upsert(run(CandleBook(ASSETS), 0, 700))
    with CandleStore(tmp_path) as store:
        restored = CandleBook(ASSETS, candles=store.latest(ASSETS))
        for n in range(700, 1_500):
            changed = restored.apply(nth_tick(n))
            # the same changes as the book that never stopped: closes and current candles
            assert changed == uninterrupted.apply(nth_tick(n))
            changes += changed
            store.upsert(changed)
        assert stored(store) == final_versions(changes)


# ------------------------------------------------------------------ kill -9
def write_until_killed(data_dir: str) -> None:
    """The writer process: continue from what the store holds, upsert BATCH ticks at a time,
    and after each commit print how many ticks of the sequence are committed."""
    store = CandleStore(data_dir)
    newest = store.latest(ASSETS)
    book = CandleBook(ASSETS, candles=newest)
    done = 0 if not newest else (max(c.close_ts_us for c in newest) - T0) // STEP_US + 1
    while True:
        store.upsert(run(book, done, done + BATCH))
        done += BATCH
        print(done, flush=True)


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_loses_nothing_committed(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    committed = 0
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.integration.test_candle_store import "
             f"write_until_killed; write_until_killed({str(tmp_path)!r})"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            reports = []
            for _ in range(rng.randint(3, 12)):
                line = proc.stdout.readline()
                assert line, f"the writer died: {proc.stderr.read() if proc.stderr else ''}"
                reports.append(int(line))
            time.sleep(rng.random() * 0.02)  # land anywhere in the writer's loop
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        reports += [int(line) for line in proc.stdout.read().split()]
        assert proc.returncode == -signal.SIGKILL
        # each process starts where the previous one's commits end, and reports in order
        assert reports == list(range(reports[0], reports[-1] + 1, BATCH))
        assert reports[0] == committed + BATCH
        committed = reports[-1]

        # everything reported is there; the batch after it may be too (killed before its
        # report); either way the file holds what a run that was never killed writes
        with CandleStore(tmp_path) as store:
            on_disk = stored(store)
            newest = max(c.close_ts_us for c in on_disk.values())
        durable = (newest - T0) // STEP_US + 1
        assert durable in (committed, committed + BATCH)
        assert on_disk == final_versions(run(CandleBook(ASSETS), 0, durable))
        committed = durable
