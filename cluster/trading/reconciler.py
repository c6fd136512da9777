"""Reconciler: the one owner of requests whose outcome is unknown.

Four kinds of loose ends, each settled by asking the state machines, never by guessing:

* **a lock whose open never went out** (the lock's answer was lost, the open was refused and
  its release failed, or the request was cut off after the lock): ``AbandonLock(request_id)``
  makes the ledger release that lock if it still holds it under that id, once;
* **a request sent to a shard whose answer never came** (an open, an order placement, a close
  or an order cancel): ``Resolve`` on that shard returns its first result, or fences the
  request id so it can never run any more; an open or placement that happened keeps its lock
  and its clientOrderId gets the position or order, one that did not has its lock abandoned; a
  close or cancel that happened is settled through the courier with its answer, one that did
  not drops its clientOrderId reservation so a retry runs again;
* **a request that happened whose note the ledger never took** (it was down or restarting
  when the answer went to the client): the ``Note`` is sent again until the ledger answers,
  so the account's event (``positionOpened``, ``orderPlaced``, ``positionUpdated``) comes
  seconds after the ledger is back; the ledger notes a request once, so a resend whose first
  send did arrive adds nothing; likewise the ``ReleaseMargin`` of a request its shard refused,
  which stores the refusal the client was given as its clientOrderId's answer (abandoning
  the lock would drop the clientOrderId instead, and a retry would run the request again).
  A note of a position (``positionOpened``, ``positionUpdated``, also what a partial close
  left open) made this late carries the position as its shard holds it when it is sent, read
  in the position's turn (the service's, so no change of it in this replica runs between the
  read and the note): a change made meanwhile, and noted before it, is not shown undone by
  the account's last event. What the request made stays its clientOrderId's answer;
* **reservations and locks left in the ledger** by an API process that died: every shard
  resolves (and fences) their request ids; ``SettleRequests`` stores what happened or drops the
  reservation, a lock whose request never happened is abandoned and one whose request happened
  is noted; and clientOrderIds answered longer than the TTL ago are forgotten
  (``ExpireAnswers``). With several API replicas, one of them does this.

At a platform start, before the API serves, :meth:`at_start` does the last kind for every
pending reservation and every lock at once (no request is under way), then releases any
margin no open position or order backs and sets each account's counts of open positions and
orders (the SPEC limits) from the shards' books (``ReconcileAtStart``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from cluster.actors.port import Port, Unavailable
from cluster.trading.courier import Courier
from engine import account_events
from engine.ledger import AuditDifference
from engine.ledger_machine import (
    AbandonLock,
    Audit,
    ExpireAnswers,
    Forget,
    Note,
    OpenLocks,
    PendingRequests,
    ReconcileAtStart,
    ReleaseMargin,
    Remember,
    SettleRequests,
)
from engine.messages import (
    ClosedPosition,
    EndedOrder,
    IdemKey,
    OpenPosition,
    PendingOrder,
    SettlementItem,
)
from engine.results import OUTCOME_UNKNOWN, Code, Forgotten, Rejected
from engine.shard_machine import AuditView, PositionsOf, Resolve

log = logging.getLogger(__name__)

STALE_PENDING_S = 30.0  # a reservation pending this long belongs to a request nobody runs
ORPHAN_ROUNDS = 4  # a lock open in this many sweeps in a row (>= 30 s) has nobody to end it
ORPHAN_BATCH = 1_000  # the oldest open locks a sweep looks at
_MADE = (OpenPosition, PendingOrder)  # what a lock pays for, once its request happened
Made = OpenPosition | ClosedPosition | PendingOrder | EndedOrder  # what a request made
Outcome = Made | Forgotten  # or a shard can no longer tell whether it ran
TRANSIENT_CODES = frozenset({Code.PRICE_UNAVAILABLE})


class ShardViews(NamedTuple):
    """All shards' books at once. Per user: open margin (micros), open positions plus open
    orders (an open order holds a position's slot too: a fill can never exceed that limit),
    open orders; and each shard's unacknowledged settlements."""

    margins: dict[int, int]
    unsettled: dict[str, tuple[SettlementItem, ...]]
    slots: dict[int, int]
    orders: dict[int, int]


class BooksDisagree(RuntimeError):
    """What a start refuses to serve: the ledger's and the shards' books differ once the
    start's round has reconciled them (:meth:`Reconciler.at_start`). No crash leaves that:
    what a crash cuts off, the round ends. A journal lacks records the others hold: damaged,
    or the hosts' directories restored from different moments."""

    def __init__(self, problems: Sequence[AuditDifference]) -> None:
        shown = "; ".join(p.text for p in problems[:3])
        more = f"; {len(problems) - 3} more" if len(problems) > 3 else ""
        super().__init__(
            f"the ledger's and the shards' books differ after recovery ({shown}{more}), which "
            "no crash leaves: a journal lacks records the others hold (damaged, or the hosts' "
            "directories restored from different moments); refused rather than trade on them: "
            "restore DATA_DIR whole from one backup (`shardex audit --offline` lists the "
            "differences)")
        self.problems = list(problems)


class InDoubt(NamedTuple):
    """A request sent to ``shard`` whose answer never came."""

    shard: str
    request_id: int
    kind: str  # "open" / "order" / "margin" (a lock pays for it) or "close" / "cancel" /
    # "modify" / "margin" (a removal: ``release`` is set)
    key: IdemKey | None
    release: tuple[int, int] | None = None  # (user, micros) the ledger frees once it happened


class Renote(NamedTuple):
    """A note of position ``position_id`` (at ``shard``) owed for request ``request_id``: sent
    with the position as the shard holds it when it is sent (see the module docstring)."""

    shard: str
    user: int
    position_id: int
    request_id: int
    kind: str  # positionOpened / positionUpdated
    made: OpenPosition | None  # what the request made: its key's answer, and the body noted
    # should the position no longer be open at the shard (None: what a partial close left
    # open, noted only while it is)
    key: IdemKey | None = None
    release: ReleaseMargin | None = None  # a removal's, sent in the same batch as the note

    @classmethod
    def of(cls, shard: str, note: Note, release: ReleaseMargin | None = None) -> Renote:
        assert isinstance(note.body, OpenPosition)
        return cls(shard, note.user, note.body.position_id, note.request_id, note.kind,
                   note.body, note.key, release)


def remember_or_forget(key: IdemKey, result: object, request_id: int) -> Remember | Forget:
    """What the ledger is told of ``key`` once its request ``request_id`` ended without making
    anything: a refusal to give every retry again, or (a transient refusal, or no answer) the
    key dropped so that a retry runs the request again."""
    if isinstance(result, Rejected) and result.code not in TRANSIENT_CODES:
        return Remember(key, result, request_id)
    return Forget(key, request_id)


def _no_turn(position_id: int) -> contextlib.AbstractAsyncContextManager[object]:
    return contextlib.nullcontext()


class Reconciler:
    """Settles the loose ends of one service (see the module docstring). ``turn(position_id)``:
    the turn of the changes of a position in this process (the service's), taken while a late
    note of it reads the position and sends the note."""

    def __init__(self, ledger: Port, shards: Mapping[str, Port], courier: Courier,
                 counters: collections.Counter[str] | None = None,
                 answer_ttl_s: int = 86_400,
                 turn: Callable[[int], contextlib.AbstractAsyncContextManager[object]]
                 = _no_turn) -> None:
        self.ledger = ledger
        self.shards = dict(shards)
        self.courier = courier
        self.counters = counters if counters is not None else collections.Counter()
        self.answer_ttl_s = answer_ttl_s
        self._turn = turn
        self._abandoned: list[int] = []
        self._in_doubt: list[InDoubt] = []
        self._resends: list[Note | ReleaseMargin] = []  # sent again until the ledger answers
        self._renotes: list[Renote] = []  # likewise, each read from its shard when sent
        self._lock = asyncio.Lock()  # two rounds must never settle the same request
        self._task: asyncio.Task[None] | None = None
        self._closed = False  # (rounds started once closed would run with nobody to stop them)
        self._lock_rounds: dict[int, int] = {}  # open lock's request id -> sweeps seen open
        # request ids a shard answered Forgotten: their locks stay until the next start, and
        # the sweeps look past them (else, once a batch of them, at nothing else)
        self._unknown: set[int] = set()

    # ----------------------------------------------------------------- queueing
    def abandon(self, request_id: int) -> None:
        """The lock of ``request_id`` backs no request any more: release it if it exists."""
        self._abandoned.append(request_id)
        self.counters["locks_abandoned"] += 1
        self._schedule()

    def in_doubt(self, doubt: InDoubt) -> None:
        """``doubt.request_id`` went to a shard and its outcome is unknown."""
        self._in_doubt.append(doubt)
        self.counters[f"{doubt.kind}s_in_doubt"] += 1
        self._schedule()

    def resend(self, command: Note | ReleaseMargin, shard: str | None = None) -> None:
        """``command`` did not reach the ledger: send it again. A ``Note`` is of a request that
        happened (a note of a position, with the ``shard`` that holds it, is sent with the
        position as it is then); a ``ReleaseMargin``, the lock of a request its shard refused,
        with the refusal as its clientOrderId's answer (the ledger releases a lock once by
        its request id, and stores the answer only while that request holds the
        clientOrderId)."""
        if isinstance(command, Note) and shard is not None \
                and isinstance(command.body, OpenPosition):
            self._renotes.append(Renote.of(shard, command))
        else:
            self._resends.append(command)
        self.counters["notes_resent" if isinstance(command, Note) else "releases_resent"] += 1
        self._schedule()

    @property
    def outstanding(self) -> int:
        return (len(self._abandoned) + len(self._in_doubt) + len(self._resends)
                + len(self._renotes))

    def _schedule(self) -> None:
        if not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self, interval_s: float = 0.2, max_interval_s: float = 10.0) -> None:
        while True:
            try:
                if await self.run_once() == 0:
                    return
            except Exception:  # e.g. a ledger command that failed: what it left stays queued
                log.exception("a reconciliation round failed")
                self.counters["round_errors"] += 1
            await asyncio.sleep(interval_s)
            interval_s = min(max_interval_s, interval_s * 2)  # back off while a part is down

    async def aclose(self) -> None:
        """Stop the background rounds for good (what is queued stays queued, and what is
        queued from now on too; :meth:`run_once` still runs them)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ----------------------------------------------------------------- rounds
    async def run_once(self) -> int:
        """One round over everything queued; returns how many remain (a part still down)."""
        async with self._lock:
            await self._resolve_in_doubt()
            await self._abandon_locks()
            await self._resend()
            return self.outstanding

    async def _abandon_locks(self) -> None:
        batch = dict.fromkeys(self._abandoned)  # each id once, in order
        if not batch:
            return
        try:
            answers = await asyncio.gather(*(self.ledger.call(AbandonLock(r)) for r in batch))
        except Unavailable:
            return
        # an answer names the lock released; None: no lock was held under that id
        self.counters["locks_released_abandoned"] += sum(isinstance(a, tuple) for a in answers)
        self._abandoned = [r for r in self._abandoned if r not in batch]

    async def _resend(self) -> None:
        # one at a time, each a call to its shard and one to the ledger: a part that does not
        # answer is asked once a round (each ask may wait for a call's timeout), a shard for
        # its own notes, the ledger for all of them
        down: set[str] = set()
        for renote in list(self._renotes):
            if renote.shard in down:
                continue
            try:
                await self._renote(renote)
            except Unavailable as exc:  # a later round
                if exc.component != renote.shard:
                    return  # the ledger: nothing else it is sent can be taken either
                down.add(renote.shard)
                continue
            except Exception:  # e.g. a command that failed: a later (backed off) round, and
                # the others are still sent
                log.exception("noting %s failed", renote)
                self.counters["renote_errors"] += 1
                continue
            self._renotes = [r for r in self._renotes if r is not renote]
        batch = list(self._resends)
        if not batch:
            return
        try:
            await self.ledger.call_many(batch)
        except Unavailable:
            return
        self._resends = self._resends[len(batch):]  # what was queued meanwhile waits its round

    async def _renote(self, r: Renote) -> None:
        """Send ``r`` with its position as its shard holds it now, in the position's turn."""
        async with self._turn(r.position_id):
            [held] = await self.shards[r.shard].call(PositionsOf((r.user,)))
            body = next((p for p in held if p.position_id == r.position_id), r.made)
            commands: list[Note | ReleaseMargin | Remember] = [] if r.release is None \
                else [r.release]
            if r.key is not None and r.made is not None:
                commands.append(Remember(r.key, r.made, r.request_id))
            if body is not None:
                commands.append(Note(r.user, r.request_id, r.kind, body))
            if commands:
                await self.ledger.call_many(commands)

    async def _resolve_in_doubt(self) -> None:
        # each stays queued, and counted in ``outstanding``, until it is resolved (taken off
        # the queue first, it was counted nowhere while its shard was asked); one that fails,
        # or a round cut off, leaves it for a later round
        for doubt in list(self._in_doubt):
            try:
                await self._resolve_one(doubt)
            except Unavailable:
                continue
            except Exception:  # e.g. a command that failed: retried in later (backed off)
                # rounds, and the others still resolve; the sweeps settle it meanwhile
                log.exception("resolving %s failed", doubt)
                self.counters["in_doubt_errors"] += 1
                continue
            self._in_doubt.remove(doubt)

    async def _resolve_one(self, doubt: InDoubt) -> None:
        result = await self.shards[doubt.shard].call(Resolve(doubt.request_id))
        key = doubt.key
        if isinstance(result, Forgotten):
            # it may have run: its lock (or a removal's owed release) stays for the next
            # start's reconciliation with the books; its clientOrderId gets that answer
            self._forgotten(doubt.request_id)
            if key is not None:
                await self.ledger.call(Remember(key, OUTCOME_UNKNOWN, doubt.request_id))
            return
        if doubt.kind in ("open", "order", "margin") and doubt.release is None:
            if isinstance(result, _MADE):
                note = Note(result.owner, doubt.request_id,
                            account_events.NOTED_OF_REQUEST[doubt.kind], result, key)
                if isinstance(result, OpenPosition):  # noted as it is when noted
                    self._renotes.append(Renote.of(doubt.shard, note))
                else:
                    await self.ledger.call(note)
            else:  # refused or never arrived (now fenced): its lock backs nothing
                self._abandoned.append(doubt.request_id)
            return
        if isinstance(result, SettlementItem):
            await self.courier.deliver(doubt.shard, None if key is None else (key, result.closed))
            self._rest_owed(doubt.shard, result.closed, doubt.request_id)
            return
        if isinstance(result, OpenPosition):  # a change of a position that happened
            note, release = self._change_notes(doubt, result)
            self._renotes.append(Renote.of(doubt.shard, note, release))
            return
        if doubt.release is not None:  # a removal that did not happen owes no release
            self._abandoned.append(doubt.request_id)
        if key is not None:
            await self.ledger.call(remember_or_forget(key, result, doubt.request_id))

    async def settle_change(self, doubt: InDoubt, position: OpenPosition) -> None:
        """Record at the ledger what a change of ``position`` (request ``doubt``) did: free the
        margin a removal took off it (once, by request id), store the answer, and note the
        change among the account's events. (For the change's own process, in its position's
        turn: the position is as the shard holds it.)"""
        note, release = self._change_notes(doubt, position)
        # in one call: the release ends the removal's record at the ledger, so a release that
        # arrived without its note (this process died in between) left no sweep anything to
        # note, and the account's events kept the old margin
        await self.ledger.call_many([note] if release is None else [release, note])

    @staticmethod
    def _change_notes(doubt: InDoubt, position: OpenPosition
                      ) -> tuple[Note, ReleaseMargin | None]:
        """The note of a change of ``position`` (request ``doubt``), and the release of the
        margin it took off (a removal's), which stores the answer instead."""
        key = doubt.key
        note = Note(position.owner, doubt.request_id, account_events.POSITION_UPDATED,
                    position, None if doubt.release is not None else key)
        if doubt.release is None:
            return note, None
        user, micros = doubt.release
        return note, ReleaseMargin(user, micros, doubt.request_id,
                                   None if key is None else (key, position), counted=False)

    async def note_rest(self, shard: str, closed: ClosedPosition | EndedOrder, request_id: int
                        ) -> None:
        """After a partial close reached the ledger, note what stays open of the position
        (``positionUpdated``: its quantity, margin and liquidation price now), after the
        close's own account events. (For the close's own process, in its position's turn.)
        With the shard or the ledger unavailable, the rounds note it later, read again."""
        if not isinstance(closed, ClosedPosition) or not closed.partial:
            return
        try:
            [mine] = await self.shards[shard].call(PositionsOf((closed.owner,)))
            rest = next((p for p in mine if p.position_id == closed.position_id), None)
            if rest is not None:
                await self.ledger.call(Note(closed.owner, request_id,
                                            account_events.POSITION_UPDATED, rest, None))
        except Unavailable:
            self._rest_owed(shard, closed, request_id)
            self.counters["notes_resent"] += 1
            self._schedule()

    def _rest_owed(self, shard: str, closed: ClosedPosition | EndedOrder, request_id: int
                   ) -> None:
        """Queue the note of what a partial close left open (none for any other end)."""
        if isinstance(closed, ClosedPosition) and closed.partial:
            self._renotes.append(Renote(shard, closed.owner, closed.position_id, request_id,
                                        account_events.POSITION_UPDATED, None))

    # ----------------------------------------------------------------- pending reservations
    async def settle_pending(self, older_than_s: float = STALE_PENDING_S) -> None:
        """Resolve the ledger's reservations pending for ``older_than_s`` against every shard
        (which fences them) and store what happened."""
        request_ids = await self.ledger.call(PendingRequests(int(older_than_s * 1_000_000)))
        if request_ids:
            opened, absent = await self._resolve_everywhere(request_ids)
            settled: int = await self.ledger.call(SettleRequests(opened, absent))
            self.counters["pending_settled"] += settled

    async def settle_waited(self, request_id: int, kind: str) -> None:
        """Settle now the reservation of request ``request_id`` (a ``kind`` request, IdemKey
        kinds) that a retry has waited for in vain: its API process died, or it is too slow
        to matter, since the client has gone on to retry it. Resolved at every shard (which
        fences it where it never arrived): one that never arrived is dropped and its lock
        (if any) freed, so the retry runs it; an open or a placement that happened is stored
        as the answer, its lock ended by noting it. A close or change that happened is left
        to the sweep (its settlement or release has its own path). The request, should it
        still be under way, is refused at its shard, and its own release, Forget or stored
        refusal then change nothing (by request id)."""
        opened, absent = await self._resolve_everywhere([request_id])
        outcome = opened.get(request_id)
        if not absent and not isinstance(outcome, Forgotten) \
                and not (kind in ("open", "order") and isinstance(outcome, _MADE)):
            return
        await self.ledger.call(SettleRequests(opened, absent))
        # (a removal's "margin" key holds no lock: abandoning its id frees nothing)
        await self._end_locks(opened, absent, {request_id: kind})
        self.counters["reservations_settled_for_retry"] += 1

    async def watch_pending(self, interval_s: float = 10.0,
                            leading: Callable[[], bool] | None = None) -> None:
        """Forever, every ``interval_s``: :meth:`sweep` (a part that does not answer makes a
        round skip what it would settle: where those requests are is unknown). With several
        API replicas only the one for which ``leading()`` is true sweeps; two that both
        believe they lead (while Serve reassigns its ranks) do no harm, since a sweep only
        settles what is still pending."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                # (Serve's rank, where a replica may have none: a failure skips one round,
                # and must not end the task, unread, with every later sweep of this process)
                if leading is not None and not leading():
                    continue
            except Exception:
                log.exception("asking which replica sweeps failed")
                continue
            try:
                await self.sweep()
            except Unavailable:
                continue
            except Exception:  # reported; the next round tries again
                log.exception("settling pending reservations failed")

    async def sweep(self) -> None:
        """Settle the reservations pending longer than STALE_PENDING_S, end the locks an API
        process left behind, and forget the clientOrderIds answered longer than the TTL
        ago (first: it needs the ledger alone, and a shard away stops the rest)."""
        expired: int = await self.ledger.call(ExpireAnswers(self.answer_ttl_s * 1_000_000))
        self.counters["client_order_ids_expired"] += expired
        await self.settle_pending()
        await self.end_orphaned_locks()

    async def end_orphaned_locks(self) -> int:
        """End the locks whose request has been open at the ledger for ORPHAN_ROUNDS sweeps
        in a row (an API process died between the lock and its end, e.g. a replica killed):
        each is resolved at every shard (which fences it); one whose request never happened
        is abandoned (its margin freed), one that happened is noted (ending the lock, and
        numbering the account event the dead process did not); one a shard answered
        Forgotten stays until the next start, and later sweeps look past it. Returns how many
        were abandoned. A request this slow that arrives at a shard after all is refused there,
        and its own release then frees nothing twice."""
        limit = ORPHAN_BATCH + len(self._unknown)
        open_locks = dict(await self.ledger.call(OpenLocks(limit)))
        if len(open_locks) < limit:  # every open lock seen: forget the unknown ones ended
            self._unknown.intersection_update(open_locks)
        self._lock_rounds = {r: self._lock_rounds.get(r, 0) + 1 for r in open_locks
                             if r not in self._unknown}
        stale = sorted(r for r, rounds in self._lock_rounds.items() if rounds >= ORPHAN_ROUNDS)
        if not stale:
            return 0
        opened, absent = await self._resolve_everywhere(stale)
        abandoned = await self._end_locks(opened, absent, open_locks)
        for r in stale:
            del self._lock_rounds[r]
        self.counters["orphaned_locks_abandoned"] += len(abandoned)
        if abandoned:
            log.warning("released the margin of locks an API process left: %s", abandoned)
        return len(abandoned)

    async def _end_locks(self, opened: Mapping[int, Outcome], absent: Sequence[int],
                         kinds: Mapping[int, str]) -> list[object]:
        """End the locks of requests resolved at every shard: one that never arrived (now
        fenced) is abandoned, its margin freed; one that made a position or an order (its
        request's ``kinds`` entry: "open", "order", "margin") is noted, which ends its lock
        and numbers the account event its API process did not. Returns the abandon answers
        that freed margin."""
        answers = await self.ledger.call_many([AbandonLock(r) for r in absent]) if absent else []
        notes = [Note(made.owner, r, account_events.NOTED_OF_REQUEST[kinds[r]], made, None)
                 for r, made in opened.items() if isinstance(made, _MADE)]
        if notes:
            await self.ledger.call_many(notes)
        return [a for a in answers if a is not None]

    async def _resolve_everywhere(self, request_ids: list[int]
                                  ) -> tuple[dict[int, Outcome], tuple[int, ...]]:
        """Ask every shard about each request id (fencing it where it never arrived):
        ``(outcomes, absent)``, ``outcomes`` what each request made, or Forgotten where a
        shard that may have run it no longer knows (and none says it did); ``absent`` the
        requests no shard ran."""
        answers = await asyncio.gather(*(
            shard.call_many([Resolve(r) for r in request_ids]) for shard in self.shards.values()))
        opened: dict[int, Outcome] = {}
        for per_shard in answers:
            for request_id, result in zip(request_ids, per_shard, strict=True):
                if isinstance(result, _MADE):
                    opened[request_id] = result
                elif isinstance(result, SettlementItem):
                    opened[request_id] = result.closed
                elif isinstance(result, Forgotten):
                    opened.setdefault(request_id, result)
        for request_id, outcome in opened.items():
            if isinstance(outcome, Forgotten):
                self._forgotten(request_id)
        return opened, tuple(r for r in request_ids if r not in opened)

    def _forgotten(self, request_id: int) -> None:
        """Count (and log) a request a shard answered Forgotten, once."""
        if request_id in self._unknown:
            return
        self._unknown.add(request_id)
        self.counters["outcomes_forgotten"] += 1
        log.warning("request %s is older than its shard's remembered answers: whether it ran "
                    "is not known, so its lock stays until the next start", request_id)

    async def shard_views(self) -> ShardViews:
        """Every shard's ``AuditView`` (engine.shard_machine.BooksView), merged (what the
        ledger's audit and start reconciliation take)."""
        views = await asyncio.gather(*(p.call(AuditView()) for p in self.shards.values()))
        merged = ShardViews({}, {}, {}, {})
        for name, view in zip(self.shards, views, strict=True):
            for total, part in ((merged.margins, view.margins), (merged.orders, view.orders),
                                (merged.slots, view.positions), (merged.slots, view.orders)):
                for user, n in part.items():
                    total[user] = total.get(user, 0) + int(n)
            merged.unsettled[name] = tuple(view.outbox)
        return merged

    async def differences(self) -> list[AuditDifference]:
        """The ledger invariant against every shard's books, read once ([]: none; see
        engine.ledger_machine.Audit): the shards are read first, so a change between the two
        reads shows as a difference (a live audit reads again)."""
        v = await self.shard_views()
        return await self.ledger.call(Audit(v.margins, v.unsettled, v.slots, v.orders))

    async def start_round(self) -> dict[int, int]:
        """A platform start's round before the API serves: :meth:`at_start`, then the audit of
        what it left, which must find no difference (nothing else runs meanwhile): else
        :class:`BooksDisagree`. Returns ``{user: released_micros}``."""
        released = await self.at_start()
        if problems := await self.differences():
            raise BooksDisagree(problems)
        return released

    async def at_start(self) -> dict[int, int]:
        """Before the API serves: settle every pending reservation and end every lock as the
        sweep does (numbering the account events of the requests an API process that died
        did not note), release the margin no open position (or unsettled close) backs and
        count each account's open positions again. Returns ``{user: released_micros}``."""
        for name in self.shards:  # what the shards closed while the ledger was away
            await self.courier.deliver(name)
        await self.settle_pending(older_than_s=0)
        released: collections.Counter[int] = collections.Counter()
        tried: set[int] = set()  # a lock that does not end (refused) is left to the recount
        while kinds := {r: k for r, k in await self.ledger.call(OpenLocks(ORPHAN_BATCH))
                        if r not in tried}:
            tried.update(kinds)
            for freed in await self._end_locks(*await self._resolve_everywhere(list(kinds)),
                                               kinds):
                if isinstance(freed, tuple):  # (request id, user, micros) abandoned
                    released[freed[1]] += freed[2]
        v = await self.shard_views()
        excess = await self.ledger.call(ReconcileAtStart(v.margins, v.unsettled, None, v.slots,
                                                         v.orders))
        if isinstance(excess, Rejected):
            raise RuntimeError(f"the start's reconciliation was refused: {excess.message}")
        released.update(excess)
        if released:
            log.warning("released margin no open position backs: %s", dict(released))
        return dict(released)
