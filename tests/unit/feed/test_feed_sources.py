"""Sim determinism, replay parsing, FEED_SOURCE parsing, backoff."""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import time
from pathlib import Path

import pytest
from cluster.config import Settings
from engine.assets import DEFAULT_ASSETS
from feed.backpack import Backoff
from feed.backpack import BackpackClient
from feed.backpack import retry_after_s
from feed.broker import free_port
from feed.frames import FrameNormalizer
from feed.message import MarketDataMessage
from feed.replay import ReplaySource
from feed.replay import replay_items
from feed.sim import SimSource
from feed.sim import SimWalk
from feed.source import AutoSource
from feed.source import Source
from feed.source import make_source
from feed.source import parse_source
from feed.source import run_source

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "backpack" / "recorded_ws_frames.jsonl"


async def first(source: Source, n: int) -> list[MarketDataMessage]:
    """The first ``n`` messages ``source`` streams; then it is stopped."""
    stop = asyncio.Event()
    got = []
    async for msg in source.stream(stop):
        got.append(msg)
        if len(got) == n:
            stop.set()
    return got


def walk(seed: int, order: list[str], n: int) -> dict[str, list[tuple[int, int]]]:
    w = SimWalk(DEFAULT_ASSETS, seed)
    out: dict[str, list[tuple[int, int]]] = {a: [] for a in order}
    for i in range(n):
        name = order[i % len(order)]
        out[name].append(w.next(DEFAULT_ASSETS[name]))
    return out


def test_sim_is_deterministic_by_seed_and_per_asset() -> None:
    a = walk(7, ["SOL", "BTC", "ETH"], 3000)
    b = walk(7, ["ETH", "SOL", "BTC"], 3000)  # another interleaving, same paths
    assert a == b
    c = walk(8, ["SOL", "BTC", "ETH"], 3000)
    assert a["SOL"] != c["SOL"]


def test_sim_prices_are_valid_with_realistic_spread() -> None:
    paths = walk(1, ["SOL", "BTC", "ETH"], 30000)
    for name, path in paths.items():
        asset = DEFAULT_ASSETS[name]
        spreads = [ask - bid for bid, ask in path]
        assert all(bid > 0 and ask > bid for bid, ask in path)
        assert all(ask <= asset.max_price_ticks for _, ask in path)
        assert moves_beyond(path, 1_000) == 0  # the platform's gate holds none of them
        assert max(spreads) <= 10
        mids = [(bid + ask) / 2 for bid, ask in path]
        # a random walk moves, but not absurdly (well within 2x over 10k updates at ~2 bp)
        assert mids[0] != mids[-1]
        assert 0.5 < mids[-1] / mids[0] < 2.0, (asset.name, mids[0], mids[-1])


def test_a_resumed_walk_continues_from_the_last_prices_it_is_given() -> None:
    w = SimWalk(DEFAULT_ASSETS, 0)
    # SOL last seen at 250.00/250.02; ETH's top is crossed (ignored); DOGE is not traded here
    taken = w.resume_from({"SOL": (25_000, 25_002), "ETH": (5, 4), "DOGE": (1, 2)})
    assert taken == {"SOL": 25_001}
    bid, ask = w.next(DEFAULT_ASSETS["SOL"])
    assert abs((bid + ask) / 2 - 25_001) < 30, (bid, ask)  # one step of ~2 bp, not 140.00
    bid, ask = w.next(DEFAULT_ASSETS["ETH"])
    assert abs((bid + ask) / 2 - 320_000) < 1_000, (bid, ask)  # its own start: 3200.00


@pytest.mark.asyncio
async def test_sim_source_rate_and_shape() -> None:
    src = SimSource(DEFAULT_ASSETS, seed=3, rate_hz=100)
    stop = asyncio.Event()
    got = []
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async for msg in src.stream(stop):
        got.append(msg)
        if loop.time() - t0 >= 0.5:
            stop.set()
    assert 100 <= len(got) <= 200  # 300 per second over 0.5 s, give or take a wake-up
    assert {m.asset for m in got} == {"SOL", "BTC", "ETH"}
    assert all(m.source == "sim" for m in got)
    assert [m.seq for m in got] == sorted(m.seq for m in got)


