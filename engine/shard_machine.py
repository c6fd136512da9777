"""ShardMachine: one shard (the open positions of one asset split) as a state machine.

A shard keeps the last tick of its asset, opens positions at that tick's ask/bid (never at a
client price), closes them by hand or when a tick crosses a trigger, and puts every close into
an outbox of settlements numbered 1, 2, 3... that the ledger applies exactly once (it remembers
the last number it applied). It remembers the answer of every open and close request by request
id (the newest :data:`REMEMBERED`), so a resend after a lost reply gets the first answer, and a
request its caller gave up on (:class:`Resolve`) is fenced: if it arrives later it is refused.
A request id is its API process's prefix (the bits above the low 32) and a counter that process
counts up (cluster.trading.service); for each prefix the shard keeps the highest counter whose
answer it forgot, so a request at or below it, remembered no more, is answered
:class:`~engine.results.Forgotten`: neither run again (a resend delayed past that many answers
would repeat it) nor fenced (it may have run: fencing it freed the margin of a position that
exists).

It follows engine.machine: :meth:`ShardMachine.decide` answers a command and returns the events
that carry it out without changing anything; :meth:`ShardMachine.apply` is the only code that
changes the state, live and in journal replay. Events (engine.events):

* ``PositionOpened``: a position entered the book, with the id the book issues next and the
  opening request's id;
* ``PositionClosed``: a position left the book as settlement ``settlement_seq`` (with the manual
  close's request id, 0 for a trigger close);
* ``TickApplied`` (volatile: rides along with the next commit): the new last tick;
* ``OpenFenced``: a request id that never arrived was given up;
* ``OutboxAcked`` (volatile): the ledger applied settlements up to a seq;
* ``SeqResumed``: the ledger applied more than this shard remembers; numbering continues;
* ``OrderPlaced``: a pending limit or stop order entered the order book (its margin is locked
  at the ledger already);
* ``PositionAmended``: an open position's TP/SL, or its margin and liquidation price, changed
  in place (SPEC "Changing an open position");
* ``OrderEnded``: an order left the order book as the next settlement seq: cancelled by its
  owner, or on a tick expired, rejected (its fill could not open), or filled (a
  ``PositionOpened`` of the position follows it in the same record);
* ``PositionReduced``: part of an open position was closed by hand as the next settlement
  seq; the rest stays open under its id (SPEC "Partial close").

A tick first sweeps the positions (their closes free rows), then the orders: a fill opens
exactly like a market open at the tick's opening-side price (engine.orders.plan_open), and is
first swept by the next tick. An order's end goes to the ledger through the outbox, numbered
with the closes: a fill keeps the margin locked (the position holds it), any other end
releases it.

A settlement's amounts are computed from the position and the exit price when its close is
applied, so ``decide`` refuses a close (or a whole tick) whose amounts would not fit an i64:
the ledger's event carrying them must always be encodable.

Nothing here reads a clock: ``now_us`` comes with each command.
"""

from __future__ import annotations

import bisect
import operator
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np

from engine import schema
from engine.amounts import ceil_div, micros_to_money
from engine.assets import Asset
from engine.book import COLUMN_NAMES, PositionBook, PositionRecord
from engine.events import (
    BATCH_TAG,
    TYPE_CODES,
    Event,
    EventError,
    OpenFenced,
    OrderEnded,
    OrderPlaced,
    OutboxAcked,
    PositionAmended,
    PositionClosed,
    PositionOpened,
    PositionReduced,
    SeqResumed,
    TickApplied,
    decode,
    record_dtype,
)
from engine.machine import SnapshotParts
from engine.market import Tick
from engine.messages import (
    ClosedPosition,
    EndedOrder,
    OpenPosition,
    PendingOrder,
    SettlementItem,
    ShardClose,
    ShardOpen,
    ShardStats,
)
from engine.order_book import (
    COLUMN_NAMES as ORDER_COLUMN_NAMES,
)
from engine.order_book import (
    OrderBook,
    OrderKind,
    OrderOutcome,
    OrderRecord,
    OrderStatus,
    OrderTerms,
    check_terms,
    placement_refusal,
)
from engine.orders import (
    MAX_COLUMN_VALUE,
    PPM,
    CloseReason,
    OpenPlan,
    Side,
    liquidation_ticks,
    plan_open,
)
from engine.position_ids import MAX_CLOSE_SEQ, partial_close_id
from engine.results import Code, Forgotten, Rejected
from engine.settlement import exit_price_ticks, pnl_micros, settle

REMEMBERED = 65_536
"""How many request answers (opens, closes, fences, orders) a shard remembers by request id;
also how many ended orders it remembers (a cancel of one answers ORDER_NOT_OPEN)."""
COUNTER_BITS = 32
"""A request id's low bits: its API process's counter; the bits above them name the process."""
_COUNTER_MASK = (1 << COUNTER_BITS) - 1
FORGOTTEN_DTYPE = np.dtype([("prefix", "<u8"), ("counter", "<u8")])
"""A snapshot's ``forgotten`` table: per request id prefix, the highest counter forgotten."""
_FEW = 64  # fewer forgotten ids than this are recorded one by one, more with numpy
BPS = 10_000
DEFAULT_MAX_CLOCK_SKEW_US = 5_000_000
"""A last tick stamped further than this ahead of the shard's clock refuses opens and closes
(MAX_CLOCK_SKEW_S' default)."""
MIN_VECTOR_RUN = 64
"""Shorter runs of ``PositionOpened`` in a journal record are decoded and applied one by one."""
OPENED_RECORD = record_dtype(PositionOpened)
"""One ``PositionOpened`` inside a batch record, byte for byte (engine.events.record_dtype)."""

_I64 = 1 << 63
_U64 = 1 << 64
_INT64_MAX = _I64 - 1
_SIDES = (Side.LONG, Side.SHORT)
_SIDE_CAST = {"side": _SIDES.__getitem__}
_OPENED_TYPE = TYPE_CODES[PositionOpened]
_OPENED_LENGTH = OPENED_RECORD.itemsize - 4
_LENGTH = struct.Struct("<I")

# Conversions between the records, each resolved by field name once (engine.schema.builder);
# the arguments after the source are the ``given`` fields, in the order named here.
_SETTLED = (*schema.POSITION, *schema.CLOSE)  # a settlement's fields but its seq and asset
_SETTLED_NAMES = schema.names(_SETTLED)
_RUN_PLAN = (*schema.TERMS, schema.maintenance_margin_ppm)  # what open_many takes per row
# (plan, position_id, owner, opened_ts_us, request_id) -> the event of an open
_OPENED_EVENT = schema.builder(PositionOpened, schema.PLAN, attributes=True,
                               given=("position_id", "owner", "opened_ts_us", "request_id"),
                               casts={"side": int})
# (PositionOpened, mm_micros) -> the plan the book opens it from
_PLAN_OF = schema.builder(OpenPlan, schema.POSITION_OPENED, given=("mm_micros",),
                          casts=_SIDE_CAST)
# (PositionOpened, asset, unrealized_pnl_micros) -> the answer of an open
_OPEN_ANSWER = schema.builder(OpenPosition, schema.POSITION_OPENED,
                              given=("asset", "unrealized_pnl_micros"), casts=_SIDE_CAST)
# (row of POSITION values, asset, unrealized_pnl_micros) -> a listed open position
_LISTED = schema.builder(OpenPosition, schema.POSITION, given=("asset", "unrealized_pnl_micros"),
                         casts=_SIDE_CAST)
_CLOSE_GIVEN = ("asset", "exit_ticks", *schema.names(schema.SETTLEMENT), "reason", "closed_ts_us",
                "close_id", "partial")
# (PositionRecord, *_CLOSE_GIVEN) -> the closed position
_CLOSED = schema.builder(ClosedPosition, schema.BOOK_ROW, given=_CLOSE_GIVEN, casts=_SIDE_CAST)
# (row of _SETTLED values, asset) -> a closed position out of a snapshot
_CLOSED_ROW = schema.builder(ClosedPosition, _SETTLED, given=("asset",), casts=_SIDE_CAST)
# (row of _SETTLED values, asset, unrealized_pnl_micros) -> an open answer out of a snapshot
_LISTED_ROW = schema.builder(OpenPosition, _SETTLED, given=("asset", "unrealized_pnl_micros"),
                             casts=_SIDE_CAST)

# Snapshot arrays, named columns (engine.schema widths): ``outbox`` one row per settlement
# (engine.schema.OUTBOX); ``results`` one row per remembered answer: its request id and kind,
# then the columns of its kind (an open: the position, ``has_pnl`` and its mark; a close: the
# settlement), zeros elsewhere.
_KIND_OPEN = 1
_KIND_FENCED = 2
_KIND_CLOSE = 3
_KIND_ORDER = 4  # a placement's PendingOrder (its fields in the snapshot's meta)
_KIND_ORDER_END = 5  # a cancel's SettlementItem of an EndedOrder (likewise)
_KINDS = {_KIND_OPEN, _KIND_FENCED, _KIND_CLOSE, _KIND_ORDER, _KIND_ORDER_END}
OUTBOX_DTYPE = schema.dtype(schema.OUTBOX)
RESULT_DTYPE = schema.dtype((schema.request_id, *schema.OUTBOX, schema.unrealized_pnl_micros),
                            before=(("kind", "u1"), ("has_pnl", "u1")))
# Older snapshots held int64 tables; the columns they had, as they were written (frozen: they
# describe files, not the schema of today). Results' columns depend on the row's kind.
_V1_POSITION = ("position_id", "owner", "side", "entry_ticks", "qty_steps", "margin_micros",
                "leverage", "liq_ticks", "tp_ticks", "sl_ticks", "opened_ts_us")
_V1_OUTBOX = ("seq", *_V1_POSITION, "exit_ticks", "pnl_micros", "payout_micros",
              "house_micros", "insurance_micros", "reason", "closed_ts_us")
_V1_CLOSE_RESULT = ("kind", "has_pnl", *_V1_OUTBOX)  # 21 columns, with ``result_ids``
_V1_OPEN_RESULT = ("kind", "has_pnl", *_V1_POSITION, "unrealized_pnl_micros")  # then zeros
# cluster.shard_store snapshots: ``open_results`` (opens and fences only)
_V0_OPEN_RESULT = ("request_id", "kind", "has_pnl", *_V1_POSITION, "unrealized_pnl_micros")

