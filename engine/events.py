"""Binary codecs of the events that shards and the ledger write to their journals.

Every encoded event starts with one type byte that names both the event and its layout version
(a changed layout gets a new type byte; old bytes keep decoding with the old layout). The fixed
fields follow as little-endian ``struct`` values in declaration order, then the variable-length
fields (text as UTF-8, each with a length prefix), and nothing else: :func:`decode` rejects
trailing or missing bytes.

Integer widths: ids, users and sequence numbers are u64; prices (ticks), quantities (steps),
money (micros) and times (us) are i64; side and close reason u8; leverage u16; rates (ppm)
u32. Events are NamedTuples: cheap to build, and ``encode`` packs one with one ``struct`` call.

Shard events (one journal per shard): :class:`PositionOpened`, :class:`PositionClosed`,
:class:`TickApplied`, :class:`OpenFenced`, :class:`OutboxAcked`, :class:`SeqResumed`,
:class:`OrderPlaced`, :class:`OrderEnded`, :class:`PositionAmended`, :class:`PositionReduced`.
Ledger events (the ledger's journal):
:class:`AccountCreated`, :class:`MarginLocked`, :class:`MarginReleased`,
:class:`SettlementApplied`, :class:`ClientOrderStoredAt` (and the older
:class:`ClientOrderStored`, still decoded and applied), :class:`AnswersExpired`,
:class:`OpenCountSet`, :class:`OrderLocked`, :class:`OrderSettled`, :class:`OrderCountSet`,
:class:`MarginAdded`, :class:`MarginReturned`, :class:`AccountNoted`,
:class:`ReleaseExpected`, :class:`ClientOrderAsked`.

A journal record holds the events of one commit: :func:`encode_batch` / :func:`decode_batch`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from engine import schema

RECOVERED_TICK_SOURCE = "journal"
"""``TickApplied.source`` of a tick read from the old layout, which did not record it."""

# --------------------------------------------------------------------------- shard events


PositionOpened = schema.record(
    "PositionOpened", schema.POSITION_OPENED, __name__,
    zero_default=("maintenance_margin_ppm", "request_id"),
    doc="""A position was added to a shard's book: engine.schema.POSITION_OPENED (the book's
    row, engine.schema.BOOK_ROW, and the request).

    ``request_id`` is the opening request's id, so a resend of the same open (or a ledger lock
    whose answer was lost) can be matched to the position it created.""")


PositionClosed = schema.record(
    "PositionClosed", schema.POSITION_CLOSED, __name__, zero_default=("request_id",),
    doc="""A position left a shard's book; its settlement is the shard's ``settlement_seq``-th.

    The amounts follow from the opened position and ``exit_ticks`` (engine.settlement.settle),
    so they are not repeated here. ``request_id``: the manual close request that closed it (0
    for a trigger close, and in the old layout 0x12), so a resend after a restart gets the first
    answer.""")


PositionAmended = schema.record(
    "PositionAmended", schema.POSITION_AMENDED, __name__,
    doc="""An open position changed in place (engine.schema.POSITION_AMENDED): its TP/SL set or
    removed, or its margin (and so its liquidation price) changed, by request ``request_id``;
    the fields are the position's new values.""")


PositionReduced = schema.record(
    "PositionReduced", schema.POSITION_REDUCED, __name__,
    doc="""Part of an open position was closed by hand (engine.schema.POSITION_REDUCED), as the
    shard's ``settlement_seq``-th settlement: ``closed_qty_steps`` of its quantity with
    ``closed_margin_micros`` of its margin at ``exit_ticks``; the rest stays open under the same
    id with what is left and liquidation price ``rest_liq_ticks``. The amounts follow from the
    closed part like a close's (engine.settlement.settle).""")


class TickApplied(NamedTuple):
    """The top of book a shard swept with (a shard journal belongs to one asset).

    ``seq``/``source``: the tick's exchange update id and origin (engine.market.Tick), so the
    price a restarted shard shows still names where it came from; the old layout 0x13 lacks
    them (0 and :data:`RECOVERED_TICK_SOURCE`).
    """

    bid_ticks: int
    ask_ticks: int
    ts_us: int
    seq: int = 0
    source: str = RECOVERED_TICK_SOURCE


class OpenFenced(NamedTuple):
    """Open request ``request_id`` was given up by its caller before it reached the shard.

    Journaled so the fence survives a restart: a late (or retried) delivery of that request is
    refused instead of opening a position whose margin the ledger already released.
    """

    request_id: int


