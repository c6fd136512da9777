"""engine.schema: the position's fields declared once, and what follows from them.

The event layouts derived from it are byte for byte the ones journals already hold; every record
that carries a position declares exactly its group; the book's columns, the snapshots' named
columns and the API's JSON follow from it; older snapshot tables still restore."""

from __future__ import annotations

import dataclasses
import pickle
import struct
from typing import Any
from typing import Literal
from typing import NamedTuple

import numpy as np
import pytest
from engine import schema
from engine.assets import DEFAULT_ASSETS
from engine.book import COLUMN_NAMES
from engine.book import PositionBook
from engine.book import PositionRecord
from engine.events import TYPE_CODES
from engine.events import PositionClosed
from engine.events import PositionOpened
from engine.events import PositionReduced
from engine.events import SettlementApplied
from engine.events import decode
from engine.events import encode
from engine.events import fixed_format
from engine.events import record_dtype
from engine.ledger_machine import HISTORY_DTYPE
from engine.ledger_machine import ApplySettlements
from engine.ledger_machine import CreateAccount
from engine.ledger_machine import LedgerMachine
from engine.ledger_machine import LockMargin
from engine.ledger_machine import decode_answer
from engine.ledger_machine import encode_answer
from engine.ledger_machine import hash_api_key
from engine.machine import run
from engine.market import Tick
from engine.messages import ClosedPosition
from engine.messages import MarginLock
from engine.messages import OpenPosition
from engine.messages import SettlementItem
from engine.messages import ShardClose
from engine.messages import ShardOpen
from engine.orders import CloseReason
from engine.orders import OpenPlan
from engine.orders import Side
from engine.orders import plan_open
from engine.reference import ReferenceBook
from engine.shard_machine import OUTBOX_DTYPE
from engine.shard_machine import RESULT_DTYPE
from engine.shard_machine import ApplyTick
from engine.shard_machine import Close
from engine.shard_machine import Open
from engine.shard_machine import Resolve
from engine.shard_machine import ShardMachine
from tests.unit.engine.recorded_ledger import older_answers_layout

SOL = DEFAULT_ASSETS["SOL"]
NOW = 1_800_000_000_000_000
USD = 10**6
SHARD = "shard-SOL-0"

# The layouts journals written so far hold (type byte -> struct codes after it).
JOURNALED = {
    PositionOpened: (0x11, "QQBqqqHqqqqIQ"),
    PositionClosed: (0x15, "QBqqQQ"),
    SettlementApplied: (0x2E, "QQQBqqqHqqqqqqqqqBqQB"),
    PositionReduced: (0x1C, "QqqqqqQQ"),
}


# ----------------------------------------------------------------------------- event layouts
@pytest.mark.parametrize("cls", list(JOURNALED), ids=lambda c: c.__name__)
def test_derived_formats_are_the_journaled_ones(cls: type) -> None:
    code, fmt = JOURNALED[cls]
    assert TYPE_CODES[cls] == code
    assert fixed_format(cls) == fmt


def test_the_groups_give_the_journaled_formats() -> None:
    assert schema.struct_format(schema.POSITION) == "QQBqqqHqqqq"
    assert schema.struct_format(schema.CLOSE) == "qqqqqBqQB"
    assert schema.struct_format(schema.POSITION_OPENED) == "QQBqqqHqqqqIQ"
    assert schema.struct_format(schema.POSITION_CLOSED) == "QBqqQQ"
    assert schema.struct_format(schema.fixed(schema.SETTLEMENT_APPLIED)) == \
        "QQQBqqqHqqqqqqqqqBqQB"
    assert schema.names(schema.variable(schema.SETTLEMENT_APPLIED)) == ("shard", "asset")
    with pytest.raises(schema.SchemaError):
        schema.struct_format(schema.SETTLEMENT_APPLIED)  # text has no fixed width


def _opened() -> PositionOpened:
    return PositionOpened(2**34 + 256 + 3, 42, 1, 9897, 1010, 100 * USD, 10, 10_887, 9000,
                          10_500, NOW, 5000, 2**64 - 1)