# Pending orders. (OrderRecord, asset, *ORDER_END) -> its end; (OrderTerms, *given) -> the
# event of a placement, and back; the order book's snapshot arrays are its columns under
# _ORDER_PREFIX; _ENDED_DTYPE the ended orders remembered.
_ORDER_CASTS: dict[str, Callable[[Any], Any]] = {**_SIDE_CAST, "kind": int}
# (a row of ORDER_ROW values: an OrderRecord or an OrderPlaced, asset) -> the listed order
_LISTED_ORDER = schema.builder(PendingOrder, schema.ORDER_ROW, given=("asset",),
                               casts=_ORDER_CASTS)
_ENDED_ORDER = schema.builder(EndedOrder, schema.ORDER_ROW,
                              given=("asset", *schema.names(schema.ORDER_END)),
                              casts=_ORDER_CASTS)
_PLACED_EVENT = schema.builder(OrderPlaced, schema.ORDER_TERMS, attributes=True,
                               given=("order_id", "owner", "placed_ts_us", "request_id"),
                               casts={"side": int, "kind": int})
_ORDER_OF_EVENT = schema.builder(OrderTerms, schema.ORDER_PLACED,
                                 casts={"side": Side, "kind": OrderKind})
_ORDER_PREFIX = "order."
_ENDED_DTYPE = np.dtype([("order_id", "<i8"), ("owner", "<i8"), ("status", "u1")])

_FENCED = Rejected(Code.PRICE_UNAVAILABLE, "the request was abandoned after a timeout")
_OUT_OF_RANGE = "a value is out of range"

Answer = OpenPosition | SettlementItem | PendingOrder | Rejected


# --------------------------------------------------------------------------- commands
@dataclass(frozen=True, slots=True)
class ApplyTick:
    """Sweep with ``tick`` and settle what it triggers. Answer: positions closed (int), or
    Rejected(INVALID_REQUEST) when a value would not fit (nothing changes)."""

    tick: Tick


_Request = TypeVar("_Request", ShardOpen, ShardClose)


@dataclass(frozen=True, slots=True)
class _Carried(Generic[_Request]):
    """A command carrying the request a shard executes (and its ``request_id``)."""

    request: _Request

    @property
    def request_id(self) -> int:
        return self.request.request_id


@dataclass(frozen=True, slots=True)
class Open(_Carried[ShardOpen]):
    """Open at the last tick. Answer: OpenPosition | Rejected (a seen request id: its first
    answer)."""


@dataclass(frozen=True, slots=True)
class Close(_Carried[ShardClose]):
    """Close the caller's own position at the last tick. Answer: SettlementItem | Rejected (a
    seen request id: its first answer)."""


