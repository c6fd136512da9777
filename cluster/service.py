"""TradingService: the API's orchestration of the ledger and the shards, over ports.

Money is never lost or created on the open path: the margin is locked in the ledger first, the
shard opens (or refuses) at its own price, and a refusal releases the lock. An open whose
outcome is unknown (the shard did not answer) keeps its lock "in doubt" until the shard says
whether the request ever arrived (``resolve_opens`` also fences it), and only then is released.
A lock call whose answer is lost (the ledger died after journaling it) never reaches a shard:
its request id is handed back to the ledger (``abandon_locks``) in the background, which
releases the lock if it was made, once.
Closes settle through the ledger by the shard's settlement sequence number, so the service and
the shard's own outbox push may both deliver a settlement and it is applied once.

Concurrent requests are micro-batched (cluster.trading.batcher): one ``lock_margins`` call for all the
opens of an event-loop turn, one ``open_many`` per shard, and so on. Independent calls (the
balances and each shard's positions of a state read) run concurrently. Everything here is
integers; the API layer converts to decimal strings.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

from cluster.trading.batcher import MicroBatcher
from cluster.config import Settings
from cluster.ledger_core import hash_api_key
from engine.messages import (
    ClosedPosition,
    CloseOrder,
    IdemHit,
    IdemKey,
    MarginLock,
    NewAccount,
    OpenOrder,
    OpenPosition,
    Principal,
    SettlementItem,
    ShardClose,
    ShardOpen,
    ShardStats,
)
from cluster.trading.placement import ShardSpec, shard_layout
from cluster.ports import LedgerPort, ShardPort, Unavailable
from cluster.shard_core import merge_margins
from engine.assets import Asset, AssetRegistry
from engine.market import Tick
from engine.position_ids import book_tag_of, is_position_id
from engine.results import Code, Rejected

# Answers that depend on a passing condition (no price yet, a component down) are not stored
# as a clientOrderId's first answer: a retry must be able to succeed later.
TRANSIENT_CODES = frozenset({Code.PRICE_UNAVAILABLE})
OPEN_RESENDS = 2  # resends of an open (same request id) before it is declared in doubt
RESEND_DELAY_S = 0.05
IDEM_POLL_S = 0.02


class AccountState(NamedTuple):
    account_id: str
    free_micros: int
    margin_micros: int
    equity_micros: int
    positions: list[OpenPosition]
    # shards that did not answer: their positions are missing and equity counts only the
    # unrealized PnL of the positions listed (free + margin are always complete)
    unavailable: tuple[str, ...] = ()


class Health(NamedTuple):
    ok: bool
    components: dict[str, str]  # component -> "ok" or what failed


class _InDoubt(NamedTuple):
    request_id: int
    user: int
    margin_micros: int
    idem_key: IdemKey | None


class TradingService:
    """The trading API's logic over a ledger port and one port per shard (by ShardSpec.name).

    ``health_checks``: extra named async checks for /healthz (e.g. the feed and the broker,
    supplied by whoever wires the platform); each returns True when healthy.
    """

    def __init__(self, ledger: LedgerPort, shards: Mapping[str, ShardPort], settings: Settings,
                 *, health_checks: Mapping[str, Callable[[], Awaitable[bool]]] | None = None,
                 health_timeout_s: float = 2.0, idem_wait_s: float = 5.0) -> None:
        self.settings = settings
        self.assets: AssetRegistry = settings.assets
        self.layout: tuple[ShardSpec, ...] = shard_layout(settings)
        missing = [s.name for s in self.layout if s.name not in shards]
        if missing:
            raise ValueError(f"no port for shard(s) {missing}")
        self.ledger = ledger
        self.shards: dict[str, ShardPort] = {s.name: shards[s.name] for s in self.layout}
        self._by_tag = {s.book_tag: s for s in self.layout}
        self._splits: dict[str, tuple[ShardSpec, ...]] = {
            a.name: tuple(s for s in self.layout if s.asset == a.name) for a in self.assets.assets}
        self._spread = itertools.count()
        # Request ids must not collide between API replicas: a random prefix per service.
        self._request_prefix = secrets.randbits(30) << 32
        self._request_counter = itertools.count(1)
        self._health_checks = dict(health_checks or {})
        self._health_timeout_s = health_timeout_s
        self._idem_wait_s = idem_wait_s
        self._principals: dict[str, Principal] = {}
        self._in_flight_idem: dict[IdemKey, asyncio.Future[object]] = {}
        self._in_doubt: dict[str, list[_InDoubt]] = {s.name: [] for s in self.layout}
        # request ids of lock calls that failed: the lock may exist, its open was never sent
        self._abandoned: list[int] = []
        self._reconcile_task: asyncio.Task[None] | None = None
        self._reconcile_lock = asyncio.Lock()
        self.counters: collections.Counter[str] = collections.Counter()

        self._auth = MicroBatcher(ledger.principals_of_key_hashes)
        self._balances = MicroBatcher(ledger.balances_many)
        self._locks = MicroBatcher(ledger.lock_margins)
        self._releases: MicroBatcher[tuple[int, int, tuple[IdemKey, object] | None], None] = \
            MicroBatcher(self._release_batch)
        self._remembers: MicroBatcher[tuple[IdemKey, object], None] = \
            MicroBatcher(self._remember_batch)
        self._begins = MicroBatcher(ledger.begin)
        self._opens = {n: MicroBatcher(p.open_many) for n, p in self.shards.items()}
        self._closes = {n: MicroBatcher(p.close_many) for n, p in self.shards.items()}
        self._positions = {n: MicroBatcher(p.positions_of_many) for n, p in self.shards.items()}
        self._settles: dict[str, MicroBatcher[tuple[SettlementItem, tuple[IdemKey, object] | None],
                                              int]] = {
            n: MicroBatcher(self._settle_batcher_fn(n)) for n in self.shards}

    # ----------------------------------------------------------------- batch functions
    async def _release_batch(self, items: list[tuple[int, int, tuple[IdemKey, object] | None]]
                             ) -> list[None]:
        await self.ledger.release_margins([(u, m) for u, m, _ in items],
                                          [a for _, _, a in items if a is not None])
        return [None] * len(items)

    async def _remember_batch(self, items: list[tuple[IdemKey, object]]) -> list[None]:
        await self.ledger.remember(items)
        return [None] * len(items)

    def _settle_batcher_fn(self, shard_name: str) -> Callable[
            [list[tuple[SettlementItem, tuple[IdemKey, object] | None]]], Awaitable[list[int]]]:
        async def settle(batch: list[tuple[SettlementItem, tuple[IdemKey, object] | None]]
                         ) -> list[int]:
            items = sorted((item for item, _ in batch), key=lambda i: i.seq)
            answers = [a for _, a in batch if a is not None]
            last = await self.ledger.apply_settlements(shard_name, items, answers)
            if last < items[-1].seq:
                # A close triggered by a tick is still on its way from the shard: deliver the
                # shard's whole outbox now so this close is applied before we answer.
                outbox = await self.shards[shard_name].outbox()
                last = await self.ledger.apply_settlements(shard_name, outbox)
            return [last] * len(batch)
        return settle

    # ----------------------------------------------------------------- accounts and auth
    async def create_account(self) -> NewAccount:
        account = await self.ledger.create_account()
        self._principals[hash_api_key(account.api_key)] = Principal(account.user,
                                                                    account.account_id)
        self.counters["accounts_created"] += 1
        return account

    async def authenticate(self, api_key: str) -> Principal | None:
        """The caller owning ``api_key``, or None. Keys never change, so hits are cached."""
        key_hash = hash_api_key(api_key)
        principal = self._principals.get(key_hash)
        if principal is None:
            principal = await self._auth.submit(key_hash)
            if principal is not None:
                self._principals[key_hash] = principal
        return principal

    # ----------------------------------------------------------------- reads
    async def state(self, who: Principal) -> AccountState:
        """Balances and open positions. A shard that does not answer (e.g. recovering) leaves
        its positions out and is named in ``unavailable``; the ledger must answer."""
        names = list(self._positions)
        (free, margin), per_shard = await asyncio.gather(
            self._balances.submit(who.user),
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
        unrealized = sum(p.unrealized_pnl_micros or 0 for p in positions)
        if unavailable:
            self.counters["partial_states"] += 1
        return AccountState(who.account_id, free, margin, free + margin + unrealized, positions,
                            tuple(unavailable))

    async def history(self, who: Principal, limit: int = 50,
                      before: int | None = None) -> list[ClosedPosition] | Rejected:
        return await self.ledger.history(who.user, limit, before)

    async def prices(self) -> dict[str, Tick]:
        """The newest tick of each asset that has one (over its splits). A shard that does
        not answer only hides its own asset; Unavailable if none answers."""
        names = [s.name for s in self.layout]
        answers = await asyncio.gather(*(self.shards[n].last_tick() for n in names),
                                       return_exceptions=True)
        newest: dict[str, Tick] = {}
        failures = 0
        for answer in answers:
            if isinstance(answer, Unavailable):
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

    def asset_of_position(self, position_id: int) -> Asset | None:
        spec = self._spec_of_position(position_id)
        return None if spec is None else self.assets[spec.asset]

    def _spec_of_position(self, position_id: int) -> ShardSpec | None:
        if not is_position_id(position_id):
            return None
        return self._by_tag.get(book_tag_of(position_id))

    # ----------------------------------------------------------------- idempotency
    async def _once(self, key: IdemKey, run: Callable[[], Awaitable[object]]) -> object:
        """Run ``run`` once per key in this process; concurrent duplicates share its answer."""
        pending = self._in_flight_idem.get(key)
        if pending is not None:
            self.counters["idempotent_replays"] += 1
            return await asyncio.shield(pending)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._in_flight_idem[key] = future
        try:
            result = await run()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: duplicates may not exist
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._in_flight_idem[key]

    async def _replay(self, hit: IdemHit, key: IdemKey) -> object | None:
        """The stored answer of ``key``; waits while another replica is still working on it.
        None when the first attempt failed transiently (the caller runs the request again)."""
        self.counters["idempotent_replays"] += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._idem_wait_s
        while hit.answer is None:
            if loop.time() > deadline:
                raise Unavailable("ledger", "a request with this clientOrderId is in progress")
            await asyncio.sleep(IDEM_POLL_S)
            seen = (await self.ledger.begin([key]))[0]
            if seen is None:  # the first attempt gave up; we now hold the reservation
                await self.ledger.forget([key])
                return None
            hit = seen
        return hit.answer

    # ----------------------------------------------------------------- open
    async def open_position(self, who: Principal, order: OpenOrder) -> OpenPosition | Rejected:
        """Open ``order`` for ``who``: the position, or why not."""
        asset = self.assets.get(order.asset)
        if asset is None:
            return Rejected(Code.UNKNOWN_ASSET, f"unknown asset {order.asset!r}")
        if not 1 <= order.leverage <= asset.max_leverage:
            return Rejected(Code.LEVERAGE_OUT_OF_RANGE,
                            f"leverage must be an integer in 1..{asset.max_leverage}")
        if order.margin_micros <= 0:
            return Rejected(Code.INVALID_REQUEST, "margin must be greater than zero")
        if order.client_order_id is None:
            return await self._open(who, order, None)
        key = IdemKey(who.user, "open", order.client_order_id)
        result = await self._once(key, lambda: self._open(who, order, key))
        assert isinstance(result, OpenPosition | Rejected)
        return result

    async def _open(self, who: Principal, order: OpenOrder,
                    key: IdemKey | None) -> OpenPosition | Rejected:
        # The request id is fixed before the lock so the ledger can keep it with the lock: a
        # lock whose open a crash cut off is resolved against the shards by this id.
        request_id = self._request_prefix | next(self._request_counter)
        for _ in range(3):
            try:
                outcome = await self._locks.submit(
                    MarginLock(who.user, order.margin_micros, key, request_id))
            except Unavailable:
                # The lock may have been made and its answer lost: the open is never sent,
                # so the ledger is asked to undo it (if it exists) in the background.
                self._abandoned.append(request_id)
                self.counters["locks_abandoned"] += 1
                self._schedule_reconcile()
                raise
            if isinstance(outcome, IdemHit):
                assert key is not None
                answer = await self._replay(outcome, key)
                if answer is None:
                    continue  # the first attempt failed transiently: run it again
                assert isinstance(answer, OpenPosition | Rejected)
                return answer
            if isinstance(outcome, Rejected):
                self.counters[f"rejected_{outcome.code.value}"] += 1
                return outcome
            return await self._open_locked(who, order, key, request_id)
        raise Unavailable("ledger", "could not settle the clientOrderId of this request")

    async def _open_locked(self, who: Principal, order: OpenOrder, key: IdemKey | None,
                           request_id: int) -> OpenPosition | Rejected:
        splits = self._splits[order.asset]
        spec = splits[next(self._spread) % len(splits)]
        request = ShardOpen(request_id, who.user,
                            order.side, order.margin_micros, order.leverage, order.tp_ticks,
                            order.sl_ticks, order.current_price_ticks, order.max_slippage_bps)
        result = await self._send_open(spec.name, request)
        if result is None:  # the shard never answered: keep the lock until it does
            self._in_doubt[spec.name].append(
                _InDoubt(request.request_id, who.user, order.margin_micros, key))
            self.counters["opens_in_doubt"] += 1
            self._schedule_reconcile()
            raise Unavailable(spec.name, "the open's outcome is unknown; check your positions")
        if isinstance(result, Rejected):
            self.counters[f"rejected_{result.code.value}"] += 1
            answer = None if key is None or result.code in TRANSIENT_CODES else (key, result)
            await self._releases.submit((who.user, order.margin_micros, answer))
            if key is not None and answer is None:
                await self.ledger.forget([key])
            return result
        self.counters["opens"] += 1
        if key is not None:
            await self._remembers.submit((key, result))
        return result

    async def _send_open(self, shard_name: str,
                         request: ShardOpen) -> OpenPosition | Rejected | None:
        """The shard's answer to ``request``, resending it (same request id) after a failure."""
        for attempt in range(OPEN_RESENDS + 1):
            try:
                return await self._opens[shard_name].submit(request)
            except Unavailable:
                self.counters["open_resends"] += 1
                if attempt < OPEN_RESENDS:
                    await asyncio.sleep(RESEND_DELAY_S * (attempt + 1))
        return None

    def _schedule_reconcile(self) -> None:
        if self._reconcile_task is None or self._reconcile_task.done():
            self._reconcile_task = asyncio.get_running_loop().create_task(self._reconcile_loop())

    async def _reconcile_loop(self, interval_s: float = 1.0, max_interval_s: float = 10.0
                              ) -> None:
        while await self.reconcile() > 0:
            await asyncio.sleep(interval_s)
            interval_s = min(max_interval_s, interval_s * 2)  # back off while a part is down

    async def aclose(self) -> None:
        """Stop the background resolution of in-doubt opens (they stay locked, in doubt)."""
        task, self._reconcile_task = self._reconcile_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def reconcile(self) -> int:
        """Resolve opens in doubt: keep the lock of those that opened, release the others;
        then abandon the locks whose lock call failed. Returns how many remain unresolved
        (their shard, or the ledger, still does not answer)."""
        async with self._reconcile_lock:  # two rounds must never release the same lock
            return await self._reconcile() + await self._abandon_locks()

    async def _abandon_locks(self) -> int:
        """Hand the request ids of failed lock calls to the ledger (``abandon_locks``).

        Their open was never sent to any shard (the service only opens after the lock's
        answer), so the ledger may release such a lock without asking the shards; it releases
        one only if it holds it, once, so a resend after a lost answer changes nothing.
        """
        if not self._abandoned:
            return 0
        batch = list(self._abandoned)
        try:
            released = await self.ledger.abandon_locks(batch)
        except Unavailable:
            return len(self._abandoned)
        self.counters["locks_released_abandoned"] += len(released)
        done = set(batch)
        self._abandoned = [r for r in self._abandoned if r not in done]
        return len(self._abandoned)

    async def _reconcile(self) -> int:
        remaining = 0
        for shard_name, doubts in self._in_doubt.items():
            if not doubts:
                continue
            batch = list(doubts)
            try:
                results = await self.shards[shard_name].resolve_opens(
                    [d.request_id for d in batch])
            except Unavailable:
                remaining += len(batch)
                continue
            answers: list[tuple[IdemKey, object]] = []
            for doubt, result in zip(batch, results, strict=True):
                if isinstance(result, OpenPosition):
                    if doubt.idem_key is not None:
                        answers.append((doubt.idem_key, result))
                elif doubt.request_id not in self._abandoned:
                    # Not opened (refused, or fenced now): release by request id, which the
                    # ledger does at most once even if this round's answer is lost and resent.
                    self._abandoned.append(doubt.request_id)
            if answers:
                try:
                    await self.ledger.release_margins([], answers)
                except Unavailable:
                    remaining += len(batch)
                    continue
            resolved = {d.request_id for d in batch}
            self._in_doubt[shard_name] = [d for d in doubts if d.request_id not in resolved]
            remaining += len(self._in_doubt[shard_name])
        return remaining

    # ----------------------------------------------------------------- close
    async def close_position(self, who: Principal,
                             order: CloseOrder) -> ClosedPosition | Rejected:
        """Close one of ``who``'s positions by hand; NOT_FOUND for anyone else's."""
        if order.client_order_id is None:
            return await self._close(who, order, None)
        key = IdemKey(who.user, "close", order.client_order_id)
        result = await self._once(key, lambda: self._close(who, order, key))
        assert isinstance(result, ClosedPosition | Rejected)
        return result

    async def _close(self, who: Principal, order: CloseOrder,
                     key: IdemKey | None) -> ClosedPosition | Rejected:
        spec = self._spec_of_position(order.position_id)
        if spec is None:
            return Rejected(Code.NOT_FOUND, "no such open position")
        if key is not None:
            for _ in range(3):
                seen = await self._begins.submit(key)
                if seen is None:
                    break
                answer = await self._replay(seen, key)
                if answer is not None:
                    assert isinstance(answer, ClosedPosition | Rejected)
                    return answer
            else:
                raise Unavailable("ledger", "could not settle the clientOrderId of this request")
        try:
            result = await self._closes[spec.name].submit(
                ShardClose(self._request_prefix | next(self._request_counter), who.user,
                           order.position_id, order.current_price_ticks, order.max_slippage_bps))
        except Unavailable:
            if key is not None:
                await self.ledger.forget([key])
            raise
        if isinstance(result, Rejected):
            self.counters[f"rejected_{result.code.value}"] += 1
            if key is not None:
                if result.code in TRANSIENT_CODES:
                    await self.ledger.forget([key])
                else:
                    await self._remembers.submit((key, result))
            return result
        self.counters["closes"] += 1
        closed = result.closed
        try:
            await self._settles[spec.name].submit((result, None if key is None else (key, closed)))
        except Unavailable:
            # The close happened and sits in the shard's outbox, which the shard resends: the
            # ledger will apply it; the caller still gets the fact.
            self.counters["settlements_deferred"] += 1
            if key is not None:  # best effort, or the key would stay pending
                with contextlib.suppress(Unavailable):
                    await self.ledger.remember([(key, closed)])
        return closed

    # ----------------------------------------------------------------- operations
    async def shard_stats(self) -> dict[str, ShardStats | None]:
        """Each shard's counters, None for a shard that does not answer."""
        async def one(port: ShardPort) -> ShardStats | None:
            try:
                return await asyncio.wait_for(port.stats(), self._health_timeout_s)
            except (Unavailable, TimeoutError):
                return None
        stats = await asyncio.gather(*(one(p) for p in self.shards.values()))
        return dict(zip(self.shards, stats, strict=True))

    async def health(self) -> Health:
        """Ledger, every shard and the extra checks, each within ``health_timeout_s``."""
        async def check(fn: Callable[[], Awaitable[object]]) -> str:
            try:
                ok = await asyncio.wait_for(fn(), self._health_timeout_s)
            except (Unavailable, TimeoutError):
                return "unavailable"
            except Exception as exc:  # a failing check reports, never crashes /healthz
                return f"error: {type(exc).__name__}"
            return "ok" if ok is not False else "unhealthy"

        checks: dict[str, Callable[[], Awaitable[object]]] = {"ledger": self.ledger.ping}
        for name, port in self.shards.items():
            checks[name] = port.stats
        checks.update(self._health_checks)
        results = await asyncio.gather(*(check(fn) for fn in checks.values()))
        components = dict(zip(checks, results, strict=True))
        return Health(all(r == "ok" for r in results), components)

    async def audit(self, attempts: int = 3,
                    retry_delay_s: float = 0.2) -> tuple[list[str], dict[str, object]]:
        """The ledger invariant against every shard's open margins and unsettled closes.

        Exact when nothing trades meanwhile. Under traffic a difference can be transient (an
        open's margin is locked a moment before its position exists; a close can settle
        between reading a shard and reading the ledger), so a difference is only reported if
        it is still there after ``attempts`` reads. Returns ``(differences, totals)``.
        """
        problems: list[str] = []
        for attempt in range(max(1, attempts)):
            if attempt:
                await asyncio.sleep(retry_delay_s)
            views = await asyncio.gather(*(p.audit_view() for p in self.shards.values()))
            problems = await self.ledger.audit(
                merge_margins(margins for margins, _ in views),
                {name: outbox for name, (_, outbox) in zip(self.shards, views, strict=True)})
            if not problems:
                break
        totals = await self.ledger.totals()
        return problems, totals

    def batch_stats(self) -> dict[str, tuple[int, int]]:
        """``name -> (batches, items)`` of every micro-batcher (items/batches = batching gain)."""
        named: dict[str, MicroBatcher[Any, Any]] = {
            "auth": self._auth, "balances": self._balances, "lock_margins": self._locks,
            "release_margins": self._releases, "remember": self._remembers}
        for name in self.shards:
            named[f"open_many:{name}"] = self._opens[name]
            named[f"close_many:{name}"] = self._closes[name]
            named[f"positions:{name}"] = self._positions[name]
            named[f"settle:{name}"] = self._settles[name]
        return {k: (b.batches, b.items) for k, b in named.items()}
