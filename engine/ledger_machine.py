"""LedgerMachine: the ledger as a state machine (engine.machine): decide, then apply.

It holds the double-entry balances (engine.ledger) and what the API needs around them:
accounts and the hashes of their API keys, margin locks, each shard's settlements applied
exactly once in sequence order, closed-position history, and the first answer of every
clientOrderId. Every change is an event of engine.events (``LEDGER_EVENTS``) applied by
:meth:`LedgerMachine.apply`, live and in recovery alike.

Commands (one class per operation, one item each) and their answers:

* :class:`CreateAccount` -> :class:`CreatedAccount` | Rejected
* :class:`LockMargin` -> None (locked) | Rejected | IdemHit
* :class:`ReleaseMargin` -> None | Rejected
* :class:`AbandonLock` -> ``(request_id, user, margin_micros)`` released | None | Rejected
* :class:`Begin` -> None (reserved now) | IdemHit;  :class:`Remember`, :class:`Forget` -> None
* :class:`ApplySettlements` -> the shard's last applied seq | Rejected (nothing applied)
* :class:`SettleRequests` -> how many pending clientOrderIds were settled
* :class:`ReconcileAtStart` -> ``{user: released_micros}`` | Rejected
* reads: :class:`Authenticate`, :class:`Balances`, :class:`OpenCount`, :class:`AppliedSeq`,
  :class:`History`, :class:`Audit`, :class:`Totals`, :class:`PendingRequests`.

A clientOrderId ``(user, kind, client_order_id)`` (an engine.messages.IdemKey) is either
absent, pending (reserved, answer not known yet: stored as None), or answered (the first
answer, returned to every retry and never replaced). A pending one that was reserved with a
request id (an open's lock, a close's ``Begin``) can be resolved against the shards by that id
when its answer was lost (:class:`PendingRequests`, :class:`SettleRequests`).

Settlements: a shard numbers its closes 1, 2, 3...; :class:`ApplySettlements` applies the run
``last+1, last+2, ...`` found in the items and ignores resends and everything after a gap (the
shard resends its whole outbox until acknowledged, so nothing is lost). If any item of that
run would break a ledger invariant the command is refused and none of it is applied.

Open positions per account (SPEC "Limits"): every open locks its margin here first, so the
ledger counts, per user, the opens that hold margin: a lock counts from ``MarginLocked`` until
it is released or abandoned (``MarginReleased``), or, once it became a position, until that
position's close is settled (``SettlementApplied``); a user with no margin locked holds none.
A lock that no request ends stays counted (like its margin) until the start-time
reconciliation, which sets each count from the shards' open positions. :class:`LockMargin`
beyond ``max_open_positions`` answers ``Rejected(TOO_MANY_POSITIONS)`` and locks nothing.
"""

from __future__ import annotations

import collections
import hashlib
import json
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, overload

import numpy as np

from engine import schema
from engine.events import (
    AccountCreated,
    AnswersExpired,
    ClientOrderStored,
    ClientOrderStoredAt,
    Event,
    MarginLocked,
    MarginReleased,
    OpenCountSet,
    SettlementApplied,
    decode_batch,
)
from engine.ledger import FUNDING, HOUSE, INSURANCE, Ledger, LedgerError
from engine.messages import (
    ClosedPosition,
    IdemHit,
    IdemKey,
    MarginLock,
    OpenPosition,
    Principal,
    SettlementItem,
)
from engine.orders import Side
from engine.results import Code, Rejected
from engine.settlement import Settlement

HISTORY_MAX_LIMIT = 500
# Locks remembered by request id for AbandonLock: an API process abandons a lock within seconds
# of losing its answer, so the newest ones are enough (older ones stay locked until the next
# platform start's reconciliation releases them).
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

_I64_MIN, _I64_END = -(1 << 63), 1 << 63
_ANSWER_TYPES = {"open": OpenPosition, "close": ClosedPosition}  # what resolves a request
_SIDE_CAST = {"side": Side}
# Stored answers are JSON lists: the kind, then the record's fields in schema order.
_OPEN_NAMES = schema.names(schema.OPEN_POSITION)
_CLOSED_NAMES = schema.names(schema.CLOSED_POSITION)
_OPEN_ROW = schema.row_reader(schema.OPEN_POSITION)
_CLOSED_ROW = schema.row_reader(schema.CLOSED_POSITION)
_OPEN_OF_ROW = schema.builder(OpenPosition, schema.OPEN_POSITION, casts=_SIDE_CAST)
_CLOSED_OF_ROW = schema.builder(ClosedPosition, schema.CLOSED_POSITION, casts=_SIDE_CAST)
# the closed position a SettlementApplied carries, and back (ints checked as plain ints)
_CLOSED_OF_EVENT = schema.builder(ClosedPosition, schema.SETTLEMENT_APPLIED, casts=_SIDE_CAST)
_INTEGERS = schema.fixed(schema.CLOSED_POSITION)
_INTEGER_NAMES = schema.names(_INTEGERS)
_INTEGER_VALUES = operator.attrgetter(*_INTEGER_NAMES)
_PLAIN_INTS = frozenset({int, Side})  # what a settlement's integers are unless sent oddly
_SIDE_AT, _MARGIN_AT, _PAYOUT_AT, _HOUSE_AT, _INSURANCE_AT = map(_INTEGER_NAMES.index, (
    "side", "margin_micros", "payout_micros", "house_micros", "insurance_micros"))
