"""Courier: the one way a shard's settlements reach the ledger.

A shard journals every close with its settlement number (1, 2, 3, ... per shard) and keeps it
in its outbox until the ledger acknowledges it; the ledger applies number ``last + 1`` and
ignores resends, so delivery is exactly once however often it is repeated. One delivery is:

1. ``Outbox()`` from the shard: its unacknowledged settlements and its last number;
2. ``ApplySettlements`` to the ledger (with the clientOrderId answers to store with them);
3. ``AckOutbox(applied)`` to the shard.

A shard's numbering must continue the ledger's: a host that starts is resumed
(:meth:`Courier.resume`: ``AppliedSeq`` from the ledger, ``ResumeSeq`` to the shard) before it
serves, and a courier resumes each shard once more on its first delivery to it. A shard whose
memory was lost (an in-memory host started again) then numbers its closes after the ledger's,
instead of below it where the ledger would take them for resends.

Deliveries to one shard are coalesced: at most one runs at a time, and every caller that asks
while one runs is served by the next one (which reads the outbox anew), so a close waiting for
its settlement never waits for more than two round trips of deliveries.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from typing import Any

from cluster.actors.port import Port
from cluster.trading.batcher import MicroBatcher
from engine.ledger_machine import AppliedSeq, ApplySettlements
from engine.messages import IdemKey, SettlementItem
from engine.results import Rejected
from engine.shard_machine import AckOutbox, Outbox, ResumeSeq

Answer = tuple[IdemKey, object]


class SettlementRefused(RuntimeError):
    """The ledger refused a shard's settlements (a broken invariant: reported, not retried)."""


class Courier:
    """Delivers the outboxes of ``shards`` (Ports by shard name) to ``ledger``."""

    def __init__(self, ledger: Port, shards: Mapping[str, Port]) -> None:
        self.ledger = ledger
        self.shards = dict(shards)  # a shell may add ports as it finds the shards
        self._runs: dict[str, MicroBatcher[Answer | None, int]] = {}
        self._resumed: set[str] = set()
        self._acks: set[asyncio.Task[Any]] = set()

    async def resume(self, shard_name: str) -> int:
        """Continue ``shard_name``'s numbering after what the ledger applied from it (and drop
        from its outbox what the ledger already has); returns that applied number."""
        applied: int = await self.ledger.call(AppliedSeq(shard_name))
        await self.shards[shard_name].call(ResumeSeq(applied))
        self._resumed.add(shard_name)
        return applied

    async def deliver(self, shard_name: str, answer: Answer | None = None) -> int:
        """Deliver ``shard_name``'s outbox (storing ``answer`` with it); returns the last
        settlement number the ledger has applied for that shard."""
        run = self._runs.get(shard_name)
        if run is None:
            run = self._runs[shard_name] = MicroBatcher(
                functools.partial(self._deliver, shard_name), max_in_flight=1)
        return await run.submit(answer)

    async def _deliver(self, shard_name: str, answers: list[Answer | None]) -> list[int]:
        shard = self.shards[shard_name]
        if shard_name not in self._resumed:
            await self.resume(shard_name)
        items, last_seq = await shard.call(Outbox())
        stored = tuple(a for a in answers if a is not None)
        applied = await self.ledger.call(ApplySettlements(shard_name, tuple(items), stored))
        if isinstance(applied, Rejected):
            raise SettlementRefused(f"{shard_name}: {applied.message}")
        if last_seq < applied:
            await shard.call(ResumeSeq(applied))
        if items:
            await shard.call(AckOutbox(applied))
        return [applied] * len(answers)

    async def settle(self, shard_name: str, item: SettlementItem,
                     answer: Answer | None = None) -> int:
        """Settle one close the caller holds (a manual close's answer) with one ledger call:
        ``ApplySettlements`` of that item alone, then the acknowledgement in the background.
        When the ledger still waits for earlier numbers (tick closes on their way), the whole
        outbox is delivered instead. Returns the ledger's last applied number."""
        if shard_name not in self._resumed:  # numbering not confirmed yet: the full path
            return await self.deliver(shard_name, answer)
        applied = await self.ledger.call(ApplySettlements(
            shard_name, (item,), () if answer is None else (answer,)))
        if isinstance(applied, Rejected):
            raise SettlementRefused(f"{shard_name}: {applied.message}")
        if applied < item.seq:
            return await self.deliver(shard_name)
        self._ack_later(shard_name, applied)
        return int(applied)

    def _ack_later(self, shard_name: str, applied: int) -> None:
        """AckOutbox without waiting: it rides with the shard's next batch of commands (a lost
        one only leaves applied settlements to be sent again, which the ledger ignores)."""
        task = asyncio.get_running_loop().create_task(
            self.shards[shard_name].call(AckOutbox(applied)))
        self._acks.add(task)
        task.add_done_callback(self._ack_done)

    def _ack_done(self, task: asyncio.Task[Any]) -> None:
        self._acks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failed ack is harmless (see _ack_later)
