"""LedgerMachine: the ledger as a state machine (engine.machine): decide, then apply.

It holds the double-entry balances (engine.ledger) and what the API needs around them:
accounts and the hashes of their API keys, margin locks, each shard's settlements applied
exactly once in sequence order, closed-position and ended-order history, and the first answer
of every clientOrderId. Every change is an event of engine.events (``LEDGER_EVENTS``) applied
by :meth:`LedgerMachine.apply`, live and in recovery alike.

Commands (one class per operation, one item each) and their answers:

* :class:`CreateAccount` -> :class:`CreatedAccount` | Rejected
* :class:`LockMargin` -> None (locked) | Rejected | IdemHit
* :class:`ReleaseMargin` -> None | Rejected;  :class:`ExpectRelease` -> None | Rejected | IdemHit
* :class:`AbandonLock` -> ``(request_id, user, margin_micros)`` released | None | Rejected
* :class:`Begin` -> None (reserved now) | IdemHit;  :class:`Remember`, :class:`Forget` -> None
* :class:`ApplySettlements` -> the shard's last applied seq | Rejected (nothing applied)
* :class:`SettleRequests` -> how many pending clientOrderIds were settled
* :class:`ExpireAnswers` -> how many answered clientOrderIds were forgotten
* :class:`ReconcileAtStart` -> ``{user: released_micros}`` | Rejected
* :class:`Note` -> None | Rejected
* reads: :class:`Authenticate`, :class:`Balances`, :class:`OpenCount`, :class:`OrderCount`,
  :class:`AppliedSeq`, :class:`History`, :class:`OrderHistory`, :class:`Audit`,
  :class:`Totals`, :class:`PendingRequests`, :class:`OpenLocks`, :class:`AccountEvents`,
  :class:`AccountTail`.

Account events (engine.account_events, SPEC "Live data"): applying an event that changes what
an account sees numbers one or more account events of it (its balance after the change, the
position closed, the order ended); what a shard did for a request (a position opened or
changed, an order placed) is noted here (:class:`Note`) once the shard answered, so the account's
events are one numbering in the order the ledger journaled them.

A clientOrderId ``(user, kind, client_order_id)`` (an engine.messages.IdemKey) is either
absent, pending (reserved, answer not known yet: stored as None), or answered (the first
answer, returned to every retry and never replaced). A pending one that was reserved with a
request id (an open's or a placement's lock, a close's ``Begin``) can be resolved against the
shards by that id when its answer was lost (:class:`PendingRequests`, :class:`SettleRequests`).

Settlements: a shard numbers the items of its outbox 1, 2, 3... (a close, or an order that
ended: one numbering); :class:`ApplySettlements` applies the run ``last+1, last+2, ...`` found
in the items and ignores resends and everything after a gap (the shard resends its whole outbox
until acknowledged, so nothing is lost). If any item of that run would break a ledger invariant
the command is refused and none of it is applied.

Open positions per account (SPEC "Limits"): every open locks its margin here first, so the
ledger counts, per user, the opens that hold margin: a lock counts from ``MarginLocked`` until
it is released or abandoned (``MarginReleased``), or, once it became a position, until that
position's close is settled (``SettlementApplied``); a user with no margin locked holds none.
A lock that no request ends stays counted (like its margin) until the start-time
reconciliation, which sets each count from the shards' open positions and orders.
:class:`LockMargin` beyond ``max_open_positions`` answers ``Rejected(TOO_MANY_POSITIONS)`` and
locks nothing.

Margin added to an open position (SPEC "Changing an open position") is locked with
``MarginLock(top_up=True)`` (``MarginAdded``: no open counted, no limit but the free balance);
margin that leaves without ending an open (removed from a position, a top-up the shard
refused) is released with ``ReleaseMargin(counted=False)`` (``MarginReturned``), and an
abandoned top-up likewise. A removal is announced first (:class:`ExpectRelease`,
``ReleaseExpected``: nothing moves) and remembered like a lock, by its request id: should the
API process die after the shard took the margin off, the sweep of orphaned locks resolves the
request at the shards and its note releases the margin; one that never happened is abandoned,
releasing nothing. A TP/SL change is announced the same way with nothing to release, so the
sweep numbers its ``positionUpdated`` should its API process die after the shard made it.

Pending orders (SPEC "Pending orders"): a placement locks the order's margin with
``MarginLock(order=True)``, which also needs room under ``max_open_orders``
(``Rejected(TOO_MANY_ORDERS)``) and takes an open-position slot (so a fill never exceeds
``max_open_positions``). ``OrderLocked`` counts the lock as an open and an open order and
remembers, with its request id, that the lock is an order's; a ``MarginReleased`` of that
request id (the shard refused the placement, or the lock was abandoned) uncounts both. An order
that left a shard's book reaches the ledger as an outbox item (``EndedOrder``, applied as
``OrderSettled``): it is no longer an open order and joins its owner's order history; a fill
moves nothing (its margin and slot are the position's now), a cancel, expiry or rejection
releases its margin and its slot. The start-time reconciliation recounts orders
(``OrderCountSet``) from the shards' open orders plus their unapplied ended orders.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, overload

import numpy as np

from engine import account_events, schema
from engine.account_events import AccountEvent, AccountLog, Balance
from engine.answer_log import AnswerLog, Stored
from engine.events import (
    AccountCreated,
    AccountNoted,
    AnswersExpired,
    ClientOrderAsked,
    ClientOrderStored,
    ClientOrderStoredAt,
    Event,
    MarginAdded,
    MarginLocked,
    MarginReleased,
    MarginReturned,
    OpenCountSet,
    OrderCountSet,
    OrderLocked,
    OrderSettled,
    ReleaseExpected,
    SettlementApplied,
    decode_batch,
)
from engine.ledger import (
    FUNDING,
    HOUSE,
    INSURANCE,
    AuditDifference,
    Ledger,
    LedgerError,
    insufficient_balance,
)
from engine.machine import SnapshotParts
from engine.messages import (
    ClosedPosition,
    EndedOrder,
    IdemHit,
    IdemKey,
    MarginLock,
    OpenPosition,
    PendingOrder,
    Principal,
    SettlementItem,
)
from engine.order_book import OrderKind, OrderStatus
from engine.orders import Side
from engine.results import OUTCOME_UNKNOWN, Code, Forgotten, Rejected
from engine.settlement import Settlement

HISTORY_MAX_LIMIT = 500
# Locks (and announced removals) remembered by request id, the most under way at once: what
# ends one (its release, abandon, note or answer) finds it by that id, so a new one is refused
# (SERVICE_UNAVAILABLE) rather than one under way forgotten; its request's own release would
# then free nothing and its margin stay locked, counted and unswept until the next start.
RECENT_LOCKS_MAX = 1 << 16

PENDING = b""  # stored response of a reservation whose answer is not known yet
FORGOTTEN = b"\x00"  # stored response that drops a pending reservation
# Older journals (ClientOrderStored, 0x25) only: prefix of a pending open reservation, followed
# by JSON ``[request_id, margin_micros]``.
PENDING_OPEN = b"\x01"
# MarginReleased.request_id of start-time reconciliation: every lock made before it is settled
# (API request ids stay below 2**62).
START_RECONCILED = (1 << 64) - 1
DEFAULT_MAX_OPEN_POSITIONS = 200  # SPEC "Limits": open positions per account
DEFAULT_MAX_OPEN_ORDERS = 200  # SPEC "Limits": open orders per account
# clientOrderIds an account holds at once (reserved or answered, not expired): each answer is
# kept for the TTL (a day by default), about 1 KB of memory, journal and snapshot apiece
DEFAULT_MAX_CLIENT_ORDER_IDS = 100_000

_I64_MIN, _I64_END = -(1 << 63), 1 << 63
_I64_MAX = _I64_END - 1
# what resolves a pending clientOrderId of each kind (a TP/SL or margin change: the position)
_ANSWER_TYPES = {"open": OpenPosition, "close": ClosedPosition, "order": PendingOrder,
                 "cancel": EndedOrder, "modify": OpenPosition, "margin": OpenPosition}
_SIDE_CAST = {"side": Side}
# Stored answers are JSON lists: the kind, then the record's fields in schema order.
_STORED_RECORDS: dict[str, tuple[type, schema.Group]] = {
    "open": (OpenPosition, schema.OPEN_POSITION),
    "closed": (ClosedPosition, schema.CLOSED_POSITION),
    "order": (PendingOrder, schema.LISTED_ORDER),
    "ended_order": (EndedOrder, schema.ENDED_ORDER),
}
_STORED_KIND = {cls: (kind, schema.row_reader(group))
                for kind, (cls, group) in _STORED_RECORDS.items()}
_STORED_BUILD = {kind: (schema.names(group), schema.builder(cls, group, casts=_SIDE_CAST))
                 for kind, (cls, group) in _STORED_RECORDS.items()}
# an outbox item's records, and back (ints checked as plain ints)
_CLOSED_OF_EVENT = schema.builder(ClosedPosition, schema.SETTLEMENT_APPLIED, casts=_SIDE_CAST)
_ENDED_OF_EVENT = schema.builder(EndedOrder, schema.ORDER_SETTLED, casts=_SIDE_CAST)
_INTEGERS = schema.fixed(schema.CLOSED_POSITION)
_ORDER_INTEGERS = schema.fixed(schema.ENDED_ORDER)
# what a record's integers are unless sent oddly
_PLAIN_INTS = frozenset({int, Side, OrderKind, OrderStatus})
_ENDED = frozenset({OrderStatus.FILLED, OrderStatus.CANCELLED, OrderStatus.EXPIRED,
                    OrderStatus.REJECTED})


def _event_builder(cls: type, group: schema.Group) -> Callable[..., Any]:
    """``build(record, shard, seq)``: the event applying ``record``, item ``seq`` of ``shard``
    (its integers as plain ints)."""
    return schema.builder(cls, group, given=("shard", "seq"),
                          casts={**{f.name: operator.index for f in schema.fixed(group)},
                                 "side": int})


_SETTLEMENT_EVENT = _event_builder(SettlementApplied, schema.CLOSED_POSITION)
# The position a fill opened, from its close in the same delivery (its terms as it closed)
_OPENED_FROM_CLOSE = schema.builder(OpenPosition, schema.SETTLEMENT_APPLIED,
                                    given=("unrealized_pnl_micros",), attributes=True)
_ORDER_SETTLED_EVENT = _event_builder(OrderSettled, schema.ENDED_ORDER)
_PENDING_OF_ENDED = schema.builder(PendingOrder, schema.ENDED_ORDER)  # as it was placed
# History in a snapshot: one row per closed position (engine.schema.CLOSED_POSITION at wire
# widths), ``asset`` as an index into ``meta["history_assets"]``. Older snapshots held an
# int64 table with these columns (frozen: they describe files, not today's schema).
HISTORY_DTYPE = schema.dtype(schema.CLOSED_POSITION, overrides={"asset": "<u4"})
_V1_HISTORY = ("position_id", "owner", "asset", "side", "entry_ticks", "qty_steps",
               "margin_micros", "leverage", "liq_ticks", "tp_ticks", "sl_ticks", "opened_ts_us",
               "exit_ticks", "pnl_micros", "payout_micros", "house_micros", "insurance_micros",
               "reason", "closed_ts_us")
# the rows a history's first snapshot buffer holds at least (it doubles from there)
_HISTORY_MIN_ROWS = 1024
# a user's ids added since its index was sorted, past which (and past an eighth of the sorted
# ones) they are sorted in again: O(log n) a record in all, the dict at most an eighth
_INDEX_NEWER_MIN = 1024
_U64_END = 1 << 64
_HISTORY_ROW = schema.builder(ClosedPosition, _INTEGERS, given=("asset",), casts=_SIDE_CAST)
# Order history in a snapshot: one row per ended order (engine.schema.ENDED_ORDER at wire
# widths), ``asset`` and ``reject_code`` as indexes into ``meta["order_history_assets"]`` and
# ``meta["order_history_reject_codes"]``.
ORDER_HISTORY_DTYPE = schema.dtype(schema.ENDED_ORDER,
                                   overrides={"asset": "<u4", "reject_code": "<u4"})
_ORDER_TEXTS = ("asset", "reject_code")
_ORDER_HISTORY_ROW = schema.builder(EndedOrder, _ORDER_INTEGERS, given=_ORDER_TEXTS,
                                    casts=_SIDE_CAST)


def hash_api_key(api_key: str) -> str:
    """The stored form of an API key: lowercase hex SHA-256 of its UTF-8 bytes (a key has 256
    random bits, so a plain hash is enough: there is nothing to brute-force)."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


# --------------------------------------------------------------------------- stored answers
def encode_answer(answer: object) -> bytes:
    """The stored form of a clientOrderId answer (None = pending): compact JSON."""
    if answer is None:
        return PENDING
    if isinstance(answer, Rejected):
        body: list[Any] = ["rejected", answer.code.value, answer.message]
    elif type(answer) in _STORED_KIND:
        kind, row = _STORED_KIND[type(answer)]
        body = [kind, *row(answer)]
    else:
        raise TypeError(f"cannot store an answer of type {type(answer).__name__}")
    return json.dumps(body, separators=(",", ":")).encode()


def decode_answer(data: bytes) -> object:
    """Inverse of :func:`encode_answer` (an old pending open reservation decodes to None)."""
    return None if _is_pending(data) else _answer_of(json.loads(data))


def _is_pending(data: bytes) -> bool:
    """Whether a stored answer is none yet: pending, or an old pending open reservation."""
    return data == PENDING or data.startswith(PENDING_OPEN)


def _answer_of(stored: list[Any]) -> object:
    """The answer of a stored answer's JSON list (``[kind, *fields]``)."""
    kind, fields = _stored_fields(stored)
    if kind == "rejected":
        code, message = fields
        return Rejected(Code(code), message)
    return _STORED_BUILD[kind][1](fields)


def _stored_fields(stored: Any) -> tuple[str, list[Any]]:
    """``(kind, fields)`` of a stored answer's JSON list, checked as far as it can be without
    building the answer (a known kind, its length, a refusal's code and message); ValueError
    otherwise."""
    if not isinstance(stored, list) or not stored:
        raise ValueError("a stored answer is not a list")
    kind, *fields = stored
    if kind == "rejected":
        if len(fields) != 2 or not isinstance(fields[1], str):
            raise ValueError("a stored refusal is not [code, message]")
        Code(fields[0])
        return kind, fields
    if kind not in _STORED_BUILD:
        raise ValueError(f"unknown stored answer kind {kind!r}")
    names = _STORED_BUILD[kind][0]
    if kind == "closed" and len(fields) == len(names) - 2:
        # stored before partial closes: a whole close, named by its position's id
        fields = [*fields, fields[0], 0]
    if len(fields) != len(names):
        raise ValueError(f"a stored {kind} answer has {len(fields)} fields, not {len(names)}")
    return kind, fields


