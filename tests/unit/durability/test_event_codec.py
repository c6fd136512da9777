"""Event codecs: symmetric round trip of every event type, strict decoding, the older layouts
still decoding, compact sizes."""

from __future__ import annotations

import struct

import pytest
from engine import events as ev
from engine.events import LEDGER_EVENTS
from engine.events import RECOVERED_TICK_SOURCE
from engine.events import SHARD_EVENTS
from engine.events import TYPE_CODES
from engine.events import VOLATILE_EVENTS
from engine.events import AccountCreated
from engine.events import AccountNoted
from engine.events import AnswersExpired
from engine.events import ClientOrderAsked
from engine.events import ClientOrderStored
from engine.events import ClientOrderStoredAt
from engine.events import EventError
from engine.events import MarginAdded
from engine.events import MarginLocked
from engine.events import MarginReleased
from engine.events import MarginReturned
from engine.events import OpenCountSet
from engine.events import OpenFenced
from engine.events import OrderCountSet
from engine.events import OrderEnded
from engine.events import OrderLocked
from engine.events import OrderPlaced
from engine.events import OrderSettled
from engine.events import OutboxAcked
from engine.events import PositionAmended
from engine.events import PositionClosed
from engine.events import PositionOpened
from engine.events import PositionReduced
from engine.events import ReleaseExpected
from engine.events import SeqResumed
from engine.events import SettlementApplied
from engine.events import TickApplied
from engine.events import decode
from engine.events import encode
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
u8 = st.integers(0, 255)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
text = st.text(max_size=40)  # any code points, surrogates included

STRATEGIES = {
    PositionOpened: st.builds(PositionOpened, u64, u64, u8, i64, i64, i64, u16, i64, i64, i64,
                              i64, u32, u64),
    PositionClosed: st.builds(PositionClosed, u64, u8, i64, i64, u64, u64),
    TickApplied: st.builds(TickApplied, i64, i64, i64, u64, st.text(max_size=255)),
    OpenFenced: st.builds(OpenFenced, u64),
    OutboxAcked: st.builds(OutboxAcked, u64),
    SeqResumed: st.builds(SeqResumed, u64),
    AccountCreated: st.builds(AccountCreated, u64, i64, st.text(max_size=60),
                              st.text(max_size=80)),
    MarginLocked: st.builds(MarginLocked, u64, i64, u64),
    MarginReleased: st.builds(MarginReleased, u64, i64, u64),
    SettlementApplied: st.builds(SettlementApplied, st.text(max_size=60), u64, u64, u64,
                                 st.text(max_size=20), u8, i64, i64, i64, u16, i64, i64, i64,
                                 i64, i64, i64, i64, i64, i64, u8, i64, u64, u8),
    ClientOrderStored: st.builds(ClientOrderStored, u64, st.text(max_size=20), text,
                                 st.binary(max_size=300)),
    ClientOrderStoredAt: st.builds(ClientOrderStoredAt, u64, st.text(max_size=20), text, u64,
                                   i64, st.binary(max_size=300)),
    AnswersExpired: st.builds(AnswersExpired, i64),
    OpenCountSet: st.builds(OpenCountSet, u64, u64),
    OrderPlaced: st.builds(OrderPlaced, u64, u64, u8, u8, i64, i64, u16, i64, i64, i64, i64,
                           u64),
    OrderEnded: st.builds(OrderEnded, u64, u8, u64, i64, u64, u64, text),
    OrderLocked: st.builds(OrderLocked, u64, i64, u64),
    OrderSettled: st.builds(OrderSettled, st.text(max_size=60), u64, u64, u64,
                            st.text(max_size=20), u8, u8, i64, i64, u16, i64, i64, i64, i64, u8,
                            u64, i64, text),
    OrderCountSet: st.builds(OrderCountSet, u64, u64),
    PositionAmended: st.builds(PositionAmended, u64, i64, i64, i64, i64, i64, u64),
    PositionReduced: st.builds(PositionReduced, u64, i64, i64, i64, i64, i64, u64, u64),
    MarginAdded: st.builds(MarginAdded, u64, i64, u64),
    MarginReturned: st.builds(MarginReturned, u64, i64, u64),
    ReleaseExpected: st.builds(ReleaseExpected, u64, i64, u64),
    AccountNoted: st.builds(AccountNoted, u64, u64, st.text(max_size=20),
                            st.binary(max_size=300)),
    ClientOrderAsked: st.builds(ClientOrderAsked, u64, st.text(max_size=20), text,
                                st.binary(max_size=255)),
}
any_event = st.one_of(*STRATEGIES.values())