class OutboxAcked(NamedTuple):
    """The ledger applied the shard's settlements up to ``upto_seq``: they leave the outbox."""

    upto_seq: int


class SeqResumed(NamedTuple):
    """The ledger already applied settlements up to ``applied_seq``, beyond the shard's own
    numbering (a shard restarted without its journal): numbering continues after it."""

    applied_seq: int


# --------------------------------------------------------------------------- ledger events


class AccountCreated(NamedTuple):
    """A user was created with a signup deposit (funding -> user free)."""

    user: int
    deposit_micros: int
    account_id: str
    key_hash: str  # the stored form of the API key (never the key)


class MarginLocked(NamedTuple):
    """``amount_micros`` moved from the user's free to margin account for request ``request_id``."""

    user: int
    amount_micros: int
    request_id: int


class MarginReleased(NamedTuple):
    """A lock was undone (margin -> free): the open of ``request_id`` did not happen."""

    user: int
    amount_micros: int
    request_id: int


SettlementApplied = schema.record(
    "SettlementApplied", schema.SETTLEMENT_APPLIED, __name__, zero_default=("close_id", "partial"),
    doc="""Settlement number ``seq`` of shard ``shard`` was applied to the ledger.

    Carries the whole closed position (engine.schema.SETTLEMENT_APPLIED: after ``seq``, the
    fields of engine.messages.ClosedPosition) so the ledger's history survives a restart, and
    the four SPEC amounts so a replay applies exactly what was applied, with no recomputation.
    The old layout 0x24 lacks ``close_id`` and ``partial``: a whole close, named by its
    position's id.

    ``asset`` is the asset's name, which survives a change of the registry's order.""")


class ClientOrderStored(NamedTuple):
    """The first answer to ``(user, kind, client_order_id)``, returned to every retry.

    ``kind``: ``"open"``/``"close"``; ``response``: the answer as the API layer serialised it.
    Older layout: the ledger now writes :class:`ClientOrderStoredAt`; journals holding this one
    still replay.
    """

    user: int
    kind: str
    client_order_id: str
    response: bytes


class ClientOrderStoredAt(NamedTuple):
    """A clientOrderId ``(user, kind, client_order_id)`` was reserved, answered or dropped at
    ``ts_us``, by request ``request_id`` (0 = none given).

    ``response`` as in :class:`ClientOrderStored` (engine.ledger_machine.encode_answer: ``b""``
    = reserved, the answer pending; ``b"\\x00"`` = the pending reservation was dropped; JSON =
    the first answer). A pending reservation that knows its request id can be resolved against
    the shards by that id after its answer was lost; ``ts_us`` says how long it has waited.
    """

    user: int
    kind: str
    client_order_id: str
    request_id: int
    ts_us: int
    response: bytes


class ClientOrderAsked(NamedTuple):
    """The request ``(user, kind, client_order_id)`` was first used for, as ``asked`` (a digest
    of its terms the API layer made); a later request with the same clientOrderId and other
    terms is not a retry of it. Written with the key's first reservation or answer."""

    user: int
    kind: str
    client_order_id: str
    asked: bytes


class AnswersExpired(NamedTuple):
    """Every clientOrderId answered before ``before_ts_us`` is forgotten (its id may be used
    again); reservations still pending are not (the reconciler settles those)."""

    before_ts_us: int


class OpenCountSet(NamedTuple):
    """``user`` holds margin for ``open_count`` opens (the start-time reconciliation's recount
    from the shards' books; engine.ledger_machine limits it)."""

    user: int
    open_count: int


# --------------------------------------------------------------------------- pending orders


OrderPlaced = schema.record(
    "OrderPlaced", schema.ORDER_PLACED, __name__, zero_default=("request_id",),
    doc="""A pending order entered a shard's order book (engine.schema.ORDER_PLACED: the book's
    row, engine.schema.ORDER_ROW, and the placing request's id).""")


OrderEnded = schema.record(
    "OrderEnded", schema.ORDER_ENDED, __name__,
    doc="""A pending order left a shard's book as the shard's ``settlement_seq``-th item for the
    ledger (engine.schema.ORDER_ENDED): filled (a ``PositionOpened`` of ``position_id`` follows
    in the same record), cancelled (by ``request_id``), expired or rejected (``reject_code``).""")


class OrderLocked(NamedTuple):
    """``amount_micros`` moved from free to margin for the order that request ``request_id``
    places (a margin lock that also counts an open order)."""

    user: int
    amount_micros: int
    request_id: int


