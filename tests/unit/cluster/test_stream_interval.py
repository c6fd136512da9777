"""Rounds of market frames at most every ``interval_s`` (WS_MARKET_INTERVAL_MS): each frame of
a round is a send to every subscriber, so a feed of hundreds of ticks a second cost a replica
with 1,000 clients a send per client per poll; the newest value still goes out at the next
round (conflated), never an older one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from cluster.config import Settings
from cluster.live.market import Change
from cluster.live.market import MarketLive
from cluster.live.streams import POLL_TIMEOUT_S
from cluster.live.streams import StreamHub
from cluster.live.streams import StreamLimits
from tests.unit.cluster.test_stream_key_limit import Client
from tests.unit.cluster.test_stream_key_limit import authenticate
from tests.unit.cluster.test_stream_sources import render
from tests.unit.cluster.test_stream_sources import tick

INTERVAL_S = 0.2
TICKS = 60
TICK_GAP_S = 0.01


def test_market_frames_come_in_rounds_at_most_every_interval_and_end_on_the_newest() -> None:
    async def scenario() -> None:
        market = MarketLive(Settings().assets, None)
        market.apply([tick("SOL", 10_000, 1)])
        hub = StreamHub(market=lambda: market, render=render, streams=("bookTicker.SOL",),
                        authenticate=authenticate,
                        limits=StreamLimits(interval_s=INTERVAL_S))
        client = Client("10.0.0.1")
        handler = asyncio.create_task(hub.serve(client))  # type: ignore[arg-type]
        assert await client.say("SUBSCRIBE", "bookTicker.SOL") == [
            {"stream": "bookTicker.SOL", "data": {"bid": 10_000}}]
        started = time.monotonic()
        for seq in range(2, TICKS + 2):
            market.apply([tick("SOL", 10_000 + seq, seq)])
            await asyncio.sleep(TICK_GAP_S)
        last = 10_000 + TICKS + 1
        bids = []
        while not bids or bids[-1] != last:  # the newest comes, at the latest a round later
            frame = await asyncio.wait_for(client.frames.get(), 5)
            bids.append(frame["data"]["bid"])
        elapsed_s = time.monotonic() - started
        # rounds are at least INTERVAL_S apart, so no more than one per interval (and the one
        # the subscription started) fit in the time it took
        assert len(bids) <= elapsed_s / INTERVAL_S + 2, (len(bids), elapsed_s)
        assert bids == sorted(bids) and len(set(bids)) == len(bids)  # never an older one
        await client.leave(handler)

    asyncio.run(scenario())


class RoundsSeen(StreamHub):
    """A hub that notes when a poll brought nothing (no frames to send)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle = asyncio.Event()

    def publish(self, changes: Iterable[Change]) -> None:
        changes = list(changes)
        if not changes:
            self.idle.set()
        super().publish(changes)


def test_a_poll_that_brought_nothing_does_not_hold_the_next_change_back() -> None:
    """The interval is between rounds of frames: a quiet market's long poll that ends with no
    change sent nothing, so the tick after it goes out at once, not an interval later."""
    interval_s = 1.0

    async def scenario() -> None:
        market = MarketLive(Settings().assets, None)
        market.apply([tick("SOL", 10_000, 1)])
        hub = RoundsSeen(market=lambda: market, render=render, streams=("bookTicker.SOL",),
                         authenticate=authenticate, limits=StreamLimits(interval_s=interval_s))
        client = Client("10.0.0.1")
        handler = asyncio.create_task(hub.serve(client))  # type: ignore[arg-type]
        assert await client.say("SUBSCRIBE", "bookTicker.SOL") == [
            {"stream": "bookTicker.SOL", "data": {"bid": 10_000}}]
        await asyncio.wait_for(hub.idle.wait(), interval_s + POLL_TIMEOUT_S + 5)
        market.apply([tick("SOL", 10_002, 2)])
        ticked = time.monotonic()
        frame = await asyncio.wait_for(client.frames.get(), 5)
        took_s = time.monotonic() - ticked
        assert frame == {"stream": "bookTicker.SOL", "data": {"bid": 10_002}}
        assert took_s < interval_s / 2, took_s
        await client.leave(handler)

    asyncio.run(scenario())
