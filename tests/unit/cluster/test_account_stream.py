"""The account stream's cursor without a server (cluster.live.account_stream): a subscription
is sent each event once, in order, whatever the tail delivers (late, twice, ahead of a gap, or
a restart from the newest), refilling from the ledger's numbered events by its cursor, and a
snapshot first when it starts without ``since`` or from further back than is kept or may be
replayed. The ledger is an AccountLog answering as its AccountEvents/AccountTail reads do; the
tail is scripted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from collections.abc import Coroutine
from typing import Any
from typing import TypeVar

import pytest
from cluster.live.account_stream import MAX_AHEAD
from cluster.live.account_stream import AccountSource
from cluster.live.account_stream import AccountStreams
from cluster.live.account_stream import Subscription
from cluster.live.account_stream import Versions
from cluster.live.topic_auth import SignedTopic
from engine.account_events import BALANCE
from engine.account_events import AccountEvent
from engine.account_events import AccountLog
from engine.account_events import Balance
from engine.messages import Principal

ALICE = Principal(1, "acct-alice")
BOB = Principal(2, "acct-bob")
T = TypeVar("T")


class LogSource:
    """An AccountSource answering from an AccountLog as the ledger's AccountEvents and
    AccountTail reads do; while ``hold`` is set, an AccountEvents answer (made when asked)
    reaches the caller only once it is."""

    account_topic: SignedTopic | None = None

    def __init__(self, log: AccountLog) -> None:
        self.log = log
        self.events_reads: list[tuple[int, int | None]] = []
        self.hold: asyncio.Event | None = None

    async def account_events(self, user: int, since: int | None
                             ) -> tuple[int, list[AccountEvent] | None]:
        self.events_reads.append((user, since))
        last = self.log.last_seq.get(user, 0)
        answer = last, None if since is None else self.log.since(user, since)
        if self.hold is not None:
            await self.hold.wait()
        return answer

    def release(self) -> None:
        assert self.hold is not None
        self.hold.set()
        self.hold = None

    async def account_tail(self, after: int, limit: int
                           ) -> tuple[int, list[AccountEvent] | None]:
        return self.log.after(after, limit)


class DownSource(LogSource):
    """The ledger not answering."""

    async def account_events(self, user: int, since: int | None
                             ) -> tuple[int, list[AccountEvent] | None]:
        raise ConnectionError("ledger restarting")


class ScriptedTail:
    """An AccountTail whose reads answer what the test pushes (a list of events, [] for a
    quiet while, or None for a restart from the newest)."""

    def __init__(self) -> None:
        self.malformed = self.unauthenticated = 0
        self.queue: asyncio.Queue[list[AccountEvent] | None] = asyncio.Queue()
        self.closed = 0

    def push(self, events: list[AccountEvent] | None) -> None:
        self.queue.put_nowait(events)

    async def read(self) -> list[AccountEvent] | None:
        return await self.queue.get()

    async def close(self) -> None:
        self.closed += 1


def render(event: AccountEvent) -> dict[str, Any]:
    return {"event": event.kind, "seq": event.seq}


async def snapshot(principal: Principal) -> dict[str, Any]:
    return {"state": "x"}


class Client:
    """One connection: the frames offered to it, parsed."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.sub: Subscription | None = None

    def offer(self, frame: str) -> None:
        self.frames.append(json.loads(frame))

    @property
    def data(self) -> list[dict[str, Any]]:
        return [f["data"] for f in self.frames]

    @property
    def seqs(self) -> list[int]:
        return [d["seq"] for d in self.data]


