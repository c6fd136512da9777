"""Concurrent trading requests through the service, interleaved at random (Hypothesis rules).

Three users on SOL (two splits) and BTC send, through either of two API replicas: opens (with
and without a clientOrderId, retried, also while the first is under way, and through the
other replica), whole and partial closes, TP/SL changes, margin added and removed, orders
placed and cancelled, some with the price they saw (PRICE_MOVED). The feed's ticks fill and
expire orders and close positions by TP/SL and liquidation, or stop for a while (stale
prices). Clients go away mid-request (their task cancelled); a call to the ledger or a shard
is lost on its way, or its reply is, or it is held up until other calls have overtaken it;
a replica's process dies and another takes its place.

The ledger and the shards run on the event loop's thread behind ports that answer a drawn
number of loop turns after a call (:class:`Actor`), on a loop whose clock jumps to its next
timer (:class:`VirtualTimeLoop`): every await of the service is a point where other requests
step in, resends, polls, backoffs and sweeps come due without waiting, and a run is
reproducible from its steps.

After every step the machines' own invariants hold (the ledger sums to zero, no balance is
negative). Once the requests have ended and the reconcilers have nothing left (and, after a
replica died, the sweeps have run): the audit finds no difference, each user's margin is the
margins of their open positions and orders (no margin without its position or order, none of
those without its margin) and they hold that many slots. At the end no lock or clientOrderId
is left pending after the sweeps, every answer a clientOrderId got is its first one, also
when asked again, and no request left a failure unread.
"""

from __future__ import annotations

import asyncio
import gc
import random
import selectors
from collections.abc import Callable
from collections.abc import Coroutine
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import pytest
from cluster.actors.local import LocalHosts
from cluster.actors.port import Port
from cluster.actors.port import Unavailable
from cluster.config import Settings
from cluster.durability.runner import Runner
from cluster.trading.courier import Courier
from cluster.trading.reconciler import ORPHAN_ROUNDS
from cluster.trading.reconciler import TRANSIENT_CODES
from cluster.trading.service import TradingService
from engine.ledger_machine import AbandonLock
from engine.ledger_machine import ApplySettlements
from engine.ledger_machine import Balances
from engine.ledger_machine import Begin
from engine.ledger_machine import ExpectRelease
from engine.ledger_machine import Forget
from engine.ledger_machine import LockMargin
from engine.ledger_machine import Note
from engine.ledger_machine import OpenCount
from engine.ledger_machine import OpenLocks
from engine.ledger_machine import OrderCount
from engine.ledger_machine import PendingRequests
from engine.ledger_machine import ReleaseMargin
from engine.ledger_machine import Remember
from engine.ledger_machine import reused_message
from engine.market import Tick
from engine.messages import CloseOrder
from engine.messages import OpenOrder
from engine.messages import PlaceOrder
from engine.messages import Principal
from engine.order_book import OrderKind
from engine.orders import Side
from engine.results import Rejected
from engine.shard_machine import ApplyTick
from engine.shard_machine import Cancel
from engine.shard_machine import ChangeMargin
from engine.shard_machine import Close
from engine.shard_machine import Open
from engine.shard_machine import OrdersOf
from engine.shard_machine import Outbox
from engine.shard_machine import Place
from engine.shard_machine import PositionsOf
from engine.shard_machine import Resolve
from engine.shard_machine import SetLevels
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine
from hypothesis.stateful import initialize
from hypothesis.stateful import invariant
from hypothesis.stateful import precondition
from hypothesis.stateful import rule
from tests.unit.cluster.faulty_ports import carries
from tests.unit.cluster.local_platform import USD
from tests.unit.cluster.local_platform import Clock
from tests.unit.cluster.local_platform import signup

# a replica made to die here cancels its changes that waited for their turn, whose coroutines
# then never start (a process that is killed leaves no such warning)
pytestmark = pytest.mark.filterwarnings(
    "ignore:coroutine 'TradingService.* was never awaited:RuntimeWarning")