def test_replay_parses_fixture() -> None:
    norm = FrameNormalizer(DEFAULT_ASSETS, source="replay")
    items = list(replay_items(FIXTURE.read_text().splitlines(), norm))
    assert len(items) == 13
    assert items[0].at_us == 1788367430246081 and items[0].message.source == "replay"
    assert [i.message.seq for i in items] == sorted(i.message.seq for i in items)


@pytest.mark.asyncio
async def test_replay_source_fast_and_restamped() -> None:
    got = await first(ReplaySource(FIXTURE, DEFAULT_ASSETS, speed=0, loop=True), 26)
    assert [m.bid for m in got] == ["98.96"] * 26
    seqs = [m.seq for m in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 26  # the loop never goes backwards
    now_us = time.time_ns() // 1000
    assert all(now_us - 5_000_000 < m.ts_us <= now_us for m in got)  # stamped at playback


@pytest.mark.asyncio
async def test_replay_recorded_speed_takes_the_recorded_time() -> None:
    src = ReplaySource(FIXTURE, DEFAULT_ASSETS, speed=4.0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    got = [m async for m in src.stream(asyncio.Event())]
    elapsed = loop.time() - t0
    recorded_s = (1788367431694506 - 1788367430246081) / 1e6
    assert len(got) == 13
    assert recorded_s / 4 * 0.9 <= elapsed <= recorded_s / 4 + 1.0


@pytest.mark.parametrize(("content", "why"), [
    (b"", "holds no valid bookTicker frame of SOL,BTC,ETH"),
    (b"\n\n", "holds no valid bookTicker frame"),
    (b'{"id":null,"error":{"code":400,"message":"Invalid"}}\n', "holds no valid"),
    (b"}{ not json\n", "holds no valid"),
    (b"\xff\xfe\x00garbage", "is not UTF-8 text"),
])
def test_a_recording_without_a_price_is_refused_when_the_source_is_made(
        tmp_path: Path, content: bytes, why: str) -> None:
    """Before, such a replay started, published nothing and ended: a platform with no price.
    Refused where FEED_SOURCE is checked at start (``shardex up``/``feed``, make_source)."""
    path = tmp_path / "rec.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^replay: {re.escape(str(path))} {why}"):
        make_source(Settings(), f"replay:{path}")


def test_a_recording_of_other_assets_only_is_refused() -> None:
    settings = Settings.from_env({"ASSETS": "BTC"})  # the fixture is SOL_USDC only
    with pytest.raises(ValueError, match=r"holds no valid bookTicker frame of BTC$"):
        make_source(settings, f"replay:{FIXTURE}")


def test_the_source_reads_its_options_as_given() -> None:
    """``loop`` in any case the check takes (``FALSE`` played the file in a loop), and a seed
    exactly (read through a float, seeds 2**53 and 2**53 + 1 walked alike)."""
    settings = Settings.from_env({"ASSETS": "SOL"})
    for value, loops in [("FALSE", False), ("False", False), ("0", False), ("", False),
                         ("TRUE", True), ("1", True)]:
        replay = make_source(settings, f"replay:{FIXTURE}?loop={value}")
        assert isinstance(replay, ReplaySource) and replay.loop is loops, value
    sol = settings.assets["SOL"]
    for seed in (2**53 + 1, -(2**53) - 1, 10**19 - 1):
        sim = make_source(settings, f"sim?seed={seed}")
        assert isinstance(sim, SimSource)
        exact = SimWalk(settings.assets, seed)
        assert [sim.walk.next(sol) for _ in range(5)] == [exact.next(sol) for _ in range(5)]


def test_parse_source() -> None:
    assert parse_source("sim").kind == "sim"
    spec = parse_source("sim?seed=7&rate=50")
    assert spec.kind == "sim" and spec.number("seed", 0) == 7 and spec.number("rate", 1) == 50
    spec = parse_source("replay:/data/x?y.jsonl")
    assert spec.kind == "replay" and spec.path == "/data/x?y.jsonl"
    spec = parse_source("replay:a.jsonl?speed=10&loop=1")
    assert spec.path == "a.jsonl" and spec.options == {"speed": "10", "loop": "1"}
    assert parse_source("AUTO").kind == "auto"
    for bad in ("kafka", "replay", "replay:", "sim:x"):
        with pytest.raises(ValueError):
            parse_source(bad)


def test_make_source_kinds() -> None:
    s = Settings()
    assert make_source(s, "none") is None
    assert isinstance(make_source(s, "backpack"), BackpackClient)
    assert isinstance(make_source(s, "sim?rate=9"), SimSource)
    assert isinstance(make_source(s, f"replay:{FIXTURE}"), ReplaySource)
    auto = make_source(s, "auto?wait=3")
    assert isinstance(auto, AutoSource) and auto.wait_s == 3 and auto.name == "backpack"


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_auto_falls_back_to_sim_when_backpack_is_unreachable() -> None:
    settings = Settings(backpack_ws_url=f"ws://127.0.0.1:{free_port()}")  # nobody listens
    source = make_source(settings, "auto?wait=1&rate=20")
    assert source is not None
    got = await first(source, 5)
    assert source.name == "sim"
    assert {m.source for m in got} == {"sim"}


def test_backoff_is_exponential_jittered_and_capped() -> None:
    b = Backoff(0.5, 8.0, random.Random(1))
    delays = [b.next_delay_s() for _ in range(10)]
    caps = [min(8.0, 0.5 * 2**i) for i in range(10)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, caps, strict=True))
    assert max(delays) <= 8.0 and delays[-1] >= 4.0
    assert len({round(d, 9) for d in delays[5:]}) > 1  # jitter
    b.reset()
    assert b.next_delay_s() <= 0.5


