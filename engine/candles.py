"""Candles (klines) of the mid price, built from the ticks the engine accepts.

A candle covers one interval of :data:`INTERVAL_US` (``1m, 5m, 15m, 1h, 4h, 1d``) of one asset;
its start is aligned to the interval in UTC (unix time has no leap seconds, so a day starts at
a multiple of 86,400 s). Prices are kept exact as **half-ticks**: the mid of a tick is
``(bid_ticks + ask_ticks) / 2`` ticks, so ``bid_ticks + ask_ticks`` (an int) is the mid counted
in half price steps; :func:`half_ticks_to_price` renders it as decimal text at the edge.

:class:`CandleBook` is the state machine (pure: no I/O, no clock; time is the tick's
``ts_us``). ``apply(tick)`` returns every candle the tick changed, which is what a store
upserts and what the ``kline`` stream sends. A candle is closed when a tick of a later interval
arrives, or when the caller says its interval has ended (``close_ended(now_us)``: nothing here
reads a clock, and a quiet feed would otherwise leave the current candle open for ever); the
caller may close an asset's candles by an earlier time than the others' (``until_us``: a tick of
that asset it may still accept).

The book keeps at most ``keep`` candles per (asset, interval) in memory, the current one
included; older ones live in a store (``cluster.live.candle_store``). :class:`CandleQuery`
says which candles an answer holds, :func:`select` answers it from an oldest-first list,
:func:`select_recent` from the book's memory alone when that holds all of it, and
:func:`merge` joins a store's answer with the book's memory.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

from engine.amounts import from_units
from engine.assets import Asset
from engine.market import Tick

MINUTE_US = 60_000_000
INTERVAL_US = MappingProxyType({
    "1m": MINUTE_US,
    "5m": 5 * MINUTE_US,
    "15m": 15 * MINUTE_US,
    "1h": 60 * MINUTE_US,
    "4h": 240 * MINUTE_US,
    "1d": 1440 * MINUTE_US,
})
"""Interval name -> its length in microseconds, shortest first."""
INTERVALS: tuple[str, ...] = tuple(INTERVAL_US)

DEFAULT_LIMIT = 200
MAX_LIMIT = 1000
CANDLES_KEPT = MAX_LIMIT
"""Candles a :class:`CandleBook` keeps in memory per (asset, interval) by default, the current
one included: once it holds that many, the largest newest-``limit`` query needs no store."""

INT64_MAX = 2**63 - 1
# every int of a candle goes into a 64-bit column, and a query's seconds become microseconds
MAX_QUERY_S = INT64_MAX // 1_000_000


class Candle(NamedTuple):
    """One candle of one asset and interval.

    ``start_us``: the interval's start, unix microseconds (a multiple of the interval's length).
    ``open/high/low/close_half_ticks``: the mid price in half price steps (int; see
    :func:`half_ticks_to_price`). ``tick_count``: ticks applied to it (the Kline's ``ticks``).
    ``close_ts_us``: ``ts_us`` of the newest of those ticks (the one that set the close).
    ``closed``: False while it is the current candle of its (asset, interval) and its
    interval has not ended (:meth:`CandleBook.close_ended`).
    """

    asset: str
    interval: str
    start_us: int
    open_half_ticks: int
    high_half_ticks: int
    low_half_ticks: int
    close_half_ticks: int
    tick_count: int
    close_ts_us: int
    closed: bool


def interval_start_us(ts_us: int, interval: str) -> int:
    """Start (unix us, aligned in UTC) of the ``interval`` candle holding ``ts_us``."""
    return ts_us - ts_us % INTERVAL_US[interval]


def half_ticks_to_price(asset: Asset, price_half_ticks: int) -> str:
    """Exact decimal text of a price counted in half steps of ``asset``'s price: the asset's
    decimals when the count is even, one more digit (a trailing 5) when it is odd."""
    if price_half_ticks % 2 == 0:
        return from_units(price_half_ticks // 2, asset.price_decimals)
    return from_units(price_half_ticks * 5, asset.price_decimals + 1)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_candle(candle: Candle) -> None:
    """Raise ValueError unless ``candle`` is one a :class:`CandleBook` could have built: a known
    interval, an aligned start, ``0 < low <= open, close <= high``, at least one tick, its
    newest tick inside the interval, every int within int64."""
    if not isinstance(candle, Candle):
        raise ValueError(f"expected a Candle, got {type(candle).__name__}")
    if not isinstance(candle.asset, str) or not candle.asset:
        raise ValueError("a candle's asset must be a non-empty string")
    if candle.interval not in INTERVAL_US:
        raise ValueError(f"unknown candle interval {candle.interval!r}")
    ints = (candle.start_us, candle.open_half_ticks, candle.high_half_ticks,
            candle.low_half_ticks, candle.close_half_ticks, candle.tick_count, candle.close_ts_us)
    if not all(_is_int(v) and -INT64_MAX - 1 <= v <= INT64_MAX for v in ints):
        raise ValueError("a candle's prices, times and count must be 64-bit integers")
    if not isinstance(candle.closed, bool):
        raise ValueError("a candle's closed flag must be a bool")
    length_us = INTERVAL_US[candle.interval]
    if candle.start_us % length_us:
        raise ValueError(f"candle start {candle.start_us} is not aligned to {candle.interval}")
    low, high = candle.low_half_ticks, candle.high_half_ticks
    if not (0 < low <= min(candle.open_half_ticks, candle.close_half_ticks)
            and max(candle.open_half_ticks, candle.close_half_ticks) <= high):
        raise ValueError("a candle needs 0 < low <= open, close <= high")
    if candle.tick_count < 1:
        raise ValueError("a candle holds at least one tick")
    if not candle.start_us <= candle.close_ts_us < candle.start_us + length_us:
        raise ValueError("a candle's newest tick must lie inside its interval")


@dataclass(frozen=True, slots=True)
class CandleQuery:
    """Which candles of one (asset, interval) an answer holds, always oldest first.

    ``start_s``/``end_s`` (unix seconds, Backpack's convention) bound the candles' starts, both
    inclusive: a candle is in range when ``start_s <= start_us / 1e6 <= end_s``; either may be
    None (unbounded). Of the candles in range the answer holds ``limit``: the oldest ones when
    ``start_s`` is given (reading forward from it), otherwise the newest ones (the default: the
    newest ``limit``, the current candle included). Invalid values raise ValueError.
    """

    limit: int = DEFAULT_LIMIT
    start_s: int | None = None
    end_s: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.limit) or not 1 <= self.limit <= MAX_LIMIT:
            raise ValueError(f"limit must be an integer in 1..{MAX_LIMIT}")
        for name in ("start_s", "end_s"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_QUERY_S):
                raise ValueError(f"{name} must be unix seconds in 0..{MAX_QUERY_S}")
        if self.start_s is not None and self.end_s is not None and self.start_s > self.end_s:
            raise ValueError("start_s must not be after end_s")

    @property
    def first_start_us(self) -> int:
        """Smallest candle start in range (unix us)."""
        return -INT64_MAX - 1 if self.start_s is None else self.start_s * 1_000_000

    @property
    def last_start_us(self) -> int:
        """Largest candle start in range (unix us)."""
        return INT64_MAX if self.end_s is None else self.end_s * 1_000_000


def select(candles: Sequence[Candle], query: CandleQuery) -> list[Candle]:
    """The answer to ``query`` from ``candles`` of one (asset, interval), sorted by
    ``start_us`` with no start twice; oldest first."""
    starts = [c.start_us for c in candles]
    lo = bisect.bisect_left(starts, query.first_start_us)
    hi = bisect.bisect_right(starts, query.last_start_us)
    if query.start_s is not None:
        hi = min(hi, lo + query.limit)
    else:
        lo = max(lo, hi - query.limit)
    return list(candles[lo:hi])


def select_recent(recent: Sequence[Candle], query: CandleQuery) -> list[Candle] | None:
    """The answer to ``query`` from a book's memory alone (``recent``: its candles of one
    (asset, interval), oldest first), or None when a store may hold some of it. A candle only
    the store holds is older than every one in memory (memory keeps the newest of each
    series), so memory answers alone when its oldest candle starts at or before the range, or
    when its newest ``limit`` in range are ``limit`` long."""
    answer = select(recent, query)
    if recent and (recent[0].start_us <= query.first_start_us or (
            query.start_s is None and len(answer) == query.limit)):
        return answer
    return None


def merge(stored: Iterable[Candle], recent: Iterable[Candle]) -> list[Candle]:
    """``stored`` and ``recent`` candles of one (asset, interval) as one list, oldest first;
    a start present in both takes the ``recent`` version (the book's memory is never behind
    its store).

    ``select(merge(store_answer, book.recent(...)), query)`` answers ``query`` exactly when the
    store's answer is its own answer to the same query and every candle that left the book's
    memory reached the store first.
    """
    by_start = {c.start_us: c for c in stored}
    by_start.update((c.start_us, c) for c in recent)
    return [by_start[s] for s in sorted(by_start)]


class _Series:
    """The candles in memory of one (asset, interval): the current one and the newest closed
    ones before it."""

    __slots__ = ("asset", "closed", "current", "interval", "length_us")

    def __init__(self, asset: str, interval: str, keep: int) -> None:
        self.asset = asset
        self.interval = interval
        self.length_us = INTERVAL_US[interval]
        self.current: Candle | None = None
        self.closed: deque[Candle] = deque(maxlen=keep - 1)

    def candles(self) -> list[Candle]:
        out = list(self.closed)
        if self.current is not None:
            out.append(self.current)
        return out


class CandleBook:
    """Candles of ``assets`` (names) for ``intervals``, built from accepted ticks.

    At most ``keep`` candles per (asset, interval) stay in memory, the current one included;
    the caller persists what ``apply`` returns. ``candles`` restores a book from stored candles
    (such as a store's newest ones per (asset, interval)) so it continues their current ones
    (a newest one stored closed stays closed).
    """

    def __init__(self, assets: Iterable[str], intervals: Sequence[str] = INTERVALS, *,
                 keep: int = CANDLES_KEPT, candles: Iterable[Candle] = ()) -> None:
        if not _is_int(keep) or keep < 1:
            raise ValueError("keep must be a positive integer")
        unknown = [i for i in intervals if i not in INTERVAL_US]
        if unknown or len(set(intervals)) != len(intervals) or not intervals:
            raise ValueError(f"intervals must be distinct names of {INTERVALS}")
        self.intervals = tuple(intervals)
        self.keep = keep
        self._series = {
            asset: tuple(_Series(asset, interval, keep) for interval in self.intervals)
            for asset in assets
        }
        if not self._series:
            raise ValueError("a candle book needs at least one asset")
        # asset -> the latest time close_ended closed its candles by: intervals ending by it
        # are over
        self.ended_us = dict.fromkeys(self._series, 0)
        self._restore(candles)

    @property
    def assets(self) -> tuple[str, ...]:
        return tuple(self._series)

    def _restore(self, candles: Iterable[Candle]) -> None:
        """Load stored candles: per (asset, interval) the newest becomes the current candle,
        with its flag (one stored closed is final: reopened, a tick stamped inside it would
        change a candle already sent closed), the older ones are closed. Candles of assets or
        intervals this book does not hold are skipped; an invalid candle or a start given
        twice raises ValueError and loads nothing."""
        grouped: dict[tuple[str, str], dict[int, Candle]] = {}
        for candle in candles:
            check_candle(candle)
            group = grouped.setdefault((candle.asset, candle.interval), {})
            if candle.start_us in group:
                raise ValueError(f"candle {candle.asset} {candle.interval} "
                                 f"{candle.start_us} given twice")
            group[candle.start_us] = candle
        for series_of in self._series.values():
            for series in series_of:
                found = grouped.get((series.asset, series.interval))
                if not found:
                    continue
                ordered = [found[s] for s in sorted(found)][-self.keep:]
                series.closed.extend(c._replace(closed=True) for c in ordered[:-1])
                series.current = ordered[-1]

    def apply(self, tick: Tick) -> list[Candle]:
        """Add ``tick`` (bid/ask in integer ticks, ``0 < bid <= ask``) to the candles of its
        asset; return the candles it changed, by interval in the book's order: for each, the
        previous candle with ``closed=True`` when the tick starts a new interval (reported
        closed this once), then the current candle.

        A tick at exactly an interval's boundary starts the new candle. A tick older than the
        newest tick of an interval's current candle — in particular one older than that candle
        itself — is ignored for that interval: a candle's close is its newest tick's mid, and
        a closed candle never changes again, so a tick of a candle :meth:`close_ended` closed
        is ignored too. A tick that starts a candle whose interval ended by its asset's
        :attr:`ended_us` starts it closed (reported closed this once). A current candle closed by
        :meth:`close_ended` is not reported again when the next one starts. A tick of an
        unknown asset raises KeyError, a tick that is not integer ticks with
        ``0 < bid <= ask`` (and ``bid + ask``, ``ts_us`` within int64, ``ts_us >= 0``) raises
        ValueError; either changes nothing.
        """
        series_of = self._series[tick.asset]
        ended_us = self.ended_us[tick.asset]
        bid, ask, ts_us = tick.bid_ticks, tick.ask_ticks, tick.ts_us
        if not (_is_int(bid) and _is_int(ask) and _is_int(ts_us)):
            raise ValueError("a tick's bid, ask and ts_us must be integers")
        mid = bid + ask
        if not 0 < bid <= ask or mid > INT64_MAX or not 0 <= ts_us <= INT64_MAX:
            raise ValueError("a tick needs 0 < bid <= ask and values within int64")
        changed: list[Candle] = []
        for series in series_of:
            current = series.current
            start_us = ts_us - ts_us % series.length_us
            if current is not None and start_us == current.start_us:
                if ts_us < current.close_ts_us or current.closed:
                    continue
                candle = Candle(
                    series.asset, series.interval, start_us, current.open_half_ticks,
                    max(current.high_half_ticks, mid), min(current.low_half_ticks, mid), mid,
                    current.tick_count + 1, ts_us, False)
            else:
                if current is not None:
                    if start_us < current.start_us:
                        continue
                    if current.closed:  # by close_ended, which reported it
                        series.closed.append(current)
                    else:
                        ended = current._replace(closed=True)
                        series.closed.append(ended)
                        changed.append(ended)
                # a late tick starting a candle of an interval already over: final at once
                candle = Candle(series.asset, series.interval, start_us, mid, mid, mid, mid, 1,
                                ts_us, start_us + series.length_us <= ended_us)
            series.current = candle
            changed.append(candle)
        return changed

    def close_ended(self, now_us: int,
                    until_us: Mapping[str, int] = MappingProxyType({})) -> list[Candle]:
        """Close every current candle whose interval has ended by ``now_us`` (unix us, the
        caller's clock), or for an asset in ``until_us`` (asset -> unix us) by the earlier of
        ``now_us`` and its time there (assets the book does not hold are ignored): return them
        with ``closed=True`` (reported closed this once), by asset, then interval in the
        book's order. An asset's :attr:`ended_us` becomes that time when later (a candle a
        late tick starts in an interval ended by then is closed at once). A time that is not
        an int raises ValueError and changes nothing."""
        if not _is_int(now_us) or not all(_is_int(t) for t in until_us.values()):
            raise ValueError("now_us and until_us's times must be integers")
        changed: list[Candle] = []
        for asset, series_of in self._series.items():
            ended_us = max(self.ended_us[asset], min(now_us, until_us.get(asset, now_us)))
            self.ended_us[asset] = ended_us
            for series in series_of:
                current = series.current
                if current is not None and not current.closed \
                        and current.start_us + series.length_us <= ended_us:
                    series.current = current._replace(closed=True)
                    changed.append(series.current)
        return changed

    def current(self, asset: str, interval: str) -> Candle | None:
        """The newest candle of (asset, interval), None before its first tick: open, unless
        :meth:`close_ended` closed it (then the next tick of a later interval starts the next
        one)."""
        return self._series_of(asset, interval).current

    def recent(self, asset: str, interval: str) -> list[Candle]:
        """Every candle in memory of (asset, interval), oldest first, the current one last
        (at most ``keep``)."""
        return self._series_of(asset, interval).candles()

    def query(self, asset: str, interval: str, query: CandleQuery) -> list[Candle]:
        """The answer to ``query`` from memory alone (see :func:`merge` for older candles)."""
        return select(self.recent(asset, interval), query)

    def _series_of(self, asset: str, interval: str) -> _Series:
        for series in self._series[asset]:
            if series.interval == interval:
                return series
        raise KeyError(interval)