USERS = 3
REPLICAS = 2
BASE_TICKS = {"SOL": 10_000, "BTC": 600_000}  # 100.00 and 60000.0
TICK_STEP_US = 2_000_000  # the clock moves this much per tick: an asset left alone goes stale
LEDGER_FAULTS = (LockMargin, ReleaseMargin, ExpectRelease, AbandonLock, Note, Begin, Remember,
                 Forget, ApplySettlements)
SHARD_FAULTS = (Open, Close, Place, Cancel, SetLevels, ChangeMargin, Resolve, Outbox,
                PositionsOf, ApplyTick)

users = st.integers(0, USERS - 1)
assets = st.sampled_from(sorted(BASE_TICKS))
sides = st.sampled_from([Side.LONG, Side.SHORT])
margins = st.sampled_from([20, 100, 400, 2_500, 6_000])
leverages = st.sampled_from([2, 10, 50, 100])
# TP/SL distances from the price in bps (a negative TP, or an SL of 30%, is on the wrong side)
tp_bps = st.sampled_from([None, None, 100, 400, -100])
sl_bps = st.sampled_from([None, None, 50, 400, 3_000])
client_ids = st.sampled_from([None, None, "a", "b"])
# the price the client saw, in bps from the price (None: not given), within 20 bps or refused
seen_bps = st.sampled_from([None, None, None, 0, 60])
SLIPPAGE_BPS = 20
turns = st.integers(0, 6)  # loop turns the new request gets before the next step
picks = st.integers(0, 1_000)
replicas = st.integers(0, REPLICAS - 1)


class Instant(selectors.BaseSelector):
    """A selector that never sleeps: where the event loop would wait for its next timer, its
    clock (``now_s``) moves on to it. There is no I/O to wait for (the machines answer on the
    loop's thread), so resends, polls, backoffs and sweeps come due in an order fixed by the
    run's steps, not by how fast the machine runs them."""

    def __init__(self) -> None:
        self.inner = selectors.DefaultSelector()  # the loop's own wake-up socket
        self.now_s = 0.0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.unregister(fileobj)

    def get_map(self) -> Any:
        return self.inner.get_map()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise RuntimeError("every task waits for something that never comes")
        self.now_s += timeout
        return self.inner.select(0)

    def close(self) -> None:
        self.inner.close()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on :class:`Instant`'s clock."""

    def __init__(self) -> None:
        self.instant = Instant()
        super().__init__(self.instant)

    def time(self) -> float:
        return self.instant.now_s


def keyed(client_id: str | None, *terms: Any) -> tuple[Any, ...] | None:
    """A request's clientOrderId with its terms (None without one)."""
    return None if client_id is None else terms


async def loop_turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


LOST, REPLY_LOST, HELD, REPLY_HELD = "request lost", "reply lost", "request held", "reply held"
FAULTS = (LOST, REPLY_LOST, HELD, REPLY_HELD)


