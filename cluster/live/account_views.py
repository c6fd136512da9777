"""AccountViews: an API replica's read model of the accounts it is asked about (``GET /state``).

A full read of an account's state asks the ledger (balances) and every shard (positions, each
marked to the shard's last tick). A view keeps what a full read returned, as of the account's
event number at the ledger (engine.account_events: every balance change and every position
opened, changed or closed, numbered per account in the ledger's journaled order), and brings
itself up to date with those events instead of asking the shards again:

* **Loading** (the first read, or after the view was dropped): the account's newest event
  number ``s`` is read from the ledger first, then the full state; the view holds that state as
  of ``s``. The shards' answers can only be newer than ``s`` (an event is recorded after what it
  reports happened at the shard), and applying an event is idempotent by position id, so the
  events after ``s`` bring the view to the ledger's order.
* **Checking** (every later read): ``AccountEvents(user, since=view.seq)`` at the ledger, one
  small read batched with the replica's other ledger calls, applied in order. So a read shows
  everything the ledger has recorded for the account when it answered: the client's own writes
  through any replica, and closes by ticks as soon as their settlement is in the history.
* **Marking**: unrealized PnL is computed here (engine.settlement, as a shard marks a position)
  at the newest top of book of the position's asset the replica knows (``marks``: the ticks the
  feed accepted, which are what the shards are sent). Without one the read is a full one.

A view is dropped, and the next read is a full one that loads it again, when the ledger no
longer keeps the events it needs, on a partial close (its remainder's terms are the shard's to
compute), on an order fill whose position no ``positionOpened`` follows (a delivery of fills
without the positions they opened), and for :data:`DISTRUST_S`
after a write for the account failed (its outcome may be unknown: the reconciler settles it
at the shards, and until it does a full read shows what the shards hold). At most
:data:`MAX_VIEWS` accounts are kept (the least recently read dropped first), each with at most
:data:`MAX_VIEW_POSITIONS` positions (a larger one is read in full). A full read that misses a
shard (recovering) is not kept.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from engine import account_events
from engine.account_events import AccountEvent, Balance
from engine.assets import AssetRegistry
from engine.market import Tick
from engine.messages import ClosedPosition, EndedOrder, OpenPosition, Principal
from engine.order_book import OrderStatus
from engine.settlement import exit_price_ticks, pnl_micros

MAX_VIEWS = 10_000
"""Accounts kept at most (the least recently read dropped first)."""
MAX_VIEW_POSITIONS = 2_000
"""An account with more open positions is not kept (each read marks every position)."""
DISTRUST_S = 60.0
"""After a write for an account failed, its reads are full ones for this long."""


class AccountState(NamedTuple):
    """An account's balances and open positions (``GET /state``), in micro-dollars; equity is
    free + margin + the positions' unrealized PnL."""

    account_id: str
    free_micros: int
    margin_micros: int
    equity_micros: int
    positions: list[OpenPosition]
    # shards that did not answer: their positions are missing and equity counts only the
    # unrealized PnL of the positions listed (free + margin are always complete)
    unavailable: tuple[str, ...] = ()

    @classmethod
    def of(cls, who: Principal, free_micros: int, margin_micros: int,
           positions: list[OpenPosition], unavailable: tuple[str, ...] = ()) -> AccountState:
        unrealized = sum(p.unrealized_pnl_micros or 0 for p in positions)
        return cls(who.account_id, free_micros, margin_micros,
                   free_micros + margin_micros + unrealized, positions, unavailable)


class ViewSource(Protocol):
    """Where a view's events are read (cluster.trading.service.TradingService)."""

    async def account_events(self, user: int, since: int | None
                             ) -> tuple[int, list[AccountEvent] | None]: ...


@dataclass(eq=False, slots=True)
class View:
    """One account as of its event ``seq``: balances in micro-dollars, open positions by id
    (``unrealized_pnl_micros`` as last reported: a read marks them again)."""

    seq: int = 0
    free_micros: int = 0
    margin_micros: int = 0
    positions: dict[int, OpenPosition] = field(default_factory=dict)