# The layouts written before PositionClosed carried the close's request id (0x12) and before
# TickApplied carried the tick's seq and source (0x13): still decoded, never written.
OLD_CLOSED = st.tuples(u64, u8, i64, i64, u64).map(
    lambda v: (struct.pack("<BQBqqQ", 0x12, *v), PositionClosed(*v)))
OLD_TICK = st.tuples(i64, i64, i64).map(
    lambda v: (struct.pack("<Bqqq", 0x13, *v), TickApplied(*v, 0, RECOVERED_TICK_SOURCE)))
# SettlementApplied before partial closes (0x24): a whole close, named by its position's id.
OLD_SETTLEMENT = STRATEGIES[SettlementApplied].map(lambda e: (
    struct.pack("<BQQQBqqqHqqqqqqqqqBqBB", 0x24, *e[1:4], *e[5:21], len(e.shard.encode()),
                len(e.asset.encode())) + e.shard.encode() + e.asset.encode(),
    e._replace(close_id=e.position_id, partial=0)))
old_layout = st.one_of(OLD_CLOSED, OLD_TICK, OLD_SETTLEMENT)


def test_every_event_type_has_a_strategy_and_a_distinct_type_byte() -> None:
    assert set(STRATEGIES) == set(SHARD_EVENTS) | set(LEDGER_EVENTS) == set(TYPE_CODES)
    assert not set(SHARD_EVENTS) & set(LEDGER_EVENTS)
    assert set(VOLATILE_EVENTS) == {TickApplied, OutboxAcked} <= set(SHARD_EVENTS)
    assert len(set(TYPE_CODES.values())) == len(TYPE_CODES)
    assert {TYPE_CODES[c] for c in (PositionClosed, TickApplied, OutboxAcked, SeqResumed,
                                    ClientOrderStored, ClientOrderStoredAt)} == \
        {0x15, 0x16, 0x17, 0x18, 0x25, 0x26}
    # an old type byte is never reused, and an old layout is the start of the new one
    assert not set(ev._OLD_LAYOUTS) & set(ev._LAYOUTS)
    assert not set(ev._OLD_VAR_LAYOUTS) & set(ev._LAYOUTS)
    for code, (cls, fmt, *_) in [*ev._OLD_LAYOUTS.items(), *ev._OLD_VAR_LAYOUTS.items()]:
        new_fmt = ev._LAYOUTS[TYPE_CODES[cls]][1]
        assert new_fmt.startswith(fmt) and code < TYPE_CODES[cls]
    for code, (cls, fmt, var_names, var_spec) in ev._LAYOUTS.items():
        fixed = struct.calcsize("<" + fmt)
        n_fixed = len(struct.unpack("<" + fmt, bytes(fixed)))
        assert n_fixed + len(var_names) == len(cls._fields), cls  # type: ignore[attr-defined]
        assert len(var_names) == len(var_spec)
        assert TYPE_CODES[cls] == code


@settings(max_examples=300, deadline=None)
@given(any_event)
def test_round_trip(event: ev.Event) -> None:
    data = encode(event)
    assert data[0] == TYPE_CODES[type(event)]
    back = decode(data)
    assert type(back) is type(event) and back == event
    assert decode(memoryview(data)) == event
    assert encode(back) == data


@settings(max_examples=200, deadline=None)
@given(old_layout)
def test_old_layouts_still_decode(old: tuple[bytes, ev.Event]) -> None:
    raw, event = old
    assert decode(raw) == event and decode(memoryview(raw)) == event
    assert encode(event)[0] == TYPE_CODES[type(event)]  # written in the new layout
    assert decode(encode(event)) == event


def test_old_client_order_stored_still_round_trips() -> None:
    old = ClientOrderStored(7, "open", "c-1", b'\x01[101,30000000]')
    raw = encode(old)
    assert raw[0] == 0x25 and decode(raw) == old
    assert raw == struct.pack("<BQBHI", 0x25, 7, 4, 3, len(old.response)) + b"openc-1" + \
        old.response


