"""Ports that stand in front of a real one and interfere: lost requests, lost replies, a
component that is down, a call held until the test lets it through."""

from __future__ import annotations

import asyncio
from typing import Any

from cluster.actors.port import Port
from cluster.actors.port import Unavailable


def carries(commands: list[Any], kind: type | tuple[type, ...]) -> bool:
    return any(isinstance(c, kind) for c in commands)


class Wrapped(Port):
    """Every batch and ping goes through to ``inner`` (subclasses interfere)."""

    def __init__(self, inner: Port) -> None:
        super().__init__(inner.name)
        self.inner = inner

    async def execute(self, commands: list[Any]) -> list[Any]:
        return await self.inner.execute(commands)

    async def ping(self) -> bool:
        return await self.inner.ping()


class FailingBatches(Wrapped):
    """The next ``failures`` batches carrying a ``kind`` command (every one when None) raise
    Unavailable; ``deliver``: the batch reached ``inner`` first (a lost reply) or not (a lost
    request). ``failed`` counts the batches that failed; ``lost`` holds the ``kind`` commands
    of the failed batches."""

    def __init__(self, inner: Port, kind: type | tuple[type, ...], failures: int | None = 1,
                 deliver: bool = False) -> None:
        super().__init__(inner)
        self.kind, self.failures, self.deliver = kind, failures, deliver
        self.failed = 0
        self.lost: list[Any] = []

    async def execute(self, commands: list[Any]) -> list[Any]:
        if carries(commands, self.kind) and (self.failures is None or self.failures > 0):
            if self.failures is not None:
                self.failures -= 1
            self.failed += 1
            self.lost.extend(c for c in commands if isinstance(c, self.kind))
            if self.deliver:
                await self.inner.execute(commands)
            raise Unavailable(self.name, "test: " + ("reply lost" if self.deliver
                                                     else "request lost"))
        return await self.inner.execute(commands)


class Down(Wrapped):
    """Answers normally until ``down`` is set, then every call raises Unavailable (an actor
    that died or is being restarted)."""

    def __init__(self, inner: Port, down: bool = False) -> None:
        super().__init__(inner)
        self.down = down
        self.pings = 0  # pings asked, answered or not

    async def execute(self, commands: list[Any]) -> list[Any]:
        if self.down:
            raise Unavailable(self.name, "test: down")
        return await self.inner.execute(commands)

    async def ping(self) -> bool:
        self.pings += 1
        if self.down:
            raise Unavailable(self.name, "test: down")
        return await self.inner.ping()


class Gated(Wrapped):
    """Batches carrying a ``kind`` command wait at the gate: ``reached`` is set when one
    arrives, ``opened`` lets them through (``lose``: then they fail without being delivered,
    every one of them)."""

    def __init__(self, inner: Port, kind: type | tuple[type, ...], lose: bool = False) -> None:
        super().__init__(inner)
        self.kind, self.lose = kind, lose
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    async def execute(self, commands: list[Any]) -> list[Any]:
        if carries(commands, self.kind):
            self.reached.set()
            await self.opened.wait()
            if self.lose:
                raise Unavailable(self.name, "test: request lost")
        return await self.inner.execute(commands)


class HeldReplies(Wrapped):
    """Batches carrying a ``kind`` command reach ``inner``, and then their reply waits at the
    gate (``reached`` set once one was delivered, ``opened`` lets the replies through): a
    caller whose process died, or stalled, right after the component acted."""

    def __init__(self, inner: Port, kind: type | tuple[type, ...]) -> None:
        super().__init__(inner)
        self.kind = kind
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    async def execute(self, commands: list[Any]) -> list[Any]:
        answers = await self.inner.execute(commands)
        if carries(commands, self.kind):
            self.reached.set()
            await self.opened.wait()
        return answers


class Stuck(Wrapped):
    """Once ``stuck`` is set, batches and pings wait until ``released`` is set (a host busy
    with a long call, or cut off: it neither answers nor fails)."""

    def __init__(self, inner: Port, stuck: bool = False) -> None:
        super().__init__(inner)
        self.stuck = stuck
        self.released = asyncio.Event()

    async def execute(self, commands: list[Any]) -> list[Any]:
        if self.stuck:
            await self.released.wait()
        return await self.inner.execute(commands)

    async def ping(self) -> bool:
        if self.stuck:
            await self.released.wait()
        return await self.inner.ping()