OrderSettled = schema.record(
    "OrderSettled", schema.ORDER_SETTLED, __name__,
    doc="""Item ``seq`` of shard ``shard``, an order that ended, was applied to the ledger: a
    fill keeps its margin locked (the position holds it now); any other end releases it
    (engine.schema.ORDER_SETTLED: the whole order, for the order history).""")


class MarginAdded(NamedTuple):
    """``amount_micros`` moved from free to margin to top up an open position (request
    ``request_id``): a lock that counts no open position."""

    user: int
    amount_micros: int
    request_id: int


class MarginReturned(NamedTuple):
    """``amount_micros`` moved from margin back to free without ending an open: margin removed
    from an open position, or a top-up that did not happen (request ``request_id``)."""

    user: int
    amount_micros: int
    request_id: int


class ReleaseExpected(NamedTuple):
    """Request ``request_id`` of ``user`` asks a shard to take ``amount_micros`` of margin off
    an open position; once it did, that much moves from margin back to free
    (``MarginReturned`` of the request). Nothing moves now: the ledger remembers the release
    it owes, so that it is made even if the API process that sent the request dies."""

    user: int
    amount_micros: int
    request_id: int


class AccountNoted(NamedTuple):
    """Request ``request_id`` of ``user`` did ``kind`` at a shard (engine.account_events:
    ``positionOpened``, ``positionUpdated``, ``orderPlaced``); ``body``: what it made, as a
    stored answer (engine.ledger_machine.encode_answer). Only the user's account events
    change."""

    user: int
    request_id: int
    kind: str
    body: bytes


class OrderCountSet(NamedTuple):
    """``user`` has ``order_count`` open orders (the start-time reconciliation's recount)."""

    user: int
    order_count: int


Event = (PositionOpened | PositionClosed | TickApplied | OpenFenced | OutboxAcked | SeqResumed
         | OrderPlaced | OrderEnded | PositionAmended | PositionReduced
         | AccountCreated | MarginLocked | MarginReleased | SettlementApplied | ClientOrderStored
         | ClientOrderStoredAt | AnswersExpired | OpenCountSet | OrderLocked | OrderSettled
         | OrderCountSet | MarginAdded | MarginReturned | AccountNoted | ReleaseExpected
         | ClientOrderAsked)
# Events whose loss in a crash changes nothing that was acknowledged (the feed delivers the newest
# price again): the runner journals them with the next commit instead of committing for them.
# An OutboxAcked lost in a crash only means settlements the ledger already applied are sent
# again; the ledger ignores them by seq (and a restarted shard is acknowledged again at start).
VOLATILE_EVENTS = (TickApplied, OutboxAcked)
SHARD_EVENTS = (PositionOpened, PositionClosed, TickApplied, OpenFenced, OutboxAcked,
                SeqResumed, OrderPlaced, OrderEnded, PositionAmended, PositionReduced)
LEDGER_EVENTS = (AccountCreated, MarginLocked, MarginReleased, SettlementApplied,
                 ClientOrderStored, ClientOrderStoredAt, AnswersExpired, OpenCountSet,
                 OrderLocked, OrderSettled, OrderCountSet, MarginAdded, MarginReturned,
                 AccountNoted, ReleaseExpected, ClientOrderAsked)


class EventError(ValueError):
    """Bytes that are not an encoded event, or an event whose values do not fit its layout."""


# --------------------------------------------------------------------------- layouts
# type byte -> (class, struct of the fixed fields after the type byte, variable fields)
# A variable field is (kind, length-prefix struct code): "s" = UTF-8 text, "b" = raw bytes.
# The events that carry a position take their layout from engine.schema (their fields in
# declaration order, each at its wire width; text fields after them); a schema change that
# alters one of these layouts needs a new type byte, and the old one moves to _OLD_LAYOUTS.

_VarSpec = tuple[tuple[str, str], ...]
_Layout = tuple[type, str, tuple[str, ...], _VarSpec]


def _schema_layout(cls: type, group: schema.Group) -> _Layout:
    """The layout of ``cls`` (declared as ``group``) derived from the schema."""
    schema.check_fields(cls, group)
    text = schema.variable(group)
    return (cls, schema.struct_format(schema.fixed(group)), schema.names(text),
            tuple(("s", f.prefix) for f in text))


