"""The schema of a position and of its close: every field declared once.

A :class:`Field` says what one value of a position is: its name, its unit (:data:`TICKS`,
:data:`STEPS`, :data:`MICROS`, :data:`US`, :data:`ID`, :data:`ENUM`...), and what its unit
gives it (:data:`UNIT_WIDTHS`): its width on the wire (the ``struct`` code the journal's events
encode it with: ``Q`` u64, ``q`` i64, ``B`` u8, ``H`` u16, ``I`` u32; text is variable-length
with a length prefix) and the numpy dtype of a column holding it (the book stores side,
leverage and the rate narrower than their wire width allows for nothing: their ranges are
checked before they get there).

Groups are tuples of fields, in the order records declare them:

* :data:`POSITION` (the position) and :data:`CLOSE` (what its close adds), built from
  :data:`IDENTITY`, :data:`TERMS` (what an open plan fixes) and ``opened_ts_us``;
* the records that carry them: :data:`BOOK_ROW` (the book's columns, engine.book.PositionRecord),
  :data:`PLAN` (engine.orders.OpenPlan), :data:`OPEN_POSITION` / :data:`CLOSED_POSITION`
  (engine.messages), :data:`POSITION_OPENED`, :data:`POSITION_CLOSED`,
  :data:`SETTLEMENT_APPLIED` (engine.events), :data:`OUTBOX` (a shard's settlement in its
  snapshot);
* :data:`API_POSITION` / :data:`API_CLOSED_POSITION`: the HTTP API's names for them and how each
  value is rendered (:func:`render_kind`, :func:`json_renderer`, :func:`api_annotation`).
* a pending (entry) order: :data:`ORDER_TERMS` (what its placement fixes,
  engine.order_book.OrderTerms) and :data:`ORDER_ROW` (the order book's columns,
  engine.order_book.OrderRecord).

Everything else follows from them: the record classes (:func:`record`: a NamedTuple of a
group's fields, which mypy learns from the same group through tools/mypy_records.py),
:func:`names`, :func:`struct_format`, :func:`dtype` (a numpy structured dtype, wire or column
widths), and conversions by field name, never by position: :func:`to_row` / :func:`to_record`
(plain), :func:`builder` / :func:`row_reader` (compiled once for a hot path).
:func:`check_fields` checks that a class has a group's fields (engine.events pairs each event
class with the group its layout is derived from).
"""

from __future__ import annotations

import collections
import keyword
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from enum import IntEnum
from typing import Any, ClassVar, Literal, NamedTuple, Self

import numpy as np

# --------------------------------------------------------------------------- units
ID = "id"
"""An identifier (of a position, a user, a request)."""
TICKS = "ticks"
"""A price in the asset's price steps (``Asset.price_decimals``)."""
STEPS = "steps"
"""A quantity in the asset's quantity steps (``Asset.qty_decimals``)."""
MICROS = "micros"
"""Money in micro-dollars."""
US = "us"
"""A time in microseconds since the Unix epoch (UTC)."""
ENUM = "enum"
"""The int value of a :class:`Labelled` enum (``Field.enum`` holds its labels)."""
LEVERAGE = "x"
"""A leverage multiple."""
PPM = "ppm"
"""A rate in parts per million."""
SEQ = "seq"
"""A sequence number (1, 2, 3... per shard)."""
TEXT = "text"
"""UTF-8 text; variable length on the wire."""
FLAG = "flag"
"""A yes/no value: 1 or 0."""

WIRE_DTYPES: dict[str, str] = {"B": "u1", "b": "i1", "H": "<u2", "h": "<i2", "I": "<u4",
                               "i": "<i4", "Q": "<u8", "q": "<i8"}
"""numpy dtype of each ``struct`` code (little-endian, as the journal writes them)."""

_I64 = np.dtype(np.int64)
_I32 = np.dtype(np.int32)
_I8 = np.dtype(np.int8)
_U64 = np.dtype(np.uint64)
UNIT_WIDTHS: dict[str, tuple[str | None, np.dtype | None]] = {
    ID: ("Q", _I64),  # ids stay below 2**63: an int64 column holds them
    TICKS: ("q", _I64),
    STEPS: ("q", _I64),
    MICROS: ("q", _I64),
    US: ("q", _I64),
    ENUM: ("B", _I8),
    LEVERAGE: ("H", _I32),
    PPM: ("I", _I32),
    SEQ: ("Q", _U64),
    TEXT: (None, None),
    FLAG: ("B", np.dtype(np.uint8)),
}
"""Each unit's ``struct`` code on the wire (None: variable-length, after a length prefix of
:data:`TEXT_PREFIX`) and the numpy dtype of a column holding it (None: no column)."""
TEXT_PREFIX = "B"
"""The ``struct`` code of a text field's length prefix (u8: at most 255 bytes)."""