def _settlement() -> SettlementApplied:
    return SettlementApplied(SHARD, 7, 2**34 + 3, 42, "SOL", 0, 10_000, 1_000, 100 * USD, 10,
                             9_000, 11_000, 9_500, NOW, 9_400, -6 * USD, 94 * USD, 6 * USD, 0,
                             2, NOW + 5, 2**34 + 3, 0)


def test_events_encode_to_the_bytes_the_literal_layouts_write_and_decode_them() -> None:
    opened = _opened()
    old_opened = struct.pack("<BQQBqqqHqqqqIQ", 0x11, *opened)
    assert encode(opened) == old_opened and decode(old_opened) == opened
    closed = PositionClosed(opened.position_id, 3, 10_887, NOW + 1, 4, 99)
    old_closed = struct.pack("<BQBqqQQ", 0x15, *closed)
    assert encode(closed) == old_closed and decode(old_closed) == closed
    applied = _settlement()
    fixed = [getattr(applied, n) for n in SettlementApplied._fields if n not in ("shard", "asset")]
    new_applied = struct.pack("<BQQQBqqqHqqqqqqqqqBqQBBB", 0x2E, *fixed, len(SHARD), 3) \
        + SHARD.encode() + b"SOL"
    assert encode(applied) == new_applied and decode(new_applied) == applied
    # the layout before partial closes: a whole close, named by its position's id
    old_applied = struct.pack("<BQQQBqqqHqqqqqqqqqBqBB", 0x24, *fixed[:-2], len(SHARD), 3) \
        + SHARD.encode() + b"SOL"
    assert decode(old_applied) == applied and applied.close_id == applied.position_id
    part = applied._replace(close_id=2**63 | 7 << 8 | 3, partial=1)
    assert decode(encode(part)) == part
    reduced = PositionReduced(opened.position_id, 400, 40 * USD, 10_900, 9_990, NOW + 2, 5, 77)
    assert encode(reduced) == struct.pack("<BQqqqqqQQ", 0x1C, *reduced)
    assert decode(encode(reduced)) == reduced


def test_the_vectorised_open_record_is_the_schema_at_wire_widths() -> None:
    dtype = record_dtype(PositionOpened)
    assert dtype.names == ("length", "type", *schema.names(schema.POSITION_OPENED))
    assert dtype == schema.dtype(schema.POSITION_OPENED, before=(("length", "<u4"),
                                                                 ("type", "u1")))


# ----------------------------------------------------------------------------- declared records
@pytest.mark.parametrize("cls, group, extra", [
    (OpenPosition, schema.OPEN_POSITION, ()),
    (ClosedPosition, schema.CLOSED_POSITION, ()),
    (PositionOpened, schema.POSITION_OPENED, ()),
    (PositionClosed, schema.POSITION_CLOSED, ()),
    (SettlementApplied, schema.SETTLEMENT_APPLIED, ()),
    (PositionRecord, schema.BOOK_ROW, ()),
    (OpenPlan, schema.PLAN, ()),
], ids=lambda v: getattr(v, "__name__", ""))
def test_every_record_declares_its_group(cls: type, group: schema.Group,
                                         extra: tuple[str, ...]) -> None:
    schema.check_fields(cls, group, extra)  # what each module does at import
    assert schema.declared_names(cls) == (*schema.names(group), *extra)


def test_a_record_is_built_from_its_group() -> None:
    assert OpenPosition._fields == schema.names(schema.OPEN_POSITION)
    assert OpenPosition.__module__ == "engine.messages" and "mark-to-market" in OpenPosition.__doc__
    types = OpenPosition.__annotations__
    assert types["side"] is Side and types["asset"] is str and types["owner"] is int
    assert types["unrealized_pnl_micros"] == int | None  # the nullable field
    assert PositionRecord._field_defaults == {"maintenance_margin_ppm": 0}
    assert SettlementApplied._field_defaults == {"close_id": 0, "partial": 0}
    position = OpenPosition(1, 2, "SOL", Side.LONG, 3, 4, 5, 6, 7, 0, 0, 8, None)
    # pickled by reference to its module's name, as a declared class is (what Ray sends)
    assert pickle.loads(pickle.dumps(position)) == position
    assert len(pickle.dumps(position)) < 150