_LAYOUTS: dict[int, _Layout] = {
    0x11: _schema_layout(PositionOpened, schema.POSITION_OPENED),
    0x14: (OpenFenced, "Q", (), ()),
    0x15: _schema_layout(PositionClosed, schema.POSITION_CLOSED),
    0x16: (TickApplied, "qqqQ", ("source",), (("s", "B"),)),
    0x17: (OutboxAcked, "Q", (), ()),
    0x18: (SeqResumed, "Q", (), ()),
    0x21: (AccountCreated, "Qq", ("account_id", "key_hash"), (("s", "B"), ("s", "B"))),
    0x22: (MarginLocked, "QqQ", (), ()),
    0x23: (MarginReleased, "QqQ", (), ()),
    0x2E: _schema_layout(SettlementApplied, schema.SETTLEMENT_APPLIED),
    0x25: (ClientOrderStored, "Q", ("kind", "client_order_id", "response"),
           (("s", "B"), ("s", "H"), ("b", "I"))),
    0x26: (ClientOrderStoredAt, "QQq", ("kind", "client_order_id", "response"),
           (("s", "B"), ("s", "H"), ("b", "I"))),
    0x27: (AnswersExpired, "q", (), ()),
    0x28: (OpenCountSet, "QQ", (), ()),
    0x19: _schema_layout(OrderPlaced, schema.ORDER_PLACED),
    0x1A: _schema_layout(OrderEnded, schema.ORDER_ENDED),
    0x1B: _schema_layout(PositionAmended, schema.POSITION_AMENDED),
    0x1C: _schema_layout(PositionReduced, schema.POSITION_REDUCED),
    0x29: (OrderLocked, "QqQ", (), ()),
    0x2A: _schema_layout(OrderSettled, schema.ORDER_SETTLED),
    0x2B: (OrderCountSet, "QQ", (), ()),
    0x2C: (MarginAdded, "QqQ", (), ()),
    0x2D: (MarginReturned, "QqQ", (), ()),
    0x2F: (AccountNoted, "QQ", ("kind", "body"), (("s", "B"), ("b", "I"))),
    0x30: (ReleaseExpected, "QqQ", (), ()),
    0x31: (ClientOrderAsked, "Q", ("kind", "client_order_id", "asked"),
           (("s", "B"), ("s", "H"), ("b", "B"))),
}

# Older layouts, decoded only (encode writes the layout above): the trailing fields they lack
# take the class defaults. They are what old journals hold, so they stay written out.
_OLD_LAYOUTS: dict[int, tuple[type, str]] = {
    0x12: (PositionClosed, "QBqqQ"),
    0x13: (TickApplied, "qqq"),
}
# Older layouts with text: (class, fixed fields, text fields, their prefixes, how many of the
# class's fields they hold, the upgrade of a decoded event).
_OLD_VAR_LAYOUTS: dict[int, tuple[type, str, tuple[str, ...], _VarSpec, int,
                                  Callable[[tuple[object, ...]], tuple[object, ...]]]] = {
    # before partial closes: a whole close, named by its position's id
    0x24: (SettlementApplied, "QQQBqqqHqqqqqqqqqBq", ("shard", "asset"),
           (("s", "B"), ("s", "B")), 21,
           lambda e: e._replace(close_id=e.position_id)),  # type: ignore[attr-defined]
}

_Encoder = Callable[[tuple[object, ...]], bytes]
_Decoder = Callable[[bytes | memoryview], tuple[object, ...]]
_ENCODERS: dict[type, _Encoder] = {}
_DECODERS: dict[int, _Decoder] = {}
TYPE_CODES: dict[type, int] = {}


def _fixed_codec(code: int, cls: type, fmt: str) -> tuple[_Encoder, _Decoder]:
    packer = struct.Struct("<B" + fmt)
    pack = packer.pack
    unpack = packer.unpack
    size = packer.size
    make = cls._make  # type: ignore[attr-defined]

    def encode(event: tuple[object, ...]) -> bytes:
        return pack(code, *event)

    def decode(data: bytes | memoryview) -> tuple[object, ...]:
        if len(data) != size:
            raise EventError(f"{cls.__name__}: {len(data)} bytes, expected {size}")
        return make(unpack(data)[1:])

    return encode, decode