@pytest.mark.asyncio
async def test_a_stop_while_the_broker_never_answers_ends_the_feed_at_once() -> None:
    """``shardex feed`` with its broker unreachable retried for ever and ignored Ctrl-C and
    SIGTERM: the producer's start now gives up once ``stop`` is set."""
    stop = asyncio.Event()
    port = free_port()  # nothing listens there
    source = SimSource(DEFAULT_ASSETS, seed=1, rate_hz=10)
    task = asyncio.create_task(run_source(Settings(), stop, bootstrap=f"127.0.0.1:{port}",
                                          topic="nowhere", source=source))
    await asyncio.sleep(1.0)  # a few refused attempts
    assert not task.done()
    stopped = time.monotonic()
    stop.set()
    result = await asyncio.wait_for(task, 10)
    assert time.monotonic() - stopped < 1.0
    assert result["published"] == 0 and result["source"] == "sim"


@pytest.mark.parametrize(("status", "header", "delay_s"), [
    (429, "7", 7.0),
    (503, " 12 ", 12.0),
    (429, "100000", 300.0),  # followed up to MAX_RETRY_AFTER_S
    (429, "Wed, 21 Oct 2026 07:28:00 GMT", None),  # a date: the backoff applies
    (429, "-3", None),
    (429, None, None),
    (500, "7", None),
])
def test_retry_after_of_a_refused_handshake(status: int, header: str | None,
                                            delay_s: float | None) -> None:
    from websockets.datastructures import Headers
    from websockets.exceptions import InvalidStatus
    from websockets.http11 import Response

    headers = Headers() if header is None else Headers({"Retry-After": header})
    assert retry_after_s(InvalidStatus(Response(status, "x", headers))) == delay_s
    assert retry_after_s(OSError("refused")) is None


def test_a_repeated_retry_after_is_not_followed_and_does_not_raise() -> None:
    """A refusal with two ``Retry-After`` headers made ``retry_after_s`` raise (the headers'
    ``get`` refuses a repeated name), from inside the client's reconnect loop: the source
    failed, was started again a second later without its backoff, and ``auto`` never fell back
    to sim. Two values say no one delay: the backoff applies."""
    from websockets.datastructures import Headers
    from websockets.exceptions import InvalidStatus
    from websockets.http11 import Response

    headers = Headers([("Retry-After", "5"), ("Retry-After", "7")])
    assert retry_after_s(InvalidStatus(Response(429, "x", headers))) is None