class Stream:
    """AccountStreams over a LogSource and a ScriptedTail (``tail``: another one). The checks
    for what the tail did not bring run every ``check_s``: by default too seldom to happen
    during a test, so only the tail delivers (the checks have tests of their own)."""

    def __init__(self, log: AccountLog | None = None, max_replay: int = 500,
                 source: LogSource | None = None,
                 render: Callable[[AccountEvent], dict[str, Any]] = render,
                 check_s: float = 3600.0, tail: ScriptedTail | None = None) -> None:
        self.log = AccountLog() if log is None else log
        self.source = LogSource(self.log) if source is None else source
        self.tail = ScriptedTail() if tail is None else tail
        self.tails_made = 0
        self.streams = AccountStreams(lambda: self.source, render, snapshot,
                                      tail=self.make_tail, max_replay=max_replay,
                                      check_s=check_s)
        self.clients: list[Client] = []

    def make_tail(self, source: AccountSource) -> ScriptedTail:
        assert source is self.source
        self.tails_made += 1
        return self.tail

    def record(self, who: Principal, n: int = 1) -> list[AccountEvent]:
        """``n`` balance events of ``who`` in the ledger (not delivered by the tail)."""
        events = []
        for _ in range(n):
            seq = self.log.last_seq.get(who.user, 0) + 1
            self.log.record(who.user, BALANCE, Balance(1_000_000 * seq, 0))
            events.append(self.log.kept()[-1])
            assert events[-1][:2] == (who.user, seq)
        return events

    def subscribe(self, who: Principal, since: int | None) -> Client:
        client = Client()
        client.sub = self.streams.subscribe(who, since, client.offer)
        self.clients.append(client)
        return client

    async def follow(self, who: Principal, since: int | None) -> Client:
        """A client :meth:`subscribe` d, once it is :meth:`started`."""
        client = self.subscribe(who, since)
        await self.started(client)
        return client

    async def started(self, client: Client) -> None:
        """Until the client's first frames (replay or snapshot) are sent and no refill runs."""
        sub = client.sub
        assert sub is not None
        await until(lambda: sub.started and sub.refill is not None and sub.refill.done())

    async def close(self) -> None:
        """Unsubscribe everyone; the tail's next (quiet) read ends the poller."""
        for client in self.clients:
            assert client.sub is not None
            self.streams.unsubscribe(client.sub)
        assert self.streams.by_user == {}
        self.tail.push([])
        poller = self.streams._poller
        assert poller is not None
        await asyncio.wait_for(poller, 3)


