"""Event codecs: symmetric round trip of every event type, strict decoding, compact sizes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import events as ev
from engine.events import (
    LEDGER_EVENTS,
    SHARD_EVENTS,
    TYPE_CODES,
    AccountCreated,
    ClientOrderStored,
    EventError,
    MarginLocked,
    MarginReleased,
    OpenFenced,
    PositionClosed,
    PositionOpened,
    SettlementApplied,
    TickApplied,
    decode,
    encode,
)

u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
u8 = st.integers(0, 255)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
text = st.text(max_size=40)  # any code points, surrogates included

STRATEGIES = {
    PositionOpened: st.builds(PositionOpened, u64, u64, u8, i64, i64, i64, u16, i64, i64, i64,
                              i64, u32, u64),
    PositionClosed: st.builds(PositionClosed, u64, u8, i64, i64, u64),
    TickApplied: st.builds(TickApplied, i64, i64, i64),
    OpenFenced: st.builds(OpenFenced, u64),
    AccountCreated: st.builds(AccountCreated, u64, i64, st.text(max_size=60),
                              st.text(max_size=80)),
    MarginLocked: st.builds(MarginLocked, u64, i64, u64),
    MarginReleased: st.builds(MarginReleased, u64, i64, u64),
    SettlementApplied: st.builds(SettlementApplied, st.text(max_size=60), u64, u64, u64,
                                 st.text(max_size=20), u8, i64, i64, i64, u16, i64, i64, i64,
                                 i64, i64, i64, i64, i64, i64, u8, i64),
    ClientOrderStored: st.builds(ClientOrderStored, u64, st.text(max_size=20), text,
                                 st.binary(max_size=300)),
}
any_event = st.one_of(*STRATEGIES.values())


def test_every_event_type_has_a_strategy_and_a_distinct_type_byte() -> None:
    assert set(STRATEGIES) == set(SHARD_EVENTS) | set(LEDGER_EVENTS) == set(TYPE_CODES)
    assert len(set(TYPE_CODES.values())) == len(TYPE_CODES)
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


@settings(max_examples=100, deadline=None)
@given(any_event, st.data())
def test_truncated_or_padded_bytes_are_rejected(event: ev.Event, data: st.DataObject) -> None:
    raw = encode(event)
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
        encode(TickApplied(2**63, 1, 1))
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
                            ts_us=1_788_367_430_246_999, settlement_seq=17)
    assert len(encode(opened)) == 88
    assert len(encode(closed)) == 34
    assert len(encode(TickApplied(9896, 9897, 1_788_367_430_246_081))) == 25
