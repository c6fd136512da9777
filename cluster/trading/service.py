"""TradingService: the API's orchestration of the ledger and the shards, over ports.

Money is never lost or created on the open path: the margin is locked in the ledger first, the
shard opens (or refuses) at its own price, and a refusal releases the lock. The sequence runs as
its own task, shielded from the client: a client that disconnects (Ray Serve cancels its
handler) does not cut it between the lock and the open. Any failure after a lock hands the
request to the reconciler (cluster.trading.reconciler), which settles it by asking the state
machines: a lock whose open never went out is released by its request id, once; a request whose
shard did not answer is resolved (and fenced) on that shard.

Closes settle through the courier (cluster.trading.courier), the one path from a shard's
outbox to the ledger, before the close is answered.

A pending order is placed by the same sequence as an open (its margin locked first, the shard
places it or refuses and the lock is released) and cancelled by the same one as a close (the
shard ends it, the courier releases its margin at the ledger before the answer). Changing an
open position follows them too: margin added is locked first like an open's; TP/SL changes and
margin removals go to the shard first like a close, a removal's margin then released at the
ledger under the request's id (a resend releases nothing twice). Changes of one position, its
closes among them, run one at a time in a replica, each to its account event: the events are
numbered in the order the shard applied the changes, so the last one shows the position as
the shard holds it.

Every call is one command of a state machine (engine.ledger_machine, engine.shard_machine),
sent through a port that batches concurrent calls into one actor round trip. Everything here is
integers; the API layer converts to decimal strings.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import enum
import functools
import hashlib
import itertools
import json
import logging
import secrets
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any, NamedTuple, TypeVar, cast

from cluster.actors.port import Port, Unavailable
from cluster.config import Settings
from cluster.live.account_views import AccountState, AccountViews
from cluster.live.market import MarketSource
from cluster.live.topic_auth import SignedTopic
from cluster.trading.batcher import MicroBatcher
from cluster.trading.courier import Courier
from cluster.trading.placement import Layout
from cluster.trading.reconciler import (
    TRANSIENT_CODES,
    InDoubt,
    Reconciler,
    remember_or_forget,
)
from engine.account_events import NOTED_OF_REQUEST, AccountEvent
from engine.assets import Asset, AssetRegistry
from engine.candles import Candle, CandleQuery
from engine.ledger import AuditDifference
from engine.ledger_machine import (
    AccountEvents,
    AccountTail,
    Authenticate,
    Balances,
    Begin,
    CreateAccount,
    ExpectRelease,
    Forget,
    History,
    LockMargin,
    Note,
    OrderHistory,
    ReleaseMargin,
    Remember,
    Totals,
    hash_api_key,
    reused_message,
)
from engine.market import Tick
from engine.messages import (
    ClosedPosition,
    CloseOrder,
    EndedOrder,
    IdemHit,
    IdemKey,
    MarginLock,
    NewAccount,
    OpenOrder,
    OpenPosition,
    PendingOrder,
    PlaceOrder,
    Principal,
    SettlementItem,
    ShardClose,
    ShardOpen,
    ShardStats,
)
from engine.order_book import OrderKind, OrderTerms, placement_refusal
from engine.orders import NO_LEVEL, Side
from engine.results import Code, Forgotten, Rejected
from engine.shard_machine import (
    COUNTER_BITS,
    Cancel,
    ChangeMargin,
    Close,
    LastTick,
    Open,
    OrdersOf,
    Place,
    PositionsOf,
    SetLevels,
    Stats,
)

log = logging.getLogger(__name__)


class RequestIds:
    """A service's request ids: a random prefix (30 bits: replicas' ids never collide) above
    COUNTER_BITS, and a counter that counts up from ``first`` (a shard judges a request whose
    answer it forgot by the two: engine.shard_machine); a new prefix when it is used up."""

    def __init__(self, first: int = 1) -> None:
        self._next = self._end = 0
        self._first = first

    def __call__(self) -> int:
        if self._next == self._end:
            prefix = secrets.randbits(30)
            self._next = prefix << COUNTER_BITS | self._first
            self._end = (prefix + 1) << COUNTER_BITS
            self._first = 1
        request_id = self._next
        self._next += 1
        return request_id


OPEN_RESENDS = 2  # resends of a request (same request id) before it is declared in doubt
RESEND_DELAY_S = 0.05
IDEM_POLL_S = 0.02
HEALTH_TIMEOUT_S = 2.0  # a component that takes longer is reported unavailable
# A split whose port raised Unavailable takes no new positions or orders until it answers: a
# call to it that succeeds, or a ping, sent this often while it does not (a user's open would
# find out at the cost of an answer in doubt)
SPLIT_PROBE_S = 0.5

T = TypeVar("T")


def _digest(terms: Mapping[str, object]) -> bytes:
    """The terms of a request (name -> int, str, enum or None) as 16 bytes: what a retry with
    the same clientOrderId must repeat. Enums count by value, so the digest stays the same
    across releases and processes."""
    plain = sorted((name, value.value if isinstance(value, enum.Enum) else value)
                   for name, value in terms.items())
    return hashlib.blake2b(json.dumps(plain).encode(), digest_size=16).digest()


def _read_unattended(task: asyncio.Future[Any]) -> None:
    """The outcome of a request whose client went away: an Unavailable is the reconciler's to
    settle, any other error a bug to report."""
    error = None if task.cancelled() else task.exception()
    if error is not None and not isinstance(error, Unavailable):
        log.error("a request whose client went away failed", exc_info=error)


class PositionsCursor(NamedTuple):
    """Where a page of open positions ends: the sort key of its last position."""

    opened_ts_us: int
    position_id: int


class Health(NamedTuple):
    ok: bool
    components: dict[str, str]  # component -> "ok" or what failed


class TradingService:
    """The trading API's logic over a ledger port and one port per shard (by ShardSpec.name).

    ``health_checks``: extra named async checks for /healthz (e.g. the feed and the broker,
    supplied by whoever wires the platform); each returns True when healthy. ``feed_stats``:
    the feed actor's counters (drops by reason, ...) for /metrics, where there is a feed.
    ``market``: where candles and the public streams are read (None: no market data).
    ``account_topic``: the Kafka topic the ledger publishes the account events to, signed,
    which the account streams follow (None: they read the ledger).
    ``leading``: with several API replicas, true in the one that sweeps stale reservations
    (None: this one always does). With ``market``, ``GET /state`` is answered from a read
    model (cluster.live.account_views): one ledger read instead of one per shard as well.
    """

    def __init__(self, ledger: Port, shards: Mapping[str, Port], settings: Settings,
                 *, health_checks: Mapping[str, Callable[[], Awaitable[bool]]] | None = None,
                 feed_stats: Callable[[], Awaitable[dict[str, Any]]] | None = None,
                 market: MarketSource | None = None,
                 account_topic: SignedTopic | None = None,
                 leading: Callable[[], bool] | None = None,
                 idem_wait_s: float = 5.0) -> None:
        self.settings = settings
        self.assets: AssetRegistry = settings.assets
        self.layout = Layout(settings)
        missing = [n for n in self.layout.names if n not in shards]
        if missing:
            raise ValueError(f"no port for shard(s) {missing}")
        self.ledger = ledger
        self.shards: dict[str, Port] = {n: shards[n] for n in self.layout.names}
        self.counters: collections.Counter[str] = collections.Counter()
        self.courier = Courier(ledger, self.shards)
        # position id -> the turn of its changes (gone once no change of it holds or waits)
        self._turns: weakref.WeakValueDictionary[int, asyncio.Lock] = \
            weakref.WeakValueDictionary()
        self.reconciler = Reconciler(ledger, self.shards, self.courier, self.counters,
                                     settings.client_order_id_ttl_s, self._turn)
        # a clientOrderId answered longer ago is free to a request at once, not only once the
        # reconciler's sweep has forgotten it (SPEC: after the TTL the id may be reused)
        self._answer_ttl_us = settings.client_order_id_ttl_s * 1_000_000
        # (asset, "open" or "order") -> its count: one count for every asset and kind made a
        # client that alternates SOL and BTC put every SOL position on the same split
        self._spread: collections.defaultdict[tuple[str, str], itertools.count[int]] = \
            collections.defaultdict(itertools.count)
        # the splits (of assets split in several) whose last call raised Unavailable, each
        # with the task pinging it: one that does not answer (restarting, or its node gone)
        # is passed over by new positions until it does
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._closed = False  # (once closed, no probe or sweep starts: none would stop)
        self._split_names = {spec.name for spec in self.layout.shards if spec.split_count > 1}
        for name in self._split_names:
            self.shards[name].listen(functools.partial(self._answered, name))
        self._request_id = RequestIds()
        self._health_checks = dict(health_checks or {})
        self.feed_stats = feed_stats
        self.market = market
        self.account_topic = account_topic
        self._leading = leading  # is this the replica that sweeps stale reservations?
        self._idem_wait_s = idem_wait_s
        self._principals: dict[str, Principal] = {}
        # key -> (the task answering it here, the digest of the terms it was asked with)
        self._in_flight_idem: dict[IdemKey, tuple[asyncio.Future[Any], bytes]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: asyncio.Task[None] | None = None
        # one PositionsOf per shard for all the state reads of an event-loop turn: a single
        # vectorised pass over the book serves them all
        self._positions = {n: MicroBatcher(functools.partial(self._positions_of, n))
                           for n in self.shards}
        self.views = None if market is None else AccountViews(
            self, self.assets, self._read_state, market.newest, self.counters)

    async def _positions_of(self, shard_name: str, owners: list[int]
                            ) -> list[list[OpenPosition]]:
        return await self.shards[shard_name].call(PositionsOf(tuple(owners)))

    def watch(self) -> None:
        """Start the sweeps over what dead API processes left (a no-op once started, or once
        the service stopped); the first write starts them too. Needs a running event loop."""
        if self._watcher is None and not self._closed:
            self._watcher = asyncio.get_running_loop().create_task(
                self.reconciler.watch_pending(leading=self._leading))

    def _start(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """``work`` as a task of its own: it runs to its end whoever stops waiting for it."""
        self.watch()
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ----------------------------------------------------------------- accounts and auth
    async def create_account(self) -> NewAccount:
        api_key = secrets.token_urlsafe(32)
        account_id = "acc_" + secrets.token_hex(12)
        key_hash = hash_api_key(api_key)
        created = await self.ledger.call(CreateAccount(account_id, key_hash))
        if isinstance(created, Rejected):  # a key hash already taken: 2**-256, never expected
            raise RuntimeError(f"account creation refused: {created.message}")
        self._principals[key_hash] = Principal(created.user, account_id)
        self.counters["accounts_created"] += 1
        return NewAccount(created.user, account_id, api_key, created.balance_micros)

    def known(self, api_key: str) -> Principal | None:
        """The caller owning ``api_key`` if it was authenticated here before (no ledger call),
        else None."""
        return self._principals.get(hash_api_key(api_key))

    async def authenticate(self, api_key: str) -> Principal | None:
        """The caller owning ``api_key``, or None. Keys never change, so hits are cached."""
        key_hash = hash_api_key(api_key)
        principal = self._principals.get(key_hash)
        if principal is None:
            principal = await self.ledger.call(Authenticate(key_hash))
            if principal is not None:
                self._principals[key_hash] = principal
        return principal

    # ----------------------------------------------------------------- reads
    async def state(self, who: Principal) -> AccountState:
        """Balances and open positions (from the read model when there is one)."""
        if self.views is not None:
            return await self.views.state(who)
        return await self._read_state(who)

    async def _read_state(self, who: Principal) -> AccountState:
        """Balances and open positions, read from the ledger and every shard. A shard that
        does not answer (e.g. recovering) leaves its positions out and is named in
        ``unavailable``; the ledger must answer."""
        names = list(self._positions)
        (free, margin), per_shard = await asyncio.gather(
            self.ledger.call(Balances(who.user)),
            asyncio.gather(*(self._positions[n].submit(who.user) for n in names),
                           return_exceptions=True))
        positions: list[OpenPosition] = []
        unavailable: list[str] = []
        for name, answer in zip(names, per_shard, strict=True):
            if isinstance(answer, Unavailable):
                unavailable.append(name)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                positions.extend(answer)
        positions.sort(key=lambda p: (p.opened_ts_us, p.position_id))
        if unavailable:
            self.counters["partial_states"] += 1
        return AccountState.of(who, free, margin, positions, tuple(unavailable))

    async def positions(self, who: Principal, limit: int,
                        after: PositionsCursor | int | None = None
                        ) -> tuple[list[OpenPosition], PositionsCursor | None] | Rejected:
        """One page of ``who``'s open positions, oldest first (by ``(opened_ts_us,
        position_id)``): at most ``limit`` after ``after``, and the cursor of the next page
        (None on the last). ``after``: the previous page's cursor, which stays good when its
        position closes meanwhile, or a positionId of an open position (else INVALID_REQUEST).
        A shard that does not answer makes the read Unavailable (a page must not silently skip
        positions)."""
        per_shard = await asyncio.gather(*(b.submit(who.user) for b in self._positions.values()))

        def key(p: OpenPosition) -> PositionsCursor:
            return PositionsCursor(p.opened_ts_us, p.position_id)

        positions = sorted((p for ps in per_shard for p in ps), key=key)
        start = 0
        if isinstance(after, PositionsCursor):
            start = bisect.bisect_right(positions, after, key=key)
        elif after is not None:
            index = next((i for i, p in enumerate(positions) if p.position_id == after), None)
            if index is None:
                return Rejected(Code.INVALID_REQUEST, "unknown 'cursor' (or no longer open)")
            start = index + 1
        page = positions[start:start + limit]
        more = start + limit < len(positions)
        return page, (key(page[-1]) if more and page else None)

    async def history(self, who: Principal, limit: int = 50,
                      before: int | None = None) -> list[ClosedPosition] | Rejected:
        return await self.ledger.call(History(who.user, limit, before))

    async def orders(self, who: Principal) -> list[PendingOrder]:
        """``who``'s open orders over every shard, oldest first (Unavailable if a shard does
        not answer: the list must not silently miss orders)."""
        per_shard = await asyncio.gather(*(p.call(OrdersOf((who.user,)))
                                           for p in self.shards.values()))
        return sorted((o for [orders] in per_shard for o in orders),
                      key=lambda o: (o.placed_ts_us, o.order_id))

    async def order_history(self, who: Principal, limit: int = 50,
                            before: int | None = None) -> list[EndedOrder] | Rejected:
        return await self.ledger.call(OrderHistory(who.user, limit, before))

    async def account_events(self, user: int, since: int | None
                             ) -> tuple[int, list[AccountEvent] | None]:
        """``user``'s newest account event number and their events after ``since`` (None:
        some are no longer kept, or ``since`` is None)."""
        return await self.ledger.call(AccountEvents(user, since))

    async def account_tail(self, after: int, limit: int
                           ) -> tuple[int, list[AccountEvent] | None]:
        """The ledger's account event version and every account's events after ``after``
        (None: some are no longer kept)."""
        return await self.ledger.call(AccountTail(after, limit))

    async def prices(self, timeout_s: float | None = None) -> dict[str, Tick]:
        """The newest tick of each asset that has one (over its splits). A shard that does
        not answer (within ``timeout_s``, when given) only hides its own asset; Unavailable
        if none answers."""
        answers = await asyncio.gather(
            *(asyncio.wait_for(p.call(LastTick()), timeout_s) for p in self.shards.values()),
            return_exceptions=True)
        newest: dict[str, Tick] = {}
        failures = 0
        for answer in answers:
            if isinstance(answer, (Unavailable, TimeoutError)):
                failures += 1
                continue
            if isinstance(answer, BaseException):
                raise answer
            if answer is not None and (answer.asset not in newest
                                       or answer.ts_us > newest[answer.asset].ts_us):
                newest[answer.asset] = answer
        if failures == len(answers):
            raise Unavailable("shards", "no shard answered")
        return {a.name: newest[a.name] for a in self.assets.assets if a.name in newest}

    async def klines(self, asset: str, interval: str, query: CandleQuery) -> list[Candle]:
        """The candles of ``asset`` and ``interval`` that ``query`` selects, oldest first
        (Unavailable when there is no market data source, or it does not answer)."""
        if self.market is None:
            raise Unavailable("feed", "no market data here")
        try:
            return await self.market.klines(asset, interval, query)
        except Unavailable:
            raise
        except Exception as exc:
            raise Unavailable("feed", f"candles: {type(exc).__name__}") from exc

    def asset_of_position(self, position_id: int) -> Asset | None:
        spec = self.layout.of_position(position_id)
        return None if spec is None else self.assets[spec.asset]

    # ----------------------------------------------------------------- idempotency
    async def _idempotent(self, who: Principal, kind: str, client_order_id: str | None,
                          work: Callable[[IdemKey | None], Coroutine[Any, Any, T]],
                          shows: Mapping[str, object],
                          asks: Mapping[str, object] | None = None) -> T | Rejected:
        """``work(key)`` run to its end whoever stops waiting: once per key when the client
        named the request (``client_order_id``), else with no key. ``shows``: the fields the
        answer to this request has (by name); ``asks``: its other terms. The key is held
        with a digest of both: a request with the key and other terms is refused
        (INVALID_REQUEST) whatever the first one's answer, never answered as if run."""
        if client_order_id is None:
            # run to its end even if this caller is cancelled (a client went away)
            return await self._outcome(self._start(self._written(who.user, work(None))))
        key = IdemKey(who.user, kind, client_order_id)
        asked = _digest({**shows, **(asks or {})})
        task, running_asked = self._in_flight_idem.get(key) or (None, asked)
        if running_asked == asked:
            # once per key in this process, shielded: concurrent duplicates share its task and
            # its answer (a caller that goes away cancels neither the task nor them)
            if task is None:
                task = self._start(self._written(who.user, work(key)))
                self._in_flight_idem[key] = (task, asked)
                task.add_done_callback(lambda _: self._in_flight_idem.pop(key, None))
            else:
                self.counters["idempotent_replays"] += 1
            # the key names the kind of request: whichever task answers it, the answer is a T
            answer = cast(T, await self._outcome(task))
            # (the ledger refuses other terms itself; this check covers the keys it holds
            # without terms, kept by an older release)
            if isinstance(answer, Rejected) or all(
                    getattr(answer, name, value) == value for name, value in shows.items()):
                return answer
        self.counters["client_order_id_reused"] += 1
        return Rejected(Code.INVALID_REQUEST, reused_message(client_order_id))

    @staticmethod
    async def _outcome(task: asyncio.Future[T]) -> T:
        """``task``'s answer, shielded from its caller, who may go away meanwhile (a client
        that disconnects). Then the task runs on and its outcome is read when it ends: unread,
        asyncio reported it at the task's collection as an error never retrieved, with a
        traceback, also an Unavailable whose request the reconciler settles."""
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_read_unattended)
            raise

    async def _written(self, user: int, work: Coroutine[Any, Any, T]) -> T:
        """``work``, a write for ``user``; when it fails its outcome may be unknown (the
        reconciler settles it), so the user's reads are full ones for a while."""
        try:
            return await work
        except BaseException:
            if self.views is not None:
                self.views.distrust(user)
            raise

    def _asked(self, key: IdemKey | None) -> bytes:
        """The digest of the terms of the request running with ``key`` here (b"": none)."""
        running = None if key is None else self._in_flight_idem.get(key)
        return b"" if running is None else running[1]

    async def _replay(self, hit: IdemHit, key: IdemKey, request_id: int) -> object | None:
        """The stored answer of ``key``; waits while another request is still working on it.
        None when the first attempt gave up (the caller runs the request again).

        After ``idem_wait_s`` the pending request is settled here (Reconciler.settle_waited):
        a retry of a request whose API process died gets its answer, or runs it, within
        seconds instead of at the next sweep of stale reservations."""
        self.counters["idempotent_replays"] += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._idem_wait_s
        settled = False
        while hit.answer is None:
            if loop.time() > deadline:
                if not settled and hit.request_id:
                    settled = True
                    with contextlib.suppress(Unavailable):  # a shard down: the sweep will
                        await self.reconciler.settle_waited(hit.request_id, key.kind)
                    deadline = loop.time() + IDEM_POLL_S  # one more look at its answer
                else:
                    raise Unavailable("ledger", message="the first request with this "
                                      "clientOrderId is still in progress: retry it shortly")
            await asyncio.sleep(IDEM_POLL_S)
            seen = await self.ledger.call(Begin(key, request_id, self._asked(key),
                                                self._answer_ttl_us))
            if isinstance(seen, Rejected):  # another request has taken the key since
                return seen
            if seen is None:  # the first attempt gave up; we now hold the reservation
                await self.ledger.call(Forget(key, request_id))
                return None
            hit = seen
        return hit.answer

    async def _claim(self, key: IdemKey | None, reserve: Callable[[int], Awaitable[object]]
                     ) -> tuple[int, object]:
        """``reserve(request_id)``, the ledger call that claims ``key`` (if any) for a new
        request id: ``(request_id, its outcome)``. When an earlier request with ``key`` holds
        it (the outcome is an IdemHit), that request's answer once stored, as
        ``IdemHit(answer)``; if that request gave up instead, the claim is made again (three
        times at most)."""
        for _ in range(3):
            request_id = self._request_id()
            outcome = await reserve(request_id)
            if not isinstance(outcome, IdemHit):
                return request_id, outcome
            assert key is not None
            answer = await self._replay(outcome, key, request_id)
            if answer is not None:
                return request_id, IdemHit(answer)
        raise Unavailable("ledger", "could not settle the clientOrderId of this request")

    # ----------------------------------------------------------------- open
    async def open_position(self, who: Principal, order: OpenOrder) -> OpenPosition | Rejected:
        """Open ``order`` for ``who``: the position, or why not."""
        refused = self._check_terms(order)
        if refused is not None:
            return refused

        def command(request_id: int) -> Open:
            return Open(ShardOpen(request_id, who.user, order.side, order.margin_micros,
                                  order.leverage, order.tp_ticks, order.sl_ticks,
                                  order.current_price_ticks, order.max_slippage_bps))

        return await self._idempotent(who, "open", order.client_order_id, lambda key: self._lock(
            MarginLock(who.user, order.margin_micros, key),
            functools.partial(self._new_split, order.asset, "open"), command),
            {"asset": order.asset, "side": order.side, "margin_micros": order.margin_micros,
             "leverage": order.leverage, "tp_ticks": order.tp_ticks or NO_LEVEL,
             "sl_ticks": order.sl_ticks or NO_LEVEL})

    async def place_order(self, who: Principal, order: PlaceOrder) -> PendingOrder | Rejected:
        """Place a pending limit or stop order for ``who`` (its margin locked until it fills,
        is cancelled, expires or is rejected): the order, or why not."""
        refused = self._check_terms(order)
        if refused is not None:
            return refused
        terms = OrderTerms(Side(order.side), OrderKind(order.kind), order.trigger_ticks,
                           order.margin_micros, order.leverage, order.tp_ticks, order.sl_ticks,
                           order.expires_ts_us)
        refused = placement_refusal(self.assets[order.asset], terms)
        if refused is not None:  # the shard decides it too; refused before a lock
            return refused
        return await self._idempotent(who, "order", order.client_order_id, lambda key: self._lock(
            MarginLock(who.user, order.margin_micros, key, order=True),
            functools.partial(self._new_split, order.asset, "order"),
            lambda request_id: Place(who.user, terms, request_id)),
            {"asset": order.asset, **terms._asdict()})

    def _new_split(self, asset: str, kind: str) -> str:
        """The split of ``asset`` that takes a new position (``kind`` "open") or order
        ("order"): round-robin over its splits, the asset's opens and its orders each on
        their own, whatever else is opened or placed in between; a split found down is passed
        over until it answers, unless every one is (then the open fails there, 503). Chosen
        once the margin is locked, right before the request is sent: a split found down while
        the ledger locked it is passed over. A request sent is never sent to another split:
        the one that did not answer may hold it (the reconciler resolves it there)."""
        return self.layout.for_new_position(asset, next(self._spread[asset, kind]),
                                            self.split_down).name

    def split_down(self, shard_name: str) -> bool:
        """Is ``shard_name`` a split passed over by new positions (its last call raised
        Unavailable, and neither a call nor a ping has been answered since)?"""
        return shard_name in self._probes

    def _answered(self, shard_name: str, answered: bool) -> None:
        """What a batch to the split ``shard_name`` showed: it answers, or it raised
        Unavailable (then it is pinged until it answers)."""
        if answered:
            probe = self._probes.pop(shard_name, None)
            if probe is not None:
                probe.cancel()
        elif shard_name not in self._probes and not self._closed:
            self._probes[shard_name] = asyncio.get_running_loop().create_task(
                self._probe(shard_name))

    async def _probe(self, shard_name: str) -> None:
        """Ping a split found down every SPLIT_PROBE_S until it answers and takes writes."""
        port = self.shards[shard_name]
        while True:
            await asyncio.sleep(SPLIT_PROBE_S)
            try:
                answer = await asyncio.wait_for(port.ping(), HEALTH_TIMEOUT_S)
            except Exception:  # Unavailable, no answer in time, or the host's own failure
                continue
            if answer is True:
                self._probes.pop(shard_name, None)
                return

    # ----------------------------------------------------------------- changing a position
    async def set_levels(self, who: Principal, position_id: int, tp_ticks: int | None,
                         sl_ticks: int | None, client_order_id: str | None = None
                         ) -> OpenPosition | Rejected:
        """Set, replace or remove (0) the TP/SL of one of ``who``'s positions (None: keep).
        Announced at the ledger first, as a margin removal is, releasing nothing: should this
        process die after the shard made it, the sweeps find it and note it."""
        return await self._idempotent(who, "modify", client_order_id, lambda key: self._in_turn(
            position_id, self._end(key, position_id, "modify", lambda request_id: SetLevels(
                who.user, position_id, tp_ticks, sl_ticks, request_id), release=(who.user, 0))),
            {"position_id": position_id}, {"tp_ticks": tp_ticks, "sl_ticks": sl_ticks})

    async def change_margin(self, who: Principal, position_id: int, delta_micros: int,
                            client_order_id: str | None = None) -> OpenPosition | Rejected:
        """Add (``delta_micros`` > 0: locked from the free balance first) or remove (< 0:
        released to it once the shard agreed) margin of one of ``who``'s positions."""
        spec = self.layout.of_position(position_id)
        if spec is None:
            return Rejected(Code.NOT_FOUND, "no such open position")

        def command(request_id: int) -> ChangeMargin:
            return ChangeMargin(who.user, position_id, delta_micros, request_id)

        if delta_micros > 0:
            async def change(key: IdemKey | None) -> OpenPosition | Rejected:
                # the lock would refuse a short balance before the shard a missing position:
                # a position that is not the user's is named as such, whatever the balance
                # (the shard is asked unless this replica's view of the account holds it)
                if self.views is None or not self.views.lists(who.user, position_id):
                    held = await self._positions[spec.name].submit(who.user)
                    if all(p.position_id != position_id for p in held):
                        return await self._refuse(key, Rejected(Code.NOT_FOUND,
                                                                "no such open position"))
                return await self._lock(MarginLock(who.user, delta_micros, key, top_up=True),
                                        lambda: spec.name, command)
        else:
            async def change(key: IdemKey | None) -> OpenPosition | Rejected:
                return await self._end(key, position_id, "margin", command,
                                       release=(who.user, -delta_micros))

        return await self._idempotent(who, "margin", client_order_id, lambda key: self._in_turn(
            position_id, change(key)), {"position_id": position_id}, {"delta_micros": delta_micros})

    async def _in_turn(self, position_id: int, change: Awaitable[T]) -> T:
        """``change`` of position ``position_id`` (a close too: a partial one notes what it
        leaves open), once the changes of it begun before in this replica have ended (their
        account events noted): two changes sent at once were applied by the shard in one
        order and their events numbered at the ledger in the other, and the older body
        showed as the position's last."""
        async with self._turn(position_id):
            return await change

    @contextlib.asynccontextmanager
    async def _turn(self, position_id: int) -> AsyncIterator[None]:
        """Position ``position_id``'s turn: its changes here, and the reconciler's late notes
        of it, one at a time."""
        async with self._turns.setdefault(position_id, asyncio.Lock()):
            yield

    async def _refuse(self, key: IdemKey | None, refusal: Rejected) -> Any:
        """``refusal``, kept as the first answer of ``key``; or the answer an earlier request
        with ``key`` got, which a retry must get again."""
        self.counters[f"rejected_{refusal.code.value}"] += 1
        request_id, earlier = await self._begin(key)
        if earlier is not None:
            return earlier
        if key is not None:
            await self.ledger.call(Remember(key, refusal, request_id))
        return refusal

    async def _begin(self, key: IdemKey | None, release: tuple[int, int] | None = None
                     ) -> tuple[int, object | None]:
        """A new request id, holding ``key`` (if any) at the ledger, and announcing there
        ``release`` ``(user, micros)``, what the request will owe (if any), in the same call;
        and the answer to give instead of running the request (an earlier one's with ``key``,
        or why it could not be held or announced), else None."""
        if key is None and release is None:
            return self._request_id(), None

        def reserve(request_id: int) -> Awaitable[object]:
            asked, ttl_us = self._asked(key), self._answer_ttl_us
            if release is None:
                assert key is not None
                return self.ledger.call(Begin(key, request_id, asked, ttl_us))
            return self.ledger.call(ExpectRelease(*release, request_id, key, asked, ttl_us))

        request_id, seen = await self._claim(key, reserve)
        if isinstance(seen, IdemHit):
            return request_id, seen.answer
        return request_id, seen if isinstance(seen, Rejected) else None

    def _check_terms(self, order: OpenOrder | PlaceOrder) -> Rejected | None:
        asset = self.assets.get(order.asset)
        if asset is None:
            return Rejected(Code.UNKNOWN_ASSET, f"unknown asset {order.asset!r}")
        if not 1 <= order.leverage <= asset.max_leverage:
            return Rejected(Code.LEVERAGE_OUT_OF_RANGE,
                            f"leverage must be an integer in 1..{asset.max_leverage}")
        if order.margin_micros <= 0:
            return Rejected(Code.INVALID_REQUEST, "margin must be greater than zero")
        return None

    async def _lock(self, lock: MarginLock, shard: Callable[[], str],
                    command: Callable[[int], Any]) -> Any:
        """Lock ``lock``'s margin, then send ``command(request_id)`` (an open, a placement or
        a top-up) to the shard ``shard()`` names once the margin is locked (a split found down
        meanwhile is passed over): its answer, or why not."""
        async def reserve(request_id: int) -> object:
            # The request id travels with the lock: a lock whose request was cut off is
            # settled by this id (abandoned, or resolved against the shards), never guessed.
            try:
                return await self.ledger.call(LockMargin(lock._replace(request_id=request_id),
                                                         self._asked(lock.idem_key),
                                                         self._answer_ttl_us))
            except Unavailable:
                # The lock may have been made and its answer lost: the request is never sent.
                self.reconciler.abandon(request_id)
                raise

        key = lock.idem_key
        request_id, outcome = await self._claim(key, reserve)
        if isinstance(outcome, IdemHit):  # the answer of an earlier request with this key
            return outcome.answer
        if isinstance(outcome, Rejected):
            self.counters[f"rejected_{outcome.code.value}"] += 1
            return outcome
        kind = "margin" if lock.top_up else "order" if lock.order else "open"
        shard_name = shard()
        try:
            result = await self._send(shard_name, command(request_id))
        except Exception:
            self.reconciler.abandon(request_id)  # the request never reached a shard
            raise
        if result is None:  # the shard never answered: resolve it there, keep the lock
            self.reconciler.in_doubt(InDoubt(shard_name, request_id, kind, key))
            raise Unavailable(shard_name, f"the {kind}'s outcome is unknown; check your account")
        if isinstance(result, Rejected):
            self.counters[f"rejected_{result.code.value}"] += 1
            answer = None if key is None or result.code in TRANSIENT_CODES else (key, result)
            release = ReleaseMargin(lock.user, lock.margin_micros, request_id, answer,
                                    counted=not lock.top_up)
            try:
                await self.ledger.call(release)
                if key is not None and answer is None:
                    await self.ledger.call(Forget(key, request_id))
            except Unavailable:
                # released later, by its request id; with the refusal the client is given
                # as its key's answer, which abandoning the lock would drop
                if answer is None:
                    self.reconciler.abandon(request_id)
                else:
                    self.reconciler.resend(release)
            return result
        self.counters[f"{kind}s"] += 1
        # one account event of the user's and, with a clientOrderId, its first answer; one
        # the ledger did not take is sent again by the reconciler (the lock it ends stays
        # open meanwhile, so a sweep notes it too should this process die first), a
        # position's as the shard holds it then
        note = Note(lock.user, request_id, NOTED_OF_REQUEST[kind], result, key)
        try:
            await self.ledger.call(note)
        except Unavailable:
            self.reconciler.resend(note, shard_name)
        return result

    async def _send(self, shard_name: str, command: Any) -> Any:
        """The shard's answer to ``command``, resent (same request id) after a failure; None
        when it never answered."""
        for attempt in range(OPEN_RESENDS + 1):
            try:
                answer = await self.shards[shard_name].call(command)
                # (a request too late for its shard to know whether it ran: in doubt)
                return None if isinstance(answer, Forgotten) else answer
            except Unavailable:
                self.counters["resends"] += 1
                if attempt < OPEN_RESENDS:
                    await asyncio.sleep(RESEND_DELAY_S * (attempt + 1))
        return None

    # ----------------------------------------------------------------- close
    async def close_position(self, who: Principal,
                             order: CloseOrder) -> ClosedPosition | Rejected:
        """Close one of ``who``'s positions by hand (all of it, or ``order.qty_steps``);
        NOT_FOUND for anyone else's."""
        def command(request_id: int) -> Close:
            return Close(ShardClose(request_id, who.user, order.position_id,
                                    order.current_price_ticks, order.max_slippage_bps,
                                    order.qty_steps))

        # in the position's turn: what a partial close leaves open is noted, a change of it
        return await self._idempotent(
            who, "close", order.client_order_id, lambda key: self._in_turn(
                order.position_id, self._end(key, order.position_id, "close", command)),
            {"position_id": order.position_id}, {"qty_steps": order.qty_steps})

    async def cancel_order(self, who: Principal, order_id: int,
                           client_order_id: str | None = None) -> EndedOrder | Rejected:
        """Cancel one of ``who``'s open orders (its margin released): the ended order;
        NOT_FOUND for anyone else's, ORDER_NOT_OPEN for one that ended already."""
        return await self._idempotent(who, "cancel", client_order_id, lambda key: self._end(
            key, order_id, "cancel", lambda request_id: Cancel(who.user, order_id, request_id)),
            {"order_id": order_id})

    async def _end(self, key: IdemKey | None, item_id: int, kind: str,
                   command: Callable[[int], Any], release: tuple[int, int] | None = None) -> Any:
        """Send ``command(request_id)`` (a close, a cancel, a TP/SL change or a margin removal)
        to the shard that issued ``item_id``; a settlement it makes reaches the ledger before
        the answer, and so does ``release`` ``(user, micros)``, margin a removal frees (0: a
        TP/SL change, announced like one)."""
        spec = self.layout.of_position(item_id)  # order ids carry their shard's tag too
        if spec is None:
            return Rejected(Code.NOT_FOUND, "no such open order" if kind == "cancel"
                            else "no such open position")
        # the release the change will owe (if any) is remembered at the ledger before the
        # shard acts: made, and the change noted, by the sweep should this process die
        # before it does so itself
        request_id, earlier = await self._begin(key, release)
        if earlier is not None:  # the answer of an earlier request with this key, or a refusal
            return earlier
        result = await self._send(spec.name, command(request_id))
        doubt = InDoubt(spec.name, request_id, kind, key, release)
        if result is None:
            # it may have happened: its reservation stays pending until the shard says (a
            # retry meanwhile waits for that answer instead of running again)
            self.reconciler.in_doubt(doubt)
            raise Unavailable(spec.name, f"the {kind}'s outcome is unknown; check your account")
        if isinstance(result, Rejected):
            self.counters[f"rejected_{result.code.value}"] += 1
            if release is not None:
                self.reconciler.abandon(request_id)  # nothing is owed: the record ends
            if key is not None:
                await self.ledger.call(remember_or_forget(key, result, request_id))
            return result
        self.counters[f"{kind}s"] += 1
        if not isinstance(result, SettlementItem):  # the position, changed
            try:
                await self.reconciler.settle_change(doubt, result)
            except Unavailable:  # resolved from the shard by its request id, later
                self.reconciler.in_doubt(doubt)
            return result
        closed = result.closed
        try:
            await self.courier.settle(spec.name, result, None if key is None else (key, closed))
        except Unavailable:
            # It happened and sits in the shard's outbox, which every later delivery resends:
            # the ledger will apply it; the caller still gets the fact.
            self.counters["settlements_deferred"] += 1
            if key is not None or (isinstance(closed, ClosedPosition) and closed.partial):
                # its answer stored, and what a partial close left open noted, once a round
                # delivered it
                self.reconciler.in_doubt(InDoubt(spec.name, request_id, kind, key))
        else:
            await self.reconciler.note_rest(spec.name, closed, request_id)
        return closed

    # ----------------------------------------------------------------- operations
    async def shard_stats(self) -> dict[str, ShardStats | None]:
        """Each shard's counters, None for a shard that does not answer (or answers with an
        error of its own: one shard's bug must not cost /metrics every other figure)."""
        async def one(port: Port) -> ShardStats | None:
            try:
                stats: ShardStats = await asyncio.wait_for(port.call(Stats()), HEALTH_TIMEOUT_S)
            except (Unavailable, TimeoutError):
                return None
            except Exception:
                log.exception("%s: reading its counters failed", port.name)
                return None
            return stats
        stats = await asyncio.gather(*(one(p) for p in self.shards.values()))
        return dict(zip(self.shards, stats, strict=True))

    async def health(self) -> Health:
        """Ledger, every shard and the extra checks, each within HEALTH_TIMEOUT_S."""
        async def check(name: str, fn: Callable[[], Awaitable[object]]) -> str:
            result = await one(fn)
            if name in self._split_names and result in ("ok", "unavailable"):
                # what a check found of a split is what a call would have: new positions pass
                # over one that does not answer, and go to one that does, from now on. Told
                # as its ping ends, not once every check has: a call that found it down
                # while a slower part was still asked is newer than this ping's "ok"
                self._answered(name, result == "ok")
            return result

        async def one(fn: Callable[[], Awaitable[object]]) -> str:
            try:
                ok = await asyncio.wait_for(fn(), HEALTH_TIMEOUT_S)
            except (Unavailable, TimeoutError):
                return "unavailable"
            except Exception as exc:  # a failing check reports, never crashes /healthz
                return f"error: {type(exc).__name__}"
            if isinstance(ok, str):  # why a host may not take writes
                return f"unhealthy: {ok}"
            return "ok" if ok is not False else "unhealthy"

        checks: dict[str, Callable[[], Awaitable[object]]] = {
            "ledger": self.ledger.ping,
            **{name: port.ping for name, port in self.shards.items()},
            **self._health_checks,
        }
        results = await asyncio.gather(*(check(n, fn) for n, fn in checks.items()))
        return Health(all(r == "ok" for r in results), dict(zip(checks, results, strict=True)))

    async def audit(self, attempts: int = 3, retry_delay_s: float = 0.2
                    ) -> tuple[list[AuditDifference], dict[str, object]]:
        """The ledger invariant against every shard's open margins, counts and unsettled closes.

        What requests under way hold is no difference (the ledger knows them: a lock whose
        request has not reached its shard, a removal whose release has not reached the
        ledger). The shards are read before the ledger, so a change between the two reads
        (a close settled, an open made and noted) shows as a difference once: one is only
        reported if its subject (the account that differs, or the sum) differs at each of
        ``attempts`` reads. Returns ``(differences, totals)`` (the last read's of each).
        """
        problems: list[AuditDifference] = []
        persistent: set[str] | None = None
        for attempt in range(max(1, attempts)):
            if attempt:
                await asyncio.sleep(retry_delay_s)
            problems = await self.reconciler.differences()
            subjects = {p.subject for p in problems}
            persistent = subjects if persistent is None else persistent & subjects
            if not persistent:
                problems = []
                break
        totals = await self.ledger.call(Totals())
        return [p for p in problems if p.subject in (persistent or ())], totals

    async def aclose(self) -> None:
        """Let shielded requests finish, then stop the background reconciliation."""
        self._closed = True
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self.reconciler.aclose()
        probes = list(self._probes.values())
        self._probes.clear()
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)

    def batch_stats(self) -> dict[str, tuple[int, int]]:
        """``name -> (batches, items)`` of every batching point (items/batches = gain)."""
        named: dict[str, MicroBatcher[Any, Any]] = {"ledger": self.ledger.batcher}
        for name, port in self.shards.items():
            named[name] = port.batcher
            named[f"positions:{name}"] = self._positions[name]
        return {k: (b.batches, b.items) for k, b in named.items()}
