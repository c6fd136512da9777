"""LedgerCore: accounts, API keys, margins, exactly-once settlement and history over engine.Ledger.

Pure Python, no clock, no Ray: the ledger actor is a thin shell around one LedgerCore, and the
in-process port calls it directly. Users are small integers inside the engine; the public
``accountId`` is an unguessable string mapped to them. API keys are returned once and stored
only as SHA-256 hashes (a key has 256 random bits, so a plain hash is enough: there is nothing
to brute-force, unlike a password).
"""

from __future__ import annotations

import collections
import hashlib
import secrets
from collections.abc import Iterable, Mapping, Sequence

from engine.messages import (
    ClosedPosition,
    IdemHit,
    IdemKey,
    MarginLock,
    NewAccount,
    Principal,
    SettlementItem,
)
from engine.ledger import FUNDING, HOUSE, INSURANCE, Ledger
from engine.results import Code, Rejected
from engine.settlement import Settlement

HISTORY_MAX_LIMIT = 500
# Locks remembered by request id for ``abandon_locks``: an API process abandons a lock within
# seconds of losing its answer, so the newest ones are enough (older ones stay locked until the
# next platform start's reconciliation releases them).
RECENT_LOCKS_MAX = 1 << 16


def hash_api_key(api_key: str) -> str:
    """The stored form of an API key: lowercase hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


class LedgerCore:
    """Balances of every account plus what the API needs around them.

    * ``lock_margins``/``release_margins``: batched free <-> margin moves for opens.
    * ``apply_settlements(shard, items)``: each item carries the shard's sequence number; the
      ledger applies seq ``last+1, last+2, ...`` once each, buffers items that arrive ahead of a
      gap, and ignores resends, so a shard may resend its whole outbox at any time.
    * clientOrderId idempotency: the first answer of ``(user, kind, clientOrderId)`` is stored
      and returned to every retry.
    * ``abandon_locks(request_ids)``: undo locks whose answer the API process never got (so it
      never sent their open), once each.
    """

    def __init__(self, signup_balance_micros: int, ledger: Ledger | None = None) -> None:
        self.signup_balance_micros = signup_balance_micros
        self.ledger = ledger if ledger is not None else Ledger()
        self._users_by_key_hash: dict[str, int] = {}
        self._account_ids: dict[int, str] = {}
        self._users_by_account_id: dict[str, int] = {}
        self._next_user = 1
        self._applied_seq: dict[str, int] = {}
        self._ahead: dict[str, dict[int, SettlementItem]] = {}
        self._history: dict[int, list[ClosedPosition]] = {}
        self._history_index: dict[int, dict[int, int]] = {}  # user -> position id -> index
        self._answers: dict[IdemKey, object] = {}  # None while the first request is pending
        self._closed_count = 0
        # request id -> (user, margin_micros, idempotency key) of the newest locks that carried
        # one, oldest first; an entry leaves when abandoned (or evicted past RECENT_LOCKS_MAX)
        self._recent_locks: collections.OrderedDict[int, tuple[int, int, IdemKey | None]] = \
            collections.OrderedDict()

    # ----------------------------------------------------------------- accounts
    def create_account(self) -> NewAccount:
        """A new account with the signup deposit; the API key is only ever returned here."""
        user = self._next_user
        self._next_user += 1
        account_id = "acc_" + secrets.token_hex(12)
        api_key = secrets.token_urlsafe(32)
        self._users_by_key_hash[hash_api_key(api_key)] = user
        self._account_ids[user] = account_id
        self._users_by_account_id[account_id] = user
        self.ledger.open_user(user, self.signup_balance_micros)
        return NewAccount(user, account_id, api_key, self.signup_balance_micros)

    def principal_of_key_hash(self, key_hash: str) -> Principal | None:
        user = self._users_by_key_hash.get(key_hash)
        return None if user is None else Principal(user, self._account_ids[user])

    def principals_of_key_hashes(self, key_hashes: Sequence[str]) -> list[Principal | None]:
        return [self.principal_of_key_hash(h) for h in key_hashes]

    def balances_many(self, users: Sequence[int]) -> list[tuple[int, int]]:
        """``(free_micros, margin_micros)`` of each user."""
        led = self.ledger
        return [(led.free_micros(u), led.margin_micros(u)) for u in users]

    # ----------------------------------------------------------------- margins
    def lock_margins(self, items: Sequence[MarginLock]) -> list[Rejected | IdemHit | None]:
        """Lock each item's margin (free -> margin); one outcome per item, in order.

        ``None``: locked (and the idempotency key, if any, is reserved as pending).
        ``Rejected``: not locked (INSUFFICIENT_BALANCE; stored as the key's first answer).
        ``IdemHit``: the key was seen before; nothing was locked.
        """
        out: list[Rejected | IdemHit | None] = []
        for item in items:
            key = item.idem_key
            if key is not None and key in self._answers:
                out.append(IdemHit(self._answers[key]))
                continue
            if item.margin_micros <= 0:
                result: Rejected | None = Rejected(Code.INVALID_REQUEST,
                                                   "margin must be greater than zero")
            else:
                result = self.ledger.lock_margin(item.user, item.margin_micros)
            if result is None and item.request_id:
                self._note_lock(item.request_id, item.user, item.margin_micros, key)
            if key is not None:
                self._answers[key] = result  # None = pending until remember()/forget()
            out.append(result)
        return out

    def release_margins(self, items: Sequence[tuple[int, int]],
                        answers: Sequence[tuple[IdemKey, object]] = ()) -> None:
        """Undo locks ``(user, margin_micros)`` of opens a shard refused; store their answers."""
        for user, margin_micros in items:
            self.ledger.release_margin(user, margin_micros)
        self.remember(answers)

    def _note_lock(self, request_id: int, user: int, margin_micros: int,
                   key: IdemKey | None) -> None:
        self._recent_locks[request_id] = (user, margin_micros, key)
        while len(self._recent_locks) > RECENT_LOCKS_MAX:
            self._recent_locks.popitem(last=False)

    def abandon_locks(self, request_ids: Sequence[int]) -> list[tuple[int, int, int]]:
        """Release the locks of ``request_ids`` whose open was never sent (the API process
        lost the lock's answer, so it never called a shard); an idempotency key still pending
        for such a lock is dropped, so a retry runs again.

        Only a lock this ledger holds under that request id is released, once: an unknown
        (never locked, or already abandoned) id changes nothing, and so does a lock whose
        clientOrderId already answers with an opened position. Returns the released
        ``(request_id, user, margin_micros)``.
        """
        released: list[tuple[int, int, int]] = []
        forget: list[IdemKey] = []
        for request_id in request_ids:
            lock = self._recent_locks.pop(request_id, None)
            if lock is None:
                continue
            user, margin_micros, key = lock
            if key is not None and self._answers.get(key, None) is not None:
                continue  # the open has an answer of its own: the lock is not orphaned
            self.ledger.release_margin(user, margin_micros)
            released.append((request_id, user, margin_micros))
            if key is not None:
                forget.append(key)
        if forget:
            self.forget(forget)
        return released

    # ----------------------------------------------------------------- idempotency
    def begin(self, keys: Sequence[IdemKey]) -> list[IdemHit | None]:
        """Reserve each key: ``None`` = reserved now (go ahead), ``IdemHit`` = seen before."""
        out: list[IdemHit | None] = []
        for key in keys:
            if key in self._answers:
                out.append(IdemHit(self._answers[key]))
            else:
                self._answers[key] = None
                out.append(None)
        return out

    def remember(self, answers: Iterable[tuple[IdemKey, object]]) -> None:
        """Store the first answer of each key (later answers never overwrite a stored one)."""
        for key, answer in answers:
            if self._answers.get(key) is None:
                self._answers[key] = answer

    def forget(self, keys: Iterable[IdemKey]) -> None:
        """Drop pending reservations whose request failed transiently (a retry may run again)."""
        for key in keys:
            if key in self._answers and self._answers[key] is None:
                del self._answers[key]

    # ----------------------------------------------------------------- settlements
    def applied_seq(self, shard_name: str) -> int:
        """The last settlement sequence number of ``shard_name`` applied (0 if none)."""
        return self._applied_seq.get(shard_name, 0)

    def apply_settlements(self, shard_name: str, items: Sequence[SettlementItem],
                          answers: Sequence[tuple[IdemKey, object]] = ()) -> int:
        """Apply each settlement of ``shard_name`` exactly once, in sequence order.

        Resends (seq already applied) are ignored; items after a gap wait for it. Returns the
        last applied seq, which the shard acknowledges (drops from its outbox).
        """
        last = self._applied_seq.get(shard_name, 0)
        ahead = self._ahead.setdefault(shard_name, {})
        for item in items:
            if item.seq > last:
                ahead.setdefault(item.seq, item)
        while last + 1 in ahead:
            self._apply(ahead.pop(last + 1).closed)
            last += 1
        self._applied_seq[shard_name] = last
        self.remember(answers)
        return last

    def _apply(self, closed: ClosedPosition) -> None:
        self.ledger.settle(closed.owner, closed.margin_micros,
                           Settlement(closed.pnl_micros, closed.payout_micros, closed.house_micros,
                                      closed.insurance_micros))
        history = self._history.setdefault(closed.owner, [])
        self._history_index.setdefault(closed.owner, {})[closed.position_id] = len(history)
        history.append(closed)
        self._closed_count += 1

    def history(self, user: int, limit: int = 50,
                before: int | None = None) -> list[ClosedPosition] | Rejected:
        """``user``'s closed positions, newest first; ``before`` = a positionId of an earlier page.

        An unknown cursor (or another user's position id) is INVALID_REQUEST, the same answer.
        """
        limit = max(1, min(int(limit), HISTORY_MAX_LIMIT))
        history = self._history.get(user, [])
        end = len(history)
        if before is not None:
            index = self._history_index.get(user, {}).get(before)
            if index is None:
                return Rejected(Code.INVALID_REQUEST, "unknown 'before' cursor")
            end = index
        start = max(0, end - limit)
        return history[start:end][::-1]

    # ----------------------------------------------------------------- audit
    def audit(self, open_margins_by_user: Mapping[int, int],
              unsettled: Mapping[str, Sequence[SettlementItem]] | None = None) -> list[str]:
        """Check the invariant: accounts sum to 0 and each margin account equals the margins of
        the user's open positions plus those of closes not yet applied here.

        ``open_margins_by_user``: summed over all shards; ``unsettled``: each shard's outbox
        (items this ledger already applied are recognised by their seq and not counted twice).
        Returns a list of human-readable differences ([] = consistent).
        """
        expected: dict[int, int] = {u: int(m) for u, m in open_margins_by_user.items()}
        waiting: dict[tuple[str, int], ClosedPosition] = {}
        for shard_name, items in (unsettled or {}).items():
            for item in items:
                waiting[(shard_name, item.seq)] = item.closed
        for shard_name, ahead in self._ahead.items():
            for seq, item in ahead.items():
                waiting[(shard_name, seq)] = item.closed
        for (shard_name, seq), closed in waiting.items():
            if seq > self._applied_seq.get(shard_name, 0):
                expected[closed.owner] = expected.get(closed.owner, 0) + closed.margin_micros
        return list(self.ledger.audit(expected))

    def totals(self) -> dict[str, object]:
        """Totals for ``shardex audit --json`` (all amounts in micro-dollars)."""
        accounts = self.ledger.accounts()
        free = sum(v for k, v in accounts.items() if k.endswith(":free"))
        margin = sum(v for k, v in accounts.items() if k.endswith(":margin"))
        return {
            "sum_micros": int(self.ledger.total_micros()),
            "funding_micros": int(accounts.get(FUNDING, 0)),
            "house_micros": int(accounts.get(HOUSE, 0)),
            "insurance_micros": int(accounts.get(INSURANCE, 0)),
            "users_free_micros": int(free),
            "users_margin_micros": int(margin),
            "users": len(self._account_ids),
            "closed_positions": self._closed_count,
            "applied_seq": dict(self._applied_seq),
            "settlements_waiting": sum(len(a) for a in self._ahead.values()),
        }
