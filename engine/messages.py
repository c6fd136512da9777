"""The records that cross the boundaries between the API, the service, the shards and the ledger.

Everything is an integer in engine units (``*_micros``, ``*_ticks``, ``*_steps``, ``*_us``);
conversion to decimal strings happens only in the API layer. NamedTuples because they pickle
small and fast across Ray calls and compare by value in tests. The records of a position or an
order are built from engine.schema's groups (engine.schema.record: :class:`OpenPosition` is
``OPEN_POSITION``, :class:`ClosedPosition` ``CLOSED_POSITION``...), so their fields are the
schema's by construction.
"""

from __future__ import annotations

from typing import NamedTuple

from engine import schema
from engine.orders import Side


class OpenOrder(NamedTuple):
    """An open request as the service receives it (already parsed and unit-converted).

    ``tp_ticks``/``sl_ticks``/``current_price_ticks`` are ``None`` when not given;
    ``max_slippage_bps`` only matters with a ``current_price_ticks``.
    """

    asset: str
    side: Side
    margin_micros: int
    leverage: int
    tp_ticks: int | None = None
    sl_ticks: int | None = None
    current_price_ticks: int | None = None
    max_slippage_bps: int = 100
    client_order_id: str | None = None


class CloseOrder(NamedTuple):
    """A manual close request of one of the caller's positions: all of it, or ``qty_steps`` of
    it (0: all)."""

    position_id: int
    current_price_ticks: int | None = None
    max_slippage_bps: int = 100
    client_order_id: str | None = None
    qty_steps: int = 0


class ShardOpen(NamedTuple):
    """One open as a shard executes it; ``request_id`` makes a resend return the first result."""

    request_id: int
    owner: int
    side: Side
    margin_micros: int
    leverage: int
    tp_ticks: int | None
    sl_ticks: int | None
    current_price_ticks: int | None
    max_slippage_bps: int


class PlaceOrder(NamedTuple):
    """A pending order request as the service receives it (parsed and unit-converted):
    ``kind`` an engine.order_book.OrderKind; 0 for an unset ``tp_ticks``/``sl_ticks``/
    ``expires_ts_us``."""

    asset: str
    side: Side
    kind: int
    trigger_ticks: int
    margin_micros: int
    leverage: int
    tp_ticks: int = 0
    sl_ticks: int = 0
    expires_ts_us: int = 0
    client_order_id: str | None = None


class ShardClose(NamedTuple):
    """One manual close as a shard executes it (``owner`` must own ``position_id``), of
    ``qty_steps`` of the position (0 or all of it: a whole close); ``request_id`` makes a
    resend return the first result (0 = none given)."""

    request_id: int
    owner: int
    position_id: int
    current_price_ticks: int | None
    max_slippage_bps: int
    qty_steps: int = 0


OpenPosition = schema.record(
    "OpenPosition", schema.OPEN_POSITION, __name__, enums={"side": Side},
    doc="""An open position with its mark-to-market.

    ``tp_ticks``/``sl_ticks`` are 0 when not set (engine.orders.NO_LEVEL); ``liq_ticks`` 0 means
    the position cannot be liquidated by any positive price. ``unrealized_pnl_micros`` is
    ``None`` when the shard has no price yet.""")


ClosedPosition = schema.record(
    "ClosedPosition", schema.CLOSED_POSITION, __name__, enums={"side": Side},
    doc="""A closed position and its settlement (SPEC: ledger moves of one close).

    ``reason`` is an engine.orders.CloseReason value; ``exit_ticks`` the closing-side price of
    the tick (or of the last tick for a manual close). A partial close (``partial`` 1) has the
    closed part's quantity and margin; ``close_id`` names the close (engine.schema.close_id).""")


PendingOrder = schema.record(
    "PendingOrder", schema.LISTED_ORDER, __name__, enums={"side": Side},
    doc="""An open limit or stop entry order (engine.schema.LISTED_ORDER): ``kind`` an
    engine.order_book.OrderKind value; ``tp_ticks``/``sl_ticks``/``expires_ts_us`` 0 when not
    set.""")


EndedOrder = schema.record(
    "EndedOrder", schema.ENDED_ORDER, __name__, enums={"side": Side},
    doc="""An order that left the book (engine.schema.ENDED_ORDER): ``status`` an
    engine.order_book.OrderStatus value; ``position_id`` the position a fill opened (0
    otherwise); ``reject_code`` why a fill could not open ("" otherwise).""")


class SettlementItem(NamedTuple):
    """What a shard owes the ledger, numbered ``seq`` 1, 2, 3... per shard, never reused: a
    close (its settlement), or an order that ended (a fill moves its margin to the position; a
    cancel, expiry or rejection releases it)."""

    seq: int
    closed: ClosedPosition | EndedOrder


class IdemKey(NamedTuple):
    """A clientOrderId scoped to its account and operation (``"open"``, ``"close"``,
    ``"order"``, ``"cancel"``)."""

    user: int
    kind: str
    client_order_id: str


class MarginLock(NamedTuple):
    """Lock ``margin_micros`` of ``user``'s free balance; ``idem_key`` (or None) dedups retries.

    ``request_id``: the ShardOpen (or order placement) request this lock pays for (0 = not
    given). The ledger keeps it with a pending clientOrderId, so after a crash the request's
    outcome can be asked from the shards instead of being guessed.
    """

    user: int
    margin_micros: int
    idem_key: IdemKey | None = None
    request_id: int = 0
    order: bool = False  # the margin of a pending order (counts an open order too)
    top_up: bool = False  # margin added to an open position (counts nothing)


class IdemHit(NamedTuple):
    """The stored first answer of a clientOrderId; ``answer`` is None while the first is
    pending, and ``request_id`` then names the request holding the reservation (0 when it was
    reserved without one, and once answered)."""

    answer: object
    request_id: int = 0


class NewAccount(NamedTuple):
    """A freshly created account: the API key is returned once and stored only as a hash."""

    user: int
    account_id: str
    api_key: str
    balance_micros: int


class Principal(NamedTuple):
    """An authenticated caller."""

    user: int
    account_id: str


class ShardStats(NamedTuple):
    """Counters of one shard (for /metrics, `shardex status` and health)."""

    name: str
    asset: str
    positions: int
    book_nbytes: int
    last_tick_ts_us: int | None
    ticks_applied: int
    opens: int
    closes_manual: int
    closes_take_profit: int
    closes_stop_loss: int
    closes_liquidation: int
    outbox_len: int
    last_seq: int
    orders: int = 0  # open pending orders
