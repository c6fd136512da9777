"""Kafka clients (aiokafka) under failure: stopping one whatever state its connection is in,
and telling a task's own cancellation from one a client library let escape.

aiokafka 0.14's consumer ``stop`` cancels the fetcher's pending requests and then awaits them,
so a stop while one waits out its retry backoff (a broker that just went away) raises a
CancelledError nobody asked for. Let through, it ends whatever loop called it, as if that
loop's task had been cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    async def stop(self) -> None: ...


def own_cancellation(exc: BaseException) -> bool:
    """True when ``exc`` is the cancellation of the running task itself (re-raise it); False
    for any other exception, a stray CancelledError included (a failure like any other)."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


async def stop_client(client: Stoppable, timeout_s: float = 10.0) -> None:
    """Stop an aiokafka consumer or producer within ``timeout_s``; raises nothing but the
    cancellation of the running task itself."""
    try:
        async with asyncio.timeout(timeout_s):  # not wait_for: it can lose a cancellation
            await client.stop()
    except (Exception, asyncio.CancelledError) as exc:
        if own_cancellation(exc):
            raise
        log.debug("kafka client stop: %r", exc)


__all__ = ["Stoppable", "own_cancellation", "stop_client"]