class AccountViews:
    """The views of one replica. ``source``: the ledger's account events; ``load(who)``: a
    full read; ``marks(asset)``: the newest top of book of an asset known here (None: none);
    ``counts``: where reads are counted (the service's counters, shown by /metrics)."""

    def __init__(self, source: ViewSource, assets: AssetRegistry,
                 load: Callable[[Principal], Awaitable[AccountState]],
                 marks: Callable[[str], Tick | None], counts: Counter[str]) -> None:
        self.source = source
        self.assets = assets
        self.load = load
        self.marks = marks
        self._views: OrderedDict[int, View] = OrderedDict()
        self._distrusted: dict[int, float] = {}  # user -> until when reads are full ones
        self.counts = counts  # view_reads, view_loads, full_reads, view_drops

    def distrust(self, user: int) -> None:
        """A write for ``user`` failed: full reads only, for :data:`DISTRUST_S`."""
        self._drop(user)
        self._distrusted[user] = time.monotonic() + DISTRUST_S
        if len(self._distrusted) > MAX_VIEWS:  # the oldest ones have expired first
            now = time.monotonic()
            self._distrusted = {u: t for u, t in self._distrusted.items() if t > now}

    def lists(self, user: int, position_id: int) -> bool:
        """Whether ``user``'s view holds ``position_id`` open, as of its last read: a hint
        (the position may have closed since), which the shard has the last word on."""
        view = self._views.get(user)
        return view is not None and position_id in view.positions

    async def state(self, who: Principal) -> AccountState:
        """``who``'s state: the view brought up to the ledger's newest event, or a full read
        (which loads the view)."""
        user = who.user
        until = self._distrusted.get(user)
        if until is not None:
            if time.monotonic() < until:
                self.counts["full_reads"] += 1
                return await self.load(who)
            del self._distrusted[user]
        view = self._views.get(user)
        if view is None:
            return await self._load(who)
        self._views.move_to_end(user)
        _, events = await self.source.account_events(user, view.seq)
        if self._views.get(user) is not view:  # dropped meanwhile (distrusted, evicted)
            return await self.state(who)
        if events is None or not self._apply(view, events):
            self._drop(user)
            return await self._load(who)
        state = self._answer(who, view)
        if state is None:  # a position's asset has no price here yet
            self.counts["full_reads"] += 1
            return await self.load(who)
        self.counts["view_reads"] += 1
        return state

    def _apply(self, view: View, events: list[AccountEvent]) -> bool:
        """Apply the events after ``view.seq`` in order; False when the view cannot follow
        them (a gap, a partial close, a fill whose position it was not told, too many
        positions)."""
        filled: set[int] = set()  # positions opened by fills, until shown open or closed
        for event in events:
            if event.seq <= view.seq:
                continue
            if event.seq != view.seq + 1:
                return False
            kind, body = event.kind, event.body
            if kind == account_events.BALANCE and isinstance(body, Balance):
                view.free_micros, view.margin_micros = body.free_micros, body.margin_micros
            elif kind in (account_events.POSITION_OPENED, account_events.POSITION_UPDATED) \
                    and isinstance(body, OpenPosition):
                view.positions[body.position_id] = body
            elif kind == account_events.POSITION_CLOSED and isinstance(body, ClosedPosition):
                if body.partial:
                    return False
                view.positions.pop(body.position_id, None)
                filled.discard(body.position_id)
            elif isinstance(body, EndedOrder) and body.status == OrderStatus.FILLED:
                filled.add(body.position_id)
            view.seq = event.seq
        # a fill's position is told by the positionOpened the ledger records right after it,
        # from the positions the shard's outbox answer carries: a fill delivered without them
        # leaves the position to the shard alone, and the view would leave it out for good
        return len(view.positions) <= MAX_VIEW_POSITIONS and filled <= view.positions.keys()

    async def _load(self, who: Principal) -> AccountState:
        self.counts["view_loads"] += 1
        seq, _ = await self.source.account_events(who.user, None)
        state = await self.load(who)
        if state.unavailable or len(state.positions) > MAX_VIEW_POSITIONS \
                or who.user in self._distrusted:
            return state  # incomplete, too large to mark at every read, or distrusted
        view = View(seq, state.free_micros, state.margin_micros,
                    {p.position_id: p for p in state.positions})
        self._views[who.user] = view
        self._views.move_to_end(who.user)
        while len(self._views) > MAX_VIEWS:
            self._views.popitem(last=False)
            self.counts["view_drops"] += 1
        return state

    def _answer(self, who: Principal, view: View) -> AccountState | None:
        marked: list[OpenPosition] = []
        for p in sorted(view.positions.values(), key=lambda q: (q.opened_ts_us, q.position_id)):
            tick = self.marks(p.asset)
            if tick is None:
                return None
            pnl = pnl_micros(self.assets[p.asset], p.side, p.entry_ticks, p.qty_steps,
                             exit_price_ticks(p.side, tick.bid_ticks, tick.ask_ticks))
            marked.append(p._replace(unrealized_pnl_micros=pnl))
        return AccountState.of(who, view.free_micros, view.margin_micros, marked)

    def _drop(self, user: int) -> None:
        if self._views.pop(user, None) is not None:
            self.counts["view_drops"] += 1


__all__ = ["DISTRUST_S", "MAX_VIEWS", "MAX_VIEW_POSITIONS", "AccountState", "AccountViews",
           "View"]