async def until(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    assert condition(), "timed out waiting"


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``scenario``; it ends with no task of the stream left running."""

    async def main() -> T:
        out = await asyncio.wait_for(scenario(), 10)
        await asyncio.sleep(0)  # (cancelled refills finish)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        return out

    return asyncio.run(main())


def run_stream(scenario: Callable[[Stream], Coroutine[Any, Any, T]], **settings: Any) -> T:
    """:func:`run` ``scenario`` on a new :class:`Stream` (``settings``: its arguments), then
    close the stream (:meth:`Stream.close`); returns what ``scenario`` returns."""

    async def main() -> T:
        s = Stream(**settings)
        out = await scenario(s)
        await s.close()
        return out

    return run(main)


# -- replay from since, then live events ---------------------------------------------------


def test_a_resume_replays_what_follows_since_then_sends_live_events_once() -> None:
    async def scenario(s: Stream) -> Stream:
        s.record(ALICE, 6)
        s.record(BOB, 2)
        alice = s.subscribe(ALICE, 2)
        await until(lambda: len(alice.frames) == 4)
        await s.started(alice)
        assert alice.frames == [{"stream": "account", "data": {"event": "balance", "seq": q}}
                                for q in (3, 4, 5, 6)]

        seventh, eighth = s.record(ALICE, 2)
        s.tail.push([seventh])
        await until(lambda: alice.seqs[-1] == 7)
        # the same event again (another read of the topic), an old one, and another account's
        s.tail.push([seventh])
        s.tail.push(s.log.since(ALICE.user, 4))  # seq 5..7: all sent already
        s.tail.push(s.record(BOB, 1))
        s.tail.push([eighth, eighth])
        await until(lambda: alice.seqs[-1] == 8)
        s.tail.push([])  # a quiet while
        s.tail.push(s.record(ALICE, 1))
        await until(lambda: alice.seqs[-1] == 9)
        assert alice.seqs == [3, 4, 5, 6, 7, 8, 9]
        assert all(d["event"] == "balance" for d in alice.data)
        assert s.streams.counts.snapshots == 0 and s.streams.counts.refills == 0
        assert s.streams.counts.frames == 7
        return s

    s = run_stream(scenario)
    assert s.tail.closed == 1 and s.tails_made == 1


def test_events_the_tail_delivers_before_the_start_is_sent_are_sent_once_after_it() -> None:
    async def scenario(s: Stream) -> None:
        s.record(ALICE, 3)
        s.tail.push(s.record(ALICE, 2))  # read before the replay from since=1 is sent
        alice = s.subscribe(ALICE, 1)
        await until(lambda: len(alice.frames) >= 4)
        await s.started(alice)
        s.tail.push(s.record(ALICE, 1))
        await until(lambda: alice.seqs[-1] == 6)
        assert alice.seqs == [2, 3, 4, 5, 6]

    run_stream(scenario)


def test_an_event_the_tail_delivers_while_the_start_reads_the_ledger_follows_the_snapshot(
) -> None:
    async def scenario(s: Stream) -> None:
        s.source.hold = asyncio.Event()
        alice = s.subscribe(ALICE, None)
        await until(lambda: len(s.source.events_reads) == 1)  # answered: the newest is 0
        s.tail.push(s.record(ALICE, 1))  # journaled after that answer, delivered meanwhile
        await until(lambda: alice.sub is not None and alice.sub.wanted == 1)
        assert alice.frames == []
        s.source.release()
        await until(lambda: len(alice.frames) == 2)
        await s.started(alice)
        assert alice.data == [{"event": "snapshot", "seq": 0, "state": "x"},
                              {"event": "balance", "seq": 1}]
        s.tail.push(s.record(ALICE, 1))
        await until(lambda: alice.seqs[-1] == 2)
        assert alice.seqs == [0, 1, 2]

    run_stream(scenario)


# -- a gap --------------------------------------------------------------------------------


def test_a_gap_in_the_tail_is_refilled_from_the_ledger_by_the_cursor() -> None:
    async def scenario(s: Stream) -> None:
        s.record(ALICE, 4)
        alice = await s.follow(ALICE, 4)
        assert alice.frames == []
        fifth, sixth = s.record(ALICE, 2)
        reads = len(s.source.events_reads)

        s.tail.push([sixth])  # the fifth not (yet) delivered
        await until(lambda: alice.seqs == [5, 6])
        assert s.source.events_reads[reads:] == [(ALICE.user, 4)]
        assert s.streams.counts.refills == 1

        s.tail.push([fifth])  # late: already sent by the refill
        s.tail.push([sixth])
        s.tail.push(s.record(ALICE, 1))
        await until(lambda: alice.seqs[-1] == 7)
        assert alice.seqs == [5, 6, 7]
        assert s.streams.counts.refills == 1

    run_stream(scenario)


def test_a_gap_wider_than_max_replay_is_refilled_with_a_snapshot() -> None:
    async def scenario(s: Stream) -> None:
        s.record(ALICE, 1)
        alice = await s.follow(ALICE, 1)
        events = s.record(ALICE, 3)  # seq 2..4
        s.tail.push(events[-1:])
        await until(lambda: len(alice.frames) == 1)
        assert alice.data == [{"event": "snapshot", "seq": 4, "state": "x"}]
        s.tail.push(events)  # all older than the snapshot
        s.tail.push(s.record(ALICE, 1))
        await until(lambda: alice.seqs[-1] == 5)
        assert alice.seqs == [4, 5]

    run_stream(scenario, max_replay=2)


# -- a restart of the tail ----------------------------------------------------------------


def test_a_tail_restart_makes_every_subscription_read_the_ledger_by_its_cursor() -> None:
    async def scenario(s: Stream) -> None:
        s.record(ALICE, 2)
        s.record(BOB, 1)
        alice, alice_too, bob = (s.subscribe(ALICE, 2), s.subscribe(ALICE, 1),
                                 s.subscribe(BOB, 1))
        for client in (alice, alice_too, bob):
            await s.started(client)
        assert alice.seqs == [] and alice_too.seqs == [2] and bob.seqs == []

        missed = s.record(ALICE, 2) + s.record(BOB, 3)  # never delivered by the tail
        s.tail.push(None)
        await until(lambda: alice.seqs[-1:] == [4] and alice_too.seqs[-1:] == [4]
                    and bob.seqs[-1:] == [4])
        assert alice.seqs == [3, 4] and alice_too.seqs == [2, 3, 4] and bob.seqs == [2, 3, 4]

        s.tail.push(missed)  # the restarted tail delivers them after all: no duplicate
        s.tail.push(s.record(BOB, 1))
        await until(lambda: bob.seqs[-1] == 5)
        assert alice.seqs == [3, 4] and alice_too.seqs == [2, 3, 4] and bob.seqs == [2, 3, 4, 5]
        assert s.streams.counts.snapshots == 0

    run_stream(scenario)


def test_an_event_the_tail_delivers_while_a_refill_reads_the_ledger_is_sent() -> None:
    async def scenario(s: Stream) -> None:
        s.record(ALICE, 1)
        alice = await s.follow(ALICE, 1)
        sub = alice.sub
        assert sub is not None
        s.source.hold = asyncio.Event()
        reads = len(s.source.events_reads)
        s.tail.push(None)  # a restart: the refill by the cursor is answered [] (nothing new)
        await until(lambda: len(s.source.events_reads) == reads + 1)
        s.tail.push(s.record(ALICE, 1))  # journaled after that answer, delivered meanwhile
        await until(lambda: sub.wanted == 2)
        s.source.release()
        await until(lambda: sub.refill is not None and sub.refill.done())
        assert alice.seqs == [2]

    run_stream(scenario)


# -- a snapshot first ---------------------------------------------------------------------


# -- what the tail does not bring ---------------------------------------------------------


def test_versions_count_what_was_seen_up_to_the_first_gap() -> None:
    seen = Versions()
    seen.saw(3)  # nothing is counted before the start is known
    assert seen.upto is None and not seen.has(3)
    seen.start_at(5)
    for version in (7, 6, 9, 5, 2):
        seen.saw(version)
    assert (seen.upto, seen.above) == (7, {9})
    assert seen.has(2) and seen.has(9) and not seen.has(8)
    seen.start_at(8)  # a check past what is kept: from the ledger's newest on
    assert (seen.upto, seen.above) == (9, set())
    seen.start_at(4)  # a ledger whose newest is below: its next events count again
    assert (seen.upto, seen.above) == (4, set()) and not seen.has(5)


class BrokenTail(ScriptedTail):
    """A tail whose every read fails after a short wait (the broker down)."""

    async def read(self) -> list[AccountEvent] | None:
        await asyncio.sleep(0.01)
        raise ConnectionError("broker down")


class StrayCancelTail(ScriptedTail):
    """A tail whose first read ends in a CancelledError that no one asked for (aiokafka's
    consumer stop raised one while the broker was away), then reads what is pushed."""

    def __init__(self) -> None:
        super().__init__()
        self.stray = 1

    async def read(self) -> list[AccountEvent] | None:
        if self.stray:
            self.stray -= 1
            raise asyncio.CancelledError
        return await super().read()


CHECK_S = 0.05


def test_a_read_that_ends_in_a_stray_cancellation_does_not_end_the_stream() -> None:
    async def scenario(s: Stream) -> None:
        s.record(ALICE, 1)
        alice = await s.follow(ALICE, 1)
        await until(lambda: s.streams.counts.poll_failures == 1)
        s.tail.push(s.record(ALICE, 1))
        await until(lambda: alice.seqs == [2])

    run_stream(scenario, tail=StrayCancelTail())



def test_an_accounts_last_event_the_tail_lost_is_sent_by_the_next_check() -> None:
    async def scenario(s: Stream) -> None:
        s.record(ALICE, 1)
        s.record(BOB, 1)
        alice, bob = await s.follow(ALICE, 1), await s.follow(BOB, 1)
        second, third = s.record(ALICE, 2)
        s.tail.push([second])  # the third is lost on the way, and ALICE does nothing more
        await until(lambda: alice.seqs == [2, 3])
        assert s.streams.counts.tail_missed == 1
        assert bob.frames == []

        s.tail.push([third])  # a late copy: not sent again
        s.tail.push(s.record(BOB, 1))
        await until(lambda: bob.seqs == [2])
        assert alice.seqs == [2, 3]

    run_stream(scenario, check_s=CHECK_S)


def test_events_the_tail_brought_are_not_counted_as_missed_nor_sent_twice() -> None:
    async def scenario(s: Stream) -> None:
        s.record(ALICE, 1)
        alice = await s.follow(ALICE, 1)
        checks = s.streams.counts.checks
        for _ in range(3):
            s.tail.push(s.record(ALICE, 2))
            await asyncio.sleep(CHECK_S)
        await until(lambda: s.streams.counts.checks >= checks + 3)
        assert alice.seqs == [2, 3, 4, 5, 6, 7]
        assert s.streams.counts.tail_missed == 0

    run_stream(scenario, check_s=CHECK_S)


def test_an_event_the_tail_brings_within_a_check_interval_is_not_taken_from_the_ledger(
        ) -> None:
    async def scenario(s: Stream) -> None:
        s.record(ALICE, 1)
        alice = await s.follow(ALICE, 1)
        events = s.record(ALICE, 2)
        checks = s.streams.counts.checks
        # a check runs while they are on their way through the topic, which brings them soon
        # after it (well within an interval)
        await until(lambda: s.streams.counts.checks > checks)
        assert alice.seqs == []
        s.tail.push(events)
        await until(lambda: alice.seqs == [2, 3])
        await until(lambda: s.streams.counts.checks > checks + 2)  # they have come due since
        assert s.streams.counts.tail_missed == 0

    run_stream(scenario, check_s=0.5)


def test_while_the_tail_cannot_read_events_still_reach_their_subscriptions() -> None:
    async def scenario(s: Stream) -> None:
        s.record(ALICE, 1)
        alice = await s.follow(ALICE, 1)
        s.record(ALICE, 3)
        await until(lambda: alice.seqs == [2, 3, 4])
        assert s.streams.counts.poll_failures > 0
        assert s.streams.counts.tail_missed == 3

    run_stream(scenario, check_s=CHECK_S, tail=BrokenTail())


def test_a_check_past_what_the_ledger_keeps_makes_every_subscription_read_by_its_cursor(
        ) -> None:
    async def scenario(s: Stream) -> None:
        s.record(ALICE, 1)
        alice = await s.follow(ALICE, 1)
        reads = len(s.source.events_reads)
        s.record(BOB, 5)  # ALICE's newest is no longer among the events after the check's
        s.record(ALICE, 1)
        await until(lambda: alice.seqs == [2])
        assert s.source.events_reads[reads:] == [(ALICE.user, 1)]  # by its cursor
        assert s.streams.counts.tail_missed == 0

    run_stream(scenario, check_s=CHECK_S, log=AccountLog(kept=3))


def first_frames(since: int | None, *, recorded: int = 5, kept: int = 100,
                 max_replay: int = 500) -> list[dict[str, Any]]:
    """The data of the frames a subscription with ``since`` is sent first, then with one live
    event."""

    async def scenario(s: Stream) -> list[dict[str, Any]]:
        s.record(ALICE, recorded)
        alice = await s.follow(ALICE, since)
        s.tail.push(s.record(ALICE, 1))
        await until(lambda: alice.seqs[-1:] == [recorded + 1])
        return alice.data

    return run_stream(scenario, log=AccountLog(kept=kept), max_replay=max_replay)


SNAPSHOT_5 = {"event": "snapshot", "seq": 5, "state": "x"}
LIVE_6 = {"event": "balance", "seq": 6}


def test_without_since_the_first_frame_is_a_snapshot_at_the_newest_seq() -> None:
    assert first_frames(None) == [SNAPSHOT_5, LIVE_6]
    assert first_frames(None, recorded=0) == [
        {"event": "snapshot", "seq": 0, "state": "x"}, {"event": "balance", "seq": 1}]


def test_a_since_beyond_the_newest_gets_a_snapshot() -> None:
    assert first_frames(6) == [SNAPSHOT_5, LIVE_6]
    assert first_frames(-1) == [SNAPSHOT_5, LIVE_6]


def test_a_since_no_longer_kept_gets_a_snapshot() -> None:
    assert first_frames(1, kept=3) == [SNAPSHOT_5, LIVE_6]  # seq 3..5 kept: 2 is missing
    assert first_frames(2, kept=3) == [{"event": "balance", "seq": q} for q in (3, 4, 5, 6)]
    assert first_frames(0, kept=3) == [SNAPSHOT_5, LIVE_6]


def test_more_missed_events_than_max_replay_get_a_snapshot() -> None:
    assert first_frames(2, max_replay=2) == [SNAPSHOT_5, LIVE_6]  # 3 missed
    assert first_frames(3, max_replay=2) == [{"event": "balance", "seq": q} for q in (4, 5, 6)]
    assert first_frames(4, max_replay=2) == [{"event": "balance", "seq": 5}, LIVE_6]
    assert first_frames(5, max_replay=2) == [LIVE_6]


# -- unsubscribing ------------------------------------------------------------------------


def test_an_unsubscribed_connection_gets_nothing_more_and_the_tail_closes_with_the_last() -> None:
    async def scenario(s: Stream) -> Stream:
        s.record(ALICE, 1)
        alice, alice_too = s.subscribe(ALICE, 1), s.subscribe(ALICE, 1)
        await s.started(alice)
        await s.started(alice_too)
        s.tail.push(s.record(ALICE, 1))
        await until(lambda: alice.seqs == [2] and alice_too.seqs == [2])

        assert alice_too.sub is not None
        s.streams.unsubscribe(alice_too.sub)
        assert alice_too.sub.active is False
        s.tail.push(s.record(ALICE, 1))
        _, fifth = s.record(ALICE, 2)
        s.tail.push([fifth])  # a gap: alice refills, alice_too must not
        await until(lambda: alice.seqs[-1] == 5)
        s.tail.push(s.record(ALICE, 1))
        s.tail.push(None)
        await until(lambda: alice.seqs[-1] == 6)
        assert alice.seqs == [2, 3, 4, 5, 6]
        assert alice_too.seqs == [2]
        assert s.streams.stats()["ws_account_subscriptions"] == 1
        assert s.tail.closed == 0

        assert alice.sub is not None
        s.streams.unsubscribe(alice.sub)
        assert s.streams.by_user == {}
        s.tail.push([])  # the tail's next (quiet) read: nobody follows it any more
        await until(lambda: s.tail.closed == 1)
        poller = s.streams._poller
        assert poller is not None
        await asyncio.wait_for(poller, 3)
        assert s.streams.tail is None and s.tails_made == 1 and alice_too.seqs == [2]

        # a new subscriber starts following afresh
        bob = await s.follow(BOB, 0)
        assert s.streams._poller is not poller
        s.tail.push(s.record(BOB, 1))
        await until(lambda: bob.seqs == [1])
        return s

    s = run_stream(scenario)
    assert s.tail.closed == 2 and s.tails_made == 2


# -- the ledger not answering -------------------------------------------------------------


def test_a_start_the_ledger_does_not_answer_is_an_error_frame_and_ends_the_subscription(
) -> None:
    async def scenario() -> None:
        s = Stream(source=DownSource(AccountLog()))
        alice = s.subscribe(ALICE, 3)
        await until(lambda: len(alice.frames) == 1)
        error = alice.frames[0]["error"]
        assert error["code"] == "SERVICE_UNAVAILABLE" and error["message"]
        assert "stream" not in alice.frames[0]
        assert alice.sub is not None and alice.sub.active is False
        assert s.streams.by_user == {}
        s.tail.push([])
        poller = s.streams._poller
        assert poller is not None
        await asyncio.wait_for(poller, 3)
        assert len(alice.frames) == 1

    run(scenario)


class FlakySource(LogSource):
    """A LogSource whose next ``failures`` AccountEvents reads fail (the ledger restarting),
    each once ``hold`` is released when it is set."""

    failures = 0

    async def account_events(self, user: int, since: int | None
                             ) -> tuple[int, list[AccountEvent] | None]:
        if not self.failures:
            return await super().account_events(user, since)
        self.failures -= 1
        self.events_reads.append((user, since))
        if self.hold is not None:
            await self.hold.wait()
        raise ConnectionError("ledger restarting")


def test_a_refill_the_ledger_does_not_answer_is_tried_again_until_it_is_sent() -> None:
    """The tail brought an event while a refill read the ledger, which failed: the event was
    seen, so no check hands it on again. Before, the subscription waited for its account's
    next event to try again, which may never come: the client missed the event for good."""
    async def scenario(s: Stream) -> None:
        s.record(ALICE, 1)
        alice = await s.follow(ALICE, 1)
        sub = alice.sub
        assert sub is not None and isinstance(s.source, FlakySource)
        s.source.failures, s.source.hold = 1, asyncio.Event()
        reads = len(s.source.events_reads)
        s.tail.push(None)  # a restart: every subscription reads the ledger by its cursor
        await until(lambda: len(s.source.events_reads) == reads + 1)
        s.tail.push(s.record(ALICE, 1))  # delivered while that read is under way
        await until(lambda: sub.wanted == 2)
        s.source.release()
        await until(lambda: alice.seqs == [2])

    log = AccountLog()
    run_stream(scenario, log=log, source=FlakySource(log))


@pytest.mark.parametrize("since", [None, 0, 4])
def test_a_start_without_the_trading_service_is_an_error_frame(since: int | None) -> None:
    async def scenario() -> None:
        streams = AccountStreams(lambda: None, render, snapshot)
        client = Client()
        sub = streams.subscribe(ALICE, since, client.offer)
        await until(lambda: len(client.frames) == 1)
        assert client.frames[0]["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert sub.active is False and streams.by_user == {}
        poller = streams._poller
        assert poller is not None
        await asyncio.wait_for(poller, 3)  # nobody subscribed: it never waits for a source

    run(scenario)


def test_an_event_that_cannot_be_rendered_ends_that_subscription_only() -> None:
    """A render that fails (a bug: once, an order whose time the API could not write back)
    ends that client's subscription with an error frame; the reading goes on for the others
    (it used to die with the exception, and every account stream of the replica with it)."""
    def fragile(event: AccountEvent) -> dict[str, Any]:
        if event.user == ALICE.user and event.seq == 2:
            raise OverflowError("date value out of range")
        return render(event)

    async def scenario(s: Stream) -> None:
        alice = await s.follow(ALICE, 0)
        bob = await s.follow(BOB, 0)
        s.tail.push(s.record(ALICE, 2) + s.record(BOB))
        await until(lambda: len(alice.frames) == 2 and len(bob.frames) == 1)
        assert alice.frames[0]["data"]["seq"] == 1
        assert alice.frames[1]["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert ALICE.user not in s.streams.by_user
        s.tail.push(s.record(BOB))
        await until(lambda: bob.seqs == [1, 2])

    run_stream(scenario, render=fragile)


# -- what the topic may carry besides the ledger's events ---------------------------------


def test_versions_remember_at_most_max_ahead_past_the_newest_seen_without_a_gap() -> None:
    """A hostile writer's made-up versions, far ahead or many, do not pile up (nor count as
    seen, so the ledger's own event of that version is handed on by a check)."""
    seen = Versions()
    seen.start_at(10)
    for version in range(1 << 40, (1 << 40) + 50_000):
        seen.saw(version)
    seen.saw((1 << 63) - 1)
    assert (seen.upto, seen.above) == (10, set())
    for version in range(12, 12 + 3 * MAX_AHEAD):  # 11 missing: a gap the next check fills
        seen.saw(version)
    assert len(seen.above) == MAX_AHEAD - 1 and seen.has(10 + MAX_AHEAD)
    assert not seen.has(11 + MAX_AHEAD)
    seen.saw(11)
    assert (seen.upto, seen.above) == (10 + MAX_AHEAD, set())
    seen.saw(1 << 40)
    seen.start_at(5)
    assert seen.above == set()


def test_forged_far_future_events_on_the_topic_keep_no_genuine_event_from_a_subscription(
        ) -> None:
    async def scenario(s: Stream) -> None:
        s.record(ALICE, 1)
        alice = await s.follow(ALICE, 1)
        forged = [AccountEvent(user, 10**12 + n, 10**15 + n, BALANCE, Balance(666, 0))
                  for user in (ALICE.user, 99) for n in range(2_000)]
        s.tail.push(forged)
        sub = alice.sub
        assert sub is not None
        await until(lambda: s.streams.counts.refills == 1 and sub.refill.done())
        s.record(ALICE, 1)  # the tail loses the genuine event: the check sends it
        await until(lambda: alice.seqs == [2])
        assert s.streams.counts.tail_missed == 1
        refills = s.streams.counts.refills
        for seq in (3, 4, 5):  # the forged seq does not make each later event a ledger read
            s.tail.push(s.record(ALICE, 1))
            await until(lambda seq=seq: alice.seqs[-1] == seq)
        assert alice.seqs == [2, 3, 4, 5]
        assert s.streams.counts.refills == refills

    run_stream(scenario, check_s=CHECK_S)