def test_a_record_refuses_options_its_group_does_not_fit() -> None:
    with pytest.raises(schema.SchemaError, match="does not have"):
        schema.record("X", schema.IDENTITY, __name__, "", enums={"side": Side})
    with pytest.raises(schema.SchemaError, match="last fields"):
        schema.record("X", schema.IDENTITY, __name__, "", zero_default=("position_id",))


def test_the_groups_are_made_of_the_position_and_its_close() -> None:
    assert schema.names(schema.POSITION) == (
        "position_id", "owner", "side", "entry_ticks", "qty_steps", "margin_micros", "leverage",
        "liq_ticks", "tp_ticks", "sl_ticks", "opened_ts_us")
    assert schema.names(schema.CLOSE) == (
        "exit_ticks", "pnl_micros", "payout_micros", "house_micros", "insurance_micros",
        "reason", "closed_ts_us", "close_id", "partial")
    listed = [f for f in schema.CLOSED_POSITION if f is not schema.asset]
    assert tuple(listed) == (*schema.POSITION, *schema.CLOSE)
    assert all(schema.FIELDS[f.name] is f for f in (*schema.POSITION, *schema.CLOSE))
    units = {f.name: f.unit for f in (*schema.POSITION, *schema.CLOSE)}
    assert units["entry_ticks"] == schema.TICKS and units["qty_steps"] == schema.STEPS
    assert units["margin_micros"] == schema.MICROS and units["closed_ts_us"] == schema.US
    assert units["side"] == units["reason"] == schema.ENUM and units["owner"] == schema.ID


def test_a_field_takes_its_wire_width_and_column_dtype_from_its_unit() -> None:
    for f in schema.FIELDS.values():
        code, column_dtype = schema.UNIT_WIDTHS[f.unit]
        assert f.code == code and f.prefix == ("" if code else schema.TEXT_PREFIX)
        assert f.dtype == column_dtype or f in (schema.request_id, schema.close_id)
    assert schema.request_id.dtype == np.dtype(np.uint64)  # any u64 a caller chose
    renamed = schema.closed_ts_us.renamed("ts_us")
    assert (renamed.name, renamed.column, renamed.code) == ("ts_us", "ts_us", "q")
    with pytest.raises(schema.SchemaError, match="unit"):
        schema.Field("x", "furlongs", "a unit the schema does not know")


def test_a_record_that_differs_from_its_group_is_refused() -> None:
    class Reordered(NamedTuple):
        owner: int
        position_id: int

    class Short(NamedTuple):
        position_id: int

    for cls in (Reordered, Short):
        with pytest.raises(schema.SchemaError, match=cls.__name__):
            schema.check_fields(cls, schema.IDENTITY)
    with pytest.raises(schema.SchemaError):
        schema.declared_names(dict)