def test_the_backpack_source_keeps_the_documented_timings() -> None:
    """As FEED_SOURCE=backpack builds it: 0.5 s doubling to 30 s (jittered down to half), a
    connection silent for 30 s made again, a peer's close awaited 2 s, the backoff reset by
    prices after 10 s, a Retry-After followed up to 300 s."""
    from feed import backpack

    client = make_source(Settings(), "backpack")
    assert isinstance(client, BackpackClient)
    assert (client.silence_s, backpack.CLOSE_TIMEOUT_S, backpack.STABLE_S,
            backpack.MAX_RETRY_AFTER_S) == (30.0, 2.0, 10.0, 300.0)
    caps = [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    delays = [client.backoff.next_delay_s() for _ in caps]
    assert all(c / 2 <= d <= c for d, c in zip(delays, caps, strict=True)), delays


def moves_beyond(path: list[tuple[int, int]], band_bps: int) -> int:
    """Ticks of ``path`` whose mid lies further than ``band_bps`` from the one before (as the
    feed's jump gate measures it, on ``bid + ask``)."""
    return sum(abs((b + a) - (pb + pa)) * 10_000 > band_bps * (pb + pa)
               for (pb, pa), (b, a) in itertools.pairwise(path))


def test_a_walk_at_the_bound_stays_below_it_and_keeps_moving() -> None:
    """A walk resumed just under an asset's bound went over it: every consumer dropped the
    sim's ticks as ``above_bound``."""
    w = SimWalk(DEFAULT_ASSETS, 5)
    assert w.resume_from({a.name: (a.max_price_ticks - 1, a.max_price_ticks)
                          for a in DEFAULT_ASSETS.assets})
    for asset in DEFAULT_ASSETS.assets:
        path = [w.next(asset) for _ in range(3000)]
        assert all(0 < bid < ask <= asset.max_price_ticks for bid, ask in path), asset.name
        assert len({bid + ask for bid, ask in path}) > 100, asset.name  # not stuck there
        assert moves_beyond(path, 1_000) == 0


@pytest.mark.parametrize("band_bps", [1_000, 200])
def test_a_walk_at_low_prices_never_moves_beyond_the_jump_band(band_bps: int) -> None:
    """Near its floor (10 ticks) a one-tick step is 10% of the price: the walk moved its mid
    by more than MAX_TICK_JUMP_BPS again and again, and the platform's own gate held its own
    sim ticks as jumps. A walk resumed at a low price now continues from exactly there, moves
    within the band and keeps moving where a step allows it."""
    w = SimWalk(DEFAULT_ASSETS, 2, max_move_bps=band_bps)
    tops = {"SOL": (1_000, 1_001), "BTC": (60, 61), "ETH": (7, 9)}
    assert w.resume_from(tops) == {"SOL": 1_000, "BTC": 60, "ETH": 8}
    for asset in DEFAULT_ASSETS.assets:
        path = [tops[asset.name], *(w.next(asset) for _ in range(3000))]
        assert all(0 < bid < ask <= asset.max_price_ticks for bid, ask in path[1:])
        assert moves_beyond(path, band_bps) == 0, asset.name
    sol = [w.next(DEFAULT_ASSETS["SOL"]) for _ in range(3000)]
    assert len({bid + ask for bid, ask in sol}) > 20  # a price a step allows to move, moves


def test_the_sim_source_walks_within_the_configured_jump_band() -> None:
    settings = Settings.from_env({"MAX_TICK_JUMP_BPS": "50"})
    sim = make_source(settings, "sim?seed=4")
    assert isinstance(sim, SimSource) and sim.walk.max_move_bps == 50
    auto = make_source(settings, "auto")
    assert isinstance(auto, AutoSource) and isinstance(auto.fallback, SimSource)
    assert auto.fallback.walk.max_move_bps == 50


@pytest.mark.asyncio
async def test_a_looped_recording_whose_times_go_backwards_keeps_its_pace(
        tmp_path: Path) -> None:
    """A round lasted from the first frame's recorded time to the last one's: a recording whose
    last frame is older than its first (two recordings joined) has no such span, and its
    loop then ran without a pause, flooding the topic at any speed. A round now lasts the
    recording's whole range of times."""
    frames = [(2_000_000, 10), (1_000_000, 11), (1_500_000, 12)]
    path = tmp_path / "joined.jsonl"
    path.write_text("".join(
        f'{{"data":{{"T":{t},"a":"98.97","b":"98.96","e":"bookTicker","s":"SOL_USDC",'
        f'"u":{u}}},"stream":"bookTicker.SOL_USDC"}}\n' for t, u in frames))
    src = ReplaySource(path, DEFAULT_ASSETS, speed=20, loop=True)  # 1 s recorded = 50 ms
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    got = await first(src, 7)  # two rounds and the first frame of a third
    elapsed = loop.time() - t0
    assert [m.seq for m in got] == [10, 11, 12, 13, 14, 15, 16]
    # two whole rounds of 50 ms passed (a wait never ends early; before, about 0 s)
    assert elapsed >= 0.09, elapsed


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["sim", "replay"])
async def test_the_sources_messages_have_the_spec_shape_and_pass_the_consumer(
        kind: str) -> None:
    """What the sim and a looped replay produce is exactly SPEC's message, keyed by symbol, and
    the consumer's decoder (with its clock bounds) and jump/order gate drop none of it: a
    looped recording still moves ``ts_us`` and ``seq`` forward."""
    from feed.gate import TickGate
    from feed.message import TickDecoder
    from feed.message import mid_price

    settings = Settings()
    source = make_source(settings, "sim?seed=9&rate=1000" if kind == "sim"
                         else f"replay:{FIXTURE}?speed=0&loop=1")
    assert source is not None
    got = await first(source, 60)
    decoder = TickDecoder(settings.assets, settings.feed.bounds)
    gate = TickGate(settings.feed.bounds.max_tick_jump_bps)
    now_us = time.time_ns() // 1000
    for msg in got:
        body = msg.to_dict()
        assert list(body) == ["v", "symbol", "asset", "bid", "ask", "price", "ts_us", "seq",
                              "source"]
        assert body["v"] == 1 and body["source"] == kind and msg.key == msg.symbol.encode()
        assert body["price"] == mid_price(msg.bid, msg.ask)
        asset = settings.assets.by_symbol(msg.symbol)
        tick = decoder.decode(msg.to_json_bytes(), now_us, asset.name if asset else None)
        assert tick is not None, decoder.dropped
        assert gate.admit(tick) == [tick], gate.dropped


