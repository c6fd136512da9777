"""Candles: worked examples at interval boundaries (a tick exactly at a boundary starts the new
candle, one microsecond before stays in the old one), exact rendering of odd half-ticks, the
closed-once rule (a tick of a later interval or the caller's clock closes a candle; an asset
may be given an earlier time than the clock), late and bad ticks, the query's range and limit
rules, the memory bound and a restored book; then Hypothesis: the book and the Fraction
reference agree on every change and every answer for random tick sequences, and a book
restored mid-way continues exactly."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest
from engine.assets import DEFAULT_ASSETS
from engine.assets import Asset
from engine.assets import AssetRegistry
from engine.candle_reference import ReferenceCandles
from engine.candle_reference import exact
from engine.candle_reference import mid_price
from engine.candles import CANDLES_KEPT
from engine.candles import INTERVAL_US
from engine.candles import INTERVALS
from engine.candles import MAX_LIMIT
from engine.candles import MAX_QUERY_S
from engine.candles import Candle
from engine.candles import CandleBook
from engine.candles import CandleQuery
from engine.candles import check_candle
from engine.candles import half_ticks_to_price
from engine.candles import interval_start_us
from engine.candles import merge
from engine.candles import select
from engine.candles import select_recent
from engine.market import Tick
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

SOL, BTC = DEFAULT_ASSETS["SOL"], DEFAULT_ASSETS["BTC"]  # price steps 0.01 and 0.1
MINUTE = 60_000_000
DAY = 1440 * MINUTE
T_DAY = 1_699_920_000 * 10**6  # 2023-11-14 00:00 UTC: every interval starts here
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def tick(ts_us: int, bid: int = 9_896, ask: int = 9_897, asset: str = "SOL") -> Tick:
    return Tick(asset, bid, ask, ts_us, 0, "sim")


def by_interval(changed: list[Candle]) -> dict[str, list[Candle]]:
    out: dict[str, list[Candle]] = {}
    for candle in changed:
        out.setdefault(candle.interval, []).append(candle)
    return out


# ------------------------------------------------------------------ rendering
@pytest.mark.parametrize(("asset", "half_ticks", "text"), [
    (SOL, 19_793, "98.965"),  # the SPEC's example: bid 98.96, ask 98.97
    (SOL, 19_792, "98.96"),
    (SOL, 1, "0.005"),
    (BTC, 1_300_001, "65000.05"),
    (BTC, 1_300_000, "65000.0"),
    (Asset("WHOLE", "WHOLE_USDC", 0, 0, 10), 3, "1.5"),
    (Asset("WHOLE", "WHOLE_USDC", 0, 0, 10), 4, "2"),
])
def test_half_ticks_render_exactly(asset: Asset, half_ticks: int, text: str) -> None:
    assert half_ticks_to_price(asset, half_ticks) == text


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 12), st.integers(1, 2**63 - 1))
def test_rendering_is_the_exact_mid_with_one_more_digit_only_when_odd(decimals: int,
                                                                      half_ticks: int) -> None:
    asset = Asset("X", "X_USDC", decimals, 0, 10)
    text = half_ticks_to_price(asset, half_ticks)
    assert Fraction(text) == Fraction(half_ticks, 2 * 10**decimals)
    digits = len(text.partition(".")[2])
    assert digits == (decimals + 1 if half_ticks % 2 else decimals)


# ------------------------------------------------------------------ boundaries
def test_a_tick_at_a_boundary_starts_the_new_candle_and_one_microsecond_before_stays() -> None:
    book = CandleBook(["SOL"])
    before = book.apply(tick(T_DAY - 1, 9_000, 9_001))
    assert [c.interval for c in before] == list(INTERVALS)
    assert {c.start_us for c in before if c.interval == "1m"} == {T_DAY - MINUTE}
    assert {c.start_us for c in before if c.interval == "1d"} == {T_DAY - DAY}

    at = by_interval(book.apply(tick(T_DAY, 9_100, 9_100)))
    assert len(at) == len(INTERVALS)  # a day boundary is every interval's boundary
    for interval, (ended, started) in at.items():
        length = INTERVAL_US[interval]
        assert ended == Candle("SOL", interval, T_DAY - length, 18_001, 18_001, 18_001, 18_001,
                               1, T_DAY - 1, True)
        assert started == Candle("SOL", interval, T_DAY, 18_200, 18_200, 18_200, 18_200, 1,
                                 T_DAY, False)

    # one microsecond before the next minute stays in the first minute of the day
    last = book.apply(tick(T_DAY + MINUTE - 1, 8_900, 8_902))
    assert [(c.interval, c.start_us, c.closed) for c in last] == \
        [(i, T_DAY, False) for i in INTERVALS]
    assert last[0] == Candle("SOL", "1m", T_DAY, 18_200, 18_200, 17_802, 17_802, 2,
                             T_DAY + MINUTE - 1, False)

    # the next minute: only 1m turns over
    nxt = by_interval(book.apply(tick(T_DAY + MINUTE, 9_000, 9_000)))
    assert [(c.start_us, c.closed) for c in nxt["1m"]] == [(T_DAY, True),
                                                          (T_DAY + MINUTE, False)]
    assert all(len(nxt[i]) == 1 and nxt[i][0].tick_count == 3 for i in INTERVALS[1:])
    assert nxt["5m"][0] == Candle("SOL", "5m", T_DAY, 18_200, 18_200, 17_802, 18_000, 3,
                                  T_DAY + MINUTE, False)


@pytest.mark.parametrize("interval", INTERVALS)
def test_interval_starts_are_aligned_in_utc(interval: str) -> None:
    length = INTERVAL_US[interval]
    assert interval_start_us(T_DAY, interval) == T_DAY
    assert interval_start_us(T_DAY - 1, interval) == T_DAY - length
    assert interval_start_us(T_DAY + length - 1, interval) == T_DAY
    # 4h candles start at 00, 04, 08 ... UTC
    assert interval_start_us(T_DAY + 5 * 3600 * 10**6, "4h") == T_DAY + 4 * 3600 * 10**6


def test_a_closed_candle_is_reported_closed_once_and_never_changes_again() -> None:
    book = CandleBook(["SOL"], ["1m"])
    book.apply(tick(T_DAY + 10))
    changed = book.apply(tick(T_DAY + MINUTE + 5))
    closed = [c for c in changed if c.closed]
    assert [c.start_us for c in closed] == [T_DAY]
    for ts in (T_DAY + MINUTE + 6, T_DAY + MINUTE + 7, T_DAY + 2 * MINUTE - 1):
        assert [c.closed for c in book.apply(tick(ts))] == [False]
    # a late tick of the closed minute changes nothing and reports nothing
    assert book.apply(tick(T_DAY + 20, 1, 1)) == []
    assert book.recent("SOL", "1m") == [closed[0], book.current("SOL", "1m")]
    assert book.recent("SOL", "1m")[0].tick_count == 1


def test_a_candle_whose_interval_ended_by_the_clock_is_reported_closed_once() -> None:
    book = CandleBook(["SOL"], ["1m", "5m"])
    first, _ = book.apply(tick(T_DAY + 10))
    assert book.close_ended(T_DAY + MINUTE - 1) == []  # its minute has not ended
    assert book.close_ended(T_DAY + MINUTE) == [first._replace(closed=True)]
    assert book.close_ended(T_DAY + MINUTE + 1) == []  # once
    assert book.current("SOL", "1m") == first._replace(closed=True)
    # a tick of the closed minute arriving late changes only the 5m candle
    (five,) = book.apply(tick(T_DAY + MINUTE - 5, 1, 1))
    assert five.interval == "5m" and five.tick_count == 2
    # the next minute's first tick starts its candle without closing the last one again
    changed = book.apply(tick(T_DAY + MINUTE + 5))
    assert [(c.interval, c.start_us, c.closed) for c in changed] == [
        ("1m", T_DAY + MINUTE, False), ("5m", T_DAY, False)]
    assert book.recent("SOL", "1m") == [first._replace(closed=True), changed[0]]
    # a quiet feed: every interval that ended is closed, the 5m one too
    assert [(c.interval, c.closed) for c in book.close_ended(T_DAY + DAY)] == [
        ("1m", True), ("5m", True)]
    # a late tick of an interval that ended with no candle: its candle, closed at once
    late = book.apply(tick(T_DAY + 10 * MINUTE))
    assert [(c.interval, c.start_us, c.closed) for c in late] == [
        ("1m", T_DAY + 10 * MINUTE, True), ("5m", T_DAY + 10 * MINUTE, True)]
    assert book.apply(tick(T_DAY + 10 * MINUTE + 1)) == []  # and never changes again
    assert book.close_ended(T_DAY + DAY) == []


def test_an_asset_s_own_time_bounds_only_its_candles() -> None:
    """A caller holding back a tick of SOL stamped inside its minute closes SOL's candles by
    that tick's time, BTC's by the clock."""
    book = CandleBook(["SOL", "BTC"], ["1m", "5m"])
    book.apply(tick(T_DAY + 10))
    btc, _ = book.apply(tick(T_DAY + 10, asset="BTC"))
    held_us = {"SOL": T_DAY + 20, "ETH": T_DAY}  # an asset the book does not hold: ignored
    assert book.close_ended(T_DAY + 2 * MINUTE, held_us) == [btc._replace(closed=True)]
    assert book.ended_us == {"SOL": T_DAY + 20, "BTC": T_DAY + 2 * MINUTE}
    # a late tick starting an ended interval is closed at once for BTC only
    assert [c.closed for c in book.apply(tick(T_DAY + MINUTE, asset="BTC"))] == [True, False]
    assert [(c.start_us, c.closed) for c in book.apply(tick(T_DAY + MINUTE))] == [
        (T_DAY, True), (T_DAY + MINUTE, False), (T_DAY, False)]
    # a later time for SOL than the clock counts as the clock
    assert [(c.asset, c.interval, c.start_us) for c in book.close_ended(
        T_DAY + 5 * MINUTE, {"SOL": T_DAY + DAY})] == [
        ("SOL", "1m", T_DAY + MINUTE), ("SOL", "5m", T_DAY), ("BTC", "5m", T_DAY)]
    with pytest.raises(ValueError):
        book.close_ended(T_DAY + DAY, {"SOL": 1.5})  # type: ignore[dict-item]
    assert book.ended_us == {"SOL": T_DAY + 5 * MINUTE, "BTC": T_DAY + 5 * MINUTE}


def test_late_ticks_are_ignored_for_every_interval_they_are_older_than() -> None:
    book = CandleBook(["SOL"])
    book.apply(tick(T_DAY + 2 * MINUTE, 100, 100))
    state = {i: book.recent("SOL", i) for i in INTERVALS}
    # older than the current 1m candle (same 5m..1d candles, older than their newest tick)
    assert book.apply(tick(T_DAY + MINUTE, 1, 1)) == []
    # inside the current candle but older than its newest tick
    assert book.apply(tick(T_DAY + 2 * MINUTE - 1, 1, 1)) == []
    # older than every current candle
    assert book.apply(tick(T_DAY - DAY, 1, 1)) == []
    assert {i: book.recent("SOL", i) for i in INTERVALS} == state
    # a tick as old as the newest one counts: exchanges send several updates per microsecond
    same = book.apply(tick(T_DAY + 2 * MINUTE, 50, 50))
    assert [(c.tick_count, c.low_half_ticks, c.close_half_ticks) for c in same] == \
        [(2, 100, 100)] * len(INTERVALS)


@pytest.mark.parametrize("bad", [
    tick(T_DAY, 9_000, 8_999),  # bid above ask
    tick(T_DAY, 0, 1),
    tick(T_DAY, -3, 1),
    tick(T_DAY, 1.5, 2),  # type: ignore[arg-type]
    tick(T_DAY, True, 2),
    tick(-1),
    tick(2**63),
    tick(T_DAY, 2**62, 2**62),  # the mid in half-ticks does not fit int64
])
def test_a_bad_tick_raises_and_changes_nothing(bad: Tick) -> None:
    book = CandleBook(["SOL"])
    book.apply(tick(T_DAY - 1))
    state = {i: book.recent("SOL", i) for i in INTERVALS}
    with pytest.raises(ValueError):
        book.apply(bad)
    assert {i: book.recent("SOL", i) for i in INTERVALS} == state


def test_an_unknown_asset_or_interval_is_a_key_error() -> None:
    book = CandleBook(["SOL"], ["1m", "1h"])
    with pytest.raises(KeyError):
        book.apply(tick(T_DAY, asset="BTC"))
    with pytest.raises(KeyError):
        book.recent("SOL", "5m")
    assert book.current("SOL", "1m") is None and book.recent("SOL", "1h") == []


def test_assets_are_independent() -> None:
    book = CandleBook(["SOL", "BTC"], ["1m"])
    book.apply(tick(T_DAY + 5, 10, 10))
    assert book.apply(tick(T_DAY + 1, 20, 20, asset="BTC"))[0].tick_count == 1
    assert book.apply(tick(T_DAY + 2, 30, 30, asset="BTC"))[0].close_half_ticks == 60
    assert book.current("SOL", "1m") == Candle("SOL", "1m", T_DAY, 20, 20, 20, 20, 1,
                                               T_DAY + 5, False)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"keep": 0}, "keep"),
    ({"intervals": ["2m"]}, "intervals"),
    ({"intervals": ["1m", "1m"]}, "intervals"),
    ({"intervals": []}, "intervals"),
])
def test_a_book_refuses_a_bad_configuration(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CandleBook(["SOL"], **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="asset"):
        CandleBook([])


# ------------------------------------------------------------------ memory and queries
def minutes_book(count: int, keep: int = CANDLES_KEPT) -> CandleBook:
    """A 1m book with one tick in each of ``count`` minutes from T_DAY."""
    book = CandleBook(["SOL"], ["1m"], keep=keep)
    for minute in range(count):
        book.apply(tick(T_DAY + minute * MINUTE + 1, 100 + minute, 100 + minute))
    return book


def test_memory_keeps_the_newest_candles_up_to_the_bound() -> None:
    book = minutes_book(5, keep=3)
    assert [(c.start_us, c.closed) for c in book.recent("SOL", "1m")] == \
        [(T_DAY + 2 * MINUTE, True), (T_DAY + 3 * MINUTE, True), (T_DAY + 4 * MINUTE, False)]
    only_current = minutes_book(5, keep=1)
    assert [c.start_us for c in only_current.recent("SOL", "1m")] == [T_DAY + 4 * MINUTE]


def starts(candles: list[Candle]) -> list[int]:
    """Minutes after T_DAY."""
    return [(c.start_us - T_DAY) // MINUTE for c in candles]


T_S = T_DAY // 10**6


@pytest.mark.parametrize(("query", "minutes"), [
    (CandleQuery(), list(range(10))),
    (CandleQuery(limit=3), [7, 8, 9]),  # the newest, the current one included
    (CandleQuery(limit=3, start_s=T_S + 120), [2, 3, 4]),  # forward from the start
    (CandleQuery(start_s=T_S + 120), list(range(2, 10))),
    (CandleQuery(start_s=T_S + 121), list(range(3, 10))),  # a start inside a candle skips it
    (CandleQuery(limit=2, end_s=T_S + 300), [4, 5]),  # the newest up to the end, inclusive
    (CandleQuery(end_s=T_S + 299), list(range(5))),
    (CandleQuery(start_s=T_S + 60, end_s=T_S + 180), [1, 2, 3]),  # both ends inclusive
    (CandleQuery(limit=2, start_s=T_S + 60, end_s=T_S + 180), [1, 2]),
    (CandleQuery(start_s=T_S + 180, end_s=T_S + 180), [3]),
    (CandleQuery(start_s=T_S + 600), []),
    (CandleQuery(end_s=T_S - 1), []),
])
def test_queries_select_by_start_inclusive_and_limit_from_the_start_or_the_newest(
        query: CandleQuery, minutes: list[int]) -> None:
    book = minutes_book(10)
    assert starts(book.query("SOL", "1m", query)) == minutes
    assert starts(select(book.recent("SOL", "1m"), query)) == minutes


@pytest.mark.parametrize("kwargs", [
    {"limit": 0}, {"limit": MAX_LIMIT + 1}, {"limit": True}, {"limit": 2.0},
    {"start_s": -1}, {"end_s": MAX_QUERY_S + 1}, {"start_s": "1"},
    {"start_s": 10, "end_s": 9},
])
def test_a_bad_query_raises(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CandleQuery(**kwargs)  # type: ignore[arg-type]


def test_merge_prefers_the_books_memory_and_answers_beyond_it() -> None:
    full = minutes_book(10)
    book = minutes_book(10, keep=3)
    # a store that has everything but lags on the last two minutes
    stored = [*full.recent("SOL", "1m")[:8]]
    stored[7] = stored[7]._replace(closed=False)  # stored while it was the current one
    merged = merge(stored, book.recent("SOL", "1m"))
    assert merged == full.recent("SOL", "1m")
    assert select(merged, CandleQuery(limit=4)) == full.recent("SOL", "1m")[-4:]


def test_memory_alone_answers_a_range_it_holds_whole() -> None:
    """Memory keeps minutes 7-9 of 10: the newest 3 (or fewer), or a range starting at minute
    7 or later, come from it alone; the newest 4, or a range from minute 6 on, need the
    store (None)."""
    recent = minutes_book(10, keep=3).recent("SOL", "1m")
    full = minutes_book(10).recent("SOL", "1m")
    assert select_recent(recent, CandleQuery(limit=3)) == full[-3:]
    assert select_recent(recent, CandleQuery(limit=2)) == full[-2:]
    assert select_recent(recent, CandleQuery(limit=4)) is None
    from_7 = CandleQuery(limit=5, start_s=full[7].start_us // 10**6)
    assert select_recent(recent, from_7) == full[7:]
    assert select_recent(recent, CandleQuery(limit=5, start_s=full[6].start_us // 10**6)) is None
    until_8 = CandleQuery(limit=2, end_s=full[8].start_us // 10**6)
    assert select_recent(recent, until_8) == full[7:9]
    assert select_recent(recent, CandleQuery(limit=3, end_s=full[8].start_us // 10**6)) is None
    assert select_recent([], CandleQuery(limit=1)) is None


# ------------------------------------------------------------------ restore
def test_a_restored_book_continues_the_current_candle() -> None:
    book = CandleBook(["SOL"])
    book.apply(tick(T_DAY + 10, 100, 102))
    book.apply(tick(T_DAY + MINUTE + 10, 90, 90))
    restored = CandleBook(["SOL"], candles=[book.recent("SOL", i)[-1] for i in INTERVALS])
    following = tick(T_DAY + MINUTE + 20, 120, 120)
    assert restored.apply(following) == book.apply(following)
    assert [restored.current("SOL", i) for i in INTERVALS] == \
        [book.current("SOL", i) for i in INTERVALS]
    assert restored.current("SOL", "1h") == Candle("SOL", "1h", T_DAY, 202, 240, 180, 240, 3,
                                                   T_DAY + MINUTE + 20, False)


def test_restore_keeps_the_newest_s_flag_closes_the_rest_and_keeps_the_bound() -> None:
    candles = minutes_book(6).recent("SOL", "1m")
    older_open = [c._replace(closed=False) for c in candles]
    book = CandleBook(["SOL", "BTC"], ["1m", "5m"], keep=4, candles=reversed(older_open))
    assert book.recent("SOL", "1m") == candles[-4:]
    assert book.recent("SOL", "5m") == [] and book.current("BTC", "1m") is None
    newest_closed = [*candles[:-1], candles[-1]._replace(closed=True)]
    book = CandleBook(["SOL"], ["1m"], keep=4, candles=newest_closed)
    assert book.recent("SOL", "1m") == newest_closed[-4:]


def test_a_restored_final_candle_is_not_reopened_by_a_later_tick_of_its_interval() -> None:
    """A candle stored final (closed by the clock before a restart) stays final: a tick
    stamped inside it, newer than its close, is left out, and the next interval's first tick
    does not report it closed a second time."""
    book = CandleBook(["SOL"], ["1m"])
    book.apply(tick(T_DAY + 10, 100, 100))
    (final,) = book.close_ended(T_DAY + MINUTE)
    restored = CandleBook(["SOL"], ["1m"], candles=[final])
    assert restored.current("SOL", "1m") == final
    assert restored.apply(tick(T_DAY + 20, 90, 90)) == []
    assert restored.recent("SOL", "1m") == [final]
    nxt = restored.apply(tick(T_DAY + MINUTE + 1, 120, 120))
    assert nxt == book.apply(tick(T_DAY + MINUTE + 1, 120, 120))
    assert [(c.start_us, c.closed) for c in nxt] == [(T_DAY + MINUTE, False)]
    assert restored.recent("SOL", "1m") == [final, *nxt]


def test_restore_skips_what_the_book_does_not_hold_and_refuses_bad_candles() -> None:
    other = Candle("ETH", "1m", T_DAY, 1, 1, 1, 1, 1, T_DAY, False)
    assert CandleBook(["SOL"], candles=[other]).recent("SOL", "1m") == []
    good = Candle("SOL", "1m", T_DAY, 4, 5, 3, 4, 2, T_DAY + 7, False)
    with pytest.raises(ValueError, match="twice"):
        CandleBook(["SOL"], candles=[good, good])
    with pytest.raises(ValueError):
        CandleBook(["SOL"], candles=[good._replace(start_us=T_DAY + 1)])


@pytest.mark.parametrize("change", [
    {"interval": "2m"}, {"asset": ""}, {"start_us": T_DAY + 1}, {"low_half_ticks": 0},
    {"low_half_ticks": 5}, {"high_half_ticks": 3}, {"open_half_ticks": 6},
    {"close_half_ticks": 2}, {"tick_count": 0}, {"close_ts_us": T_DAY - 1},
    {"close_ts_us": T_DAY + MINUTE}, {"closed": 1}, {"high_half_ticks": 2**63},
    {"tick_count": 2.0}, {"start_us": True},
])
def test_check_candle_refuses_what_no_book_builds(change: dict[str, Any]) -> None:
    good = Candle("SOL", "1m", T_DAY, 4, 5, 3, 4, 2, T_DAY + 7, False)
    check_candle(good)
    with pytest.raises(ValueError):
        check_candle(good._replace(**change))


# ------------------------------------------------------------------ against the reference
REGISTRY = AssetRegistry([SOL, BTC])
steps_us = st.one_of(
    st.integers(0, 90 * 10**6),
    st.sampled_from([0, 1, MINUTE - 1, MINUTE, 5 * MINUTE, 4 * 60 * MINUTE, DAY]),
    st.integers(-3 * MINUTE, -1),  # late ticks
    st.integers(0, 2 * DAY),
)
prices = st.one_of(st.integers(1, 2_000), st.integers(1, 2**61))


@st.composite
def tick_sequences(draw: st.DrawFn, max_size: int = 40) -> list[Tick]:
    ts_us = T_DAY + draw(st.integers(-DAY, DAY))
    out = []
    for _ in range(draw(st.integers(1, max_size))):
        ts_us += draw(steps_us)
        bid = draw(prices)
        out.append(Tick(draw(st.sampled_from(["SOL", "BTC"])), bid, bid + draw(st.integers(0, 3)),
                        ts_us, 0, "sim"))
    return out


clock_offsets = st.one_of(
    st.integers(-MINUTE, 2 * MINUTE), st.sampled_from([0, MINUTE, 5 * MINUTE, DAY]),
    st.integers(0, 2 * DAY))
# before the tick at an index, the clock at that tick's time plus an offset (close_ended), and
# per asset maybe an earlier time, as offsets too (a tick of the asset held back)
clock_reads = st.lists(st.tuples(
    st.integers(0, 40), clock_offsets,
    st.dictionaries(st.sampled_from(["SOL", "BTC"]), clock_offsets, max_size=2)), max_size=6)


@SETTINGS
@given(tick_sequences(), st.sampled_from([1, 2, 3, CANDLES_KEPT]), st.integers(0, 3),
       st.lists(st.tuples(st.integers(1, 5), st.one_of(st.none(), st.integers(-DAY, 3 * DAY)),
                          st.one_of(st.none(), st.integers(0, 3 * DAY))), max_size=4),
       clock_reads)
def test_the_book_equals_the_reference(ticks: list[Tick], keep: int, lag: int,
                                       queries: list[tuple[int, int | None, int | None]],
                                       clock: list[tuple[int, int, dict[str, int]]]) -> None:
    """Also the book's memory merged with a store that lags by ``lag`` ticks: exact as long
    as no candle leaves memory before it is stored, which ``lag < keep`` guarantees (one tick
    closes at most one candle per interval)."""
    lag = min(lag, keep - 1)
    book = CandleBook(REGISTRY, keep=keep)
    reference = ReferenceCandles(REGISTRY)
    store: dict[tuple[str, str, int], Candle] = {}  # every version apply returned, the last wins
    for n, t in enumerate(ticks):
        changed = []
        for at, offset_us, until_offsets in clock:
            if at == n:
                until_us = {a: t.ts_us + o for a, o in until_offsets.items()}
                closed = book.close_ended(t.ts_us + offset_us, until_us)
                assert [exact(REGISTRY[c.asset], c) for c in closed] == \
                    reference.close_ended(t.ts_us + offset_us, until_us)
                changed += closed
        applied = book.apply(t)
        assert [exact(REGISTRY[c.asset], c) for c in applied] == reference.apply(t)
        changed += applied
        if n < len(ticks) - lag:
            store.update(((c.asset, c.interval, c.start_us), c) for c in changed)
    for asset in REGISTRY:
        for interval in INTERVALS:
            everything = reference.candles(asset, interval)
            recent = book.recent(asset, interval)
            assert [exact(REGISTRY[asset], c) for c in recent] == everything[-keep:]
            stored = [c for k, c in sorted(store.items()) if k[:2] == (asset, interval)]
            if lag == 0:
                assert [exact(REGISTRY[asset], c) for c in stored] == everything
            for limit, start_offset, length in queries:
                start_s = None if start_offset is None else (T_DAY + start_offset) // 10**6
                end_s = None if length is None else (start_s or T_S) + length // 10**6
                query = CandleQuery(limit, start_s, end_s)
                expected = reference.query(asset, interval, limit, start_s, end_s)
                answer = select(merge(select(stored, query), recent), query)
                assert [exact(REGISTRY[asset], c) for c in answer] == expected
                alone = select_recent(recent, query)  # None: the store must be read
                if alone is not None:
                    assert [exact(REGISTRY[asset], c) for c in alone] == expected
                if len(everything) <= keep:
                    assert [exact(REGISTRY[asset], c)
                            for c in book.query(asset, interval, query)] == expected


@SETTINGS
@given(tick_sequences(), st.data())
def test_a_book_restored_from_its_newest_candles_continues_exactly(ticks: list[Tick],
                                                                   data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(ticks)))
    per_key = data.draw(st.sampled_from([1, 2, CANDLES_KEPT]))
    book = CandleBook(REGISTRY)
    for t in ticks[:cut]:
        book.apply(t)
    saved = [c for a in REGISTRY for i in INTERVALS for c in book.recent(a, i)[-per_key:]]
    restored = CandleBook(REGISTRY, candles=saved)
    for t in ticks[cut:]:
        assert restored.apply(t) == book.apply(t)
    for asset in REGISTRY:
        for interval in INTERVALS:
            mine, theirs = restored.recent(asset, interval), book.recent(asset, interval)
            assert mine == theirs[len(theirs) - len(mine):] and bool(mine) == bool(theirs)
            if per_key == CANDLES_KEPT:
                assert mine == theirs


def test_the_reference_mid_is_the_half_tick_mid() -> None:
    assert mid_price(SOL, 9_896, 9_897) == Fraction("98.965")
    book = CandleBook(["SOL"], ["1m"])
    (candle,) = book.apply(tick(T_DAY))
    assert exact(SOL, candle).close == Fraction("98.965")
    assert half_ticks_to_price(SOL, candle.close_half_ticks) == "98.965"