# ----------------------------------------------------------------------------- conversions
def test_rows_and_records_convert_by_name() -> None:
    plan = plan_open(SOL, Side.SHORT, 100 * USD, 10, 10_000, 10_001, None, 10_500, 5_000)
    assert isinstance(plan, OpenPlan)
    row = schema.to_row(plan, schema.PLAN)
    assert row == tuple(getattr(plan, n) for n in schema.names(schema.PLAN))
    assert schema.to_record(OpenPlan, schema.PLAN, row) == plan
    # another order of the same values gives the same record
    backwards = tuple(reversed(schema.PLAN))
    assert schema.to_record(OpenPlan, backwards, tuple(reversed(row))) == plan
    assert schema.row_reader(schema.PLAN)(plan) == row
    assert schema.row_reader((schema.side,))(plan) == (Side.SHORT,)
    build = schema.builder(PositionOpened, backwards, attributes=False,
                           given=("position_id", "owner", "opened_ts_us", "request_id"))
    event = build(tuple(reversed(row)), 5, 6, NOW, 7)
    assert event == PositionOpened(5, 6, Side.SHORT, plan.entry_ticks, plan.qty_steps,
                                   plan.margin_micros, 10, plan.liq_ticks, 0, 10_500, NOW,
                                   5_000, 7)
    by_attribute = schema.builder(PositionOpened, schema.PLAN, attributes=True,
                                  given=("position_id", "owner", "opened_ts_us", "request_id"),
                                  casts={"side": int})
    again = by_attribute(plan, 5, 6, NOW, 7)
    assert again == event and type(again.side) is int
    with pytest.raises(schema.SchemaError):
        schema.to_record(OpenPlan, schema.TERMS, row[:len(schema.TERMS)])  # no mm_micros


def test_a_builder_refuses_what_it_cannot_fill_by_name() -> None:
    with pytest.raises(schema.SchemaError, match="mm_micros"):
        schema.builder(OpenPlan, schema.POSITION_OPENED)
    with pytest.raises(schema.SchemaError, match="no field"):
        schema.builder(OpenPlan, schema.PLAN, given=("asset",))
    with pytest.raises(schema.SchemaError, match="no field"):
        schema.builder(OpenPlan, schema.PLAN, casts={"reason": int})
    with pytest.raises(schema.SchemaError, match="repeat"):
        schema.builder(OpenPlan, schema.TERMS, given=("side", "mm_micros",
                                                       "maintenance_margin_ppm"))
    with pytest.raises(schema.SchemaError):
        schema.builder(OpenPlan, ("side; import os",))


def test_named_columns_read_structured_and_older_tables() -> None:
    table = np.zeros(2, dtype=schema.dtype(schema.IDENTITY))
    table["owner"] = [7, 8]
    assert schema.named_columns(table)["owner"].tolist() == [7, 8]
    old = np.array([[1, 7, 0], [2, 8, 0]], dtype=np.int64)
    named = schema.named_columns(old, ("position_id", "owner"), 3)
    assert list(schema.rows(named, schema.IDENTITY)) == [(1, 7), (2, 8)]
    with pytest.raises(schema.SchemaError):
        schema.named_columns(old)


# ----------------------------------------------------------------------------- the book
def test_the_book_columns_are_the_schema_with_todays_storage_widths() -> None:
    assert COLUMN_NAMES == ("position_id", "owner", "side", "entry_ticks", "qty_steps",
                            "margin_micros", "leverage", "liq_ticks", "tp_ticks", "sl_ticks",
                            "opened_ts_us", "mm_ppm")
    book = PositionBook(SOL, 1, capacity=8)
    arrays = book.to_arrays()
    dtypes = {name: arrays[name].dtype for name in COLUMN_NAMES}
    assert dtypes == {f.column: f.dtype for f in schema.BOOK_ROW}
    assert {n: str(d) for n, d in dtypes.items() if d != np.int64} == \
        {"side": "int8", "leverage": "int32", "mm_ppm": "int32"}
    assert sum(d.itemsize for d in dtypes.values()) == 81  # bytes per row, as before


def test_open_writes_every_column_and_get_reads_it_back_by_name() -> None:
    book = PositionBook(SOL, 1)
    plan = plan_open(SOL, Side.SHORT, 100 * USD, 10, 10_000, 10_001, 9_000, 10_500, 5_000)
    assert isinstance(plan, OpenPlan)
    pid = book.open(77, plan, NOW)
    record = book.get(pid)
    assert record is not None and type(record.side) is Side
    expected = {**{f.name: getattr(plan, f.name) for f in schema.TERMS},
                "position_id": pid, "owner": 77, "opened_ts_us": NOW,
                "maintenance_margin_ppm": 5_000}
    assert record._asdict() == expected
    columns = book.columns()
    row = {f.name: int(columns[f.column][0]) for f in schema.BOOK_ROW}
    assert row == expected and all(v != 0 for v in row.values())
    reference = ReferenceBook(SOL)
    position = reference.get(reference.open(77, plan, NOW))
    assert position is not None
    assert {f.name: getattr(position, f.name) for f in schema.BOOK_ROW} == \
        {**expected, "position_id": 1}


