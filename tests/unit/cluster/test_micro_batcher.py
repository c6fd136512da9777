"""MicroBatcher (what every port batches its calls with) while its batches are held up, and
Reused (what /healthz and /metrics read the actors through)."""

from __future__ import annotations

import asyncio

import pytest
from cluster.trading.batcher import MicroBatcher
from cluster.trading.batcher import Reused

pytestmark = pytest.mark.asyncio


def held_batcher() -> tuple[MicroBatcher[int, int], list[list[int]], asyncio.Event]:
    """A batcher whose batches (recorded as they leave) are answered once the event is set."""
    opened = asyncio.Event()
    batches: list[list[int]] = []

    async def held(items: list[int]) -> list[int]:
        batches.append(list(items))
        await opened.wait()
        return items

    return MicroBatcher(held, max_in_flight=1), batches, opened


async def test_a_caller_that_gives_up_takes_its_item_back_before_it_leaves() -> None:
    # a host that does not answer (yet), and callers that stop waiting for it (a client that
    # disconnects, a health or metrics read under its own timeout): what they leave behind
    # would pile up here for as long as the host takes, and then be sent for nobody
    batcher, batches, opened = held_batcher()
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0)
    gave_up = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 1001)]
    await asyncio.sleep(0)
    for call in gave_up:
        call.cancel()
    await asyncio.gather(*gave_up, return_exceptions=True)
    waiting = asyncio.ensure_future(batcher.submit(-1))
    await asyncio.sleep(0)
    opened.set()
    assert await first == 0 and await waiting == -1
    assert batches == [[0], [-1]]
    assert batcher.items == 2


async def test_a_caller_that_gives_up_after_its_item_left_still_leaves_it_sent() -> None:
    batcher, batches, opened = held_batcher()
    gone = asyncio.ensure_future(batcher.submit(1))
    stays = asyncio.ensure_future(batcher.submit(2))
    while not batches:
        await asyncio.sleep(0)
    assert batches == [[1, 2]]  # under way: the host may act on it whatever the caller does
    gone.cancel()
    opened.set()
    assert await stays == 2
    assert gone.cancelled()


async def test_a_reused_answer_is_shared_for_its_time_and_a_failure_is_not_kept() -> None:
    """Callers while the call runs and within ``reuse_s`` after share its answer; one that
    gives up leaves it running for the others; a failure reaches those waiting for it, and
    the next caller calls again."""
    now_s = 0.0
    opened = asyncio.Event()
    answers = iter([1, ValueError("refused"), 3])

    async def read() -> int:
        await opened.wait()
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    reused = Reused(read, reuse_s=1.0, clock=lambda: now_s)
    first, second = asyncio.ensure_future(reused()), asyncio.ensure_future(reused())
    quitter = asyncio.ensure_future(reused())
    await asyncio.sleep(0)
    quitter.cancel()
    opened.set()
    assert await asyncio.gather(first, second) == [1, 1] and reused.calls == 1
    now_s = 1.0
    assert await reused() == 1 and reused.calls == 1  # within its time
    now_s = 1.5
    failing = [asyncio.ensure_future(reused()) for _ in range(2)]
    for call in failing:
        with pytest.raises(ValueError, match="refused"):
            await call
    assert reused.calls == 2
    assert await reused() == 3 and reused.calls == 3  # the failure was not kept