def _var_codec(code: int, cls: type, fmt: str, var_names: tuple[str, ...],
               var_spec: _VarSpec, present: int | None = None,
               upgrade: Callable[[tuple[object, ...]], tuple[object, ...]] | None = None
               ) -> tuple[_Encoder, _Decoder]:
    """The codec of a layout with variable-length fields: of all of ``cls``'s fields, or (an
    old layout) of its first ``present``, the others taking their defaults and the decoded
    event then passed through ``upgrade``."""
    every: tuple[str, ...] = cls._fields  # type: ignore[attr-defined]
    fields = every[:present]
    defaults: dict[str, object] = cls._field_defaults  # type: ignore[attr-defined]
    tail = [defaults[name] for name in every[len(fields):]]
    var_index = [fields.index(n) for n in var_names]
    fixed_index = [i for i in range(len(fields)) if i not in var_index]
    prefixes = "".join(p for _, p in var_spec)
    head = struct.Struct("<B" + fmt + prefixes)
    n_fixed = len(fixed_index)
    built = cls._make  # type: ignore[attr-defined]

    def make(values: list[object]) -> tuple[object, ...]:
        event: tuple[object, ...] = built(values + tail)
        return event if upgrade is None else upgrade(event)

    def encode(event: tuple[object, ...]) -> bytes:
        blobs = []
        for i, (kind, _) in zip(var_index, var_spec, strict=True):
            value = event[i]
            if kind == "s":
                if not isinstance(value, str):
                    raise EventError(f"{cls.__name__}.{fields[i]} must be str")
                blobs.append(value.encode("utf-8", "surrogatepass"))
            else:
                if not isinstance(value, bytes | bytearray | memoryview):
                    raise EventError(f"{cls.__name__}.{fields[i]} must be bytes")
                blobs.append(bytes(value))
        fixed = [event[i] for i in fixed_index]
        return head.pack(code, *fixed, *(len(b) for b in blobs)) + b"".join(blobs)

    def decode(data: bytes | memoryview) -> tuple[object, ...]:
        if len(data) < head.size:
            raise EventError(f"{cls.__name__}: {len(data)} bytes, shorter than its header")
        values = head.unpack_from(data)
        lengths = values[1 + n_fixed :]
        if head.size + sum(lengths) != len(data):
            raise EventError(f"{cls.__name__}: length prefixes do not match the data")
        out: list[object] = [None] * len(fields)
        for i, v in zip(fixed_index, values[1 : 1 + n_fixed], strict=True):
            out[i] = v
        pos = head.size
        view = memoryview(data)
        for i, (kind, _), n in zip(var_index, var_spec, lengths, strict=True):
            blob = bytes(view[pos : pos + n])
            pos += n
            if kind == "s":
                try:
                    out[i] = blob.decode("utf-8", "surrogatepass")
                except UnicodeDecodeError as exc:
                    raise EventError(f"{cls.__name__}.{fields[i]}: not UTF-8") from exc
            else:
                out[i] = blob
        return make(out)

    return encode, decode


for _code, (_cls, _fmt, _var_names, _var_spec) in _LAYOUTS.items():
    if _var_names:
        _enc, _dec = _var_codec(_code, _cls, _fmt, _var_names, _var_spec)
    else:
        _enc, _dec = _fixed_codec(_code, _cls, _fmt)
    _ENCODERS[_cls] = _enc
    _DECODERS[_code] = _dec
    TYPE_CODES[_cls] = _code


def _old_decoder(cls: type, fmt: str) -> _Decoder:
    """Decoder of an old fixed layout of ``cls``; the fields after it take their defaults."""
    packer = struct.Struct("<B" + fmt)
    unpack = packer.unpack
    size = packer.size
    make = cls._make  # type: ignore[attr-defined]
    fields: tuple[str, ...] = cls._fields  # type: ignore[attr-defined]
    present = len(unpack(bytes(size))) - 1
    defaults: dict[str, object] = cls._field_defaults  # type: ignore[attr-defined]
    tail = tuple(defaults[name] for name in fields[present:])

    def decode(data: bytes | memoryview) -> tuple[object, ...]:
        if len(data) != size:
            raise EventError(f"{cls.__name__}: {len(data)} bytes, expected {size}")
        return make(unpack(data)[1:] + tail)

    return decode


for _code, (_cls, _fmt) in _OLD_LAYOUTS.items():
    _DECODERS[_code] = _old_decoder(_cls, _fmt)
for _code, (_cls, _fmt, _var_names, _var_spec, _present, _upgrade) in _OLD_VAR_LAYOUTS.items():
    _DECODERS[_code] = _var_codec(_code, _cls, _fmt, _var_names, _var_spec, _present,
                                  _upgrade)[1]


