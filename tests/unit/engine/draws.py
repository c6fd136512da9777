"""Hypothesis strategies shared by the engine's tests."""

from __future__ import annotations

from hypothesis import strategies as st


def magnitudes(low: int, top: int) -> st.SearchStrategy[int]:
    """Integers in ``low..top`` (``1 <= low <= top``) spread evenly over their binary orders of
    magnitude (``st.integers`` over a wide range mostly draws small values)."""
    return st.integers(low.bit_length(), top.bit_length()).flatmap(
        lambda bits: st.integers(max(low, 1 << (bits - 1)), min(top, (1 << bits) - 1)))
