"""Waiting in the feed's integration tests: the wall clock, and polling an async condition.

(Imported by the tests of this folder as a top-level module, like feed_recording_shard.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from collections.abc import Callable


def now_us() -> int:
    """The wall clock in microseconds since the Unix epoch."""
    return time.time_ns() // 1000


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 30.0,
                   what: str = "", poll_s: float = 0.05) -> None:
    """Await ``predicate()`` every ``poll_s`` until it is true; AssertionError naming ``what``
    after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")