class SchemaError(TypeError):
    """A record, layout or conversion that does not match the schema."""


@dataclass(frozen=True, slots=True)
class Field:
    """One value of a position (or of a record carrying one).

    ``column``: its name as a book column / snapshot array, when that differs; ``enum``: the
    labels of an :data:`ENUM` field's values; ``zero_is_none``: 0 means "not set" (a trigger
    level, a liquidation price no positive price reaches); ``nullable``: the value may be None.
    Its unit (:data:`UNIT_WIDTHS`) sets ``code``, the ``struct`` code of its wire width (None
    for a variable-length field, then ``prefix`` is the code of its length prefix), and, unless
    given, ``dtype``, the numpy dtype of a column holding it (None for text).
    """

    name: str
    unit: str
    doc: str
    column: str = ""
    enum: tuple[str, ...] | None = None  # an enum's labels by value (a Labelled enum's)
    zero_is_none: bool = False
    nullable: bool = False
    dtype: np.dtype | None = None
    code: str | None = field(init=False)
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or keyword.iskeyword(self.name):
            raise SchemaError(f"field name {self.name!r} is not an identifier")
        if self.unit not in UNIT_WIDTHS:
            raise SchemaError(f"{self.name}: unknown unit {self.unit!r}")
        code, dtype = UNIT_WIDTHS[self.unit]
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "prefix", "" if code else TEXT_PREFIX)
        if self.dtype is None:
            object.__setattr__(self, "dtype", dtype)
        if not self.column:
            object.__setattr__(self, "column", self.name)

    @property
    def wire_dtype(self) -> np.dtype:
        """The numpy dtype of its wire width (SchemaError for a variable-length field)."""
        if self.code is None:
            raise SchemaError(f"{self.name} has no fixed width")
        return np.dtype(WIRE_DTYPES[self.code])

    def renamed(self, name: str) -> Field:
        """The same field under another name (a record that calls it differently)."""
        return replace(self, name=name, column="")


Group = tuple[Field, ...]


