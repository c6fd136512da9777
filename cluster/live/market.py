"""The public market data the platform serves: candles and the newest top of book per asset.

:class:`MarketLive` is fed the ticks the feed accepts (``apply``, one call per batch). It builds
the candles (engine.candles.CandleBook), writes every candle a batch changed to the candle
store (cluster.live.candle_store: one SQLite transaction per batch) before anyone can read
them, answers ``klines`` (the store and the book's memory merged) and keeps what the public
WebSocket streams need: for each stream (``bookTicker.<ASSET>``, ``kline.<interval>.<ASSET>``)
its newest value and the version (a counter of batches) it changed at, plus the candles that
closed recently (each is sent with ``closed: true`` once, then the next one is current).

A candle is closed once its interval has ended by the clock (``clock_us``), not only when a
tick of a later interval arrives: ``klines`` says so from its end. It is final (built no more,
written and published closed, so the stream sends it ``closed: true``) once no tick it could
still take can be accepted: ``late_s`` after its end (the feed's oldest acceptable tick age), or
earlier when a tick of a later interval arrives, but not while the feed holds a tick of its asset
back that it may still accept (``held``; the other assets' candles are not held up). Every read
(``klines``, ``changes``, ``wait``) first finalises the candles due, as a batch of their own, and
``wait`` wakes when the next is due, so a quiet market's candle is sent closed on time.

``changes(since)`` returns what changed after version ``since``: a reader that keeps the
version it got reads every stream's newest value and every closed candle still remembered
(:data:`CLOSED_KEPT`), conflated: a stream that changed twice since is read once. ``wait``
returns once there is something newer, or after a timeout (a long poll).

Ray-free: the feed actor hosts one (its ticks), the in-process platform another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from cluster.durability.runner import wall_clock_us
from cluster.live.candle_store import FILE_NAME, CandleStore, is_damage, set_aside
from engine.assets import AssetRegistry
from engine.candles import (
    CANDLES_KEPT,
    INT64_MAX,
    INTERVAL_US,
    INTERVALS,
    Candle,
    CandleBook,
    CandleQuery,
    merge,
    select,
    select_recent,
)
from engine.market import Tick

log = logging.getLogger(__name__)

CLOSED_KEPT = 4096
"""Closed candles remembered for readers of ``changes`` (a reader further behind gets the
current candles only)."""
UNWRITTEN_KEPT = 100_000
"""Candles a failing store (a full disk) may wait to be written, the newest; beyond that the
oldest are given up (counted in ``store_errors``)."""


class Change(NamedTuple):
    """A stream's new value: ``stream`` its name, ``value`` a Tick (``bookTicker``) or a
    Candle (``kline``)."""

    stream: str
    value: Tick | Candle


class Changes(NamedTuple):
    """``version``: read again with it; ``items``: closed candles first (oldest first), then
    each stream's newest value; ``source``: which :class:`MarketLive` answered (a restarted
    one counts its versions from the start again: a reader's version of another source means
    nothing to it)."""

    version: int
    items: list[Change]
    source: int


def book_ticker_stream(asset: str) -> str:
    return f"bookTicker.{asset}"


def kline_stream(interval: str, asset: str) -> str:
    return f"kline.{interval}.{asset}"


class MarketSource(Protocol):
    """What the API reads of the market data: a :class:`MarketLive` in this process, or the
    feed actor's through Ray (cluster.actors.serve_app)."""

    async def klines(self, asset: str, interval: str, query: CandleQuery) -> list[Candle]: ...

    async def wait(self, since: int, timeout_s: float) -> Changes: ...

    def newest(self, asset: str) -> Tick | None:
        """The newest top of book of ``asset`` known here (None: none yet)."""
        ...


