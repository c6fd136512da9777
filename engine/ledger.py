"""The double-entry ledger: every balance change is a transfer between accounts summing to 0.

Accounts (all int micro-dollars)::

    funding          external money in (negative: what was deposited from outside)
    user:<n>:free    what user n can spend
    user:<n>:margin  what user n has locked in open positions
    house            the counterparty of every trade (gets -pnl)
    insurance        leftover equity of liquidations, minus shortfalls of gapped prices

Invariants: the sum over all accounts is exactly 0, and no free or margin balance is ever
negative.
A refused operation (overdraft) returns :class:`~engine.results.Rejected` and changes nothing;
an operation that would break an invariant raises :class:`LedgerError` before changing anything.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from engine.amounts import micros_to_money
from engine.results import Code, Rejected
from engine.settlement import Settlement

FUNDING = "funding"
HOUSE = "house"
INSURANCE = "insurance"
_SYSTEM = (FUNDING, HOUSE, INSURANCE)
STATE_VERSION = 1
SUM = "sum"  # the subject of a difference in the sum over all accounts


class AuditDifference(NamedTuple):
    """One way the ledger disagrees with its invariants or with the shards' books.

    ``subject``: what differs, the same name at every audit that finds it: an account
    (``user:21:margin``, ``user:21:free``), :data:`SUM`, or a shard's settlements
    (``settlements:shard-SOL-0``, engine.ledger_machine); ``text``: what is wrong, with its
    amounts (micros), for people.
    """

    subject: str
    text: str


def insufficient_balance(free_micros: int, asked_micros: int) -> Rejected:
    """INSUFFICIENT_BALANCE naming both amounts (USD, as the API writes them): a trader told
    only "insufficient" guesses how much would do."""
    return Rejected(Code.INSUFFICIENT_BALANCE,
                    f"insufficient free balance: {micros_to_money(asked_micros)} USD asked, "
                    f"{micros_to_money(free_micros)} USD free")


class LedgerError(AssertionError):
    """A ledger invariant would break: a bug in the caller, never a client error."""


def free_account(user: int) -> str:
    return f"user:{int(user)}:free"


def margin_account(user: int) -> str:
    return f"user:{int(user)}:margin"


def parse_account(account: str) -> tuple[str, int | None]:
    """``"user:7:free"`` -> ``("free", 7)``; ``"house"`` -> ``("house", None)``; ValueError
    otherwise."""
    if account in _SYSTEM:
        return account, None
    # partition, not split: a large ledger's recovery reads two names per user
    user, _, kind = account[5:].partition(":") if account.startswith("user:") else ("", "", "")
    if kind in ("free", "margin") and user.isdigit():
        return kind, int(user)
    raise ValueError(f"not a ledger account: {account!r}")


def _amount(value: int) -> int:
    amount = operator.index(value)
    if isinstance(value, bool) or amount < 0:
        raise LedgerError(f"amounts moved must be ints >= 0, got {value!r}")
    return amount


class Ledger:
    """Balances of every account; users are ints >= 0."""

    def __init__(self) -> None:
        self._free: dict[int, int] = {}
        self._margin: dict[int, int] = {}
        self._system: dict[str, int] = dict.fromkeys(_SYSTEM, 0)

    # -- reads -----------------------------------------------------------------------------
    def has_user(self, user: int) -> bool:
        return user in self._free

    def users(self) -> list[int]:
        return sorted(self._free)

    def free_micros(self, user: int) -> int:
        return self._free.get(user, 0)

    def margin_micros(self, user: int) -> int:
        return self._margin.get(user, 0)

    def balance(self, account: str) -> int:
        """Balance of any account by name (0 for an account that never moved)."""
        kind, user = parse_account(account)
        if user is None:
            return self._system[kind]
        return (self._free if kind == "free" else self._margin).get(user, 0)

    def accounts(self) -> dict[str, int]:
        """Every account and its balance, system accounts first then users ascending."""
        out = dict(self._system)
        for user in sorted(self._free):
            out[free_account(user)] = self._free[user]
            out[margin_account(user)] = self._margin[user]
        return out

    def total_micros(self) -> int:
        """Sum over all accounts: 0 unless something is badly wrong."""
        return sum(self._system.values()) + sum(self._free.values()) + sum(self._margin.values())

    # -- operations (each a balanced transfer) ---------------------------------------------------
    def open_user(self, user: int, deposit_micros: int) -> None:
        """Create the user's accounts (if new) and move ``deposit`` from funding to free."""
        user = operator.index(user)
        if user < 0:
            raise LedgerError("user ids are ints >= 0")
        deposit = _amount(deposit_micros)
        self._free.setdefault(user, 0)
        self._margin.setdefault(user, 0)
        self._system[FUNDING] -= deposit
        self._free[user] += deposit

    deposit = open_user

    def lock_margin(self, user: int, amount_micros: int) -> Rejected | None:
        """Move ``amount`` from the user's free balance to their margin account; refused with
        INSUFFICIENT_BALANCE (nothing changes) when free < amount, NOT_FOUND for an unknown
        user."""
        amount = _amount(amount_micros)
        free = self._free.get(user)
        if free is None:
            return Rejected(Code.NOT_FOUND, "account not found")
        if free < amount:
            return insufficient_balance(free, amount)
        self._free[user] = free - amount
        self._margin[user] += amount
        return None

    def release_margin(self, user: int, amount_micros: int) -> None:
        """Undo a :meth:`lock_margin` (margin -> free); LedgerError if margin < amount."""
        amount = _amount(amount_micros)
        margin = self._margin.get(user)
        if margin is None or margin < amount:
            raise LedgerError(f"user {user} has {margin} margin locked, cannot release {amount}")
        self._margin[user] = margin - amount
        self._free[user] += amount

    def settle(self, user: int, margin_micros: int, settlement: Settlement) -> None:
        """Book a close: margin account ``-margin``, free ``+payout``, house ``+house``,
        insurance ``+insurance``. LedgerError (nothing changed) if the split does not add up
        to the margin, the payout is negative, or the user has less margin locked."""
        margin = _amount(margin_micros)
        s = settlement
        if s.payout_micros < 0 or s.payout_micros + s.house_micros + s.insurance_micros \
                != margin:
            raise LedgerError(f"unbalanced settlement {s} for margin {margin}")
        locked = self._margin.get(user)
        if locked is None or locked < margin:
            raise LedgerError(f"user {user} has {locked} margin locked, cannot settle {margin}")
        self._margin[user] = locked - margin
        self._free[user] += s.payout_micros
        self._system[HOUSE] += s.house_micros
        self._system[INSURANCE] += s.insurance_micros

    # -- checks and snapshots ----------------------------------------------------------------
    def audit(self, open_margins_by_user: Mapping[int, int],
              under_way: Mapping[int, Sequence[int]] | None = None) -> list[AuditDifference]:
        """Differences found ([] when sound): total != 0 (subject :data:`SUM`), a negative
        free balance (its free account), a margin account that differs from the sum of the
        user's open margins or is missing while they have some (their margin account).

        ``under_way``: per user, the margins (micros) of their requests under way, each held
        here and not yet in the open margins or not, whichever step its request is at (a lock
        whose open has not reached its shard; a removal its shard made, not yet released
        here): the margin account may exceed the open margins by the sum of any of them."""
        problems: list[AuditDifference] = []
        under_way = under_way or {}
        total = self.total_micros()
        if total != 0:
            problems.append(AuditDifference(SUM, f"accounts sum to {total} micros, expected 0"))
        for user, free in self._free.items():
            if free < 0:
                account = free_account(user)
                problems.append(AuditDifference(account, f"{account} is negative: {free}"))
        for user in sorted(set(self._margin) | set(open_margins_by_user)):
            expected = int(open_margins_by_user.get(user, 0))
            actual = self._margin.get(user)
            account = margin_account(user)
            if actual is None:
                problems.append(AuditDifference(
                    account, f"user {user} has open positions but no account"))
            elif actual != expected and not _sum_of_some(under_way.get(user, ()),
                                                         actual - expected):
                held = under_way.get(user, ())
                problems.append(AuditDifference(account, (
                    f"{account} is {actual}, open margins sum to {expected}"
                    + (f", requests under way hold {sorted(held)} or none" if held else ""))))
        return problems

    def to_state(self) -> dict[str, Any]:
        """JSON-ready state: ``{"version": 1, "accounts": {name: micros}}``."""
        return {"version": STATE_VERSION, "accounts": self.accounts()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Ledger:
        """Rebuild from :meth:`to_state`; LedgerError if malformed, not summing to 0, or holding
        a negative balance (which no operation makes)."""
        if state.get("version") != STATE_VERSION:
            raise LedgerError(f"unsupported ledger state version {state.get('version')!r}")
        ledger = cls()
        free, margin = ledger._free, ledger._margin
        for name, value in dict(state["accounts"]).items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise LedgerError(f"balance of {name} is not an int")
            try:
                kind, user = parse_account(name)
            except ValueError as exc:
                raise LedgerError(str(exc)) from None
            if user is None:
                ledger._system[kind] = value
            elif kind == "free":
                free[user] = value
                margin.setdefault(user, 0)
            else:
                margin[user] = value
                free.setdefault(user, 0)
        if ledger.total_micros() != 0:
            raise LedgerError("ledger state does not sum to 0")
        if any(free < 0 for free in ledger._free.values()):
            raise LedgerError("ledger state has a negative free balance")
        if any(margin < 0 for margin in ledger._margin.values()):
            raise LedgerError("ledger state has a negative margin balance")
        return ledger


SUBSET_SUMS_MAX = 1 << 12
"""How many distinct sums :func:`_sum_of_some` keeps: past them, any amount from 0 to the sum
of all passes (an account with that many requests under way at once)."""


def _sum_of_some(amounts: Sequence[int], target: int) -> bool:
    """Whether ``target`` is the sum of some of ``amounts`` (each once; none: 0)."""
    if not 0 <= target <= sum(amounts):
        return False
    sums = {0}
    for amount in amounts:
        sums |= {s + amount for s in sums if s + amount <= target}
        if target in sums or len(sums) > SUBSET_SUMS_MAX:
            return True
    return target in sums


__all__ = [
    "FUNDING",
    "HOUSE",
    "INSURANCE",
    "SUM",
    "AuditDifference",
    "Ledger",
    "LedgerError",
    "free_account",
    "margin_account",
    "parse_account",
]
