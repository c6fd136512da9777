"""Backpack frame routing, validation and normalisation (every drop reason)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from engine.assets import DEFAULT_ASSETS
from feed.frames import DROP_REASONS
from feed.frames import MAX_FRAME_BYTES
from feed.frames import MAX_IGNORED_EVENTS
from feed.frames import MAX_STALE_RUN
from feed.frames import ErrorFrame
from feed.frames import FrameNormalizer
from feed.frames import subscribe_request
from feed.message import MarketDataMessage
from hypothesis import given
from hypothesis import strategies as st
from tests.unit.feed import strategies

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "backpack"


def book(**over: object) -> dict[str, object]:
    data: dict[str, object] = {"A": "1.00", "B": "2.00", "E": 1788367430247487,
                               "T": 1788367430246081, "a": "98.97", "b": "98.96",
                               "e": "bookTicker", "s": "SOL_USDC", "u": 100}
    data.update(over)
    return {"data": data, "stream": "bookTicker.SOL_USDC"}


def test_fixture_yields_exactly_the_booktickers_in_order() -> None:
    norm = FrameNormalizer(DEFAULT_ASSETS)
    lines = (FIXTURES / "recorded_ws_frames.jsonl").read_text().splitlines()
    out = [norm.feed(line) for line in lines if line.strip()]
    msgs = [m for m in out if isinstance(m, MarketDataMessage)]
    expected = [json.loads(line)["data"] for line in lines
                if line.strip() and json.loads(line)["data"]["e"] == "bookTicker"]
    assert [m.seq for m in msgs] == [d["u"] for d in expected]
    assert [m.ts_us for m in msgs] == [d["T"] for d in expected]
    first = msgs[0]
    assert first.to_dict() == {"v": 1, "symbol": "SOL_USDC", "asset": "SOL", "bid": "98.96",
                               "ask": "98.97", "price": "98.965", "ts_us": 1788367430246081,
                               "seq": 4330360995, "source": "backpack"}
    assert norm.ignored == {"depth": 4, "markPrice": 2, "ticker": 2}
    assert not norm.dropped
    assert norm.accepted == len(expected) == 13


def test_error_frames_are_reported_not_prices() -> None:
    norm = FrameNormalizer(DEFAULT_ASSETS)
    out = [norm.feed(line) for line in
           (FIXTURES / "error_frames.jsonl").read_text().splitlines() if line.strip()]
    assert out == [ErrorFrame(4002, "Parse error"), ErrorFrame(4006, "Invalid stream"),
                   ErrorFrame(4008, "Invalid depth window")]
    assert norm.errors == 3 and norm.accepted == 0


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (book(b=None), "null_side"),
        (book(a=None), "null_side"),
        *[(book(**{side: text}), "bad_price") for text in strategies.INVALID_PRICE_TEXTS
          for side in ("b", "a")],
        (book(a=98.97), "bad_price"),  # prices on the wire are strings
        (book(b="98.98"), "crossed"),
        (book(s="DOGE_USDC"), "unknown_symbol"),
        (book(s="SOL_USDC_PERP"), "unknown_symbol"),
        (book(u=None), "malformed"),
        (book(T="1788367430246081"), "malformed"),
        (book(T=0), "malformed"),
        (book(T=-5), "malformed"),
        (book(T=2**63), "malformed"),
        (book(u=-1), "malformed"),
        (book(u=2**64), "malformed"),
        (book(u=True), "malformed"),
        (book(a="1518500.25"), "above_bound"),  # one step above SOL's bound
        (book(a="1e30", b="1e30"), "bad_price"),
        ({"stream": "bookTicker.SOL_USDC"}, "malformed"),
        ([1, 2], "malformed"),
    ],
)
def test_invalid_booktickers_are_dropped_and_counted(frame: object, reason: str) -> None:
    norm = FrameNormalizer(DEFAULT_ASSETS)
    assert norm.feed(json.dumps(frame)) is None
    assert norm.dropped == {reason: 1}
    assert norm.accepted == 0


def test_garbage_is_malformed() -> None:
    norm = FrameNormalizer(DEFAULT_ASSETS)
    assert norm.feed("not json{") is None
    assert norm.feed(b"\xff\xfe") is None
    assert norm.dropped == {"malformed": 2}


def test_deep_and_oversized_frames_are_dropped_and_the_next_one_passes() -> None:
    norm = FrameNormalizer(DEFAULT_ASSETS)
    assert norm.feed("[" * 100_000) is None  # a RecursionError inside json, unbounded
    assert norm.feed('{"data":' * 40 + "{}" + "}" * 40) is None
    assert norm.feed(b"[" * (MAX_FRAME_BYTES + 1)) is None
    assert norm.feed(json.dumps(book(pad="x" * MAX_FRAME_BYTES))) is None
    assert isinstance(norm.feed(json.dumps(book())), MarketDataMessage)
    assert norm.dropped == {"too_deep": 2, "oversized": 2}


def test_an_unforeseen_error_drops_the_frame_only() -> None:
    class Exploding(dict[str, object]):
        def get(self, key: str, default: object = None) -> object:
            raise RuntimeError("boom")

    norm = FrameNormalizer(DEFAULT_ASSETS)
    assert norm.feed_frame(Exploding()) is None
    assert norm.dropped == {"malformed": 1}
    assert isinstance(norm.feed(json.dumps(book())), MarketDataMessage)


def test_ignored_event_names_are_bounded() -> None:
    norm = FrameNormalizer(DEFAULT_ASSETS)
    for i in range(MAX_IGNORED_EVENTS + 10):
        norm.feed(json.dumps({"data": {"e": f"event{i}"}}))
    norm.feed(json.dumps({"data": {"e": {"nested": [1, 2]}}}))
    assert len(norm.ignored) == MAX_IGNORED_EVENTS + 1 and norm.ignored["other"] == 11


def test_error_frame_text_is_bounded() -> None:
    norm = FrameNormalizer(DEFAULT_ASSETS)
    out = norm.feed(json.dumps({"id": None, "error": {"code": True, "message": "m" * 10_000}}))
    assert isinstance(out, ErrorFrame) and out.code is None and len(out.message) == 200


@given(st.binary(max_size=300) | st.text(max_size=300))
def test_random_frames_never_raise(raw: bytes | str) -> None:
    norm = FrameNormalizer(DEFAULT_ASSETS)
    out = norm.feed(raw)
    assert out is None or isinstance(out, ErrorFrame | MarketDataMessage)
    assert set(norm.dropped) <= set(DROP_REASONS)


json_values = strategies.json_values(12, 4, 25)


@given(st.dictionaries(st.sampled_from(["e", "s", "T", "u", "a", "b", "A", "B"]), json_values,
                       max_size=8),
       st.sampled_from(["data", "error", "stream"]))
def test_random_frame_shapes_never_raise(data: dict[str, object], where: str) -> None:
    norm = FrameNormalizer(DEFAULT_ASSETS)
    try:
        raw = json.dumps({where: data})
    except ValueError:
        return
    out = norm.feed(raw)
    assert out is None or isinstance(out, ErrorFrame | MarketDataMessage)


def test_older_update_id_is_dropped_equal_and_newer_pass() -> None:
    norm = FrameNormalizer(DEFAULT_ASSETS)
    assert isinstance(norm.feed(json.dumps(book(u=10))), MarketDataMessage)
    assert norm.feed(json.dumps(book(u=9))) is None
    assert isinstance(norm.feed(json.dumps(book(u=10))), MarketDataMessage)
    assert isinstance(norm.feed(json.dumps(book(u=11))), MarketDataMessage)
    # Sequences are per symbol: an ETH id below SOL's is fine.
    eth = book(s="ETH_USDC", u=1, a="3000.00", b="2999.99")
    assert isinstance(norm.feed(json.dumps(eth)), MarketDataMessage)
    assert norm.dropped == {"stale_seq": 1}
    norm.reset_sequences()
    assert isinstance(norm.feed(json.dumps(book(u=5))), MarketDataMessage)


def test_one_corrupt_update_id_does_not_freeze_the_symbol() -> None:
    """One frame with an update id far ahead (2**63 - 1 is in range) made every later frame of
    its symbol ``stale_seq`` for as long as the connection lasted: frames kept coming, so no
    silence ended it, and the symbol's price froze until its age stopped all trading in it. A
    run of older ids means the odd one was the last accepted: after :data:`MAX_STALE_RUN` of
    them its id is forgotten."""
    norm = FrameNormalizer(DEFAULT_ASSETS)
    assert isinstance(norm.feed(json.dumps(book(u=100))), MarketDataMessage)
    assert isinstance(norm.feed(json.dumps(book(u=2**63 - 1))), MarketDataMessage)
    out = [norm.feed(json.dumps(book(u=101 + i))) for i in range(MAX_STALE_RUN + 10)]
    assert out[:MAX_STALE_RUN] == [None] * MAX_STALE_RUN
    assert all(isinstance(m, MarketDataMessage) for m in out[MAX_STALE_RUN:])
    assert norm.dropped == {"stale_seq": MAX_STALE_RUN}
    # a lone older id is still dropped, and the run starts again from nothing
    assert norm.feed(json.dumps(book(u=50))) is None
    assert isinstance(norm.feed(json.dumps(book(u=200))), MarketDataMessage)
    assert norm.dropped == {"stale_seq": MAX_STALE_RUN + 1}


def test_routing_uses_data_not_stream_name() -> None:
    norm = FrameNormalizer(DEFAULT_ASSETS)
    frame = book(s="BTC_USDC", a="95000.1", b="95000.0")
    frame["stream"] = "bookTicker.SOL_USDC"  # lies: data.s decides
    msg = norm.feed(json.dumps(frame))
    assert isinstance(msg, MarketDataMessage) and msg.asset == "BTC" and msg.price == "95000.05"
    depth = {"data": {"e": "depth", "s": "SOL_USDC", "a": [], "b": []},
             "stream": "bookTicker.SOL_USDC"}
    assert norm.feed(json.dumps(depth)) is None and norm.ignored == {"depth": 1}


def test_prices_are_normalised_to_the_asset_step() -> None:
    norm = FrameNormalizer(DEFAULT_ASSETS)
    msg = norm.feed(json.dumps(book(a="99.000", b="99")))
    assert isinstance(msg, MarketDataMessage)
    assert (msg.bid, msg.ask, msg.price) == ("99.00", "99.00", "99")


def test_subscribe_request_names_every_asset() -> None:
    assert subscribe_request(DEFAULT_ASSETS) == {
        "method": "SUBSCRIBE",
        "params": ["bookTicker.SOL_USDC", "bookTicker.BTC_USDC", "bookTicker.ETH_USDC"]}


def test_an_error_member_of_null_is_no_error_frame() -> None:
    """An answer saying ``"error": null`` (a JSON-RPC style success) was taken for an error
    frame: counted in ``error_frames`` and logged as ``error frame None``. It is no price either:
    dropped as ``malformed``; a data frame carrying it is read as any other."""
    norm = FrameNormalizer(DEFAULT_ASSETS)
    assert norm.feed(json.dumps({"id": 1, "error": None, "result": None})) is None
    assert isinstance(norm.feed(json.dumps({**book(), "error": None})), MarketDataMessage)
    assert norm.errors == 0 and norm.dropped == {"malformed": 1} and norm.accepted == 1


def test_every_recorded_bookticker_is_the_spec_message() -> None:
    """Each bookTicker of the recording, not only the first: ``T`` (engine time, microseconds)
    is ``ts_us``, ``u`` is ``seq``, bid and ask are the frame's text and ``price`` their exact
    mid; the record's key is the symbol."""
    norm = FrameNormalizer(DEFAULT_ASSETS)
    for line in (FIXTURES / "recorded_ws_frames.jsonl").read_text().splitlines():
        data = json.loads(line)["data"]
        msg = norm.feed(line)
        if data["e"] != "bookTicker":
            assert msg is None
            continue
        assert isinstance(msg, MarketDataMessage)
        mid = (Decimal(data["b"]) + Decimal(data["a"])) / 2
        assert json.loads(msg.to_json_bytes()) == {
            "v": 1, "symbol": data["s"], "asset": "SOL", "bid": data["b"], "ask": data["a"],
            "price": str(mid), "ts_us": data["T"], "seq": data["u"], "source": "backpack"}
        assert msg.key == data["s"].encode()