# ----------------------------------------------------------------------------- snapshots
def _shard() -> ShardMachine:
    """A shard with remembered opens, closes and a fence, and settlements in its outbox."""
    m = ShardMachine(SHARD, 3, SOL, 5_000, 15_000_000)
    run(m, ApplyTick(Tick("SOL", 10_000, 10_001, NOW, 1, "test")), NOW)
    opens = [run(m, Open(ShardOpen(rid, rid % 3, Side(rid % 2), 100 * USD, 5 + rid,
                                   9_000 if rid % 2 else None, None, None, 100)), NOW)
             for rid in range(1, 9)]
    assert all(isinstance(p, OpenPosition) for p in opens)
    for rid, p in zip(range(100, 103), opens, strict=False):
        assert isinstance(run(m, Close(ShardClose(rid, p.owner, p.position_id, None, 100)), NOW),
                          SettlementItem)
    run(m, Resolve(555), NOW)
    assert run(m, ApplyTick(Tick("SOL", 8_999, 9_000, NOW + 1, 2, "test")), NOW + 1) >= 2
    return m


def _restored(m: ShardMachine, arrays: dict[str, np.ndarray],
              meta: dict[str, Any]) -> ShardMachine:
    return ShardMachine.from_snapshot(m.name, m.book_tag, m.asset, m.maintenance_margin_ppm,
                                      m.max_price_age_us, arrays, meta)


def test_shard_snapshots_have_named_columns_and_restore() -> None:
    m = _shard()
    arrays, meta = m.snapshot()
    assert arrays["outbox"].dtype == OUTBOX_DTYPE and len(arrays["outbox"]) >= 3
    assert OUTBOX_DTYPE.names == schema.names(schema.OUTBOX)
    assert arrays["results"].dtype == RESULT_DTYPE
    assert set(schema.names(schema.OUTBOX)) <= set(RESULT_DTYPE.names)
    assert "result_ids" not in arrays
    first = m.fingerprint()["outbox"][0]
    assert arrays["outbox"][0]["seq"] == first[0]
    assert _restored(m, arrays, meta).fingerprint() == m.fingerprint()


def _v1_shard_tables(m: ShardMachine) -> dict[str, np.ndarray]:
    """``outbox``, ``results`` and ``result_ids`` as the previous version wrote them: int64
    tables, results' columns by kind (an open's 12 fields, then zeros)."""
    position = ("position_id", "owner", "side", "entry_ticks", "qty_steps", "margin_micros",
                "leverage", "liq_ticks", "tp_ticks", "sl_ticks", "opened_ts_us")
    close = ("exit_ticks", "pnl_micros", "payout_micros", "house_micros", "insurance_micros",
             "reason", "closed_ts_us")

    def outbox_row(item: SettlementItem) -> tuple[int, ...]:
        return (item.seq, *(getattr(item.closed, n) for n in (*position, *close)))

    fingerprint_results = dict(m._all_answers())
    rows = []
    for answer in fingerprint_results.values():
        if isinstance(answer, SettlementItem):
            rows.append((3, 0, *outbox_row(answer)))
        elif isinstance(answer, OpenPosition):
            pnl = answer.unrealized_pnl_micros
            rows.append((1, int(pnl is not None), *(getattr(answer, n) for n in position),
                         pnl or 0, *[0] * 7))
        else:
            rows.append((2, 0, *[0] * 19))
    return {
        "outbox": np.array([outbox_row(i) for i in m._outbox], dtype=np.int64).reshape(-1, 19),
        "results": np.array(rows, dtype=np.int64).reshape(-1, 21),
        "result_ids": np.array(list(fingerprint_results), dtype=np.uint64),
    }