def encode(event: Event) -> bytes:
    """The bytes of ``event``: type byte, then fields (EventError if a value does not fit)."""
    try:
        encoder = _ENCODERS[type(event)]
    except KeyError:
        raise EventError(f"not an event: {type(event).__name__}") from None
    try:
        return encoder(event)
    except struct.error as exc:
        raise EventError(f"{type(event).__name__}: {exc}") from exc


def decode(data: bytes | memoryview) -> Event:
    """The event encoded in ``data`` (exactly one; raises EventError on anything else)."""
    if len(data) == 0:
        raise EventError("empty event")
    decoder = _DECODERS.get(data[0])
    if decoder is None:
        raise EventError(f"unknown event type byte 0x{data[0]:02x}")
    try:
        return decoder(data)  # type: ignore[return-value]
    except struct.error as exc:
        raise EventError(str(exc)) from exc


# --------------------------------------------------------------------------- journal records
# A batch record: this tag byte (never an event type byte), then per event [u32 length][bytes].
BATCH_TAG = 0xB0
_LENGTH = struct.Struct("<I")


def encode_batch(encoded_events: list[bytes]) -> bytes:
    """One journal record holding the (already encoded) events of one commit."""
    parts = [bytes((BATCH_TAG,))]
    for data in encoded_events:
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def batch_event_bytes(record_bytes: int) -> int:
    """The largest encoded event (bytes) a batch record of at most ``record_bytes`` holds."""
    return record_bytes - 1 - _LENGTH.size


def encode_batches(encoded_events: list[bytes], record_bytes: int) -> list[bytes]:
    """The (already encoded) events of one commit as batch records of at most ``record_bytes``
    each, in order, as few as fit them; ValueError for an event over
    :func:`batch_event_bytes`."""
    if 1 + _LENGTH.size * len(encoded_events) + sum(map(len, encoded_events)) <= record_bytes:
        return [encode_batch(encoded_events)]  # nearly every commit: one record, one pass
    records: list[bytes] = []
    start = 0
    size = 1
    for i, data in enumerate(encoded_events):
        n = _LENGTH.size + len(data)
        if 1 + n > record_bytes:
            raise ValueError(f"an event of {len(data)} bytes does not fit a record of "
                             f"{record_bytes}")
        if size + n > record_bytes:
            records.append(encode_batch(encoded_events[start:i]))
            start, size = i, 1
        size += n
    records.append(encode_batch(encoded_events[start:]))
    return records


def decode_batch(payload: bytes) -> list[Event]:
    """The events of one journal record: a batch, or a single encoded event (EventError, a
    ValueError, if the record is cut short or holds anything else)."""
    if not payload or payload[0] != BATCH_TAG:
        return [decode(payload)]
    view = memoryview(payload)
    events: list[Event] = []
    pos = 1
    while pos < len(view):
        if pos + _LENGTH.size > len(view):
            raise EventError("batch record ends inside a length field")
        (n,) = _LENGTH.unpack_from(view, pos)
        pos += _LENGTH.size
        if pos + n > len(view):
            raise EventError("batch record shorter than its length fields")
        events.append(decode(view[pos : pos + n]))
        pos += n
    return events


# --------------------------------------------------------------------------- vectorised reads
def fixed_format(event_cls: type) -> str:
    """The ``struct`` codes (without byte order) of the fixed fields of ``event_cls``'s current
    layout, the ones :func:`encode` writes after the type byte."""
    return _LAYOUTS[TYPE_CODES[event_cls]][1]


def record_dtype(event_cls: type) -> np.dtype:
    """The structured dtype of one encoded ``event_cls`` inside a batch record, byte for byte:
    the record's ``length`` prefix (u4), the ``type`` byte (u1), then the event's fields in its
    current layout (packed, little-endian), named as the event's fields. ValueError for a
    layout with variable-length fields."""
    code = TYPE_CODES[event_cls]
    _, fmt, var_names, _ = _LAYOUTS[code]
    fields: tuple[str, ...] = event_cls._fields  # type: ignore[attr-defined]
    if var_names or len(fmt) != len(fields):
        raise ValueError(f"{event_cls.__name__} has no fixed-size layout")
    wire = schema.WIRE_DTYPES
    dtype = np.dtype([("length", "<u4"), ("type", "u1"),
                      *((name, wire[c]) for name, c in zip(fields, fmt, strict=True))])
    if dtype.itemsize != 5 + struct.calcsize("<" + fmt):  # pragma: no cover - layout bug
        raise AssertionError(f"{event_cls.__name__}: dtype does not match its layout")
    return dtype
