"""Expected rejections as values: a refused request returns a :class:`Rejected`, never raises.

Bugs and broken invariants raise; anything a client can cause is a :class:`Rejected` whose
:class:`Code` the API maps to the SPEC's error shape and HTTP status.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Code(StrEnum):
    """Rejection codes, spelled exactly as the SPEC's ``error.code`` strings."""

    INSUFFICIENT_BALANCE = "INSUFFICIENT_BALANCE"
    PRICE_MOVED = "PRICE_MOVED"
    PRICE_UNAVAILABLE = "PRICE_UNAVAILABLE"
    NOT_FOUND = "NOT_FOUND"
    INVALID_REQUEST = "INVALID_REQUEST"
    UNKNOWN_ASSET = "UNKNOWN_ASSET"
    LEVERAGE_OUT_OF_RANGE = "LEVERAGE_OUT_OF_RANGE"
    INVALID_TRIGGER = "INVALID_TRIGGER"
    UNAUTHORIZED = "UNAUTHORIZED"
    WOULD_LIQUIDATE = "WOULD_LIQUIDATE"  # the open's liquidation price is already crossed
    RATE_LIMITED = "RATE_LIMITED"
    TOO_MANY_POSITIONS = "TOO_MANY_POSITIONS"
    TOO_MANY_ORDERS = "TOO_MANY_ORDERS"
    ORDER_NOT_OPEN = "ORDER_NOT_OPEN"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"  # a component (ledger, shard) did not answer


@dataclass(frozen=True, slots=True)
class Rejected:
    """A refused request: machine-readable ``code`` and a human ``message`` (no internals);
    ``retry_after_s``: with RATE_LIMITED, seconds until a retry may be taken (0: not said;
    never stored with a clientOrderId's answer)."""

    code: Code
    message: str
    retry_after_s: int = 0


@dataclass(frozen=True, slots=True)
class Forgotten:
    """A shard's answer to request ``request_id`` when it no longer remembers that request's
    answer (engine.shard_machine.REMEMBERED newer ones came since): whether it ran there is
    not known any more, so it is neither run now nor fenced. Whoever waits on it settles
    nothing by it: the lock it may have made stays locked, and a clientOrderId waiting on it
    is answered :data:`OUTCOME_UNKNOWN` (the next start reconciles the margin with the
    books)."""

    request_id: int


OUTCOME_UNKNOWN = Rejected(Code.SERVICE_UNAVAILABLE,
                           "this request's outcome is no longer known; check your account")
"""The stored answer of a clientOrderId whose request a shard answered :class:`Forgotten`."""

__all__ = ["OUTCOME_UNKNOWN", "Code", "Forgotten", "Rejected"]
