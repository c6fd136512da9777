"""CandleStore: the candles of engine.candles persisted in one SQLite file under ``DATA_DIR``.

One table, one row per candle, primary key (asset, interval, start_us), every price a 64-bit
integer of half price steps as in :class:`engine.candles.Candle`::

    DATA_DIR/candles.sqlite3        the table (plus SQLite's -wal and -shm files beside it)

* ``upsert(candles)`` writes a batch in ONE transaction: ticks arrive by the thousand per
  second and every tick changes a candle of each interval, so the caller hands over what many
  ``CandleBook.apply`` calls returned at once; only the last version of each candle in a batch
  is written. Every candle is checked (``engine.candles.check_candle``) before anything is
  written, and the table's CHECK constraints repeat the rules, so bad input raises and leaves
  the file as it was.
* ``read(asset, interval, query)`` answers a :class:`engine.candles.CandleQuery` from disk;
  ``engine.candles.merge`` joins it with a book's memory.
* ``latest(assets)`` returns the newest candles per (asset, interval), which a restarted
  ``CandleBook(assets, candles=...)`` continues.

Durability: WAL mode with ``synchronous=NORMAL``. A transaction is committed once its pages
are appended to the WAL file, before ``upsert`` returns; the operating system holds that
write, so a process killed with SIGKILL loses nothing it committed (what SPEC asks: candles
survive restarts). Only an operating-system crash or power loss can lose the newest
transactions, and WAL never leaves a half-written one behind. ``synchronous=FULL`` would add
an fsync per batch, which candles (market history, not money) do not need.

Readers in other processes may open the same file while one writer writes (WAL readers do not
block the writer); a writer waits up to :data:`BUSY_TIMEOUT_S` for another's transaction.

A file SQLite finds damaged (:func:`is_damage`: not a database, a malformed page; a disk fault,
never a kill) is refused as it is opened or read, and so is one whose ``latest`` rows hold a
candle ``check_candle`` refuses (:class:`DamagedRow`: SQLite's pages carry no checksum, so a
flipped bit in a value is no damage to it); its owner may move it aside with
:func:`set_aside` and begin a new one.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

from engine.candles import INTERVAL_US, INTERVALS, Candle, CandleQuery, check_candle

FILE_NAME = "candles.sqlite3"
BUSY_TIMEOUT_S = 5.0
SCHEMA_VERSION = 1  # PRAGMA user_version of a file this module wrote
CORRUPT_SUFFIX = ".corrupt"
# SQLite's primary result codes for a damaged file: SQLITE_CORRUPT, SQLITE_NOTADB
_DAMAGE_CODES = frozenset({11, 26})

_COLUMNS = Candle._fields  # a row is a Candle, field for field (closed as 0/1)

_INTERVALS_SQL = ", ".join(f"'{name}'" for name in INTERVAL_US)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS candles (
    asset TEXT NOT NULL CHECK (length(asset) > 0),
    interval TEXT NOT NULL CHECK (interval IN ({_INTERVALS_SQL})),
    start_us INTEGER NOT NULL,
    open_half_ticks INTEGER NOT NULL,
    high_half_ticks INTEGER NOT NULL,
    low_half_ticks INTEGER NOT NULL,
    close_half_ticks INTEGER NOT NULL,
    tick_count INTEGER NOT NULL CHECK (tick_count >= 1),
    close_ts_us INTEGER NOT NULL CHECK (close_ts_us >= start_us),
    closed INTEGER NOT NULL CHECK (closed IN (0, 1)),
    PRIMARY KEY (asset, interval, start_us),
    CHECK (0 < low_half_ticks
           AND low_half_ticks <= min(open_half_ticks, close_half_ticks)
           AND max(open_half_ticks, close_half_ticks) <= high_half_ticks)
) STRICT, WITHOUT ROWID
"""
_UPSERT = (
    f"INSERT INTO candles ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
    "ON CONFLICT (asset, interval, start_us) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[3:])
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM candles"


class CandleStoreError(RuntimeError):
    """The file is not a candle store this module can use (another schema version)."""


class DamagedRow(ValueError):
    """A stored row is not a candle a ``CandleBook`` could have built: the file is damaged."""


def is_damage(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite finding the file itself damaged (SQLITE_CORRUPT,
    SQLITE_NOTADB) or a :class:`DamagedRow`, not a passing condition (locked, busy, a full or
    failing disk)."""
    if isinstance(exc, DamagedRow):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and isinstance(code, int) \
        and code & 0xFF in _DAMAGE_CODES


def set_aside(data_dir: str | os.PathLike[str]) -> Path:
    """Move ``<data_dir>/`` :data:`FILE_NAME` with its ``-wal`` and ``-shm`` to
    ``FILE_NAME.<n>.corrupt`` (and its ``-wal``, ``-shm``: SQLite opens it with its WAL), ``n``
    the first number no earlier one took; the new path. Nothing is deleted."""
    directory = Path(data_dir)
    n = 1
    while any((directory / f"{FILE_NAME}.{n}{CORRUPT_SUFFIX}{s}").exists()
              for s in ("", "-wal", "-shm")):
        n += 1
    aside = directory / f"{FILE_NAME}.{n}{CORRUPT_SUFFIX}"
    # the WAL first: a main file moved without it would leave its frames to the new file
    for suffix in ("-wal", "-shm", ""):
        with contextlib.suppress(FileNotFoundError):
            (directory / f"{FILE_NAME}{suffix}").rename(f"{aside}{suffix}")
    return aside


def _candle(row: tuple[str, str, int, int, int, int, int, int, int, int]) -> Candle:
    return Candle(*row[:-1], bool(row[-1]))  # the columns are Candle's fields, in order


class CandleStore:
    """Candles in ``<data_dir>/`` :data:`FILE_NAME` (see the module docstring); the directory
    is created when missing. Safe to share between threads (one connection behind a lock)."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        directory = Path(data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / FILE_NAME
        self._lock = threading.Lock()
        # autocommit mode: transactions are begun and ended explicitly below
        self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                     check_same_thread=False)
        try:
            self._open()
        except BaseException:
            self._conn.close()
            raise

    def _open(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise CandleStoreError(f"{self.path}: schema version {version}, expected "
                                   f"{SCHEMA_VERSION}")
        mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise CandleStoreError(f"{self.path}: cannot use WAL mode (got {mode})")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        if version == 0:  # a file of ours is left as it is: one found damaged is kept whole
            with self._write() as conn:
                conn.execute(_SCHEMA)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, rolled back whole on any error. BEGIN IMMEDIATE takes the write
        lock first, so a concurrent writer waits here instead of failing at the commit."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            # some errors (a full disk, an I/O error) have already rolled the transaction back
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def upsert(self, candles: Iterable[Candle]) -> int:
        """Write ``candles`` (any number, any assets and intervals) in one transaction; a
        candle given more than once is written as its last version. Returns the rows written.
        An invalid candle (of those to write) raises ValueError and nothing is written; an
        SQLite error rolls the whole batch back and is raised."""
        latest: dict[tuple[str, str, int], Candle] = {}
        for candle in candles:
            if not isinstance(candle, Candle):
                raise ValueError(f"expected a Candle, got {type(candle).__name__}")
            latest[(candle.asset, candle.interval, candle.start_us)] = candle
        if not latest:
            return 0
        # checked after dropping superseded versions: a batch of many ticks holds few rows
        for candle in latest.values():
            check_candle(candle)
        with self._lock, self._write() as conn:
            conn.executemany(_UPSERT, latest.values())  # sqlite3 binds a bool as 0/1
        return len(latest)

    def read(self, asset: str, interval: str, query: CandleQuery) -> list[Candle]:
        """The stored candles of (asset, interval) that answer ``query``, oldest first."""
        newest_first = query.start_s is None
        sql = (f"{_SELECT} WHERE asset = ? AND interval = ? AND start_us BETWEEN ? AND ? "
               f"ORDER BY start_us {'DESC' if newest_first else 'ASC'} LIMIT ?")
        args = (asset, interval, query.first_start_us, query.last_start_us, query.limit)
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        if newest_first:
            rows.reverse()
        return [_candle(row) for row in rows]

    def latest(self, assets: Iterable[str], intervals: Iterable[str] = INTERVALS, *,
               per_key: int = 1) -> list[Candle]:
        """The newest ``per_key`` stored candles of every (asset, interval) given, oldest first
        within each; what a restarted ``CandleBook`` takes to continue its current candles
        (``per_key`` up to its ``keep`` also fills its memory). A row that is no valid candle
        raises :class:`DamagedRow`: the book would refuse it, and every start with it."""
        if isinstance(per_key, bool) or not isinstance(per_key, int) or per_key < 1:
            raise ValueError("per_key must be a positive integer")
        sql = (f"{_SELECT} WHERE asset = ? AND interval = ? "
               "ORDER BY start_us DESC LIMIT ?")
        out: list[Candle] = []
        interval_names = tuple(intervals)
        with self._lock:
            for asset in assets:
                for interval in interval_names:
                    rows = self._conn.execute(sql, (asset, interval, per_key)).fetchall()
                    out.extend(_candle(row) for row in reversed(rows))
        for candle in out:
            try:
                check_candle(candle)
            except ValueError as exc:
                raise DamagedRow(f"{self.path}: {exc}: {candle}") from exc
        return out

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> CandleStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