def test_an_asset_starting_below_the_floor_walks_from_its_start() -> None:
    """An asset of no START_PRICES starts at 100: with a whole-unit step that is 100 ticks,
    below the walk's floor of 1,000, and every step down to anything under 1,000 was refused,
    so its price never moved. Its start is its floor, as a lower resumed price is."""
    from engine.assets import Asset
    from engine.assets import AssetRegistry

    assets = AssetRegistry([Asset("XYZ", "XYZ_USDC", price_decimals=0, qty_decimals=2,
                                  max_leverage=10)])
    w = SimWalk(assets, 3)
    path = [w.next(assets["XYZ"]) for _ in range(3000)]
    assert all(100 <= bid < ask for bid, ask in path)
    assert len({bid + ask for bid, ask in path}) > 20
    assert moves_beyond(path, 1_000) == 0


def book_ticker_line(t_us: int, seq: int, bid: str = "98.96", ask: str = "98.97") -> str:
    """One recorded SOL_USDC bookTicker frame (jsonl line) at engine time ``t_us``."""
    return (f'{{"data":{{"T":{t_us},"a":"{ask}","b":"{bid}","e":"bookTicker","s":"SOL_USDC",'
            f'"u":{seq}}},"stream":"bookTicker.SOL_USDC"}}\n')