@settings(max_examples=100, deadline=None)
@given(st.one_of(any_event.map(encode), old_layout.map(lambda old: old[0])), st.data())
def test_truncated_or_padded_bytes_are_rejected(raw: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(EventError):
        decode(raw[:cut])
    with pytest.raises(EventError):
        decode(raw + data.draw(st.binary(min_size=1, max_size=4)))


def test_unknown_type_and_bad_values() -> None:
    with pytest.raises(EventError):
        decode(b"\x00" + bytes(40))
    with pytest.raises(EventError):
        decode(b"")
    with pytest.raises(EventError):
        encode(PositionClosed(-1, 0, 1, 1, 1))  # ids are unsigned
    with pytest.raises(EventError):
        encode(PositionClosed(1, 0, 1, 1, 1, -1))
    with pytest.raises(EventError):
        encode(TickApplied(2**63, 1, 1))
    with pytest.raises(EventError):
        encode(TickApplied(1, 1, 1, -1))  # an exchange seq is unsigned
    with pytest.raises(EventError):
        encode(TickApplied(1, 1, 1, 1, "s" * 256))  # longer than its u8 length prefix
    with pytest.raises(EventError):
        encode(OutboxAcked(2**64))
    with pytest.raises(EventError):
        encode(ClientOrderStoredAt(1, "open", "c", 1, 2**63, b""))
    with pytest.raises(EventError):
        decode(b"\x12" + bytes(41))  # the old layout of 0x15 is as strict as any
    with pytest.raises(EventError):
        encode(AccountCreated(1, 1, "a" * 256, "h"))  # longer than its u8 length prefix
    with pytest.raises(EventError):
        encode(ClientOrderStored(1, "open", "c", "not bytes"))  # type: ignore[arg-type]
    with pytest.raises(EventError):
        encode((1, 2, 3))  # type: ignore[arg-type]
    bad_utf8 = encode(ClientOrderStored(1, "open", "ab", b"")).replace(b"ab", b"\xff\xfe")
    with pytest.raises(EventError):
        decode(bad_utf8)


def test_journal_sizes_of_the_hot_events() -> None:
    opened = PositionOpened(position_id=2**34 + 256 + 3, owner=42, side=1, entry_ticks=9897,
                            qty_steps=1010, margin_micros=100_000_000, leverage=10,
                            liq_ticks=10_887, tp_ticks=9000, sl_ticks=10_500,
                            opened_ts_us=1_788_367_430_246_081, maintenance_margin_ppm=5000,
                            request_id=77)
    closed = PositionClosed(opened.position_id, reason=3, exit_ticks=10_887,
                            ts_us=1_788_367_430_246_999, settlement_seq=17, request_id=2**63)
    ticked = TickApplied(9896, 9897, 1_788_367_430_246_081, seq=2**40)
    assert len(encode(opened)) == 88
    assert len(encode(closed)) == 42  # 0x12 without the request id: 34
    assert ticked.source == RECOVERED_TICK_SOURCE == "journal"
    assert len(encode(ticked)) == 41  # 0x13 without seq and source: 25
    assert len(encode(ticked._replace(source="backpack"))) == 42
    assert len(encode(OutboxAcked(17))) == len(encode(SeqResumed(17))) == 9


def test_a_commit_over_the_record_bound_is_split_between_events() -> None:
    encoded = [ev.encode(OpenFenced(i)) for i in range(50)]  # 9 bytes each, 13 in a record
    for bound in (14, 40, 100, 10_000):
        records = ev.encode_batches(encoded, bound)
        assert all(len(r) <= bound for r in records)
        assert len(records) == -(-50 // ((bound - 1) // 13))  # as few as fit them
        assert [e for r in records for e in ev.decode_batch(r)] == \
            [OpenFenced(i) for i in range(50)]
    assert ev.encode_batches(encoded, 10_000) == [ev.encode_batch(encoded)]
    assert ev.batch_event_bytes(14) == 9
    with pytest.raises(ValueError, match="does not fit"):
        ev.encode_batches(encoded, 13)