_SETTLEMENT_EVENT = schema.builder(
    SettlementApplied, schema.CLOSED_POSITION, given=("shard", "seq"),
    casts={**{f.name: operator.index for f in _INTEGERS}, "side": int})
# History in a snapshot: one row per closed position (engine.schema.CLOSED_POSITION at wire
# widths), ``asset`` as an index into ``meta["history_assets"]``. Older snapshots held an
# int64 table with these columns (frozen: they describe files, not today's schema).
HISTORY_DTYPE = schema.dtype(schema.CLOSED_POSITION, overrides={"asset": "<u4"})
_V1_HISTORY = ("position_id", "owner", "asset", "side", "entry_ticks", "qty_steps",
               "margin_micros", "leverage", "liq_ticks", "tp_ticks", "sl_ticks", "opened_ts_us",
               "exit_ticks", "pnl_micros", "payout_micros", "house_micros", "insurance_micros",
               "reason", "closed_ts_us")
_HISTORY_ROW = schema.builder(ClosedPosition, _INTEGERS, given=("asset",), casts=_SIDE_CAST)


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
    elif isinstance(answer, OpenPosition):
        body = ["open", *_OPEN_ROW(answer)]
    elif isinstance(answer, ClosedPosition):
        body = ["closed", *_CLOSED_ROW(answer)]
    else:
        raise TypeError(f"cannot store an answer of type {type(answer).__name__}")
    return json.dumps(body, separators=(",", ":")).encode()


def decode_answer(data: bytes) -> object:
    """Inverse of :func:`encode_answer` (an old pending open reservation decodes to None)."""
    if data == PENDING or data.startswith(PENDING_OPEN):
        return None
    kind, *fields = json.loads(data)
    if kind == "rejected":
        code, message = fields
        return Rejected(Code(code), message)
    if kind == "open":
        _check_length(kind, fields, _OPEN_NAMES)
        return _OPEN_OF_ROW(fields)
    if kind == "closed":
        _check_length(kind, fields, _CLOSED_NAMES)
        return _CLOSED_OF_ROW(fields)
    raise ValueError(f"unknown stored answer kind {kind!r}")


def _check_length(kind: str, fields: list[Any], names: tuple[str, ...]) -> None:
    if len(fields) != len(names):
        raise ValueError(f"a stored {kind} answer has {len(fields)} fields, not {len(names)}")


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
class AppliedSeq:
    """-> the last settlement seq of ``shard`` applied (0 if none)."""

    shard: str


@dataclass(frozen=True, slots=True)
class History:
    """-> ``user``'s closed positions, newest first (``limit`` clamped to 1..500), or
    Rejected(INVALID_REQUEST) for a ``before`` cursor that is not one of the user's positions."""

    user: int
    limit: int = 50
    before: int | None = None


@dataclass(frozen=True, slots=True)
class Audit:
    """-> the differences ([] = consistent) between the accounts and the shards' positions.

    ``open_margins_by_user``: margins of open positions summed over all shards; ``unsettled``:
    each shard's outbox (items already applied here are recognised by seq).
    """

    open_margins_by_user: Mapping[int, int]
    unsettled: Mapping[str, Sequence[SettlementItem]] | None = None


@dataclass(frozen=True, slots=True)
class Totals:
    """-> totals for ``shardex audit --json`` (amounts in micros)."""


@dataclass(frozen=True, slots=True)
class PendingRequests:
    """-> sorted request ids of the clientOrderIds pending for at least ``older_than_us``
    (opens and closes reserved with a request id)."""

    older_than_us: int = 0


@dataclass(frozen=True, slots=True)
class ExpireAnswers:
    """Forget the clientOrderIds answered more than ``ttl_us`` ago (SPEC: after the TTL the id
    may be used again). -> how many were forgotten."""

    ttl_us: int


@dataclass(frozen=True, slots=True)
class LockMargin:
    """Move ``lock.margin_micros`` of ``lock.user`` from free to margin.

    -> None: locked (the clientOrderId, if any, reserved as pending with ``lock.request_id``);
    Rejected: not locked (INSUFFICIENT_BALANCE, TOO_MANY_POSITIONS, NOT_FOUND, INVALID_REQUEST;
    stored as the clientOrderId's first answer); IdemHit: the clientOrderId was seen before,
    nothing locked.
    """

    lock: MarginLock