@pytest.mark.asyncio
async def test_an_overlong_line_is_dropped_without_being_read_into_memory(
        tmp_path: Path) -> None:
    """Each line was read whole before its size was checked: a recording with one 64 MiB line
    (or a file with no newline at all) took that much memory and more to load. A line longer
    than a frame may be is skipped as it is read, and counted ``oversized``."""
    import tracemalloc

    path = tmp_path / "rec.jsonl"
    with path.open("w") as fh:
        fh.write(book_ticker_line(1_000_000, 1))
        fh.write('{"x":"' + "a" * (64 << 20) + '"}\n')
        fh.write(book_ticker_line(2_000_000, 2, bid="98.95"))
    tracemalloc.start()
    try:
        src = ReplaySource(path, DEFAULT_ASSETS, speed=0)  # made, then played to its end
        got = [m async for m in src.stream(asyncio.Event())]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [m.bid for m in got] == ["98.96", "98.95"]
    assert src.normalizer.dropped["oversized"] == 1
    assert peak < 8 << 20, peak  # about two frames' bound (1 MiB each), not the line's 64 MiB


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_a_looped_recording_of_one_moment_repeats_once_a_second(tmp_path: Path) -> None:
    """A round lasted the recording's range of times plus 1 µs: a recording whose frames share
    one time (a single frame, say) looped a million times a second at speed 1, flooding the
    topic. A round lasts at least one recorded second."""
    path = tmp_path / "one.jsonl"
    path.write_text(book_ticker_line(1_788_367_430_246_081, 7))
    src = ReplaySource(path, DEFAULT_ASSETS, speed=10, loop=True)  # a round: 0.1 s
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.35, stop.set)
    got = [m async for m in src.stream(stop)]
    assert [m.seq for m in got] == [7, 8, 9, 10]  # at 0, 0.1, 0.2 and 0.3 s


@pytest.mark.asyncio
@pytest.mark.timeout(10)
@pytest.mark.parametrize("jump_us", [365 * 86_400 * 10**6, -365 * 86_400 * 10**6])
async def test_a_frame_whose_time_jumps_years_does_not_stall_the_replay(
        tmp_path: Path, jump_us: int) -> None:
    """Playback waited for each frame's recorded time: one frame stamped a year ahead held
    every later price back for a year (at speed 1), and one a year behind made the frames after
    it wait a year once the times went on. Consecutive frames more than
    ``MAX_REPLAY_GAP_US`` apart either way are played one after the other."""
    t0 = 1_788_367_430_000_000
    path = tmp_path / "jump.jsonl"
    path.write_text(book_ticker_line(t0, 1) + book_ticker_line(t0 + jump_us, 2, bid="98.95")
                    + book_ticker_line(t0 + 100_000, 3, bid="98.94")
                    + book_ticker_line(t0 + 200_000, 4, bid="98.93"))
    src = ReplaySource(path, DEFAULT_ASSETS, speed=1)
    loop = asyncio.get_running_loop()
    t_start = loop.time()
    got = [m async for m in src.stream(asyncio.Event())]
    assert [m.seq for m in got] == [1, 2, 3, 4]
    assert loop.time() - t_start < 1.0  # the frames' own 0.1 s steps, no year


@pytest.mark.parametrize("kind", ["fifo", "directory"])
@pytest.mark.timeout(10)
def test_a_recording_that_is_not_a_regular_file_is_refused_at_once(
        tmp_path: Path, kind: str) -> None:
    """Opening a FIFO for reading waited for a writer: a start on one hung (the check at start
    refuses it, but not a path that became one after). Refused in one line, as a directory."""
    import os

    path = tmp_path / "rec.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(ValueError, match=f"^replay: {re.escape(str(path))} is not a regular "
                                         "file$"):
        make_source(Settings(), f"replay:{path}")


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_long_recording_is_played_without_being_held_in_memory(tmp_path: Path) -> None:
    """The whole recording was parsed into memory before its first frame played, about 420
    bytes a frame (gigabytes for a day of frames). It is read, parsed and published as it goes:
    what playback holds does not grow with the recording."""
    import tracemalloc

    frames = 20_000  # held whole: ~8 MB
    path = tmp_path / "long.jsonl"
    t0 = 1_788_367_430_000_000
    path.write_text("".join(book_ticker_line(t0 + 10 * i, i) for i in range(frames)))
    tracemalloc.start()
    try:
        src = ReplaySource(path, DEFAULT_ASSETS, speed=0)
        played, last_seq, in_order = 0, -1, True
        async for msg in src.stream(asyncio.Event()):
            in_order = in_order and msg.seq == last_seq + 1
            last_seq = msg.seq
            played += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert played == frames and in_order and last_seq == frames - 1
    assert peak < 1 << 20, peak  # an eighth of holding them


