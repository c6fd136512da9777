"""The feed actor's stop, in this process (no Ray started): after it, no call of the actor's
starts consuming again, so nothing reaches the shards the clean stop closes next."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cluster.actors.feed import FeedActorShell
from cluster.config import Settings

pytestmark = pytest.mark.asyncio

NOTHING_LISTENS = "127.0.0.1:1"  # the consumer keeps trying to connect: it is running


async def test_a_call_during_or_after_stop_does_not_consume_again(tmp_path: Path) -> None:
    """Ray runs an async actor's calls concurrently: a ``stats`` (the launcher's supervisor),
    a ``live_changes`` (an API replica past its stop bound) that came while ``stop`` ran or
    after it started the consumer again, which sent ticks to the shards being closed (each
    refused, as the host was closed), and the candles went on in memory only."""
    feed = FeedActorShell(Settings(), NOTHING_LISTENS, nice=None, switch_interval_s=None,
                          candles_dir=str(tmp_path))
    await feed.stats()
    assert feed.consumer.running
    stopping = asyncio.create_task(feed.stop())
    await asyncio.sleep(0)  # stop under way: it waits for the consumer's task to end
    await feed.stats()
    await stopping
    assert not feed.consumer.running, "a call during the stop consumes again"
    await feed.prices()
    await feed.live_changes(0, 0.0)
    await feed.call_timings()
    await feed.pid()
    assert not feed.consumer.running, "a call after the stop consumes again"
    await feed.consumer.stop()