@dataclass(frozen=True, slots=True)
class SetLevels:
    """Set, replace or remove the TP/SL of the caller's open position (None: unchanged; 0,
    engine.orders.NO_LEVEL: removed), against the last tick. Answer: OpenPosition | Rejected
    (INVALID_TRIGGER, NOT_FOUND, PRICE_UNAVAILABLE; a seen request id: its first answer)."""

    owner: int
    position_id: int
    tp_ticks: int | None
    sl_ticks: int | None
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class ChangeMargin:
    """Add ``delta_micros`` (> 0: already locked at the ledger) to the margin of the caller's
    open position, or remove it (< 0: the ledger releases it after); the liquidation price is
    recomputed. Answer: OpenPosition | Rejected (INVALID_REQUEST: a removal that would leave
    the notional above margin x max leverage, the position liquidatable at the last tick, or
    its SL not beyond the liquidation price; NOT_FOUND; PRICE_UNAVAILABLE)."""

    owner: int
    position_id: int
    delta_micros: int
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class Place:
    """Place a pending order of ``owner`` (its margin is locked at the ledger). Answer:
    PendingOrder | Rejected (a seen request id: its first answer)."""

    owner: int
    terms: OrderTerms
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel the caller's own open order. Answer: SettlementItem (its EndedOrder, for the
    ledger) | Rejected: NOT_FOUND (no such order of the caller), ORDER_NOT_OPEN (it ended
    already); a seen request id: its first answer."""

    owner: int
    order_id: int
    request_id: int = 0


# the commands a request id names: a resend (the same id, not 0) gets the first answer
_ANSWERED_ONCE = frozenset({Open, Close, SetLevels, ChangeMargin, Place, Cancel})


@dataclass(frozen=True, slots=True)
class Resolve:
    """What became of request ``request_id`` (open or close). Answer: its remembered
    OpenPosition / SettlementItem, or None: it never arrived (or was refused) and is now
    fenced, or Forgotten: its answer, if it had one, is no longer remembered."""

    request_id: int


@dataclass(frozen=True, slots=True)
class AckOutbox:
    """The ledger applied settlements ``seq <= upto_seq``. Answer: how many remain (int)."""

    upto_seq: int


@dataclass(frozen=True, slots=True)
class ResumeSeq:
    """The ledger's applied seq for this shard, at start: numbering continues after it and the
    applied settlements leave the outbox. Answer: how many remain (int)."""

    applied_seq: int


@dataclass(frozen=True, slots=True)
class Outbox:
    """Read. Answer: :class:`OutboxView`."""


@dataclass(frozen=True, slots=True)
class PositionsOf:
    """Read. Answer: list[list[OpenPosition]], one list per owner, oldest first."""

    owners: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class OrdersOf:
    """Read. Answer: list[list[PendingOrder]], one list per owner, oldest first."""

    owners: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LastTick:
    """Read. Answer: Tick | None."""


@dataclass(frozen=True, slots=True)
class OpenMargins:
    """Read. Answer: dict[int, int], margin (micros) per owner of open positions and orders."""


@dataclass(frozen=True, slots=True)
class AuditView:
    """Read. Answer: :class:`BooksView`, taken together."""


@dataclass(frozen=True, slots=True)
class Stats:
    """Read. Answer: ShardStats."""


class BooksView(NamedTuple):
    """Per owner: open margin (micros, positions and orders), open positions, open orders
    (owners with none are absent); and the unacknowledged settlements, oldest first."""

    margins: dict[int, int]
    outbox: list[SettlementItem]
    positions: dict[int, int]
    orders: dict[int, int]


class OutboxView(NamedTuple):
    """The unacknowledged settlements (oldest first) and the shard's last settlement seq (a
    shard that restarted with an empty memory shows a ``last_seq`` below the ledger's);
    ``opened``: the positions that fills among the items opened, or that partial closes among
    them left open, and that are still open (the owner's account events show them after the
    fill, or the partial close)."""

    items: list[SettlementItem]
    last_seq: int
    opened: tuple[OpenPosition, ...] = ()


class _Amendable(NamedTuple):
    """An open position a change may apply to, and the fresh tick to check it against."""

    record: PositionRecord
    tick: Tick


class ShardStateError(RuntimeError):
    """An event does not apply to the state before it (a bug, or a corrupt journal)."""


def slippage_exceeded(exec_ticks: int, client_ticks: int, max_slippage_bps: int) -> bool:
    """True when ``exec_ticks`` differs from ``client_ticks`` by more than ``max_slippage_bps``.

    Exact integer form of ``|exec - client| / client > bps / 10000``.
    """
    return abs(exec_ticks - client_ticks) * BPS > max_slippage_bps * client_ticks


def _levels_problem(asset: Asset, record: PositionRecord, tp: int, sl: int, tick: Tick
                    ) -> str | None:
    """Why TP ``tp`` / SL ``sl`` (0: none) cannot be set on ``record`` at ``tick`` (SPEC: a
    long's TP above the bid, its SL between the liquidation price and the bid; a short's TP
    below the ask, its SL between the ask and the liquidation price), or None. The bounds are
    named with their prices: the trader sees neither the liquidation price's exact value in
    every view nor the price the engine met."""
    if not (0 <= tp <= MAX_COLUMN_VALUE and 0 <= sl <= MAX_COLUMN_VALUE):
        return "take-profit and stop-loss must be positive prices in range"
    price = asset.ticks_to_price
    if record.side == Side.LONG:
        bid = tick.bid_ticks
        if tp and tp <= bid:
            return f"take-profit of a long must be above the current bid ({price(bid)})"
        if sl and not record.liq_ticks < sl < bid:
            return (f"stop-loss of a long must lie between the liquidation price "
                    f"({price(record.liq_ticks)}) and the bid ({price(bid)})")
    else:
        ask = tick.ask_ticks
        if tp and tp >= ask:
            return f"take-profit of a short must be below the current ask ({price(ask)})"
        if sl and not ask < sl < record.liq_ticks:
            return (f"stop-loss of a short must lie between the ask ({price(ask)}) and the "
                    f"liquidation price ({price(record.liq_ticks)})")
    return None


def _above_maintenance(asset: Asset, record: PositionRecord, margin_micros: int) -> bool:
    """Whether ``margin_micros`` exceeds the maintenance margin of ``record``'s quantity at its
    entry (exact: ``margin > rate * entry * quantity``)."""
    scale = 10 ** (asset.price_decimals + asset.qty_decimals)
    return margin_micros * scale > \
        record.maintenance_margin_ppm * record.entry_ticks * record.qty_steps


def _fits_i64(*values: int) -> bool:
    return all(-_I64 < v < _I64 for v in values)


# --------------------------------------------------------------------------- the machine
class ShardMachine:
    """One shard's book, last tick, settlement outbox and remembered answers.

    Config (plain values, validated here): ``name`` (the shard's name, which the ledger keys
    its applied seq by), ``book_tag`` (0..255, in every position id), ``asset``,
    ``maintenance_margin_ppm`` (0..999999), ``max_price_age_us`` (an older last tick refuses
    opens and closes), ``max_clock_skew_us`` (so does a last tick stamped further ahead of
    the shard's clock: MAX_CLOCK_SKEW_S). ``capacity``: book rows allocated up front.
    """

    def __init__(self, name: str, book_tag: int, asset: Asset, maintenance_margin_ppm: int,
                 max_price_age_us: int, *, max_clock_skew_us: int = DEFAULT_MAX_CLOCK_SKEW_US,
                 capacity: int = 1024) -> None:
        if not 0 <= maintenance_margin_ppm < PPM:
            raise ValueError("maintenance_margin_ppm must be in 0..999999")
        if max_price_age_us < 0:
            raise ValueError("max_price_age_us must be >= 0")
        if max_clock_skew_us < 0:
            raise ValueError("max_clock_skew_us must be >= 0")
        self.name = name
        self.asset = asset
        self.maintenance_margin_ppm = maintenance_margin_ppm
        self.max_price_age_us = max_price_age_us
        self.max_clock_skew_us = max_clock_skew_us
        self.book = PositionBook(asset, book_tag, capacity=capacity)
        self.orders = OrderBook(asset, book_tag, capacity=16)
        # the newest ended orders: order id -> (owner, OrderStatus), oldest first
        self._ended: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._last_tick: Tick | None = None
        self._outbox: list[SettlementItem] = []
        self._last_seq = 0
        self._acked_seq = 0
        # remembered answers, oldest first: those a snapshot held and nobody asked for yet,
        # then _results, then _unbuilt
        self._restored: _SnapshotAnswers | None = None
        self._results: OrderedDict[int, Answer] = OrderedDict()
        # answers of replayed runs of opens, newer than every entry of _results, not yet built:
        # (run rows, marks or None); see _apply_open_run
        self._unbuilt: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._unbuilt_rows = 0
        # request id prefix -> the highest counter of that prefix whose answer was forgotten
        self._forgotten: dict[int, int] = {}
        self._ticks_applied = 0
        self._opens = 0
        self._closes = [0, 0, 0, 0]  # by CloseReason value
        self._deciders: dict[type, Callable[[Any, int], tuple[Any, Sequence[Event]]]] = {
            ApplyTick: self._decide_tick,
            Open: self._decide_open,
            Close: self._decide_close,
            Resolve: self._decide_resolve,
            Place: self._decide_place,
            SetLevels: self._decide_levels,
            ChangeMargin: self._decide_margin,
            Cancel: self._decide_cancel,
            OrdersOf: self._read_orders,
            AckOutbox: self._decide_ack,
            ResumeSeq: self._decide_resume,
            Outbox: self._read_outbox,
            PositionsOf: self._read_positions,
            LastTick: self._read_last_tick,
            OpenMargins: self._read_margins,
            AuditView: self._read_audit,
            Stats: self._read_stats,
        }
        self._appliers: dict[type, Callable[[Any], None]] = {
            PositionOpened: self._apply_opened,
            PositionClosed: self._apply_closed,
            TickApplied: self._apply_tick,
            OpenFenced: self._apply_fenced,
            OutboxAcked: self._apply_acked,
            SeqResumed: self._apply_resumed,
            OrderPlaced: self._apply_placed,
            PositionAmended: self._apply_amended,
            PositionReduced: self._apply_reduced,
            OrderEnded: self._apply_order_ended,
        }

    @property
    def book_tag(self) -> int:
        return self.book.book_tag

    @property
    def last_tick(self) -> Tick | None:
        return self._last_tick

    # ----------------------------------------------------------------- decide
    def decide(self, command: Any, now_us: int) -> tuple[Any, Sequence[Event]]:
        """The answer to ``command`` and the events that carry it out; changes nothing (a
        sweep may tidy the book's trigger indexes, which hold no state of their own)."""
        try:
            decider = self._deciders[type(command)]
        except KeyError:
            raise TypeError(f"not a shard command: {type(command).__name__}") from None
        if type(command) in _ANSWERED_ONCE:
            previous = self._previous(command.request_id)
            if previous is not None:
                return previous, ()
            if self._is_forgotten(command.request_id):
                return Forgotten(command.request_id), ()
        return decider(command, now_us)

    def _decide_tick(self, command: ApplyTick, now_us: int) -> tuple[Any, Sequence[Event]]:
        tick = command.tick
        bid, ask = tick.bid_ticks, tick.ask_ticks
        if tick.asset != self.asset.name or bid <= 0 or ask < bid:
            return 0, ()
        # above the asset's bound, amounts computed from the price may not fit int64
        if ask > self.asset.max_price_ticks or not _fits_i64(tick.ts_us) \
                or not 0 <= tick.seq < _U64:
            return Rejected(Code.INVALID_REQUEST, f"tick out of range: {_OUT_OF_RANGE}"), ()
        last = self._last_tick
        if last is not None and (tick.ts_us, tick.seq) < (last.ts_us, last.seq):
            # older than the price held (a feed that restarted and reads the topic again): its
            # price is superseded, and positions opened since were checked against the newer one
            return 0, ()
        if tick == last:
            # the same tick sent again (its answer was lost): the positions it found were swept
            # then, and those opened since (filled by it, or opened at its price) are first
            # swept by the next tick; nor does it fill what was placed since
            return 0, ()
        events: list[Event] = [TickApplied(bid, ask, tick.ts_us, tick.seq, tick.source)]
        seq = self._last_seq
        closed: list[int] = []
        if len(self.book):
            ids, reasons = self.book.sweep(bid, ask)
            for position_id, reason in zip(ids.tolist(), reasons.tolist(), strict=True):
                record = self.book.get(position_id)
                if record is None:  # pragma: no cover - sweep only returns open ids
                    raise AssertionError(f"sweep returned {position_id}, which is not open")
                exit_ticks = exit_price_ticks(record.side, bid, ask)
                if not self._settles_in_range(record, exit_ticks, CloseReason(reason)):
                    return Rejected(Code.INVALID_REQUEST,
                                    f"the settlement of position {position_id} at this tick "
                                    f"is out of range"), ()
                seq += 1
                events.append(PositionClosed(position_id, reason, exit_ticks, now_us, seq))
                closed.append(position_id)
        if len(self.orders):
            events.extend(self._sweep_orders(tick, seq, closed, now_us))
        return len(closed), events

    def _sweep_orders(self, tick: Tick, seq: int, closed: list[int], now_us: int
                      ) -> list[Event]:
        """The events of the orders ``tick`` ends (after its closes ``closed``, numbered from
        ``seq + 1``): each an ``OrderEnded``, a fill's followed by the ``PositionOpened`` of
        the position it opens, with the ids the book will issue after those closes (a fill
        the book has no row left for ends rejected, INVALID_REQUEST). Expiry is
        against the tick's time (SPEC); the ends are stamped ``now_us``, the engine's time, as
        placements are (a tick is a little old when it arrives: its time would put an order's
        end before its placement)."""
        bid, ask = tick.bid_ticks, tick.ask_ticks
        ids, outcomes = self.orders.sweep(bid, ask, tick.ts_us)
        ends: list[tuple[OrderRecord, int, OpenPlan | None, str]] = []
        for order_id, outcome in zip(ids.tolist(), outcomes.tolist(), strict=True):
            order = self.orders.get(order_id)
            if order is None:  # pragma: no cover - sweep only returns open ids
                raise AssertionError(f"sweep returned order {order_id}, which is not open")
            if outcome == OrderOutcome.EXPIRED:
                ends.append((order, OrderStatus.EXPIRED, None, ""))
                continue
            plan = plan_open(self.asset, order.side, order.margin_micros, order.leverage, bid,
                             ask, order.tp_ticks or None, order.sl_ticks or None,
                             self.maintenance_margin_ppm)
            if isinstance(plan, Rejected):
                ends.append((order, OrderStatus.REJECTED, None, plan.code.value))
            else:
                ends.append((order, OrderStatus.FILLED, plan, ""))
        # a fill the book has no row for is rejected like any fill that cannot open: refusing
        # the tick instead would also leave its triggered positions open past their levels
        wanted = sum(e[2] is not None for e in ends)
        fills = iter(self.book.next_ids(wanted, closed, fitting=True))
        events: list[Event] = []
        for order, status, fill, code in ends:
            seq += 1
            position_id = 0 if fill is None else next(fills, 0)
            if fill is not None and position_id == 0:
                status, fill, code = OrderStatus.REJECTED, None, Code.INVALID_REQUEST.value
            events.append(OrderEnded(order.order_id, int(status), position_id, now_us, seq, 0,
                                     code))
            if fill is not None:
                events.append(_OPENED_EVENT(fill, position_id, order.owner, now_us, 0))
        return events

    def _fresh_tick(self, now_us: int) -> Tick | Rejected:
        tick = self._last_tick
        if tick is None:
            return Rejected(Code.PRICE_UNAVAILABLE, f"no price for {self.asset.name} yet")
        if now_us - tick.ts_us > self.max_price_age_us:
            age_s = (now_us - tick.ts_us) / 1e6
            return Rejected(Code.PRICE_UNAVAILABLE,
                            f"the last {self.asset.name} price is {age_s:.1f} s old")
        if tick.ts_us - now_us > self.max_clock_skew_us:
            # the clock stepped back past the price (or runs behind the feed's): its age is
            # unknown, and the feed drops every newer tick as from the future (or, stamped by
            # this clock, as older) until the clock is past it again; counted as fresh, the
            # price stood frozen for as long as the step, and opens and closes took it
            ahead_s = (tick.ts_us - now_us) / 1e6
            return Rejected(Code.PRICE_UNAVAILABLE,
                            f"the last {self.asset.name} price is stamped {ahead_s:.1f} s "
                            "ahead of this shard's clock")
        return tick

    def _decide_open(self, command: Open, now_us: int) -> tuple[Any, Sequence[Event]]:
        req = command.request
        request_id = req.request_id
        tick = self._fresh_tick(now_us)
        if isinstance(tick, Rejected):
            return tick, ()
        if req.side not in _SIDES:
            return Rejected(Code.INVALID_REQUEST, "side must be long or short"), ()
        side = Side(req.side)
        entry_ticks = tick.ask_ticks if side == Side.LONG else tick.bid_ticks
        moved = self._moved("entry", entry_ticks, req)
        if moved is not None:
            return moved, ()
        plan = plan_open(self.asset, side, req.margin_micros, req.leverage, tick.bid_ticks,
                         tick.ask_ticks, req.tp_ticks, req.sl_ticks, self.maintenance_margin_ppm)
        if isinstance(plan, Rejected):
            return plan, ()
        if not (0 <= req.owner <= _INT64_MAX and 0 <= request_id < _U64
                and -_INT64_MAX <= now_us <= _INT64_MAX):
            return Rejected(Code.INVALID_REQUEST, f"owner, request id or time: {_OUT_OF_RANGE}"), ()
        try:
            position_id = self.book.next_position_id()
        except OverflowError:
            return Rejected(Code.INVALID_REQUEST, "this shard holds no more positions"), ()
        event: PositionOpened = _OPENED_EVENT(plan, position_id, req.owner, now_us, request_id)
        return self._open_answer(event), (event,)

    def _decide_close(self, command: Close, now_us: int) -> tuple[Any, Sequence[Event]]:
        req = command.request
        request_id = req.request_id
        record = self.book.get(req.position_id)
        if record is None or record.owner != req.owner:
            return Rejected(Code.NOT_FOUND, "no such open position"), ()
        tick = self._fresh_tick(now_us)
        if isinstance(tick, Rejected):
            return tick, ()
        exit_ticks = exit_price_ticks(record.side, tick.bid_ticks, tick.ask_ticks)
        moved = self._moved("exit", exit_ticks, req)
        if moved is not None:
            return moved, ()
        qty = req.qty_steps
        part = record if qty in (0, record.qty_steps) else self._part(record, qty)
        if isinstance(part, Rejected):
            return part, ()
        seq = self._last_seq + 1
        if not (0 <= request_id < _U64 and _fits_i64(now_us) and seq <= MAX_CLOSE_SEQ
                and self._settles_in_range(part, exit_ticks, CloseReason.MANUAL)):
            return Rejected(Code.INVALID_REQUEST,
                            f"the settlement of this close: {_OUT_OF_RANGE}"), ()
        if part is record:
            event = PositionClosed(record.position_id, int(CloseReason.MANUAL), exit_ticks,
                                   now_us, seq, request_id)
            return self._settlement_item(record, event), (event,)
        reduced = PositionReduced(record.position_id, part.qty_steps, part.margin_micros,
                                  part.liq_ticks, exit_ticks, now_us, seq, request_id)
        return self._part_item(record, reduced), (reduced,)

    def _part(self, record: PositionRecord, qty_steps: int) -> PositionRecord | Rejected:
        """SPEC "Partial close": the part of ``record`` a close of ``qty_steps`` takes (its
        quantity and margin ``floor(margin * qty / quantity)``), with the liquidation price of
        the rest in ``liq_ticks``; or why the close is refused."""
        if not 0 < qty_steps < record.qty_steps:
            return Rejected(Code.INVALID_REQUEST,
                            "quantity must be above zero and at most the position's "
                            f"({self.asset.steps_to_qty(record.qty_steps)})")
        margin = record.margin_micros * qty_steps // record.qty_steps
        rest = record._replace(qty_steps=record.qty_steps - qty_steps,
                               margin_micros=record.margin_micros - margin)
        if not _above_maintenance(self.asset, rest, rest.margin_micros):
            return Rejected(Code.INVALID_REQUEST,
                            "the rest's margin would not exceed its maintenance margin")
        liq = liquidation_ticks(self.asset, rest.side, rest.entry_ticks, rest.qty_steps,
                                rest.margin_micros, rest.maintenance_margin_ppm)
        return record._replace(qty_steps=qty_steps, margin_micros=margin, liq_ticks=liq)

    def _amendable(self, command: SetLevels | ChangeMargin, now_us: int
                   ) -> _Amendable | Rejected:
        """The caller's open position and a fresh tick to change it against, or why not."""
        owner, position_id, request_id = command.owner, command.position_id, command.request_id
        record = self.book.get(position_id)
        if record is None or record.owner != owner:
            return Rejected(Code.NOT_FOUND, "no such open position")
        tick = self._fresh_tick(now_us)
        if isinstance(tick, Rejected):
            return tick
        if not (0 <= request_id < _U64 and _fits_i64(now_us)):
            return Rejected(Code.INVALID_REQUEST, f"request id or time: {_OUT_OF_RANGE}")
        return _Amendable(record, tick)

    def _decide_levels(self, command: SetLevels, now_us: int) -> tuple[Any, Sequence[Event]]:
        found = self._amendable(command, now_us)
        if not isinstance(found, _Amendable):
            return found, ()
        record, tick = found
        tp = record.tp_ticks if command.tp_ticks is None else command.tp_ticks
        sl = record.sl_ticks if command.sl_ticks is None else command.sl_ticks
        problem = _levels_problem(self.asset, record, tp, sl, tick)
        if problem is not None:
            return Rejected(Code.INVALID_TRIGGER, problem), ()
        event = PositionAmended(record.position_id, record.qty_steps, record.margin_micros,
                                record.liq_ticks, tp, sl, command.request_id)
        return self._listed(record._replace(tp_ticks=tp, sl_ticks=sl)), (event,)

    def _decide_margin(self, command: ChangeMargin, now_us: int) -> tuple[Any, Sequence[Event]]:
        found = self._amendable(command, now_us)
        if not isinstance(found, _Amendable):
            return found, ()
        record, tick = found
        margin = record.margin_micros + command.delta_micros
        if command.delta_micros == 0:
            return Rejected(Code.INVALID_REQUEST, "the margin change must not be zero"), ()
        if margin <= 0:
            return Rejected(Code.INVALID_REQUEST, "a removal must leave some margin: the "
                            f"position holds {micros_to_money(record.margin_micros)}"), ()
        if margin > MAX_COLUMN_VALUE:
            return Rejected(Code.INVALID_REQUEST, "the margin would exceed the most a position "
                            f"may hold ({micros_to_money(MAX_COLUMN_VALUE)})"), ()
        problem = self._margin_problem(record, margin, tick, command.delta_micros < 0)
        if problem is not None:
            return Rejected(Code.INVALID_REQUEST, problem), ()
        liq = liquidation_ticks(self.asset, record.side, record.entry_ticks, record.qty_steps,
                                margin, record.maintenance_margin_ppm)
        if liq > MAX_COLUMN_VALUE:  # a short's margin far above its notional: out of the book
            return Rejected(Code.INVALID_REQUEST, "the margin would move the liquidation price "
                                                  "out of range"), ()
        event = PositionAmended(record.position_id, record.qty_steps, margin, liq,
                                record.tp_ticks, record.sl_ticks, command.request_id)
        return self._listed(record._replace(margin_micros=margin, liq_ticks=liq)), (event,)

    def _margin_problem(self, record: PositionRecord, margin: int, tick: Tick,
                        removal: bool) -> str | None:
        """Why ``record`` cannot hold ``margin`` (SPEC "Changing an open position": only a
        removal is refused, for one of three reasons), or None. A margin at or below the
        maintenance margin is no reason of its own: with a rate of at least 1 / max leverage
        it can meet the leverage bound while the price, moved in the position's favour, has
        not reached its liquidation price (which then lies at or past the entry)."""
        if not removal:
            return None
        asset = self.asset
        scale = 10 ** (asset.price_decimals + asset.qty_decimals)
        notional = record.entry_ticks * record.qty_steps  # in micros: * 10**6 / scale
        if notional * 10**6 > margin * asset.max_leverage * scale:
            least = ceil_div(notional * 10**6, asset.max_leverage * scale)
            return (f"the notional would exceed the margin times the maximum leverage "
                    f"({asset.max_leverage}): the margin must stay at least "
                    f"{micros_to_money(least)} USD")
        liq = liquidation_ticks(asset, record.side, record.entry_ticks, record.qty_steps, margin,
                                record.maintenance_margin_ppm)
        long = record.side == Side.LONG
        if (tick.bid_ticks <= liq) if long else (tick.ask_ticks >= liq):
            return "the position would be liquidated at the current price"
        if record.sl_ticks and ((record.sl_ticks <= liq) if long else (record.sl_ticks >= liq)):
            return "the stop-loss would no longer lie beyond the liquidation price"
        return None

    def _listed(self, record: PositionRecord) -> OpenPosition:
        """``record`` as an answer, marked to the last tick."""
        mark = self._mark(record.side, record.entry_ticks, record.qty_steps)
        listed: OpenPosition = _LISTED(record, self.asset.name, mark)
        return listed

    def _mark(self, side: Side, entry_ticks: int, qty_steps: int) -> int | None:
        """Unrealized PnL (micros) of a position at the last tick's closing-side price, None
        without a tick."""
        tick = self._last_tick
        return None if tick is None else pnl_micros(
            self.asset, side, entry_ticks, qty_steps,
            exit_price_ticks(side, tick.bid_ticks, tick.ask_ticks))

    def _decide_place(self, command: Place, now_us: int) -> tuple[Any, Sequence[Event]]:
        terms = command.terms
        try:
            check_terms(self.asset, terms)
        except ValueError as exc:
            return Rejected(Code.INVALID_REQUEST, f"order: {exc}"), ()
        if terms.expires_ts_us and terms.expires_ts_us <= now_us:
            return Rejected(Code.INVALID_REQUEST, "expiresAt is not in the future"), ()
        refused = placement_refusal(self.asset, terms)
        if refused is not None:
            return refused, ()
        if not (0 <= command.owner <= _INT64_MAX and 0 <= command.request_id < _U64
                and _fits_i64(now_us)):
            return Rejected(Code.INVALID_REQUEST, f"owner, request id or time: {_OUT_OF_RANGE}"), ()
        try:
            order_id = self.orders.next_order_id()
        except OverflowError:
            return Rejected(Code.INVALID_REQUEST, "this shard holds no more orders"), ()
        event: OrderPlaced = _PLACED_EVENT(terms, order_id, command.owner, now_us,
                                           command.request_id)
        return self._order_answer(event), (event,)

    def _decide_cancel(self, command: Cancel, now_us: int) -> tuple[Any, Sequence[Event]]:
        order = self.orders.get(command.order_id)
        if order is None or order.owner != command.owner:
            ended = self._ended.get(command.order_id) if order is None else None
            if ended is not None and ended[0] == command.owner:
                return Rejected(Code.ORDER_NOT_OPEN,
                                f"the order is {OrderStatus(ended[1]).label} already"), ()
            return Rejected(Code.NOT_FOUND, "no such open order"), ()
        if not (0 <= command.request_id < _U64 and _fits_i64(now_us)):
            return Rejected(Code.INVALID_REQUEST, f"request id or time: {_OUT_OF_RANGE}"), ()
        event = OrderEnded(order.order_id, int(OrderStatus.CANCELLED), 0, now_us,
                           self._last_seq + 1, command.request_id, "")
        return self._ended_item(order, event), (event,)

    def _moved(self, what: str, price_ticks: int, req: ShardOpen | ShardClose) -> Rejected | None:
        """PRICE_MOVED when the request gives its ``current_price_ticks`` and the price it would
        execute at (``what``: entry or exit) is more than its ``max_slippage_bps`` from it."""
        if req.current_price_ticks is None or not slippage_exceeded(
                price_ticks, req.current_price_ticks, req.max_slippage_bps):
            return None
        return Rejected(Code.PRICE_MOVED,
                        f"{what} price {self.asset.ticks_to_price(price_ticks)} is more than "
                        f"{req.max_slippage_bps} bps from "
                        f"{self.asset.ticks_to_price(req.current_price_ticks)}")

    def _previous(self, request_id: int) -> Answer | None:
        """The first answer of request ``request_id`` (None: not seen, or 0: none given)."""
        return self._answer_of(request_id) if request_id else None

    def _order_answer(self, event: OrderPlaced) -> PendingOrder:
        order: PendingOrder = _LISTED_ORDER(event, self.asset.name)
        return order

    def _ended_item(self, order: OrderRecord, event: OrderEnded) -> SettlementItem:
        ended: EndedOrder = _ENDED_ORDER(order, self.asset.name, event.status,
                                         event.position_id, event.ended_ts_us,
                                         event.reject_code)
        return SettlementItem(event.settlement_seq, ended)

    def _decide_resolve(self, command: Resolve, now_us: int) -> tuple[Any, Sequence[Event]]:
        request_id = command.request_id
        if not 0 < request_id < _U64:
            return None, ()  # 0 names no request; nothing is remembered under it
        previous = self._answer_of(request_id)
        if previous is None:
            if self._is_forgotten(request_id):
                return Forgotten(request_id), ()  # (refused when it arrives all the same)
            return None, (OpenFenced(request_id),)
        return (None if isinstance(previous, Rejected) else previous), ()

    def _decide_ack(self, command: AckOutbox | ResumeSeq, now_us: int
                    ) -> tuple[Any, Sequence[Event]]:
        upto = command.upto_seq if isinstance(command, AckOutbox) else command.applied_seq
        upto = min(upto, self._last_seq)
        if upto <= self._acked_seq:
            return len(self._outbox), ()
        return self._last_seq - upto, (OutboxAcked(upto),)

    def _decide_resume(self, command: ResumeSeq, now_us: int) -> tuple[Any, Sequence[Event]]:
        if command.applied_seq > self._last_seq:
            if command.applied_seq + len(self._outbox) >= _U64:
                return Rejected(Code.INVALID_REQUEST, f"applied seq: {_OUT_OF_RANGE}"), ()
            return len(self._outbox), (SeqResumed(command.applied_seq),)  # renumbered after it
        return self._decide_ack(command, now_us)

    def _settles_in_range(self, record: PositionRecord, exit_ticks: int,
                          reason: CloseReason) -> bool:
        s = settle(self.asset, record.side, record.entry_ticks, record.qty_steps,
                   record.margin_micros, exit_ticks, reason)
        return _fits_i64(s.pnl_micros, s.payout_micros, s.house_micros, s.insurance_micros)

    def _open_answer(self, event: PositionOpened) -> OpenPosition:
        """The answer of an open: the position marked to the last tick (what decide saw, and
        what apply sees when it remembers the answer)."""
        mark = self._mark(_SIDES[event.side], event.entry_ticks, event.qty_steps)
        answer: OpenPosition = _OPEN_ANSWER(event, self.asset.name, mark)
        return answer

    def _settlement_item(self, record: PositionRecord, event: PositionClosed | PositionReduced,
                         reason: int = CloseReason.MANUAL, close_id: int = 0,
                         partial: int = 0) -> SettlementItem:
        """The settlement of closing ``record`` (the whole position, or a part of it) as
        ``event`` says; a whole close is named by its position's id."""
        s = settle(self.asset, record.side, record.entry_ticks, record.qty_steps,
                   record.margin_micros, event.exit_ticks, CloseReason(reason))
        return SettlementItem(event.settlement_seq, _CLOSED(
            record, self.asset.name, event.exit_ticks, s.pnl_micros, s.payout_micros,
            s.house_micros, s.insurance_micros, int(reason), event.ts_us,
            close_id or record.position_id, partial))

    def _part_item(self, record: PositionRecord, event: PositionReduced) -> SettlementItem:
        """The settlement of the part of ``record`` that ``event`` closes (the position's other
        values, its liquidation price included, as they were)."""
        part = record._replace(qty_steps=event.closed_qty_steps,
                               margin_micros=event.closed_margin_micros)
        return self._settlement_item(part, event, CloseReason.MANUAL,
                                     partial_close_id(event.settlement_seq, self.book_tag), 1)

    # ----------------------------------------------------------------- reads
    def _read_outbox(self, command: Outbox, now_us: int) -> tuple[Any, Sequence[Event]]:
        items = list(self._outbox)
        return OutboxView(items, self._last_seq, self._still_open(items)), ()

    def _still_open(self, items: Sequence[SettlementItem]) -> tuple[OpenPosition, ...]:
        """The positions still open that the fills among ``items`` opened or their partial
        closes left open; read with the items in one call, so a delivery never has a fill
        without its position, nor a partial close without what stays open of it."""
        wanted = {item.closed.position_id: item.closed.owner for item in items
                  if (isinstance(item.closed, EndedOrder)
                      and item.closed.status == OrderStatus.FILLED)
                  or (isinstance(item.closed, ClosedPosition) and item.closed.partial)}
        if not wanted:
            return ()
        return tuple(p for positions in self.positions_of_many(sorted(set(wanted.values())))
                     for p in positions if wanted.get(p.position_id) == p.owner)

    def _read_positions(self, command: PositionsOf, now_us: int
                        ) -> tuple[Any, Sequence[Event]]:
        return self.positions_of_many(command.owners), ()

    def _read_last_tick(self, command: LastTick, now_us: int) -> tuple[Any, Sequence[Event]]:
        return self._last_tick, ()

    def _read_margins(self, command: OpenMargins, now_us: int) -> tuple[Any, Sequence[Event]]:
        return self.open_margins(), ()

    def _read_audit(self, command: AuditView, now_us: int) -> tuple[Any, Sequence[Event]]:
        return BooksView(self.open_margins(), list(self._outbox), self.book.open_count_by_owner(),
                         self.orders.open_count_by_owner()), ()

    def open_margins(self) -> dict[int, int]:
        """Margin (micros) per owner held by open positions and open orders."""
        margins = self.book.open_margin_by_owner()
        for owner, margin in self.orders.open_margin_by_owner().items():
            margins[owner] = margins.get(owner, 0) + margin
        return margins

    def _read_orders(self, command: OrdersOf, now_us: int) -> tuple[Any, Sequence[Event]]:
        wanted = set(command.owners)
        by_owner: dict[int, list[PendingOrder]] = {}
        if wanted and len(self.orders):
            cols = self.orders.columns()
            rows = np.flatnonzero((cols["order_id"] > 0)
                                  & np.isin(cols["owner"], np.fromiter(wanted, np.int64)))
            rows = rows[np.lexsort((cols["order_id"][rows], cols["placed_ts_us"][rows]))]
            name = self.asset.name
            for order_id in cols["order_id"][rows].tolist():
                record = self.orders.get(order_id)
                assert record is not None
                by_owner.setdefault(record.owner, []).append(_LISTED_ORDER(record, name))
        return [list(by_owner.get(owner, ())) for owner in command.owners], ()

    def _read_stats(self, command: Stats, now_us: int) -> tuple[Any, Sequence[Event]]:
        tick = self._last_tick
        c = self._closes
        return ShardStats(self.name, self.asset.name, len(self.book), int(self.book.nbytes),
                          None if tick is None else tick.ts_us, self._ticks_applied,
                          self._opens, c[0], c[1], c[2], c[3], len(self._outbox),
                          self._last_seq, len(self.orders)), ()

    def positions_of_many(self, owners: Sequence[int]) -> list[list[OpenPosition]]:
        """The open positions of each owner (one list per owner, in order), marked to the last
        tick (None without one), oldest first: one vectorised pass over the book for all."""
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
        tick = self._last_tick
        pnls: list[int | None]
        if tick is None:
            pnls = [None] * rows.size
        else:
            pnls = self.book.unrealized_pnl_micros(pid_col[rows], tick.bid_ticks,
                                                   tick.ask_ticks).tolist()
        name = self.asset.name
        by_owner: dict[int, list[OpenPosition]] = {}
        live = {f.name: cols[f.column][rows] for f in schema.POSITION}
        for row, pnl in zip(schema.rows(live, schema.POSITION), pnls, strict=True):
            position: OpenPosition = _LISTED(row, name, pnl)
            by_owner.setdefault(position.owner, []).append(position)
        return [list(by_owner.get(owner, ())) for owner in owners]

    # ----------------------------------------------------------------- apply
    def apply(self, event: Event) -> None:
        """Change the state by one event (live after decide, and in journal replay)."""
        try:
            applier = self._appliers[type(event)]
        except KeyError:
            raise ShardStateError(f"not a shard event: {event!r}") from None
        applier(event)

    def _all_answers(self) -> list[tuple[int, Answer]]:
        """Every remembered ``(request_id, answer)``, oldest first (builds the snapshot's
        answers for this list only: a fingerprint, not a request)."""
        self._build_runs()
        restored = [] if self._restored is None else self._restored.items()
        return [*restored, *self._results.items()]

    def _answer_of(self, request_id: int) -> Answer | None:
        """The first answer of ``request_id`` if it is remembered (builds only that one of
        a snapshot's, and the replayed runs of opens)."""
        self._build_runs()
        answer = self._results.get(request_id)
        if answer is None and self._restored is not None:
            answer = self._restored.get(request_id)
        return answer

    def _is_forgotten(self, request_id: int) -> bool:
        """Whether ``request_id`` (not remembered) may have been answered and forgotten: its
        counter is at or below the highest forgotten one of its prefix."""
        return bool(request_id) and \
            request_id & _COUNTER_MASK <= self._forgotten.get(request_id >> COUNTER_BITS, -1)

    def _forgot(self, request_ids: Sequence[int] | np.ndarray) -> None:
        """The answers of ``request_ids`` (0: none given, skipped) are forgotten: raise each
        prefix's highest forgotten counter."""
        marks = self._forgotten
        if len(request_ids) < _FEW:
            for rid in (request_ids.tolist() if isinstance(request_ids, np.ndarray)
                        else request_ids):
                prefix, counter = rid >> COUNTER_BITS, rid & _COUNTER_MASK
                if rid and counter > marks.get(prefix, -1):
                    marks[prefix] = counter
            return
        ids = np.asarray(request_ids, dtype=np.uint64)
        ids = ids[ids != 0]
        prefixes, counters = ids >> np.uint64(COUNTER_BITS), ids & np.uint64(_COUNTER_MASK)
        # a prefix at a time: a journal's runs come from a few API processes (np.unique
        # sorted a replay's every forgotten id, a tenth of a 1M-position recovery)
        while prefixes.size:
            prefix = prefixes[0]
            mine = prefixes == prefix
            counter = int(counters[mine].max())
            if counter > marks.get(int(prefix), -1):
                marks[int(prefix)] = counter
            others = ~mine
            prefixes, counters = prefixes[others], counters[others]

    def _remembered(self) -> int:
        return (len(self._results) + self._unbuilt_rows
                + (0 if self._restored is None else len(self._restored)))

    def _forget_oldest(self, count: int) -> None:
        """Forget the ``count`` oldest answers of the snapshot's and of ``_results``."""
        restored = self._restored
        if restored is not None:
            forgotten = restored.forget_oldest(count)
            self._forgot(forgotten)
            count -= len(forgotten)
            if not len(restored):
                self._restored = None
        results = self._results
        if count >= len(results):
            self._forgot(list(results))
            results.clear()
        else:
            self._forgot([results.popitem(last=False)[0] for _ in range(count)])

    def _results_built(self) -> OrderedDict[int, Answer]:
        """``_results`` with the replayed runs of opens built into it."""
        self._build_runs()
        return self._results

    def _build_runs(self) -> None:
        """Build the answers of replayed runs of opens (they go after ``_results``)."""
        if self._unbuilt:
            name = self.asset.name
            results = self._results
            for run, marks in self._unbuilt:
                pnls: list[int | None] = [None] * int(run.size) if marks is None \
                    else marks.tolist()
                for rid, row, pnl in zip(run["request_id"].tolist(),
                                         schema.rows(run, schema.POSITION), pnls, strict=True):
                    results[rid] = _LISTED(row, name, pnl)
            self._unbuilt = []
            self._unbuilt_rows = 0

    def _remember(self, request_id: int, answer: Answer) -> None:
        self._build_runs()
        restored = self._restored
        if restored is not None and request_id in restored:
            # an answer given again keeps its place (as in an OrderedDict): build them all
            # into _results first (journals never do this; decide returns the first answer)
            self._results = OrderedDict([*restored.items(), *self._results.items()])
            self._restored = None
        self._results[request_id] = answer
        excess = self._remembered() - REMEMBERED
        if excess > 0:
            self._forget_oldest(excess)

    def _apply_opened(self, event: PositionOpened) -> None:
        plan: OpenPlan = _PLAN_OF(event, 0)
        position_id = self.book.open(event.owner, plan, event.opened_ts_us)
        if position_id != event.position_id:
            raise ShardStateError(f"the book issued id {position_id} for the open journaled as "
                                  f"{event.position_id}")
        self._opens += 1
        if event.request_id:
            self._remember(event.request_id, self._open_answer(event))

    def _apply_closed(self, event: PositionClosed) -> None:
        CloseReason(event.reason)  # ValueError before anything changes
        if event.settlement_seq != self._last_seq + 1:
            raise ShardStateError(f"settlement {event.settlement_seq} of position "
                                  f"{event.position_id} after {self._last_seq}")
        record = self.book.close(event.position_id)
        if record is None:
            raise ShardStateError(f"closed position {event.position_id} is not open")
        self._to_outbox(self._settlement_item(record, event, event.reason), event.request_id)
        self._closes[event.reason] += 1

    def _apply_reduced(self, event: PositionReduced) -> None:
        if event.settlement_seq != self._last_seq + 1:
            raise ShardStateError(f"settlement {event.settlement_seq} of a part of position "
                                  f"{event.position_id} after {self._last_seq}")
        record = self.book.get(event.position_id)
        if record is None or not 0 < event.closed_qty_steps < record.qty_steps \
                or not 0 <= event.closed_margin_micros <= record.margin_micros:
            raise ShardStateError(f"position {event.position_id} is not open or smaller than "
                                  f"its closed part")
        item = self._part_item(record, event)
        self.book.amend(event.position_id, qty_steps=record.qty_steps - event.closed_qty_steps,
                        margin_micros=record.margin_micros - event.closed_margin_micros,
                        liq_ticks=event.rest_liq_ticks)
        self._to_outbox(item, event.request_id)

    def _to_outbox(self, item: SettlementItem, request_id: int) -> None:
        """``item`` is the next settlement for the ledger (and the answer of ``request_id``)."""
        self._outbox.append(item)
        self._last_seq = item.seq
        if request_id:
            self._remember(request_id, item)

    def _apply_amended(self, event: PositionAmended) -> None:
        record = self.book.amend(event.position_id, qty_steps=event.qty_steps,
                                 margin_micros=event.margin_micros, liq_ticks=event.liq_ticks,
                                 tp_ticks=event.tp_ticks, sl_ticks=event.sl_ticks)
        if record is None:
            raise ShardStateError(f"amended position {event.position_id} is not open")
        if event.request_id:
            self._remember(event.request_id, self._listed(record))

    def _apply_placed(self, event: OrderPlaced) -> None:
        order_id = self.orders.place(event.owner, _ORDER_OF_EVENT(event), event.placed_ts_us)
        if order_id != event.order_id:
            raise ShardStateError(f"the order book issued id {order_id} for the order journaled "
                                  f"as {event.order_id}")
        if event.request_id:
            self._remember(event.request_id, self._order_answer(event))

    def _apply_order_ended(self, event: OrderEnded) -> None:
        status = OrderStatus(event.status)  # ValueError before anything changes
        if status is OrderStatus.OPEN or event.settlement_seq != self._last_seq + 1:
            raise ShardStateError(f"order {event.order_id} ended {status.label} as settlement "
                                  f"{event.settlement_seq} after {self._last_seq}")
        order = self.orders.remove(event.order_id)
        if order is None:
            raise ShardStateError(f"ended order {event.order_id} is not open")
        self._to_outbox(self._ended_item(order, event), event.request_id)
        self._ended[event.order_id] = (order.owner, int(status))
        if len(self._ended) > REMEMBERED:
            self._ended.popitem(last=False)

    def _apply_tick(self, event: TickApplied) -> None:
        self._last_tick = Tick(self.asset.name, event.bid_ticks, event.ask_ticks, event.ts_us,
                               event.seq, event.source)
        self._ticks_applied += 1

    def _apply_fenced(self, event: OpenFenced) -> None:
        if self._answer_of(event.request_id) is None:
            self._remember(event.request_id, _FENCED)

    def _apply_acked(self, event: OutboxAcked) -> None:
        acked = max(self._acked_seq, min(event.upto_seq, self._last_seq))
        cut = bisect.bisect_right(self._outbox, acked, key=lambda item: item.seq)
        del self._outbox[:cut]
        self._acked_seq = acked

    def _apply_resumed(self, event: SeqResumed) -> None:
        if event.applied_seq <= self._last_seq:
            raise ShardStateError(f"resume at {event.applied_seq}, not after {self._last_seq}")
        # The ledger applied numbers up to ``applied_seq`` from an earlier life of this shard,
        # so the closes numbered since (from 1, by a shard that restarted empty) were ignored
        # as resends: they continue after it, none is lost.
        self._outbox = [SettlementItem(event.applied_seq + i, item.closed)
                        for i, item in enumerate(self._outbox, start=1)]
        self._acked_seq = event.applied_seq
        self._last_seq = event.applied_seq + len(self._outbox)

    # ----------------------------------------------------------------- recovery
    def decode_record(self, payload: bytes) -> list[Any]:
        """The items of one journal record: events, except that a run of at least
        :data:`MIN_VECTOR_RUN` consecutive ``PositionOpened`` comes as one read-only structured
        array (:data:`OPENED_RECORD`), decoded without a Python object per position."""
        if not payload or payload[0] != BATCH_TAG:
            return [decode(payload)]
        items: list[Any] = []
        size = len(payload)
        pos = 1
        while pos < size:
            if pos + _LENGTH.size > size:
                raise EventError("batch record ends inside a length field")
            (n,) = _LENGTH.unpack_from(payload, pos)
            if n == _OPENED_LENGTH and pos + 4 < size and payload[pos + 4] == _OPENED_TYPE:
                count = (size - pos) // OPENED_RECORD.itemsize
                if count >= MIN_VECTOR_RUN:
                    run = np.frombuffer(payload, OPENED_RECORD, count=count, offset=pos)
                    ok = (run["length"] == _OPENED_LENGTH) & (run["type"] == _OPENED_TYPE)
                    stop = count if ok.all() else int(np.argmin(ok))
                    if stop >= MIN_VECTOR_RUN:
                        items.append(run[:stop])
                        pos += stop * OPENED_RECORD.itemsize
                        continue
            end = pos + 4 + n
            if end > size:
                raise EventError("batch record shorter than its length fields")
            items.append(decode(payload[pos + 4 : end]))
            pos = end
        return items

    def apply_batch(self, items: list[Any]) -> None:
        """Apply the items of one record as :meth:`decode_record` gave them: a run of opens
        goes into the book with one vectorised ``open_many`` (the same rows and ids as one open
        after the other: free rows are reused in the same order); the rest one by one."""
        for item in items:
            if isinstance(item, np.ndarray):
                self._apply_open_run(item)
            else:
                self.apply(item)

    def _apply_open_run(self, run: np.ndarray) -> None:
        plans = {f.name: run[f.name].astype(np.int64) for f in _RUN_PLAN}
        ids = self.book.open_many(run["owner"].astype(np.int64), plans,
                                  run["opened_ts_us"].astype(np.int64))
        if not np.array_equal(ids, run["position_id"].astype(np.int64)):
            raise ShardStateError("replayed opens got other ids than the journaled ones")
        self._opens += int(run.size)
        # The answers are built only when asked for (most of a long replay's are forgotten
        # before then): keep the newest REMEMBERED rows, marked to the tick of this moment.
        cut = max(0, run.size - REMEMBERED)
        self._forgot(run["request_id"][:cut])  # (remembered and forgotten in this run)
        tail = run[cut:]
        tail = tail[tail["request_id"] != 0]
        if not tail.size:
            return
        tick = self._last_tick
        marks = None if tick is None else self.book.unrealized_pnl_micros(
            tail["position_id"].astype(np.int64), tick.bid_ticks, tick.ask_ticks)
        self._unbuilt.append((tail, marks))
        self._unbuilt_rows += int(tail.size)
        excess = self._remembered() - REMEMBERED
        if excess <= 0:
            return
        older = self._remembered() - self._unbuilt_rows  # the snapshot's and _results
        self._forget_oldest(min(excess, older))
        excess -= min(excess, older)
        while excess > 0:
            oldest, oldest_marks = self._unbuilt[0]
            cut = min(excess, int(oldest.size))
            self._forgot(oldest["request_id"][:cut])
            if cut == oldest.size:
                self._unbuilt.pop(0)
            else:
                self._unbuilt[0] = (oldest[cut:], None if oldest_marks is None
                                    else oldest_marks[cut:])
            self._unbuilt_rows -= cut
            excess -= cut

    # ----------------------------------------------------------------- snapshots
    def snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Copies of the whole state: the book's columns (engine.book.PositionBook.to_arrays),
        ``outbox`` (:data:`OUTBOX_DTYPE`, one row per settlement) and ``results``
        (:data:`RESULT_DTYPE`, one row per remembered answer, in remembering order), structured
        arrays with named columns; counters, seqs and the last tick in ``meta``."""
        arrays = self.book.to_arrays()
        arrays.update({_ORDER_PREFIX + k: v for k, v in self.orders.to_arrays().items()})
        closes = [item for item in self._outbox if isinstance(item.closed, ClosedPosition)]
        arrays["outbox"] = _outbox_array(closes)
        arrays["results"], order_results = _results_array(self._results_built())
        if self._restored is not None:  # the snapshot's answers nobody asked for go first
            arrays["results"], order_results = self._restored.before(arrays["results"],
                                                                    order_results)
        arrays["ended_orders"] = np.array([(oid, owner, status) for oid, (owner, status)
                                           in self._ended.items()], dtype=_ENDED_DTYPE)
        arrays["forgotten"] = np.array(sorted(self._forgotten.items()), dtype=FORGOTTEN_DTYPE)
        tick = self._last_tick
        meta = {
            # ended orders waiting for the ledger, and remembered order answers (by their row
            # in ``results``): [seq or row, *their fields]
            "order_outbox": [[item.seq, *item.closed] for item in self._outbox
                             if isinstance(item.closed, EndedOrder)],
            "order_results": order_results,
            "shard": self.name,
            "asset": self.asset.name,
            "last_seq": self._last_seq,
            "acked_seq": self._acked_seq,
            "last_tick": None if tick is None else [tick.bid_ticks, tick.ask_ticks, tick.ts_us,
                                                    tick.seq, tick.source],
            "ticks_applied": self._ticks_applied,
            "opens": self._opens,
            "closes": list(self._closes),
        }
        return arrays, meta

    @classmethod
    def restore(cls, name: str, book_tag: int, asset: Asset, maintenance_margin_ppm: int,
                max_price_age_us: int, snapshot: SnapshotParts | None, *,
                max_clock_skew_us: int = DEFAULT_MAX_CLOCK_SKEW_US) -> ShardMachine:
        """The machine from a loaded snapshot, or a fresh one when None."""
        if snapshot is None:
            return cls(name, book_tag, asset, maintenance_margin_ppm, max_price_age_us,
                       max_clock_skew_us=max_clock_skew_us)
        return cls.from_snapshot(name, book_tag, asset, maintenance_margin_ppm,
                                 max_price_age_us, snapshot.arrays, snapshot.meta,
                                 max_clock_skew_us=max_clock_skew_us)

    @classmethod
    def from_snapshot(cls, name: str, book_tag: int, asset: Asset, maintenance_margin_ppm: int,
                      max_price_age_us: int, arrays: Mapping[str, np.ndarray],
                      meta: Mapping[str, Any], *,
                      max_clock_skew_us: int = DEFAULT_MAX_CLOCK_SKEW_US) -> ShardMachine:
        """The machine from :meth:`snapshot`'s ``(arrays, meta)``; also reads the older
        snapshots (int64 tables: ``outbox``, ``results`` with ``result_ids``; and those of
        cluster.shard_store, remembered opens in ``open_results``). ValueError if they do not
        fit this config. The books take the columns of ``arrays`` as their own (a snapshot
        read for the machine): a caller that keeps using them passes copies."""
        if meta["asset"] != asset.name:
            raise ValueError(f"snapshot holds {meta['asset']}, shard trades {asset.name}")
        machine = cls(name, book_tag, asset, maintenance_margin_ppm, max_price_age_us,
                      max_clock_skew_us=max_clock_skew_us)
        book_arrays = {k: arrays[k] for k in (*COLUMN_NAMES, "free_head")}
        machine.book = PositionBook.from_arrays(asset, book_tag, book_arrays, copy=False)
        if _ORDER_PREFIX + "free_head" in arrays:
            machine.orders = OrderBook.from_arrays(asset, book_tag, {
                k: arrays[_ORDER_PREFIX + k] for k in (*ORDER_COLUMN_NAMES, "free_head")},
                copy=False)
            for oid, owner, status in arrays["ended_orders"].tolist():
                machine._ended[oid] = (owner, status)
        outbox = schema.fill_close_ids(
            schema.named_columns(arrays["outbox"], _V1_OUTBOX, len(_V1_OUTBOX)))
        ended = [SettlementItem(seq, _ended_order(values))
                 for seq, *values in meta.get("order_outbox", ())]
        machine._outbox = sorted([*_outbox_items(asset.name, outbox), *ended],
                                 key=operator.attrgetter("seq"))
        if "results" not in arrays:
            results = _v0_results(np.asarray(arrays["open_results"]))
        elif arrays["results"].dtype.names is None:
            results = _v1_results(np.asarray(arrays["result_ids"]), arrays["results"])
        else:
            results = arrays["results"]
        if len(results):
            machine._restored = _SnapshotAnswers(asset.name, results,
                                                 meta.get("order_results", ()))
        if "forgotten" in arrays:  # (older snapshots: none recorded)
            forgotten = arrays["forgotten"]
            machine._forgotten = dict(zip(forgotten["prefix"].tolist(),
                                          forgotten["counter"].tolist(), strict=True))
        machine._last_seq = int(meta["last_seq"])
        machine._acked_seq = int(meta["acked_seq"])
        tick = meta["last_tick"]
        if tick is not None:
            machine._last_tick = Tick(asset.name, tick[0], tick[1], tick[2], tick[3], tick[4])
        machine._ticks_applied = int(meta["ticks_applied"])
        machine._opens = int(meta["opens"])
        machine._closes = [int(x) for x in meta["closes"]]
        return machine

    # ----------------------------------------------------------------- invariants
    def check(self) -> list[str]:
        """Differences from the invariants ([] when they hold): the book's own check; the
        outbox holds exactly settlements ``acked_seq + 1 .. last_seq``, none of them still
        open (but the rest of a partial close); opens minus closes counted equals the
        positions held. O(N)."""
        problems = self.book.check() + self.orders.check()
        seqs = [item.seq for item in self._outbox]
        if seqs != list(range(self._acked_seq + 1, self._last_seq + 1)):
            problems.append(f"outbox seqs {seqs[:3]}... are not {self._acked_seq + 1}.."
                            f"{self._last_seq}")
        still_open = [i.closed.position_id for i in self._outbox
                      if isinstance(i.closed, ClosedPosition) and not i.closed.partial
                      and i.closed.position_id in self.book]
        still_open += [i.closed.order_id for i in self._outbox
                       if isinstance(i.closed, EndedOrder) and i.closed.order_id in self.orders]
        if still_open:
            problems.append(f"settled positions still open: {still_open[:5]}")
        if self._opens - sum(self._closes) != len(self.book):
            problems.append(f"{self._opens} opens and {sum(self._closes)} closes counted, "
                            f"{len(self.book)} positions held")
        remembered = max(self._remembered(), len(self._ended))
        if remembered > REMEMBERED:
            problems.append(f"{remembered} answers remembered, more than {REMEMBERED}")
        return problems

    def fingerprint(self) -> dict[str, Any]:
        """Every piece of state as plain values, for equality tests: the live rows' columns,
        the free list (and the last ids of free rows, which fix the next ids), the last tick,
        the outbox, the remembered answers in order, counters and seqs."""
        cols = self.book.columns()
        pids = cols["position_id"]
        live = np.flatnonzero(pids > 0)
        free = np.flatnonzero(pids < 0)
        tick = self._last_tick
        return {
            "config": (self.name, self.book_tag, self.asset.name, self.maintenance_margin_ppm,
                       self.max_price_age_us),
            "rows": len(pids),
            "live_rows": live.tolist(),
            "columns": {name: col[live].tolist() for name, col in cols.items()},
            "free_rows": self.book.free_rows().tolist(),
            "free_row_ids": pids[free].tolist(),
            "orders": {name: col[self.orders.live_rows()].tolist()
                       for name, col in self.orders.columns().items()},
            "order_free_rows": self.orders.free_rows().tolist(),
            "ended_orders": list(self._ended.items()),
            "last_tick": None if tick is None else tuple(tick),
            "outbox": [_plain(item) for item in self._outbox],
            "results": [(rid, _plain(answer)) for rid, answer in self._all_answers()],
            "forgotten": sorted(self._forgotten.items()),
            "last_seq": self._last_seq,
            "acked_seq": self._acked_seq,
            "ticks_applied": self._ticks_applied,
            "opens": self._opens,
            "closes": list(self._closes),
        }


def _plain(value: Any) -> Any:
    """Nested tuples of ints/str/None (enums as ints, NamedTuples as tuples)."""
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, Rejected):
        return ("rejected", value.code.value, value.message)
    if isinstance(value, int):
        return int(value)
    return value


# --------------------------------------------------------------------------- snapshot columns
def _fill(table: np.ndarray, rows: list[int], records: Sequence[Any],
          group: Sequence[schema.Field]) -> None:
    """Write the ``group`` fields of ``records`` into ``rows`` of ``table``, column by name."""
    if rows:
        for f in group:
            table[f.name][rows] = list(map(operator.attrgetter(f.name), records))


def _outbox_array(items: Sequence[SettlementItem]) -> np.ndarray:
    table = np.zeros(len(items), dtype=OUTBOX_DTYPE)
    table["seq"] = [item.seq for item in items]
    _fill(table, list(range(len(items))), [item.closed for item in items], _SETTLED)
    return table


def _results_array(results: Mapping[int, Answer]) -> tuple[np.ndarray, list[list[Any]]]:
    """The :data:`RESULT_DTYPE` table of ``results`` and the order answers among them (kinds
    :data:`_KIND_ORDER`, :data:`_KIND_ORDER_END`), each as ``[row, seq, *fields]``."""
    table = np.zeros(len(results), dtype=RESULT_DTYPE)
    table["request_id"] = list(results)
    kinds: list[int] = []
    open_rows: list[int] = []
    opens: list[OpenPosition] = []
    close_rows: list[int] = []
    closes: list[SettlementItem] = []
    orders: list[list[Any]] = []
    for row, answer in enumerate(results.values()):
        if isinstance(answer, Rejected):
            kinds.append(_KIND_FENCED)
        elif isinstance(answer, PendingOrder):
            kinds.append(_KIND_ORDER)
            orders.append([row, 0, *answer])
        elif isinstance(answer, SettlementItem) and isinstance(answer.closed, EndedOrder):
            kinds.append(_KIND_ORDER_END)
            orders.append([row, answer.seq, *answer.closed])
        elif isinstance(answer, SettlementItem):
            kinds.append(_KIND_CLOSE)
            close_rows.append(row)
            closes.append(answer)
        else:
            kinds.append(_KIND_OPEN)
            open_rows.append(row)
            opens.append(answer)
    table["kind"] = kinds
    _fill(table, open_rows, opens, schema.POSITION)
    marks = [p.unrealized_pnl_micros for p in opens]
    table["has_pnl"][open_rows] = [m is not None for m in marks]
    table["unrealized_pnl_micros"][open_rows] = [m or 0 for m in marks]
    table["seq"][close_rows] = [item.seq for item in closes]
    _fill(table, close_rows, [item.closed for item in closes], _SETTLED)
    return table, orders


def _ended_order(values: Sequence[Any]) -> EndedOrder:
    order = EndedOrder(*values)
    return order._replace(side=_SIDES[order.side])


def _outbox_items(asset_name: str, columns: Mapping[str, np.ndarray]) -> list[SettlementItem]:
    return [SettlementItem(seq, _CLOSED_ROW(row, asset_name)) for seq, row in
            zip(columns["seq"].tolist(), schema.rows(columns, _SETTLED), strict=True)]


def _as_results(columns_by_kind: Sequence[tuple[Mapping[str, np.ndarray], np.ndarray]],
                size: int) -> np.ndarray:
    """A :data:`RESULT_DTYPE` table from older columns: each ``(columns, mask)`` fills the
    rows ``mask`` selects, by column name."""
    table = np.zeros(size, dtype=RESULT_DTYPE)
    for columns, mask in columns_by_kind:
        for n, column in columns.items():
            table[n][mask] = column[mask]
    return table


def _v1_results(ids: np.ndarray, old: np.ndarray) -> np.ndarray:
    width = len(_V1_CLOSE_RESULT)
    closes = schema.named_columns(old, _V1_CLOSE_RESULT, width)
    opens = schema.named_columns(old, _V1_OPEN_RESULT, width)
    kind = closes["kind"]
    table = _as_results([(opens, kind != _KIND_CLOSE), (closes, kind == _KIND_CLOSE)], len(kind))
    table["request_id"] = ids
    return table


def _v0_results(old: np.ndarray) -> np.ndarray:
    opens = schema.named_columns(old, _V0_OPEN_RESULT, len(_V0_OPEN_RESULT))
    return _as_results([(opens, np.ones(len(opens["kind"]), dtype=bool))], len(opens["kind"]))


class _SnapshotAnswers:
    """The remembered answers of a snapshot (a :data:`RESULT_DTYPE` table; order answers from
    ``order_rows``, as :func:`_results_array` gives them), oldest first, each built when it is
    asked for: most are never asked for again, and building all 65,536 took a third of a
    1M-position shard's recovery."""

    def __init__(self, asset_name: str, table: np.ndarray,
                 order_rows: Sequence[Sequence[Any]] = ()) -> None:
        self.asset_name = asset_name
        self.columns = schema.fill_close_ids(schema.named_columns(table))
        self.ids: list[int] = self.columns["request_id"].tolist()
        self.row_of = {rid: row for row, rid in enumerate(self.ids)}  # those not forgotten
        self.orders = {row: (seq, values) for row, seq, *values in order_rows}
        self.start = 0  # rows before it are forgotten
        kinds = self.columns["kind"]
        if not np.isin(kinds, list(_KINDS)).all():
            raise ValueError(f"unknown remembered answer kinds {set(kinds.tolist()) - _KINDS}")
        order_rows_needed = np.flatnonzero(np.isin(kinds, (_KIND_ORDER, _KIND_ORDER_END)))
        if not set(order_rows_needed.tolist()) <= self.orders.keys():
            raise ValueError("remembered order answers without their order fields")

    def __len__(self) -> int:
        return len(self.row_of)

    def get(self, request_id: int) -> Answer | None:
        row = self.row_of.get(request_id)
        return None if row is None else self._build(row)

    def __contains__(self, request_id: int) -> bool:
        return request_id in self.row_of

    def forget_oldest(self, count: int) -> list[int]:
        """Forget up to ``count`` of the oldest; returns their request ids."""
        forgotten: list[int] = []
        ids, row_of = self.ids, self.row_of
        while len(forgotten) < count and row_of:
            rid = ids[self.start]
            if row_of.get(rid) == self.start:
                del row_of[rid]
                forgotten.append(rid)
            self.start += 1
        return forgotten

    def _rows(self) -> list[int]:
        """The table rows of the answers not forgotten, oldest first."""
        ids, row_of = self.ids, self.row_of
        return [row for row in range(self.start, len(ids)) if row_of.get(ids[row]) == row]

    def items(self) -> list[tuple[int, Answer]]:
        """Every answer not forgotten, oldest first."""
        return [(self.ids[row], self._build(row)) for row in self._rows()]

    def before(self, table: np.ndarray, order_rows: list[list[Any]]
               ) -> tuple[np.ndarray, list[list[Any]]]:
        """:func:`_results_array`'s ``(table, order_rows)`` of newer answers with these
        (those not forgotten) in front, copied from their table as they are."""
        rows = np.array(self._rows(), dtype=np.int64)
        mine = np.zeros(rows.size, dtype=RESULT_DTYPE)
        for name in RESULT_DTYPE.names or ():
            mine[name] = self.columns[name][rows]
        orders = [[new, self.orders[old][0], *self.orders[old][1]]
                  for new, old in enumerate(rows.tolist()) if old in self.orders]
        shift = int(rows.size)
        return (np.concatenate([mine, table]),
                [*orders, *([row + shift, *rest] for row, *rest in order_rows)])

    def _build(self, index: int) -> Answer:
        columns = self.columns
        kind = int(columns["kind"][index])
        if kind in (_KIND_ORDER, _KIND_ORDER_END):
            order_seq, values = self.orders[index]
            if kind == _KIND_ORDER:
                listed = PendingOrder(*values)
                return listed._replace(side=_SIDES[listed.side])
            return SettlementItem(order_seq, _ended_order(values))
        if kind == _KIND_FENCED:
            return _FENCED
        row = tuple(columns[name][index].item() for name in _SETTLED_NAMES)
        if kind == _KIND_CLOSE:
            return SettlementItem(int(columns["seq"][index]), _CLOSED_ROW(row, self.asset_name))
        if kind == _KIND_OPEN:
            mark = int(columns["unrealized_pnl_micros"][index])
            return _LISTED_ROW(row, self.asset_name,
                               mark if columns["has_pnl"][index] else None)
        raise AssertionError(f"answer kind {kind} passed the check at load")



__all__ = [
    "BPS",
    "COUNTER_BITS",
    "FORGOTTEN_DTYPE",
    "MIN_VECTOR_RUN",
    "OPENED_RECORD",
    "REMEMBERED",
    "AckOutbox",
    "ApplyTick",
    "AuditView",
    "BooksView",
    "Cancel",
    "ChangeMargin",
    "Close",
    "LastTick",
    "Open",
    "OpenMargins",
    "OrdersOf",
    "Outbox",
    "OutboxView",
    "Place",
    "PositionsOf",
    "Resolve",
    "ResumeSeq",
    "SetLevels",
    "ShardMachine",
    "ShardStateError",
    "Stats",
    "slippage_exceeded",
]