def test_shard_snapshots_of_the_previous_version_still_restore() -> None:
    m = _shard()
    arrays, meta = m.snapshot()
    arrays = {k: v for k, v in arrays.items() if k not in ("outbox", "results")}
    arrays.update(_v1_shard_tables(m))
    assert _restored(m, arrays, meta).fingerprint() == m.fingerprint()


def _ledger() -> LedgerMachine:
    m = LedgerMachine(10_000 * USD)
    for i in range(1, 4):
        run(m, CreateAccount(f"acc_{i}", hash_api_key(f"key-{i}")), NOW)
        run(m, LockMargin(MarginLock(i, 100 * USD)), NOW)
    items = []
    for seq in range(1, 4):
        pnl = (seq - 2) * 3 * USD
        items.append(SettlementItem(seq, ClosedPosition(
            seq << 34 | 3, seq, "SOL" if seq != 2 else "BTC", Side(seq % 2), 10_000, 1_000,
            100 * USD, 10, 9_000, 0, 9_500 if seq == 3 else 0, NOW, 10_000 + seq, pnl,
            100 * USD + pnl, -pnl, 0, int(CloseReason.MANUAL), NOW + seq, seq << 34 | 3, 0)))
    assert run(m, ApplySettlements(SHARD, tuple(items)), NOW) == 3
    return m


def test_ledger_history_has_named_columns_and_old_tables_still_restore() -> None:
    m = _ledger()
    arrays, meta = m.snapshot()
    history = arrays["history"]
    assert history.dtype == HISTORY_DTYPE and len(history) == 3
    assert history.dtype.names == schema.names(schema.CLOSED_POSITION)
    assert [meta["history_assets"][i] for i in history["asset"]] == ["SOL", "BTC", "SOL"]
    assert LedgerMachine.from_snapshot(m.signup_balance_micros, arrays, meta).fingerprint() \
        == m.fingerprint()
    # the previous version's int64 table: the ClosedPosition fields, the asset as its index
    names = ("position_id", "owner", "asset", "side", "entry_ticks", "qty_steps",
             "margin_micros", "leverage", "liq_ticks", "tp_ticks", "sl_ticks", "opened_ts_us",
             "exit_ticks", "pnl_micros", "payout_micros", "house_micros", "insurance_micros",
             "reason", "closed_ts_us")
    old = np.array([[int(row[n]) for n in names] for row in history], dtype=np.int64)
    # (and its answers in the meta, as that version wrote them)
    again = LedgerMachine.from_snapshot(m.signup_balance_micros, {"history": old},
                                        older_answers_layout(arrays, meta)[1])
    assert again.fingerprint() == m.fingerprint()


def test_stored_answers_keep_their_json_layout() -> None:
    position = OpenPosition(5, 1, "SOL", Side.SHORT, 100, 2, 3, 4, 120, 0, 110, NOW, None)
    assert encode_answer(position) == \
        f'["open",5,1,"SOL",1,100,2,3,4,120,0,110,{NOW},null]'.encode()
    assert decode_answer(encode_answer(position)) == position
    close = ClosedPosition(5, 1, "SOL", Side.LONG, 100, 2, 3, 4, 90, 0, 0, NOW, 95, -10, 0, 10,
                           3, 3, NOW + 1, 5, 0)
    assert decode_answer(encode_answer(close)) == close
    assert type(decode_answer(encode_answer(close)).side) is Side  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        decode_answer(b'["open",5,1]')


# ----------------------------------------------------------------------------- the API
def _formats() -> dict[str, Any]:
    from cluster.http.api import decimal_text
    from cluster.http.api import iso_us
    from cluster.http.api import money

    return {"price": lambda v, a: decimal_text(v, a.price_decimals),
            "quantity": lambda v, a: decimal_text(v, a.qty_decimals),
            "money": lambda v, a: money(v), "time": lambda v, a: iso_us(v)}


