"""Courier: the one way a shard's settlements reach the ledger.

A shard journals every close with its settlement number (1, 2, 3, ... per shard) and keeps it
in its outbox until the ledger acknowledges it; the ledger applies number ``last + 1`` and
ignores resends, so delivery is exactly once however often it is repeated. One delivery is:

1. ``Outbox()`` from the shard: its unacknowledged settlements and its last number;
2. ``ApplySettlements`` to the ledger (with the clientOrderId answers to store with them);
3. ``AckOutbox(applied)`` to the shard.

On the hot paths the courier is handed what step 1 would read, and step 3 needs no call of
its own: the feed reads the outbox in the same call as the ticks that closed positions
(:meth:`Courier.forward`), a manual close's answer is its settlement (:meth:`Courier.settle`),
and the acknowledgement is posted on the shard's port (``Port.post``) to ride with the next
call that goes to that shard. An acknowledgement that never arrives only leaves applied
settlements in the outbox, where the next read finds them and the ledger ignores them again.

A shard's numbering must continue the ledger's: a host that starts is resumed
(:meth:`Courier.resume`: ``AppliedSeq`` from the ledger, ``ResumeSeq`` to the shard) before it
serves, and a courier resumes each shard once more on its first delivery to it. A shard whose
memory was lost (an in-memory host started again) then numbers its closes after the ledger's,
instead of below it where the ledger would take them for resends.

An order that filled opened a position the ledger has not seen, and a partial close left a
position the ledger has no terms of: with the items, the courier sends the positions that fills
among them opened, or partial closes among them left open, and that are still open, which the
shard's outbox answer carries (read in the same call as the items), so the owner's account
events show the position after the fill, or the partial close, whoever delivers it.

Deliveries to one shard are coalesced: at most one runs at a time, and every caller that asks
while one runs is served by the next one (which reads the outbox anew), so a close waiting for
its settlement never waits for more than two round trips of deliveries.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from cluster.actors.port import Port
from cluster.trading.batcher import MicroBatcher
from engine.ledger_machine import AppliedSeq, ApplySettlements
from engine.messages import ClosedPosition, IdemKey, OpenPosition, SettlementItem
from engine.results import Rejected
from engine.shard_machine import AckOutbox, Outbox, OutboxView, ResumeSeq

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
        self._acked: dict[str, int] = {}  # the highest acknowledgement posted, per shard

    async def resume(self, shard_name: str) -> None:
        """Continue ``shard_name``'s numbering after what the ledger applied from it (and drop
        from its outbox what the ledger already has)."""
        applied: int = await self.ledger.call(AppliedSeq(shard_name))
        await self.shards[shard_name].call(ResumeSeq(applied))
        self._resumed.add(shard_name)

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
        view: OutboxView = await shard.call(Outbox())
        stored = tuple(a for a in answers if a is not None)
        applied = await self._apply(shard_name, tuple(view.items), stored, view.opened)
        if view.last_seq < applied:
            # numbered below the ledger (a shard that lost its memory): the ledger took them
            # for resends; renumbered after its number, they go again in this delivery, so a
            # close waiting for its settlement is settled when this returns
            await shard.call(ResumeSeq(applied))
            view = await shard.call(Outbox())
            if view.items:
                applied = await self._apply(shard_name, tuple(view.items), (), view.opened)
        if view.items:
            await shard.call(AckOutbox(applied))
        return [applied] * len(answers)

    async def settle(self, shard_name: str, item: SettlementItem,
                     answer: Answer | None = None) -> int:
        """Settle one close the caller holds (a manual close's answer) with one ledger call:
        ``ApplySettlements`` of that item alone, its acknowledgement posted to ride with the
        shard's next call. When the ledger still waits for earlier numbers (tick closes on
        their way), or has applied numbers past it (later closes delivered first, or a shard
        that lost its memory numbering below the ledger, whose item the ledger took for a
        resend), the whole outbox is delivered instead; so is a partial close's, whose
        outbox read carries what stays open of the position (the ledger numbers it among the
        owner's events with the close, should this process die before noting it). Returns
        the ledger's last applied number."""
        if shard_name not in self._resumed or (
                isinstance(item.closed, ClosedPosition) and item.closed.partial):
            return await self.deliver(shard_name, answer)
        applied = await self._apply(shard_name, (item,), () if answer is None else (answer,))
        if applied != item.seq:  # acknowledging item.seq could drop one never applied
            return await self.deliver(shard_name)
        self._post_ack(shard_name, item.seq)
        return applied

    async def forward(self, shard_name: str, view: OutboxView) -> int:
        """Deliver ``view``, an ``Outbox`` answer the caller read itself (in the same call as
        the ticks that closed them), with one ledger call; the acknowledgement is posted to
        ride with the shard's next call. A shard not resumed by this courier yet, a gap (the
        ledger still waits for an earlier number) or a numbering below the ledger's (a shard
        that lost its memory) take the full path. Returns the ledger's last applied number."""
        if shard_name not in self._resumed or not view.items:
            return await self.deliver(shard_name)
        applied = await self._apply(shard_name, tuple(view.items), (), view.opened)
        last = view.items[-1].seq
        if applied < last or view.last_seq < applied:
            return await self.deliver(shard_name)
        self._post_ack(shard_name, last)
        return applied

    async def _apply(self, shard_name: str, items: tuple[SettlementItem, ...],
                     answers: tuple[Answer, ...], opened: tuple[OpenPosition, ...] = ()
                     ) -> int:
        applied = await self.ledger.call(ApplySettlements(shard_name, items, answers, opened))
        if isinstance(applied, Rejected):
            raise SettlementRefused(f"{shard_name}: {applied.message}")
        return int(applied)

    def _post_ack(self, shard_name: str, upto_seq: int) -> None:
        """``AckOutbox`` with the shard's next call, up to ``upto_seq`` (a number the shard
        reported and the ledger applied) or the highest posted before if that is higher (a
        delivery finished out of order; or a restarted host that lost its acknowledgements
        and shows applied settlements again)."""
        upto_seq = max(upto_seq, self._acked.get(shard_name, 0))
        self._acked[shard_name] = upto_seq
        self.shards[shard_name].post(AckOutbox(upto_seq))
