"""The feed consumer's fetch wait: short while records flow, long once they stop (FetchWait),
applied to the running Kafka consumer after each poll; without a broker."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any
from typing import NamedTuple

import pytest
from aiokafka import TopicPartition
from aiokafka.consumer.fetcher import Fetcher
from engine.assets import DEFAULT_ASSETS
from engine.market import Tick
from feed.consumer import FetchWait
from feed.consumer import MarketDataConsumer
from feed.message import message_from_ticks
from feed.pipeline import TickPipeline
from feed.settings import FeedBounds

TOPIC = "md"
ROUTES = {"SOL": ["s0"], "BTC": ["s0"], "ETH": ["s0"]}


def test_a_wait_starts_busy_and_turns_idle_after_idle_after_s_without_records() -> None:
    wait = FetchWait(busy_ms=5, idle_ms=100, idle_after_s=1.0)
    assert wait.next_ms(10.0, 0) == 5  # the first poll counts as one with records
    assert wait.next_ms(10.5, 0) == 5
    assert wait.next_ms(10.999, 0) == 5
    assert wait.next_ms(11.0, 0) == 100  # idle_after_s without records
    assert wait.next_ms(60.0, 0) == 100


def test_records_make_a_wait_busy_again_and_restart_the_idle_clock() -> None:
    wait = FetchWait(busy_ms=5, idle_ms=100, idle_after_s=1.0)
    wait.next_ms(0.0, 0)
    assert wait.next_ms(5.0, 0) == 100
    assert wait.next_ms(5.1, 3) == 5  # the first records end the idle wait at once
    assert wait.next_ms(6.0, 0) == 5
    assert wait.next_ms(6.05, 1) == 5
    assert wait.next_ms(7.0, 0) == 5  # 0.95 s after the last records
    assert wait.next_ms(7.05, 0) == 100


def test_equal_waits_keep_one_wait() -> None:
    wait = FetchWait(busy_ms=5, idle_ms=5, idle_after_s=1.0)
    assert {wait.next_ms(t, 0) for t in (0.0, 0.5, 2.0, 100.0)} == {5}


class Rec(NamedTuple):
    key: bytes | None
    value: bytes | None
    offset: int


class StubFetcher:
    def __init__(self, wait_ms: int) -> None:
        self._fetch_max_wait_ms = wait_ms


class StubConsumer:
    """What ``MarketDataConsumer.poll`` uses of aiokafka's consumer: ``getmany`` (answering
    the queued batches, then nothing), ``assignment`` (nothing assigned, so no partition to
    position again) and the fetch wait its fetcher asks the broker for."""

    def __init__(self, wait_ms: int) -> None:
        self._fetcher = StubFetcher(wait_ms)
        self.batches: list[dict[TopicPartition, list[Rec]]] = []
        self.offset = 0

    def add(self, bid_ticks: int) -> None:
        msg = message_from_ticks(DEFAULT_ASSETS["SOL"], bid_ticks, bid_ticks + 1,
                                 time.time_ns() // 1000, self.offset + 1, "test")
        self.batches.append({TopicPartition(TOPIC, 0): [Rec(msg.key, msg.to_json_bytes(),
                                                            self.offset)]})
        self.offset += 1

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, Any]:
        return self.batches.pop(0) if self.batches else {}

    def assignment(self) -> set[TopicPartition]:  # a poll also looks for recreated partitions
        return set()


async def _deliver(shard: str, ticks: list[Tick]) -> None:
    await asyncio.sleep(0)


def make(**options: Any) -> MarketDataConsumer:
    pipeline = TickPipeline(DEFAULT_ASSETS, ROUTES, FeedBounds(), 1)
    return MarketDataConsumer("fake:9092", pipeline, _deliver, topic=TOPIC, **options)


@pytest.mark.asyncio
async def test_a_poll_sets_the_running_consumers_fetch_wait() -> None:
    c = make(fetch_max_wait_ms=5, idle_fetch_max_wait_ms=100, idle_after_s=1.0)
    stub = StubConsumer(5)
    fetched = stub._fetcher
    assert await c.poll(stub) == 0
    assert fetched._fetch_max_wait_ms == 5 and c.stats()["fetch_wait_ms"] == 5
    assert c.fetch_wait.last_record_s is not None
    c.fetch_wait.last_record_s -= 1.5  # no records for 1.5 s
    assert await c.poll(stub) == 0
    assert fetched._fetch_max_wait_ms == 100 and c.stats()["fetch_wait_ms"] == 100
    stub.add(100_000)
    assert await c.poll(stub) == 1
    assert fetched._fetch_max_wait_ms == 5 and c.stats()["fetch_wait_ms"] == 5
    await asyncio.sleep(0.01)  # the shard call the poll started


@pytest.mark.asyncio
async def test_a_consumer_without_a_fetcher_only_notes_the_wait() -> None:
    c = make(fetch_max_wait_ms=5, idle_fetch_max_wait_ms=100, idle_after_s=0.0)

    class Bare:
        async def getmany(self, timeout_ms: int, max_records: int) -> dict[Any, Any]:
            return {}

        def assignment(self) -> set[Any]:
            return set()

    assert await c.poll(Bare()) == 0
    assert c.stats()["fetch_wait_ms"] == 100


def test_an_idle_wait_below_the_busy_wait_is_refused() -> None:
    with pytest.raises(ValueError, match="idle_fetch_max_wait_ms"):
        make(fetch_max_wait_ms=50, idle_fetch_max_wait_ms=10)


def test_aiokafkas_fetcher_builds_each_fetch_request_from_the_attribute_set() -> None:
    """The consumer changes ``Fetcher._fetch_max_wait_ms`` of a running aiokafka consumer (no
    public way exists); this fails if aiokafka stops reading it for each request it builds."""
    assert "self._fetch_max_wait_ms = fetch_max_wait_ms" in inspect.getsource(Fetcher.__init__)
    assert "self._fetch_max_wait_ms," in inspect.getsource(Fetcher._get_actions_per_node)