class Labelled(IntEnum):
    """An IntEnum whose values an :data:`ENUM` field labels, declared as
    ``class Side(Labelled, field=side, noun="side")``: ``label`` is the field's label of a
    member's value, :meth:`parse` reads one back (``noun`` names the value in its error).
    SchemaError at import unless the members' values are ``0..`` one per label."""

    _labels: ClassVar[tuple[str, ...]]
    _noun: ClassVar[str]

    def __init_subclass__(cls, *, field: Field, noun: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        labels = enum_labels(field)
        if [int(m) for m in cls] != list(range(len(labels))):
            raise SchemaError(f"{cls.__name__}'s values are not one per label of {field.name}")
        cls._labels = labels
        cls._noun = noun or field.name

    @property
    def label(self) -> str:
        return self._labels[self.value]

    @classmethod
    def parse(cls, text: str) -> Self:
        """A label (case-insensitive, spaces around ignored) -> its member; ValueError
        otherwise."""
        lowered = text.strip().lower() if isinstance(text, str) else ""
        if lowered in cls._labels:
            return cls(cls._labels.index(lowered))
        raise ValueError(f"{cls._noun} must be {' or '.join(map(repr, cls._labels))}, "
                         f"got {text!r}")


# --------------------------------------------------------------------------- the fields
position_id = Field("position_id", ID,
                    "the position's id (engine.position_ids); a free book row holds minus the "
                    "last id it carried")
owner = Field("owner", ID, "the user holding the position")
side = Field("side", ENUM, "Side: 0 long, 1 short", enum=("long", "short"))
entry_ticks = Field("entry_ticks", TICKS, "entry price: the ask for a long, the bid for a short")
qty_steps = Field("qty_steps", STEPS, "quantity (on a free book row: the next free row, -1 = none)")
margin_micros = Field("margin_micros", MICROS, "the isolated margin locked")
leverage = Field("leverage", LEVERAGE, "leverage, 1..the asset's maximum")
liq_ticks = Field("liq_ticks", TICKS,
                  "liquidation price, rounded to a tick so that comparing a tick with it is "
                  "exact; 0: a long that no positive price liquidates", zero_is_none=True)
tp_ticks = Field("tp_ticks", TICKS, "take-profit; 0 = none (engine.orders.NO_LEVEL)",
                 zero_is_none=True)
sl_ticks = Field("sl_ticks", TICKS, "stop-loss; 0 = none (engine.orders.NO_LEVEL)",
                 zero_is_none=True)
opened_ts_us = Field("opened_ts_us", US, "when the position opened")
maintenance_margin_ppm = Field("maintenance_margin_ppm", PPM,
                               "maintenance margin rate the liquidation price was computed with",
                               column="mm_ppm")
mm_micros = Field("mm_micros", MICROS,
                  "maintenance margin, floored to a micro-dollar (informational)")

exit_ticks = Field("exit_ticks", TICKS,
                   "closing-side price: the bid for a long, the ask for a short")
pnl_micros = Field("pnl_micros", MICROS, "realized PnL, floored")
payout_micros = Field("payout_micros", MICROS, "paid to the user's free balance")
house_micros = Field("house_micros", MICROS, "to the house (-pnl)")
insurance_micros = Field("insurance_micros", MICROS,
                         "to the insurance fund (margin + pnl - payout)")
reason = Field("reason", ENUM, "CloseReason",
               enum=("manual", "take_profit", "stop_loss", "liquidation"))
closed_ts_us = Field("closed_ts_us", US, "when the position closed")
close_id = Field("close_id", ID,
                 "the close's id: a whole close is named by its position's id (a position closes "
                 "whole once), a partial close by engine.position_ids.partial_close_id, which no "
                 "position id equals", dtype=_U64)  # a partial close's id has bit 63 set
partial = Field("partial", FLAG, "1: part of the position closed, the rest stays open")

asset = Field("asset", TEXT, "engine.assets.Asset.name")
unrealized_pnl_micros = Field("unrealized_pnl_micros", MICROS,
                              "PnL at the last tick's closing-side price; None without a tick",
                              nullable=True)
request_id = Field("request_id", ID, "the request that opened (or closed) it; 0 = none given",
                   dtype=_U64)  # any u64 the caller chose: wider than an int64 column
seq = Field("seq", SEQ, "the close's settlement number in its shard")
shard = Field("shard", TEXT, "the shard's name")

# --------------------------------------------------------------------------- the groups
IDENTITY: Group = (position_id, owner)
TERMS: Group = (side, entry_ticks, qty_steps, margin_micros, leverage, liq_ticks, tp_ticks,
                sl_ticks)
"""What an open plan fixes (engine.orders.plan_open)."""
POSITION: Group = (*IDENTITY, *TERMS, opened_ts_us)
CLOSE: Group = (exit_ticks, pnl_micros, payout_micros, house_micros, insurance_micros, reason,
                closed_ts_us, close_id, partial)
"""What a close adds to the position (a partial close's position fields are the closed part's:
its quantity and margin). ``close_id`` and ``partial`` came last: records written before them
hold the fields before, and :func:`fill_close_ids` (snapshot columns) and engine.events' old
layout 0x24 (journaled settlements) complete them."""
SETTLEMENT: Group = (pnl_micros, payout_micros, house_micros, insurance_micros)
"""The SPEC's split of a close (engine.settlement.Settlement)."""

BOOK_ROW: Group = (*POSITION, maintenance_margin_ppm)
"""The book's columns (``Field.column``, ``Field.dtype``) and engine.book.PositionRecord."""
PLAN: Group = (*TERMS, mm_micros, maintenance_margin_ppm)
"""engine.orders.OpenPlan."""
LISTED: Group = (*IDENTITY, asset, *TERMS, opened_ts_us)
"""A position as the service lists it: with its asset's name."""
OPEN_POSITION: Group = (*LISTED, unrealized_pnl_micros)
"""engine.messages.OpenPosition."""
CLOSED_POSITION: Group = (*LISTED, *CLOSE)
"""engine.messages.ClosedPosition."""
POSITION_OPENED: Group = (*BOOK_ROW, request_id)
"""engine.events.PositionOpened."""
POSITION_CLOSED: Group = (position_id, reason, exit_ticks, closed_ts_us.renamed("ts_us"),
                          seq.renamed("settlement_seq"), request_id)
"""engine.events.PositionClosed (the amounts follow from the position and ``exit_ticks``)."""
POSITION_AMENDED: Group = (position_id, qty_steps, margin_micros, liq_ticks, tp_ticks, sl_ticks,
                           request_id)
"""engine.events.PositionAmended: what a change of an open position leaves (its new values)."""
POSITION_REDUCED: Group = (position_id, qty_steps.renamed("closed_qty_steps"),
                           Field.renamed(margin_micros, "closed_margin_micros"),
                           liq_ticks.renamed("rest_liq_ticks"), exit_ticks,
                           closed_ts_us.renamed("ts_us"), seq.renamed("settlement_seq"),
                           request_id)
"""engine.events.PositionReduced: a partial close (the closed part's quantity and margin, the
liquidation price of the rest; the amounts follow like a close's)."""
SETTLEMENT_APPLIED: Group = (shard, seq, *CLOSED_POSITION)
"""engine.events.SettlementApplied."""
OUTBOX: Group = (seq, *POSITION, *CLOSE)
"""A settlement in a shard's snapshot (the asset is the shard's own)."""

FIELDS: dict[str, Field] = {f.name: f for f in (
    *POSITION, *CLOSE, maintenance_margin_ppm, mm_micros, asset, unrealized_pnl_micros,
    request_id, seq, shard)}
"""Every declared field by name."""

# --------------------------------------------------------------------------- pending orders
order_id = Field("order_id", ID,
                 "the pending order's id (laid out as engine.position_ids, in the order book's "
                 "own id space); a free order book row holds minus the last id it carried")
kind = Field("kind", ENUM, "OrderKind: 0 limit, 1 stop", enum=("limit", "stop"))
trigger_ticks = Field("trigger_ticks", TICKS,
                      "the price the fill condition compares the tick with (on a free order "
                      "book row: the next free row, -1 = none, -2 = retired)")
expires_ts_us = Field("expires_ts_us", US,
                      "expired on a tick whose time is later; 0 = good till cancelled",
                      zero_is_none=True)
placed_ts_us = Field("placed_ts_us", US, "when the order was placed")

ORDER_TERMS: Group = (side, kind, trigger_ticks, margin_micros, leverage, tp_ticks, sl_ticks,
                      expires_ts_us)
"""What placing a pending order fixes (engine.order_book.OrderTerms): the TP/SL are checked
against the fill price when the order fills, like a market open's."""
ORDER_ROW: Group = (order_id, owner, *ORDER_TERMS, placed_ts_us)
"""The order book's columns (``Field.column``, ``Field.dtype``) and
engine.order_book.OrderRecord."""
status = Field("status", ENUM, "OrderStatus: how an order ended (or that it is open)",
               enum=("open", "filled", "cancelled", "expired", "rejected"))
reject_code = Field("reject_code", TEXT,
                    "why a rejected order could not open (an engine.results.Code value); "
                    "empty otherwise")
ended_ts_us = Field("ended_ts_us", US, "when the order was filled, cancelled, expired or rejected")

LISTED_ORDER: Group = (order_id, owner, asset, *ORDER_TERMS, placed_ts_us)
"""An open order as the service lists it (engine.messages.PendingOrder): with its asset."""
ORDER_END: Group = (status, position_id, ended_ts_us, reject_code)
"""How an order ended: ``position_id`` is the position a fill opened (0 otherwise)."""
ENDED_ORDER: Group = (*LISTED_ORDER, *ORDER_END)
"""engine.messages.EndedOrder: an order that left the book, as the ledger's history keeps it."""
ORDER_PLACED: Group = (*ORDER_ROW, request_id)
"""engine.events.OrderPlaced."""
ORDER_ENDED: Group = (order_id, status, position_id, ended_ts_us, seq.renamed("settlement_seq"),
                      request_id, reject_code)
"""engine.events.OrderEnded (the order's terms are the book's)."""
ORDER_SETTLED: Group = (shard, seq, *ENDED_ORDER)
"""engine.events.OrderSettled."""
FIELDS.update({f.name: f for f in (order_id, kind, trigger_ticks, expires_ts_us, placed_ts_us,
                                   status, reject_code, ended_ts_us)})


# --------------------------------------------------------------------------- helpers
def names(group: Iterable[Field | str]) -> tuple[str, ...]:
    """The names of ``group``'s fields, in order."""
    return tuple(f if isinstance(f, str) else f.name for f in group)


def fixed(group: Group) -> Group:
    """The fixed-width fields of ``group`` (the ones a ``struct`` packs)."""
    return tuple(f for f in group if f.code is not None)


def variable(group: Group) -> Group:
    """The variable-length fields of ``group`` (text with a length prefix)."""
    return tuple(f for f in group if f.code is None)


def struct_format(group: Group) -> str:
    """The ``struct`` codes of ``group`` (without byte order); SchemaError if a field has no
    fixed width."""
    missing = names(variable(group))
    if missing:
        raise SchemaError(f"no fixed width: {', '.join(missing)}")
    return "".join(f.code or "" for f in group)


def dtype(group: Group, *, wire: bool = True, overrides: Mapping[str, Any] | None = None,
          before: Sequence[tuple[str, Any]] = (), after: Sequence[tuple[str, Any]] = ()
          ) -> np.dtype:
    """A packed numpy structured dtype with one field per member of ``group``, named as it:
    the wire widths (little-endian) or, with ``wire=False``, the column dtypes. ``overrides``
    gives some fields another dtype (a variable-length field needs one); ``before`` / ``after``
    add fields that are not the schema's (``(name, dtype)``)."""
    overrides = overrides or {}
    out: list[tuple[str, Any]] = list(before)
    for f in group:
        if f.name in overrides:
            out.append((f.name, overrides[f.name]))
        elif wire:
            out.append((f.name, f.wire_dtype))
        elif f.dtype is not None:
            out.append((f.name, f.dtype))
        else:
            raise SchemaError(f"{f.name} has no column dtype")
    out.extend(after)
    return np.dtype(out)


def declared_names(cls: type) -> tuple[str, ...]:
    """The field names a NamedTuple or dataclass declares, in order."""
    if is_dataclass(cls):
        return tuple(f.name for f in fields(cls))
    declared = getattr(cls, "_fields", None)
    if isinstance(declared, tuple):
        return declared
    raise SchemaError(f"{cls.__name__} is neither a NamedTuple nor a dataclass")


def check_names(what: str, declared: Sequence[str], expected: Sequence[str]) -> None:
    """SchemaError unless ``declared`` are exactly ``expected``, in order."""
    if tuple(declared) != tuple(expected):
        extra = [n for n in declared if n not in expected]
        lacking = [n for n in expected if n not in declared]
        raise SchemaError(f"{what} declares {tuple(declared)}, the schema says "
                          f"{tuple(expected)} (not in the schema: {extra}; missing: {lacking})")


def check_fields(cls: type, group: Group, extra: Sequence[str] = ()) -> None:
    """SchemaError (at import, where the class is declared) unless ``cls`` declares exactly the
    fields of ``group`` in its order, then ``extra`` (fields that are not the schema's)."""
    check_names(cls.__name__, declared_names(cls), (*names(group), *extra))


_namedtuple: Any = collections.namedtuple  # called with names mypy cannot read: see record


def value_type(f: Field) -> Any:
    """The Python type of ``f``'s value in a record: ``str`` for text, ``int | None`` for a
    nullable field, else ``int``."""
    return str if f.unit == TEXT else int | None if f.nullable else int


def record(name: str, group: Group, module: str, doc: str, *,
           enums: Mapping[str, type] | None = None, zero_default: Sequence[str] = ()) -> Any:
    """The NamedTuple class ``name`` of ``group``'s fields, in order, declared in ``module``
    (pass ``__name__``; it pickles by that name), bound to ``name`` there::

        OpenPosition = schema.record("OpenPosition", schema.OPEN_POSITION, __name__, "...")

    A field's type is its :func:`value_type`; ``enums`` types some :data:`ENUM` fields as their
    Labelled class instead. ``zero_default``: the last fields, which default to 0 (a record an
    older layout or caller gives without them). mypy learns the same class from the same
    arguments (tools/mypy_records.py)."""
    enums = dict(enums or {})
    field_names = names(group)
    unknown = sorted(set(enums) - set(field_names))
    if unknown:
        raise SchemaError(f"{name}: enums for fields it does not have: {unknown}")
    if tuple(zero_default) != field_names[len(field_names) - len(zero_default):]:
        raise SchemaError(f"{name}: zero_default must name its last fields, in order")
    annotations = {f.name: enums.get(f.name) or value_type(f) for f in group}
    cls = _namedtuple(name, field_names, defaults=(0,) * len(zero_default), module=module)
    cls.__annotations__ = annotations
    cls.__doc__ = doc
    return cls


def to_row(record: Any, group: Iterable[Field | str]) -> tuple[Any, ...]:
    """The values of ``record``'s fields named by ``group``, read by attribute name."""
    return tuple(getattr(record, n) for n in names(group))


def row_reader(group: Iterable[Field | str]) -> Callable[[Any], tuple[Any, ...]]:
    """:func:`to_row` compiled for a hot path (one ``operator.attrgetter``)."""
    wanted = names(group)
    if len(wanted) == 1:
        one = operator.attrgetter(wanted[0])
        return lambda record: (one(record),)
    return operator.attrgetter(*wanted)


def rows(columns: Mapping[str, np.ndarray] | np.ndarray, group: Iterable[Field | str]
         ) -> Iterator[tuple[Any, ...]]:
    """Rows (tuples of Python ints, in ``group`` order) of equal-length columns read by
    name (a mapping of columns, or a structured array)."""
    return zip(*(columns[n].tolist() for n in names(group)), strict=True)


def named_columns(table: np.ndarray, old_columns: Sequence[str] = (), width: int = 0
                  ) -> dict[str, np.ndarray]:
    """The columns of a snapshot table by name: a structured array's own fields, or for an
    older 2-D table (one row per record, ``width`` columns) the names ``old_columns`` it was
    written with, its first columns in order."""
    if table.dtype.names is not None:
        return {n: table[n] for n in table.dtype.names}
    if not old_columns or width < len(old_columns):
        raise SchemaError("an unnamed table needs the names of its columns")
    table = np.asarray(table).reshape(-1, width)
    return {n: table[:, i] for i, n in enumerate(old_columns)}


def fill_close_ids(columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Columns of closes (by name, with ``position_id``) with ``close_id`` and ``partial``
    completed: a table written before they existed, or a row whose ``close_id`` is 0 (no close
    has that id), holds whole closes, each named by its position's id."""
    out = dict(columns)
    position_ids = np.asarray(out["position_id"]).astype(np.uint64)
    given = out.get("close_id")
    close_ids = position_ids if given is None else np.asarray(given).astype(np.uint64)
    out["close_id"] = np.where(close_ids == 0, position_ids, close_ids)
    if "partial" not in out:
        out["partial"] = np.zeros(position_ids.size, dtype=np.uint8)
    return out


def to_record(cls: type, group: Iterable[Field | str], row: Sequence[Any],
              casts: Mapping[str, Callable[[Any], Any]] | None = None, **given: Any) -> Any:
    """``cls`` built by name: each of its fields from ``row`` (values in ``group`` order) or
    from ``given``, through ``casts[name]`` if there is one; SchemaError for a field found in
    neither."""
    values = dict(zip(names(group), row, strict=True))
    values.update(given)
    casts = casts or {}
    out = {}
    for name in declared_names(cls):
        if name not in values:
            raise SchemaError(f"{cls.__name__}.{name}: no value")
        cast = casts.get(name)
        out[name] = values[name] if cast is None else cast(values[name])
    return cls(**out)


def builder(cls: type, source: Iterable[Field | str], *, given: Sequence[str] = (),
            casts: Mapping[str, Callable[[Any], Any]] | None = None,
            attributes: bool = False) -> Callable[..., Any]:
    """:func:`to_record` compiled once for a hot path: ``build(src, *given_values)``.

    Every field of ``cls`` is looked up by name: in ``source`` (``src`` is a sequence holding
    the ``source`` fields in that order, or with ``attributes=True`` an object with those
    attributes), else in ``given`` (the extra arguments, in that order); ``casts[name]`` is
    applied to it. Names of ``source`` that ``cls`` lacks are ignored; a field found in
    neither, a ``given`` name ``cls`` lacks, or a cast of no field is a SchemaError. The
    result is the call of ``cls`` with its fields in declaration order, with no per-call
    lookup by name.
    """
    src = names(source)
    targets = declared_names(cls)
    casts = dict(casts or {})
    for name in (*src, *given, *casts):
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            raise SchemaError(f"{name!r} cannot name a field")
    unused = [n for n in (*given, *casts) if n not in targets]
    if unused:
        raise SchemaError(f"{cls.__name__} has no field {unused}")
    if len(set(given)) != len(given) or set(given) & set(src):
        raise SchemaError(f"{cls.__name__}: given {tuple(given)} repeat a name")
    namespace: dict[str, Any] = {"_cls": cls}
    args = []
    for name in targets:
        if name in given:
            value = name
        elif name in src:
            value = f"_r.{name}" if attributes else f"_r[{src.index(name)}]"
        else:
            raise SchemaError(f"{cls.__name__}.{name}: in neither {src} nor {tuple(given)}")
        if name in casts:
            namespace[f"_cast_{name}"] = casts[name]
            value = f"_cast_{name}({value})"
        args.append(value)
    params = ", ".join(("_r", *given))
    code = f"def build({params}):\n    return _cls({', '.join(args)})\n"
    exec(code, namespace)  # the field order is resolved here, once, by name
    build: Callable[..., Any] = namespace["build"]
    build.__qualname__ = f"build_{cls.__name__}"
    return build


# --------------------------------------------------------------------------- the HTTP API
class ApiField(NamedTuple):
    """A value of the API's ``Position`` / ``ClosedPosition``: its JSON key and field."""

    key: str
    field: Field
    description: str | None = None


API_POSITION: tuple[ApiField, ...] = (
    ApiField("positionId", position_id, "decimal string of a 63-bit id"),
    ApiField("asset", asset),
    ApiField("type", side),
    ApiField("margin", margin_micros),
    ApiField("leverage", leverage),
    ApiField("quantity", qty_steps),
    ApiField("entryPrice", entry_ticks),
    ApiField("liquidationPrice", liq_ticks, "null: no positive price liquidates it"),
    ApiField("takeProfit", tp_ticks),
    ApiField("stopLoss", sl_ticks),
    ApiField("unrealizedPnl", unrealized_pnl_micros, "null when there is no price yet / closed"),
    ApiField("openedAt", opened_ts_us),
)
"""SPEC ``Position`` (the API's PositionOut), in its key order."""
API_CLOSED_POSITION: tuple[ApiField, ...] = (
    *API_POSITION,
    ApiField("closeId", close_id, "decimal string of a 64-bit id (a whole close: its "
                                  "positionId); the history's before cursor"),
    ApiField("partial", partial, "true: the closed part of a position that stays open"),
    ApiField("exitPrice", exit_ticks),
    ApiField("realizedPnl", pnl_micros),
    ApiField("payout", payout_micros),
    ApiField("closeReason", reason),
    ApiField("closedAt", closed_ts_us),
)
"""SPEC ``ClosedPosition`` (ClosedPositionOut): a Position plus its close."""
API_ORDER: tuple[ApiField, ...] = (
    ApiField("orderId", order_id, "decimal string of a 63-bit id"),
    ApiField("asset", asset),
    ApiField("type", side),
    ApiField("orderType", kind),
    ApiField("triggerPrice", trigger_ticks),
    ApiField("margin", margin_micros),
    ApiField("leverage", leverage),
    ApiField("takeProfit", tp_ticks),
    ApiField("stopLoss", sl_ticks),
    ApiField("expiresAt", expires_ts_us, "null: good till cancelled"),
    ApiField("status", status),
    ApiField("positionId", replace(position_id, zero_is_none=True),
             "the position its fill opened; null otherwise"),
    ApiField("rejectReason", replace(reject_code, zero_is_none=True),
             "why its fill could not open (an error code); null otherwise"),
    ApiField("createdAt", placed_ts_us),
    ApiField("updatedAt", ended_ts_us, "when it last changed (its placement while open)"),
)
"""SPEC ``Order`` (OrderOut), rendered from an engine.messages.EndedOrder (an open order as
one with status ``open``)."""

RenderKind = Literal["id", "text", "label", "price", "quantity", "money", "int", "time", "bool"]
_RENDERS: dict[str, RenderKind] = {ID: "id", TEXT: "text", ENUM: "label", TICKS: "price",
                                   STEPS: "quantity", MICROS: "money", LEVERAGE: "int",
                                   US: "time", FLAG: "bool"}
FORMATTED_KINDS = ("price", "quantity", "money", "time")
"""The render kinds :func:`json_renderer` takes a formatter for (``(value, asset) -> str``):
price ticks -> a decimal at the asset's price step, steps -> a decimal at its quantity step,
micros -> a 6-decimal amount, us -> ISO 8601 UTC."""


def render_kind(f: Field) -> RenderKind:
    """How the API shows a value of ``f``: ``id`` (decimal string), ``text``, ``label`` (the
    enum's label), ``price``, ``quantity``, ``money``, ``time`` (strings, see
    :data:`FORMATTED_KINDS`), ``int`` or ``bool``."""
    try:
        return _RENDERS[f.unit]
    except KeyError:
        raise SchemaError(f"{f.name}: the API shows no {f.unit} value") from None


def api_nullable(af: ApiField) -> bool:
    """Whether the API value may be null (a level that is not set, a missing mark)."""
    return af.field.zero_is_none or af.field.nullable


def enum_labels(f: Field) -> tuple[str, ...]:
    """The labels of an :data:`ENUM` field's values, by value."""
    if f.enum is None:
        raise SchemaError(f"{f.name} is not an enum field")
    return f.enum


def api_annotation(af: ApiField) -> Any:
    """The Python type of the API value (a response model's, cluster.http.api.api_model):
    ``str``, ``int``, or a ``Literal`` of the enum's labels; ``| None`` when
    :func:`api_nullable`."""
    kind = render_kind(af.field)
    annotation: Any = {"int": int, "bool": bool}.get(kind, str)
    if kind == "label":
        annotation = Literal[enum_labels(af.field)]
    return annotation | None if api_nullable(af) else annotation


def json_renderer(cls: type, api_fields: Sequence[ApiField],
                  formats: Mapping[str, Callable[[Any, Any], Any]]
                  ) -> Callable[[Any, Any], dict[str, Any]]:
    """``render(record, asset) -> dict``: the API JSON of a ``cls`` record (its keys in
    ``api_fields`` order), compiled once. ``formats`` renders the kinds of
    :data:`FORMATTED_KINDS` (``(value, asset) -> str``); ids become decimal strings, enums
    their labels; a level that is not set, a None, or a field ``cls`` lacks (nullable only)
    becomes null."""
    declared = declared_names(cls)
    namespace: dict[str, Any] = {}
    lines = []
    items = []
    for i, af in enumerate(api_fields):
        f, kind = af.field, render_kind(af.field)
        if f.name not in declared:
            if not api_nullable(af):
                raise SchemaError(f"{cls.__name__} has no {f.name} for {af.key}")
            items.append(f"{af.key!r}: None")
            continue
        value = f"_v{i}"
        lines.append(f"    {value} = p.{f.name}")
        if kind in FORMATTED_KINDS:
            if kind not in formats:
                raise SchemaError(f"no formatter for {kind} ({af.key})")
            namespace[f"_f{i}"] = formats[kind]
            shown = f"_f{i}({value}, asset)"
        elif kind == "label":
            namespace[f"_l{i}"] = enum_labels(f)
            shown = f"_l{i}[{value}]"
        elif kind == "id":
            shown = f"str({value})"
        elif kind == "bool":
            shown = f"bool({value})"
        else:
            shown = value
        if f.zero_is_none:  # 0 (or empty text) is "not set"
            shown = f"({shown} if {value}{'' if kind == 'text' else ' > 0'} else None)"
        elif f.nullable:
            shown = f"(None if {value} is None else {shown})"
        items.append(f"{af.key!r}: {shown}")
    code = "def render(p, asset):\n" + "".join(line + "\n" for line in lines) \
        + "    return {" + ", ".join(items) + "}\n"
    exec(code, namespace)  # each key's field and formatter resolved once, by name
    render: Callable[[Any, Any], dict[str, Any]] = namespace["render"]
    render.__qualname__ = f"render_{cls.__name__}"
    return render


__all__ = [
    "API_CLOSED_POSITION",
    "API_ORDER",
    "API_POSITION",
    "BOOK_ROW",
    "CLOSE",
    "CLOSED_POSITION",
    "ENDED_ORDER",
    "ENUM",
    "FIELDS",
    "FLAG",
    "FORMATTED_KINDS",
    "ID",
    "IDENTITY",
    "LEVERAGE",
    "LISTED",
    "LISTED_ORDER",
    "MICROS",
    "OPEN_POSITION",
    "ORDER_END",
    "ORDER_ENDED",
    "ORDER_PLACED",
    "ORDER_ROW",
    "ORDER_SETTLED",
    "ORDER_TERMS",
    "OUTBOX",
    "PLAN",
    "POSITION",
    "POSITION_AMENDED",
    "POSITION_CLOSED",
    "POSITION_OPENED",
    "POSITION_REDUCED",
    "PPM",
    "SEQ",
    "SETTLEMENT",
    "SETTLEMENT_APPLIED",
    "STEPS",
    "TERMS",
    "TEXT",
    "TEXT_PREFIX",
    "TICKS",
    "UNIT_WIDTHS",
    "US",
    "WIRE_DTYPES",
    "ApiField",
    "Field",
    "Group",
    "Labelled",
    "SchemaError",
    "api_annotation",
    "api_nullable",
    "builder",
    "check_fields",
    "check_names",
    "declared_names",
    "dtype",
    "enum_labels",
    "fill_close_ids",
    "fixed",
    "json_renderer",
    "named_columns",
    "names",
    "record",
    "render_kind",
    "row_reader",
    "rows",
    "struct_format",
    "to_record",
    "to_row",
    "value_type",
    "variable",
]