class MarketLive:
    """Candles of ``assets`` for every interval, persisted under ``data_dir`` (None: in memory
    only), and the streams' newest values; ``clock_us`` (unix us) says which intervals have
    ended, ``late_s`` how long after its end a candle may still take a tick, ``held`` which
    ticks the feed holds back that it may still accept, however old (a jump awaiting its
    confirmation): their asset's candles from the one each is stamped in on are not final
    until then."""

    def __init__(self, assets: AssetRegistry, data_dir: Path | None,
                 clock_us: Callable[[], int] = wall_clock_us, late_s: float = 0.0,
                 held: Callable[[], Iterable[Tick]] = tuple) -> None:
        self.assets = assets
        self.clock_us = clock_us
        self.late_us = round(late_s * 1_000_000)
        self.held = held
        names = [a.name for a in assets.assets]
        self.store_errors = 0
        self.store: CandleStore | None = None
        restored: list[Candle] = []
        if data_dir is not None:
            self.store, restored = self._open_store(data_dir, names)
        self.book = CandleBook(names, INTERVALS, candles=restored)
        # asset -> (ts_us, mid in half steps) of the newest tick its restored candles hold: a
        # feed starting again reads each partition's newest message again, and its new gate
        # lets it through, so that tick is not counted twice; kept until a newer tick of the
        # asset comes (a feed reading from further back meets older ones first). (A candle keeps
        # no seq: a new tick of that microsecond and mid is left out too.)
        self._resumed: dict[str, tuple[int, int]] = {}
        for name in names:
            currents = [c for i in INTERVALS if (c := self.book.current(name, i)) is not None]
            if currents:
                newest = max(currents, key=lambda c: c.close_ts_us)
                self._resumed[name] = (newest.close_ts_us, newest.close_half_ticks)
        # apply may run on another thread than the reads that close candles by the clock
        self._lock = threading.Lock()
        self.source_id = random.getrandbits(63)  # Changes.source
        self._latest: dict[str, tuple[int, Tick | Candle]] = {}
        self._closed: deque[tuple[int, Candle]] = deque(maxlen=CLOSED_KEPT)
        # readers waiting for a newer version: each one's loop and event (apply may run on
        # another thread than a reader, as in the in-process platform)
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.ticks = 0
        # what the store refused to write (a full disk), by candle: written with the next batch
        self._unwritten: dict[tuple[str, str, int], Candle] = {}
        # restored candles whose time ended while nothing ran are closed before any reader;
        # those stored open are a change at version 1, as the restored current ones: a reader
        # that followed the last run was sent them open (a reader's first read leaves closed
        # candles out, cluster.live.streams); those stored final stay closed in the book, and
        # were sent closed already
        now_us = clock_us() - self.late_us
        ended = self.book.close_ended(now_us)
        if self.store is not None and ended:
            self._write(self.store, ended)
        self._closed.extend((1, c) for c in ended)
        self._latest.update((kline_stream(c.interval, c.asset), (1, c))
                            for c in self._open_candles())
        # _next_end_us: no open candle's interval ends before it (unix us), those a held tick
        # keeps open aside; _held_open: a held tick keeps a candle open past its time, so every
        # read checks the hold again (the feed may drop the held tick for a newer one, with no
        # tick to apply)
        self._next_end_us, self._held_open = self._next_end(now_us)
        # restored candles are version 1, after what a reader from 0 has: a subscriber gets the
        # current candle before the first tick (the REST klines show it already)
        self.version = 1 if self._latest or self._closed else 0

    def _open_store(self, data_dir: Path, names: Sequence[str],
                    set_aside_damage: bool = True) -> tuple[CandleStore, list[Candle]]:
        """The store under ``data_dir`` and its newest candles per (asset, interval). A file
        SQLite finds damaged, or whose newest rows hold one that is no candle, is moved aside
        (counted in ``store_errors``) and a new one begun: the chart history is not worth the
        feed actor, which prices every shard, and which would otherwise not start until someone
        removed the file by hand."""
        store: CandleStore | None = None
        try:
            store = CandleStore(data_dir)
            return store, store.latest(names, INTERVALS, per_key=CANDLES_KEPT)
        except BaseException as exc:
            try:
                if not (set_aside_damage and is_damage(exc)):
                    raise
                # moved while the store that read it is open: SQLite's close of it checkpoints
                # its WAL into the file and deletes it, so the file set aside keeps its WAL
                # (<aside>-wal). One the store found damaged as it opened is closed already.
                aside = set_aside(data_dir)
            finally:
                if store is not None:
                    store.close()
            self.store_errors += 1
            log.error("candle store: %s is damaged (%s); moved to %s, new candles begin",
                      aside.with_name(FILE_NAME), exc, aside)
        return self._open_store(data_dir, names, set_aside_damage=False)  # a new file

    def apply(self, ticks: Iterable[Tick]) -> int:
        """Build the candles of ``ticks`` (accepted, in order), write those they changed to
        the store, then publish them; the number of candles changed. The newest tick an
        asset's restored candles hold, read again after a restart before any newer one, is its
        top of book only."""
        with self._lock:
            changed: list[Candle] = []
            tops: dict[str, Tick] = {}
            for tick in ticks:
                if tick.asset not in self.assets:
                    continue
                tops[tick.asset] = tick
                resumed = self._resumed.get(tick.asset) if self._resumed else None
                if resumed is not None:
                    if (tick.ts_us, tick.bid_ticks + tick.ask_ticks) == resumed:
                        del self._resumed[tick.asset]
                        continue  # read again at the start: the restored candles hold it
                    if tick.ts_us > resumed[0]:  # past it: it was not read again
                        del self._resumed[tick.asset]
                    # an older one (read from further back) the book leaves out itself
                changed.extend(self.book.apply(tick))
                self.ticks += 1
            if tops:
                self._publish(changed, tops)
        return len(changed)

    def close_ended(self) -> int:
        """Close, write and publish the candles whose interval ended ``late_s`` ago or more,
        but those of an asset with a held tick stamped inside them or before; how many. Cheap
        when none has ended and no held tick keeps one open (one clock read)."""
        if not self._held_open and self.clock_us() - self.late_us < self._next_end_us:
            return 0
        with self._lock:
            now_us = self.clock_us() - self.late_us
            ended = self.book.close_ended(now_us, self._held_us())
            self._next_end_us, self._held_open = self._next_end(now_us)
            if ended:
                self._publish(ended, {})
        return len(ended)

    def _held_us(self) -> Mapping[str, int]:
        """Asset -> ``ts_us`` of its oldest held tick: its candles ending after it stay open."""
        held_us: dict[str, int] = {}
        for tick in self.held():
            held_us[tick.asset] = min(tick.ts_us, held_us.get(tick.asset, tick.ts_us))
        return held_us

    def _next_end(self, now_us: int) -> tuple[int, bool]:
        """After candles were closed by ``now_us`` (unix us): when the first open candle's
        interval ends after it (far away: none), and whether a candle is open though its
        interval ended by it (a held tick keeps it open)."""
        ends = [c.start_us + INTERVAL_US[c.interval] for c in self._open_candles()]
        later = [end for end in ends if end > now_us]
        return min(later, default=INT64_MAX), len(later) < len(ends)

    def _open_candles(self) -> Iterator[Candle]:
        """The current candle of every asset and interval that is not closed yet."""
        return (c for asset in self.book.assets for interval in INTERVALS
                if (c := self.book.current(asset, interval)) is not None and not c.closed)

    def _publish(self, changed: list[Candle], tops: dict[str, Tick]) -> None:
        """Write ``changed`` to the store, then make them and ``tops`` the next version."""
        if self.store is not None and changed:
            self._write(self.store, changed)
        self.version += 1
        version = self.version
        for asset, tick in tops.items():
            self._latest[book_ticker_stream(asset)] = (version, tick)
        for candle in changed:
            stream = kline_stream(candle.interval, candle.asset)
            if candle.closed:
                self._closed.append((version, candle))
                # no current candle until the next tick of its stream (which a batch's
                # changes list after the one it closes)
                self._latest.pop(stream, None)
            else:
                self._latest[stream] = (version, candle)
                self._next_end_us = min(self._next_end_us,
                                        candle.start_us + INTERVAL_US[candle.interval])
        for loop, event in list(self._waiters):
            loop.call_soon_threadsafe(event.set)

    def _write(self, store: CandleStore, changed: list[Candle]) -> None:
        """Write ``changed`` with what earlier writes left unwritten, so that once the disk
        takes writes again the store holds every candle served (a candle that closed in a
        refused batch was otherwise never written, and differed after a restart)."""
        for candle in changed:
            key = (candle.asset, candle.interval, candle.start_us)
            self._unwritten.pop(key, None)  # re-inserted: the dict stays oldest first
            self._unwritten[key] = candle
        try:
            store.upsert(self._unwritten.values())
        except sqlite3.Error:  # the disk (full, failing): kept, written with the next batch
            self.store_errors += 1
            log.exception("candle store: %d candles wait to be written", len(self._unwritten))
            while len(self._unwritten) > UNWRITTEN_KEPT:
                del self._unwritten[next(iter(self._unwritten))]
                self.store_errors += 1
            return
        except ValueError:  # a candle the store refuses is never writable: given up
            self.store_errors += 1
            log.exception("candle store: a batch was refused")
        self._unwritten.clear()

    async def klines(self, asset: str, interval: str, query: CandleQuery) -> list[Candle]:
        """:meth:`candles` (the :class:`MarketSource` read)."""
        return self.candles(asset, interval, query)

    def candles(self, asset: str, interval: str, query: CandleQuery) -> list[Candle]:
        """The candles of ``asset`` and ``interval`` that ``query`` selects, oldest first."""
        self.close_ended()
        with self._lock:
            recent = self.book.recent(asset, interval)
        answer = select_recent(recent, query)  # a chart's newest candles: memory holds them
        if answer is None:
            # the store first: apply (maybe on another thread) changes memory and store under
            # the lock, so memory read after the store is never behind it, as merge needs; the
            # other way round, a tick applied between the two reads left memory's stale
            # version of a candle (still open) before the newer candle the store already held
            stored = [] if self.store is None else self.store.read(asset, interval, query)
            with self._lock:
                recent = self.book.recent(asset, interval)
            answer = select(merge(stored, recent), query)
        # one whose interval has ended is no longer the current candle, though a late tick
        # may still reach it (only the newest can be open)
        if answer and not answer[-1].closed and answer[-1].start_us + INTERVAL_US[
                interval] <= self.clock_us():
            answer[-1] = answer[-1]._replace(closed=True)
        return answer

    def newest(self, asset: str) -> Tick | None:
        """The newest accepted tick of ``asset`` (None: none since the start)."""
        latest = self._latest.get(book_ticker_stream(asset))
        return latest[1] if latest is not None and isinstance(latest[1], Tick) else None

    def changes(self, since: int) -> Changes:
        """What changed after version ``since`` (see the module docstring)."""
        self.close_ended()
        with self._lock:
            closed = [Change(kline_stream(c.interval, c.asset), c)
                      for v, c in self._closed if v > since]
            latest = [Change(stream, value) for stream, (v, value) in self._latest.items()
                      if v > since]
            return Changes(self.version, closed + latest, self.source_id)

    async def wait(self, since: int, timeout_s: float) -> Changes:
        """:meth:`changes` once there is a version after ``since``, or after ``timeout_s``
        (sooner when a candle's interval ends: its close is a change)."""
        self.close_ended()
        if self.version <= since:
            waiter = (asyncio.get_running_loop(), asyncio.Event())
            self._waiters.add(waiter)
            try:
                if self.version <= since:  # again: apply may have run on another thread
                    # a candle a held tick keeps open is not counted: its hold mostly ends with
                    # a tick applied, a new version, which wakes this reader
                    due_us = self._next_end_us + self.late_us - self.clock_us()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(waiter[1].wait(),
                                               min(timeout_s, max(due_us, 0) / 1e6))
            finally:
                self._waiters.discard(waiter)
        return self.changes(since)

    def stats(self) -> dict[str, int]:
        return {"candle_ticks": self.ticks, "candle_store_errors": self.store_errors,
                "live_version": self.version}

    def close(self) -> None:
        """Close the store (SQLite checkpoints its WAL into the file and removes it); candles
        built after are kept in memory only. Safe to call twice."""
        with self._lock:
            store, self.store = self.store, None
            if store is not None:
                store.close()


def current_streams(assets: Sequence[str]) -> list[str]:
    """Every public stream name of ``assets``."""
    return [*(book_ticker_stream(a) for a in assets),
            *(kline_stream(i, a) for a in assets for i in INTERVALS)]


__all__ = ["CLOSED_KEPT", "Change", "Changes", "MarketLive", "MarketSource", "book_ticker_stream",
           "current_streams", "kline_stream"]