@dataclass(frozen=True, slots=True)
class ReleaseMargin:
    """Undo a lock (margin -> free) of an open that did not happen; ``request_id``: the lock's
    (0 = not given), so it can no longer be abandoned; ``answer``: a clientOrderId answer to
    store with it. -> None, or Rejected(INVALID_REQUEST) if less margin is locked."""

    user: int
    margin_micros: int
    request_id: int = 0
    answer: tuple[IdemKey, object] | None = None


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
    seen before (its answer, None while pending)."""

    key: IdemKey
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class Remember:
    """Store ``answer`` as the first answer of ``key`` (an existing answer is kept)."""

    key: IdemKey
    answer: object


@dataclass(frozen=True, slots=True)
class Forget:
    """Drop ``key``'s pending reservation (the request failed transiently: a retry runs)."""

    key: IdemKey


@dataclass(frozen=True, slots=True)
class ApplySettlements:
    """Apply ``shard``'s settlements exactly once, in seq order (see the module docstring),
    and store ``answers`` (clientOrderIds of the closes). -> the last applied seq."""

    shard: str
    items: tuple[SettlementItem, ...]
    answers: tuple[tuple[IdemKey, object], ...] = ()


@dataclass(frozen=True, slots=True)
class SettleRequests:
    """Settle pending clientOrderIds by what every shard said about their request id.

    ``opened``: request id -> the OpenPosition (open) / ClosedPosition (close) it made: stored
    as the answer. ``absent``: request ids no shard has (fenced everywhere): the reservation is
    dropped. Margins are not touched. -> how many were settled.
    """

    opened: Mapping[int, OpenPosition | ClosedPosition]
    absent: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ReconcileAtStart:
    """Undo what requests cut off by a platform crash left half done (no request in flight).

    Each user's margin above the margins of their open positions plus unapplied closes
    (``open_margins_by_user``, ``unsettled`` outboxes) is released; every lock ends (none can be
    abandoned any more). Pending clientOrderIds: one whose request id ``resolved`` maps to the
    position it made gets that answer, every other is dropped. ``open_counts_by_user``: open
    positions per user over all shards; each user's count of opens holding margin becomes that
    plus their unapplied closes (None: counts are kept, but a user left with no margin holds
    none). -> ``{user: released_micros}``.
    """

    open_margins_by_user: Mapping[int, int]
    unsettled: Mapping[str, Sequence[SettlementItem]]
    resolved: Mapping[int, object] | None = None
    open_counts_by_user: Mapping[int, int] | None = None


class CreatedAccount(NamedTuple):
    """The answer to :class:`CreateAccount` (the API key stays with the caller)."""

    user: int
    account_id: str
    balance_micros: int


class SnapshotParts(Protocol):
    """What :meth:`LedgerMachine.restore` reads of a loaded snapshot (``arrays``, ``meta``)."""

    @property
    def arrays(self) -> Mapping[str, np.ndarray]: ...

    @property
    def meta(self) -> Mapping[str, Any]: ...


_Lock = tuple[int, int, IdemKey | None]  # user, margin_micros, clientOrderId reserved with it
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


def _invalid(message: str) -> _Decision:
    return Rejected(Code.INVALID_REQUEST, message), _NO_EVENTS


def _stored(answer: object) -> bytes:
    """:func:`encode_answer`, checked to decode (so applying it cannot fail)."""
    data = encode_answer(answer)
    decode_answer(data)
    return data