@pytest.mark.parametrize("name", ["SOL", "BTC", "ETH"])
def test_only_the_configured_assets_are_subscribed_and_priced(name: str) -> None:
    frames = {"SOL": book(), "BTC": book(s="BTC_USDC", a="95000.1", b="95000.0"),
              "ETH": book(s="ETH_USDC", a="3000.01", b="3000.00")}
    assets = DEFAULT_ASSETS.subset([name])
    symbol = DEFAULT_ASSETS[name].symbol
    assert subscribe_request(assets) == {"method": "SUBSCRIBE", "params": [f"bookTicker.{symbol}"]}
    norm = FrameNormalizer(assets)
    out = {other: norm.feed(json.dumps(frame)) for other, frame in frames.items()}
    msg = out.pop(name)
    assert isinstance(msg, MarketDataMessage) and (msg.symbol, msg.asset) == (symbol, name)
    assert out == dict.fromkeys(out) and norm.dropped == {"unknown_symbol": 2}


@pytest.mark.parametrize(("absent", "reason"), [
    ("b", "null_side"), ("a", "null_side"), ("T", "malformed"), ("u", "malformed"),
    ("s", "unknown_symbol"),
])
def test_a_bookticker_lacking_a_field_is_dropped_by_reason(absent: str, reason: str) -> None:
    frame = book()
    del frame["data"][absent]  # type: ignore[attr-defined]
    norm = FrameNormalizer(DEFAULT_ASSETS)
    assert norm.feed(json.dumps(frame)) is None and norm.dropped == {reason: 1}


def test_fields_a_bookticker_does_not_need_change_nothing() -> None:
    """``E`` (event time) is not read, nor are sizes or any field Backpack may add."""
    norm = FrameNormalizer(DEFAULT_ASSETS)
    expected = norm.feed(json.dumps(book()))
    frame = book(A=None, B="x", extra={"nested": [1, 2]}, E=1)
    del frame["data"]["E"]  # type: ignore[attr-defined]
    norm.reset_sequences()
    assert norm.feed(json.dumps(frame)) == expected


def test_control_frames_are_dropped_not_errors_and_the_next_price_passes() -> None:
    norm = FrameNormalizer(DEFAULT_ASSETS)
    for frame in ({"id": 1, "result": None}, {"method": "PING"}, {"data": {"E": 1}}):
        assert norm.feed(json.dumps(frame)) is None
    assert isinstance(norm.feed(json.dumps(book())), MarketDataMessage)
    assert norm.errors == 0 and norm.dropped == {"malformed": 2} and norm.ignored == {"other": 1}
