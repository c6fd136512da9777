"""ShardCore: the trading logic of one shard actor, pure Python over an engine PositionBook.

A shard owns the open positions of one asset split (cluster.trading.placement.ShardSpec). It keeps the
last tick, opens positions at the tick's ask/bid (never at a client price), closes them by hand
or when a tick crosses a trigger, and puts every close into an outbox of settlements numbered
1, 2, 3... that the ledger applies exactly once (it remembers the last applied number). Nothing
here reads a clock: the shell passes ``now_us``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from engine.messages import (
    ClosedPosition,
    OpenPosition,
    SettlementItem,
    ShardClose,
    ShardOpen,
    ShardStats,
)
from cluster.trading.placement import ShardSpec
from engine.assets import Asset
from engine.book import PositionBook, PositionRecord
from engine.market import Tick
from engine.orders import CloseReason, Side, plan_open
from engine.results import Code, Rejected
from engine.settlement import exit_price_ticks, pnl_micros, settle

# How many open results a shard remembers by request id, so that a resend after a lost reply
# (or the service's in-doubt resolution) gets the first answer instead of a second position.
REMEMBERED_OPENS = 65_536
BPS = 10_000

_POSITION_COLUMNS = ("position_id", "owner", "side", "entry_ticks", "qty_steps", "margin_micros",
                     "leverage", "liq_ticks", "tp_ticks", "sl_ticks", "opened_ts_us")
_SIDES = (Side.LONG, Side.SHORT)

_ABANDONED = Rejected(Code.PRICE_UNAVAILABLE, "the open request was abandoned after a timeout")


def slippage_exceeded(exec_ticks: int, client_ticks: int, max_slippage_bps: int) -> bool:
    """True when ``exec_ticks`` differs from ``client_ticks`` by more than ``max_slippage_bps``.

    Exact integer form of ``|exec - client| / client > bps / 10000``.
    """
    return abs(exec_ticks - client_ticks) * BPS > max_slippage_bps * client_ticks


class ShardCore:
    """One shard's book, last tick and settlement outbox.

    Not thread-safe: its shell (a sync Ray actor, or a single-thread executor in-process)
    serialises the calls.
    """

    def __init__(self, spec: ShardSpec, asset: Asset, maintenance_margin_ppm: int,
                 max_price_age_us: int, capacity: int = 1024) -> None:
        if spec.asset != asset.name:
            raise ValueError(f"shard {spec.name} is for {spec.asset}, got asset {asset.name}")
        self.spec = spec
        self.asset = asset
        self.maintenance_margin_ppm = maintenance_margin_ppm
        self.max_price_age_us = max_price_age_us
        self.book = PositionBook(asset, book_tag=spec.book_tag, capacity=capacity)
        self.last_tick: Tick | None = None
        self._outbox: list[SettlementItem] = []
        self._last_seq = 0
        self._acked_seq = 0
        self._open_results: OrderedDict[int, OpenPosition | Rejected] = OrderedDict()
        self._ticks_applied = 0
        self._opens = 0
        self._closes = [0, 0, 0, 0]  # by CloseReason value

    # ----------------------------------------------------------------- market data
    def apply_ticks(self, ticks: Iterable[Tick], now_us: int) -> int:
        """Apply ticks in order: sweep triggers at each tick's bid/ask and settle what fired.

        Ticks of other assets are ignored. Returns how many positions closed; their
        settlements are appended to the outbox. ``now_us`` is unused by the sweep (closes are
        stamped with the triggering tick's time) and kept for a uniform shell signature.
        """
        del now_us
        closed = 0
        for tick in ticks:
            if (tick.asset != self.asset.name or tick.bid_ticks <= 0
                    or tick.ask_ticks < tick.bid_ticks):
                continue
            self.last_tick = tick
            self._ticks_applied += 1
            if not len(self.book):
                continue
            ids, reasons = self.book.sweep(tick.bid_ticks, tick.ask_ticks)
            for position_id, reason in zip(ids.tolist(), reasons.tolist(), strict=True):
                record = self.book.close(int(position_id))
                if record is None:  # pragma: no cover - sweep only returns open ids
                    raise AssertionError(f"sweep returned {position_id}, which is not open")
                self._settle(record, tick.bid_ticks, tick.ask_ticks, CloseReason(reason),
                             tick.ts_us)
                closed += 1
        return closed

    def _fresh_tick(self, now_us: int) -> Tick | Rejected:
        tick = self.last_tick
        if tick is None:
            return Rejected(Code.PRICE_UNAVAILABLE, f"no price for {self.asset.name} yet")
        if now_us - tick.ts_us > self.max_price_age_us:
            age_s = (now_us - tick.ts_us) / 1e6
            return Rejected(Code.PRICE_UNAVAILABLE,
                            f"the last {self.asset.name} price is {age_s:.1f} s old")
        return tick

    # ----------------------------------------------------------------- opens
    def open_many(self, requests: Sequence[ShardOpen],
                  now_us: int) -> list[OpenPosition | Rejected]:
        """Open each request at the current tick; one result per request, in order.

        A request id seen before returns its first result (nothing else happens).
        """
        out: list[OpenPosition | Rejected] = []
        for req in requests:
            previous = self._open_results.get(req.request_id)
            if previous is not None:
                out.append(previous)
                continue
            result = self._open_one(req, now_us)
            self._remember(req.request_id, result)
            out.append(result)
        return out

    def _remember(self, request_id: int, result: OpenPosition | Rejected) -> None:
        self._open_results[request_id] = result
        if len(self._open_results) > REMEMBERED_OPENS:
            self._open_results.popitem(last=False)

    def _open_one(self, req: ShardOpen, now_us: int) -> OpenPosition | Rejected:
        tick = self._fresh_tick(now_us)
        if isinstance(tick, Rejected):
            return tick
        side = Side(req.side)
        entry_ticks = tick.ask_ticks if side == Side.LONG else tick.bid_ticks
        if req.current_price_ticks is not None and slippage_exceeded(
                entry_ticks, req.current_price_ticks, req.max_slippage_bps):
            return Rejected(Code.PRICE_MOVED,
                            f"entry price {self.asset.ticks_to_price(entry_ticks)} is more than "
                            f"{req.max_slippage_bps} bps from "
                            f"{self.asset.ticks_to_price(req.current_price_ticks)}")
        plan = plan_open(self.asset, side, req.margin_micros, req.leverage, tick.bid_ticks,
                         tick.ask_ticks, req.tp_ticks, req.sl_ticks, self.maintenance_margin_ppm)
        if isinstance(plan, Rejected):
            return plan
        position_id = self.book.open(req.owner, plan, now_us)
        self._opens += 1
        mark = pnl_micros(self.asset, side, plan.entry_ticks, plan.qty_steps,
                          exit_price_ticks(side, tick.bid_ticks, tick.ask_ticks))
        return OpenPosition(position_id, req.owner, self.asset.name, side, plan.entry_ticks,
                            plan.qty_steps, plan.margin_micros, plan.leverage, plan.liq_ticks,
                            plan.tp_ticks, plan.sl_ticks, now_us, mark)

    def resolve_opens(self, request_ids: Sequence[int]) -> list[OpenPosition | Rejected | None]:
        """The result of each request id, or ``None`` if it never arrived.

        A request id that never arrived is fenced: if it arrives later it is refused, so the
        caller may safely release the margin it locked for it.
        """
        out: list[OpenPosition | Rejected | None] = []
        for request_id in request_ids:
            previous = self._open_results.get(request_id)
            if previous is None:
                self._remember(request_id, _ABANDONED)
            out.append(None if previous is None or previous is _ABANDONED else previous)
        return out

    # ----------------------------------------------------------------- closes
    def close_many(self, requests: Sequence[ShardClose],
                   now_us: int) -> list[SettlementItem | Rejected]:
        """Close each of the callers' own positions at the current closing-side price.

        Someone else's position and an unknown id get the same NOT_FOUND. A close puts its
        settlement into the outbox and returns it (with its sequence number).
        """
        out: list[SettlementItem | Rejected] = []
        for req in requests:
            out.append(self._close_one(req, now_us))
        return out

    def _close_one(self, req: ShardClose, now_us: int) -> SettlementItem | Rejected:
        record = self.book.get(req.position_id)
        if record is None or record.owner != req.owner:
            return Rejected(Code.NOT_FOUND, "no such open position")
        tick = self._fresh_tick(now_us)
        if isinstance(tick, Rejected):
            return tick
        exit_ticks = exit_price_ticks(record.side, tick.bid_ticks, tick.ask_ticks)
        if req.current_price_ticks is not None and slippage_exceeded(
                exit_ticks, req.current_price_ticks, req.max_slippage_bps):
            return Rejected(Code.PRICE_MOVED,
                            f"exit price {self.asset.ticks_to_price(exit_ticks)} is more than "
                            f"{req.max_slippage_bps} bps from "
                            f"{self.asset.ticks_to_price(req.current_price_ticks)}")
        closed = self.book.close(req.position_id)
        if closed is None:  # pragma: no cover - checked above, single-threaded
            raise AssertionError(f"position {req.position_id} vanished")
        return self._settle(closed, tick.bid_ticks, tick.ask_ticks, CloseReason.MANUAL, now_us)

    def _settle(self, record: PositionRecord, bid_ticks: int, ask_ticks: int,
                reason: CloseReason, closed_ts_us: int) -> SettlementItem:
        side = Side(record.side)
        exit_ticks = exit_price_ticks(side, bid_ticks, ask_ticks)
        s = settle(self.asset, side, record.entry_ticks, record.qty_steps, record.margin_micros,
                   exit_ticks, reason)
        closed = ClosedPosition(
            record.position_id, record.owner, self.asset.name, side, record.entry_ticks,
            record.qty_steps, record.margin_micros, record.leverage, record.liq_ticks,
            record.tp_ticks, record.sl_ticks, record.opened_ts_us, exit_ticks, s.pnl_micros,
            s.payout_micros, s.house_micros, s.insurance_micros, int(reason), closed_ts_us)
        self._last_seq += 1
        item = SettlementItem(self._last_seq, closed)
        self._outbox.append(item)
        self._closes[int(reason)] += 1
        return item

    # ----------------------------------------------------------------- outbox
    def resume_seq(self, applied_seq: int) -> None:
        """Continue numbering after ``applied_seq`` (what the ledger already applied from this
        shard), so a restarted shard never reuses a number the ledger would ignore."""
        if applied_seq > self._last_seq:
            self._last_seq = self._acked_seq = applied_seq
            self._outbox = []

    def outbox(self) -> list[SettlementItem]:
        """The settlements not yet acknowledged by the ledger, oldest first (a copy)."""
        return list(self._outbox)

    def ack_outbox(self, upto_seq: int) -> int:
        """Drop what the ledger applied (``seq <= upto_seq``); returns how many remain."""
        if upto_seq > self._acked_seq:
            self._acked_seq = min(upto_seq, self._last_seq)
            self._outbox = [item for item in self._outbox if item.seq > self._acked_seq]
        return len(self._outbox)

    # ----------------------------------------------------------------- reads
    def positions_of(self, owner: int) -> list[OpenPosition]:
        """``owner``'s open positions here, marked to the last tick (None without a tick),
        oldest first."""
        return self.positions_of_many([owner])[0]

    def positions_of_many(self, owners: Sequence[int]) -> list[list[OpenPosition]]:
        """The open positions of each owner (one list per owner, in order).

        One vectorised pass over the book for the whole batch (not one per owner): the rows
        of all asked owners, marked together, then grouped in Python.
        """
        out: list[list[OpenPosition]] = [[] for _ in owners]
        if not owners or not len(self.book):
            return out
        cols = self.book.columns()
        pid_col, owner_col = cols["position_id"], cols["owner"]
        wanted = np.asarray(sorted(set(owners)), dtype=np.int64)
        rows = np.flatnonzero((pid_col > 0) & np.isin(owner_col, wanted))
        if not rows.size:
            return out
        rows = rows[np.lexsort((pid_col[rows], cols["opened_ts_us"][rows], owner_col[rows]))]
        tick = self.last_tick
        pnls: list[int | None]
        if tick is None:
            pnls = [None] * rows.size
        else:
            pnls = self.book.unrealized_pnl_micros(pid_col[rows], tick.bid_ticks,
                                                   tick.ask_ticks).tolist()
        fields = [cols[name][rows].tolist() for name in _POSITION_COLUMNS]
        name = self.asset.name
        by_owner: dict[int, list[OpenPosition]] = {}
        for pid, own, side, entry, qty, margin, lev, liq, tp, sl, ts, pnl in zip(
                *fields, pnls, strict=True):
            by_owner.setdefault(own, []).append(OpenPosition(
                pid, own, name, _SIDES[side], entry, qty, margin, lev, liq, tp, sl, ts, pnl))
        return [list(by_owner.get(owner, ())) for owner in owners]

    def open_margins_by_user(self) -> dict[int, int]:
        """Sum of open margins per owner (micros), for the ledger audit."""
        return dict(self.book.open_margin_by_owner())

    def audit_view(self) -> tuple[dict[int, int], list[SettlementItem]]:
        """Open margins per owner and the unacknowledged settlements, read together (a close
        moves a margin from the first to the second, so reading them apart could miss it)."""
        return self.open_margins_by_user(), self.outbox()

    def stats(self) -> ShardStats:
        tick = self.last_tick
        return ShardStats(self.spec.name, self.asset.name, len(self.book), int(self.book.nbytes),
                          None if tick is None else tick.ts_us, self._ticks_applied, self._opens,
                          self._closes[0], self._closes[1], self._closes[2], self._closes[3],
                          len(self._outbox), self._last_seq)


def merge_margins(parts: Iterable[Mapping[int, int]]) -> dict[int, int]:
    """Sum per-user margins over shards."""
    total: dict[int, int] = {}
    for part in parts:
        for user, micros in part.items():
            total[user] = total.get(user, 0) + int(micros)
    return total