# --------------------------------------------------------------------------- the machine
class LedgerMachine:
    """The ledger's whole state (see the module docstring); ``signup_balance_micros`` is the
    deposit of every new account, ``max_open_positions`` the most opens an account may hold
    margin for."""

    def __init__(self, signup_balance_micros: int,
                 max_open_positions: int = DEFAULT_MAX_OPEN_POSITIONS) -> None:
        signup = _int(signup_balance_micros)
        if signup is None or not 0 <= signup < _I64_END:
            raise ValueError("signup_balance_micros must be an int in 0..2**63-1")
        cap = _int(max_open_positions)
        if cap is None or cap < 1:
            raise ValueError("max_open_positions must be an int >= 1")
        self.signup_balance_micros = signup
        self.max_open_positions = cap
        self.ledger = Ledger()
        self._users_by_key_hash: dict[str, int] = {}
        self._account_ids: dict[int, str] = {}
        self._next_user = 1
        self._applied_seq: dict[str, int] = {}
        self._history: dict[int, list[ClosedPosition]] = {}
        self._history_index: dict[int, dict[int, int]] = {}  # user -> position id -> index
        self._answers: dict[IdemKey, object] = {}  # None while the first request is pending
        # when each answered clientOrderId got its answer (us), oldest first: what expires
        self._answered_us: dict[IdemKey, int] = {}
        # pending clientOrderIds reserved with a request id: key -> (request_id, since ts_us)
        self._pending: dict[IdemKey, tuple[int, int]] = {}
        # request id -> lock of the newest locks that carried one, oldest first; an entry
        # leaves when released by that id, abandoned, answered, or evicted past the maximum
        self._recent_locks: collections.OrderedDict[int, _Lock] = collections.OrderedDict()
        self._closed_count = 0
        # user -> opens holding margin (> 0; see the module docstring), derived by apply
        self._open_counts: dict[int, int] = {}
        self._deciders: dict[type, Callable[[Any, int], _Decision]] = {
            CreateAccount: self._create_account,
            Authenticate: self._authenticate,
            Balances: self._balances,
            OpenCount: self._open_count,
            AppliedSeq: self._applied_seq_of,
            History: self._history_of,
            Audit: self._audit,
            Totals: self._totals,
            PendingRequests: self._pending_requests,
            ExpireAnswers: self._expire_answers,
            LockMargin: self._lock,
            ReleaseMargin: self._release,
            AbandonLock: self._abandon,
            Begin: self._begin,
            Remember: self._remember,
            Forget: self._forget,
            ApplySettlements: self._apply_settlements,
            SettleRequests: self._settle_requests,
            ReconcileAtStart: self._reconcile_at_start,
        }
        self._appliers: dict[type, Callable[[Any], None]] = {
            AccountCreated: self._on_account_created,
            MarginLocked: self._on_margin_locked,
            MarginReleased: self._on_margin_released,
            OpenCountSet: self._on_open_count_set,
            SettlementApplied: self._on_settlement_applied,
            ClientOrderStoredAt: self._on_client_order_stored_at,
            AnswersExpired: self._on_answers_expired,
            ClientOrderStored: self._on_client_order_stored,
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

    def _applied_seq_of(self, c: AppliedSeq, now_us: int) -> _Decision:
        return self._applied_seq.get(c.shard, 0), _NO_EVENTS

    def _history_of(self, c: History, now_us: int) -> _Decision:
        limit = max(1, min(int(c.limit), HISTORY_MAX_LIMIT))
        history = self._history.get(c.user, [])
        end = len(history)
        if c.before is not None:
            index = self._history_index.get(c.user, {}).get(c.before)
            if index is None:
                return _invalid("unknown 'before' cursor")
            end = index
        return history[max(0, end - limit):end][::-1], _NO_EVENTS

    def _audit(self, c: Audit, now_us: int) -> _Decision:
        expected = self._expected_margins(c.open_margins_by_user, c.unsettled or {})
        return list(self.ledger.audit(expected)), _NO_EVENTS

    def _expected_margins(self, open_margins_by_user: Mapping[int, int],
                          unsettled: Mapping[str, Sequence[SettlementItem]]) -> dict[int, int]:
        """Margins that must be locked: open positions plus closes not applied here yet."""
        expected = {int(u): int(m) for u, m in open_margins_by_user.items()}
        for closed in self._unapplied(unsettled):
            expected[closed.owner] = expected.get(closed.owner, 0) + closed.margin_micros
        return expected

    def _unapplied(self, unsettled: Mapping[str, Sequence[SettlementItem]]
                   ) -> list[ClosedPosition]:
        """The closes of the shards' outboxes not applied here yet (each seq once)."""
        out: list[ClosedPosition] = []
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

    def _pending_requests(self, c: PendingRequests, now_us: int) -> _Decision:
        return sorted(request_id for request_id, since_us in self._pending.values()
                      if now_us - since_us >= c.older_than_us), _NO_EVENTS

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
        if key is not None and key in self._answers:
            return IdemHit(self._answers[key]), _NO_EVENTS
        request_id = _int(lock.request_id)
        if request_id is None or not 0 <= request_id < START_RECONCILED:
            return _invalid("request id out of range")
        margin = _int(lock.margin_micros)
        result: Rejected | None = None
        if margin is None or margin <= 0:
            result = Rejected(Code.INVALID_REQUEST, "margin must be greater than zero")
        elif not self.ledger.has_user(lock.user):
            result = Rejected(Code.NOT_FOUND, "account not found")
        elif self._open_counts.get(lock.user, 0) >= self.max_open_positions:
            result = Rejected(Code.TOO_MANY_POSITIONS,
                              f"at most {self.max_open_positions} open positions per account")
        elif self.ledger.free_micros(lock.user) < margin:
            result = Rejected(Code.INSUFFICIENT_BALANCE, "insufficient free balance")
        events: list[Event] = []
        if result is None:
            assert margin is not None
            events.append(MarginLocked(lock.user, margin, request_id))
        if key is not None:
            events.append(ClientOrderStoredAt(key.user, key.kind, key.client_order_id,
                                              request_id, now_us, encode_answer(result)))
        return result, events

    def _release(self, c: ReleaseMargin, now_us: int) -> _Decision:
        request_id = _int(c.request_id)
        if request_id is None or not 0 <= request_id < START_RECONCILED:
            return _invalid("request id out of range")
        amount = _int(c.margin_micros)
        if amount is None or amount < 0:
            return _invalid("margin must be an int >= 0")
        locked = self.ledger.margin_micros(c.user)
        if not self.ledger.has_user(c.user) or locked < amount:
            return _invalid(f"user {c.user} has {locked} margin locked, cannot release {amount}")
        events: list[Event] = [MarginReleased(c.user, amount, request_id)]
        if c.answer is not None:
            events.extend(self._answer_events([c.answer], now_us))
        return None, events

    def _abandon(self, c: AbandonLock, now_us: int) -> _Decision:
        lock = self._recent_locks.get(c.request_id)
        if lock is None:
            return None, _NO_EVENTS  # never locked under this id, or already ended
        user, margin, key = lock
        if key is not None and self._answers.get(key) is not None:
            return None, _NO_EVENTS  # the open has an answer of its own: not orphaned
        if self.ledger.margin_micros(user) < margin:
            return _invalid(f"user {user} has less margin locked than lock {c.request_id}")
        events: list[Event] = [MarginReleased(user, margin, c.request_id)]
        pending = self._pending.get(key) if key is not None else None
        if key is not None and pending is not None and pending[0] == c.request_id:
            events.append(ClientOrderStoredAt(key.user, key.kind, key.client_order_id,
                                              c.request_id, now_us, FORGOTTEN))
        return (c.request_id, user, margin), events

    # ----------------------------------------------------------------- clientOrderIds
    def _begin(self, c: Begin, now_us: int) -> _Decision:
        key = c.key
        if key in self._answers:
            return IdemHit(self._answers[key]), _NO_EVENTS
        request_id = _int(c.request_id)
        if request_id is None or not 0 <= request_id < START_RECONCILED:
            return _invalid("request id out of range")
        return None, [ClientOrderStoredAt(key.user, key.kind, key.client_order_id, request_id,
                                          now_us, PENDING)]

    def _remember(self, c: Remember, now_us: int) -> _Decision:
        return None, self._answer_events([(c.key, c.answer)], now_us)

    def _forget(self, c: Forget, now_us: int) -> _Decision:
        key = c.key
        if key not in self._answers or self._answers[key] is not None:
            return None, _NO_EVENTS  # only a pending reservation is dropped
        return None, [self._stored_event(key, FORGOTTEN, now_us)]

    def _answer_events(self, answers: Iterable[tuple[IdemKey, object]],
                       now_us: int) -> list[Event]:
        """Events storing each first answer (a stored answer is kept; None stores nothing)."""
        events: list[Event] = []
        done: set[IdemKey] = set()
        for key, answer in answers:
            if answer is None or key in done or self._answers.get(key) is not None:
                continue
            done.add(key)
            events.append(self._stored_event(key, _stored(answer), now_us))
        return events

    def _stored_event(self, key: IdemKey, response: bytes, now_us: int) -> ClientOrderStoredAt:
        pending = self._pending.get(key)
        return ClientOrderStoredAt(key.user, key.kind, key.client_order_id,
                                   0 if pending is None else pending[0], now_us, response)

    def _settle_requests(self, c: SettleRequests, now_us: int) -> _Decision:
        absent = set(c.absent)
        events: list[Event] = []
        for key, (request_id, _) in self._pending.items():
            outcome = c.opened.get(request_id)
            if isinstance(outcome, _ANSWER_TYPES.get(key.kind, ())):
                events.append(self._stored_event(key, _stored(outcome), now_us))
            elif request_id in absent:
                events.append(self._stored_event(key, FORGOTTEN, now_us))
        return len(events), events

    # ----------------------------------------------------------------- settlements
    def _apply_settlements(self, c: ApplySettlements, now_us: int) -> _Decision:
        if not isinstance(c.shard, str) or not c.shard:
            return _invalid("a shard name is required")
        last = self._applied_seq.get(c.shard, 0)
        pool: dict[int, SettlementItem] = {}
        for item in c.items:
            seq = _int(item.seq)
            if seq is not None and seq > last:
                pool.setdefault(seq, item)
        events: list[Event] = []
        margins: dict[int, int] = {}  # margin left per owner after the run so far
        seq = last + 1
        while seq in pool:
            closed = pool[seq].closed
            problem = self._settlement_problem(closed, margins)
            if problem is not None:
                return _invalid(f"settlement {seq} of {c.shard}: {problem}")
            events.append(_settlement_event(c.shard, seq, closed))
            seq += 1
        events.extend(self._answer_events(c.answers, now_us))
        return seq - 1, events

    def _settlement_problem(self, c: ClosedPosition, margins: dict[int, int]) -> str | None:
        """Why settling ``c`` would break an invariant (or could not be replayed), else None;
        ``margins`` (owner -> margin left) is updated for the next item of the batch."""
        v: tuple[int, ...] | list[int] = _INTEGER_VALUES(c)
        # plain ints in range, checked in a few C-level passes over the values; anything else
        # (numpy ints, bools, out of range) field by field
        if not (_PLAIN_INTS.issuperset(map(type, v)) and min(v) >= _I64_MIN
                and max(v) < _I64_END):
            checked: list[int] = []
            for name, value in zip(_INTEGER_NAMES, v, strict=True):
                number = _int(value)
                if number is None or not _I64_MIN <= number < _I64_END:
                    return f"{name} must be an int64"
                checked.append(number)
            v = checked
        if not isinstance(c.asset, str):
            return "the asset must be a name"
        if v[_SIDE_AT] not in (Side.LONG, Side.SHORT):
            return f"unknown side {c.side!r}"
        margin, payout = v[_MARGIN_AT], v[_PAYOUT_AT]
        if margin < 0 or payout < 0 or payout + v[_HOUSE_AT] + v[_INSURANCE_AT] != margin:
            return f"unbalanced settlement of margin {margin}"
        if not self.ledger.has_user(c.owner):
            return f"user {c.owner} has no account"
        locked = margins.get(c.owner, self.ledger.margin_micros(c.owner))
        if locked < margin:
            return f"user {c.owner} has {locked} margin locked, cannot settle {margin}"
        margins[c.owner] = locked - margin
        return None

    # ----------------------------------------------------------------- reconciliation
    def _reconcile_at_start(self, c: ReconcileAtStart, now_us: int) -> _Decision:
        expected = self._expected_margins(c.open_margins_by_user, c.unsettled)
        if any(m < 0 for m in expected.values()):
            return _invalid("open margins must be >= 0")
        counts: dict[int, int] | None = None
        if c.open_counts_by_user is not None:
            counts = self._expected_counts(c.open_counts_by_user, c.unsettled)
            if counts is None:
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
                events.append(MarginReleased(user, excess, START_RECONCILED))
            count = None if counts is None else counts.get(user, 0)
            if count is not None and count != self._open_counts.get(user, 0):
                events.append(OpenCountSet(user, count))
        # a start-time MarginReleased ends every remembered lock
        if not released and self._recent_locks:
            # nothing in excess, but the remembered locks still end: a zero release carries
            # the marker (the apply of START_RECONCILED forgets them)
            user = next(iter(self._recent_locks.values()))[0]
            events.append(MarginReleased(user, 0, START_RECONCILED))
        return released, events

    def _expected_counts(self, open_counts_by_user: Mapping[int, int],
                         unsettled: Mapping[str, Sequence[SettlementItem]]
                         ) -> dict[int, int] | None:
        """Opens that will hold margin after the reconciliation: open positions plus closes
        not applied here yet (None if a count is not an int >= 0)."""
        counts: dict[int, int] = {}
        for user, count in open_counts_by_user.items():
            n, u = _int(count), _int(user)
            if n is None or u is None or n < 0:
                return None
            counts[u] = counts.get(u, 0) + n
        for closed in self._unapplied(unsettled):
            counts[closed.owner] = counts.get(closed.owner, 0) + 1
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

    def decode_record(self, payload: bytes) -> list[Any]:
        """The events of one journal record (engine.events.decode_batch)."""
        return decode_batch(payload)

    def _on_account_created(self, e: AccountCreated) -> None:
        self.ledger.open_user(e.user, e.deposit_micros)
        self._users_by_key_hash[e.key_hash] = e.user
        self._account_ids[e.user] = e.account_id
        self._next_user = max(self._next_user, e.user + 1)

    def _on_margin_locked(self, e: MarginLocked) -> None:
        refused = self.ledger.lock_margin(e.user, e.amount_micros)
        if refused is not None:
            raise LedgerError(f"lock of {e.amount_micros} for user {e.user} does not apply: "
                              f"{refused.message}")
        if e.request_id:
            self._recent_locks[e.request_id] = (e.user, e.amount_micros, None)
            while len(self._recent_locks) > RECENT_LOCKS_MAX:
                self._recent_locks.popitem(last=False)
        self._set_open_count(e.user, self._open_counts.get(e.user, 0) + 1)

    def _on_margin_released(self, e: MarginReleased) -> None:
        self.ledger.release_margin(e.user, e.amount_micros)
        count = self._open_counts.get(e.user, 0)
        if e.request_id == START_RECONCILED:  # the start-time reconciliation: every lock ended
            self._recent_locks.clear()
        else:  # one lock ended (released by its request, or abandoned)
            if e.request_id:
                self._recent_locks.pop(e.request_id, None)
            count -= 1
        self._set_open_count(e.user, count)

    def _on_open_count_set(self, e: OpenCountSet) -> None:
        self._set_open_count(e.user, e.open_count)

    def _set_open_count(self, user: int, count: int) -> None:
        """``user`` holds margin for ``count`` opens (none without margin locked)."""
        if count > 0 and self.ledger.margin_micros(user) > 0:
            self._open_counts[user] = count
        else:
            self._open_counts.pop(user, None)

    def _on_settlement_applied(self, e: SettlementApplied) -> None:
        due = self._applied_seq.get(e.shard, 0) + 1
        if e.seq != due:
            raise LedgerError(f"settlement {e.seq} of {e.shard} applied where {due} was due")
        self.ledger.settle(e.owner, e.margin_micros, Settlement(
            e.pnl_micros, e.payout_micros, e.house_micros, e.insurance_micros))
        self._add_history(_CLOSED_OF_EVENT(e))
        self._closed_count += 1
        self._applied_seq[e.shard] = e.seq
        self._set_open_count(e.owner, self._open_counts.get(e.owner, 0) - 1)

    def _add_history(self, closed: ClosedPosition) -> None:
        history = self._history.setdefault(closed.owner, [])
        self._history_index.setdefault(closed.owner, {})[closed.position_id] = len(history)
        history.append(closed)

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

    def _store(self, key: IdemKey, response: bytes, request_id: int, ts_us: int) -> None:
        answers = self._answers
        if response == FORGOTTEN:
            if key in answers and answers[key] is None:
                del answers[key]
                self._pending.pop(key, None)
            return
        if answers.get(key) is not None:
            return  # the first answer stays
        if response == PENDING:
            answers[key] = None
            if request_id:
                self._pending[key] = (request_id, ts_us)
                lock = self._recent_locks.get(request_id)
                if lock is not None and lock[2] is None:
                    self._recent_locks[request_id] = (lock[0], lock[1], key)
            return
        answers[key] = decode_answer(response)
        # kept in answer order; a replayed older record (ts 0) expires first
        self._answered_us.pop(key, None)
        self._answered_us[key] = ts_us
        pending = self._pending.pop(key, None)
        if pending is not None:
            lock = self._recent_locks.get(pending[0])
            if lock is not None and lock[2] == key:
                # the request completed: its lock backs its answer and is never orphaned
                del self._recent_locks[pending[0]]

    # ================================================================= state
    def snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Copies of the whole state: ``{"history": HISTORY_DTYPE[n]}`` (named columns, one
        row per closed position, ``asset`` as an index into ``meta["history_assets"]``) and
        JSON-able ``meta``."""
        closes = [c for user_closes in self._history.values() for c in user_closes]
        history = np.zeros(len(closes), dtype=HISTORY_DTYPE)
        for f in _INTEGERS:
            history[f.name] = list(map(operator.attrgetter(f.name), closes))
        assets: dict[str, int] = {}
        history["asset"] = [assets.setdefault(c.asset, len(assets)) for c in closes]
        meta = {
            "ledger": self.ledger.to_state(),
            "signup_balance_micros": self.signup_balance_micros,
            "next_user": self._next_user,
            "accounts": [[u, self._account_ids[u], h]
                         for h, u in self._users_by_key_hash.items()],
            "applied_seq": dict(self._applied_seq),
            # pending first, then the answered in answer order (the order expiry follows)
            "answers": [[k.user, k.kind, k.client_order_id, encode_answer(a).decode(),
                         self._answered_us.get(k, 0)]
                        for k, a in [*((k, a) for k, a in self._answers.items() if a is None),
                                     *((k, self._answers[k]) for k in self._answered_us)]],
            "pending_requests": [[k.user, k.kind, k.client_order_id, r, since_us]
                                 for k, (r, since_us) in self._pending.items()],
            "recent_locks": [[r, u, m, None if k is None else list(k)]
                             for r, (u, m, k) in self._recent_locks.items()],
            "history_assets": list(assets),
            "closed_count": self._closed_count,
            "open_counts": sorted(self._open_counts.items()),
        }
        return {"history": history}, meta

    @overload
    @classmethod
    def from_snapshot(cls, signup_balance_micros: int, arrays: Mapping[str, np.ndarray],
                      meta: Mapping[str, Any], /) -> LedgerMachine: ...

    @overload
    @classmethod
    def from_snapshot(cls, signup_balance_micros: int, max_open_positions: int,
                      arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], /
                      ) -> LedgerMachine: ...

    @classmethod
    def from_snapshot(cls, signup_balance_micros: int, *parts: Any) -> LedgerMachine:
        """The machine :meth:`snapshot` gave ``(arrays, meta)`` of: ``parts`` are the
        constructor's other arguments (if any), then ``arrays, meta`` (how
        cluster.actors.host.HostSpec builds it). Also reads the snapshots of the older durable
        ledger: ``pending_opens``, locks without their clientOrderId, no open counts (they
        start at 0; the start-time reconciliation sets them)."""
        *config, arrays, meta = parts
        m = cls(signup_balance_micros, *config)
        m.ledger = Ledger.from_state(meta["ledger"])
        m._next_user = int(meta["next_user"])
        for user, account_id, key_hash in meta["accounts"]:
            m._users_by_key_hash[key_hash] = int(user)
            m._account_ids[int(user)] = account_id
        m._applied_seq = {k: int(v) for k, v in meta["applied_seq"].items()}
        answered: list[tuple[int, IdemKey]] = []
        for user, kind, client_order_id, answer, *ts in meta["answers"]:
            key = IdemKey(int(user), kind, client_order_id)
            m._answers[key] = decode_answer(answer.encode())
            if m._answers[key] is not None:
                answered.append((int(ts[0]) if ts else 0, key))
        # a stable sort: answers of one microsecond keep their order
        m._answered_us = {key: ts_us
                          for ts_us, key in sorted(answered, key=operator.itemgetter(0))}
        for request_id, user, margin, *key in meta.get("recent_locks", []):
            lock_key = IdemKey(*key[0]) if key and key[0] is not None else None
            m._recent_locks[int(request_id)] = (int(user), int(margin), lock_key)
        for user, kind, client_order_id, request_id, since_us in meta.get("pending_requests",
                                                                          []):
            m._pending[IdemKey(int(user), kind, client_order_id)] = (int(request_id),
                                                                     int(since_us))
        for user, kind, client_order_id, request_id, _ in meta.get("pending_opens", []):
            key = IdemKey(int(user), kind, client_order_id)
            m._pending[key] = (int(request_id), 0)
            lock = m._recent_locks.get(int(request_id))
            if lock is not None and lock[2] is None:
                m._recent_locks[int(request_id)] = (lock[0], lock[1], key)
        names = meta["history_assets"]
        history = schema.named_columns(np.asarray(arrays["history"]), _V1_HISTORY,
                                       len(_V1_HISTORY))
        for index, row in zip(history["asset"].tolist(), schema.rows(history, _INTEGERS),
                              strict=True):
            m._add_history(_HISTORY_ROW(row, names[index]))
        m._closed_count = int(meta["closed_count"])
        for user, count in meta.get("open_counts", []):
            m._set_open_count(int(user), int(count))
        return m

    @classmethod
    def restore(cls, signup_balance_micros: int, snapshot: SnapshotParts | None,
                max_open_positions: int = DEFAULT_MAX_OPEN_POSITIONS) -> LedgerMachine:
        """From a loaded snapshot (``.arrays``, ``.meta``), or fresh when None."""
        if snapshot is None:
            return cls(signup_balance_micros, max_open_positions)
        return cls.from_snapshot(signup_balance_micros, max_open_positions, snapshot.arrays,
                                 snapshot.meta)

    def check(self) -> list[str]:
        """The invariants that need nothing outside the ledger ([] = they hold): accounts sum
        to 0, no negative balance, accounts/history/clientOrderId indexes agree, only users
        with margin locked count open positions."""
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
        if self._closed_count != sum(len(h) for h in self._history.values()):
            problems.append("closed count differs from the history")
        for user, history in self._history.items():
            index = {c.position_id: i for i, c in enumerate(history)}
            if self._history_index.get(user) != index or any(c.owner != user for c in history):
                problems.append(f"history index of user {user} is inconsistent")
        for key in self._pending:
            if key not in self._answers or self._answers[key] is not None:
                problems.append(f"{key} is listed as pending but is not")
        if len(self._recent_locks) > RECENT_LOCKS_MAX:
            problems.append("more recent locks than remembered at most")
        for user, count in self._open_counts.items():
            if count <= 0 or not led.has_user(user) or led.margin_micros(user) <= 0:
                problems.append(f"user {user} counts {count} open positions without margin")
        return problems

    def fingerprint(self) -> dict[str, Any]:
        """Every piece of state as plain values (for replay-equality tests)."""
        return {
            "signup_balance_micros": self.signup_balance_micros,
            "accounts": self.ledger.accounts(),
            "key_hashes": sorted(self._users_by_key_hash.items()),
            "account_ids": sorted(self._account_ids.items()),
            "next_user": self._next_user,
            "applied_seq": sorted(self._applied_seq.items()),
            "answers": sorted((tuple(k), encode_answer(a)) for k, a in self._answers.items()),
            "answered_us": list(self._answered_us.items()),
            "pending": sorted((tuple(k), v) for k, v in self._pending.items()),
            "recent_locks": [(r, u, m, None if k is None else tuple(k))
                             for r, (u, m, k) in self._recent_locks.items()],
            "history": sorted((u, [tuple(c) for c in h]) for u, h in self._history.items()),
            "history_index": sorted((u, sorted(i.items()))
                                    for u, i in self._history_index.items()),
            "closed_count": self._closed_count,
            "open_counts": sorted(self._open_counts.items()),
        }


def _settlement_event(shard: str, seq: int, c: ClosedPosition) -> SettlementApplied:
    event: SettlementApplied = _SETTLEMENT_EVENT(c, shard, seq)
    return event


__all__ = [
    "DEFAULT_MAX_OPEN_POSITIONS",
    "FORGOTTEN",
    "HISTORY_MAX_LIMIT",
    "PENDING",
    "PENDING_OPEN",
    "RECENT_LOCKS_MAX",
    "START_RECONCILED",
    "AbandonLock",
    "AppliedSeq",
    "ApplySettlements",
    "Audit",
    "Authenticate",
    "Balances",
    "Begin",
    "CreateAccount",
    "CreatedAccount",
    "Forget",
    "History",
    "LedgerMachine",
    "LockMargin",
    "OpenCount",
    "PendingRequests",
    "ReconcileAtStart",
    "ReleaseMargin",
    "Remember",
    "SettleRequests",
    "SnapshotParts",
    "Totals",
    "decode_answer",
    "decode_pending_open",
    "encode_answer",
    "hash_api_key",
]
