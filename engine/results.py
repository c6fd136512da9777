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


__all__ = ["Code", "Rejected"]
