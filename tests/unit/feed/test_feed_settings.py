"""Feed settings: bounds, FEED_SOURCE parsing, and where feed/ takes its settings from."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from feed.settings import FeedBounds
from feed.settings import FeedSettings
from feed.settings import feed_settings
from feed.settings import parse_source
from feed.settings import redacted_url


def test_bounds_defaults_follow_the_spec() -> None:
    b = FeedBounds()
    assert (b.max_price_age_us, b.max_clock_skew_us, b.max_tick_jump_bps) == (
        15_000_000, 5_000_000, 1000)
    assert FeedBounds.from_seconds(0.5, 0, 1) == FeedBounds(500_000, 0, 1)


@pytest.mark.parametrize(
    "args",
    [(0, 5.0, 1000), (-1, 5.0, 1000), (15.0, -1, 1000), (15.0, 5.0, 0), (15.0, 5.0, 10**7),
     (math.inf, 5.0, 1000), (15.0, math.nan, 1000), (1e20, 5.0, 1000)],
)
def test_bounds_out_of_range_raise(args: tuple[float, float, int]) -> None:
    with pytest.raises(ValueError):
        FeedBounds.from_seconds(*args)


@pytest.mark.parametrize(
    "text",
    ["sim?rate=0", "sim?rate=-1", "sim?rate=inf", "sim?rate=x", "sim?seed=1.5", "sim?wait=3",
     "replay:a.jsonl?speed=-1", "replay:a.jsonl?loop=2", "auto?wait=0", "backpack?rate=1",
     "none?x=1", "kafka", "replay", "sim:x"],
)
def test_bad_feed_sources_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_source(text)


def test_good_feed_sources_parse() -> None:
    assert parse_source("sim?seed=-3&rate=0.5").options == {"seed": "-3", "rate": "0.5"}
    assert parse_source("replay:x.jsonl?speed=0&loop=true").path == "x.jsonl"
    assert parse_source(" AUTO?wait=2 ").kind == "auto"


def test_feed_settings_from_a_carrier() -> None:
    @dataclass(frozen=True)
    class Carrier:
        feed: FeedSettings

    fs = FeedSettings(kafka_brokers="h:1")
    assert feed_settings(fs) is fs and feed_settings(Carrier(fs)) is fs
    assert fs.bootstrap_servers == "h:1" and FeedSettings().bootstrap_servers == "127.0.0.1:9092"


@pytest.mark.parametrize(("url", "shown"), [
    ("wss://ws.backpack.exchange", "wss://ws.backpack.exchange"),
    ("wss://u:p@h:1/x?y=1", "wss://***@h:1/x?y=***"),
    ("ws://a@b@h/p@q", "ws://***@h/p@q"),  # only the authority's user part goes
    ("ws://h/path@x", "ws://h/path@x"),
    ("ws://h?x=@y", "ws://h?x=***"),
    # a token in the query was shown in every log line naming the source
    ("wss://h/stream?token=s3cret&v=1&flag#part", "wss://h/stream?token=***&v=***&flag#part"),
])
def test_a_url_is_shown_without_its_credentials(url: str, shown: str) -> None:
    assert redacted_url(url) == shown