class Actor(Port):
    """``runner`` on the event loop's thread, as an actor: one batch at a time in the order
    it arrives, run a drawn number of loop turns after it arrived and answered as many turns
    after it ran. ``fail(kind, how)``: the next batch carrying a ``kind`` command is lost on
    its way, or its reply is; or it is held on its way, or its reply is, until
    ``release()`` (a caller whose process stalled: other calls overtake it); ``times``: the
    next so many such batches."""

    def __init__(self, name: str, runner: Runner[Any], draws: random.Random) -> None:
        super().__init__(name)
        self.runner, self.draws = runner, draws
        self.faults: list[tuple[type, str]] = []  # one entry per batch it befalls
        self.released = asyncio.Event()
        self._one_at_a_time = asyncio.Lock()

    def fail(self, kind: type, how: str, times: int = 1) -> None:
        if how in (HELD, REPLY_HELD) and self.released.is_set():
            self.released = asyncio.Event()
        self.faults.extend([(kind, how)] * times)

    def release(self) -> None:
        self.released.set()

    async def execute(self, commands: list[Any]) -> list[Any]:
        fault = next((f for f in self.faults if carries(commands, f[0])), None)
        how = None
        if fault is not None:
            self.faults.remove(fault)
            how = fault[1]
        if how == HELD:
            await self.released.wait()
        async with self._one_at_a_time:
            await loop_turns(self.draws.randint(0, 3))
            if how == LOST:
                raise Unavailable(self.name, "test: request lost")
            answers = self.runner.execute(commands)
        if how == REPLY_LOST:
            raise Unavailable(self.name, "test: reply lost")
        if how == REPLY_HELD:
            await self.released.wait()
        await loop_turns(self.draws.randint(0, 3))
        return answers

    async def ping(self) -> bool:
        return True

    def read(self, command: Any) -> Any:
        """``command``'s answer now, between steps (no batch runs meanwhile)."""
        [answer] = self.runner.execute([command])
        return answer


@dataclass
class Request:
    """A client's request: ``again(replica)`` sends it again (a retry, through either API
    replica); ``key``: its clientOrderId with its terms, None without one."""

    what: str
    task: asyncio.Task[Any]
    again: Callable[[TradingService], Coroutine[Any, Any, Any]]
    key: tuple[Any, ...] | None
    seen: bool = False


@dataclass
class Answers:
    """The answers the clients got, by clientOrderId and terms."""

    got: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    def add(self, key: tuple[Any, ...], answer: Any) -> None:
        if isinstance(answer, Rejected) and (answer.code in TRANSIENT_CODES
                                            or answer.message == reused_message(key[2])):
            return  # not kept as the id's answer: a retry runs (or is refused) again
        first = self.got.setdefault(key, answer)
        assert answer == first, f"{key}: first answered {first}, then {answer}"