@pytest.mark.asyncio
@pytest.mark.parametrize(("ids", "seqs"), [
    ([1, 2**62 + 1], [1, 2**62 + 1, 2**62 + 2, 2**62 + 3, 2**62 + 4, 2**62 + 5]),
    ([0, 2**63 - 1], [0, 2**63 - 1, 0, 1, 2, 3]),
])
async def test_a_looped_recording_of_ids_far_apart_keeps_seq_in_range(
        tmp_path: Path, ids: list[int], seqs: list[int]) -> None:
    """Each round shifted the recorded ids up by their span plus one: with ids 2**62 or more
    apart a later round's ``seq`` passed 2**63 - 1, the most a message may carry (the consumer
    dropped every one of them). The first round keeps the recorded ids; each later round
    numbers its frames on from the highest ``seq`` sent, one by one, starting over at 0 past
    2**63 - 1."""
    from feed.message import TickDecoder

    path = tmp_path / "far.jsonl"
    t0 = 1_788_367_430_000_000
    path.write_text("".join(book_ticker_line(t0 + 1_000 * i, u) for i, u in enumerate(ids)))
    got = await first(ReplaySource(path, DEFAULT_ASSETS, speed=0, loop=True), len(seqs))
    assert [m.seq for m in got] == seqs
    settings = Settings()
    decoder = TickDecoder(settings.assets, settings.feed.bounds)
    now_us = time.time_ns() // 1000
    assert all(decoder.decode(m.to_json_bytes(), now_us, "SOL") is not None for m in got), \
        decoder.dropped


@pytest.mark.asyncio
async def test_a_line_not_utf8_after_the_first_frame_is_dropped_and_counted(
        tmp_path: Path) -> None:
    """The recording is read as it plays, so only the lines up to its first valid frame are
    read when the source is made (one there that is not UTF-8 is refused at start); a later one
    is a bad line like any other: dropped, counted ``malformed``, and the frames after it
    play."""
    path = tmp_path / "rec.jsonl"
    path.write_bytes(book_ticker_line(1_000_000, 1).encode() + b"\xff\xfe{}\n"
                     + book_ticker_line(1_000_100, 2, bid="98.95").encode())
    src = ReplaySource(path, DEFAULT_ASSETS, speed=0)
    got = [m async for m in src.stream(asyncio.Event())]
    assert [(m.bid, m.seq) for m in got] == [("98.96", 1), ("98.95", 2)]
    assert src.normalizer.dropped == {"malformed": 1}


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_a_looped_recording_emptied_while_it_plays_ends_the_replay(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each round reads the file again: one left without a valid frame would loop over nothing
    without a pause. The replay ends, saying so in one line."""
    path = tmp_path / "rec.jsonl"
    path.write_text(book_ticker_line(1_000_000, 1) + book_ticker_line(1_000_100, 2))
    src = ReplaySource(path, DEFAULT_ASSETS, speed=0, loop=True)
    got = []
    async for msg in src.stream(asyncio.Event()):
        got.append(msg.seq)
        if len(got) == 3:  # in the second round
            path.write_text("")
    assert got == [1, 2, 3, 4]  # the second round was read before it was emptied
    assert f"replay: {path} holds no valid bookTicker frame any more; replay ends" \
        in caplog.messages
