"""DurableLedger: a LedgerCore whose every acknowledged change is journaled and recoverable.

Same methods and answers as cluster.ledger_core.LedgerCore. Each mutating call runs the core's
own logic in memory, appends one ledger event (engine.events) per change it made, and commits
the journal once before it returns; a nested call (``release_margins`` storing answers through
``remember``) commits only when the outermost call ends. ``__init__`` rebuilds the state from
``directory`` (newest snapshot + journal tail, cluster.journal_store) before serving.

Events per change:

* account created -> ``AccountCreated`` (the API key itself is never stored, only its hash);
* margin locked / released -> ``MarginLocked`` / ``MarginReleased`` (a lock abandoned by
  ``abandon_locks`` carries its request id; ``reconcile_at_start``'s releases carry
  ``START_RECONCILED``, which also ends every remembered lock);
* settlement ``seq`` of a shard applied -> ``SettlementApplied`` (the whole close and its four
  amounts), so the per-shard applied seq and the history survive and a resend after a restart
  is still ignored: exactly once;
* clientOrderId reserved / answered / reservation dropped -> ``ClientOrderStored`` whose
  ``response`` is :func:`encode_answer` of the stored answer (``b""`` = reserved, pending;
  :func:`encode_pending_open` = reserved together with the margin lock of open request
  ``request_id``; ``FORGOTTEN`` = the pending reservation was dropped).

Settlements that arrive ahead of a gap are not journaled: the shard's outbox is durable and is
resent until the ledger acknowledges it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cluster.journal_store import JournalStore
from cluster.ledger_core import LedgerCore, hash_api_key
from engine.messages import (
    ClosedPosition,
    IdemHit,
    IdemKey,
    MarginLock,
    NewAccount,
    OpenPosition,
    SettlementItem,
)
from engine.events import (
    AccountCreated,
    ClientOrderStored,
    MarginLocked,
    MarginReleased,
    SettlementApplied,
)
from engine.ledger import Ledger, LedgerError
from engine.orders import Side
from engine.results import Code, Rejected
from cluster.durability.snapshot import Snapshot

PENDING = b""  # ClientOrderStored.response of a reservation whose answer is not known yet
FORGOTTEN = b"\x00"  # ClientOrderStored.response that drops a pending reservation
PENDING_OPEN = b"\x01"  # prefix of a pending reservation that knows its open's request id
# MarginReleased.request_id of start-time reconciliation: every lock made before it is settled
# (API request ids stay below 2**62)
START_RECONCILED = (1 << 64) - 1

# history rows in a snapshot: the ClosedPosition fields except ``asset`` (an index into the
# snapshot's asset names instead)
_HISTORY_FIELDS = ("position_id", "owner", "asset", "side", "entry_ticks", "qty_steps",
                   "margin_micros", "leverage", "liq_ticks", "tp_ticks", "sl_ticks",
                   "opened_ts_us", "exit_ticks", "pnl_micros", "payout_micros", "house_micros",
                   "insurance_micros", "reason", "closed_ts_us")
_MISSING = object()


# --------------------------------------------------------------------------- answers
def encode_answer(answer: object) -> bytes:
    """The stored form of a clientOrderId answer (None = pending): compact JSON."""
    if answer is None:
        return PENDING
    if isinstance(answer, Rejected):
        body: list[Any] = ["rejected", answer.code.value, answer.message]
    elif isinstance(answer, OpenPosition):
        body = ["open", *answer]
    elif isinstance(answer, ClosedPosition):
        body = ["closed", *answer]
    else:
        raise TypeError(f"cannot store an answer of type {type(answer).__name__}")
    return json.dumps(body, separators=(",", ":")).encode()


def encode_pending_open(request_id: int, margin_micros: int) -> bytes:
    """A pending open reservation that remembers its open request and the margin locked."""
    return PENDING_OPEN + json.dumps([request_id, margin_micros]).encode()


def decode_pending_open(data: bytes) -> tuple[int, int] | None:
    """``(request_id, margin_micros)`` of :func:`encode_pending_open` bytes, else None."""
    if not data.startswith(PENDING_OPEN):
        return None
    request_id, margin_micros = json.loads(data[len(PENDING_OPEN):])
    return int(request_id), int(margin_micros)


def decode_answer(data: bytes) -> object:
    """Inverse of :func:`encode_answer` (a pending open reservation decodes to None too)."""
    if data == PENDING or data.startswith(PENDING_OPEN):
        return None
    kind, *fields = json.loads(data)
    if kind == "rejected":
        return Rejected(Code(fields[0]), fields[1])
    if kind == "open":
        fields[3] = Side(fields[3])
        return OpenPosition(*fields)
    if kind == "closed":
        fields[3] = Side(fields[3])
        return ClosedPosition(*fields)
    raise ValueError(f"unknown stored answer kind {kind!r}")


def _settlement_event(shard_name: str, seq: int, c: ClosedPosition) -> SettlementApplied:
    return SettlementApplied(shard_name, seq, c.position_id, c.owner, c.asset, int(c.side),
                             c.entry_ticks, c.qty_steps, c.margin_micros, c.leverage,
                             c.liq_ticks, c.tp_ticks, c.sl_ticks, c.opened_ts_us, c.exit_ticks,
                             c.pnl_micros, c.payout_micros, c.house_micros, c.insurance_micros,
                             c.reason, c.closed_ts_us)


class DurableLedger(LedgerCore):
    """LedgerCore journaled to ``directory`` (``DATA_DIR/ledger``); see the module docstring.

    ``store_options`` go to :class:`cluster.journal_store.JournalStore` (fsync, snapshot
    cadence, clock). ``recovered`` tells what the constructor rebuilt.
    """

    def __init__(self, signup_balance_micros: int, directory: str | os.PathLike[str],
                 **store_options: Any) -> None:
        super().__init__(signup_balance_micros)
        self._depth = 0
        # pending clientOrderIds of opens whose lock carried the open's request id:
        # key -> (request_id, margin_micros); resolved against the shards at a platform start
        self._pending_opens: dict[IdemKey, tuple[int, int]] = {}
        # when each pending open was seen here (monotonic s; recovered ones: at recovery)
        self._pending_since: dict[IdemKey, float] = {}
        self.store = JournalStore(Path(directory), **store_options)
        try:
            self.recovered = self.store.recover(self._restore, DurableLedger._apply_event)
        except BaseException:
            self.store.close()
            raise

    # ----------------------------------------------------------------- call framing
    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """One batched call: commit once when the outermost call ends (also after an error:
        whatever changed in memory was journaled and must not be acknowledged later without
        being durable), then checkpoint if due."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self.store.pending:
                self.store.commit()
                self.store.maybe_checkpoint(self._snapshot)

    # ----------------------------------------------------------------- mutations
    def create_account(self) -> NewAccount:
        with self._call():
            account = super().create_account()
            self.store.append(AccountCreated(account.user, self.signup_balance_micros,
                                             account.account_id, hash_api_key(account.api_key)))
            return account

    def lock_margins(self, items: Sequence[MarginLock]) -> list[Rejected | IdemHit | None]:
        with self._call():
            out = super().lock_margins(items)
            for item, result in zip(items, out, strict=True):
                if isinstance(result, IdemHit):
                    continue
                request_id = getattr(item, "request_id", 0)
                if result is None:
                    self.store.append(MarginLocked(item.user, item.margin_micros, request_id))
                key = item.idem_key
                if key is None:
                    continue
                if result is None and request_id:
                    self._pending_opens[key] = (request_id, item.margin_micros)
                    self._pending_since[key] = time.monotonic()
                    self.store.append(ClientOrderStored(
                        key.user, key.kind, key.client_order_id,
                        encode_pending_open(request_id, item.margin_micros)))
                else:
                    self._append_answer(key, result)
            return out

    def release_margins(self, items: Sequence[tuple[int, int]],
                        answers: Sequence[tuple[IdemKey, object]] = ()) -> None:
        with self._call():
            super().release_margins(items, answers)  # stores answers through remember()
            for user, margin_micros in items:
                self.store.append(MarginReleased(user, margin_micros, 0))

    def abandon_locks(self, request_ids: Sequence[int]) -> list[tuple[int, int, int]]:
        with self._call():
            released = super().abandon_locks(request_ids)  # drops keys through forget()
            for request_id, user, margin_micros in released:
                self.store.append(MarginReleased(user, margin_micros, request_id))
            return released

    def begin(self, keys: Sequence[IdemKey]) -> list[IdemHit | None]:
        with self._call():
            out = super().begin(keys)
            for key, result in zip(keys, out, strict=True):
                if result is None:
                    self._append_answer(key, None)
            return out

    def remember(self, answers: Iterable[tuple[IdemKey, object]]) -> None:
        with self._call():
            answers = list(answers)
            before = [self._answers.get(key, _MISSING) for key, _ in answers]
            super().remember(answers)
            for (key, _), old in zip(answers, before, strict=True):
                new = self._answers.get(key, _MISSING)
                if new is not old and new is not None:
                    self._drop_pending(key)
                    self._append_answer(key, new)

    def forget(self, keys: Iterable[IdemKey]) -> None:
        with self._call():
            keys = list(keys)
            pending = [k for k in keys if k in self._answers and self._answers[k] is None]
            super().forget(keys)
            for key in pending:
                if key not in self._answers:
                    self._drop_pending(key)
                    self.store.append(ClientOrderStored(key.user, key.kind, key.client_order_id,
                                                        FORGOTTEN))

    def apply_settlements(self, shard_name: str, items: Sequence[SettlementItem],
                          answers: Sequence[tuple[IdemKey, object]] = ()) -> int:
        with self._call():
            before = self.applied_seq(shard_name)
            pool = dict(self._ahead.get(shard_name, {}))
            for item in items:
                pool.setdefault(item.seq, item)
            last = super().apply_settlements(shard_name, items, answers)
            for seq in range(before + 1, last + 1):
                self.store.append(_settlement_event(shard_name, seq, pool[seq].closed))
            return last

    def pending_open_requests(self, older_than_s: float = 0.0) -> list[int]:
        """Request ids of the opens whose clientOrderId has been pending here for at least
        ``older_than_s`` seconds (to resolve them against the shards: ``resolve_opens``)."""
        now = time.monotonic()
        return sorted(request_id for key, (request_id, _) in self._pending_opens.items()
                      if now - self._pending_since.get(key, now) >= older_than_s)

    def settle_pending_opens(self, opened: Mapping[int, object],
                             absent: Iterable[int]) -> int:
        """Answer pending open clientOrderIds from what every shard said about their request.

        ``opened``: request id -> OpenPosition (it opened): stored as the answer, so a retry
        gets that position. ``absent``: request ids no shard has; ``resolve_opens`` fenced
        them on every shard, so the open can never happen any more and the reservation is
        dropped (a retry runs again). The margin of an absent open is not touched here: the
        API process that locked it releases it when it learns the same (or, if that process
        died, the next platform start does). Safe at any time: a live request whose open is
        fenced this way is refused by the shard and undone by its API process. Returns how
        many were settled. Used at a platform start and periodically for stale ones, so a
        clientOrderId cut off by a ledger crash does not answer "in progress" forever.
        """
        absent = set(absent)
        settled = 0
        with self._call():
            for key, (request_id, _) in list(self._pending_opens.items()):
                if self._answers.get(key, 0) is not None:  # answered or gone meanwhile
                    self._drop_pending(key)
                    continue
                outcome = opened.get(request_id)
                if isinstance(outcome, OpenPosition):
                    self._answers[key] = outcome
                    self._append_answer(key, outcome)
                elif request_id in absent:
                    del self._answers[key]
                    self.store.append(ClientOrderStored(key.user, key.kind, key.client_order_id,
                                                        FORGOTTEN))
                else:
                    continue
                self._drop_pending(key)
                settled += 1
        return settled

    def _drop_pending(self, key: IdemKey) -> None:
        self._pending_opens.pop(key, None)
        self._pending_since.pop(key, None)

    def reconcile_at_start(self, open_margins_by_user: Mapping[int, int],
                           unsettled: Mapping[str, Sequence[SettlementItem]],
                           resolved_opens: Mapping[int, object] | None = None
                           ) -> dict[int, int]:
        """Undo what requests cut off by a platform crash left half done.

        Only correct while no request is in flight anywhere (at a platform start, before the
        API serves): then every user's margin account must equal the margins of their open
        positions plus those of closes not yet applied (``open_margins_by_user`` summed over
        the shards, ``unsettled`` = each shard's outbox). A lock whose open was lost with the
        process that made it (an API replica killed between lock and open, or a lock whose
        answer was lost with the ledger) leaves more; that excess is released (journaled as
        ``MarginReleased``). clientOrderId reservations still pending belong to requests that
        no process is working on any more. An open's reservation that knows its request id is
        settled by ``resolved_opens`` (request id -> what the shards' ``resolve_opens`` said,
        every shard asked, so the request is fenced everywhere): an OpenPosition becomes the
        stored answer, so a retry gets that position instead of a second one; anything else
        means the open never happened and the reservation is dropped. Other pending
        reservations are dropped too, so a retry runs again instead of waiting forever.
        Returns ``{user: released_micros}``.
        """
        expected = {int(u): int(m) for u, m in open_margins_by_user.items()}
        for shard_name, outbox in unsettled.items():
            applied = self.applied_seq(shard_name)
            for item in outbox:
                if item.seq > applied:
                    owner = item.closed.owner
                    expected[owner] = expected.get(owner, 0) + item.closed.margin_micros
        released: dict[int, int] = {}
        with self._call():
            resolved = dict(resolved_opens or {})
            self.settle_pending_opens(resolved, [r for r, _ in self._pending_opens.values()
                                                 if r not in resolved])
            for user in self.ledger.users():
                excess = self.ledger.margin_micros(user) - expected.get(user, 0)
                if excess > 0:
                    self.ledger.release_margin(user, excess)
                    self.store.append(MarginReleased(user, excess, START_RECONCILED))
                    released[user] = excess
            # every lock is now either backing a position or released: none may be abandoned
            self._recent_locks.clear()
            for key in [k for k, a in self._answers.items() if a is None]:
                del self._answers[key]
                self.store.append(ClientOrderStored(key.user, key.kind, key.client_order_id,
                                                    FORGOTTEN))
        return released

    def _key_recent_lock(self, request_id: int, key: IdemKey) -> None:
        """Recovery: attach the pending clientOrderId to its remembered lock."""
        lock = self._recent_locks.get(request_id)
        if lock is not None:
            self._recent_locks[request_id] = (lock[0], lock[1], key)

    def _append_answer(self, key: IdemKey, answer: object) -> None:
        self.store.append(ClientOrderStored(key.user, key.kind, key.client_order_id,
                                            encode_answer(answer)))

    # ----------------------------------------------------------------- replay
    def _apply_event(self, event: Any) -> None:
        """Re-apply one journaled event (recovery only; the live path ran the core's logic)."""
        if isinstance(event, AccountCreated):
            user = event.user
            self.ledger.open_user(user, event.deposit_micros)
            self._users_by_key_hash[event.key_hash] = user
            self._account_ids[user] = event.account_id
            self._users_by_account_id[event.account_id] = user
            self._next_user = max(self._next_user, user + 1)
        elif isinstance(event, MarginLocked):
            refused = self.ledger.lock_margin(event.user, event.amount_micros)
            if refused is not None:
                raise LedgerError(f"journaled lock of {event.amount_micros} for user "
                                  f"{event.user} does not replay: {refused.message}")
            if event.request_id:
                self._note_lock(event.request_id, event.user, event.amount_micros, None)
        elif isinstance(event, MarginReleased):
            self.ledger.release_margin(event.user, event.amount_micros)
            if event.request_id == START_RECONCILED:
                self._recent_locks.clear()
            elif event.request_id:
                self._recent_locks.pop(event.request_id, None)
        elif isinstance(event, SettlementApplied):
            expected = self._applied_seq.get(event.shard, 0) + 1
            if event.seq != expected:
                raise LedgerError(f"settlement {event.seq} of {event.shard} replayed where "
                                  f"{expected} was due")
            self._apply(ClosedPosition(
                event.position_id, event.owner, event.asset, Side(event.side),
                event.entry_ticks, event.qty_steps, event.margin_micros, event.leverage,
                event.liq_ticks, event.tp_ticks, event.sl_ticks, event.opened_ts_us,
                event.exit_ticks, event.pnl_micros, event.payout_micros, event.house_micros,
                event.insurance_micros, event.reason, event.closed_ts_us))
            self._applied_seq[event.shard] = event.seq
        elif isinstance(event, ClientOrderStored):
            key = IdemKey(event.user, event.kind, event.client_order_id)
            pending_open = decode_pending_open(event.response)
            if event.response == FORGOTTEN:
                if key in self._answers and self._answers[key] is None:
                    del self._answers[key]
                self._drop_pending(key)
            elif self._answers.get(key) is None:
                answer = decode_answer(event.response)
                self._answers[key] = answer
                if pending_open is not None:
                    self._pending_opens[key] = pending_open
                    self._pending_since[key] = time.monotonic()
                    self._key_recent_lock(pending_open[0], key)
                elif answer is not None:
                    self._drop_pending(key)
        else:
            raise LedgerError(f"not a ledger event: {event!r}")

    # ----------------------------------------------------------------- snapshots
    def _snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Copies of the whole state: history as an int64 array, the rest as JSON meta."""
        assets: dict[str, int] = {}
        rows: list[tuple[int, ...]] = []
        for closes in self._history.values():
            for c in closes:
                index = assets.setdefault(c.asset, len(assets))
                rows.append((c.position_id, c.owner, index, int(c.side), *c[4:]))
        history = np.array(rows, dtype=np.int64).reshape(-1, len(_HISTORY_FIELDS))
        meta = {
            "ledger": self.ledger.to_state(),
            "signup_balance_micros": self.signup_balance_micros,
            "next_user": self._next_user,
            "accounts": [[u, self._account_ids[u], h]
                         for h, u in self._users_by_key_hash.items()],
            "applied_seq": dict(self._applied_seq),
            "answers": [[k.user, k.kind, k.client_order_id, encode_answer(a).decode()]
                        for k, a in self._answers.items()],
            "pending_opens": [[k.user, k.kind, k.client_order_id, r, m]
                              for k, (r, m) in self._pending_opens.items()],
            "recent_locks": [[r, u, m] for r, (u, m, _) in self._recent_locks.items()],
            "history_assets": list(assets),
            "closed_count": self._closed_count,
        }
        return {"history": history}, meta

    def _restore(self, snapshot: Snapshot | None) -> DurableLedger:
        if snapshot is None:
            return self
        meta = snapshot.meta
        self.ledger = Ledger.from_state(meta["ledger"])
        self._next_user = int(meta["next_user"])
        for user, account_id, key_hash in meta["accounts"]:
            self._users_by_key_hash[key_hash] = user
            self._account_ids[user] = account_id
            self._users_by_account_id[account_id] = user
        self._applied_seq = {k: int(v) for k, v in meta["applied_seq"].items()}
        for user, kind, client_order_id, answer in meta["answers"]:
            self._answers[IdemKey(user, kind, client_order_id)] = decode_answer(answer.encode())
        for request_id, user, margin in meta.get("recent_locks", []):
            self._note_lock(int(request_id), int(user), int(margin), None)
        for user, kind, client_order_id, request_id, margin in meta.get("pending_opens", []):
            key = IdemKey(user, kind, client_order_id)
            self._pending_opens[key] = (request_id, margin)
            self._pending_since[key] = time.monotonic()
            self._key_recent_lock(request_id, key)
        names = meta["history_assets"]
        for row in snapshot.arrays["history"].tolist():
            closed = ClosedPosition(row[0], row[1], names[row[2]], Side(row[3]), *row[4:])
            history = self._history.setdefault(closed.owner, [])
            self._history_index.setdefault(closed.owner, {})[closed.position_id] = len(history)
            history.append(closed)
        self._closed_count = int(meta["closed_count"])
        return self

    # ----------------------------------------------------------------- lifetime
    def checkpoint(self) -> int:
        """Snapshot now (waits for the file); returns the journal seq it covers."""
        return self.store.checkpoint(self._snapshot, wait=True)

    def journal_bytes(self) -> int:
        return self.store.disk_bytes()

    def close(self) -> None:
        """Clean stop: final snapshot (fast restart), release the journal lock."""
        self.store.close(self._snapshot)
