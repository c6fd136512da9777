"""The private ``account`` stream of one API replica (SPEC "Live data").

The ledger numbers every account's events as it journals them (engine.account_events), so a
frame is only ever something durable, and the numbering is the same whichever replica a client
is connected to. A replica follows the events of all accounts while one of its clients is
subscribed (never when none is) through an :class:`AccountTail`: on Ray, the Kafka topic the
ledger publishes them to (cluster.live.account_topic.TopicTail); in one process, the ledger's
own newest events (:class:`LedgerTail`, one read every :data:`POLL_S`). It hands each event to
the connections of its account.

Every connection has a cursor: the seq of the newest event it was sent. An event is sent only
when it is the next one (``seq == cursor + 1``); an older one is dropped (no duplicate) and a
newer one means some are missing (the replica subscribed after them, or read past what the
ledger still keeps), so the connection refills from the ledger by its cursor (``since``). No
event is sent twice and none is skipped; when the ledger no longer keeps what a cursor needs,
the connection is sent a ``snapshot`` (the state) and continues from its seq.

The tail may lose events without noticing (a broker that restarted with its topics forgotten, a
publisher that gave up its oldest messages): every event also carries its ``version`` (its place
among all accounts' events), and every :data:`CHECK_S` the replica asks the ledger for the events
after the newest version up to which it has seen every one (:class:`Versions`), and hands on
those its tail did not bring although it had a whole interval to (the ledger had them at the
check before). So a lost event reaches its connection one to two intervals late, even when it
was an account's last, and events keep coming while the broker is down.

Subscribing with ``"since": <seq>`` starts the cursor there; without it, when the events after
it are no longer kept, or when they are more than a connection may have unsent
(``max_replay``: it would be closed as too slow), the first frame is the ``snapshot``. Its
state is read after its seq, so it may already show what the next events say (applying an
event is idempotent by position and order id).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cluster.http.errors import error_body
from cluster.live.account_views import ViewSource
from cluster.live.topic_auth import SignedTopic
from engine.account_events import AccountEvent
from engine.messages import Principal
from engine.results import Code
from feed.clients import own_cancellation

log = logging.getLogger(__name__)

ACCOUNT_STREAM = "account"
POLL_S = 0.1  # how often a replica with account subscribers reads the ledger's new events
RETRY_S = 0.5  # after a failed read (the ledger restarting)
TAIL_LIMIT = 2000  # events per read
CHECK_S = 1.0  # how often a replica asks the ledger for the events its tail did not bring
MAX_AHEAD = 20_000  # versions past the newest seen without a gap that a replica remembers


class AccountTail(Protocol):
    """The account events of every account as they are journaled; ``malformed`` counts what
    it read that was not one, ``unauthenticated`` the messages whose tag did not verify
    (cluster.live.topic_auth: not the ledger's), all dropped."""

    malformed: int
    unauthenticated: int

    async def read(self) -> list[AccountEvent] | None:
        """The next events (oldest first; [] after a quiet while), or None: reading (re)started
        from the newest, so events before may have been missed."""
        ...

    async def close(self) -> None: ...


class AccountSource(ViewSource, Protocol):
    """Where the account events are read (the ledger, through the trading service), and the
    topic they are published to (None: none)."""

    account_topic: SignedTopic | None

    async def account_tail(self, after: int, limit: int
                           ) -> tuple[int, list[AccountEvent] | None]: ...


@dataclass(eq=False)
class Subscription:
    """One connection's account stream: ``seq`` the newest event sent to it."""

    principal: Principal
    offer: Callable[[str], None]  # queue a frame on the connection
    seq: int = 0
    wanted: int = 0  # the newest seq seen for this account (a refill runs until reached)
    started: bool = False  # the first frames (replay or snapshot) are sent
    recheck: bool = False  # the tail skipped events: read the ledger once by the cursor
    active: bool = True  # until unsubscribed (or its start failed)
    refill: asyncio.Task[None] | None = field(default=None, repr=False)


@dataclass
class StreamCounts:
    """What the account streams of a replica did, each a ``ws_account_<name>`` counter of
    ``/metrics``."""

    frames: int = 0
    snapshots: int = 0
    refills: int = 0  # reads of the ledger by a subscription's cursor
    poll_failures: int = 0  # reads of the tail that failed (the broker or ledger restarting)
    checks: int = 0  # asks of the ledger for what the tail did not bring
    check_failures: int = 0
    tail_missed: int = 0  # events the checks found that the tail had not brought


class Versions:
    """The versions of the account events a replica has handled: every one up to ``upto``
    (None: not known yet, nothing is counted) and some above it (``above``, at most
    :data:`MAX_AHEAD` past ``upto``); ``due``: the ledger's newest version at the previous
    check (what the tail has had a check's interval to bring).

    A version further ahead is not remembered: the topic may carry anything, and a forged
    far-future one would stay forever, as would the many a hostile writer can make up. An
    event not remembered is only handed on again by a check (its subscriptions drop it by seq)."""

    def __init__(self) -> None:
        self.upto: int | None = None
        self.above: set[int] = set()
        self.due = 0

    def has(self, version: int) -> bool:
        return self.upto is not None and (version <= self.upto or version in self.above)

    def saw(self, version: int) -> None:
        if self.upto is not None and self.upto < version <= self.upto + MAX_AHEAD:
            self.above.add(version)
            self._advance(self.upto)

    def start_at(self, version: int) -> None:
        """Every version up to ``version`` counts as handled, and none after it that was not
        seen (a ledger whose newest is below ``upto`` numbers the next events from there)."""
        self.above = {v for v in self.above if version < v <= version + MAX_AHEAD}
        self._advance(version)

    def _advance(self, upto: int) -> None:
        while upto + 1 in self.above:
            upto += 1
            self.above.remove(upto)
        self.upto = upto


def stream_frame(stream: str, data: dict[str, Any]) -> str:
    """The server frame carrying ``data`` on ``stream`` (cluster.live.streams)."""
    return json.dumps({"stream": stream, "data": data}, separators=(",", ":"))


class LedgerTail:
    """An AccountTail that reads the ledger's newest events (``AccountTail`` reads) every
    :data:`POLL_S`, from the version it read last."""

    def __init__(self, source: AccountSource) -> None:
        self.source = source
        self.version: int | None = None  # the newest ledger version read (None: not yet)
        self.malformed = self.unauthenticated = 0  # (never: these are the ledger's answers)

    async def read(self) -> list[AccountEvent] | None:
        after = -1 if self.version is None else self.version
        version, events = await self.source.account_tail(after, TAIL_LIMIT)
        self.version = version
        if events is not None and len(events) < TAIL_LIMIT:
            await asyncio.sleep(POLL_S)
        return events

    async def close(self) -> None:
        self.version = None


class AccountStreams:
    """The account subscriptions of one replica. ``source()``: the AccountSource (None while
    the replica's service is not built); ``render(event)`` -> a frame's ``data``;
    ``snapshot(principal)`` -> the data of a ``snapshot`` frame without ``event`` and ``seq``;
    ``tail(source)``: the AccountTail to follow (default :class:`LedgerTail`); ``max_replay``:
    the most missed events sent one by one (more: a snapshot instead); ``check_s``: how often
    the ledger is asked for what the tail did not bring."""

    def __init__(self, source: Callable[[], AccountSource | None],
                 render: Callable[[AccountEvent], dict[str, Any]],
                 snapshot: Callable[[Principal], Awaitable[dict[str, Any]]],
                 tail: Callable[[AccountSource], AccountTail] = LedgerTail,
                 max_replay: int = 500, check_s: float = CHECK_S) -> None:
        self.source = source
        self.max_replay = max_replay
        self.check_s = check_s
        self.render = render
        self.snapshot = snapshot
        self.make_tail = tail
        self.by_user: dict[int, set[Subscription]] = {}
        self.tail: AccountTail | None = None  # the one followed now
        # dropped by the tails followed before it: not events, not the ledger's
        self.malformed_before = self.unauthenticated_before = 0
        self._poller: asyncio.Task[None] | None = None
        self.counts = StreamCounts()

    # -- subscriptions ----------------------------------------------------------------------
    def subscribe(self, principal: Principal, since: int | None,
                  offer: Callable[[str], None]) -> Subscription:
        """Start ``principal``'s stream on a connection (frames go to ``offer``)."""
        sub = Subscription(principal, offer, seq=since or 0)
        self.by_user.setdefault(principal.user, set()).add(sub)
        sub.refill = asyncio.get_running_loop().create_task(self._start(sub, since))
        self._ensure_poller()
        return sub

    def _ensure_poller(self) -> None:
        if self.by_user and (self._poller is None or self._poller.done()):
            self._poller = asyncio.get_running_loop().create_task(self._poll())
            self._poller.add_done_callback(self._poller_ended)

    def _poller_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # a bug: the subscriptions would wait for events forever, so it starts again
        self.counts.poll_failures += 1
        log.error("account stream: following new events failed", exc_info=task.exception())
        asyncio.get_running_loop().call_later(RETRY_S, self._ensure_poller)

    def unsubscribe(self, sub: Subscription) -> None:
        sub.active = False
        subs = self.by_user.get(sub.principal.user)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.by_user[sub.principal.user]
        if sub.refill is not None:
            sub.refill.cancel()

    async def _start(self, sub: Subscription, since: int | None) -> None:
        try:
            await self._catch_up(sub, since)
        except Exception as exc:  # the ledger did not answer: the client is told, may retry
            log.info("account stream: start failed: %s", exc)
            self._end(sub, "the account stream cannot start now; subscribe again")

    def _end(self, sub: Subscription, message: str) -> None:
        """Stop ``sub`` and tell its client why (SERVICE_UNAVAILABLE: it may subscribe again,
        with ``since``)."""
        self.unsubscribe(sub)
        sub.offer(error_body(Code.SERVICE_UNAVAILABLE.value, message).decode())

    async def _catch_up(self, sub: Subscription, since: int | None) -> None:
        """Send what follows ``since`` (a snapshot when it is None or no longer kept), then go
        on refilling until the newest event seen for the account was sent."""
        source = self._require_source()
        last, events = await source.account_events(sub.principal.user, since)
        if since is None or events is None or len(events) > self.max_replay:
            await self._send_snapshot(sub, last)
        else:
            self._send(sub, events)
        sub.started = True
        await self._refill_until_wanted(sub)

    async def _send_snapshot(self, sub: Subscription, seq: int) -> None:
        data = await self.snapshot(sub.principal)
        sub.seq = seq
        sub.offer(stream_frame(ACCOUNT_STREAM, {"event": "snapshot", "seq": seq, **data}))
        self.counts.snapshots += 1

    async def _refill_until_wanted(self, sub: Subscription) -> None:
        source = self._require_source()
        while sub.recheck or sub.wanted > sub.seq:
            sub.recheck = False
            seen = sub.wanted  # what the tail brought during this read counts too
            self.counts.refills += 1
            _, events = await source.account_events(sub.principal.user, sub.seq)
            if events is None or len(events) > self.max_replay:
                # no longer kept (or too many to send): start again from the state
                last, _ = await source.account_events(sub.principal.user, None)
                await self._send_snapshot(sub, last)
            else:
                self._send(sub, events)
                if not events and sub.wanted == seen and not sub.recheck:
                    # nothing newer at the ledger, and nothing new seen meanwhile: a newer seq
                    # seen before was not the ledger's (or every next event would read it again)
                    sub.wanted = sub.seq
                    break

    def _require_source(self) -> AccountSource:
        source = self.source()
        if source is None:
            raise RuntimeError("the trading service is not ready")
        return source

    def _send(self, sub: Subscription, events: list[AccountEvent]) -> None:
        """Send each event that is the next one for ``sub``; note a gap for a refill."""
        for event in events:
            sub.wanted = max(sub.wanted, event.seq)
            if event.seq == sub.seq + 1:
                sub.offer(stream_frame(ACCOUNT_STREAM, self.render(event)))
                sub.seq = event.seq
                self.counts.frames += 1

    def _deliver(self, sub: Subscription, events: list[AccountEvent]) -> None:
        """Events read from the tail: sent in order, or a refill started for a gap."""
        if not sub.started or (sub.refill is not None and not sub.refill.done()):
            # the running start or refill sends them
            sub.wanted = max([sub.wanted, *(event.seq for event in events)])
            return
        self._send(sub, events)
        self._refill_if_behind(sub)

    def _refill_if_behind(self, sub: Subscription) -> None:
        if sub.started and (sub.refill is None or sub.refill.done()) and (
                sub.recheck or sub.wanted > sub.seq):
            sub.refill = asyncio.get_running_loop().create_task(self._refill(sub))

    async def _refill(self, sub: Subscription) -> None:
        while True:
            try:
                await self._refill_until_wanted(sub)
                return
            except Exception as exc:
                # the ledger restarting: again shortly (the events it owes were seen, so no
                # check hands them on, and the account's next event may never come), reading
                # once more by the cursor whatever this read was for
                log.info("account stream: refill failed: %s", exc)
                sub.recheck = True
                await asyncio.sleep(RETRY_S)

    # -- the ledger's new events ------------------------------------------------------------
    async def _poll(self) -> None:
        while self.by_user:  # (checked again after a close: someone may have subscribed)
            source = self.source()
            if source is None:
                await asyncio.sleep(RETRY_S)
                continue
            tail = self.tail = self.make_tail(source)
            seen = Versions()
            # the newest version before the tail's first read, so whatever its restart from the
            # newest skips is either read by the cursors then or found by a check
            await self._check(source, seen)
            checker = asyncio.get_running_loop().create_task(self._check_every(source, seen))
            try:
                await self._follow(tail, seen)
            finally:  # nobody subscribed: no reading (a new subscriber starts it afresh)
                checker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await checker
                self.tail = None
                self.malformed_before += tail.malformed
                self.unauthenticated_before += tail.unauthenticated
                await tail.close()

    async def _follow(self, tail: AccountTail, seen: Versions) -> None:
        while self.by_user:
            try:
                events = await tail.read()
            except (Exception, asyncio.CancelledError) as exc:
                # the ledger or the broker restarting: again shortly (a client library may
                # end a read with a CancelledError nobody asked for: that ends only the read)
                if own_cancellation(exc):
                    raise
                self.counts.poll_failures += 1
                log.info("account stream: reading new events failed: %r", exc)
                await asyncio.sleep(RETRY_S)
                continue
            if events is None:
                # reading (re)started at the newest: what came before may have been skipped
                self._recheck_all()
                continue
            for event in events:
                seen.saw(event.version)
            self._dispatch(events)

    async def _check_every(self, source: AccountSource, seen: Versions) -> None:
        while True:
            await asyncio.sleep(self.check_s)
            await self._check(source, seen)

    async def _check(self, source: AccountSource, seen: Versions) -> None:
        """Hand on the events up to ``seen.due`` that the tail has not brought (on the first
        check, only learn the newest version). Newer ones may still be on their way through
        the topic: the next check looks at them."""
        self.counts.checks += 1
        try:
            while True:
                version, events = await source.account_tail(
                    -1 if seen.upto is None else seen.upto, TAIL_LIMIT)
                if seen.upto is None or events is None:
                    # (-1: nothing is kept after it, so the answer is the version alone) Some
                    # are no longer kept: every subscription reads the ledger by its cursor.
                    recheck = seen.upto is not None
                    seen.start_at(version)
                    if recheck:
                        self._recheck_all()
                    break
                missed = [e for e in events if e.version <= seen.due and not seen.has(e.version)]
                for event in missed:
                    seen.saw(event.version)
                self.counts.tail_missed += len(missed)
                self._dispatch(missed)
                if len(events) < TAIL_LIMIT or events[-1].version > seen.due:
                    break
            seen.due = version
        except (Exception, asyncio.CancelledError) as exc:  # the next check asks again
            if own_cancellation(exc):
                raise
            self.counts.check_failures += 1
            log.info("account stream: asking the ledger for missed events failed: %r", exc)

    def _recheck_all(self) -> None:
        """Every subscription reads the ledger once by its cursor."""
        for subs in self.by_user.values():
            for sub in subs:
                sub.recheck = True
                self._refill_if_behind(sub)

    def _dispatch(self, events: list[AccountEvent]) -> None:
        """Hand ``events`` (oldest first) to the subscriptions of their accounts."""
        by_user: dict[int, list[AccountEvent]] = {}
        for event in events:
            by_user.setdefault(event.user, []).append(event)
        for user, mine in by_user.items():
            for sub in list(self.by_user.get(user, ())):
                try:
                    self._deliver(sub, mine)
                except Exception:  # a bug: it ends this subscription, not every other's
                    log.exception("account stream: delivering to user %s failed", user)
                    self._end(sub, "the account stream stopped; subscribe again with since")

    def stats(self) -> dict[str, int]:
        tail = self.tail
        malformed = self.malformed_before + (0 if tail is None else tail.malformed)
        unauthenticated = self.unauthenticated_before + (
            0 if tail is None else tail.unauthenticated)
        return {"ws_account_subscriptions": sum(map(len, self.by_user.values())),
                **{f"ws_account_{k}": v for k, v in dataclasses.asdict(self.counts).items()},
                "ws_account_malformed": malformed,
                "ws_account_unauthenticated": unauthenticated}


__all__ = ["ACCOUNT_STREAM", "AccountSource", "AccountStreams", "AccountTail", "LedgerTail",
           "StreamCounts", "Subscription", "Versions", "stream_frame"]