def test_the_api_json_follows_from_the_schema() -> None:
    from cluster.http.api import position_json

    formats = _formats()
    open_json = schema.json_renderer(OpenPosition, schema.API_POSITION, formats)
    closed_json = schema.json_renderer(ClosedPosition, schema.API_CLOSED_POSITION, formats)
    positions = [
        OpenPosition(2**34 | 3, 1, "SOL", Side.LONG, 10_001, 999, 100 * USD, 10, 9_001, 0,
                     9_500, NOW, -1_234_567),
        OpenPosition(2**34 | 3, 1, "SOL", Side.SHORT, 10_001, 999, 100 * USD, 10, 11_000,
                     9_000, 0, NOW, None),
        OpenPosition(5, 1, "SOL", Side.LONG, 10_001, 999, 100 * USD, 1, 0, 0, 0, NOW, 0),
    ]
    for p in positions:
        assert open_json(p, SOL) == position_json(p, SOL)
        assert list(open_json(p, SOL)) == [af.key for af in schema.API_POSITION]
    for reason in CloseReason:
        c = ClosedPosition(7, 1, "SOL", Side.SHORT, 10_001, 999, 100 * USD, 10, 11_000, 9_000,
                           0, NOW, 9_990, 1_098_900, 101 * USD, -1_098_900, 0, int(reason),
                           NOW + 1, 7, 0)
        assert closed_json(c, SOL) == position_json(c, SOL)
    with pytest.raises(schema.SchemaError):
        schema.json_renderer(OpenPlan, schema.API_POSITION, formats)  # no position_id
    with pytest.raises(schema.SchemaError, match="formatter"):
        schema.json_renderer(OpenPosition, schema.API_POSITION, {})


def test_the_api_models_follow_from_the_schema() -> None:
    from cluster.http.api import ClosedPositionOut
    from cluster.http.api import OrderOut
    from cluster.http.api import PositionOut

    for model, api_fields in ((PositionOut, schema.API_POSITION),
                              (ClosedPositionOut, schema.API_CLOSED_POSITION),
                              (OrderOut, schema.API_ORDER)):
        declared = model.model_fields
        assert list(declared) == [af.key for af in api_fields]
        for af in api_fields:
            info = declared[af.key]
            assert info.is_required(), af.key
            assert (info.annotation, info.description) == \
                (schema.api_annotation(af), af.description), af.key
    reason = {af.key: af for af in schema.API_CLOSED_POSITION}["closeReason"]
    assert schema.api_annotation(reason) == \
        Literal["manual", "take_profit", "stop_loss", "liquidation"]
    assert ClosedPositionOut.model_fields["closeReason"].annotation == \
        Literal["manual", "take_profit", "stop_loss", "liquidation"]
    assert PositionOut.model_fields["takeProfit"].annotation == str | None
    assert "closeReason" not in PositionOut.model_fields


def test_render_kinds_by_unit() -> None:
    kinds = {af.key: schema.render_kind(af.field) for af in schema.API_CLOSED_POSITION}
    assert kinds == {
        "positionId": "id", "asset": "text", "type": "label", "margin": "money",
        "leverage": "int", "quantity": "quantity", "entryPrice": "price",
        "liquidationPrice": "price", "takeProfit": "price", "stopLoss": "price",
        "unrealizedPnl": "money", "openedAt": "time", "closeId": "id", "partial": "bool",
        "exitPrice": "price",
        "realizedPnl": "money", "payout": "money", "closeReason": "label", "closedAt": "time"}
    assert schema.enum_labels(schema.side) == ("long", "short")
    assert schema.enum_labels(schema.reason) == ("manual", "take_profit", "stop_loss",
                                                  "liquidation")
    with pytest.raises(schema.SchemaError):
        schema.render_kind(schema.maintenance_margin_ppm)
    with pytest.raises(dataclasses.FrozenInstanceError):
        schema.side.name = "x"  # type: ignore[misc]
