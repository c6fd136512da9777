"""Bounded JSON parsing: every payload either parses or names one reason, nothing escapes."""

from __future__ import annotations

import json

import pytest
from feed.payload import _STRING
from feed.payload import MAX_DEPTH
from feed.payload import PayloadError
from feed.payload import load_json
from feed.payload import nesting_depth
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize(
    ("raw", "depth"),
    [
        (b"1", 0),
        (b'"[[[["', 0),
        (b"{}", 1),
        (b'{"a":[1,[2]],"b":"[[[[["}', 3),
        (b'["\\"[[", [[]]]', 3),
        (b"[]" * 1000, 1),
        (b"[" * 50, 50),
    ],
)
def test_nesting_depth_ignores_brackets_in_strings(raw: bytes, depth: int) -> None:
    assert nesting_depth(raw) == depth


@given(st.binary(max_size=200))
def test_a_string_scan_from_any_quote_ends_at_its_closing_quote_or_the_end(tail: bytes) -> None:
    # A scan that could fail from a quote is tried again from every later quote: an unclosed
    # string full of escaped quotes then costs time growing with the square of its length.
    raw = b'"' + tail
    match = _STRING.match(raw)
    assert match is not None
    assert match.end() == len(raw) or raw[match.end() - 1] == ord('"')


@pytest.mark.parametrize(
    "raw",
    [b'{"data":["' + b' \\"' * 2000,         # unclosed, escaped quotes
     b'{"data":["' + b' \\"' * 2000 + b"\\",  # ... ending in a backslash
     b'["' + b"\\\n[" * 2000],               # escaped line breaks
)
def test_an_unclosed_string_is_not_json_and_hides_its_brackets(raw: bytes) -> None:
    assert nesting_depth(raw) <= 2
    with pytest.raises(PayloadError) as refused:
        load_json(raw, max_bytes=len(raw))
    assert refused.value.reason == "not_json"


def test_real_payloads_parse() -> None:
    assert load_json('{"a": [1, 2]}', max_bytes=100) == {"a": [1, 2]}
    assert load_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH, max_bytes=100) is not None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "too_deep"),
        (b"[" * 200_000, "too_deep"),  # would be a RecursionError inside json
        ('{"a":' * 5000 + "1" + "}" * 5000, "too_deep"),
        (b"x" * 101, "oversized"),
        ("é" * 101, "oversized"),
        (b"\xff\xfe", "not_json"),
        ("\ud800", "not_json"),
        (b"", "not_json"),
        (b"{'a': 1}", "not_json"),
        (b"9" * 5000, "not_json"),  # beyond the parser's integer digit limit
        (None, "not_json"),
        # UTF-16 and UTF-32 (json.loads on bytes reads them) and a lone surrogate in a string
        ('{"a": 1}'.encode("utf-16"), "not_json"),
        ('{"a": 1}'.encode("utf-16-le"), "not_json"),
        ('{"a": 1}'.encode("utf-32"), "not_json"),
        ('"\ud800"', "not_json"),
        (12, "not_json"),
    ],
)
def test_refusals_name_one_reason(raw: object, reason: str) -> None:
    max_bytes = 100 if reason == "oversized" else 1 << 20
    with pytest.raises(PayloadError) as info:
        load_json(raw, max_bytes=max_bytes)  # type: ignore[arg-type]
    assert info.value.reason == reason


def test_parser_recursion_is_caught_past_a_lax_depth_bound() -> None:
    with pytest.raises(PayloadError) as info:
        load_json(b"[" * 5000 + b"]" * 5000, max_bytes=1 << 20, max_depth=10**6)
    assert info.value.reason == "too_deep"


@given(st.binary(max_size=400))
def test_random_bytes_parse_or_name_a_reason(raw: bytes) -> None:
    try:
        load_json(raw, max_bytes=300)
    except PayloadError as exc:
        assert exc.reason in ("oversized", "too_deep", "not_json")


@given(st.recursive(st.none() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c,
                                                                        max_size=3),
                    max_leaves=30))
def test_json_within_bounds_round_trips(value: object) -> None:
    raw = json.dumps(value).encode()
    if nesting_depth(raw) <= MAX_DEPTH:
        assert load_json(raw, max_bytes=len(raw)) == value


@given(st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b'"[', b"\\", b"1", b",",
                                 b":"]), max_size=40),
       st.integers(min_value=0, max_value=8))
def test_too_deep_exactly_when_the_nesting_passes_the_bound(parts: list[bytes],
                                                           max_depth: int) -> None:
    # load_json skips the scan when it opens too few brackets to pass the bound: its refusal
    # must still be exactly nesting_depth's verdict
    raw = b"".join(parts)
    try:
        load_json(raw, max_bytes=1000, max_depth=max_depth)
        reason = None
    except PayloadError as exc:
        reason = exc.reason
    assert (reason == "too_deep") == (nesting_depth(raw) > max_depth)


def test_many_shallow_brackets_parse() -> None:
    raw = b"[" + b",".join([b"[]"] * (MAX_DEPTH * 4)) + b"]"
    assert load_json(raw, max_bytes=len(raw)) == [[]] * (MAX_DEPTH * 4)
