"""MicroBatcher: coalesce concurrent single-item calls into one batched call; Reused: share one
call's answer among the callers of a moment.

Every request that submits while no batch is due joins the batch flushed on the next event-loop
turn; while ``max_in_flight`` batches are already under way, new items wait and leave together
when one returns. At low load that adds no latency (one loop turn); under load it turns N actor
round trips into one, which is what keeps the API's per-request cost low.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_BATCH = 2048  # items one call of ``fn`` takes at most


class MicroBatcher(Generic[T, R]):
    """``await batcher.submit(item)`` -> the result of ``fn(batch)`` for that item.

    ``fn`` takes a list of items and returns one result per item, in order; an exception from
    ``fn`` is raised in every submitter of that batch. A submitter cancelled before its batch
    left takes its item back (it is never sent); once sent, it stays sent.
    """

    def __init__(self, fn: Callable[[list[T]], Awaitable[Sequence[R]]], *,
                 max_in_flight: int = 4) -> None:
        self._fn = fn
        self._max_in_flight = max_in_flight
        self._items: list[T] = []
        self._futures: list[asyncio.Future[R]] = []
        self._scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._items.append(item)
        self._futures.append(future)
        if not self._scheduled and self._in_flight < self._max_in_flight:
            self._scheduled = True
            loop.call_soon(self._flush)
        try:
            return await future
        except asyncio.CancelledError:
            self._withdraw(future)
            raise

    def _withdraw(self, future: asyncio.Future[R]) -> None:
        """The item of a caller that gave up leaves with it if no batch took it yet: behind
        a slow or stuck ``fn`` the items of callers that stop waiting (a client that went, a
        read under its own timeout) would otherwise pile up without bound, and be sent for
        nobody."""
        for i, waiting in enumerate(self._futures):
            if waiting is future:
                del self._items[i], self._futures[i]
                return

    def _flush(self) -> None:
        self._scheduled = False
        while self._items and self._in_flight < self._max_in_flight:
            items, futures = self._items[:MAX_BATCH], self._futures[:MAX_BATCH]
            del self._items[:MAX_BATCH], self._futures[:MAX_BATCH]
            self._in_flight += 1
            self.batches += 1
            self.items += len(items)
            task = asyncio.get_running_loop().create_task(self._run(items, futures))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, items: list[T], futures: list[asyncio.Future[R]]) -> None:
        try:
            results = await self._fn(items)
            if len(results) != len(items):
                raise RuntimeError(f"batched call returned {len(results)} results "
                                   f"for {len(items)} items")
        except BaseException as exc:  # delivered to every waiter, never lost
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for future, result in zip(futures, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            if self._items and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)


class Reused(Generic[R]):
    """``await reused()`` -> the answer of ``fn()``, shared by every caller that asks while it
    runs or within ``reuse_s`` s after it ended: a read answered from several actors (health
    checks, counters) costs them one call per ``reuse_s`` however many clients ask. A failure
    is shared by those waiting for it, never kept; a caller that gives up leaves the call
    running for the others."""

    def __init__(self, fn: Callable[[], Awaitable[R]], reuse_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fn = fn
        self._reuse_s = reuse_s
        self._clock = clock
        self._task: asyncio.Task[R] | None = None
        self._ended_s = -math.inf
        self.calls = 0

    async def __call__(self) -> R:
        task = self._task
        if task is None or (task.done() and not self._keeps(task)):
            task = self._task = asyncio.get_running_loop().create_task(self._run())
        return await asyncio.shield(task)

    def _keeps(self, ended: asyncio.Task[R]) -> bool:
        """Whether the call that ended still answers: it succeeded within ``reuse_s``."""
        return (not ended.cancelled() and ended.exception() is None
                and self._clock() - self._ended_s <= self._reuse_s)

    async def _run(self) -> R:
        self.calls += 1
        try:
            return await self._fn()
        finally:
            self._ended_s = self._clock()