def _check_stored_answers(texts: list[str]) -> None:
    """ValueError unless each of ``texts`` is a stored answer (:func:`encode_answer`'s text)
    as :func:`_stored_fields` checks it. One JSON parse for all and no answer built: building
    each took 10 us, 1.7 s of a ledger's restart with 300,000 answers held (a retry's answer
    is built when it asks)."""
    if not texts:
        return
    parsed = json.loads("[" + ",".join(texts) + "]")
    if len(parsed) != len(texts):
        raise ValueError("a stored answer is not one JSON value")
    for stored in parsed:
        _stored_fields(stored)


def decode_pending_open(data: bytes) -> tuple[int, int] | None:
    """``(request_id, margin_micros)`` of an old pending open reservation, else None."""
    if not data.startswith(PENDING_OPEN):
        return None
    request_id, margin_micros = json.loads(data[len(PENDING_OPEN):])
    return int(request_id), int(margin_micros)


# --------------------------------------------------------------------------- commands
@dataclass(frozen=True, slots=True)
class CreateAccount:
    """Open account ``account_id`` with the signup deposit; ``key_hash`` = :func:`hash_api_key`
    of its API key. The caller generates both (random), so a replay is exact."""

    account_id: str
    key_hash: str


@dataclass(frozen=True, slots=True)
class Authenticate:
    """-> the Principal whose API key hashes to ``key_hash``, or None."""

    key_hash: str


@dataclass(frozen=True, slots=True)
class Balances:
    """-> ``(free_micros, margin_micros)`` of ``user`` (0, 0 for an unknown user)."""

    user: int


@dataclass(frozen=True, slots=True)
class OpenCount:
    """-> how many opens of ``user`` hold margin: locks not ended plus positions not settled
    closed (what ``max_open_positions`` limits; 0 for an unknown user)."""

    user: int


@dataclass(frozen=True, slots=True)
class OrderCount:
    """-> how many open orders of ``user`` hold margin: order locks not ended plus orders not
    settled ended (what ``max_open_orders`` limits; 0 for an unknown user)."""

    user: int


@dataclass(frozen=True, slots=True)
class AppliedSeq:
    """-> the last settlement seq of ``shard`` applied (0 if none)."""

    shard: str


@dataclass(frozen=True, slots=True)
class History:
    """-> ``user``'s closes (whole and partial), newest first (``limit`` clamped to 1..500), or
    Rejected(INVALID_REQUEST) for a ``before`` cursor that is not the close id of one of them."""

    user: int
    limit: int = 50
    before: int | None = None


@dataclass(frozen=True, slots=True)
class OrderHistory(History):
    """-> ``user``'s ended orders (EndedOrder: filled, cancelled, expired, rejected), newest
    first, paged like :class:`History` (``before``: an order id of the user's)."""


