"""The account events: what each account's private ``account`` stream carries (SPEC "Live data").

The ledger numbers them. Every ledger event that changes what an account sees records one or
more account events here as it is applied (live and in recovery alike, so the numbering is
part of the journaled state): ``seq`` counts an account's events 1, 2, 3... and ``version``
counts every account's events together, so a reader of all accounts (an API replica) can ask
for what came after the last one it read.

What is kept is bounded: the newest :data:`KEPT` events of all accounts (each account's own
share of them indexed apart). A reader asking from further back than that is told so (None)
and starts again from the state (SPEC: a ``snapshot`` event).

Events (``kind``, ``body``): ``balance`` (:class:`Balance` after the change), ``positionOpened``
and ``positionUpdated`` (engine.messages.OpenPosition), ``positionClosed``
(engine.messages.ClosedPosition, whole or partial), ``orderPlaced`` (PendingOrder),
``orderFilled`` / ``orderCancelled`` / ``orderExpired`` / ``orderRejected`` (EndedOrder).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import NamedTuple

KEPT = 20_000
"""Account events kept (the newest, of all accounts together)."""

BALANCE = "balance"
POSITION_OPENED = "positionOpened"
POSITION_UPDATED = "positionUpdated"
POSITION_CLOSED = "positionClosed"
ORDER_PLACED = "orderPlaced"
NOTED_OF_REQUEST = {"open": POSITION_OPENED, "order": ORDER_PLACED, "modify": POSITION_UPDATED,
                    "margin": POSITION_UPDATED}
"""The kind a request that happened (by its clientOrderId kind: an open, a placement, a TP/SL
or margin change) is noted as (engine.ledger_machine.Note)."""
NOTED_KINDS = frozenset(NOTED_OF_REQUEST.values())
"""The kinds a request's outcome is noted as."""


class Balance(NamedTuple):
    """An account's balances after a change, in micro-dollars."""

    free_micros: int
    margin_micros: int


class AccountEvent(NamedTuple):
    """Event ``seq`` of account ``user`` (the ``version``-th of all accounts)."""

    user: int
    seq: int
    version: int
    kind: str
    body: object


class AccountLog:
    """The numbering and the kept events (see the module docstring)."""

    def __init__(self, kept: int = KEPT) -> None:
        if kept < 1:
            raise ValueError("kept must be >= 1")
        self.last_seq: dict[int, int] = {}  # user -> seq of their newest event
        self.version = 0  # events of all accounts so far
        self._kept: deque[AccountEvent] = deque()
        self._by_user: dict[int, deque[AccountEvent]] = {}
        self._limit = kept

    def record(self, user: int, kind: str, body: object) -> None:
        """Number one event of ``user`` and keep it (the oldest kept one drops out)."""
        seq = self.last_seq.get(user, 0) + 1
        self.last_seq[user] = seq
        self.version += 1
        self._keep(AccountEvent(user, seq, self.version, kind, body))

    def _keep(self, event: AccountEvent) -> None:
        self._kept.append(event)
        self._by_user.setdefault(event.user, deque()).append(event)
        if len(self._kept) > self._limit:
            old = self._kept.popleft()
            mine = self._by_user[old.user]
            mine.popleft()  # an account's oldest kept event is the oldest of all of its
            if not mine:
                del self._by_user[old.user]

    def since(self, user: int, seq: int) -> list[AccountEvent] | None:
        """``user``'s events after ``seq``, oldest first; None when some of them are no longer
        kept, or ``seq`` is beyond the newest (not a number this account gave)."""
        last = self.last_seq.get(user, 0)
        if seq == last:
            return []
        mine = self._by_user.get(user)
        if seq > last or seq < 0 or not mine or mine[0].seq > seq + 1:
            return None
        return [e for e in mine if e.seq > seq]

    def newest_first(self, user: int) -> Iterator[AccountEvent]:
        """``user``'s kept events, newest first."""
        return reversed(self._by_user.get(user, ()))

    def after(self, version: int, limit: int) -> tuple[int, list[AccountEvent] | None]:
        """``(version now, up to limit events of all accounts after version)``; None instead of
        the events when some after ``version`` are no longer kept (or ``version`` is beyond
        the newest: the log was rebuilt from less)."""
        if version == self.version:
            return self.version, []
        first = self.version - len(self._kept) + 1  # the oldest kept event's version
        if version > self.version or version + 1 < first:
            return self.version, None
        start = version + 1 - first
        end = min(len(self._kept), start + max(1, limit))
        return self.version, [self._kept[i] for i in range(start, end)]

    def kept(self) -> list[AccountEvent]:
        return list(self._kept)

    def load(self, last_seq: Iterable[tuple[int, int]], kept: Iterable[AccountEvent]) -> None:
        """Restore the numbering and the kept events (:meth:`kept`, oldest first)."""
        self.last_seq = {int(u): int(s) for u, s in last_seq}
        self.version = sum(self.last_seq.values())
        events = list(kept)[-self._limit:]
        first = self.version - len(events) + 1
        for at, (user, seq, _, kind, body) in enumerate(events):
            # built anew, not _replace()d: a fifth of the cost of loading 20,000 of them
            self._keep(AccountEvent(user, seq, first + at, kind, body))

    def problems(self) -> list[str]:
        """What is inconsistent ([] = nothing): each account's kept events are numbered one
        after another up to its newest; the versions too, up to the count of all events."""
        out = []
        if self.version != sum(self.last_seq.values()):
            out.append("account event version differs from the accounts' counts")
        versions = [e.version for e in self._kept]
        if versions and versions != list(range(self.version - len(versions) + 1,
                                               self.version + 1)):
            out.append("kept account events are not the newest, in order")
        for user, mine in self._by_user.items():
            seqs = [e.seq for e in mine]
            if seqs != list(range(self.last_seq.get(user, 0) - len(seqs) + 1,
                                  self.last_seq.get(user, 0) + 1)):
                out.append(f"account events of user {user} are not numbered in order")
        return out


__all__ = ["BALANCE", "KEPT", "NOTED_KINDS", "NOTED_OF_REQUEST", "ORDER_PLACED",
           "POSITION_CLOSED", "POSITION_OPENED", "POSITION_UPDATED", "AccountEvent",
           "AccountLog", "Balance"]