class Interleavings(RuleBasedStateMachine):
    """The platform, its clients and the feed, one Hypothesis rule a step."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = VirtualTimeLoop()
        # what asyncio reports: e.g. a task that failed and was collected with nobody
        # having read its outcome
        self.unread: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.unread.append(context))
        self.requests: list[Request] = []
        self.feed: list[asyncio.Task[Any]] = []
        self.answers = Answers()
        self.prices = dict(BASE_TICKS)
        self.seq = 0
        self.deaths = 0  # replicas that died since the last sweeps
        self.hosts: LocalHosts | None = None

    def run(self, work: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(work)

    # ----------------------------------------------------------------- the platform
    @initialize(seed=st.integers(0, 2**32 - 1))
    def start(self, seed: int) -> None:
        draws = random.Random(seed)  # the ports' delays: a run is a function of its draws
        self.clock = Clock()
        self.settings = Settings(shards={"SOL": 2})
        self.hosts = LocalHosts(self.settings, clock_us=self.clock)
        self.ledger = Actor(self.hosts.ledger.name, self.hosts.ledger.runner, draws)
        self.shards = {n: Actor(n, p.runner, draws) for n, p in self.hosts.shards.items()}
        self.ports: dict[str, Actor] = {"ledger": self.ledger, **self.shards}
        # two API replicas over the same ledger and shards, each with its own reconciler
        self.replicas = [self.replica() for _ in range(REPLICAS)]
        self.courier = Courier(self.ledger, dict(self.shards))  # the feed actor's own
        self.users: list[Principal] = [self.run(signup(self.replicas[0]))
                                       for _ in range(USERS)]
        for asset in BASE_TICKS:
            self.run(self.push(asset))

    def replica(self) -> TradingService:
        return TradingService(self.ledger, dict(self.shards), self.settings)

    def splits(self, asset: str) -> list[str]:
        return [s.name for s in self.replicas[0].layout.of_asset(asset)]

    async def push(self, asset: str) -> None:
        """A tick at the price held for ``asset`` to each of its splits, then their
        settlements to the ledger: what the feed actor does."""
        self.clock.now_us += TICK_STEP_US
        self.seq += 1
        mid = self.prices[asset]
        tick = Tick(asset, mid, mid + 1, self.clock.now_us, self.seq, "test")
        for name in self.splits(asset):
            await self.shards[name].call(ApplyTick(tick))
            await self.courier.deliver(name)

    def price_of(self, asset: str, bps: int) -> int:
        return max(1, self.prices[asset] * (10_000 + bps) // 10_000)

    def seen(self, asset: str, bps: int | None) -> int | None:
        return None if bps is None else self.price_of(asset, bps)

    def levels(self, asset: str, side: Side, tp: int | None, sl: int | None
               ) -> tuple[int | None, int | None]:
        """TP/SL prices ``tp``/``sl`` bps from the price on their side (None: none)."""
        sign = 1 if side == Side.LONG else -1
        return (None if tp is None else self.price_of(asset, sign * tp),
                None if sl is None else self.price_of(asset, -sign * sl))

    def open_items(self, read: type[PositionsOf | OrdersOf], user: int) -> list[Any]:
        """``user``'s open positions (or orders) over every shard, as the shards hold them."""
        return [item for port in self.shards.values()
                for item in port.read(read((self.users[user].user,)))[0]]

    def any_open(self, read: type[PositionsOf | OrdersOf]) -> bool:
        """Whether anyone has an open position (or order): the rules acting on one run only
        then, so their steps are not spent on nothing while the first opens are under way."""
        return any(self.open_items(read, u) for u in range(USERS))

    def pick(self, read: type[PositionsOf | OrdersOf], user: int, which: int
             ) -> tuple[int, Any] | None:
        """``(user, one of their open positions or orders)``; now and then someone else's
        (NOT_FOUND); when ``user`` has none, another user who has and one of theirs."""
        owners = [u for u in range(USERS) if self.open_items(read, u)]
        if not owners:
            return None
        owner = user if user in owners else owners[which % len(owners)]
        if which % 7 == 0:
            owner = owners[(owners.index(owner) + 1) % len(owners)]
        items = self.open_items(read, owner)
        return (user if owner == user or which % 7 == 0 else owner), items[which % len(items)]

    # ----------------------------------------------------------------- requests
    def send(self, what: str, make: Callable[[TradingService], Coroutine[Any, Any, Any]],
             key: tuple[Any, ...] | None, replica: int, n: int) -> None:
        task = self.loop.create_task(make(self.replicas[replica]))
        self.requests.append(Request(what, task, make, key))
        self.run(loop_turns(n))

    @rule(user=users, asset=assets, side=sides, margin=margins, leverage=leverages, tp=tp_bps,
          sl=sl_bps, seen=seen_bps, client_id=client_ids, replica=replicas, n=turns)
    def open_position(self, user: int, asset: str, side: Side, margin: int, leverage: int,
                      tp: int | None, sl: int | None, seen: int | None, client_id: str | None,
                      replica: int, n: int) -> None:
        tp_ticks, sl_ticks = self.levels(asset, side, tp, sl)
        order = OpenOrder(asset, side, margin * USD, leverage, tp_ticks, sl_ticks,
                          self.seen(asset, seen), SLIPPAGE_BPS, client_id)
        who = self.users[user]
        self.send("open", lambda svc: svc.open_position(who, order),
                  keyed(client_id, user, "open", client_id, order), replica, n)

    @rule(user=users, asset=assets, side=sides, kind=st.sampled_from(OrderKind),
          trigger=st.sampled_from([-300, -50, 0, 50, 300]), margin=margins, leverage=leverages,
          tp=tp_bps, sl=sl_bps, expires=st.sampled_from([0, 0, 1, 4]), client_id=client_ids,
          replica=replicas, n=turns)
    def place_order(self, user: int, asset: str, side: Side, kind: OrderKind, trigger: int,
                    margin: int, leverage: int, tp: int | None, sl: int | None, expires: int,
                    client_id: str | None, replica: int, n: int) -> None:
        tp_ticks, sl_ticks = self.levels(asset, side, tp, sl)
        expires_us = expires and self.clock.now_us + expires * TICK_STEP_US
        order = PlaceOrder(asset, side, kind, self.price_of(asset, trigger), margin * USD,
                           leverage, tp_ticks or 0, sl_ticks or 0, expires_us, client_id)
        who = self.users[user]
        self.send("order", lambda svc: svc.place_order(who, order),
                  keyed(client_id, user, "order", client_id, order), replica, n)

    @precondition(lambda self: self.any_open(PositionsOf))
    @rule(user=users, which=picks, part=st.sampled_from([0, 0, 1, 2, 3]), seen=seen_bps,
          client_id=client_ids, replica=replicas, n=turns)
    def close_position(self, user: int, which: int, part: int, seen: int | None,
                       client_id: str | None, replica: int, n: int) -> None:
        """A whole close, or a quarter, half or three quarters of the position."""
        picked = self.pick(PositionsOf, user, which)
        assert picked is not None  # the rule's precondition
        user, pos = picked
        order = CloseOrder(pos.position_id, self.seen(pos.asset, seen), SLIPPAGE_BPS,
                           client_id, pos.qty_steps * part // 4)
        who = self.users[user]
        self.send("close", lambda svc: svc.close_position(who, order),
                  keyed(client_id, user, "close", client_id, order), replica, n)

    @precondition(lambda self: self.any_open(PositionsOf))
    @rule(user=users, which=picks, tp=st.sampled_from([None, 0, 100, 400, -100]),
          sl=st.sampled_from([None, 0, 50, 400, 3_000]), client_id=client_ids,
          replica=replicas, n=turns)
    def set_levels(self, user: int, which: int, tp: int | None, sl: int | None,
                   client_id: str | None, replica: int, n: int) -> None:
        """TP/SL set (bps from the price), removed (0) or kept (None)."""
        picked = self.pick(PositionsOf, user, which)
        assert picked is not None  # the rule's precondition
        user, pos = picked
        tp_ticks, sl_ticks = self.levels(pos.asset, Side(pos.side), tp or None, sl or None)
        tp_ticks, sl_ticks = (0 if tp == 0 else tp_ticks), (0 if sl == 0 else sl_ticks)
        who, pid = self.users[user], pos.position_id
        self.send("modify", lambda svc: svc.set_levels(who, pid, tp_ticks, sl_ticks, client_id),
                  keyed(client_id, user, "modify", client_id, pid, tp_ticks, sl_ticks), replica, n)

    @precondition(lambda self: self.any_open(PositionsOf))
    @rule(user=users, which=picks, percent=st.sampled_from([10, 100, 5_000, -2, -10, -50, -99]),
          client_id=client_ids, replica=replicas, n=turns)
    def change_margin(self, user: int, which: int, percent: int, client_id: str | None,
                      replica: int, n: int) -> None:
        """Margin added or removed, in percent of the position's (so removals are taken too,
        not only refused past the maximum leverage; 5,000% is more than the free balance)."""
        picked = self.pick(PositionsOf, user, which)
        assert picked is not None  # the rule's precondition
        user, pos = picked
        who, pid = self.users[user], pos.position_id
        delta = pos.margin_micros * percent // 100
        self.send("margin", lambda svc: svc.change_margin(who, pid, delta, client_id),
                  keyed(client_id, user, "margin", client_id, pid, delta), replica, n)

    @precondition(lambda self: self.any_open(OrdersOf))
    @rule(user=users, which=picks, client_id=client_ids, replica=replicas, n=turns)
    def cancel_order(self, user: int, which: int, client_id: str | None, replica: int,
                     n: int) -> None:
        picked = self.pick(OrdersOf, user, which)
        assert picked is not None  # the rule's precondition
        user, order = picked
        who, oid = self.users[user], order.order_id
        self.send("cancel", lambda svc: svc.cancel_order(who, oid, client_id),
                  keyed(client_id, user, "cancel", client_id, oid), replica, n)

    @precondition(lambda self: any(r.key for r in self.requests))
    @rule(which=picks, replica=replicas, n=turns)
    def retry(self, which: int, replica: int, n: int) -> None:
        """A request with a clientOrderId sent again (maybe while the first is under way)."""
        named = [r for r in self.requests if r.key]
        request = named[which % len(named)]
        self.send(request.what, request.again, request.key, replica, n)

    @precondition(lambda self: self.requests)
    @rule(which=picks, n=turns)
    def disconnect(self, which: int, n: int) -> None:
        """A client goes away: its handler task is cancelled wherever it is."""
        live = [r for r in self.requests if not r.task.done()]
        if live:
            live[which % len(live)].task.cancel()
        self.run(loop_turns(n))

    @rule(replica=replicas)
    def replica_dies(self, replica: int) -> None:
        """An API replica's process dies: its work ends where it is (its calls already on their
        way still arrive), its clients with it; another takes its place."""
        dying = self.replicas[replica]
        for task in list(dying._tasks):  # no public way to die: what a killed process does
            task.cancel()
        self.run(dying.aclose())
        self.replicas[replica] = self.replica()
        self.deaths += 1

    # ----------------------------------------------------------------- the world
    @rule(asset=assets, move=st.sampled_from([-800, -300, -100, -20, 0, 20, 100, 300, 800]),
          n=turns)
    def tick(self, asset: str, move: int, n: int) -> None:
        base = BASE_TICKS[asset]
        self.prices[asset] = min(2 * base, max(base // 2, self.price_of(asset, move)))
        self.feed.append(self.loop.create_task(self.push(asset)))
        self.run(loop_turns(n))

    @rule(port=st.sampled_from(["ledger", "shard"]), pick=picks, how=st.sampled_from(FAULTS),
          times=st.sampled_from([1, 1, 3]))
    def fail_next(self, port: str, pick: int, how: str, times: int) -> None:
        """The next call (or three: every resend of a request) of a kind to the ledger or a
        shard is lost, or its reply is; or held up."""
        if port == "ledger":
            self.ledger.fail(LEDGER_FAULTS[pick % len(LEDGER_FAULTS)], how, times)
        else:
            names = sorted(self.shards)
            self.shards[names[pick % len(names)]].fail(
                SHARD_FAULTS[pick // 7 % len(SHARD_FAULTS)], how, times)

    @rule()
    def release(self) -> None:
        """What was held up goes on."""
        for port in self.ports.values():
            port.release()

    @rule(n=st.integers(1, 30), pause=st.sampled_from([0.0, 0.0, 0.05, 0.25, 6.0]),
          quiet_s=st.sampled_from([0, 0, 0, 20]))
    def wait(self, n: int, pause: float, quiet_s: int) -> None:
        """Time passes: resends, the polls of a retry (and its wait for a first request that
        does not end), the reconcilers' rounds and the replicas' sweeps come due; with
        ``quiet_s``, the feed has been quiet that long (stale prices until the next ticks)."""
        self.clock.now_us += quiet_s * 1_000_000
        self.run(loop_turns(n))
        if pause:
            self.run(asyncio.sleep(pause))

    @rule()
    def settle(self) -> None:
        self.run(self.settled())

    # ----------------------------------------------------------------- checks
    @invariant()
    def machines_hold(self) -> None:
        """The states' own invariants (sum zero, no negative balance, indexes), and every
        answer a client got so far."""
        if self.hosts is None:
            return
        for port in self.ports.values():
            assert port.runner.machine.check() == [], port.name
        self.harvest()

    def harvest(self) -> None:
        for request in self.requests:
            if request.seen or not request.task.done():
                continue
            request.seen = True
            if request.task.cancelled():
                continue
            error = request.task.exception()
            if isinstance(error, Unavailable):  # the outcome is unknown: an allowed answer
                continue
            if error is not None:
                raise error
            if request.key is not None:
                self.answers.add(request.key, request.task.result())
        for task in self.feed:
            error = None if not task.done() or task.cancelled() else task.exception()
            if error is not None and not isinstance(error, Unavailable):
                raise error

    async def settled(self) -> None:
        """Every request to its end (nothing lost or held any more), the reconcilers' queues
        emptied, the outboxes delivered; then the books and the ledger must agree."""
        for port in self.ports.values():
            port.faults.clear()
            port.release()
        await asyncio.gather(*(r.task for r in self.requests), *self.feed,
                             return_exceptions=True)
        for svc in self.replicas:
            await svc.aclose()  # the shielded work of clients that went away, too
        for svc in self.replicas:
            for _ in range(10):
                if not await svc.reconciler.run_once():
                    break
            assert svc.reconciler.outstanding == 0
        for name in self.shards:
            await self.courier.deliver(name)
        if self.deaths:  # what only the sweeps settle: the requests of a process that died
            await self.sweeps()
            self.deaths = 0
        self.harvest()
        problems, totals = await self.replicas[0].audit(attempts=1)
        assert problems == [] and totals["sum_micros"] == 0, problems
        for user, who in enumerate(self.users):
            positions = self.open_items(PositionsOf, user)
            orders = self.open_items(OrdersOf, user)
            free, margin = self.ledger.read(Balances(who.user))
            assert free >= 0
            assert margin == sum(p.margin_micros for p in positions) + \
                sum(o.margin_micros for o in orders)
            assert self.ledger.read(OpenCount(who.user)) == len(positions) + len(orders)
            assert self.ledger.read(OrderCount(who.user)) == len(orders)

    async def sweeps(self) -> None:
        """The sweeps of stale reservations and orphaned locks, as if their time had come."""
        reconciler = self.replicas[0].reconciler
        await reconciler.settle_pending(older_than_s=0)
        for _ in range(ORPHAN_ROUNDS):
            await reconciler.end_orphaned_locks()

    async def swept(self) -> None:
        """What only a dead process leaves to the sweeps (a lost reservation) is all that
        remains: after them no lock or clientOrderId is pending."""
        await self.sweeps()
        assert self.ledger.read(OpenLocks()) == []
        assert self.ledger.read(PendingRequests()) == []
        problems, _ = await self.replicas[0].audit(attempts=1)
        assert problems == []

    async def asked_again(self) -> None:
        """Each request with a clientOrderId a client got an answer to, sent once more: the
        first answer again, and nothing changes."""
        before = [self.ledger.read(Balances(w.user)) for w in self.users]
        again = list({r.key: r for r in self.requests if r.key in self.answers.got}.values())
        answers = await asyncio.gather(*(r.again(self.replicas[0]) for r in again))
        for request, answer in zip(again, answers, strict=True):
            assert request.key is not None
            self.answers.add(request.key, answer)
        assert [self.ledger.read(Balances(w.user)) for w in self.users] == before

    def teardown(self) -> None:
        try:
            if self.hosts is not None:
                self.run(self.settled())
                self.run(self.swept())
                self.run(self.asked_again())
                self.run(self.settled())
                self.requests.clear()  # a cancelled one's traceback holds its work's task
                self.feed.clear()
                gc.collect()  # a task is reported when it is collected with its outcome unread
                self.run(asyncio.sleep(0))
                assert self.unread == [], [(c["message"], c.get("exception")) for c in self.unread]
        finally:
            try:
                if self.hosts is not None:
                    for svc in self.replicas:
                        self.run(svc.aclose())
                    self.hosts.close()
            finally:
                self.loop.close()


Interleavings.TestCase.settings = settings(
    max_examples=50, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_service_interleavings = Interleavings.TestCase