@dataclass(frozen=True, slots=True)
class Audit:
    """-> the differences ([] = consistent) between the accounts and the shards' positions:
    a list of :class:`engine.ledger.AuditDifference` (``subject``: the account that differs,
    the sum over all accounts, or ``settlements:<shard>``, a shard whose outbox would not
    settle in full; ``text``: what differs).

    ``open_margins_by_user``: margins of open positions and open orders summed over all shards;
    ``unsettled``: each shard's outbox (items already applied here are recognised by seq);
    the items not applied yet must be the next numbers, each one :class:`ApplySettlements`
    would take. ``open_counts_by_user`` and ``open_order_counts_by_user`` (as
    :class:`ReconcileAtStart` takes them; None: not compared): each user's counts the position
    and order limits are enforced with must be those plus what the unapplied items will end
    (subjects ``user:<id>:open_count``, ``user:<id>:order_count``). What the requests under
    way hold here (a lock whose open, order or top-up has not reached its shard; a removal
    announced here that its shard may have made) is no difference: a user's margin may exceed
    the books' by the margins of some of them, a count by their slots.
    """

    open_margins_by_user: Mapping[int, int]
    unsettled: Mapping[str, Sequence[SettlementItem]] | None = None
    open_counts_by_user: Mapping[int, int] | None = None
    open_order_counts_by_user: Mapping[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Totals:
    """-> totals for ``shardex audit --json`` (amounts in micros)."""


@dataclass(frozen=True, slots=True)
class PendingRequests:
    """-> sorted request ids of the clientOrderIds pending for at least ``older_than_us``
    (opens and closes reserved with a request id)."""

    older_than_us: int = 0


@dataclass(frozen=True, slots=True)
class OpenLocks:
    """-> ``[(request_id, kind)]``, oldest first, of at most ``limit`` locks whose request has
    not completed: neither released, nor abandoned, nor noted, nor answered under its
    clientOrderId (``kind``: "open", "order" or "margin", what the lock pays for). A lock that
    stays here long belongs to a request whose API process died."""

    limit: int = 1_000


@dataclass(frozen=True, slots=True)
class ExpireAnswers:
    """Forget the clientOrderIds answered more than ``ttl_us`` ago (SPEC: after the TTL the id
    may be used again). -> how many were forgotten."""

    ttl_us: int


@dataclass(frozen=True, slots=True)
class LockMargin:
    """Move ``lock.margin_micros`` of ``lock.user`` from free to margin (with ``lock.order``:
    the margin of a pending order, also counted as an open order).

    -> None: locked (the clientOrderId, if any, reserved as pending with ``lock.request_id``);
    Rejected: not locked (INSUFFICIENT_BALANCE, TOO_MANY_POSITIONS, TOO_MANY_ORDERS, NOT_FOUND,
    INVALID_REQUEST; stored as the clientOrderId's first answer; SERVICE_UNAVAILABLE, not
    stored: ``max_recent_locks`` locks are under way; RATE_LIMITED, not stored: the account
    holds ``max_client_order_ids`` clientOrderIds, this one new); IdemHit: the clientOrderId
    was seen before, nothing locked. ``asked``, ``ttl_us``: as :class:`Begin`'s.
    """

    lock: MarginLock
    asked: bytes = b""
    ttl_us: int = 0


@dataclass(frozen=True, slots=True)
class ReleaseMargin:
    """Undo a lock (margin -> free) of an open that did not happen; ``request_id``: the lock's
    (0 = not given), so it can no longer be abandoned; ``answer``: a clientOrderId answer to
    store with it. ``counted=False``: margin that ends no open (a top-up that did not happen,
    margin removed from an open position). With ``request_id``, only while that request's
    lock (or announced removal, :class:`ExpectRelease`) is under way: once. -> None, or
    Rejected(INVALID_REQUEST) if less margin is locked."""

    user: int
    margin_micros: int
    request_id: int = 0
    answer: tuple[IdemKey, object] | None = None
    counted: bool = True


@dataclass(frozen=True, slots=True)
class ExpectRelease:
    """Request ``request_id`` of ``user`` is about to take ``margin_micros`` off an open
    position at its shard (0: to change its TP/SL, which owes nothing): remember the release
    it will owe (nothing moves now; the request's ``ReleaseMargin(counted=False)`` makes it,
    or, should that never come, its ``Note`` or the start-time reconciliation), and that the
    request is under way, for the sweep of orphaned locks to resolve should its API process
    die. With ``key``, the request's clientOrderId, reserved first as :class:`Begin` would
    (``asked``, ``ttl_us`` as its): then an IdemHit, or Rejected, instead, nothing remembered.
    -> None, or Rejected(INVALID_REQUEST; SERVICE_UNAVAILABLE: ``max_recent_locks`` locks and
    announcements are under way, nothing reserved; RATE_LIMITED as :class:`Begin`'s)."""

    user: int
    margin_micros: int
    request_id: int
    key: IdemKey | None = None
    asked: bytes = b""
    ttl_us: int = 0


@dataclass(frozen=True, slots=True)
class AbandonLock:
    """Release the lock of ``request_id`` whose open was never sent (its answer was lost).

    Only a lock held under that id, once; not one whose clientOrderId has an answer. Its
    clientOrderId, still pending for this request, is dropped (a retry runs again).
    -> ``(request_id, user, margin_micros)`` released, or None (nothing to release).
    """

    request_id: int


@dataclass(frozen=True, slots=True)
class Begin:
    """Reserve ``key`` for request ``request_id`` (0 = none): None = reserved now, IdemHit =
    seen before (its answer, None while pending), Rejected(INVALID_REQUEST) = ``key`` was
    first used for a request other than ``asked`` (the digest of this one's terms; ``b""``:
    not checked). ``ttl_us`` > 0: an answer given more than that long ago is forgotten now
    (as :class:`ExpireAnswers` would), and ``key`` is free again; 0: it is kept until then.
    Rejected(RATE_LIMITED, with ``retry_after_s``) = ``key`` is new and its account already
    holds ``max_client_order_ids`` (nothing reserved)."""

    key: IdemKey
    request_id: int = 0
    asked: bytes = b""
    ttl_us: int = 0


@dataclass(frozen=True, slots=True)
class Remember:
    """Store ``answer`` as the first answer of ``key`` (an existing answer is kept); with
    ``request_id``, only if that request holds ``key`` or nothing does (the late refusal of a
    request whose reservation was settled while it was slow, and taken by a retry, is not
    the retry's answer)."""

    key: IdemKey
    answer: object
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class Forget:
    """Drop ``key``'s pending reservation (the request failed transiently: a retry runs);
    with ``request_id``, only if that request holds it (one whose reservation was settled
    while it was slow, and taken by a retry, drops nothing)."""

    key: IdemKey
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class ApplySettlements:
    """Apply ``shard``'s settlements exactly once, in seq order (see the module docstring),
    and store ``answers`` (clientOrderIds of the closes). ``opened``: positions that orders
    filled among the items opened, or that partial closes among them left open (those still
    open), each noted as its owner's ``positionOpened`` after the fill, or ``positionUpdated``
    after the partial close, when that item is applied here. -> the last applied seq."""

    shard: str
    items: tuple[SettlementItem, ...]
    answers: tuple[tuple[IdemKey, object], ...] = ()
    opened: tuple[OpenPosition, ...] = ()


@dataclass(frozen=True, slots=True)
class SettleRequests:
    """Settle pending clientOrderIds by what every shard said about their request id.

    ``opened``: request id -> the OpenPosition (open) / ClosedPosition (close) / PendingOrder
    (order) / EndedOrder (cancel) it made: stored as the answer of a clientOrderId of that
    kind, and an open, placement or change of a position noted among its owner's account
    events as its :class:`Note` would (once per request); or Forgotten (a shard no longer
    knows whether it ran): answered :data:`~engine.results.OUTCOME_UNKNOWN`, which ends its
    lock's record but frees nothing (the next start's reconciliation does, if no book holds
    it). ``absent``: request ids no shard has (fenced everywhere): the reservation is dropped.
    Margins are not touched but for the release a margin removal that happened owes. -> how
    many were settled.
    """

    opened: Mapping[int, OpenPosition | ClosedPosition | PendingOrder | EndedOrder | Forgotten]
    absent: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ReconcileAtStart:
    """Undo what requests cut off by a platform crash left half done (no request in flight).

    Each user's margin above the margins of their open positions and orders plus what the
    unapplied items of the ``unsettled`` outboxes still hold (a close's margin, an ended order's
    unless it filled) is released; every lock ends (none can be abandoned any more). Pending
    clientOrderIds: one whose request id ``resolved`` maps to what it made gets that answer,
    every other is dropped. ``open_counts_by_user``: open positions plus open orders per user
    over all shards; each user's count of opens holding margin becomes that plus their unapplied
    whole closes and unapplied ended orders that did not fill. ``open_order_counts_by_user``: open
    orders per user; each user's order count becomes that plus their unapplied ended orders.
    (None: those counts are kept, but a user left with no margin holds none.)
    -> ``{user: released_micros}``.
    """

    open_margins_by_user: Mapping[int, int]
    unsettled: Mapping[str, Sequence[SettlementItem]]
    resolved: Mapping[int, object] | None = None
    open_counts_by_user: Mapping[int, int] | None = None
    open_order_counts_by_user: Mapping[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Note:
    """Request ``request_id`` of ``user`` did ``kind`` at its shard (one of
    engine.account_events.NOTED_KINDS) and made ``body`` (the OpenPosition, or the PendingOrder
    of ``orderPlaced``): number it among the user's account events; with ``key``, also store
    it as the clientOrderId's first answer. -> None, or Rejected(INVALID_REQUEST)."""

    user: int
    request_id: int
    kind: str
    body: OpenPosition | PendingOrder
    key: IdemKey | None = None


@dataclass(frozen=True, slots=True)
class AccountEvents:
    """-> ``(last_seq, events)``: ``user``'s newest account event number, and their events
    after ``since`` (oldest first), or None instead when some are no longer kept (or ``since``
    is None: only the number is asked)."""

    user: int
    since: int | None = None


@dataclass(frozen=True, slots=True)
class AccountTail:
    """-> ``(version, events)``: the account events of every account after version ``after``
    (at most ``limit``, oldest first), or None instead when some are no longer kept."""

    after: int
    limit: int = 1000


class CreatedAccount(NamedTuple):
    """The answer to :class:`CreateAccount` (the API key stays with the caller)."""

    user: int
    account_id: str
    balance_micros: int


# what a lock pays for (a lock's kind); _REMOVE: a margin removal's release owed (nothing locked)
_OPEN, _ORDER, _TOP_UP, _REMOVE = 0, 1, 2, 3
_LOCK_KINDS: dict[type, int] = {MarginLocked: _OPEN, OrderLocked: _ORDER, MarginAdded: _TOP_UP}
_LOCK_KIND_NAMES = {_OPEN: "open", _ORDER: "order", _TOP_UP: "margin", _REMOVE: "margin"}


class _Lock(NamedTuple):
    """A lock remembered by its request id."""

    user: int
    margin_micros: int
    key: IdemKey | None  # the clientOrderId reserved with it
    kind: int  # _OPEN (MarginLocked), _ORDER (OrderLocked), _TOP_UP (MarginAdded) or _REMOVE
    # (ReleaseExpected: margin_micros is what the removal will release)


SHOWN_SCAN = 256
"""How many of an account's newest events a note looks through for the same news told by a
partial close's delivery (LedgerMachine._shown)."""

_Decision = tuple[Any, Sequence[Event]]
_NO_EVENTS: tuple[Event, ...] = ()


def _int(value: object) -> int | None:
    """``value`` as an int (numpy ints too), None if it is not an integer (or is a bool)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _request_id(value: object) -> int | None:
    """``value`` as a request id (0 = none) below :data:`START_RECONCILED`, else None."""
    request_id = _int(value)
    return request_id if request_id is not None and 0 <= request_id < START_RECONCILED \
        else None


def _invalid(message: str) -> _Decision:
    return Rejected(Code.INVALID_REQUEST, message), _NO_EVENTS


def reused_message(client_order_id: str) -> str:
    """Why a request that reuses ``client_order_id`` with other terms is refused."""
    return (f"clientOrderId {client_order_id!r} was first used for a different request: a "
            "retry must repeat that request, a new request needs a new clientOrderId")


def _asked_events(key: IdemKey, asked: bytes) -> list[Event]:
    """The record of what ``key`` was first used for (nothing when not given)."""
    return [ClientOrderAsked(key.user, key.kind, key.client_order_id, asked)] if asked else []


def _stored(answer: object) -> bytes:
    """:func:`encode_answer`, checked to decode (so applying it cannot fail)."""
    data = encode_answer(answer)
    decode_answer(data)
    return data


_Item = ClosedPosition | EndedOrder  # what a shard's outbox holds (SettlementItem.closed)
_NOTED_BODY = {account_events.POSITION_OPENED: OpenPosition,
               account_events.POSITION_UPDATED: OpenPosition,
               account_events.ORDER_PLACED: PendingOrder}
_ORDER_ENDED_KIND: dict[int, str] = {
    OrderStatus.FILLED: "orderFilled", OrderStatus.CANCELLED: "orderCancelled",
    OrderStatus.EXPIRED: "orderExpired", OrderStatus.REJECTED: "orderRejected"}


def _holds_margin(item: _Item) -> bool:
    """Whether ``item`` ends an open's margin here when it is applied: a close, an order that
    did not fill (a fill's margin and slot are its position's now)."""
    return not isinstance(item, EndedOrder) or item.status != OrderStatus.FILLED


def _holds_slot(item: _Item) -> bool:
    """Whether ``item`` ends an open here when it is applied (frees a slot of the open-position
    limit): a whole close, an order that did not fill (the rest of a partial close stays
    open)."""
    return _holds_margin(item) and not (isinstance(item, ClosedPosition) and item.partial)


def _is_order(item: _Item) -> bool:
    """Whether ``item`` ends an open order here when it is applied (any ended order)."""
    return isinstance(item, EndedOrder)


_Width = tuple[int, int, str]  # first, end, what a value of it is called
_INT64: _Width = (_I64_MIN, _I64_END, "an int64")
_WIRE_WIDTHS: dict[str | None, _Width] = {
    "q": _INT64, "Q": (0, 1 << 64, "a u64"), "I": (0, 1 << 32, "a u32"),
    "H": (0, 1 << 16, "a u16"), "B": (0, 1 << 8, "a u8")}


class _Ints:
    """The fixed-width fields of a record, read at once and checked as ints of a width each:
    plain ints in a few C-level passes (one per width), anything else (numpy ints, bools, out
    of range) field by field."""

    def __init__(self, group: schema.Group, width: Callable[[schema.Field], _Width]) -> None:
        self.names = schema.names(schema.fixed(group))
        self._read = operator.attrgetter(*self.names)
        self._widths = [width(f) for f in schema.fixed(group)]
        by_width: dict[tuple[int, int], list[int]] = {}
        for at, (first, end, _) in enumerate(self._widths):
            by_width.setdefault((first, end), []).append(at)
        # (first element twice: a tuple even for a width of one field)
        self._passes = [(first, end, operator.itemgetter(*ats, ats[0]))
                        for (first, end), ats in by_width.items()]

    def at(self, name: str) -> int:
        return self.names.index(name)

    def read(self, record: Any) -> tuple[Sequence[int], str | None]:
        """The record's ints (in ``names`` order) and None, or why one is not an int of its
        width."""
        v: Sequence[Any] = self._read(record)
        if _PLAIN_INTS.issuperset(map(type, v)) and all(
                min(part) >= first and max(part) < end
                for first, end, pick in self._passes for part in (pick(v),)):
            return v, None
        checked: list[int] = []
        for name, (first, end, what), value in zip(self.names, self._widths, v, strict=True):
            number = _int(value)
            if number is None or not first <= number < end:
                return checked, f"{name} must be {what}"
            checked.append(number)
        return checked, None


# a close's integers are checked as int64s (as they always were: its ids and enums are checked
# apart or fail the encoding) but its id and flag at their wire widths, an ended order's at the
# widths its event encodes them with
_CLOSE_ADDED = (schema.close_id, schema.partial)
_CLOSE_INTS = _Ints(schema.CLOSED_POSITION,
                    lambda f: _WIRE_WIDTHS[f.code] if f in _CLOSE_ADDED else _INT64)
_SIDE_AT, _MARGIN_AT, _PAYOUT_AT, _HOUSE_AT, _INSURANCE_AT, _CLOSE_ID_AT, _PARTIAL_AT = map(
    _CLOSE_INTS.at, ("side", "margin_micros", "payout_micros", "house_micros",
                     "insurance_micros", "close_id", "partial"))
_ORDER_INTS = _Ints(schema.ENDED_ORDER, lambda f: _WIRE_WIDTHS[f.code])
_O_SIDE_AT, _O_KIND_AT, _O_MARGIN_AT, _O_STATUS_AT = map(_ORDER_INTS.at, (
    "side", "kind", "margin_micros", "status"))


class _Loaded(NamedTuple):
    """A snapshot's history table, its records built when asked for: ``ints`` columns by
    name, ``codes`` (each text column's indexes into ``texts[name]``), and each user's rows in
    the order they were applied; ``table``: the snapshot table they are columns of, when it is
    one this machine wrote (a later snapshot that adds nothing gives it again)."""

    ints: Mapping[str, np.ndarray]
    codes: Mapping[str, np.ndarray]
    texts: dict[str, list[str]]
    rows_of: dict[int, np.ndarray]
    build: Callable[..., Any]
    table: np.ndarray | None = None

    @property
    def size(self) -> int:
        """How many records the table holds."""
        return int(next(iter(self.ints.values())).size)


class _IdIndex:
    """A user's record ids (uint64, as both histories' tables hold them) -> each one's place
    among the user's records, in the order applied (the last place of an id listed twice):
    ``ids`` the ids of the places below ``len(ids)``, sorted (stable), ``places`` their places,
    and ``newer`` the places added since, by id.

    Arrays, not a dict of every id: a dict took about 98 bytes a record and 0.8 s to build for
    a user of 1,000,000 records, on the ledger's thread, at that user's first open after a
    start (its note asks whether the position has closed); these take 16 bytes a record."""

    __slots__ = ("ids", "newer", "places")

    def __init__(self, ids: np.ndarray) -> None:
        order = np.argsort(ids, kind="stable")
        self.ids: np.ndarray = ids[order]
        self.places: np.ndarray = order
        self.newer: dict[int, int] = {}

    def place(self, rid: Any) -> int | None:
        """``rid``'s place (None: no record of the user has that id); a numpy int is the int
        it is, a bool no id."""
        rid = _int(rid)
        if rid is None or not 0 <= rid < _U64_END:  # (no id a record can have)
            return None
        place = self.newer.get(rid)
        if place is not None:
            return place
        # (a uint64 to search for: with a Python int numpy would compare as float64, copying
        # the ids at every call and telling ids above 2**53 apart no more)
        at = int(np.searchsorted(self.ids, np.uint64(rid), side="right")) - 1
        return int(self.places[at]) if at >= 0 and int(self.ids[at]) == rid else None

    def places_of(self, ids: np.ndarray) -> np.ndarray:
        """Each of ``ids``' place (-1: none), as :meth:`place` gives it one at a time."""
        at = np.searchsorted(self.ids, ids, side="right") - 1
        hit = at >= 0
        hit[hit] = self.ids[at[hit]] == ids[hit]
        out = np.where(hit, self.places[np.maximum(at, 0)], -1) if self.ids.size \
            else np.full(ids.shape, -1, dtype=np.int64)
        for rid, place in self.newer.items():
            out[ids == rid] = place
        return out


class _History:
    """Per user, the records of one kind (closed positions, ended orders) in the order they were
    applied, and each one's place by its id (``id_name``).

    The records a snapshot held stay in its table and are built when a page asks for them
    (building every one of 300,000 took most of a ledger's recovery); the records added since
    follow them, built. A user's index by id is made when first asked for."""

    def __init__(self, what: str, id_name: str) -> None:
        self.what = what
        self._id_name = id_name
        self._id = operator.attrgetter(id_name)
        self._loaded: _Loaded | None = None
        # the rows of the tables made here, with room for more: the loaded table is a view of
        # its first rows (None: the loaded records are in none, a fresh or restored history)
        self._buffer: np.ndarray | None = None
        self.by_user: dict[int, list[Any]] = {}  # records added since the load
        self._index: dict[int, _IdIndex] = {}  # made when first asked for

    def _rows(self, user: int) -> np.ndarray | None:
        return None if self._loaded is None else self._loaded.rows_of.get(user)

    def _count(self, user: int) -> tuple[int, int]:
        """``(loaded, added)`` records of ``user``."""
        rows = self._rows(user)
        return (0 if rows is None else int(rows.size)), len(self.by_user.get(user, ()))

    def _ids(self, user: int) -> np.ndarray:
        """``user``'s record ids, in order (uint64)."""
        rows = self._rows(user)
        added = np.fromiter(map(self._id, self.by_user.get(user, ())), dtype=np.uint64)
        if rows is None or self._loaded is None:
            return added
        loaded = self._loaded.ints[self._id_name][rows].astype(np.uint64)
        return np.concatenate([loaded, added]) if added.size else loaded

    def _index_of(self, user: int) -> _IdIndex:
        index = self._index.get(user)
        if index is None:
            index = self._index[user] = _IdIndex(self._ids(user))
        return index

    def _records(self, user: int, start: int, stop: int) -> list[Any]:
        """``user``'s records ``start`` to ``stop`` (exclusive), in order; the loaded ones are
        built from the table a column at a time (one numpy read per column, not per value)."""
        rows = self._rows(user)
        loaded = 0 if rows is None else int(rows.size)
        out: list[Any] = []
        if start < min(stop, loaded):
            assert self._loaded is not None and rows is not None
            ints, codes, texts, _, build, _ = self._loaded
            picked = rows[start:min(stop, loaded)]
            values = zip(*(column[picked].tolist() for column in ints.values()), strict=True)
            strings = [[texts[name][code] for code in codes[name][picked].tolist()]
                       for name in codes]
            out = [build(row, *given)
                   for row, *given in zip(values, *strings, strict=True)] if strings \
                else [build(row) for row in values]
        added = self.by_user.get(user, [])
        out.extend(added[max(start, loaded) - loaded:max(stop, loaded) - loaded])
        return out

    def _all(self, user: int) -> list[Any]:
        return self._records(user, 0, sum(self._count(user)))

    def _users(self) -> list[int]:
        loaded = [] if self._loaded is None else list(self._loaded.rows_of)
        return list(dict.fromkeys([*loaded, *self.by_user]))

    def add(self, record: Any) -> None:
        owner = record.owner
        records = self.by_user.setdefault(owner, [])
        index = self._index.get(owner)
        if index is not None:
            index.newer[self._id(record)] = sum(self._count(owner))
        records.append(record)
        if index is not None and len(index.newer) > max(_INDEX_NEWER_MIN, index.ids.size >> 3):
            # sorted in again: a dict of them grows as the one the arrays replace did
            self._index[owner] = _IdIndex(self._ids(owner))

    def page(self, user: int, limit: int, before: int | None) -> list[Any] | None:
        """Up to ``limit`` (clamped to 1..HISTORY_MAX_LIMIT) of ``user``'s records, newest
        first, older than the one of id ``before`` (None: from the newest; None is returned for
        a ``before`` that is not one of the user's)."""
        limit = max(1, min(int(limit), HISTORY_MAX_LIMIT))
        end = sum(self._count(user))
        if before is not None:
            index = self._index_of(user).place(before) if end else None
            if index is None:
                return None
            end = index
        return self._records(user, max(0, end - limit), end)[::-1]

    def has(self, user: int, record_id: int) -> bool:
        return sum(self._count(user)) > 0 and self._index_of(user).place(record_id) is not None

    def __len__(self) -> int:
        loaded = 0 if self._loaded is None else self._loaded.size
        return loaded + sum(map(len, self.by_user.values()))

    def problems(self) -> list[str]:
        out = []
        for user, records in self.by_user.items():
            if any(r.owner != user for r in records):
                out.append(f"{self.what} of user {user} holds another user's record")
        for user, index in self._index.items():
            ids = self._ids(user)
            covered = index.ids.size
            if not (covered <= ids.size  # (more ids than records: places no record has)
                    and np.array_equal(np.sort(index.places), np.arange(covered))
                    and np.array_equal(index.ids, ids[index.places])
                    and all(covered <= place < ids.size and ids[place] == rid
                            for rid, place in index.newer.items())
                    and np.array_equal(index.places_of(ids), _IdIndex(ids).places_of(ids))):
                out.append(f"{self.what} index of user {user} is inconsistent")
        return out

    def fingerprint(self) -> tuple[list[Any], list[Any]]:
        users = self._users()
        return (sorted((u, [tuple(r) for r in self._all(u)]) for u in users),
                sorted((u, sorted({rid: i for i, rid in enumerate(self._ids(u).tolist())}.items()))
                       for u in users))

    def table(self, dtype: np.dtype, ints: schema.Group, texts: Sequence[str],
              build: Callable[..., Any]) -> tuple[np.ndarray, list[list[str]]]:
        """The records as a snapshot table of ``dtype``: ``ints`` as they are, each of
        ``texts`` as an index into its list of strings (returned, in ``texts`` order). The
        loaded records come first, copied from their table; each user's stay in order.

        The history then holds that table as its loaded records (``build`` makes a record of
        a row, as after a restart) and none added: the next snapshot extends the table rather
        than reading every record since the start again (2 us each on the machine's thread,
        at every snapshot), and a record in the table takes a third of the memory. The table
        is the first rows of a buffer with room for more, so the next one writes only the rows
        added since (the buffer doubles when full: each row is copied O(1) times in all).
        Nothing changes the rows of a table once made (the snapshot's writer reads them while
        this goes on): later rows go past them, or into a new buffer."""
        loaded = self._loaded
        kept = None if loaded is None else loaded.table  # (one of this dtype: made here)
        if kept is not None and not self.by_user:
            assert loaded is not None
            return kept, [loaded.texts[name] for name in texts]
        added = [r for records in self.by_user.values() for r in records]
        first = 0 if loaded is None else loaded.size
        whole = kept is not None  # the loaded rows are the buffer's first ones
        buffer = self._buffer if whole else None
        if buffer is None or len(buffer) < first + len(added):
            # zeros: the pages of the room left are not touched (nor resident) until written
            grown = np.zeros(max(2 * (first + len(added)), _HISTORY_MIN_ROWS), dtype=dtype)
            if kept is not None:  # one copy of its bytes (numpy copies structured rows by field)
                grown.view(np.uint8)[:kept.nbytes] = kept.view(np.uint8)
            buffer = grown
        table = buffer[:first + len(added)]
        for f in ints:
            if loaded is not None and not whole:
                table[f.name][:first] = loaded.ints[f.name]
            table[f.name][first:] = list(map(operator.attrgetter(f.name), added))
        strings = []
        for name in texts:
            known = [] if loaded is None else loaded.texts[name]
            index: dict[str, int] = {text: i for i, text in enumerate(known)}
            if loaded is not None and not whole:
                table[name][:first] = loaded.codes[name]
            text = operator.attrgetter(name)
            table[name][first:] = [index.setdefault(text(r), len(index)) for r in added]
            strings.append(list(index))
        rows_of = {} if loaded is None else dict(loaded.rows_of)
        at = first
        for user, records in self.by_user.items():  # (in the order ``added`` took them)
            new = np.arange(at, at + len(records), dtype=np.int64)
            old = rows_of.get(user)
            rows_of[user] = new if old is None else np.concatenate([old, new])
            at += len(records)
        if len(table):
            table.flags.writeable = False  # the snapshot's writer reads it meanwhile
            self._buffer = buffer
            self._loaded = _Loaded({f.name: table[f.name] for f in ints},
                                   {name: table[name] for name in texts},
                                   dict(zip(texts, strings, strict=True)), rows_of, build, table)
            self.by_user = {}
        return table, strings

    def load(self, table: Mapping[str, np.ndarray] | np.ndarray, ints: schema.Group,
             build: Callable[..., Any], texts: Mapping[str, Sequence[str]],
             kept: np.ndarray | None = None) -> None:
        """Take the records of a :meth:`table` (``texts``: each text column's strings) into a
        history that holds none yet; ValueError for a text index outside its strings.
        ``kept``: ``table`` itself when it is one :meth:`table` would make (its dtype, its
        values), kept as made here: the next :meth:`table` copies its bytes, not each column
        (0.5 s -> 0.1 s for 1M closes)."""
        assert self._loaded is None and not self.by_user and self._buffer is None
        columns = {f.name: np.asarray(table[f.name]) for f in ints}
        codes = {name: np.asarray(table[name]).astype(np.int64) for name in texts}
        strings = {name: list(values) for name, values in texts.items()}
        for name, values in strings.items():
            if len(set(values)) != len(values):  # (a later table would index them otherwise)
                raise ValueError(f"{self.what}: a {name} string listed twice")
        for name, code in codes.items():
            if code.size and (code.min() < 0 or code.max() >= len(strings[name])):
                raise ValueError(f"{self.what}: a {name} index outside its strings")
        owners = columns["owner"].astype(np.int64)
        if not owners.size:
            return
        order = np.argsort(owners, kind="stable")
        users, starts = np.unique(owners[order], return_index=True)
        rows_of = dict(zip(users.tolist(), np.split(order, starts[1:]), strict=True))
        self._loaded = _Loaded(columns, codes, strings, rows_of, build, kept)


def _as_made(table: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """``table`` when :meth:`_History.table` could have made it as it is (``dtype``, one block,
    no close id left to fill: see schema.fill_close_ids), else None."""
    if table.dtype != dtype or not table.flags.c_contiguous:
        return None
    if "close_id" in (dtype.names or ()) and table.size and not table["close_id"].all():
        return None
    return table


# --------------------------------------------------------------------------- the machine
class LedgerMachine:
    """The ledger's whole state (see the module docstring); ``signup_balance_micros`` is the
    deposit of every new account, ``max_open_positions`` the most opens (positions and pending
    orders) an account may hold margin for, ``max_open_orders`` the most pending orders,
    ``max_recent_locks`` the most locks (and announced removals) under way at once, remembered
    by request id (:data:`RECENT_LOCKS_MAX`), ``max_client_order_ids`` the most clientOrderIds
    an account holds at once (reserved or answered, not expired; a late answer of a request
    whose reservation was dropped is still kept, so a count may pass it by those)."""

    # the snapshot arrays that only grow, by rows appended: a snapshot's table is the one
    # before with the records added since after it (``_History.table``), so the durable
    # store writes only those rows (cluster.durability.store, ``append_only``)
    APPEND_ONLY = ("history", "order_history", "answers")

    def __init__(self, signup_balance_micros: int,
                 max_open_positions: int = DEFAULT_MAX_OPEN_POSITIONS,
                 max_open_orders: int = DEFAULT_MAX_OPEN_ORDERS, *,
                 max_recent_locks: int = RECENT_LOCKS_MAX,
                 max_client_order_ids: int = DEFAULT_MAX_CLIENT_ORDER_IDS) -> None:
        signup = _int(signup_balance_micros)
        if signup is None or not 0 <= signup < _I64_END:
            raise ValueError("signup_balance_micros must be an int in 0..2**63-1")
        caps = []
        for name, value in (("max_open_positions", max_open_positions),
                            ("max_open_orders", max_open_orders),
                            ("max_recent_locks", max_recent_locks),
                            ("max_client_order_ids", max_client_order_ids)):
            cap = _int(value)
            if cap is None or cap < 1:
                raise ValueError(f"{name} must be an int >= 1")
            caps.append(cap)
        self.signup_balance_micros = signup
        (self.max_open_positions, self.max_open_orders, self.max_recent_locks,
         self.max_client_order_ids) = caps
        self.ledger = Ledger()
        self._users_by_key_hash: dict[str, int] = {}
        self._account_ids: dict[int, str] = {}
        self._next_user = 1
        self._applied_seq: dict[str, int] = {}
        self._history = _History("history", "close_id")  # closed positions
        self._order_history = _History("order history", "order_id")  # ended orders
        # each clientOrderId's first answer as stored (encode_answer's text, or its place in
        # the answers table once a snapshot wrote it; None while the first request is
        # pending), built into the answer when a retry asks for it
        self._answers: dict[IdemKey, Stored] = {}
        self._answer_log = AnswerLog()  # the answered ones as a snapshot table
        # when each answered clientOrderId got its answer (us), oldest first: what expires
        self._answered_us: dict[IdemKey, int] = {}
        # pending clientOrderIds reserved with a request id: key -> (request_id, since ts_us)
        self._pending: dict[IdemKey, tuple[int, int]] = {}
        # the digest of the terms each held clientOrderId was first used for (where given)
        self._asked: dict[IdemKey, bytes] = {}
        # user -> clientOrderIds held (> 0: keys of _answers), derived by apply
        self._held: dict[int, int] = {}
        # user -> the answered of them, in _answered_us's order (its oldest expires first)
        self._answered_of: dict[int, collections.deque[IdemKey]] = {}
        # request id -> lock of the locks that carried one, oldest first; an entry leaves
        # when released by that id, abandoned, noted or answered (at most max_recent_locks:
        # a new one past that is refused)
        self._recent_locks: collections.OrderedDict[int, _Lock] = collections.OrderedDict()
        self._closed_count = 0
        # user -> opens holding margin (> 0; see the module docstring), derived by apply
        self._open_counts: dict[int, int] = {}
        # user -> open orders holding margin (> 0), derived by apply
        self._order_counts: dict[int, int] = {}
        # request ids of the newest MarginReturned: a resent release of uncounted margin (its
        # answer was lost) releases nothing twice
        self._returned: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.account_log = AccountLog()  # derived by apply
        # request ids of the newest AccountNoted: a request is noted once
        self._noted: collections.OrderedDict[int, None] = collections.OrderedDict()
        # (user, order id) of the open orders whose orderPlaced the account log recorded,
        # derived by apply: an order that ends without it is shown placed first
        self._placed: set[tuple[int, int]] = set()
        self._deciders: dict[type, Callable[[Any, int], _Decision]] = {
            CreateAccount: self._create_account,
            Authenticate: self._authenticate,
            Balances: self._balances,
            OpenCount: self._open_count,
            OrderCount: self._order_count,
            AppliedSeq: self._applied_seq_of,
            History: self._history_of,
            OrderHistory: self._history_of,
            Audit: self._audit,
            Totals: self._totals,
            PendingRequests: self._pending_requests,
            OpenLocks: self._open_locks,
            ExpireAnswers: self._expire_answers,
            LockMargin: self._lock,
            ReleaseMargin: self._release,
            ExpectRelease: self._expect_release,
            AbandonLock: self._abandon,
            Begin: self._begin,
            Remember: self._remember,
            Forget: self._forget,
            ApplySettlements: self._apply_settlements,
            SettleRequests: self._settle_requests,
            ReconcileAtStart: self._reconcile_at_start,
            Note: self._note,
            AccountEvents: self._account_events,
            AccountTail: self._account_tail,
        }
        self._appliers: dict[type, Callable[[Any], None]] = {
            AccountCreated: self._on_account_created,
            MarginLocked: self._on_margin_locked,
            OrderLocked: self._on_margin_locked,
            MarginAdded: self._on_margin_locked,
            MarginReturned: self._on_margin_returned,
            MarginReleased: self._on_margin_released,
            OpenCountSet: self._on_open_count_set,
            OrderCountSet: self._on_order_count_set,
            SettlementApplied: self._on_settlement_applied,
            OrderSettled: self._on_order_settled,
            ClientOrderStoredAt: self._on_client_order_stored_at,
            ClientOrderAsked: self._on_client_order_asked,
            AnswersExpired: self._on_answers_expired,
            ClientOrderStored: self._on_client_order_stored,
            AccountNoted: self._on_account_noted,
            ReleaseExpected: self._on_release_expected,
        }

    # ================================================================= decide
    def decide(self, command: Any, now_us: int) -> _Decision:
        """The answer to ``command`` and the events that carry it out; changes nothing."""
        decider = self._deciders.get(type(command))
        if decider is None:
            raise TypeError(f"not a ledger command: {type(command).__name__}")
        return decider(command, now_us)

    # ----------------------------------------------------------------- reads
    def _authenticate(self, c: Authenticate, now_us: int) -> _Decision:
        user = self._users_by_key_hash.get(c.key_hash)
        return (None if user is None else Principal(user, self._account_ids[user])), _NO_EVENTS

    def _balances(self, c: Balances, now_us: int) -> _Decision:
        return (self.ledger.free_micros(c.user), self.ledger.margin_micros(c.user)), _NO_EVENTS

    def _open_count(self, c: OpenCount, now_us: int) -> _Decision:
        return self._open_counts.get(c.user, 0), _NO_EVENTS

    def _order_count(self, c: OrderCount, now_us: int) -> _Decision:
        return self._order_counts.get(c.user, 0), _NO_EVENTS

    def _applied_seq_of(self, c: AppliedSeq, now_us: int) -> _Decision:
        return self._applied_seq.get(c.shard, 0), _NO_EVENTS

    def _history_of(self, c: History | OrderHistory, now_us: int) -> _Decision:
        history = self._order_history if isinstance(c, OrderHistory) else self._history
        page = history.page(c.user, c.limit, c.before)
        if page is None:
            return _invalid("unknown 'before' cursor")
        return page, _NO_EVENTS

    def _account_events(self, c: AccountEvents, now_us: int) -> _Decision:
        log = self.account_log
        last = log.last_seq.get(c.user, 0)
        since = None if c.since is None else _int(c.since)
        return (last, None if since is None else log.since(c.user, since)), _NO_EVENTS

    def _account_tail(self, c: AccountTail, now_us: int) -> _Decision:
        after, limit = _int(c.after), _int(c.limit)
        if after is None or limit is None:
            return _invalid("after and limit must be integers")
        return self.account_log.after(after, limit), _NO_EVENTS

    def _audit(self, c: Audit, now_us: int) -> _Decision:
        unsettled = c.unsettled or {}
        expected = self._expected_margins(c.open_margins_by_user, unsettled)
        recounts = self._recounts(c.open_counts_by_user, c.open_order_counts_by_user, unsettled)
        if recounts is None:
            return _invalid("open counts must be ints >= 0")
        margins, slots = self._under_way()
        problems = [*self.ledger.audit(expected, margins), *self._stalled(unsettled)]
        for counts, held, _, what in recounts:
            for user in sorted(counts.keys() | held.keys()):
                # a lock under way holds its slot here, at its shard only once it arrived
                extra = held.get(user, 0) - counts.get(user, 0)
                if not 0 <= extra <= slots[what].get(user, 0):
                    problems.append(AuditDifference(f"user:{user}:{what}", (
                        f"user {user}'s {what} (for the limits) is {held.get(user, 0)}, the "
                        f"shards' books make it {counts.get(user, 0)}")))
        return problems, _NO_EVENTS

    def _under_way(self) -> tuple[dict[int, list[int]], dict[str, dict[int, int]]]:
        """What the requests under way hold here that their shard may not show yet:
        ``(margins, slots)``, ``margins`` per user the micros of each lock and announced
        removal, ``slots`` per count ("open_count", "order_count") per user the locks that
        count in it."""
        margins: dict[int, list[int]] = {}
        opens: dict[int, int] = {}
        orders: dict[int, int] = {}
        for user, micros, _, kind in self._recent_locks.values():
            if micros:
                margins.setdefault(user, []).append(micros)
            if kind in (_OPEN, _ORDER):
                opens[user] = opens.get(user, 0) + 1
            if kind == _ORDER:
                orders[user] = orders.get(user, 0) + 1
        return margins, {"open_count": opens, "order_count": orders}

    def _recounts(self, open_counts_by_user: Mapping[int, int] | None,
                  open_order_counts_by_user: Mapping[int, int] | None,
                  unsettled: Mapping[str, Sequence[SettlementItem]]
                  ) -> list[tuple[dict[int, int], dict[int, int], Callable[[int, int], Event],
                                  str]] | None:
        """For each count given: (what it must be per user, what it is here, the event that
        sets it, its name); None if a given count is not an int >= 0."""
        recounts: list[tuple[dict[int, int], dict[int, int], Callable[[int, int], Event],
                             str]] = []
        for given, counted, held, recount, what in (
                (open_counts_by_user, _holds_slot, self._open_counts, OpenCountSet,
                 "open_count"),
                (open_order_counts_by_user, _is_order, self._order_counts, OrderCountSet,
                 "order_count")):
            if given is None:
                continue
            counts = self._expected_counts(given, unsettled, counted)
            if counts is None:
                return None
            recounts.append((counts, held, recount, what))
        return recounts

    def _stalled(self, unsettled: Mapping[str, Sequence[SettlementItem]]
                 ) -> list[AuditDifference]:
        """A difference (subject ``settlements:<shard>``) for each shard whose unapplied items
        the ledger would not take all of: one that would break an invariant (refused, with
        every item after it), or items after a number no outbox holds. The margin audit counts
        such items as still holding their margin, which it is, but they would never settle."""
        problems: list[AuditDifference] = []
        margins: dict[int, int] = {}  # every shard's run applies to the same balances
        for shard in sorted(unsettled):
            run, problem, beyond = self._settlement_run(shard, unsettled[shard], margins)
            if problem is not None:
                problems.append(AuditDifference(f"settlements:{shard}", (
                    f"{problem}; it and {len(beyond) - 1} after it cannot settle")))
            elif beyond:
                due = self._applied_seq.get(shard, 0) + len(run) + 1
                problems.append(AuditDifference(f"settlements:{shard}", (
                    f"settlement {due} of {shard} is in no outbox; {len(beyond)} after it "
                    f"(from {beyond[0]}) cannot settle")))
        return problems

    def _expected_margins(self, open_margins_by_user: Mapping[int, int],
                          unsettled: Mapping[str, Sequence[SettlementItem]]) -> dict[int, int]:
        """Margins that must be locked: open positions and orders plus what the items not
        applied here yet still hold (a close's margin, an ended order's unless it filled)."""
        expected = {int(u): int(m) for u, m in open_margins_by_user.items()}
        for item in self._unapplied(unsettled):
            if _holds_margin(item):
                expected[item.owner] = expected.get(item.owner, 0) + item.margin_micros
        return expected

    def _unapplied(self, unsettled: Mapping[str, Sequence[SettlementItem]]) -> list[_Item]:
        """The items of the shards' outboxes (closes, ended orders) not applied here yet (each
        seq once)."""
        out: list[_Item] = []
        for shard, outbox in unsettled.items():
            applied = self._applied_seq.get(shard, 0)
            out.extend({item.seq: item.closed for item in outbox if item.seq > applied}.values())
        return out

    def _totals(self, c: Totals, now_us: int) -> _Decision:
        accounts = self.ledger.accounts()
        users = self.ledger.users()
        return {
            "sum_micros": self.ledger.total_micros(),
            "funding_micros": accounts[FUNDING],
            "house_micros": accounts[HOUSE],
            "insurance_micros": accounts[INSURANCE],
            "users_free_micros": sum(self.ledger.free_micros(u) for u in users),
            "users_margin_micros": sum(self.ledger.margin_micros(u) for u in users),
            "users": len(self._account_ids),
            "closed_positions": self._closed_count,
            "applied_seq": dict(self._applied_seq),
        }, _NO_EVENTS

    def _expired(self, key: IdemKey, ttl_us: int, now_us: int) -> tuple[Event, ...]:
        """``(AnswersExpired,)`` when ``key``'s answer is older than ``ttl_us`` (> 0) and that
        event drops it (every answer given before it is as old: after a step back of the wall
        clock one may not be, and ``key`` then stays remembered, as with
        :class:`ExpireAnswers`); else ``()``. Between two sweeps an id past the TTL is thus
        free to a request at once (SPEC: after the TTL the id may be reused)."""
        ttl = _int(ttl_us)
        if not ttl or ttl < 0 or key not in self._answered_us:
            return ()
        before_us = now_us - ttl
        if self._answered_us[key] >= before_us:  # the usual retry: no walk of the old ones
            return ()
        for held, ts_us in self._answered_us.items():  # oldest first: stop at the first kept
            if ts_us >= before_us:
                return ()
            if held == key:
                return (AnswersExpired(before_us),)
        return ()

    def _expire_answers(self, c: ExpireAnswers, now_us: int) -> _Decision:
        before_us = now_us - c.ttl_us
        expired = 0
        for ts_us in self._answered_us.values():  # oldest first: stop at the first kept
            if ts_us >= before_us:
                break
            expired += 1
        if not expired:
            return 0, _NO_EVENTS
        return expired, (AnswersExpired(before_us),)

    def _on_answers_expired(self, e: AnswersExpired) -> None:
        answered = self._answered_us
        while answered:
            key, ts_us = next(iter(answered.items()))
            if ts_us >= e.before_ts_us:
                break
            del answered[key]
            self._answers.pop(key, None)
            self._asked.pop(key, None)
            self._unheld(key)
            self._answer_log.expired()
            mine = self._answered_of[key.user]
            mine.popleft()  # (the oldest of its user's: they are in this order)
            if not mine:
                del self._answered_of[key.user]

    def _pending_requests(self, c: PendingRequests, now_us: int) -> _Decision:
        return sorted(request_id for request_id, since_us in self._pending.values()
                      if now_us - since_us >= c.older_than_us), _NO_EVENTS

    def _open_locks(self, c: OpenLocks, now_us: int) -> _Decision:
        limit = _int(c.limit)
        if limit is None or limit < 1:
            return _invalid("limit must be a positive integer")
        return [(request_id, _LOCK_KIND_NAMES[lock.kind]) for request_id, lock
                in itertools.islice(self._recent_locks.items(), limit)], _NO_EVENTS

    # ----------------------------------------------------------------- accounts
    def _create_account(self, c: CreateAccount, now_us: int) -> _Decision:
        if not isinstance(c.key_hash, str) or not c.key_hash:
            return _invalid("an API key hash is required")
        if not isinstance(c.account_id, str) or not c.account_id:
            return _invalid("an account id is required")
        if c.key_hash in self._users_by_key_hash:
            return _invalid("this API key is already in use")
        user = self._next_user
        return CreatedAccount(user, c.account_id, self.signup_balance_micros), [
            AccountCreated(user, self.signup_balance_micros, c.account_id, c.key_hash)]

    # ----------------------------------------------------------------- margins
    def _lock(self, c: LockMargin, now_us: int) -> _Decision:
        lock = c.lock
        key = lock.idem_key
        expired: tuple[Event, ...] = ()
        if key is not None and key in self._answers:
            expired = self._expired(key, c.ttl_us, now_us)
            if not expired:
                return self._seen(key, c.asked), _NO_EVENTS
        request_id = _request_id(lock.request_id)
        if request_id is None:
            return _invalid("request id out of range")
        if key is not None and not expired:
            full, expired = self._no_key_room(key, c.ttl_us, now_us)
            if full is not None:
                return full, _NO_EVENTS
        busy = self._no_room(request_id)
        if busy is not None:
            return busy, _NO_EVENTS
        margin = _int(lock.margin_micros)
        result: Rejected | None = None
        if margin is None or margin <= 0:
            result = Rejected(Code.INVALID_REQUEST, "margin must be greater than zero")
        elif not self.ledger.has_user(lock.user):
            result = Rejected(Code.NOT_FOUND, "account not found")
        elif lock.order and self._order_counts.get(lock.user, 0) >= self.max_open_orders:
            result = Rejected(Code.TOO_MANY_ORDERS,
                              f"at most {self.max_open_orders} open orders per account")
        elif not lock.top_up \
                and self._open_counts.get(lock.user, 0) >= self.max_open_positions:
            result = Rejected(Code.TOO_MANY_POSITIONS,
                              f"at most {self.max_open_positions} open positions per account "
                              "(each pending order holds one)")
        elif (free := self.ledger.free_micros(lock.user)) < margin:
            result = insufficient_balance(free, margin)
        events: list[Event] = [*expired]
        if result is None:
            assert margin is not None
            locked = MarginAdded if lock.top_up else OrderLocked if lock.order else MarginLocked
            events.append(locked(lock.user, margin, request_id))
        if key is not None:
            events.append(ClientOrderStoredAt(key.user, key.kind, key.client_order_id,
                                              request_id, now_us, encode_answer(result)))
            events.extend(_asked_events(key, c.asked))
        return result, events

    def _release(self, c: ReleaseMargin, now_us: int) -> _Decision:
        request_id = _request_id(c.request_id)
        if request_id is None:
            return _invalid("request id out of range")
        amount = _int(c.margin_micros)
        if amount is None or amount < 0:
            return _invalid("margin must be an int >= 0")
        if request_id and request_id not in self._recent_locks:
            # released before (its answer was lost), or abandoned as an API process's that
            # died while the request was slow to arrive: the first answer, nothing released.
            # Judged by the lock or announcement under way, which stays until its request
            # ends, not by the newest returned ids, which a resend delayed past 65,536
            # others (its shard away while it was resolved) left, and freed it twice
            return None, self._answer_events([c.answer] if c.answer else [], now_us, request_id)
        locked = self.ledger.margin_micros(c.user)
        if not self.ledger.has_user(c.user) or locked < amount:
            return _invalid(f"user {c.user} has {locked} margin locked, cannot release {amount}")
        released = MarginReleased if c.counted else MarginReturned
        events: list[Event] = [released(c.user, amount, request_id)]
        if c.answer is not None:
            events.extend(self._answer_events([c.answer], now_us, request_id))
        return None, events

    def _expect_release(self, c: ExpectRelease, now_us: int) -> _Decision:
        request_id, amount = _int(c.request_id), _int(c.margin_micros)
        if request_id is None or not 0 < request_id < START_RECONCILED:
            return _invalid("request id out of range")
        if amount is None or amount < 0:
            return _invalid("margin must be an int >= 0")
        if not self.ledger.has_user(c.user):
            return _invalid(f"no user {c.user}")
        if request_id in self._recent_locks or request_id in self._returned:
            return None, _NO_EVENTS  # announced (or released) already: a resend
        busy = self._no_room(request_id)
        if busy is not None:
            return busy, _NO_EVENTS
        begun: Sequence[Event] = ()
        if c.key is not None:
            seen, begun = self._begin(Begin(c.key, request_id, c.asked, c.ttl_us), now_us)
            if seen is not None:  # held by an earlier request, or first asked for another
                return seen, _NO_EVENTS
        return None, [*begun, ReleaseExpected(c.user, amount, request_id)]

    def _no_room(self, request_id: int) -> Rejected | None:
        """Rejected(SERVICE_UNAVAILABLE) when remembering a lock under ``request_id`` would
        pass ``max_recent_locks`` (nothing is reserved, so a retry runs once locks under way
        end: released, noted, or swept); else None. Evicting the oldest instead left its
        margin locked with nothing to free it (its request's release found no lock)."""
        locks = self._recent_locks
        if not request_id or request_id in locks or len(locks) < self.max_recent_locks:
            return None
        return Rejected(Code.SERVICE_UNAVAILABLE,
                        f"{len(locks)} margin changes are under way, the most the ledger "
                        "tracks; retry shortly with the same clientOrderId")

    def _owed_release(self, request_id: int) -> MarginReturned | None:
        """The release a margin removal announced under ``request_id`` still owes (None: it
        owes none: never announced, released, or ended)."""
        owed = self._recent_locks.get(request_id)
        if owed is None or owed.kind != _REMOVE:
            return None
        return MarginReturned(owed.user, owed.margin_micros, request_id)

    def _abandon(self, c: AbandonLock, now_us: int) -> _Decision:
        lock = self._recent_locks.get(c.request_id)
        if lock is None:
            return None, _NO_EVENTS  # never locked under this id, or already ended
        # (a lock still held ended no request: an answer its clientOrderId has is a retry's,
        # since the answer of its own request ends it)
        user, margin, key, kind = lock
        if kind == _REMOVE:
            margin = 0  # the removal never happened: the margin stays on its position
        elif self.ledger.margin_micros(user) < margin:
            return _invalid(f"user {user} has less margin locked than lock {c.request_id}")
        released = MarginReturned if kind in (_TOP_UP, _REMOVE) else MarginReleased
        events: list[Event] = [released(user, margin, c.request_id)]
        pending = self._pending.get(key) if key is not None else None
        if key is not None and pending is not None and pending[0] == c.request_id:
            events.append(ClientOrderStoredAt(key.user, key.kind, key.client_order_id,
                                              c.request_id, now_us, FORGOTTEN))
        return ((c.request_id, user, margin) if margin else None), events

    # ----------------------------------------------------------------- clientOrderIds
    def _begin(self, c: Begin, now_us: int) -> _Decision:
        key = c.key
        expired: tuple[Event, ...] = ()
        if key in self._answers:
            expired = self._expired(key, c.ttl_us, now_us)
            if not expired:
                return self._seen(key, c.asked), _NO_EVENTS
        request_id = _request_id(c.request_id)
        if request_id is None:
            return _invalid("request id out of range")
        if not expired:
            full, expired = self._no_key_room(key, c.ttl_us, now_us)
            if full is not None:
                return full, _NO_EVENTS
        return None, [*expired, ClientOrderStoredAt(key.user, key.kind, key.client_order_id,
                                                    request_id, now_us, PENDING),
                      *_asked_events(key, c.asked)]

    def _no_key_room(self, key: IdemKey, ttl_us: int, now_us: int
                     ) -> tuple[Rejected | None, tuple[Event, ...]]:
        """Whether the new ``key`` may be held: ``(None, events)``, with the AnswersExpired
        that frees its account's oldest answer past ``ttl_us`` when the account is at
        ``max_client_order_ids``; else ``(Rejected(RATE_LIMITED), ())``, ``retry_after_s``
        until that answer expires (1 when none will: all are pending, or no TTL). Without
        the bound one account could make the ledger keep ~1 KB per request for the TTL."""
        held = self._held.get(key.user, 0)
        if held < self.max_client_order_ids:
            return None, ()
        answered = self._answered_of.get(key.user)
        wait_s = 1
        if answered:
            expired = self._expired(answered[0], ttl_us, now_us)
            if expired:
                return None, expired
            ttl = _int(ttl_us)
            if ttl and ttl > 0:
                wait_us = self._answered_us[answered[0]] + ttl - now_us
                wait_s = max(1, -(-wait_us // 1_000_000))
        return Rejected(Code.RATE_LIMITED,
                        f"this account holds {held} clientOrderIds, the most kept at once; "
                        f"a new one may be used in {wait_s} s, as the oldest is released (or "
                        "send the request without one)", wait_s), ()

    def _remember(self, c: Remember, now_us: int) -> _Decision:
        request_id = _request_id(c.request_id)
        if request_id is None:
            return _invalid("request id out of range")
        return None, self._answer_events([(c.key, c.answer)], now_us, request_id)

    def _note(self, c: Note, now_us: int) -> _Decision:
        body_type = _NOTED_BODY.get(c.kind)
        request_id = _request_id(c.request_id)
        if body_type is None or type(c.body) is not body_type:
            return _invalid(f"cannot note {type(c.body).__name__} as {c.kind!r}")
        if request_id is None:
            return _invalid("request id out of range")
        if c.body.owner != c.user or not self.ledger.has_user(c.user):
            return _invalid("not this account's")
        events = self._answer_events([] if c.key is None else [(c.key, c.body)], now_us,
                                     request_id)
        owed = self._owed_release(request_id)
        if owed is not None:
            # a removal the shard made whose release never came (its API process died): the
            # note, sent by the sweep that resolved it, makes it
            if self.ledger.margin_micros(owed.user) < owed.amount_micros:
                return _invalid(f"user {owed.user} has less margin locked than removal "
                                f"{request_id} releases")
            events.insert(0, owed)
        # noted once per request (a resend after a lost answer notes nothing again); what it
        # made may have ended meanwhile, which apply looks at (the request completed anyway)
        if request_id not in self._noted and not self._shown(c, request_id):
            events.append(AccountNoted(c.user, request_id, c.kind, _stored(c.body)))
        return None, events

    def _shown(self, c: Note, request_id: int) -> bool:
        """Whether ``c`` is what a partial close left open, noted already with the close's
        delivery (and again by the close's own process): a ``positionUpdated``, of a request
        holding nothing here (a lock or a removal's record, which only its note ends), whose
        position's newest events are that partial close, then a ``positionUpdated`` with the
        same terms (the PnL is marked at each read). Only the account's newest
        :data:`SHOWN_SCAN` events are looked at: a TP/SL change of a position the account last
        touched long ago is noted without scanning its whole kept log on the ledger's thread
        (past them, a partial close's rest may be told twice, with the same terms)."""
        body = c.body
        if c.kind != account_events.POSITION_UPDATED or not isinstance(body, OpenPosition) \
                or request_id in self._recent_locks:
            return False
        newest: OpenPosition | None = None
        for e in itertools.islice(self.account_log.newest_first(c.user), SHOWN_SCAN):
            if not isinstance(e.body, OpenPosition | ClosedPosition) \
                    or e.body.position_id != body.position_id:
                continue
            if newest is None:
                if e.kind != account_events.POSITION_UPDATED or \
                        not isinstance(e.body, OpenPosition):
                    return False
                newest = e.body
                continue
            return isinstance(e.body, ClosedPosition) and bool(e.body.partial) and \
                newest._replace(unrealized_pnl_micros=0) == \
                body._replace(unrealized_pnl_micros=0)
        return False

    def _ended(self, user: int, body: OpenPosition | PendingOrder) -> bool:
        """Whether ``body``'s position closed whole (its close id is its id) or its order
        ended, as far as applied here."""
        if isinstance(body, PendingOrder):
            return self._order_history.has(user, body.order_id)
        return self._history.has(user, body.position_id)

    def _seen(self, key: IdemKey, asked: bytes) -> IdemHit | Rejected:
        """What a request ``asked`` with the held ``key`` gets: the first request's answer
        (pending: None), or a refusal when that request asked for something else."""
        first = self._asked.get(key, b"")
        if first and asked and first != asked:
            return Rejected(Code.INVALID_REQUEST, reused_message(key.client_order_id))
        return self._hit(key)

    def _hit(self, key: IdemKey) -> IdemHit:
        stored = self._answers[key]
        if stored is None:
            return IdemHit(None, self._holder(key))
        return IdemHit(decode_answer(self._answer_log.text(stored).encode()), 0)

    def _holder(self, key: IdemKey) -> int:
        """The request id holding ``key``'s pending reservation (0: none, or none named)."""
        pending = self._pending.get(key)
        return 0 if pending is None else pending[0]

    def _forget(self, c: Forget, now_us: int) -> _Decision:
        key = c.key
        if key not in self._answers or self._answers[key] is not None:
            return None, _NO_EVENTS  # only a pending reservation is dropped
        if c.request_id and self._holder(key) != c.request_id:
            return None, _NO_EVENTS  # held by another request now
        return None, [self._stored_event(key, FORGOTTEN, now_us)]

    def _answer_events(self, answers: Iterable[tuple[IdemKey, object]],
                       now_us: int, request_id: int = 0) -> list[Event]:
        """Events storing each first answer (a stored answer is kept; None stores nothing);
        with ``request_id``, the answers of that request: not stored for a key that another
        request has reserved since (a retry's, once this one's reservation was settled)."""
        events: list[Event] = []
        done: set[IdemKey] = set()
        for key, answer in answers:
            if answer is None or key in done or self._answers.get(key) is not None:
                continue
            if request_id and self._holder(key) not in (request_id, 0):
                continue
            done.add(key)
            events.append(self._stored_event(key, _stored(answer), now_us))
        return events

    def _stored_event(self, key: IdemKey, response: bytes, now_us: int) -> ClientOrderStoredAt:
        return ClientOrderStoredAt(key.user, key.kind, key.client_order_id, self._holder(key),
                                   now_us, response)

    def _settle_requests(self, c: SettleRequests, now_us: int) -> _Decision:
        absent = set(c.absent)
        events: list[Event] = []
        settled = 0
        margins: dict[int, int] = {}  # margin left per user after the releases so far
        for key, (request_id, _) in self._pending.items():
            outcome = c.opened.get(request_id)
            if isinstance(outcome, _ANSWER_TYPES.get(key.kind, ())):
                owed = self._owed_release(request_id)
                if owed is not None:
                    # a removal that happened: its release is made with its answer (a retry
                    # given the answer finds the margin freed)
                    left = margins.get(owed.user, self.ledger.margin_micros(owed.user))
                    if left >= owed.amount_micros:
                        margins[owed.user] = left - owed.amount_micros
                        events.append(owed)
                        owed = None
                events.append(self._stored_event(key, _stored(outcome), now_us))
                noted = account_events.NOTED_OF_REQUEST.get(key.kind)
                # numbered among the account's events as the request's own Note would have
                # been: storing the answer ends its lock, which the sweep of orphaned locks
                # would otherwise have noted (a removal whose release is still owed keeps its
                # record until a Note makes both)
                if noted is not None and owed is None and request_id not in self._noted \
                        and getattr(outcome, "owner", None) == key.user:
                    events.append(AccountNoted(key.user, request_id, noted, _stored(outcome)))
                settled += 1
            elif isinstance(outcome, Forgotten):
                events.append(self._stored_event(key, _stored(OUTCOME_UNKNOWN), now_us))
                settled += 1
            elif request_id in absent:
                events.append(self._stored_event(key, FORGOTTEN, now_us))
                settled += 1
        return settled, events

    # ----------------------------------------------------------------- settlements
    def _apply_settlements(self, c: ApplySettlements, now_us: int) -> _Decision:
        if not isinstance(c.shard, str) or not c.shard:
            return _invalid("a shard name is required")
        run, problem, _ = self._settlement_run(c.shard, c.items, {})
        if problem is not None:
            return _invalid(problem)
        events: list[Event] = [_ORDER_SETTLED_EVENT(record, c.shard, seq)
                               if isinstance(record, EndedOrder)
                               else _settlement_event(c.shard, seq, record)
                               for seq, record in run]
        events = self._with_position_notes(c.opened, events)
        events.extend(self._answer_events(c.answers, now_us))
        return self._applied_seq.get(c.shard, 0) + len(run), events

    def _settlement_run(self, shard: str, items: Iterable[SettlementItem],
                        margins: dict[int, int]
                        ) -> tuple[list[tuple[int, _Item]], str | None, list[int]]:
        """What applying ``items`` of ``shard`` now would apply: ``(run, problem, beyond)``,
        ``run`` the items ``last + 1, last + 2, ...`` as ``(seq, item)`` up to the first gap,
        ``problem`` why the run's first bad item would break an invariant (the whole run is
        then refused; ``run`` holds the items before it), ``beyond`` the seqs after the last
        applied one that the run does not reach (after a gap, or the bad item and after).
        ``margins`` (owner -> margin left after the run so far) is updated."""
        last = self._applied_seq.get(shard, 0)
        pool: dict[int, SettlementItem] = {}
        for item in items:
            seq = _int(item.seq)
            if seq is not None and seq > last:
                pool.setdefault(seq, item)
        run: list[tuple[int, _Item]] = []
        seq = last + 1
        while seq in pool:
            record = pool[seq].closed
            problem = (self._ended_order_problem(record, margins)
                       if isinstance(record, EndedOrder)
                       else self._settlement_problem(record, margins))
            if problem is not None:
                return run, f"settlement {seq} of {shard}: {problem}", sorted(
                    s for s in pool if s >= seq)
            run.append((seq, record))
            seq += 1
        return run, None, sorted(s for s in pool if s > seq)

    def _with_position_notes(self, opened: Sequence[OpenPosition], events: list[Event]
                             ) -> list[Event]:
        """``events`` with, right after each fill, the ``positionOpened`` note of the position
        it opened (request id 0: a fill is applied once, by its seq): as ``opened`` lists it,
        or, when a close among ``events`` ended it (a later tick of the same shard call), with
        the terms it closed with and an unrealized PnL of 0. Each order's ``orderFilled`` is
        followed by its position's ``positionOpened``, also when one tick filled several. And
        right after the last partial close of a position that ``opened`` lists (no close among
        ``events`` ended it), the ``positionUpdated`` note of what stays open of it, so the
        rest is told whoever delivers the close (the process that closed it may have died
        before noting it, and nothing else at the ledger knows of a close)."""
        filled = {(e.owner, e.position_id) for e in events
                  if isinstance(e, OrderSettled) and e.status == OrderStatus.FILLED}
        partial = {(e.owner, e.position_id): at for at, e in enumerate(events)
                   if isinstance(e, SettlementApplied) and e.partial}  # -> the last one's place
        if not filled and not partial:  # most batches: whole closes only
            return events
        closed = {(e.owner, e.close_id): e for e in events
                  if isinstance(e, SettlementApplied) and not e.partial}
        notes: dict[tuple[int, int], Event] = {}
        rests: dict[int, Event] = {}  # place of a position's last partial close -> its rest
        for position in opened:
            key = (position.owner, position.position_id)
            if type(position) is not OpenPosition or key in closed:
                continue
            if key in filled and key not in notes and not self._history.has(*key):
                notes[key] = AccountNoted(position.owner, 0, account_events.POSITION_OPENED,
                                          _stored(position))
            at = partial.get(key)
            if at is not None and at not in rests:
                rests[at] = AccountNoted(position.owner, 0, account_events.POSITION_UPDATED,
                                         _stored(position))
        for key in filled & closed.keys():
            if not self._history.has(*key):
                notes[key] = AccountNoted(key[0], 0, account_events.POSITION_OPENED,
                                          _stored(_OPENED_FROM_CLOSE(closed[key], 0)))
        if not notes and not rests:
            return events
        out: list[Event] = []
        for at, e in enumerate(events):
            out.append(e)
            if isinstance(e, OrderSettled) and e.status == OrderStatus.FILLED:
                note = notes.pop((e.owner, e.position_id), None)
                if note is not None:
                    out.append(note)
            rest = rests.get(at)
            if rest is not None:
                out.append(rest)
        return out

    def _settlement_problem(self, c: ClosedPosition, margins: dict[int, int]) -> str | None:
        """Why settling ``c`` would break an invariant (or could not be replayed), else None;
        ``margins`` (owner -> margin left) is updated for the next item of the batch."""
        v, problem = _CLOSE_INTS.read(c)
        if problem is not None:
            return problem
        if not isinstance(c.asset, str):
            return "the asset must be a name"
        if v[_SIDE_AT] not in (Side.LONG, Side.SHORT):
            return f"unknown side {c.side!r}"
        margin, payout = v[_MARGIN_AT], v[_PAYOUT_AT]
        if margin < 0 or payout < 0 or payout + v[_HOUSE_AT] + v[_INSURANCE_AT] != margin:
            return f"unbalanced settlement of margin {margin}"
        if v[_PARTIAL_AT] not in (0, 1) or v[_CLOSE_ID_AT] == 0 or (
                not v[_PARTIAL_AT] and v[_CLOSE_ID_AT] != c.position_id):
            return "a close is named by its position's id, a partial one by an id of its own"
        return self._margin_problem(c.owner, margin, margins, "settle")

    def _ended_order_problem(self, o: EndedOrder, margins: dict[int, int]) -> str | None:
        """Why applying the ended order ``o`` would break an invariant (or could not be
        replayed), else None; ``margins`` as for :meth:`_settlement_problem` (only an order that
        did not fill releases its margin)."""
        v, problem = _ORDER_INTS.read(o)
        if problem is not None:
            return problem
        if not isinstance(o.asset, str) or not isinstance(o.reject_code, str):
            return "the asset and the reject code must be text"
        if v[_O_SIDE_AT] not in (Side.LONG, Side.SHORT):
            return f"unknown side {int(v[_O_SIDE_AT])}"
        if v[_O_KIND_AT] not in (OrderKind.LIMIT, OrderKind.STOP):
            return f"unknown order kind {int(v[_O_KIND_AT])}"
        if v[_O_STATUS_AT] not in _ENDED:
            return f"status {int(v[_O_STATUS_AT])} is not how an order ends"
        margin = v[_O_MARGIN_AT]
        if margin < 0:
            return f"an order's margin must be >= 0, not {margin}"
        return self._margin_problem(o.owner, margin if _holds_margin(o) else 0, margins,
                                    "release")

    def _margin_problem(self, owner: int, margin: int, margins: dict[int, int], verb: str
                        ) -> str | None:
        """Why ``owner`` cannot give up ``margin`` after the batch's items so far (``margins``:
        owner -> margin left, updated), else None."""
        if not self.ledger.has_user(owner):
            return f"user {owner} has no account"
        locked = margins.get(owner, self.ledger.margin_micros(owner))
        if locked < margin:
            return f"user {owner} has {locked} margin locked, cannot {verb} {margin}"
        margins[owner] = locked - margin
        return None

    # ----------------------------------------------------------------- reconciliation
    def _reconcile_at_start(self, c: ReconcileAtStart, now_us: int) -> _Decision:
        expected = self._expected_margins(c.open_margins_by_user, c.unsettled)
        if any(m < 0 for m in expected.values()):
            return _invalid("open margins must be >= 0")
        recounts = self._recounts(c.open_counts_by_user, c.open_order_counts_by_user,
                                  c.unsettled)
        if recounts is None:
            return _invalid("open counts must be ints >= 0")
        resolved = c.resolved or {}
        events: list[Event] = []
        for key, answer in self._answers.items():
            if answer is not None:
                continue
            pending = self._pending.get(key)
            outcome = None if pending is None else resolved.get(pending[0])
            if isinstance(outcome, _ANSWER_TYPES.get(key.kind, ())):
                events.append(self._stored_event(key, _stored(outcome), now_us))
            else:  # no process works on it any more: a retry runs again
                events.append(self._stored_event(key, FORGOTTEN, now_us))
        released: dict[int, int] = {}
        for user in self.ledger.users():
            excess = self.ledger.margin_micros(user) - expected.get(user, 0)
            if excess > 0:
                released[user] = excess
                # an event moves at most an int64 (each lock fits one, their sum need not)
                for part in range(excess, 0, -_I64_MAX):
                    events.append(MarginReleased(user, min(part, _I64_MAX), START_RECONCILED))
            for counts, held, recounted, _ in recounts:
                count = counts.get(user, 0)
                if count != held.get(user, 0):
                    events.append(recounted(user, count))
        # a start-time MarginReleased ends every remembered lock
        if not released and self._recent_locks:
            # nothing in excess, but the remembered locks still end: a zero release carries
            # the marker (the apply of START_RECONCILED forgets them)
            user = next(iter(self._recent_locks.values()))[0]
            events.append(MarginReleased(user, 0, START_RECONCILED))
        return released, events

    def _expected_counts(self, open_counts_by_user: Mapping[int, int],
                         unsettled: Mapping[str, Sequence[SettlementItem]],
                         counted: Callable[[_Item], bool]) -> dict[int, int] | None:
        """What a count will be after the reconciliation: the shards' count plus the items not
        applied here yet that applying will uncount (``counted``); None if a count is not an
        int >= 0."""
        counts: dict[int, int] = {}
        for user, count in open_counts_by_user.items():
            n, u = _int(count), _int(user)
            if n is None or u is None or n < 0:
                return None
            counts[u] = counts.get(u, 0) + n
        for item in self._unapplied(unsettled):
            if counted(item):
                counts[item.owner] = counts.get(item.owner, 0) + 1
        if any(n >= _I64_END for n in counts.values()):
            return None
        return counts

    # ================================================================= apply
    def apply(self, event: Event) -> None:
        """Change the state by one ledger event (live and in recovery)."""
        applier = self._appliers.get(type(event))
        if applier is None:
            raise LedgerError(f"not a ledger event: {event!r}")
        applier(event)

    def apply_batch(self, items: list[Any]) -> None:
        """Apply the events of one journal record, in order."""
        for event in items:
            self.apply(event)

    def outbound(self, after: int) -> tuple[int, list[tuple[bytes, bytes]]]:
        """What the host publishes (cluster.actors.publisher): ``(version, messages)``, the
        account events after version ``after`` as ``(key, value)`` (every kept one when some
        after it are no longer kept)."""
        log = self.account_log
        version, events = log.after(after, max(1, log.version - after))
        if events is None:
            events = log.kept()
        return version, encode_account_events(events)

    def decode_record(self, payload: bytes) -> list[Any]:
        """The events of one journal record (engine.events.decode_batch)."""
        return decode_batch(payload)

    def _on_account_created(self, e: AccountCreated) -> None:
        self.ledger.open_user(e.user, e.deposit_micros)
        self._users_by_key_hash[e.key_hash] = e.user
        self._account_ids[e.user] = e.account_id
        self._next_user = max(self._next_user, e.user + 1)
        self._record_balance(e.user)

    def _on_margin_locked(self, e: MarginLocked | OrderLocked | MarginAdded) -> None:
        refused = self.ledger.lock_margin(e.user, e.amount_micros)
        if refused is not None:
            raise LedgerError(f"lock of {e.amount_micros} for user {e.user} does not apply: "
                              f"{refused.message}")
        kind = _LOCK_KINDS[type(e)]
        if e.request_id:
            self._recent_locks[e.request_id] = _Lock(e.user, e.amount_micros, None, kind)
            while len(self._recent_locks) > self.max_recent_locks:  # older journals only
                self._recent_locks.popitem(last=False)
        self._add_counts(e.user, kind != _TOP_UP, kind == _ORDER)
        self._record_balance(e.user)

    def _on_release_expected(self, e: ReleaseExpected) -> None:
        self._recent_locks[e.request_id] = _Lock(e.user, e.amount_micros, None, _REMOVE)
        while len(self._recent_locks) > self.max_recent_locks:  # older journals only
            self._recent_locks.popitem(last=False)

    def _on_margin_returned(self, e: MarginReturned) -> None:
        self.ledger.release_margin(e.user, e.amount_micros)
        if e.request_id:
            self._recent_locks.pop(e.request_id, None)
            self._returned[e.request_id] = None
            while len(self._returned) > RECENT_LOCKS_MAX:
                self._returned.popitem(last=False)
        self._add_counts(e.user, 0, 0)
        if e.amount_micros:  # (none: a removal that did not happen ended; no balance moved)
            self._record_balance(e.user)

    def _on_margin_released(self, e: MarginReleased) -> None:
        self.ledger.release_margin(e.user, e.amount_micros)
        if e.request_id == START_RECONCILED:  # the start-time reconciliation: every lock ended
            self._recent_locks.clear()
            self._add_counts(e.user, 0, 0)
        else:  # one lock ended (released by its request, or abandoned): an order's too
            lock = self._recent_locks.pop(e.request_id, None) if e.request_id else None
            self._add_counts(e.user, -1, -(lock is not None and lock.kind == _ORDER))
        if e.amount_micros:  # (none: the start's marker alone; no balance moved)
            self._record_balance(e.user)

    def _on_open_count_set(self, e: OpenCountSet) -> None:
        self._set_counts(e.user, opens=e.open_count)

    def _on_order_count_set(self, e: OrderCountSet) -> None:
        self._set_counts(e.user, orders=e.order_count)

    def _add_counts(self, user: int, opens: int, orders: int) -> None:
        self._set_counts(user, self._open_counts.get(user, 0) + opens,
                         self._order_counts.get(user, 0) + orders)

    def _set_counts(self, user: int, opens: int | None = None, orders: int | None = None
                    ) -> None:
        """``user`` holds margin for ``opens`` opens and ``orders`` open orders (None: as
        before); for none of either without margin locked."""
        held = self.ledger.margin_micros(user) > 0
        for counts, count in ((self._open_counts, opens), (self._order_counts, orders)):
            if count is None:
                count = counts.get(user, 0)
            if held and count > 0:
                counts[user] = count
            else:
                counts.pop(user, None)

    def _check_due(self, shard: str, seq: int) -> None:
        """LedgerError unless item ``seq`` of ``shard`` is the one due."""
        due = self._applied_seq.get(shard, 0) + 1
        if seq != due:
            raise LedgerError(f"settlement {seq} of {shard} applied where {due} was due")

    def _on_settlement_applied(self, e: SettlementApplied) -> None:
        self._check_due(e.shard, e.seq)
        self.ledger.settle(e.owner, e.margin_micros, Settlement(
            e.pnl_micros, e.payout_micros, e.house_micros, e.insurance_micros))
        closed = _CLOSED_OF_EVENT(e)
        self._history.add(closed)
        self._closed_count += 1
        self._applied_seq[e.shard] = e.seq
        self._add_counts(e.owner, -(not e.partial), 0)  # the rest of a partial close stays open
        self.account_log.record(e.owner, account_events.POSITION_CLOSED, closed)
        self._record_balance(e.owner)

    def _on_order_settled(self, e: OrderSettled) -> None:
        self._check_due(e.shard, e.seq)
        order: EndedOrder = _ENDED_OF_EVENT(e)
        placed = (e.owner, order.order_id)
        if placed in self._placed:
            self._placed.remove(placed)
        else:  # it ended before its placement's note came (a fill on the next tick can
            # settle first): the stream shows it placed, then ended; the late note is not kept
            self.account_log.record(e.owner, account_events.ORDER_PLACED,
                                    _PENDING_OF_ENDED(order))
        released = _holds_margin(order)  # a fill's margin and slot are its position's now
        if released:
            self.ledger.release_margin(e.owner, e.margin_micros)
        self._order_history.add(order)
        self._applied_seq[e.shard] = e.seq
        self._add_counts(e.owner, -released, -1)
        self.account_log.record(e.owner, _ORDER_ENDED_KIND[order.status], order)
        if released:
            self._record_balance(e.owner)

    def _on_account_noted(self, e: AccountNoted) -> None:
        body = decode_answer(e.body)
        # not streamed after its position closed or its order ended (a trigger may settle
        # before the note arrives): the stream would show it after its end
        if not (isinstance(body, OpenPosition | PendingOrder) and self._ended(e.user, body)):
            self.account_log.record(e.user, e.kind, body)
            if isinstance(body, PendingOrder):
                self._placed.add((e.user, body.order_id))
        if e.request_id:  # (0: a fill's position, noted with its fill, once)
            self._recent_locks.pop(e.request_id, None)  # its request completed
            self._noted[e.request_id] = None
            while len(self._noted) > RECENT_LOCKS_MAX:
                self._noted.popitem(last=False)

    def _record_balance(self, user: int) -> None:
        led = self.ledger
        self.account_log.record(user, account_events.BALANCE,
                                Balance(led.free_micros(user), led.margin_micros(user)))

    def _on_client_order_stored_at(self, e: ClientOrderStoredAt) -> None:
        self._store(IdemKey(e.user, e.kind, e.client_order_id), e.response, e.request_id,
                    e.ts_us)

    def _on_client_order_stored(self, e: ClientOrderStored) -> None:
        """The older layout: no timestamp (a pending reservation counts as pending since 0),
        the open's request id packed into the response."""
        key = IdemKey(e.user, e.kind, e.client_order_id)
        pending_open = decode_pending_open(e.response)
        if pending_open is None:
            self._store(key, e.response, 0, 0)
        else:
            self._store(key, PENDING, pending_open[0], 0)

    def _on_client_order_asked(self, e: ClientOrderAsked) -> None:
        key = IdemKey(e.user, e.kind, e.client_order_id)
        if key in self._answers:
            self._asked[key] = e.asked
            if key in self._answered_us and not isinstance(self._answers[key], str):
                self._answer_log.changed()  # (terms recorded after the table holds the answer)

    def _store(self, key: IdemKey, response: bytes, request_id: int, ts_us: int) -> None:
        answers = self._answers
        if response == FORGOTTEN:
            if key in answers and answers[key] is None:
                if key in self._answered_us:
                    self._answer_log.changed()
                del answers[key]
                self._pending.pop(key, None)
                self._asked.pop(key, None)
                self._unheld(key)
            return
        if answers.get(key) is not None:
            return  # the first answer stays
        if key not in answers:
            self._held[key.user] = self._held.get(key.user, 0) + 1
        if response == PENDING:
            answers[key] = None
            if request_id:
                self._pending[key] = (request_id, ts_us)
                lock = self._recent_locks.get(request_id)
                if lock is not None and lock.key is None:
                    self._recent_locks[request_id] = lock._replace(key=key)
            return
        answers[key] = None if _is_pending(response) else response.decode()
        # kept in answer order; a replayed older record (ts 0) expires first
        if self._answered_us.pop(key, None) is None:
            self._answer_log.answered()
        else:  # (answered again: moved to the newest, out of the table's order)
            self._answer_log.changed()
        self._answered_us[key] = ts_us
        self._answered_of.setdefault(key.user, collections.deque()).append(key)
        pending = self._pending.pop(key, None)
        if pending is not None:
            lock = self._recent_locks.get(pending[0])
            if lock is not None and lock.key == key and lock.kind != _REMOVE:
                # the request completed: its lock backs its answer and is never orphaned (a
                # removal's owed release stays until its note or release makes it)
                del self._recent_locks[pending[0]]

    def _unheld(self, key: IdemKey) -> None:
        """``key`` is no longer held (dropped or expired): its account's count goes down."""
        left = self._held[key.user] - 1
        if left:
            self._held[key.user] = left
        else:
            del self._held[key.user]

    def _count_held(self) -> tuple[dict[int, int], dict[int, collections.deque[IdemKey]]]:
        """The per-account counts and answered keys :meth:`_store` derives, from
        ``_answers`` and ``_answered_us`` alone (a snapshot's; what check() compares)."""
        held = collections.Counter(key.user for key in self._answers)
        answered: dict[int, collections.deque[IdemKey]] = {}
        for key in self._answered_us:
            answered.setdefault(key.user, collections.deque()).append(key)
        return dict(held), answered

    # ================================================================= state
    def snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The whole state, as nothing changes it later (the history tables are read-only
        and kept: see ``_History.table``): ``{"history": HISTORY_DTYPE[n], "order_history":
        ORDER_HISTORY_DTYPE[n]}`` (named columns, one row per closed position / ended order,
        text as indexes into lists of ``meta``) and JSON-able ``meta``."""
        history, (assets,) = self._history.table(HISTORY_DTYPE, _INTEGERS, ("asset",),
                                                 _HISTORY_ROW)
        orders, (order_assets, reject_codes) = self._order_history.table(
            ORDER_HISTORY_DTYPE, _ORDER_INTEGERS, _ORDER_TEXTS, _ORDER_HISTORY_ROW)
        answers, answered_us, asked = self._answers, self._answered_us, self._asked
        answered, answer_log = self._answer_log.table(answered_us, answers, asked)
        meta = {
            "ledger": self.ledger.to_state(),
            "signup_balance_micros": self.signup_balance_micros,
            "next_user": self._next_user,
            "accounts": [[u, self._account_ids[u], h]
                         for h, u in self._users_by_key_hash.items()],
            "applied_seq": dict(self._applied_seq),
            # the pending (the answered are in the table "answers", in answer order; a new
            # key, so that a release before the table refuses the snapshot, rather than read
            # it as holding no answer)
            "pending_answers": [[*k, "", 0, asked.get(k, b"").hex()]
                                for k, a in answers.items()
                                if a is None and k not in answered_us],
            "answer_log": answer_log,
            "pending_requests": [[k.user, k.kind, k.client_order_id, r, since_us]
                                 for k, (r, since_us) in self._pending.items()],
            "recent_locks": [[r, u, m, None if k is None else list(k), kind]
                             for r, (u, m, k, kind) in self._recent_locks.items()],
            "history_assets": assets,
            "order_history_assets": order_assets,
            "order_history_reject_codes": reject_codes,
            **self._counts(),
            # the events as they are (tuples of plain values): made JSON by the snapshot
            # writer, off this thread
            "account_events": self.account_log.kept(),
            "noted": list(self._noted),
            "placed_orders": sorted(self._placed),
        }
        return {"history": history, "order_history": orders, "answers": answered}, meta

    @overload
    @classmethod
    def from_snapshot(cls, signup_balance_micros: int, arrays: Mapping[str, np.ndarray],
                      meta: Mapping[str, Any], /, **options: int) -> LedgerMachine: ...

    @overload
    @classmethod
    def from_snapshot(cls, signup_balance_micros: int, max_open_positions: int,
                      arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], /,
                      **options: int) -> LedgerMachine: ...

    @overload
    @classmethod
    def from_snapshot(cls, signup_balance_micros: int, max_open_positions: int,
                      max_open_orders: int, arrays: Mapping[str, np.ndarray],
                      meta: Mapping[str, Any], /, **options: int) -> LedgerMachine: ...

    @classmethod
    def from_snapshot(cls, signup_balance_micros: int, /, *parts: Any,
                      **options: int) -> LedgerMachine:
        """The machine :meth:`snapshot` gave ``(arrays, meta)`` of: ``parts`` are the
        constructor's other positional arguments (if any), then ``arrays, meta``, and
        ``options`` its keyword ones (how cluster.actors.host.HostSpec builds it). Also reads
        the snapshots of the older durable ledger: ``pending_opens``, locks without their
        clientOrderId or order flag (not an order's), no open or order counts (they start at
        0; the start-time reconciliation sets them), no order history."""
        *config, arrays, meta = parts
        m = cls(signup_balance_micros, *config, **options)
        m.ledger = Ledger.from_state(meta["ledger"])
        # past every user held, as replaying their creations makes it: a taken id given to a
        # new account would hand it that user's balance and positions
        m._next_user = max([int(meta["next_user"]), *(u + 1 for u in m.ledger.users()[-1:])])
        for user, account_id, key_hash in meta["accounts"]:
            m._users_by_key_hash[key_hash] = int(user)
            m._account_ids[int(user)] = account_id
        m._applied_seq = {k: int(v) for k, v in meta["applied_seq"].items()}
        for user, kind, client_order_id, answer, *rest in meta.get("pending_answers",
                                                                   meta.get("answers", [])):
            key = IdemKey(int(user), kind, client_order_id)
            m._answers[key] = None if _is_pending(answer.encode()) else answer
            if m._answers[key] is not None:
                # (older snapshots list the answered here too, in answer order)
                m._answered_us[key] = int(rest[0]) if rest else 0
            if len(rest) > 1 and rest[1]:  # older snapshots kept no terms
                m._asked[key] = bytes.fromhex(rest[1])
        _check_stored_answers([a for a in m._answers.values() if isinstance(a, str)])
        if "answer_log" in meta and "answers" not in arrays:
            raise ValueError("the snapshot's answers table is missing")
        if "answers" in arrays:
            m._load_answers(arrays["answers"], meta["answer_log"])
        else:  # (older snapshots: the next table writes them all)
            m._answer_log.unwritten = len(m._answered_us)
        m._held, m._answered_of = m._count_held()
        for request_id, user, margin, *rest in meta.get("recent_locks", []):
            lock_key = IdemKey(*rest[0]) if rest and rest[0] is not None else None
            m._recent_locks[int(request_id)] = _Lock(int(user), int(margin), lock_key,
                                                     int(rest[1]) if len(rest) > 1 else _OPEN)
        for user, kind, client_order_id, request_id, since_us in meta.get("pending_requests",
                                                                          []):
            m._pending[IdemKey(int(user), kind, client_order_id)] = (int(request_id),
                                                                     int(since_us))
        for user, kind, client_order_id, request_id, _ in meta.get("pending_opens", []):
            key = IdemKey(int(user), kind, client_order_id)
            m._pending[key] = (int(request_id), 0)
            lock = m._recent_locks.get(int(request_id))
            if lock is not None and lock.key is None:
                m._recent_locks[int(request_id)] = lock._replace(key=key)
        history = np.asarray(arrays["history"])
        m._history.load(schema.fill_close_ids(schema.named_columns(
                            history, _V1_HISTORY, len(_V1_HISTORY))),
                        _INTEGERS, _HISTORY_ROW, {"asset": meta["history_assets"]},
                        _as_made(history, HISTORY_DTYPE))
        if "order_history" in arrays:
            orders = np.asarray(arrays["order_history"])
            m._order_history.load(orders, _ORDER_INTEGERS, _ORDER_HISTORY_ROW,
                                  {"asset": meta["order_history_assets"],
                                   "reject_code": meta["order_history_reject_codes"]},
                                  _as_made(orders, ORDER_HISTORY_DTYPE))
        m._closed_count = int(meta["closed_count"])
        for user, count in meta.get("open_counts", []):
            m._set_counts(int(user), opens=int(count))
        m._returned = collections.OrderedDict.fromkeys(int(r) for r in meta.get("returned", []))
        for user, count in meta.get("order_counts", []):
            m._set_counts(int(user), orders=int(count))
        # (older snapshots: no account events; numbering starts again at 1)
        m.account_log.load(meta.get("account_seqs", []),
                           map(_account_event_of_snapshot, meta.get("account_events", [])))
        m._noted = collections.OrderedDict.fromkeys(int(r) for r in meta.get("noted", []))
        if "placed_orders" in meta:
            m._placed = {(int(u), int(o)) for u, o in meta["placed_orders"]}
        else:  # older snapshots: the placements the kept events show, of orders not ended
            m._placed = {(e.user, e.body.order_id) for e in m.account_log.kept()
                         if isinstance(e.body, PendingOrder)
                         and not m._order_history.has(e.user, e.body.order_id)}
        return m

    def _load_answers(self, table: np.ndarray, meta: Mapping[str, Any]) -> None:
        """Take the answered of a snapshot's answers table, in the order given, as live
        (expiry stops at the first one still young, which is not the oldest by the clock
        after the clock stepped back); ValueError for a table that is not one, an answer
        that is not one (:func:`_stored_fields`) or one listed among the pending too."""
        if self._answered_us:
            raise ValueError("answered clientOrderIds both in the meta and in the table")
        self._answer_log = AnswerLog.load(table, meta, self._answers, self._answered_us,
                                          self._asked, _stored_fields)

    @classmethod
    def restore(cls, signup_balance_micros: int, snapshot: SnapshotParts | None,
                max_open_positions: int = DEFAULT_MAX_OPEN_POSITIONS,
                max_open_orders: int = DEFAULT_MAX_OPEN_ORDERS, **options: int
                ) -> LedgerMachine:
        """From a loaded snapshot (``.arrays``, ``.meta``), or fresh when None; ``options``:
        the constructor's keyword arguments."""
        if snapshot is None:
            return cls(signup_balance_micros, max_open_positions, max_open_orders, **options)
        return cls.from_snapshot(signup_balance_micros, max_open_positions, max_open_orders,
                                 snapshot.arrays, snapshot.meta, **options)

    def check(self) -> list[str]:
        """The invariants that need nothing outside the ledger ([] = they hold): accounts sum
        to 0, no negative balance, accounts/history/clientOrderId indexes agree, only users
        with margin locked count open positions or open orders."""
        problems: list[str] = []
        led = self.ledger
        total = led.total_micros()
        if total != 0:
            problems.append(f"accounts sum to {total} micros, expected 0")
        users = led.users()
        for user in users:
            if led.free_micros(user) < 0 or led.margin_micros(user) < 0:
                problems.append(f"user {user} has a negative balance")
        if sorted(self._account_ids) != users:
            problems.append("the accounts differ from the ledger's users")
        if sorted(self._users_by_key_hash.values()) != users:
            problems.append("the API key hashes differ from the ledger's users")
        if users and self._next_user <= users[-1]:
            problems.append(f"next user {self._next_user} is already taken")
        if self._closed_count != len(self._history):
            problems.append("closed count differs from the history")
        problems.extend(self._history.problems())
        problems.extend(self._order_history.problems())
        problems.extend(self.account_log.problems())
        for key in self._pending:
            if key not in self._answers or self._answers[key] is not None:
                problems.append(f"{key} is listed as pending but is not")
        problems.extend(f"{key} keeps the terms of a request it does not hold"
                        for key in self._asked if key not in self._answers)
        if (self._held, self._answered_of) != self._count_held():
            problems.append("the clientOrderIds counted per account differ from those held")
        if not self._answer_log.consistent(len(self._answered_us)):
            problems.append("the answers table counts differ from the answers held")
        if not all(self._answer_log.place_valid(a) for a in self._answers.values()
                   if type(a) is int):
            problems.append("an answer held by its place is not in the answers table")
        if len(self._recent_locks) > self.max_recent_locks:
            problems.append("more recent locks than remembered at most")
        for what, counts in (("open positions", self._open_counts),
                             ("open orders", self._order_counts)):
            for user, count in counts.items():
                if count <= 0 or not led.has_user(user) or led.margin_micros(user) <= 0:
                    problems.append(f"user {user} counts {count} {what} without margin")
        return problems

    def _counts(self) -> dict[str, Any]:
        """The counts kept beside the accounts (closes; opens and orders by user; returned
        requests; the newest seq of each account's events) as plain values, as a snapshot's
        meta and the fingerprint hold them."""
        return {
            "closed_count": self._closed_count,
            "open_counts": sorted(self._open_counts.items()),
            "order_counts": sorted(self._order_counts.items()),
            "returned": list(self._returned),
            "account_seqs": sorted(self.account_log.last_seq.items()),
        }

    def fingerprint(self) -> dict[str, Any]:
        """Every piece of state as plain values (for replay-equality tests)."""
        history, history_index = self._history.fingerprint()
        order_history, order_history_index = self._order_history.fingerprint()
        return {
            "signup_balance_micros": self.signup_balance_micros,
            "accounts": self.ledger.accounts(),
            "key_hashes": sorted(self._users_by_key_hash.items()),
            "account_ids": sorted(self._account_ids.items()),
            "next_user": self._next_user,
            "applied_seq": sorted(self._applied_seq.items()),
            "answers": sorted((tuple(k), PENDING if a is None else encode_answer(
                                   decode_answer(self._answer_log.text(a).encode())))
                              for k, a in self._answers.items()),
            "answered_us": list(self._answered_us.items()),
            "pending": sorted((tuple(k), v) for k, v in self._pending.items()),
            "asked": sorted((tuple(k), v) for k, v in self._asked.items()),
            "held": sorted(self._held.items()),
            "recent_locks": [(r, u, m, None if k is None else tuple(k), kind)
                             for r, (u, m, k, kind) in self._recent_locks.items()],
            "history": history,
            "history_index": history_index,
            "order_history": order_history,
            "order_history_index": order_history_index,
            **self._counts(),
            "account_events": [_account_event_row(e) for e in self.account_log.kept()],
            "noted": list(self._noted),
            "placed_orders": sorted(self._placed),
        }


ACCOUNT_KEYS = 16
"""Message keys of the account events: an account's events are all under the key of its user
modulo this (``accounts-<n>``), so they stay in order on one partition."""
MAX_MESSAGE_CHARS = 256 * 1024
"""A message's events take at most this much JSON (or it holds one event): a Kafka broker
refuses a record batch over its ``message.max.bytes`` (1 MiB by default)."""


def encode_account_events(events: Iterable[AccountEvent]) -> list[tuple[bytes, bytes]]:
    """Account events as messages, in order per key (:data:`ACCOUNT_KEYS`), each holding
    that key's next events up to :data:`MAX_MESSAGE_CHARS`: value = a JSON array of
    ``{"user","seq","version","kind","body"}`` (``body``: a balance's ``[free, margin]``
    micros, any other object as its stored answer's JSON list). One message per event would
    cost the ledger's process far more."""
    groups: dict[int, list[list[str]]] = {}
    sizes: dict[int, int] = {}
    for e in events:
        _, _, kind, body = _account_event_row(e)
        item = (f'{{"user":{e.user},"seq":{e.seq},"version":{e.version},"kind":"{kind}",'
                f'"body":{body}}}')
        key = e.user % ACCOUNT_KEYS
        messages = groups.setdefault(key, [[]])
        if sizes.get(key, 0) + len(item) > MAX_MESSAGE_CHARS and messages[-1]:
            messages.append([])
            sizes[key] = 0
        messages[-1].append(item)
        sizes[key] = sizes.get(key, 0) + len(item) + 1
    return [(b"accounts-%d" % key, f"[{','.join(items)}]".encode())
            for key, messages in groups.items() for items in messages]


def decode_account_events(value: bytes) -> tuple[list[AccountEvent], int]:
    """The account events of one message of :func:`encode_account_events`, and how many of
    its items were not one (dropped); a value that is not a JSON array counts as one."""
    try:
        items = json.loads(value)
    except (ValueError, RecursionError):  # (nesting deeper than the parser recurses)
        return [], 1
    if not isinstance(items, list):
        return [], 1
    events: list[AccountEvent] = []
    for item in items:
        try:
            events.append(_account_event_of_item(item))
        except (ValueError, TypeError):
            continue
    return events, len(items) - len(events)


def _account_event_of_item(data: object) -> AccountEvent:
    if not isinstance(data, dict) or data.get("kind") not in _ACCOUNT_KINDS:
        raise ValueError("not an account event")
    numbers = [data.get(k) for k in ("user", "seq", "version")]
    user, seq, version = [n if type(n) is int and 0 <= n < 1 << 63 else -1 for n in numbers]
    if min(user, seq, version) < 0 or not isinstance(data.get("body"), list):
        raise ValueError("not an account event")
    return AccountEvent(user, seq, version, data["kind"], _account_body(data["kind"], data["body"]))


_ACCOUNT_KINDS = frozenset({account_events.BALANCE, account_events.POSITION_CLOSED,
                            *account_events.NOTED_KINDS, *_ORDER_ENDED_KIND.values()})


def _account_event_row(e: AccountEvent) -> list[Any]:
    """``[user, seq, kind, body]`` with the body as JSON text (a balance: ``[free,
    margin]``, any other: its stored answer)."""
    body = (f"[{e.body.free_micros},{e.body.margin_micros}]" if isinstance(e.body, Balance)
            else encode_answer(e.body).decode())
    return [e.user, e.seq, e.kind, body]


_ACCOUNT_BODIES: dict[str, Callable[..., Any]] = {
    account_events.BALANCE: Balance, account_events.POSITION_OPENED: OpenPosition,
    account_events.POSITION_UPDATED: OpenPosition,
    account_events.POSITION_CLOSED: ClosedPosition, account_events.ORDER_PLACED: PendingOrder,
    **{kind: EndedOrder for kind in _ORDER_ENDED_KIND.values()}}


def _account_event_of_snapshot(row: Sequence[Any]) -> AccountEvent:
    """An account event kept in a snapshot: ``[user, seq, version, kind, body]``, the body its
    object's fields (an older snapshot: ``[user, seq, kind, body]``, the body as JSON text, like
    a message's)."""
    if len(row) == 4:
        return _account_event_of_row(row)
    user, seq, _, kind, body = row
    value = _ACCOUNT_BODIES[kind](*body)
    if hasattr(value, "side"):
        value = value._replace(side=Side(value.side))
    return AccountEvent(int(user), int(seq), 0, kind, value)


def _account_event_of_row(row: Sequence[Any]) -> AccountEvent:
    """Inverse of :func:`_account_event_row` (its ``version`` is set when it is kept again)."""
    user, seq, kind, body = row
    return AccountEvent(int(user), int(seq), 0, kind, _account_body(kind, json.loads(body)))


def _account_body(kind: str, stored: list[Any]) -> object:
    """An account event's object from its JSON form (a balance's ``[free, margin]``, any
    other object's stored answer)."""
    if kind == account_events.BALANCE:  # integers only (a float or text is not an amount)
        return Balance(*map(operator.index, stored))
    return _answer_of(stored)


def _settlement_event(shard: str, seq: int, c: ClosedPosition) -> SettlementApplied:
    event: SettlementApplied = _SETTLEMENT_EVENT(c, shard, seq)
    return event


__all__ = [
    "ACCOUNT_KEYS",
    "DEFAULT_MAX_OPEN_ORDERS",
    "DEFAULT_MAX_OPEN_POSITIONS",
    "FORGOTTEN",
    "HISTORY_MAX_LIMIT",
    "ORDER_HISTORY_DTYPE",
    "PENDING",
    "PENDING_OPEN",
    "RECENT_LOCKS_MAX",
    "START_RECONCILED",
    "AbandonLock",
    "AccountEvents",
    "AccountTail",
    "AppliedSeq",
    "ApplySettlements",
    "Audit",
    "Authenticate",
    "Balances",
    "Begin",
    "CreateAccount",
    "CreatedAccount",
    "ExpectRelease",
    "Forget",
    "History",
    "LedgerMachine",
    "LockMargin",
    "Note",
    "OpenCount",
    "OrderCount",
    "OrderHistory",
    "PendingRequests",
    "ReconcileAtStart",
    "ReleaseMargin",
    "Remember",
    "SettleRequests",
    "SnapshotParts",
    "Totals",
    "decode_account_events",
    "decode_answer",
    "decode_pending_open",
    "encode_account_events",
    "encode_answer",
    "hash_api_key",
    "reused_message",
]
